"""The one-pass backward (`_onepass_bwd_kernel` in attention_triton.py): one program per
(sequence, head) of batched sequences under the default mask rule, delta, dQ, dK and dV in
one launch. Against the float64 reference, with every test checking that it, and not the
flash backward, ran.

In the interpreter it walks 32-key blocks in 16-row tiles, so the sequences here (34 to
69 tokens) span two or three key blocks with the raw/query boundary inside a block.
"""

import pytest
import torch

import adclr_kernels.attention_triton as T
import test_visibility
from adclr_kernels import unidirectional_attention, unidirectional_attention_qkvpacked
from kernel_testing import ON_CUDA, OPTION_SETS, options
from test_attention_triton import check_triton

pytestmark = [pytest.mark.usefixtures("poisoned"),
              pytest.mark.skipif(ON_CUDA, reason="the interpreter's tiles: on CUDA the GPU rule applies")]

DEFAULT = options(OPTION_SETS[0])
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


@pytest.mark.parametrize("num_prefix,num_raw,num_queries,short_keys,dtype",
                         [(*layout, torch.float32) for layout in LAYOUTS]
                         + [(*layout, torch.bfloat16) for layout in LAYOUTS[2:4]])
def test_matches_float64(launched, num_prefix, num_raw, num_queries, short_keys, dtype):
    check_triton(2, 2, num_prefix, num_raw, num_queries, 16, DEFAULT, dtype=dtype,
                 short_keys=short_keys)
    assert launched == ONEPASS


@pytest.mark.parametrize("opt_set", OPTION_SETS[1:], ids=str)
def test_mask_options_keep_the_flash_backward(launched, opt_set):
    check_triton(1, 1, 1, 40, 10, 16, options(opt_set))
    assert launched[1:] == ["_unidirectional_bwd_delta_kernel", "_unidirectional_bwd_kernel"]


@pytest.mark.parametrize("layout,shift", [((40, 6), 0), ((40, 6), 1), ((40, 6), 2), ((60, 3), 4)])
def test_unseen_values_stay_out(monkeypatch, poisoned, launched, layout, shift):
    # test_visibility's property (NaN and inf in q, k, v reach only the rows and gradients
    # that depend on them) on sequences of 48 and 65 tokens, keys of the full length; each
    # shift puts the values in other tensors (q, k or v at each role), so that every one
    # of them sits at a prefix token the query rows do not see.
    monkeypatch.setattr(test_visibility, "BATCHED", [layout] * 5)
    cases = test_visibility._cases
    monkeypatch.setattr(test_visibility, "_cases", lambda call: cases(call + shift))
    test_visibility.test_a_value_reaches_only_what_depends_on_it("triton", OPTION_SETS[0],
                                                                 "batched", poisoned)
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


def test_bitwise_deterministic_with_a_broadcast_gradient(launched):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, 51, 3, 2, 32, generator=g).to(torch.bfloat16).requires_grad_()
    runs = []
    for _ in range(2):
        out = unidirectional_attention_qkvpacked(qkv, 10, 1, backend="triton")
        out.sum().backward()  # the output gradient is a stride-0 expand
        runs.append((out.detach(), qkv.grad.clone()))
        qkv.grad = None
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert launched == ONEPASS * 2
    ref_in = qkv.detach().double().requires_grad_()
    unidirectional_attention_qkvpacked(ref_in, 10, 1, backend="reference").sum().backward()
    torch.testing.assert_close(runs[0][1].double(), ref_in.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype,head_dim,capability,length", [
    (torch.float32, 64, 90, 207), (torch.bfloat16, 128, 90, 207), (torch.bfloat16, 64, 80, 207),
    (torch.bfloat16, 64, 90, T.ONEPASS_MAX_LEN + 1)])
def test_gpu_rule_keeps_the_flash_backward_where_not_predicted_to_win(dtype, head_dim, capability,
                                                                       length):
    assert T.onepass_config(207, 64, torch.bfloat16, 90, False)["BLOCK_M"] == 32
    assert T.onepass_config(length, head_dim, dtype, capability, False) is None


@pytest.mark.parametrize("varlen,opt_set", [(True, OPTION_SETS[0]), (False, OPTION_SETS[1]),
                                            (False, OPTION_SETS[4])])
def test_only_batched_calls_under_the_default_rule_take_it(varlen, opt_set):
    q = torch.empty(2, 6, 207, 64, dtype=torch.bfloat16, device="meta")
    geo = T.Geometry(2, 6, 207, 207, 207, 197,
                     cu_seqlens=torch.empty(3, device="meta") if varlen else None)
    assert T._onepass(q, geo, T.query_mask(*opt_set)) is None
    assert T._onepass(q, geo._replace(cu_seqlens=None), T.query_mask()) is not None


def test_rows_with_every_score_far_below_zero(launched):
    # Every score of every row is about -200 (scaled): each row's logsumexp is far below
    # 0, and a padding key of 0 would get probability e^200 (inf in fp32) beside them.
    torch.manual_seed(0)
    u = torch.randn(16, dtype=torch.float64)
    u = u / u.norm()
    q = (-800 * u).expand(1, 1, 44, 16) + 0.1 * torch.randn(1, 1, 44, 16, dtype=torch.float64)
    k = u.expand(1, 1, 41, 16) + 0.001 * torch.randn(1, 1, 41, 16, dtype=torch.float64)
    v = torch.randn(1, 1, 41, 16, dtype=torch.float64)
    grad = torch.randn(1, 1, 44, 16, dtype=torch.float64)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(unidirectional_attention(*leaves, 3, 1, backend="triton"), leaves,
                              grad.float())
    assert launched == ONEPASS
    ref = [t.detach().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(unidirectional_attention(*ref, 3, 1, backend="reference"), ref, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-3, atol=1e-3)
