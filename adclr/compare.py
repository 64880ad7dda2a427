"""`adclr compare`: ADCLR against DINO (lambda = 0) and random initialisation, at equal budget;
`adclr sweep`: the settings that decide collapse, tried for both methods alike.

For each seed, two runs that differ in --lambda-query only (same initial weights, data
order, crops, augmentations, steps and batch: the query crops are cut in both runs and
only lambda = 0 leaves them out of the loss), and the teacher backbone at initialisation
(written as the step-0 checkpoint OUT/seed<S>/random/checkpoint.pt). Each of the three
backbones is scored the same way:

    k-NN     DINO's weighted k-NN (k = 20, T = 0.07) on CLS features of centre crops
    linear   a logistic regression solved to convergence on DINO's linear-probe features (the CLS
             tokens of the last min(4, depth) blocks) of the same centre crops and their
             mirror images, its L2 weight chosen on a held-out fifth of the train images
             (`adclr.eval_linear.linear_accuracy`: `eval linear --fast`)
    mIoU     the dense probe (`adclr eval dense`) on patch tokens, and its pixel accuracy

and its last block's attention is measured (`localisation`): how much of a query token's
attention falls on the patches its crop covers, and of the CLS token's on the objects,
each against those patches' share of the image.

The table gives the mean and the sample standard deviation over seeds, the per-seed
difference ADCLR - DINO (the runs of a seed are paired), and the dense scores of the val
labels themselves at the run's patch grid (`adclr.eval_dense.patch_majority`: what a probe
that gets every patch right scores, so how much room the dense scores have). Everything
lands in OUT: the runs (OUT/seed<S>/<method>/), each score as soon as it is measured
(<split>_scores.json and <split>_localisation.json beside each checkpoint), and the table
(OUT/compare.md, OUT/compare.json). Run the same command again to resume: finished runs
and scores are read back, not redone; a score made from another checkpoint (a run trained
further) or with other evaluation settings is made again.

`sweep` runs that comparison at every point of a grid of settings (OUT/<point>/seed<S>/...)
and scores on the held-out split ("holdout" of the built-in sets), so that the val split
that `compare` reports on has not been used to choose. A method's gain at a point is the
mean, over k-NN, linear and mIoU, of its score minus random init's, in points; the
chosen point is the one whose worse gain of the two methods is highest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import (CheckpointError, FolderInUse, check_resumable, folder_lock, load_checkpoint, make_folder,
                         rng_states, save_checkpoint, write_atomically, write_json_atomically)
from .config import RESUMABLE, config_errors
from .data import normalize, open_segmentation, to_tensor
from .eval_dense import IGNORE, NUM_LABELS, SegmentationCrops, dense_probe, patch_majority, scores as dense_scores
from .eval_knn import knn_accuracy
from .eval_linear import cached_probe_features, dino_linear_features, linear_accuracy
from .features import (CenterCrops, fixed_subset, last_block_attention, load_backbone, open_labelled_splits,
                       query_boxes, query_crops)
from .train import build, train

# The equal-budget defaults: a 2-block ViT on 32 px five-shape scenes on a grey background
# (a 4 x 4 patch grid; on the same scenes with the objects' colours in the background a
# patch cannot say object or not, and the dense probe labels everything background for
# every backbone) for 600 steps of 32 images (about two epochs of the built-in 10000
# images), sized for a CPU. Teacher temperature 0.04 -> 0.02 over the first half epoch,
# EMA momentum 0.99 and lr 4e-3: the best worse gain of the two methods in `adclr sweep
# --one-at-a-time` (docs/evaluation.md has its table). On the ten-shape
# `builtin:shape-scenes` nothing learns at this budget. Any `adclr train` flag overrides them.
PRESET = {
    "out": "runs/compare", "data": "builtin:grey-ground-scenes", "arch": "vit_test", "patch_size": 8,
    "image_size": 32, "local_size": 16, "num_local_crops": 2, "num_queries": 4, "out_dim": 512,
    "head_hidden_dim": 256, "head_bottleneck_dim": 64, "batch_size": 32, "epochs": 100, "max_steps": 600,
    "base_lr": 4e-3, "warmup_epochs": 0.05, "warmup_teacher_temp": 0.04, "teacher_temp": 0.02,
    "warmup_teacher_temp_epochs": 0.5, "freeze_last_layer_epochs": 0.0, "momentum_teacher": 0.99,
    "log_every": 100, "checkpoint_every": 100, "device": "cpu",
}
METHODS = ("random", "dino", "adclr")
LABELS = {"random": "random init", "dino": "DINO (lambda = 0)", "adclr": "ADCLR", "densecl": "DenseCL",
          "ccmim": "ccMIM"}
# What each trained method changes in the shared settings (`--methods`; docs/methods.md).
RUNS = {"dino": dict(method="adclr", lambda_query=0.0), "adclr": dict(method="adclr"),
        "densecl": dict(method="densecl"), "ccmim": dict(method="ccmim")}
METRICS = (("knn", "k-NN"), ("linear", "linear"), ("miou", "mIoU"), ("pixel_accuracy", "pixel acc."))
# Evaluation sizes: images per split (the built-in sets have 10000 train, 2000 val and
# 2000 holdout), and val images for the attention measures.
EVAL_IMAGES = 2000
LOCALISATION_IMAGES = 200
# The default grid of `adclr sweep`: what decides whether a short run learns or collapses.
# With --one-at-a-time the first values are the base: a constant teacher temperature of
# 0.02, EMA momentum 0.99, lr 4e-3; then a softer teacher, a warm-up (from
# --warmup-teacher-temp, 0.04, over half an epoch: a quarter of the preset's 600 steps),
# DINO's slower EMA, a lower lr.
SWEEP = {"teacher_temp": [0.02, 0.04], "warmup_teacher_temp_epochs": [0.0, 0.5], "momentum_teacher": [0.99, 0.996],
         "base_lr": [4e-3, 1e-3]}
GAIN_METRICS = ("knn", "linear", "miou")


_FORWARDED = set()  # the warnings `score` has passed on: once a process, though it scores every run


def score(backbone, cfg, images=EVAL_IMAGES, dense_epochs=None, quiet=True, split="val"):
    """{"knn", "linear", "miou", "pixel_accuracy"} of a backbone on the run's data: train
    split against `split`."""
    size = cfg.image_size
    backbone.eval()
    sink = io.StringIO() if quiet else sys.stderr
    n, avgpool = dino_linear_features(cfg.arch)
    n = min(n, len(backbone.blocks))
    last_cls = slice((n - 1) * backbone.embed_dim, n * backbone.embed_dim)  # k-NN's feature, DINO's too
    with contextlib.redirect_stderr(sink):
        train_images, val_images = open_labelled_splits(cfg.data, split)
        train_f, mirror_f, train_y, val_f, val_y = cached_probe_features(
            backbone, CenterCrops(train_images, size, images), CenterCrops(val_images, size, images), n, avgpool)
        dense = dense_probe(backbone, SegmentationCrops(open_segmentation(cfg.data, "train"), size, images),
                            SegmentationCrops(open_segmentation(cfg.data, split), size, images, full_masks=True),
                            **({"epochs": dense_epochs} if dense_epochs else {}))
    if quiet:  # the progress lines stay out; what a user must know about the data does not
        for line in sink.getvalue().splitlines():
            if line.startswith("warning:") and line not in _FORWARDED:
                _FORWARDED.add(line)
                print(line, file=sys.stderr)
    return {"knn": knn_accuracy(train_f[:, last_cls], train_y, val_f[:, last_cls], val_y, (20,), 0.07)[20],
            "linear": linear_accuracy(train_f, train_y, val_f, val_y, train_views=(mirror_f,)),
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


# --------------------------------------------------------------------------- localisation

def region_patches(region, patch_size):
    """(patches,) bool: the patches of an (S, S) bool region at least half inside it (at
    least the one most inside it, when the region is not empty)."""
    inside = F.avg_pool2d(region[None, None].float(), patch_size).flatten()
    chosen = inside >= 0.5
    if not chosen.any() and inside.max() > 0:
        chosen[inside.argmax()] = True
    return chosen


def attention_shares(backbone, image, mask, boxes, patch_size):
    """Where one image's last-block attention to the patches goes (heads averaged).

    image: PIL, at the backbone's input size; mask: its (H, W) labels (0 background,
    IGNORE not counted as object); boxes: its query crops' boxes. Shares are of each row's
    attention to the patches (renormalised over the patch columns, so that what a token
    pays itself or CLS does not count). Returns {"query_share": [per query: attention on
    the patches its box covers], "query_area": [those patches' share of the image],
    "cls_share": the CLS token's on the patches mostly on objects, "foreground_area":
    theirs}.
    """
    size = image.size[0]
    grid = (size // patch_size) ** 2
    probs, _ = last_block_attention(backbone, normalize(to_tensor(image))[None], query_crops(image, boxes, patch_size))
    to_patches = probs[0].mean(0)[:, 1:1 + grid]
    to_patches = to_patches / to_patches.sum(-1, keepdim=True)
    labels = torch.from_numpy(np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST)).copy())
    foreground = region_patches((labels != 0) & (labels != IGNORE), patch_size)
    shares = {"query_share": [], "query_area": [], "cls_share": to_patches[0, foreground].sum().item(),
              "foreground_area": foreground.float().mean().item()}
    for q, (left, top, right, bottom) in enumerate(boxes):
        region = torch.zeros(size, size, dtype=torch.bool)
        region[top:bottom, left:right] = True
        covered = region_patches(region, patch_size)
        shares["query_share"].append(to_patches[1 + q, covered].sum().item())
        shares["query_area"].append(covered.float().mean().item())
    return shares


def localisation(backbone, pairs, size, patch_size, num_queries, query_scale, seed=0):
    """`attention_shares` over (PIL image, mask) `pairs`, each image resized to `size` with
    `num_queries` query crops cut as training cuts them (`query_scale`; boxes drawn from a
    generator seeded with `seed`). Returns the means over images (CLS) and over images and
    queries (query) of the shares, and their ratios to the areas, of the means:

        query_localisation  query_share / query_area: 1 = no localisation
        cls_foreground      cls_share / foreground_area
    """
    generator = torch.Generator().manual_seed(seed)
    sums = dict.fromkeys(("query_share", "query_area", "cls_share", "foreground_area"), 0.0)
    images = queries = 0
    for image, mask in pairs:
        image = image.resize((size, size), Image.BICUBIC)
        shares = attention_shares(backbone, image, mask, query_boxes(image, num_queries, query_scale, generator),
                                  patch_size)
        for key, value in shares.items():
            sums[key] += sum(value) if isinstance(value, list) else value
        images, queries = images + 1, queries + num_queries
    means = {k: v / max(1, queries if k.startswith("query") else images) for k, v in sums.items()}
    return {**means, "query_localisation": means["query_share"] / max(means["query_area"], 1e-12),
            "cls_foreground": means["cls_share"] / max(means["foreground_area"], 1e-12)}


def measure_localisation(backbone, cfg, images=LOCALISATION_IMAGES, split="val"):
    """`localisation` of a backbone on `images` of the run's data, at the run's settings."""
    dataset = open_segmentation(cfg.data, split)
    pairs = (dataset.load_segmentation(i) for i in fixed_subset(len(dataset), images))
    return localisation(backbone.eval(), ((x, m) for x, m in pairs if x is not None), cfg.image_size,
                        cfg.patch_size, cfg.num_queries, cfg.query_scale)


# --------------------------------------------------------------------------- runs and tables

def _cached(path, compute, made_with):
    """The value saved at `path` if it was made with `made_with` (the checkpoint file and
    the evaluation settings), else compute() saved there first (atomically) beside it: a
    run trained further or scored with other settings is scored again, never read stale."""
    made_with = json.loads(json.dumps(made_with))  # as it reads back: tuples are lists
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if isinstance(saved, dict) and saved.get("made_with") == made_with:
            return saved["value"]
    value = compute()
    write_json_atomically(path, {"made_with": made_with, "value": value})
    return value


def _file_identity(path):
    """(size, modification time in ns) of a checkpoint: each save writes a new file."""
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def summary(values):
    """(mean, sample standard deviation; 0 for one value)."""
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, spread


def _run(cfg, seed, method):
    """The settings of one method's run of one seed, in its folder under cfg.out."""
    return dataclasses.replace(cfg, seed=seed, out=os.path.join(cfg.out, f"seed{seed}", method),
                               **RUNS.get(method, {}))


def _check_runs_in_out(cfg, seeds, methods):
    """Before any scoring, the runs --out already holds against these settings: each must be
    one that training would resume (else it refused only after the runs before it were
    scored), trained on this --data (its scores would be of other data), and not past this
    --max-steps (the table would name fewer steps than its runs took). Random init's
    checkpoint, untrained, is made again when its settings are not these."""
    trained_first = sorted(methods, key=lambda m: m == "random")  # a refusal leaves random init as it is
    for seed, method in itertools.product(seeds, trained_first):
        run = _run(cfg, seed, method)
        path = os.path.join(run.out, "checkpoint.pt")
        if not os.path.isfile(path):
            continue
        try:
            saved = load_checkpoint(path)
        except CheckpointError as error:
            raise SystemExit(f"error: {error}") from None
        try:
            check_resumable(run, saved["config"])
        except SystemExit:
            if method != "random":
                raise
            print(f"compare: seed {seed}, {LABELS[method]}: {path} has other settings; made again",
                  file=sys.stderr)
            os.remove(path)
            continue
        trained_on = saved["config"].get("data") or "builtin"
        data = cfg.data if (cfg.data or "builtin").startswith("builtin") else os.path.abspath(cfg.data)
        if method != "random" and trained_on != (data or "builtin"):
            raise SystemExit(f"error: --data {cfg.data or 'builtin'}: {run.out} was trained on {trained_on}; "
                             f"give --data {trained_on}, or another --out for a new comparison")
        if cfg.max_steps and saved["step"] > cfg.max_steps:
            raise SystemExit(f"error: --max-steps {cfg.max_steps}: {run.out} is at step {saved['step']}; give "
                             f"--max-steps {saved['step']} or more, or another --out for a new comparison")


def _checkpoint(run, method):
    """OUT/checkpoint.pt of one method's run: the start of training for random init, the
    end of it (trained, or resumed, here) otherwise."""
    make_folder(run.out)
    path = os.path.join(run.out, "checkpoint.pt")
    if method != "random":
        print(f"compare: seed {run.seed}, {LABELS[method]}: training {run.out}", file=sys.stderr, flush=True)
        train(run)
    elif not os.path.exists(path):  # the teacher as every run of this seed starts
        save_checkpoint(build(run, "cpu"), path, 0, [rng_states()])
    return path


def run_seed(cfg, seed, eval_images=EVAL_IMAGES, dense_epochs=None, split="val", localise=True, methods=METHODS):
    """{method: scores} of one seed: every method but random init trained (`RUNS`), all
    scored on `split` (and their attention measured on it when `localise`)."""
    results = {}
    for method in methods:
        run = _run(cfg, seed, method)
        path = _checkpoint(run, method)
        print(f"compare: seed {seed}, {LABELS[method]}: scoring", file=sys.stderr, flush=True)
        # The run's settings that a resumed run may not change, and the data it is scored on.
        checkpoint = {"checkpoint": _file_identity(path), "settings": {
            k: v for k, v in _settings(run).items() if k not in RESUMABLE or k == "data"}}
        scores = _cached(os.path.join(run.out, f"{split}_scores.json"),
                         lambda: score(load_backbone(path)[0], run, eval_images, dense_epochs, split=split),
                         {**checkpoint, "eval_images": eval_images, "dense_epochs": dense_epochs})
        if localise:
            scores = {**scores, **_cached(os.path.join(run.out, f"{split}_localisation.json"),
                                          lambda: measure_localisation(load_backbone(path)[0], run, split=split),
                                          {**checkpoint, "images": LOCALISATION_IMAGES})}
        results[method] = scores
        print(f"compare: seed {seed}, {LABELS[method]}: " + ", ".join(
            f"{name} {100 * scores[key]:.1f}%" for key, name in METRICS)
            + (f", query localisation {scores['query_localisation']:.2f}, CLS on objects "
               f"{scores['cls_foreground']:.2f}" if localise else ""), file=sys.stderr, flush=True)
    return results


def _cell(values, scale=100, digits=1):
    """mean ± spread; the mean alone for one value (no spread to give). No "-0.0"."""
    mean, spread = summary([scale * v for v in values])
    text = f"{mean:.{digits}f}"
    text = text.lstrip("-") if float(text) == 0 else text
    return text if len(values) == 1 else f"{text} ± {spread:.{digits}f}"


def table(results, seeds, reference=None, methods=METHODS):
    """Markdown: one row per method (mean +- std over seeds, in %), then ADCLR - DINO per seed
    when both ran, then `reference` ({"miou", "pixel_accuracy"} of `every_patch_right`) if given."""
    head = "| backbone | " + " | ".join(name for _, name in METRICS) + " |"
    lines = [head, "|---" * (len(METRICS) + 1) + "|"]
    for method in methods:
        lines.append(f"| {LABELS[method]} | " + " | ".join(
            _cell([results[s][method][key] for s in seeds]) for key, _ in METRICS) + " |")
    if {"adclr", "dino"} <= set(methods):
        lines.append("| ADCLR − DINO (paired by seed) | " + " | ".join(
            _cell([results[s]["adclr"][key] - results[s]["dino"][key] for s in seeds]) for key, _ in METRICS) + " |")
    if reference:
        lines.append("| every patch right (val labels, no model) | " + " | ".join(
            f"{100 * reference[key]:.1f}" if key in reference else "–" for key, _ in METRICS) + " |")
    return "\n".join(lines)


def localisation_table(results, seeds, methods=METHODS):
    """Markdown: per method, the query tokens' and the CLS token's attention ratios (mean +-
    std over seeds; 1 = no localisation) and the shares behind them (means, in %)."""
    lines = ["| backbone | query on its crop ÷ crop's area | share, area (%) | CLS on objects ÷ objects' area "
             "| share, area (%) |", "|---|---|---|---|---|"]
    for method in methods:
        mean = {k: summary([results[s][method][k] for s in seeds])[0]
                for k in ("query_share", "query_area", "cls_share", "foreground_area")}
        lines.append(f"| {LABELS[method]} | {_cell([results[s][method]['query_localisation'] for s in seeds], 1, 2)} "
                     f"| {100 * mean['query_share']:.1f}, {100 * mean['query_area']:.1f} "
                     f"| {_cell([results[s][method]['cls_foreground'] for s in seeds], 1, 2)} "
                     f"| {100 * mean['cls_share']:.1f}, {100 * mean['foreground_area']:.1f} |")
    return "\n".join(lines)


def _refuse_a_comparison_with_itself(cfg, seeds, methods=METHODS, split="val"):
    """What a user must fix, the evaluation data included (train and `split`), said in one
    line before any training."""
    if "adclr" in methods and cfg.lambda_query == 0:
        raise SystemExit("error: --lambda-query 0 would compare DINO with itself; give ADCLR's lambda (> 0)")
    if "adclr" in methods and cfg.num_queries == 0:
        raise SystemExit("error: --num-queries 0 leaves ADCLR without query crops; give at least 1")
    twice = [seed for i, seed in enumerate(seeds) if seed in seeds[:i]]
    if twice:
        raise SystemExit(f"error: --seeds: {twice[0]} is given twice; each seed is one pair of runs")
    _check_eval_data(cfg.data, split)


def _check_eval_data(data, split="val"):
    """Exit with one line when --data lacks what the scores need: labelled train and `split`
    images, and image/mask pairs of both splits."""
    open_labelled_splits(data, split)
    try:
        open_segmentation(data, "train"), open_segmentation(data, split)
    except OSError as error:
        raise SystemExit(f"error: --data: compare scores a dense probe too: {error}") from None


def _locked(out, job, *args):
    """job(*args) holding the lock of the folder `out` (made first), or one line if another process holds it."""
    make_folder(out)
    try:
        with folder_lock(out):
            return job(*args)
    except FolderInUse as error:
        raise SystemExit(f"error: --out {error}; wait for it to end, or choose another --out") from None


def _cpu_settings(cfg, command):
    if cfg.device == "cpu" and torch.cuda.is_available():  # the preset's device, chosen for reproducible tables
        print(f"{command}: on the CPU (--device cuda for this machine's GPU)", file=sys.stderr)
    if cfg.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Measured on 2 shared cores: a 64 px vit_test step took 1.65 s of CPU with 2 threads,
        # 0.10 s with one; these models are too small to split, and the threads spin.
        torch.set_num_threads(1)
        print(f"{command}: 1 PyTorch thread (OMP_NUM_THREADS is unset; set it to choose)", file=sys.stderr)


def _settings(cfg):
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "seed")}


