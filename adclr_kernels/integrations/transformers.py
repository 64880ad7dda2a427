"""Hugging Face transformers ViTs on the op, through the attention-function registry.

Importing this module registers the op as attention implementation "adclr" (in
`AttentionInterface`, with `sdpa`'s mask builder in `AttentionMaskInterface`), so any
model that picks its attention function by name can use it:

    import adclr_kernels.integrations.transformers as adclr_hf
    from transformers import AutoModel

    model = AutoModel.from_pretrained("facebook/dinov2-small", attn_implementation="adclr")
    model = adclr_hf.swap_attention(model)            # checks it; needed for query tokens
    with adclr_hf.query_tokens(model, crops) as q:    # crops: (B, Q, 3, 14, 14)
        out = model(pixel_values=images)              # unchanged by the query tokens
    q.query                                           # (B, Q, D), after the final layer norm

The registered function is safe for any model: a call it cannot run exactly (an
attention mask, attention dropout, causal attention, decoding against a key-value cache,
a position bias, soft-capping, sliding windows, attention sinks) runs transformers' own
`sdpa` function instead. Asked for attention maps (`output_attentions=True`), it returns
them as the eager implementation does, from the reference path.

`swap_attention(model)` checks the model (ViT, DINOv2, DINOv2 with registers and DINOv3
ViT models, with or without a head, and the DINO models' backbones), sets the implementation and marks the attention
modules (their class becomes a subclass of their own); query tokens need it. DINOv3
rotates q and k by position inside its attention module, from the number of patches:
the swapped module rotates the image tokens only, so query tokens carry no position.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..attention import unidirectional_attention
from ..backends import check_backend_name
from ..mask import QueryMask
from .common import (OpAttention, QueryLayout, UnsupportedModel, attention_weights, carry_queries, check_children,
                     check_queries, check_signature, embed_crops, refuse_inside_query_tokens, refuse_token_mixers,
                     subclass, swap_classes)

ATTN_IMPLEMENTATION = "adclr"
_EXACT_ONLY = ("position_bias", "softcap", "sliding_window", "s_aux")


def adclr_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                            is_causal=None, **kwargs):
    """transformers' attention-function interface: q, k, v (B, H, L, D) -> ((B, L, H, D), None)."""
    layout = getattr(module, "adclr_layout", None)
    causal = (is_causal if is_causal is not None else getattr(module, "is_causal", True)) and query.shape[2] > 1
    other = [k for k in _EXACT_ONLY if kwargs.get(k) is not None]
    cached = key.shape[2] != query.shape[2]  # decoding against a key-value cache
    if attention_mask is not None or dropout or causal or other or cached:
        if layout is not None:
            what = "an attention mask" if attention_mask is not None else "attention dropout" if dropout else \
                "causal attention" if causal else "a key-value cache" if cached else other[0]
            raise ValueError(f"{type(module).__name__}: {what} cannot be combined with query tokens")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if key.shape[1] != query.shape[1]:  # grouped-query attention
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    backend = getattr(module, "adclr_backend", "auto")
    query, key = query.to(value.dtype), key.to(value.dtype)
    if layout is None:
        out = unidirectional_attention(query, key, value, 0, 0, scale=scaling, backend=backend)
    else:
        out = unidirectional_attention(query, key, value, layout.num_queries, layout.num_prefix,
                                       scale=scaling, backend=backend, **layout.mask.options())
    weights = None
    if kwargs.get("output_attentions"):
        # The maps the eager function returns, from the reference path, only when asked; with
        # query tokens, the image tokens' rows and columns (query columns hold 0 there).
        weights = attention_weights(module, query, key, scaling if scaling is not None else query.shape[-1] ** -0.5)
        if layout is not None:
            end = query.shape[2] - layout.num_queries
            weights = weights[:, :, :end, :end]
    return out.transpose(1, 2), weights


