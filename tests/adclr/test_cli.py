"""`adclr` on bad input: every flag's range, user errors, corrupt checkpoints, resume hygiene.

Each case runs the real command in this process (`adclr.cli.main`) and asserts the
exact outcome: argparse's exit code 2 and "argument --flag: ..." for a value out of
range, one "error: ..." line naming the flag or file (exit 1) for what the user must
fix, and never a traceback.
"""

import dataclasses
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import adclr.train
from adclr_kernels.attention import xformers_available, xformers_unavailable_reason
from adclr.cli import main
import adclr.checkpoint
from adclr.checkpoint import load_checkpoint
from adclr.config import ALLOWED, Config

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


# --------------------------------------------------------------------------- every numeric flag

# The documented range of each numeric `adclr train` flag, independent of adclr.config.ALLOWED:
# (flag, range as the error states it, type, a negative value to try). Every numeric Config
# field must be here (test_every_numeric_field_has_a_range).
TRAIN_RANGES = [
    ("--patch-size", ">= 1", int, "-1"), ("--image-size", ">= 1", int, "-1"),
    ("--local-size", ">= 1", int, "-1"), ("--out-dim", ">= 1", int, "-1"),
    ("--head-hidden-dim", ">= 1", int, "-1"), ("--head-bottleneck-dim", ">= 1", int, "-1"),
    ("--drop-path", "[0, 1)", float, "-0.1"),
    ("--num-local-crops", ">= 0", int, "-1"), ("--num-queries", ">= 0", int, "-1"),
    ("--lambda-query", ">= 0", float, "-0.5"), ("--student-temp", "> 0", float, "-0.1"),
    ("--warmup-teacher-temp", "> 0", float, "-0.04"), ("--teacher-temp", "> 0", float, "-0.07"),
    ("--warmup-teacher-temp-epochs", ">= 0", float, "-1"), ("--center-momentum", "[0, 1]", float, "-0.9"),
    ("--batch-size", ">= 1", int, "-8"), ("--epochs", ">= 1", int, "-1"), ("--max-steps", ">= 0", int, "-1"),
    ("--base-lr", "> 0", float, "-5e-4"), ("--min-lr", ">= 0", float, "-1e-6"),
    ("--warmup-epochs", ">= 0", float, "-1"), ("--weight-decay", ">= 0", float, "-0.04"),
    ("--weight-decay-end", ">= 0", float, "-0.4"), ("--momentum-teacher", "[0, 1]", float, "-0.996"),
    ("--clip-grad", ">= 0", float, "-3"), ("--freeze-last-layer-epochs", ">= 0", float, "-1"),
    ("--seed", "[0, 10000000]", int, "-1"), ("--num-workers", ">= -1", int, "-2"),
    ("--log-every", ">= 1", int, "-1"), ("--checkpoint-every", ">= 1", int, "-1"),
    ("--saveckp-freq", ">= 0", int, "-1"),
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


def test_every_numeric_field_has_a_range():
    numeric = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(Config)
               if isinstance(f.default, (int, float, tuple)) and not isinstance(f.default, bool)}
    assert numeric == {flag for flag, *_ in TRAIN_RANGES} | set(SCALE_FLAGS)
    for f in dataclasses.fields(Config):
        assert f.name in ALLOWED or isinstance(f.default, (bool, str)), f.name
        # `x: float = 30` would make the flag parse as int and reject 0.5.
        assert type(f.default).__name__ == f.type, (f.name, f.type, f.default)


@pytest.fixture
def accepted_config(monkeypatch):
    """Run `adclr train` up to the start of training; returns the Config it would train."""
    seen = []
    monkeypatch.setattr(adclr.train, "train", seen.append)
    return seen


@pytest.mark.parametrize("flag,spec,kind,negative", TRAIN_RANGES, ids=[r[0] for r in TRAIN_RANGES])
@pytest.mark.parametrize("which", ["zero", "negative"])
def test_train_flag_at_zero_and_negative(flag, spec, kind, negative, which, accepted_config, capsys):
    text = "0" if which == "zero" else negative
    value = kind(text)
    status, err = run(["train", *TINY, f"{flag}={text}"], capsys)  # "=": argparse takes -5e-4 for an option
    if accepts(spec, value):
        assert status == 0 and err.count("error") == 0
        assert getattr(accepted_config[0], flag[2:].replace("-", "_")) == value
    else:
        assert status == 2 and not accepted_config
        assert err.splitlines()[-1] == f"adclr train: error: argument {flag}: {out_of_range(spec, value)}"
        assert "Traceback" not in err


