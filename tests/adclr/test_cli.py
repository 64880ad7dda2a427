"""`adclr` on bad input: every flag's range, user errors, corrupt checkpoints, resume hygiene.

Each case runs the real command in this process (`adclr.cli.main`) and asserts the
exact outcome: argparse's exit code 2 and "argument --flag: ..." for a value out of
range, one "error: ..." line naming the flag or file (exit 1) for what the user must
fix, and never a traceback.
"""

import io
import json
import math
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys

import pytest
import torch
from trainer_testing import (SCALE_FLAGS, TINY, TRAIN_RANGES, accepts, image_folder, out_of_range, read_metrics, run,
                             write_file)

import adclr.train
from adclr.checkpoint import folder_lock, load_checkpoint
from adclr.cli import DEMO, main, make_config
from adclr.data import ImageFolder, StepBatches
from adclr_kernels.backends import xformers_available, xformers_unavailable_reason


# --------------------------------------------------------------------------- every numeric flag


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
    (["--compile", "yes"], "argument --compile: invalid choice: 'yes' (choose from 'auto', 'on', 'off', 'step', "
                           "'graph')"),
    (["--device", "gpu"], "argument --device: must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    # Needs the whole config: checked once, after parsing, before any work.
    (["--image-size", "36"], "argument --image-size: must be a multiple of --patch-size 8, got 36"),
    (["--local-size", "20"], "argument --local-size: must be a multiple of --patch-size 8, got 20"),
    # kornia's blur, 13 taps with reflection, raised a ValueError on the first batch
    (["--patch-size", "4", "--local-size", "4"], "argument --local-size: must be >= 7, the smallest crop the "
                                                 "augmentation's 13-tap blur takes, got 4"),
    (["--patch-size", "4", "--image-size", "4"], "argument --image-size: must be >= 7, the smallest crop the "
                                                 "augmentation's 13-tap blur takes, got 4"),
    (["--min-lr", "1e-5"], "argument --min-lr: must be at most the peak lr, --base-lr x --batch-size / 256 = "
                           "7.8125e-06, got 1e-05"),
])
def test_other_bad_train_flags(argv, message, accepted_config, capsys):
    status, err = run(["train", *TINY, *argv], capsys)
    assert status == 2 and not accepted_config
    assert err.splitlines()[-1] == f"adclr train: error: {message}"


@pytest.mark.parametrize("argv,message", [
    # A prefix of a flag is not that flag (argparse's default took --epoch for --epochs).
    (["train", "--epoch", "1"], "adclr train: error: unrecognized arguments: --epoch 1 (--epoch: did you mean "
                                "--epochs?)"),
    (["train", "--no-norm"], "adclr train: error: unrecognized arguments: --no-norm (--no-norm: did you mean "
                             "--no-norm-last-layer?)"),
    (["train", "--momentum", "0.9"], "adclr train: error: unrecognized arguments: --momentum 0.9 (--momentum: did "
                                     "you mean --momentum-teacher?)"),
    (["train", "--max-steps=1", "--", "--max-steps", "2"], "adclr train: error: unrecognized arguments: -- "
                                                           "--max-steps 2"),  # past "--": values, no hint
    # eval's flag, given to train: once taken for --checkpoint-every, naming a flag never typed
    (["train", "--checkpoint", "runs/demo/checkpoint.pt"], "adclr train: error: unrecognized arguments: "
     "--checkpoint runs/demo/checkpoint.pt (--checkpoint: did you mean --checkpoint-every?)"),
    # DINO's spelling (docs/training.md maps its flags): said by train's parser, not the top one
    (["train", "--batch_size", "8", "--warmup_epochs=2"], "adclr train: error: unrecognized arguments: --batch_size "
     "8 --warmup_epochs=2 (--batch_size: did you mean --batch-size?; --warmup_epochs: did you mean "
     "--warmup-epochs?)"),
    (["eval", "knn", "--checkpoint", "x", "--limt", "5"], "adclr eval: error: unrecognized arguments: --limt 5 "
                                                          "(--limt: did you mean --limit?)"),
    (["eval", "knn", "--check", "x"], "adclr eval: error: the following arguments are required: --checkpoint"),
    (["show", "dense", "--checkpoint", "x", "--limt", "3"], "adclr show dense: error: unrecognized arguments: "
                                                           "--limt 3 (--limt: did you mean --limit?)"),
])
def test_flags_are_spelled_in_full_and_unknown_ones_get_a_hint(argv, message, accepted_config, capsys):
    status, err = run(argv, capsys)
    assert status == 2 and not accepted_config
    assert err.splitlines()[-1] == message
    command = " ".join(argv[:2] if argv[0] == "show" else argv[:1])  # show's pictures are commands of their own
    assert err.splitlines()[0].startswith(f"usage: adclr {command}")


def test_local_size_is_free_without_local_crops(accepted_config, capsys):
    status, _ = run(["train", *TINY, "--local-size", "20", "--num-local-crops", "0"], capsys)
    assert status == 0 and accepted_config[0].local_size == 20
    status, _ = run(["train", *TINY, "--patch-size", "4", "--local-size", "4", "--num-local-crops", "0"], capsys)
    assert status == 0 and accepted_config[1].local_size == 4


def test_min_lr_up_to_the_peak_lr(accepted_config, capsys):
    assert run(["train", *TINY, "--min-lr", "7.8125e-06"], capsys)[0] == 0  # 5e-4 x 4 / 256: a flat schedule


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


