"""Drop-in attention module and timm conversion for ViT codebases.

`UnidirectionalAttention` has the constructor arguments, parameter names and shapes of
timm's `Attention` (`qkv`, `q_norm`/`k_norm`, `norm`, `proj`), so a timm checkpoint
loads into it unchanged. With `num_queries=0` it is plain attention; with query tokens
appended it runs ADCLR's unidirectional attention. To run the op inside timm, DINO,
DINOv2 or Hugging Face models, see `adclr_kernels.integrations`; `enable_query_tokens`
here is deprecated.
"""

from __future__ import annotations

import types
import warnings

import torch
import torch.utils.checkpoint
from torch import nn

from .attention import (VarlenLayout, unidirectional_attention, unidirectional_attention_qkvpacked,
                        unidirectional_attention_varlen, unidirectional_attention_varlen_qkvpacked)


class UnidirectionalAttention(nn.Module):
    """timm-compatible multi-head self-attention with ADCLR query tokens.

    forward(x, num_queries=0, num_prefix=1, ...):
        x: (batch, seq, dim), or packed (total_tokens, dim) with `cu_seqlens`: a
            `VarlenLayout` (num_queries None), or offsets (then num_queries may be a
            per-sequence tensor).
    """

    def __init__(self, dim, num_heads=8, attn_head_dim=None, dim_out=None, qkv_bias=False,
                 qk_norm=False, scale_norm=False, proj_bias=True, attn_drop=0.0, proj_drop=0.0,
                 norm_layer=nn.LayerNorm, backend="auto"):
        super().__init__()
        if attn_head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
            attn_head_dim = dim // num_heads
        if attn_drop != 0.0:
            # Dropout on the probabilities would need them materialised; the fused kernel
            # never does. DINO/ADCLR train with attn_drop = 0.
            raise ValueError("attn_drop is not supported by the fused kernel; use 0.0")
        self.num_heads = num_heads
        self.head_dim = attn_head_dim
        self.attn_dim = num_heads * attn_head_dim
        self.scale = attn_head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(attn_head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(attn_head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim) if scale_norm else nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, num_queries=0, num_prefix=1, *, query_sees_prefix=False,
                query_sees_self=False, query_sees_queries=False, cu_seqlens=None,
                max_seqlen=None, backend=None, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            raise ValueError("UnidirectionalAttention builds its own mask from num_queries and "
                             "num_prefix; attn_mask and is_causal are not supported")
        options = dict(query_sees_prefix=query_sees_prefix, query_sees_self=query_sees_self,
                       query_sees_queries=query_sees_queries, scale=self.scale,
                       backend=backend or self.backend)
        if isinstance(cu_seqlens, VarlenLayout) and num_queries == 0:
            num_queries = None  # the layout holds the query counts
        tokens = x.shape[:-1]
        qkv = self.qkv(x).view(*tokens, 3, self.num_heads, self.head_dim)
        if isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity):
            # The projection output goes to the op as it is: the kernel reads q, k, v
            # through its strides and its backward writes one dqkv, so neither pass
            # copies a qkv-sized tensor.
            if cu_seqlens is None:
                out = unidirectional_attention_qkvpacked(qkv, num_queries, num_prefix, **options)
            else:
                out = unidirectional_attention_varlen_qkvpacked(
                    qkv, cu_seqlens, num_queries, num_prefix, max_seqlen=max_seqlen, **options)
        else:
            q, k, v = qkv.unbind(-3)
            # Under CUDA autocast a LayerNorm q/k norm returns fp32 while v stays bf16:
            # the op takes one dtype, so q and k follow v.
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
            if cu_seqlens is None:
                q, k, v = (t.transpose(1, 2) for t in (q, k, v))
                out = unidirectional_attention(q, k, v, num_queries, num_prefix, **options)
                out = out.transpose(1, 2)
            else:
                out = unidirectional_attention_varlen(q, k, v, cu_seqlens, num_queries, num_prefix,
                                                      max_seqlen=max_seqlen, **options)
        out = self.norm(out.reshape(*tokens, self.attn_dim))
        return self.proj_drop(self.proj(out))


# ----------------------------------------------------------------------------------------
# timm conversion
# ----------------------------------------------------------------------------------------


def _swap_attention(old, backend):
    new = UnidirectionalAttention(
        old.qkv.in_features, old.num_heads, attn_head_dim=old.head_dim,
        dim_out=old.proj.out_features, qkv_bias=old.qkv.bias is not None,
        proj_bias=old.proj.bias is not None, attn_drop=0.0, proj_drop=old.proj_drop.p,
        backend=backend)
    # Norm modules are taken as they are (whatever their class), so weights and any
    # custom norm layer survive the swap.
    for name in ("q_norm", "k_norm", "norm"):
        setattr(new, name, getattr(old, name, nn.Identity()))
    new.qkv, new.proj = old.qkv, old.proj
    return new


