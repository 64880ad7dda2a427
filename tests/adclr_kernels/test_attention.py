"""The public op (attention.py): the backend choice, errors that name the argument, edge
inputs on every backend, and the packed-qkv entry point."""

import re

import pytest
import torch

from adclr_kernels import unidirectional_attention, unidirectional_attention_qkvpacked
from adclr_kernels.attention_torch import dense_masked_attention
from kernel_testing import (DEVICE, ON_CUDA, OPTION_SETS, assert_rel_close, backend_param, make_qkv,
                            mask_of, on_device, option_id, options, reference_grads)


def test_auto_picks_triton_on_cuda_and_a_pytorch_path_on_cpu(monkeypatch):
    import adclr_kernels.attention_triton as T

    q, k, v = make_qkv(1, 2, 1, 10, 2, 32, options(OPTION_SETS[0]), dtype=torch.float32)
    calls = []
    real = T.attention_fwd
    monkeypatch.setattr(T, "attention_fwd", lambda *a: calls.append(1) or real(*a))
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
    ("Q > seq", dict(num_queries=16), ValueError,
     "num_queries must be in [0, 15] for this input (q is (batch, heads, seq, head_dim) = (2, 3, 15, 16)), got 16"),
    ("Q a float", dict(num_queries=4.0), TypeError, "num_queries must be an int"),
    ("Q a tensor", dict(num_queries=torch.tensor(4)), TypeError, "num_queries must be an int"),
    ("P > seq", dict(num_prefix=16), ValueError, "num_prefix must be in"),
    ("P + Q > seq", dict(num_prefix=12), ValueError,
     "num_prefix + num_queries must be at most seq = 15 (q is (batch, heads, seq, head_dim) = (2, 3, 15, 16)), "
     "got 12 + 4"),
    ("P a bool", dict(num_prefix=True), TypeError, "num_prefix must be an int"),
    ("nothing to see", dict(num_prefix=11), ValueError,
     "attend to nothing: there are no raw tokens (num_prefix 11 + num_queries 4 == seq; q is (batch, heads, seq, "
     "head_dim) = (2, 3, 15, 16))"),
    ("nothing to see, no prefix for query_sees_prefix", dict(num_prefix=0, num_queries=15,
     query_sees_prefix=True, k=torch.randn(2, 3, 15, 16), v=torch.randn(2, 3, 15, 16)), ValueError,
     "query_sees_prefix adds nothing without prefix tokens (num_prefix 0); set query_sees_self or "
     "query_sees_queries"),
    ("self needs query keys", dict(query_sees_self=True), ValueError, "need the query keys"),
    ("option not bool", dict(query_sees_prefix=1), TypeError, "query_sees_prefix must be a Python bool, got int 1"),
    ("prefix probs a string", dict(return_prefix_probs="no"), TypeError,
     "return_prefix_probs must be a Python bool, got str 'no'"),
    ("scale a string", dict(scale="0.1"), TypeError, "scale must be a finite float"),
    ("scale nan", dict(scale=float("nan")), TypeError, "scale must be a finite float"),
    ("scale negative", dict(scale=-0.1), ValueError, "scale must be > 0"),
    ("scale zero", dict(scale=0.0), ValueError, "scale must be > 0, got 0.0"),
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
    with pytest.raises(exc, match=re.escape(msg)):
        unidirectional_attention(**args)


@pytest.mark.parametrize("form", ["qkvpacked", "varlen", "varlen_qkvpacked"])
def test_return_prefix_probs_must_be_a_bool_in_every_form(form):
    from adclr_kernels import unidirectional_attention_varlen, unidirectional_attention_varlen_qkvpacked

    qkv = torch.randn(24, 3, 2, 16, device=DEVICE)
    cu = torch.tensor([0, 12, 24], dtype=torch.int32, device=DEVICE)
    call = {"qkvpacked": lambda: unidirectional_attention_qkvpacked(qkv.view(2, 12, 3, 2, 16), 3,
                                                                     return_prefix_probs="no"),
            "varlen": lambda: unidirectional_attention_varlen(*qkv.unbind(1), cu, 3, return_prefix_probs=1),
            "varlen_qkvpacked": lambda: unidirectional_attention_varlen_qkvpacked(qkv, cu, 3,
                                                                                  return_prefix_probs=None)}[form]
    with pytest.raises(TypeError, match="return_prefix_probs must be a Python bool, got "):
        call()


