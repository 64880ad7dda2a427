"""adclr_kernels.integrations.dino on a ViT with DINO's interface (dino_interface.py).

Tolerance: DINO computes softmax(q k^T * scale) explicitly, the op's sdpa/Triton paths
fuse it, so outputs and the maps of get_last_selfattention (DINO's own code, on inputs
from the blocks before) agree to 1e-5 (fp32), not bitwise; gradients to 1e-4 of their
norm (fp32 Triton).
"""

import copy

import pytest
import torch
from dino_interface import Attention, Block, VisionTransformer
from torch import nn

from adclr_kernels import visibility_mask
from adclr_kernels.integrations import UnsupportedModel
from adclr_kernels.integrations.dino import cls_attention, query_tokens, restore_attention, swap_attention

TOL = dict(rtol=1e-5, atol=1e-5)


def build(**kwargs):
    torch.manual_seed(0)
    options = dict(img_size=[32], patch_size=8, embed_dim=64, depth=2, num_heads=2, qkv_bias=True,
                   norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6))
    return VisionTransformer(**{**options, **kwargs})


def images(batch=3):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("kwargs", [{}, dict(qk_scale=0.1), dict(drop_path_rate=0.5)], ids=["plain", "qk_scale", "drop_path"])
def test_swap_matches_dino(kwargs, backend):
    reference = build(**kwargs)
    model = swap_attention(copy.deepcopy(reference), backend=backend)
    assert list(model.state_dict()) == list(reference.state_dict())
    assert isinstance(model.blocks[0].attn, Attention) and isinstance(model.blocks[0], Block)
    for batch in (2, 3):  # a swap returning a tensor where DINO unpacks (x, attn) breaks at 2, fails at 3
        x = images(batch)
        model.eval(), reference.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(x), **TOL)
            torch.testing.assert_close(model.get_last_selfattention(x), reference.get_last_selfattention(x), **TOL)
            for a, b in zip(model.get_intermediate_layers(x, 2), reference.get_intermediate_layers(x, 2)):
                torch.testing.assert_close(a, b, **TOL)
    # Training: the same seed drops the same samples (drop_path is DINO's, honoured).
    model.train(), reference.train()
    weights = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    for m in (model, reference):
        torch.manual_seed(5)
        (m(images()) * weights).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad - q.grad).norm() <= 1e-4 * q.grad.norm(), name
    restore_attention(model)
    assert type(model.blocks[0].attn) is Attention and type(model.blocks[0]) is Block


