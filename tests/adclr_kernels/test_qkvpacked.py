"""The packed-qkv entry points: same results as q, k, v, one gradient buffer, no copies."""

import pytest
import torch

from adclr_kernels import (VarlenLayout, unidirectional_attention,
                           unidirectional_attention_qkvpacked, unidirectional_attention_varlen,
                           unidirectional_attention_varlen_qkvpacked)
from adclr_kernels.reference import dense_masked_attention
from kernel_testing import DEVICE, OPTION_SETS, assert_rel_close, options

pytestmark = pytest.mark.usefixtures("poisoned")


def _qkv(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)


@pytest.mark.parametrize("opt_set", [OPTION_SETS[0], OPTION_SETS[3], OPTION_SETS[4]],
                         ids=lambda s: "psq=" + "".join("01"[x] for x in s))
@pytest.mark.parametrize("num_queries", [0, 1, 10])
def test_dense_qkvpacked_equals_separate_and_float64(opt_set, num_queries):
    opts = options(opt_set)
    qkv = _qkv(2, 2 + 45 + num_queries, 3, 2, 32).requires_grad_()
    grad_out = _qkv(2, 2 + 45 + num_queries, 2, 32, seed=1)
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
    ref = dense_masked_attention(*ref64, num_queries, 2, **opts)
    ref_grads = torch.autograd.grad(ref, ref64, grad_out.double().transpose(1, 2))
    assert_rel_close("out", out.transpose(1, 2), ref)
    for i, want in enumerate(ref_grads):
        assert_rel_close(f"d{'qkv'[i]}", dqkv[:, :, i].transpose(1, 2), want)


def test_varlen_qkvpacked_with_a_layout_equals_offsets():
    lengths, queries = [1 + 49 + 10, 1 + 9, 1 + 33 + 3, 0, 1 + 9], [10, 0, 3, 0, 0]
    layout = VarlenLayout(lengths, queries, device=DEVICE)
    qkv = _qkv(sum(lengths), 3, 2, 32, seed=2).requires_grad_()
    grad_out = _qkv(sum(lengths), 2, 32, seed=3)
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


def test_tile_table_lists_every_block_with_rows_once():
    layout = VarlenLayout([207, 207, 37, 0, 64, 65], [10, 10, 0, 0, 0, 1])
    tiles = layout.tiles(64).tolist()
    assert tiles == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1], [1, 2], [1, 3], [2, 0],
                     [4, 0], [5, 0], [5, 1]]
    assert layout.tiles(64) is layout.tiles(64)  # built once


@pytest.mark.parametrize("module_qk_norm", [False, True])
def test_the_module_adds_no_copies_around_the_op(module_qk_norm):
    """What autograd and the drop-in module run around the kernels, counted on meta
    tensors of a real ViT-S/16 layer (bench.static's counter)."""
    from bench.static import autograd_work
    from bench.workloads import STATIC_WORKLOADS

    for workload in (STATIC_WORKLOADS[0], STATIC_WORKLOADS[-1]):  # dense global, packed batch
        custom, copies = autograd_work(workload, torch.bfloat16, qk_norm=module_qk_norm)
        if module_qk_norm:
            # q/k norms make new q and k tensors: the separate op runs, and autograd
            # stacks its three gradients. The point of the packed op is visible here.
            assert [op for op, _ in copies].count("stack") == 1
            continue
        assert custom == ["qkvpacked_attention_fwd", "qkvpacked_attention_bwd"]
        assert copies == []