def compare(cfg, seeds, eval_images=EVAL_IMAGES, dense_epochs=None, methods=METHODS[1:]):
    """Train and score every (seed, method); write OUT/compare.md and OUT/compare.json.

    cfg: the run settings shared by every method (`cfg.out` is the comparison's folder);
    ADCLR trains with cfg.lambda_query, DINO with 0, DenseCL and ccMIM with their own
    losses (`RUNS`); random init is always scored. Returns {seed: {method: scores}}.
    What a user must fix, the evaluation data included, is said in one line before any training.
    """
    methods = ("random", *dict.fromkeys(m for m in methods if m != "random"))
    _refuse_a_comparison_with_itself(cfg, seeds, methods)
    return _locked(cfg.out, _compare, cfg, seeds, eval_images, dense_epochs, methods)


def _compare(cfg, seeds, eval_images, dense_epochs, methods):
    """`compare` in its claimed folder."""
    _cpu_settings(cfg, "compare")
    _check_runs_in_out(cfg, seeds, methods)
    t0 = time.perf_counter()
    results = {seed: run_seed(cfg, seed, eval_images, dense_epochs, methods=methods) for seed in seeds}
    reference = _cached(os.path.join(cfg.out, "every_patch_right.json"), lambda: every_patch_right(cfg, eval_images),
                        {"data": cfg.data, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
                         "eval_images": eval_images})
    elapsed = time.perf_counter() - t0
    text = table(results, seeds, reference, methods) + "\n\n" + localisation_table(results, seeds, methods)
    over = (f"Mean ± sample standard deviation over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1
            else f"One seed ({seeds[0]}): no spread")
    note = (f"\n\n{over}; scores in %, "
            f"attention ratios over {LOCALISATION_IMAGES} val images. Training settings: "
            f"{json.dumps(_settings(cfg))}\n")
    write_atomically(os.path.join(cfg.out, "compare.md"), lambda f: f.write((text + note).encode()))
    write_json_atomically(os.path.join(cfg.out, "compare.json"), {
        "seeds": list(seeds), "methods": list(methods), "settings": _settings(cfg), "eval_images": eval_images,
        "localisation_images": LOCALISATION_IMAGES, "results": {str(s): r for s, r in results.items()},
        "every_patch_right": reference, "seconds": elapsed})
    print(text)
    print(f"compare: {len(seeds)} seeds in {elapsed / 60:.1f} min; table in {os.path.join(cfg.out, 'compare.md')}",
          file=sys.stderr)
    return results