# The evaluate_knn() argument of each flag whose name differs; --k gives a list (it takes several).
EVAL_ARGUMENTS = {"--k": "ks", "--linear-epochs": "epochs"}


@pytest.fixture
def accepted_eval(monkeypatch):
    """Run `adclr eval knn|linear` up to the evaluation; returns the keyword arguments of
    evaluate_knn / evaluate_linear it would use."""
    import adclr.eval_knn
    import adclr.eval_linear

    seen = []
    monkeypatch.setattr(adclr.eval_knn, "evaluate_knn", lambda *args, **kwargs: seen.append(kwargs) or {})
    monkeypatch.setattr(adclr.eval_linear, "evaluate_linear", lambda *args, **kwargs: seen.append(kwargs) or {})
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
    (["--num-classes", "256"], "argument --num-classes: must be in [1, 255], got 256"),  # 255 is IGNORE
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
    (["eval", "dense", "--checkpoint", "c.pt"], ("adclr.eval_dense", "evaluate_dense"), [
        ("--image-size", ">= 1", int, "-32"), ("--batch-size", ">= 1", int, "-1"), ("--epochs", ">= 1", int, "-1"),
        ("--lr", "> 0", float, "-3e-2"), ("--n-last-blocks", ">= 1", int, "-1"),
        ("--num-classes", "[1, 255]", int, "-1"),
        ("--num-workers", ">= -1", int, "-2"), ("--limit", ">= 0", int, "-1")]),
    (["compare"], ("adclr.compare", "compare"), [
        ("--seeds", "[0, 10000000]", int, "-1"), ("--eval-images", ">= 1", int, "-1")]),
    (["sweep"], ("adclr.compare", "sweep"), [
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
        if target[1] in ("compare", "sweep"):  # compare(cfg, seeds, ...), sweep(cfg, grid, seeds, ...)
            seeds = args[1] if target[1] == "compare" else args[2]
            assert (seeds == [value]) if flag == "--seeds" else kwargs["eval_images"] == value
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

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
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


@pytest.mark.parametrize("command", [["eval"], ["compare"], ["sweep"], ["show", "attention"], ["show", "dense"]],
                         ids=" ".join)
def test_every_numeric_flag_of_the_other_commands_has_a_range(command, monkeypatch):
    flags = set(numeric_flags(command, monkeypatch))
    if command == ["eval"]:  # one parser for knn, linear and dense
        tabled = {f for f, *_ in EVAL_RANGES} | {f for c, _, fs in OTHER_RANGES if c[:2] == ["eval", "dense"]
                                                 for f, *_ in fs}
    else:
        tabled = {f for c, _, fs in OTHER_RANGES if c[:len(command)] == command for f, *_ in fs}
    if command in (["compare"], ["sweep"]):  # and every adclr train flag, as train checks them
        tabled |= {f for f, *_ in TRAIN_RANGES} | set(SCALE_FLAGS)
    assert flags == tabled


def test_compare_takes_train_flags_over_its_preset(monkeypatch, capsys):
    import adclr.compare

    seen = []
    monkeypatch.setattr(adclr.compare, "compare", lambda *args, **kwargs: seen.append(args))
    assert run(["compare", "--seeds", "3", "4", "--max-steps", "7", "--out", "x"], capsys)[0] == 0
    cfg, seeds = seen[0]
    assert seeds == [3, 4] and cfg.max_steps == 7 and cfg.out == "x"
    assert cfg.data == adclr.compare.PRESET["data"] == "builtin:grey-ground-scenes" and cfg.arch == adclr.compare.PRESET["arch"]
    status, err = run(["compare", "--seed", "1"], capsys)
    assert status == 2 and err.splitlines()[-1] == "adclr compare: error: argument --seed: adclr compare takes --seeds"
    status, err = run(["compare", "--method", "densecl"], capsys)
    assert status == 2 and err.splitlines()[-1] == "adclr compare: error: argument --method: adclr compare takes --methods"
    status, err = run(["compare", "--image-size", "60"], capsys)
    assert status == 2 and err.splitlines()[-1] == (
        "adclr compare: error: argument --image-size: must be a multiple of --patch-size 8, got 60")
    assert len(seen) == 1


# --------------------------------------------------------------------------- defaults and help


def test_demo_defaults_only_without_data_and_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    demo, _ = make_config({"out": "x", "num_queries": 7})
    assert demo.arch == "vit_mini" and demo.num_queries == 7  # a given flag always wins
    paper, demo = make_config({"out": "x", "data": "/some/imagenet"})
    assert not demo
    assert (paper.arch, paper.image_size, paper.local_size, paper.num_local_crops, paper.num_queries,
            paper.out_dim, paper.lambda_query) == ("vit_small", 224, 96, 10, 10, 65536, 0.5)


def test_a_resumed_run_keeps_the_demo_settings_it_ran_with(tmp_path, monkeypatch, capsys):
    """A demo run resumed on a folder of images (or on a GPU): the presets stay, since the
    run took them; they used to turn into the paper's, and the resume was refused over
    flags the user never gave."""
    import dataclasses

    from adclr.config import Config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = str(tmp_path / "run")
    given = ["--arch", "vit_test", "--patch-size", "8", "--image-size", "32", "--local-size", "16",
             "--num-local-crops", "1", "--num-queries", "2", "--out-dim", "64", "--head-hidden-dim", "32",
             "--head-bottleneck-dim", "16", "--batch-size", "4", "--num-workers", "0", "--device", "cpu"]
    assert main(["train", *given, "--out", out, "--max-steps", "1"]) is None  # the demo, 1 step
    folder = image_folder(tmp_path / "images")
    status, err = run(["train", *given, "--out", out, "--max-steps", "2", "--data", str(folder)], capsys)
    assert status == 0, err
    assert "the run in --out ran with them: quick demo settings" in err
    assert read_metrics(out)[-1]["step"] == 2
    # A run in --out without them keeps its own settings, on the built-in data too; a
    # config.json without a checkpoint to resume says nothing (a new run: the demo).
    paper = tmp_path / "paper"
    assert make_config({"out": str(paper)})[0].arch == "vit_mini"  # no run there: the demo
    os.makedirs(paper)
    (paper / "config.json").write_text(json.dumps(dataclasses.asdict(Config())))
    assert make_config({"out": str(paper)})[0].arch == "vit_mini"
    shutil.copy(os.path.join(out, "checkpoint.pt"), paper / "checkpoint.pt")
    resumed, demo = make_config({"out": str(paper)})
    assert resumed.arch == "vit_small" and not demo  # nor the demo's closing k-NN line
    # And a config.json that is not a regular file is never opened (a fifo would block).
    os.remove(paper / "config.json")
    os.mkfifo(paper / "config.json")
    assert make_config({"out": str(paper)})[0].arch == "vit_mini"


def test_a_demo_run_started_with_a_flag_resumes_without_it(tmp_path, monkeypatch, capsys):
    """A demo run started with --checkpoint-every 4 (or another preset's flag) resumes
    without it: it is still the demo's run, and a flag that may change on resume takes the
    preset again. The flag alone used to make it read as a paper run, refused over a dozen
    flags never given."""
    import dataclasses

    from adclr.config import Config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    os.makedirs(out)
    started, demo = make_config({"out": str(out), "checkpoint_every": 4, "arch": "vit_test"})
    assert demo and started.out_dim == DEMO["out_dim"]
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(started)))
    (out / "checkpoint.pt").write_bytes(b"")
    resumed, demo = make_config({"out": str(out), "arch": "vit_test"})
    assert demo and resumed == dataclasses.replace(started, checkpoint_every=100)
    # Given neither, the run's own arch stays: a resumed demo run keeps what it ran with.
    resumed, demo = make_config({"out": str(out)})
    assert demo and resumed == dataclasses.replace(started, checkpoint_every=100)
    # Every preset given again: nothing to tell them apart, so it is what a new run is.
    every = {k: v for k, v in started.__dict__.items() if k in DEMO}
    assert make_config({"out": str(out), **every})[1]
    # A paper run (Config's defaults) with one preset's value given stays a paper run.
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(Config(out=str(out), out_dim=DEMO["out_dim"]))))
    resumed, demo = make_config({"out": str(out)})
    assert not demo and resumed.arch == "vit_small"


