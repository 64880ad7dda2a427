"""`adclr eval linear`: DINO's linear evaluation on frozen features (its eval_linear.py).

A linear classifier on the CLS tokens of the last 4 blocks (ViT-B: the last CLS and the
mean patch token), trained with SGD on freshly augmented train crops every epoch and
validated on centre crops. `linear_accuracy` is the quick alternative (`--fast`): a
probe on cached centre-crop CLS features, not comparable with DINO's numbers.
"""

from __future__ import annotations

import functools
import sys
import time

import torch
import torch.nn.functional as F
from PIL import Image

from .data import BUILTIN, crop, default_num_workers, normalize, random_resized_box, warn_unreadable
from .features import (CenterCrops, autocast, backbone_for_eval, collate, open_labelled_splits,
                       split_features)

LINEAR_LR = 1e-3  # DINO's eval_linear.py --lr, per 256 images
# The linear protocol pushes the built-in set's 10000 training images through the backbone
# every epoch: DINO's 100 epochs take hours on a CPU, a few give a number in minutes.
BUILTIN_CPU_LINEAR_EPOCHS = 5


class RandomResizedCrops(CenterCrops):
    """DINO's linear-probe training view: RandomResizedCrop (scale 0.08-1, bilinear) and a
    horizontal flip, drawn anew each epoch. Set `epoch` before iterating; the crops are a
    function of (seed, epoch, index), so loader workers need no shared random state."""

    def __init__(self, base, size, limit=0, seed=0):
        super().__init__(base, size, limit)
        self.seed, self.epoch = seed, 0

    def __getitem__(self, i):
        image, label = self.base.load(self.indices[i])
        if image is None:
            return self.indices[i]
        g = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) * 10_000_019 + i)
        x = crop(image, random_resized_box(*image.size, (0.08, 1.0), g), self.size, Image.BILINEAR)
        return (x.flip(-1) if torch.rand((), generator=g) < 0.5 else x), label


