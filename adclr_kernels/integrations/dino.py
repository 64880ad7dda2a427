"""DINO's ViT (facebookresearch/dino, `vision_transformer.py`) on the op.

    from vision_transformer import vit_small              # DINO's own file, in your codebase
    from adclr_kernels.integrations.dino import swap_attention, query_tokens, cls_attention

    model = swap_attention(vit_small(patch_size=16))
    cls = model(images)                                    # DINO's forward, on the op
    maps = model.get_last_selfattention(images)            # still there (reference path)
    cls_maps = cls_attention(model, images)                # its CLS row, from the op itself
    with query_tokens(model, crops) as q:                  # crops: (B, Q, 3, 16, 16)
        cls = model(images)                                # unchanged by the query tokens
    q.query                                                # (B, Q, D), after model.norm

DINO's code is not a package, so the model is recognised by its structure, exactly:
the classes `VisionTransformer`, `Block` and `Attention` with DINO's forward signatures,
submodules and parameters (anything else is refused, naming the part). Two things
differ from timm's ViT and are handled here: DINO's `Attention.forward` returns
`(x, attn)`, and `Block.forward(x, return_attention=True)` returns the attention
probabilities (`get_last_selfattention`). Both classes are swapped (in place, as
subclasses of DINO's own): blocks keep DINO's residuals and its `drop_path`, attention
computes `qk_scale` as DINO does, and the probabilities are computed by the reference
path only when asked; a swapped `Attention` called directly returns `(x, None)` unless
called with `return_attention=True`. The (L, L) maps of every row need that reference
path; the CLS row alone, what DINO's attention pictures show, is an output of the fused
op (`cls_attention`): exact, and no map is formed.
"""

from __future__ import annotations

import contextlib

import torch

from ..backends import check_backend_name
from ..mask import QueryMask
from .common import (OpAttention, QueryLayout, UnsupportedModel, attend_packed, attention_weights,
                     carry_queries, check_children, check_no_attention_dropout, check_queries,
                     check_signature, embed_crops, refuse_inside_query_tokens, refuse_token_mixers, subclass,
                     swap_classes)