def test_a_demo_run_resumes_with_the_presets_it_started_with(tmp_path, monkeypatch):
    """The presets change between releases (the demo's head shrank): a demo run started
    under the former ones resumes with them, not with settings its checkpoint cannot
    take, except those a resume may change anyway (--checkpoint-every)."""
    import dataclasses

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    os.makedirs(out)
    started, _ = make_config({"out": str(out)})
    former = dataclasses.replace(started, out_dim=4096, head_hidden_dim=2048, checkpoint_every=7)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(former)))
    (out / "checkpoint.pt").write_bytes(b"")
    resumed, demo = make_config({"out": str(out)})
    assert demo and resumed == dataclasses.replace(former, checkpoint_every=DEMO["checkpoint_every"])
    assert (DEMO["out_dim"], DEMO["head_hidden_dim"]) != (4096, 2048)  # or this shows nothing
    assert make_config({"out": str(out), "out_dim": 512})[0].out_dim == 512  # a flag given wins


@pytest.mark.parametrize("method,flags,said", [
    ("densecl", ["--lambda-query", "0.7", "--query-sees-prefix"], "--lambda-query, --query-sees-prefix have"),
    ("ccmim", ["--lambda-dense", "0.3"], "--lambda-dense has"),
    ("adclr", ["--mask-ratio", "0.5", "--lambda-align", "2"], "--mask-ratio, --lambda-align have"),
])
def test_flags_the_method_does_not_read_are_named(method, flags, said, accepted_config, capsys):
    main(["train", *TINY, "--out", "unused", "--method", method, *flags])
    assert f"note: {said} no effect with --method {method} (docs/methods.md)" in capsys.readouterr().err
    assert accepted_config[0].method == method
    main(["train", *TINY, "--out", "unused", "--method", method])
    assert "no effect" not in capsys.readouterr().err


