"""The attention shapes ADCLR trains on, and how to build the op's inputs for them.

A workload is one crop kind of one model at the batch a single GPU sees in training:
`images` per GPU times `views` crops of that kind per image. Global crops carry the Q
query tokens after the raw patches; local crops carry none (so the op is plain
attention there, and every backend competes with SDPA/flash on a short sequence).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch

# Pseudo-backend: plain, unmasked F.scaled_dot_product_attention on the same row and
# column counts. It is what the op would cost if the mask were free.
UNMASKED_SDPA = "sdpa_unmasked"
OP_BACKENDS = ("triton", "reference", "sdpa", "flex", "xformers")
BACKENDS = OP_BACKENDS + (UNMASKED_SDPA,)
MODES = ("forward", "forward+backward")

# FlashAttention's convention: the backward does 2.5x the forward's matmul FLOPs.
BACKWARD_FLOP_FACTOR = 2.5
FLOP_CONVENTION = ("useful FLOPs only: forward 4*B*H*D per visible (row, column) pair; "
                   "backward 2.5x the forward, so forward+backward is 3.5x; every "
                   "backend, the unmasked yardstick too, is credited with the same count")
INPUT_LAYOUT = ("q, k, v are strided views of one packed qkv projection (B, L, 3, H, D) "
                "permuted to (B, H, L, D), as the model calls the op; k, v hold the "
                "P + N visible keys only (default ADCLR config: query rows see raw columns)")


@dataclass(frozen=True)
class Workload:
    name: str
    label: str
    images: int      # images per GPU
    views: int       # crops of this kind per image
    heads: int
    head_dim: int
    num_prefix: int  # P: CLS (+ registers)
    num_raw: int     # N: patch tokens
    num_queries: int  # Q: query-crop tokens (global crops only)

    @property
    def batch(self) -> int:
        return self.images * self.views

    @property
    def seq_len(self) -> int:
        return self.num_prefix + self.num_raw + self.num_queries

    @property
    def key_len(self) -> int:
        # No option needs the query keys in the default config, so they are not passed.
        return self.num_prefix + self.num_raw

    @property
    def id(self) -> str:
        return f"{self.name}-b{self.batch}"

    def visible_pairs(self) -> int:
        """(row, column) pairs the op computes per (batch, head): the FLOP basis."""
        visible = self.num_prefix + self.num_raw
        return visible * visible + self.num_queries * self.num_raw

    def flops(self, mode: str) -> float:
        """Useful matmul FLOPs: QK^T and PV, 2 FLOPs per multiply-add, visible pairs only."""
        forward = 4 * self.batch * self.heads * self.head_dim * self.visible_pairs()
        return forward * (1 + BACKWARD_FLOP_FACTOR) if mode == "forward+backward" else forward

    def shape(self) -> dict:
        return dict(batch=self.batch, images=self.images, views=self.views, heads=self.heads,
                    seq_len=self.seq_len, key_len=self.key_len, head_dim=self.head_dim,
                    num_prefix=self.num_prefix, num_raw=self.num_raw,
                    num_queries=self.num_queries)

    def describe(self) -> str:
        return (f"{self.label} (B={self.batch}, H={self.heads}, L={self.seq_len}, "
                f"Lk={self.key_len}, D={self.head_dim})")


def _global(name, label, images, heads, num_raw, head_dim=64):
    return Workload(name, label, images, 2, heads, head_dim, 1, num_raw, 10)


def _local(name, label, images, heads, head_dim=64):
    # 96 px local crops of a /16 model: 6 x 6 patches; DINO/ADCLR take 10 per image.
    return Workload(name, label, images, 10, heads, head_dim, 1, 36, 0)


# Per-GPU batches of the DINO/ADCLR recipes (ViT-S 128 images, ViT-B 64, ViT-L and /8
# models 32), global crops 224 px with Q = 10 query tokens.
CUDA_WORKLOADS = (
    _global("vit_s16_global", "ViT-S/16 global", 128, 6, 196),
    _local("vit_s16_local", "ViT-S/16 local", 128, 6),
    _global("vit_b16_global", "ViT-B/16 global", 64, 12, 196),
    _local("vit_b16_local", "ViT-B/16 local", 64, 12),
    _global("vit_l16_global", "ViT-L/16 global", 32, 16, 196),
    _global("vit_s8_global", "ViT-S/8 global", 32, 6, 784),
)

@dataclass(frozen=True)
class PackedWorkload:
    """A whole multi-crop batch in one packed (varlen) call: per image, `crops` of (count,
    raw tokens, query tokens), each with one CLS token. by_image False packs every image's
    crops of one kind, then the next kind, as the trainer does (a few runs of alike
    sequences); True puts each image's crops side by side (a run per few sequences)."""
    name: str
    label: str
    images: int
    heads: int
    head_dim: int
    crops: tuple = ((2, 196, 10), (10, 36, 0))
    num_prefix: int = 1
    # Passed as FlashAttention passes a varlen batch (cu_seqlens + max_seqlen, values only
    # on the device) instead of a VarlenLayout.
    offsets: bool = False
    by_image: bool = False

    @property
    def id(self) -> str:
        return f"{self.name}-i{self.images}"

    def sequences(self):
        """(length, query tokens) of every packed sequence, in order."""
        if not self.by_image:
            return [(self.num_prefix + raw + q, q) for count, raw, q in self.crops
                    for _ in range(count * self.images)]
        one_image = [(self.num_prefix + raw + q, q) for count, raw, q in self.crops
                     for _ in range(count)]
        return one_image * self.images

    @property
    def tokens(self) -> int:
        return sum(length for length, _ in self.sequences())

    def describe(self) -> str:
        kinds = " + ".join(f"{c}x{self.num_prefix + r + q}" for c, r, q in self.crops)
        how = ", cu_seqlens + max_seqlen" if self.offsets else ""
        how += ", image by image" if self.by_image else ""
        return (f"{self.label} ({self.images} images x ({kinds}) tokens, H={self.heads}, "
                f"D={self.head_dim}{how})")


