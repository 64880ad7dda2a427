"""What the evaluation protocols share: a frozen backbone from a checkpoint, the views
they evaluate on, its features of a labelled image set, and its last block's attention.

The backbone is never updated. Its input is a centre crop (DINO's resize to size / 0.875,
then crop), normalised as in training; its feature is the CLS token after the final
LayerNorm. Errors a user causes (a bad checkpoint, --device, --image-size, --data) exit
with one line naming the flag.
"""

from __future__ import annotations

import sys
import time

import torch

from adclr_kernels import visibility_mask

from .checkpoint import CheckpointError, load_checkpoint
from .data import center_crop, crop, normalize, open_dataset, random_resized_box, warn_unreadable
from .model import build_backbone


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


def backbone_or_exit(checkpoint, weights, device="cpu"):
    """`load_backbone`, or one line naming --checkpoint and what is wrong with it."""
    try:
        return load_backbone(checkpoint, weights, device)
    except CheckpointError as error:
        raise SystemExit(f"error: --checkpoint: {error}; pass the checkpoint.pt an adclr train run "
                         "wrote") from None


def backbone_for_eval(checkpoint, weights, device, image_size):
    """(backbone, its run's config, the device, the input size) for an `adclr eval`:
    "auto" picks CUDA when there is one; errors a user causes exit with one line."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device} but CUDA is not available")
    elif device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {device} but there are {torch.cuda.device_count()} GPUs")
    backbone, cfg = backbone_or_exit(checkpoint, weights, device)
    size = image_size or cfg["image_size"]
    if size % cfg["patch_size"]:
        raise SystemExit(f"error: --image-size {size} must be a multiple of the run's patch size {cfg['patch_size']}")
    return backbone, cfg, device, size


def run_data(data, cfg):
    """(data, how errors name it): --data when given, else the data the run trained on,
    read from its checkpoint, which errors name as such (the user typed no --data)."""
    return (data, "--data") if data else (cfg.get("data"), "the run's data (no --data given)")


def open_labelled_splits(data, split="val", flag="--data"):
    """(train, `split`) images of --data for the image-level protocols, or one line saying why not.

    A val image's label is its class's place among train's classes (by folder name), so a
    val split without some train class still scores each image against its own class.
    """
    try:
        train = open_dataset(data, "train", evaluation=True)
        held = open_dataset(data, split, like=train, evaluation=True)
    except (OSError, ValueError) as error:  # no such folder, no train/ or val/, no images, a class train lacks
        raise SystemExit(f"error: {flag}: {error}") from None
    if len(train.classes) == 1:
        print(f"warning: {flag}: the train split has one class ({train.classes[0]}): every accuracy is 100%",
              file=sys.stderr)
    return train, held


def fixed_subset(n, limit):
    """Indices of `limit` of n images (all of them for limit 0), in order: a fixed random
    subset keeps every class of a class-sorted folder, and cannot alias with a periodic
    labelling the way evenly spaced indices can."""
    subset = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit].sort().values
    return subset.tolist() if 0 < limit < n else range(n)


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


def collate(items):
    """(images, labels, indices of the unreadable files), dropping those files."""
    kept = [item for item in items if not isinstance(item, int)]
    images = torch.stack([x for x, _ in kept]) if kept else None
    return images, torch.tensor([y for _, y in kept], dtype=torch.long), [i for i in items if isinstance(i, int)]


def autocast(device):
    """The frozen backbone's forward in bf16 on CUDA, as training runs it by default; fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")


