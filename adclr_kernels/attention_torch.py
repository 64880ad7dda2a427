"""PyTorch implementations of the unidirectional attention.

Every backend here computes the same function as the Triton kernels
(`attention_triton.py`); they exist as readable ground truth (`reference`,
`dense_masked`), as the CPU path (`sdpa`), and as peers to compare against (`flex`,
`xformers`). The mask rule is `mask.QueryMask`'s. Inputs are assumed to have been
checked by the public functions (`attention.py`).

Each takes (q, k, v, num_queries, num_prefix, mask, scale): q, k, v in the batched form
(batch, heads, seq, head_dim), mask a `QueryMask`, scale None for head_dim ** -0.5.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from .mask import QueryMask


def dense_masked_attention(q, k, v, num_queries, num_prefix, mask=QueryMask(), scale=None):
    """One masked softmax over the full score matrix: the simplest statement of the op.

    Tests run it in float64 as the ground truth every backend is measured against.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = mask.matrix(q.shape[-2], k.shape[-2], num_queries, num_prefix, q.device)
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def reference_attention(q, k, v, num_queries, num_prefix, mask=QueryMask(), scale=None):
    """The paper's formulation: two explicit matmul-softmax paths.

    The raw path is a plain ViT attention over the P + N visible tokens; the query path
    lets the Q query tokens read the visible tokens (and, by option, themselves or each
    other). The two results are concatenated along the sequence. Scores and softmax are
    computed in fp32 (as the fused kernels and SDPA do), so fp16 scores that overflow
    the format do not turn into NaN; the probabilities go back to v's dtype for P @ V.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    visible = q.shape[-2] - num_queries
    k_vis, v_vis = k[..., :visible, :], v[..., :visible, :]
    wide = torch.promote_types(q.dtype, torch.float32)

    def scores(qq, kk):
        return (qq.to(wide) @ kk.to(wide).transpose(-2, -1)) * scale

    def attend(probs, values):
        return probs.to(values.dtype) @ values

    raw = attend(torch.softmax(scores(q[..., :visible, :], k_vis), -1), v_vis)
    if num_queries == 0:
        return raw

    q_query = q[..., visible:, :]
    first = 0 if mask.sees_prefix else num_prefix
    keys, values = k[..., first:visible, :], v[..., first:visible, :]
    s = scores(q_query, keys)
    if mask.sees_queries:
        k_query, v_query = k[..., visible:, :], v[..., visible:, :]
        probs = torch.softmax(torch.cat([s, scores(q_query, k_query)], -1), -1)
        return torch.cat([raw, attend(probs, torch.cat([values, v_query], -2))], -2)
    if mask.sees_self:
        # Each query token's own key is one extra column of its score row.
        k_self, v_self = k[..., visible:, :], v[..., visible:, :]
        self_score = (q_query.to(wide) * k_self.to(wide)).sum(-1, keepdim=True) * scale
        probs = torch.softmax(torch.cat([s, self_score], -1), -1)
        out = attend(probs[..., :-1], values) + probs[..., -1:].to(v.dtype) * v_self
        return torch.cat([raw, out], -2)
    return torch.cat([raw, attend(torch.softmax(s, -1), values)], -2)


def prefix_probs(q, k, num_queries, num_prefix, scale=None):
    """The attention weights of the P prefix rows: (batch, heads, P, key_len), in fp32
    (float64 for float64 inputs). Prefix rows see the visible columns only, whatever the
    query options; the query columns get 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    visible = q.shape[-2] - num_queries
    wide = torch.promote_types(q.dtype, torch.float32)
    # Autocast would run the product in its 16-bit dtype again: the weights stay in `wide`,
    # as the Triton kernel's are. (A device type without autocast, meta, refuses the switch.)
    kind = q.device.type
    off = (torch.autocast(kind, enabled=False)
           if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
           else contextlib.nullcontext())
    with off:
        scores = (q[..., :num_prefix, :].to(wide) @ k[..., :visible, :].to(wide).transpose(-2, -1)) * scale
        return F.pad(torch.softmax(scores, -1), (0, k.shape[-2] - visible))


def _two_calls(attend, q, k, v, num_queries, num_prefix, mask, scale):
    """Raw rows over the visible keys, then query rows over just the keys they see.

    attend(q, k, v) computes one attention without a mask: a masked probability of 0
    times a NaN or inf value is NaN, so no row is ever given a column it does not see.
    With sees_self alone, a query row's own column joins by its softmax weight
    (`_join_own_column`) rather than through a diagonal mask over the query keys.
    """
    visible = q.shape[-2] - num_queries
    raw = q[..., :0, :]  # no raw rows (P = N = 0): kernels such as flex reject empty calls
    if visible:
        raw = attend(q[..., :visible, :], k[..., :visible, :], v[..., :visible, :])
    if num_queries == 0:
        return raw
    first = 0 if mask.sees_prefix else num_prefix
    q_query = q[..., visible:, :]
    if mask.sees_queries:
        query = attend(q_query, k[..., first:, :], v[..., first:, :])
    elif mask.sees_self:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        query = _join_own_column(attend, q_query, k[..., first:visible, :], v[..., first:visible, :],
                                 k[..., visible:, :], v[..., visible:, :], scale)
    else:
        query = attend(q_query, k[..., first:visible, :], v[..., first:visible, :])
    return torch.cat([raw, query], -2)


