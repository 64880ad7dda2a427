"""timm ViTs on the op: `swap_attention`, `query_tokens`, `forward_queries`.

    import timm
    from adclr_kernels.integrations.timm import swap_attention, forward_queries

    model = swap_attention(timm.create_model("vit_small_patch16_224", pretrained=True))
    logits = model(images)                       # what timm's model returns, on the op
    out = forward_queries(model, images, crops)  # crops: (B, Q, 3, 16, 16)
    out["cls"], out["prefix"], out["patch"], out["query"]

Supported, with outputs and gradients matching timm's (tests/integrations/test_timm.py):
`VisionTransformer` (ViT, DeiT, DeiT-3, CLIP, SigLIP, register and no-class-token
models, qk-norm, scale-norm, gated attention, post-norm `ResPostBlock`, parallel
`ParallelThingsBlock`), `VisionTransformerDistilled` (DeiT distilled) and `Eva` (EVA,
EVA-02, the RoPE ViTs and timm's DINOv3: separate q/v biases, fused or separate q/k/v
projections, grouped-query attention, RoPE rotated outside the kernel on the image
tokens only: query tokens carry no position, as in ADCLR). Everything else is refused
before any change, naming the block and the reason: differential attention,
`ParallelScalingBlock`, attention dropout, Swin, NaFlexViT, BEiT and the relative-position
ViTs, and any model or block class not listed here.

A call with `attn_mask` or `is_causal` (which the op does not take) runs timm's own
computation, so the swapped model stays exact wherever timm passes them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import Attention, AttentionRope, DiffAttention, PatchEmbed, apply_rot_embed_cat
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from timm.models.vision_transformer import (Block, DiffParallelScalingBlock, ParallelScalingBlock,
                                            ParallelThingsBlock, ResPostBlock, VisionTransformer)

from ..backends import check_backend_name
from ..mask import QueryMask
from ..nn import UnidirectionalAttention
from .common import (OpAttention, QueryLayout, UnsupportedModel, attend, attend_packed, carry_queries,
                     check_children, check_no_attention_dropout, check_queries, check_signature, embed_crops,
                     refuse_inside_query_tokens,
                     refuse_token_mixers, swap_classes)

_PLAIN_CALL = ("x", "attn_mask", "is_causal")
_ROPE_CALL = ("x", "rope", "attn_mask", "is_causal")

# model class -> block classes it may hold; block class -> (its forward, its children)
_MODELS = {
    VisionTransformer: (Block, ResPostBlock, ParallelThingsBlock),
    VisionTransformerDistilled: (Block, ResPostBlock, ParallelThingsBlock),
    Eva: (EvaBlock, EvaBlockPostNorm),
}
_BLOCKS = {
    Block: (_PLAIN_CALL, ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")),
    ResPostBlock: (_PLAIN_CALL, ("attn", "norm1", "drop_path1", "mlp", "norm2", "drop_path2")),
    ParallelThingsBlock: (_PLAIN_CALL, ("attns", "ffns")),
    EvaBlock: (_ROPE_CALL, ("norm1", "attn", "gamma_1", "drop_path1", "norm2", "mlp", "gamma_2",
                            "drop_path2")),
    EvaBlockPostNorm: (_ROPE_CALL, ("attn", "norm1", "drop_path1", "mlp", "norm2", "drop_path2")),
}
_REFUSED_BLOCKS = {
    ParallelScalingBlock: "it computes attention inline from one projection shared with the MLP; "
                          "there is no attention module to swap",
    DiffParallelScalingBlock: "differential attention computed inline (two softmax maps)",
}
_REFUSED_MODELS = {  # by name: no need to import every timm model family to say why
    "SwinTransformer": "windowed attention with a relative position bias",
    "SwinTransformerV2": "windowed cosine attention with a continuous relative position bias",
    "SwinTransformerV2Cr": "windowed cosine attention with a continuous relative position bias",
    "NaFlexVit": "it packs variable-size images with padding masks, which the op does not take",
    "Beit": "a relative position bias is added to the attention scores",
    "VisionTransformerRelPos": "a relative position bias is added to the attention scores",
    "VisionTransformerSAM": "windowed attention with relative positions",
}


class TimmAttention(OpAttention, Attention):
    """timm's `Attention` on the op (qk-norm, scale-norm and gate included)."""

    def forward(self, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            _exact_fallback(self)
            return Attention.forward(self, x, attn_mask, is_causal)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        if isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity):
            out = attend_packed(self, qkv, _scale(self))
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out = attend(self, self.q_norm(q), self.k_norm(k), v, _scale(self))
        return _project(self, out.reshape(B, N, -1), gate)


