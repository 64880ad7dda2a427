"""DecodeOnlyDataset: today's boxes, and today's crops once cut by crop_resize; the
`--decode` paths of the training process (DeviceCrops, JpegDecoder).

MultiCropDataset (decode, then 22 Pillow resizes per image in the loader) is the
reference: the decode-only path must draw the same boxes for the same sample seed and,
with crop_resize cutting them, give the same crops (adclr_kernels/crops.py's tolerance:
at most 1 level, mean below 0.01; here exact). The GPU decode path is checked here with
Pillow standing in for nvJPEG, and on CUDA with nvJPEG itself.
"""

import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import adclr.data as data
from adclr.data import (DecodeOnlyDataset, DeviceCrops, ImageFolder, MultiCropDataset, StepBatches,
                        SyntheticShapes, TorchStream, collate_decoded, cut_crops, decode, decode_mode,
                        default_num_workers, random_resized_box, random_resized_box_from, replacement)

SIZES = dict(image_size=32, local_size=16, patch_size=8, num_local_crops=3, num_queries=4)


def natural(height, width, seed=0):
    """uint8 (H, W, 3) with a photograph's falling spectrum (1/f), so JPEG behaves as on photos."""
    rng = np.random.default_rng([seed, height, width])
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    f = np.maximum(np.hypot(fx, fy), 1 / max(height, width))
    spectra = rng.normal(size=(3, height, width // 2 + 1)) + 1j * rng.normal(size=(3, height, width // 2 + 1))
    planes = np.fft.irfft2((spectra + spectra[0]) / f, s=(height, width))
    planes = (planes - planes.mean()) / planes.std()
    return np.clip(planes.transpose(1, 2, 0) * 45 + 120, 0, 255).astype(np.uint8)


def save(path, array, mode="RGB", **options):
    image = Image.fromarray(array)
    if mode == "I;16":
        image = Image.fromarray(array[..., 0].astype(np.uint16) * 257).convert("I;16")
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path, **options)
    return path


@pytest.fixture
def folder(tmp_path):
    """Files of every kind ImageFolder meets: JPEG (RGB, grey, CMYK), PNG (16-bit, palette,
    RGBA), BMP; odd sizes, a tall image (resampled vertically first), a tiny one (upscaled)."""
    root = tmp_path / "images"
    root.mkdir()
    files = [("a.jpg", (50, 37), "RGB"), ("b.jpg", (73, 37), "L"), ("c.jpg", (41, 60), "CMYK"),
             ("d.png", (45, 39), "I;16"), ("e.png", (33, 64), "P"), ("f.png", (37, 41), "RGBA"),
             ("g.bmp", (6, 5), "RGB"), ("h.jpg", (150, 20), "RGB")]
    for i, (name, (height, width), mode) in enumerate(files):
        options = dict(quality=90) if name.endswith(".jpg") else {}
        save(root / name, natural(height, width, i), mode, **options)
    return ImageFolder(str(root))


def todays(base, items, monkeypatch):
    """MultiCropDataset's items, and the box of every crop it cut (in drawing order)."""
    boxes, crop = [], data.crop
    monkeypatch.setattr(data, "crop", lambda image, box, size: boxes.append(box) or crop(image, box, size))
    dataset = MultiCropDataset(base, **SIZES)
    return [dataset[item] for item in items], boxes


@pytest.mark.parametrize("source", ["folder", "builtin"])
def test_same_boxes_and_crops_as_multicrop(source, folder, monkeypatch):
    base = folder if source == "folder" else SyntheticShapes("train", length=8)
    items = [(i, 1000 + 7 * i) for i in range(len(base))]
    reference, boxes = todays(base, items, monkeypatch)
    decoded = DecodeOnlyDataset(base, **SIZES, draft=False)
    samples = [decoded[item] for item in items]
    drawn = [tuple(box) for s in samples
             for key in ("global_boxes", "local_boxes", "query_boxes") for box in (s[key] * s["reduction"]).tolist()]
    assert drawn == [tuple(float(v) for v in box) for box in boxes]

    crops = cut_crops(collate_decoded(samples), 32, 16, 8, flip=False)
    for key in ("globals", "locals", "queries"):
        want = torch.stack([r[key] for r in reference])
        assert crops[key].shape == want.shape and crops[key].dtype == torch.uint8
        diff = (crops[key].int() - want.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() <= 0.01, (key, diff.max(), diff.float().mean())


def test_torch_stream_draws_torch_generators_numbers():
    """Sizes from 1 pixel (every draw fails: the centre square) to past 2**24 (the
    modulo of one word is still torch.randint's), seeds past 2**32."""
    rng = np.random.default_rng(0)
    stream = TorchStream()
    for trial in range(400):
        width, height = (int(n) for n in rng.integers(1, [40, 3000, 2 ** 25][trial % 3], 2))
        scale = tuple(sorted(rng.uniform(0.01, 1.0, 2)))
        seed = int(rng.integers(0, 2 ** 63))
        g, stream = torch.Generator().manual_seed(seed), stream.seed(seed)
        for _ in range(6):
            assert random_resized_box_from(width, height, scale, stream) == random_resized_box(width, height, scale, g)
        assert stream.rand(5) == torch.rand(5, generator=g).tolist()
    # Either side of the largest side TorchStream serves, the dataset's boxes and flips are torch's.
    dataset = DecodeOnlyDataset(SyntheticShapes(), **SIZES)
    for width in (TorchStream.MAX_RANGE - 1, TorchStream.MAX_RANGE):
        g = torch.Generator().manual_seed(7)
        want = [[random_resized_box(width, 3, scale, g) for _ in range(n)]
                for scale, n in (((0.4, 1.0), 2), ((0.05, 0.4), 3), ((0.05, 0.15), 4))]
        *boxes, global_flips, local_flips = dataset.boxes(width, 3, 7)
        assert boxes == want
        assert torch.equal(torch.cat([global_flips, local_flips]), torch.rand(5, generator=g) < 0.5)


def test_flips_come_after_the_boxes_and_mirror_the_crops(folder):
    dataset = DecodeOnlyDataset(folder, **SIZES, draft=False)
    batch = collate_decoded([dataset[(i, 5 + i)] for i in range(len(folder))])
    flips = torch.cat([batch["global_flips"], batch["local_flips"]], 1)
    assert flips.shape == (len(folder), 5) and 0 < flips.float().mean() < 1
    flipped, plain = cut_crops(batch, 32, 16, 8), cut_crops(batch, 32, 16, 8, flip=False)
    for key, kind in (("globals", "global_flips"), ("locals", "local_flips")):
        mirrored = torch.where(batch[kind][..., None, None, None], plain[key].flip(-1), plain[key])
        assert torch.equal(flipped[key], mirrored)
    assert torch.equal(flipped["queries"], plain["queries"])  # the same query pixels for both views


def test_draft_decodes_large_jpegs_reduced_with_the_same_boxes(tmp_path, monkeypatch):
    root = tmp_path / "large"
    root.mkdir()
    save(root / "a.jpg", natural(480, 640), quality=90)
    save(root / "b.png", natural(480, 640, 1))  # not a JPEG: always whole
    base = ImageFolder(str(root))
    reference, boxes = todays(base, [(0, 3), (1, 3)], monkeypatch)
    dataset = DecodeOnlyDataset(base, **SIZES)
    jpeg, png = dataset[(0, 3)], dataset[(1, 3)]
    r = jpeg["reduction"]
    assert r in (2, 4, 8) and jpeg["image"].shape == (3, -(-480 // r), -(-640 // r))
    assert png["reduction"] == 1 and png["image"].shape == (3, 480, 640)
    drawn = [tuple(box) for key in ("global_boxes", "local_boxes", "query_boxes")
             for box in (jpeg[key] * r).tolist()]
    assert drawn == [tuple(float(v) for v in box) for box in boxes[:9]]
    # Every crop keeps at least twice its output's size in the reduced image ...
    for key, size in (("global_boxes", 32), ("local_boxes", 16), ("query_boxes", 8)):
        sides = torch.minimum(jpeg[key][:, 2] - jpeg[key][:, 0], jpeg[key][:, 3] - jpeg[key][:, 1])
        assert (sides >= 2 * size).all()
    # ... and differs from Pillow's crop of the full image by the reduction's own filter only.
    crops = cut_crops(collate_decoded([jpeg]), 32, 16, 8, flip=False)
    for key in ("globals", "locals", "queries"):
        diff = (crops[key][0].float() - reference[0][key].float()).abs()
        assert diff.mean() < 1 and diff.max() <= 8, (key, diff.mean(), diff.max())
    # A crop that would fall under its output size forbids the reduction.
    small = DecodeOnlyDataset(base, **(SIZES | dict(image_size=400)))
    assert small[(0, 3)]["reduction"] == 1


def test_bad_files_are_skipped_and_counted_as_today(folder, tmp_path, monkeypatch):
    (tmp_path / "images" / "0.jpg").write_bytes(b"not an image")  # sorts first: index 0
    base = ImageFolder(str(tmp_path / "images"))
    second = base.samples[replacement(0, 1, len(base))][0]  # the file image 0's sample tries next
    truncated = open(second, "rb").read()
    open(second, "wb").write(truncated[: len(truncated) // 3])
    reference, _ = todays(base, [(0, 1)], monkeypatch)
    item = DecodeOnlyDataset(base, **SIZES, draft=False)[(0, 1)]
    assert item["skipped"] == reference[0]["skipped"] == 2 and item["index"] == 0
    crops = cut_crops(collate_decoded([item]), 32, 16, 8, flip=False)
    assert torch.equal(crops["globals"][0], reference[0]["globals"])
    # Too large for Pillow (a decompression bomb): skipped by both.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    assert DecodeOnlyDataset(base, **SIZES)[(2, 1)]["skipped"] == MultiCropDataset(base, **SIZES)[(2, 1)]["skipped"]
    for name in [p.name for p in (tmp_path / "images").iterdir()]:
        (tmp_path / "images" / name).write_bytes(b"")
    nothing = ImageFolder(str(tmp_path / "images"))  # nothing readable: both say so alike
    item, reference = DecodeOnlyDataset(nothing, **SIZES)[(0, 1)], MultiCropDataset(nothing, **SIZES)[(0, 1)]
    assert (item["readable"], item["skipped"]) == (reference["readable"], reference["skipped"]) == (False, len(nothing))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_loader_cuts_the_crops_of_the_uninterrupted_one(folder, workers):
    dataset = DecodeOnlyDataset(folder, **SIZES)

    def crops_from(start, steps):
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=StepBatches(len(folder), 4, 9, start_step=start),
                                             collate_fn=collate_decoded, num_workers=workers)
        batches = iter(loader)
        return [cut_crops(next(batches), 32, 16, 8) for _ in range(steps)]

    uninterrupted, resumed = crops_from(0, 3), crops_from(2, 1)
    assert all(torch.equal(uninterrupted[2][key], resumed[0][key]) for key in ("globals", "locals", "queries"))
    assert not torch.equal(uninterrupted[1]["globals"], uninterrupted[2]["globals"])


# --------------------------------------------------------------------------- the --decode paths

BOXES = ("global_boxes", "local_boxes", "query_boxes", "global_flips", "local_flips")
RGB_JPEGS = ("a.jpg", "h.jpg")  # the fixture's files nvJPEG decodes as Pillow does: RGB JPEGs


def items_of(base):
    return [(i, 1000 + 7 * i) for i in range(len(base))]


def test_encoded_items_hold_the_file_and_the_decode_paths_boxes(folder, tmp_path):
    encoded = DecodeOnlyDataset(folder, **SIZES, encoded=True)
    decoded = DecodeOnlyDataset(folder, **SIZES, draft=False)
    for item in items_of(folder):
        a, b = encoded[item], decoded[item]
        assert all(torch.equal(a[key], b[key]) for key in BOXES)
        path = folder.samples[item[0]][0]
        if path.endswith(RGB_JPEGS):  # the bytes, boxes drawn on the header's size
            with open(path, "rb") as f:
                assert bytes(a["encoded"].numpy()) == f.read()
            assert "image" not in a and a["reduction"] == 1
        else:  # grey and CMYK JPEGs, PNG, BMP: decoded in the worker as before
            assert "encoded" not in a and torch.equal(a["image"], b["image"])
    # A JPEG cut short is decoded, so found unreadable and skipped, as without `encoded`.
    whole = (tmp_path / "images" / "a.jpg").read_bytes()
    (tmp_path / "images" / "a.jpg").write_bytes(whole[: len(whole) // 2])
    assert encoded[(0, 1)]["skipped"] == decoded[(0, 1)]["skipped"] == 1


def pillow_for_nvjpeg(rejected=()):
    """decode_jpegs as Pillow would decode them, on the CPU, failing the call for a file
    whose bytes are in `rejected`, as nvJPEG fails the batch for one file it rejects."""
    def decode_jpegs(jpegs, device, stream):
        files = [bytes(jpeg.numpy()) for jpeg in jpegs]
        if any(f in rejected for f in files):
            raise RuntimeError("Error while decoding JPEG images: nvjpegDecode failed")
        return [decode(Image.open(io.BytesIO(f)))[0].contiguous() for f in files]
    return decode_jpegs


@pytest.mark.parametrize("rejected", ["pillow reads it", "pillow cannot read it either"])
def test_gpu_path_cuts_the_cpu_paths_crops_and_decodes_rejected_files_on_the_cpu(
        rejected, folder, tmp_path, monkeypatch, capsys):
    items = items_of(folder)
    batch = collate_decoded([DecodeOnlyDataset(folder, **SIZES, encoded=True)[item] for item in items])
    assert batch["is_encoded"].sum() == 2 and batch["images"].meta.shape[0] == len(items) - 2
    bad = tmp_path / "images" / "a.jpg"  # index 0
    monkeypatch.setattr(data, "decode_jpegs", pillow_for_nvjpeg(rejected=[bad.read_bytes()]))
    if rejected == "pillow cannot read it either":  # a file changed since the worker read it
        bad.write_bytes(b"not an image any more")
    crops = DeviceCrops(DecodeOnlyDataset(folder, **SIZES, encoded=True), "cpu")
    got = crops(batch)

    # The CPU path's crops, of the files as they are now: a.jpg skipped if unreadable.
    cpu = collate_decoded([DecodeOnlyDataset(folder, **SIZES)[item] for item in items])
    want = DeviceCrops(DecodeOnlyDataset(folder, **SIZES), "cpu")(cpu)
    assert all(torch.equal(got[key], want[key]) for key in ("globals", "locals", "queries"))
    assert torch.equal(batch["skipped"], cpu["skipped"])
    assert batch["skipped"][0] == (1 if rejected == "pillow cannot read it either" else 0)
    assert crops.jpegs.rejected == 1
    assert f"warning: nvJPEG cannot decode {folder.samples[0][0]};" in capsys.readouterr().err


def test_device_crops_are_the_unflipped_crops_of_each_path(folder):
    items = items_of(folder)
    pillow = MultiCropDataset(folder, **SIZES)
    crops = DeviceCrops(pillow, "cpu")(torch.utils.data.default_collate([pillow[item] for item in items]))
    decoded = DecodeOnlyDataset(folder, **SIZES)
    cut = DeviceCrops(decoded, "cpu")(collate_decoded([decoded[item] for item in items]))
    assert all(torch.equal(crops[key], cut[key]) for key in ("globals", "locals", "queries"))


def test_decode_modes_and_what_gpu_needs(monkeypatch):
    assert decode_mode("auto", "cpu") == "pillow" and decode_mode("auto", "cuda") == "cpu"
    assert decode_mode("cpu", "cpu") == "cpu" and decode_mode("pillow", "cuda:1") == "pillow"
    with pytest.raises(ValueError, match="decodes on a CUDA device, and this run is on cpu"):
        decode_mode("gpu", "cpu")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # not installed
    with pytest.raises(ValueError, match=r"needs torchvision .*pip install torchvision"):
        decode_mode("gpu", "cuda")


@pytest.mark.parametrize("cores,world,local,workers", [(2, 1, None, 1), (16, 1, None, 15), (64, 1, None, 63),
                                                       (64, 8, None, 7), (4, 8, None, 1), (64, 16, 8, 7),
                                                       (64, 16, 16, 3), (64, 1, 8, 63)])
def test_default_workers_use_every_core_but_one_per_process(cores, world, local, workers, monkeypatch):
    """Shared by the processes on this machine: two nodes of 8 (LOCAL_WORLD_SIZE 8, world 16)
    give each process the workers of a one-node run of 8."""
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    assert default_num_workers(world) == workers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs CUDA")
def test_nvjpeg_crops_are_close_to_pillows(folder, tmp_path):
    """On CUDA, the real decoder: its images differ from libjpeg's by its own IDCT and
    chroma upsampling, so the crops are close, not equal."""
    pytest.importorskip("torchvision")
    data.check_gpu_decode(torch.device("cuda"))
    for i, (height, width) in enumerate([(375, 500), (333, 501), (64, 47)]):
        save(tmp_path / "images" / f"z{i}.jpg", natural(height, width, i), quality=90)
    base = ImageFolder(str(tmp_path / "images"))
    items = items_of(base)
    batch = collate_decoded([DecodeOnlyDataset(base, **SIZES, encoded=True)[item] for item in items])
    crops = DeviceCrops(DecodeOnlyDataset(base, **SIZES, encoded=True), "cuda")
    got = crops(batch)
    cpu = collate_decoded([DecodeOnlyDataset(base, **SIZES, draft=False)[item] for item in items])
    want = DeviceCrops(DecodeOnlyDataset(base, **SIZES, draft=False), "cpu")(cpu)
    assert crops.jpegs.rejected == 0
    for key in ("globals", "locals", "queries"):
        diff = (got[key].cpu().float() - want[key].float()).abs()
        assert diff.mean() < 2, (key, diff.mean(), diff.max())
