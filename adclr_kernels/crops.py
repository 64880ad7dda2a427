"""Cut, flip and resize crops of variable-size uint8 images, as Pillow's BICUBIC does.

    crops = crop_resize(images, boxes, 224, flips=flips)   # (B, n, C, 224, 224) uint8

`images` are B uint8 (C, H, W) images of any sizes, as a list or as one `PackedImages`
(a flat buffer with per-image offsets, sizes and strides, the form a data loader ships
to the device in one copy). `boxes[b, j]` is crop j of image b, (left, top, right,
bottom) in that image's pixels, fractional or not. Crop j of image b is exactly

    Image.resize((width, height), Image.BICUBIC, box=boxes[b, j])

of image b, mirrored left-right where flips[b, j] is set (as a horizontal flip of the
crop would), each channel resampled on its own as Pillow resamples an "L" or "RGB"
image (Pillow's "RGBA" and "LA" resizes premultiply by alpha, and differ). That is
antialiased bicubic resampling: Keys' cubic (a = -0.5) stretched by the downscale factor,
so a crop shrunk 10x averages over 40 source pixels, never aliasing. All crops of one size take one kernel launch on CUDA.

Tolerance: at most 1 level on any pixel and a mean difference below 0.01 level from
Pillow 13's result. Measured in the tests, both backends (Triton in its interpreter)
match it exactly (max difference 0) on every case: downscales up to 250x, upscales,
1-pixel boxes, fractional boxes, odd sizes, very tall and very wide images, flips, and
random images, boxes and output sizes. The margin is for float64 taps summed in
another order than Pillow's, whose last bit can then differ: a tap within 1e-9 of a
rounding boundary would round the other way.

The passes run in Pillow 13's order: horizontal first, unless the image loses more
than twice as many rows as columns (`crops_torch.vertical_first`). Pillow 12 orders
them otherwise for some images, and its crops of those differ by a few levels.

Float outputs are the uint8 result / 255 (in float32, then rounded to `out_dtype`):
the [0, 1] images the photometric augmentations take.

Backends: "triton" (CUDA, or CPU tensors under TRITON_INTERPRET=1), "torch" (any
device; computes on the CPU, crop by crop), "auto" (triton for CUDA images, else
torch).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Sequence, Union

import torch

from . import crops_torch
from .backends import CROPS_BACKENDS as BACKENDS
from .backends import TRITON_AVAILABLE, check_backend_name, check_triton_device

if TRITON_AVAILABLE:  # else "auto" never picks it, and backend="triton" raises
    from . import crops_triton

Tensor = torch.Tensor

OUT_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)


class PackedImages(NamedTuple):
    """Variable-size uint8 images in one flat buffer.

    data: (total,) uint8, on any device. meta: (N, 6) int64 on the host, one row per
    image: offset of its first byte in data, height, width, and the strides (in bytes)
    of its channel, row and column. channels: C, the same for every image.

    Build one with `pack_images`; `.to(device)` moves the pixels and keeps the
    metadata on the host, where the op checks it against the boxes without a device
    synchronisation.
    """

    data: Tensor
    meta: Tensor
    channels: int

    def to(self, device, non_blocking=False):
        return PackedImages(self.data.to(device, non_blocking=non_blocking), self.meta, self.channels)

    def pin_memory(self):
        return PackedImages(self.data.pin_memory(), self.meta, self.channels)

    def image(self, i: int) -> Tensor:
        """Image i as a (C, H, W) view of data."""
        offset, height, width, sc, sh, sw = self.meta[i].tolist()
        return self.data.as_strided((self.channels, height, width), (sc, sh, sw), offset)


def pack_images(images: Sequence[Tensor], out: Tensor | None = None) -> PackedImages:
    """One flat copy of uint8 (C, H, W) images, each kept in its own memory order.

    An image decoded channels-last (Pillow, numpy) and viewed as (C, H, W) packs as
    channels-last, a (C, H, W)-contiguous one (torchvision's decoders) as it is: either
    way the copy is one memcpy per image. out: the 1-D uint8 buffer to fill, of the
    images' total size (e.g. in shared memory); default a new one.
    """
    images = list(images)
    _check_image_list(images)
    flats, meta, offset = [], [], 0
    for image in images:
        order = sorted(range(3), key=lambda d: image.stride(d), reverse=True)
        flat = image.permute(order).contiguous()
        strides = [0, 0, 0]
        for position, dim in enumerate(order):
            strides[dim] = flat.stride(position)
        flats.append(flat.reshape(-1))
        meta.append([offset, image.shape[1], image.shape[2], *strides])
        offset += flat.numel()
    if out is not None and (out.dtype != torch.uint8 or out.shape != (offset,)):
        raise ValueError(f"out must be a 1-D uint8 tensor of the images' {offset} bytes, "
                         f"got {out.dtype} {tuple(out.shape)}")
    data = torch.cat(flats, out=out)
    meta = torch.tensor(meta, dtype=torch.int64).view(-1, 6)
    return PackedImages(data, meta, images[0].shape[0])


# ----------------------------------------------------------------------------------------
# Input checks: every one runs on the host, before any kernel.
# ----------------------------------------------------------------------------------------


def _check_image_list(images):
    if not images:
        raise ValueError("images must hold at least one image")
    for i, image in enumerate(images):
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"images[{i}] must be a torch.Tensor, got {type(image).__name__}")
        if image.dtype != torch.uint8:
            raise TypeError(f"images[{i}] must be uint8, got {image.dtype}")
        if image.dim() != 3:
            raise ValueError(f"images[{i}] must have shape (C, H, W), got {tuple(image.shape)}")
        if image.shape[1] < 1 or image.shape[2] < 1:
            raise ValueError(f"images[{i}] must be at least 1x1 pixels, got {tuple(image.shape)}")
        if image.shape[0] < 1:
            raise ValueError(f"images[{i}] must have at least one channel, got {tuple(image.shape)}")
        if image.shape[0] != images[0].shape[0]:
            raise ValueError(f"every image must have the channels of images[0] ({images[0].shape[0]}), "
                             f"images[{i}] has {image.shape[0]}")
        if image.device != images[0].device:
            raise RuntimeError(f"every image must be on images[0]'s device ({images[0].device}), "
                               f"images[{i}] is on {image.device}")


def _check_packed(images: PackedImages):
    data, meta, channels = images
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        raise TypeError(f"images.data must be a 1-D uint8 tensor, got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {tuple(getattr(data, 'shape', ()))}")
    if not data.is_contiguous():
        raise ValueError("images.data must be contiguous")
    if (not isinstance(meta, torch.Tensor) or meta.dtype != torch.int64 or meta.device.type != "cpu"
            or meta.dim() != 2 or meta.shape[1] != 6):
        raise TypeError(f"images.meta must be an (N, 6) int64 tensor on the host, got "
                        f"{getattr(meta, 'dtype', type(meta).__name__)} {tuple(getattr(meta, 'shape', ()))} "
                        f"on {getattr(meta, 'device', '?')}")
    if meta.shape[0] == 0:
        raise ValueError("images must hold at least one image")
    if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels < 1:
        raise ValueError(f"images.channels must be a positive int, got {channels!r}")
    channels = int(channels)
    offset, height, width, strides = meta[:, 0], meta[:, 1], meta[:, 2], meta[:, 3:]
    bad = (height < 1) | (width < 1) | (offset < 0) | (strides < 0).any(1)
    extent = torch.stack([torch.full_like(height, channels), height, width], 1) - 1
    last = offset + (extent * strides).sum(1)
    bad |= last >= data.numel()
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"images.meta[{i}] = {meta[i].tolist()} (offset, height, width, strides) "
                         f"does not describe a {channels}-channel image inside images.data "
                         f"({data.numel()} bytes)")


def _check_size(size):
    pair = (size, size) if isinstance(size, numbers.Integral) and not isinstance(size, bool) else size
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in pair)):
        raise ValueError(f"size must be a positive int or an (height, width) pair of them, got {size!r}")
    return tuple(int(s) for s in pair)


def _check_boxes(boxes, sizes, device):
    """boxes as host float32 (B, n, 4), each inside its image. sizes: (B, 2) host (H, W)."""
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"boxes must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dtype == torch.bool or boxes.is_complex():
        raise TypeError(f"boxes must hold real numbers, got {boxes.dtype}")
    if boxes.dim() != 3 or boxes.shape[0] != sizes.shape[0] or boxes.shape[2] != 4:
        raise ValueError(f"boxes must have shape (images={sizes.shape[0]}, crops per image, 4), "
                         f"got {tuple(boxes.shape)}")
    if boxes.device.type != "cpu" and boxes.device != device:
        raise RuntimeError(f"boxes must be on the host or on the images' device ({device}), got {boxes.device}")
    # Pillow keeps a box in float32; so do the kernels. (A device tensor is read back.)
    host = boxes.detach().to("cpu", torch.float32)
    left, top, right, bottom = host.unbind(-1)
    height, width = sizes[:, None, 0].float(), sizes[:, None, 1].float()
    bad = ~torch.isfinite(host).all(-1)
    bad |= (left < 0) | (top < 0) | (right > width) | (bottom > height) | (right <= left) | (bottom <= top)
    if bad.any():
        b, j = bad.nonzero()[0].tolist()
        raise ValueError(f"boxes[{b}, {j}] = {host[b, j].tolist()} must satisfy 0 <= left < right <= width "
                         f"and 0 <= top < bottom <= height of image {b} ({int(sizes[b, 1])}x{int(sizes[b, 0])} "
                         "pixels, width x height)")
    return host


def _check_flips(flips, boxes, device):
    if flips is None:
        return None
    if not isinstance(flips, torch.Tensor) or flips.dtype != torch.bool:
        raise TypeError(f"flips must be a bool tensor or None, got "
                        f"{getattr(flips, 'dtype', type(flips).__name__)}")
    if flips.shape != boxes.shape[:2]:
        raise ValueError(f"flips must have shape {tuple(boxes.shape[:2])} (one per box), got {tuple(flips.shape)}")
    if flips.device.type != "cpu" and flips.device != device:
        raise RuntimeError(f"flips must be on the host or on the images' device ({device}), got {flips.device}")
    return flips


def _resolve_backend(backend, device):
    check_backend_name(backend, BACKENDS)
    if backend == "auto":
        return "triton" if TRITON_AVAILABLE and device.type == "cuda" else "torch"
    if backend == "triton":
        check_triton_device(device, "images")
    return backend


def _most_taps(boxes, sizes, out_h, out_w):
    """The most taps any crop needs in its first pass, and in its second."""
    def taps(length, out_len, in_len):
        scale = length.double() / out_len
        support = 2.0 * scale.clamp(min=1.0)
        return torch.minimum(torch.ceil(support).long() * 2 + 1, in_len)

    height, width = sizes[:, None, 0], sizes[:, None, 1]
    along_x = taps(boxes[..., 2] - boxes[..., 0], out_w, width)
    along_y = taps(boxes[..., 3] - boxes[..., 1], out_h, height)
    swap = crops_torch.vertical_first(height, width, out_h, out_w)
    first, second = torch.where(swap, along_y, along_x), torch.where(swap, along_x, along_y)
    return int(first.max()), int(second.max())


# ----------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------


def crop_resize(images: Union[PackedImages, Sequence[Tensor]], boxes: Tensor, size, *,
                flips: Tensor | None = None, out_dtype: torch.dtype = torch.uint8,
                backend: str = "auto") -> Tensor:
    """Crops of B images, cut, resized (Pillow's BICUBIC) and flipped: (B, n, C, H, W).

    Args:
        images: B uint8 (C, H, W) tensors, or a `PackedImages` of them; on one device.
        boxes: (B, n, 4) real tensor: boxes[b, j] = (left, top, right, bottom) of crop j
            of image b in its pixels, 0 <= left < right <= width, 0 <= top < bottom <=
            height; fractional values are rounded to float32, as Pillow does. On the
            host, or on the images' device (then read back once for the checks).
        size: the crops' size, an int (square) or (height, width).
        flips: optional (B, n) bool: mirror crop j of image b left-right.
        out_dtype: torch.uint8 (0..255), or float16 / bfloat16 / float32 (value / 255).
        backend: "auto", "triton" or "torch" (see the module docstring).

    Returns (B, n, C, height, width) on the images' device. Every argument is checked
    before any kernel runs; a bad one raises naming it.
    """
    if isinstance(images, PackedImages):
        _check_packed(images)
        packed, device, sizes = images, images.data.device, images.meta[:, 1:3]
    elif isinstance(images, (list, tuple)):
        _check_image_list(images)
        packed, device = None, images[0].device
        sizes = torch.tensor([list(image.shape[1:]) for image in images], dtype=torch.int64)
    else:
        raise TypeError(f"images must be a list of uint8 (C, H, W) tensors or a PackedImages, "
                        f"got {type(images).__name__}")
    out_h, out_w = _check_size(size)
    host_boxes = _check_boxes(boxes, sizes, device)
    flips = _check_flips(flips, boxes, device)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {[str(d) for d in OUT_DTYPES]}, got {out_dtype}")
    backend = _resolve_backend(backend, device)
    batch, per_image = host_boxes.shape[:2]
    channels = packed.channels if packed is not None else images[0].shape[0]
    if per_image == 0:
        return torch.empty(batch, 0, channels, out_h, out_w, dtype=out_dtype, device=device)

    if backend == "torch":
        views = [packed.image(i) for i in range(batch)] if packed is not None else list(images)
        host_flips = flips.cpu() if flips is not None else None
        return crops_torch.crop_resize(views, host_boxes, out_h, out_w, host_flips, out_dtype)

    packed = packed if packed is not None else pack_images(images)
    taps_u, taps_v = _most_taps(host_boxes, sizes, out_h, out_w)
    flips = (flips if flips is not None else torch.zeros(batch, per_image, dtype=torch.bool))
    out = crops_triton.crop_resize(
        packed.data, packed.meta.to(device, non_blocking=True),
        host_boxes.view(-1, 4).to(device, non_blocking=True),
        flips.reshape(-1).to(device=device, dtype=torch.uint8, non_blocking=True),
        per_image, channels, out_h, out_w, taps_u, taps_v, out_dtype)
    return out.view(batch, per_image, channels, out_h, out_w)


__all__ = ["BACKENDS", "OUT_DTYPES", "PackedImages", "crop_resize", "pack_images"]
