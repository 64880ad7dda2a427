"""`VarlenLayout` and the packed (varlen) op: every backend against float64 attention per
sequence, the checks of offsets given with or without a layout, the tile tables."""

import re

import numpy as np
import pytest
import torch

from adclr_kernels import (VarlenLayout, unidirectional_attention_varlen,
                           unidirectional_attention_varlen_qkvpacked)
from adclr_kernels.attention_torch import dense_masked_attention, varlen_per_sequence
from kernel_testing import (DEVICE, ON_CUDA, OPTION_SETS, assert_fa_close, assert_rel_close, mask_of,
                            on_device, option_id, options)


def make_packed(lengths, heads, head_dim, dtype=torch.float32, seed=0):
    """Packed q, k, v as (tokens, heads, head_dim) strided views of one qkv projection."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    qkv = torch.randn(total, 3, heads, head_dim, generator=g, dtype=torch.float64)
    q, k, v = qkv.to(device=DEVICE, dtype=dtype).unbind(1)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return q, k, v, torch.tensor(offsets, dtype=torch.int32, device=DEVICE)


def dense_per_sequence(q, k, v, cu, num_queries, num_prefix, grad_out, opts, scale=None):
    """float64 output and grads, each sequence through the dense-matrix reference."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    outs = []
    offsets = cu.tolist()
    for s, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        seq = [t[a:b].transpose(0, 1).unsqueeze(0) for t in leaves]
        out = dense_masked_attention(*seq, num_queries[s], num_prefix, mask_of(opts), scale)
        outs.append(out[0].transpose(0, 1))
    out = torch.cat(outs, 0)
    return out.detach(), torch.autograd.grad(out, leaves, grad_out.double())


# A DINO-like packed batch: two globals with query tokens, locals without, odd lengths.
# Three runs of alike sequences: the batched kernels take them run by run.
LENGTHS = [1 + 49 + 10, 1 + 49 + 10, 1 + 9, 1 + 9, 1 + 9, 1 + 33 + 3]
QUERIES = [10, 10, 0, 0, 0, 3]
# Every length its own run, more than MAX_BATCHED_RUNS: the packed kernels take them.
VARIED = [1 + 49 + 10, 1 + 9, 1 + 33 + 3, 1 + 8, 1 + 20 + 2, 1 + 49 + 1]
VARIED_QUERIES = [10, 0, 3, 0, 2, 1]


@pytest.mark.parametrize("lengths,queries,by_runs", [
    (LENGTHS, QUERIES, False), (LENGTHS, QUERIES, True), (VARIED, VARIED_QUERIES, False)],
    ids=["runs", "runs-every-pass", "varied"])