@pytest.mark.parametrize("flag", SCALE_FLAGS)
@pytest.mark.parametrize("values,message", [
    (["0", "1"], "must be in (0, 1], got 0.0"),
    (["-0.5", "1"], "must be in (0, 1], got -0.5"),
    (["0.1", "1.5"], "must be in (0, 1], got 1.5"),
    (["0.9", "0.4"], "LOW must be <= HIGH, got 0.9 0.4"),
    (["nan", "1"], "must be a finite number, got nan"),
])
def test_scale_ranges(flag, values, message, accepted_config, capsys):
    status, err = run(["train", *TINY, flag, *values], capsys)
    assert status == 2 and not accepted_config
    assert err.splitlines()[-1] == f"adclr train: error: argument {flag}: {message}"


@pytest.mark.parametrize("argv,message", [
    (["--base-lr", "inf"], "argument --base-lr: must be a finite number, got inf"),
    (["--epochs", "1.5"], "argument --epochs: invalid int value: '1.5'"),
    (["--arch", "vit_huge"], "argument --arch: invalid choice: 'vit_huge' (choose from "
                             "'vit_tiny', 'vit_small', 'vit_base', 'vit_mini', 'vit_test')"),
    (["--pack-crops", "yes"], "argument --pack-crops: invalid choice: 'yes' (choose from 'auto', 'on', 'off')"),
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8' (choose from 'auto', 'bf16', 'fp16', "
                             "'fp32')"),
    (["--compile", "yes"], "argument --compile: invalid choice: 'yes' (choose from 'auto', 'on', 'off')"),
    (["--device", "gpu"], "argument --device: must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    # Needs the whole config: checked once, after parsing, before any work.
    (["--image-size", "36"], "argument --image-size: must be a multiple of --patch-size 8, got 36"),
    (["--local-size", "20"], "argument --local-size: must be a multiple of --patch-size 8, got 20"),
])
def test_other_bad_train_flags(argv, message, accepted_config, capsys):
    status, err = run(["train", *TINY, *argv], capsys)
    assert status == 2 and not accepted_config
    assert err.splitlines()[-1] == f"adclr train: error: {message}"


def test_local_size_is_free_without_local_crops(accepted_config, capsys):
    status, _ = run(["train", *TINY, "--local-size", "20", "--num-local-crops", "0"], capsys)
    assert status == 0 and accepted_config[0].local_size == 20


def test_a_config_built_in_python_is_checked_too(tiny_config):
    with pytest.raises(ValueError, match=r"--batch-size: must be >= 1, got 0; --base-lr: must be > 0, got -1"):
        adclr.train.train(tiny_config(batch_size=0, base_lr=-1.0))
    with pytest.raises(ValueError, match=r"--num-queries: must be int, got '3'"):
        adclr.train.train(tiny_config(num_queries="3"))


def test_boundary_values_train(tmp_path, capsys):
    """The values at the edge of each range really run: zero crops, queries, decay, momentum..."""
    data = image_folder(tmp_path / "data")  # 8 images: --epochs 1 is 2 steps of 4
    edges = ["--max-steps", "0", "--epochs", "1", "--num-local-crops", "0", "--drop-path", "0",
             "--clip-grad", "0", "--weight-decay", "0", "--weight-decay-end", "0", "--min-lr", "0",
             "--center-momentum", "0", "--momentum-teacher", "1", "--seed", "0", "--checkpoint-every", "1"]
    for i, extra in enumerate([["--num-queries", "0", "--lambda-query", "0.5"],
                               ["--num-queries", "2", "--lambda-query", "0"],
                               ["--center-momentum", "1", "--momentum-teacher", "0", "--seed", "10000000"]]):
        out = str(tmp_path / f"run{i}")
        status, err = run(["train", *TINY, "--data", data, "--out", out, *edges, *extra], capsys)
        assert status == 0, err
        records = read_metrics(out)
        assert [r["step"] for r in records] == [1, 2]
        assert all(math.isfinite(r["loss"]) for r in records)


