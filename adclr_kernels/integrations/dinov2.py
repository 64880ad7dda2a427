"""DINOv2's ViT (facebookresearch/dinov2, `DinoVisionTransformer`) on the op.

    from dinov2.models.vision_transformer import vit_small
    from adclr_kernels.integrations.dinov2 import swap_attention, query_tokens

    model = swap_attention(vit_small(patch_size=14, block_chunks=0))
    out = model.forward_features(images)           # DINOv2's dict, on the op
    outs = model.forward_features([globals_, locals_], [None, None])   # packed crops: varlen op
    with query_tokens(model, crops) as q:          # crops: (B, Q, 3, 14, 14)
        out = model.forward_features(images)       # unchanged by the query tokens
    q.query                                        # (B, Q, D), after model.norm

What DINOv2 does that a plain swap would break, and what this adapter does about it:

- `MemEffAttention.forward(x, attn_bias)`: DINOv2 packs the crops of a list input into
  one sequence with an xformers `BlockDiagonalMask`. The swapped attention takes that
  mask (its offsets become a `VarlenLayout`, kept on the mask, which DINOv2 caches) or a
  `VarlenLayout`, and runs the varlen op: no attention across crops, no padding.
- `NestedTensorBlock` needs xformers for list inputs; the swapped block packs the list
  itself (no xformers needed) and keeps DINOv2's per-crop-group sample-dropping
  stochastic depth in training (`torch.randperm` per group, residuals scaled by the
  LayerScale gamma, added back with `index_add`), so the packed path runs anywhere.
- `NestedTensorBlock` asserts `isinstance(self.attn, MemEffAttention)`: the swapped
  class is a subclass of DINOv2's own, so the assertion holds.
- `block_chunks`: the blocks inside every `BlockChunk` are swapped (the `Identity`
  padding is left alone).

The model is recognised by its structure (class names, forward signatures, every
submodule and parameter), in both the first release (Attention with a dropout module,
`forward(x)`) and the current one (`forward(x, is_causal)`); anything else is refused
before any change, naming the part.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from ..backends import check_backend_name
from ..mask import QueryMask
from ..varlen import VarlenLayout
from .common import (OpAttention, QueryLayout, UnsupportedModel, attend_packed, attend_varlen, carry_queries,
                     check_children, check_no_attention_dropout, check_queries, check_signature, embed_crops,
                     forward_parameters, refuse_inside_query_tokens, refuse_token_mixers, subclass, swap_classes)

_BLOCK_CHILDREN = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def _original(module):
    return type(module).__bases__[1]


class Dinov2Attention(OpAttention):
    """Mixin over DINOv2's MemEffAttention: forward(x, attn_bias=None)."""

    def forward(self, x, attn_bias=None):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)
        if attn_bias is None:
            out = attend_packed(self, qkv, self.scale)
        else:
            out = attend_varlen(self, qkv.view(B * N, 3, self.num_heads, -1), _varlen(attn_bias, x), self.scale)
        return self.proj_drop(self.proj(out.reshape(B, N, C)))


class Dinov2PlainAttention(OpAttention):
    """Mixin over DINOv2's Attention: forward(x) (first release) or forward(x, is_causal)."""

    def forward(self, x, is_causal=False):
        if is_causal:  # the op has no causal mask; DINOv2's own code then
            if self.adclr_layout is not None:
                raise ValueError("is_causal cannot be combined with query tokens")
            return _original(self).forward(self, x, is_causal)
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)
        return self.proj_drop(self.proj(attend_packed(self, qkv, self.scale).reshape(B, N, C)))


def _varlen(attn_bias, x):
    """The VarlenLayout of an attention bias: ours, or xformers' BlockDiagonalMask."""
    if isinstance(attn_bias, VarlenLayout):
        return attn_bias
    if type(attn_bias).__name__ != "BlockDiagonalMask":
        raise ValueError(f"attn_bias of type {type(attn_bias).__name__}: the op takes xformers' "
                         "BlockDiagonalMask (packed crops) or a VarlenLayout")
    if x.shape[0] != 1:
        raise ValueError(f"a BlockDiagonalMask packs sequences along dim 1 of a (1, T, C) input, got {tuple(x.shape)}")
    cached = attn_bias.__dict__.get("_adclr_varlen")
    if cached is None or cached.device != x.device:
        offsets = list(attn_bias.q_seqinfo.seqstart_py)
        if list(attn_bias.k_seqinfo.seqstart_py) != offsets:
            raise ValueError("a BlockDiagonalMask with other key than query offsets is not self-attention")
        cached = VarlenLayout.from_offsets(offsets, 0, x.device)
        attn_bias.__dict__["_adclr_varlen"] = cached
    return cached


