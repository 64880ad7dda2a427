"""`adclr compare`: ADCLR against DINO (lambda = 0) and random initialisation, at equal budget.

For each seed, two runs that differ in --lambda-query only (same initial weights, data
order, crops, augmentations, steps and batch: the query crops are cut in both runs and
only lambda = 0 leaves them out of the loss), and the teacher backbone at initialisation.
Each of the three backbones is scored the same way:

    k-NN     DINO's weighted k-NN (k = 20, T = 0.07) on CLS features of centre crops
    linear   the quick linear probe on the same cached CLS features (`adclr.eval_linear.linear_accuracy`)
    mIoU     the dense probe (`adclr eval dense`) on patch tokens, and its pixel accuracy

The table gives the mean and the sample standard deviation over seeds, the per-seed
difference ADCLR - DINO (the runs of a seed are paired), and the dense scores of the val
labels themselves at the run's patch grid (`adclr.eval_dense.patch_majority`: what a probe
that gets every patch right scores, so how much room the dense scores have). Everything lands in OUT: the runs
(OUT/seed<S>/<method>/), each score as soon as it is measured (scores.json beside each
checkpoint), and the table (OUT/compare.md, OUT/compare.json). Run the same command again
to resume: finished runs and scores are read back, not redone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import time

import torch

from .checkpoint import FolderInUse, folder_lock, make_folder, write_atomically, write_json_atomically
from .data import open_segmentation
from .eval_dense import NUM_LABELS, SegmentationCrops, dense_probe, patch_majority, scores as dense_scores
from .eval_knn import knn_accuracy
from .eval_linear import linear_accuracy
from .features import CenterCrops, extract_features, load_backbone, open_labelled_splits
from .train import build, train

# The equal-budget defaults: a 2-block ViT on 64 px scenes (an 8 x 8 patch grid) for 1500
# steps of 32 images, about 5 minutes per run on 2 CPU cores; the recipe of the learning
# test (tests/adclr/test_learning.py: a sharp teacher from the start, a fast-moving EMA),
# at 64 px and with 8 query crops. Any `adclr train` flag overrides them.
PRESET = {
    "out": "runs/compare", "data": "builtin:scenes", "arch": "vit_test", "patch_size": 8, "image_size": 64,
    "local_size": 32, "num_local_crops": 2, "num_queries": 8, "out_dim": 512, "head_hidden_dim": 256,
    "head_bottleneck_dim": 64, "batch_size": 32, "epochs": 100, "max_steps": 1500, "base_lr": 4e-3,
    "warmup_epochs": 0.05, "warmup_teacher_temp": 0.02, "teacher_temp": 0.02, "warmup_teacher_temp_epochs": 0.0,
    "freeze_last_layer_epochs": 0.0, "momentum_teacher": 0.99, "log_every": 100, "checkpoint_every": 500,
    "device": "cpu",
}
METHODS = ("random", "dino", "adclr")
LABELS = {"random": "random init", "dino": "DINO (lambda = 0)", "adclr": "ADCLR", "densecl": "DenseCL",
          "ccmim": "ccMIM"}
# What each trained method changes in the shared settings (`--methods`; docs/methods.md).
RUNS = {"dino": dict(method="adclr", lambda_query=0.0), "adclr": dict(method="adclr"),
        "densecl": dict(method="densecl"), "ccmim": dict(method="ccmim")}
METRICS = (("knn", "k-NN"), ("linear", "linear"), ("miou", "mIoU"), ("pixel_accuracy", "pixel acc."))
# Evaluation sizes: images per split (the built-in sets have 10000 train, 2000 val).
EVAL_IMAGES = 2000


def score(backbone, cfg, images=EVAL_IMAGES, dense_epochs=None, quiet=True):
    """{"knn", "linear", "miou", "pixel_accuracy"} of a backbone on the run's data."""
    size = cfg.image_size
    backbone.eval()
    sink = io.StringIO() if quiet else sys.stderr
    with contextlib.redirect_stderr(sink):
        train_images, val_images = open_labelled_splits(cfg.data)
        train_f, train_y = extract_features(backbone, CenterCrops(train_images, size, images))
        val_f, val_y = extract_features(backbone, CenterCrops(val_images, size, images))
        dense = dense_probe(backbone, SegmentationCrops(open_segmentation(cfg.data, "train"), size, images),
                            SegmentationCrops(open_segmentation(cfg.data, "val"), size, images, full_masks=True),
                            **({"epochs": dense_epochs} if dense_epochs else {}))
    return {"knn": knn_accuracy(train_f, train_y, val_f, val_y, (20,), 0.07)[20],
            "linear": linear_accuracy(train_f, train_y, val_f, val_y),
            "miou": dense["miou"], "pixel_accuracy": dense["pixel_accuracy"]}


