"""`adclr compare` and `adclr sweep` on a tiny budget: paired runs, the tables, a resume that
redoes nothing, and the attention measures on backbones whose attention is known."""

import dataclasses
import functools
import json
import os
import sys

import numpy as np
import pytest
import torch

import adclr.compare
import adclr.data
import adclr.features
from adclr.checkpoint import load_checkpoint, rng_states, save_checkpoint
from adclr.cli import main
from adclr.config import Config
from adclr.model import build_backbone
from adclr.train import build

TINY = ["--arch", "vit_test", "--patch-size", "8", "--image-size", "32", "--local-size", "16",
        "--num-local-crops", "1", "--num-queries", "2", "--out-dim", "64", "--head-hidden-dim", "32",
        "--head-bottleneck-dim", "16", "--batch-size", "4", "--max-steps", "2", "--num-workers", "0",
        "--warmup-epochs", "0", "--warmup-teacher-temp-epochs", "0", "--log-every", "1"]


@pytest.mark.slow
def test_compare_on_a_tiny_budget(tmp_path, monkeypatch, capsys):
    # Short probes: what is checked here is the plumbing, not the scores.
    monkeypatch.setattr(adclr.compare, "linear_accuracy", functools.partial(adclr.compare.linear_accuracy, epochs=5))
    monkeypatch.setattr(adclr.compare, "dense_probe", functools.partial(adclr.compare.dense_probe, epochs=2))
    out = tmp_path / "compare"
    main(["compare", *TINY, "--seeds", "0", "1", "--eval-images", "12", "--out", str(out)])
    table = capsys.readouterr().out
    scores, attention = table.split("\n\n")
    rows = [line for line in scores.splitlines() if line.startswith("| ")]
    assert rows[0] == "| backbone | k-NN | linear | mIoU | pixel acc. |"
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| random init", "| DINO (lambda = 0)", "| ADCLR", "| ADCLR − DINO (paired by seed)",
        "| every patch right (val labels, no model)"]
    attention = attention.splitlines()
    assert attention[0].startswith("| backbone | query on its crop ÷ crop's area | share, area (%) | CLS on objects")
    assert [r.split(" | ")[0] for r in attention[2:]] == ["| random init", "| DINO (lambda = 0)", "| ADCLR"]
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
            assert sorted(scores) == ["cls_foreground", "cls_share", "foreground_area", "knn", "linear", "miou",
                                      "pixel_accuracy", "query_area", "query_localisation", "query_share"]
            assert all(0 <= scores[k] <= 1 for k in scores if not k.endswith(("localisation", "foreground")))
            assert scores["query_localisation"] == pytest.approx(scores["query_share"] / scores["query_area"])
            assert 0 < scores["query_area"] < 0.5 and 0 < scores["foreground_area"] < 0.8
        # The pair differs in lambda only, and starts from the same weights as "random".
        dino = load_checkpoint(str(out / f"seed{seed}" / "dino" / "checkpoint.pt"))
        query_run = load_checkpoint(str(out / f"seed{seed}" / "adclr" / "checkpoint.pt"))
        differ = {k for k in dino["config"] if dino["config"][k] != query_run["config"][k]}
        assert differ == {"out", "lambda_query"} and dino["config"]["lambda_query"] == 0
        assert query_run["config"]["lambda_query"] == 0.5 and dino["config"]["seed"] == int(seed)
        # "random" is the step-0 checkpoint of the pair: the teacher both runs start from.
        start = load_checkpoint(str(out / f"seed{seed}" / "random" / "checkpoint.pt"))
        assert start["step"] == 0 and start["config"]["seed"] == int(seed)
        initial = build(Config(**{**adclr.compare.PRESET, **{k: tuple(v) if isinstance(v, list) else v
                                                              for k, v in start["config"].items()}}), "cpu")
        assert all(torch.equal(v, start["teacher"][k]) for k, v in initial.teacher.state_dict().items())
    # Per-seed numbers and the spread in the table are the JSON's.
    knn = [100 * record["results"][s]["adclr"]["knn"] for s in ("0", "1")]
    mean, spread = adclr.compare.summary(knn)
    assert rows[3].split(" | ")[1] == f"{mean:.1f} ± {spread:.1f}"

    # Run again: nothing is trained or scored twice.
    real_score, real_localisation = adclr.compare.score, adclr.compare.localisation
    stamps = {p: os.path.getmtime(p) for p in out.glob("seed*/*/checkpoint.pt")}
    monkeypatch.setattr(adclr.compare, "score", lambda *a, **k: pytest.fail("scored again"))
    monkeypatch.setattr(adclr.compare, "localisation", lambda *a, **k: pytest.fail("measured again"))
    main(["compare", *TINY, "--seeds", "0", "1", "--eval-images", "12", "--out", str(out)])
    assert capsys.readouterr().out == table
    assert stamps == {p: os.path.getmtime(p) for p in out.glob("seed*/*/checkpoint.pt")} and len(stamps) == 6

    # Other evaluation settings: every score is made again (the attention, which does not
    # depend on them, is not); a run trained further: its scores and attention are.
    scored, measured = [], []
    monkeypatch.setattr(adclr.compare, "score", lambda backbone, run, *a, **k: scored.append(run.out) or real_score(
        backbone, run, *a, **k))
    monkeypatch.setattr(adclr.compare, "localisation", lambda *a, **k: measured.append(1) or real_localisation(*a, **k))
    main(["compare", *TINY, "--seeds", "0", "1", "--eval-images", "10", "--out", str(out)])
    capsys.readouterr()
    assert len(scored) == 6 and not measured
    assert json.loads((out / "compare.json").read_text())["eval_images"] == 10
    scored.clear()
    main(["compare", *TINY, "--seeds", "0", "--eval-images", "10", "--max-steps", "3", "--out", str(out)])
    capsys.readouterr()
    assert sorted(os.path.basename(p) for p in scored) == ["adclr", "dino"] and len(measured) == 2
    assert load_checkpoint(str(out / "seed0" / "dino" / "checkpoint.pt"))["step"] == 3

    # Runs of other settings are refused before anything is scored: fewer steps than they
    # took, other data (the table would name what they were not trained for), a setting
    # a resume may not change (refused by the training of the first such run, after the
    # runs before it were scored).
    monkeypatch.setattr(adclr.compare, "score", lambda *a, **k: pytest.fail("scored before the refusal"))
    dino = out / "seed0" / "dino"
    for flags, line in [
            (["--max-steps", "2"], f"error: --max-steps 2: {dino} is at step 3; give --max-steps 3 or more, "
                                   "or another --out for a new comparison"),
            (["--max-steps", "3", "--data", "builtin:few-shape-scenes"],
             f"error: --data builtin:few-shape-scenes: {dino} was trained on {adclr.compare.PRESET['data']}; "
             f"give --data {adclr.compare.PRESET['data']}, or another --out for a new comparison"),
            (["--max-steps", "3", "--image-size", "48"], f"error: {dino} holds a different run")]:
        with pytest.raises(SystemExit) as refused:
            main(["compare", *TINY, "--seeds", "0", "--eval-images", "10", "--out", str(out), *flags])
        assert str(refused.value.code).startswith(line)
    # Random init's checkpoint, of other settings (the runs were made anew), is made again.
    random = out / "seed0" / "random" / "checkpoint.pt"
    for method in ("dino", "adclr"):
        for name in os.listdir(out / "seed0" / method):
            os.remove(out / "seed0" / method / name)
    monkeypatch.setattr(adclr.compare, "score", real_score)
    main(["compare", *TINY, "--seeds", "0", "--eval-images", "10", "--out", str(out), "--patch-size", "16"])
    assert "seed 0, random init: " + f"{random} has other settings; made again" in capsys.readouterr().err
    assert load_checkpoint(str(random))["config"]["patch_size"] == 16