# What `python -m bench.static` models: the CUDA matrix, a head_dim 128 shape, and the
# packed multi-crop batch (ViT-S/16: 2 globals of 1 + 196 + 10 tokens and 10 locals of
# 1 + 36 per image): as the trainer packs it (two runs: the forward by the batched
# kernels; at 32 images, under the packed one-pass backward's 3072 pairs, the backward
# too), image by image (the packed kernels), and by offsets.
STATIC_WORKLOADS = CUDA_WORKLOADS + (
    _global("vit_b16_global_d128", "ViT-B/16-size global, 6 heads of 128", 64, 6, 196, head_dim=128),
    PackedWorkload("vit_s16_packed", "ViT-S/16 multi-crop, packed", 128, 6, 64),
    PackedWorkload("vit_s16_packed_small", "ViT-S/16 multi-crop, packed", 32, 6, 64),
    PackedWorkload("vit_s16_by_image", "ViT-S/16 multi-crop, packed", 128, 6, 64, by_image=True),
    PackedWorkload("varlen_multicrop", "ViT-S/16 multi-crop, FlashAttention-style", 4, 6, 64,
                   offsets=True, by_image=True),
)

# The CPU subset: the same sequence shapes at a few images, so `pytest bench/` finishes
# in a minute or two on a laptop. It shows the harness works; the speed story is on GPU.
CPU_WORKLOADS = (
    _global("vit_s16_global", "ViT-S/16 global", 4, 6, 196),
    _local("vit_s16_local", "ViT-S/16 local", 2, 6),
)


def make_qkv(workload: Workload, dtype, device, requires_grad=False, seed=0):
    """q, k, v as the model produces them: views of one packed qkv projection."""
    generator = torch.Generator(device=device).manual_seed(seed)
    w = workload
    qkv = torch.randn(w.batch, w.seq_len, 3, w.heads, w.head_dim, dtype=dtype, device=device,
                      generator=generator).requires_grad_(requires_grad)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k[:, :, :w.key_len], v[:, :, :w.key_len]


def skip_reason(backend: str, device: torch.device, mode: str) -> str | None:
    """Why this backend cannot be benchmarked here, or None when it can."""
    from adclr_kernels.backends import xformers_unavailable_reason

    cuda = device.type == "cuda"
    if backend == "triton" and not cuda:
        return ("triton needs CUDA; on CPU it only runs in Triton's interpreter "
                "(TRITON_INTERPRET=1), far too slow to be a benchmark")
    if backend == "xformers":
        reason = xformers_unavailable_reason()
        if reason:
            return reason
        if not cuda:
            return "xformers needs CUDA"
    if backend == "flex" and not cuda and mode != "forward":
        return "PyTorch has no flex_attention backward on CPU (forward only, eager)"
    return None


def device_info(device: torch.device) -> dict:
    """What a reader needs to know to trust a figure: the device and the software."""
    import triton

    info = dict(torch=torch.__version__, triton=triton.__version__, device_type=device.type)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, cuda=torch.version.cuda,
                    device_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info.update(device=_cpu_name(), cpu_threads=torch.get_num_threads(),
                    cpu_count=os.cpu_count())
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine())
