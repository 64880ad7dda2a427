"""Vision Transformer with ADCLR query tokens, and the DINO projection head.

The backbone is timm's `VisionTransformer` (pre-norm blocks, CLS token, learned
positional embedding) with parameter names kept identical where the module is the
same, so a state dict moves between the two. The one addition is ADCLR's query tokens:

    tokens = [ CLS | N raw patches (+ pos embed) | Q query crops (no pos embed) ]

Each query crop is a small crop of the raw image resized to exactly one patch and
embedded by the same `patch_embed`, so ADCLR has no parameters beyond DINO's. Every
block's attention is unidirectional (`adclr_kernels.nn.UnidirectionalAttention`): the
CLS and raw rows never see the query columns, so the raw path is exactly a plain ViT.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from adclr_kernels import VarlenLayout
from adclr_kernels.nn import UnidirectionalAttention

ARCHS = {
    # name: (embed_dim, depth, num_heads), as in timm/DeiT.
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    # Not paper models: the CPU demo, and the test suite.
    "vit_mini": (128, 4, 4),
    "vit_test": (64, 2, 2),
}


class Packing(NamedTuple):
    """How a batch of sequences of several lengths sits in one (tokens, dim) tensor."""
    layout: VarlenLayout           # offsets and query counts, checked once on the host
    sequence_of_token: torch.Tensor  # (T,) which sequence each token belongs to
    num_seqs: int


def drop_path(x, p, training, packing=None):
    """Stochastic depth: drop the whole residual branch per sample (per sequence when packed)."""
    if p == 0.0 or not training:
        return x
    if packing is None:
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    else:
        keep = x.new_empty(packing.num_seqs).bernoulli_(1 - p)[packing.sequence_of_token, None]
    return x * keep / (1 - p)


class DropPath(nn.Module):
    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x, packing=None):
        return drop_path(x, self.p, self.training, packing)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


_RESAMPLING = {}


def bicubic_resampling(side, h, w, device):
    """(h * w, side * side) float32: F.interpolate's bicubic resize (align_corners=False) of a
    side x side grid to h x w, row-major, as the matrix it is (the resize is linear)."""
    key = (side, h, w, str(device))
    matrix = _RESAMPLING.get(key)
    if matrix is None:
        # A plain tensor even when first made under inference_mode (training could not save
        # an inference tensor for its backward). Traced, the graph makes it (not cached).
        with torch.inference_mode(False), torch.no_grad():
            basis = torch.eye(side * side, dtype=torch.float32, device=device).reshape(side * side, 1, side, side)
            matrix = F.interpolate(basis, size=(h, w), mode="bicubic", align_corners=False)
            matrix = matrix.reshape(side * side, h * w).t().contiguous()
        if not torch.compiler.is_compiling():
            _RESAMPLING[key] = matrix
    return matrix


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0, backend="auto", **query_options):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = UnidirectionalAttention(dim, num_heads, qkv_bias=True, backend=backend)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)
        self.query_options = query_options

    def forward(self, x, num_queries=0, packing=None, cls_attention=False):
        """x: (B, L, D) with num_queries query tokens per sequence, or packed (T, D).
        cls_attention: return (x, the CLS rows' attention probabilities (B, heads, L), or
        (heads, T) packed: each token's weight in its own sequence's CLS row)."""
        if packing is None:
            y = self.attn(self.norm1(x), num_queries, 1, return_prefix_probs=cls_attention, **self.query_options)
        else:
            y = self.attn(self.norm1(x), None, 1, cu_seqlens=packing.layout, return_prefix_probs=cls_attention,
                          **self.query_options)
        y, probs = y if cls_attention else (y, None)
        x = x + self.drop_path1(y, packing)
        x = x + self.drop_path2(self.mlp(self.norm2(x)), packing)
        if not cls_attention:
            return x
        return x, probs[:, :, 0] if packing is None else probs[:, 0]  # (B, heads, L) or (heads, T)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class VisionTransformer(nn.Module):
    """ViT backbone; `forward_features` is the one entry point (see its docstring)."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                 mlp_ratio=4.0, drop_path_rate=0.0, attention="auto",
                 query_sees_prefix=False, query_sees_self=False, query_sees_queries=False):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} must be a multiple of patch size {patch_size}")
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch_size) ** 2, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # deeper blocks drop more
        options = dict(query_sees_prefix=query_sees_prefix, query_sees_self=query_sees_self,
                       query_sees_queries=query_sees_queries)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, rates[i], attention, **options) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._packings = {}  # crop layout -> Packing, see _packing
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def interpolate_pos_embed(self, h, w):
        """Positional embedding for an (h, w) grid of patches, bicubic from the trained grid."""
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = int(math.sqrt(patch_pos.shape[1]))
        if (h, w) == (side, side):
            return self.pos_embed
        # As a matrix product: F.interpolate's bicubic backward adds with atomics on CUDA
        # (not deterministic, and refused under torch.use_deterministic_algorithms).
        with torch.autocast(patch_pos.device.type, enabled=False):
            grid = bicubic_resampling(side, h, w, patch_pos.device) @ patch_pos[0].float()
        return torch.cat([cls_pos, grid.to(patch_pos.dtype)[None]], 1)

    def embed(self, x, query_crops=None):
        """Tokens [CLS | patches + pos embed | query crops] (B, 1 + N + Q, D), and Q."""
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], 1)
        tokens = tokens + self.interpolate_pos_embed(H // p, W // p)
        if query_crops is None:
            return tokens, 0
        if query_crops.dim() != 5 or query_crops.shape[0] != B or query_crops.shape[2:] != (3, p, p):
            raise ValueError(f"query_crops must have shape ({B}, Q, 3, {p}, {p}), "
                             f"got {tuple(query_crops.shape)}")
        num_queries = query_crops.shape[1]
        queries = self.patch_embed(query_crops.flatten(0, 1)).reshape(B, num_queries, -1)
        # No positional embedding: query crops have no place in the image.
        return torch.cat([tokens, queries], 1), num_queries

    @staticmethod
    def _features(tokens, num_queries):
        visible = tokens.shape[1] - num_queries
        return {"cls": tokens[:, 0], "patch": tokens[:, 1:visible],
                "query": tokens[:, visible:] if num_queries else None}

    def forward_features(self, x, query_crops=None, patches=None, cls_attention=False):
        """Encode images, and optionally ADCLR query crops, in one pass.

        Args:
            x: (B, 3, H, W) images; H and W multiples of the patch size (any size: the
                positional embedding is interpolated).
            query_crops: None, or (B, Q, 3, p, p) query crops already resized to one
                patch (p = patch size).
            patches: None, or (B, n) indices of the patches to keep (a masked image
                model's visible set): the others never enter the blocks.
            cls_attention: also return the last block's CLS attention probabilities,
                exact, from the fused op (no attention matrix is formed).

        Returns:
            dict with "cls" (B, D), "patch" (B, N, D) (N = n with `patches`) and "query"
            (B, Q, D) or None, all after the final LayerNorm; "cls" and "patch" do not
            depend on query_crops (unidirectional attention). With cls_attention,
            "cls_attention" (B, heads, 1 + N + Q): the CLS row of the last block (0 over
            the query columns).
        """
        tokens, num_queries = self.embed(x, query_crops)
        if patches is not None:
            keep = torch.cat([patches.new_zeros(patches.shape[0], 1), patches + 1], 1)
            tokens = torch.cat([tokens.gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1])),
                                tokens[:, tokens.shape[1] - num_queries:]], 1)
        for block in self.blocks[:-1]:
            tokens = block(tokens, num_queries)
        tokens = self.blocks[-1](tokens, num_queries, cls_attention=cls_attention)
        tokens, probs = tokens if cls_attention else (tokens, None)
        features = self._features(self.norm(tokens), num_queries)
        return {**features, "cls_attention": probs} if cls_attention else features

    def get_intermediate_layers(self, x, n=1):
        """DINO's call: the tokens (B, 1 + N, D) after each of the last `n` blocks, each
        through the final LayerNorm, oldest first (the last entry is `forward_features`'s)."""
        if not 1 <= n <= len(self.blocks):
            raise ValueError(f"n must be between 1 and the depth {len(self.blocks)}, got {n}")
        tokens, _ = self.embed(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(tokens))
        return outputs

    def forward_features_packed(self, views):
        """`forward_features` for several crop resolutions in one backbone pass.

        views: list of (images, query_crops or None), e.g. [(globals, queries), (locals,
        None)]. Every sequence of every view is packed back to back into one (tokens, D)
        batch, so the blocks run once, with no padding, and the attention keeps the
        sequences apart. Returns one `forward_features` dict per view, equal to
        calling it view by view.
        """
        embedded = [self.embed(x, q) for x, q in views]
        packing = self._packing(tuple((t.shape[0], t.shape[1], nq) for t, nq in embedded),
                                embedded[0][0].device)
        tokens = torch.cat([t.flatten(0, 1) for t, _ in embedded])
        for block in self.blocks:
            tokens = block(tokens, packing=packing)
        tokens = self.norm(tokens)
        features, start = [], 0
        for t, nq in embedded:
            part = tokens[start:start + t.shape[0] * t.shape[1]].view(t.shape)
            features.append(self._features(part, nq))
            start += t.shape[0] * t.shape[1]
        return features

    def _packing(self, layout, device):
        """The Packing of a layout ((count, length, num_queries) per view), made once.

        The crop layout is the same every step, so the index tensors are built on the
        first call and reused: no host-to-device copy inside the training step.
        """
        cache = self._packings
        key = (layout, str(device))
        if key not in cache:
            lengths = [length for count, length, _ in layout for _ in range(count)]
            queries = [nq for count, _, nq in layout for _ in range(count)]
            cache[key] = Packing(
                layout=VarlenLayout(lengths, queries, device), num_seqs=len(lengths),
                sequence_of_token=torch.repeat_interleave(
                    torch.arange(len(lengths)), torch.tensor(lengths)).to(device))
        return cache[key]

    def forward(self, x):
        return self.forward_features(x)["cls"]


