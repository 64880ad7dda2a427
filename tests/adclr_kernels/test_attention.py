"""The public op: every PyTorch backend against float64, errors, auto, custom-op checks."""

import pytest
import torch
import torch.nn.functional as F

from adclr_kernels import BACKENDS, unidirectional_attention, visibility_mask
from adclr_kernels.attention import xformers_available
from adclr_kernels.reference import dense_masked_attention, reference_attention
from kernel_testing import (DEVICE, OPTION_SETS, assert_fa_close, assert_rel_close, make_qkv,
                            on_device, options, reference_grads)

ON_CUDA = DEVICE == "cuda"


def backend_param(name):
    marks = []
    if name == "xformers":
        marks.append(pytest.mark.skipif(not (ON_CUDA and xformers_available()),
                                        reason="xformers needs CUDA and the xformers package"))
    return pytest.param(name, marks=marks, id=name)


PEERS = [backend_param(b) for b in ("reference", "sdpa", "flex", "xformers")]


def test_mask_rule_by_hand():
    # P=1, N=2, Q=2 with query_sees_prefix: rows 0-2 see 0-2; rows 3-4 see 0-2.
    m = visibility_mask(5, 5, 2, 1, query_sees_prefix=True)
    assert m.tolist() == [[1, 1, 1, 0, 0]] * 5
    # Default: queries skip the prefix; with self: the diagonal is added.
    m = visibility_mask(5, 5, 2, 1, query_sees_self=True).int().tolist()
    assert m[3] == [0, 1, 1, 1, 0] and m[4] == [0, 1, 1, 0, 1] and m[0] == [1, 1, 1, 0, 0]
    m = visibility_mask(5, 5, 2, 1, query_sees_queries=True).int().tolist()
    assert m[3] == [0, 1, 1, 1, 1]


@pytest.mark.parametrize("opt_set", OPTION_SETS)
@pytest.mark.parametrize("num_queries", [0, 1, 10])
def test_reference_equals_dense_mask_in_float64(opt_set, num_queries):
    opts = options(opt_set)
    q, k, v = make_qkv(2, 3, 2, 25, num_queries, 16, opts)
    a = reference_attention(q, k, v, num_queries, 2, **opts)
    b = dense_masked_attention(q, k, v, num_queries, 2, **opts)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", PEERS)
@pytest.mark.parametrize("opt_set", OPTION_SETS)
@pytest.mark.parametrize("num_queries", [0, 1, 10])
def test_backends_match_float64(backend, opt_set, num_queries):
    opts = options(opt_set)
    dtype = torch.float32
    q, k, v = make_qkv(2, 2, 4, 31, num_queries, 32, opts, dtype=dtype)
    kw = dict(num_queries=num_queries, num_prefix=4, **opts)
    ref64, grads64 = reference_grads(dense_masked_attention, q.double(), k.double(), v.double(),
                                     torch.ones(q.shape, dtype=torch.float64, device=DEVICE), **kw)
    if backend == "flex" and not ON_CUDA:
        with torch.no_grad():  # PyTorch has no flex backward on CPU
            out = unidirectional_attention(q, k, v, backend=backend, **kw)
        assert_rel_close("out", out, ref64)
        return
    out, grads = reference_grads(unidirectional_attention, q, k, v, torch.ones_like(q),
                                 backend=backend, **kw)
    assert_rel_close("out", out, ref64, tol=1e-4 if ON_CUDA else 1e-5)
    for name, got, want in zip("qkv", grads, grads64):
        assert_rel_close(f"d{name}", got, want, tol=1e-4 if ON_CUDA else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", [b for b in PEERS if b.values[0] != "flex"])
def test_backends_low_precision(backend, dtype):
    opts = options(OPTION_SETS[0])
    q, k, v = make_qkv(2, 2, 1, 40, 10, 64, opts, dtype=dtype, seed=7)
    kw = dict(num_queries=10, num_prefix=1, **opts)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(8),
                           dtype=torch.float64).to(DEVICE)
    out, grads = reference_grads(unidirectional_attention, q, k, v, grad_out.to(dtype),
                                 backend=backend, **kw)
    ref64, grads64 = reference_grads(dense_masked_attention, q.double(), k.double(), v.double(),
                                     grad_out, **kw)
    # The yardstick: the plain masked softmax run in the same low precision.
    ref_lo, grads_lo = reference_grads(dense_masked_attention, q, k, v, grad_out.to(dtype), **kw)
    assert out.dtype == dtype
    assert_fa_close("out", out, ref64, ref_lo)
    for name, got, want, lo in zip("qkv", grads, grads64, grads_lo):
        assert_fa_close(f"d{name}", got, want, lo)


