"""The input pipeline's CPU cost per image, per loader worker, and on CUDA the end-to-end
images/s of `adclr train --data` against the synthetic step (see bench/input.py).

Paths: `decode` (Image.open + load, the floor), `pillow` (MultiCropDataset: decode +
22 Pillow crops), `decode-only` (DecodeOnlyDataset: decode, reduced where the crops
allow, + the boxes; the crops are cut on the device), `encoded` (the file's bytes + the
boxes; nvJPEG decodes on the device). On generated ImageNet-size JPEGs;
the same on every machine, GPU or not: it is the CPU's share of the pipeline.
"""

import os

import pytest
import torch

from adclr.data import ImageFolder, decode_mode, default_num_workers, keep_freed_memory
from bench.input import CROPS, SIZES, TRAIN, end_to_end, items, make_jpegs, worker_step
from bench.timing import DEVICE, ON_CUDA

IMAGES = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    return {size: ImageFolder(make_jpegs(root, *size, IMAGES)) for size in SIZES}


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
@pytest.mark.parametrize("path", ["decode", "pillow", "decode-only", "encoded"])
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


# --------------------------------------------------------------------------- end to end (CUDA)

TRAIN_IMAGES = 256  # 2 steps an epoch: the loader's cost per image is the same on any folder
E2E = ["synthetic", "cpu", "gpu", "pillow"]  # the reference first, today's default next
_rates = {}


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory):
    return make_jpegs(tmp_path_factory.mktemp("train"), 500, 375, TRAIN_IMAGES)


@pytest.mark.skipif(not ON_CUDA, reason="end to end runs the CUDA step; on a CPU `python -m bench.input` "
                                        "prints the CPU per image, the loader's share")
@pytest.mark.parametrize("decode", E2E)
def test_train_end_to_end(benchmark, train_folder, decode, tmp_path):
    if decode == "gpu":
        try:
            decode_mode("gpu", DEVICE)
        except ValueError as error:
            pytest.skip(f"--decode gpu: {error}")
    result = benchmark.pedantic(end_to_end, args=(train_folder, decode, str(tmp_path / "run")),
                                rounds=1, iterations=1)
    _rates[decode] = result["images/s"]
    benchmark.group = f"input | adclr train end to end, {TRAIN_IMAGES} generated 500x375 JPEGs"
    benchmark.extra_info.update(
        backend=decode, mode="adclr train, images/s past the warm-up", config=TRAIN,
        images_per_s=result["images/s"], data_wait=result["data_wait"], intervals=result["intervals"],
        workers=default_num_workers(), cpus=os.cpu_count(),
        note="the benchmark's own time is the whole run, compilation included; images_per_s is the "
             "steady rate from the run's metrics.jsonl")
    if "synthetic" in _rates:
        benchmark.extra_info["vs_synthetic"] = result["images/s"] / _rates["synthetic"]
