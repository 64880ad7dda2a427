"""adclr_kernels.integrations.timm against timm itself (tiny models built from timm's own
model functions: no download).

Tolerances: the swap with the sdpa backend makes the same SDPA call as timm, so outputs
and gradients are bit-identical (asserted exactly); Triton (fp32, interpreter on CPU)
within 2e-5 of it. Query tokens are checked against timm's own blocks run on [image |
query] tokens with the op's mask passed as timm's `attn_mask` (and an identity rotation
for the query tokens where the model uses RoPE), to 1e-5.
"""

import copy
import json
import pathlib

import pytest
import torch
from integration_testing import need

from adclr_kernels import visibility_mask

timm = need("timm")
from timm.layers import Attention  # noqa: E402
from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock  # noqa: E402

from adclr_kernels.integrations import UnsupportedModel  # noqa: E402
from adclr_kernels.nn import UnidirectionalAttention  # noqa: E402
from adclr_kernels.integrations.timm import (forward_queries, query_tokens, restore_attention,  # noqa: E402
                                             swap_attention)

SMALL = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
MODELS = {  # id: (timm model function, overrides); every family the adapter supports
    "vit": ("vit_small_patch16_224", {}),
    "vit-qknorm-registers-noclass-avgpool": ("vit_small_patch16_224",
                                             dict(qk_norm=True, reg_tokens=2, class_token=False, global_pool="avg")),
    "deit3-layerscale-noembedclass": ("deit3_small_patch16_224", {}),
    "clip-prenorm": ("vit_base_patch32_clip_224", {}),
    "siglip-noclass-mappool": ("vit_base_patch16_siglip_224", {}),
    "dinov2-registers": ("vit_small_patch14_reg4_dinov2", {}),
    "postnorm": ("vit_small_patch16_224", dict(block_fn=ResPostBlock)),
    "parallel": ("vit_small_patch16_18x2_224", {}),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", {}),
    "eva02-rope-qvbias": ("eva02_tiny_patch14_224", {}),
    "eva02-separate-qkv": ("eva02_tiny_patch14_224", dict(qkv_fused=False)),
    "eva02-postnorm": ("eva02_tiny_patch14_224", dict(use_post_norm=True)),
    "rope-gqa": ("eva02_tiny_patch14_224", dict(attn_type="rope", qkv_fused=False, num_kv_heads=1)),
    "rope-mixed": ("vit_small_patch16_rope_mixed_224", {}),
    "rope-registers": ("vit_medium_patch16_rope_reg1_gap_256", {}),
    "dinov3": ("vit_small_patch16_dinov3_qkvb", {}),
}


def build(key, **extra):
    torch.manual_seed(0)
    name, overrides = MODELS[key]
    model = timm.create_model(name, pretrained=False, **SMALL, **overrides, **extra)
    with torch.no_grad():  # timm zero-initialises some biases and scales; make every one count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def images(batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def crops(batch=2, num=3, seed=2):
    return torch.randn(batch, num, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("key", MODELS)
def test_swap_changes_nothing_but_the_attention(key):
    reference = build(key).eval()
    model = copy.deepcopy(reference)
    calls = []
    first = next(m for m in model.modules() if type(m).__name__ in ("Attention", "EvaAttention", "AttentionRope"))
    first.register_forward_hook(lambda *_: calls.append(1))
    state = model.state_dict()
    swap_attention(model, backend="sdpa")

    assert list(model.state_dict()) == list(state)
    assert all(v is state[k] or torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert type(first).__bases__[1].__name__ in ("Attention", "EvaAttention", "AttentionRope")
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))  # head and pooling included
        assert torch.equal(model.forward_features(x), reference.forward_features(x))
        got = model.forward_intermediates(x, indices=2, output_fmt="NLC", return_prefix_tokens=True)[1]
        want = reference.forward_intermediates(x, indices=2, output_fmt="NLC", return_prefix_tokens=True)[1]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want))
    assert calls  # the hook registered before the swap still fires

    # Gradients, in training mode.
    model.train(), reference.train()
    for m in (model, reference):
        m(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name

    original = type(first).__bases__[1]
    restore_attention(model)
    assert type(first) is original


def test_triton_backend_matches():
    reference = build("vit-qknorm-registers-noclass-avgpool")
    model = swap_attention(copy.deepcopy(reference), backend="triton")
    x = images()
    out, want = model(x), reference(x)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
    out.sum().backward(), want.sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-5, atol=2e-5)