class TimmAttentionRope(OpAttention, AttentionRope):
    """timm's `AttentionRope` on the op: RoPE on the image tokens, outside the kernel."""

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            _exact_fallback(self)
            return AttentionRope.forward(self, x, rope, attn_mask, is_causal)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
            return _attend_rope(self, x, qkv, None, rope, gate)
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return _attend_rope(self, x, None, (q, k, v), rope, gate)


class TimmEvaAttention(OpAttention, EvaAttention):
    """timm's `EvaAttention` on the op: separate q/v biases (no k bias), fused or separate
    projections, RoPE on the image tokens, outside the kernel."""

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            _exact_fallback(self)
            return EvaAttention.forward(self, x, rope, attn_mask, is_causal)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            if self.q_bias is None:
                qkv = self.qkv(x)
            else:
                bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
                if self.qkv_bias_separate:
                    qkv = self.qkv(x)
                    qkv += bias
                else:
                    qkv = F.linear(x, weight=self.qkv.weight, bias=bias)
            return _attend_rope(self, x, qkv.view(B, N, 3, self.num_heads, -1), None, rope, gate)
        q = self.q_proj(x).view(B, N, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.num_heads, -1).transpose(1, 2)
        return _attend_rope(self, x, None, (q, k, v), rope, gate)


_SWAPS = {Attention: TimmAttention, AttentionRope: TimmAttentionRope, EvaAttention: TimmEvaAttention}
_ATTENTION_CHILDREN = {
    Attention: ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"),
    AttentionRope: ("qkv", "q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "attn_drop", "norm", "gate",
                    "proj", "proj_drop"),
    EvaAttention: ("qkv", "q_proj", "k_proj", "v_proj", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm",
                   "attn_drop", "norm", "gate", "proj", "proj_drop"),
}
_ATTENTION_CALLS = {Attention: _PLAIN_CALL, AttentionRope: _ROPE_CALL, EvaAttention: _ROPE_CALL}


def _scale(module):
    # timm's fused path lets SDPA use its default scale; its unfused path uses module.scale.
    return None if module.fused_attn else module.scale


def _exact_fallback(module):
    if module.adclr_layout is not None:
        raise ValueError(f"{type(module).__name__}: attn_mask / is_causal cannot be combined with "
                         "query tokens (the op builds its own mask)")


def _project(module, x, gate):
    x = module.norm(x)
    if gate is not None:
        x = x * gate
    return module.proj_drop(module.proj(x))


def _rotate(module, t, rope, like):
    """timm's rotation of the image tokens [P, L - Q); prefix and query tokens unrotated."""
    end = t.shape[2] - (module.adclr_layout.num_queries if module.adclr_layout is not None else 0)
    npt = module.num_prefix_tokens
    parts = [t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:end], rope, half=getattr(module, "rotate_half", False))]
    if end < t.shape[2]:
        parts.append(t[:, :, end:])
    return torch.cat(parts, dim=2).type_as(like)


def _attend_rope(module, x, qkv, qkv_split, rope, gate):
    B, N, _ = x.shape
    plain_norms = isinstance(module.q_norm, nn.Identity) and isinstance(module.k_norm, nn.Identity)
    if qkv is not None and rope is None and plain_norms:
        out = attend_packed(module, qkv, _scale(module))
    else:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0) if qkv is not None else qkv_split
        q, k = module.q_norm(q), module.k_norm(k)
        if rope is not None:
            q, k = _rotate(module, q, rope, v), _rotate(module, k, rope, v)
        groups = getattr(module, "num_kv_groups", 1)
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = attend(module, q, k, v, _scale(module))
    return _project(module, out.reshape(B, N, -1), gate)


# -------------------------------------------------------------------------- swap_attention

