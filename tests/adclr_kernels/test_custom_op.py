"""The Triton path as a torch.library custom op: opcheck and torch.compile."""

import pytest
import torch

from adclr_kernels import unidirectional_attention
from adclr_kernels.reference import dense_masked_attention
from adclr_kernels.unidirectional import _bwd_op, _fwd_op
from kernel_testing import DEVICE, OPTION_SETS, assert_rel_close, make_qkv, options


@pytest.mark.parametrize("opt_set", [OPTION_SETS[0], OPTION_SETS[5]])
def test_opcheck(opt_set):
    opts = options(opt_set)
    q, k, v = make_qkv(1, 2, 1, 20, 4, 32, opts, dtype=torch.float32)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    args = (*leaves, None, None, None, None, 4, 0, 1, *opt_set, 32 ** -0.5)
    torch.library.opcheck(_fwd_op, args)
    out, lse = _fwd_op(*args)
    torch.library.opcheck(_bwd_op, (torch.randn_like(out), *[t.detach() for t in leaves],
                                    out.detach(), lse, *args[3:]))


class TinyAttention(torch.nn.Module):
    """A ViT-style caller: packed qkv projection, the op, output projection."""

    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, num_queries):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = unidirectional_attention(q, k, v, num_queries, backend="triton")
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_and_backward(compile_backend):
    torch.manual_seed(0)
    model = TinyAttention().to(DEVICE)
    x = torch.randn(2, 21, 64, device=DEVICE)
    eager_out = model(x, 4)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, backend=compile_backend, fullgraph=True)
    out = compiled(x, 4)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_compiled_matches_reference():
    opts = options(OPTION_SETS[3])
    q, k, v = make_qkv(1, 2, 2, 30, 6, 32, opts, dtype=torch.float32)
    fn = torch.compile(lambda a, b, c: unidirectional_attention(a, b, c, 6, 2, backend="triton", **opts),
                       backend="aot_eager", fullgraph=True)
    assert_rel_close("out", fn(q, k, v), dense_masked_attention(q.double(), k.double(), v.double(), 6, 2, **opts))


@pytest.mark.parametrize("packed_qkv", [False, True])
def test_eager_calls_skip_the_dispatcher_and_match_the_custom_op(monkeypatch, packed_qkv):
    # Eager calls go through an autograd.Function straight to the kernels (the custom
    # op's dispatcher was two thirds of the host time per call); compile takes the op.
    # Both paths must give the same outputs and gradients, bit for bit.
    import adclr_kernels.unidirectional as U
    from adclr_kernels import unidirectional_attention_qkvpacked

    torch.manual_seed(0)
    qkv = torch.randn(2, 25, 3, 2, 32, device=DEVICE, requires_grad=True)
    grad = torch.randn(2, 25, 2, 32, device=DEVICE)

    def run():
        if packed_qkv:
            out = unidirectional_attention_qkvpacked(qkv, 4, backend="triton")
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out = unidirectional_attention(q, k, v, 4, backend="triton").transpose(1, 2)
        return out, torch.autograd.grad(out, qkv, grad)[0]

    calls = {"impl": 0}
    real_impl = U._qkv_bwd_impl if packed_qkv else U._bwd_impl
    name = "_qkv_bwd_impl" if packed_qkv else "_bwd_impl"

    def counted(*args):
        calls["impl"] += 1
        return real_impl(*args)

    monkeypatch.setattr(U, name, counted)
    eager_out, eager_grad = run()
    assert calls["impl"] == 1  # the eager backward ran the body, not the op
    monkeypatch.setattr(U, "_eager", lambda *tensors: False)
    op_out, op_grad = run()
    assert calls["impl"] == 1  # the custom op's own registration ran this time
    assert torch.equal(eager_out, op_out) and torch.equal(eager_grad, op_grad)


def test_eager_path_refuses_a_second_derivative_and_serves_vmap():
    # Eager calls must not differ from the custom op where the op is strict: a second
    # derivative is an error (not a silently missing term), and vmap, which the custom
    # op serves by its fallback, still works.
    from adclr_kernels import unidirectional_attention_qkvpacked

    torch.manual_seed(0)
    x = torch.randn(2, 13, 3, 2, 16, device=DEVICE, requires_grad=True)

    def f(t):
        return unidirectional_attention_qkvpacked(t, 3, backend="triton")

    g, = torch.autograd.grad(f(x).square().sum() + x.pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(g.sum(), x)
    batch = torch.randn(3, *x.shape, device=DEVICE)
    torch.testing.assert_close(torch.func.vmap(f)(batch), torch.stack([f(b) for b in batch]))
