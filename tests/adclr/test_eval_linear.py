"""DINO's linear protocol: its features, its training view, its optimiser and schedule,
the few epochs it takes on the built-in data on a CPU, its resume; the cached-feature probe: its
features, its fit to convergence and its choice of L2 weight without the test split."""

import glob
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import adclr.eval_linear
from adclr.cli import main
from adclr.data import normalize
from adclr.eval_linear import (RandomResizedCrops, cached_probe_features, dino_linear_features, linear_accuracy,
                               linear_protocol, probe_features)
from adclr.features import CenterCrops
from adclr.model import build_backbone


def test_linear_features_follow_dino_s_rule():
    assert dino_linear_features("vit_small") == (4, False) and dino_linear_features("vit_tiny") == (4, False)
    assert dino_linear_features("vit_base") == (1, True)
    torch.manual_seed(0)
    model = build_backbone("vit_test", 32, 8, attention="sdpa").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        layers = model.get_intermediate_layers(x, 2)
        concat = probe_features(model, x, 2, False)
        pooled = probe_features(model, x, 1, True)
    torch.testing.assert_close(concat, torch.cat([layers[0][:, 0], layers[1][:, 0]], 1))
    torch.testing.assert_close(pooled, torch.cat([layers[1][:, 0], layers[1][:, 1:].mean(1)], 1))
    both = probe_features(model, x, 2, True)  # the mean patch token of the last block only
    torch.testing.assert_close(both, torch.cat([concat, layers[1][:, 1:].mean(1)], 1))


class Colours:
    """Three classes, a dominant channel each, with a left-to-right ramp that shows crops and flips."""
    classes = ["red", "green", "blue"]

    def __len__(self):
        return 30

    def load(self, i):
        image = np.zeros((24, 24, 3), np.uint8)
        image[..., i % 3] = 200
        image[..., (i + 1) % 3] = np.linspace(0, 120, 24, dtype=np.uint8)[None, :]
        return Image.fromarray(image), i % 3


class ColourBackbone(torch.nn.Module):
    """A stand-in ViT: every block's tokens are the image's mean colour (times the block number)."""
    embed_dim = 3
    blocks = [None] * 4

    def get_intermediate_layers(self, x, n):
        colour = x.mean((2, 3))[:, None].expand(-1, 5, -1)  # CLS + 4 patch tokens
        return [colour * (len(self.blocks) - n + i + 1) for i in range(n)]


def test_train_crops_are_drawn_anew_each_epoch_and_val_crops_are_fixed():
    train, val = RandomResizedCrops(Colours(), 16), CenterCrops(Colours(), 16)
    first = [train[i][0] for i in range(30)]
    assert all(torch.equal(train[i][0], first[i]) for i in range(30))  # a function of (epoch, index)
    train.epoch = 1
    assert sum(not torch.equal(train[i][0], first[i]) for i in range(30)) >= 28
    ramp = [x[(1 + i) % 3, 8, -1].item() - x[(1 + i) % 3, 8, 0].item() for i, x in enumerate(first)]
    assert min(ramp) < 0 < max(ramp)  # some flipped, some not
    assert torch.equal(val[4][0], val[4][0]) and val[4][0].shape == (3, 16, 16)


def test_linear_protocol_is_dino_s(monkeypatch):
    steps = []

    class SpySGD(torch.optim.SGD):
        def step(self, *args, **kwargs):
            steps.append(dict(self.param_groups[0], params=None))
            return super().step(*args, **kwargs)

    epochs_read = []
    real_getitem = RandomResizedCrops.__getitem__

    def spy_getitem(self, i):
        epochs_read.append(self.epoch)
        return real_getitem(self, i)

    monkeypatch.setattr(torch.optim, "SGD", SpySGD)
    monkeypatch.setattr(RandomResizedCrops, "__getitem__", spy_getitem)
    train, val = RandomResizedCrops(Colours(), 16), CenterCrops(Colours(), 16)
    backbone = ColourBackbone()
    epochs, batch = 6, 10
    result = linear_protocol(backbone, train, val, 3, epochs=epochs, batch_size=batch, lr=40.0,
                             n_last_blocks=2, avgpool=True)
    assert result == {"accuracy": 1.0, "best_accuracy": 1.0,  # colour is linearly separable
                      "train_images": 30, "val_images": 30}
    assert sorted(set(epochs_read)) == list(range(epochs)) and len(epochs_read) == 30 * epochs  # no cache
    peak = 40.0 * batch / 256  # DINO's linear scaling rule
    assert all(s["momentum"] == 0.9 and s["weight_decay"] == 0 for s in steps)
    per_epoch = [s["lr"] for s in steps[::3]]  # 3 batches per epoch
    assert per_epoch == pytest.approx([peak * 0.5 * (1 + math.cos(math.pi * e / epochs)) for e in range(epochs)])