def _init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class NormalizedLinear(nn.Linear):
    """Bias-free linear layer whose weight rows are unit vectors, times a gain per row.

    This is weight normalisation (Salimans & Kingma) as DINO's head uses it. With
    `learn_gain=False` the gain is fixed at 1 and is not a parameter (DINO's
    norm_last_layer=True); otherwise `gain` (out_dim, 1) is trained, starts at 1 and is
    2-D, so the optimizer decays it like a weight, as DINO's weight_g is.
    """

    def __init__(self, in_dim, out_dim, learn_gain=False):
        super().__init__(in_dim, out_dim, bias=False)
        self.gain = nn.Parameter(torch.ones(out_dim, 1)) if learn_gain else None

    def forward(self, x):
        weight = F.normalize(self.weight, dim=-1)
        return F.linear(x, weight if self.gain is None else weight * self.gain)


class DINOHead(nn.Module):
    """3-layer MLP -> L2-normalised bottleneck -> weight-normalised linear layer.

    norm_last_layer=True fixes the last layer's gain at 1 (DINO's default); False trains
    it (DINO's ViT-S/16 recipe). Either way the state dict holds `last_layer.weight`;
    a trained gain adds `last_layer.gain`.
    """

    def __init__(self, in_dim, out_dim=65536, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim))
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim, learn_gain=not norm_last_layer)
        self.apply(_init_weights)

    def forward(self, x, project=True):
        """Logits; with project=False the L2-normalised bottleneck features, for a loss
        that applies the last layer itself (`ADCLRLoss.fused`)."""
        x = F.normalize(self.mlp(x), dim=-1)
        return self.last_layer(x) if project else x