def test_no_queries_is_plain_attention():
    q, k, v = make_qkv(2, 3, 1, 40, 0, 32, options(OPTION_SETS[0]), dtype=torch.float64)
    for backend in ("reference", "sdpa"):
        out = unidirectional_attention(q, k, v, 0, backend=backend)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_auto_picks_triton_on_cuda_and_a_pytorch_path_on_cpu(monkeypatch):
    import adclr_kernels.unidirectional as uni

    q, k, v = make_qkv(1, 2, 1, 10, 2, 32, options(OPTION_SETS[0]), dtype=torch.float32)
    calls = []
    real = uni.attention_fwd
    monkeypatch.setattr(uni, "attention_fwd", lambda *a: calls.append(1) or real(*a))
    out = unidirectional_attention(q, k, v, 2)
    assert bool(calls) == ON_CUDA
    assert_rel_close("out", out, dense_masked_attention(q.double(), k.double(), v.double(), 2, 1),
                     tol=1e-4 if ON_CUDA else 1e-5)


# ---------------------------------------------------------------------------------------
# Bad input: every case a user can send, each with the error type and a message that
# names the argument.
# ---------------------------------------------------------------------------------------

def _good(**over):
    q, k, v = make_qkv(2, 3, 1, 10, 4, 16, options(OPTION_SETS[0]), dtype=torch.float32)
    args = dict(q=q, k=k, v=v, num_queries=4, num_prefix=1)
    args.update(over)
    return args


