"""The prefix rows' attention probabilities, the op's optional second output
(return_prefix_probs): every backend, batched and packed, against the float64 masked
softmax; their gradient by gradcheck and end to end; the custom op under opcheck and
torch.compile."""

import json
import os
import subprocess
import sys

import pytest
import torch

import adclr_kernels.attention_triton as T
from adclr_kernels import (VarlenLayout, unidirectional_attention, unidirectional_attention_qkvpacked,
                           unidirectional_attention_varlen, unidirectional_attention_varlen_qkvpacked)
from adclr_kernels.attention_torch import dense_masked_attention, prefix_probs, varlen_prefix_probs
from kernel_testing import (DEVICE, OPTION_SETS, assert_fa_close, assert_rel_close, backend_param, make_qkv,
                            mask_of, options)

_EMPTY_PROBS = T._empty_prefix_probs


@pytest.fixture(autouse=True)
def poisoned_probs(monkeypatch):
    """The probabilities buffer starts as NaN: an element the kernel forgets fails."""
    monkeypatch.setattr(T, "_empty_prefix_probs", lambda *a: _EMPTY_PROBS(*a).fill_(float("nan")))


def masked_softmax64(q, k, num_queries, num_prefix, opts, scale=None):
    """The first num_prefix rows of the whole masked softmax, in float64: the ground truth."""
    seq, keys = q.shape[-2], k.shape[-2]
    scores = (q.double() @ k.double().transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5)
    allowed = mask_of(opts).matrix(seq, keys, num_queries, num_prefix, q.device)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)[..., :num_prefix, :]


def packed(lengths, queries, heads=2, head_dim=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lengths), 3, heads, head_dim, generator=g, dtype=torch.float64)
    return qkv.to(device=DEVICE, dtype=dtype), VarlenLayout(lengths, queries, DEVICE)


def packed_truth(qkv, layout, num_prefix, opts, scale=None):
    """(heads, P, tokens): each sequence's float64 masked softmax rows, side by side."""
    parts = []
    for (start, end), nq in zip(layout.bounds(), layout.queries):
        q, k, _ = qkv[start:end].permute(1, 2, 0, 3)
        parts.append(masked_softmax64(q, k, nq, num_prefix, opts, scale))
    return torch.cat(parts, -1)


@pytest.mark.parametrize("opt_set,num_prefix,num_queries",
                         [(o, 4, 6) for o in OPTION_SETS] + [(OPTION_SETS[0], 1, 0)])
def test_triton_batched_every_option(opt_set, num_prefix, num_queries):
    opts = options(opt_set)
    q, k, v = make_qkv(2, 2, num_prefix, 37, num_queries, 32, opts, dtype=torch.float32)
    out, probs = unidirectional_attention(q, k, v, num_queries, num_prefix, backend="triton",
                                          return_prefix_probs=True, **opts)
    assert probs.shape == (2, 2, num_prefix, k.shape[2]) and probs.dtype == torch.float32
    assert_rel_close("probs", probs, masked_softmax64(q, k, num_queries, num_prefix, opts))
    # The option adds an output and changes nothing else.
    assert torch.equal(out, unidirectional_attention(q, k, v, num_queries, num_prefix, backend="triton", **opts))


@pytest.mark.parametrize("opt_set,qkvpacked", [(OPTION_SETS[0], True), (OPTION_SETS[3], False),
                                               (OPTION_SETS[5], True)])
