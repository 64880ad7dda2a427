"""crop_resize against Pillow's Image.resize(size, BICUBIC, box=...), both backends.

The Triton kernel runs in Triton's interpreter on CPU (tests/conftest.py). Tolerance
(adclr_kernels/crops.py): at most 1 level on any pixel, mean below 0.01 level; on these
cases both backends are exact.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from adclr_kernels import crops_triton
from adclr_kernels.crops import PackedImages, crop_resize, pack_images

from kernel_testing import DEVICE

BACKENDS = ("torch", "triton")
MAX_DIFF, MEAN_DIFF = 1, 0.01


def noise(height, width, seed=0, grey=False):
    """A uint8 (H, W, 3) array: noise, the hardest case for rounding (no flat areas)."""
    rng = np.random.default_rng([seed, height, width])
    if grey:  # an "L" image converted to RGB, as ImageFolder converts every mode
        return np.asarray(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).convert("RGB"))
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def as_tensor(array):
    """(C, H, W) view of the channels-last pixels, as data.to_tensor makes them."""
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(DEVICE)


def pillow(array, box, size, flip=False):
    out_h, out_w = (size, size) if isinstance(size, int) else size
    crop = np.asarray(Image.fromarray(array).resize((out_w, out_h), Image.BICUBIC, box=tuple(box)))
    return torch.from_numpy((crop[:, ::-1] if flip else crop).copy()).permute(2, 0, 1)


def assert_like_pillow(arrays, boxes, size, flips=None, backend="torch", images=None):
    """crop_resize of every box equals Pillow's crop within the tolerance; returns (max, mean)."""
    images = [as_tensor(a) for a in arrays] if images is None else images
    box_tensor = torch.tensor(boxes, dtype=torch.float64)
    flip_tensor = None if flips is None else torch.tensor(flips)
    got = crop_resize(images, box_tensor, size, flips=flip_tensor, backend=backend).cpu()
    want = torch.stack([torch.stack([pillow(a, box, size, bool(flips and flips[b][j]))
                                     for j, box in enumerate(boxes[b])]) for b, a in enumerate(arrays)])
    assert got.shape == want.shape and got.dtype == torch.uint8
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= MAX_DIFF and diff.float().mean() <= MEAN_DIFF, (diff.max(), diff.float().mean())
    return int(diff.max()), float(diff.float().mean())