@pytest.mark.parametrize("opt_set", OPTION_SETS, ids=option_id)
def test_triton_varlen_matches_dense_per_sequence(opt_set, lengths, queries, by_runs, poisoned,
                                                  monkeypatch):
    """by_runs: both passes take the runs by the batched kernels, whatever the GPU rule
    says (in the interpreter it sends the forward alone, a run being one-shot's)."""
    import adclr_kernels.attention_triton as T

    if by_runs:
        monkeypatch.setattr(T, "_fwd_by_runs", lambda *a: True)
        monkeypatch.setattr(T, "_bwd_by_runs", lambda *a: True)
    opts = options(opt_set)
    q, k, v, cu = make_packed(lengths, 2, 32)
    grad_out = torch.randn(q.shape, device=DEVICE)
    nq = torch.tensor(queries, device=DEVICE)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = unidirectional_attention_varlen(*leaves, cu, nq, 1, backend="triton", **opts)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref, ref_grads = dense_per_sequence(q, k, v, cu, queries, 1, grad_out, opts)
    assert out.shape == q.shape
    assert_rel_close("out", out, ref)
    for name, got, want in zip("qkv", grads, ref_grads):
        assert_rel_close(f"d{name}", got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_varlen_low_precision(dtype, poisoned):
    q, k, v, cu = make_packed([1 + 40 + 10, 1 + 36, 1 + 70 + 10], 2, 64, dtype=dtype, seed=2)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    queries = [10, 0, 10]
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = unidirectional_attention_varlen(*leaves, cu, torch.tensor(queries, device=DEVICE),
                                          backend="triton")
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref, ref_grads = dense_per_sequence(q, k, v, cu, queries, 1, grad_out, options(OPTION_SETS[0]))
    bounds = list(zip(cu.tolist()[:-1], cu.tolist()[1:]))
    lo_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    lo = varlen_per_sequence(dense_masked_attention, *lo_leaves, bounds, queries, 1)
    lo_grads = torch.autograd.grad(lo, lo_leaves, grad_out)
    assert_fa_close("out", out, ref, lo)
    for name, got, want, low in zip("qkv", grads, ref_grads, lo_grads):
        assert_fa_close(f"d{name}", got, want, low)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex"])
def test_pytorch_backends_varlen(backend):
    opts = options(OPTION_SETS[3])
    q, k, v, cu = make_packed(LENGTHS, 2, 16, dtype=torch.float64 if not ON_CUDA else torch.float32)
    grad_out = torch.randn(q.shape, device=DEVICE, dtype=q.dtype)
    ref, ref_grads = dense_per_sequence(q, k, v, cu, QUERIES, 1, grad_out, opts)
    nq = torch.tensor(QUERIES, device=DEVICE)
    if backend == "flex" and not ON_CUDA:
        with torch.no_grad():
            out = unidirectional_attention_varlen(q, k, v, cu, nq, backend=backend, **opts)
        assert_rel_close("out", out, ref)
        return
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = unidirectional_attention_varlen(*leaves, cu, nq, backend=backend, **opts)
    grads = torch.autograd.grad(out, leaves, grad_out)
    tol = 1e-4 if ON_CUDA else 1e-10
    assert_rel_close("out", out, ref, tol)
    for name, got, want in zip("qkv", grads, ref_grads):
        assert_rel_close(f"d{name}", got, want, tol)


@pytest.mark.parametrize("layout", [False, True], ids=["offsets", "layout"])
@pytest.mark.parametrize("backend", ["triton", "reference", "sdpa", "flex"])
def test_every_backend_takes_a_custom_scale_in_packed_calls(backend, layout):
    """Runs of alike sequences and one alone (the batched and the packed kernels), the
    scores and the backward at a scale other than 1 / sqrt(head_dim)."""
    opts, scale = options(OPTION_SETS[3]), 0.3
    q, k, v, cu = make_packed(LENGTHS, 2, 16)
    grad_out = torch.randn(q.shape, device=DEVICE)
    ref, ref_grads = dense_per_sequence(q, k, v, cu, QUERIES, 1, grad_out, opts, scale)
    offsets = VarlenLayout(LENGTHS, QUERIES, device=DEVICE) if layout else cu
    queries = None if layout else torch.tensor(QUERIES, device=DEVICE)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    if backend == "flex" and not ON_CUDA:  # flex has no backward on CPU
        with torch.no_grad():
            out = unidirectional_attention_varlen(*leaves, offsets, queries, 1, backend=backend, scale=scale, **opts)
        assert_rel_close("out", out, ref, 1e-4 if ON_CUDA else 1e-5)
        return
    out = unidirectional_attention_varlen(*leaves, offsets, queries, 1, backend=backend, scale=scale, **opts)
    grads = torch.autograd.grad(out, leaves, grad_out)
    tol = 1e-4 if ON_CUDA else 1e-5
    assert_rel_close("out", out, ref, tol)
    for name, got, want in zip("qkv", grads, ref_grads):
        assert_rel_close(f"d{name}", got, want, tol)


def test_no_attention_across_sequences():
    q, k, v, cu = make_packed([20, 25], 2, 32)
    out1 = unidirectional_attention_varlen(q, k, v, cu, 4, backend="triton")
    k2, v2 = k.clone(), v.clone()
    k2[20:], v2[20:] = torch.randn_like(k2[20:]), torch.randn_like(v2[20:])
    out2 = unidirectional_attention_varlen(q, k2, v2, cu, 4, backend="triton")
    assert torch.equal(out1[:20], out2[:20])
    assert not torch.equal(out1[20:], out2[20:])


@pytest.mark.parametrize("lengths,queries", [(LENGTHS, QUERIES), (VARIED, VARIED_QUERIES)],
                         ids=["runs", "varied"])
def test_max_seqlen_given_or_computed_agree_and_backward_is_deterministic(lengths, queries):
    # Offsets read on the host make a layout, whose few runs of alike sequences take the
    # batched kernels; offsets vouched for with max_seqlen take the packed ones. Each is
    # deterministic, and with runs too many for the batched kernels they agree bit for bit.
    q, k, v, cu = make_packed(lengths, 2, 32, dtype=torch.float16, seed=4)
    grad_out = torch.randn_like(q)
    nq = torch.tensor(queries, device=DEVICE)

    def run(max_seqlen):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = unidirectional_attention_varlen(*leaves, cu, nq, max_seqlen=max_seqlen, backend="triton")
        return (out, *torch.autograd.grad(out, leaves, grad_out))

    computed, given = run(None), run(max(lengths))
    for a, b in zip(computed, run(None)):
        assert torch.equal(a, b)
    for a, b in zip(given, run(max(lengths))):
        assert torch.equal(a, b)
    for a, b in zip(computed, given):
        if lengths is VARIED:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("lengths,queries", [([7, 0, 12], [2, 0, 2]), ([0, 40, 0, 0], [0, 3, 0, 0])],
                         ids=["between", "around"])
@pytest.mark.parametrize("by_runs", [False, True], ids=["rule", "every-pass-by-runs"])
def test_empty_sequence_and_no_prefix(lengths, queries, by_runs, monkeypatch):
    import adclr_kernels.attention_triton as T

    if by_runs:
        monkeypatch.setattr(T, "_fwd_by_runs", lambda *a: True)
        monkeypatch.setattr(T, "_bwd_by_runs", lambda *a: True)
    q, k, v, cu = make_packed(lengths, 2, 32)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = unidirectional_attention_varlen(*leaves, cu, _i32(*queries), 0, backend="triton")
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref, ref_grads = dense_per_sequence(q, k, v, cu, queries, 0, grad_out, options(OPTION_SETS[0]))
    assert_rel_close("out", out, ref)
    for name, got, want in zip("qkv", grads, ref_grads):
        assert_rel_close(f"d{name}", got, want)


def test_strided_offsets_and_counts_are_read_by_value():
    q, k, v, cu = make_packed([10, 12], 2, 16)
    cu_strided = _i32(0, 5, 10, 5, 22, 5)[::2]
    nq_strided = _i32(3, 0, 4, 0)[::2]
    out = unidirectional_attention_varlen(q, k, v, cu_strided, nq_strided, backend="triton")
    ref = unidirectional_attention_varlen(q, k, v, cu, _i32(3, 4), backend="reference")
    assert_rel_close("out", out, ref.double())


def _args(**over):
    q, k, v, cu = make_packed([10, 12], 2, 16)
    args = dict(q=q, k=k, v=v, cu_seqlens=cu, num_queries=3)
    args.update(over)
    return args


def _i32(*xs):
    return torch.tensor(xs, dtype=torch.int32, device=DEVICE)


BAD = [
    ("q 4-d", dict(q=torch.randn(1, 22, 2, 16)), ValueError, "q must have shape"),
    ("k shorter", dict(k=torch.randn(20, 2, 16)), ValueError, "same .* shape"),
    ("cu int64", dict(cu_seqlens=torch.tensor([0, 10, 22])), TypeError, "cu_seqlens must be int32"),
    ("cu 2-d", dict(cu_seqlens=_i32(0, 10, 22)[None]), ValueError, "cu_seqlens must be a 1-D"),
    ("cu not from 0", dict(cu_seqlens=_i32(1, 10, 22)), ValueError, "start at 0"),
    ("cu wrong end", dict(cu_seqlens=_i32(0, 10, 21)), ValueError, "end at total_tokens"),
    ("cu decreasing", dict(cu_seqlens=_i32(0, 15, 12, 22)), ValueError, "non-decreasing"),
    ("Q too large", dict(num_queries=_i32(3, 13)), ValueError, r"num_queries\[1\] must be in"),
    ("Q wrong count", dict(num_queries=_i32(3, 3, 3)), ValueError, "one count per sequence"),
    ("Q float", dict(num_queries=3.0), TypeError, "num_queries must be an int"),
    ("nothing to see", dict(num_queries=_i32(9, 3)), ValueError, "sequence 0 would attend to nothing"),
    ("nothing to see, no prefix for query_sees_prefix", dict(num_queries=_i32(10, 3), num_prefix=0,
                                                            query_sees_prefix=True), ValueError,
     r"sequence 0 would attend to nothing: it has no raw tokens; query_sees_prefix adds nothing "
     r"without prefix tokens \(num_prefix 0\)"),
    ("P negative", dict(num_prefix=-1), ValueError, "num_prefix must be at least 0, got -1"),
    ("P a bool", dict(num_prefix=True), TypeError, "num_prefix must be an int, got bool"),
    ("max_seqlen float", dict(max_seqlen=12.0), TypeError, "max_seqlen"),
    ("Q past int32", dict(num_queries=torch.tensor([2**32 + 2, 3], device=DEVICE)), ValueError,
     r"num_queries\[0\] must be in"),
    ("head_dim 0", dict(q=torch.randn(22, 2, 0), k=torch.randn(22, 2, 0), v=torch.randn(22, 2, 0)),
     ValueError, "head_dim 0"),
]


def test_counts_on_another_device_are_refused():
    other = "cpu" if ON_CUDA else "meta"  # a second device type on a CPU-only machine
    with pytest.raises(RuntimeError, match="num_queries must be on"):
        unidirectional_attention_varlen(**_args(num_queries=torch.tensor([3, 3], device=other)))


@pytest.mark.parametrize("case,over,exc,msg", BAD, ids=[c[0] for c in BAD])
def test_bad_varlen_input(case, over, exc, msg):
    with pytest.raises(exc, match=msg):
        unidirectional_attention_varlen(**_args(**on_device(over)))


# ---------------------------------------------------------------------------------------
# Offsets the caller vouched for with max_seqlen: checked on the device (no sync), and
# the kernels never reach outside the tensors whatever the offsets say.
# ---------------------------------------------------------------------------------------

UNSYNCED_BAD = [
    ("end past the tokens", dict(cu_seqlens=_i32(0, 10, 30)), "end at total_tokens"),
    ("decreasing", dict(cu_seqlens=_i32(0, 15, 12, 22), num_queries=0), "non-decreasing"),
    ("not from 0", dict(cu_seqlens=_i32(4, 10, 22)), "start at 0"),
    ("Q past its sequence", dict(num_queries=_i32(3, 13)), r"num_queries\[i\] must be in"),
    ("nothing to see", dict(num_queries=_i32(9, 3)), "attend to nothing"),
    ("nothing to see, no prefix for query_sees_prefix",
     dict(num_queries=_i32(10, 3), num_prefix=0, query_sees_prefix=True),
     r"attend to nothing: it has no raw tokens; query_sees_prefix adds nothing"),
    ("max_seqlen too small", dict(max_seqlen=11), r"max_seqlen \(11\) is smaller"),
    ("no room for the prefix", dict(num_queries=_i32(10, 3), query_sees_self=True),
     r"num_prefix \(1\) exceeds the visible tokens"),
]


@pytest.mark.skipif(ON_CUDA, reason="a failed device assert ends the CUDA context; on CPU it raises")
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("case,over,msg", UNSYNCED_BAD, ids=[c[0] for c in UNSYNCED_BAD])
def test_offsets_vouched_for_with_max_seqlen_are_still_checked(case, over, msg, backend):
    args = dict(_args(), max_seqlen=12, backend=backend)
    args.update(over)
    with pytest.raises(RuntimeError, match=msg):
        unidirectional_attention_varlen(**args)


@pytest.mark.parametrize("offsets", [(0, 10, 30), (0, 15, 12, 22), (-50, 3, 22), (0, 2**31 - 1, 22)])
def test_kernels_stay_inside_the_tensors_whatever_the_offsets(offsets, poisoned):
    # The custom op itself, past every check: clamped offsets mean clamped sequences.
    from adclr_kernels.attention_triton import _bwd_op, _fwd_op

    q, k, v, _ = make_packed([10, 12], 2, 16)
    cu = _i32(*offsets)
    nq = _i32(*([3] * (len(offsets) - 1)))
    args = (cu, nq, None, None, None, 0, 40, [], 1, False, False, False, 0.25)
    out, lse = _fwd_op(q, k, v, *args)
    dq, dk, dv = _bwd_op(torch.ones_like(out), q, k, v, out, lse, *args)
    assert out.shape == q.shape and dq.shape == q.shape


def test_max_seqlen_larger_than_needed_is_only_slower():
    q, k, v, cu = make_packed([10, 12, 9, 11, 13], 2, 16)
    exact = unidirectional_attention_varlen(q, k, v, cu, 3, backend="triton")
    loose = unidirectional_attention_varlen(q, k, v, cu, 3, max_seqlen=100, backend="triton")
    assert torch.equal(exact, loose)


LAYOUT_BAD = [
    ("negative length", dict(seqlens=[10, -2]), ValueError, "seqlens must hold ints >= 0"),
    ("float length", dict(seqlens=[10.0, 12]), TypeError, "seqlens must hold ints, got float 10.0"),
    ("Q past its sequence", dict(num_queries=[3, 13]), ValueError, r"num_queries\[1\] must be in \[0, 12\]"),
    ("one count short", dict(num_queries=[3]), ValueError, "one count per sequence"),
    ("tokens differ from q", dict(seqlens=[10, 11]), ValueError, "holds 21 tokens, q has 22"),
    ("num_queries twice", dict(call_num_queries=3), ValueError, "num_queries comes from the VarlenLayout"),
    ("max_seqlen disagrees", dict(max_seqlen=20), ValueError, r"max_seqlen comes from the VarlenLayout \(12\)"),
    ("no room for the prefix", dict(seqlens=[0, 22], num_queries=0), ValueError, "num_prefix \\(1\\) exceeds"),
    ("no room for the prefix beside the queries", dict(seqlens=[3, 19]), ValueError,
     r"num_prefix \(1\) exceeds the 0 visible tokens of sequence 0"),
]


@pytest.mark.parametrize("case,over,exc,msg", LAYOUT_BAD, ids=[c[0] for c in LAYOUT_BAD])
def test_bad_layouts_are_refused(case, over, exc, msg):
    q, k, v, _ = make_packed([10, 12], 2, 16)
    over = dict(over)
    call = dict(num_queries=over.pop("call_num_queries", None), max_seqlen=over.pop("max_seqlen", None))
    with pytest.raises(exc, match=msg):
        layout = VarlenLayout(**{"seqlens": [10, 12], "num_queries": [3, 3], "device": DEVICE, **over})
        unidirectional_attention_varlen(q, k, v, layout, backend="triton", **call)


LAYOUT_INPUTS_BAD = [
    ("one int", dict(seqlens=5), TypeError, "seqlens must be a sequence of ints (one per sequence), got int 5"),
    ("0-d tensor", dict(seqlens=torch.tensor(5)), TypeError, "seqlens must be a sequence of ints"),
    ("2-d tensor", dict(seqlens=torch.tensor([[3, 4]])), TypeError, "seqlens must be a sequence of ints"),
    ("a string", dict(seqlens="34"), TypeError, "seqlens must be a sequence of ints"),
    ("an object", dict(seqlens=object()), TypeError, "seqlens must be a sequence of ints (one per sequence), "
                                                      "got object"),
    ("num_queries None", dict(num_queries=None), TypeError,
     "num_queries must be an int (0: no query tokens) or one int per sequence, got None"),
    ("num_queries a float array", dict(num_queries=np.array(1.5)), TypeError, "num_queries must hold ints"),
]


@pytest.mark.parametrize("case,over,exc,msg", LAYOUT_INPUTS_BAD, ids=[c[0] for c in LAYOUT_INPUTS_BAD])
def test_layout_inputs_that_are_not_lists_of_ints_are_named(case, over, exc, msg):
    with pytest.raises(exc, match=re.escape(msg)):
        VarlenLayout(**{"seqlens": [3, 4], "num_queries": 1, **over})


def test_layouts_take_generators_and_zero_dim_counts():
    plain = VarlenLayout([3, 4], [1, 1])
    for layout in (VarlenLayout((n for n in [3, 4]), 1), VarlenLayout(range(3, 5), np.array(1)),
                   VarlenLayout([3, 4], torch.tensor(1)), VarlenLayout([3, 4], [np.array(1), 1])):
        assert (layout.seqlens, layout.queries) == (plain.seqlens, plain.queries)


@pytest.mark.parametrize("offsets,exc,msg", [
    ([], ValueError, "cu_seqlens must hold num_seqs + 1 offsets, starting at 0; got none"),
    (7, TypeError, "cu_seqlens must be a sequence of ints"),
    ([0, 2.5], TypeError, "cu_seqlens must hold ints, got float 2.5"),
])
def test_bad_offsets_for_a_layout_are_named(offsets, exc, msg):
    with pytest.raises(exc, match=re.escape(msg)):
        VarlenLayout.from_offsets(offsets)


@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_layouts_take_numpy_and_tensor_counts(kind):
    wrap = (lambda xs: np.array(xs)) if kind == "numpy" else (lambda xs: torch.tensor(xs))
    plain = VarlenLayout([10, 12], [3, 0])
    for layout in (VarlenLayout(wrap([10, 12]), wrap([3, 0])),
                   VarlenLayout(list(wrap([10, 12])), wrap([3, 0])[0]),
                   VarlenLayout.from_offsets(wrap([0, 10, 22]), [3, 0])):
        assert layout.seqlens == plain.seqlens and all(type(n) is int for n in layout.seqlens)
        assert layout.queries[0] == 3 and layout.total_tokens == 22


# ---------------------------------------------------------------------------------------
# VarlenLayout: tile tables, and the packed-qkv op on a layout
# ---------------------------------------------------------------------------------------

def _randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)