def test_triton_packed(opt_set, qkvpacked):
    opts = options(opt_set)
    qkv, layout = packed([20, 45, 9], [3, 0, 5])
    truth = packed_truth(qkv, layout, 2, opts)
    if qkvpacked:
        _, probs = unidirectional_attention_varlen_qkvpacked(qkv, layout, None, 2, backend="triton",
                                                             return_prefix_probs=True, **opts)
    else:
        _, probs = unidirectional_attention_varlen(*qkv.unbind(1), layout, None, 2, backend="triton",
                                                   return_prefix_probs=True, **opts)
    assert probs.shape == (2, 2, 74)
    assert_rel_close("probs", probs, truth)
    # Offsets checked on the device (max_seqlen given, no tile tables) give the same.
    _, vouched = unidirectional_attention_varlen(*qkv.unbind(1), layout.cu_seqlens, layout.num_queries, 2,
                                                 max_seqlen=45, backend="triton", return_prefix_probs=True, **opts)
    torch.testing.assert_close(vouched, probs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_low_precision(dtype):
    opts = options(OPTION_SETS[2])
    q, k, v = make_qkv(2, 2, 1, 60, 5, 64, opts, dtype=dtype)
    _, probs = unidirectional_attention(q, k, v, 5, 1, backend="triton", return_prefix_probs=True, **opts)
    assert probs.dtype == torch.float32
    # The same-dtype reference: the PyTorch rule on the same rounded inputs.
    assert_fa_close("probs", probs, masked_softmax64(q, k, 5, 1, opts), prefix_probs(q, k, 5, 1))
    # Normalised by the forward's logsumexp: rows sum to 1 within its rounding, not float32's
    # (fp16: up to 1.3e-4 over 60 seeds of these inputs).
    assert (probs.sum(-1) - 1).abs().max() < 3e-4
    qkv, layout = packed([30, 17], [4, 0], dtype=dtype)
    _, probs = unidirectional_attention_varlen_qkvpacked(qkv, layout, None, 1, backend="triton",
                                                         return_prefix_probs=True)
    q, k, _ = qkv.unbind(1)
    assert_fa_close("packed probs", probs, packed_truth(qkv, layout, 1, options(OPTION_SETS[0])),
                    varlen_prefix_probs(q, k, layout.bounds(), layout.queries, 1))


# Every PyTorch backend returns the same `attention_torch.prefix_probs` (flex's path is
# the sdpa one's; flex itself, eager on CPU, costs seconds and adds nothing here).
@pytest.mark.parametrize("backend", ["reference", "sdpa", backend_param("xformers")])
def test_pytorch_backends(backend):
    opts = options(OPTION_SETS[3])
    q, k, v = make_qkv(2, 2, 2, 21, 4, 32, opts, dtype=torch.float32)
    with torch.no_grad():
        _, probs = unidirectional_attention(q, k, v, 4, 2, backend=backend, return_prefix_probs=True, **opts)
        qkv, layout = packed([12, 30], [2, 0])
        _, packed_probs = unidirectional_attention_varlen_qkvpacked(qkv, layout, None, 2, backend=backend,
                                                                    return_prefix_probs=True)
    assert_rel_close("probs", probs, masked_softmax64(q, k, 4, 2, opts))
    assert_rel_close("packed probs", packed_probs, packed_truth(qkv, layout, 2, options(OPTION_SETS[0])))


@pytest.mark.parametrize("backend", ["triton", "reference", "sdpa", backend_param("xformers")])
def test_every_backend_takes_a_custom_scale(backend):
    """The probabilities at the scale of the call, batched and packed (a backend that
    recomputed them at 1 / sqrt(head_dim) matched float64 at the default all the same)."""
    opts, scale = options(OPTION_SETS[3]), 0.3
    q, k, v = make_qkv(2, 2, 2, 21, 4, 32, opts, dtype=torch.float32)
    qkv, layout = packed([12, 30, 9], [2, 0, 1])
    with torch.no_grad():
        _, probs = unidirectional_attention(q, k, v, 4, 2, backend=backend, scale=scale, return_prefix_probs=True,
                                            **opts)
        _, packed_probs = unidirectional_attention_varlen_qkvpacked(qkv, layout, None, 2, backend=backend,
                                                                    scale=scale, return_prefix_probs=True, **opts)
    assert_rel_close("probs", probs, masked_softmax64(q, k, 4, 2, opts, scale))
    assert_rel_close("packed probs", packed_probs, packed_truth(qkv, layout, 2, opts, scale))


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_under_autocast_every_backend_gives_float32_probs(backend):
    # Autocast would run the PyTorch backends' product in bf16 again (their error against
    # the float64 truth then about 3x the Triton kernel's, which keeps fp32 throughout).
    opts = options(OPTION_SETS[0])
    q, k, v = make_qkv(2, 2, 1, 21, 4, 32, opts, dtype=torch.float32)
    qkv, layout = packed([12, 30], [2, 0])
    with torch.no_grad(), torch.autocast(q.device.type, dtype=torch.bfloat16):
        out, probs = unidirectional_attention(q, k, v, 4, 1, backend=backend, return_prefix_probs=True)
        _, packed_probs = unidirectional_attention_varlen_qkvpacked(qkv, layout, None, 1, backend=backend,
                                                                    return_prefix_probs=True)
    assert out.dtype == torch.bfloat16
    assert probs.dtype == packed_probs.dtype == torch.float32
    q16, k16, qkv16 = (t.to(torch.bfloat16).float() for t in (q, k, qkv))  # what autocast reads
    assert_rel_close("probs", probs, masked_softmax64(q16, k16, 4, 1, opts), tol=1e-4)
    assert_rel_close("packed probs", packed_probs, packed_truth(qkv16, layout, 1, opts), tol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_meta_tensors_trace_the_probs_shape(backend):
    # Shape tracing and deferred initialisation run on meta tensors, which have no autocast.
    q = torch.empty(2, 2, 12, 16, device="meta")
    out, probs = unidirectional_attention(q, q, q, 3, 1, backend=backend, return_prefix_probs=True)
    assert probs.shape == (2, 2, 1, 12) and probs.dtype == torch.float32 and probs.device.type == "meta"


def test_without_the_option_one_tensor_comes_back():
    q, k, v = make_qkv(1, 2, 1, 10, 2, 32, options(OPTION_SETS[0]), dtype=torch.float32)
    for backend in ("triton", "sdpa"):
        assert isinstance(unidirectional_attention(q, k, v, 2, backend=backend), torch.Tensor)


def test_no_prefix_gives_an_empty_output():
    q, k, v = make_qkv(1, 2, 0, 10, 2, 32, options(OPTION_SETS[0]), dtype=torch.float32)
    _, probs = unidirectional_attention(q, k, v, 2, 0, backend="triton", return_prefix_probs=True)
    assert probs.shape == (1, 2, 0, 10)


# ---------------------------------------------------------------------------------------
# The gradient: the Triton path's PyTorch backward by gradcheck, then end to end
# ---------------------------------------------------------------------------------------


class ReferenceForwardTritonBackward(torch.autograd.Function):
    """The reference softmax forward (float64) with the Triton op's registered backward:
    gradcheck compares that backward with finite differences of the reference."""

    @staticmethod
    def forward(ctx, q, k, num_queries, num_prefix, cu_seqlens, bounds, queries, scale):
        ctx.num_prefix, ctx.scale = num_prefix, scale
        if cu_seqlens is None:
            probs = prefix_probs(q, k, num_queries, num_prefix, scale)
        else:
            probs = varlen_prefix_probs(q, k, bounds, queries, num_prefix, scale)
        ctx.save_for_backward(q, k, cu_seqlens, probs)
        return probs

    @staticmethod
    def backward(ctx, grad):
        q, k, cu_seqlens, probs = ctx.saved_tensors
        dq, dk = T.prefix_probs_bwd(grad, probs, q, k, cu_seqlens, ctx.num_prefix, ctx.scale)
        return dq, dk, None, None, None, None, None, None


@pytest.mark.parametrize("scale", [4 ** -0.5, 1.3], ids=["default", "custom"])
@pytest.mark.parametrize("layout", ["batched", "packed"])
def test_backward_gradcheck_float64(layout, scale):
    if layout == "batched":
        q, k, _ = make_qkv(2, 1, 2, 4, 1, 4, options(OPTION_SETS[0]), dtype=torch.float64)
        args = (1, 2, None, None, None, scale)
    else:
        qkv, lay = packed([4, 6, 3], [1, 0, 1], heads=1, head_dim=4, dtype=torch.float64)
        q, k, _ = qkv.unbind(1)
        args = (0, 2, lay.cu_seqlens, lay.bounds(), lay.queries, scale)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k)]
    assert torch.autograd.gradcheck(lambda a, b: ReferenceForwardTritonBackward.apply(a, b, *args), leaves,
                                    fast_mode=True)