# (image (height, width), boxes, output size): each family of the tolerance claim.
CASES = {
    "odd sizes": ((37, 53), [(0, 0, 53, 37), (5, 3, 40, 30), (1, 2, 52, 35)], (13, 13)),
    "non-square out": ((37, 53), [(2, 1, 50, 31), (0, 0, 53, 37)], (7, 11)),
    "wide image": ((3, 401), [(0, 0, 401, 3), (17, 1, 300, 3)], 9),
    "tall image": ((401, 3), [(0, 0, 3, 401), (1, 17, 3, 300), (0.5, 3.25, 2.5, 380)], 9),
    "portrait (vertical pass first)": ((61, 23), [(0, 0, 23, 61), (2.5, 7, 20, 50.25), (3, 4, 9, 12)], 7),
    "portrait, not past the rule": ((45, 23), [(0, 0, 23, 45), (2.5, 7, 20, 40.25)], 7),
    "portrait at the rule's tie (columns first)": ((20, 10), [(0, 0, 10, 20), (1.5, 2, 9, 18.5)], (8, 4)),
    "portrait a row past the tie": ((21, 10), [(0, 0, 10, 21), (1.5, 2, 9, 18.5)], (8, 4)),
    "1-pixel boxes": ((9, 13), [(0, 0, 1, 1), (12, 8, 13, 9), (6, 4, 7, 5)], 8),
    "upscales": ((20, 24), [(2, 3, 7, 7), (0, 0, 24, 20), (10.5, 4.25, 13.75, 9.5)], 16),
    "downscales by 60x to 250x": ((240, 1000), [(0, 0, 1000, 240), (100, 0, 700, 240)], 4),
    "fractional boxes": ((50, 60), [(3.3, 2.7, 40.1, 30.9), (0.1, 0.2, 59.9, 49.8), (7.5, 7.5, 52.5, 42.5)], 12),
    "integer box = size (Pillow crops)": ((30, 40), [(5, 5, 17, 17), (0, 0, 12, 12)], 12),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_like_pillow(case, backend):
    (height, width), boxes, size = CASES[case]
    assert_like_pillow([noise(height, width)], [boxes], size, backend=backend)


def random_case(rng):
    """A random image size, output size and box: fractional or whole, up- or downscaling."""
    height, width = (int(n) for n in rng.integers(1, 90, 2) * rng.choice([1, 1, 1, 5], 2))
    out_h, out_w = (int(n) for n in rng.integers(1, 40, 2))
    left, right = np.sort(rng.uniform(0, width, 2))
    top, bottom = np.sort(rng.uniform(0, height, 2))
    if rng.random() < 0.5:
        left, top, right, bottom = np.floor(left), np.floor(top), np.ceil(right), np.ceil(bottom)
    right, bottom = max(right, left + 0.01), max(bottom, top + 0.01)
    box = [float(np.float32(v)) for v in (left, top, min(right, width), min(bottom, height))]
    return (height, width), box, (out_h, out_w)


@pytest.mark.parametrize("backend,draws", [("torch", 400), ("triton", 6)])
def test_like_pillow_on_random_boxes(backend, draws):
    rng = np.random.default_rng(2024)
    for draw in range(draws):
        (height, width), box, size = random_case(rng)
        if box[2] > box[0] and box[3] > box[1]:
            assert_like_pillow([noise(height, width, seed=draw)], [[box]], size, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_of_sizes_layouts_flips_and_grey(backend):
    """One call: images of four sizes, channels-last and channels-first memory, a
    greyscale image converted to RGB, flips on some crops; also as PackedImages."""
    arrays = [noise(31, 45), noise(40, 26, grey=True), noise(17, 17, seed=1), noise(12, 70)]
    images = [as_tensor(a) for a in arrays]
    images[2] = images[2].contiguous()  # (C, H, W) memory, as torchvision decodes
    boxes = [[(0, 0, 45, 31), (3.5, 2, 40, 29)], [(1, 1, 25, 39), (0, 10, 26, 30)],
             [(0, 0, 17, 17), (8, 8, 9, 9)], [(0, 0, 70, 12), (30, 2, 50, 12)]]
    flips = [[True, False], [False, True], [True, True], [False, False]]
    assert_like_pillow(arrays, boxes, 10, flips, backend, images)
    assert_like_pillow(arrays, boxes, 10, flips, backend, pack_images(images))


def test_pack_images_keeps_each_image():
    a, b = as_tensor(noise(5, 7)), as_tensor(noise(3, 4)).contiguous()
    packed = pack_images([a, b])
    assert packed.data.numel() == a.numel() + b.numel() and packed.channels == 3
    assert packed.meta[:, 1:3].tolist() == [[5, 7], [3, 4]]
    assert torch.equal(packed.image(0), a) and torch.equal(packed.image(1), b)
    assert packed.meta[0, 3:].tolist() == [1, 21, 3] and packed.meta[1, 3:].tolist() == [12, 4, 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_out_is_uint8_over_255(backend, dtype):
    images = [as_tensor(noise(20, 30))]
    boxes = torch.tensor([[(0, 0, 30, 20), (2.5, 1, 20, 19)]])
    flips = torch.tensor([[False, True]])
    as_uint8 = crop_resize(images, boxes, 8, flips=flips, backend=backend)
    got = crop_resize(images, boxes, 8, flips=flips, out_dtype=dtype, backend=backend)
    assert got.dtype == dtype
    want = (as_uint8.float() / 255).to(dtype)
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE == "cpu":
        # Triton's interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest).
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_triton_writes_every_output_element(monkeypatch, dtype):
    """Outputs start poisoned: with two different poisons the results still agree (uint8
    has no NaN), and no float NaN survives."""
    empty = crops_triton._empty_out
    images = [as_tensor(noise(23, 29)), as_tensor(noise(40, 3))]
    boxes = torch.tensor([[(0, 0, 29, 23), (1, 2, 3, 4)], [(0, 0, 3, 40), (1, 5, 3, 30)]])
    results = []
    for poison in ((0, 255) if dtype == torch.uint8 else (float("nan"),)):
        monkeypatch.setattr(crops_triton, "_empty_out", lambda *a, p=poison: empty(*a).fill_(p))
        for size in (7, (5, 9), (9, 5)):
            results.append(crop_resize(images, boxes, size, out_dtype=dtype, backend="triton"))
    if dtype == torch.uint8:
        assert all(torch.equal(x, y) for x, y in zip(results[:3], results[3:]))
    else:
        assert all(not r.isnan().any() for r in results)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_crops(backend):
    out = crop_resize([as_tensor(noise(4, 4))], torch.zeros(1, 0, 4), 8, backend=backend)
    assert out.shape == (1, 0, 3, 8, 8)


def test_numpy_integers_are_taken_where_ints_are():
    import numpy as np

    args = good()
    plain = crop_resize(args["images"], args["boxes"], 4)
    packed = pack_images(args["images"])
    numpy_args = crop_resize(packed._replace(channels=np.int64(3)), args["boxes"], (np.int64(4), np.int32(4)))
    assert torch.equal(numpy_args, plain)


# ------------------------------------------------------------------------- bad input

def good():
    return dict(images=[as_tensor(noise(10, 12)), as_tensor(noise(8, 6))],
                boxes=torch.tensor([[(0, 0, 12, 10)], [(1, 1, 5, 7)]]), size=4)


def packed_with(**fields):
    packed = pack_images(good()["images"])
    return packed._replace(**fields)


BAD = [
    (dict(images="pixels"), TypeError, "images must be a list"),
    (dict(images=[]), ValueError, "images must hold at least one image"),
    (dict(images=[torch.zeros(3, 10, 12), torch.zeros(3, 8, 6)]), TypeError, r"images\[0\] must be uint8"),
    (dict(images=[torch.zeros(10, 12, dtype=torch.uint8)] * 2), ValueError, r"images\[0\] must have shape \(C, H, W\)"),
    (dict(images=[torch.zeros(3, 10, 12, dtype=torch.uint8), torch.zeros(1, 8, 6, dtype=torch.uint8)]),
     ValueError, r"images\[1\] has 1"),
    (dict(images=[torch.zeros(3, 0, 12, dtype=torch.uint8)] * 2), ValueError, r"images\[0\] must be at least 1x1"),
    (dict(images=[torch.zeros(0, 10, 12, dtype=torch.uint8)] * 2), ValueError,
     r"images\[0\] must have at least one channel"),
    (dict(images=packed_with(data=torch.zeros(10))), TypeError, "images.data must be a 1-D uint8"),
    (dict(images=packed_with(meta=torch.tensor([[0, 10, 12, 1, 36, 3], [361, 8, 6, 1, 18, 3]]))),
     ValueError, r"images.meta\[1\] .* does not describe"),
    (dict(images=packed_with(meta=torch.zeros(2, 5, dtype=torch.int64))), TypeError, r"images.meta must be an \(N, 6\)"),
    (dict(boxes=[[(0, 0, 12, 10)], [(1, 1, 5, 7)]]), TypeError, "boxes must be a torch.Tensor"),
    (dict(boxes=torch.ones(2, 1, 4, dtype=torch.bool)), TypeError, "boxes must hold real numbers"),
    (dict(boxes=torch.zeros(2, 4)), ValueError, r"boxes must have shape \(images=2"),
    (dict(boxes=torch.zeros(3, 1, 4)), ValueError, r"boxes must have shape \(images=2"),
    (dict(boxes=torch.tensor([[(0, 0, 13, 10)], [(1, 1, 5, 7)]])), ValueError, r"boxes\[0, 0\] .* image 0 \(12x10"),
    (dict(boxes=torch.tensor([[(0, 0, 12, 10)], [(1, 1, 5, 8.5)]])), ValueError, r"boxes\[1, 0\] .* \(6x8"),
    (dict(boxes=torch.tensor([[(-1, 0, 12, 10)], [(1, 1, 5, 7)]])), ValueError, r"boxes\[0, 0\]"),
    (dict(boxes=torch.tensor([[(0, 0, 12, 10)], [(3, 1, 3, 7)]])), ValueError, r"boxes\[1, 0\]"),
    (dict(boxes=torch.tensor([[(0, 0, 12, float("nan"))], [(1, 1, 5, 7)]])), ValueError, r"boxes\[0, 0\]"),
    (dict(size=0), ValueError, "size must be a positive int"),
    (dict(size=(4,)), ValueError, "size must be a positive int"),
    (dict(size=4.0), ValueError, "size must be a positive int"),
    (dict(flips=torch.ones(2, 1)), TypeError, "flips must be a bool tensor"),
    (dict(flips=torch.ones(2, 2, dtype=torch.bool)), ValueError, r"flips must have shape \(2, 1\)"),
    (dict(out_dtype=torch.int32), TypeError, "out_dtype must be one of"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("change,error,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_raises_naming_the_argument_before_any_kernel(monkeypatch, change, error, match):
    monkeypatch.setattr(crops_triton, "crop_resize", lambda *a, **k: pytest.fail("the kernel ran"))
    args = good() | {"backend": "triton"} | change
    with pytest.raises(error, match=match):
        crop_resize(args.pop("images"), args.pop("boxes"), args.pop("size"), **args)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("the images are on CUDA here")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA images"):
        crop_resize(**good(), backend="triton")


def test_packed_images_is_a_plain_tuple_of_tensors():
    # The DataLoader pins and ships a batch's PackedImages like any tuple of tensors.
    packed = pack_images(good()["images"])
    assert isinstance(packed, PackedImages) and packed.to("cpu").meta is packed.meta


# ------------------------------------------------------------------------- compiles for GPUs

COMPILE = """
import json, re, subprocess, sys, tempfile
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from adclr_kernels import crops_triton

capability, cases = json.loads(sys.argv[1])
bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
rows = []
for out, taps_u, taps_v, size in cases:
    block_v, block_u = crops_triton.tile_shape(size, size, taps_u)
    signature = dict(DATA="*u8", META="*i64", BOXES="*fp32", FLIPS="*u8", OUT=out, crops_per_image="i32",
                     channels="i32", out_h="i32", out_w="i32", TAPS_U="constexpr", TAPS_V="constexpr",
                     BLOCK_U="constexpr", BLOCK_V="constexpr", FLOAT_OUT="constexpr")
    constexprs = dict(TAPS_U=taps_u, TAPS_V=taps_v, BLOCK_U=block_u, BLOCK_V=block_v, FLOAT_OUT=out != "*u8")
    kernel = triton.compile(ASTSource(crops_triton._crop_resize_kernel, signature, constexprs),
                            target=GPUTarget("cuda", capability, 32),
                            options=dict(num_warps=4, enable_fp_fusion=False))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.cubin").write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(bin_dir / "cuobjdump"), "-res-usage", str(Path(tmp) / "k.cubin")],
                               capture_output=True, text=True, check=True).stdout
    # Bytes spilled, and what would round unlike Pillow: approximate division, fused float64 FMAs.
    rows.append([int(re.search(r"LOCAL:(\\d+)", usage).group(1)),
                 sorted(set(re.findall(r"div\\.approx\\.f32|fma\\.rn\\.f64", kernel.asm["ptx"])))])
print(json.dumps(rows))
"""

# (output pointer type, taps in the first pass, in the second, crop size): ADCLR's three
# crop sizes at their usual scales, float outputs, and a 60x downscale.
COMPILE_CASES = [("*u8", 8, 8, 224), ("*fp32", 8, 8, 224), ("*bf16", 16, 16, 96), ("*u8", 128, 128, 16)]


@pytest.mark.parametrize("capability", [80, 90])
def test_kernel_compiles_for_gpus_without_spilling(capability):
    """The interpreter accepts code the GPU compiler rejects, and computes exactly where
    a GPU may not: compile ahead of time, down to ptxas, in a fresh process (this one's
    kernels are the interpreter's); no spills, no approximate division, no float64 FMA."""
    pytest.importorskip("triton.compiler", reason="needs Triton's ahead-of-time API").ASTSource
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", COMPILE, json.dumps([capability, COMPILE_CASES])],
                          env={**os.environ, "TRITON_INTERPRET": "0"}, cwd=root,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [[0, []]] * len(COMPILE_CASES)
