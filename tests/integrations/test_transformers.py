"""adclr_kernels.integrations.transformers against transformers' own sdpa implementation,
on tiny models built from configs (no download): ViT, DINOv2, DINOv2 with registers,
DINOv3 ViT. The op's sdpa backend makes the same SDPA call, so outputs are bit-identical;
query tokens are checked against the same models run with the op's mask as the
attention mask (DINOv3: query tokens unrotated), to 1e-5.
"""

import copy
import tempfile

import pytest
import torch
from integration_testing import need

from adclr_kernels import visibility_mask

transformers = need("transformers")
import adclr_kernels.integrations.transformers as adclr_hf  # noqa: E402
from adclr_kernels.integrations import UnsupportedModel  # noqa: E402

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
             patch_size=8)
MODELS = {
    "vit": ("ViTConfig", "ViTForImageClassification", {}),
    "dinov2": ("Dinov2Config", "Dinov2Model", dict(layerscale_value=0.5)),
    "dinov2-registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", dict(num_register_tokens=2)),
    "dinov3": ("DINOv3ViTConfig", "DINOv3ViTModel", dict(num_register_tokens=2)),
    # Backbones: their first output is the first feature map.
    "dinov2-backbone": ("Dinov2Config", "Dinov2Backbone", dict(layerscale_value=0.5, out_features=["stage1", "stage2"])),
    "dinov2-registers-backbone": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersBackbone",
                                  dict(num_register_tokens=2, out_features=["stage2"])),
    "dinov3-backbone": ("DINOv3ViTConfig", "DINOv3ViTBackbone", dict(num_register_tokens=2, out_features=["stage1"])),
}


def build(key, **extra):
    config_name, model_name, kwargs = MODELS[key]
    config = getattr(transformers, config_name)(**SMALL, **kwargs, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)._from_config(config, attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def first(output):
    """A model's first output: its last hidden state, or a backbone's first feature map."""
    return output.feature_maps[0] if hasattr(output, "feature_maps") else output[0]


def images(batch=2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("key", MODELS)
def test_swap_is_the_sdpa_implementation_on_the_op(key):
    reference = build(key)
    model = adclr_hf.swap_attention(copy.deepcopy(reference), backend="sdpa")
    assert model.config._attn_implementation == "adclr"
    assert list(model.state_dict()) == list(reference.state_dict())
    x = images()
    with torch.no_grad():
        got, want = model(pixel_values=x, output_hidden_states=True), reference(pixel_values=x, output_hidden_states=True)
    assert torch.equal(first(got), first(want))
    assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, want.hidden_states))
    model.train(), reference.train()
    for m in (model, reference):
        torch.manual_seed(3)  # DINOv3 may jitter its rotations in training
        first(m(pixel_values=x)).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name
    adclr_hf.restore_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_restore_gives_back_the_implementation_the_model_had_and_swapped_modules_pickle():
    import io

    model = build("vit")
    model.set_attn_implementation("eager")
    adclr_hf.swap_attention(model, backend="sdpa")
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the made subclasses are found again on load
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x)[0], model(pixel_values=x)[0])
    for m in (model, loaded):
        adclr_hf.restore_attention(m)
        assert m.config._attn_implementation == "eager"


def test_from_pretrained_with_the_registered_name():
    with tempfile.TemporaryDirectory() as folder:
        build("dinov2").save_pretrained(folder)
        model = transformers.AutoModel.from_pretrained(folder, attn_implementation="adclr")
        reference = transformers.AutoModel.from_pretrained(folder, attn_implementation="sdpa")
    assert model.config._attn_implementation == "adclr"
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=images())[0], reference(pixel_values=images())[0], rtol=0, atol=0)


def test_triton_backend():
    reference = build("dinov3")
    model = adclr_hf.swap_attention(copy.deepcopy(reference), backend="triton")
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=images())[0], reference(pixel_values=images())[0],
                                   rtol=2e-5, atol=2e-5)


def test_what_the_op_cannot_run_falls_back_to_sdpa():
    model = adclr_hf.swap_attention(build("vit"))
    q = k = v = torch.randn(1, 2, 5, 8)
    mask = torch.zeros(1, 1, 5, 5)
    mask[..., -1] = float("-inf")
    attn = model.base_model.layers[0].attention
    out, _ = adclr_hf.adclr_attention_forward(attn, q, k, v, mask)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(out, want)


def reference_queries(model, key, x, tokens, opts):
    """transformers' own layers on [prefix | patches | queries] with the op's mask."""
    base = model if key.startswith("dinov3") else model.base_model
    h = torch.cat([base.embeddings(x), tokens], 1)
    L, Q = h.shape[1], tokens.shape[1]
    P = 1 + getattr(model.config, "num_register_tokens", 0)
    mask = torch.zeros(L, L).masked_fill(~visibility_mask(L, L, Q, P, **opts), float("-inf"))[None, None]
    kwargs = {}
    if key.startswith("dinov3"):  # an identity rotation for the query tokens
        cos, sin = base.rope_embeddings(x)
        kwargs["position_embeddings"] = (cos, sin)
        layers = base.model.layer
    else:
        layers = base.layers if key == "vit" else base.encoder.layer
    for layer in layers:
        if key.startswith("dinov3"):
            h = _dinov3_layer(layer, h, mask, cos, sin, Q)
        else:
            h = layer(h, mask)
    norm = base.norm if key.startswith("dinov3") else base.layernorm
    return norm(h)