def test_random_init_is_the_runs_starting_point(tmp_path):
    """'random' is the teacher both runs of a seed start from, not some other initialisation."""
    cfg = Config(**{**adclr.compare.PRESET, "out": str(tmp_path), "seed": 3})
    a = build(cfg, "cpu").teacher.backbone.state_dict()
    b = build(cfg, "cpu").teacher.backbone.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = build(Config(**{**adclr.compare.PRESET, "out": str(tmp_path), "seed": 4}), "cpu").teacher.backbone
    assert not torch.equal(other.state_dict()["pos_embed"], a["pos_embed"])


def test_score_passes_on_the_warnings_of_its_quiet_evaluation_once(tmp_path, monkeypatch, capsys):
    """compare scores quietly (no progress lines), but what the data's warnings say reaches
    the user, once however many runs it scores."""
    real = adclr.compare.open_labelled_splits

    def warning_too(*args, **kwargs):
        print("warning: the data says so", file=sys.stderr)
        return real(*args, **kwargs)

    monkeypatch.setattr(adclr.compare, "open_labelled_splits", warning_too)
    cfg = Config(**{**adclr.compare.PRESET, "out": str(tmp_path)})
    backbone = build(cfg, "cpu").teacher.backbone
    for _ in range(2):
        adclr.compare.score(backbone, cfg, images=10, dense_epochs=1)
    err = capsys.readouterr().err
    assert err.count("warning: the data says so") == 1 and "dense: probe epoch" not in err