def test_help_states_the_batch_convention_and_the_momentum_hint(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "total over all processes (DINO's --batch_size_per_gpu times the GPUs)" in text
    assert "0.9995 at batch 256" in text
    assert "--no-norm-last-layer" in text and "--precision" in text and "--saveckp-freq" in text


def test_train_help_names_the_demo_settings_that_replace_its_defaults(capsys):
    """`adclr train --help` lists the paper's defaults; on CPU with the built-in data the
    demo's presets replace them, and the help says which, so --arch vit_small is not
    what a user expects there."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    assert "(thedemo)" in text
    for key, value in DEMO.items():
        assert f"--{key.replace('_', '-')}{value}," in text or f"--{key.replace('_', '-')}{value}." in text


# --------------------------------------------------------------------------- user errors


@pytest.mark.parametrize("command,module", [(["train", *TINY], "adclr.train"), (["compare"], "adclr.compare")])
@pytest.mark.parametrize("stop", [KeyboardInterrupt, FloatingPointError])
def test_a_stopped_job_exits_as_a_shell_expects(command, module, stop, monkeypatch, capsys):
    """Ctrl-C exits 130; a diverged run, 1 with its one line; neither with a traceback."""
    import importlib

    def stopped(*args, **kwargs):
        raise stop("loss became non-finite")

    monkeypatch.setattr(importlib.import_module(module), command[0], stopped)
    status, err = run(command, capsys)
    assert "Traceback" not in err
    if stop is KeyboardInterrupt:
        assert status == 130
    else:
        assert status == 1 and err.splitlines()[-1] == "error: loss became non-finite"


@pytest.mark.parametrize("command,target", [
    (["eval", "knn", "--checkpoint", "c.pt"], ("adclr.eval_knn", "evaluate_knn")),
    (["eval", "linear", "--checkpoint", "c.pt"], ("adclr.eval_linear", "evaluate_linear")),
    (["eval", "dense", "--checkpoint", "c.pt"], ("adclr.eval_dense", "evaluate_dense")),
    (["export", "--checkpoint", "c.pt", "--out", "b.safetensors"], ("adclr.export", "export")),
    (["show", "attention", "--checkpoint", "c.pt"], ("adclr.show", "show_attention")),
    (["show", "curves", "run"], ("adclr.show", "show_curves")),
], ids=lambda value: " ".join(value[:2]) if isinstance(value, list) else None)
def test_ctrl_c_in_any_command_exits_130(command, target, monkeypatch, capsys):
    """eval, export and show ended a Ctrl-C with a KeyboardInterrupt traceback."""
    import importlib

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(target[0]), target[1], interrupted)
    previous = signal.getsignal(signal.SIGINT)
    status, err = run(command, capsys)
    assert status == 130 and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is previous  # a caller's handler stays
    monkeypatch.setattr(sys, "argv", ["adclr", *command])  # the command line's own process
    try:
        with pytest.raises(SystemExit) as exit:
            main()
        # A second Ctrl-C during the exit ends the process, with no traceback.
        assert exit.value.code == 130 and signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)


def test_user_errors_exit_with_one_line_and_no_traceback(tmp_path):
    """The whole chain as a user meets it: a subprocess, its exit status and stderr."""
    missing = str(tmp_path / "no-such-folder")
    result = subprocess.run([sys.executable, "-m", "adclr.cli", "train", *TINY, "--data", missing,
                             "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == f"error: --data: dataset folder {missing!r} does not exist"
    assert "Traceback" not in result.stderr


def test_a_relative_data_folder_is_kept_as_an_absolute_path(tmp_path, monkeypatch, capsys):
    """eval and show read --data from the run's config, from wherever they are started."""
    image_folder(tmp_path / "data", per_class=4)
    monkeypatch.chdir(tmp_path)
    status, err = run(["train", *TINY, "--batch-size", "2", "--data", "data", "--out", "run", "--max-steps", "1"],
                      capsys)
    assert status == 0, err
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["data"] == str(tmp_path / "data")


@pytest.mark.parametrize("case", ["missing data", "unknown built-in set", "no images", "batch too large", "out is a file",
                                  "out under a file", "out not writable", "out empty", "out a dangling link",
                                  "out under a dangling link",
                                  "xformers", "flex on CPU"])
def test_train_user_errors(case, tmp_path, capsys):
    data, out, extra = "builtin", str(tmp_path / "run"), []
    if case == "missing data":
        data = str(tmp_path / "nothing")
        expected = f"error: --data: dataset folder {data!r} does not exist"
    elif case == "unknown built-in set":
        data = "builtin:nope"
        expected = ("error: --data: 'builtin:nope' is no built-in set (those are builtin, builtin:shapes, "
                    "builtin:scenes, builtin:shape-scenes, builtin:few-shape-scenes, builtin:grey-ground-scenes), "
                    "nor a dataset folder")
    elif case == "no images":
        data = str(tmp_path / "empty")
        os.makedirs(os.path.join(data, "a"))
        expected = f"error: --data: no images (.jpg, .jpeg, .png, .bmp, .webp, .tif, .tiff, .gif, .ppm) found under {data!r}"
    elif case == "batch too large":
        data = image_folder(tmp_path / "data", per_class=1)
        expected = f"error: --batch-size 4 is larger than the dataset (2 image files in {data})"
    elif case == "out is a file":
        out = write_file(tmp_path / "file")
        expected = f"error: --out {out} is a file, not a folder; choose another --out"
    elif case == "out under a file":
        out = os.path.join(write_file(tmp_path / "file"), "run")
        expected = f"error: --out {out} is not writable (Not a directory); choose another --out"
    elif case == "out not writable":
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere")
        os.makedirs(out)
        os.chmod(out, 0o500)
        expected = f"error: --out {out} is not writable (Permission denied); choose another --out"
    elif case == "out empty":
        out, expected = "", "error: --out is empty; give a folder"
    elif case == "out a dangling link":
        os.symlink(tmp_path / "gone", out)
        expected = (f"error: --out {out}: {out} is a link to {tmp_path / 'gone'}, which does not exist; make "
                    "that folder, or choose another --out")
    elif case == "out under a dangling link":
        link = str(tmp_path / "link")
        os.symlink(tmp_path / "gone", link)
        out = os.path.join(link, "run") + os.sep
        expected = (f"error: --out {out}: {link} is a link to {tmp_path / 'gone'}, which does not exist; make "
                    "that folder, or choose another --out")
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
    existed = os.path.exists(out)
    status, err = run(["train", *TINY, "--data", data, "--out", out, *extra], capsys)
    assert status == 1 and err.splitlines()[-1] == expected
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))
    if not existed and not case.startswith("out"):  # a folder the refused run made is not left behind
        assert not os.path.exists(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path, capsys):
    status, err = run(["train", *TINY, "--device", "cuda", "--out", str(tmp_path / "run")], capsys)
    assert status == 1 and err.splitlines()[-1] == "error: --device cuda but CUDA is not available"


