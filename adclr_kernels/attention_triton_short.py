"""One-shot kernels for short batched sequences (local crops): a program owns G whole
sequences of one head and does its work in a single tile, with no loop.

The G sequences' rows are stacked into one row tile (G * L of BLOCK_M rows) and their
keys into one key tile. A row sees a column only inside its own sequence (the block-
diagonal rule, with seq = r // L worked out once per row and column vector) and there by
the unidirectional rule of `mask.py`. With the whole row in the tile the softmax is a plain
one (no online rescaling) and the backward needs no delta pre-pass: the program computes
delta, dQ, dK and dV of its sequences itself, each element written once, no atomics.

Rows and columns are addressed as (sequence, position) through the tensors' own batch and
token strides, so any strided view (q, k, v slices of a packed qkv projection, an output
in (B, L, H, D) memory) is read in place.

What a row cannot see cannot reach it: the dense products of a tile pair every row with
every column, and 0 x NaN is NaN. Scores and probabilities of unseen pairs are set by
selects, never by products, and the operand rows of V (forward), K and Q (backward) that
hold a NaN or an inf (one multiply-add per element finds them) enter the products as 0;
the rows and columns that do see such a value get NaN through their scores instead.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._triton_common import LOG2E, approx_log2, block_d, dot, dot_mode, log2
from ._triton_launch import fast_launch

Tensor = torch.Tensor


@triton.jit
def _tokens(first, num_seqs, LENGTH: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """(sequence within the group, position, batch index, in range) of a tile's BLOCK
    rows: GROUP sequences of LENGTH tokens, then padding. The sequence of a padding row
    is -1, so it is in no sequence a real row or column is in."""
    r = tl.arange(0, BLOCK)
    seq = r // LENGTH
    pos = r - seq * LENGTH
    b = first + seq
    ok = (seq < GROUP) & (b < num_seqs)
    return tl.where(ok, seq, -1), pos, b.to(tl.int64), ok


@triton.jit
def _sees(seq_r, pos_r, seq_c, pos_c, visible, num_prefix, HAS_QUERIES: tl.constexpr,
          SEES_PREFIX: tl.constexpr, SEES_SELF: tl.constexpr, SEES_QUERIES: tl.constexpr):
    """(rows, columns): True where a row sees a column (`QueryMask.sees`, within a sequence)."""
    seen = seq_r[:, None] == seq_c[None, :]
    if HAS_QUERIES:
        query_row = (pos_r >= visible)[:, None]
        query_col = (pos_c >= visible)[None, :]
        if SEES_PREFIX:
            sees_visible = query_row | True
        else:
            sees_visible = ~query_row | (pos_c >= num_prefix)[None, :]
        if SEES_QUERIES:
            sees_query = query_row
        elif SEES_SELF:
            sees_query = query_row & (pos_r[:, None] == pos_c[None, :])
        else:
            sees_query = query_row & False
        seen = seen & tl.where(query_col, sees_query, sees_visible)
    return seen


@triton.jit
def _not_finite(x, AXIS: tl.constexpr):
    """Along the other axis: whether a row (AXIS=1) or column (AXIS=0) of x holds a NaN or
    an inf. One multiply-add per element: x * 0 is NaN exactly for those."""
    check = tl.sum(x.to(tl.float32) * 0.0, AXIS)
    return check != check


@triton.jit
def _oneshot_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_lseb, stride_lseh,
    num_seqs, num_heads, visible, num_prefix, qk_scale,
    SEQ_LEN: tl.constexpr, KEY_LEN: tl.constexpr, GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_QUERIES: tl.constexpr, SEES_PREFIX: tl.constexpr,
    SEES_SELF: tl.constexpr, SEES_QUERIES: tl.constexpr, DOT: tl.constexpr,
    APPROX_LOG2: tl.constexpr,
):
    pid = tl.program_id(0)
    h = (pid % num_heads).to(tl.int64)
    first = (pid // num_heads) * GROUP
    seq_r, pos_r, b_r, ok_r = _tokens(first, num_seqs, SEQ_LEN, GROUP, BLOCK_M)
    seq_c, pos_c, b_c, ok_c = _tokens(first, num_seqs, KEY_LEN, GROUP, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_mask = ok_r[:, None] & d_ok[None, :]
    col_mask = ok_c[:, None] & d_ok[None, :]

    q = tl.load(Q + h * stride_qh + (b_r * stride_qb + pos_r * stride_ql)[:, None]
                + offs_d[None, :] * stride_qd, mask=row_mask, other=0.0)
    k_t = tl.load(K + h * stride_kh + (b_c * stride_kb + pos_c * stride_kl)[None, :]
                  + offs_d[:, None] * stride_kd, mask=d_ok[:, None] & ok_c[None, :], other=0.0)
    v = tl.load(V + h * stride_vh + (b_c * stride_vb + pos_c * stride_vl)[:, None]
                + offs_d[None, :] * stride_vd, mask=col_mask, other=0.0)
    # A value that is not finite is multiplied as 0 in P V (which pairs every row with
    # every column); the rows that see it get NaN through their score of its column.
    v_bad = _not_finite(v, 1)
    v = tl.where(v_bad[:, None], tl.zeros_like(v), v)
    k_t = tl.where(v_bad[None, :], float("nan"), k_t).to(K.dtype.element_ty)
    seen = _sees(seq_r, pos_r, seq_c, pos_c, visible, num_prefix, HAS_QUERIES, SEES_PREFIX,
                 SEES_SELF, SEES_QUERIES)
    # Scores in base 2 (qk_scale holds log2(e)); a positive scale commutes with max.
    s = tl.where(seen, dot(q, k_t, DOT), float("-inf"))
    m = tl.max(s, 1) * qk_scale
    m = tl.where(m == float("-inf"), 0.0, m)  # padding rows see nothing: keep them finite
    p = tl.exp2(s * qk_scale - m[:, None])
    l = tl.sum(p, 1)
    l = tl.where(l == 0.0, 1.0, l)
    acc = dot(p.to(v.dtype), v, DOT)
    tl.store(O + h * stride_oh + (b_r * stride_ob + pos_r * stride_ol)[:, None]
             + offs_d[None, :] * stride_od, (acc * (1.0 / l)[:, None]).to(O.dtype.element_ty),
             mask=row_mask)
    # l >= 1 where a row saw anything (its largest score adds exp2(0)): no denormal input.
    tl.store(LSE + h * stride_lseh + b_r * stride_lseb + pos_r, m + log2(l, APPROX_LOG2),
             mask=ok_r)


@triton.jit
def _oneshot_bwd_kernel(
    Q, K, V, O, DO, LSE, DQ, DK, DV,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd,
    stride_dvb, stride_dvh, stride_dvl, stride_dvd,
    stride_lseb, stride_lseh,
    num_seqs, num_heads, visible, num_prefix, qk_scale, sm_scale,
    SEQ_LEN: tl.constexpr, KEY_LEN: tl.constexpr, GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_QUERIES: tl.constexpr, SEES_PREFIX: tl.constexpr,
    SEES_SELF: tl.constexpr, SEES_QUERIES: tl.constexpr, DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    h = (pid % num_heads).to(tl.int64)
    first = (pid // num_heads) * GROUP
    seq_r, pos_r, b_r, ok_r = _tokens(first, num_seqs, SEQ_LEN, GROUP, BLOCK_M)
    seq_c, pos_c, b_c, ok_c = _tokens(first, num_seqs, KEY_LEN, GROUP, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_mask = ok_r[:, None] & d_ok[None, :]
    col_mask = ok_c[:, None] & d_ok[None, :]
    rows = b_r * stride_qb + pos_r * stride_ql
    cols_k = b_c * stride_kb + pos_c * stride_kl
    cols_v = b_c * stride_vb + pos_c * stride_vl

    q = tl.load(Q + h * stride_qh + rows[:, None] + offs_d[None, :] * stride_qd, mask=row_mask,
                other=0.0)
    k = tl.load(K + h * stride_kh + cols_k[:, None] + offs_d[None, :] * stride_kd,
                mask=col_mask, other=0.0)
    do = tl.load(DO + h * stride_doh + (b_r * stride_dob + pos_r * stride_dol)[:, None]
                 + offs_d[None, :] * stride_dod, mask=row_mask, other=0.0)
    lse = tl.load(LSE + h * stride_lseh + b_r * stride_lseb + pos_r, mask=ok_r, other=0.0)
    seen = _sees(seq_r, pos_r, seq_c, pos_c, visible, num_prefix, HAS_QUERIES, SEES_PREFIX,
                 SEES_SELF, SEES_QUERIES)
    # Selects, not products, clear the unseen pairs: a NaN in lse (a NaN query row) or in
    # dP (a NaN value column) stays out of the rows and columns that do not see it.
    p = tl.where(seen, tl.exp2(dot(q, tl.trans(k), DOT) * qk_scale - lse[:, None]), 0.0)
    v_t = tl.load(V + h * stride_vh + cols_v[None, :] + offs_d[:, None] * stride_vd,
                  mask=d_ok[:, None] & ok_c[None, :], other=0.0)
    # With the whole row in the tile, delta = rowsum(dO * O) is rowsum(P * dP): the
    # softmax's own backward, from the fp32 P and dP at hand (no O read, no 16-bit
    # unpacking). A value column that is not finite makes dP NaN in every row, so the
    # unseen pairs are cleared by a select before the sum.
    pdp = tl.where(seen, p * dot(do, v_t, DOT), 0.0)
    delta = tl.sum(pdp, 1)
    ds = tl.where(seen, (pdp - p * delta[:, None]) * sm_scale, 0.0)
    # P^T dO pairs every column with every row of the tile, the other sequences' rows
    # too, and 0 x NaN is NaN: a gradient row that is not finite enters as 0, and the
    # columns that row sees (its own sequence's) get NaN by a select.
    do_bad = _not_finite(do, 1)
    dv = dot(tl.trans(p).to(do.dtype), tl.where(do_bad[:, None], tl.zeros_like(do), do), DOT)
    dv_bad = tl.max(tl.where(seen & do_bad[:, None], 1, 0), 0) > 0
    dv = tl.where(dv_bad[:, None], float("nan"), dv)
    # dS pairs every row with every column: a key or query that is not finite is
    # multiplied as 0 there; the rows and columns that see it already hold NaN in dS.
    k_bad = _not_finite(k, 1)
    q_bad = _not_finite(q, 1)
    dq = dot(ds.to(k.dtype), tl.where(k_bad[:, None], tl.zeros_like(k), k), DOT)
    dk = dot(tl.trans(ds).to(q.dtype), tl.where(q_bad[:, None], tl.zeros_like(q), q), DOT)
    tl.store(DQ + h * stride_dqh + (b_r * stride_dqb + pos_r * stride_dql)[:, None]
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=row_mask)
    tl.store(DK + h * stride_dkh + (b_c * stride_dkb + pos_c * stride_dkl)[:, None]
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=col_mask)
    tl.store(DV + h * stride_dvh + (b_c * stride_dvb + pos_c * stride_dvl)[:, None]
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=col_mask)


# Relaunches skip Triton's argument binding, as the flash kernels' do (_triton_launch).
fast_launch(_oneshot_fwd_kernel)
fast_launch(_oneshot_bwd_kernel)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def oneshot_config(kind, seq_len, head_dim, dtype, capability, interpreted):
    """(BLOCK_M, sequences per program, num_warps, maxnreg or None) of the one-shot kernel
    for these sequences, or None where the flash kernels run instead."""
    if seq_len == 0:  # nothing to attend (the launchers return before any kernel)
        return None
    if interpreted:
        # The interpreter's tiles: small, so that the tests meet sequence boundaries.
        return (32, 32 // seq_len, 4, None) if seq_len <= 32 else None
    if (dtype not in (torch.float16, torch.bfloat16) or head_dim > 64
            or (capability < 90 and capability != 80) or torch.version.hip is not None
            or seq_len > ONESHOT_MAX_LEN):
        return None
    # bench.static, 37-token crops (bench/NOTES.md): the forward fills a 128-row tile with
    # three sequences on 8 warps (4 warps hold 188 registers, 2 programs per SM); the
    # backward's four score-sized fp32 tiles want 64 rows on 4 warps (128 rows take 226
    # registers, one program per SM). On sm_80 (mma.sync) the backward takes 191
    # registers, 2 programs per SM; capped at 168, 3 programs fit, and 56 bytes spill,
    # stored and loaded once per program (the kernel has no loop).
    if kind == "fwd":
        return (128, 128 // seq_len, 8, None)
    return (64, 64 // seq_len, 4, 168 if capability == 80 else None)


# The longest sequence the GPU rule takes: three to a 128-row forward tile.
ONESHOT_MAX_LEN = 42


@functools.lru_cache(maxsize=256)
def _constants(seq_len, key_len, head_dim, dot_flavour, config, has_queries, mask):
    """The kernels' constexprs, worked out once per kind of call (host time per call)."""
    block_m, group, num_warps, maxnreg = config
    cap = {} if maxnreg is None else dict(maxnreg=maxnreg)
    return dict(cap, SEQ_LEN=seq_len, KEY_LEN=key_len, GROUP=group, HEAD_DIM=head_dim,
                BLOCK_M=block_m, BLOCK_N=1 << max(4, (group * key_len - 1).bit_length()),
                BLOCK_D=block_d(head_dim), HAS_QUERIES=has_queries,
                SEES_PREFIX=mask.sees_prefix, SEES_SELF=mask.sees_self,
                SEES_QUERIES=mask.sees_queries, DOT=dot_flavour, num_warps=num_warps)


