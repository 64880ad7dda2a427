"""`adclr eval linear`: DINO's linear evaluation on frozen features (its eval_linear.py).

A linear classifier on the CLS tokens of the last 4 blocks (ViT-B: the last CLS and the
mean patch token), trained with SGD on freshly augmented train crops every epoch and
validated on centre crops. `linear_accuracy` is the quick alternative (`--fast`, and
`adclr compare`'s): the same features of centre crops and their mirror images, computed
once, and a logistic regression solved to convergence on them; not DINO's numbers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import WriteError, write_atomically
from .data import BUILTIN, crop, default_num_workers, normalize, random_resized_box, warn_unreadable
from .features import (CenterCrops, autocast, backbone_for_eval, collate, extract_features, open_labelled_splits,
                       run_data)

LINEAR_LR = 1e-3  # DINO's eval_linear.py --lr, per 256 images
# The linear protocol pushes the built-in set's 10000 training images through the backbone
# every epoch: DINO's 100 epochs take hours on a CPU, a few give a number in minutes.
BUILTIN_CPU_LINEAR_EPOCHS = 5
# The cached-feature probe (`linear_accuracy`): L-BFGS iterations (fewer stop short of the
# optimum on the built-in scenes' features: bench/NOTES.md), and the L2 weights it chooses from.
PROBE_EPOCHS = 1000
PROBE_WEIGHT_DECAYS = (0.0, 1e-5, 1e-4, 1e-3)


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


def linear_accuracy(train_features, train_labels, test_features, test_labels, epochs=PROBE_EPOCHS, seed=0,
                    train_views=(), weight_decays=PROBE_WEIGHT_DECAYS, log=None):
    """The cached-feature probe (`--fast`, and `adclr compare`'s linear score): the test
    accuracy of a multinomial logistic regression on standardised features, solved to
    convergence.

    Why not a few hundred small optimiser steps: on 1000 images of 64-128 dimensions those
    stop far from the optimum (the loss barely leaves ln(classes)), and what they score is
    how far the weights moved, not what the features hold. DINO's SGD runs for 100 epochs
    of 1.28M images; here the whole train set is one L-BFGS batch, so an iteration is a
    pass over it and `epochs` bounds the iterations. The L2 weight is chosen from
    `weight_decays` by accuracy on a held-out fifth of the train images (split with
    `seed`; ties go to the larger weight), then the probe is refitted on all of them: the
    same choice for every backbone, made without the test split.

    train_views: more (N, D) features of the same train images in the same order (their
    mirror images, say), trained on beside them; an image's views are held out together.
    log: called with a line before each fit and with the L2 weight chosen (None: quiet).
    """
    log = log or (lambda line: None)
    views = (train_features, *train_views)
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    x = torch.stack([(f - mean) / std for f in views]).double()  # (views, N, D)
    x_test = ((test_features - mean) / std).double()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(seed))
    held, kept = order[:len(order) // 5], order[len(order) // 5:]

    def fit(images, weight_decay):
        return _logistic_regression(x[:, images].flatten(0, 1), train_labels[images].repeat(len(views)),
                                    num_classes, weight_decay, epochs)

    chosen = weight_decays[-1]
    if len(held) and len(weight_decays) > 1:
        held_out = []
        for i, wd in enumerate(weight_decays):
            log(f"fitting L2 weight {wd:g} on {len(kept)} train images ({i + 1}/{len(weight_decays)})")
            held_out.append(_accuracy(fit(kept, wd), x[0, held], train_labels[held]))
        chosen = weight_decays[max(range(len(weight_decays)), key=lambda i: (held_out[i], i))]
        log(f"L2 weight {chosen:g} chosen (held-out accuracy "
            + ", ".join(f"{wd:g}: {100 * a:.1f}%" for wd, a in zip(weight_decays, held_out)) + ")")
    elif len(weight_decays) > 1:
        log(f"{len(order)} train images: too few to hold any out, so L2 weight {chosen:g}, the largest, "
            "without a choice")
    log(f"fitting L2 weight {chosen:g} on all {len(order)} train images")
    return _accuracy(fit(order, chosen), x_test, test_labels)


def _logistic_regression(x, y, num_classes, weight_decay, max_iter):
    """A linear layer fitted by L-BFGS to cross-entropy + weight_decay * |W|^2 on all of (x, y) at once."""
    classifier = torch.nn.Linear(x.shape[1], num_classes, dtype=x.dtype)
    torch.nn.init.zeros_(classifier.weight)
    torch.nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.LBFGS(classifier.parameters(), lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = F.cross_entropy(classifier(x), y) + weight_decay * classifier.weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    return classifier


@torch.no_grad()
def _accuracy(classifier, x, y):
    return (classifier(x).argmax(1) == y).float().mean().item()


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


def cached_probe_features(backbone, train_set, val_set, n_last_blocks, avgpool, batch_size=128, device="cpu",
                          num_workers=0, what=None):
    """`probe_features` of two `CenterCrops` sets, for `linear_accuracy`: (train, the train
    images mirrored, train labels, val, val labels). The mirror image is the one view of
    DINO's training augmentation that keeps a small image's object whole."""
    def encode(images):
        return probe_features(backbone, images, n_last_blocks, avgpool)

    loading, warned = (batch_size, device, num_workers), set()
    train_f, train_y = extract_features(backbone, train_set, *loading, encode=encode, warned=warned,
                                        what=what and f"{what}: train features")
    # The same images again: their unreadable files are reported once.
    mirror_f, _ = extract_features(backbone, train_set, *loading, encode=lambda images: encode(images.flip(-1)),
                                   warned=warned, what=what and f"{what}: mirrored train features")
    val_f, val_y = extract_features(backbone, val_set, *loading, encode=encode,
                                    what=what and f"{what}: val features")
    if len(train_set) > len(train_y):
        n = len(train_set) - len(train_y)
        print(f"warning: skipped {n} unreadable image{'s' * (n != 1)}", file=sys.stderr)
    return train_f, mirror_f, train_y, val_f, val_y


class NoReadableImages(ValueError):
    """A split of the evaluation data has no image Pillow can read."""


def linear_protocol(backbone, train_set, val_set, num_classes, epochs=100, batch_size=128, lr=LINEAR_LR,
                    n_last_blocks=4, avgpool=False, val_freq=1, device="cpu", num_workers=0, seed=0,
                    progress=None):
    """DINO's linear evaluation. Returns {"accuracy": the last validation's, "best_accuracy":
    the best over validations, "train_images", "val_images": how many were readable}.

    A linear layer (weights N(0, 0.01), zero bias) on `probe_features`, trained with SGD
    (momentum 0.9, lr * batch_size / 256, no weight decay, cosine to 0 over the epochs,
    stepped per epoch) on `train_set` (a RandomResizedCrops: new crops every epoch, so
    no feature cache), validated on `val_set` every `val_freq` epochs and after the last.
    Unreadable files are skipped with one warning each; NoReadableImages if a split has
    none that can be read.

    `progress`: a file that keeps the evaluation after each epoch (the classifier, SGD,
    the schedule, the shuffle's generator, the scores so far), from which a rerun goes on
    where it stopped, as the uninterrupted run would have (the crops are a function of the
    epoch); removed once the last epoch is scored. None: nothing kept.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    classifier = torch.nn.Linear(backbone.embed_dim * (n_last_blocks + int(avgpool)), num_classes).to(device)
    torch.nn.init.normal_(classifier.weight, std=0.01)
    torch.nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr * batch_size / 256, momentum=0.9, weight_decay=0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    shuffle = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                         collate_fn=collate, generator=shuffle)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=collate)
    features = functools.partial(_frozen_features, backbone, n_last_blocks, avgpool, device)
    parts = {"classifier": classifier, "optimizer": optimizer, "schedule": schedule}
    # scores: the last validation's accuracy, the best, the images trained on and scored;
    # warned: the unreadable files already reported, over all epochs
    start, scores, warned = _resume_linear(progress, parts, shuffle, epochs)
    try:
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            train_set.epoch = epoch  # read by the workers, which the loader starts anew each epoch
            loss, scores["train_images"] = _train_epoch(classifier, optimizer, loader, features, warned["train"])
            schedule.step()
            line = f"linear epoch {epoch + 1}/{epochs} | loss {loss:.4f}"
            if warned["train"]:
                line += f" | {len(warned['train'])} unreadable image{'s' * (len(warned['train']) != 1)} skipped"
            if (epoch + 1) % val_freq == 0 or epoch + 1 == epochs:
                scores["accuracy"], scores["val_images"] = _validate(classifier, val_loader, features, warned["val"])
                scores["best_accuracy"] = max(scores["best_accuracy"], scores["accuracy"])
                line += f" | val {100 * scores['accuracy']:.2f}% (best {100 * scores['best_accuracy']:.2f}%)"
            print(f"{line} | {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
            if progress and epoch + 1 < epochs:
                progress = _keep_linear(progress, epoch + 1, parts, shuffle, scores, warned)
    except KeyboardInterrupt:
        if progress and os.path.exists(progress):
            print(f"\ninterrupted: the epochs done are kept in {progress}; rerun the same command to resume",
                  file=sys.stderr)
        raise
    if progress and os.path.exists(progress):
        os.remove(progress)
    return scores


def _resume_linear(progress, parts, shuffle, epochs):
    """(The first epoch to run, the scores, the unreadable files reported) of a fresh
    evaluation, or of the one kept in `progress`, whose state is loaded into `parts` and
    `shuffle`. A file that cannot be read is said and set aside: the evaluation starts over."""
    scores = {"accuracy": None, "best_accuracy": 0.0, "train_images": 0, "val_images": 0}
    fresh = 0, scores, {"train": set(), "val": set()}
    if not progress or not os.path.exists(progress):
        return fresh
    try:
        state = torch.load(progress, map_location="cpu", weights_only=True)
        for name, part in parts.items():
            part.load_state_dict(state[name])
        shuffle.set_state(state["shuffle"])
        start, scores = state["epoch"], state["scores"]
    except Exception as error:  # noqa: BLE001: a file from elsewhere, a version with other parts
        print(f"warning: cannot resume from {progress} ({type(error).__name__}: {error}); starting over",
              file=sys.stderr)
        return fresh
    print(f"linear: resuming at epoch {start + 1}/{epochs} from {progress}", file=sys.stderr)
    return start, scores, {k: set(v) for k, v in state["warned"].items()}


def _keep_linear(progress, epoch, parts, shuffle, scores, warned):
    """Write the evaluation after `epoch` epochs to `progress`; returns the path to keep
    writing to, or None (said once) where the system refuses the write."""
    state = {name: part.state_dict() for name, part in parts.items()}
    state |= {"epoch": epoch, "shuffle": shuffle.get_state(), "scores": dict(scores),
              "warned": {k: sorted(v) for k, v in warned.items()}}
    try:
        write_atomically(progress, lambda f: torch.save(state, f))
    except WriteError as error:
        print(f"warning: {error}; an interrupted evaluation will start over", file=sys.stderr)
        return None
    return progress


def linear_progress_path(checkpoint, settings):
    """The file beside `checkpoint` that keeps a linear evaluation of it with `settings`
    (a JSON-able dict): its name holds their hash, and the checkpoint file's size and time,
    so that other settings, or a checkpoint rewritten since (a run still training), never
    resume another's."""
    info = os.stat(checkpoint)
    key = json.dumps({**settings, "checkpoint": os.path.abspath(checkpoint), "size": info.st_size,
                      "mtime_ns": info.st_mtime_ns}, sort_keys=True)
    return f"{os.path.splitext(checkpoint)[0]}.eval-linear-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"


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
    built-in data on a CPU (said on stderr); PROBE_EPOCHS with `fast`. fast:
    `linear_accuracy` on `cached_probe_features` (DINO's features) instead of DINO's protocol.
    """
    backbone, cfg, device, size = backbone_for_eval(checkpoint, weights, device, image_size)
    data, flag = run_data(data, cfg)
    train_images, val_images = open_labelled_splits(data, flag=flag)
    if epochs is None:
        epochs = PROBE_EPOCHS if fast else 100
        if not fast and data in ("", *BUILTIN) and torch.device(device).type == "cpu":
            epochs = BUILTIN_CPU_LINEAR_EPOCHS
            print(f"built-in data on CPU: {epochs} epochs (DINO's 100 would take hours here; "
                  "--epochs overrides it)", file=sys.stderr)
    workers = default_num_workers() if num_workers < 0 else num_workers
    result = {"protocol": "linear", "checkpoint": checkpoint, "weights": weights, "data": data}
    default_n, default_avgpool = dino_linear_features(cfg["arch"])
    depth = len(backbone.blocks)
    n = min(default_n, depth) if n_last_blocks is None else n_last_blocks
    if n > depth:
        raise SystemExit(f"error: --n-last-blocks {n} is more than the {depth} blocks of the run's model")
    avgpool = default_avgpool if avgpool_patchtokens is None else avgpool_patchtokens
    features = {"epochs": epochs, "n_last_blocks": n, "avgpool_patchtokens": avgpool}
    if fast:
        train_f, mirror_f, train_y, val_f, val_y = cached_probe_features(
            backbone, CenterCrops(train_images, size, limit), CenterCrops(val_images, size, limit), n, avgpool,
            batch_size, device, workers, what="linear (fast)")
        if not len(train_y) or not len(val_y):
            raise SystemExit(f"error: {flag} {data}: no readable images in {'train' if not len(train_y) else 'val'}")
        return {**result, "train_images": len(train_y), "val_images": len(val_y), "fast": True, **features,
                "accuracy": linear_accuracy(train_f, train_y, val_f, val_y, epochs, train_views=(mirror_f,),
                                            log=lambda line: print(f"linear (fast): {line}", file=sys.stderr,
                                                                   flush=True))}
    train_set, val_set = RandomResizedCrops(train_images, size, limit), CenterCrops(val_images, size, limit)
    num_classes = max(1, len(train_images.classes))  # a folder without class folders is one class
    settings = {"weights": weights, "data": data if data in ("", *BUILTIN) else os.path.abspath(data), "size": size,
                "limit": limit, "batch_size": batch_size, "lr": lr, "val_freq": val_freq, **features}
    progress = linear_progress_path(checkpoint, settings)
    try:
        measured = linear_protocol(backbone, train_set, val_set, num_classes, epochs, batch_size, lr,
                                   n, avgpool, val_freq, device, workers, progress=progress)
    except NoReadableImages as error:
        raise SystemExit(f"error: {flag} {data}: {error}") from None
    return {**result, **measured, **features, "lr": lr * batch_size / 256, "batch_size": batch_size}
