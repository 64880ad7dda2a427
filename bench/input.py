"""The input pipeline: its CPU cost per image (Pillow crops against decode-only), and on
CUDA the end-to-end images/s of `adclr train --data` against the synthetic step.

A loader worker runs MultiCropDataset (`pillow`: decode the JPEG, then 2 + 10 + 10
Pillow crop-and-resizes, `--decode pillow`), DecodeOnlyDataset (`decode-only`: decode,
reduced where every crop allows it, and draw the same boxes; crop_resize cuts the crops
on the device, `--decode cpu`), or DecodeOnlyDataset(encoded=True) (`encoded`: read the
file and draw the boxes on its header's size; nvJPEG decodes, `--decode gpu`). Each is
measured two ways, in CPU milliseconds per image (so a busy neighbour on a shared machine costs
wall time, not these):

- in this process, one image after another with one thread (`__getitem__` alone),
  with `decode` (Image.open + load alone) as the floor; the paths take turns, each
  reported by its best pass (and the median);
- in a real loader worker (one, with its batches of 32 collated into shared memory as
  the training loader does), read from /proc: what a worker really spends, page faults
  of fresh buffers included. The first batch (imports, start-up) is not counted.

A last column gives crop_resize's PyTorch backend cutting the crops on the CPU (once,
32 images): what `--decode cpu` would add to a CPU-only run's training process, which
is why `--decode auto` keeps Pillow's crops there.

The JPEGs are made here, no download: a photograph's falling spectrum (1/f) in three
correlated channels plus a little sensor noise, saved by Pillow at quality 90; about
120 kB at 500x375, ImageNet's typical size and file size.

    python -m bench.input                       # 500x375 and 1024x768, 160 images each
    python -m bench.input --sizes 500x375 --rounds 5

End to end (`end_to_end`, run by `pytest bench/test_input.py` on CUDA): the training
run itself, `adclr.train.train`, on a folder of generated 500x375 JPEGs with the
synthetic step's settings (bench/test_train_step.py), each `--decode` in turn, its
images/s and data_wait read from its metrics.jsonl past the warm-up; against
`train_step` alone on a synthetic batch already on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from adclr.config import Config
from adclr.data import (DecodeOnlyDataset, ImageFolder, MultiCropDataset, StepBatches, collate_decoded,
                        cut_crops, keep_freed_memory, synthetic_batch)
from bench.timing import DEVICE, synchronize

# ADCLR's defaults (adclr.train.Config): 2 x 224 global, 10 x 96 local, 10 queries of 16.
CROPS = dict(image_size=224, local_size=96, patch_size=16, num_local_crops=10, num_queries=10)
SIZES = ((500, 375), (1024, 768))  # (width, height)
PATHS = ("decode", "pillow", "decode-only", "decode-only, no draft", "encoded")
WORKER_PATHS = ("pillow", "decode-only", "encoded")


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
    return DecodeOnlyDataset(images, **CROPS, draft=path != "decode-only, no draft",
                             encoded=path == "encoded").__getitem__


def items(images, seed=0):
    """One sample per image, each with its own seed, as StepBatches hands them out."""
    return [(i, seed * 10_000_019 + i) for i in range(len(images))]


def cpu_ms_per_image(steps, work, rounds=3):
    """{name: (best, median) over rounds of the CPU ms per image} of each of `steps`
    ({name: function}) over work. The steps take turns within each round, so that a
    slow spell of a shared machine, or the heap one step leaves, does not fall on one."""
    per_round = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.process_time()
            for item in work:
                step(item)
            per_round[name].append((time.process_time() - start) / len(work) * 1e3)
    return {name: (min(times), float(np.median(times))) for name, times in per_round.items()}


def _cpu_seconds(pid):
    """User + system CPU seconds of process pid so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_ms_per_image(path, images, batch=32, batches=4, init=keep_freed_memory):
    """CPU ms per image of one loader worker running `path` (one of WORKER_PATHS) over
    `batches` batches after a first one, collating as the training loader does; `init`:
    the worker_init_fn (default: keep_freed_memory, as the training loader's)."""
    if path == "pillow":
        dataset, collate = MultiCropDataset(images, **CROPS), None  # default_collate
    else:
        dataset, collate = DecodeOnlyDataset(images, **CROPS, encoded=path == "encoded"), collate_decoded
    sampler = StepBatches(len(images), batch, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=1, prefetch_factor=1,
                                         collate_fn=collate, worker_init_fn=init)
    stream = iter(loader)
    next(stream)
    pid = stream._workers[0].pid
    start = _cpu_seconds(pid)
    for _ in range(batches):
        next(stream)
    spent = _cpu_seconds(pid) - start
    del stream
    # prefetch_factor=1: the worker ran at most one batch ahead, so batches + 1 at most.
    return spent / (batches * batch) * 1e3


