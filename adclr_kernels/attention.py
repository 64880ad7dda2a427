"""The public operator: input checks and the choice of backend.

Every backend computes the same function (see `reference.py` for the mask rule); this
module makes sure a call is well-formed before any of them runs, so a user gets one
clear message instead of a shape error from deep inside a kernel.
"""

from __future__ import annotations

import itertools
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
    if scale < 0:
        # The kernels keep the running maximum of unscaled scores; a negative scale
        # would turn it into a minimum. No attention uses one.
        raise ValueError(f"scale must be >= 0, got {scale}")
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


def check_backend_name(backend):
    """The one error for a backend name the op does not know (adapters check early)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _resolve_backend(backend, q, requires_grad):
    check_backend_name(backend)
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
        reason = xformers_unavailable_reason()
        if reason:
            raise RuntimeError(f"backend='xformers' cannot run: {reason}")
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
        from .unidirectional import triton_attention

        return triton_attention(q, k, v, num_queries, num_prefix, **options)
    return _DENSE[backend](q, k, v, num_queries, num_prefix, **options)


_DENSE = {
    "reference": reference.reference_attention,
    "sdpa": reference.sdpa_attention,
    "flex": reference.flex_attention,
    "xformers": reference.xformers_attention,
}


def _check_qkv(qkv, layout):
    """A packed qkv projection output: (..., 3, heads, head_dim) with `layout` leading dims."""
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    dims = (*layout, "3", "heads", "head_dim")
    if qkv.dim() != len(dims) or qkv.shape[-3] != 3:
        raise ValueError(f"qkv must have shape ({', '.join(dims)}), got {tuple(qkv.shape)}")


def unidirectional_attention_qkvpacked(qkv, num_queries, num_prefix=1, *, query_sees_prefix=False,
                                       query_sees_self=False, query_sees_queries=False,
                                       scale=None, backend="auto"):
    """`unidirectional_attention` on the output of one qkv projection, as a ViT makes it.

    Args:
        qkv: (batch, seq, 3, heads, head_dim), e.g. `self.qkv(x).view(B, L, 3, H, D)`;
            any strides.
        Other arguments as in `unidirectional_attention`.

    Returns:
        (batch, seq, heads, head_dim), so `.reshape(batch, seq, -1)` is free. With the
        Triton backend the gradient reaches qkv as one tensor written by the kernel:
        autograd stacks and copies nothing.
    """
    _check_qkv(qkv, ("batch", "seq"))
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scale = check_inputs(q, k, v, num_queries, num_prefix, query_sees_prefix, query_sees_self,
                         query_sees_queries, scale)
    backend = _resolve_backend(backend, q, torch.is_grad_enabled() and qkv.requires_grad)
    options = dict(query_sees_prefix=query_sees_prefix, query_sees_self=query_sees_self,
                   query_sees_queries=query_sees_queries, scale=scale)
    if backend == "triton":
        from .unidirectional import triton_qkvpacked_attention

        return triton_qkvpacked_attention(qkv, num_queries, num_prefix, **options)
    return _DENSE[backend](q, k, v, num_queries, num_prefix, **options).transpose(1, 2)


class VarlenLayout:
    """Where packed sequences sit in a (total_tokens, ...) batch, checked once on the host.

    Pass it as `cu_seqlens` to the varlen ops. Built once per batch layout (a trainer's
    crop layout is the same every step, and every layer shares it), it is never checked
    or copied to the device again, and the Triton kernels launch exactly one program per
    (sequence, row block) that has work, from tile tables built here on first use.

    Args:
        seqlens: length of every sequence, in order (host ints).
        num_queries: query tokens at the end of each sequence: one int for all, or one
            per sequence.
        device: where the offsets and tile tables live.
    """

    def __init__(self, seqlens, num_queries=0, device=None):
        self.seqlens = [_host_int("seqlens", n, 0) for n in seqlens]
        if isinstance(num_queries, int):
            num_queries = [num_queries] * len(self.seqlens)
        self.queries = [_host_int("num_queries", n, 0) for n in num_queries]
        if len(self.queries) != len(self.seqlens):
            raise ValueError(f"num_queries must have one count per sequence "
                             f"({len(self.seqlens)}), got {len(self.queries)}")
        for s, (length, nq) in enumerate(zip(self.seqlens, self.queries)):
            if nq > length:
                raise ValueError(f"num_queries[{s}] must be in [0, {length}], got {nq}")
        offsets = [0, *itertools.accumulate(self.seqlens)]
        if offsets[-1] >= 2**31:
            raise ValueError(f"{offsets[-1]} tokens do not fit int32 offsets")
        self.total_tokens = offsets[-1]
        self.max_seqlen = max(self.seqlens, default=0)
        self.cu_seqlens = torch.tensor(offsets, dtype=torch.int32,
                                       device=device if device is not None else "cpu")
        self.num_queries = torch.tensor(self.queries, dtype=torch.int32, device=self.device)
        self._tiles = {}
        self._checked = set()

    @property
    def device(self):
        # The tensors' own device: "cuda" given here reads back as "cuda:0", which is
        # what a tensor on it reports, so the device checks compare like with like.
        return self.cu_seqlens.device

    @classmethod
    def from_offsets(cls, offsets, num_queries=0, device=None):
        """The layout of cu_seqlens-style offsets given on the host."""
        if offsets[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
        lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
        for s, length in enumerate(lengths):
            if length < 0:
                raise ValueError(f"cu_seqlens must be non-decreasing; sequence {s} has length {length}")
        return cls(lengths, num_queries, device)

    def tiles(self, block):
        """(tiles, 2) int32 table of every (sequence, block of `block` rows) with rows."""
        if block not in self._tiles:
            pairs = [(s, j) for s, n in enumerate(self.seqlens) for j in range(-(-n // block))]
            self._tiles[block] = torch.tensor(pairs, dtype=torch.int32,
                                              device=self.device).view(-1, 2)
        return self._tiles[block]

    def check(self, num_prefix, query_sees_prefix, query_sees_self, query_sees_queries):
        """Every sequence has room for the prefix, and every query row sees something."""
        key = (num_prefix, query_sees_prefix, query_sees_self, query_sees_queries)
        if key in self._checked:
            return
        for s, (length, nq) in enumerate(zip(self.seqlens, self.queries)):
            if num_prefix > length - nq:
                raise ValueError(f"num_prefix ({num_prefix}) exceeds the {length - nq} visible "
                                 f"tokens of sequence {s}")
            if _queries_see_nothing(nq, length - nq - num_prefix, num_prefix, query_sees_prefix,
                                    query_sees_self, query_sees_queries):
                raise ValueError(f"query rows of sequence {s} would attend to nothing: it has no "
                                 "raw tokens; set query_sees_prefix, query_sees_self or query_sees_queries")
        self._checked.add(key)

    def bounds(self):
        """(start, end) of every sequence."""
        ends = list(itertools.accumulate(self.seqlens))
        return list(zip([0] + ends[:-1], ends))

    def __repr__(self):
        return (f"VarlenLayout({len(self.seqlens)} sequences, {self.total_tokens} tokens, "
                f"max_seqlen={self.max_seqlen}, device={self.device})")


def _host_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must hold ints >= {low}, got {value!r}")
    return value


def _check_device_offsets(cu_seqlens, queries, total_tokens, num_prefix, query_sees_prefix,
                          query_sees_self, query_sees_queries):
    """The checks of `VarlenLayout`, on the device and without a sync: a bad value fails
    the next synchronising call (at once on CPU)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    torch._assert_async((cu_seqlens[0] == 0) & (cu_seqlens[-1] == total_tokens),
                        f"cu_seqlens must start at 0 and end at total_tokens = {total_tokens}")
    torch._assert_async((lengths >= 0).all(), "cu_seqlens must be non-decreasing")
    torch._assert_async(((queries >= 0) & (queries <= lengths)).all(),
                        "num_queries[i] must be in [0, length of sequence i]")
    raw = lengths - queries - num_prefix
    torch._assert_async((raw >= 0).all(), f"num_prefix ({num_prefix}) exceeds the visible "
                                          "tokens of a sequence")
    if not (query_sees_self or query_sees_queries or (query_sees_prefix and num_prefix > 0)):
        torch._assert_async(((queries == 0) | (raw > 0)).all(),
                            "query rows of a sequence would attend to nothing: it has no raw "
                            "tokens; set query_sees_prefix, query_sees_self or query_sees_queries")