@pytest.mark.parametrize("protocol,flag,owners", [
    ("knn", ["--fast"], "linear"), ("knn", ["--epochs", "5"], "linear and dense"), ("linear", ["--k", "5"], "knn"),
    ("dense", ["--val-freq", "2"], "linear"), ("linear", ["--num-classes", "3"], "dense")])
def test_eval_refuses_a_flag_its_protocol_would_ignore(protocol, flag, owners, capsys):
    with pytest.raises(SystemExit) as refused:
        main(["eval", protocol, "--checkpoint", "unused.pt", *flag])
    assert refused.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"adclr eval: error: argument {flag[0]}: applies to eval {owners}, not eval {protocol}")


@pytest.mark.parametrize("flag", [["--lr", "0.1"], ["--val-freq", "2"]])
def test_eval_linear_fast_refuses_the_sgd_probes_flags(flag, capsys):
    with pytest.raises(SystemExit) as refused:
        main(["eval", "linear", "--fast", "--checkpoint", "unused.pt", *flag])
    assert refused.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"adclr eval: error: argument {flag[0]}: applies to eval linear's SGD probe, not --fast")


@pytest.mark.parametrize("command", [["eval", "knn"], ["eval", "linear", "--fast"], ["show", "attention"]])
def test_errors_name_the_runs_own_data_when_no_data_was_given(command, tmp_path, checkpoint_bytes, capsys):
    """A run's data folder that has moved since: the user typed no --data, so the error
    must not say --data was wrong, but that the run's own data was."""
    if command[0] == "show":
        pytest.importorskip("matplotlib")
    state = torch.load(io.BytesIO(checkpoint_bytes), weights_only=False)
    moved = str(tmp_path / "moved")
    state["config"]["data"] = moved
    torch.save(state, tmp_path / "checkpoint.pt")
    status, err = run([*command, "--checkpoint", str(tmp_path / "checkpoint.pt")], capsys)
    assert status == 1 and err.splitlines()[-1] == (
        f"error: the run's data (no --data given): dataset folder {moved!r} does not exist")


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
    target = os.path.join(write_file(tmp_path / "file"), "b.safetensors")
    status, err = run(["export", "--checkpoint", str(good), "--out", target], capsys)
    assert status == 1 and err.splitlines()[-1] == f"error: --out {target}: {os.path.dirname(target)} is not a folder"
    target = str(tmp_path / "no-such-folder" / "b.safetensors")
    status, err = run(["export", "--checkpoint", str(good), "--out", target], capsys)
    assert status == 1 and err.splitlines()[-1] == (
        f"error: --out {target}: {os.path.dirname(target)} does not exist; make it first")
    # The checkpoint itself, by its name or through a link: it was overwritten, the run lost.
    link = tmp_path / "link.pt"
    link.symlink_to(good)
    for target in (str(good), str(link)):
        status, err = run(["export", "--checkpoint", str(good), "--out", target], capsys)
        assert status == 1 and err.splitlines()[-1] == (
            f"error: --out {target} is the checkpoint being exported; give another file name such as "
            "backbone.safetensors")
    assert good.read_bytes() == checkpoint_bytes


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
        assert err.count("warning: skipped 1 unreadable image\n") == 2  # train, val
    else:
        assert err.count("| 1 unreadable image skipped") == 3  # on each epoch's line
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



@pytest.mark.parametrize("protocol", [["knn", "--k", "1"], ["linear", "--fast", "--epochs", "100"],
                                      ["linear", "--epochs", "1"]])
def test_eval_labels_val_by_train_class_names(protocol, checkpoint_bytes, tmp_path, capsys):
    """val/ without train's first class: its images are train's own, so k = 1 and the probe
    score them all right. Each split numbered its classes on its own: 0 (then 0.5 with
    two val classes)."""
    good = tmp_path / "checkpoint.pt"
    good.write_bytes(checkpoint_bytes)
    data = tmp_path / "data"
    image_folder(data / "train", per_class=3)
    shutil.copytree(data / "train" / "b", data / "val" / "b")
    main(["eval", *protocol, "--checkpoint", str(good), "--data", str(data), "--num-workers", "0"])
    if protocol[1] != "--epochs":  # DINO's protocol: too few images to learn; its labels are checked below
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["accuracy"] == 1.0
    shutil.copytree(data / "train" / "b", data / "val" / "c")  # a class train does not have
    status, err = run(["eval", *protocol, "--checkpoint", str(good), "--data", str(data)], capsys)
    assert status == 1 and err.splitlines()[-1] == (
        f"error: --data: class 'c' ('{data}/val/c') is not a class of '{data}/train'")