def oneshot_fwd(q, k, v, out, lse, config, num_queries, num_prefix, mask, scale):
    """Forward of batched (B, H, L, D) views (any strides) into out and lse."""
    batch, heads, seq_len, head_dim = q.shape
    c = _constants(seq_len, k.shape[2], head_dim, dot_mode(q.dtype), config, num_queries > 0, mask)
    programs = -(-batch // c["GROUP"]) * heads
    _oneshot_fwd_kernel.run(
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        lse.stride(0), lse.stride(1), batch, heads, seq_len - num_queries, num_prefix,
        scale * LOG2E, grid=(programs,), warmup=False, APPROX_LOG2=approx_log2(), **c)


def oneshot_bwd(grad_out, q, k, v, out, lse, dq, dk, dv, config, num_queries, num_prefix, mask,
                scale):
    """Backward of batched views into dq, dk, dv: one launch, delta computed inside."""
    batch, heads, seq_len, head_dim = q.shape
    c = _constants(seq_len, k.shape[2], head_dim, dot_mode(q.dtype), config, num_queries > 0, mask)
    programs = -(-batch // c["GROUP"]) * heads
    _oneshot_bwd_kernel.run(
        q, k, v, out, grad_out, lse, dq, dk, dv, *q.stride(), *k.stride(), *v.stride(),
        *out.stride(), *grad_out.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
        lse.stride(0), lse.stride(1), batch, heads, seq_len - num_queries, num_prefix,
        scale * LOG2E, scale, grid=(programs,), warmup=False, **c)