@pytest.mark.parametrize("form", ["batched", "qkvpacked", "varlen", "varlen_qkvpacked"])
def test_numpy_scalars_are_taken_as_python_ones(form):
    # As VarlenLayout and the DINO loss take them: counts read from numpy arrays or configs.
    import numpy as np

    from adclr_kernels import unidirectional_attention_varlen, unidirectional_attention_varlen_qkvpacked

    torch.manual_seed(0)
    qkv = torch.randn(2, 12, 3, 2, 16, device=DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    cu = torch.tensor([0, 12, 24], dtype=torch.int32, device=DEVICE)
    calls = {
        "batched": lambda nq, p, s, m: unidirectional_attention(q, k, v, nq, p, scale=s, backend="sdpa"),
        "qkvpacked": lambda nq, p, s, m: unidirectional_attention_qkvpacked(qkv, nq, p, scale=s, backend="sdpa"),
        "varlen": lambda nq, p, s, m: unidirectional_attention_varlen(
            *(t.transpose(1, 2).flatten(0, 1) for t in (q, k, v)), cu, nq, p, scale=s, max_seqlen=m,
            backend="sdpa"),
        "varlen_qkvpacked": lambda nq, p, s, m: unidirectional_attention_varlen_qkvpacked(
            qkv.flatten(0, 1), cu, nq, p, scale=s, max_seqlen=m, backend="sdpa"),
    }
    want = calls[form](3, 1, 0.2, 12)
    got = calls[form](np.int64(3), np.int32(1), np.float32(0.2), np.int64(12))
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match="num_queries must be an int"):
        calls[form](np.float64(3.0), 1, None, 12)


def test_qkvpacked_errors_word_the_shape_of_qkv():
    qkv = torch.randn(2, 2, 3, 10, 32)  # (batch, heads, 3, seq, head_dim) by mistake
    with pytest.raises(ValueError, match=re.escape(
            "num_queries must be in [0, 2] for this input (qkv is (batch, seq, 3, heads, head_dim) = "
            "(2, 2, 3, 10, 32)), got 3")):
        unidirectional_attention_qkvpacked(qkv, 3)


# A bad call that differs from a good one only where the memory of checked calls must
# tell them apart (True == 1 and 4.0 == 4 as dictionary keys).
LIKE_A_GOOD_CALL = [
    ("option an int", dict(query_sees_prefix=True), dict(query_sees_prefix=1), TypeError,
     "query_sees_prefix must be a Python bool, got int 1"),
    ("P a bool", dict(num_prefix=1), dict(num_prefix=True), TypeError, "num_prefix must be an int"),
    ("Q a float", dict(num_queries=4), dict(num_queries=4.0), TypeError, "num_queries must be an int"),
]


@pytest.mark.parametrize("case,good,bad,exc,msg", LIKE_A_GOOD_CALL, ids=[c[0] for c in LIKE_A_GOOD_CALL])
def test_a_bad_call_like_a_checked_good_one_is_still_refused(case, good, bad, exc, msg):
    unidirectional_attention(**_good(**good))
    with pytest.raises(exc, match=re.escape(msg)):
        unidirectional_attention(**_good(**bad))


@pytest.mark.skipif(ON_CUDA, reason="checks the CPU-only errors")
def test_backends_unavailable_on_cpu_say_why(monkeypatch):
    args = _good()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        unidirectional_attention(**args, backend="triton")
    with pytest.raises(RuntimeError, match="xformers"):
        unidirectional_attention(**args, backend="xformers")
    unidirectional_attention(**args, backend="flex")  # no gradient asked for: runs, and is remembered
    leaves = {n: args[n].detach().requires_grad_() for n in "qkv"}
    with pytest.raises(RuntimeError, match="no backward on CPU"):  # the same call but for requires_grad
        unidirectional_attention(**{**args, **leaves}, backend="flex")


@pytest.mark.skipif(ON_CUDA, reason="checks a CPU-only error")
def test_interpreter_asked_for_after_import_says_so(monkeypatch):
    import adclr_kernels.backends

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(adclr_kernels.backends, "INTERPRETED_AT_IMPORT", False)
    with pytest.raises(RuntimeError, match="was set after adclr_kernels was imported"):
        unidirectional_attention(**_good(), backend="triton")


def test_mixed_devices():
    args = _good()
    other = "cpu" if args["q"].is_cuda else "meta"  # a second device type on a CPU-only machine
    with pytest.raises(RuntimeError, match=f"q, k, v must be on one device, got {other}, "):
        unidirectional_attention(**{**args, "q": args["q"].to(other)})


# ---------------------------------------------------------------------------------------
# Edge inputs: every backend agrees on them as on normal ones.
# ---------------------------------------------------------------------------------------

EDGE_BACKENDS = [backend_param(b) for b in ("triton", "reference", "sdpa", "flex", "xformers")]


def _no_grad_if_flex_on_cpu(backend):
    import contextlib

    return torch.no_grad() if backend == "flex" and not ON_CUDA else contextlib.nullcontext()


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("opt_set", [OPTION_SETS[0], OPTION_SETS[2], OPTION_SETS[4]],
                         ids=option_id)
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
@pytest.mark.parametrize("shape", [(2, 3, 0, 16), (0, 3, 12, 16), (2, 0, 12, 16)],
                         ids=["L=0", "batch=0", "heads=0"])
