"""Crop, resize and flip in PyTorch: Pillow's BICUBIC resampling, crop by crop, for CPU.

The arithmetic is Pillow's (`Image.resize(size, BICUBIC, box=...)`), step for step, so
the result is Pillow's to the bit (`crops.py` states the tolerance the tests hold):

- Along each axis an output pixel i has the centre `start + (i + 0.5) * scale` in the
  source, scale = box length / output length. Its taps are the source pixels within
  `support = 2 * max(scale, 1)` of the centre (Keys' cubic, a = -0.5, stretched by the
  downscale factor: the antialiasing), cut at the image's edges and normalised to sum 1.
- The normalised taps are rounded to 22-bit fixed point. The horizontal pass sums
  pixel * tap in integers, adds one half and shifts, clamps to 0..255, and the vertical
  pass reads those uint8 values: the rounding between the passes is part of the result.
- The horizontal pass comes first, unless the image loses much more height than width
  (`vertical_first`): Pillow 13's order, which moves the crops of such images by a few
  levels against the other order.

Every step is exact in float64 / int64 except the filter and its normalisation, which
repeat Pillow's double-precision operations in the same order.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images: 32 - 8 bits - 2 for overshoot
HALF = 1 << (PRECISION_BITS - 1)
SUPPORT = 2.0  # Keys' cubic is zero from |x| = 2


def bicubic(x: Tensor) -> Tensor:
    """Keys' cubic convolution kernel with a = -0.5, in Pillow's evaluation order."""
    x = x.abs()
    near = (1.5 * x - 2.5) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def float32(value) -> float:
    """`value` rounded to float32, as Pillow stores a box's coordinates."""
    return torch.tensor(float(value), dtype=torch.float32).item()


def scale_of(start: float, end: float, out_len: int) -> float:
    """Source pixels per output pixel; the box length is a float32 difference, as in Pillow."""
    length = torch.tensor(end, dtype=torch.float32) - torch.tensor(start, dtype=torch.float32)
    return length.item() / out_len


def taps(in_len: int, start: float, end: float, out_len: int):
    """Pillow's fixed-point taps along one axis: (first (out_len,), weights (out_len, K) int32).

    Output pixel i reads source pixels first[i] + k for k < K with weights[i, k] (zero
    past its own tap count). `start` and `end` must already be float32 values.
    """
    scale = scale_of(start, end, out_len)
    filterscale = max(scale, 1.0)
    support = SUPPORT * filterscale
    i = torch.arange(out_len, dtype=torch.float64)
    center = start + (i + 0.5) * scale
    # C's (int) cast truncates toward zero; a negative first tap is clamped to 0 anyway.
    first = (center - support + 0.5).to(torch.int64).clamp_(min=0)
    last = (center + support + 0.5).to(torch.int64).clamp_(max=in_len)
    count = last - first
    k = torch.arange(int(count.max()), dtype=torch.int64)
    x = (first[:, None] + k).to(torch.float64)
    w = bicubic((x - center[:, None] + 0.5) * (1.0 / filterscale))
    w = torch.where(k < count[:, None], w, torch.zeros_like(w))
    total = w.sum(1, keepdim=True)
    w = torch.where(total != 0, w / torch.where(total != 0, total, torch.ones_like(total)), w)
    fixed = w * (1 << PRECISION_BITS)
    # Round half away from zero, then truncate: Pillow's normalize_coeffs_8bpc.
    fixed = torch.where(fixed < 0, fixed - 0.5, fixed + 0.5).to(torch.int32)
    return first, fixed


def clip8(acc: Tensor) -> Tensor:
    """Fixed-point sums (with the half already added) -> uint8, as Pillow's clip8."""
    return (acc >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def resample_last(pixels: Tensor, first: Tensor, weights: Tensor) -> Tensor:
    """One pass along the last dim of uint8 `pixels` (..., in_len) -> uint8 (..., out_len)."""
    index = (first[:, None] + torch.arange(weights.shape[1])).clamp_(max=pixels.shape[-1] - 1)
    gathered = pixels[..., index].to(torch.int32)  # (..., out_len, K); clamped taps weigh 0
    return clip8((gathered * weights).sum(-1, dtype=torch.int64) + HALF)


def vertical_first(height, width, out_h, out_w):
    """Whether Pillow 13 resamples an image vertically first: when it loses more than
    twice as many rows as columns (sizes of the whole image, whatever the box)."""
    return (out_h < height) & (height - out_h > 2 * (width - out_w))


def resize_one(image: Tensor, box, out_h: int, out_w: int) -> Tensor:
    """Pillow's BICUBIC resize of `box` (left, top, right, bottom; float32 values) of one
    uint8 (C, H, W) image to (C, out_h, out_w)."""
    _, height, width = image.shape
    left, top, right, bottom = box
    if vertical_first(height, width, out_h, out_w):  # the same passes on the transpose
        return _resize(image.transpose(1, 2), (top, left, bottom, right), out_w, out_h).transpose(1, 2)
    return _resize(image, box, out_h, out_w)


def _resize(image, box, out_h, out_w):
    """Horizontal pass, then vertical."""
    _, height, width = image.shape
    left, top, right, bottom = box
    xfirst, xweights = taps(width, left, right, out_w)
    yfirst, yweights = taps(height, top, bottom, out_h)
    # Only the rows the vertical pass reads go through the horizontal one.
    row0 = int(yfirst[0])
    row1 = min(height, int(yfirst.max()) + yweights.shape[1])
    rows = resample_last(image[:, row0:row1], xfirst, xweights)  # (C, rows, out_w)
    columns = resample_last(rows.transpose(1, 2), yfirst - row0, yweights)  # (C, out_w, out_h)
    return columns.transpose(1, 2).contiguous()


def crop_resize(images, boxes: Tensor, out_h: int, out_w: int, flips, out_dtype) -> Tensor:
    """Every crop of every image, (B, n, C, out_h, out_w); see `crops.crop_resize`.

    `images`: B uint8 (C, H, W) tensors; `boxes` (B, n, 4) float32 on the host; `flips`
    (B, n) bool on the host or None.
    """
    batch, per_image = boxes.shape[:2]
    channels = images[0].shape[0] if batch else 0
    out = torch.empty(batch, per_image, channels, out_h, out_w, dtype=torch.uint8)
    for b in range(batch):
        for j in range(per_image):
            crop = resize_one(images[b].cpu(), boxes[b, j].tolist(), out_h, out_w)
            out[b, j] = crop.flip(-1) if flips is not None and flips[b, j] else crop
    out = out.to(images[0].device) if batch else out
    return out if out_dtype == torch.uint8 else out.to(torch.float32).div_(255).to(out_dtype)
