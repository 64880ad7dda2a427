"""`adclr eval dense`: a linear segmentation probe on frozen patch tokens.

DINOv2's linear segmentation protocol, sized for a CPU: every image is resized to S x S
and run once through the frozen backbone; its patch tokens (after the final LayerNorm,
optionally those of the last n blocks concatenated) are standardised with the train
set's statistics (a frozen BatchNorm) and mapped to class logits by one linear layer, a
1x1 convolution on the patch grid. The logits are upsampled bilinearly to pixels and
trained with per-pixel cross-entropy against the train masks (resized to S x S, nearest)
on cached features; on val they are upsampled to each mask's own size, and the scores are
DINOv2's: mIoU (mean over the classes present in the ground truth or the prediction) and
pixel accuracy, both over the pixels not marked IGNORE (255). Beside them, the same
scores of the val labels themselves at the patch grid (`patch_majority`): what a probe
that gets every patch right would score, so how much room the data leaves.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data import (BUILTIN, SegmentationFolder, default_num_workers, normalize, open_segmentation, to_tensor,
                   warn_unreadable)
from .features import autocast, backbone_for_eval, fixed_subset

IGNORE = SegmentationFolder.IGNORE
NUM_LABELS = 255  # mask values 0..254 are classes; 255 is IGNORE
DEFAULT_EPOCHS, DEFAULT_LR = 20, 3e-2


class SegmentationCrops(torch.utils.data.Dataset):
    """(uint8 (3, S, S) image, mask) or the index in `base` of an unusable pair.

    The mask is resized to S x S (nearest) for training, or kept at its own size
    (`full_masks`) for scoring. `limit` takes a fixed random subset, as CenterCrops does.
    """

    def __init__(self, base, size, limit=0, full_masks=False):
        self.base, self.size, self.full_masks = base, size, full_masks
        self.indices = fixed_subset(len(base), limit)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image, mask = self.base.load_segmentation(self.indices[i])
        if image is None:
            return self.indices[i]
        x = to_tensor(image.resize((self.size, self.size), Image.BICUBIC))
        if not self.full_masks:
            mask = np.asarray(Image.fromarray(mask).resize((self.size, self.size), Image.NEAREST))
        return x, torch.from_numpy(np.array(mask, dtype=np.uint8))


def collate(items):
    """(images (B, 3, S, S) or None, list of masks, indices of the unusable pairs)."""
    kept = [item for item in items if not isinstance(item, int)]
    images = torch.stack([x for x, _ in kept]) if kept else None
    return images, [m for _, m in kept], [i for i in items if isinstance(i, int)]


def patch_features(backbone, images, n_last_blocks=1):
    """(B, h, w, n * D) patch tokens of normalised images: the last n blocks', concatenated."""
    layers = backbone.get_intermediate_layers(images, n_last_blocks)
    h, w = images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size
    return torch.cat([tokens[:, 1:] for tokens in layers], -1).unflatten(1, (h, w))


def _batches(backbone, dataset, batch_size, device, num_workers, n_last_blocks, what):
    """Yield (features (B, h, w, C) float32 on the CPU, masks) over `dataset`, with progress."""
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate)
    warned, done, t0, last = set(), 0, time.perf_counter(), 0.0
    for images, masks, unusable in loader:
        warn_unreadable(dataset.base, unusable, warned)
        done += len(masks) + len(unusable)
        if images is not None:
            with torch.no_grad(), autocast(device):
                x = normalize(images.to(device))
                yield patch_features(backbone, x, n_last_blocks).float().cpu(), masks
        now = time.perf_counter() - t0
        if now - last > 10 or done == len(dataset):  # a line every 10 s at most
            print(f"dense: {what} {done}/{len(dataset)} images | {now:.0f}s", file=sys.stderr, flush=True)
            last = now
    if warned:
        print(f"warning: skipped {len(warned)} unusable image/mask pairs in {what}", file=sys.stderr)


def confusion_matrix(logits, masks):
    """(NUM_LABELS, NUM_LABELS) int64 counts of (true, predicted) over the non-IGNORE pixels.

    logits: (B, K, h, w), upsampled here to the masks' (H, W); masks: (B, H, W).
    """
    up = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    pred, true = up.argmax(1).flatten(), masks.flatten().long()
    keep = true != IGNORE
    counts = torch.bincount(true[keep] * NUM_LABELS + pred[keep], minlength=NUM_LABELS * NUM_LABELS)
    return counts.view(NUM_LABELS, NUM_LABELS)