def check_varlen_inputs(q, k, v, cu_seqlens, num_queries, num_prefix, query_sees_prefix,
                        query_sees_self, query_sees_queries, scale, max_seqlen):
    """Validate a packed call. Returns (scale, layout, triton_layout): the VarlenLayout
    (None when the caller gave cu_seqlens and max_seqlen, which are then checked on the
    device, no sync), and what the Triton ops take: (cu_seqlens, num_queries tensor,
    max_seqlen, forward tiles, backward tiles)."""
    _check_tensors(q, k, v, ("total_tokens", "heads", "head_dim"))
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same (total_tokens, heads, head_dim) shape, "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _check_flags(query_sees_prefix, query_sees_self, query_sees_queries)
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or num_prefix < 0:
        raise TypeError(f"num_prefix must be a non-negative int, got {num_prefix!r}")
    flags = (query_sees_prefix, query_sees_self, query_sees_queries)
    scale = _check_scale(scale, q.shape[-1])

    if isinstance(cu_seqlens, VarlenLayout):
        layout = cu_seqlens
        if num_queries is not None:
            raise ValueError("num_queries comes from the VarlenLayout; pass None")
        if max_seqlen is not None and max_seqlen != layout.max_seqlen:
            raise ValueError(f"max_seqlen comes from the VarlenLayout ({layout.max_seqlen}); "
                             f"got {max_seqlen}")
        if layout.total_tokens != q.shape[0]:
            raise ValueError(f"the VarlenLayout holds {layout.total_tokens} tokens, q has {q.shape[0]}")
        if layout.device != q.device:
            raise RuntimeError(f"the VarlenLayout is on {layout.device}, q on {q.device}")
        layout.check(num_prefix, *flags)
        return scale, layout, _triton_layout(layout, q)

    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must be a 1-D tensor of num_seqs + 1 offsets, or a VarlenLayout")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32 (FlashAttention's varlen layout), got {cu_seqlens.dtype}")
    if cu_seqlens.device != q.device:
        raise RuntimeError(f"cu_seqlens must be on q's device {q.device}, got {cu_seqlens.device}")
    num_seqs = cu_seqlens.numel() - 1
    if isinstance(num_queries, torch.Tensor):
        if num_queries.shape != (num_seqs,) or num_queries.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"num_queries as a tensor must be a ({num_seqs},) int tensor (one "
                             f"count per sequence), got {num_queries.dtype} {tuple(num_queries.shape)}")
        if num_queries.device != q.device:
            raise RuntimeError(f"num_queries must be on q's device {q.device}, got {num_queries.device}")
    elif isinstance(num_queries, bool) or not isinstance(num_queries, int):
        raise TypeError(f"num_queries must be an int or a ({num_seqs},) int tensor, "
                        f"got {type(num_queries).__name__}")

    if max_seqlen is None:
        # Checking the offsets needs them on the host: one sync. Callers that cannot
        # afford it pass max_seqlen (checked on the device) or, better, a VarlenLayout.
        queries = num_queries.tolist() if isinstance(num_queries, torch.Tensor) else num_queries
        offsets = cu_seqlens.tolist()
        if offsets[0] != 0 or offsets[-1] != q.shape[0]:
            raise ValueError(f"cu_seqlens must start at 0 and end at total_tokens = {q.shape[0]}, "
                             f"got {offsets[0]} .. {offsets[-1]}")
        layout = VarlenLayout.from_offsets(offsets, queries, q.device)
        layout.check(num_prefix, *flags)
        return scale, layout, _triton_layout(layout, q)

    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"max_seqlen must be a non-negative int or None, got {max_seqlen!r}")
    if max_seqlen == 0 and q.shape[0] > 0:
        raise ValueError(f"max_seqlen is 0 but there are {q.shape[0]} tokens")
    cu_seqlens = cu_seqlens.contiguous()
    if isinstance(num_queries, torch.Tensor):
        # Values past int32 fail the range check below instead of wrapping around.
        queries = num_queries.clamp(-1, 2**31 - 1).to(torch.int32).contiguous()
    else:
        queries = torch.full((num_seqs,), num_queries, dtype=torch.int32, device=q.device)
    _check_device_offsets(cu_seqlens, queries, q.shape[0], num_prefix, *flags)
    torch._assert_async((cu_seqlens[1:] - cu_seqlens[:-1] <= max_seqlen).all(),
                        f"max_seqlen ({max_seqlen}) is smaller than the longest sequence")
    return scale, None, (cu_seqlens, queries, max_seqlen, None, None)


