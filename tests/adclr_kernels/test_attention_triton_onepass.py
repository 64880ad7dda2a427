"""The one-pass backward (`_onepass_bwd_kernel` in attention_triton.py): one program per
(sequence, head) of batched or packed sequences under the default mask rule or
query_sees_prefix alone, delta, dQ, dK and dV in one launch. Against the float64 reference, with every test checking that it,
and not the flash backward, ran.

In the interpreter it walks 32-key blocks in 16-row tiles, so the sequences here (34 to
69 tokens batched, 1 to 129 packed) span up to five key blocks with the raw/query
boundary inside a block.
"""

import pytest
import torch

import adclr_kernels.attention_triton as T
import test_visibility
from adclr_kernels import (VarlenLayout, unidirectional_attention, unidirectional_attention_qkvpacked,
                           unidirectional_attention_varlen, unidirectional_attention_varlen_qkvpacked)
from adclr_kernels.attention_torch import dense_masked_attention, varlen_per_sequence
from kernel_testing import ON_CUDA, OPTION_SETS, assert_fa_close, assert_rel_close, options
from test_attention_triton import check_triton
from test_varlen import dense_per_sequence, make_packed

pytestmark = [pytest.mark.usefixtures("poisoned"),
              pytest.mark.skipif(ON_CUDA, reason="the interpreter's tiles: on CUDA the GPU rule applies")]

DEFAULT = options(OPTION_SETS[0])
SEES_PREFIX = options(OPTION_SETS[1])
ONEPASS = ["_unidirectional_fwd_kernel", "_onepass_bwd_kernel"]


@pytest.fixture
def launched(monkeypatch):
    """The names of the kernels each call launches."""
    calls = []
    for kernel in (T._unidirectional_fwd_kernel, T._unidirectional_bwd_kernel,
                   T._unidirectional_bwd_delta_kernel, T._onepass_bwd_kernel):
        def run(*args, _real=kernel.run, _name=kernel.fn.__name__, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", run)
    return calls


# (P, N, Q, short keys): no query rows; one; the query rows inside the last key block;
# a prefix wider than a key block (block 0 seen by raw rows only, block 1 holding prefix,
# raw and, for the query rows, nothing else); keys of the full length (the query keys,
# which no row sees, get dK = dV = 0).
LAYOUTS = [(1, 33, 0, True), (4, 40, 1, True), (1, 40, 10, True), (40, 20, 3, True),
           (4, 40, 25, False)]


@pytest.mark.parametrize("num_prefix,num_raw,num_queries,short_keys,dtype,opts",
                         [(*layout, torch.float32, DEFAULT) for layout in LAYOUTS]
                         + [(*layout, torch.bfloat16, DEFAULT) for layout in LAYOUTS[2:4]]
                         + [(*layout, torch.float32, SEES_PREFIX) for layout in LAYOUTS[3:]])
def test_matches_float64(launched, num_prefix, num_raw, num_queries, short_keys, dtype, opts):
    check_triton(2, 2, num_prefix, num_raw, num_queries, 16, opts, dtype=dtype,
                 short_keys=short_keys)
    assert launched == ONEPASS


def _pack(num_prefix, num_queries):
    """Lengths and query counts of sequences side by side: the prefix alone, with one raw
    token, a key block of the GPU's (64) and a token either side, and 129 tokens (five of
    the interpreter's 32-key blocks); Q query tokens where the sequence has room."""
    lengths = [num_prefix, num_prefix + 1, 63, 64, 65, 129]
    return lengths, [min(num_queries, max(n - num_prefix - 1, 0)) for n in lengths]


@pytest.mark.parametrize("num_prefix,num_queries,offsets,dtype,opts", [
    (1, 0, False, torch.float32, DEFAULT), (4, 1, True, torch.float32, DEFAULT),
    (1, 10, False, torch.bfloat16, DEFAULT), (4, 10, True, torch.float32, SEES_PREFIX)])
def test_packed_matches_float64(launched, num_prefix, num_queries, offsets, dtype, opts):
    # With a VarlenLayout, or as FlashAttention takes a varlen batch (cu_seqlens and
    # max_seqlen, the values read on the device).
    lengths, queries = _pack(num_prefix, num_queries)
    q, k, v, cu = make_packed(lengths, 2, 16, dtype=dtype)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    if offsets:
        out = unidirectional_attention_varlen(*leaves, cu, torch.tensor(queries, dtype=torch.int32),
                                              num_prefix, max_seqlen=max(lengths), backend="triton",
                                              **opts)
    else:
        out = unidirectional_attention_varlen(*leaves, VarlenLayout(lengths, queries), None,
                                              num_prefix, backend="triton", **opts)
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert launched == ONEPASS
    ref, ref_grads = dense_per_sequence(q, k, v, cu, queries, num_prefix, grad_out, opts)
    if dtype == torch.float32:
        for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
            assert_rel_close(name, got, want)
        return
    bounds = list(zip(cu.tolist()[:-1], cu.tolist()[1:]))
    lo_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    lo = varlen_per_sequence(dense_masked_attention, *lo_leaves, bounds, queries, num_prefix)
    lo_grads = torch.autograd.grad(lo, lo_leaves, grad_out)
    for name, got, want, low in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads),
                                    (lo, *lo_grads)):
        assert_fa_close(name, got, want, low)