def test_dino_linear_protocol_labels_val_by_train_class_names(checkpoint_bytes, tmp_path, monkeypatch, capsys):
    import adclr.eval_linear

    good = tmp_path / "checkpoint.pt"
    good.write_bytes(checkpoint_bytes)
    data = tmp_path / "data"
    image_folder(data / "train", per_class=2)
    shutil.copytree(data / "train" / "b", data / "val" / "b")
    seen = []
    monkeypatch.setattr(adclr.eval_linear, "linear_protocol", lambda backbone, train_set, val_set, num_classes, *a,
                        **kw: seen.append((num_classes, [val_set[i][1] for i in range(len(val_set))])) or {})
    assert run(["eval", "linear", "--checkpoint", str(good), "--data", str(data)], capsys)[0] == 0
    assert seen == [(2, [1, 1])]


# Each case: (tmp_path, path of a good checkpoint) -> (the command line, the one line it must
# end with, a path it must not have made or None). Before, each ended in a traceback
# (the comment says which) or ran on silently.

def unreadable_training_images(tmp, checkpoint, decode="pillow"):  # RuntimeError after 100 tries
    data = image_folder(tmp / "data", per_class=2, unreadable=("a/0.png", "a/1.png", "b/0.png", "b/1.png"))
    first = next(iter(StepBatches(4, 4, seed=0)))[0][0]  # the first sample of the first batch
    path = ImageFolder(data).samples[first][0]
    return (["train", *TINY, "--data", data, "--out", str(tmp / "run"), "--decode", decode],
            f"error: --data {data}: none of its 4 images can be read, e.g. {path} (cannot identify image file "
            f"{path!r}); is it a folder of images? (move what cannot be read out of it)",
            str(tmp / "run" / "checkpoint.pt"))


def unreadable_training_images_decoded_apart(tmp, checkpoint):  # the same, with --decode cpu
    return unreadable_training_images(tmp, checkpoint, decode="cpu")


def data_is_a_file(tmp, checkpoint):  # one line, but "does not exist"
    data = write_file(tmp / "data")
    return ["train", *TINY, "--data", data, "--out", str(tmp / "run")], f"error: --data: {data!r} is a file, not a " \
        "dataset folder", str(tmp / "run" / "checkpoint.pt")


def metrics_is_a_folder(tmp, checkpoint):  # IsADirectoryError
    (tmp / "run" / "metrics.jsonl").mkdir(parents=True)
    return (["train", *TINY, "--out", str(tmp / "run")], f"error: {tmp}/run/metrics.jsonl is a folder, not a file; "
            "move it away, or choose another --out", str(tmp / "run" / "checkpoint.pt"))


def lock_is_a_folder(tmp, checkpoint):  # IsADirectoryError
    (tmp / "run" / ".lock").mkdir(parents=True)
    return (["train", *TINY, "--out", str(tmp / "run")], f"error: cannot write {tmp}/run/.lock: Is a directory",
            str(tmp / "run" / "checkpoint.pt"))


def compare_out_is_a_file(tmp, checkpoint):  # FileExistsError
    out = write_file(tmp / "out")
    return ["compare", "--out", out], f"error: --out {out} is a file, not a folder; choose another --out", None


def compare_data_without_val(tmp, checkpoint):  # FileNotFoundError after the first two trainings
    data = image_folder(tmp / "data")
    return (["compare", "--data", data, "--out", str(tmp / "out")], f"error: --data: evaluation needs "
            f"'{data}/train' (and '{data}/val') with one sub-folder per class", str(tmp / "out"))


def compare_data_without_masks(tmp, checkpoint):  # FileNotFoundError after the first two trainings
    data = tmp / "data"
    image_folder(data / "train")
    image_folder(data / "val")
    return (["compare", "--data", str(data), "--out", str(tmp / "out")], f"error: --data: compare scores a dense "
            f"probe too: no train split of image/mask pairs in '{data}': expected images/{{train or training}} beside "
            "masks/ or annotations/ (the same sub-folder), or {train or training}/images beside {train or "
            "training}/masks or annotations", str(tmp / "out"))


def compare_seed_twice(tmp, checkpoint):  # a table over seeds 0, 0 as if two seeds
    return (["compare", "--seeds", "0", "1", "0", "--out", str(tmp / "out")],
            "error: --seeds: 0 is given twice; each seed is one pair of runs", str(tmp / "out"))


def show_attention_out_is_a_file(tmp, checkpoint):  # FileExistsError
    out = write_file(tmp / "out")
    return (["show", "attention", "--checkpoint", checkpoint, "--out", out],
            f"error: --out {out} is a file, not a folder; choose another --out", None)


def show_dense_out_is_a_file(tmp, checkpoint):  # FileExistsError after fitting the probe
    out = write_file(tmp / "out")
    return (["show", "dense", "--checkpoint", checkpoint, "--out", out, "--limit", "4"],
            f"error: --out {out} is a file, not a folder; choose another --out", None)


def show_curves_without_numbers(tmp, checkpoint):  # TypeError in matplotlib
    path = write_file(tmp / "metrics.jsonl", '{"step": "x", "loss": 1}\n{"step": 1, "loss": "a"}\n')
    return (["show", "curves", path], f"error: {path} holds no numbers to plot (loss, lr, teacher_temp, momentum, "
            "knn)", str(tmp / "metrics.png"))


def export_to_a_device(tmp, checkpoint):  # as root, the device node was replaced by a file
    return (["export", "--checkpoint", checkpoint, "--out", "/dev/full"],
            "error: --out /dev/full is a device; give a file name such as backbone.safetensors", None)