def _triton_layout(layout, q):
    from .unidirectional import tile_blocks

    fwd_block, bwd_block = tile_blocks(q.shape[-1], q.dtype, q.device, layout.max_seqlen)
    return (layout.cu_seqlens, layout.num_queries, layout.max_seqlen, layout.tiles(fwd_block),
            layout.tiles(bwd_block))


def _varlen_peer(backend, q, k, v, layout, triton_layout, num_prefix, options):
    """A PyTorch backend over packed sequences (host offsets needed: one sync if not known)."""
    if layout is None:
        cu_seqlens, queries = triton_layout[:2]
        layout = VarlenLayout.from_offsets(cu_seqlens.tolist(), queries.tolist(), q.device)
    bounds, queries = layout.bounds(), layout.queries
    if backend == "flex":
        return reference.flex_varlen_attention(q, k, v, bounds, queries, num_prefix, **options)
    return reference.varlen_per_sequence(_DENSE[backend], q, k, v, bounds, queries, num_prefix,
                                         **options)


def unidirectional_attention_varlen(q, k, v, cu_seqlens, num_queries=None, num_prefix=1, *,
                                    query_sees_prefix=False, query_sees_self=False,
                                    query_sees_queries=False, scale=None, max_seqlen=None,
                                    backend="auto"):
    """Unidirectional attention over sequences packed back to back (FlashAttention varlen).

    Args:
        q, k, v: (total_tokens, heads, head_dim), any strides; k and v hold every token,
            query tokens included.
        cu_seqlens: a `VarlenLayout` (then num_queries and max_seqlen come from it: the
            fast path), or (num_seqs + 1,) int32 offsets of the sequences.
        num_queries: with offsets, the query tokens at the end of each sequence: an int,
            or a (num_seqs,) int tensor.
        num_prefix: prefix tokens at the start of every sequence.
        max_seqlen: with offsets, the longest sequence. When None the offsets are read and
            checked on the host (one device sync); when given they are checked on the
            device, without a sync (an error then surfaces at the next synchronising call;
            on CUDA a failed device assert ends the process's CUDA context).
        Other arguments as in `unidirectional_attention`. No token attends across sequences.

    Returns:
        (total_tokens, heads, head_dim) tensor in q's dtype.
    """
    if num_queries is None and not isinstance(cu_seqlens, VarlenLayout):
        num_queries = 0
    scale, layout, triton_layout = check_varlen_inputs(
        q, k, v, cu_seqlens, num_queries, num_prefix, query_sees_prefix, query_sees_self,
        query_sees_queries, scale, max_seqlen)
    requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    backend = _resolve_backend(backend, q, requires_grad)
    options = dict(query_sees_prefix=query_sees_prefix, query_sees_self=query_sees_self,
                   query_sees_queries=query_sees_queries, scale=scale)
    if backend == "triton":
        from .unidirectional import triton_attention

        return triton_attention(q, k, v, 0, num_prefix, layout=triton_layout, **options)
    return _varlen_peer(backend, q, k, v, layout, triton_layout, num_prefix, options)