def patch_majority(mask, grid):
    """(NUM_LABELS, NUM_LABELS) counts as `confusion_matrix` gives, of labels without a model:
    each cell of an (h, w) patch grid laid over the (H, W) mask predicts the most frequent
    label of its pixels (IGNORE not counted).

    What a probe that gets every patch right scores at this patch size: the headroom a
    dense score has on the data. Not a strict ceiling (the bilinear upsampling of the
    logits can split a cell between classes, and so beat it a little).
    """
    (H, W), (h, w) = mask.shape, grid
    cell = ((torch.arange(H) * h // H)[:, None] * w + (torch.arange(W) * w // W)[None, :]).flatten()
    true = mask.flatten().long()
    keep = true != IGNORE
    cell, true = cell[keep], true[keep]
    counts = torch.bincount(cell * NUM_LABELS + true, minlength=h * w * NUM_LABELS).view(h * w, NUM_LABELS)
    pred = counts.argmax(1)[cell]
    return torch.bincount(true * NUM_LABELS + pred, minlength=NUM_LABELS * NUM_LABELS).view(NUM_LABELS, NUM_LABELS)


def scores(confusion):
    """mIoU, pixel accuracy and {class: IoU} from a confusion matrix (true x predicted)."""
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0  # in the ground truth or the prediction
    iou = intersection[present] / union[present]
    return {"miou": iou.mean().item() if present.any() else 0.0,
            "pixel_accuracy": (intersection.sum() / confusion.sum().clamp(min=1)).item(),
            "iou": {int(c): v for c, v in zip(present.nonzero().flatten().tolist(), iou.tolist())}}


class LinearProbe(torch.nn.Module):
    """Standardise each channel with fixed train statistics, then one linear layer to K classes."""

    def __init__(self, mean, std, num_classes):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = torch.nn.Linear(len(mean), num_classes)

    def forward(self, features):
        """(B, h, w, C) -> (B, K, h, w) logits."""
        return self.linear((features - self.mean) / self.std).permute(0, 3, 1, 2)


def train_probe(features, masks, num_classes, epochs=DEFAULT_EPOCHS, lr=DEFAULT_LR, batch_size=128, seed=0):
    """A LinearProbe fitted on cached (N, h, w, C) features to (N, S, S) masks (IGNORE skipped).

    AdamW (weight decay 1e-4), cosine schedule over every step, logits upsampled to S x S.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    flat = features.flatten(0, 2)
    probe = LinearProbe(flat.mean(0), flat.std(0) + 1e-6, num_classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(features) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    size = masks.shape[-2:]
    for epoch in range(epochs):
        t0, losses = time.perf_counter(), []
        for idx in torch.randperm(len(features), generator=generator).chunk(steps_per_epoch):
            logits = F.interpolate(probe(features[idx]), size=size, mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, masks[idx].long(), ignore_index=IGNORE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.detach())
        print(f"dense: probe epoch {epoch + 1}/{epochs} | loss {torch.stack(losses).mean().item():.4f} | "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return probe.eval()


def fit_probe(backbone, train_set, num_classes=None, n_last_blocks=1, epochs=DEFAULT_EPOCHS, lr=DEFAULT_LR,
              batch_size=128, device="cpu", num_workers=0, seed=0):
    """(LinearProbe, train images used) fitted on `train_set` (SegmentationCrops).

    num_classes None: 1 + the largest label in the train masks. ValueError when no pair
    is usable or the masks disagree with num_classes.
    """
    features, masks = [], []
    for f, m in _batches(backbone, train_set, batch_size, device, num_workers, n_last_blocks, "train"):
        features.append(f)
        masks += m
    if not masks:
        raise ValueError("no usable image/mask pairs in train")
    features, masks = torch.cat(features), torch.stack(masks)
    labelled = masks[masks != IGNORE]
    if num_classes is None:
        if not len(labelled):
            raise ValueError("every pixel of the train masks is IGNORE (255)")
        num_classes = int(labelled.max()) + 1
    elif len(labelled) and int(labelled.max()) >= num_classes:
        raise ValueError(f"the train masks hold label {int(labelled.max())}, not below num_classes {num_classes}")
    return train_probe(features, masks, num_classes, epochs, lr, batch_size, seed), len(masks)


def score_probe(backbone, probe, val_set, n_last_blocks=1, batch_size=128, device="cpu", num_workers=0):
    """`scores` of the probe on `val_set` (SegmentationCrops with full_masks), plus "val_images" and
    "patch_majority": {"miou", "pixel_accuracy"} of `patch_majority` on the same masks."""
    confusion, seen = torch.zeros(NUM_LABELS, NUM_LABELS, dtype=torch.long), 0
    reference = torch.zeros_like(confusion)
    with torch.no_grad():
        for f, m in _batches(backbone, val_set, batch_size, device, num_workers, n_last_blocks, "val"):
            logits = probe(f)
            for mask in m:
                reference += patch_majority(mask, logits.shape[-2:])
            if all(mask.shape == m[0].shape for mask in m):  # one call for the batch: far fewer small ops
                confusion += confusion_matrix(logits, torch.stack(m))
            else:
                for one, mask in zip(logits, m):
                    confusion += confusion_matrix(one[None], mask[None])
            seen += len(m)
    if not seen:
        raise ValueError("no usable image/mask pairs in val")
    classes = probe.linear.out_features
    beyond = (confusion[classes:].sum(1).nonzero().flatten() + classes).tolist()
    if beyond:
        many = len(beyond) != 1
        print(f"warning: the val masks hold label{'s' * many} {', '.join(map(str, beyond))}, past the probe's "
              f"{classes} classes (1 + the largest train label, or --num-classes): it cannot predict "
              f"{'them' if many else 'it'}, and {'their' if many else 'its'} IoU of 0 counts in the mIoU",
              file=sys.stderr)
    majority = scores(reference)
    return {**scores(confusion), "val_images": seen,
            "patch_majority": {"miou": majority["miou"], "pixel_accuracy": majority["pixel_accuracy"]}}


def dense_probe(backbone, train_set, val_set, num_classes=None, n_last_blocks=1, epochs=DEFAULT_EPOCHS,
                lr=DEFAULT_LR, batch_size=128, device="cpu", num_workers=0, seed=0):
    """Fit the probe on `train_set`, score it on `val_set`: the `scores` dict plus
    "num_classes", "train_images" and "val_images". ValueError when a split has no usable pair."""
    probe, train_images = fit_probe(backbone, train_set, num_classes, n_last_blocks, epochs, lr, batch_size,
                                    device, num_workers, seed)
    measured = score_probe(backbone, probe, val_set, n_last_blocks, batch_size, device, num_workers)
    return {**measured, "num_classes": probe.linear.out_features, "train_images": train_images}


# The built-in sets have 10000 train and 2000 val images; on a CPU this many per split give
# a stable score in a minute or two (the full set: several minutes per model).
BUILTIN_CPU_LIMIT = 2000


# Scenes whose class is the shape alone (no colour gives it away): the dense default for
# a run trained on a folder, which need not have masks.
DENSE_DEFAULT_DATA = "builtin:grey-ground-scenes"


def default_dense_data(cfg):
    """The run's own data where it is a built-in set (each renders its masks), else
    DENSE_DEFAULT_DATA."""
    data = cfg.get("data") or "builtin"
    return data if data in BUILTIN else DENSE_DEFAULT_DATA


def open_splits(data, limit, device):
    """(data, train split, val split, images per split) of --data; on CPU the built-in
    sets are cut to BUILTIN_CPU_LIMIT unless --limit is given (0: all)."""
    try:
        train_images, val_images = open_segmentation(data, "train"), open_segmentation(data, "val")
    except OSError as error:
        raise SystemExit(f"error: --data: {error}") from None
    if limit is None:
        limit = BUILTIN_CPU_LIMIT if data in BUILTIN and torch.device(device).type == "cpu" else 0
        if limit:
            print(f"built-in data on CPU: {limit} images per split (--limit 0 for all)", file=sys.stderr)
    return data, train_images, val_images, limit


def evaluate_dense(checkpoint, data=None, weights="teacher", image_size=None, batch_size=128,
                   n_last_blocks=None, epochs=None, lr=None, num_classes=None, device="auto",
                   num_workers=-1, limit=None):
    """`adclr eval dense`: the probe on a checkpoint's backbone; returns the JSON record.

    data: a folder of image/mask pairs (`SegmentationFolder`), or a built-in set
    (default: `default_dense_data` of the run). None for a setting picks its default (printed).
    """
    backbone, cfg, device, size = backbone_for_eval(checkpoint, weights, device, image_size)
    n_last_blocks = n_last_blocks or 1
    if n_last_blocks > len(backbone.blocks):
        raise SystemExit(f"error: --n-last-blocks {n_last_blocks} is more than the {len(backbone.blocks)} "
                         "blocks of the run's model")
    data, train_images, val_images, limit = open_splits(data or default_dense_data(cfg), limit, device)
    epochs, lr = epochs or DEFAULT_EPOCHS, lr or DEFAULT_LR
    workers = default_num_workers() if num_workers < 0 else num_workers
    train_set = SegmentationCrops(train_images, size, limit)
    val_set = SegmentationCrops(val_images, size, limit, full_masks=True)
    try:
        measured = dense_probe(backbone, train_set, val_set, num_classes, n_last_blocks, epochs, lr,
                               batch_size, device, workers)
    except ValueError as error:
        raise SystemExit(f"error: --data {data}: {error}") from None
    names = getattr(train_images, "segmentation_classes", None)
    if names:
        measured["iou"] = {names[c] if c < len(names) else str(c): v for c, v in measured["iou"].items()}
    print(f"dense: mIoU {100 * measured['miou']:.2f}% | pixel accuracy {100 * measured['pixel_accuracy']:.2f}% "
          f"| {measured['num_classes']} classes | {measured['train_images']} train, "
          f"{measured['val_images']} val images | every patch right: mIoU "
          f"{100 * measured['patch_majority']['miou']:.2f}%", file=sys.stderr)
    return {"protocol": "dense", "checkpoint": checkpoint, "weights": weights, "data": data, "image_size": size,
            "n_last_blocks": n_last_blocks, "epochs": epochs, "lr": lr, **measured}