AttentionInterface.register(ATTN_IMPLEMENTATION, adclr_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


class HFAttention(OpAttention):
    """Mixin over a transformers attention module that calls the registry: marks it."""


class Dinov3Attention(OpAttention):
    """Mixin over DINOv3ViTAttention: with query tokens, only the image tokens rotate."""

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        if self.adclr_layout is None:
            return type(self).__bases__[1].forward(self, hidden_states, attention_mask, position_embeddings, **kwargs)
        from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb

        B, L, _ = hidden_states.shape
        q, k, v = (proj(hidden_states).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        end = L - self.adclr_layout.num_queries  # prefix and patch tokens; the rotation finds the prefix
        rq, rk = apply_rotary_pos_emb(q[:, :, :end], k[:, :, :end], *position_embeddings)
        q, k = torch.cat([rq, q[:, :, end:]], 2), torch.cat([rk, k[:, :, end:]], 2)
        out, weights = adclr_attention_forward(self, q, k, v, attention_mask, scaling=self.scaling,
                                               dropout=0.0 if not self.training else self.dropout, **kwargs)
        return self.o_proj(out.reshape(B, L, -1)), weights


# base model class -> (module path, attention class, layer class, patch projection, final norm, mixin)
_MODELS = {
    "ViTModel": ("vit.modeling_vit", "ViTAttention", "ViTLayer", "embeddings.patch_embeddings.projection",
                 "layernorm", HFAttention),
    "Dinov2Model": ("dinov2.modeling_dinov2", "Dinov2Attention", "Dinov2Layer",
                    "embeddings.patch_embeddings.projection", "layernorm", HFAttention),
    "Dinov2WithRegistersModel": ("dinov2_with_registers.modeling_dinov2_with_registers",
                                 "Dinov2WithRegistersAttention", "Dinov2WithRegistersLayer",
                                 "embeddings.patch_embeddings.projection", "layernorm", HFAttention),
    "DINOv3ViTModel": ("dinov3_vit.modeling_dinov3_vit", "DINOv3ViTAttention", "DINOv3ViTLayer",
                       "embeddings.patch_embeddings", "norm", Dinov3Attention),
}
# The backbones (feature maps for DPT, Mask2Former, ...) hold the same parts as their models.
for _model in ("Dinov2", "Dinov2WithRegisters", "DINOv3ViT"):
    _MODELS[f"{_model}Backbone"] = _MODELS[f"{_model}Model"]
_CALLS = {HFAttention: ("hidden_states", "attention_mask", "kwargs"),
          Dinov3Attention: ("hidden_states", "attention_mask", "position_embeddings", "kwargs")}


def _describe(model):
    """(base model, its table entry, [(name, layer)], [(name, attention module)]), checked."""
    import importlib

    # DINOv3ViTModel's base_model is its encoder (base_model_prefix "model"), so look at the model first.
    base = model if type(model).__name__ in _MODELS else getattr(model, "base_model", model)
    name = type(base).__name__
    if name not in _MODELS:
        from transformers import PreTrainedModel

        hint = (f"; attn_implementation='{ATTN_IMPLEMENTATION}' still runs it, without query tokens"
                if isinstance(model, PreTrainedModel) else "; it takes Hugging Face transformers models")
        raise UnsupportedModel(f"{type(model).__name__} (base model {name}) is not supported by "
                               f"adclr_kernels.integrations.transformers (supported: {', '.join(_MODELS)}){hint}")
    path, attention_name, layer_name, *_ = entry = _MODELS[name]
    module = importlib.import_module(f"transformers.models.{path}")
    attention_cls, layer_cls = getattr(module, attention_name), getattr(module, layer_name)
    layers, attentions = [], []
    for sub_name, sub in model.named_modules():
        cls = type(sub)
        if isinstance(sub, layer_cls):
            if cls is not layer_cls:
                raise UnsupportedModel(f"{sub_name} ({cls.__name__}) is a subclass of {layer_name}, not it")
            layers.append((sub_name, sub))
        elif isinstance(sub, attention_cls):
            if cls is not attention_cls and not isinstance(sub, OpAttention):
                raise UnsupportedModel(f"{sub_name} ({cls.__name__}) is a subclass of {attention_name}, not it")
            if not isinstance(sub, OpAttention):
                check_signature(sub_name, sub, _CALLS[entry[-1]])
            if entry[-1] is Dinov3Attention:  # its forward is the adapter's: every part must be one it uses
                check_children(sub_name, sub, ("q_proj", "k_proj", "v_proj", "o_proj"),
                               ("q_proj", "k_proj", "v_proj", "o_proj"))
            attentions.append((sub_name, sub))
        elif "Attention" in cls.__name__ and cls.__module__.startswith("transformers"):
            raise UnsupportedModel(f"{sub_name} ({cls.__name__}) is an attention the adapter does not know")
    if len(layers) != len(attentions) or not layers:
        raise UnsupportedModel(f"{type(model).__name__}: {len(layers)} {layer_name}s but {len(attentions)} "
                               f"{attention_name}s; the adapter expects one in each")
    return base, entry, layers, attentions


def swap_attention(model, backend="auto"):
    """Check a transformers ViT / DINOv2 / DINOv3 model, and run its attention on the op.

    Sets attn_implementation "adclr" and marks every attention module (its class
    becomes a subclass of its own; state dict, parameters and hooks are unchanged).
    Outputs match the sdpa implementation's to floating-point rounding. Raises
    UnsupportedModel, before any change, for other models.
    """
    check_backend_name(backend)
    _, entry, _, attentions = _describe(model)
    plan = [(m, subclass(type(m), entry[-1], f"Unidirectional{type(m).__name__}"))
            for _, m in attentions if not isinstance(m, OpAttention)]
    swap_classes(model, plan)
    for _, m in attentions:
        m.adclr_backend = backend
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.adclr_previous_attn_implementation = model.config._attn_implementation
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def restore_attention(model, attn_implementation=None):
    """Undo swap_attention: the modules' own classes and `attn_implementation` again (None:
    the one the model had before swap_attention; "sdpa" for a model loaded as "adclr")."""
    refuse_inside_query_tokens(model, "restore_attention")
    for module in model.modules():
        if isinstance(module, OpAttention):
            module.__class__ = type(module).__bases__[1]
            module.__dict__.pop("adclr_backend", None)
    previous = model.__dict__.pop("adclr_previous_attn_implementation", None)
    model.set_attn_implementation(attn_implementation or previous or "sdpa")
    return model


@contextlib.contextmanager
def query_tokens(model, queries, *, query_sees_prefix=False, query_sees_self=False,
                 query_sees_queries=False, passes=None):
    """Carry ADCLR query tokens through a swapped transformers model's own forward.

    queries: crops (B, Q, 3, p, p) embedded by the model's patch projection (no position
        embedding, no rotation) or tokens (B, Q, hidden_size) entering the first layer.
    passes: how many calls of the model carry the query tokens (None: every call); the
        later ones run as outside the context.
    The model's outputs (hidden states and attentions it records included) are what they
    are without query tokens; the yielded object holds `query` (after the final layer
    norm) and `outputs` (every layer's). Gradient checkpointing is honoured.
    """
    base, entry, layers, attentions = _describe(model)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION or not all(
            isinstance(m, OpAttention) for _, m in attentions):
        raise RuntimeError("the model does not run on the op: call swap_attention(model) first")
    for name, layer in layers:
        refuse_token_mixers(name, layer)
    config = base.config
    if isinstance(queries, torch.Tensor) and queries.dim() == 3:
        check_queries(queries, queries.shape[0], config.hidden_size)
        tokens = queries
    else:
        projection = base.get_submodule(entry[3])
        if isinstance(queries, torch.Tensor):  # as the models' embeddings cast pixel_values
            queries = queries.to(projection.weight.dtype)
        tokens = embed_crops(projection, queries, config.patch_size)
    prefix = 1 + getattr(config, "num_register_tokens", 0)
    layout = QueryLayout(tokens.shape[1], prefix,
                         QueryMask(query_sees_prefix, query_sees_self, query_sees_queries))
    pairs = [(layer, [m for m in layer.modules() if isinstance(m, OpAttention)]) for _, layer in layers]
    checkpointing = model.training and any(layer.gradient_checkpointing for _, layer in layers)
    with carry_queries(pairs, tokens, layout, base.get_submodule(entry[4]), passes=passes,
                       checkpointing=lambda: checkpointing, checkpoint_attrs=("gradient_checkpointing",)) as state:
        yield state


__all__ = ["ATTN_IMPLEMENTATION", "UnsupportedModel", "adclr_attention_forward", "swap_attention",
           "restore_attention", "query_tokens"]