EVAL_RANGES = [("--image-size", ">= 1", int, "-32"), ("--batch-size", ">= 1", int, "-1"),
               ("--k", ">= 1", int, "-1"), ("--temperature", "> 0", float, "-0.07"),
               ("--epochs", ">= 1", int, "-1"), ("--linear-epochs", ">= 1", int, "-1"),
               ("--lr", "> 0", float, "-1e-3"), ("--n-last-blocks", ">= 1", int, "-1"),
               ("--val-freq", ">= 1", int, "-1"), ("--num-workers", ">= -1", int, "-2"),
               ("--limit", ">= 0", int, "-1")]
# The evaluate() argument of each flag whose name differs; --k gives a list (it takes several).
EVAL_ARGUMENTS = {"--k": "ks", "--linear-epochs": "epochs"}


@pytest.fixture
def accepted_eval(monkeypatch):
    """Run `adclr eval` up to the evaluation; returns the evaluate() keyword arguments it would use."""
    import adclr.evaluate

    seen = []
    monkeypatch.setattr(adclr.evaluate, "evaluate", lambda *args, **kwargs: seen.append(kwargs) or {})
    return seen


@pytest.mark.parametrize("flag,spec,kind,negative", EVAL_RANGES, ids=[r[0] for r in EVAL_RANGES])
@pytest.mark.parametrize("which", ["zero", "negative"])
def test_eval_flag_at_zero_and_negative(flag, spec, kind, negative, which, accepted_eval, capsys):
    text = "0" if which == "zero" else negative
    value = kind(text)
    status, err = run(["eval", "knn", "--checkpoint", "c.pt", f"{flag}={text}"], capsys)
    if accepts(spec, value):
        got = accepted_eval[0][EVAL_ARGUMENTS.get(flag, flag[2:].replace("-", "_"))]
        assert status == 0 and got == ([value] if flag == "--k" else value)
    else:
        assert status == 2 and not accepted_eval
        assert err.splitlines()[-1] == f"adclr eval: error: argument {flag}: {out_of_range(spec, value)}"