def test_varlen_qkvpacked_with_a_layout_equals_offsets(poisoned):
    lengths, queries = [1 + 49 + 10, 1 + 9, 1 + 33 + 3, 0, 1 + 9], [10, 0, 3, 0, 0]
    layout = VarlenLayout(lengths, queries, device=DEVICE)
    qkv = _randn(sum(lengths), 3, 2, 32, seed=2).requires_grad_()
    grad_out = _randn(sum(lengths), 2, 32, seed=3)
    # num_prefix 0: the empty sequence has no room for a prefix token.
    out = unidirectional_attention_varlen_qkvpacked(qkv, layout, num_prefix=0, backend="triton")
    (dqkv,) = torch.autograd.grad(out, qkv, grad_out)

    leaves = [t.detach().requires_grad_() for t in qkv.detach().unbind(1)]
    by_offsets = unidirectional_attention_varlen(*leaves, layout.cu_seqlens, layout.num_queries,
                                                 num_prefix=0, backend="reference")
    grads = torch.autograd.grad(by_offsets, leaves, grad_out)
    assert_rel_close("out", out, by_offsets.double())
    for i, want in enumerate(grads):
        assert_rel_close(f"d{'qkv'[i]}", dqkv[:, i], want.double())


def test_tile_table_lists_every_block_with_rows_once_longest_sequences_first():
    # Block counts 1, 4, 0, 2, 1, 4, 3, 9 by 64 rows: classes [8, 16), [4, 8), [2, 4), [1, 2),
    # each in sequence order.
    layout = VarlenLayout([37, 207, 0, 65, 64, 207, 129, 530], [0, 10, 0, 1, 0, 10, 0, 10])
    tiles = layout.tiles(64).tolist()
    assert tiles == ([[7, j] for j in range(9)] + [[1, j] for j in range(4)] + [[5, j] for j in range(4)]
                     + [[3, 0], [3, 1], [6, 0], [6, 1], [6, 2], [0, 0], [4, 0]])
    assert layout.tiles(64) is layout.tiles(64)  # built once
    # The one-pass backward's programs: every sequence once, the same classes, the empty one last.
    assert layout.sequence_tiles(64).tolist() == [[s, 0] for s in (7, 1, 5, 3, 6, 0, 4, 2)]
    assert layout.sequence_tiles(64) is layout.sequence_tiles(64)


