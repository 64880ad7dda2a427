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
TRITON_MAX_HEAD_DIM = 256


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


def _check_tensors(q, k, v, layout):
    """Type, rank, dtype and device of q, k, v; layout names the expected dims."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != len(layout):
            raise ValueError(f"{name} must have shape ({', '.join(layout)}), "
                             f"got {t.dim()} dims {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.shape[-1] == 0:
            raise ValueError(f"{name} has head_dim 0; it must be at least 1")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise RuntimeError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def _check_flags(query_sees_prefix, query_sees_self, query_sees_queries):
    for name, flag in (("query_sees_prefix", query_sees_prefix),
                       ("query_sees_self", query_sees_self),
                       ("query_sees_queries", query_sees_queries)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")


def _queries_see_nothing(num_queries, num_raw, num_prefix, query_sees_prefix, query_sees_self,
                         query_sees_queries):
    return (num_queries > 0 and num_raw == 0 and not (query_sees_prefix and num_prefix > 0)
            and not (query_sees_self or query_sees_queries))


def _check_scale(scale, head_dim):
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def check_inputs(q, k, v, num_queries, num_prefix, query_sees_prefix, query_sees_self,
                 query_sees_queries, scale):
    """Validate a call; returns the scale to use. Raises before any kernel runs."""
    _check_tensors(q, k, v, ("batch", "heads", "seq", "head_dim"))
    batch, heads, seq, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if (k.shape[0], k.shape[1], k.shape[3]) != (batch, heads, head_dim):
        raise ValueError(f"k and v must match q in batch, heads and head_dim "
                         f"({batch}, {heads}, *, {head_dim}), got {tuple(k.shape)}")
    _check_flags(query_sees_prefix, query_sees_self, query_sees_queries)

    _check_int("num_queries", num_queries, 0, seq)
    _check_int("num_prefix", num_prefix, 0, seq - num_queries)
    visible = seq - num_queries
    needs_query_keys = num_queries > 0 and (query_sees_self or query_sees_queries)
    allowed = (seq,) if needs_query_keys else (seq, visible)
    if k.shape[2] not in allowed:
        expect = (f"seq = {seq} (query_sees_self/query_sees_queries need the query keys)"
                  if needs_query_keys else f"seq = {seq} or seq - num_queries = {visible}")
        raise ValueError(f"k and v must have length {expect}, got {k.shape[2]}")
    if _queries_see_nothing(num_queries, visible - num_prefix, num_prefix, query_sees_prefix,
                            query_sees_self, query_sees_queries):
        raise ValueError("query rows would attend to nothing: there are no raw tokens "
                         "(num_prefix + num_queries == seq); set query_sees_prefix, "
                         "query_sees_self or query_sees_queries")
    return _check_scale(scale, head_dim)


def _resolve_backend(backend, q, requires_grad):
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if q.is_cuda and q.dtype in _TRITON_DTYPES and q.shape[-1] <= TRITON_MAX_HEAD_DIM:
            return "triton"
        return "sdpa"
    if backend == "triton":
        # Meta tensors trace shapes through the custom ops' fake implementations.
        if not (q.is_cuda or q.device.type == "meta"
                or (q.device.type == "cpu" and triton_interpreter_enabled())):
            raise RuntimeError(f"backend='triton' needs CUDA tensors (got device {q.device}); "
                               "set TRITON_INTERPRET=1 before importing adclr_kernels to run "
                               "the kernels on CPU in Triton's interpreter")
        if q.dtype not in _TRITON_DTYPES:
            raise TypeError(f"backend='triton' takes float16, bfloat16 or float32, got {q.dtype}")
        if q.shape[-1] > TRITON_MAX_HEAD_DIM:
            raise ValueError(f"backend='triton' supports head_dim up to {TRITON_MAX_HEAD_DIM}, "
                             f"got {q.shape[-1]}")
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


def check_varlen_inputs(q, k, v, cu_seqlens, num_queries, num_prefix, query_sees_prefix,
                        query_sees_self, query_sees_queries, scale, max_seqlen):
    """Validate a packed call. Returns (scale, contiguous cu_seqlens, num_queries as a
    contiguous int32 tensor on q's device, max_seqlen, host bounds and host query
    counts; the last two are None when the caller vouched for them with max_seqlen)."""
    _check_tensors(q, k, v, ("total_tokens", "heads", "head_dim"))
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same (total_tokens, heads, head_dim) shape, "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _check_flags(query_sees_prefix, query_sees_self, query_sees_queries)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must be a 1-D tensor of num_seqs + 1 offsets")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32 (FlashAttention's varlen layout), got {cu_seqlens.dtype}")
    if cu_seqlens.device != q.device:
        raise RuntimeError(f"cu_seqlens must be on q's device {q.device}, got {cu_seqlens.device}")
    # The kernels index these as dense arrays.
    cu_seqlens = cu_seqlens.contiguous()
    num_seqs = cu_seqlens.numel() - 1
    if isinstance(num_queries, torch.Tensor):
        if num_queries.shape != (num_seqs,) or num_queries.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"num_queries as a tensor must be a ({num_seqs},) int tensor (one "
                             f"count per sequence), got {num_queries.dtype} {tuple(num_queries.shape)}")
        if num_queries.device != q.device:
            raise RuntimeError(f"num_queries must be on q's device {q.device}, got {num_queries.device}")
        queries = num_queries
    elif isinstance(num_queries, int) and not isinstance(num_queries, bool):
        queries = torch.full((num_seqs,), num_queries, dtype=torch.int32, device=q.device)
    else:
        raise TypeError(f"num_queries must be an int or a ({num_seqs},) int tensor, "
                        f"got {type(num_queries).__name__}")
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or num_prefix < 0:
        raise TypeError(f"num_prefix must be a non-negative int, got {num_prefix!r}")

    bounds = host_queries = None
    if max_seqlen is None:
        # Checking the offsets needs them on the host: one sync. Callers that built
        # cu_seqlens themselves pass max_seqlen and skip it. Values are checked before
        # the int32 cast below, so nothing out of range wraps around.
        offsets = cu_seqlens.tolist()
        host_queries = queries.tolist()
        if offsets[0] != 0 or offsets[-1] != q.shape[0]:
            raise ValueError(f"cu_seqlens must start at 0 and end at total_tokens = {q.shape[0]}, "
                             f"got {offsets[0]} .. {offsets[-1]}")
        bounds = list(zip(offsets[:-1], offsets[1:]))
        for s, ((start, end), nq) in enumerate(zip(bounds, host_queries)):
            length = end - start
            if length < 0:
                raise ValueError(f"cu_seqlens must be non-decreasing; sequence {s} has length {length}")
            if not 0 <= nq <= length:
                raise ValueError(f"num_queries[{s}] must be in [0, {length}], got {nq}")
            if num_prefix > length - nq:
                raise ValueError(f"num_prefix ({num_prefix}) exceeds the {length - nq} visible "
                                 f"tokens of sequence {s}")
            if _queries_see_nothing(nq, length - nq - num_prefix, num_prefix, query_sees_prefix,
                                    query_sees_self, query_sees_queries):
                raise ValueError(f"query rows of sequence {s} would attend to nothing: it has no "
                                 "raw tokens; set query_sees_prefix, query_sees_self or query_sees_queries")
        max_seqlen = max((end - start for start, end in bounds), default=0)
    elif isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"max_seqlen must be a non-negative int or None, got {max_seqlen!r}")
    queries = queries.to(torch.int32).contiguous()

    return _check_scale(scale, q.shape[-1]), cu_seqlens, queries, max_seqlen, bounds, host_queries


def unidirectional_attention_varlen(q, k, v, cu_seqlens, num_queries, num_prefix=1, *,
                                    query_sees_prefix=False, query_sees_self=False,
                                    query_sees_queries=False, scale=None, max_seqlen=None,
                                    backend="auto"):
    """Unidirectional attention over sequences packed back to back (FlashAttention varlen).

    Args:
        q, k, v: (total_tokens, heads, head_dim), any strides; k and v hold every token,
            query tokens included.
        cu_seqlens: (num_seqs + 1,) int32 offsets of the sequences in total_tokens.
        num_queries: query tokens at the end of each sequence: an int, or a (num_seqs,)
            int tensor.
        num_prefix: prefix tokens at the start of every sequence.
        max_seqlen: the longest sequence. When None it is computed and the offsets are
            checked on the host (one device sync); passing it skips both, so the caller
            vouches for cu_seqlens and num_queries.
        Other arguments as in `unidirectional_attention`. No token attends across sequences.

    Returns:
        (total_tokens, heads, head_dim) tensor in q's dtype.
    """
    scale, cu_seqlens, queries, max_seqlen, bounds, host_queries = check_varlen_inputs(
        q, k, v, cu_seqlens, num_queries, num_prefix, query_sees_prefix, query_sees_self,
        query_sees_queries, scale, max_seqlen)
    requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    backend = _resolve_backend(backend, q, requires_grad)
    options = dict(query_sees_prefix=query_sees_prefix, query_sees_self=query_sees_self,
                   query_sees_queries=query_sees_queries, scale=scale)
    if backend == "triton":
        from .unidirectional import _varlen_fwd_op

        out, _ = _varlen_fwd_op(q, k, v, cu_seqlens, queries, max_seqlen, num_prefix,
                                query_sees_prefix, query_sees_self, query_sees_queries, scale)
        return out
    if bounds is None:
        offsets = cu_seqlens.tolist()
        bounds, host_queries = list(zip(offsets[:-1], offsets[1:])), queries.tolist()
    if backend == "flex":
        return reference.flex_varlen_attention(q, k, v, bounds, host_queries, num_prefix, **options)
    fn = {
        "reference": reference.reference_attention,
        "sdpa": reference.sdpa_attention,
        "xformers": reference.xformers_attention,
    }[backend]
    return reference.varlen_per_sequence(fn, q, k, v, bounds, host_queries, num_prefix, **options)
