"""The input pipeline's CPU cost per image: today's Pillow crops against decode-only.

A loader worker runs either MultiCropDataset (decode the JPEG, then 2 + 10 + 10 Pillow
crop-and-resizes) or DecodeOnlyDataset (decode, reduced where every crop allows it,
and draw the same boxes; crop_resize cuts the crops on the device). Both are measured
here as a worker runs them, one image after another in one process with one thread:
CPU milliseconds per image (time.process_time, so a busy neighbour on a shared machine
costs wall time, not these), with `decode` (Image.open + load alone) as the floor.

The JPEGs are made here, no download: a photograph's falling spectrum (1/f) in three
correlated channels plus a little sensor noise, saved by Pillow at quality 90; about
120 kB at 500x375, ImageNet's typical size and file size.

    python -m bench.input                       # 500x375 and 1024x768, 48 images each
    python -m bench.input --sizes 500x375 --images 200 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from adclr.data import DecodeOnlyDataset, ImageFolder, MultiCropDataset, collate_decoded

# ADCLR's defaults (adclr.train.Config): 2 x 224 global, 10 x 96 local, 10 queries of 16.
CROPS = dict(image_size=224, local_size=96, patch_size=16, num_local_crops=10, num_queries=10)
SIZES = ((500, 375), (1024, 768))  # (width, height)
PATHS = ("decode", "pillow", "decode-only", "decode-only, no draft")


def natural_image(width, height, seed):
    """uint8 (H, W, 3): 1/f noise, channels sharing most of it (as a photo's do), + noise."""
    rng = np.random.default_rng([seed, width, height])
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    falloff = 1 / np.maximum(np.hypot(fx, fy), 1 / max(width, height))
    shape = (height, width // 2 + 1)
    shared = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    planes = [np.fft.irfft2((0.8 * shared + 0.2 * (rng.normal(size=shape) + 1j * rng.normal(size=shape)))
                            * falloff, s=(height, width)) for _ in range(3)]
    image = np.stack([(p - p.mean()) / p.std() for p in planes], -1) * 50 + 120
    return np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)


def make_jpegs(folder, width, height, count, quality=90):
    """`count` generated JPEGs of width x height in folder/<W>x<H>/ (kept if already there)."""
    path = os.path.join(folder, f"{width}x{height}")
    os.makedirs(path, exist_ok=True)
    for i in range(count):
        name = os.path.join(path, f"{i:05d}.jpg")
        if not os.path.exists(name):
            Image.fromarray(natural_image(width, height, i)).save(name, quality=quality)
    return path


def worker_step(path, images):
    """The function a loader worker runs per image on `path`, and its items."""
    if path == "decode":
        def decode(item):
            with Image.open(images.samples[item[0]][0]) as image:
                image.load()
        return decode
    if path == "pillow":
        return MultiCropDataset(images, **CROPS).__getitem__
    return DecodeOnlyDataset(images, **CROPS, draft=path == "decode-only").__getitem__


def items(images, seed=0):
    """One sample per image, each with its own seed, as StepBatches hands them out."""
    return [(i, seed * 10_000_019 + i) for i in range(len(images))]


def cpu_ms_per_image(step, work, rounds=3):
    """(best, median) over rounds of the CPU ms per image of step over work."""
    per_round = []
    for _ in range(rounds):
        start = time.process_time()
        for item in work:
            step(item)
        per_round.append((time.process_time() - start) / len(work) * 1e3)
    return min(per_round), float(np.median(per_round))


def collate_ms_per_image(images, work):
    """CPU ms per image of collate_decoded (the flat buffer, outside a worker's shared memory)."""
    dataset = DecodeOnlyDataset(images, **CROPS)
    samples = [dataset[item] for item in work]
    collate_decoded(samples[:1])  # the first call imports adclr_kernels (once per worker)
    start = time.process_time()
    collate_decoded(samples)
    return (time.process_time() - start) / len(samples) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="500x375,1024x768", help="WxH,... of the generated JPEGs")
    parser.add_argument("--images", type=int, default=48, help="JPEGs per size (default 48)")
    parser.add_argument("--rounds", type=int, default=3, help="passes over them; the best is reported")
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "adclr-bench-input"),
                        help="where the JPEGs are made (and kept for the next run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a loader worker's torch runs one thread
    print(f"CPU ms per image, one process, one thread; best (median) of {args.rounds} passes; "
          f"crops {CROPS}; load average {os.getloadavg()[0]:.2f} at start")
    print(f"{'image':>10s} {'kB':>5s} | " + " | ".join(f"{p:>21s}" for p in PATHS) + " | collate | reduced")
    for size in args.sizes.split(","):
        width, height = (int(n) for n in size.split("x"))
        images = ImageFolder(make_jpegs(args.dir, width, height, args.images))
        work = items(images)
        kb = np.mean([os.path.getsize(path) for path, _ in images.samples]) / 1e3
        cells = []
        for path in PATHS:
            best, median = cpu_ms_per_image(worker_step(path, images), work, args.rounds)
            cells.append(f"{best:8.2f} ({median:6.2f})")
        decoded = DecodeOnlyDataset(images, **CROPS)
        reduced = np.mean([decoded[item]["reduction"] > 1 for item in work])
        print(f"{size:>10s} {kb:5.0f} | " + " | ".join(f"{c:>21s}" for c in cells)
              + f" | {collate_ms_per_image(images, work):7.3f} | {reduced:6.0%}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