@pytest.mark.parametrize("num_prefix,num_queries,opts,capability,block_n", [
    (1, 10, DEFAULT, 90, 64), (4, 1, DEFAULT, 90, 64), (4, 10, SEES_PREFIX, 90, 64),
    (1, 10, DEFAULT, 80, 32), (4, 10, SEES_PREFIX, 80, 32)])
def test_packed_at_the_gpu_tiles(monkeypatch, launched, num_prefix, num_queries, opts, capability,
                                 block_n):
    # The GPU's packed config (32 x 64 tiles, 32 x 32 on sm_80; fp16 for bf16, which the
    # interpreter cannot dot) on the pack above:
    # 63, 64 and 65 tokens around one 64-key block, 129 past two.
    monkeypatch.setattr(T, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(T, "device_capability", lambda device: capability)
    monkeypatch.setattr(T, "ONEPASS_MIN_PACKED_PROGRAMS", 1)
    monkeypatch.setattr(T, "ONEPASS_MIN_PROGRAMS_SM80", 1)
    tiles, run = [], T._onepass_bwd_kernel.run

    def tiled_run(*args, **kwargs):
        tiles.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"]))
        return run(*args, **kwargs)
    monkeypatch.setattr(T._onepass_bwd_kernel, "run", tiled_run)
    lengths, queries = _pack(num_prefix, num_queries)
    q, k, v, cu = make_packed(lengths, 1, 64, dtype=torch.float16)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).half()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = unidirectional_attention_varlen(*leaves, VarlenLayout(lengths, queries), None,
                                          num_prefix, backend="triton", **opts)
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert launched == ONEPASS and tiles == [(32, block_n)]
    ref, ref_grads = dense_per_sequence(q, k, v, cu, queries, num_prefix, grad_out, opts)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert_rel_close(name, got, want, 3e-3)  # fp16 inputs, fp32 accumulation


@pytest.mark.parametrize("num_prefix,num_raw,num_queries,opt_set,tiles", [
    (1, 46, 1, OPTION_SETS[0], ("onepass", 32, 32)), (4, 61, 10, OPTION_SETS[0], ("onepass", 32, 32)),
    (4, 61, 10, OPTION_SETS[1], ("onepass", 32, 32)), (1, 54, 10, OPTION_SETS[2], ("flash", 32, 32)),
    (4, 90, 6, OPTION_SETS[4], ("flash", 32, 32))])
