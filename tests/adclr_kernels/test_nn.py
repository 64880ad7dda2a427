"""The drop-in module and the timm conversion."""

import json
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adclr_kernels import unidirectional_attention
from adclr_kernels.nn import UnidirectionalAttention, enable_query_tokens
from kernel_testing import DEVICE

# enable_query_tokens is deprecated; the tests of its old conversion stay until it goes.
pytestmark = pytest.mark.filterwarnings("ignore:enable_query_tokens is deprecated:DeprecationWarning")
TIMM_RECORD = json.loads((pathlib.Path(__file__).parent / "data" / "timm_vit_small_patch16_224.json").read_text())


def test_parameter_names_match_timm_attention():
    attn = UnidirectionalAttention(384, 6, qkv_bias=True)
    recorded = {k[len("blocks.0.attn."):]: v for k, v in TIMM_RECORD["state_dict"].items()
                if k.startswith("blocks.0.attn.")}
    assert {k: list(v.shape) for k, v in attn.state_dict().items()} == recorded
    normed = UnidirectionalAttention(64, 4, qk_norm=True, scale_norm=True)
    assert {"q_norm.weight", "k_norm.weight", "norm.weight", "proj.bias"} <= set(normed.state_dict())


def test_no_queries_is_plain_attention():
    torch.manual_seed(0)
    attn = UnidirectionalAttention(64, 4, qkv_bias=True, backend="sdpa").to(DEVICE).double()
    x = torch.randn(2, 17, 64, device=DEVICE, dtype=torch.float64)
    q, k, v = attn.qkv(x).view(2, 17, 3, 4, 16).permute(2, 0, 3, 1, 4)
    want = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 17, 64))
    torch.testing.assert_close(attn(x), want)


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


# ---------------------------------------------------------------------------------------
# A stand-in with timm VisionTransformer's structure and attribute names, so that the
# conversion is exercised on machines where timm cannot be installed.
# ---------------------------------------------------------------------------------------

class _TimmAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm = self.k_norm = self.norm = nn.Identity()
        self.attn_drop, self.proj_drop = nn.Dropout(0.0), nn.Dropout(0.0)

    def forward(self, x, attn_mask=None, is_causal=False):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _TimmBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _TimmAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ls1 = self.ls2 = self.drop_path1 = self.drop_path2 = nn.Identity()

    def forward(self, x, attn_mask=None):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class _TimmViT(nn.Module):
    def __init__(self, dim=64, heads=2, depth=2, patch=8, image=32):
        super().__init__()
        self.num_prefix_tokens = 1
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.patch_embed.norm = nn.Identity()
        self.patch_embed.forward = lambda x: self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (image // patch) ** 2, dim) * 0.02)
        self.patch_drop = self.norm_pre = nn.Identity()
        self.blocks = nn.Sequential(*[_TimmBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def _pos_embed(self, x):
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed

    def forward(self, x):
        return self.norm(self.blocks(self._pos_embed(self.patch_embed(x))))


def _check_conversion(model, image, patch):
    torch.manual_seed(1)
    images = torch.randn(2, 3, image, image)
    crops = torch.randn(2, 5, 3, patch, patch, requires_grad=True)
    with torch.no_grad():
        before = model.forward_features(images) if hasattr(model, "forward_features") else model(images)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(DeprecationWarning, match="swap_attention"):
        enable_query_tokens(model, backend="sdpa")
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    plain = model(images)
    feats = model(images, crops)
    # Raw path unchanged by the conversion and by the query tokens.
    torch.testing.assert_close(plain["cls"], before[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats["cls"], plain["cls"], rtol=0, atol=0)
    torch.testing.assert_close(feats["patch"], plain["patch"], rtol=0, atol=0)
    assert plain["query"] is None and feats["query"].shape == (2, 5, feats["cls"].shape[-1])
    feats["query"].sum().backward()
    assert crops.grad.abs().sum() > 0


def test_enable_query_tokens_on_a_timm_structured_model():
    _check_conversion(_TimmViT(), 32, 8)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_gradient_checkpointing_recomputes_with_the_same_layout(backend):
    torch.manual_seed(0)
    model = enable_query_tokens(_TimmViT(), backend=backend).to(DEVICE)
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    crops = torch.randn(2, 5, 3, 8, 8, device=DEVICE)
    grads = []
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        model.zero_grad()
        feats = model(images, crops)
        (feats["query"].square().sum() + feats["cls"].sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_blocks_of_another_structure_are_refused():
    model = _TimmViT()
    del model.blocks[0].norm1
    with pytest.raises(TypeError, match="not a timm pre-norm Block: it has no norm1"):
        enable_query_tokens(model)


def test_qk_norm_output_follows_the_value_dtype():
    attn = UnidirectionalAttention(64, 4, qkv_bias=True, qk_norm=True, backend="sdpa")
    attn.q_norm = attn.k_norm = _Float32Norm(16)
    out = attn.to(torch.bfloat16)(torch.randn(2, 9, 64, dtype=torch.bfloat16), num_queries=2)
    assert out.dtype == torch.bfloat16


class _Float32Norm(nn.LayerNorm):
    """What CUDA autocast does to a LayerNorm: the output comes back in fp32."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float())
