"""The public operator: input checks and the choice of backend.

Every backend computes the same function (see `reference.py` for the mask rule); this
module makes sure a call is well-formed before any of them runs, so a user gets one
clear message instead of a shape error from deep inside a kernel.
"""

from __future__ import annotations

import math
import os

import torch

from . import reference

BACKENDS = ("auto", "triton", "reference", "sdpa", "flex", "xformers")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_DTYPES = _TRITON_DTYPES + (torch.float64,)


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a broken build that fails on import
        return False
    return True


def _check_int(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}] for this input, got {value}")


def check_inputs(q, k, v, num_queries, num_prefix, query_sees_prefix, query_sees_self,
                 query_sees_queries, scale):
    """Validate a call; returns the scale to use. Raises before any kernel runs."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, seq, head_dim), "
                             f"got {t.dim()} dims {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise RuntimeError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, heads, seq, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if (k.shape[0], k.shape[1], k.shape[3]) != (batch, heads, head_dim):
        raise ValueError(f"k and v must match q in batch, heads and head_dim "
                         f"({batch}, {heads}, *, {head_dim}), got {tuple(k.shape)}")
    for name, flag in (("query_sees_prefix", query_sees_prefix),
                       ("query_sees_self", query_sees_self),
                       ("query_sees_queries", query_sees_queries)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")

    _check_int("num_queries", num_queries, 0, seq)
    _check_int("num_prefix", num_prefix, 0, seq - num_queries)
    visible = seq - num_queries
    needs_query_keys = num_queries > 0 and (query_sees_self or query_sees_queries)
    allowed = (seq,) if needs_query_keys else (seq, visible)
    if k.shape[2] not in allowed:
        expect = (f"seq = {seq} (query_sees_self/query_sees_queries need the query keys)"
                  if needs_query_keys else f"seq = {seq} or seq - num_queries = {visible}")
        raise ValueError(f"k and v must have length {expect}, got {k.shape[2]}")
    num_raw = visible - num_prefix
    if (num_queries > 0 and num_raw == 0 and not (query_sees_prefix and num_prefix > 0)
            and not needs_query_keys):
        raise ValueError("query rows would attend to nothing: there are no raw tokens "
                         "(num_prefix + num_queries == seq); set query_sees_prefix, "
                         "query_sees_self or query_sees_queries")

    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def _resolve_backend(backend, q, requires_grad):
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if q.is_cuda and q.dtype in _TRITON_DTYPES:
            return "triton"
        return "sdpa"
    if backend == "triton":
        if not (q.is_cuda or (q.device.type == "cpu" and triton_interpreter_enabled())):
            raise RuntimeError(f"backend='triton' needs CUDA tensors (got device {q.device}); "
                               "set TRITON_INTERPRET=1 before importing adclr_kernels to run "
                               "the kernels on CPU in Triton's interpreter")
        if q.dtype not in _TRITON_DTYPES:
            raise TypeError(f"backend='triton' takes float16, bfloat16 or float32, got {q.dtype}")
    if backend == "xformers":
        if not xformers_available():
            raise RuntimeError("backend='xformers' needs the xformers package "
                               "(pip install 'adclr[xformers]')")
        if not q.is_cuda:
            raise RuntimeError(f"backend='xformers' needs CUDA tensors, got device {q.device}")
    if backend == "flex" and not q.is_cuda and requires_grad:
        raise RuntimeError("backend='flex' has no backward on CPU in PyTorch; use it under "
                           "torch.no_grad() there, or pick backend='sdpa'")
    return backend


def unidirectional_attention(q, k, v, num_queries, num_prefix=1, *, query_sees_prefix=False,
                             query_sees_self=False, query_sees_queries=False, scale=None,
                             backend="auto"):
    """ADCLR unidirectional attention over `[P prefix | N raw | Q query]` tokens.

    Prefix and raw rows attend to prefix and raw columns only, so query tokens never
    change them; query rows attend to the raw columns and, by option, to the prefix
    columns, their own column or every query column.

    Args:
        q, k, v: (batch, heads, seq, head_dim) tensors, any strides. k and v may have
            length seq - num_queries when no option needs the query keys.
        num_queries: Q, the number of query tokens at the end of the sequence.
        num_prefix: P, the number of prefix tokens (CLS, registers) at the start.
        query_sees_prefix / query_sees_self / query_sees_queries: widen what query
            rows see (query_sees_queries implies query_sees_self).
        scale: score scale, default head_dim ** -0.5.
        backend: "auto", "triton", "reference", "sdpa", "flex" or "xformers".

    Returns:
        (batch, heads, seq, head_dim) tensor in q's dtype.
    """
    scale = check_inputs(q, k, v, num_queries, num_prefix, query_sees_prefix, query_sees_self,
                         query_sees_queries, scale)
    requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    backend = _resolve_backend(backend, q, requires_grad)
    options = dict(query_sees_prefix=query_sees_prefix, query_sees_self=query_sees_self,
                   query_sees_queries=query_sees_queries, scale=scale)
    if backend == "triton":
        from .unidirectional import triton_unidirectional_attention

        return triton_unidirectional_attention(q, k, v, num_queries, num_prefix, **options)
    fn = {
        "reference": reference.reference_attention,
        "sdpa": reference.sdpa_attention,
        "flex": reference.flex_attention,
        "xformers": reference.xformers_attention,
    }[backend]
    return fn(q, k, v, num_queries, num_prefix, **options)