def test_sm80_tiles_in_the_interpreter(monkeypatch, num_prefix, num_raw, num_queries, opt_set,
                                       tiles):
    # sm_80's rules (fp16 as above): the one-pass backward on 32 x 32 tiles, and where a
    # mask option keeps the flash backward, its 32 x 32 tiles; the forward without the
    # tensor-core row sum. 48, 65, 75 and 100 tokens: tails after whole tiles, and the
    # raw/query boundary inside a tile.
    monkeypatch.setattr(T, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(T, "device_capability", lambda device: 80)
    monkeypatch.setattr(T, "ONEPASS_MIN_PROGRAMS_SM80", 1)
    monkeypatch.setattr(T, "ONEPASS_MIN_BATCHED_PROGRAMS", 1)
    seen = []
    for kernel, name, keys in ((T._onepass_bwd_kernel, "onepass", ("BLOCK_M", "BLOCK_N")),
                               (T._unidirectional_bwd_kernel, "flash", ("BLOCK_M1", "BLOCK_N1"))):
        def run(*args, _real=kernel.run, _name=name, _keys=keys, **kwargs):
            seen.append((_name, *(kwargs[k] for k in _keys)))
            return _real(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", run)
    check_triton(2, 2, num_prefix, num_raw, num_queries, 64, options(opt_set), dtype=torch.float16)
    assert seen == [tiles]


@pytest.mark.parametrize("opt_set", OPTION_SETS[2:], ids=str)
def test_mask_options_keep_the_flash_backward(launched, opt_set):
    check_triton(1, 1, 1, 40, 10, 16, options(opt_set))
    assert launched[1:] == ["_unidirectional_bwd_delta_kernel", "_unidirectional_bwd_kernel"]


# (N, Q) of each of five sequences (P = 2): packed, 65, 4, 48, 36 and 64 tokens.
PACKED_VISIBILITY = [(60, 3), (1, 1), (40, 6), (31, 3), (61, 1)]


@pytest.mark.parametrize("form,layouts,shift", [
    ("batched", [(40, 6)] * 5, 0), ("batched", [(40, 6)] * 5, 1), ("batched", [(40, 6)] * 5, 2),
    ("batched", [(60, 3)] * 5, 4), ("varlen", PACKED_VISIBILITY, 0),
    ("varlen", PACKED_VISIBILITY, 1), ("varlen", PACKED_VISIBILITY, 2)])
def test_unseen_values_stay_out(monkeypatch, poisoned, launched, form, layouts, shift):
    # test_visibility's property (NaN and inf in q, k, v reach only the rows and gradients
    # that depend on them) on sequences of 48 and 65 tokens batched, 4 to 65 packed, keys
    # of the full length; each shift puts the values in other tensors (q, k or v at each
    # role), so that every one of them sits at a prefix token the query rows do not see.
    monkeypatch.setattr(test_visibility, "BATCHED" if form == "batched" else "VARLEN", layouts)
    cases = test_visibility._cases
    monkeypatch.setattr(test_visibility, "_cases", lambda call: cases(call + shift))
    test_visibility.test_a_value_reaches_only_what_depends_on_it("triton", OPTION_SETS[0],
                                                                 form, poisoned)
    assert set(launched) == set(ONEPASS)


@pytest.mark.parametrize("row", [0, 30, 45])  # a raw row in key block 0, in block 1, a query row
def test_a_non_finite_gradient_reaches_only_what_its_row_sees(launched, row):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 48, 16, requires_grad=True) for _ in range(3))
    kv = [t[:, :, :42].detach().requires_grad_() for t in (k, v)]  # P = 4, N = 38, Q = 6
    out = unidirectional_attention(q, *kv, 6, 4, backend="triton")
    grad = torch.randn_like(out)
    grad[1, 0, row, 0] = float("nan")
    dq, dk, dv = torch.autograd.grad(out, (q, *kv), grad)
    assert launched == ONEPASS
    sees = torch.ones(42, dtype=torch.bool)
    if row >= 42:
        sees[:4] = False  # a query row does not see the prefix
    # That row's dQ; dK and dV of the columns it sees; nothing else.
    assert dq[1, 0, row].isnan().all() and torch.isfinite(dq[1, 0, :row]).all()
    assert torch.isfinite(dq[1, 0, row + 1:]).all()
    for g in (dk, dv):
        assert g[1, 0, sees].isnan().any(-1).all() and torch.isfinite(g[1, 0, ~sees]).all()
        assert torch.isfinite(g[0]).all() and torch.isfinite(g[:, 1]).all()
    assert torch.isfinite(dq[0]).all() and torch.isfinite(dq[:, 1]).all()


