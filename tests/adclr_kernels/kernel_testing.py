"""Input builders and the correctness standard shared by the kernel tests."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (query_sees_prefix, query_sees_self, query_sees_queries); queries imply self.
OPTION_SETS = [
    (False, False, False),
    (True, False, False),
    (False, True, False),
    (True, True, False),
    (False, False, True),
    (True, False, True),
]


def options(sets):
    return dict(query_sees_prefix=sets[0], query_sees_self=sets[1], query_sees_queries=sets[2])


def needs_query_keys(num_queries, opts):
    return num_queries > 0 and (opts["query_sees_self"] or opts["query_sees_queries"])


def make_qkv(batch, heads, num_prefix, num_raw, num_queries, head_dim, opts, *,
             dtype=torch.float64, short_keys=None, packed=True, seed=0):
    """Random q, k, v as the ViT makes them: strided views of one packed projection.

    short_keys: pass k/v of length seq - Q (default: whenever no option needs them).
    """
    seq = num_prefix + num_raw + num_queries
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, seq, 3, heads, head_dim, generator=g, dtype=torch.float64)
    qkv = qkv.to(device=DEVICE, dtype=dtype)
    if not packed:
        qkv = qkv.permute(2, 0, 3, 1, 4).contiguous().permute(1, 3, 0, 2, 4)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if short_keys is None:
        short_keys = not needs_query_keys(num_queries, opts)
    if short_keys:
        k, v = k[:, :, : seq - num_queries], v[:, :, : seq - num_queries]
    return q, k, v


def rms_err(a, b):
    return (a.double() - b.double()).square().mean().sqrt().item()


def assert_fa_close(name, got, ref64, ref_same_dtype):
    """FlashAttention convention: error at most 2x the same-dtype PyTorch error + 1e-5.

    The error is the RMS over all elements. The max-abs error of tensors this small is
    a noisy statistic: in bf16 the ratio of two max errors from the same rounding
    swung from 0.4 to 1.1 of the bound between seeds, while the RMS ratio stayed at
    0.66-0.82 (8 seeds of test_triton_varlen_low_precision's shapes); a real indexing
    or masking bug moves the RMS error by orders of magnitude either way.
    """
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?)"
    err, base = rms_err(got, ref64), rms_err(ref_same_dtype, ref64)
    assert err <= 2 * base + 1e-5, f"{name}: error {err:.3e} > 2 * {base:.3e} + 1e-5"


def assert_rel_close(name, got, ref64, tol=1e-5):
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?)"
    # Relative to the reference's norm, floored at an RMS of 0.1 so that an exactly
    # zero reference (a query that sees only itself has dq = 0) is judged absolutely.
    floor = 0.1 * max(ref64.numel(), 1) ** 0.5
    rel = ((got.double() - ref64).norm() / ref64.norm().clamp_min(floor)).item()
    assert rel < tol, f"{name}: relative error {rel:.3e} >= {tol}"


def reference_grads(fn, q, k, v, grad_out, **kw):
    """Output and (dq, dk, dv) of fn on fresh leaf copies of q, k, v."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads


def on_device(over):
    """Tensor arguments of a bad-input case moved to the tests' device: the case is about
    its shape or dtype, and on CUDA a CPU tensor would fail the device check first."""
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in over.items()}