@pytest.mark.parametrize("argv,message", [
    (["--k", "10", "0", "200"], "argument --k: must be >= 1, got 0"),  # each of several values
    (["--k", "10", "x"], "argument --k: invalid int value: 'x'"),
    (["--k"], "argument --k: expected at least one argument"),
    (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (["--epochs", "1.5"], "argument --epochs: invalid int value: '1.5'"),
    (["--device", "gpu"], "argument --device: must be auto, cpu, cuda or cuda:N, got 'gpu'"),
])
def test_other_bad_eval_flags(argv, message, accepted_eval, capsys):
    status, err = run(["eval", "knn", "--checkpoint", "c.pt", *argv], capsys)
    assert status == 2 and not accepted_eval
    assert err.splitlines()[-1] == f"adclr eval: error: {message}"


def test_eval_takes_several_k_and_the_former_epochs_flag(accepted_eval, capsys):
    assert run(["eval", "knn", "--checkpoint", "c.pt", "--k", "10", "20", "1"], capsys)[0] == 0
    assert run(["eval", "linear", "--checkpoint", "c.pt", "--linear-epochs", "3"], capsys)[0] == 0
    assert accepted_eval[0]["ks"] == [10, 20, 1] and accepted_eval[1]["epochs"] == 3


# `adclr eval dense`, `adclr compare` and `adclr show`: (command line before the flag, the
# function the command calls, the flags with their ranges as in EVAL_RANGES).
OTHER_RANGES = [
    (["eval", "dense", "--checkpoint", "c.pt"], ("adclr.dense", "evaluate_dense"), [
        ("--image-size", ">= 1", int, "-32"), ("--batch-size", ">= 1", int, "-1"), ("--epochs", ">= 1", int, "-1"),
        ("--lr", "> 0", float, "-3e-2"), ("--n-last-blocks", ">= 1", int, "-1"), ("--num-classes", ">= 1", int, "-1"),
        ("--num-workers", ">= -1", int, "-2"), ("--limit", ">= 0", int, "-1")]),
    (["compare"], ("adclr.compare", "compare"), [
        ("--seeds", "[0, 10000000]", int, "-1"), ("--eval-images", ">= 1", int, "-1")]),
    (["show", "attention", "--checkpoint", "c.pt"], ("adclr.show", "show_attention"), [
        ("--images", ">= 1", int, "-1"), ("--num-queries", ">= 0", int, "-1"), ("--seed", ">= 0", int, "-1")]),
    (["show", "dense", "--checkpoint", "c.pt"], ("adclr.show", "show_dense"), [
        ("--images", ">= 1", int, "-1"), ("--limit", ">= 0", int, "-1"), ("--num-workers", ">= -1", int, "-2")]),
]
OTHER_CASES = [(command, target, flag, spec, kind, negative)
               for command, target, flags in OTHER_RANGES for flag, spec, kind, negative in flags]


@pytest.mark.parametrize("command,target,flag,spec,kind,negative", OTHER_CASES,
                         ids=[f"{' '.join(c[0][:2])} {c[2]}" for c in OTHER_CASES])
@pytest.mark.parametrize("which", ["zero", "negative"])
def test_other_commands_flags_at_zero_and_negative(command, target, flag, spec, kind, negative, which,
                                                    monkeypatch, capsys):
    import importlib

    seen = []
    monkeypatch.setattr(importlib.import_module(target[0]), target[1],
                        lambda *args, **kwargs: seen.append((args, kwargs)) or ([] if "show" in target[1] else {}))
    text = "0" if which == "zero" else negative
    value = kind(text)
    status, err = run([*command, f"{flag}={text}"], capsys)
    if accepts(spec, value):
        assert status == 0 and len(seen) == 1
        args, kwargs = seen[0]
        if target[1] == "compare":  # compare(cfg, seeds, eval_images=...)
            assert (args[1] == [value]) if flag == "--seeds" else kwargs["eval_images"] == value
        else:
            assert kwargs[flag[2:].replace("-", "_")] == value
    else:
        assert status == 2 and not seen
        assert err.splitlines()[-1].endswith(f"error: argument {flag}: {out_of_range(spec, value)}")


def numeric_flags(argv, monkeypatch):
    """{flag: type name} of the int and float flags of the parser that `main(argv)` parses with.

    Read from the parser itself, so a flag added without a row in the tables above fails
    test_every_numeric_flag_of_the_other_commands_has_a_range.
    """
    import argparse

    class Caught(Exception):
        pass

    parsers = []

    def catch(self, *args, **kwargs):
        parsers.append(self)
        raise Caught

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(Caught):
        main(argv)
    parser = parsers[0]
    for name in argv:  # down to the sub-command's parser
        sub = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not sub or name not in sub[0].choices:
            break
        parser = sub[0].choices[name]
    return {a.option_strings[0]: a.type.__name__ for a in parser._actions
            if a.option_strings and getattr(a.type, "__name__", None) in ("int", "float")}


@pytest.mark.parametrize("command", [["eval"], ["compare"], ["show", "attention"], ["show", "dense"]],
                         ids=" ".join)
def test_every_numeric_flag_of_the_other_commands_has_a_range(command, monkeypatch):
    flags = set(numeric_flags(command, monkeypatch))
    if command == ["eval"]:  # one parser for knn, linear and dense
        tabled = {f for f, *_ in EVAL_RANGES} | {f for c, _, fs in OTHER_RANGES if c[:2] == ["eval", "dense"]
                                                 for f, *_ in fs}
    else:
        tabled = {f for c, _, fs in OTHER_RANGES if c[:len(command)] == command for f, *_ in fs}
    if command == ["compare"]:  # and every adclr train flag, as train checks them
        tabled |= {f for f, *_ in TRAIN_RANGES} | set(SCALE_FLAGS)
    assert flags == tabled


def test_compare_takes_train_flags_over_its_preset(monkeypatch, capsys):
    import adclr.compare

    seen = []
    monkeypatch.setattr(adclr.compare, "compare", lambda *args, **kwargs: seen.append(args))
    assert run(["compare", "--seeds", "3", "4", "--max-steps", "7", "--out", "x"], capsys)[0] == 0
    cfg, seeds = seen[0]
    assert seeds == [3, 4] and cfg.max_steps == 7 and cfg.out == "x"
    assert cfg.data == adclr.compare.PRESET["data"] == "builtin:scenes" and cfg.arch == adclr.compare.PRESET["arch"]
    status, err = run(["compare", "--seed", "1"], capsys)
    assert status == 2 and err.splitlines()[-1] == "adclr compare: error: argument --seed: adclr compare takes --seeds"
    status, err = run(["compare", "--image-size", "60"], capsys)
    assert status == 2 and err.splitlines()[-1] == (
        "adclr compare: error: argument --image-size: must be a multiple of --patch-size 8, got 60")
    assert len(seen) == 1


# --------------------------------------------------------------------------- user errors


def test_user_errors_exit_with_one_line_and_no_traceback(tmp_path):
    """The whole chain as a user meets it: a subprocess, its exit status and stderr."""
    missing = str(tmp_path / "no-such-folder")
    result = subprocess.run([sys.executable, "-m", "adclr.cli", "train", *TINY, "--data", missing,
                             "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == f"error: --data: dataset folder {missing!r} does not exist"
    assert "Traceback" not in result.stderr


def _file(path, text="x"):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", ["missing data", "no images", "batch too large", "out is a file",
                                  "out under a file", "out not writable", "xformers", "flex on CPU"])
def test_train_user_errors(case, tmp_path, capsys):
    data, out, extra = "builtin", str(tmp_path / "run"), []
    if case == "missing data":
        data = str(tmp_path / "nothing")
        expected = f"error: --data: dataset folder {data!r} does not exist"
    elif case == "no images":
        data = str(tmp_path / "empty")
        os.makedirs(os.path.join(data, "a"))
        expected = f"error: --data: no images (.jpg, .jpeg, .png, .bmp, .webp, .tif, .tiff, .gif, .ppm) found under {data!r}"
    elif case == "batch too large":
        data = image_folder(tmp_path / "data", per_class=1)
        expected = f"error: --batch-size 4 is larger than the dataset (2 images in {data})"
    elif case == "out is a file":
        out = _file(tmp_path / "file")
        expected = f"error: --out {out} is a file, not a folder; choose another --out"
    elif case == "out under a file":
        out = os.path.join(_file(tmp_path / "file"), "run")
        expected = f"error: --out {out} is not writable (Not a directory); choose another --out"
    elif case == "out not writable":
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere")
        os.makedirs(out)
        os.chmod(out, 0o500)
        expected = f"error: --out {out} is not writable (Permission denied); choose another --out"
    elif case == "xformers":
        if xformers_available():
            pytest.skip("xformers is installed")
        extra = ["--attention", "xformers"]
        expected = ("error: --attention xformers: backend='xformers' cannot run: "
                    + xformers_unavailable_reason())
    else:
        extra = ["--attention", "flex"]
        expected = ("error: --attention flex: backend='flex' has no backward on CPU in PyTorch; use it "
                    "under torch.no_grad() there, or pick backend='sdpa'")
    status, err = run(["train", *TINY, "--data", data, "--out", out, *extra], capsys)
    assert status == 1 and err.splitlines()[-1] == expected
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path, capsys):
    status, err = run(["train", *TINY, "--device", "cuda", "--out", str(tmp_path / "run")], capsys)
    assert status == 1 and err.splitlines()[-1] == "error: --device cuda but CUDA is not available"


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    """A real checkpoint of a one-step TINY run, and its run folder's command line."""
    out = str(tmp_path_factory.mktemp("good") / "run")
    main(["train", *TINY, "--out", out])
    with open(os.path.join(out, "checkpoint.pt"), "rb") as f:
        return f.read()