def linear_accuracy(train_features, train_labels, test_features, test_labels, epochs=100, seed=0):
    """The quick probe (`--fast`): a linear classifier on standardised cached CLS features of
    centre crops, trained with AdamW. Not DINO's protocol; for comparing runs quickly."""
    torch.manual_seed(seed)
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    x, x_test = (train_features - mean) / std, (test_features - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    classifier = torch.nn.Linear(x.shape[1], num_classes)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-3, weight_decay=1e-4)
    steps_per_epoch = max(1, len(x) // 256)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).chunk(steps_per_epoch):
            loss = F.cross_entropy(classifier(x[idx]), train_labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        return (classifier(x_test).argmax(1) == test_labels).float().mean().item()


def dino_linear_features(arch):
    """DINO's eval_linear rule: (n_last_blocks, avgpool_patchtokens) = (1, True) for ViT-B,
    (4, False) for the small models."""
    return (1, True) if arch == "vit_base" else (4, False)


def probe_features(backbone, images, n_last_blocks, avgpool):
    """The linear protocol's features: the CLS token of each of the last `n_last_blocks`
    blocks (after the final norm), then the mean patch token of the last if `avgpool`."""
    layers = backbone.get_intermediate_layers(images, n_last_blocks)
    features = [tokens[:, 0] for tokens in layers]
    if avgpool:
        features.append(layers[-1][:, 1:].mean(1))
    return torch.cat(features, dim=-1)


class NoReadableImages(ValueError):
    """A split of the evaluation data has no image Pillow can read."""


def linear_protocol(backbone, train_set, val_set, num_classes, epochs=100, batch_size=128, lr=LINEAR_LR,
                    n_last_blocks=4, avgpool=False, val_freq=1, device="cpu", num_workers=0, seed=0):
    """DINO's linear evaluation. Returns {"accuracy": the last validation's, "best_accuracy":
    the best over validations, "train_images", "val_images": how many were readable}.

    A linear layer (weights N(0, 0.01), zero bias) on `probe_features`, trained with SGD
    (momentum 0.9, lr * batch_size / 256, no weight decay, cosine to 0 over the epochs,
    stepped per epoch) on `train_set` (a RandomResizedCrops: new crops every epoch, so
    no feature cache), validated on `val_set` every `val_freq` epochs and after the last.
    Unreadable files are skipped with one warning each; NoReadableImages if a split has
    none that can be read.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    classifier = torch.nn.Linear(backbone.embed_dim * (n_last_blocks + int(avgpool)), num_classes).to(device)
    torch.nn.init.normal_(classifier.weight, std=0.01)
    torch.nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr * batch_size / 256, momentum=0.9, weight_decay=0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                         collate_fn=collate, generator=torch.Generator().manual_seed(seed))
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=collate)
    features = functools.partial(_frozen_features, backbone, n_last_blocks, avgpool, device)
    train_warned, val_warned = set(), set()  # unreadable files already reported, over all epochs
    accuracy, best = None, 0.0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        train_set.epoch = epoch  # read by the workers, which the loader starts anew each epoch
        loss, seen = _train_epoch(classifier, optimizer, loader, features, train_warned)
        schedule.step()
        line = f"linear epoch {epoch + 1}/{epochs} | loss {loss:.4f}"
        if train_warned:
            line += f" | {len(train_warned)} unreadable images skipped"
        if (epoch + 1) % val_freq == 0 or epoch + 1 == epochs:
            accuracy, val_seen = _validate(classifier, val_loader, features, val_warned)
            best = max(best, accuracy)
            line += f" | val {100 * accuracy:.2f}% (best {100 * best:.2f}%)"
        print(f"{line} | {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return {"accuracy": accuracy, "best_accuracy": best, "train_images": seen, "val_images": val_seen}


def _frozen_features(backbone, n_last_blocks, avgpool, device, images):
    with torch.no_grad(), autocast(device):
        return probe_features(backbone, normalize(images.to(device)), n_last_blocks, avgpool).float()


def _train_epoch(classifier, optimizer, loader, features, warned):
    """(mean loss, images trained on) of one epoch over `loader`."""
    losses, seen = [], 0
    for images, y, unreadable in loader:
        warn_unreadable(loader.dataset.base, unreadable, warned)
        if images is None:
            continue
        seen += len(y)
        loss = F.cross_entropy(classifier(features(images)), y.to(classifier.weight.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    if not losses:  # every image unreadable: the same in every epoch
        raise NoReadableImages("no readable images in train")
    return torch.stack(losses).mean().item(), seen


def _validate(classifier, loader, features, warned):
    """(accuracy, images scored) of the classifier on `loader`."""
    correct = total = 0
    with torch.no_grad():
        for images, y, unreadable in loader:
            warn_unreadable(loader.dataset.base, unreadable, warned)
            if images is not None:
                correct += (classifier(features(images)).argmax(1).cpu() == y).sum().item()
                total += len(y)
    if not total:
        raise NoReadableImages("no readable images in val")
    return correct / total, total


def evaluate_linear(checkpoint, data=None, weights="teacher", image_size=None, batch_size=128, epochs=None,
                    device="auto", num_workers=-1, limit=0, fast=False, n_last_blocks=None,
                    avgpool_patchtokens=None, lr=LINEAR_LR, val_freq=1):
    """`adclr eval linear`: returns the JSON record with the accuracy (and what it was measured on).

    epochs None: DINO's 100, or BUILTIN_CPU_LINEAR_EPOCHS for DINO's protocol on the
    built-in data on a CPU (said on stderr). fast: `linear_accuracy` instead of DINO's protocol.
    """
    backbone, cfg, device, size = backbone_for_eval(checkpoint, weights, device, image_size)
    data = data or cfg["data"]
    train_images, val_images = open_labelled_splits(data)
    if epochs is None:
        epochs = 100
        if not fast and data in ("", *BUILTIN) and torch.device(device).type == "cpu":
            epochs = BUILTIN_CPU_LINEAR_EPOCHS
            print(f"built-in data on CPU: {epochs} epochs (DINO's 100 would take hours here; "
                  "--epochs overrides it)", file=sys.stderr)
    workers = default_num_workers() if num_workers < 0 else num_workers
    result = {"protocol": "linear", "checkpoint": checkpoint, "weights": weights, "data": data}
    if fast:
        train_f, train_y, val_f, val_y = split_features(backbone, train_images, val_images, data, size, limit,
                                                        batch_size, device, workers)
        return {**result, "train_images": len(train_y), "val_images": len(val_y),
                "accuracy": linear_accuracy(train_f, train_y, val_f, val_y, epochs), "fast": True, "epochs": epochs}
    default_n, default_avgpool = dino_linear_features(cfg["arch"])
    depth = len(backbone.blocks)
    n = min(default_n, depth) if n_last_blocks is None else n_last_blocks
    if n > depth:
        raise SystemExit(f"error: --n-last-blocks {n} is more than the {depth} blocks of the run's model")
    avgpool = default_avgpool if avgpool_patchtokens is None else avgpool_patchtokens
    train_set, val_set = RandomResizedCrops(train_images, size, limit), CenterCrops(val_images, size, limit)
    num_classes = max(1, len(train_images.classes))  # a folder without class folders is one class
    try:
        measured = linear_protocol(backbone, train_set, val_set, num_classes, epochs, batch_size, lr,
                                   n, avgpool, val_freq, device, workers)
    except NoReadableImages as error:
        raise SystemExit(f"error: --data {data}: {error}") from None
    return {**result, **measured, "epochs": epochs, "n_last_blocks": n, "avgpool_patchtokens": avgpool,
            "lr": lr * batch_size / 256, "batch_size": batch_size}
