"""Crop, resize and flip in Triton: every crop of a batch of variable-size images, one launch.

The arithmetic is Pillow's BICUBIC resampling (see `crops_torch.py` for the steps). One
program owns one channel of one crop and a tile of its output: BLOCK_B output lines
(rows) by BLOCK_A output pixels along them (columns). It walks the source lines its
output rows read, once each:

  1. the first pass resamples the source line along the row to the tile's BLOCK_A
     columns (a gather of each column's taps, summed in 22-bit fixed point, rounded to
     uint8 as Pillow rounds between its passes);
  2. the second pass adds that line, times its weight for each output row, into the
     (BLOCK_B, BLOCK_A) integer accumulator.

So no intermediate image goes to memory and the two passes are one launch. Adjacent
row tiles both read the source lines their taps share, and the first pass of those
lines is computed twice: 2 * support lines more per tile (a quarter more for a tile of
16 rows at any scale), the price of having no second launch.

The taps are computed in the kernel, in float64 as Pillow does: first the first-pass
taps of the tile's columns, once, as a (BLOCK_A, TAPS_A) integer table; then, line by
line, the second-pass weight of that line for each output row. Keeping them in float64
matters: float32 taps differ from Pillow's in the last fixed-point bit often enough to
move about one output pixel in a thousand by one level.

An image more than 100 times taller than wide, shrunk vertically, is resampled
vertically first, as Pillow does: the program swaps the roles of the image's axes (its
strides and box sides) and writes its tile transposed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

FIXED_ONE = tl.constexpr(4194304.0)  # 1 << 22: Pillow's fixed point for 8-bit images
HALF = tl.constexpr(2097152)  # 1 << 21: one half, added before the shift rounds


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _bicubic(x):
    # Keys' cubic with a = -0.5 in Pillow's operation order, so that float64 gives
    # Pillow's taps to the last bit.
    x = tl.abs(x)
    near = (1.5 * x - 2.5) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
    return tl.where(x < 1.0, near, tl.where(x < 2.0, far, 0.0))


@triton.jit
def _axis(i, in_len, start, end, out_len):
    """(first tap, tap count, centre, 1 / filter scale) of output pixels i along one axis.

    start, end: the box's float32 sides; their difference is taken in float32, as
    Pillow's box is float32. Pixels i >= out_len get no taps.
    """
    scale = (end - start).to(tl.float64) / out_len
    filterscale = tl.maximum(scale, 1.0)
    support = 2.0 * filterscale
    center = start.to(tl.float64) + (i.to(tl.float64) + 0.5) * scale
    # float -> int truncates toward zero, as C's cast; a negative first tap is clamped.
    first = tl.maximum((center - support + 0.5).to(tl.int32), 0)
    last = tl.minimum((center + support + 0.5).to(tl.int32), in_len)
    count = tl.where(i < out_len, last - first, 0)
    return first, count, center, 1.0 / filterscale


@triton.jit
def _fixed(w, total):
    """Normalised taps in Pillow's fixed point: w / total rounded half away from zero."""
    w = w / tl.where(total != 0.0, total, 1.0)
    return tl.where(w < 0.0, w * FIXED_ONE - 0.5, w * FIXED_ONE + 0.5).to(tl.int32)


@triton.jit
def _clip8(acc):
    return tl.minimum(tl.maximum(acc >> 22, 0), 255)