@pytest.mark.skipif(ON_CUDA, reason="the interpreter's rule: a GPU takes the one-pass backward from 864 programs")
@pytest.mark.parametrize("order", ["reversed", "no table"])
def test_one_pass_backward_takes_sequences_in_any_order_bit_for_bit(order):
    # The sequence table decides when each program runs, not what it computes: another order
    # of the sequences (or none, the caller's) gives the layout's gradients bit for bit. Six
    # lengths (more runs than the batched kernels take) in the classes [2, 4), [1, 2) and
    # [0, 1) of 64-row blocks.
    import adclr_kernels.attention_triton as T

    lengths = [10, 70, 3, 0, 129, 12]
    layout = VarlenLayout(lengths, [2, 5, 0, 0, 10, 3], device=DEVICE)
    q, k, v, _ = make_packed(lengths, 2, 16)
    cu, nq, max_len, fwd, bwd, seq, runs = T.varlen_tables(layout, q)
    assert runs == () and seq[:, 0].tolist() == [1, 4, 0, 2, 5, 3]
    geo = T.varlen_geometry(q, cu, nq, max_len, fwd, bwd, seq)
    assert T._onepass(q, geo, T.QueryMask(), (q,))["TILED"]  # the interpreter takes it here
    tables = {"reversed": seq.flip(0), "no table": None}

    def grads(seq_tiles):
        args = (cu, nq, fwd, bwd, seq_tiles, 0, max_len, [], 1, False, False, False, 0.25)
        out, lse = T._fwd_op(q, k, v, *args)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        return T._bwd_op(grad_out, q, k, v, out, lse, *args)

    for want, got in zip(grads(seq), grads(tables[order])):
        assert torch.equal(want, got)