def reference_queries(model, x, tokens, opts):
    """DINO's blocks written out with the op's mask on [CLS | patches | queries]."""
    h = torch.cat([model.prepare_tokens(x), tokens], 1)
    B, L, C = h.shape
    mask = visibility_mask(L, L, tokens.shape[1], 1, **opts)
    for blk in model.blocks:
        a = blk.attn
        q, k, v = a.qkv(blk.norm1(h)).reshape(B, L, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        p = ((q @ k.transpose(-2, -1)) * a.scale).masked_fill(~mask, float("-inf")).softmax(-1)
        h = h + a.proj((p @ v).transpose(1, 2).reshape(B, L, C))
        h = h + blk.mlp(blk.norm2(h))
    return model.norm(h)


@pytest.mark.parametrize("opts", [{}, dict(query_sees_prefix=True), dict(query_sees_queries=True)],
                         ids=["none", "prefix", "queries"])
def test_query_tokens(opts):
    reference = build(qk_scale=0.2).eval()
    model = swap_attention(copy.deepcopy(reference), backend="sdpa")
    x = images()
    crops = torch.randn(3, 4, 3, 8, 8, requires_grad=True)
    with query_tokens(model, crops, **opts) as q:
        cls = model(x)
    with query_tokens(model, crops, **opts):
        maps = model.get_last_selfattention(x)
    with torch.no_grad():
        plain, plain_maps = reference(x), reference.get_last_selfattention(x)
        tokens = reference.patch_embed.proj(crops.flatten(0, 1)).flatten(1).view(3, 4, -1)
        want = reference_queries(reference, x, tokens, opts)
    torch.testing.assert_close(cls, plain, **TOL)
    torch.testing.assert_close(q.query, want[:, -4:], **TOL)
    # Maps of every row, query tokens last: image rows never look at query columns.
    assert maps.shape == (3, 2, 21, 21)
    assert torch.equal(maps[:, :, :17, 17:], torch.zeros_like(maps[:, :, :17, 17:]))
    torch.testing.assert_close(maps[:, :, :17, :17], plain_maps, **TOL)
    q.query.sum().backward()
    assert crops.grad.abs().sum() > 0


def test_no_query_crops_is_the_plain_model():
    reference = build().eval()
    model = swap_attention(copy.deepcopy(reference), backend="sdpa")
    with query_tokens(model, torch.randn(3, 0, 3, 8, 8)) as q, torch.no_grad():
        cls = model(images())
    assert q.query.shape == (3, 0, 64)
    with torch.no_grad():
        torch.testing.assert_close(cls, reference(images()), **TOL)


def test_multi_crop_wrapper_gives_query_tokens_to_the_global_crops_with_passes_1():
    """DINO's MultiCropWrapper calls the backbone once per crop resolution, global crops
    first; passes=1 carries the query tokens in that call only."""
    model = swap_attention(build().eval(), backend="sdpa")
    globals_ = images(4)
    locals_ = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    crops = torch.randn(4, 3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain_locals = model(locals_)
        with query_tokens(model, crops) as alone:
            model(globals_)
        with query_tokens(model, crops, passes=1) as q:
            model(globals_)
            local_cls = model(locals_)
    assert torch.equal(local_cls, plain_locals) and torch.equal(q.query, alone.query)
    with pytest.raises(RuntimeError, match="restore_attention inside a query_tokens context"):
        with query_tokens(model, crops):
            restore_attention(model)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_cls_attention_is_the_maps_cls_row(backend):
    reference = build(qk_scale=0.2).eval()
    model = swap_attention(copy.deepcopy(reference), backend=backend)
    x, crops = images(), torch.randn(3, 4, 3, 8, 8)
    with torch.no_grad():
        row = cls_attention(model, x)
        assert row.shape == (3, 2, 1, 17)
        torch.testing.assert_close(row, reference.get_last_selfattention(x)[:, :, :1], **TOL)
        with query_tokens(model, crops, query_sees_prefix=True):
            with_queries, maps = cls_attention(model, x), model.get_last_selfattention(x)
    assert with_queries.shape == (3, 2, 1, 21)
    torch.testing.assert_close(with_queries, maps[:, :, :1], **TOL)


def test_swapped_model_pickles_and_query_crops_of_the_wrong_kind_are_named():
    import io

    model = swap_attention(build().eval(), backend="sdpa")
    buffer = io.BytesIO()
    torch.save(model, buffer)  # DINO's whole-model checkpoints; also copy.deepcopy
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert [type(b) for b in loaded.blocks] == [type(b) for b in model.blocks]
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match=r"query crops must have shape .* got list"):
        with query_tokens(model, [torch.randn(3, 2, 3, 8, 8)]):
            pass


def test_refusals_change_nothing():
    model = build(attn_drop_rate=0.1)
    with pytest.raises(UnsupportedModel, match=r"blocks\.0\.attn \(Attention\): attention dropout p=0\.1"):
        swap_attention(model)
    assert type(model.blocks[0].attn) is Attention and type(model.blocks[0]) is Block

    model = build()
    model.blocks[1].extra = nn.Linear(2, 2)
    with pytest.raises(UnsupportedModel, match=r"blocks\.1 \(Block\) has extra"):
        swap_attention(model)
    assert type(model.blocks[0].attn) is Attention

    with pytest.raises(UnsupportedModel, match="not DINO's VisionTransformer"):
        swap_attention(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(RuntimeError, match="call swap_attention"):
        with query_tokens(build(), torch.randn(1, 2, 64)):
            pass


def test_a_swap_that_would_change_the_state_dict_is_undone(monkeypatch):
    """After the class swap the state dict's keys, shapes and dtypes are compared with
    before; a swapped class that saved anything else (a bug) puts every class back."""
    import adclr_kernels.integrations.dino as dino_adapter

    real = dino_adapter.subclass

    def leaky(base, mixin, name):
        cls = real(base, mixin, name)
        if mixin is not dino_adapter.DinoBlock:
            return cls

        def save(self, destination, prefix, keep_vars):
            cls.__bases__[1]._save_to_state_dict(self, destination, prefix, keep_vars)
            destination[prefix + "extra"] = torch.zeros(1)

        return type("LeakyBlock", (cls,), {"_save_to_state_dict": save})

    monkeypatch.setattr(dino_adapter, "subclass", leaky)
    model = build()
    with pytest.raises(RuntimeError, match=r"would change the state dict at blocks\.0\.extra"):
        swap_attention(model)
    assert type(model.blocks[0]) is Block and type(model.blocks[1].attn) is Attention


def test_timm_adapter_points_dino_models_here():
    timm_adapter = pytest.importorskip("adclr_kernels.integrations.timm", reason="needs timm")
    with pytest.raises(UnsupportedModel, match="use adclr_kernels.integrations.dino"):
        timm_adapter.swap_attention(build())