def _blocks(model):
    """[(name, block)] of a supported model, checked; raises UnsupportedModel otherwise."""
    cls = type(model)
    if cls not in _MODELS:
        reason = _REFUSED_MODELS.get(cls.__name__, "its class is none the adapter knows")
        known = ", ".join(c.__name__ for c in _MODELS)
        hint = ""
        if cls.__name__ == "VisionTransformer" and hasattr(model, "get_last_selfattention"):
            hint = "; for DINO's VisionTransformer use adclr_kernels.integrations.dino"
        elif cls.__name__ == "DinoVisionTransformer":
            hint = "; for DINOv2's model use adclr_kernels.integrations.dinov2"
        raise UnsupportedModel(f"{cls.__module__}.{cls.__name__} is not supported by "
                               f"adclr_kernels.integrations.timm: {reason} (supported: {known}){hint}")
    allowed = _MODELS[cls]
    blocks = []
    for i, block in enumerate(model.blocks):
        name, bcls = f"blocks.{i}", type(block)
        if bcls in _REFUSED_BLOCKS:
            raise UnsupportedModel(f"{name} ({bcls.__name__}): {_REFUSED_BLOCKS[bcls]}")
        if bcls not in allowed:
            raise UnsupportedModel(f"{name} ({bcls.__module__}.{bcls.__name__}) is not a block class the "
                                   f"adapter knows in a {cls.__name__} (known: "
                                   f"{', '.join(b.__name__ for b in allowed)})")
        call, children = _BLOCKS[bcls]
        check_signature(name, block, call)
        check_children(name, block, children)
        blocks.append((name, block))
    return blocks


def _attention_modules(name, block):
    """[(name, attention module)] inside a checked block."""
    if isinstance(block, ParallelThingsBlock):
        found = []
        for j, branch in enumerate(block.attns):
            check_children(f"{name}.attns.{j}", branch, ("norm", "attn", "ls", "drop_path"), ("attn",))
            found.append((f"{name}.attns.{j}.attn", branch.attn))
        return found
    return [(f"{name}.attn", block.attn)]


def _check_attention(name, attn):
    cls = type(attn)
    if isinstance(attn, OpAttention):
        return None  # already swapped
    if isinstance(attn, DiffAttention):
        raise UnsupportedModel(f"{name} ({cls.__name__}): differential attention (the difference of two "
                               "softmax maps) is not what the op computes")
    if issubclass(cls, UnidirectionalAttention):
        raise UnsupportedModel(f"{name} is adclr_kernels.nn.UnidirectionalAttention, which runs the op "
                               "already and takes query tokens as its own num_queries argument; the "
                               "adapter's query_tokens and forward_queries are for models built with "
                               "timm's attention (build it without attn_layer, then swap_attention)")
    if cls not in _SWAPS:
        raise UnsupportedModel(f"{name} ({cls.__module__}.{cls.__name__}) is not an attention class the "
                               f"adapter knows (known: {', '.join(c.__name__ for c in _SWAPS)})")
    check_signature(name, attn, _ATTENTION_CALLS[cls])
    check_children(name, attn, _ATTENTION_CHILDREN[cls])
    check_no_attention_dropout(name, attn, attn.attn_drop.p)
    return _SWAPS[cls]


def _plan(model):
    plan = []
    for name, block in _blocks(model):
        for attn_name, attn in _attention_modules(name, block):
            new = _check_attention(attn_name, attn)
            if new is not None:
                plan.append((attn, new))
    return plan


def swap_attention(model, backend="auto"):
    """Run every attention module of a timm ViT on the op, in place; returns the model.

    Nothing else changes: the model's methods, outputs (to floating-point rounding;
    bit-identical with backend "sdpa" on CPU for plain ViTs), state dict, parameters,
    hooks, classifier head and pooling are timm's. Raises UnsupportedModel, before any
    change, for anything it cannot run exactly (see the module docstring).

    backend: the op's backend ("auto": Triton on CUDA, sdpa elsewhere).
    """
    check_backend_name(backend)
    plan = _plan(model)
    swap_classes(model, plan)
    for module in model.modules():
        if isinstance(module, OpAttention):
            module.adclr_backend = backend
    return model


