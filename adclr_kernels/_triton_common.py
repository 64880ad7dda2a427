"""What the Triton kernels of both op families share: the dot product and its precision
modes, head padding, the device's compute capability and shared memory."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .backends import triton_interpreter_enabled

LOG2E = 1.4426950408889634


@triton.jit
def dot(a, b, DOT: tl.constexpr):
    # "native": the inputs' own tensor-core path (bf16, fp16). Otherwise both operands
    # go to fp32 and DOT is Triton's input precision: "ieee" (exact; also how bf16 runs
    # in the interpreter, whose bf16 dot is wrong), "tf32x3" or "tf32" (fp32 inputs, as
    # torch's float32 matmul precision allows).
    if DOT == "native":
        return tl.dot(a, b)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT)


@triton.jit
def log2(x, APPROX: tl.constexpr):
    # APPROX: the hardware's approximate log2 (one MUFU.LG2, absolute error about 2^-22)
    # instead of libdevice's log2f, a polynomial of about 30 instructions per value. Only
    # CUDA's libdevice has it; the interpreter runs no libdevice call.
    if APPROX:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


ROWSUM_N = tl.constexpr(16)  # the narrowest product tl.dot takes


@triton.jit
def ones_in_column_zero(ROWS: tl.constexpr, dtype: tl.constexpr):
    """E, (ROWS, ROWSUM_N): ones in column 0, zeros beside. Column 0 of P @ E is P's row
    sum, made on the tensor cores (16-bit P, fp32 sums) where a row sum costs an add per
    element of P; the zeros keep the other columns' sum exact."""
    return ((tl.arange(0, ROWS)[:, None] >= 0)
            & (tl.arange(0, ROWSUM_N)[None, :] == 0)).to(dtype)


def approx_log2():
    """Whether `log2` may take the approximate path here (a compiled CUDA kernel)."""
    return not triton_interpreter_enabled() and torch.version.hip is None


def dot_mode(dtype):
    """The `dot` flavour for these inputs (see `dot`)."""
    if dtype == torch.float32:
        # torch's own rule for float32 matmuls: "highest" keeps fp32 accuracy (three
        # TF32 products), "high" and "medium" allow one TF32 product.
        return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    if dtype == torch.bfloat16 and triton_interpreter_enabled():
        return "ieee"
    return "native"


def block_d(dim):
    # tl.dot needs every dimension >= 16; other widths are padded inside the kernels.
    return max(16, triton.next_power_of_2(dim))


# The most shared memory one program may use, by compute capability: A100 (sm_80) 163 KB,
# consumer Ampere and Ada (sm_86, sm_89) 99 KB, H100 (sm_90) 227 KB.
SHARED_MEMORY_PER_PROGRAM = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def device_capability(device):
    """Compute capability (e.g. 90) the kernels are compiled for on this device."""
    if device.type != "cuda":
        return 90  # the interpreter, and meta tensors: Hopper's tiles
    capability = _CAPABILITY.get(device)
    if capability is None:  # asked once per device: every launch needs it
        major, minor = torch.cuda.get_device_capability(device)
        capability = _CAPABILITY[device] = 10 * major + minor
    return capability


_CAPABILITY = {}
