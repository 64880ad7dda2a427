"""The public operator (FlashAttention's `flash_attn_interface.py`): the four attention
functions, their input checks and the choice of backend.

Every backend computes the same function (`mask.py` states the mask rule); this module
makes sure a call is well-formed before any of them runs, so a user gets one clear
message instead of a shape error from deep inside a kernel. The implementations are in
`attention_triton.py` (Triton) and `attention_torch.py` (PyTorch); neither imports this
module. The public keyword arguments stay flat (query_sees_prefix=...); past the checks
they travel as one `QueryMask`.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import attention_torch
from .backends import FLOAT_DTYPES, TRITON_AVAILABLE, resolve
from .mask import QueryMask
from .varlen import VarlenLayout

if TRITON_AVAILABLE:  # else resolve() never picks it, and backend="triton" raises there
    from . import attention_triton
    from .attention_triton import (triton_attention, triton_qkvpacked_attention, varlen_schedule,
                                   varlen_tables)


# What a call's checks concluded, by what they read: a call like an earlier one (same
# tensor shapes, dtypes and devices, same other arguments) skips them. They were most of
# the op's host time per eager call. Calls under torch.compile always check (Dynamo
# traces them once per graph anyway).
_CHECKED = {}


def _signature(tensors, *arguments):
    """A hashable summary of what the checks read, or None when a tensor is of a kind they
    must see for themselves (not a plain tensor). Arguments carry their types: True is
    not 1, and 4.0 is not 4."""
    for t in tensors:
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            return None
    return (tuple((t.shape, t.dtype, t.device, t.requires_grad) for t in tensors),
            tuple((type(a), a) for a in arguments), torch.is_grad_enabled())


def _remembered(cache, key, check):
    """check()'s result, from cache when a call with this key passed before. Its last
    item is the backend."""
    if key is None or torch.compiler.is_compiling():
        return _traceable(check())
    try:
        found = cache.get(key)
    except TypeError:  # an unhashable argument: the checks name it
        return _traceable(check())
    if found is None:
        found = check()  # raises for a bad call, which is never remembered
        if len(cache) >= 1024:
            cache.clear()
        cache[key] = found
    return _traceable(found)


def _traceable(checked):
    """TorchScript's tracer hands the launchers sizes as tensors and records no Triton
    launch: refuse it by name rather than fail inside a launcher."""
    if checked[-1] == "triton" and torch.jit.is_tracing():
        raise RuntimeError("torch.jit.trace cannot record the triton backend's kernels; use torch.export or "
                           "torch.compile, or trace with backend='sdpa'")
    return checked


# The argument types a call passes on as they are (checked, where wrong, by the checks).
_PLAIN = (int, float, type(None), torch.Tensor)


def _python_scalars(*values):
    """The values, with numpy's integers and floats as Python's: the checks, the cache of
    their results and the custom ops take Python's. Anything else stays, for the checks to
    name. A type test per value when there is none (the eager path's every call)."""
    for value in values:
        if type(value) not in _PLAIN:
            return tuple(_python_scalar(v) for v in values)
    return values


def _python_scalar(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _check_int(name, value, low, high, read_as=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        where = f" ({read_as()})" if read_as else ""
        raise ValueError(f"{name} must be in [{low}, {high}] for this input{where}, got {value}")


def _check_tensors(q, k, v, layout):
    """Type, rank, dtype and device of q, k, v; layout names the expected dims."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != len(layout):
            raise ValueError(f"{name} must have shape ({', '.join(layout)}), "
                             f"got {t.dim()} dims {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.shape[-1] == 0:
            raise ValueError(f"{name} has head_dim 0; it must be at least 1")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise RuntimeError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def _check_scale(scale, head_dim):
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    if scale <= 0:
        # The kernels keep the running maximum of unscaled scores; a negative scale
        # would turn it into a minimum, and a zero one times a masked score (-inf) is NaN.
        # No attention uses either: a zero scale is the mean of the values it may see.
        raise ValueError(f"scale must be > 0, got {scale}")
    return float(scale)


def _read_as(q):
    # Said in the messages that depend on seq: a (batch, seq, heads, head_dim) tensor
    # passed by mistake reads its heads as seq.
    return f"q is (batch, heads, seq, head_dim) = {tuple(q.shape)}"


def check_inputs(q, k, v, num_queries, num_prefix, query_sees_prefix, query_sees_self,
                 query_sees_queries, scale, read_as=None):
    """Validate a call; returns (scale, QueryMask). Raises before any kernel runs.
    read_as() words the shape the caller's tensor was read as (default: q's)."""
    read_as = read_as or (lambda: _read_as(q))
    _check_tensors(q, k, v, ("batch", "heads", "seq", "head_dim"))
    batch, heads, seq, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if (k.shape[0], k.shape[1], k.shape[3]) != (batch, heads, head_dim):
        raise ValueError(f"k and v must match q in batch, heads and head_dim "
                         f"({batch}, {heads}, *, {head_dim}), got {tuple(k.shape)}")
    mask = QueryMask(query_sees_prefix, query_sees_self, query_sees_queries)

    _check_int("num_queries", num_queries, 0, seq, read_as)
    _check_int("num_prefix", num_prefix, 0, seq, read_as)
    if num_prefix + num_queries > seq:
        raise ValueError(f"num_prefix + num_queries must be at most seq = {seq} ({read_as()}), "
                         f"got {num_prefix} + {num_queries}")
    visible = seq - num_queries
    needs_query_keys = mask.needs_query_keys(num_queries)
    if k.shape[2] not in mask.key_lengths(seq, num_queries):
        expect = (f"seq = {seq} (query_sees_self/query_sees_queries need the query keys)"
                  if needs_query_keys else f"seq = {seq} or seq - num_queries = {visible}")
        raise ValueError(f"k and v must have length {expect}, got {k.shape[2]}")
    if mask.sees_nothing(num_queries, visible - num_prefix, num_prefix):
        raise ValueError(f"query rows would attend to nothing: there are no raw tokens "
                         f"(num_prefix {num_prefix} + num_queries {num_queries} == seq; {read_as()}); "
                         f"{mask.seeing_advice(num_prefix)}")
    return _check_scale(scale, head_dim), mask


_BATCHED = {
    "reference": attention_torch.reference_attention,
    "sdpa": attention_torch.sdpa_attention,
    "flex": attention_torch.flex_attention,
    "xformers": attention_torch.xformers_attention,
}


def unidirectional_attention(q, k, v, num_queries, num_prefix=1, *, query_sees_prefix=False,
                             query_sees_self=False, query_sees_queries=False, scale=None,
                             backend="auto", return_prefix_probs=False):
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
        scale: score scale, > 0; default head_dim ** -0.5.
        backend: "auto", "triton", "reference", "sdpa", "flex" or "xformers".
        return_prefix_probs: also return the attention weights of the P prefix rows.

    Returns:
        (batch, heads, seq, head_dim) tensor in q's dtype; with return_prefix_probs,
        (that, prefix_probs): (batch, heads, P, key_len) float32 (float64 for float64
        inputs), each row summing to 1 over the visible columns, 0 over the query
        columns. Exact, with a gradient: the Triton backend normalises the P rows' scores
        with the forward's own logsumexp, and runs nothing more without the option.
    """
    q, k, v = _autocast(q, k, v)
    _check_flag("return_prefix_probs", return_prefix_probs)
    num_queries, num_prefix, scale = _python_scalars(num_queries, num_prefix, scale)

    def check():
        checked = check_inputs(q, k, v, num_queries, num_prefix, query_sees_prefix,
                               query_sees_self, query_sees_queries, scale)
        requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return (*checked, resolve(backend, q, requires_grad=requires_grad))

    key = _signature((q, k, v), num_queries, num_prefix, query_sees_prefix, query_sees_self,
                     query_sees_queries, scale, backend)
    scale, mask, backend = _remembered(_CHECKED, key, check)
    if backend == "triton":
        return triton_attention(q, k, v, num_queries, num_prefix, mask, scale,
                                prefix_probs=return_prefix_probs)
    out = _BATCHED[backend](q, k, v, num_queries, num_prefix, mask, scale)
    if return_prefix_probs:
        return out, attention_torch.prefix_probs(q, k, num_queries, num_prefix, scale)
    return out


def _check_flag(name, value):
    if not isinstance(value, bool):  # a string such as "no" would be taken as True
        raise TypeError(f"{name} must be a Python bool, got {type(value).__name__} {value!r}")


def _autocast(*tensors):
    """The tensors as autocast would hand them to F.scaled_dot_product_attention: every
    floating one but float64 in the autocast dtype of its device type, when autocast is
    on there. So each backend sees the dtype sdpa would, and returns it."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor):
        return tensors
    kind = first.device.type
    if not (torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)):
        return tensors
    dtype = torch.get_autocast_dtype(kind)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                 and t.dtype not in (dtype, torch.float64) else t for t in tensors)


def _check_qkv(qkv, layout):
    """A packed qkv projection output: (..., 3, heads, head_dim) with `layout` leading dims."""
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    dims = (*layout, "3", "heads", "head_dim")
    if qkv.dim() != len(dims) or qkv.shape[-3] != 3:
        raise ValueError(f"qkv must have shape ({', '.join(dims)}), got {tuple(qkv.shape)}")


def unidirectional_attention_qkvpacked(qkv, num_queries, num_prefix=1, *, query_sees_prefix=False,
                                       query_sees_self=False, query_sees_queries=False,
                                       scale=None, backend="auto", return_prefix_probs=False):
    """`unidirectional_attention` on the output of one qkv projection, as a ViT makes it.

    Args:
        qkv: (batch, seq, 3, heads, head_dim), e.g. `self.qkv(x).view(B, L, 3, H, D)`;
            any strides.
        Other arguments as in `unidirectional_attention`.

    Returns:
        (batch, seq, heads, head_dim): `.reshape(batch, seq, -1)` is free on the Triton
        backend, whose output is laid out so; the PyTorch ones return a transposed view
        (`.view` refuses it, `.reshape` copies). With the
        Triton backend the gradient reaches qkv as one tensor written by the kernel:
        autograd stacks and copies nothing. With return_prefix_probs, (that,
        prefix_probs) as in `unidirectional_attention`.
    """
    qkv, = _autocast(qkv)
    _check_flag("return_prefix_probs", return_prefix_probs)
    num_queries, num_prefix, scale = _python_scalars(num_queries, num_prefix, scale)

    def check():
        _check_qkv(qkv, ("batch", "seq"))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        checked = check_inputs(q, k, v, num_queries, num_prefix, query_sees_prefix,
                               query_sees_self, query_sees_queries, scale,
                               lambda: f"qkv is (batch, seq, 3, heads, head_dim) = {tuple(qkv.shape)}")
        requires_grad = torch.is_grad_enabled() and qkv.requires_grad
        return (*checked, resolve(backend, q, requires_grad=requires_grad))

    key = _signature((qkv,), num_queries, num_prefix, query_sees_prefix, query_sees_self,
                     query_sees_queries, scale, backend)
    scale, mask, backend = _remembered(_CHECKED, key, check)
    if backend == "triton":
        return triton_qkvpacked_attention(qkv, num_queries, num_prefix, mask, scale,
                                          prefix_probs=return_prefix_probs)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = _BATCHED[backend](q, k, v, num_queries, num_prefix, mask, scale).transpose(1, 2)
    if return_prefix_probs:
        return out, attention_torch.prefix_probs(q, k, num_queries, num_prefix, scale)
    return out


def _host_read_under_compile(why):
    """A traced packed call on cu_seqlens that must read them on the host: a graph break
    that says why and what to pass (under fullgraph=True, the error; otherwise the graph
    breaks here, with this reason in Dynamo's log)."""
    if torch.compiler.is_compiling():
        torch._dynamo.graph_break(msg=f"adclr_kernels: a packed call on cu_seqlens reads them on the host ({why}); "
                                      "pass a VarlenLayout instead (or max_seqlen, for the triton backend)")


def _check_device_offsets(cu_seqlens, queries, total_tokens, num_prefix, mask):
    """The checks of `VarlenLayout`, on the device and without a sync: a bad value fails
    the next synchronising call (at once on CPU)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    # A traced call's total_tokens is symbolic: a message holding its value would pin it,
    # and every new token count would compile the caller again.
    said = "" if torch.compiler.is_compiling() else f" = {total_tokens}"
    torch._assert_async((cu_seqlens[0] == 0) & (cu_seqlens[-1] == total_tokens),
                        f"cu_seqlens must start at 0 and end at total_tokens{said}")
    torch._assert_async((lengths >= 0).all(), "cu_seqlens must be non-decreasing")
    torch._assert_async(((queries >= 0) & (queries <= lengths)).all(),
                        "num_queries[i] must be in [0, length of sequence i]")
    raw = lengths - queries - num_prefix
    torch._assert_async((raw >= 0).all(), f"num_prefix ({num_prefix}) exceeds the visible "
                                          "tokens of a sequence")
    if not (mask.sees_self or (mask.sees_prefix and num_prefix > 0)):
        torch._assert_async(((queries == 0) | (raw > 0)).all(),
                            "query rows of a sequence would attend to nothing: it has no raw "
                            "tokens; " + mask.seeing_advice(num_prefix))


def check_varlen_inputs(q, k, v, cu_seqlens, num_queries, num_prefix, query_sees_prefix,
                        query_sees_self, query_sees_queries, scale, max_seqlen):
    """Validate a packed call. Returns (scale, mask, layout, offsets): the QueryMask, the
    VarlenLayout (None when the caller gave cu_seqlens and max_seqlen: their values are
    not checked yet, `_vouched` does it on the device, no sync), and then (cu_seqlens,
    num_queries, max_seqlen, None, None, None, ())."""
    _check_tensors(q, k, v, ("total_tokens", "heads", "head_dim"))
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same (total_tokens, heads, head_dim) shape, "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    mask = QueryMask(query_sees_prefix, query_sees_self, query_sees_queries)
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int):
        raise TypeError(f"num_prefix must be an int, got {type(num_prefix).__name__}")
    if num_prefix < 0:
        raise ValueError(f"num_prefix must be at least 0, got {num_prefix}")
    scale = _check_scale(scale, q.shape[-1])

    if isinstance(cu_seqlens, VarlenLayout):
        layout = cu_seqlens
        _check_layout(layout, q, num_queries, max_seqlen)
    else:
        _check_offsets(q, cu_seqlens, num_queries)
        if max_seqlen is not None:
            _check_max_seqlen(q, max_seqlen)
            # Their values are checked on the device, with the tile tables (`_vouched`).
            return scale, mask, None, (cu_seqlens, num_queries, max_seqlen, None, None, None, ())
        # Checking the offsets needs them on the host: one sync. Callers that cannot
        # afford it pass max_seqlen (checked on the device) or, better, a VarlenLayout.
        _host_read_under_compile("the offsets are checked on the host without max_seqlen")
        queries = num_queries.tolist() if isinstance(num_queries, torch.Tensor) else num_queries
        offsets = cu_seqlens.tolist()
        if offsets[0] != 0 or offsets[-1] != q.shape[0]:
            raise ValueError(f"cu_seqlens must start at 0 and end at total_tokens = {q.shape[0]}, "
                             f"got {offsets[0]} .. {offsets[-1]}")
        layout = VarlenLayout.from_offsets(offsets, queries, q.device)
    layout.check(num_prefix, mask)
    return scale, mask, layout, None


def _check_layout(layout, q, num_queries, max_seqlen):
    if num_queries is not None:
        raise ValueError("num_queries comes from the VarlenLayout; pass None")
    if max_seqlen is not None and max_seqlen != layout.max_seqlen:
        raise ValueError(f"max_seqlen comes from the VarlenLayout ({layout.max_seqlen}); "
                         f"got {max_seqlen}")
    if layout.total_tokens != q.shape[0]:
        raise ValueError(f"the VarlenLayout holds {layout.total_tokens} tokens, q has {q.shape[0]}")
    if layout.device != q.device:
        raise RuntimeError(f"the VarlenLayout is on {layout.device}, q on {q.device}")


def _check_offsets(q, cu_seqlens, num_queries):
    """Type, dtype, shape and device of cu_seqlens and num_queries (not their values)."""
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


def _check_max_seqlen(q, max_seqlen):
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"max_seqlen must be a non-negative int or None, got {max_seqlen!r}")
    if max_seqlen == 0 and q.shape[0] > 0:
        raise ValueError(f"max_seqlen is 0 but there are {q.shape[0]} tokens")


def _vouched(q, offsets, num_prefix, mask, backend):
    """What a backend takes for offsets the caller vouched for with max_seqlen, their
    values checked on the device without a sync: for an eager Triton call, one launch
    that also writes the tile tables (`varlen_schedule`); otherwise torch ops, and the
    kernels' grids cover max_seqlen for every sequence."""
    cu_seqlens, num_queries, max_seqlen, *_ = offsets
    per_sequence = isinstance(num_queries, torch.Tensor)
    if backend == "triton" and attention_triton._eager(q, cu_seqlens, *((num_queries,) if per_sequence else ())):
        return varlen_schedule(q, cu_seqlens, num_queries, max_seqlen, num_prefix, mask)
    cu_seqlens = cu_seqlens.contiguous()
    if per_sequence:
        # Values past int32 fail the range check below instead of wrapping around.
        queries = num_queries.clamp(-1, 2**31 - 1).to(torch.int32).contiguous()
    else:
        queries = torch.full((cu_seqlens.numel() - 1,), num_queries, dtype=torch.int32, device=q.device)
    _check_device_offsets(cu_seqlens, queries, q.shape[0], num_prefix, mask)
    # Traced with a symbolic max_seqlen (a compiled call whose max_seqlen changes), the
    # message cannot hold its value.
    said = "" if torch.compiler.is_compiling() else f" ({max_seqlen})"
    torch._assert_async((cu_seqlens[1:] - cu_seqlens[:-1] <= max_seqlen).all(),
                        f"max_seqlen{said} is smaller than the longest sequence")
    return cu_seqlens, queries, max_seqlen, None, None, None, ()


def _layout_key(cu_seqlens, tensors, *arguments):
    """(cache, key) for a packed call: calls on one VarlenLayout remember their checks in
    it (the layout holds its tile tables and is checked once already); calls on offsets
    check every time, their values being on the device."""
    if not isinstance(cu_seqlens, VarlenLayout):
        return None, None
    return cu_seqlens.checked_calls, _signature(tensors, *arguments)


def _tables(layout, offsets, q, num_prefix, mask, backend):
    """What the backend takes for a packed call: the tile tables of a layout, built per call
    and not remembered with the checks (they follow the launchers' tile configs, which
    bench.tune swaps between calls on one layout), or the offsets checked on the device."""
    if layout is not None:
        return varlen_tables(layout, q) if backend == "triton" else None
    return _vouched(q, offsets, num_prefix, mask, backend)


def _varlen_peer(backend, q, k, v, layout, tables, num_prefix, mask, scale, prefix_probs=False):
    """A PyTorch backend over packed sequences (host offsets needed: one sync if not known)."""
    if layout is None:
        _host_read_under_compile(f"the {backend} backend attends sequence by sequence")
        cu_seqlens, queries = tables[:2]
        layout = VarlenLayout.from_offsets(cu_seqlens.tolist(), queries.tolist(), q.device)
    bounds, queries = layout.bounds(), layout.queries
    if backend == "flex":
        out = attention_torch.flex_varlen_attention(q, k, v, bounds, queries, num_prefix, mask, scale)
    else:
        out = attention_torch.varlen_per_sequence(_BATCHED[backend], q, k, v, bounds, queries,
                                                  num_prefix, mask, scale)
    if prefix_probs:
        return out, attention_torch.varlen_prefix_probs(q, k, bounds, queries, num_prefix, scale)
    return out


def unidirectional_attention_varlen(q, k, v, cu_seqlens, num_queries=None, num_prefix=1, *,
                                    query_sees_prefix=False, query_sees_self=False,
                                    query_sees_queries=False, scale=None, max_seqlen=None,
                                    backend="auto", return_prefix_probs=False):
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
        (total_tokens, heads, head_dim) tensor in q's dtype; with return_prefix_probs,
        (that, prefix_probs): (heads, P, total_tokens), column j holding the weight that
        the prefix rows of token j's own sequence give it (as in `unidirectional_attention`).
    """
    if num_queries is None and not isinstance(cu_seqlens, VarlenLayout):
        num_queries = 0
    q, k, v = _autocast(q, k, v)
    _check_flag("return_prefix_probs", return_prefix_probs)
    num_queries, num_prefix, scale, max_seqlen = _python_scalars(num_queries, num_prefix, scale, max_seqlen)

    def check():
        checked = check_varlen_inputs(q, k, v, cu_seqlens, num_queries, num_prefix,
                                      query_sees_prefix, query_sees_self, query_sees_queries,
                                      scale, max_seqlen)
        requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return (*checked, resolve(backend, q, requires_grad=requires_grad))

    scale, mask, layout, offsets, backend = _remembered(*_layout_key(
        cu_seqlens, (q, k, v), num_queries, num_prefix, query_sees_prefix, query_sees_self,
        query_sees_queries, scale, max_seqlen, backend), check)
    tables = _tables(layout, offsets, q, num_prefix, mask, backend)
    if backend == "triton":
        return triton_attention(q, k, v, 0, num_prefix, mask, scale, varlen=tables,
                                prefix_probs=return_prefix_probs)
    return _varlen_peer(backend, q, k, v, layout, tables, num_prefix, mask, scale, return_prefix_probs)


def unidirectional_attention_varlen_qkvpacked(qkv, cu_seqlens, num_queries=None, num_prefix=1, *,
                                              query_sees_prefix=False, query_sees_self=False,
                                              query_sees_queries=False, scale=None,
                                              max_seqlen=None, backend="auto", return_prefix_probs=False):
    """`unidirectional_attention_varlen` on a packed qkv projection (total_tokens, 3, heads,
    head_dim). Returns (total_tokens, heads, head_dim) (and the prefix probabilities with
    return_prefix_probs); with the Triton backend the gradient reaches qkv as one tensor
    written by the kernel."""
    if num_queries is None and not isinstance(cu_seqlens, VarlenLayout):
        num_queries = 0
    qkv, = _autocast(qkv)
    _check_flag("return_prefix_probs", return_prefix_probs)
    num_queries, num_prefix, scale, max_seqlen = _python_scalars(num_queries, num_prefix, scale, max_seqlen)

    def check():
        _check_qkv(qkv, ("total_tokens",))
        q, k, v = qkv.unbind(1)
        checked = check_varlen_inputs(q, k, v, cu_seqlens, num_queries, num_prefix,
                                      query_sees_prefix, query_sees_self, query_sees_queries,
                                      scale, max_seqlen)
        requires_grad = torch.is_grad_enabled() and qkv.requires_grad
        return (*checked, resolve(backend, q, requires_grad=requires_grad))

    scale, mask, layout, offsets, backend = _remembered(*_layout_key(
        cu_seqlens, (qkv,), num_queries, num_prefix, query_sees_prefix, query_sees_self,
        query_sees_queries, scale, max_seqlen, backend), check)
    # qkv stands for q: it has q's tokens, head_dim, dtype and device.
    tables = _tables(layout, offsets, qkv, num_prefix, mask, backend)
    if backend == "triton":
        return triton_qkvpacked_attention(qkv, 0, num_prefix, mask, scale, varlen=tables,
                                          prefix_probs=return_prefix_probs)
    return _varlen_peer(backend, *qkv.unbind(1), layout, tables, num_prefix, mask, scale,
                        return_prefix_probs)