def test_compare_refuses_a_comparison_with_itself(tmp_path):
    for flag, message in (("--lambda-query", "error: --lambda-query 0 would compare DINO with itself; "
                                             "give ADCLR's lambda (> 0)"),
                          ("--num-queries", "error: --num-queries 0 leaves ADCLR without query crops; "
                                            "give at least 1")):
        with pytest.raises(SystemExit) as exit:
            main(["compare", *TINY, flag, "0", "--out", str(tmp_path)])
        assert exit.value.code == message


def known_attention(attend):
    """A 2-block ViT (32 px, patch 8: 4 x 4 patches) whose last block's attention is known.

    The first block passes its input through, and a token is its patch's mean brightness
    on one channel, so the last block's LayerNorm makes every token +u (bright) or -u
    (dark). attend False: q = k = 0, every row uniform over what it sees. attend True:
    q = k = 3u, so a bright token (and CLS, made bright) attends only to the bright
    patches, equally, and a dark one only to the dark patches.
    """
    backbone = build_backbone("vit_test", 32, 8).eval()
    with torch.no_grad():
        for p in backbone.parameters():
            p.zero_()
        for norm in (backbone.blocks[1].norm1, backbone.norm):
            norm.weight.fill_(1)
        backbone.patch_embed.proj.weight[0] = 1 / (3 * 8 * 8)
        if attend:
            backbone.cls_token[0, 0, 0] = 1
            qkv = backbone.blocks[1].attn.qkv.weight  # rows: q then k then v, head by head (2 x 32)
            for row in (0, 32, 64, 96):
                qkv[row, 0] = 3
    return backbone


def bright_square(box, size=32):
    """A dark image, bright inside `box` (left, top, right, bottom), and its mask (1 there)."""
    from PIL import Image

    left, top, right, bottom = box
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[top:bottom, left:right] = 255
    return Image.fromarray(pixels), (pixels[..., 0] > 0).astype(np.uint8)


def test_a_query_that_attends_only_to_its_crop_scores_its_inverse_area_share():
    image, mask = bright_square((8, 8, 24, 24))  # 2 x 2 of the 4 x 4 patches
    shares = adclr.compare.attention_shares(known_attention(True), image, mask, [(8, 8, 24, 24), (0, 0, 8, 8)], 8)
    # The bright query looks only at its 4 patches: all its attention there, on 4 / 16 of the image.
    assert shares["query_share"][0] == pytest.approx(1, abs=1e-6) and shares["query_area"][0] == 4 / 16
    # The dark one looks at the 12 dark patches alike, its own 1 among them.
    assert shares["query_share"][1] == pytest.approx(1 / 12, abs=1e-6) and shares["query_area"][1] == 1 / 16
    assert shares["cls_share"] == pytest.approx(1, abs=1e-6) and shares["foreground_area"] == 4 / 16
    measured = adclr.compare.localisation(known_attention(True), [(image, mask)] * 3, 32, 8, 0, (0.05, 0.15))
    assert measured["cls_foreground"] == pytest.approx(4, rel=1e-5)  # 1 / (4 / 16)