def unidirectional_attention_varlen_qkvpacked(qkv, cu_seqlens, num_queries=None, num_prefix=1, *,
                                              query_sees_prefix=False, query_sees_self=False,
                                              query_sees_queries=False, scale=None,
                                              max_seqlen=None, backend="auto"):
    """`unidirectional_attention_varlen` on a packed qkv projection (total_tokens, 3, heads,
    head_dim). Returns (total_tokens, heads, head_dim); with the Triton backend the
    gradient reaches qkv as one tensor written by the kernel."""
    _check_qkv(qkv, ("total_tokens",))
    q, k, v = qkv.unbind(1)
    if num_queries is None and not isinstance(cu_seqlens, VarlenLayout):
        num_queries = 0
    scale, layout, triton_layout = check_varlen_inputs(
        q, k, v, cu_seqlens, num_queries, num_prefix, query_sees_prefix, query_sees_self,
        query_sees_queries, scale, max_seqlen)
    backend = _resolve_backend(backend, q, torch.is_grad_enabled() and qkv.requires_grad)
    options = dict(query_sees_prefix=query_sees_prefix, query_sees_self=query_sees_self,
                   query_sees_queries=query_sees_queries, scale=scale)
    if backend == "triton":
        from .unidirectional import triton_qkvpacked_attention

        return triton_qkvpacked_attention(qkv, 0, num_prefix, layout=triton_layout, **options)
    return _varlen_peer(backend, q, k, v, layout, triton_layout, num_prefix, options)