def test_gated_attention():
    model = build("vit")
    with torch.no_grad():
        model.blocks[0].attn = Attention(64, 2, qkv_bias=True, gated=True)
    reference = copy.deepcopy(model).eval()
    swap_attention(model.eval(), backend="sdpa")
    assert torch.equal(model(images()), reference(images()))


def test_drop_in_module_takes_timms_gated_attention_weights():
    torch.manual_seed(0)
    timm_attn = Attention(64, 2, qkv_bias=True, gated=True).eval()
    ours = UnidirectionalAttention(64, 2, qkv_bias=True, gated=True, backend="sdpa").eval()
    ours.load_state_dict(timm_attn.state_dict())
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), timm_attn(x), rtol=1e-6, atol=1e-6)


def test_a_model_built_with_the_drop_in_module_is_pointed_to_its_own_argument():
    model = build("vit", attn_layer=UnidirectionalAttention)
    message = r"blocks\.0\.attn is adclr_kernels\.nn\.UnidirectionalAttention, which runs the op already"
    with pytest.raises(UnsupportedModel, match=message):
        forward_queries(model, images(), crops())
    _refused(model, message)


# ------------------------------------------------------------------------------ refusals

def _refused(model, message):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    with pytest.raises(UnsupportedModel, match=message) as error:
        swap_attention(model)
    assert "\n" not in str(error.value)
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name,kwargs,message", [
    ("vit_small_patch16_224", dict(attn_layer="diff", **SMALL), r"blocks\.0\.attn \(DiffAttention\): differential"),
    ("vit_small_patch16_224", dict(block_fn=ParallelScalingBlock, **SMALL), r"blocks\.0 \(ParallelScalingBlock\)"),
    ("vit_small_patch16_224", dict(attn_drop_rate=0.1, **SMALL), r"blocks\.0\.attn \(Attention\): attention dropout"),
    ("swin_tiny_patch4_window7_224", dict(embed_dim=32, depths=(1, 1), num_heads=(1, 2)), "SwinTransformer .*windowed"),
    ("naflexvit_base_patch16_gap", dict(depth=1, embed_dim=64, num_heads=2), "NaFlexVit .*padding masks"),
    ("beit_base_patch16_224", dict(depth=1, embed_dim=64, num_heads=2), "Beit .*relative position"),
    ("vit_relpos_small_patch16_224", dict(depth=1, embed_dim=64, num_heads=2), "VisionTransformerRelPos .*relative"),
])
def test_refused_before_any_change(name, kwargs, message):
    _refused(timm.create_model(name, pretrained=False, **kwargs), message)


def test_an_unknown_attention_class_is_refused():
    model = build("vit")

    class MyAttention(Attention):
        pass

    model.blocks[1].attn.__class__ = MyAttention
    _refused(model, r"blocks\.1\.attn \(.*MyAttention\) is not an attention class")


@pytest.mark.parametrize("where", ["blocks.1.attn", "blocks.0"])
def test_a_parameter_the_forward_would_not_use_is_refused(where):
    """What a plain attribute check let through (q_bias, lambda_*, rel_pos on a class
    that still looks like timm's): every parameter and submodule must be one the swapped
    forward uses."""
    model = build("vit")
    model.get_submodule(where).rel_pos = torch.nn.Parameter(torch.zeros(3))
    _refused(model, rf"{where.replace('.', '[.]')} \((Attention|Block)\) has rel_pos, which the adapter's forward")


# --------------------------------------------------------------------------- query tokens

def reference_queries(model, x, tokens, opts):
    """timm's own blocks on [image | query] tokens with the op's mask as attn_mask; the
    query tokens get an identity rotation where the model rotates (no position)."""
    P, Q = model.num_prefix_tokens, tokens.shape[1]
    h = model.patch_embed(x)
    h, rope = model._pos_embed(h) if isinstance(model, timm.models.eva.Eva) else (model._pos_embed(h), None)
    h = torch.cat([model.norm_pre(model.patch_drop(h) if rope is None else h), tokens], 1)
    mask = visibility_mask(h.shape[1], h.shape[1], Q, P, **opts)
    for i, block in enumerate(model.blocks):
        if rope is None:
            h = block(h, attn_mask=mask)
        else:
            r = rope[i] if getattr(model, "rope_mixed", False) else rope
            half = r.shape[-1] // 2
            identity = torch.cat([r.new_zeros(*r.shape[:-2], Q, half), r.new_ones(*r.shape[:-2], Q, half)], -1)
            h = block(h, rope=torch.cat([r, identity], -2), attn_mask=mask)
    return model.norm(h)