@pytest.mark.parametrize("qkvpacked,varlen", [(False, False), (True, False), (True, True)])
def test_triton_gradients_reach_q_k_v_with_the_output_s(qkvpacked, varlen):
    """A loss on both outputs: the op's gradients, the prefix path's added to the
    attention's, against autograd through the float64 masked softmax."""
    opts = options(OPTION_SETS[1])
    g = torch.Generator().manual_seed(3)
    if varlen:
        qkv, layout = packed([14, 23], [3, 2])
    else:
        qkv = torch.randn(2, 24, 3, 2, 32, generator=g, dtype=torch.float64).to(DEVICE, torch.float32)
    leaf = qkv.detach().clone().requires_grad_()

    def run(x, triton):
        if varlen and triton:
            call = unidirectional_attention_varlen_qkvpacked if qkvpacked else (
                lambda t, *a, **kw: unidirectional_attention_varlen(*t.unbind(1), *a, **kw))
            return call(x, layout, None, 2, backend="triton", return_prefix_probs=True, **opts)
        if varlen:  # the float64 truth, one sequence at a time
            outs, probs = [], []
            for (start, end), nq in zip(layout.bounds(), layout.queries):
                q, k, v = x[start:end].permute(1, 2, 0, 3)
                outs.append(dense_masked_attention(q, k, v, nq, 2, mask_of(opts)).transpose(0, 1))
                probs.append(masked_softmax64(q, k, nq, 2, opts))
            return torch.cat(outs), torch.cat(probs, -1)
        if triton and qkvpacked:
            out, probs = unidirectional_attention_qkvpacked(x, 5, 2, backend="triton", return_prefix_probs=True,
                                                            **opts)
            return out.transpose(1, 2), probs
        q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
        if triton:
            return unidirectional_attention(q, k, v, 5, 2, backend="triton", return_prefix_probs=True, **opts)
        return dense_masked_attention(q, k, v, 5, 2, mask_of(opts)), masked_softmax64(q, k, 5, 2, opts)

    out, probs = run(leaf, True)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
    grad_probs = torch.randn(probs.shape, generator=g, dtype=torch.float64).to(DEVICE)
    (got,) = torch.autograd.grad([out, probs], leaf, [grad_out.float(), grad_probs.float()])
    leaf64 = qkv.detach().double().requires_grad_()
    out64, probs64 = run(leaf64, False)
    (want,) = torch.autograd.grad([out64, probs64], leaf64, [grad_out, grad_probs])
    assert_rel_close("dqkv", got, want)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("varlen", [False, True])
