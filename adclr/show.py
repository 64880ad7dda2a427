"""Pictures (`adclr show attention | dense | curves`): what a model attends to, what the
dense probe predicts, and how a run went.

matplotlib is an optional extra (`pip install 'adclr[viz]'`), imported by these
commands only. The CLS row's attention weights come from the fused op itself (its
prefix-row probabilities), the query rows' are recomputed from the last block's q and k
(`adclr.features.last_block_attention`).
"""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap

import numpy as np
import torch
from PIL import Image

from .checkpoint import make_folder, write_atomically
from .data import (BUILTIN, ImageFolder, default_num_workers, normalize, open_segmentation, to_tensor,
                   warn_unreadable)
from .eval_dense import (DEFAULT_EPOCHS, DEFAULT_LR, IGNORE, SegmentationCrops, default_dense_data, fit_probe,
                         open_splits, patch_features)
from .features import backbone_or_exit, last_block_attention, query_boxes, query_crops, run_data

CELL = 160  # pixels per picture in a grid


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only), or one line saying how to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: adclr show needs matplotlib: pip install 'adclr[viz]'") from None
    return plt


def _images(data, count, flag="--data"):
    """[PIL image] of the first `count` readable images: a built-in set's val split, or a
    folder of images (any layout; the first in sorted order)."""
    if data in (None, "", *BUILTIN):
        base = open_segmentation(data, "val")
    else:
        try:
            base = ImageFolder(data)
        except OSError as error:
            raise SystemExit(f"error: {flag}: {error}") from None
    images, unreadable, tried = [], [], min(len(base), 4 * count)
    for i in range(tried):
        image = base.load(i)[0]
        if image is None:
            unreadable.append(i)
            continue
        images.append(image)
        if len(images) == count:
            break
    warn_unreadable(base, unreadable, set())  # one warning each, as eval gives
    if not images:
        what = "no readable images" if tried == len(base) else f"none of its first {tried} image files can be read"
        raise SystemExit(f"error: {flag} {data}: {what}")
    if len(images) < count:
        print(f"note: {len(images)} readable image{'s' * (len(images) != 1)} of the first {tried} in "
              f"{flag} {data}: {len(images)} picture{'s' * (len(images) != 1)}, not {count}", file=sys.stderr)
    return images


def _overlay(ax, picture, heat, size, title):
    """The picture with `heat` (h, w) stretched over it as a translucent heat map.

    Each map is scaled to its own maximum (as DINO's pictures are), so the title gives that
    maximum: a flat map (1 / patches everywhere) would otherwise look as sharp as a peaked one.
    """
    title = f"{title}, max {float(heat.max()):.2f}"
    ax.imshow(picture)
    ax.imshow(heat / max(float(heat.max()), 1e-12), cmap="inferno", alpha=0.6, extent=(0, size, size, 0),
              interpolation="bilinear", vmin=0, vmax=1)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def _box(ax, box, colour="cyan"):
    import matplotlib.patches as patches

    left, top, right, bottom = box
    ax.add_patch(patches.Rectangle((left, top), right - left, bottom - top, fill=False, edgecolor=colour, lw=1.5))


def _figure(plt, rows, cols, title):
    """A rows x cols grid of CELL-pixel pictures under `title`, wrapped to the figure's width."""
    width, height = cols * CELL / 100, rows * CELL / 100  # inches
    lines = textwrap.wrap(title, max(20, int(width * 100 / 7.5)))  # 9 pt characters: up to 7.5 px wide
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), dpi=100, squeeze=False)
    fig.suptitle("\n".join(lines), fontsize=9)
    # The title's band is sized in inches, so that it clears the first row's titles at any row count.
    band = 0.28 + 0.17 * len(lines)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - band / height, bottom=0.01, wspace=0.05, hspace=0.2)
    return fig, axes