def test_linear_protocol_features_have_dino_s_width(monkeypatch):
    widths = []
    real = adclr.eval_linear.probe_features

    def spy(backbone, images, n, avgpool):
        out = real(backbone, images, n, avgpool)
        widths.append(out.shape[1])
        return out

    monkeypatch.setattr(adclr.eval_linear, "probe_features", spy)
    for n, avgpool, width in ((4, False, 12), (1, True, 6)):
        widths.clear()
        linear_protocol(ColourBackbone(), RandomResizedCrops(Colours(), 16), CenterCrops(Colours(), 16), 3,
                        epochs=1, batch_size=30, n_last_blocks=n, avgpool=avgpool)
        assert set(widths) == {width}


@pytest.mark.parametrize("data", [None, "builtin:scenes", "builtin:shapes"])
def test_linear_on_any_builtin_set_on_cpu_takes_a_few_epochs(data, tiny_checkpoint, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(adclr.eval_linear, "linear_protocol", lambda *args, **kwargs: seen.append(args[4]) or {})
    main(["eval", "linear", "--checkpoint", tiny_checkpoint, "--limit", "4", "--num-workers", "0", "--device", "cpu",
          *(["--data", data] if data else [])])  # no --data: the run's, builtin:scenes
    assert seen == [adclr.eval_linear.BUILTIN_CPU_LINEAR_EPOCHS] and "epochs (DINO's 100" in capsys.readouterr().err


def test_validation_every_val_freq_epochs_and_what_a_resume_keeps(tmp_path, monkeypatch, capsys):
    """Validated after epochs 2 and 4 of 4 (0-based 1 and 3), with an interrupt in epoch 4
    between them: best_accuracy is the best of every validation, those before the resume
    too, and an unreadable file is reported once over both runs."""
    class OneUnreadable(Colours):
        samples = [(f"{i}.png", i % 3) for i in range(30)]

        def load(self, i):
            return (None, i % 3) if i == 4 else super().load(i)

        def error(self, i):
            return "broken"

    train, val = RandomResizedCrops(OneUnreadable(), 16), CenterCrops(Colours(), 16)
    accuracies, validated = iter([0.9, 0.7]), []
    monkeypatch.setattr(adclr.eval_linear, "_validate", lambda *args: validated.append(train.epoch) or (
        next(accuracies), 30))
    real_train_epoch = adclr.eval_linear._train_epoch
    interrupt_in_epoch(monkeypatch, 4)

    def run():
        return linear_protocol(ColourBackbone(), train, val, 3, epochs=4, batch_size=10, n_last_blocks=1,
                               val_freq=2, progress=str(tmp_path / "progress.pt"))

    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(adclr.eval_linear, "_train_epoch", real_train_epoch)
    result = run()
    assert validated == [1, 3]
    assert result["accuracy"] == 0.7 and result["best_accuracy"] == 0.9 and result["train_images"] == 29
    assert capsys.readouterr().err.count("warning: skipping unreadable image 4.png: broken") == 1


def linear_eval(checkpoint, capsys):
    """(The JSON record, the epoch lines without their times, all of stderr) of a 4-epoch
    `eval linear` of `checkpoint` on 8 built-in images per split."""
    main(["eval", "linear", "--checkpoint", str(checkpoint), "--limit", "8", "--epochs", "4", "--batch-size", "4",
          "--num-workers", "0", "--device", "cpu", "--lr", "0.5"])
    out, err = capsys.readouterr()
    epochs = [line.rsplit(" | ", 1)[0] for line in err.splitlines() if line.startswith("linear epoch")]
    return json.loads(out), epochs, err


def interrupt_in_epoch(monkeypatch, n):
    real = adclr.eval_linear._train_epoch
    calls = []

    def train_epoch(*args):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(adclr.eval_linear, "_train_epoch", train_epoch)


@pytest.mark.parametrize("kept", ["whole", "unreadable"])
def test_an_interrupted_linear_evaluation_resumes_where_it_stopped(kept, tiny_checkpoint, tmp_path, monkeypatch,
                                                                   capsys):
    """DINO's protocol runs 100 epochs over ImageNet: an interrupt or a crash lost them all.
    Each epoch is kept beside the checkpoint; the rerun goes on from the last one kept, as
    the uninterrupted evaluation would have, and leaves nothing behind once it ends. A
    kept file that cannot be read is said, and the evaluation starts over."""
    checkpoint = shutil.copy(tiny_checkpoint, tmp_path / "checkpoint.pt")
    whole, whole_epochs, _ = linear_eval(checkpoint, capsys)
    assert glob.glob(str(tmp_path / "*eval-linear*")) == []
    interrupt_in_epoch(monkeypatch, 3)
    with pytest.raises(SystemExit):
        linear_eval(checkpoint, capsys)
    [progress] = glob.glob(str(tmp_path / "checkpoint.eval-linear-*.pt"))
    assert (f"interrupted: the epochs done are kept in {progress}; rerun the same command to resume"
            in capsys.readouterr().err)
    monkeypatch.undo()
    if kept == "unreadable":
        with open(progress, "wb") as f:
            f.write(b"not a state")
    resumed, resumed_epochs, err = linear_eval(checkpoint, capsys)
    assert resumed == whole and glob.glob(str(tmp_path / "*eval-linear*")) == []
    if kept == "whole":
        assert f"linear: resuming at epoch 3/4 from {progress}" in err and resumed_epochs == whole_epochs[2:]
    else:
        assert f"warning: cannot resume from {progress} (" in err and resumed_epochs == whole_epochs


def test_other_settings_or_a_rewritten_checkpoint_do_not_resume_a_kept_evaluation(tiny_checkpoint, tmp_path,
                                                                                 monkeypatch, capsys):
    checkpoint = shutil.copy(tiny_checkpoint, tmp_path / "checkpoint.pt")
    interrupt_in_epoch(monkeypatch, 2)
    with pytest.raises(SystemExit):
        linear_eval(checkpoint, capsys)
    monkeypatch.undo()
    main(["eval", "linear", "--checkpoint", str(checkpoint), "--limit", "8", "--epochs", "4", "--batch-size", "4",
          "--num-workers", "0", "--device", "cpu", "--lr", "0.25"])
    assert "resuming" not in capsys.readouterr().err
    shutil.copy(tiny_checkpoint, checkpoint)  # as a run that goes on training rewrites it
    assert "resuming" not in linear_eval(checkpoint, capsys)[2]
    assert len(glob.glob(str(tmp_path / "checkpoint.eval-linear-*.pt"))) == 1  # the first, still kept


def test_a_linear_evaluation_that_cannot_keep_its_epochs_says_so_once_and_runs(tiny_checkpoint, tmp_path,
                                                                              monkeypatch, capsys):
    """A checkpoint in a folder it may not write to (downloaded weights, a shared run)."""
    def refused(path, write):
        raise adclr.eval_linear.WriteError(f"cannot write {path}: permission denied")

    checkpoint = shutil.copy(tiny_checkpoint, tmp_path / "checkpoint.pt")
    monkeypatch.setattr(adclr.eval_linear, "write_atomically", refused)
    result, epochs, err = linear_eval(checkpoint, capsys)
    assert len(epochs) == 4 and 0 <= result["accuracy"] <= 1
    assert result["lr"] == 0.5 * 4 / 256 and result["batch_size"] == 4  # the rate it trained with, scaled
    assert err.count("warning: cannot write ") == 1 and "an interrupted evaluation will start over" in err


def separable(n=300, dim=32, seed=0):
    """Gaussian features whose 3 classes a linear map separates with a margin, in a
    direction of small variance beside large-variance noise (what a few small optimiser
    steps on standardised features do not reach)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, dim, generator=g) * torch.linspace(0.2, 5, dim)
    score = x[:, 0] * 3 + x[:, 1] * 2
    keep = ((score % 2) - 1).abs() < 0.7  # away from the class boundaries
    return x[keep][:n], (score[keep][:n] // 2 % 3).long()


def test_probe_fits_separable_classes_to_convergence():
    x, y = separable()
    assert linear_accuracy(x, y, x, y, weight_decays=(0.0,)) == 1.0
    assert linear_accuracy(x, y, x, y) >= 0.97  # whatever L2 weight the held-out fifth chose


def test_probe_says_when_too_few_images_leave_no_choice_of_weight():
    x, y = separable(4)  # a fifth of 4 is none
    lines = []
    linear_accuracy(x, y, x, y, weight_decays=(0.0, 0.5), log=lines.append)
    assert lines[0] == "4 train images: too few to hold any out, so L2 weight 0.5, the largest, without a choice"


def test_probe_breaks_a_tie_on_held_out_images_towards_the_larger_weight(monkeypatch):
    monkeypatch.setattr(adclr.eval_linear, "_accuracy", lambda *args: 0.5)
    lines = []
    x, y = separable(20)
    linear_accuracy(x, y, x, y, epochs=5, weight_decays=(0.0, 1e-3, 0.5), log=lines.append)
    assert lines[-1] == "fitting L2 weight 0.5 on all 20 train images"


def test_probe_chooses_its_weight_decay_on_held_out_train_images_with_their_views(monkeypatch):
    x, y = separable(100)
    x[:, -1] = torch.arange(100.0)  # image ids, to trace the rows each fit sees
    mirror = x.clone()
    mirror[:, -1] += 0.5
    fits = []
    real = adclr.eval_linear._logistic_regression

    def spy(rows, labels, num_classes, weight_decay, max_iter):
        halves = (2 * (rows[:, -1] * x[:, -1].std() + x[:, -1].mean())).round().long()  # undo the standardising
        fits.append((weight_decay, halves // 2, (halves % 2).sum().item()))
        return real(rows, labels, num_classes, weight_decay, max_iter)

    monkeypatch.setattr(adclr.eval_linear, "_logistic_regression", spy)
    test_y = y[torch.randperm(100, generator=torch.Generator().manual_seed(1))]  # test labels play no part
    linear_accuracy(x, y, x, test_y, epochs=50, train_views=(mirror,), weight_decays=(0.0, 100.0))
    assert [wd for wd, _, _ in fits] == [0.0, 100.0, 0.0]  # a strong L2 weight loses on the held-out fifth
    for _, ids, mirrored in fits[:2]:  # 80 images, each with both its views
        assert len(ids) == 160 and mirrored == 80 and (torch.bincount(ids, minlength=100) == 2).sum() == 80
    assert torch.equal(torch.bincount(fits[2][1]), torch.full((100,), 2))  # refitted on every image


def test_cached_probe_features_are_dino_s_of_the_crops_and_their_mirror_images():
    torch.manual_seed(0)
    backbone = build_backbone("vit_test", 32, 8, attention="sdpa").eval()
    crops = CenterCrops(Colours(), 32, limit=6)
    train, mirror, train_y, val, val_y = cached_probe_features(backbone, crops, crops, 2, False)
    images = torch.stack([crops[i][0] for i in range(6)])
    with torch.no_grad():
        x = normalize(images)
        torch.testing.assert_close(train, probe_features(backbone, x, 2, False))
        torch.testing.assert_close(mirror, probe_features(backbone, x.flip(-1), 2, False))
        torch.testing.assert_close(train[:, 64:], backbone.forward_features(x)["cls"])  # k-NN's: the last CLS
    assert torch.equal(val, train) and torch.equal(train_y, val_y) and not torch.allclose(train, mirror)


def test_fast_probe_says_what_it_does_and_each_unreadable_file_once(tiny_checkpoint, tmp_path, capsys):
    """eval linear --fast: progress over the three feature passes (train, its mirror images,
    val), a line per fit, the L2 weight chosen; an unreadable train image reported once,
    though two passes read it."""
    from trainer_testing import image_folder

    data = tmp_path / "data"
    image_folder(data / "train", per_class=6, unreadable=("b/2.png",))
    image_folder(data / "val", per_class=2)
    main(["eval", "linear", "--fast", "--checkpoint", tiny_checkpoint, "--data", str(data), "--num-workers", "0",
          "--device", "cpu"])
    err = capsys.readouterr().err
    for line in ("linear (fast): train features 12/12 images", "linear (fast): mirrored train features 12/12 images",
                 "linear (fast): val features 4/4 images"):
        assert line in err
    fits = [line for line in err.splitlines() if line.startswith("linear (fast): fitting L2 weight")]
    assert len(fits) == len(adclr.eval_linear.PROBE_WEIGHT_DECAYS) + 1
    assert "linear (fast): L2 weight " in err and " chosen (held-out accuracy " in err
    assert err.count("skipped 1 unreadable image\n") == 1 and err.count("skipping unreadable image") == 1
