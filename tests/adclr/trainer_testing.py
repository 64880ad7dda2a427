"""Command-line runs and inputs shared by the trainer tests.

`run` calls `adclr.cli.main` in this process and returns what the shell would see: the
exit status and stderr. TRAIN_RANGES documents each numeric `adclr train` flag's range
independently of adclr.config.ALLOWED, so that the two are held to each other.
"""

import json
import os

import pytest
from PIL import Image

from adclr.cli import main

# The smallest run the CLI can do: 2-block dim-64 ViT on 32 px crops, one step.
TINY = ["--arch", "vit_test", "--patch-size", "8", "--image-size", "32", "--local-size", "16",
        "--num-local-crops", "1", "--num-queries", "2", "--out-dim", "64", "--head-hidden-dim", "32",
        "--head-bottleneck-dim", "16", "--batch-size", "4", "--max-steps", "1", "--num-workers", "0",
        "--device", "cpu", "--warmup-epochs", "0", "--warmup-teacher-temp-epochs", "0",
        "--freeze-last-layer-epochs", "0", "--log-every", "1"]


def run(argv, capsys):
    """(exit status, stderr) of `adclr *argv`, as the shell would see them."""
    try:
        main(argv)
        status = 0
    except SystemExit as exit:
        status = exit.code
    err = capsys.readouterr().err
    if isinstance(status, str):  # SystemExit("error: ..."): Python prints it and exits 1
        err, status = err + status + "\n", 1
    return status, err


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def image_folder(root, per_class=4, unreadable=()):
    """root/<a|b>/<i>.png, 40x30 RGB; the names in `unreadable` hold bytes Pillow cannot read."""
    for c, cls in enumerate(("a", "b")):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(per_class):
            name = os.path.join(root, cls, f"{i}.png")
            if f"{cls}/{i}.png" in unreadable:
                with open(name, "wb") as f:
                    f.write(b"not an image")
            else:
                Image.new("RGB", (40, 30), (60 * i, 100 * c, 50)).save(name)
    return str(root)


def write_file(path, text="x"):
    path.write_text(text)
    return str(path)


# The documented range of each numeric `adclr train` flag: (flag, range as the error states
# it, type, a negative value to try). Every numeric Config field must be here
# (test_config.py: test_every_numeric_field_has_a_range).
TRAIN_RANGES = [
    ("--patch-size", ">= 1", int, "-1"), ("--image-size", ">= 1", int, "-1"),
    ("--local-size", ">= 1", int, "-1"), ("--out-dim", ">= 1", int, "-1"),
    ("--head-hidden-dim", ">= 1", int, "-1"), ("--head-bottleneck-dim", ">= 1", int, "-1"),
    ("--drop-path", "[0, 1)", float, "-0.1"),
    ("--num-local-crops", ">= 0", int, "-1"), ("--num-queries", ">= 0", int, "-1"),
    ("--lambda-query", ">= 0", float, "-0.5"), ("--student-temp", "> 0", float, "-0.1"),
    ("--lambda-dense", "[0, 1]", float, "1.5"), ("--mask-ratio", "(0, 1)", float, "1"),
    ("--lambda-align", ">= 0", float, "-1"),
    ("--warmup-teacher-temp", "> 0", float, "-0.04"), ("--teacher-temp", "> 0", float, "-0.07"),
    ("--warmup-teacher-temp-epochs", ">= 0", float, "-1"), ("--center-momentum", "[0, 1]", float, "-0.9"),
    ("--batch-size", ">= 1", int, "-8"), ("--epochs", ">= 1", int, "-1"), ("--max-steps", ">= 0", int, "-1"),
    ("--base-lr", "> 0", float, "-5e-4"), ("--min-lr", ">= 0", float, "-1e-6"),
    ("--warmup-epochs", ">= 0", float, "-1"), ("--weight-decay", ">= 0", float, "-0.04"),
    ("--weight-decay-end", ">= 0", float, "-0.4"), ("--momentum-teacher", "[0, 1]", float, "-0.996"),
    ("--clip-grad", ">= 0", float, "-3"), ("--freeze-last-layer-epochs", ">= 0", float, "-1"),
    ("--seed", "[0, 10000000]", int, "-1"), ("--num-workers", ">= -1", int, "-2"),
    ("--log-every", ">= 1", int, "-1"), ("--checkpoint-every", ">= 1", int, "-1"),
    ("--saveckp-freq", ">= 0", int, "-1"), ("--peak-tflops", ">= 0", float, "-1"),
]


SCALE_FLAGS = ["--global-scale", "--local-scale", "--query-scale"]


def accepts(spec, value):
    """Whether `value` lies in a range written as in TRAIN_RANGES."""
    if spec.startswith(">"):
        op, low = spec.split()
        return value >= float(low) if op == ">=" else value > float(low)
    low, high = (float(x) for x in spec[1:-1].split(","))
    return (low <= value if spec[0] == "[" else low < value) and (value <= high if spec[-1] == "]" else value < high)


def out_of_range(spec, value):
    return f"must be {spec}, got {value}" if spec.startswith(">") else f"must be in {spec}, got {value}"


def crash_in_step(monkeypatch, index, command):
    """Call command() with adclr.train.train_step raising at step `index` (0-based), as a
    crash there would; train_step is itself again afterwards."""
    import adclr.train

    real_step = adclr.train.train_step

    def crashing(trainer, batch, step):
        if step == index:
            raise RuntimeError("simulated crash")
        return real_step(trainer, batch, step)

    monkeypatch.setattr(adclr.train, "train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        command()
    monkeypatch.setattr(adclr.train, "train_step", real_step)
