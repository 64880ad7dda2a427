"""The dense probe: its scores, its ceiling and floor, and `adclr eval dense` end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from adclr.cli import main
from adclr.eval_dense import (IGNORE, NUM_LABELS, SegmentationCrops, confusion_matrix, default_dense_data, dense_probe,
                              patch_features, patch_majority, scores, train_probe)
from adclr.model import build_backbone

PATCH, GRID, BLOCK = 8, 8, 16  # 64 px images, 4 x 4 blocks of 2 x 2 patches


class PatchLabels:
    """Images of 4 x 4 blocks of 16 px, each block one of 5 colours; the mask is the colour's class.

    Deterministic in i; class 0 fills about half of the blocks (a "background").
    """

    COLOURS = np.array([(128, 128, 128), (230, 30, 30), (30, 200, 30), (30, 30, 230), (230, 230, 30)], np.uint8)

    def __init__(self, length, seed=0):
        self.length, self.seed = length, seed

    def __len__(self):
        return self.length

    def load_segmentation(self, i):
        rng = np.random.default_rng([self.seed, i])
        blocks = np.where(rng.random((4, 4)) < 0.5, 0, rng.integers(1, 5, (4, 4)))
        mask = blocks.repeat(BLOCK, 0).repeat(BLOCK, 1).astype(np.uint8)
        return Image.fromarray(self.COLOURS[mask]), mask


class Backbone(torch.nn.Module):
    """The interface the probe uses: patch_size, blocks, get_intermediate_layers."""

    patch_size = PATCH

    def __init__(self, encode):
        super().__init__()
        self.encode, self.blocks = encode, [None, None]

    def get_intermediate_layers(self, x, n=1):
        patches = torch.nn.functional.avg_pool2d(x, PATCH).flatten(2).transpose(1, 2)  # (B, N, 3) mean colour
        tokens = torch.cat([patches.mean(1, keepdim=True), patches], 1)
        return [self.encode(tokens)] * n


def probe(backbone, **kwargs):
    train = SegmentationCrops(PatchLabels(64), GRID * PATCH)
    val = SegmentationCrops(PatchLabels(32, seed=1), GRID * PATCH, full_masks=True)
    return dense_probe(backbone, train, val, epochs=30, batch_size=16, **kwargs)


def test_tokens_that_encode_the_labels_give_a_high_miou():
    # A fixed random lift of each patch's mean colour: the class is linear in the token.
    lift = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    result = probe(Backbone(lambda t: t @ lift))
    # Not 1: the logits of neighbouring patches are blended by the bilinear upsampling, so
    # near a block's edge a third class can win (0.886 and 0.943 measured; chance is 0.1).
    assert result["miou"] > 0.85 and result["pixel_accuracy"] > 0.92, result
    assert result["num_classes"] == 5 and sorted(result["iou"]) == [0, 1, 2, 3, 4]
    assert result["train_images"] == 64 and result["val_images"] == 32
    # The blocks are 2 x 2 patches: every patch holds one class, so the labels at the grid are perfect.
    assert result["patch_majority"] == {"miou": 1.0, "pixel_accuracy": 1.0}


def test_val_labels_past_the_probes_classes_are_named(capsys):
    """Train masks up to class 2, val masks up to 4: the probe cannot predict 3 and 4, whose
    IoU of 0 counts in the mIoU; a warning says so."""

    class FewerInTrain(PatchLabels):
        def load_segmentation(self, i):
            image, mask = super().load_segmentation(i)
            return image, np.minimum(mask, 2)

    train = SegmentationCrops(FewerInTrain(16), GRID * PATCH)
    val = SegmentationCrops(PatchLabels(8, seed=1), GRID * PATCH, full_masks=True)
    result = dense_probe(Backbone(lambda t: t), train, val, epochs=2, batch_size=16)
    assert result["num_classes"] == 3 and {3, 4} <= set(result["iou"])
    assert "warning: the val masks hold labels 3, 4, past the probe's 3 classes" in capsys.readouterr().err


def test_patch_majority_labels_each_cell_with_its_most_frequent_class():
    mask = torch.tensor([[1, 1, 2, 2],
                         [1, 2, 2, 2],
                         [0, 0, 0, IGNORE],
                         [0, 1, 0, 0]], dtype=torch.uint8)
    # 2 x 2 cells predict 1, 2 / 0, 0 (the IGNORE pixel does not vote, nor count).
    confusion = patch_majority(mask, (2, 2))
    expected = torch.zeros(NUM_LABELS, NUM_LABELS, dtype=torch.long)
    expected[0, 0], expected[1, 1], expected[1, 0], expected[2, 2], expected[2, 1] = 6, 3, 1, 4, 1
    assert torch.equal(confusion, expected)
    # A grid that does not divide the mask: every non-IGNORE pixel counted once.
    assert patch_majority(torch.randint(0, 3, (5, 3), dtype=torch.uint8), (2, 2)).sum() == 15
    # A grid as fine as the pixels reproduces the mask, a grid of other height and width too.
    assert scores(patch_majority(mask, (4, 4)))["miou"] == 1.0
    assert scores(patch_majority(torch.arange(6, dtype=torch.uint8).view(2, 3), (2, 3)))["miou"] == 1.0


def test_a_constant_backbone_gets_chance():
    result = probe(Backbone(lambda t: torch.zeros(*t.shape[:2], 16)))
    # Nothing to go on but the class prior: every pixel the most frequent class, 0.
    val = PatchLabels(32, seed=1)
    truth = np.concatenate([val.load_segmentation(i)[1].ravel() for i in range(32)])
    majority = (truth == 0).mean()
    assert result["pixel_accuracy"] == pytest.approx(majority)
    assert result["miou"] == pytest.approx(majority / 5)  # IoU of class 0, and 0 for the four others
    assert result["iou"][0] == pytest.approx(majority)


def test_scores_and_ignore_index():
    # 2 x 3 mask, one pixel ignored; logits constant per column: predict 0, 1, 1.
    mask = torch.tensor([[[0, 1, 1], [0, 0, IGNORE]]], dtype=torch.uint8)
    logits = torch.tensor([[[9.0, 0.0, 0.0]] * 2, [[0.0, 9.0, 9.0]] * 2])[None]  # (1, 2, 2, 3)
    confusion = confusion_matrix(logits, mask)
    assert confusion.shape == (NUM_LABELS, NUM_LABELS) and confusion.sum() == 5  # the IGNORE pixel is out
    assert confusion[0, 0] == 2 and confusion[0, 1] == 1 and confusion[1, 1] == 2
    result = scores(confusion)
    # class 0: intersection 2, union 3; class 1: intersection 2, union 3.
    assert result["iou"] == pytest.approx({0: 2 / 3, 1: 2 / 3})
    assert result["miou"] == pytest.approx(2 / 3) and result["pixel_accuracy"] == pytest.approx(4 / 5)
    # A class predicted but absent from the ground truth counts, with its IoU of 0.
    confusion[1, 2] = 1
    assert scores(confusion)["iou"] == pytest.approx({0: 2 / 3, 1: 2 / 4, 2: 0})


def test_a_constant_feature_channel_leaves_the_probe_finite():
    """Standardising divides by each channel's spread, which is 0 for a channel that never changes."""
    features = torch.cat([torch.randn(4, 2, 2, 3), torch.ones(4, 2, 2, 1)], -1)
    probe = train_probe(features, torch.zeros(4, 8, 8, dtype=torch.uint8), 2, epochs=1, batch_size=4)
    assert torch.isfinite(probe(features)).all()


