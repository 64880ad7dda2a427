"""The training run's input path: `--decode` (where images are decoded and cropped) and
`data_wait` (how much of the run waited for the loader)."""

import dataclasses
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from trainer_testing import TINY, crash_in_step, read_metrics, run

import adclr.data
from adclr.train import train

TIMING = ("images/s", "tflops", "mfu", "eta_s", "data_wait")  # the only fields that may differ between equal runs


def jpeg_folder(root, count=8):
    """`count` small RGB JPEGs of odd sizes, with texture (so that crops differ)."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        height, width = 30 + 7 * i, 61 - 3 * i
        noise = rng.normal(0, 40, (height, width, 3)) + np.linspace(0, 200, width)[None, :, None]
        Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8)).save(root / f"{i}.jpg", quality=90)
    return str(root)


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_decode_cpu_trains_on_the_pixels_of_decode_pillow(tiny_config, tmp_path):
    """Workers that only decode, crops cut by crop_resize in the training process: the same
    crops, the same augmentation draws, so the same run, record for record."""
    data = jpeg_folder(tmp_path / "images")
    runs = {}
    for decode in ("pillow", "cpu"):
        cfg = tiny_config(out=str(tmp_path / decode), data=data, decode=decode, batch_size=4, epochs=2,
                          max_steps=3)
        train(cfg)
        runs[decode] = read_metrics(cfg.out)
    assert [r["step"] for r in runs["cpu"]] == [1, 2, 3]
    assert without_timing(runs["cpu"]) == without_timing(runs["pillow"])


def test_a_resumed_decode_cpu_run_sees_the_uninterrupted_runs_crops(tiny_config, tmp_path, monkeypatch):
    seen = {}  # run -> the uint8 crops of each step, as Augment gets them
    real_forward = adclr.data.Augment.forward

    def recording(self, batch):
        seen.setdefault(run_name, []).append({k: v.clone() for k, v in batch.items()})
        return real_forward(self, batch)

    monkeypatch.setattr(adclr.data.Augment, "forward", recording)
    full = tiny_config(out=str(tmp_path / "full"), data=jpeg_folder(tmp_path / "images"), decode="cpu",
                       batch_size=4, epochs=2, max_steps=4, checkpoint_every=2)
    run_name = "full"
    train(full)
    part = dataclasses.replace(full, out=str(tmp_path / "part"))
    run_name = "crashed"
    crash_in_step(monkeypatch, 2, lambda: train(part))
    run_name = "resumed"
    train(part)

    assert len(seen["full"]) == 4 and len(seen["resumed"]) == 2  # steps 3 and 4
    for got, want in zip(seen["resumed"], seen["full"][2:]):
        assert all(torch.equal(got[key], want[key]) for key in ("globals", "locals", "queries"))
    assert not torch.equal(seen["full"][2]["globals"], seen["full"][3]["globals"])
    assert without_timing(read_metrics(part.out)) == without_timing(read_metrics(full.out))


def test_data_wait_is_logged_and_a_slow_loader_is_named_once(tiny_config, monkeypatch, capsys):
    """A loader made slow on purpose: 0.1 s per image, 0.8 s per batch of 8."""
    real_item = adclr.data.MultiCropDataset.__getitem__

    def slow(self, item):
        time.sleep(0.1)
        return real_item(self, item)

    monkeypatch.setattr(adclr.data.MultiCropDataset, "__getitem__", slow)
    cfg = tiny_config(max_steps=4, log_every=1)
    train(cfg)
    records, err = read_metrics(cfg.out), capsys.readouterr().err.splitlines()
    for r in records:
        elapsed = cfg.batch_size / r["images/s"]  # the record's interval: one step
        assert 0.8 <= r["data_wait"] * elapsed <= elapsed, r
    warnings = [line for line in err if "waited for data" in line]
    assert warnings == [f"warning: the steps up to 2 waited for data {records[1]['data_wait']:.0%} of the time "
                        "(--decode pillow); more loader workers (--num-workers; 0 now) would feed them faster"]
    progress = [line for line in err if line.startswith("step ")]
    assert [line.rsplit("| data ", 1)[1] for line in progress] == [f"{r['data_wait']:.0%}" for r in records]


def test_decode_gpu_on_a_cpu_is_one_error_line(tmp_path, capsys):
    out = str(tmp_path / "run")
    status, err = run(["train", *TINY, "--out", out, "--decode", "gpu"], capsys)
    assert status == 1
    assert err.splitlines()[-1] == "error: --decode gpu: decodes on a CUDA device, and this run is on cpu"
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs CUDA")
def test_decode_gpu_trains_on_cuda(tiny_config, tmp_path):
    pytest.importorskip("torchvision")
    cfg = tiny_config(data=jpeg_folder(tmp_path / "images"), decode="gpu", device="cuda", compile="off",
                      batch_size=4, epochs=2, max_steps=3, num_workers=2)
    assert train(cfg) == 3
    assert all(np.isfinite(r["loss"]) and r["skipped_images"] == 0 for r in read_metrics(cfg.out))