@pytest.mark.skipif(ON_CUDA, reason="the interpreter's rule: a GPU takes the one-pass backward from 864 programs")
def test_one_pass_backward_runs_the_sequences_its_table_lists():
    # A table listing sequence 1 in every slot: the other sequences' rows keep the poison.
    import adclr_kernels.attention_triton as T

    lengths = [10, 70, 3, 0, 129, 12]
    layout = VarlenLayout(lengths, [2, 5, 0, 0, 10, 3], device=DEVICE)
    q, k, v, _ = make_packed(lengths, 2, 16)
    cu, nq, max_len, fwd, bwd, seq, _ = T.varlen_tables(layout, q)
    only_one = torch.full_like(seq, 1)
    only_one[:, 1] = 0
    geo = T.varlen_geometry(q, cu, nq, max_len, fwd, bwd, only_one)
    out, lse = T._forward(q, k, v, geo, 1, T.QueryMask(), 0.25)
    grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    T.attention_bwd(torch.ones_like(out), q, k, v, out, lse, *grads, geo, 1, T.QueryMask(), 0.25)
    ran = torch.zeros(q.shape[0], dtype=torch.bool, device=DEVICE)
    ran[10:80] = True
    for g in grads:
        assert g[ran].isfinite().all() and g[~ran].isnan().all()


# ---------------------------------------------------------------------------------------
# Offsets with max_seqlen on the Triton backend: one launch checks them and writes the
# tile tables on the device (varlen_schedule); the grids hold few idle programs.
# ---------------------------------------------------------------------------------------

# Sequences of 1, 2, 63, 64, 65 and 129 tokens side by side (P + 0 and P + 1 for the two
# shortest when P = 4), each with its own query count.
def _edge_lengths(num_prefix):
    return [max(1, num_prefix), max(2, num_prefix + 1), 63, 64, 65, 129], [0, 0, 10, 1, 10, 1]


@pytest.mark.parametrize("opt_set,num_prefix", [(o, 1 + 3 * (i % 2)) for i, o in enumerate(OPTION_SETS)],
                         ids=lambda x: option_id(x) if isinstance(x, tuple) else f"P{x}")
