"""Frozen-feature evaluation (DINO's weighted k-NN and linear protocols) and safetensors export.

The backbone is never updated. k-NN reads the CLS feature (after the final LayerNorm)
of centre crops of the labelled train and val splits. The linear protocol is DINO's
(eval_linear.py): a linear classifier on the CLS tokens of the last 4 blocks (ViT-B:
the last CLS and the mean patch token), trained with SGD on freshly augmented train
crops every epoch. `linear_accuracy` is the quick alternative (`--fast`): a probe on
cached centre-crop CLS features.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F
from PIL import Image

from .data import (BUILTIN, IMAGENET_MEAN, IMAGENET_STD, center_crop, crop, default_num_workers, open_dataset,
                   random_resized_box, warn_unreadable)
from .model import build_backbone
from .checkpoint import CheckpointError, load_checkpoint

KNN_K = (10, 20, 100, 200)  # DINO's eval_knn.py --nb_knn
LINEAR_LR = 1e-3  # DINO's eval_linear.py --lr, per 256 images
# The linear protocol pushes the built-in set's 10000 training images through the backbone
# every epoch: DINO's 100 epochs take hours on a CPU, a few give a number in minutes.
BUILTIN_CPU_LINEAR_EPOCHS = 5


def load_backbone(checkpoint, weights="teacher", device="cpu"):
    """(backbone in eval mode, the run's config dict) from an `adclr train` checkpoint.

    Raises CheckpointError (naming the file) for anything but a usable checkpoint.
    """
    state = load_checkpoint(checkpoint)
    cfg = state["config"]
    # Evaluation runs anywhere: the default backend, whatever the run trained with.
    backbone = build_backbone(cfg["arch"], cfg["image_size"], cfg["patch_size"], 0.0)
    prefix = "backbone."
    try:
        backbone.load_state_dict({k[len(prefix):]: v for k, v in state[weights].items() if k.startswith(prefix)})
    except RuntimeError as error:
        raise CheckpointError(f"{checkpoint} does not fit the model of its own config "
                              f"({str(error).strip().splitlines()[0]})") from None
    return backbone.to(device).eval(), cfg


def backbone_for_eval(checkpoint, weights, device, image_size):
    """(backbone, its run's config, the device, the input size) for an `adclr eval`:
    "auto" picks CUDA when there is one; errors a user causes exit with one line."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device} but CUDA is not available")
    backbone, cfg = _backbone_or_exit(checkpoint, weights, device)
    size = image_size or cfg["image_size"]
    if size % cfg["patch_size"]:
        raise SystemExit(f"error: --image-size {size} must be a multiple of the run's patch size {cfg['patch_size']}")
    return backbone, cfg, device, size


def fixed_subset(n, limit):
    """Indices of `limit` of n images (all of them for limit 0), in order: a fixed random
    subset keeps every class of a class-sorted folder, and cannot alias with a periodic
    labelling the way evenly spaced indices can."""
    subset = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit].sort().values
    return subset.tolist() if 0 < limit < n else range(n)


def _backbone_or_exit(checkpoint, weights, device="cpu"):
    try:
        return load_backbone(checkpoint, weights, device)
    except CheckpointError as error:
        raise SystemExit(f"error: --checkpoint: {error}; pass the checkpoint.pt an adclr train run "
                         "wrote") from None


class CenterCrops(torch.utils.data.Dataset):
    """(uint8 centre crop, label), or the image's index in `base` for an unreadable file.

    The view DINO evaluates on: resize to size / 0.875, centre crop (256 -> 224).
    """

    def __init__(self, base, size, limit=0):
        self.base, self.size = base, size
        self.indices = fixed_subset(len(base), limit)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image, label = self.base.load(self.indices[i])
        return self.indices[i] if image is None else (center_crop(image, self.size), label)


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


def collate(items):
    """(images, labels, indices of the unreadable files), dropping those files."""
    kept = [item for item in items if not isinstance(item, int)]
    images = torch.stack([x for x, _ in kept]) if kept else None
    return images, torch.tensor([y for _, y in kept], dtype=torch.long), [i for i in items if isinstance(i, int)]


@torch.no_grad()
def extract_features(backbone, dataset, batch_size=128, device="cpu", num_workers=0):
    """(features (N, D) float32, labels (N,)) for a `CenterCrops` dataset; skips unreadable files."""
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate)
    features, labels, warned = [], [], set()
    for images, y, unreadable in loader:
        warn_unreadable(dataset.base, unreadable, warned)
        if images is None:
            continue
        with _autocast(device):
            features.append(backbone.forward_features(_normalize(images, device))["cls"].float().cpu())
        labels.append(y)
    skipped = len(dataset) - sum(len(y) for y in labels)
    if skipped:
        print(f"warning: skipped {skipped} unreadable images", file=sys.stderr)
    if not features:  # nothing readable
        return torch.empty(0, backbone.embed_dim), torch.empty(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)


