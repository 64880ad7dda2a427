"""Why a dense probe does or does not move: what a backbone's patch tokens say, linearly.

    python -m bench.dense_diagnosis CHECKPOINT [--data builtin:few-shape-scenes] [--size 32] [--images 500]

On `--images` train and val images of --data at the checkpoint's patch size, each line a
probe of `adclr.eval_dense` (20 epochs unless said) scored on val: the standard one
(last block, 20 and 100 epochs); on block 1 of the last two; on the tokens centred per
image (the patch against its image's mean); on each patch token with the CLS token
beside it; then, on the last block, a probe for object against background (IoU of the
object pixels), one trained and scored on object pixels only (pixel accuracy: does a
patch say its shape?), and a linear classifier of the image's class on its mean patch
token. Prints the labels' every-patch-right mIoU first.
"""

import argparse
import contextlib
import io

import torch

from adclr.data import normalize, open_segmentation
from adclr.eval_dense import (IGNORE, SegmentationCrops, collate, confusion_matrix, patch_majority, scores,
                              train_probe)
from adclr.features import load_backbone


def tokens(backbone, data, split, size, images, full):
    """({"last", "first", "cls"}: (N, h, w, D) each, masks) of `images` of one split."""
    dataset = SegmentationCrops(open_segmentation(data, split), size, images, full_masks=full)
    out, masks = {"last": [], "first": [], "cls": []}, []
    for x, m, _ in torch.utils.data.DataLoader(dataset, batch_size=128, collate_fn=collate):
        with torch.no_grad():
            first, last = backbone.get_intermediate_layers(normalize(x), 2)
        g = size // backbone.patch_size
        out["first"].append(first[:, 1:].unflatten(1, (g, g)))
        out["last"].append(last[:, 1:].unflatten(1, (g, g)))
        out["cls"].append(last[:, :1, None].expand(-1, g, g, -1))
        masks += m
    return {k: torch.cat(v) for k, v in out.items()}, torch.stack(masks)


def probe_scores(train_x, train_m, val_x, val_m, classes, epochs=20):
    with contextlib.redirect_stderr(io.StringIO()):
        probe = train_probe(train_x, train_m, classes, epochs)
    with torch.no_grad():
        return scores(confusion_matrix(probe(val_x), val_m))


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.dense_diagnosis", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default="builtin:few-shape-scenes")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    backbone = load_backbone(args.checkpoint)[0].eval()
    tf, tm = tokens(backbone, args.data, "train", args.size, args.images, False)
    vf, vm = tokens(backbone, args.data, "val", args.size, args.images, True)
    classes = int(tm[tm != IGNORE].max()) + 1
    grid = tf["last"].shape[1:3]
    print(f"every patch right ({grid[0]} x {grid[1]}): mIoU {100 * scores(sum(patch_majority(m, grid) for m in vm))['miou']:.1f}")
    variants = {"last block": lambda f: f["last"], "block 1 of 2": lambda f: f["first"],
                "last, centred per image": lambda f: f["last"] - f["last"].mean((1, 2), keepdim=True),
                "last + CLS": lambda f: torch.cat([f["last"], f["cls"]], -1)}
    for name, v in variants.items():
        for epochs in (20, 100) if name == "last block" else (20,):
            s = probe_scores(v(tf), tm, v(vf), vm, classes, epochs)
            print(f"{name}, {epochs} epochs: mIoU {100 * s['miou']:.1f}, objects' IoU "
                  + " ".join(f"{100 * s['iou'].get(c, 0):.1f}" for c in range(1, classes)), flush=True)
    object_or_not = lambda m: torch.where(m == IGNORE, m, (m > 0).to(m.dtype))
    s = probe_scores(tf["last"], object_or_not(tm), vf["last"], object_or_not(vm), 2)
    print(f"object against background: object IoU {100 * s['iou'].get(1, 0):.1f}")
    objects_only = lambda m: torch.where(m == 0, torch.full_like(m, IGNORE), m)
    s = probe_scores(tf["last"], objects_only(tm), vf["last"], objects_only(vm), classes)
    print(f"shape on object pixels only: pixel accuracy {100 * s['pixel_accuracy']:.1f} (chance {100 / (classes - 1):.0f})")
    label = lambda masks: torch.stack([m[m != IGNORE].max().long() for m in masks])
    x, xv, y, yv = tf["last"].mean((1, 2)), vf["last"].mean((1, 2)), label(tm), label(vm)
    mean, std = x.mean(0), x.std(0) + 1e-6
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[-1], classes)
    optimizer = torch.optim.AdamW(linear.parameters(), 1e-2)
    for _ in range(500):
        loss = torch.nn.functional.cross_entropy(linear((x - mean) / std), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = (linear((xv - mean) / std).argmax(1) == yv).float().mean().item()
    print(f"image class from the mean patch token: val accuracy {100 * accuracy:.1f}")


if __name__ == "__main__":
    main()