_BLOCK_PARTS = ("norm1", "attn", "norm2", "mlp")


def _run_block(block, x, num_queries, num_prefix):
    """timm's pre-norm Block.forward, with the token layout passed to the attention."""
    identity = nn.Identity()
    y = block.attn(block.norm1(x), num_queries, num_prefix)
    x = x + getattr(block, "drop_path1", identity)(getattr(block, "ls1", identity)(y))
    y = block.mlp(block.norm2(x))
    return x + getattr(block, "drop_path2", identity)(getattr(block, "ls2", identity)(y))


def _forward_with_queries(self, x, query_crops=None):
    """ADCLR forward of a converted ViT.

    x: (batch, 3, H, W) images; query_crops: (batch, Q, 3, p, p) crops of one patch each.
    Returns dict(cls=(batch, dim), patch=(batch, N, dim), query=(batch, Q, dim) or None).
    Honours timm's `grad_checkpointing`: each block is recomputed in backward with the
    same token layout (it is bound to the call, not stored on the modules).
    """
    tokens = self.patch_embed(x)
    tokens = self._pos_embed(tokens)
    tokens = self.norm_pre(self.patch_drop(tokens))
    num_prefix = self.num_prefix_tokens
    num_raw = tokens.shape[1] - num_prefix
    num_queries = 0
    if query_crops is not None:
        batch, num_queries = query_crops.shape[:2]
        # The same patch embedding, one token per crop, and no positional embedding.
        q = self.patch_embed.proj(query_crops.flatten(0, 1)).flatten(1)
        q = self.patch_embed.norm(q).view(batch, num_queries, -1)
        tokens = torch.cat([tokens, q.to(tokens.dtype)], 1)
    checkpointing = getattr(self, "grad_checkpointing", False) and torch.is_grad_enabled()
    for block in self.blocks:
        if checkpointing:
            tokens = torch.utils.checkpoint.checkpoint(
                _run_block, block, tokens, num_queries, num_prefix, use_reentrant=False)
        else:
            tokens = _run_block(block, tokens, num_queries, num_prefix)
    tokens = self.norm(tokens)
    return dict(cls=tokens[:, 0], patch=tokens[:, num_prefix:num_prefix + num_raw],
                query=tokens[:, num_prefix + num_raw:] if num_queries else None)


def enable_query_tokens(model, backend="auto"):
    """Deprecated: use `adclr_kernels.integrations.timm.swap_attention(model)` (the model's
    forward stays timm's) and `forward_queries(model, images, crops)` (CLS, prefix, patch
    and query outputs, every option of the op).

    Replaces `model.forward` by `forward(images, query_crops=None)` returning a dict of
    CLS, patch and query features. A timm model goes through the checked adapter (models
    it cannot run exactly are refused before any change; "cls" is None without a class
    token). Any other model with timm's attribute names gets the old conversion: every
    block's `attn` becomes a `UnidirectionalAttention` sharing the parameter tensors,
    blocks run as timm's pre-norm Block.
    """
    warnings.warn("enable_query_tokens is deprecated and will be removed: it replaces model.forward. "
                  "Use adclr_kernels.integrations.timm.swap_attention(model) (forward unchanged) and "
                  "forward_queries(model, images, crops)", DeprecationWarning, stacklevel=2)
    if type(model).__module__.startswith("timm."):
        from .integrations.timm import forward_queries, swap_attention

        swap_attention(model, backend)

        def forward(images, query_crops=None):
            if query_crops is None:
                features = model.forward_features(images)
                prefix = model.num_prefix_tokens
                return dict(cls=features[:, 0] if model.cls_token is not None else None,
                            patch=features[:, prefix:], query=None)
            out = forward_queries(model, images, query_crops)
            return dict(cls=out["cls"], patch=out["patch"], query=out["query"])

        model.forward = forward
        return model
    for i, block in enumerate(model.blocks):
        missing = [part for part in _BLOCK_PARTS if not hasattr(block, part)]
        if missing:
            raise TypeError(f"blocks[{i}] ({type(block).__name__}) is not a timm pre-norm Block: "
                            f"it has no {', '.join(missing)}")
        attn = block.attn
        if isinstance(attn, UnidirectionalAttention):
            continue
        if not all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads", "head_dim")):
            raise TypeError(f"blocks[{i}].attn ({type(attn).__name__}) is not a timm-style "
                            "Attention with a fused qkv projection")
        if getattr(attn, "attn_drop", nn.Dropout(0.0)).p != 0.0:
            raise ValueError(f"blocks[{i}].attn uses attention dropout, which the fused "
                             "kernel does not support")
        block.attn = _swap_attention(attn, backend)
    model.forward = types.MethodType(_forward_with_queries, model)
    return model
