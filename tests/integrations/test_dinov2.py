"""adclr_kernels.integrations.dinov2 against the `dinov2` package (DINOv2's first release,
as published on PyPI; installed in CI's second environment with --no-deps) without
xformers: packed crop groups (list input), which DINOv2 itself runs only with xformers,
are checked against DINOv2 run on each group alone, and their sample-dropping
stochastic depth against DINOv2's tensor path under the same seed.

Tolerance: DINOv2's first release computes softmax(q k^T) explicitly: 1e-5 (fp32).
"""

import copy
import functools
import warnings

import pytest
import torch
from integration_testing import need

from adclr_kernels import visibility_mask
from adclr_kernels.integrations import UnsupportedModel
from adclr_kernels.integrations.dinov2 import query_tokens, restore_attention, swap_attention

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    need("dinov2")
    from dinov2.layers import MemEffAttention, NestedTensorBlock  # noqa: E402
    from dinov2.layers.attention import Attention  # noqa: E402
    from dinov2.models.vision_transformer import DinoVisionTransformer  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


def build(**kwargs):
    torch.manual_seed(0)
    options = dict(patch_size=8, img_size=32, depth=2, embed_dim=64, num_heads=2, init_values=1.0, block_chunks=0,
                   block_fn=functools.partial(NestedTensorBlock, attn_class=MemEffAttention))
    model = DinoVisionTransformer(**{**options, **kwargs})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def images(batch, size=32, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def close_grads(a, b, tol=1e-4):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if q.grad is not None:
            assert (p.grad - q.grad).norm() <= tol * q.grad.norm() + 1e-7, name


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("chunks", [0, 2])
def test_swap_matches_dinov2(chunks, backend):
    reference = build(block_chunks=chunks).eval()
    model = swap_attention(copy.deepcopy(reference), backend=backend)
    assert list(model.state_dict()) == list(reference.state_dict())
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(attn) == 2 and all(isinstance(m, MemEffAttention) for m in attn)  # NestedTensorBlock's assert
    x = images(3)
    with torch.no_grad():
        got, want = model.forward_features(x), reference.forward_features(x)
        for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(got[key], want[key], **TOL)
        for a, b in zip(model.get_intermediate_layers(x, 2), reference.get_intermediate_layers(x, 2)):
            torch.testing.assert_close(a, b, **TOL)
    weights = torch.randn(3, 64)
    for m in (model, reference):
        (m(x) * weights).sum().backward()
    close_grads(model, reference)
    restore_attention(model)
    assert type(model.norm) is type(reference.norm) and all(type(m) is MemEffAttention for m in attn)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_packed_crop_groups_equal_each_group_alone(backend):
    reference = build().eval()
    model = swap_attention(copy.deepcopy(reference), backend=backend)
    views = [images(2, 32, 1), images(3, 16, 2)]  # global and local crops: 17 and 5 tokens
    got = model.forward_features(views, [None, None])
    for out, x in zip(got, views):
        want = reference.forward_features(x)
        torch.testing.assert_close(out["x_norm_clstoken"], want["x_norm_clstoken"], **TOL)
        torch.testing.assert_close(out["x_norm_patchtokens"], want["x_norm_patchtokens"], **TOL)
    # Gradients through the packed path equal the per-group ones.
    for views_out, m in ((got, model), (None, reference)):
        outs = views_out or [reference.forward_features(x) for x in views]
        sum(o["x_norm_clstoken"].sum() + o["x_norm_patchtokens"].square().sum() for o in outs).backward()
    close_grads(model, reference)


def test_sample_dropping_stochastic_depth_matches_dinov2():
    """One crop group: DINOv2's list path draws its random subsets exactly as its tensor
    path does, so the same seed gives the same result."""
    reference = build(drop_path_rate=0.5).train()
    model = swap_attention(copy.deepcopy(reference), backend="sdpa")
    x = images(4)
    torch.manual_seed(3)
    got = model.forward_features([x], [None])[0]["x_norm_clstoken"]
    torch.manual_seed(3)
    want = reference.forward_features(x)["x_norm_clstoken"]
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(want, reference.eval().forward_features(x)["x_norm_clstoken"])  # it did drop


def test_a_block_diagonal_mask_is_taken_as_offsets():
    model = swap_attention(build().eval(), backend="sdpa")
    attn = model.blocks[0].attn

    class BlockDiagonalMask:  # xformers' mask, as far as the adapter reads it
        class _Info:
            seqstart_py = [0, 5, 12]

        q_seqinfo = k_seqinfo = _Info()

    x = torch.randn(1, 12, 64)
    with torch.no_grad():
        packed = attn(x, attn_bias=BlockDiagonalMask())
        alone = torch.cat([attn(x[:, :5]), attn(x[:, 5:])], 1)
    torch.testing.assert_close(packed, alone, **TOL)
    with pytest.raises(ValueError, match="attn_bias of type Tensor"):
        attn(x, attn_bias=torch.zeros(12, 12))


def reference_queries(model, x, tokens, opts):
    """DINOv2's blocks written out with the op's mask on [CLS | patches | queries]."""
    h = torch.cat([model.prepare_tokens_with_masks(x), tokens], 1)
    B, L, C = h.shape
    mask = visibility_mask(L, L, tokens.shape[1], 1, **opts)
    for blk in model.blocks:
        a = blk.attn
        q, k, v = a.qkv(blk.norm1(h)).reshape(B, L, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        p = ((q @ k.transpose(-2, -1)) * a.scale).masked_fill(~mask, float("-inf")).softmax(-1)
        h = h + blk.ls1(a.proj((p @ v).transpose(1, 2).reshape(B, L, C)))
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
    return model.norm(h)


@pytest.mark.parametrize("opts", [{}, dict(query_sees_prefix=True, query_sees_self=True),
                                  dict(query_sees_queries=True)], ids=["none", "prefix+self", "queries"])
def test_query_tokens_tensor_and_packed(opts):
    reference = build().eval()
    model = swap_attention(copy.deepcopy(reference), backend="sdpa")
    x, local = images(2), images(3, 16, 2)
    crops = torch.randn(2, 4, 3, 8, 8)
    with torch.no_grad():
        with query_tokens(model, crops, **opts) as q:
            out = model.forward_features(x)
        want = reference.forward_features(x)
        assert torch.equal(out["x_norm_clstoken"], model.forward_features(x)["x_norm_clstoken"])
        torch.testing.assert_close(out["x_norm_patchtokens"], want["x_norm_patchtokens"], **TOL)
        embed = reference.patch_embed
        tokens = embed.norm(embed.proj(crops.flatten(0, 1)).flatten(1)).view(2, 4, -1)
        torch.testing.assert_close(q.query, reference_queries(reference, x, tokens, opts)[:, -4:], **TOL)
        # Packed: the globals carry the query tokens, the locals none; the same query outputs.
        with query_tokens(model, [crops, None], **opts) as p:
            outs = model.forward_features([x, local], [None, None])
        torch.testing.assert_close(p.query[0], q.query, **TOL)
        assert p.query[1] is None
        with query_tokens(model, [crops[:, :0], None], **opts) as empty:  # Q = 0 as in a tensor input
            model.forward_features([x, local], [None, None])
        assert empty.query[0].shape == (2, 0, 64) and empty.query[1] is None
        torch.testing.assert_close(outs[1]["x_norm_clstoken"], reference.forward_features(local)["x_norm_clstoken"], **TOL)


@pytest.mark.parametrize("queries,inputs,message", [
    ("list1", "list2", "1 entries of query tokens for 2 crop groups"),
    ("list3", "list2", "3 entries of query tokens for 2 crop groups"),
    ("tensor", "list2", "a Tensor of query tokens for a list input"),
    ("list1", "tensor", "a list of query tokens for a Tensor input"),
])
def test_query_tokens_that_do_not_fit_the_input_are_refused(queries, inputs, message):
    # A list shorter than the crop groups dropped the groups past it from the output.
    model = swap_attention(build().eval(), backend="sdpa")
    crops = torch.randn(2, 4, 3, 8, 8)
    given = {"tensor": crops, "list1": [crops], "list3": [crops, None, None]}[queries]
    x = images(2)
    with torch.no_grad(), query_tokens(model, given), pytest.raises(ValueError, match=message):
        if inputs == "tensor":
            model.forward_features(x)
        else:
            model.forward_features([x, images(3, 16, 2)], [None, None])


def test_swapped_model_pickles_and_loads_swapped():
    import io

    model = swap_attention(build().eval(), backend="sdpa")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert [type(b) for b in loaded.blocks] == [type(b) for b in model.blocks]
    assert loaded.blocks[0].attn.adclr_backend == "sdpa"
    x = images(2)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x)["x_norm_patchtokens"],
                           model.forward_features(x)["x_norm_patchtokens"])


def test_refusals_change_nothing():
    model = build()
    model.blocks[1].attn.attn_drop.p = 0.1
    with pytest.raises(UnsupportedModel, match=r"blocks\.1\.attn \(MemEffAttention\): attention dropout"):
        swap_attention(model)
    assert all(type(m) is MemEffAttention for m in model.modules() if isinstance(m, Attention))
    assert all(type(b) is NestedTensorBlock for b in model.blocks)
    with pytest.raises(UnsupportedModel, match="not DINOv2's DinoVisionTransformer"):
        swap_attention(torch.nn.Linear(2, 2))