def test_vouched_offsets_match_float64_and_the_layout_bit_for_bit(opt_set, num_prefix, poisoned):
    opts = options(opt_set)
    lengths, queries = _edge_lengths(num_prefix)
    q, k, v, cu = make_packed(lengths, 1, 16, seed=5)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    nq = torch.tensor(queries, device=DEVICE)

    def run(cu_seqlens, num_queries, **kw):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = unidirectional_attention_varlen(*leaves, cu_seqlens, num_queries, num_prefix,
                                              backend="triton", **opts, **kw)
        return (out, *torch.autograd.grad(out, leaves, grad_out))

    vouched = run(cu, nq, max_seqlen=max(lengths))
    ref, ref_grads = dense_per_sequence(q, k, v, cu, queries, num_prefix, grad_out, opts)
    for name, got, want in zip(["out", "dq", "dk", "dv"], vouched, (ref, *ref_grads)):
        assert_rel_close(name, got, want)
    if opt_set == OPTION_SETS[0]:  # once: the interpreter takes seconds per pass
        # The device's tile table lists the layout's tiles, in its order: another call,
        # with tables built on the host, computes the same sums bit for bit.
        by_layout = run(VarlenLayout(lengths, queries, device=DEVICE), None)
        for a, b in zip(vouched, by_layout):
            assert torch.equal(a, b)


MIXED_LENGTHS = [1, 129, 2, 530, 63, 0, 65, 64, 207, 37, 300]


@pytest.mark.parametrize("lengths,max_seqlen", [
    (MIXED_LENGTHS, 530), (MIXED_LENGTHS, 1000), ([7], 7),
    # more sequences than one 128-wide chunk: each class's pass carries its count across chunks
    ([int(n) for n in torch.randint(0, 300, (260,), generator=torch.Generator().manual_seed(0))], 299)],
    ids=["classes-1-to-8", "max-seqlen-past-the-longest", "one-sequence", "260-sequences"])
def test_device_tile_table_orders_sequences_as_the_layout(lengths, max_seqlen):
    # Block counts of every class from [1, 2) to [8, 16) (at 64-row blocks), an empty
    # sequence, and a max_seqlen past the longest (one class more, empty).
    import adclr_kernels.attention_triton as T
    from adclr_kernels.mask import QueryMask

    layout = VarlenLayout(lengths, 0, device=DEVICE)
    q = torch.empty(layout.total_tokens, 2, 16, dtype=torch.float32, device=DEVICE)
    _, _, _, fwd, bwd, seq, _ = T.varlen_schedule(q, layout.cu_seqlens, 0, max_seqlen, 0, QueryMask())
    for table, block in zip((fwd, bwd), T._table_blocks(q, max_seqlen)):
        tiles = layout.tiles(block)
        assert torch.equal(table[: len(tiles)], tiles)
        first = [s for s, j in tiles.tolist() if j == 0]
        counts = [-(-lengths[s] // block) for s in first]
        assert [c.bit_length() for c in counts] == sorted((c.bit_length() for c in counts), reverse=True)
        assert (table[len(tiles):, 1] * block >= max(lengths)).all()  # idle slots
    # Every sequence once, the empty ones last, in the layout's order: no idle slot.
    assert torch.equal(seq, layout.sequence_tiles(T.SEQUENCE_BLOCK))


SCHEDULE_COMPILE = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from adclr_kernels.attention_triton import _varlen_schedule_kernel as kernel
names = kernel.arg_names
# Triton makes an int argument equal to 1 a constant at launch: one sequence, one class.
ones = dict(num_seqs=1, fwd_classes=1, fwd_top=1, bwd_classes=1, bwd_top=1, seq_classes=1, seq_top=1)
for per_sequence, constant in ((True, {}), (False, {}), (False, ones)):
    constexprs = dict(FWD_BLOCK=64, BWD_BLOCK=32, SEQ_BLOCK=64, CHUNK=128, PER_SEQUENCE=per_sequence, NEEDS_RAW=True,
                      **constant)
    signature = {n: "constexpr" if n in constexprs else "*i32" if n.isupper() else "i32" for n in names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(n),): v for n, v in constexprs.items()})
    triton.compile(source, target=GPUTarget("cuda", int(sys.argv[1]), 32), options=dict(num_warps=4))