def test_uniform_attention_is_no_localisation():
    """Any images and query crops: a uniform row puts on each region exactly its area share."""
    rng = np.random.default_rng(0)
    from PIL import Image

    masks = np.zeros((4, 40, 50), np.uint8)
    for mask, (top, left) in zip(masks, rng.integers(0, 20, (4, 2))):
        mask[top:top + 20, left:left + 25] = rng.integers(1, 4)
    pairs = [(Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)), mask) for mask in masks]
    measured = adclr.compare.localisation(known_attention(False), pairs, 32, 8, 5, (0.05, 0.3))
    assert measured["query_localisation"] == pytest.approx(1, abs=1e-5)
    assert measured["cls_foreground"] == pytest.approx(1, abs=1e-5)
    assert 0 < measured["query_area"] < 0.5 and 0.1 < measured["foreground_area"] < 0.5


def test_region_patches_counts_a_patch_at_least_half_inside():
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[0:4, 0:8] = True  # half of patch 0 (8 x 8)
    region[8:11, 8:16] = True  # 3/8 of patch 3
    assert adclr.compare.region_patches(region, 8).tolist() == [True, False, False, False]
    small = torch.zeros(16, 16, dtype=torch.bool)
    small[9:12, 9:12] = True  # a box smaller than half a patch still covers the one it is most in
    assert adclr.compare.region_patches(small, 8).tolist() == [False, False, False, True]