def export_to_a_fifo(tmp, checkpoint):  # replaced by a file
    os.mkfifo(tmp / "fifo")
    (tmp / "link").symlink_to(tmp / "fifo")
    return (["export", "--checkpoint", checkpoint, "--out", str(tmp / "link")],
            f"error: --out {tmp}/link is a special file; give a file name such as backbone.safetensors", None)


ONE_LINE_ERRORS = [unreadable_training_images, unreadable_training_images_decoded_apart, data_is_a_file, metrics_is_a_folder, lock_is_a_folder,
                   compare_out_is_a_file,
                   compare_data_without_val, compare_data_without_masks, compare_seed_twice,
                   show_attention_out_is_a_file, show_dense_out_is_a_file, show_curves_without_numbers,
                   export_to_a_device, export_to_a_fifo]


@pytest.mark.parametrize("case", ONE_LINE_ERRORS, ids=lambda case: case.__name__)
def test_one_line_user_errors(case, tmp_path, checkpoint_bytes, capsys):
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint_bytes)
    argv, line, not_made = case(tmp_path, str(checkpoint))
    status, err = run(argv, capsys)
    assert status == 1 and err.splitlines()[-1] == line and "Traceback" not in err
    assert not_made is None or not os.path.exists(not_made)
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    assert not os.path.isfile(tmp_path / "fifo")


def test_eval_on_a_gpu_the_machine_lacks(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    status, err = run(["eval", "knn", "--checkpoint", "c.pt", "--device", "cuda:1"], capsys)
    assert status == 1 and err.splitlines()[-1] == "error: --device cuda:1 but there are 1 GPUs"


def test_export_writes_through_a_link_with_the_usual_permissions(tmp_path, checkpoint_bytes, capsys):
    """safetensors' save_file renamed a 0600 file of its own over --out, a link too."""
    from safetensors.torch import load_file

    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint_bytes)
    (tmp_path / "exports").mkdir()
    target, link = tmp_path / "exports" / "b.safetensors", tmp_path / "b.safetensors"
    link.symlink_to(target)
    previous = os.umask(0o022)
    try:
        assert run(["export", "--checkpoint", str(checkpoint), "--out", str(link)], capsys)[0] == 0
    finally:
        os.umask(previous)
    assert link.is_symlink() and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert "pos_embed" in load_file(str(link)) and os.listdir(tmp_path / "exports") == ["b.safetensors"]


def in_use_line(out, pid):
    return (f"error: --out {out} is in use by another adclr run (process {pid} on {socket.gethostname()}); "
            "wait for it to end, or choose another --out")


def test_a_second_run_into_the_same_out_is_refused(tmp_path):
    """Two runs into one --out both proceeded; the second rewrote metrics.jsonl under the first."""
    out = str(tmp_path / "run")
    command = [sys.executable, "-m", "adclr.cli", "train", *TINY, "--out", out, "--max-steps", "100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the first keeps a core free for the second
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in first.stderr:  # its first logged step: it holds the folder
            if line.startswith("step 1/"):
                break
        second = subprocess.run(command, capture_output=True, text=True, env=env)
        assert second.returncode == 1 and second.stderr.splitlines()[-1] == in_use_line(out, first.pid)
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))  # the first run's alone
    with folder_lock(out):  # the killed run's lock went with it
        pass


@pytest.mark.parametrize("command", [["train", *TINY], ["compare", "--max-steps", "1"]], ids=lambda c: c[0])
def test_a_run_is_refused_while_another_holds_its_out(command, tmp_path, capsys):
    out = str(tmp_path / "run")
    os.makedirs(out)
    with folder_lock(out):
        status, err = run([*command, "--out", out], capsys)
    assert status == 1 and err.splitlines()[-1] == in_use_line(out, os.getpid())
    assert sorted(os.listdir(out)) == [".lock"]

# --------------------------------------------------------------------------- end to end


def test_command_line_train_eval_export(tmp_path, capsys):
    from safetensors.torch import load_file

    from adclr.model import build_backbone

    out = str(tmp_path / "cli")
    main(["train", "--out", out, "--arch", "vit_test", "--patch-size", "8", "--image-size", "32",
          "--local-size", "16", "--num-local-crops", "1", "--num-queries", "2", "--out-dim", "128",
          "--head-hidden-dim", "64", "--head-bottleneck-dim", "32", "--batch-size", "4",
          "--max-steps", "2", "--num-workers", "0", "--device", "cpu", "--global-scale", "0.5", "1.0"])
    assert [r["step"] for r in read_metrics(out)] == [2]
    cfg = load_checkpoint(os.path.join(out, "checkpoint.pt"))["config"]
    assert cfg["global_scale"] == (0.5, 1.0) and cfg["num_queries"] == 2
    capsys.readouterr()
    results = {}
    for protocol, flags in (("knn", []), ("linear", ["--epochs", "2"]), ("linear", ["--fast", "--linear-epochs", "2"]),
                            ("linear", [])):
        main(["eval", protocol, "--checkpoint", os.path.join(out, "checkpoint.pt"), "--limit", "40",
              "--num-workers", "0", *flags])
        captured = capsys.readouterr()
        result = json.loads(captured.out.strip().splitlines()[-1])  # one JSON line
        assert result["protocol"] == protocol and 0.0 <= result["accuracy"] <= 1.0
        assert result["train_images"] == 40 and result["val_images"] == 40
        results[protocol, tuple(flags)] = result, captured.err
    knn = results["knn", ()][0]
    assert set(knn["accuracy_by_k"]) == {"10", "20", "100", "200"} and knn["accuracy"] == knn["accuracy_by_k"]["20"]
    dino = results["linear", ("--epochs", "2")][0]  # DINO's protocol; vit_test has 2 blocks, so 2 CLS
    assert (dino["epochs"], dino["n_last_blocks"], dino["avgpool_patchtokens"]) == (2, 2, False)
    assert dino["best_accuracy"] >= dino["accuracy"] and dino["lr"] == pytest.approx(1e-3 * 128 / 256)
    fast = results["linear", ("--fast", "--linear-epochs", "2")][0]  # the cached probe, on DINO's features too
    assert fast["fast"] is True and (fast["epochs"], fast["n_last_blocks"], fast["avgpool_patchtokens"]) == (2, 2, False)
    default, err = results["linear", ()]  # the built-in data on CPU: a few epochs, said on stderr
    assert default["epochs"] == 5 and "5 epochs" in err and err.count("linear epoch") == 5
    main(["export", "--checkpoint", os.path.join(out, "checkpoint.pt"), "--out", str(tmp_path / "b.safetensors")])
    weights = load_file(str(tmp_path / "b.safetensors"))
    backbone = build_backbone("vit_test", 32, 8)
    backbone.load_state_dict(weights)  # strict: exactly the backbone's parameters
    teacher = load_checkpoint(os.path.join(out, "checkpoint.pt"))["teacher"]
    torch.testing.assert_close(weights["pos_embed"], teacher["backbone.pos_embed"])