"""


@pytest.mark.skipif(ON_CUDA, reason="on CUDA every offsets call compiles it")
@pytest.mark.parametrize("capability", [80, 90])
def test_schedule_kernel_compiles_for_the_gpu(capability, tmp_path):
    # The interpreter runs it here; no other CPU test compiles it as a GPU would.
    pytest.importorskip("triton.backends.compiler")
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", SCHEDULE_COMPILE, str(capability)], cwd=root, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",
                               "TRITON_CACHE_DIR": str(tmp_path)},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_device_tile_table_is_the_layouts_then_idle_slots_within_30_percent(monkeypatch):
    # A 48-sequence multi-crop batch (4 images x (2 x 207 + 10 x 37) tokens) at the tiles
    # the GPU launches for bf16, head_dim 64: today's grids (max_seqlen for every sequence)
    # left 62.5% of the forward programs idle.
    import adclr_kernels.attention_triton as T
    from adclr_kernels.mask import QueryMask

    monkeypatch.setattr(T, "triton_interpreter_enabled", lambda: False)
    lengths, queries = [207, 207] + [37] * 10, [10, 10] + [0] * 10
    layout = VarlenLayout(lengths * 4, queries * 4, device=DEVICE)
    q = torch.empty(layout.total_tokens, 6, 64, dtype=torch.bfloat16, device=DEVICE)
    cu, nq, max_len, fwd, bwd, seq, runs = T.varlen_schedule(q, layout.cu_seqlens, layout.num_queries.long(),
                                                  207, 1, QueryMask())
    assert torch.equal(cu, layout.cu_seqlens) and torch.equal(nq, layout.num_queries)
    assert runs == ()
    for table, block in zip((fwd, bwd), T._table_blocks(q, 207)):
        tiles = layout.tiles(block)
        assert torch.equal(table[: len(tiles)], tiles)
        idle = table[len(tiles):]
        assert (idle[:, 0] == 0).all() and (idle[:, 1] * block >= 207).all()
        assert len(idle) <= 0.3 * len(table), f"{len(idle)} of {len(table)} slots idle"
    assert torch.equal(seq, layout.sequence_tiles(T.SEQUENCE_BLOCK))


@pytest.mark.parametrize("column,value", [(0, 10**6), (0, -7), (1, 10**6), (1, -1)],
                         ids=["sequence huge", "sequence negative", "block huge", "block negative"])
def test_an_edited_tile_table_stays_inside_the_tensors(column, value):
    # The tables are plain tensors a caller can write to; the kernels clamp what they read
    # (a sequence index into the batch, a block into the table), not the host per call.
    from adclr_kernels.attention_triton import varlen_tables

    # Five lengths: more runs than the batched kernels take, so the packed ones read tables.
    lengths = [10, 12, 9, 11, 13]
    layout = VarlenLayout(lengths, 3, device=DEVICE)
    q, k, v, _ = make_packed(lengths, 2, 16)
    q.requires_grad_()
    tables = varlen_tables(layout, q)
    for tiles in tables[3:6]:
        tiles[:, column] = value
    out = unidirectional_attention_varlen(q, k, v, layout, backend="triton")
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert out.shape == q.shape and dq.shape == q.shape


# ---------------------------------------------------------------------------------------
# A layout of few runs of alike sequences: the batched kernels, run by run, on views.
# ---------------------------------------------------------------------------------------


def test_layout_runs():
    layout = VarlenLayout([5, 5, 7, 7, 7, 5, 0, 0], [1, 1, 0, 0, 0, 1, 0, 0])
    assert layout.runs == ((2, 5, 1), (3, 7, 0), (1, 5, 1), (2, 0, 0))
    assert VarlenLayout([]).runs == ()


@pytest.mark.parametrize("opt_set,num_prefix", [(OPTION_SETS[0], 1), (OPTION_SETS[3], 4)],
                         ids=["default-P1", "prefix+self-P4"])
@pytest.mark.parametrize("qkvpacked", [False, True], ids=["qkv", "qkvpacked"])
def test_runs_take_the_batched_kernels_as_batched_calls_would(opt_set, num_prefix, qkvpacked,
                                                              monkeypatch, poisoned):
    """Each run gives what a batched call on its sequences gives, bit for bit (the same
    kernels on views of the packed tensors), its short run through the one-shot kernels."""
    import adclr_kernels.attention_triton as T
    from adclr_kernels import unidirectional_attention_qkvpacked

    monkeypatch.setattr(T, "_fwd_by_runs", lambda *a: True)
    monkeypatch.setattr(T, "_bwd_by_runs", lambda *a: True)
    opts = options(opt_set)
    runs = [(2, 60, 10), (3, 9, 0), (2, 37, 3)]  # 9 tokens: one-shot in the interpreter
    lengths = [n for count, n, _ in runs for _ in range(count)]
    layout = VarlenLayout(lengths, [q for count, _, q in runs for _ in range(count)], device=DEVICE)
    assert T.batched_runs(layout) == (2, 60, 10, 3, 9, 0, 2, 37, 3)
    qkv = torch.randn(layout.total_tokens, 3, 2, 32, generator=torch.Generator().manual_seed(7),
                      dtype=torch.float64).to(device=DEVICE, dtype=torch.float32)
    grad_out = torch.randn(layout.total_tokens, 2, 32, device=DEVICE)
    oneshot = []
    for name in ("oneshot_fwd", "oneshot_bwd"):
        def spy(*args, real=getattr(T, name), name=name, **kwargs):
            oneshot.append((name, args[1].shape))
            return real(*args, **kwargs)
        monkeypatch.setattr(T, name, spy)

    def packed(x):
        if qkvpacked:
            return unidirectional_attention_varlen_qkvpacked(x, layout, num_prefix=num_prefix,
                                                             backend="triton", **opts)
        return unidirectional_attention_varlen(*x.unbind(1), layout, num_prefix=num_prefix,
                                               backend="triton", **opts)

    leaf = qkv.clone().requires_grad_()
    out = packed(leaf)
    (grad,) = torch.autograd.grad(out, leaf, grad_out)
    assert oneshot == [("oneshot_fwd", (3, 2, 9, 32)), ("oneshot_bwd", (3, 2, 9, 32))]
    start = 0
    for count, length, nq in runs:
        end = start + count * length
        part = qkv[start:end].view(count, length, 3, 2, 32).clone().requires_grad_()
        want = unidirectional_attention_qkvpacked(part, nq, num_prefix, backend="triton", **opts)
        (want_grad,) = torch.autograd.grad(want, part, grad_out[start:end].view(want.shape))
        assert torch.equal(out[start:end], want.flatten(0, 1))
        assert torch.equal(grad[start:end], want_grad.flatten(0, 1))
        start = end


@pytest.mark.parametrize("lengths,runs", [
    ([9] * 5, (5, 9, 0)),
    ([9, 9, 20, 20, 5, 5, 30, 30], (2, 9, 0, 2, 20, 0, 2, 5, 0, 2, 30, 0)),
    ([9, 9, 20, 20, 5, 5, 30, 30, 12], ())], ids=["one run", "four runs", "five runs"])
def test_at_most_four_runs_go_to_the_launchers(lengths, runs):
    import adclr_kernels.attention_triton as T

    layout = VarlenLayout(lengths, device=DEVICE)
    q = torch.empty(layout.total_tokens, 2, 32, device=DEVICE)
    cu, nq, max_len, fwd_tiles, bwd_tiles, seq_tiles, got = T.varlen_tables(layout, q)
    assert got == runs
    assert fwd_tiles.shape[1] == bwd_tiles.shape[1] == seq_tiles.shape[1] == 2  # the packed kernels' too


@pytest.mark.parametrize("images,dtype,capability,opts,fwd,bwd,onepass", [
    (128, torch.bfloat16, 90, {}, True, False, True),   # the packed one-pass backward runs
    (32, torch.bfloat16, 90, {}, True, True, False),    # too small for it: runs, one-shot and one-pass
    (16, torch.bfloat16, 90, {}, True, True, False),    # 32 global crops x 6 heads: just enough
    (15, torch.bfloat16, 90, {}, True, False, True),    # 30 global crops, too few: packed
    (10, torch.bfloat16, 90, {}, True, False, False),   # 720 programs: the flash backward
    (32, torch.bfloat16, 90, dict(query_sees_self=True), True, False, False),
    (32, torch.float32, 90, {}, False, False, False),
    (32, torch.bfloat16, 80, {}, True, False, True),    # the global run's 384 pairs: too few there
    (32, torch.bfloat16, 86, {}, False, False, False),  # rules for sm_80 and sm_90 only
    (-32, torch.bfloat16, 90, {}, True, True, False),   # an empty run needs no kernel
], ids=["128 images", "32 images", "16 images", "15 images", "10 images", "sees self", "fp32", "sm_80",
        "sm_86", "empty run"])
def test_gpu_rule_for_runs(images, dtype, capability, opts, fwd, bwd, onepass, monkeypatch):
    """images < 0: as many, and three empty sequences after them."""
    # A ViT-S/16 multi-crop batch as the trainer packs it: two runs, the GPU's rules.
    import adclr_kernels.attention_triton as T
    from adclr_kernels.mask import QueryMask

    monkeypatch.setattr(T, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(T, "device_capability", lambda device: capability)
    empty, images = 3 * (images < 0), abs(images)
    layout = VarlenLayout([207] * 2 * images + [37] * 10 * images + [0] * empty,
                          [10] * 2 * images + [0] * (10 * images + empty), device="meta")
    q = torch.empty(layout.total_tokens, 6, 64, dtype=dtype, device="meta")
    geo = T.varlen_geometry(q, *T.varlen_tables(layout, q)[:2], layout.max_seqlen, None, None,
                            None, T.batched_runs(layout))
    mask = QueryMask(**{f"sees_{k.split('_')[-1]}": v for k, v in opts.items()})
    assert T._fwd_by_runs(q, geo) == fwd
    constants, by_runs = T._onepass_or_runs(q, geo, mask, (q,))
    assert by_runs == bwd and (constants is not None) == onepass


def test_compiled_offsets_call_takes_a_new_max_seqlen():
    """A fullgraph-compiled packed call on offsets whose max_seqlen changes between calls:
    the recompile traces max_seqlen as a symbol, which the device check's message must
    not format."""
    torch._dynamo.reset()
    fn = torch.compile(lambda x, cu, nq, m: unidirectional_attention_varlen_qkvpacked(
        x, cu, nq, max_seqlen=m, backend="triton"), backend="aot_eager", fullgraph=True)
    qkv = torch.randn(20, 3, 2, 32, device=DEVICE)
    queries = torch.tensor([3, 0], dtype=torch.int32, device=DEVICE)
    for first in (12, 13, 14):
        cu = torch.tensor([0, first, 20], dtype=torch.int32, device=DEVICE)
        out = fn(qkv, cu, queries, max(first, 20 - first))
        expected = unidirectional_attention_varlen_qkvpacked(qkv, cu, queries, backend="reference")
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_compiled_offsets_call_does_not_recompile_per_token_count():
    """Every multi-crop batch has its own total: after the first recompile makes it a
    symbol, no check may pin it again (a message formatting it did, one compile per total)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda x, cu, m: unidirectional_attention_varlen_qkvpacked(
        x, cu, 2, max_seqlen=m, backend="triton"), backend=counter, fullgraph=True)
    for lengths in ([9, 11], [12, 10], [8, 15], [14, 6], [7, 7]):
        layout = VarlenLayout(lengths, 2, device=DEVICE)
        qkv = torch.randn(layout.total_tokens, 3, 2, 32, device=DEVICE)
        out = fn(qkv, layout.cu_seqlens, layout.max_seqlen)
        torch.testing.assert_close(out, unidirectional_attention_varlen_qkvpacked(qkv, layout, backend="reference"),
                                   rtol=1e-5, atol=1e-5)
    assert counter.frame_count <= 2