# --------------------------------------------------------------------------- sweep

def gains(results, seeds):
    """{method: mean over seeds and GAIN_METRICS of its score minus random init's, in points}."""
    return {method: 100 * sum(results[s][method][k] - results[s]["random"][k] for s in seeds for k in GAIN_METRICS)
            / (len(seeds) * len(GAIN_METRICS)) for method in ("dino", "adclr")}


def point_name(point):
    """A grid point's folder name: "key=value,key=value" in the grid's order."""
    return ",".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                    for key, value in point.items())


def sweep_table(rows, seeds):
    """Markdown: per grid point, each method's mean k-NN / linear / mIoU on the held-out
    split, both gains and the worse of them; the chosen point in bold."""
    lines = ["| setting | random init: k-NN / linear / mIoU | DINO | ADCLR | DINO gain | ADCLR gain | worse |",
             "|---|---|---|---|---|---|---|"]
    best = max(range(len(rows)), key=lambda i: min(rows[i]["gains"].values()))
    for i, row in enumerate(rows):
        cells = [" / ".join(f"{100 * summary([row['results'][s][m][k] for s in seeds])[0]:.1f}" for k in GAIN_METRICS)
                 for m in METHODS]
        g = row["gains"]
        name = row["name"].replace(",", ", ")
        lines.append(f"| {'**' + name + '**' if i == best else name} | " + " | ".join(cells)
                     + f" | {_gain(g['dino'])} | {_gain(g['adclr'])} | {_gain(min(g.values()))} |")
    return "\n".join(lines), rows[best]