OPTIONS = [dict(), dict(query_sees_prefix=True), dict(query_sees_self=True),
           dict(query_sees_prefix=True, query_sees_queries=True)]


@pytest.mark.parametrize("opts", OPTIONS, ids=["none", "prefix", "self", "prefix+queries"])
@pytest.mark.parametrize("key", ["vit-qknorm-registers-noclass-avgpool", "postnorm", "parallel", "deit-distilled",
                                 "eva02-rope-qvbias", "rope-gqa", "rope-mixed", "dinov3"])
def test_query_tokens_match_timm_blocks_under_the_mask(key, opts):
    reference = build(key).eval()
    model = swap_attention(copy.deepcopy(reference), backend="sdpa")
    x, c = images(), crops().requires_grad_()
    out = forward_queries(model, x, c, **opts)
    with torch.no_grad():
        features = reference.forward_features(x)
        embed = reference.patch_embed
        tokens = reference.norm_pre(embed.norm(embed.proj(c.flatten(0, 1)).flatten(1))).view(2, 3, -1)
        want = reference_queries(reference, x, tokens, opts)
    P = model.num_prefix_tokens
    assert torch.equal(out["prefix"], features[:, :P]) and torch.equal(out["patch"], features[:, P:])
    assert out["cls"] is None if reference.cls_token is None else torch.equal(out["cls"], features[:, 0])
    torch.testing.assert_close(out["query"], want[:, -3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["patch"], want[:, P:-3], rtol=1e-5, atol=1e-5)
    out["query"].square().sum().backward()
    assert c.grad.abs().sum() > 0


def test_query_tokens_through_the_models_own_methods():
    model = swap_attention(build("vit").eval(), backend="sdpa")
    x = images()
    with torch.no_grad():
        plain_logits = model(x)
        plain = model.forward_intermediates(x, indices=[0, 1], output_fmt="NCHW")
        with query_tokens(model, crops(), query_sees_prefix=True) as q:
            logits = model(x)
            final, intermediates = model.forward_intermediates(x, indices=[0, 1], output_fmt="NCHW")
    assert torch.equal(logits, plain_logits)  # head and pooling never see the query tokens
    assert torch.equal(final, plain[0]) and all(torch.equal(a, b) for a, b in zip(intermediates, plain[1]))
    assert len(q.outputs) == 2 and q.outputs[0].shape == (2, 3, 64)  # the latest call's two blocks
    assert torch.equal(q.query, model.norm(q.outputs[-1]))
    with torch.no_grad():  # the second call started from the query tokens again
        assert torch.equal(q.query, forward_queries(model, x, crops(), query_sees_prefix=True)["query"])
    assert "forward" not in model.blocks[0].__dict__  # the context leaves nothing behind


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_query_tokens_under_gradient_checkpointing(backend):
    model = swap_attention(build("eva02-rope-qvbias"), backend=backend)
    x, c = images(), crops()
    grads, calls = [], []
    model.blocks[0].attn.register_forward_hook(lambda *_: calls.append(1))
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        calls.clear()
        out = forward_queries(model, x, c, query_sees_self=True)
        (out["query"].square().sum() + out["patch"].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward when checkpointing
    assert model.grad_checkpointing  # restored after the context
    assert grads[0].keys() == grads[1].keys() and "blocks.0.attn.q_bias" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_query_tokens_need_a_swapped_model_and_the_right_shapes():
    model = build("vit")
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn is not swapped"):
        forward_queries(model, images(), crops())
    swap_attention(model)
    with pytest.raises(ValueError, match=r"query crops must have shape \(batch, Q, channels, 8, 8\)"):
        forward_queries(model, images(), torch.randn(2, 3, 3, 7, 7))
    with pytest.raises(ValueError, match="query tokens are for a batch of 3, the images are a batch of 2"):
        forward_queries(model, images(), crops(batch=3))
    with pytest.raises(ValueError, match="query crops have 4 channels, the patch embedding takes 3"):
        forward_queries(model, images(), torch.randn(2, 3, 4, 8, 8))
    with pytest.raises(ValueError, match="query crops are torch.float64, the patch embedding's weights torch.float32"):
        forward_queries(model, images(), crops().double())
    tokens = torch.randn(2, 4, 64)
    assert forward_queries(model, images(), tokens)["query"].shape == (2, 4, 64)


def test_average_pooled_logits_are_bit_for_bit_with_query_tokens():
    """timm's tokens are a transposed view of the patch embedding's output all the way
    through; the image tokens leave the last block in that layout again, so average
    pooling adds in the same order."""
    model = swap_attention(build("vit", class_token=False, global_pool="avg").eval(), backend="sdpa")
    x = images()
    with torch.no_grad():
        plain, plain_features = model(x), model.forward_features(x)
        with query_tokens(model, crops()):
            logits, features = model(x), model.forward_features(x)
    assert torch.equal(features, plain_features) and features.stride() == plain_features.stride()
    assert torch.equal(logits, plain)


def test_passes_limit_the_calls_that_carry_query_tokens():
    """A model called once per crop resolution (DINO's MultiCropWrapper: global crops
    first) carries the query tokens in its first call only with passes=1."""
    model = swap_attention(build("vit", dynamic_img_size=True).eval(), backend="sdpa")
    x, local = images(), torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = forward_queries(model, x, crops())["query"]
        plain_local = model.forward_features(local)
        with query_tokens(model, crops(), passes=1) as q:
            model.forward_features(x)
            assert torch.equal(model.forward_features(local), plain_local)  # a batch of 6: no query tokens
        assert torch.equal(q.query, want) and len(q.outputs) == 2
        with query_tokens(model, crops()):  # every call carries them: the batch of 6 is named
            model.forward_features(x)
            with pytest.raises(ValueError, match="a batch of 6 .* passes=1"):
                model.forward_features(local)
    for bad in (0, True, 1.0):
        with pytest.raises(ValueError, match="passes must be None"):
            with query_tokens(model, crops(), passes=bad):
                pass


def test_a_context_compiles_once_and_query_follows_the_grad_mode():
    model = swap_attention(build("vit").eval(), backend="sdpa")
    compiled = []

    def backend(graph, inputs):
        compiled.append(graph)
        return graph.forward

    for passes in (None, 1):
        compiled.clear()
        with query_tokens(model, crops(), passes=passes) as q:
            features = torch.compile(model.forward_features, fullgraph=True, backend=backend)
            for _ in range(10):
                features(images())
        # None: one graph; 1: the pass with query tokens, then two without (entered with
        # the count at 1, then at its cap), then no more.
        assert len(compiled) == (1 if passes is None else 3), passes
    with query_tokens(model, crops().requires_grad_()) as q:
        model.forward_features(images())
        with torch.no_grad():
            q.query.std()
        assert q.query.requires_grad  # read again with grad: not the no_grad result


def test_blocks_called_directly_inside_the_context():
    """Inputs that are not a dense layout (an expanded tensor) and a block called without
    the first: the image tokens come back as outside the context."""
    model = swap_attention(build("vit").eval(), backend="sdpa")
    tokens = torch.randn(1, 17, 64).expand(2, 17, 64)
    with torch.no_grad():
        plain, plain_last = model.blocks(tokens), model.blocks[-1](tokens)
        with query_tokens(model, crops()):
            assert torch.equal(model.blocks(tokens), plain)
            assert torch.equal(model.blocks[-1](tokens), plain_last)


def test_copies_and_restore_are_refused_inside_the_context():
    """Inside the context each block's forward carries the context's query tokens: a copy
    would carry them for ever, and restoring the attention would leave them unmasked."""
    import io

    model = swap_attention(build("vit").eval(), backend="sdpa")
    with query_tokens(model, crops().requires_grad_()):
        with pytest.raises(RuntimeError, match="outside the query_tokens context"):
            copy.deepcopy(model)
        with pytest.raises(RuntimeError, match="outside the query_tokens context"):
            torch.save(model, io.BytesIO())
        with pytest.raises(RuntimeError, match=r"restore_attention inside a query_tokens context \(blocks\.0"):
            restore_attention(model)
    clone = copy.deepcopy(model)  # after it, as before
    assert "forward" not in clone.blocks[0].__dict__
    with torch.no_grad():
        assert torch.equal(clone(images()), model(images()))


def test_compiles_without_graph_breaks():
    model = swap_attention(build("eva02-rope-qvbias").eval())
    x = images()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_recorded_timm_names_are_current():
    """tests/adclr_kernels/data holds timm's ViT-S/16 state-dict names and shapes, against
    which UnidirectionalAttention is checked where timm is not installed."""
    record = json.loads((pathlib.Path(__file__).parents[1] / "adclr_kernels" / "data" /
                         "timm_vit_small_patch16_224.json").read_text())
    model = timm.create_model(record["model"], pretrained=False)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == record["state_dict"]