def test_sweep_on_a_tiny_budget(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(adclr.compare, "linear_accuracy", functools.partial(adclr.compare.linear_accuracy, epochs=5))
    monkeypatch.setattr(adclr.compare, "dense_probe", functools.partial(adclr.compare.dense_probe, epochs=2))
    splits = []
    monkeypatch.setattr(adclr.compare, "open_labelled_splits", lambda data, split: splits.append(split) or
                        adclr.features.open_labelled_splits(data, split))
    monkeypatch.setattr(adclr.compare, "open_segmentation", lambda data, split: splits.append(split) or
                        adclr.data.open_segmentation(data, split))
    out = tmp_path / "sweep"
    argv = ["sweep", *TINY, "--vary", "teacher-temp=0.02,0.04", "--vary", "base_lr=1e-3", "--eval-images", "12",
            "--out", str(out)]
    main(argv)
    captured = capsys.readouterr()
    rows = [line for line in captured.out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| setting | random init: k-NN / linear / mIoU | DINO | ADCLR | DINO gain")
    names = ["teacher_temp=0.02,base_lr=0.001", "teacher_temp=0.04,base_lr=0.001"]
    assert [r.split(" | ")[0].strip("|* ") for r in rows[1:]] == [n.replace(",", ", ") for n in names]
    assert set(splits) == {"train", "holdout"}  # chosen on the held-out split, never on val
    record = json.loads((out / "sweep.json").read_text())
    for name, point in zip(names, record["points"]):
        assert point["name"] == name and sorted(point["results"]["0"]) == ["adclr", "dino", "random"]
        run = load_checkpoint(str(out / name / "seed0" / "dino" / "checkpoint.pt"))["config"]
        assert (run["teacher_temp"], run["base_lr"], run["lambda_query"]) == (point["point"]["teacher_temp"], 1e-3, 0)
        assert (out / name / "seed0" / "adclr" / "holdout_scores.json").exists()
        gains = adclr.compare.gains({0: point["results"]["0"]}, [0])
        assert point["gains"] == pytest.approx(gains)
    best = max(record["points"], key=lambda p: min(p["gains"].values()))
    assert record["chosen"] == best["point"]
    flags = f"--teacher-temp {best['point']['teacher_temp']} --base-lr 0.001"
    assert f"chosen: {flags}" in captured.err and f"Chosen: {flags}." in (out / "sweep.md").read_text()

    monkeypatch.setattr(adclr.compare, "score", lambda *a, **k: pytest.fail("scored again"))
    main(argv)
    assert capsys.readouterr().out == captured.out


def test_sweep_chooses_the_point_whose_worse_method_does_best():
    def results(dino, adclr_):
        return {0: {"random": dict.fromkeys(adclr.compare.GAIN_METRICS, 0.1),
                    "dino": dict.fromkeys(adclr.compare.GAIN_METRICS, 0.1 + dino),
                    "adclr": dict.fromkeys(adclr.compare.GAIN_METRICS, 0.1 + adclr_)}}

    rows = [{"name": name, "point": {}, "results": r, "gains": adclr.compare.gains(r, [0])}
            for name, r in (("lopsided", results(-0.05, 0.30)), ("even", results(0.04, 0.05)))]
    assert rows[0]["gains"] == pytest.approx({"dino": -5, "adclr": 30})
    text, best = adclr.compare.sweep_table(rows, [0])
    assert best["name"] == "even"  # the higher mean gain is not what counts
    assert text.splitlines()[3] == "| **even** | 10.0 / 10.0 / 10.0 | 14.0 / 14.0 / 14.0 | 15.0 / 15.0 / 15.0 " \
                                   "| +4.0 | +5.0 | +4.0 |"
    rows.append({"name": "flat", "point": {}, "results": results(-0.0001, 0.0), "gains": {"dino": -0.01, "adclr": 0}})
    assert adclr.compare.sweep_table(rows, [0])[0].splitlines()[4].endswith("| +0.0 | +0.0 | +0.0 |")  # no -0.0"


def test_grid_points_every_combination_or_one_at_a_time():
    grid = {"teacher_temp": [0.04, 0.02], "momentum_teacher": [0.996, 0.99, 0.98]}
    assert adclr.compare.grid_points(grid) == [
        {"teacher_temp": t, "momentum_teacher": m} for t in (0.04, 0.02) for m in (0.996, 0.99, 0.98)]
    assert adclr.compare.grid_points(grid, one_at_a_time=True) == [
        {"teacher_temp": 0.04, "momentum_teacher": 0.996}, {"teacher_temp": 0.02, "momentum_teacher": 0.996},
        {"teacher_temp": 0.04, "momentum_teacher": 0.99}, {"teacher_temp": 0.04, "momentum_teacher": 0.98}]
    assert adclr.compare.point_name({"teacher_temp": 0.04, "warmup_teacher_temp_epochs": 1.5, "arch": "vit_test"}) \
        == "teacher_temp=0.04,warmup_teacher_temp_epochs=1.5,arch=vit_test"


@pytest.mark.parametrize("argv,message", [
    (["--vary", "teacher-temp=0.02", "--vary", "teacher_temp=0.04"],
     "argument --vary: a flag is given twice; list all its values in one --vary"),
    (["--vary", "base-lr=1e-3", "--base-lr", "2e-3"],
     "argument --vary: --base-lr is swept, so it cannot also be set by --base-lr"),
    (["--vary", "teacher-temp"], "argument --vary: expected KEY=V1,V2,... with KEY an adclr train flag, "
                                 "got 'teacher-temp'"),
    (["--vary", "no-such-flag=1"], "argument --vary: expected KEY=V1,V2,... with KEY an adclr train flag, "
                                   "got 'no-such-flag=1'"),
    (["--vary", "momentum-teacher=0.99,1.5"], "argument --vary: momentum-teacher: must be in [0, 1], got 1.5"),
    (["--vary", "query-scale=0.1"], "argument --vary: --query-scale cannot be swept"),
    (["--seed", "1"], "argument --seed: adclr sweep takes --seeds"),
    (["--method", "densecl"], "argument --method: adclr sweep runs ADCLR and DINO, each with its own"),
    (["--vary", "method=densecl,ccmim"], "argument --vary: --method cannot be swept"),
    (["--vary", "teacher-temp=0.02,0.02"], "argument --vary: teacher-temp: 0.02 is given twice"),
])
def test_sweep_user_errors(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(adclr.compare, "sweep", lambda *a, **k: pytest.fail("swept"))
    with pytest.raises(SystemExit) as exit:
        main(["sweep", *argv])
    assert exit.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == f"adclr sweep: error: {message}"


def test_sweep_refuses_a_grid_point_that_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setattr(adclr.compare, "run_seed", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SystemExit) as exit:
        flags = TINY[:TINY.index("--patch-size")] + TINY[TINY.index("--patch-size") + 2:]
        main(["sweep", *flags, "--vary", "patch-size=8,6", "--out", str(tmp_path)])
    assert exit.value.code == ("error: the grid point patch_size=6: --image-size: must be a multiple of "
                               "--patch-size 6, got 32")


@pytest.mark.parametrize("vary,message", [
    ("lambda-query=0.5,0", "error: the grid point lambda_query=0: --lambda-query 0 would compare DINO with itself"),
    ("num-queries=2,0", "error: the grid point num_queries=0: --num-queries 0 leaves ADCLR without query crops"),
])
def test_sweep_refuses_a_grid_point_compare_would_refuse(vary, message, tmp_path, monkeypatch):
    monkeypatch.setattr(adclr.compare, "run_seed", lambda *a, **k: pytest.fail("trained"))
    flag = "--" + vary.split("=")[0]
    flags = TINY[:TINY.index(flag)] + TINY[TINY.index(flag) + 2:] if flag in TINY else TINY
    with pytest.raises(SystemExit) as exit:
        main(["sweep", *flags, "--vary", vary, "--out", str(tmp_path)])
    assert str(exit.value.code).startswith(message)


def test_sweep_checks_the_runs_in_out_before_scoring(tmp_path, monkeypatch, capsys):
    """A rerun with other --data or fewer --max-steps than the runs in --out took is refused
    in one line before anything is scored, as compare's is; it used to score the old runs
    and write their table as the new sweep's."""
    monkeypatch.setattr(adclr.compare, "linear_accuracy", functools.partial(adclr.compare.linear_accuracy, epochs=2))
    monkeypatch.setattr(adclr.compare, "dense_probe", functools.partial(adclr.compare.dense_probe, epochs=1))
    argv = ["sweep", *TINY, "--vary", "teacher-temp=0.04", "--eval-images", "8", "--out", str(tmp_path)]
    main([*argv, "--max-steps", "2"])
    capsys.readouterr()
    monkeypatch.setattr(adclr.compare, "score", lambda *a, **k: pytest.fail("scored"))
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--max-steps", "1"])
    assert exit.value.code.startswith("error: the grid point teacher_temp=0.04: --max-steps 1: ")
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--max-steps", "2", "--data", "builtin:scenes"])
    assert exit.value.code.startswith("error: the grid point teacher_temp=0.04: --data builtin:scenes: ")


def test_a_refused_run_leaves_random_inits_checkpoint_of_other_settings_in_place(tmp_path):
    """The trained runs are checked first: random init's checkpoint, made again when its
    settings are not these, must still be there when a trained run of the seed is refused."""
    cfg = Config(**{**adclr.compare.PRESET, "out": str(tmp_path)})
    for method in ("random", "dino"):
        run = adclr.compare._run(dataclasses.replace(cfg, image_size=48), 0, method)
        os.makedirs(run.out)
        save_checkpoint(build(run, "cpu"), os.path.join(run.out, "checkpoint.pt"), 0, [rng_states()])
    with pytest.raises(SystemExit, match="holds a different run"):
        adclr.compare._check_runs_in_out(cfg, [0], adclr.compare.METHODS)
    assert os.path.exists(tmp_path / "seed0" / "random" / "checkpoint.pt")


def test_compare_other_methods_on_a_tiny_budget(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(adclr.compare, "linear_accuracy", functools.partial(adclr.compare.linear_accuracy, epochs=2))
    monkeypatch.setattr(adclr.compare, "dense_probe", functools.partial(adclr.compare.dense_probe, epochs=1))
    out = tmp_path / "compare"
    main(["compare", *TINY, "--max-steps", "1", "--seeds", "0", "--eval-images", "8", "--methods", "densecl",
          "ccmim", "--out", str(out)])
    scores_table = capsys.readouterr().out.split("\n\n")[0]  # the localisation table follows it
    rows = [line for line in scores_table.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| random init", "| DenseCL", "| ccMIM", "| every patch right (val labels, no model)"]
    record = json.loads((out / "compare.json").read_text())
    assert record["methods"] == ["random", "densecl", "ccmim"]
    for method in ("densecl", "ccmim"):
        config = load_checkpoint(str(out / "seed0" / method / "checkpoint.pt"))["config"]
        assert config["method"] == method and config["max_steps"] == 1
        assert all(0 <= record["results"]["0"][method][key] <= 1 for key, _ in adclr.compare.METRICS)


def test_one_seed_gives_means_alone_and_no_negative_zero():
    scores = {"knn": 0.5, "linear": 0.25, "miou": 0.125, "pixel_accuracy": 0.75}
    results = {0: {"random": scores, "dino": scores, "adclr": {**scores, "knn": 0.5 - 1e-7}}}
    text = adclr.compare.table(results, [0])
    assert "±" not in text and "-0.0" not in text
    assert "| ADCLR − DINO (paired by seed) | 0.0 | 0.0 | 0.0 | 0.0 |" in text
    two = adclr.compare.table({**results, 1: results[0]}, [0, 1])
    assert "| ADCLR | 50.0 ± 0.0 | 25.0 ± 0.0 | 12.5 ± 0.0 | 75.0 ± 0.0 |" in two


def test_the_paired_difference_is_adclr_minus_dino_with_the_sample_spread():
    def scores(knn):
        return {"knn": knn, "linear": 0.5, "miou": 0.5, "pixel_accuracy": 0.5}

    results = {seed: {"random": scores(0.1), "dino": scores(0.4), "adclr": scores(0.4 + gain)}
               for seed, gain in ((0, 0.1), (1, 0.3))}
    rows = [line for line in adclr.compare.table(results, [0, 1]).splitlines() if line.startswith("| ADCLR − DINO")]
    assert rows == ["| ADCLR − DINO (paired by seed) | 20.0 ± 14.1 | 0.0 ± 0.0 | 0.0 ± 0.0 | 0.0 ± 0.0 |"]
    # A gain is the mean over seeds and metrics: k-NN +30 points for DINO, +40 and +60 for ADCLR.
    assert adclr.compare.gains(results, [0, 1]) == pytest.approx({"dino": 30 / 3, "adclr": 50 / 3})


def test_score_takes_k_nn_on_the_last_blocks_cls_token(monkeypatch):
    """The probe's features are the CLS tokens of the last blocks, concatenated; DINO's k-NN
    runs on the last one alone."""
    features, labels = torch.randn(6, 128), torch.arange(6) % 3  # vit_test: 2 blocks of 64
    monkeypatch.setattr(adclr.compare, "cached_probe_features",
                        lambda *args: (features, features, labels, features, labels))
    monkeypatch.setattr(adclr.compare, "dense_probe", lambda *args, **kwargs: {"miou": 0.0, "pixel_accuracy": 0.0})
    monkeypatch.setattr(adclr.compare, "linear_accuracy", lambda *args, **kwargs: 0.0)
    banks = []
    monkeypatch.setattr(adclr.compare, "knn_accuracy", lambda bank, *args: banks.append(bank) or {20: 0.0})
    adclr.compare.score(build_backbone("vit_test", 32, 8), Config(**{**adclr.compare.PRESET, "out": "unused"}), 6)
    assert torch.equal(banks[0], features[:, 64:])


@pytest.mark.parametrize("device,cuda,note", [("cpu", True, True), ("cpu", False, False), ("cuda", True, False)])
def test_a_cpu_comparison_on_a_gpu_machine_says_how_to_take_the_gpu(device, cuda, note, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    adclr.compare._cpu_settings(Config(device=device), "compare")
    said = capsys.readouterr().err
    assert ("--device cuda" in said) == note and "thread" not in said