@triton.jit
def _crop_resize_kernel(
    DATA, META, BOXES, FLIPS, OUT,
    crops_per_image, channels, out_h, out_w,
    TAPS_A: tl.constexpr, TAPS_B: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, FLOAT_OUT: tl.constexpr,
):
    crop_channel = tl.program_id(0)
    crop = crop_channel // channels
    channel = crop_channel % channels
    image = crop // crops_per_image

    meta = META + image.to(tl.int64) * 6
    offset = tl.load(meta)
    height = tl.load(meta + 1).to(tl.int32)
    width = tl.load(meta + 2).to(tl.int32)
    stride_c = tl.load(meta + 3)
    stride_h = tl.load(meta + 4)
    stride_w = tl.load(meta + 5)
    left = tl.load(BOXES + crop * 4)
    top = tl.load(BOXES + crop * 4 + 1)
    right = tl.load(BOXES + crop * 4 + 2)
    bottom = tl.load(BOXES + crop * 4 + 3)
    flip = tl.load(FLIPS + crop) != 0

    # Axis a is resampled first (along the rows), axis b second; normally a is the
    # image's width. A very tall image shrunk vertically goes the other way (Pillow).
    tall = (height > 100 * width) & (out_h < height)
    len_a = tl.where(tall, height, width)
    len_b = tl.where(tall, width, height)
    stride_a = tl.where(tall, stride_h, stride_w)
    stride_b = tl.where(tall, stride_w, stride_h)
    start_a = tl.where(tall, top, left)
    end_a = tl.where(tall, bottom, right)
    start_b = tl.where(tall, left, top)
    end_b = tl.where(tall, right, bottom)
    out_a = tl.where(tall, out_h, out_w)
    out_b = tl.where(tall, out_w, out_h)

    ib = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    ia = tl.program_id(2) * BLOCK_A + tl.arange(0, BLOCK_A)

    # First-pass taps of this tile's columns: one (BLOCK_A, TAPS_A) fixed-point table.
    first_a, count_a, center_a, inv_a = _axis(ia, len_a, start_a, end_a, out_a)
    ka = tl.arange(0, TAPS_A)
    has_tap = ka[None, :] < count_a[:, None]
    x = (first_a[:, None] + ka[None, :]).to(tl.float64)
    w = tl.where(has_tap, _bicubic((x - center_a[:, None] + 0.5) * inv_a), 0.0)
    taps_a = _fixed(w, tl.sum(w, 1)[:, None])
    tap_offsets = (first_a[:, None] + ka[None, :]).to(tl.int64) * stride_a

    # Second-pass weights are computed line by line below; their sums once, here.
    first_b, count_b, center_b, inv_b = _axis(ib, len_b, start_b, end_b, out_b)
    kb = tl.arange(0, TAPS_B)
    y = (first_b[:, None] + kb[None, :]).to(tl.float64)
    wb = tl.where(kb[None, :] < count_b[:, None], _bicubic((y - center_b[:, None] + 0.5) * inv_b), 0.0)
    total_b = tl.sum(wb, 1)

    source = DATA + offset + channel.to(tl.int64) * stride_c
    acc = tl.zeros((BLOCK_B, BLOCK_A), dtype=tl.int32)
    # Rows past the output (a tile past a crop whose out_h != out_w) have no taps and
    # read no line; columns past it read no pixel.
    line_lo = tl.min(tl.where(count_b > 0, first_b, len_b), 0)
    line_hi = tl.max(tl.where(count_b > 0, first_b + count_b, 0), 0)
    for line in range(line_lo, line_hi):
        pixels = tl.load(source + stride_b * line + tap_offsets, mask=has_tap, other=0)
        resampled = _clip8(tl.sum(pixels.to(tl.int32) * taps_a, 1) + HALF)
        k = line - first_b
        w_line = _bicubic((line - center_b + 0.5) * inv_b)
        w_line = _fixed(tl.where((k >= 0) & (k < count_b), w_line, 0.0), total_b)
        acc += w_line[:, None] * resampled[None, :]
    result = _clip8(acc + HALF)

    # Back from the (b, a) frame to the crop's (row, column); the flip mirrors columns.
    row = tl.where(tall, ia[None, :], ib[:, None])
    col = tl.where(tall, ib[:, None], ia[None, :])
    col = tl.where(flip, out_w - 1 - col, col)
    inside = (ib[:, None] < out_b) & (ia[None, :] < out_a)
    dest = OUT + (crop_channel.to(tl.int64) * out_h + row) * out_w + col
    if FLOAT_OUT:
        tl.store(dest, (result.to(tl.float32) / 255.0).to(OUT.dtype.element_ty), mask=inside)
    else:
        tl.store(dest, result.to(tl.uint8), mask=inside)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------

# Output rows per program: the first pass of 2 * support source lines is repeated by
# each row tile, so taller tiles waste less; 16 keeps the int32 accumulator of a
# 256-wide tile at 32 registers a thread with 4 warps.
BLOCK_ROWS = 16
# Elements of the (columns, taps) table a program keeps: wider downscales (more taps)
# get fewer columns per program, so the table stays in registers.
TABLE_ELEMENTS = 4096


def tile_shape(out_h, out_w, taps_a):
    """(BLOCK_B, BLOCK_A) of a launch whose first pass needs up to `taps_a` taps."""
    width = max(out_h, out_w)
    block_a = min(triton.next_power_of_2(width), max(16, TABLE_ELEMENTS // taps_a))
    block_b = min(BLOCK_ROWS, triton.next_power_of_2(width))
    return block_b, block_a


def _empty_out(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def crop_resize(data: Tensor, meta: Tensor, boxes: Tensor, flips: Tensor, crops_per_image: int,
                channels: int, out_h: int, out_w: int, taps_a: int, taps_b: int,
                out_dtype: torch.dtype) -> Tensor:
    """Launch the kernel on checked inputs, all on data's device.

    data: flat uint8; meta: (images, 6) int64; boxes: (crops, 4) float32; flips:
    (crops,) uint8; taps_a / taps_b: the most taps any crop needs along the axis it
    resamples first / second. Returns (crops, channels, out_h, out_w).
    """
    crops = boxes.shape[0]
    out = _empty_out((crops, channels, out_h, out_w), out_dtype, data.device)
    if crops == 0 or channels == 0:
        return out
    taps_a, taps_b = triton.next_power_of_2(taps_a), triton.next_power_of_2(taps_b)
    block_b, block_a = tile_shape(out_h, out_w, taps_a)
    width = max(out_h, out_w)
    grid = (crops * channels, triton.cdiv(width, block_b), triton.cdiv(width, block_a))
    _crop_resize_kernel[grid](
        data, meta, boxes, flips, out, crops_per_image, channels, out_h, out_w,
        TAPS_A=taps_a, TAPS_B=taps_b, BLOCK_A=block_a, BLOCK_B=block_b,
        FLOAT_OUT=out_dtype != torch.uint8)
    return out