def test_eval_and_export_user_errors(tmp_path, checkpoint_bytes, capsys):
    good = tmp_path / "checkpoint.pt"
    good.write_bytes(checkpoint_bytes)
    missing = str(tmp_path / "none.pt")
    status, err = run(["eval", "knn", "--checkpoint", missing], capsys)
    assert status == 1 and err.splitlines()[-1] == (
        f"error: --checkpoint: {missing} does not exist; pass the checkpoint.pt an adclr train run wrote")
    data = str(tmp_path / "no-data")
    status, err = run(["eval", "knn", "--checkpoint", str(good), "--data", data], capsys)
    assert status == 1 and err.splitlines()[-1] == f"error: --data: dataset folder {data!r} does not exist"
    status, err = run(["eval", "knn", "--checkpoint", str(good), "--image-size", "36"], capsys)
    assert status == 1 and err.splitlines()[-1] == "error: --image-size 36 must be a multiple of the run's patch size 8"
    status, err = run(["eval", "linear", "--checkpoint", str(good), "--n-last-blocks", "3"], capsys)
    assert status == 1 and err.splitlines()[-1] == "error: --n-last-blocks 3 is more than the 2 blocks of the run's model"
    status, err = run(["export", "--checkpoint", str(good), "--out", str(tmp_path)], capsys)
    assert status == 1 and err.splitlines()[-1] == (
        f"error: --out {tmp_path} is a folder; give a file name such as backbone.safetensors")
    target = os.path.join(_file(tmp_path / "file"), "b.safetensors")
    status, err = run(["export", "--checkpoint", str(good), "--out", target], capsys)
    assert status == 1 and err.splitlines()[-1] == f"error: --out {target}: {os.path.dirname(target)} is not a folder"