# bench/test_train_step.py's CUDA step: ViT-S/16, 2 x 224 + 10 x 96 crops, Q = 10 queries,
# 65536 prototypes, 128 images a step; everything else Config's defaults.
TRAIN = dict(arch="vit_small", patch_size=16, image_size=224, local_size=96, num_local_crops=10,
             num_queries=10, out_dim=65536, batch_size=128)


def end_to_end(data, decode, out, settings=TRAIN, warmup=10, steps=30, log_every=10):
    """{"images/s", "data_wait", "intervals"} of `adclr train --data data --decode decode`
    over `steps` steps after `warmup` (compilation, the workers' start), from the run's
    metrics.jsonl in folder `out`; "intervals" lists each log interval's images/s.

    decode "synthetic": `train_step` alone, the same Config, on a synthetic batch already
    on the device (no loader, crops or augmentation), timed over `steps` after `warmup`.
    """
    from adclr.train import build, train, train_step

    cfg = Config(**settings, data=data, out=out, max_steps=warmup + steps, log_every=log_every, saveckp_freq=0,
                 decode=decode if decode != "synthetic" else "auto")
    if decode == "synthetic":
        trainer = build(cfg, DEVICE)
        batch = synthetic_batch(cfg, cfg.batch_size, DEVICE)
        for step in range(warmup + steps):
            if step == warmup:
                synchronize()
                start = time.perf_counter()
            train_step(trainer, batch, step)
        synchronize()
        rate = steps * cfg.batch_size / (time.perf_counter() - start)
        return {"images/s": rate, "data_wait": 0.0, "intervals": [rate]}
    train(cfg)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if r["step"] > warmup]
    seconds = [log_every * cfg.batch_size / r["images/s"] for r in records]
    return {"images/s": len(records) * log_every * cfg.batch_size / sum(seconds),
            "data_wait": sum(r["data_wait"] * t for r, t in zip(records, seconds)) / sum(seconds),
            "intervals": [r["images/s"] for r in records]}


def crops_on_cpu_ms_per_image(dataset, work):
    """CPU ms per image of crop_resize cutting a decode-only batch's crops on the CPU (its
    PyTorch backend, one thread): what `--decode cpu` would cost a CPU-only run, in the
    training process, once per image."""
    batch = collate_decoded([dataset[item] for item in work])
    start = time.process_time()
    cut_crops(batch, CROPS["image_size"], CROPS["local_size"], CROPS["patch_size"], flip=False)
    return (time.process_time() - start) / len(work) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="500x375,1024x768", help="WxH,... of the generated JPEGs")
    parser.add_argument("--images", type=int, default=160, help="JPEGs per size (default 160)")
    parser.add_argument("--batches", type=int, default=4, help="batches of 32 a worker is timed on")
    parser.add_argument("--rounds", type=int, default=5, help="passes over them; the best is reported")
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "adclr-bench-input"),
                        help="where the JPEGs are made (and kept for the next run)")
    args = parser.parse_args(argv)
    if args.images < 32:
        parser.error("--images must be at least 32: a loader worker is timed on batches of 32")
    torch.set_num_threads(1)  # a loader worker's torch runs one thread
    keep_freed_memory()  # and keeps the memory it frees (the workers below too)
    print(f"CPU ms per image; crops {CROPS}; load average {os.getloadavg()[0]:.2f} at start")
    print(f"in-process columns: best (median) of {args.rounds} passes over {args.images} images, one thread; "
          f"worker columns: one loader worker, {args.batches} batches of 32 after the first")
    print(f"{'image':>10s} {'kB':>5s} | " + " | ".join(f"{p:>21s}" for p in PATHS) + " | "
          + " | ".join(f"worker: {p}" for p in WORKER_PATHS) + " | reduced | crops on a CPU")
    for size in args.sizes.split(","):
        width, height = (int(n) for n in size.split("x"))
        images = ImageFolder(make_jpegs(args.dir, width, height, args.images))
        work = items(images)
        kb = np.mean([os.path.getsize(path) for path, _ in images.samples]) / 1e3
        times = cpu_ms_per_image({path: worker_step(path, images) for path in PATHS}, work, args.rounds)
        cells = [f"{best:8.2f} ({median:6.2f})" for best, median in times.values()]
        workers = [worker_ms_per_image(path, images, batches=args.batches) for path in WORKER_PATHS]
        decoded = DecodeOnlyDataset(images, **CROPS)
        reduced = np.mean([decoded[item]["reduction"] > 1 for item in work])
        print(f"{size:>10s} {kb:5.0f} | " + " | ".join(f"{c:>21s}" for c in cells)
              + "".join(f" | {ms:{len(p) + 8}.2f}" for p, ms in zip(WORKER_PATHS, workers)) + f" | {reduced:7.0%} | "
              + f"{crops_on_cpu_ms_per_image(decoded, work[:32]):13.2f}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
