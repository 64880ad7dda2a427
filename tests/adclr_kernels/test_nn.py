"""The drop-in module: timm's names, plain attention without queries, packed input, and
nothing copied around the op."""

import json
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adclr_kernels.attention_torch import dense_masked_attention
from adclr_kernels.nn import UnidirectionalAttention
from kernel_testing import DEVICE, OPTION_SETS, mask_of, option_id, options

TIMM_RECORD = json.loads((pathlib.Path(__file__).parent / "data" / "timm_vit_small_patch16_224.json").read_text())


def test_parameter_names_match_timm_attention():
    attn = UnidirectionalAttention(384, 6, qkv_bias=True)
    recorded = {k[len("blocks.0.attn."):]: v for k, v in TIMM_RECORD["state_dict"].items()
                if k.startswith("blocks.0.attn.")}
    assert {k: list(v.shape) for k, v in attn.state_dict().items()} == recorded
    normed = UnidirectionalAttention(64, 4, qk_norm=True, scale_norm=True)
    assert {"q_norm.weight", "k_norm.weight", "norm.weight", "proj.bias"} <= set(normed.state_dict())


def test_gated_attention_gates_the_output_before_the_projection():
    # timm's `gated=True`: sigmoid(gate(x)) times the (normed) attention output.
    torch.manual_seed(0)
    attn = UnidirectionalAttention(64, 4, qkv_bias=True, gated=True, backend="sdpa").to(DEVICE).double()
    assert list(attn.state_dict())[-4:] == ["gate.weight", "gate.bias", "proj.weight", "proj.bias"]
    x = torch.randn(2, 17, 64, device=DEVICE, dtype=torch.float64)
    q, k, v = attn.qkv(x).view(2, 17, 3, 4, 16).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 17, 64)
    torch.testing.assert_close(attn(x), attn.proj(out * torch.sigmoid(attn.gate(x))))


def test_no_queries_is_plain_attention():
    torch.manual_seed(0)
    attn = UnidirectionalAttention(64, 4, qkv_bias=True, backend="sdpa").to(DEVICE).double()
    x = torch.randn(2, 17, 64, device=DEVICE, dtype=torch.float64)
    q, k, v = attn.qkv(x).view(2, 17, 3, 4, 16).permute(2, 0, 3, 1, 4)
    want = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 17, 64))
    torch.testing.assert_close(attn(x), want)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["packed-qkv", "q-k-v"])  # the op's two forms
@pytest.mark.parametrize("opt_set", OPTION_SETS, ids=option_id)
def test_every_query_option_and_the_prefix_reach_the_op(opt_set, qk_norm):
    """Two prefix tokens, three queries and each set of query options, with the prefix
    rows' probabilities: the module's output is its projection of the float64 masked
    attention of its own q, k, v."""
    torch.manual_seed(0)
    attn = UnidirectionalAttention(64, 4, qkv_bias=True, qk_norm=qk_norm, backend="reference").to(DEVICE).double()
    opts, (B, L) = options(opt_set), (2, 2 + 9 + 3)
    x = torch.randn(B, L, 64, device=DEVICE, dtype=torch.float64)
    out, probs = attn(x, 3, 2, return_prefix_probs=True, **opts)
    q, k, v = attn.qkv(x).view(B, L, 3, 4, 16).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    want = dense_masked_attention(q, k, v, 3, 2, mask_of(opts))
    torch.testing.assert_close(out, attn.proj(want.transpose(1, 2).reshape(B, L, 64)))
    allowed = mask_of(opts).matrix(L, L, 3, 2, DEVICE)
    scores = (q @ k.transpose(-2, -1) * 16 ** -0.5).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(probs, scores.softmax(-1)[..., :2, :])