class DinoAttention(OpAttention):
    """Mixin over DINO's Attention."""

    def forward(self, x, return_attention=False):
        B, N, C = x.shape
        qkv_shape = (B, N, 3, self.num_heads, C // self.num_heads)
        if return_attention == "cls":  # `cls_attention`: the op's own CLS row
            out, attn = attend_packed(self, self.qkv(x).view(qkv_shape), self.scale, cls_probs=True)
            return self.proj_drop(self.proj(out.reshape(B, N, C))), attn
        if return_attention and self.adclr_layout is None:
            return _original(self).forward(self, x)  # DINO's own code: exact maps and output
        qkv = self.qkv(x).view(qkv_shape)
        if return_attention:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            attn = attention_weights(self, q, k, self.scale)
            out = (attn @ v).transpose(1, 2)
        else:
            out, attn = attend_packed(self, qkv, self.scale), None
        return self.proj_drop(self.proj(out.reshape(B, N, C))), attn


class DinoBlock:
    """Mixin over DINO's Block: its forward, passing return_attention to the attention."""

    def forward(self, x, return_attention=False):
        y, attn = self.attn(self.norm1(x), return_attention=return_attention)
        if return_attention:
            return attn
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _original(module):
    return type(module).__bases__[1]


def _plan(model):
    cls = type(model)
    if isinstance(model, OpAttention):
        raise UnsupportedModel("pass the VisionTransformer, not an attention module")
    if cls.__name__ != "VisionTransformer" or not all(
            callable(getattr(model, m, None)) for m in ("prepare_tokens", "get_last_selfattention",
                                                        "get_intermediate_layers")):
        raise UnsupportedModel(f"{cls.__module__}.{cls.__name__} is not DINO's VisionTransformer (a class "
                               "named VisionTransformer with prepare_tokens, get_last_selfattention and "
                               "get_intermediate_layers)")
    check_signature("model", model, ("x",))
    check_children("model", model, ("patch_embed", "pos_drop", "blocks", "norm", "head", "cls_token", "pos_embed"),
                   ("patch_embed", "blocks", "norm", "cls_token", "pos_embed"))
    plan = []
    for i, block in enumerate(model.blocks):
        name = f"blocks.{i}"
        if isinstance(block, DinoBlock):
            continue
        if type(block).__name__ != "Block":
            raise UnsupportedModel(f"{name} ({type(block).__name__}) is not DINO's Block")
        check_signature(name, block, ("x", "return_attention"))
        check_children(name, block, ("norm1", "attn", "drop_path", "norm2", "mlp"),
                       ("norm1", "attn", "drop_path", "norm2", "mlp"))
        attn = block.attn
        if type(attn).__name__ != "Attention":
            raise UnsupportedModel(f"{name}.attn ({type(attn).__name__}) is not DINO's Attention")
        check_signature(f"{name}.attn", attn, ("x",))
        check_children(f"{name}.attn", attn, ("qkv", "attn_drop", "proj", "proj_drop"),
                       ("qkv", "attn_drop", "proj", "proj_drop"))
        check_no_attention_dropout(f"{name}.attn", attn, attn.attn_drop.p)
        if attn.qkv.out_features != 3 * attn.qkv.in_features or attn.qkv.in_features % attn.num_heads:
            raise UnsupportedModel(f"{name}.attn: qkv maps {attn.qkv.in_features} to {attn.qkv.out_features} "
                                   f"features with {attn.num_heads} heads, not DINO's layout")
        plan.append((attn, subclass(type(attn), DinoAttention, "UnidirectionalDinoAttention")))
        plan.append((block, subclass(type(block), DinoBlock, "UnidirectionalDinoBlock")))
    return plan


def swap_attention(model, backend="auto"):
    """Run a DINO VisionTransformer's attention on the op, in place; returns the model.

    forward, get_intermediate_layers and get_last_selfattention return what DINO's
    do (to floating-point rounding), state dict, parameters and hooks are unchanged.
    Raises UnsupportedModel before any change for anything that is not DINO's structure,
    or uses attention dropout.
    """
    check_backend_name(backend)
    swap_classes(model, _plan(model))
    for block in model.blocks:
        block.attn.adclr_backend = backend
    return model


def restore_attention(model):
    """Undo swap_attention: DINO's own classes again."""
    refuse_inside_query_tokens(model, "restore_attention")
    for module in model.modules():
        if isinstance(module, (OpAttention, DinoBlock)):
            module.__class__ = _original(module)
            module.__dict__.pop("adclr_backend", None)
    return model


def cls_attention(model, x):
    """The CLS row of `model.get_last_selfattention(x)`, (B, heads, 1, L), from the fused
    op: its prefix-row probabilities, normalised by the forward's own logsumexp (exact;
    no (L, L) maps are formed). Inside `query_tokens`, L counts the query tokens, whose
    columns are 0."""
    for i, block in enumerate(model.blocks):
        if not isinstance(block, DinoBlock):
            raise RuntimeError(f"blocks.{i} is not swapped: call swap_attention(model) first")
    x = model.prepare_tokens(x)
    for block in model.blocks[:-1]:
        x = block(x)
    return model.blocks[-1](x, return_attention="cls")


@contextlib.contextmanager
def query_tokens(model, queries, *, query_sees_prefix=False, query_sees_self=False,
                 query_sees_queries=False, passes=None):
    """Carry ADCLR query tokens through a swapped DINO ViT's own methods.

    queries: crops (B, Q, 3, p, p) embedded by the model's patch embedding (no
        positional embedding), or tokens (B, Q, D) entering the first block as given.
    Inside, `model(x)` and `get_intermediate_layers` return what they return without
    query tokens; `get_last_selfattention` returns the maps of all rows and columns,
    query tokens last, under the op's mask. The yielded object holds `query` (after
    model.norm) and `outputs` (every block's).
    passes: how many calls of the model carry the query tokens (None: every call). DINO's
        MultiCropWrapper calls the backbone once per crop resolution, global crops
        first: passes=1 gives the query tokens to the global crops only.
    """
    pairs = []
    for i, block in enumerate(model.blocks):
        if not isinstance(block, DinoBlock):
            raise RuntimeError(f"blocks.{i} is not swapped: call swap_attention(model) first")
        refuse_token_mixers(f"blocks.{i}", block)
        pairs.append((block, [block.attn]))
    if isinstance(queries, torch.Tensor) and queries.dim() == 3:
        check_queries(queries, queries.shape[0], model.embed_dim)
        tokens = queries
    else:
        tokens = embed_crops(model.patch_embed.proj, queries, model.patch_embed.patch_size)
    layout = QueryLayout(tokens.shape[1], 1, QueryMask(query_sees_prefix, query_sees_self,
                                                       query_sees_queries))
    passthrough = lambda args, kwargs: bool(kwargs.get("return_attention", args[0] if args else False))  # noqa: E731
    with carry_queries(pairs, tokens, layout, model.norm, passes=passes, passthrough=passthrough) as state:
        yield state


__all__ = ["UnsupportedModel", "swap_attention", "restore_attention", "query_tokens", "cls_attention"]