# --------------------------------------------------------------------------- corrupt checkpoints


class RunsCode:
    """Pickles as a call of os.mkdir: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def corrupt(kind, good, tmp_path):
    """The bytes of a checkpoint broken in the way `kind` says; and the reason the error must give."""
    if kind == "empty":
        return b"", "is unreadable, not an adclr checkpoint (the file is empty)"
    if kind == "truncated":
        return good[:len(good) // 2], "is unreadable, not an adclr checkpoint (not a complete PyTorch file: truncated or corrupted)"
    if kind == "random bytes":
        return (torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                              dtype=torch.uint8).numpy().tobytes(),
                "is unreadable, not an adclr checkpoint (not a PyTorch checkpoint file)")
    if kind == "text":
        return b"hello\n", "is unreadable, not an adclr checkpoint (not a PyTorch checkpoint file)"
    state = torch.load(io.BytesIO(good), weights_only=True)
    if kind == "disallowed global":
        state["student"] = RunsCode(str(tmp_path / "pwned"))
        reason = (f"is unreadable, not an adclr checkpoint (it refers to {os.mkdir.__module__}.mkdir, which is not "
                  "a tensor or plain data; it was not loaded, since unpickling that could run code)")
    elif kind == "not a dict":
        state, reason = [state], "is not an adclr checkpoint (it holds a list, not a dict)"
    elif kind == "missing keys":
        del state["optimizer"], state["rng"]
        reason = "is not an adclr checkpoint (no optimizer, rng in it)"
    elif kind == "step of the wrong type":
        state["step"], reason = "1", "is not an adclr checkpoint ('step' is '1', not a step number)"
    elif kind == "weights of the wrong type":
        state["teacher"] = list(state["teacher"].values())
        reason = "is not an adclr checkpoint ('teacher' is not a dict of tensors)"
    elif kind == "config of the wrong type":
        state["config"]["arch"] = "resnet50"
        reason = "is not an adclr checkpoint ('config' is not an adclr train config)"
    elif kind == "scaler of the wrong type":
        state["scaler"] = {"scale": "big"}
        reason = "is not an adclr checkpoint ('scaler' is not a gradient scaler state dict)"
    elif kind == "NaN weights":
        state["teacher"]["backbone.blocks.0.attn.qkv.weight"][0, 0] = float("nan")
        reason = ("holds non-finite values (NaN or inf) in teacher['backbone.blocks.0.attn.qkv.weight']: the run "
                  "it comes from diverged before it was written")
    elif kind == "wrong shapes":
        state["student"]["backbone.pos_embed"] = state["student"]["backbone.pos_embed"][:, :5]
        state["teacher"]["backbone.pos_embed"] = state["teacher"]["backbone.pos_embed"][:, :5]
        reason = "does not fit the model of its own config (Error(s) in loading state_dict for "
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue(), reason


CORRUPTIONS = ["empty", "truncated", "random bytes", "text", "disallowed global", "not a dict", "missing keys",
               "step of the wrong type", "weights of the wrong type", "config of the wrong type",
               "scaler of the wrong type", "NaN weights",
               "wrong shapes"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("command", ["train", "eval", "export"])
def test_corrupt_checkpoint(kind, command, checkpoint_bytes, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    path = str(out / "checkpoint.pt")
    content, reason = corrupt(kind, checkpoint_bytes, tmp_path)
    with open(path, "wb") as f:
        f.write(content)
    if command == "train":  # resuming the run in --out
        status, err = run(["train", *TINY, "--out", str(out)], capsys)
        advice = "; remove it to start over, or choose another --out"
        prefix = "error: "
    elif command == "eval":
        status, err = run(["eval", "knn", "--checkpoint", path, "--limit", "8", "--num-workers", "0"], capsys)
        advice, prefix = "; pass the checkpoint.pt an adclr train run wrote", "error: --checkpoint: "
    else:
        status, err = run(["export", "--checkpoint", path, "--out", str(tmp_path / "b.safetensors")], capsys)
        advice, prefix = "; pass the checkpoint.pt an adclr train run wrote", "error: --checkpoint: "
    line = err.splitlines()[-1]
    assert status == 1 and line.startswith(f"{prefix}{path} {reason}") and line.endswith(advice), line
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "pwned")  # the pickled call never ran
    with open(path, "rb") as f:
        assert f.read() == content  # the evidence is left alone
    assert not os.path.exists(tmp_path / "b.safetensors")


def test_non_finite_loss_before_any_checkpoint_claims_none(tmp_path, monkeypatch, capsys):
    real_step = adclr.train.train_step

    def poisoned(trainer, batch, step):
        metrics = real_step(trainer, batch, step)
        metrics["loss"] = metrics["loss"] * float("nan")
        return metrics

    monkeypatch.setattr(adclr.train, "train_step", poisoned)
    out = str(tmp_path / "run")
    status, err = run(["train", *TINY, "--out", out, "--max-steps", "3", "--checkpoint-every", "2"], capsys)
    assert status == 1
    assert err.splitlines()[-1] == (
        "error: loss became non-finite between step 0 and step 1; stopping. No checkpoint was written before "
        "(--checkpoint-every 2). Try a lower --base-lr, a lower --clip-grad or a longer --warmup-epochs.")
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))


# --------------------------------------------------------------------------- resume hygiene


def test_resume_drops_the_records_logged_after_the_checkpoint(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    argv = ["train", *TINY, "--out", out, "--max-steps", "4", "--checkpoint-every", "2"]
    real_step = adclr.train.train_step

    def crash_in_step_4(trainer, batch, step):
        if step == 3:
            raise RuntimeError("simulated crash")
        return real_step(trainer, batch, step)

    monkeypatch.setattr(adclr.train, "train_step", crash_in_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(argv)
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "lo')  # a record cut short by a kill
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f.readlines()[:3]] == [1, 2, 3]  # 3: past the checkpoint
    monkeypatch.setattr(adclr.train, "train_step", real_step)
    assert run(argv, capsys)[0] == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


def test_unreadable_image_warned_once_and_counted(tmp_path, capsys):
    data = image_folder(tmp_path / "data", per_class=2, unreadable=("a/1.png",))
    out = str(tmp_path / "run")
    # 4 images, batch 2: 2 steps an epoch, the bad file met once or twice an epoch for 3 epochs.
    status, err = run(["train", *TINY, "--data", data, "--batch-size", "2", "--max-steps", "6",
                       "--out", out, "--num-local-crops", "0"], capsys)
    assert status == 0
    bad = os.path.join(data, "a", "1.png")
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipping")]
    assert warnings == [f"warning: skipping unreadable image {bad}: cannot identify image file {bad!r}"]
    counts = [r["skipped_images"] for r in read_metrics(out)]
    assert counts == sorted(counts) and counts[-1] >= 3
    assert f"| {counts[-1]} unreadable images skipped" in err.splitlines()[-2]


@pytest.mark.parametrize("protocol", [["knn"], ["linear", "--epochs", "3"]])  # linear: met once an epoch
def test_eval_warns_once_per_unreadable_image(protocol, checkpoint_bytes, tmp_path, capsys):
    good = tmp_path / "checkpoint.pt"
    good.write_bytes(checkpoint_bytes)
    data = tmp_path / "data"
    image_folder(data / "train", per_class=3, unreadable=("b/2.png",))
    image_folder(data / "val", per_class=2, unreadable=("b/0.png",))
    main(["eval", *protocol, "--checkpoint", str(good), "--data", str(data), "--num-workers", "0",
          "--batch-size", "2"])
    out, err = capsys.readouterr()
    bad, bad_val = str(data / "train" / "b" / "2.png"), str(data / "val" / "b" / "0.png")
    assert [line for line in err.splitlines() if line.startswith("warning: skipping")] == [
        f"warning: skipping unreadable image {bad}: cannot identify image file {bad!r}",
        f"warning: skipping unreadable image {bad_val}: cannot identify image file {bad_val!r}"]
    if protocol[0] == "knn":
        assert err.count("warning: skipped 1 unreadable images") == 2  # train, val
    else:
        assert err.count("| 1 unreadable images skipped") == 3  # on each epoch's line
    result = json.loads(out.splitlines()[-1])
    assert (result["train_images"], result["val_images"]) == (5, 3)


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("protocol", [["knn"], ["linear", "--epochs", "2"]])
def test_eval_without_a_readable_image(split, protocol, checkpoint_bytes, tmp_path, capsys):
    good = tmp_path / "checkpoint.pt"
    good.write_bytes(checkpoint_bytes)
    data = tmp_path / "data"
    for name in ("train", "val"):
        image_folder(data / name, per_class=1, unreadable=("a/0.png", "b/0.png") if name == split else ())
    status, err = run(["eval", *protocol, "--checkpoint", str(good), "--data", str(data), "--num-workers", "0"],
                      capsys)
    assert status == 1 and err.splitlines()[-1] == f"error: --data {data}: no readable images in {split}"
    assert "Traceback" not in err


@pytest.mark.parametrize("name", ["checkpoint.pt.tmp", "checkpoint0004.pt.tmp"])  # rolling, numbered snapshot
def test_stale_tmp_checkpoint_is_removed_at_start(name, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / name
    stale.write_bytes(b"half a checkpoint")
    monkeypatch.setattr(adclr.train, "train_step", lambda *args: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError, match="crash"):  # no checkpoint written over it in this run
        main(["train", *TINY, "--out", str(out)])
    assert not stale.exists()
    assert f"removed {stale}, left by a run stopped while writing a checkpoint" in capsys.readouterr().err


def test_a_diverged_checkpoint_is_reported_at_load(checkpoint_bytes, tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = torch.load(io.BytesIO(checkpoint_bytes), weights_only=True)
    state["loss"]["center"].fill_(float("inf"))
    torch.save(state, path)
    with pytest.raises(adclr.checkpoint.CheckpointError, match=r"non-finite values \(NaN or inf\) in loss\['center'\]"):
        load_checkpoint(str(path))


def test_optional_checkpoint_parts_pass_the_checks(tmp_path, capsys):
    """A trained last-layer gain (--no-norm-last-layer) loads, resumes and exports; NaN in it is refused."""
    out = str(tmp_path / "run")
    assert run(["train", *TINY, "--out", out, "--no-norm-last-layer"], capsys)[0] == 0
    path = os.path.join(out, "checkpoint.pt")
    state = load_checkpoint(path)
    assert "head.last_layer.gain" in state["student"] and "head.last_layer.gain" in state["teacher"]
    assert run(["train", *TINY, "--out", out, "--no-norm-last-layer", "--max-steps", "2"], capsys)[0] == 0
    assert run(["export", "--checkpoint", path, "--out", str(tmp_path / "b.safetensors")], capsys)[0] == 0
    state = load_checkpoint(path)
    assert state["step"] == 2
    state["student"]["head.last_layer.gain"][3] = float("nan")
    torch.save(state, path)
    with pytest.raises(adclr.checkpoint.CheckpointError,
                       match=r"non-finite values \(NaN or inf\) in student\['head.last_layer.gain'\]"):
        load_checkpoint(path)
