"""`adclr compare` on a tiny budget: paired runs, the table, and a resume that redoes nothing."""

import functools
import json
import os

import pytest
import torch

import adclr.compare
from adclr.cli import main
from adclr.checkpoint import load_checkpoint

TINY = ["--arch", "vit_test", "--patch-size", "8", "--image-size", "32", "--local-size", "16",
        "--num-local-crops", "1", "--num-queries", "2", "--out-dim", "64", "--head-hidden-dim", "32",
        "--head-bottleneck-dim", "16", "--batch-size", "4", "--max-steps", "2", "--num-workers", "0",
        "--warmup-epochs", "0", "--warmup-teacher-temp-epochs", "0", "--log-every", "1"]


def test_compare_on_a_tiny_budget(tmp_path, monkeypatch, capsys):
    # Short probes: what is checked here is the plumbing, not the scores.
    monkeypatch.setattr(adclr.compare, "linear_accuracy", functools.partial(adclr.compare.linear_accuracy, epochs=5))
    monkeypatch.setattr(adclr.compare, "dense_probe", functools.partial(adclr.compare.dense_probe, epochs=2))
    out = tmp_path / "compare"
    main(["compare", *TINY, "--seeds", "0", "1", "--eval-images", "12", "--out", str(out)])
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0] == "| backbone | k-NN | linear | mIoU | pixel acc. |"
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| random init", "| DINO (lambda = 0)", "| ADCLR", "| ADCLR − DINO (paired by seed)",
        "| every patch right (val labels, no model)"]
    assert (out / "compare.md").read_text().startswith(table.strip().split("\n")[0])
    record = json.loads((out / "compare.json").read_text())
    assert record["seeds"] == [0, 1] and record["eval_images"] == 12
    reference = record["every_patch_right"]  # the labels at a 4 x 4 grid: room left, not perfect
    assert 0.3 < reference["miou"] < 1 and 0.5 < reference["pixel_accuracy"] < 1
    assert rows[5].split(" | ")[1:] == ["–", "–", f"{100 * reference['miou']:.1f}",
                                        f"{100 * reference['pixel_accuracy']:.1f} |"]
    for seed in ("0", "1"):
        for method in ("random", "dino", "adclr"):
            scores = record["results"][seed][method]
            assert sorted(scores) == ["knn", "linear", "miou", "pixel_accuracy"]
            assert all(0 <= v <= 1 for v in scores.values())
        # The pair differs in lambda only, and starts from the same weights as "random".
        dino = load_checkpoint(str(out / f"seed{seed}" / "dino" / "checkpoint.pt"))
        query_run = load_checkpoint(str(out / f"seed{seed}" / "adclr" / "checkpoint.pt"))
        differ = {k for k in dino["config"] if dino["config"][k] != query_run["config"][k]}
        assert differ == {"out", "lambda_query"} and dino["config"]["lambda_query"] == 0
        assert query_run["config"]["lambda_query"] == 0.5 and dino["config"]["seed"] == int(seed)
    # Per-seed numbers and the spread in the table are the JSON's.
    knn = [100 * record["results"][s]["adclr"]["knn"] for s in ("0", "1")]
    mean, spread = adclr.compare.summary(knn)
    assert rows[3].split(" | ")[1] == f"{mean:.1f} ± {spread:.1f}"

    # Run again: nothing is trained or scored twice.
    stamps = {p: os.path.getmtime(p) for p in out.glob("seed*/*/checkpoint.pt")}
    monkeypatch.setattr(adclr.compare, "score", lambda *a, **k: pytest.fail("scored again"))
    main(["compare", *TINY, "--seeds", "0", "1", "--eval-images", "12", "--out", str(out)])
    assert capsys.readouterr().out == table
    assert stamps == {p: os.path.getmtime(p) for p in out.glob("seed*/*/checkpoint.pt")} and len(stamps) == 4


def test_random_init_is_the_runs_starting_point(tmp_path):
    """'random' is the teacher both runs of a seed start from, not some other initialisation."""
    from adclr.config import Config
    from adclr.train import build

    cfg = Config(**{**adclr.compare.PRESET, "out": str(tmp_path), "seed": 3})
    a = build(cfg, "cpu").teacher.backbone.state_dict()
    b = build(cfg, "cpu").teacher.backbone.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = build(Config(**{**adclr.compare.PRESET, "out": str(tmp_path), "seed": 4}), "cpu").teacher.backbone
    assert not torch.equal(other.state_dict()["pos_embed"], a["pos_embed"])


def test_compare_refuses_a_comparison_with_itself(tmp_path):
    for flag, message in (("--lambda-query", "error: --lambda-query 0 would compare DINO with itself; "
                                             "give ADCLR's lambda (> 0)"),
                          ("--num-queries", "error: --num-queries 0 leaves ADCLR without query crops; "
                                            "give at least 1")):
        with pytest.raises(SystemExit) as exit:
            main(["compare", *TINY, flag, "0", "--out", str(tmp_path)])
        assert exit.value.code == message


def test_compare_other_methods_on_a_tiny_budget(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(adclr.compare, "linear_accuracy", functools.partial(adclr.compare.linear_accuracy, epochs=2))
    monkeypatch.setattr(adclr.compare, "dense_probe", functools.partial(adclr.compare.dense_probe, epochs=1))
    out = tmp_path / "compare"
    main(["compare", *TINY, "--max-steps", "1", "--seeds", "0", "--eval-images", "8", "--methods", "densecl",
          "ccmim", "--out", str(out)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| random init", "| DenseCL", "| ccMIM", "| every patch right (val labels, no model)"]
    record = json.loads((out / "compare.json").read_text())
    assert record["methods"] == ["random", "densecl", "ccmim"]
    for method in ("densecl", "ccmim"):
        config = load_checkpoint(str(out / "seed0" / method / "checkpoint.pt"))["config"]
        assert config["method"] == method and config["max_steps"] == 1
        assert all(0 <= v <= 1 for v in record["results"]["0"][method].values())
