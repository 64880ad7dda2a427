"""Frozen-feature evaluation (weighted k-NN, linear probe) and safetensors export.

Both protocols read the CLS feature of the backbone (after its final LayerNorm) for
centre crops of the labelled train and val splits; the backbone is never updated.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from .data import IMAGENET_MEAN, IMAGENET_STD, center_crop, default_num_workers, open_dataset, warn_unreadable
from .model import build_backbone
from .train import CheckpointError, load_checkpoint


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


def _backbone_or_exit(checkpoint, weights, device="cpu"):
    try:
        return load_backbone(checkpoint, weights, device)
    except CheckpointError as error:
        raise SystemExit(f"error: --checkpoint: {error}; pass the checkpoint.pt an adclr train run "
                         "wrote") from None


class CenterCrops(torch.utils.data.Dataset):
    """(uint8 centre crop, label), or the image's index in `base` for an unreadable file."""

    def __init__(self, base, size, limit=0):
        self.base, self.size = base, size
        n = len(base)
        # A fixed random subset: keeps every class of a class-sorted folder, and cannot
        # alias with a periodic labelling the way evenly spaced indices can.
        subset = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit].sort().values
        self.indices = subset.tolist() if 0 < limit < n else range(n)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image, label = self.base.load(self.indices[i])
        return self.indices[i] if image is None else (center_crop(image, self.size), label)


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
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    features, labels, warned = [], [], set()
    for images, y, unreadable in loader:
        warn_unreadable(dataset.base, unreadable, warned)
        if images is None:
            continue
        images = (images.to(device).float() / 255 - mean) / std
        with autocast:
            features.append(backbone.forward_features(images)["cls"].float().cpu())
        labels.append(y)
    skipped = len(dataset) - sum(len(y) for y in labels)
    if skipped:
        print(f"warning: skipped {skipped} unreadable images", file=sys.stderr)
    if not features:  # nothing readable
        return torch.empty(0, backbone.embed_dim), torch.empty(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k=20, temperature=0.07):
    """DINO's weighted k-NN: the k most cosine-similar train features vote with exp(sim / T)."""
    train_features = F.normalize(train_features, dim=1)
    test_features = F.normalize(test_features, dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train_features))
    correct = 0
    for start in range(0, len(test_features), 1024):  # bounded memory for large banks
        sims, idx = (test_features[start:start + 1024] @ train_features.T).topk(k, dim=1)
        votes = torch.zeros(len(idx), num_classes).scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        correct += (votes.argmax(1) == test_labels[start:start + 1024]).sum().item()
    return correct / len(test_features)


def linear_accuracy(train_features, train_labels, test_features, test_labels, epochs=100, seed=0):
    """Linear probe: a linear classifier on standardised frozen features, trained with AdamW."""
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


def evaluate(protocol, checkpoint, data=None, weights="teacher", image_size=None, batch_size=128,
             k=20, temperature=0.07, linear_epochs=100, device="auto", num_workers=-1, limit=0):
    """`adclr eval`: returns a dict with the accuracy (and what it was measured on)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device} but CUDA is not available")
    backbone, cfg = _backbone_or_exit(checkpoint, weights, device)
    data = data or cfg["data"]
    size = image_size or cfg["image_size"]
    if size % cfg["patch_size"]:
        raise SystemExit(f"error: --image-size {size} must be a multiple of the run's patch size {cfg['patch_size']}")
    try:
        train_images, val_images = open_dataset(data, "train"), open_dataset(data, "val")
    except OSError as error:  # no such folder, no train/ or val/ in it, no images, no permission
        raise SystemExit(f"error: --data: {error}") from None
    workers = default_num_workers() if num_workers < 0 else num_workers
    train_f, train_y = extract_features(backbone, CenterCrops(train_images, size, limit), batch_size, device, workers)
    val_f, val_y = extract_features(backbone, CenterCrops(val_images, size, limit), batch_size, device, workers)
    if not len(train_y) or not len(val_y):
        raise SystemExit(f"error: --data {data}: no readable images in {'train' if not len(train_y) else 'val'}")
    if protocol == "knn":
        accuracy = knn_accuracy(train_f, train_y, val_f, val_y, k, temperature)
    else:
        accuracy = linear_accuracy(train_f, train_y, val_f, val_y, linear_epochs)
    return {"protocol": protocol, "accuracy": accuracy, "checkpoint": checkpoint, "weights": weights,
            "data": data, "train_images": len(train_y), "val_images": len(val_y)}


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