def _gain(points):
    """A gain in points, signed; no "-0.0" for a loss too small to print."""
    text = f"{points:+.1f}"
    return "+0.0" if text == "-0.0" else text


def grid_points(grid, one_at_a_time=False):
    """The points ({field: value}) of `grid` ({field: [values]}): every combination, or
    with `one_at_a_time` the first value of each field (the base) and then each other
    value alone, the rest at the base. A point names every field either way, so a
    one-at-a-time point and the same combination are one run."""
    if not one_at_a_time:
        return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    base = {field: values[0] for field, values in grid.items()}
    return [base] + [{**base, field: value} for field, values in grid.items() for value in values[1:]]


def sweep(cfg, grid, seeds, eval_images=EVAL_IMAGES, dense_epochs=None, one_at_a_time=False):
    """`compare` without localisation at every point of `grid` (`grid_points`), scored on
    the held-out split; write OUT/sweep.md and OUT/sweep.json and return the chosen point
    ({field: value})."""
    points = grid_points(grid, one_at_a_time)
    runs = [dataclasses.replace(cfg, out=os.path.join(cfg.out, point_name(p)), **p) for p in points]
    for point, run in zip(points, runs):  # every point checked before any is trained
        _at_point(point, _refuse_a_point, run, seeds)
    return _locked(cfg.out, _sweep, cfg, grid, seeds, eval_images, dense_epochs, one_at_a_time, points, runs)