@pytest.mark.parametrize("packed", [False, True, "by runs"], ids=["batched", "packed", "by runs"])
def test_bitwise_deterministic_with_a_broadcast_gradient(launched, packed, monkeypatch):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3 * 51, 3, 2, 32, generator=g).to(torch.bfloat16).requires_grad_()
    if packed == "by runs":  # three sequences of 51 tokens, as one run by the batched kernels
        monkeypatch.setattr(T, "_fwd_by_runs", lambda *a: True)
        monkeypatch.setattr(T, "_bwd_by_runs", lambda *a: True)

    def attend(t, backend):
        if packed == "by runs":
            return unidirectional_attention_varlen_qkvpacked(
                t, VarlenLayout([51] * 3, 10), None, 1, backend=backend)
        if packed:  # 153 tokens in five runs: more than the batched kernels take by runs
            return unidirectional_attention_varlen_qkvpacked(
                t, VarlenLayout([65, 2, 40, 20, 26], [10, 0, 10, 0, 3]), None, 1, backend=backend)
        return unidirectional_attention_qkvpacked(t.view(3, 51, 3, 2, 32), 10, 1, backend=backend)

    runs = []
    for _ in range(2):
        out = attend(qkv, "triton")
        out.sum().backward()  # the output gradient is a stride-0 expand
        runs.append((out.detach(), qkv.grad.clone()))
        qkv.grad = None
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert launched == ONEPASS * 2
    ref_in = qkv.detach().double().requires_grad_()
    attend(ref_in, "reference").sum().backward()
    torch.testing.assert_close(runs[0][1].double(), ref_in.grad, rtol=2e-2, atol=2e-2)


ENOUGH = T.ONEPASS_MIN_BATCHED_PROGRAMS


@pytest.mark.parametrize("dtype,head_dim,capability,length,packed,programs", [
    (torch.float32, 64, 90, 207, False, ENOUGH), (torch.bfloat16, 128, 90, 207, False, ENOUGH),
    (torch.bfloat16, 64, 80, 207, False, ENOUGH),
    (torch.bfloat16, 64, 90, T.ONEPASS_MAX_LEN + 1, False, ENOUGH),
    (torch.bfloat16, 64, 90, 207, False, T.ONEPASS_MIN_BATCHED_PROGRAMS - 1),
    (torch.bfloat16, 64, 90, 207, True, T.ONEPASS_MIN_PACKED_PROGRAMS - 1)])
def test_gpu_rule_keeps_the_flash_backward_where_not_predicted_to_win(
        dtype, head_dim, capability, length, packed, programs):
    """programs: (sequence, head) pairs of the call."""
    batched = T.onepass_config(207, 64, torch.bfloat16, 90, False, False, ENOUGH)
    assert batched["BLOCK_M"] == 32 and not batched["VARLEN"]
    packed_cfg = T.onepass_config(207, 64, torch.bfloat16, 90, False, True,
                                  T.ONEPASS_MIN_PACKED_PROGRAMS)
    assert packed_cfg["BLOCK_M"] == 32 and packed_cfg["VARLEN"]
    assert T.onepass_config(length, head_dim, dtype, capability, False, packed, programs) is None


def test_gpu_rule_on_sm80():
    # 32 x 32 tiles for 16-bit head_dim <= 64, from about one and a half waves of
    # programs and up to 512 tokens (bench.static); not on sm_86, which it does not model.
    most = T.ONEPASS_MIN_PROGRAMS_SM80
    for args, varlen in (((207, 64, torch.bfloat16, 80, False, False, most), False),
                         ((T.ONEPASS_MAX_LEN_SM80, 32, torch.float16, 80, False, False, most), False),
                         ((207, 64, torch.float16, 80, False, True, T.ONEPASS_MIN_PACKED_PROGRAMS), True),
                         ((207, 64, torch.bfloat16, 80, False, True, T.ONEPASS_MIN_PROGRAMS_OVER_RUNS,
                           True), True)):
        cfg = T.onepass_config(*args)
        assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["maxnreg"], cfg["VARLEN"]) == (32, 32, 168, varlen)
    for args in ((207, 64, torch.bfloat16, 80, False, False, most - 1),
                 (207, 64, torch.bfloat16, 80, False, True, T.ONEPASS_MIN_PROGRAMS_OVER_RUNS - 1, True),
                 (T.ONEPASS_MAX_LEN_SM80 + 1, 64, torch.bfloat16, 80, False, False, 10**4),
                 (207, 128, torch.bfloat16, 80, False, False, 10**4),
                 (207, 64, torch.float32, 80, False, False, 10**4),
                 (207, 64, torch.bfloat16, 86, False, False, 10**4),
                 (207, 64, torch.bfloat16, 80, False, True, T.ONEPASS_MIN_PACKED_PROGRAMS - 1)):
        assert T.onepass_config(*args) is None, args