def _normalize(images, device):
    """uint8 (B, 3, H, W) -> normalised float on `device`."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (images.to(device).float() / 255 - mean) / std


def _autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def knn_accuracy(train_features, train_labels, test_features, test_labels, ks=KNN_K, temperature=0.07):
    """DINO's weighted k-NN: the k most cosine-similar train features vote with exp(sim / T).

    One similarity pass for every k in `ks` (the k nearest are a prefix of the max-k
    nearest). Returns {k: accuracy}; a k beyond the train set's size uses all of it.
    """
    train_features = F.normalize(train_features, dim=1)
    test_features = F.normalize(test_features, dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = dict.fromkeys(ks, 0)
    for start in range(0, len(test_features), 1024):  # bounded memory for large banks
        sims, idx = (test_features[start:start + 1024] @ train_features.T).topk(
            min(max(ks), len(train_features)), dim=1)
        weights, neighbours = (sims / temperature).exp(), train_labels[idx]
        for k in correct:
            votes = torch.zeros(len(idx), num_classes).scatter_add_(1, neighbours[:, :k], weights[:, :k])
            correct[k] += (votes.argmax(1) == test_labels[start:start + 1024]).sum().item()
    return {k: c / len(test_features) for k, c in correct.items()}


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

    def features(images):
        with torch.no_grad(), _autocast(device):
            return probe_features(backbone, _normalize(images, device), n_last_blocks, avgpool).float()

    train_warned, val_warned = set(), set()  # unreadable files already reported, over all epochs

    def validate():
        correct = total = 0
        with torch.no_grad():
            for images, y, unreadable in val_loader:
                warn_unreadable(val_set.base, unreadable, val_warned)
                if images is not None:
                    correct += (classifier(features(images)).argmax(1).cpu() == y).sum().item()
                    total += len(y)
        if not total:
            raise NoReadableImages("no readable images in val")
        return correct / total, total

    accuracy, best = None, 0.0
    for epoch in range(epochs):
        t0, losses, seen = time.perf_counter(), [], 0
        train_set.epoch = epoch  # read by the workers, which the loader starts anew each epoch
        for images, y, unreadable in loader:
            warn_unreadable(train_set.base, unreadable, train_warned)
            if images is None:
                continue
            seen += len(y)
            loss = F.cross_entropy(classifier(features(images)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        if not losses:  # every image unreadable: the same in every epoch
            raise NoReadableImages("no readable images in train")
        schedule.step()
        line = f"linear epoch {epoch + 1}/{epochs} | loss {torch.stack(losses).mean().item():.4f}"
        if train_warned:
            line += f" | {len(train_warned)} unreadable images skipped"
        if (epoch + 1) % val_freq == 0 or epoch + 1 == epochs:
            accuracy, val_seen = validate()
            best = max(best, accuracy)
            line += f" | val {100 * accuracy:.2f}% (best {100 * best:.2f}%)"
        print(f"{line} | {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return {"accuracy": accuracy, "best_accuracy": best, "train_images": seen, "val_images": val_seen}


def evaluate(protocol, checkpoint, data=None, weights="teacher", image_size=None, batch_size=128,
             ks=KNN_K, temperature=0.07, epochs=None, device="auto", num_workers=-1, limit=0, fast=False,
             n_last_blocks=None, avgpool_patchtokens=None, lr=LINEAR_LR, val_freq=1):
    """`adclr eval`: returns a dict with the accuracy (and what it was measured on).

    epochs None: DINO's 100, or BUILTIN_CPU_LINEAR_EPOCHS for DINO's linear protocol on
    the built-in data on a CPU (said on stderr).
    """
    backbone, cfg, device, size = backbone_for_eval(checkpoint, weights, device, image_size)
    data = data or cfg["data"]
    try:
        train_images, val_images = open_dataset(data, "train"), open_dataset(data, "val")
    except OSError as error:  # no such folder, no train/ or val/ in it, no images, no permission
        raise SystemExit(f"error: --data: {error}") from None
    if epochs is None:
        epochs = 100
        if protocol == "linear" and not fast and data in ("", *BUILTIN) and torch.device(device).type == "cpu":
            epochs = BUILTIN_CPU_LINEAR_EPOCHS
            print(f"built-in data on CPU: {epochs} epochs (DINO's 100 would take hours here; "
                  "--epochs overrides it)", file=sys.stderr)
    workers = default_num_workers() if num_workers < 0 else num_workers
    result = {"protocol": protocol, "checkpoint": checkpoint, "weights": weights, "data": data}
    if protocol == "linear" and not fast:
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
    train_f, train_y = extract_features(backbone, CenterCrops(train_images, size, limit), batch_size, device, workers)
    val_f, val_y = extract_features(backbone, CenterCrops(val_images, size, limit), batch_size, device, workers)
    if not len(train_y) or not len(val_y):
        raise SystemExit(f"error: --data {data}: no readable images in {'train' if not len(train_y) else 'val'}")
    result.update(train_images=len(train_y), val_images=len(val_y))
    if protocol == "knn":
        by_k = knn_accuracy(train_f, train_y, val_f, val_y, ks, temperature)
        headline = 20 if 20 in by_k else next(iter(by_k))  # DINO's headline k-NN number is k=20
        return {**result, "accuracy": by_k[headline], "k": headline,
                "accuracy_by_k": {str(k): v for k, v in by_k.items()}, "temperature": temperature}
    return {**result, "accuracy": linear_accuracy(train_f, train_y, val_f, val_y, epochs),
            "fast": True, "epochs": epochs}


def export(checkpoint, out, weights="teacher"):
    """Write the backbone's weights (timm ViT names) as a safetensors file."""
    from safetensors.torch import save_file

    from safetensors import SafetensorError

    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise SystemExit(f"error: --out {out} is a folder; give a file name such as backbone.safetensors")
    if not os.path.isdir(folder):
        raise SystemExit(f"error: --out {out}: {folder} is not a folder")
    backbone, cfg = _backbone_or_exit(checkpoint, weights)
    metadata = {key: str(cfg[key]) for key in ("arch", "patch_size", "image_size")}
    try:
        save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, out, metadata=metadata)
    except (OSError, SafetensorError) as error:  # no permission, disk full
        raise SystemExit(f"error: cannot write --out {out} ({error})") from None