def test_the_demo_ends_with_its_knn_beside_random_init(tmp_path, capsys):
    """On the built-in data without a GPU the run's last line says whether it learned; on
    the user's own data it does not (no labels to score with)."""
    import re

    status, err = run(["train", *TINY, "--out", str(tmp_path / "demo")], capsys)
    numbers = re.fullmatch(r"k-NN accuracy \(k = 20, 100 train / 100 val images of builtin\): teacher "
                           r"(\d+\.\d)%, the same network at random init (\d+\.\d)%", err.strip().splitlines()[-1])
    assert status == 0 and numbers and all(0 <= float(n) <= 100 for n in numbers.groups())
    status, err = run(["train", *TINY, "--data", image_folder(tmp_path / "photos"), "--batch-size", "2",
                       "--out", str(tmp_path / "own")], capsys)
    assert status == 0 and err.strip().splitlines()[-1].startswith("done: 1 step,")


def test_ctrl_c_in_the_demos_knn_says_the_run_is_complete(tmp_path, monkeypatch, capsys):
    import adclr.eval_knn

    def interrupted(cfg, images):
        raise KeyboardInterrupt

    monkeypatch.setattr(adclr.eval_knn, "knn_trained_and_at_init", interrupted)
    out = tmp_path / "demo"
    status, err = run(["train", *TINY, "--out", str(out)], capsys)
    assert status == 130 and load_checkpoint(str(out / "checkpoint.pt"))["step"] == 1
    assert err.strip().splitlines()[-1] == (f"interrupted: the k-NN check stopped; the run is complete in {out} "
                                            f"(adclr eval knn --checkpoint {out / 'checkpoint.pt'} evaluates it)")


@pytest.mark.parametrize("command,preset", [("compare", {}), ("sweep", {"out": "runs/sweep"})])
def test_compare_and_sweep_help_shows_their_preset(command, preset, capsys):
    """Their flags' help gives the preset's defaults, which they run with, not adclr train's."""
    import adclr.compare

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for field in ("out", "data", "arch", "base_lr", "max_steps"):
        value = {**adclr.compare.PRESET, **preset}[field]
        assert f"--{field.replace('_', '-')} " in text and f"(default: {value}" in text, field
    assert "(default: runs/adclr" not in text and "(default: vit_small" not in text
    assert "--seed " not in text and "--method " not in text  # refused there: --seeds, --methods
    assert "checkpoint.pt, metrics.jsonl" not in text and f"{command}.md, {command}.json" in text
    if command == "sweep":
        assert "--teacher-temp TEACHER_TEMP (default: 0.02; without --vary swept over 0.02,0.04" in text


@pytest.mark.parametrize("argv", [["eval", "knn", "--checkpoint", "run/checkpoint.pt"], ["compare", "--out", "cmp"],
                                  ["show", "curves", "run"], ["export", "--checkpoint", "run/checkpoint.pt", "--out", "b.safetensors"]])
def test_only_train_runs_under_torchrun(argv, monkeypatch, capsys):
    """Under torchrun every process would run the whole job on one device and write the
    same files: the other commands say so before any work."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    status, err = run(argv, capsys)
    assert status == 2 and err.splitlines()[-1].endswith(
        f"error: adclr {argv[0]} runs in one process: run it without torchrun, or unset WORLD_SIZE (only adclr "
        "train is distributed)")


def test_a_read_only_run_folder_says_to_make_it_writable_to_resume(tmp_path, monkeypatch):
    """Advising another --out there would start the run over."""
    import errno
    import tempfile

    from adclr import checkpoint

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    fresh, run_folder = tmp_path / "fresh", tmp_path / "run"
    fresh.mkdir()
    run_folder.mkdir()
    (run_folder / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"\(Read-only file system\); choose another --out$"):
        checkpoint.make_folder(str(fresh))
    with pytest.raises(SystemExit, match=r"\(Read-only file system\); it holds a run: make it writable to "
                                         r"resume it, or choose another --out to start over$"):
        checkpoint.make_folder(str(run_folder))


def test_version(capsys):
    import importlib.metadata

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out == f"adclr {importlib.metadata.version('adclr')}\n"