class MaskedDecoder(nn.Module):
    """A light masked-image-model decoder (MAE's, one block wide by default): the visible
    patches' tokens, a shared mask token everywhere else, a positional embedding of its
    own, then pixels (p * p * 3 per patch) for the masked patches."""

    def __init__(self, dim, num_patches, patch_size, depth=1):
        super().__init__()
        width = max(32, dim // 2)
        self.embed = nn.Linear(dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, width))
        self.blocks = nn.ModuleList(Block(width, max(1, width // 32)) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.pred = nn.Linear(width, patch_size * patch_size * 3)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.apply(_init_weights)

    def forward(self, tokens, visible, masked):
        """tokens (B, n, D) of the patches `visible` (B, n); returns (B, m, p * p * 3) for `masked` (B, m)."""
        x = self.embed(tokens)
        B, width = x.shape[0], x.shape[-1]
        grid = self.mask_token.expand(B, self.pos_embed.shape[1], width)
        grid = grid.scatter(1, visible[..., None].expand(-1, -1, width), x) + self.pos_embed
        for block in self.blocks:
            grid = block(grid)
        return self.pred(self.norm(grid)).gather(1, masked[..., None].expand(-1, -1, self.pred.out_features))


class ADCLRModel(nn.Module):
    """Backbone + head shared by the CLS and query tokens (student or teacher).

    pack_crops: run global and local crops through the backbone as one packed token
    batch (`forward_features_packed`) instead of one pass per resolution. Same result;
    fewer, larger kernel launches and no per-resolution passes (the default on CUDA).
    dense_head (DenseCL) and decoder (ccMIM): the other methods' parts, None for ADCLR.
    """

    def __init__(self, backbone, head, pack_crops=False, dense_head=None, decoder=None):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.pack_crops = pack_crops
        self.dense_head, self.decoder = dense_head, decoder

    def forward(self, images, query_crops=None, local_crops=None, project=True, masks=None):
        """One call for every crop (DistributedDataParallel needs a single forward).

        Args:
            images: (B, 3, H, W) global views; query_crops: (B, Q, 3, p, p) or None;
            local_crops: (B', 3, h, w) or None, run without query tokens.
            project: False stops the head before its last layer (see `DINOHead.forward`).
            masks: (visible, masked) patch indices, (B, n) and (B, m): `forward_masked`.
        Returns:
            (CLS logits (B + B', K) for images then local crops, query logits (B, Q, K) or
            None), and with a dense head a third item: (the images' backbone patch features
            (B, N, D), their dense head's bottleneck features (B, N, bottleneck)). K is the
            bottleneck dim with project=False.
        """
        if masks is not None:
            return self.forward_masked(images, *masks, project)
        views = [(images, query_crops)] + ([(local_crops, None)] if local_crops is not None else [])
        if self.pack_crops and len(views) > 1:
            features = self.backbone.forward_features_packed(views)
        else:
            features = [self.backbone.forward_features(x, q) for x, q in views]
        # One head call for every CLS and query token: the head is shared, and one
        # large matmul is cheaper than several.
        query = features[0]["query"]
        tokens = [f["cls"] for f in features] + ([query.flatten(0, 1)] if query is not None else [])
        logits = self.head(torch.cat(tokens), project)
        num_cls = sum(f["cls"].shape[0] for f in features)
        out = (logits[:num_cls], None if query is None else logits[num_cls:].view(*query.shape[:2], -1))
        if self.dense_head is None:
            return out
        patch = features[0]["patch"]
        return (*out, (patch, self.dense_head(patch, project=False)))

    def forward_masked(self, images, visible, masked, project=True, decode=True):
        """ccMIM's passes over one view: the visible set and the masked set each through the
        backbone on their own (CLS + their patches). Returns (CLS logits (2B, K): visible
        set then masked set, the decoder's pixels of the masked patches (B, m, p * p * 3),
        or None without decode)."""
        seen = self.backbone.forward_features(images, patches=visible)
        hidden = self.backbone.forward_features(images, patches=masked)
        cls = self.head(torch.cat([seen["cls"], hidden["cls"]]), project)
        return cls, self.decoder(seen["patch"], visible, masked) if decode else None


def build_backbone(arch="vit_small", img_size=224, patch_size=16, drop_path_rate=0.0,
                   attention="auto", **query_options):
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    dim, depth, heads = ARCHS[arch]
    return VisionTransformer(img_size, patch_size, dim, depth, heads, drop_path_rate=drop_path_rate,
                             attention=attention, **query_options)