def every_patch_right(cfg, images=EVAL_IMAGES):
    """{"miou", "pixel_accuracy"} of `patch_majority` on the val masks `score` uses (no model)."""
    val = SegmentationCrops(open_segmentation(cfg.data, "val"), cfg.image_size, images, full_masks=True)
    grid = (cfg.image_size // cfg.patch_size,) * 2
    confusion = torch.zeros(NUM_LABELS, NUM_LABELS, dtype=torch.long)
    for i in range(len(val)):
        item = val[i]
        if not isinstance(item, int):
            confusion += patch_majority(item[1], grid)
    measured = dense_scores(confusion)
    return {"miou": measured["miou"], "pixel_accuracy": measured["pixel_accuracy"]}


def _cached(path, compute):
    """The JSON at `path`, or compute() written there first (atomically)."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    value = compute()
    write_json_atomically(path, value)
    return value


def summary(values):
    """(mean, sample standard deviation; 0 for one value)."""
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, spread


def table(results, seeds, reference=None, methods=METHODS):
    """Markdown: one row per method (mean +- std over seeds, in %), then ADCLR - DINO per seed
    when both ran, then `reference` ({"miou", "pixel_accuracy"} of `every_patch_right`) if given."""
    head = "| backbone | " + " | ".join(name for _, name in METRICS) + " |"
    lines = [head, "|---" * (len(METRICS) + 1) + "|"]

    def cell(values):
        mean, spread = summary([100 * v for v in values])
        return f"{mean:.1f} ± {spread:.1f}"

    for method in methods:
        lines.append(f"| {LABELS[method]} | " + " | ".join(
            cell([results[s][method][key] for s in seeds]) for key, _ in METRICS) + " |")
    if {"adclr", "dino"} <= set(methods):
        lines.append("| ADCLR − DINO (paired by seed) | " + " | ".join(
            cell([results[s]["adclr"][key] - results[s]["dino"][key] for s in seeds]) for key, _ in METRICS) + " |")
    if reference:
        lines.append("| every patch right (val labels, no model) | " + " | ".join(
            f"{100 * reference[key]:.1f}" if key in reference else "–" for key, _ in METRICS) + " |")
    return "\n".join(lines)


def compare(cfg, seeds, lambda_query=None, eval_images=EVAL_IMAGES, dense_epochs=None, methods=METHODS[1:]):
    """Train and score every (seed, method); write OUT/compare.md and OUT/compare.json.

    cfg: the run settings shared by every method (`cfg.out` is the comparison's folder);
    ADCLR trains with cfg.lambda_query, DINO with 0, DenseCL and ccMIM with their own
    losses (`RUNS`); random init is always scored. Returns {seed: {method: scores}}.
    What a user must fix, the evaluation data included, is said in one line before any training.
    """
    methods = ("random", *dict.fromkeys(m for m in methods if m != "random"))
    if "adclr" in methods and cfg.lambda_query == 0:
        raise SystemExit("error: --lambda-query 0 would compare DINO with itself; give ADCLR's lambda (> 0)")
    if "adclr" in methods and cfg.num_queries == 0:
        raise SystemExit("error: --num-queries 0 leaves ADCLR without query crops; give at least 1")
    twice = [seed for i, seed in enumerate(seeds) if seed in seeds[:i]]
    if twice:
        raise SystemExit(f"error: --seeds: {twice[0]} is given twice; each seed is one pair of runs")
    _check_eval_data(cfg.data)
    make_folder(cfg.out)
    try:
        with folder_lock(cfg.out):
            return _compare(cfg, seeds, eval_images, dense_epochs, methods)
    except FolderInUse as error:
        raise SystemExit(f"error: --out {error}; wait for it to end, or choose another --out") from None


def _check_eval_data(data):
    """Exit with one line when --data lacks what the scores need: labelled train and val
    images, and image/mask pairs of both splits."""
    open_labelled_splits(data)
    try:
        open_segmentation(data, "train"), open_segmentation(data, "val")
    except OSError as error:
        raise SystemExit(f"error: --data: compare scores a dense probe too: {error}") from None


def _compare(cfg, seeds, eval_images, dense_epochs, methods):
    """`compare` in its claimed folder."""
    if cfg.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Measured on 2 shared cores: a 64 px vit_test step took 1.65 s of CPU with 2 threads,
        # 0.10 s with one; these models are too small to split, and the threads spin.
        torch.set_num_threads(1)
        print("compare: 1 PyTorch thread (OMP_NUM_THREADS is unset; set it to choose)", file=sys.stderr)
    t0, results = time.perf_counter(), {}
    for seed in seeds:
        results[seed] = {}
        for method in methods:
            run = dataclasses.replace(cfg, seed=seed, out=os.path.join(cfg.out, f"seed{seed}", method),
                                      **RUNS.get(method, {}))
            make_folder(run.out)
            if method == "random":  # the teacher as both runs of this seed start
                backbone = lambda: build(run, "cpu").teacher.backbone  # noqa: E731
            else:
                print(f"compare: seed {seed}, {LABELS[method]}: training {run.out}", file=sys.stderr, flush=True)
                train(run)
                backbone = lambda: load_backbone(os.path.join(run.out, "checkpoint.pt"))[0]  # noqa: E731
            print(f"compare: seed {seed}, {LABELS[method]}: scoring", file=sys.stderr, flush=True)
            scores = _cached(os.path.join(run.out, "scores.json"),
                             lambda: score(backbone(), run, eval_images, dense_epochs))
            results[seed][method] = scores
            print(f"compare: seed {seed}, {LABELS[method]}: " + ", ".join(
                f"{name} {100 * scores[key]:.1f}%" for key, name in METRICS), file=sys.stderr, flush=True)
    reference = _cached(os.path.join(cfg.out, "every_patch_right.json"), lambda: every_patch_right(cfg, eval_images))
    elapsed = time.perf_counter() - t0
    text = table(results, seeds, reference, methods)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "seed")}
    note = (f"\n\nMean ± sample standard deviation over seeds {', '.join(map(str, seeds))}, in %. "
            f"Training settings: {json.dumps(settings)}\n")
    write_atomically(os.path.join(cfg.out, "compare.md"), lambda f: f.write((text + note).encode()))
    write_json_atomically(os.path.join(cfg.out, "compare.json"), {
        "seeds": list(seeds), "methods": list(methods), "settings": settings, "eval_images": eval_images,
        "results": {str(s): r for s, r in results.items()}, "every_patch_right": reference, "seconds": elapsed})
    print(text)
    print(f"compare: {len(seeds)} seeds in {elapsed / 60:.1f} min; table in {os.path.join(cfg.out, 'compare.md')}",
          file=sys.stderr)
    return results