def restore_attention(model):
    """Undo `swap_attention`: every swapped module gets its timm class back."""
    refuse_inside_query_tokens(model, "restore_attention")
    for module in model.modules():
        if isinstance(module, OpAttention):
            module.__class__ = type(module).__bases__[1]
            module.__dict__.pop("adclr_backend", None)
    return model


# ---------------------------------------------------------------------------- query tokens

def _query_input(model, queries):
    dim = model.embed_dim
    if isinstance(queries, torch.Tensor) and queries.dim() == 3:
        check_queries(queries, queries.shape[0], dim)
        return queries
    if not isinstance(model.patch_embed, PatchEmbed):
        raise UnsupportedModel(f"query crops need timm's PatchEmbed to embed them, the model has "
                               f"{type(model.patch_embed).__name__}; pass embedded tokens (batch, Q, {dim})")
    embed = model.patch_embed
    tokens = embed.norm(embed_crops(embed.proj, queries, embed.patch_size))
    return model.norm_pre(tokens)


@contextlib.contextmanager
def query_tokens(model, queries, *, query_sees_prefix=False, query_sees_self=False,
                 query_sees_queries=False, passes=None):
    """Carry ADCLR query tokens through a swapped timm ViT's own methods.

        with query_tokens(model, crops) as q:
            features = model.forward_features(images)      # exactly as without queries
            # or model(images), model.forward_intermediates(images, ...)
        q.query        # (B, Q, D): the query tokens after the last block and model.norm
        q.outputs      # their output of every block that ran

    queries: query crops (B, Q, C, p, p), one patch each, embedded by the model's patch
        embedding (its convolution and norm, then `norm_pre`; no positional embedding),
        or tokens (B, Q, D) that enter the first block as given.
    query_sees_*: the op's options (what query tokens attend to besides the patches).
    passes: how many calls of the model carry the query tokens (None: every call); the
        later ones run as outside the context.

    Under `set_grad_checkpointing()` each block is checkpointed here, with the layout
    bound to its recomputation.
    """
    blocks = _blocks(model)
    pairs = []
    for name, block in blocks:
        attention = [m for _, m in _attention_modules(name, block)]
        unswapped = [(n, m) for n, m in _attention_modules(name, block) if not isinstance(m, OpAttention)]
        if unswapped:
            _check_attention(*unswapped[0])  # one swap_attention would refuse: its reason
            raise RuntimeError(f"{unswapped[0][0]} is not swapped: call swap_attention(model) first")
        refuse_token_mixers(name, block)
        for m in attention:
            if hasattr(m, "num_prefix_tokens") and m.num_prefix_tokens != model.num_prefix_tokens:
                raise UnsupportedModel(f"{name}: its attention rotates from token {m.num_prefix_tokens}, "
                                       f"the model has {model.num_prefix_tokens} prefix tokens")
        pairs.append((block, attention))
    tokens = _query_input(model, queries)
    layout = QueryLayout(tokens.shape[1], model.num_prefix_tokens,
                         QueryMask(query_sees_prefix, query_sees_self, query_sees_queries))
    with carry_queries(pairs, tokens, layout, model.norm, passes=passes,
                       checkpointing=lambda: model.grad_checkpointing,
                       pause_checkpointing=[(model, "grad_checkpointing")]) as state:
        yield state


def forward_queries(model, images, queries, **options):
    """`model.forward_features(images)` with query tokens, split by kind.

    Returns a dict: "cls" (B, D) or None without a class token; "prefix" (B, P, D): class,
    register and distillation tokens; "patch" (B, N, D); "query" (B, Q, D). All after the
    model's final norm, as forward_features returns them; "cls", "prefix" and "patch" are
    exactly what forward_features gives without query tokens. Options as in query_tokens.
    """
    with query_tokens(model, queries, **options) as q:
        features = model.forward_features(images)
    P = model.num_prefix_tokens
    has_cls = getattr(model, "cls_token", None) is not None
    return {"cls": features[:, 0] if has_cls else None, "prefix": features[:, :P],
            "patch": features[:, P:], "query": q.query}


__all__ = ["UnsupportedModel", "swap_attention", "restore_attention", "query_tokens", "forward_queries"]
