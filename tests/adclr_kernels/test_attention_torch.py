"""The PyTorch implementations (attention_torch.py) against float64: called directly,
and as the op's backends."""

import pytest
import torch
import torch.nn.functional as F

from adclr_kernels import unidirectional_attention
from adclr_kernels.attention_torch import dense_masked_attention, reference_attention
from kernel_testing import (DEVICE, ON_CUDA, OPTION_SETS, assert_fa_close, assert_rel_close,
                            backend_param, make_qkv, mask_of, options, reference_grads)

PEERS = [backend_param(b) for b in ("reference", "sdpa", "flex", "xformers")]


@pytest.mark.parametrize("opt_set", OPTION_SETS)
@pytest.mark.parametrize("num_queries", [0, 1, 10])
def test_reference_equals_dense_mask_in_float64(opt_set, num_queries):
    opts = options(opt_set)
    q, k, v = make_qkv(2, 3, 2, 25, num_queries, 16, opts)
    a = reference_attention(q, k, v, num_queries, 2, mask_of(opts))
    b = dense_masked_attention(q, k, v, num_queries, 2, mask_of(opts))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", PEERS)
@pytest.mark.parametrize("opt_set", OPTION_SETS)
@pytest.mark.parametrize("num_queries", [0, 1, 10])
def test_backends_match_float64(backend, opt_set, num_queries):
    opts = options(opt_set)
    dtype = torch.float32
    q, k, v = make_qkv(2, 2, 4, 31, num_queries, 32, opts, dtype=dtype)
    kw = dict(num_queries=num_queries, num_prefix=4)
    ref64, grads64 = reference_grads(dense_masked_attention, q.double(), k.double(), v.double(),
                                     torch.ones(q.shape, dtype=torch.float64, device=DEVICE),
                                     mask=mask_of(opts), **kw)
    if backend == "flex" and not ON_CUDA:
        with torch.no_grad():  # PyTorch has no flex backward on CPU
            out = unidirectional_attention(q, k, v, backend=backend, **kw, **opts)
        assert_rel_close("out", out, ref64)
        return
    out, grads = reference_grads(unidirectional_attention, q, k, v, torch.ones_like(q),
                                 backend=backend, **kw, **opts)
    assert_rel_close("out", out, ref64, tol=1e-4 if ON_CUDA else 1e-5)
    for name, got, want in zip("qkv", grads, grads64):
        assert_rel_close(f"d{name}", got, want, tol=1e-4 if ON_CUDA else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", [b for b in PEERS if b.values[0] != "flex"])
def test_backends_low_precision(backend, dtype):
    opts = options(OPTION_SETS[0])
    q, k, v = make_qkv(2, 2, 1, 40, 10, 64, opts, dtype=dtype, seed=7)
    kw = dict(num_queries=10, num_prefix=1)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(8),
                           dtype=torch.float64).to(DEVICE)
    out, grads = reference_grads(unidirectional_attention, q, k, v, grad_out.to(dtype),
                                 backend=backend, **kw, **opts)
    ref64, grads64 = reference_grads(dense_masked_attention, q.double(), k.double(), v.double(),
                                     grad_out, mask=mask_of(opts), **kw)
    # The yardstick: the plain masked softmax run in the same low precision.
    ref_lo, grads_lo = reference_grads(dense_masked_attention, q, k, v, grad_out.to(dtype),
                                       mask=mask_of(opts), **kw)
    assert out.dtype == dtype
    assert_fa_close("out", out, ref64, ref_lo)
    for name, got, want, lo in zip("qkv", grads, grads64, grads_lo):
        assert_fa_close(f"d{name}", got, want, lo)


def test_no_queries_is_plain_attention():
    q, k, v = make_qkv(2, 3, 1, 40, 0, 32, options(OPTION_SETS[0]), dtype=torch.float64)
    for backend in ("reference", "sdpa"):
        out = unidirectional_attention(q, k, v, 0, backend=backend)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
