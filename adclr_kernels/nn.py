"""The drop-in attention module for ViT codebases.

`UnidirectionalAttention` has the constructor arguments, parameter names and shapes of
timm's `Attention` (`qkv`, `q_norm`/`k_norm`, `norm`, `gate`, `proj`), so a timm checkpoint
loads into it unchanged. With `num_queries=0` it is plain attention; with query tokens
appended it runs ADCLR's unidirectional attention. To run the op inside timm, DINO,
DINOv2 or Hugging Face models as they are, see `adclr_kernels.integrations`.
"""

from __future__ import annotations

import numbers

from torch import nn

from .attention import (unidirectional_attention, unidirectional_attention_qkvpacked,
                        unidirectional_attention_varlen, unidirectional_attention_varlen_qkvpacked)
from .backends import check_backend_name
from .varlen import VarlenLayout


class UnidirectionalAttention(nn.Module):
    """timm-compatible multi-head self-attention with ADCLR query tokens.

    forward(x, num_queries=0, num_prefix=1, ...):
        x: (batch, seq, dim), or packed (total_tokens, dim) with `cu_seqlens`: a
            `VarlenLayout` (num_queries None), or offsets (then num_queries may be a
            per-sequence tensor).
        return_prefix_probs: return (output, the prefix rows' attention probabilities),
            as the op gives them: (batch, heads, P, seq), or (heads, P, total_tokens).
    """

    def __init__(self, dim, num_heads=8, attn_head_dim=None, dim_out=None, qkv_bias=False,
                 qk_norm=False, scale_norm=False, proj_bias=True, gated=False, attn_drop=0.0, proj_drop=0.0,
                 norm_layer=nn.LayerNorm, device=None, dtype=None, backend="auto"):
        super().__init__()
        check_backend_name(backend)
        for name, value in (("dim", dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be a positive int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("qk_norm and scale_norm need a norm_layer")
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
        # timm's attention layers read or set this to choose F.scaled_dot_product_attention;
        # here attention is always fused, whatever it says.
        self.fused_attn = True
        # As timm passes them (device and dtype to every layer built here), but to the
        # norm layer only when given: a norm class of the user's may not take them.
        dd = dict(device=device, dtype=dtype)
        norm_dd = dd if device is not None or dtype is not None else {}
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(attn_head_dim, **norm_dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(attn_head_dim, **norm_dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **norm_dd) if scale_norm else nn.Identity()
        # timm's gated attention: a sigmoid gate from the block's input on the output.
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, num_queries=0, num_prefix=1, *, query_sees_prefix=False,
                query_sees_self=False, query_sees_queries=False, cu_seqlens=None,
                max_seqlen=None, backend=None, attn_mask=None, is_causal=False, return_prefix_probs=False):
        if attn_mask is not None or is_causal:
            raise ValueError("UnidirectionalAttention builds its own mask from num_queries and "
                             "num_prefix; attn_mask and is_causal are not supported")
        options = dict(query_sees_prefix=query_sees_prefix, query_sees_self=query_sees_self,
                       query_sees_queries=query_sees_queries, scale=self.scale,
                       backend=backend or self.backend, return_prefix_probs=return_prefix_probs)
        if x.dim() != (2 if cu_seqlens is not None else 3):
            form = "packed (total_tokens, dim)" if cu_seqlens is not None else "(batch, seq, dim)"
            raise ValueError(f"x must be {form}"
                             f"{'' if cu_seqlens is not None else ' (packed tokens take cu_seqlens)'}, "
                             f"got {tuple(x.shape)}")
        if (isinstance(cu_seqlens, VarlenLayout) and isinstance(num_queries, numbers.Integral)
                and not isinstance(num_queries, bool) and num_queries == 0):
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
                out = (out[0].transpose(1, 2), out[1]) if return_prefix_probs else out.transpose(1, 2)
            else:
                out = unidirectional_attention_varlen(q, k, v, cu_seqlens, num_queries, num_prefix,
                                                      max_seqlen=max_seqlen, **options)
        out, probs = out if return_prefix_probs else (out, None)
        out = self.norm(out.reshape(*tokens, self.attn_dim))
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
        out = self.proj_drop(self.proj(out))
        return (out, probs) if return_prefix_probs else out