def _dinov3_layer(layer, h, mask, cos, sin, Q):
    """DINOv3ViTLayer with its rotation on [prefix | patches] only: transformers infers the
    prefix from the number of patches, so query tokens are run unrotated by hand here."""
    from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb

    a = layer.attention
    y = layer.norm1(h)
    B, L, _ = y.shape
    q, k, v = (p(y).view(B, L, a.num_heads, a.head_dim).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
    rq, rk = apply_rotary_pos_emb(q[:, :, :L - Q], k[:, :, :L - Q], cos, sin)
    q, k = torch.cat([rq, q[:, :, L - Q:]], 2), torch.cat([rk, k[:, :, L - Q:]], 2)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a.scaling)
    h = h + layer.layer_scale1(a.o_proj(o.transpose(1, 2).reshape(B, L, -1)))
    return h + layer.layer_scale2(layer.mlp(layer.norm2(h)))


@pytest.mark.parametrize("opts", [{}, dict(query_sees_prefix=True, query_sees_queries=True)], ids=["none", "prefix+queries"])
@pytest.mark.parametrize("key", MODELS)
def test_query_tokens(key, opts):
    reference = build(key)
    model = adclr_hf.swap_attention(copy.deepcopy(reference), backend="sdpa")
    x, crops = images(), torch.randn(2, 3, 3, 8, 8)
    with torch.no_grad():
        with adclr_hf.query_tokens(model, crops, **opts) as q:
            out = first(model(pixel_values=x))
        want_plain = first(reference(pixel_values=x))
        projection = (reference.embeddings.patch_embeddings if key.startswith("dinov3")
                      else reference.base_model.embeddings.patch_embeddings.projection)
        tokens = projection(crops.flatten(0, 1)).flatten(1).view(2, 3, -1)
        want = reference_queries(reference, key, x, tokens, opts)
    assert torch.equal(out, want_plain)
    torch.testing.assert_close(q.query, want[:, -3:], rtol=1e-5, atol=1e-5)


def test_query_tokens_under_gradient_checkpointing():
    model = adclr_hf.swap_attention(build("dinov2")).train()
    crops = torch.randn(2, 3, 3, 8, 8)
    grads, calls = [], []
    model.encoder.layer[0].attention.register_forward_hook(lambda *_: calls.append(1))
    for checkpointing in (False, True):
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model.zero_grad()
        calls.clear()
        with adclr_hf.query_tokens(model, crops, query_sees_self=True) as q:
            out = model(pixel_values=images())[0]
        (q.query.square().sum() + out.sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward when checkpointing
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_decoder_decodes_against_its_key_value_cache():
    """A decoding step has one query row and the cached keys: sdpa's function runs it."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    models = {}
    for implementation in ("sdpa", ATTN := adclr_hf.ATTN_IMPLEMENTATION):
        torch.manual_seed(0)
        models[implementation] = transformers.LlamaForCausalLM._from_config(
            config, attn_implementation=implementation).eval()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    logits = {}
    with torch.no_grad():
        for name, model in models.items():
            prefill = model(ids, use_cache=True)
            step = model(prefill.logits[:, -1:].argmax(-1), cache=prefill.cache, use_cache=True)
            logits[name] = torch.cat([prefill.logits, step.logits], 1)
    assert torch.equal(logits["sdpa"], logits[ATTN])


@pytest.mark.parametrize("key", ["vit", "dinov3"])
def test_attention_maps_are_returned_when_asked(key):
    """A model loaded with the eager implementation returns its maps; swapped, the maps
    come from the reference path (only when asked), and inside query_tokens they are the
    image tokens' rows and columns, as without query tokens."""
    eager = build(key)
    eager.set_attn_implementation("eager")
    model = adclr_hf.swap_attention(copy.deepcopy(eager))
    with torch.no_grad():
        want = eager(pixel_values=images(), output_attentions=True).attentions
        got = model(pixel_values=images(), output_attentions=True).attentions
        with adclr_hf.query_tokens(model, torch.randn(2, 3, 64), query_sees_prefix=True):
            inside = model(pixel_values=images(), output_attentions=True).attentions
        loaded = copy.deepcopy(eager)  # loaded as "adclr", never swapped
        loaded.set_attn_implementation(adclr_hf.ATTN_IMPLEMENTATION)
        unswapped = loaded(pixel_values=images(), output_attentions=True).attentions
    assert len(got) == len(want) == len(inside) == len(unswapped) == 2
    for a, b, c, d in zip(want, got, inside, unswapped):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d, a, rtol=1e-5, atol=1e-6)


def test_query_crops_are_cast_as_the_models_embeddings_cast_images():
    model = adclr_hf.swap_attention(build("dinov2").to(torch.bfloat16))
    with torch.no_grad():
        plain = model(pixel_values=images())[0]  # fp32 images into a bf16 model
        with adclr_hf.query_tokens(model, torch.randn(2, 3, 3, 8, 8)) as q:
            assert torch.equal(model(pixel_values=images())[0], plain)
    assert q.query.dtype == torch.bfloat16 and q.query.shape == (2, 3, 64)


def test_refusals():
    model = transformers.BeitModel(transformers.BeitConfig(**SMALL))
    with pytest.raises(UnsupportedModel, match="BeitModel .* is not supported"):
        adclr_hf.swap_attention(model)
    with pytest.raises(UnsupportedModel, match="it takes Hugging Face transformers models"):
        adclr_hf.swap_attention(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(RuntimeError, match="restore_attention inside a query_tokens context"):
        swapped = adclr_hf.swap_attention(build("vit"))
        with adclr_hf.query_tokens(swapped, torch.randn(2, 3, 64)):
            adclr_hf.restore_attention(swapped)
    with pytest.raises(RuntimeError, match="call swap_attention"):
        with adclr_hf.query_tokens(build("vit"), torch.randn(2, 3, 64)):
            pass
