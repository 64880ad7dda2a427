"""Input builders and the correctness standard shared by the kernel tests."""

import pytest
import torch
import torch.nn.functional as F

from adclr_kernels.backends import xformers_available
from adclr_kernels.dino_loss_torch import naive_dino_head_loss
from adclr_kernels.mask import QueryMask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_CUDA = DEVICE == "cuda"

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
    """The public keyword arguments of an option set."""
    return dict(query_sees_prefix=sets[0], query_sees_self=sets[1], query_sees_queries=sets[2])


def mask_of(opts):
    """The QueryMask of public keyword arguments (what the PyTorch implementations take)."""
    return QueryMask(opts["query_sees_prefix"], opts["query_sees_self"], opts["query_sees_queries"])


def option_id(sets):
    return "psq=" + "".join("01"[x] for x in sets)


def backend_param(name):
    """An attention backend as a pytest parameter, skipped where it cannot run."""
    marks = []
    if name == "xformers":
        marks.append(pytest.mark.skipif(not (ON_CUDA and xformers_available()),
                                        reason="xformers needs CUDA and the xformers package"))
    return pytest.param(name, marks=marks, id=name)


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


# ---------------------------------------------------------------------------------------
# The DINO head loss
# ---------------------------------------------------------------------------------------

# (student views, teacher views): DINO with 2 local crops, ADCLR's queries (A, B).
VIEWS = {"cls": 4, "query": 2}


def make_loss_inputs(rows, views, dim, out_dim, *, gain=False, teacher_weight=True, seed=0):
    """Normalised features, raw weights (not unit rows), a centre: float64 on DEVICE. With
    gain and teacher_weight, the teacher's last layer has a gain of its own too."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    inputs = dict(
        student=F.normalize(randn(views * rows, dim), dim=-1),
        teacher=F.normalize(randn(2 * rows, dim), dim=-1),
        weight=randn(out_dim, dim) * 0.3,
        center=randn(out_dim) * 0.2,
        teacher_weight=randn(out_dim, dim) * 0.3 if teacher_weight else None,
        gain=torch.rand(out_dim, generator=g, dtype=torch.float64) + 0.5 if gain else None,
        teacher_gain=torch.rand(out_dim, generator=g, dtype=torch.float64) + 0.5 if gain and teacher_weight else None,
    )
    return {k: v.to(DEVICE) if v is not None else None for k, v in inputs.items()}


def loss_and_grads(fn, inputs, dtype, pairing, temps, **kw):
    """(loss, teacher_mean, grads of student, weight and gain) of fn on fresh leaves."""
    leaves = {k: inputs[k].detach().to(dtype).requires_grad_() for k in ("student", "weight", "gain")
              if inputs[k] is not None}
    args = {k: (leaves[k] if k in leaves else v.to(dtype) if v is not None else None)
            for k, v in inputs.items()}
    loss, mean = fn(args.pop("student"), args.pop("teacher"), args.pop("weight"), args.pop("center"),
                    pairing, student_temp=temps[0], teacher_temp=temps[1], **args, **kw)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), mean, dict(zip(leaves, grads))


def naive_loss(student, teacher, weight, center, pairing, *, student_temp, teacher_temp, **kw):
    """`naive_dino_head_loss` with `dino_head_loss`'s signature."""
    return naive_dino_head_loss(student, teacher, weight, center, pairing, student_temp, teacher_temp, **kw)


def assert_loss_matches(got, ref, tol):
    assert_rel_close("loss", got[0], ref[0], tol)
    assert_rel_close("teacher_mean", got[1], ref[1], tol)
    assert got[2].keys() == ref[2].keys()
    for name in ref[2]:
        assert_rel_close(f"d{name}", got[2][name], ref[2][name], tol)
