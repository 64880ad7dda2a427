"""The input pipeline's CPU cost per image, per loader worker (see bench/input.py).

Paths: `decode` (Image.open + load, the floor), `pillow` (MultiCropDataset: decode +
22 Pillow crops), `decode-only` (DecodeOnlyDataset: decode, reduced where the crops
allow, + the boxes; the crops are cut on the device). On generated ImageNet-size JPEGs;
the same on every machine, GPU or not: it is the CPU's share of the pipeline.
"""

import pytest
import torch

from bench.input import CROPS, SIZES, items, make_jpegs, worker_step

from adclr.data import ImageFolder, keep_freed_memory

IMAGES = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    return {size: ImageFolder(make_jpegs(root, *size, IMAGES)) for size in SIZES}


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
@pytest.mark.parametrize("path", ["decode", "pillow", "decode-only"])
def test_input_cpu_per_image(benchmark, folders, size, path):
    torch.set_num_threads(1)  # a loader worker's torch runs one thread
    keep_freed_memory()  # as the workers do
    images = folders[size]
    step, work = worker_step(path, images), items(images)

    def one_pass():
        for item in work:
            step(item)

    benchmark.group = f"input | {size[0]}x{size[1]} JPEG, per {IMAGES} images"
    benchmark.extra_info.update(backend=path, mode="loader worker, CPU", images=IMAGES, crops=CROPS,
                                note="time per pass over the images; divide by images for one image")
    benchmark.pedantic(one_pass, warmup_rounds=1, rounds=3, iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info["ms_per_image"] = benchmark.stats.stats.median / IMAGES * 1e3