def test_logits_are_upsampled_to_each_masks_own_size():
    backbone = build_backbone("vit_test", 32, 8).eval()
    features = patch_features(backbone, torch.randn(2, 3, 48, 32), n_last_blocks=2)
    assert features.shape == (2, 6, 4, 128)  # (B, h, w, 2 blocks x 64)
    val = SegmentationCrops(PatchLabels(3), 32, full_masks=True)  # 64 px images, run at 32
    assert val[0][0].shape == (3, 32, 32) and val[0][1].shape == (64, 64)
    assert SegmentationCrops(PatchLabels(3), 32)[0][1].shape == (32, 32)  # for training: resized
    confusion = confusion_matrix(torch.randn(1, 5, 4, 4), torch.zeros(1, 50, 70, dtype=torch.uint8))
    assert confusion.sum() == 50 * 70


def write_pairs(root, split, count, size=(40, 24)):
    """root/images/split/*.jpg and root/masks/split/*.png: left half class 1, right half 2, top row ignored."""
    for d in ("images", "masks"):
        (root / d / split).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        w, h = size
        mask = np.ones((h, w), np.uint8)
        mask[:, w // 2:] = 2
        mask[0] = IGNORE
        colours = np.array([(0, 0, 0), (220, 40, 40), (40, 40, 220)], np.uint8)
        pixels = colours[np.minimum(mask, 2)]
        Image.fromarray(pixels).save(root / "images" / split / f"{i}.jpg", quality=95)
        Image.fromarray(mask).save(root / "masks" / split / f"{i}.png")


def test_eval_dense_on_a_folder_and_on_the_runs_builtin_data(tiny_checkpoint, tmp_path, capsys):
    write_pairs(tmp_path / "data", "train", 6)
    write_pairs(tmp_path / "data", "val", 3, size=(30, 20))
    main(["eval", "dense", "--checkpoint", tiny_checkpoint, "--data", str(tmp_path / "data"),
          "--epochs", "30", "--num-workers", "0", "--batch-size", "4"])
    out, err = capsys.readouterr()
    record = json.loads(out.splitlines()[-1])
    assert record["protocol"] == "dense" and record["num_classes"] == 3  # 0 unused, 1 and 2
    assert record["train_images"] == 6 and record["val_images"] == 3
    assert sorted(record["iou"]) == ["1", "2"] and record["miou"] > 0.9  # two flat colours, halves apart
    assert "dense: probe epoch 30/30" in err and "dense: mIoU" in err and "every patch right: mIoU" in err
    assert record["patch_majority"]["miou"] > 0.9  # 5 x 3 cells over halves of 30 x 20 masks: one column split

    main(["eval", "dense", "--checkpoint", tiny_checkpoint, "--limit", "16", "--epochs", "2",
          "--num-workers", "0", "--n-last-blocks", "2"])
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["data"] == "builtin:scenes" and record["n_last_blocks"] == 2  # the run's data
    assert record["train_images"] == 16 and record["val_images"] == 16
    assert "background" in record["iou"] and 0 <= record["miou"] <= 1


@pytest.mark.parametrize("run_data, dense_data", [
    ("builtin:scenes", "builtin:scenes"), (None, "builtin"), ("/data/imagenet", "builtin:grey-ground-scenes")])
def test_dense_data_defaults_to_the_runs_builtin_set(run_data, dense_data):
    assert default_dense_data({"data": run_data}) == dense_data


def test_eval_dense_user_errors(tiny_checkpoint, tmp_path, capsys):
    def error(*argv):
        with pytest.raises(SystemExit) as exit:
            main(["eval", "dense", "--checkpoint", tiny_checkpoint, "--num-workers", "0", *argv])
        return str(exit.value.code)

    assert error("--data", str(tmp_path)).startswith("error: --data: no train split of image/mask pairs")
    assert error("--n-last-blocks", "3") == "error: --n-last-blocks 3 is more than the 2 blocks of the run's model"
    write_pairs(tmp_path / "data", "train", 2)
    write_pairs(tmp_path / "data", "val", 2)
    assert error("--data", str(tmp_path / "data"), "--num-classes", "2") == (
        f"error: --data {tmp_path / 'data'}: the train masks hold label 2, not below num_classes 2")
    for name in ("0.jpg", "1.jpg"):  # no usable val pair: warned, then one line
        (tmp_path / "data" / "images" / "val" / name).write_bytes(b"not an image")
    assert error("--data", str(tmp_path / "data"), "--epochs", "1") == (
        f"error: --data {tmp_path / 'data'}: no usable image/mask pairs in val")
    assert capsys.readouterr().err.count("warning: skipping unreadable image") == 2
