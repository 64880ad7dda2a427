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
lines is computed twice: 4 * scale lines more per tile (a quarter more for a tile of
16 rows at any scale), the price of having no second launch.

The taps are computed in the kernel, in float64 as Pillow does: the first-pass taps of
the tile's outputs once, as a (BLOCK_U, TAPS_U) integer table; the second-pass weight
of each line for each output line as the loop reaches it. Keeping them in float64
matters: float32 taps differ from Pillow's in the last fixed-point bit often enough to
move about one output pixel in a thousand by one level. For the same reason the launch
turns off the fusion of a multiply and an add into one FMA: each float64 operation
then rounds as Pillow's C code rounds it.

An image that loses more than twice as many rows as columns is resampled vertically
first, as Pillow 13 does: its programs swap the roles of the image's axes (strides,
box sides, output sizes) and write their tile transposed.
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
    TAPS_U: tl.constexpr, TAPS_V: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr, FLOAT_OUT: tl.constexpr,
):
    crop_channel = tl.program_id(0)
    crop = crop_channel // channels
    channel = crop_channel % channels
    meta = META + (crop // crops_per_image).to(tl.int64) * 6
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

    # The first pass runs along axis u, the second along v: u is the width, unless the
    # image loses more than twice as many rows as columns (Pillow 13's order; see
    # crops_torch.vertical_first), when the roles swap.
    vertical_first = (out_h < height) & (height - out_h > 2 * (width - out_w))
    len_u = tl.where(vertical_first, height, width)
    len_v = tl.where(vertical_first, width, height)
    stride_u = tl.where(vertical_first, stride_h, stride_w)
    stride_v = tl.where(vertical_first, stride_w, stride_h)
    start_u = tl.where(vertical_first, top, left)
    end_u = tl.where(vertical_first, bottom, right)
    start_v = tl.where(vertical_first, left, top)
    end_v = tl.where(vertical_first, right, bottom)
    out_u = tl.where(vertical_first, out_h, out_w)
    out_v = tl.where(vertical_first, out_w, out_h)
    vs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    us = tl.program_id(2) * BLOCK_U + tl.arange(0, BLOCK_U)

    # First-pass taps of this tile's outputs along u: one (BLOCK_U, TAPS_U) table.
    # Outputs past the crop's have no taps and read no pixel.
    first_u, count_u, center_u, inv_u = _axis(us, len_u, start_u, end_u, out_u)
    ku = tl.arange(0, TAPS_U)
    has_tap = ku[None, :] < count_u[:, None]
    u = first_u[:, None] + ku[None, :]
    w = tl.where(has_tap, _bicubic((u.to(tl.float64) - center_u[:, None] + 0.5) * inv_u), 0.0)
    taps_u = _fixed(w, tl.sum(w, 1)[:, None])
    tap_offsets = u.to(tl.int64) * stride_u

    # Second-pass weights are computed line by line below; their sums once, here.
    first_v, count_v, center_v, inv_v = _axis(vs, len_v, start_v, end_v, out_v)
    kv = tl.arange(0, TAPS_V)
    v = (first_v[:, None] + kv[None, :]).to(tl.float64)
    w = tl.where(kv[None, :] < count_v[:, None], _bicubic((v - center_v[:, None] + 0.5) * inv_v), 0.0)
    total_v = tl.sum(w, 1)

    # Every source line (along u) the tile's outputs read, once; none for a tile past
    # the crop's outputs (when out_h != out_w).
    source = DATA + offset + channel.to(tl.int64) * stride_c
    acc = tl.zeros((BLOCK_V, BLOCK_U), dtype=tl.int32)
    line_lo = tl.min(tl.where(count_v > 0, first_v, len_v), 0)
    line_hi = tl.max(tl.where(count_v > 0, first_v + count_v, 0), 0)
    for line in range(line_lo, line_hi):
        pixels = tl.load(source + stride_v * line + tap_offsets, mask=has_tap, other=0)
        resampled = _clip8(tl.sum(pixels.to(tl.int32) * taps_u, 1) + HALF)
        k = line - first_v
        w_line = _bicubic((line - center_v + 0.5) * inv_v)
        w_line = _fixed(tl.where((k >= 0) & (k < count_v), w_line, 0.0), total_v)
        acc += w_line[:, None] * resampled[None, :]
    result = _clip8(acc + HALF)

    # Back from the (v, u) frame to the crop's (row, column); a flip mirrors columns.
    row = tl.where(vertical_first, us[None, :], vs[:, None])
    col = tl.where(vertical_first, vs[:, None], us[None, :])
    col = tl.where(flip, out_w - 1 - col, col)
    dest = OUT + (crop_channel.to(tl.int64) * out_h + row) * out_w + col
    inside = (vs[:, None] < out_v) & (us[None, :] < out_u)
    if FLOAT_OUT:
        # Rounded division (a plain `/` is div.approx on a GPU): exactly torch's uint8 / 255.
        value = tl.math.div_rn(result.to(tl.float32), tl.full(result.shape, 255.0, tl.float32))
        tl.store(dest, value.to(OUT.dtype.element_ty), mask=inside)
    else:
        tl.store(dest, result.to(tl.uint8), mask=inside)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------

# Output lines per program: each tile repeats the first pass of the 2 * support source
# lines it shares with the next, so taller tiles waste less; 16 keeps the int32
# accumulator of a 256-wide tile at 32 registers a thread (4 warps).
BLOCK_LINES = 16
# Elements of the (outputs, taps) table a program keeps: stronger downscales (more taps)
# get fewer outputs per program, so that the table stays in registers.
TABLE_ELEMENTS = 4096


def tile_shape(out_h, out_w, taps_u):
    """(BLOCK_V, BLOCK_U) of a launch whose first pass needs up to `taps_u` taps.

    A program's tile is (lines, outputs along them) in its image's frame, which is
    transposed for images resampled vertically first: both sides cover the larger of
    out_h, out_w, and tiles past a crop's output do nothing.
    """
    side = triton.next_power_of_2(max(out_h, out_w))
    return min(BLOCK_LINES, side), min(side, max(16, TABLE_ELEMENTS // taps_u))


def _empty_out(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def crop_resize(data: Tensor, meta: Tensor, boxes: Tensor, flips: Tensor, crops_per_image: int,
                channels: int, out_h: int, out_w: int, taps_u: int, taps_v: int,
                out_dtype: torch.dtype) -> Tensor:
    """Launch the kernel on checked inputs, all on data's device.

    data: flat uint8; meta: (images, 6) int64; boxes: (crops, 4) float32; flips:
    (crops,) uint8; taps_u / taps_v: the most taps any crop needs in its first /
    second pass. Returns (crops, channels, out_h, out_w).
    """
    crops = boxes.shape[0]
    out = _empty_out((crops, channels, out_h, out_w), out_dtype, data.device)
    if crops == 0:
        return out
    taps_u, taps_v = triton.next_power_of_2(taps_u), triton.next_power_of_2(taps_v)
    block_v, block_u = tile_shape(out_h, out_w, taps_u)
    side = max(out_h, out_w)
    grid = (crops * channels, triton.cdiv(side, block_v), triton.cdiv(side, block_u))
    _crop_resize_kernel[grid](
        data, meta, boxes, flips, out, crops_per_image, channels, out_h, out_w,
        TAPS_U=taps_u, TAPS_V=taps_v, BLOCK_U=block_u, BLOCK_V=block_v,
        FLOAT_OUT=out_dtype != torch.uint8, enable_fp_fusion=False)
    return out