@functools.lru_cache(maxsize=64)
def _list_layout(shapes, queries, device):
    """VarlenLayout of crop groups [(batch, length)] with `queries` query tokens per group."""
    lengths = [length for batch, length in shapes for _ in range(batch)]
    counts = [q for (batch, _), q in zip(shapes, queries) for _ in range(batch)]
    return VarlenLayout(lengths, counts, device)


class Dinov2Block:
    """Mixin over DINOv2's NestedTensorBlock: list inputs packed here, without xformers."""

    def forward(self, x_or_x_list):
        if isinstance(x_or_x_list, list):
            return self._forward_list(x_or_x_list)
        return _original(self).forward(self, x_or_x_list)

    def _forward_list(self, x_list):
        layout = self.attn.adclr_layout
        queries = tuple(layout.num_queries) if layout is not None else (0,) * len(x_list)
        if self.training and self.sample_drop_ratio > 0.0:
            x_list = self._drop_add(x_list, queries, lambda x, varlen: self.attn(self.norm1(x), attn_bias=varlen),
                                    _gamma(self.ls1))
            # DINOv2 scales the MLP residual when ls1 is a LayerScale (ls1 and ls2 go together).
            return self._drop_add(x_list, queries, lambda x, varlen: self.mlp(self.norm2(x)),
                                  _gamma(self.ls2) if _gamma(self.ls1) is not None else None)
        x, varlen = _pack(x_list, queries)
        x = x + self.ls1(self.attn(self.norm1(x), attn_bias=varlen))
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return _unpack(x, x_list)

    def _drop_add(self, x_list, queries, residual_fn, gamma):
        """DINOv2's sample-dropping stochastic depth over crop groups: the residual of a
        random subset of each group's samples, scaled up, added back in place."""
        keep = [torch.randperm(x.shape[0], device=x.device)[:max(int(x.shape[0] * (1 - self.sample_drop_ratio)), 1)]
                for x in x_list]
        subsets = [x[k] for x, k in zip(x_list, keep)]
        packed, varlen = _pack(subsets, queries)
        residuals = _unpack(residual_fn(packed, varlen), subsets)
        out = []
        for x, k, r in zip(x_list, keep, residuals):
            if gamma is not None:
                r = r * gamma
            out.append(torch.index_add(x.flatten(1), 0, k, r.flatten(1).to(x.dtype),
                                       alpha=x.shape[0] / k.shape[0]).view_as(x))
        return out


def _gamma(layer_scale):
    return getattr(layer_scale, "gamma", None)


def _pack(x_list, queries):
    varlen = _list_layout(tuple((x.shape[0], x.shape[1]) for x in x_list), queries, x_list[0].device)
    return torch.cat([x.reshape(1, -1, x.shape[-1]) for x in x_list], 1), varlen


def _unpack(x, like):
    parts = x.split([t.shape[0] * t.shape[1] for t in like], dim=1)
    return [p.view(t.shape[0], t.shape[1], -1) for p, t in zip(parts, like)]


# ---------------------------------------------------------------------------------- checks

def _blocks(model):
    """[(name, block)] of the model's real blocks (inside chunks, without the padding)."""
    found = []
    for i, entry in enumerate(model.blocks):
        if type(entry).__name__ == "BlockChunk":
            check_signature(f"blocks.{i}", entry, ("x",))
            found += [(f"blocks.{i}.{j}", b) for j, b in enumerate(entry) if not isinstance(b, nn.Identity)]
        else:
            found.append((f"blocks.{i}", entry))
    return found