def show_attention(checkpoint, data=None, images=4, num_queries=None, weights="teacher", out=None, seed=0):
    """Write OUT/attention_<i>.png per image; returns the paths.

    Each picture: one row for CLS -> patches (DINO's visualisation) and one per query
    token -> patches, its query crop's box drawn on the image; columns: the image, the
    mean over heads, then each head. The whole image is resized to the run's image size,
    and the query crops are cut from it as in training (the run's --query-scale).
    """
    plt = pyplot()
    backbone, cfg = backbone_or_exit(checkpoint, weights)
    size, p = cfg["image_size"], cfg["patch_size"]
    num_queries = cfg["num_queries"] if num_queries is None else num_queries
    out = out or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "pictures")
    make_folder(out)
    grid, paths = size // p, []
    generator = torch.Generator().manual_seed(seed)
    data, flag = run_data(data, cfg)
    chosen = _images(data, images, flag)
    _remove_earlier_attention_pictures(out)
    for n, image in enumerate(chosen):
        image = image.resize((size, size), Image.BICUBIC)
        boxes = query_boxes(image, num_queries, cfg["query_scale"], generator)
        probs, _ = last_block_attention(backbone, normalize(to_tensor(image))[None], query_crops(image, boxes, p))
        probs = probs[0]  # (heads, 1 + Q, L)
        heads = probs.shape[0]
        rows = [("CLS", 0, None)] + [(f"query {q + 1}", 1 + q, boxes[q]) for q in range(num_queries)]
        fig, axes = _figure(plt, len(rows), 2 + heads,
                            f"last block's attention to the patches, {checkpoint} ({weights})")
        for r, (name, row, box) in enumerate(rows):
            maps = probs[:, row, 1:1 + grid * grid].reshape(heads, grid, grid).numpy()
            axes[r, 0].imshow(image)
            axes[r, 0].set_title(name, fontsize=8)
            axes[r, 0].axis("off")
            _overlay(axes[r, 1], image, maps.mean(0), size, f"{name}: heads' mean")
            for h in range(heads):
                _overlay(axes[r, 2 + h], image, maps[h], size, f"head {h + 1}")
            if box is not None:
                for ax in axes[r, :2]:
                    _box(ax, box)
        paths.append(os.path.join(out, f"attention_{n}.png"))
        save_figure(plt, fig, paths[-1])
    return paths


def _remove_earlier_attention_pictures(out):
    """A folder holds one call's pictures: attention_<i>.png of an earlier call would
    otherwise sit beside these (or, if this call stops part way, among them) as if they
    were of this checkpoint. Removed before the first new one is written."""
    earlier = [name for name in os.listdir(out) if re.fullmatch(r"attention_\d+\.png", name)]
    for name in earlier:
        os.remove(os.path.join(out, name))
    if earlier:
        print(f"removed the {len(earlier)} attention pictures of an earlier call from {out}", file=sys.stderr)


