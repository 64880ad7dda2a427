"""`adclr show`: the attention weights behind the pictures, and each picture command's files."""

import builtins
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from adclr.cli import main
from adclr.features import last_block_attention
from adclr.model import build_backbone
from adclr.show import CELL, _images, pyplot


@pytest.mark.parametrize("options", [{}, {"query_sees_prefix": True, "query_sees_self": True},
                                     {"query_sees_queries": True}])
def test_attention_weights_are_the_blocks_own(options):
    """The CLS row (the op's) and the recomputed query rows, applied to the block's values,
    give the attention module's output in those rows."""
    torch.manual_seed(0)
    backbone = build_backbone("vit_test", 32, 8, **options).eval()
    images, queries = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 3, 8, 8)
    attn = backbone.blocks[-1].attn
    seen = {}
    hooks = [attn.register_forward_pre_hook(lambda m, args: seen.update(x=args[0])),
             attn.register_forward_hook(lambda m, args, out: seen.update(out=out))]
    probs, num_queries = last_block_attention(backbone, images, queries)
    for hook in hooks:
        hook.remove()
    B, L, _ = seen["x"].shape
    assert num_queries == 3 and probs.shape == (2, 2, 4, L) and L == 1 + 16 + 3
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 4))
    assert (probs[:, :, 0, 17:] == 0).all()  # CLS never sees the queries
    if not options:
        assert (probs[:, :, 1:, 0] == 0).all() and (probs[:, :, 1:, 17:] == 0).all()
    out, _ = seen["out"]  # the module ran with return_prefix_probs
    v = attn.qkv(seen["x"]).view(B, L, 3, 2, 32)[:, :, 2].transpose(1, 2)  # (B, heads, L, head_dim)
    rows = attn.proj((probs @ v).transpose(1, 2).reshape(B, 4, 64))
    torch.testing.assert_close(rows, out[:, [0, 17, 18, 19]], atol=1e-5, rtol=1e-4)


@pytest.fixture
def run(tiny_checkpoint, tmp_path):
    """A copy of the tiny run (checkpoint and metrics.jsonl), so that pictures land in tmp_path."""
    pytest.importorskip("matplotlib")
    shutil.copytree(os.path.dirname(tiny_checkpoint), tmp_path / "run")
    return tmp_path / "run"


def picture(argv, capsys):
    main(["show", *argv])
    files = json.loads(capsys.readouterr().out.splitlines()[-1])["files"]
    assert all(os.path.isfile(f) for f in files)
    return files


def size(path):
    with Image.open(path) as image:
        return image.size


def test_show_attention_writes_one_picture_per_image(run, capsys):
    files = picture(["attention", "--checkpoint", str(run / "checkpoint.pt"), "--images", "2"], capsys)
    assert files == [str(run / "pictures" / "attention_0.png"), str(run / "pictures" / "attention_1.png")]
    # Rows: CLS and the run's 2 queries; columns: image, mean, 2 heads.
    assert size(files[0]) == (4 * CELL, 3 * CELL)
    files = picture(["attention", "--checkpoint", str(run / "checkpoint.pt"), "--images", "1", "--num-queries", "0",
                     "--out", str(run / "elsewhere")], capsys)
    assert files == [str(run / "elsewhere" / "attention_0.png")] and size(files[0]) == (4 * CELL, CELL)


def test_show_attention_leaves_only_this_calls_pictures(run, capsys):
    """A second call with fewer images removes the first call's extra pictures (they
    would read as this checkpoint's), and nothing else in the folder."""
    checkpoint = str(run / "checkpoint.pt")
    picture(["attention", "--checkpoint", checkpoint, "--images", "3"], capsys)
    (run / "pictures" / "attention_notes.png").write_bytes(b"mine")
    files = picture(["attention", "--checkpoint", checkpoint, "--images", "1"], capsys)
    assert sorted(os.listdir(run / "pictures")) == ["attention_0.png", "attention_notes.png"]
    assert files == [str(run / "pictures" / "attention_0.png")]