@pytest.mark.parametrize("backend,max_seqlen,why", [
    ("triton", None, "the offsets are checked on the host without max_seqlen"),
    ("sdpa", 8, "the sdpa backend attends sequence by sequence")])
def test_a_fullgraph_call_that_must_read_offsets_on_the_host_says_what_to_pass(backend, max_seqlen, why):
    def call(x, cu):
        return unidirectional_attention_varlen_qkvpacked(x, cu, 2, max_seqlen=max_seqlen, backend=backend)

    qkv = torch.randn(14, 3, 2, 32, device=DEVICE)
    cu = torch.tensor([0, 6, 14], dtype=torch.int32, device=DEVICE)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=re.escape(f"reads them on the host ({why}); pass a VarlenLayout instead")):
        torch.compile(call, backend="aot_eager", fullgraph=True)(qkv, cu)
    torch._dynamo.reset()  # without fullgraph: the graph breaks there, and the call runs
    out = torch.compile(call, backend="aot_eager")(qkv, cu)
    torch.testing.assert_close(out, unidirectional_attention_varlen_qkvpacked(qkv, cu, 2, backend="reference"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "reference", "sdpa"])
@pytest.mark.parametrize("given", ["layout", "offsets"])
def test_a_batch_of_no_sequences_has_a_backward(backend, given):
    """Zero sequences (an empty batch): an empty output and prefix rows that autograd
    still connects to qkv on every backend, so the step's backward runs as usual."""
    qkv = torch.randn(0, 3, 2, 32, device=DEVICE, requires_grad=True)
    cu = VarlenLayout([], device=DEVICE) if given == "layout" else torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out, probs = unidirectional_attention_varlen_qkvpacked(qkv, cu, backend=backend,
                                                           return_prefix_probs=True)
    assert out.shape == (0, 2, 32) and probs.shape == (2, 1, 0)
    (out.sum() + probs.sum()).backward()
    assert qkv.grad.shape == qkv.shape