def _packed_meta(tokens, heads=6):
    """q, k, v of a (tokens, 3, heads, 64) projection, and their packed geometry."""
    qkv = torch.empty(tokens, 3, heads, 64, dtype=torch.bfloat16, device="meta")
    geo = T.Geometry(2, heads, 207, total_tokens=tokens, cu_seqlens=torch.empty(3, device="meta"))
    return qkv.unbind(1), geo


@pytest.mark.parametrize("opt_set", [OPTION_SETS[2], OPTION_SETS[4]])
def test_mask_options_keep_the_flash_backward_in_both_layouts(opt_set):
    q = torch.empty(2, 6, 207, 64, dtype=torch.bfloat16, device="meta")
    geo = T.Geometry(2, 6, 207, 207, 207, 197)
    (pq, pk, pv), packed = _packed_meta(414)
    assert T._onepass(q, geo, T.query_mask(*opt_set)) is None
    assert T._onepass(pq, packed, T.query_mask(*opt_set), (pq, pk, pv)) is None
    for sees_prefix in (False, True):
        assert T._onepass(q, geo, T.query_mask(sees_prefix))["SEES_PREFIX"] == sees_prefix
        found = T._onepass(pq, packed, T.query_mask(sees_prefix), (pq, pk, pv))
        assert found["VARLEN"] and found["SEES_PREFIX"] == sees_prefix


def test_packed_calls_take_it_from_fewer_programs_than_a_layout_that_may_go_by_runs(
        monkeypatch):
    # On a GPU: a packed call by offsets takes the one-pass backward from
    # ONEPASS_MIN_PACKED_PROGRAMS; a layout of a few runs, which may go run by run instead,
    # from ONEPASS_MIN_PROGRAMS_OVER_RUNS.
    monkeypatch.setattr(T, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(T, "device_capability", lambda device: 90)
    (q, k, v), _ = _packed_meta(207 * 600)
    for seqs, in_runs, takes_it in (
            (T.ONEPASS_MIN_PACKED_PROGRAMS // 6, False, True),
            (T.ONEPASS_MIN_PACKED_PROGRAMS // 6 - 1, False, False),
            (T.ONEPASS_MIN_PACKED_PROGRAMS // 6, True, False),
            (T.ONEPASS_MIN_PROGRAMS_OVER_RUNS // 6 - 1, True, False),
            (T.ONEPASS_MIN_PROGRAMS_OVER_RUNS // 6, True, True)):
        runs = (seqs, 207, 10) if in_runs else ()  # one run: (count, length, queries)
        geo = T.Geometry(seqs, 6, 207, total_tokens=207 * seqs,
                         cu_seqlens=torch.empty(seqs + 1, device="meta"), runs=runs)
        found = T._onepass(q, geo, T.query_mask(), (q, k, v))
        assert (found is not None) == takes_it, (seqs, runs)
    assert T.ONEPASS_MIN_PACKED_PROGRAMS < T.ONEPASS_MIN_PROGRAMS_OVER_RUNS


def test_packed_token_offsets_past_int32_keep_the_flash_backward():
    # The kernel's row indices are int32: where a token offset of q, k or v (stride
    # 3 x 6 x 64 in the projection) could reach 2^31, the flash backward (64-bit) runs.
    most = (2**31 - 64 - 1) // (3 * 6 * 64)
    for tokens, takes_it in ((most, True), (most + 1, False)):
        (q, k, v), geo = _packed_meta(tokens)
        assert (T._onepass(q, geo, T.query_mask(), (q, k, v)) is not None) == takes_it