def test_q_k_and_scale_norms_and_a_head_width_of_its_own_are_timms():
    # timm: q_norm and k_norm per head, scale head_dim ** -0.5, norm over the heads' output before proj.
    torch.manual_seed(0)
    attn = UnidirectionalAttention(64, 4, attn_head_dim=8, qk_norm=True, scale_norm=True, backend="sdpa")
    attn = attn.to(DEVICE).double()
    for norm in (attn.q_norm, attn.k_norm, attn.norm):  # not the identity each starts as
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    x = torch.randn(2, 17, 64, device=DEVICE, dtype=torch.float64)
    q, k, v = attn.qkv(x).view(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(attn.q_norm(q), attn.k_norm(k), v).transpose(1, 2).reshape(2, 17, 32)
    torch.testing.assert_close(attn(x), attn.proj(attn.norm(out)))


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_packed_input_equals_dense_per_sequence(backend):
    torch.manual_seed(0)
    attn = UnidirectionalAttention(64, 2, qkv_bias=True, backend=backend).to(DEVICE)
    globals_, locals_ = torch.randn(2, 1 + 16 + 4, 64, device=DEVICE), torch.randn(3, 1 + 9, 64, device=DEVICE)
    packed = torch.cat([globals_.flatten(0, 1), locals_.flatten(0, 1)])
    cu = torch.tensor([0, 21, 42, 52, 62, 72], dtype=torch.int32, device=DEVICE)
    nq = torch.tensor([4, 4, 0, 0, 0], device=DEVICE)
    out = attn(packed, nq, 1, cu_seqlens=cu)
    want = torch.cat([attn(globals_, 4).flatten(0, 1), attn(locals_, 0).flatten(0, 1)])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="attn_drop"):
        UnidirectionalAttention(64, 4, attn_drop=0.1)
    with pytest.raises(ValueError, match="divisible"):
        UnidirectionalAttention(65, 4)
    with pytest.raises(ValueError, match="attn_mask"):
        UnidirectionalAttention(64, 4)(torch.randn(1, 5, 64), attn_mask=torch.ones(5, 5, dtype=torch.bool))
    # At construction, not at the first forward.
    with pytest.raises(ValueError, match="backend must be one of"):
        UnidirectionalAttention(64, 4, backend="bogus")
    for heads, error in ((0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match=f"num_heads must be a positive int, got {heads!r}"):
            UnidirectionalAttention(64, heads)
    with pytest.raises(ValueError, match="dim must be a positive int, got 0"):
        UnidirectionalAttention(0, 4)


@pytest.mark.parametrize("num_queries", [torch.tensor([1, 1]), torch.tensor(0), 1])
def test_query_counts_beside_a_layout_are_refused_by_name(num_queries):
    from adclr_kernels import VarlenLayout

    attn = UnidirectionalAttention(16, 2, backend="sdpa")
    layout = VarlenLayout([3, 4], [1, 1])
    with pytest.raises(ValueError, match="num_queries comes from the VarlenLayout; pass None"):
        attn(torch.randn(7, 16), num_queries, cu_seqlens=layout)
    assert attn(torch.randn(7, 16), cu_seqlens=layout).shape == (7, 16)
    assert attn(torch.randn(7, 16), np.int64(0), cu_seqlens=layout).shape == (7, 16)  # the default, numpy's


def test_qk_norm_output_follows_the_value_dtype():
    attn = UnidirectionalAttention(64, 4, qkv_bias=True, qk_norm=True, backend="sdpa")
    attn.q_norm = attn.k_norm = _Float32Norm(16)
    out = attn.to(torch.bfloat16)(torch.randn(2, 9, 64, dtype=torch.bfloat16), num_queries=2)
    assert out.dtype == torch.bfloat16


class _Float32Norm(nn.LayerNorm):
    """What CUDA autocast does to a LayerNorm: the output comes back in fp32."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float())


@pytest.mark.parametrize("module_qk_norm", [False, True])
def test_the_module_adds_no_copies_around_the_op(module_qk_norm):
    """What autograd and the drop-in module run around the kernels, counted on meta
    tensors of a real ViT-S/16 layer (bench.static's counter)."""
    from bench.static import autograd_work
    from bench.workloads import STATIC_WORKLOADS

    for workload in (STATIC_WORKLOADS[0], STATIC_WORKLOADS[-1]):  # batched global, packed batch
        custom, copies = autograd_work(workload, torch.bfloat16, qk_norm=module_qk_norm)
        if module_qk_norm:
            # q/k norms make new q and k tensors: the separate op runs, and autograd
            # stacks its three gradients. The point of the packed op is visible here.
            assert [op for op, _ in copies].count("stack") == 1
            continue
        assert custom == ["qkvpacked_attention_fwd", "qkvpacked_attention_bwd"]
        assert copies == []


def test_takes_timms_device_and_dtype_and_fused_attn():
    # Recent timm builds its blocks' attention with device= and dtype= and reads (or sets)
    # fused_attn on it.
    attn = UnidirectionalAttention(64, 4, qkv_bias=True, qk_norm=True, scale_norm=True,
                                   device="meta", dtype=torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in attn.parameters()} == {("meta", torch.bfloat16)}
    assert attn.fused_attn is True
    assert UnidirectionalAttention(64, 4, device=None, dtype=None).qkv.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="need a norm_layer"):
        UnidirectionalAttention(64, 4, qk_norm=True, norm_layer=None)


@pytest.mark.parametrize("shape,cu_seqlens,message", [
    ((9, 64), None, r"x must be \(batch, seq, dim\) \(packed tokens take cu_seqlens\), got \(9, 64\)"),
    ((1, 9, 64), [0, 9], r"x must be packed \(total_tokens, dim\), got \(1, 9, 64\)"),
])
def test_input_of_the_wrong_rank_names_x(shape, cu_seqlens, message):
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        UnidirectionalAttention(64, 4, backend="sdpa")(torch.randn(shape), cu_seqlens=cu)


@pytest.mark.parametrize("seq_len", [11, 50])  # the one-shot and the flash kernels
def test_torch_jit_trace_refuses_the_triton_backend_by_name(seq_len):
    """The tracer hands the launchers tensor sizes and records no Triton launch."""
    x = torch.randn(2, seq_len, 64, device=DEVICE)
    module = UnidirectionalAttention(64, 2, backend="triton").eval()
    with pytest.raises(RuntimeError, match="torch.jit.trace cannot record the triton backend's kernels; use "
                                           "torch.export or torch.compile, or trace with backend='sdpa'"):
        torch.jit.trace(module, (x,))
    module.backend = "sdpa"
    traced = torch.jit.trace(module, (x,))
    torch.testing.assert_close(traced(x * 2), module(x * 2))