def test_empty_inputs_give_empty_outputs(backend, shape):
    q = torch.randn(shape, device=DEVICE)
    with _no_grad_if_flex_on_cpu(backend):
        out = unidirectional_attention(q, q.clone(), q.clone(), 0, 0, backend=backend)
    assert out.shape == shape


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_a_lone_query_token_sees_only_itself(backend):
    # L = 1, Q = 1, P = 0: no raw rows at all, and the query row's only column is its own.
    q, k, v = torch.randn(3, 2, 2, 1, 16, device=DEVICE).unbind(0)
    with _no_grad_if_flex_on_cpu(backend):
        out = unidirectional_attention(q, k, v, 1, 0, query_sees_self=True, backend=backend)
    torch.testing.assert_close(out, v)


@pytest.mark.parametrize("scale", [0.3, 2.5])
@pytest.mark.parametrize("opt_set", OPTION_SETS, ids=option_id)
@pytest.mark.parametrize("num_raw", [8, 70], ids=["short", "long"])
@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_every_backend_takes_a_custom_scale(backend, num_raw, opt_set, scale):
    """In the scores of every row and in the backward: a backend that dropped it matched
    float64 at the default scale all the same. (0 is refused: the bad inputs above.)
    Short: 14 tokens, the Triton backend's one-shot kernels; long: its flash kernels."""
    opts = options(opt_set)
    q, k, v = make_qkv(1, 2, 1, num_raw, 5, 32, opts, dtype=torch.float32)
    kw = dict(num_queries=5, num_prefix=1, scale=scale)
    want, want_grads = reference_grads(dense_masked_attention, q.double(), k.double(), v.double(),
                                       torch.ones(q.shape, dtype=torch.float64, device=DEVICE),
                                       mask=mask_of(opts), **kw)
    if backend == "flex" and not ON_CUDA:
        with torch.no_grad():
            assert_rel_close("out", unidirectional_attention(q, k, v, backend=backend, **kw, **opts), want)
        return
    out, grads = reference_grads(unidirectional_attention, q, k, v, torch.ones_like(q), backend=backend,
                                 **kw, **opts)
    assert_rel_close("out", out, want, tol=1e-4 if ON_CUDA else 1e-5)
    for name, got, expected in zip("qkv", grads, want_grads):
        assert_rel_close(f"d{name}", got, expected, tol=1e-4 if ON_CUDA else 1e-5)


# ---------------------------------------------------------------------------------------
# The packed-qkv entry point: same results as q, k, v, one gradient buffer, no copies.
# ---------------------------------------------------------------------------------------

def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)


@pytest.mark.parametrize("opt_set", [OPTION_SETS[0], OPTION_SETS[3], OPTION_SETS[4]], ids=option_id)
@pytest.mark.parametrize("num_queries", [0, 1, 10])
def test_batched_qkvpacked_equals_separate_and_float64(poisoned, opt_set, num_queries):
    opts = options(opt_set)
    qkv = randn(2, 2 + 45 + num_queries, 3, 2, 32).requires_grad_()
    grad_out = randn(2, 2 + 45 + num_queries, 2, 32, seed=1)
    out = unidirectional_attention_qkvpacked(qkv, num_queries, 2, backend="triton", **opts)
    (dqkv,) = torch.autograd.grad(out, qkv, grad_out)
    assert out.shape == (2, 47 + num_queries, 2, 32) and dqkv.shape == qkv.shape

    # The same kernels through q, k, v views: bitwise the same output and gradients.
    leaves = [t.detach().requires_grad_() for t in qkv.detach().permute(2, 0, 3, 1, 4).unbind(0)]
    sep = unidirectional_attention(*leaves, num_queries, 2, backend="triton", **opts)
    grads = torch.autograd.grad(sep, leaves, grad_out.transpose(1, 2))
    assert torch.equal(out, sep.transpose(1, 2))
    for i, g in enumerate(grads):
        assert torch.equal(dqkv[:, :, i], g.transpose(1, 2))

    ref64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = dense_masked_attention(*ref64, num_queries, 2, mask_of(opts))
    ref_grads = torch.autograd.grad(ref, ref64, grad_out.double().transpose(1, 2))
    assert_rel_close("out", out.transpose(1, 2), ref)
    for i, want in enumerate(ref_grads):
        assert_rel_close(f"d{'qkv'[i]}", dqkv[:, :, i].transpose(1, 2), want)


@pytest.mark.parametrize("backend", [backend_param(b) for b in ("triton", "reference", "sdpa")])
@pytest.mark.parametrize("packed", [False, True], ids=["separate", "qkvpacked"])
def test_autocast_hands_every_backend_what_it_hands_sdpa(backend, packed):
    """Under autocast fp32 inputs reach the op in the autocast dtype, as they would reach
    F.scaled_dot_product_attention; the gradient goes back to them in fp32."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 19, 3, 2, 32, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        if packed:
            out = unidirectional_attention_qkvpacked(qkv, 4, backend=backend)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out = unidirectional_attention(q, k, v, 4, backend=backend).transpose(1, 2)
    assert out.dtype == torch.bfloat16
    rows = qkv.detach().to(torch.bfloat16).double().permute(2, 0, 3, 1, 4)
    want = dense_masked_attention(*rows, 4, 1, mask_of(options(OPTION_SETS[0]))).transpose(1, 2)
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert qkv.grad.dtype == torch.float32 and qkv.grad.isfinite().all()