@torch.no_grad()
def extract_features(backbone, dataset, batch_size=128, device="cpu", num_workers=0, encode=None, what=None,
                     warned=None):
    """(features (N, D) float32, labels (N,)) for a `CenterCrops` dataset; skips unreadable files.
    encode: normalised images -> (B, D) features; default the CLS token. what: names the
    pass in a progress line on stderr (every 10 s at most, and at the end); None is quiet.
    warned: the unreadable files already reported (a second pass over the same images)."""
    device = torch.device(device)
    encode = encode or (lambda images: backbone.forward_features(images)["cls"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate)
    features, labels, fresh = [], [], warned is None
    warned = set() if fresh else warned
    done, t0, last = 0, time.perf_counter(), 0.0
    for images, y, unreadable in loader:
        warn_unreadable(dataset.base, unreadable, warned)
        done += len(y) + len(unreadable)
        if images is not None:
            with autocast(device):
                features.append(encode(normalize(images.to(device))).float().cpu())
            labels.append(y)
        now = time.perf_counter() - t0
        if what and (now - last > 10 or done == len(dataset)):
            print(f"{what} {done}/{len(dataset)} images | {now:.0f}s", file=sys.stderr, flush=True)
            last = now
    skipped = len(dataset) - sum(len(y) for y in labels)
    if skipped and fresh:
        print(f"warning: skipped {skipped} unreadable image{'s' * (skipped != 1)}", file=sys.stderr)
    if not features:  # nothing readable
        return torch.empty(0, backbone.embed_dim), torch.empty(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)


def split_features(backbone, train_images, val_images, data, size, limit, batch_size, device, num_workers,
                   what=None, flag="--data", encode=None):
    """(train features, train labels, val features, val labels) of centre crops of both
    splits; one line naming --data when a split has no readable image. what: the
    progress lines' prefix (None: quiet). encode: as `extract_features`'s."""
    loading = (batch_size, device, num_workers)
    train_f, train_y = extract_features(backbone, CenterCrops(train_images, size, limit), *loading, encode=encode,
                                        what=what and f"{what}: train features")
    val_f, val_y = extract_features(backbone, CenterCrops(val_images, size, limit), *loading, encode=encode,
                                    what=what and f"{what}: val features")
    if not len(train_y) or not len(val_y):
        raise SystemExit(f"error: {flag} {data}: no readable images in {'train' if not len(train_y) else 'val'}")
    return train_f, train_y, val_f, val_y


def query_boxes(image, count, scale, generator):
    """`count` boxes (left, top, right, bottom) on a PIL image where training would cut
    query crops: random-resized boxes of `scale` of its area."""
    return [random_resized_box(*image.size, tuple(scale), generator) for _ in range(count)]


def query_crops(image, boxes, patch_size):
    """The query crops of a PIL image at `boxes`, each resized to one patch, normalised:
    (1, len(boxes), 3, p, p), or None for no box."""
    return torch.stack([normalize(crop(image, box, patch_size)) for box in boxes])[None] if boxes else None


def last_block_attention(backbone, images, query_crops=None):
    """The last block's attention weights of the CLS row and the query rows (B, heads,
    1 + Q, L), float32, and the number of queries Q.

    Columns are tokens [CLS | patches | queries]; a row's weights over the keys it may
    see sum to 1, the others are 0. The CLS row is the fused op's own (its prefix-row
    probabilities); the Q query rows are recomputed from the block's q and k, caught by
    a forward hook, under the op's visibility mask. `images` normalised as for
    `forward_features`.
    """
    attn = backbone.blocks[-1].attn
    caught = {}

    def catch(module, args, kwargs):
        caught["x"], caught["num_queries"], caught["options"] = args[0], args[1], kwargs

    handle = attn.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            cls = backbone.forward_features(images, query_crops, cls_attention=True)["cls_attention"]
    finally:
        handle.remove()
    x, num_queries = caught["x"], caught["num_queries"]
    B, L, _ = x.shape
    with torch.no_grad():
        q, k, _ = attn.qkv(x).view(B, L, 3, attn.num_heads, attn.head_dim).unbind(2)
        q, k = attn.q_norm(q)[:, L - num_queries:], attn.k_norm(k)
        scores = torch.einsum("blhd,bmhd->bhlm", q.float(), k.float()) * attn.scale
        options = {key: value for key, value in caught["options"].items() if key.startswith("query_sees")}
        sees = visibility_mask(L, L, num_queries, 1, device=x.device, **options)[L - num_queries:]
        queries = scores.masked_fill(~sees, float("-inf")).softmax(-1)
    return torch.cat([cls.float()[:, :, None], queries], 2), num_queries