def show_dense(checkpoint, data=None, images=4, weights="teacher", out=None, epochs=None, lr=None,
               n_last_blocks=1, limit=None, num_workers=-1):
    """Fit the dense probe as `adclr eval dense` does and write OUT/dense.png: per val
    image, the image, the ground-truth mask and the probe's prediction. Returns the path."""
    plt = pyplot()
    backbone, cfg = backbone_or_exit(checkpoint, weights)
    size = cfg["image_size"]
    out = out or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "pictures")
    make_folder(out)  # before the probe's minutes of work
    data, train_images, val_images, limit = open_splits(data or default_dense_data(cfg), limit, "cpu")
    workers = default_num_workers() if num_workers < 0 else num_workers
    try:
        probe, _ = fit_probe(backbone, SegmentationCrops(train_images, size, limit), None, n_last_blocks,
                             epochs or DEFAULT_EPOCHS, lr or DEFAULT_LR, num_workers=workers)
    except ValueError as error:
        raise SystemExit(f"error: --data {data}: {error}") from None
    val = SegmentationCrops(val_images, size, full_masks=True)
    pairs = [item for item in (val[i] for i in range(min(len(val), 4 * images))) if not isinstance(item, int)]
    pairs = pairs[:images]
    if not pairs:
        raise SystemExit(f"error: --data {data}: no usable image/mask pairs in val")
    names = getattr(val_images, "segmentation_classes", None)
    classes = probe.linear.out_features
    colours = plt.get_cmap("tab20")(np.arange(max(classes, 1)) % 20)[:, :3]
    colours[0] = (0.15, 0.15, 0.15) if names else colours[0]  # background dark on the built-in sets

    fig, axes = _figure(plt, len(pairs), 3, f"dense linear probe on patch tokens, {checkpoint} ({weights})")
    for r, (x, mask) in enumerate(pairs):
        with torch.no_grad():
            logits = probe(patch_features(backbone, normalize(x[None]), n_last_blocks))[0]
            pred = torch.nn.functional.interpolate(logits[None], size=mask.shape, mode="bilinear",
                                                   align_corners=False)[0].argmax(0)
        shown = np.asarray(Image.fromarray(x.permute(1, 2, 0).numpy()).resize(mask.shape[::-1], Image.BICUBIC))
        for ax, picture, title in zip(axes[r], (shown, _paint(mask.numpy(), colours), _paint(pred.numpy(), colours)),
                                      ("image", "ground truth", "probe")):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    if names:
        import matplotlib.patches as patches
        fig.legend(handles=[patches.Patch(color=colours[c], label=names[c]) for c in range(min(classes, len(names)))],
                   loc="lower center", ncol=6, fontsize=6, frameon=False)
        fig.subplots_adjust(bottom=0.08)
    path = os.path.join(out, "dense.png")
    save_figure(plt, fig, path)
    return path


def _paint(mask, colours):
    """An (H, W) label mask as RGB: colours[label], white where IGNORE; black for labels
    beyond the probe's classes."""
    rgb = np.zeros((*mask.shape, 3))
    known = (mask != IGNORE) & (mask < len(colours))
    rgb[known] = colours[mask[known]]
    rgb[mask == IGNORE] = 1.0  # white: ignored
    return rgb


def read_metrics(path):
    """The records of a metrics.jsonl, skipping lines that are not JSON objects with a step
    number (a cut last line, a hand-edited one)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, (int, float)) and not isinstance(step, bool):
                records.append(record)
    return records


# Panels of the training-curve picture: (title, keys); a panel shows what the run logged.
PANELS = [("loss", ("loss", "loss_global", "loss_query")), ("learning rate", ("lr",)),
          ("teacher temperature", ("teacher_temp",)), ("teacher momentum", ("momentum",))]


def show_curves(run):
    """Write metrics.png beside a run's metrics.jsonl (`run` is the file or its folder); returns its path."""
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} does not exist; pass a run folder (adclr train --out) or its metrics.jsonl")
    records = read_metrics(path)
    if not records:
        raise SystemExit(f"error: {path} holds no metrics records")
    plt = pyplot()
    keys = {k for r in records for k, v in r.items() if isinstance(v, (int, float))}
    panels = [(title, [k for k in wanted if k in keys]) for title, wanted in PANELS]
    panels.append(("k-NN accuracy", sorted(k for k in keys if k.startswith("knn"))))
    panels = [(title, ks) for title, ks in panels if ks]
    if not panels:
        raise SystemExit(f"error: {path} holds no numbers to plot (loss, lr, teacher_temp, momentum, knn)")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), dpi=100, squeeze=False)
    for ax, (title, ks) in zip(axes[0], panels):
        for k in ks:
            points = [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))]
            ax.plot(*zip(*points), label=k, marker="." if len(points) < 30 else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(ks) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(path, fontsize=8)  # as given: no local folders in a shared picture
    fig.tight_layout()
    out = os.path.join(os.path.dirname(path), "metrics.png")
    save_figure(plt, fig, out)
    return out


def save_figure(plt, fig, path):
    """Write `fig` as a PNG at `path` (atomically, through a link), then close it."""
    try:
        write_atomically(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