def _join_own_column(attend, q, k, v, k_own, v_own, scale):
    """Attention of rows q over columns k, v plus, for row i, one more column (k_own[i],
    v_own[i]): attend's result over k, v and the own value, weighted by the share of the
    softmax each takes. The logsumexp over k is recomputed from the scores (query rows:
    a few), in fp32 as the kernels keep it."""
    wide = torch.promote_types(q.dtype, torch.float32)
    own = (q.to(wide) * k_own.to(wide)).sum(-1, keepdim=True) * scale
    if k.shape[-2] == 0:  # the row sees only its own column
        lse, others = torch.full_like(own, float("-inf")), 0.0
    else:
        lse = torch.logsumexp((q.to(wide) @ k.to(wide).transpose(-2, -1)) * scale, -1, keepdim=True)
        others = attend(q, k, v).to(wide)
    # sigmoid(a - b) = e^a / (e^a + e^b): each part's share, without 1 - w cancelling.
    out = torch.sigmoid(lse - own) * others + torch.sigmoid(own - lse) * v_own.to(wide)
    return out.to(v.dtype)


def sdpa_attention(q, k, v, num_queries, num_prefix, mask=QueryMask(), scale=None):
    """Two `F.scaled_dot_product_attention` calls, concatenated.

    Neither call is masked, so PyTorch may pick its flash kernel for both; the query
    part runs over just the columns it can see.
    """
    def attend(qq, kk, vv):
        return F.scaled_dot_product_attention(qq, kk, vv, scale=scale)

    return _two_calls(attend, q, k, v, num_queries, num_prefix, mask, scale)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention(q, k, v, num_queries, num_prefix, mask=QueryMask(), scale=None):
    """FlexAttention, as two unmasked calls like `sdpa` (compiled on CUDA, the only way
    flex is fast; eager on CPU, where PyTorch offers no flex backward).

    Not one call with the rule as a mask_mod: flex multiplies masked probabilities (0)
    by their values, so a NaN or inf in a prefix or query value would reach rows that do
    not see it.
    """
    if q.numel() == 0 or k.numel() == 0:
        # Nothing to attend (flex rejects empty inputs, and no heads or no batch divides
        # by zero in its block mask); keep the graph to q, k and v.
        return q * 0 + (k.sum() + v.sum()) * 0

    def attend(qq, kk, vv):
        return _flex_call(qq, kk, vv, scale)

    return _two_calls(attend, q, k, v, num_queries, num_prefix, mask, scale)


def _flex_call(q, k, v, scale):
    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    if q.is_cuda:
        return _compiled_flex()(q, k, v, scale=scale)
    # CPU flex is forward-only and rejects inputs that require grad even under no_grad.
    return eager_flex(*(t.detach() for t in (q, k, v)), scale=scale)


def xformers_attention(q, k, v, num_queries, num_prefix, mask=QueryMask(), scale=None):
    """xformers memory-efficient attention, two calls like `sdpa` (CUDA only)."""
    import xformers.ops as xops

    def attend(qq, kk, vv):
        # xformers wants (batch, seq, heads, head_dim).
        out = xops.memory_efficient_attention(qq.transpose(1, 2), kk.transpose(1, 2),
                                              vv.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)

    return _two_calls(attend, q, k, v, num_queries, num_prefix, mask, scale)


# ----------------------------------------------------------------------------------------
# Packed (varlen) forms: sequences back to back as (tokens, heads, head_dim)
# ----------------------------------------------------------------------------------------


def varlen_per_sequence(fn, q, k, v, bounds, num_queries, num_prefix, mask=QueryMask(),
                        scale=None):
    """Run a batched backend on each packed sequence in turn (block-diagonal by construction).

    bounds: host list of (start, end) token offsets; num_queries: host list of Q per sequence.
    """
    outs = []
    for (start, end), nq in zip(bounds, num_queries):
        one = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        outs.append(fn(*one, nq, num_prefix, mask, scale)[0].transpose(0, 1))
    if not outs:
        # No sequence: an empty output that still reaches q, k and v in autograd, as one
        # with sequences does (a backward through it then finds a graph).
        return torch.cat([q[:0], k[:0], v[:0]])
    return torch.cat(outs, 0)


def flex_varlen_attention(q, k, v, bounds, num_queries, num_prefix, mask=QueryMask(), scale=None):
    """FlexAttention per packed sequence. One call over the packed batch with a document
    mask would let a NaN or inf in one sequence's values reach rows of another that
    share a block (flex multiplies masked probabilities by their values)."""
    return varlen_per_sequence(flex_attention, q, k, v, bounds, num_queries, num_prefix, mask, scale)


def varlen_prefix_probs(q, k, bounds, num_queries, num_prefix, scale=None):
    """`prefix_probs` of packed sequences: (heads, P, total_tokens), column j holding the
    weight of its own sequence's prefix rows."""
    probs = [prefix_probs(q[start:end].transpose(0, 1)[None], k[start:end].transpose(0, 1)[None], nq,
                          num_prefix, scale)[0] for (start, end), nq in zip(bounds, num_queries)]
    if not probs:
        dtype = torch.promote_types(q.dtype, torch.float32)
        return q.new_zeros(q.shape[1], num_prefix, 0, dtype=dtype) + (q[:0].sum() + k[:0].sum()).to(dtype)
    return torch.cat(probs, -1)
