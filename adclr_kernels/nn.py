"""Drop-in attention module for ViT codebases.

`UnidirectionalAttention` has the parameter names and shapes of timm's
`VisionTransformer` attention (`qkv`, optional `q_norm`/`k_norm`, `proj`), so a timm
checkpoint loads into it unchanged. With `num_queries=0` it is plain attention; with
query tokens appended it runs ADCLR's unidirectional attention.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import unidirectional_attention


class UnidirectionalAttention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, attn_drop=0.0,
                 proj_drop=0.0, norm_layer=nn.LayerNorm, backend="auto"):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if attn_drop != 0.0:
            # Dropout on the probabilities would need them materialised; the fused kernel
            # never does. DINO/ADCLR train with attn_drop = 0.
            raise ValueError("attn_drop is not supported by the fused kernel; use 0.0")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, num_queries=0, num_prefix=1, *, query_sees_prefix=False,
                query_sees_self=False, query_sees_queries=False, backend=None):
        batch, seq, dim = x.shape
        # (B, L, 3, H, D) viewed as three (B, H, L, D) tensors: no copy, the kernel reads
        # the packed projection through its strides.
        qkv = self.qkv(x).view(batch, seq, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = unidirectional_attention(
            q, k, v, num_queries, num_prefix, query_sees_prefix=query_sees_prefix,
            query_sees_self=query_sees_self, query_sees_queries=query_sees_queries,
            scale=self.scale, backend=backend or self.backend)
        out = out.transpose(1, 2).reshape(batch, seq, dim)
        return self.proj_drop(self.proj(out))