def _refuse_a_point(run, seeds):
    errors = config_errors(run)
    if errors:
        raise SystemExit(f"error: {errors[0]}")
    _refuse_a_comparison_with_itself(run, seeds, split="holdout")


def _at_point(point, check, *args):
    """check(*args), its one-line refusal naming the grid point."""
    try:
        check(*args)
    except SystemExit as error:
        raise SystemExit(str(error).replace("error: ", f"error: the grid point {point_name(point)}: ", 1)) from None


def _sweep(cfg, grid, seeds, eval_images, dense_epochs, one_at_a_time, points, runs):
    """`sweep` in its claimed folder."""
    _cpu_settings(cfg, "sweep")
    for point, run in zip(points, runs):  # the runs --out holds, before anything is scored
        _at_point(point, _check_runs_in_out, run, seeds, METHODS)
    t0, rows = time.perf_counter(), []
    for point, run in zip(points, runs):
        print(f"sweep: {point_name(point)}", file=sys.stderr, flush=True)
        results = {seed: run_seed(run, seed, eval_images, dense_epochs, split="holdout", localise=False)
                   for seed in seeds}
        rows.append({"name": point_name(point), "point": point, "results": results, "gains": gains(results, seeds)})
    elapsed = time.perf_counter() - t0
    text, best = sweep_table(rows, seeds)
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in best["point"].items())
    base = {k: v for k, v in _settings(cfg).items() if k not in grid}
    note = (f"\n\nScores in % on the held-out split (train split as the k-NN bank and probe "
            f"training set), means over seeds {', '.join(map(str, seeds))}; gain: the mean over k-NN, linear "
            f"and mIoU of the method's score minus random init's, in points. Chosen: {flags}. "
            f"Other settings: {json.dumps(base)}\n")
    write_atomically(os.path.join(cfg.out, "sweep.md"), lambda f: f.write((text + note).encode()))
    write_json_atomically(os.path.join(cfg.out, "sweep.json"), {
        "grid": grid, "one_at_a_time": one_at_a_time, "seeds": list(seeds), "settings": base,
        "eval_images": eval_images,
        "points": [{**row, "results": {str(s): r for s, r in row["results"].items()}} for row in rows],
        "chosen": best["point"], "seconds": elapsed})
    print(text)
    print(f"sweep: {len(points)} point{'s' * (len(points) != 1)} x {len(seeds)} seed{'s' * (len(seeds) != 1)} "
          f"in {elapsed / 60:.1f} min; chosen: {flags}; "
          f"table in {os.path.join(cfg.out, 'sweep.md')}", file=sys.stderr)
    return best["point"]