def test_show_attention_stopped_part_way_leaves_no_earlier_picture(run, capsys, monkeypatch):
    import adclr.show

    checkpoint = str(run / "checkpoint.pt")
    picture(["attention", "--checkpoint", checkpoint, "--images", "3"], capsys)
    written = []

    def save_then_stop(plt, fig, path):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        plt.close(fig)
        open(path, "wb").close()

    monkeypatch.setattr(adclr.show, "save_figure", save_then_stop)
    with pytest.raises(SystemExit):
        main(["show", "attention", "--checkpoint", checkpoint, "--images", "3"])
    assert os.listdir(run / "pictures") == ["attention_0.png"]


def test_show_attention_on_a_folder_of_images(run, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    for i, shape in enumerate([(50, 30), (20, 40), (64, 64)]):
        Image.new("RGB", shape, (40 * i, 100, 0)).save(tmp_path / "photos" / f"{i}.png")
    (tmp_path / "photos" / "bad.jpg").write_bytes(b"not an image")
    main(["show", "attention", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(tmp_path / "photos"),
          "--images", "5"])
    out, err = capsys.readouterr()
    assert len(json.loads(out.splitlines()[-1])["files"]) == 3  # every readable image, fewer than asked
    # Both said: the file skipped (as eval says it), and the pictures short of those asked.
    assert f"warning: skipping unreadable image {tmp_path / 'photos' / 'bad.jpg'}: " in err
    assert f"note: 3 readable images of the first 4 in --data {tmp_path / 'photos'}: 3 pictures, not 5" in err
    # Readable images past the files it tries: it says it tried those only.
    for i in range(8):
        (tmp_path / "photos" / f"-bad{i}.jpg").write_bytes(b"not an image")  # sorted first
    with pytest.raises(SystemExit, match=f"--data {tmp_path / 'photos'}: none of its first 4 image files can be read"):
        main(["show", "attention", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(tmp_path / "photos"),
              "--images", "1"])


def test_show_dense_writes_images_truth_and_prediction(run, capsys):
    files = picture(["dense", "--checkpoint", str(run / "checkpoint.pt"), "--images", "3", "--limit", "16",
                     "--num-workers", "0"], capsys)
    assert files == [str(run / "pictures" / "dense.png")] and size(files[0]) == (3 * CELL, 3 * CELL)


def test_show_curves_writes_beside_the_metrics(run, capsys):
    files = picture(["curves", str(run)], capsys)
    assert files == [str(run / "metrics.png")]
    width, height = size(files[0])
    assert width == 4 * 320 and height == 280  # loss, lr, teacher temperature, momentum; no k-NN logged
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "knn_top1": 0.5}) + "\n{cut sho")
    assert size(picture(["curves", str(run / "metrics.jsonl")], capsys)[0]) == (5 * 320, 280)


def test_show_without_matplotlib_says_how_to_install_it(monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit) as exit:
        pyplot()
    assert exit.value.code == "error: adclr show needs matplotlib: pip install 'adclr[viz]'"


def test_only_the_show_commands_import_matplotlib():
    """matplotlib is an optional extra: training, evaluation and compare run without it."""
    code = ("import sys; import adclr.cli, adclr.compare, adclr.eval_dense, adclr.eval_knn, adclr.eval_linear, "
            "adclr.export, adclr.train, adclr.show; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"


def test_show_user_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:  # not a built-in set's name: a folder, which does not exist
        _images("builtin:nothing", 1)
    assert exit.value.code.startswith("error: --data: 'builtin:nothing' is no built-in set (those are builtin, ")
    assert exit.value.code.endswith("), nor a dataset folder")
    with pytest.raises(SystemExit) as exit:
        main(["show", "curves", str(tmp_path)])
    assert exit.value.code == (f"error: {tmp_path / 'metrics.jsonl'} does not exist; pass a run folder "
                               "(adclr train --out) or its metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit) as exit:
        main(["show", "curves", str(tmp_path)])
    assert exit.value.code == f"error: {tmp_path / 'metrics.jsonl'} holds no metrics records"
