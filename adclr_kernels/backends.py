"""Backend names, what can run here, and the one rule that picks a backend for a call.

Every op family (unidirectional attention, the DINO head loss, the crops) has a Triton
backend and PyTorch ones; `resolve` turns the caller's choice ("auto" or a name) into the
backend that runs, or raises, naming the reason, before anything is launched.
"""

from __future__ import annotations

import os
import re

import torch

BACKENDS = ("auto", "triton", "reference", "sdpa", "flex", "xformers")  # unidirectional attention
DINO_LOSS_BACKENDS = ("auto", "triton", "torch")                        # dino_head_loss
CROPS_BACKENDS = ("auto", "triton", "torch")                            # crop_resize
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLOAT_DTYPES = TRITON_DTYPES + (torch.float64,)
TRITON_MAX_DIM = 256  # the widest head (attention) or feature row (DINO loss) the kernels take


# PyPI has Triton for Linux only (torch's CUDA builds there bring it). Without it, or with
# one older than the kernels are tested with, the PyTorch backends run, "auto" picks them,
# and backend="triton" says why it cannot (TRITON_PROBLEM). 3.6 is the floor: 3.5.1's
# compiler fails on one of the kernels for sm_80, and 3.3 has no triton.knobs.
TRITON_FLOOR = (3, 6)
try:
    import triton  # (the kernels' modules import it next)

    _release = re.match(r"(\d+)\.(\d+)", getattr(triton, "__version__", ""))
    # A version it cannot read (a source build's) is taken at its word: the kernels may run.
    _version = tuple(int(n) for n in _release.groups()) if _release else TRITON_FLOOR
    TRITON_PROBLEM = None if _version >= TRITON_FLOOR else (
        f"needs triton {'.'.join(map(str, TRITON_FLOOR))} or later, and {triton.__version__} is installed here "
        "(torch 2.10 and later bring one with their CUDA builds)")
except ImportError:
    TRITON_PROBLEM = ("needs the triton package, which is not installed here (PyPI has it for Linux, "
                      "where torch's CUDA builds bring it: pip install triton)")
TRITON_AVAILABLE = TRITON_PROBLEM is None


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton makes a kernel interpreted or compiled when it is defined, at import: setting
# TRITON_INTERPRET later does not make this package's kernels run on CPU.
INTERPRETED_AT_IMPORT = triton_interpreter_enabled()


def xformers_unavailable_reason() -> str | None:
    """Why the xformers backend cannot run here, or None when it can.

    A wheel built for another torch or CUDA imports fine but loads none of its CUDA
    kernels (seen: PyPI's xformers 0.0.35 beside torch 2.11+cu130), and every call would
    then fail deep inside xformers' dispatcher.
    """
    try:
        import xformers
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a broken build that fails on import
        return "xformers is not installed (pip install 'adclr[xformers]')"
    cpp = getattr(xformers, "_cpp_lib", None)
    if not getattr(xformers, "_has_cpp_library", True) or not getattr(cpp, "_built_with_cuda", True):
        return (f"xformers {getattr(xformers, '__version__', '?')} is installed but its CUDA "
                f"kernels did not load (built for another torch/CUDA than torch {torch.__version__}; "
                "`python -m xformers.info` says which)")
    return None


def xformers_available() -> bool:
    return xformers_unavailable_reason() is None


def check_backend_name(backend, known=BACKENDS):
    """The one error for a backend name the op does not know (adapters check early)."""
    if not isinstance(backend, str) or backend not in known:
        raise ValueError(f"backend must be one of {known}, got {backend!r}")


def check_triton_device(device, what="tensors"):
    """Raise unless Triton kernels can run on `device`: CUDA, meta (shapes traced through
    the custom ops' fake implementations), or CPU in Triton's interpreter."""
    if not TRITON_AVAILABLE:
        raise RuntimeError(f"backend='triton' {TRITON_PROBLEM}; the PyTorch backends run without it")
    if device.type == "cpu" and triton_interpreter_enabled() and not INTERPRETED_AT_IMPORT:
        raise RuntimeError("backend='triton' on CPU: TRITON_INTERPRET=1 was set after "
                           "adclr_kernels was imported, when its kernels were already made "
                           "for the GPU; set it before importing adclr_kernels")
    if not (device.type in ("cuda", "meta")
            or (device.type == "cpu" and triton_interpreter_enabled())):
        raise RuntimeError(f"backend='triton' needs CUDA {what} (got device {device}); "
                           "set TRITON_INTERPRET=1 before importing adclr_kernels to run "
                           "the kernels on CPU in Triton's interpreter")


def resolve(backend, x, *, known=BACKENDS, fallback="sdpa", dtype=None, dim_name="head_dim",
            requires_grad=False):
    """The backend a call on x runs on.

    "auto" is Triton for CUDA inputs it takes (dtype, last dimension), `fallback`
    elsewhere. dtype: the dtype the kernels would see (default x's; the DINO loss passes
    the autocast dtype). dim_name names x's last dimension in the errors.
    """
    check_backend_name(backend, known)
    dtype = x.dtype if dtype is None else dtype
    dim = x.shape[-1]
    if backend == "auto":
        if TRITON_AVAILABLE and x.is_cuda and dtype in TRITON_DTYPES and dim <= TRITON_MAX_DIM:
            return "triton"
        return fallback
    if backend == "triton":
        check_triton_device(x.device)
        if dtype not in TRITON_DTYPES:
            raise TypeError(f"backend='triton' takes float16, bfloat16 or float32, got {dtype}")
        if dim > TRITON_MAX_DIM:
            raise ValueError(f"backend='triton' supports {dim_name} up to {TRITON_MAX_DIM}, got {dim}")
    if backend == "xformers":
        reason = xformers_unavailable_reason()
        if reason:
            raise RuntimeError(f"backend='xformers' cannot run: {reason}")
        if not x.is_cuda:
            raise RuntimeError(f"backend='xformers' needs CUDA tensors, got device {x.device}")
    if backend == "flex" and not x.is_cuda and requires_grad:
        raise RuntimeError("backend='flex' has no backward on CPU in PyTorch; use it under "
                           "torch.no_grad() there, or pick backend='sdpa'")
    return backend