def test_a_query_key_no_prefix_row_sees_stays_out_of_the_gradients(varlen, value):
    """The prefix rows never see a query key: a NaN or inf there changes no prefix row's
    dq and no other column's dk (0 x NaN would be NaN)."""
    if varlen:
        qkv, layout = packed([9, 7], [3, 2])
        poisoned = [8, 15]  # each sequence's last token, a query token

        def probs_of(x):
            return unidirectional_attention_varlen_qkvpacked(x, layout, None, 1, backend="triton",
                                                             return_prefix_probs=True)[1]
    else:
        qkv = torch.randn(1, 9, 3, 2, 16, generator=torch.Generator().manual_seed(5)).to(DEVICE)
        poisoned = [(0, 8)]

        def probs_of(x):
            return unidirectional_attention_qkvpacked(x, 3, 1, backend="triton", return_prefix_probs=True)[1]

    grads = []
    for poison in (False, True):
        x = qkv.detach().clone()
        if poison:
            for where in poisoned:
                x[where][1] = value  # k of that token, every head
        x.requires_grad_()
        probs = probs_of(x)
        (grad,) = torch.autograd.grad(probs, x, torch.ones_like(probs))
        grads.append(grad)
    clean, dirty = grads
    keep = torch.ones(clean.shape[:-3] if not varlen else clean.shape[:1], dtype=torch.bool)
    for where in poisoned:
        keep[where] = False
    assert torch.equal(dirty[keep], clean[keep])


# ---------------------------------------------------------------------------------------
# The custom op
# ---------------------------------------------------------------------------------------


def test_opcheck_and_compile():
    q, k, v = make_qkv(1, 2, 2, 20, 4, 32, options(OPTION_SETS[0]), dtype=torch.float32)
    _, lse = T._fwd_op(q, k, v, None, None, None, None, None, 4, 0, [], 2, False, False, False,
                       32 ** -0.5)
    leaves = [t.detach().requires_grad_() for t in (q, k)]
    torch.library.opcheck(T._prefix_probs_op, (*leaves, lse, None, None, 4, 0, 2, 32 ** -0.5))
    fn = torch.compile(lambda a, b, c: unidirectional_attention(a, b, c, 4, 2, backend="triton",
                                                                return_prefix_probs=True)[1],
                       backend="aot_eager", fullgraph=True)
    assert_rel_close("compiled probs", fn(q, k, v), masked_softmax64(q, k, 4, 2, options(OPTION_SETS[0])))


# The interpreter accepts code the real compiler rejects: compile the kernel ahead of time
# (bench.static's capture of the real launch on meta tensors), in a fresh process.
AOT_CHECK = """
import json, os
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import torch
from bench.static import _meta_qkv, compile_launch, recording
from adclr_kernels import VarlenLayout
from adclr_kernels import attention_triton as T
rows = []
for capability, dtype, head_dim, packed in ((90, torch.bfloat16, 64, False), (80, torch.float16, 128, True)):
    with recording(capability) as launches:
        if packed:
            qkv = _meta_qkv((300,), 2, head_dim, dtype)
            cu, nq, max_len, *_ = T.varlen_tables(VarlenLayout([100, 200], [3, 0], device="meta"), qkv[:, 0])
            geometry = (cu, nq, None, None, None, 0, max_len)
        else:
            qkv = _meta_qkv((2, 207), 2, head_dim, dtype)
            geometry = (None, None, None, None, None, 10, 0)
        lse = torch.empty(qkv.shape[0], 2, qkv.shape[1], device="meta") if not packed else \\
            torch.empty(2, 300, device="meta")
        q, k, _ = T._unpack(qkv)
        T.prefix_probs_fwd(q, k, lse, T._empty_prefix_probs(q, k, 1),
                           T._geometry(q, k, geometry[5], *geometry[:5], geometry[6]), 1, 0.125)
    compiled = compile_launch(launches[0], capability)
    rows.append([launches[0].name, compiled.spill_bytes])
print(json.dumps(rows))
"""


def test_the_kernel_compiles_for_gpus_without_spills():
    pytest.importorskip("triton.compiler", reason="no ahead-of-time API")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", AOT_CHECK], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [["_prefix_probs_kernel", 0]] * 2