def _plan(model):
    cls = type(model)
    if cls.__name__ != "DinoVisionTransformer" or not callable(getattr(model, "prepare_tokens_with_masks", None)):
        raise UnsupportedModel(f"{cls.__module__}.{cls.__name__} is not DINOv2's DinoVisionTransformer (a class "
                               "of that name with prepare_tokens_with_masks)")
    check_children("model", model, ("patch_embed", "blocks", "norm", "head", "cls_token", "pos_embed",
                                    "register_tokens", "mask_token"),
                   ("patch_embed", "blocks", "norm", "cls_token", "pos_embed"))
    plan = []
    for name, block in _blocks(model):
        bname = type(block).__name__
        if isinstance(block, Dinov2Block):
            continue
        if bname == "NestedTensorBlock":
            check_signature(name, block, ("x_or_x_list",))
        elif bname == "Block":
            check_signature(name, block, ("x",))
        else:
            raise UnsupportedModel(f"{name} ({bname}) is not DINOv2's Block or NestedTensorBlock")
        check_children(name, block, _BLOCK_CHILDREN, _BLOCK_CHILDREN)
        attn, aname = block.attn, f"{name}.attn"
        kind = type(attn).__name__
        if kind == "MemEffAttention":
            check_signature(aname, attn, ("x", "attn_bias"))
            mixin = Dinov2Attention
        elif kind == "Attention":
            if forward_parameters(type(attn)) not in (("x",), ("x", "is_causal")):
                check_signature(aname, attn, ("x", "is_causal"))
            mixin = Dinov2PlainAttention
        else:
            raise UnsupportedModel(f"{aname} ({kind}) is not DINOv2's Attention or MemEffAttention")
        check_children(aname, attn, ("qkv", "attn_drop", "proj", "proj_drop"), ("qkv", "proj", "proj_drop"))
        drop = attn.attn_drop
        check_no_attention_dropout(aname, attn, drop.p if isinstance(drop, nn.Dropout) else drop)
        if attn.qkv.out_features != 3 * attn.qkv.in_features or attn.qkv.in_features % attn.num_heads:
            raise UnsupportedModel(f"{aname}: qkv maps {attn.qkv.in_features} to {attn.qkv.out_features} "
                                   f"features with {attn.num_heads} heads, not DINOv2's layout")
        if bname == "NestedTensorBlock" and mixin is not Dinov2Attention:
            raise UnsupportedModel(f"{name}: a NestedTensorBlock needs MemEffAttention, it has {kind}")
        plan.append((attn, subclass(type(attn), mixin, f"Unidirectional{kind}")))
        if bname == "NestedTensorBlock":
            plan.append((block, subclass(type(block), Dinov2Block, "UnidirectionalNestedTensorBlock")))
    return plan


def swap_attention(model, backend="auto"):
    """Run a DINOv2 DinoVisionTransformer's attention on the op, in place; returns it.

    forward, forward_features (tensor or list of crop groups), get_intermediate_layers
    return what DINOv2's do (to floating-point rounding); state dict, parameters and
    hooks are unchanged. Raises UnsupportedModel before any change otherwise.
    """
    check_backend_name(backend)
    swap_classes(model, _plan(model))
    for _, block in _blocks(model):
        block.attn.adclr_backend = backend
    return model


def restore_attention(model):
    """Undo swap_attention: DINOv2's own classes again."""
    refuse_inside_query_tokens(model, "restore_attention")
    for module in model.modules():
        if isinstance(module, (OpAttention, Dinov2Block)):
            module.__class__ = _original(module)
            module.__dict__.pop("adclr_backend", None)
    return model


@contextlib.contextmanager
def query_tokens(model, queries, *, query_sees_prefix=False, query_sees_self=False,
                 query_sees_queries=False, passes=None):
    """Carry ADCLR query tokens through a swapped DINOv2 model's own methods.

    queries: for a tensor input, crops (B, Q, 3, p, p) embedded by the model's patch
        embedding (no positional embedding) or tokens (B, Q, D); for a list input (packed
        crop groups), a list with one such entry per group, None for groups without
        query tokens (local crops).
    passes: how many calls of the model carry the query tokens (None: every call); the
        later ones run as outside the context.
    The model's outputs are what they are without query tokens; the yielded object holds
    `query` (after model.norm; a list for list inputs) and `outputs` (every block's).
    """
    pairs = []
    for name, block in _blocks(model):
        if not isinstance(block.attn, OpAttention):
            raise RuntimeError(f"{name}.attn is not swapped: call swap_attention(model) first")
        refuse_token_mixers(name, block)
        pairs.append((block, [block.attn]))
    prefix = 1 + getattr(model, "num_register_tokens", 0)
    if isinstance(queries, list):
        tokens = [None if q is None else _tokens(model, q) for q in queries]
        counts = tuple(0 if t is None else t.shape[1] for t in tokens)
        if not all(isinstance(b, Dinov2Block) for b, _ in pairs):
            raise UnsupportedModel("list inputs need NestedTensorBlocks")
    else:
        tokens = _tokens(model, queries)
        counts = tokens.shape[1]
    layout = QueryLayout(counts, prefix, QueryMask(query_sees_prefix, query_sees_self, query_sees_queries))
    with carry_queries(pairs, tokens, layout, model.norm, passes=passes) as state:
        yield state


def _tokens(model, queries):
    if isinstance(queries, torch.Tensor) and queries.dim() == 3:
        check_queries(queries, queries.shape[0], model.embed_dim)
        return queries
    embed = model.patch_embed
    return embed.norm(embed_crops(embed.proj, queries, embed.patch_size))


__all__ = ["UnsupportedModel", "swap_attention", "restore_attention", "query_tokens"]