BAD_INPUTS = [
    ("q not a tensor", dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    ("q 3-d", dict(q=torch.randn(2, 15, 16)), ValueError, "q must have shape"),
    ("k 5-d", dict(k=torch.randn(2, 3, 11, 16, 1)), ValueError, "k must have shape"),
    ("int dtype", dict(v=torch.ones(2, 3, 11, 16, dtype=torch.int32)), TypeError, "v must be float"),
    ("mixed dtypes", dict(k=torch.randn(2, 3, 11, 16, dtype=torch.float64)), TypeError, "share one dtype"),
    ("k/v shapes differ", dict(v=torch.randn(2, 3, 15, 16)), ValueError, "k and v must have the same shape"),
    ("heads differ", dict(k=torch.randn(2, 4, 11, 16), v=torch.randn(2, 4, 11, 16)), ValueError, "match q"),
    ("batch differs", dict(k=torch.randn(1, 3, 11, 16), v=torch.randn(1, 3, 11, 16)), ValueError, "match q"),
    ("head_dim differs", dict(k=torch.randn(2, 3, 11, 8), v=torch.randn(2, 3, 11, 8)), ValueError, "match q"),
    ("k too short", dict(k=torch.randn(2, 3, 9, 16), v=torch.randn(2, 3, 9, 16)), ValueError, "must have length"),
    ("Q negative", dict(num_queries=-1), ValueError, "num_queries must be in"),
    ("Q > seq", dict(num_queries=16), ValueError, "num_queries must be in"),
    ("Q a float", dict(num_queries=4.0), TypeError, "num_queries must be an int"),
    ("Q a tensor", dict(num_queries=torch.tensor(4)), TypeError, "num_queries must be an int"),
    ("P too large", dict(num_prefix=12), ValueError, "num_prefix must be in"),
    ("P a bool", dict(num_prefix=True), TypeError, "num_prefix must be an int"),
    ("nothing to see", dict(num_prefix=11), ValueError, "attend to nothing"),
    ("self needs query keys", dict(query_sees_self=True), ValueError, "need the query keys"),
    ("option not bool", dict(query_sees_prefix=1), TypeError, "query_sees_prefix must be a bool"),
    ("scale a string", dict(scale="0.1"), TypeError, "scale must be a finite float"),
    ("scale nan", dict(scale=float("nan")), TypeError, "scale must be a finite float"),
    ("scale negative", dict(scale=-0.1), ValueError, "scale must be >= 0"),
    ("unknown backend", dict(backend="cudnn"), ValueError, "backend must be one of"),
    ("head_dim 0", dict(q=torch.randn(2, 3, 15, 0), k=torch.randn(2, 3, 11, 0),
                        v=torch.randn(2, 3, 11, 0)), ValueError, "head_dim 0"),
    ("triton head_dim 512", dict(backend="triton", q=torch.randn(1, 1, 15, 512),
                                 k=torch.randn(1, 1, 11, 512), v=torch.randn(1, 1, 11, 512)),
     ValueError, "head_dim up to 256"),
    ("triton float64", dict(backend="triton", q=torch.randn(2, 3, 15, 16, dtype=torch.float64),
                            k=torch.randn(2, 3, 11, 16, dtype=torch.float64),
                            v=torch.randn(2, 3, 11, 16, dtype=torch.float64)), TypeError, "float16, bfloat16 or float32"),
]


@pytest.mark.parametrize("case,over,exc,msg", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_clearly(case, over, exc, msg):
    args = _good(**on_device(over))
    with pytest.raises(exc, match=msg):
        unidirectional_attention(**args)


@pytest.mark.skipif(ON_CUDA, reason="checks the CPU-only errors")
def test_backends_unavailable_on_cpu_say_why(monkeypatch):
    args = _good()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        unidirectional_attention(**args, backend="triton")
    with pytest.raises(RuntimeError, match="xformers"):
        unidirectional_attention(**args, backend="xformers")
    leaves = {n: args[n].detach().requires_grad_() for n in "qkv"}
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        unidirectional_attention(**{**args, **leaves}, backend="flex")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_mixed_devices():
    args = _good()
    with pytest.raises(RuntimeError, match="one device"):
        unidirectional_attention(**{**args, "q": args["q"].cpu()})


def test_every_documented_backend_is_known():
    assert set(BACKENDS) == {"auto", "triton", "reference", "sdpa", "flex", "xformers"}


# ---------------------------------------------------------------------------------------
# Edge inputs: every backend agrees on them as on normal ones.
# ---------------------------------------------------------------------------------------

EDGE_BACKENDS = [backend_param(b) for b in ("triton", "reference", "sdpa", "flex", "xformers")]


def _no_grad_if_flex_on_cpu(backend):
    import contextlib

    return torch.no_grad() if backend == "flex" and not ON_CUDA else contextlib.nullcontext()


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("opt_set", [OPTION_SETS[0], OPTION_SETS[2], OPTION_SETS[4]],
                         ids=lambda s: "psq=" + "".join("01"[x] for x in s))
def test_a_nan_in_a_query_token_never_reaches_the_raw_rows(backend, opt_set):
    opts = options(opt_set)
    q, k, v = make_qkv(1, 2, 1, 40, 4, 32, opts, dtype=torch.float32, short_keys=False)
    poisoned_v = v.clone()
    poisoned_v[:, :, 42] = float("nan")  # the second query token's value
    poisoned_k = k.clone()
    poisoned_k[:, :, 42] = float("inf")
    if backend == "flex" and not ON_CUDA:
        with torch.no_grad():
            clean = unidirectional_attention(q, k, v, 4, backend=backend, **opts)
            dirty = unidirectional_attention(q, poisoned_k, poisoned_v, 4, backend=backend, **opts)
        clean_dq = dirty_dq = torch.zeros(1, 1)  # no backward to compare
    else:
        (clean, (clean_dq,)), (dirty, (dirty_dq,)) = (
            _out_and_dq(q, kk, vv, backend, opts) for kk, vv in ((k, v), (poisoned_k, poisoned_v)))
    assert torch.isfinite(dirty[:, :, :41]).all(), "the raw path saw a query token"
    torch.testing.assert_close(dirty[:, :, :41], clean[:, :, :41], rtol=0, atol=0)
    # The raw rows' dq depends on the raw rows alone.
    torch.testing.assert_close(dirty_dq[..., :41, :], clean_dq[..., :41, :], rtol=0, atol=0)


def _out_and_dq(q, k, v, backend, opts):
    leaf = q.detach().requires_grad_()
    out = unidirectional_attention(leaf, k, v, 4, backend=backend, **opts)
    return out.detach(), torch.autograd.grad(out, leaf, torch.ones_like(out))


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_fp16_scores_past_the_format_stay_finite(backend):
    dtype = torch.float16
    q, k, v = make_qkv(1, 2, 1, 30, 3, 32, options(OPTION_SETS[0]), dtype=torch.float64, seed=9)
    q, k = q * 60, k * 60  # |q . k| reaches ~1e5, past fp16's 65504
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    with _no_grad_if_flex_on_cpu(backend):
        out = unidirectional_attention(q, k, v, 3, backend=backend)
    want = dense_masked_attention(q.double(), k.double(), v.double(), 3, 1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-2)


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 0, 16), (0, 3, 12, 16)], ids=["L=0", "batch=0"])
def test_empty_inputs_give_empty_outputs(backend, shape):
    q = torch.randn(shape, device=DEVICE)
    with _no_grad_if_flex_on_cpu(backend):
        out = unidirectional_attention(q, q.clone(), q.clone(), 0, 0, backend=backend)
    assert out.shape == shape
