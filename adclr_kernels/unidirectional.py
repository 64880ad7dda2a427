"""Fused unidirectional attention in Triton: forward, backward, launchers, custom ops.

Layout of one sequence (V = P + N visible tokens, L = V + Q):

    [ P prefix | N raw patches | Q query tokens ]

Rows < V see columns < V. Query rows see the raw columns, plus the prefix with
SEES_PREFIX, plus their own column with SEES_SELF, plus all query columns with
SEES_QUERIES (see `reference.py` for the same rule in PyTorch).

One launch handles raw and query rows together. A row block walks at most two column
ranges, each only over tiles it can see:
  1. the visible columns [lo, V), where lo = P for a block of query rows only when
     they do not see the prefix (the prefix tiles are skipped, not masked);
  2. the query columns: all of [V, L) with SEES_QUERIES, just the diagonal block with
     SEES_SELF, nothing otherwise.
Scores are kept in base 2 (the scale is folded with log2(e)) so the softmax uses exp2;
the saved logsumexp is in the same units and is only read by this file's backward.

The backward is FlashAttention-2's: a pre-pass computes delta = rowsum(dO * O), then
one kernel where program j owns key block j (accumulating dK, dV over the rows that
see it) and row block j (accumulating dQ over the columns it sees). Every gradient
element has exactly one writer, so there are no atomics and the result is bitwise
reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import triton_interpreter_enabled

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _sees(r, c, seq_len, col_end, visible, num_prefix,
          SEES_PREFIX: tl.constexpr, SEES_SELF: tl.constexpr, SEES_QUERIES: tl.constexpr):
    """Mask rule on broadcastable row indices r and column indices c (any orientation).

    col_end bounds the column range being walked, so a tile that straddles V is not
    counted by both ranges.
    """
    query_row = r >= visible
    if SEES_PREFIX:
        sees_visible = c < visible
    else:
        sees_visible = (c < visible) & ((r < visible) | (c >= num_prefix))
    if SEES_QUERIES:
        sees = sees_visible | (query_row & (c >= visible))
    elif SEES_SELF:
        sees = sees_visible | (query_row & (c == r))
    else:
        sees = sees_visible & (r >= 0)
    return sees & (c < col_end) & (r < seq_len)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    # fp32 inputs are multiplied in full fp32 ("ieee"), not tf32, so that float32
    # results meet the float32 reference. DOT_FP32 is also how bf16 runs in the
    # interpreter, whose bf16 dot is wrong.
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _sequence(num_blocks, num_heads, seq_len, key_len, visible, CU_SEQLENS, NUM_QUERIES,
              VARLEN: tl.constexpr):
    """(block, b, h, first token, seq_len, key_len, visible) of this program.

    The grid is 1-D with the block index fastest, so the programs of one (sequence,
    head) run side by side and share its K/V (or Q/dO) in L2 instead of fetching them
    from memory once per block. Dense inputs pass the lengths as scalars; packed
    (varlen) inputs read them from cu_seqlens and the per-sequence query counts, so one
    kernel serves both.
    """
    pid = tl.program_id(0)
    block = pid % num_blocks
    pid_bh = pid // num_blocks
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    start = b * 0
    if VARLEN:
        start = tl.load(CU_SEQLENS + b)
        seq_len = tl.load(CU_SEQLENS + b + 1) - start
        key_len = seq_len
        visible = seq_len - tl.load(NUM_QUERIES + b)
    return block, b.to(tl.int64), h.to(tl.int64), start.to(tl.int64), seq_len, key_len, visible


@triton.jit
def _key_ranges(m0, seq_len, key_len, visible, num_prefix, BLOCK_M: tl.constexpr,
                SEES_PREFIX: tl.constexpr, SEES_SELF: tl.constexpr, SEES_QUERIES: tl.constexpr):
    """Column ranges [lo1, hi1) (visible keys) and [lo2, hi2) (query keys) for rows m0.."""
    m1 = m0 + BLOCK_M
    lo1 = m0 * 0
    hi1 = visible
    if not SEES_PREFIX:
        if m0 >= visible:
            lo1 = num_prefix
    lo2 = visible
    hi2 = visible
    if m1 > visible:
        if SEES_QUERIES:
            hi2 = key_len
        elif SEES_SELF:
            lo2 = tl.maximum(m0, visible)
            hi2 = tl.minimum(m1, key_len)
    if m0 >= seq_len:  # a row block past the end of a shorter packed sequence
        hi1 = lo1
        hi2 = lo2
    return lo1, hi1, lo2, hi2


@triton.jit
def _attend_key_range(acc, m_i, l_i, q, rows, lo, hi, k_base, v_base,
                      stride_kl, stride_kd, stride_vl, stride_vd,
                      seq_len, visible, num_prefix, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      SEES_PREFIX: tl.constexpr, SEES_SELF: tl.constexpr,
                      SEES_QUERIES: tl.constexpr, DOT_FP32: tl.constexpr):
    """Online-softmax accumulation of one row block over key columns [lo, hi)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for col_start in range(lo, hi, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        k_t = tl.load(k_base + cols[None, :] * stride_kl + offs_d[:, None] * stride_kd,
                      mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = _dot(q, k_t, DOT_FP32) * qk_scale
        visible_here = _sees(rows[:, None], cols[None, :], seq_len, hi, visible, num_prefix,
                             SEES_PREFIX, SEES_SELF, SEES_QUERIES)
        s = tl.where(visible_here, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen nothing yet keeps m = -inf; subtract 0 instead so that
        # exp2 gives 0 rather than NaN (-inf - -inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _unidirectional_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS, NUM_QUERIES,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_lseb, stride_lseh,
    num_blocks, num_heads, seq_len, key_len, visible, num_prefix, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SEES_PREFIX: tl.constexpr, SEES_SELF: tl.constexpr,
    SEES_QUERIES: tl.constexpr, DOT_FP32: tl.constexpr, VARLEN: tl.constexpr,
):
    block, b, h, start, seq_len, key_len, visible = _sequence(
        num_blocks, num_heads, seq_len, key_len, visible, CU_SEQLENS, NUM_QUERIES, VARLEN)
    m0 = block * BLOCK_M
    q_base = Q + b * stride_qb + h * stride_qh + start * stride_ql
    k_base = K + b * stride_kb + h * stride_kh + start * stride_kl
    v_base = V + b * stride_vb + h * stride_vh + start * stride_vl

    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < seq_len
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_base + rows[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo1, hi1, lo2, hi2 = _key_ranges(m0, seq_len, key_len, visible, num_prefix, BLOCK_M,
                                     SEES_PREFIX, SEES_SELF, SEES_QUERIES)
    acc, m_i, l_i = _attend_key_range(  # loop: fwd.visible
        acc, m_i, l_i, q, rows, lo1, hi1, k_base, v_base, stride_kl, stride_kd,
        stride_vl, stride_vd, seq_len, visible, num_prefix, qk_scale,
        HEAD_DIM, BLOCK_N, BLOCK_D, SEES_PREFIX, SEES_SELF, SEES_QUERIES, DOT_FP32)
    acc, m_i, l_i = _attend_key_range(  # loop: fwd.queries
        acc, m_i, l_i, q, rows, lo2, hi2, k_base, v_base, stride_kl, stride_kd,
        stride_vl, stride_vd, seq_len, visible, num_prefix, qk_scale,
        HEAD_DIM, BLOCK_N, BLOCK_D, SEES_PREFIX, SEES_SELF, SEES_QUERIES, DOT_FP32)

    # Rows past seq_len saw nothing (l = 0); they are not stored, but keep them finite.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = (O + b * stride_ob + h * stride_oh + (start + rows[:, None]) * stride_ol
              + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b * stride_lseb + h * stride_lseh + start + rows, m_i + tl.log2(l_safe),
             mask=row_ok)


@triton.jit
def _unidirectional_bwd_delta_kernel(
    O, DO, DELTA, CU_SEQLENS, NUM_QUERIES,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_lseb, stride_lseh,
    num_blocks, num_heads, seq_len,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr,
):
    block, b, h, start, seq_len, _, _ = _sequence(num_blocks, num_heads, seq_len, seq_len, seq_len,
                                                  CU_SEQLENS, NUM_QUERIES, VARLEN)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + (start + rows[:, None]) * stride_ol
                + offs_d[None, :] * stride_od, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + (start + rows[:, None]) * stride_dol
                 + offs_d[None, :] * stride_dod, mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + b * stride_lseb + h * stride_lseh + start + rows, tl.sum(o * do, 1),
             mask=rows < seq_len)


@triton.jit
def _dkdv_row_range(n0, seq_len, visible, num_prefix, BLOCK_N: tl.constexpr,
                    SEES_PREFIX: tl.constexpr, SEES_SELF: tl.constexpr, SEES_QUERIES: tl.constexpr):
    """Rows [lo, hi) that can see some column of key block n0..n0+BLOCK_N."""
    n1 = n0 + BLOCK_N
    lo = n0 * 0
    hi = n0 * 0
    if n0 < visible:
        hi = visible
        # Query rows see this block unless it holds only prefix columns they skip.
        if SEES_PREFIX or n1 > num_prefix:
            hi = seq_len
    elif SEES_QUERIES:
        lo = visible
        hi = seq_len
    elif SEES_SELF:
        lo = n0
        hi = tl.minimum(n1, seq_len)
    return lo, hi


@triton.jit
def _dq_key_range(dq, q, do, lse, delta, rows, lo, hi, k_base, v_base,
                  stride_kl, stride_kd, stride_vl, stride_vd, seq_len, visible, num_prefix,
                  qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  SEES_PREFIX: tl.constexpr, SEES_SELF: tl.constexpr,
                  SEES_QUERIES: tl.constexpr, DOT_FP32: tl.constexpr):
    """dQ of one row block accumulated over key columns [lo, hi), probabilities recomputed."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for col_start in range(lo, hi, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        t_mask = d_ok[:, None] & (cols < hi)[None, :]
        k_t = tl.load(k_base + cols[None, :] * stride_kl + offs_d[:, None] * stride_kd, mask=t_mask, other=0.0)
        v_t = tl.load(v_base + cols[None, :] * stride_vl + offs_d[:, None] * stride_vd, mask=t_mask, other=0.0)
        p = tl.exp2(_dot(q, k_t, DOT_FP32) * qk_scale - lse[:, None])
        sees = _sees(rows[:, None], cols[None, :], seq_len, hi, visible, num_prefix,
                     SEES_PREFIX, SEES_SELF, SEES_QUERIES)
        p = tl.where(sees, p, 0.0)
        ds = p * (_dot(do, v_t, DOT_FP32) - delta[:, None])
        dq += _dot(ds.to(k_t.dtype), tl.trans(k_t), DOT_FP32)
    return dq


@triton.jit
def _unidirectional_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, CU_SEQLENS, NUM_QUERIES,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd,
    stride_dvb, stride_dvh, stride_dvl, stride_dvd,
    stride_lseb, stride_lseh,
    num_blocks, num_heads, seq_len, key_len, visible, num_prefix, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
    BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
    SEES_PREFIX: tl.constexpr, SEES_SELF: tl.constexpr,
    SEES_QUERIES: tl.constexpr, DOT_FP32: tl.constexpr, VARLEN: tl.constexpr,
):
    block, b, h, start, seq_len, key_len, visible = _sequence(
        num_blocks, num_heads, seq_len, key_len, visible, CU_SEQLENS, NUM_QUERIES, VARLEN)
    q_base = Q + b * stride_qb + h * stride_qh + start * stride_ql
    k_base = K + b * stride_kb + h * stride_kh + start * stride_kl
    v_base = V + b * stride_vb + h * stride_vh + start * stride_vl
    do_base = DO + b * stride_dob + h * stride_doh + start * stride_dol
    lse_base = LSE + b * stride_lseb + h * stride_lseh + start
    delta_base = DELTA + b * stride_lseb + h * stride_lseh + start
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    # ---- dK, dV for key block `block`: walk the rows that see it, transposed tiles.
    n0 = block * BLOCK_N1
    if n0 < key_len:
        cols = n0 + tl.arange(0, BLOCK_N1)
        col_ok = cols < key_len
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
        lo, hi = _dkdv_row_range(n0, seq_len, visible, num_prefix, BLOCK_N1,
                                 SEES_PREFIX, SEES_SELF, SEES_QUERIES)
        for row_start in range(lo, hi, BLOCK_M1):  # loop: bwd.dkdv
            rows = row_start + tl.arange(0, BLOCK_M1)
            row_ok = rows < hi
            t_mask = d_ok[:, None] & row_ok[None, :]
            q_t = tl.load(q_base + rows[None, :] * stride_ql + offs_d[:, None] * stride_qd, mask=t_mask, other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_dol + offs_d[None, :] * stride_dod,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
            s_t = _dot(k, q_t, DOT_FP32) * qk_scale
            p_t = tl.exp2(s_t - lse[None, :])
            sees = _sees(rows[None, :], cols[:, None], hi, key_len, visible, num_prefix,
                         SEES_PREFIX, SEES_SELF, SEES_QUERIES)
            p_t = tl.where(sees, p_t, 0.0)
            dv += _dot(p_t.to(do.dtype), do, DOT_FP32)
            dp_t = _dot(v, tl.trans(do), DOT_FP32)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _dot(ds_t.to(q_t.dtype), tl.trans(q_t), DOT_FP32)
        dk = dk * sm_scale
        tl.store(DK + b * stride_dkb + h * stride_dkh + (start + cols[:, None]) * stride_dkl
                 + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + b * stride_dvb + h * stride_dvh + (start + cols[:, None]) * stride_dvl
                 + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)

    # ---- dQ for row block `block`: walk the same column ranges as the forward.
    m0 = block * BLOCK_M2
    if m0 < seq_len:
        rows = m0 + tl.arange(0, BLOCK_M2)
        row_ok = rows < seq_len
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_ql + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dol + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0)
        lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M2, BLOCK_D], tl.float32)
        lo1, hi1, lo2, hi2 = _key_ranges(m0, seq_len, key_len, visible, num_prefix, BLOCK_M2,
                                         SEES_PREFIX, SEES_SELF, SEES_QUERIES)
        dq = _dq_key_range(dq, q, do, lse, delta, rows, lo1, hi1, k_base, v_base,  # loop: bwd.dq_visible
                           stride_kl, stride_kd, stride_vl, stride_vd, seq_len, visible,
                           num_prefix, qk_scale, HEAD_DIM, BLOCK_N2, BLOCK_D,
                           SEES_PREFIX, SEES_SELF, SEES_QUERIES, DOT_FP32)
        dq = _dq_key_range(dq, q, do, lse, delta, rows, lo2, hi2, k_base, v_base,  # loop: bwd.dq_queries
                           stride_kl, stride_kd, stride_vl, stride_vd, seq_len, visible,
                           num_prefix, qk_scale, HEAD_DIM, BLOCK_N2, BLOCK_D,
                           SEES_PREFIX, SEES_SELF, SEES_QUERIES, DOT_FP32)
        dq = dq * sm_scale
        tl.store(DQ + b * stride_dqb + h * stride_dqh + (start + rows[:, None]) * stride_dql
                 + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _fwd_config(head_dim, dtype):
    if triton_interpreter_enabled():
        # The interpreter runs each program in numpy: big tiles are fewer Python loops.
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_N=64 if head_dim <= 64 else 32, num_warps=4, num_stages=2)


def _bwd_config(head_dim, dtype):
    if triton_interpreter_enabled():
        return dict(BLOCK_M1=16, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=16, num_warps=4, num_stages=1)
    if head_dim > 128 or (dtype == torch.float32 and head_dim > 64):
        # Wide fp32 (or very wide) tiles need over 99 KB of shared memory at 64 keys per
        # block (over 164 KB at head_dim 256): more than consumer GPUs (sm_86/89) or an
        # A100 have. Halve the key and row blocks there.
        return dict(BLOCK_M1=32, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=32, num_warps=4, num_stages=1)
    return dict(BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32, num_warps=4, num_stages=2)


def _block_d(head_dim):
    # tl.dot needs every dimension >= 16; other head dims are padded inside the kernel.
    return max(16, triton.next_power_of_2(head_dim))


def _dot_fp32(dtype):
    return dtype == torch.float32 or (dtype == torch.bfloat16 and triton_interpreter_enabled())


def _empty_bhld(batch, heads, seq, head_dim, like):
    # (batch, seq, heads, head_dim) memory seen as (batch, heads, seq, head_dim): the
    # caller's output projection reads it as (batch, seq, heads * head_dim) for free.
    return torch.empty(batch, seq, heads, head_dim, dtype=like.dtype, device=like.device).transpose(1, 2)


def _empty_rows(batch, heads, seq, like):
    """Per-row fp32 statistics (logsumexp, delta)."""
    return torch.empty(batch, heads, seq, dtype=torch.float32, device=like.device)


def _empty_thd(tokens, heads, head_dim, like):
    """A packed (tokens, heads, head_dim) buffer, allocated like the dense ones."""
    return _empty_bhld(1, heads, tokens, head_dim, like)[0].transpose(0, 1)


def _bhld_strides(t):
    """Strides as (batch, head, token, dim); packed (tokens, heads, dim) tensors have no batch."""
    if t.dim() == 3:
        return (0, t.stride(1), t.stride(0), t.stride(2))
    return t.stride()


def _flags(query_sees_prefix, query_sees_self, query_sees_queries):
    return dict(SEES_PREFIX=query_sees_prefix,
                SEES_SELF=query_sees_self or query_sees_queries,
                SEES_QUERIES=query_sees_queries)


# A problem's geometry: (num_seqs, heads, max_len, seq_len, key_len, visible, cu_seqlens,
# num_queries). Dense inputs give the lengths and no tensors; packed inputs give tensors
# and the kernel reads each sequence's lengths from them.


def _launch_fwd(q, k, v, out, lse, lse_strides, geometry, num_prefix, flags, scale):
    num_seqs, heads, max_len, seq_len, key_len, visible, cu_seqlens, num_queries = geometry
    head_dim = q.shape[-1]
    cfg = _fwd_config(head_dim, q.dtype)
    blocks = triton.cdiv(max_len, cfg["BLOCK_M"])
    _unidirectional_fwd_kernel[(blocks * num_seqs * heads,)](
        q, k, v, out, lse, cu_seqlens, num_queries,
        *_bhld_strides(q), *_bhld_strides(k), *_bhld_strides(v), *_bhld_strides(out), *lse_strides,
        blocks, heads, seq_len, key_len, visible, num_prefix, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), DOT_FP32=_dot_fp32(q.dtype),
        VARLEN=cu_seqlens is not None, **flags, **cfg)


def _launch_bwd(grad_out, q, k, v, out, lse, dq, dk, dv, lse_strides, geometry, num_prefix,
                flags, scale):
    num_seqs, heads, max_len, seq_len, key_len, visible, cu_seqlens, num_queries = geometry
    head_dim = q.shape[-1]
    block_d = _block_d(head_dim)
    varlen = cu_seqlens is not None
    delta = _empty_rows(1, 1, lse.numel(), lse).view(lse.shape)
    delta_rows = 64
    blocks = triton.cdiv(max_len, delta_rows)
    _unidirectional_bwd_delta_kernel[(blocks * num_seqs * heads,)](
        out, grad_out, delta, cu_seqlens, num_queries,
        *_bhld_strides(out), *_bhld_strides(grad_out), *lse_strides, blocks, heads, seq_len,
        HEAD_DIM=head_dim, BLOCK_M=delta_rows, BLOCK_D=block_d, VARLEN=varlen)
    cfg = _bwd_config(head_dim, q.dtype)
    blocks = triton.cdiv(max_len, min(cfg["BLOCK_N1"], cfg["BLOCK_M2"]))
    _unidirectional_bwd_kernel[(blocks * num_seqs * heads,)](
        q, k, v, grad_out, lse, delta, dq, dk, dv, cu_seqlens, num_queries,
        *_bhld_strides(q), *_bhld_strides(k), *_bhld_strides(v), *_bhld_strides(grad_out),
        *_bhld_strides(dq), *_bhld_strides(dk), *_bhld_strides(dv), *lse_strides,
        blocks, heads, seq_len, key_len, visible, num_prefix, scale * LOG2E, scale,
        HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_FP32=_dot_fp32(q.dtype), VARLEN=varlen,
        **flags, **cfg)


def unidirectional_fwd(q, k, v, num_queries, num_prefix, query_sees_prefix, query_sees_self,
                       query_sees_queries, scale):
    """Dense forward. Returns (out, lse); lse is base-2, (batch, heads, seq) fp32."""
    batch, heads, seq, head_dim = q.shape
    out = _empty_bhld(batch, heads, seq, head_dim, q)
    lse = _empty_rows(batch, heads, seq, q)
    if out.numel() > 0:
        geometry = (batch, heads, seq, seq, k.shape[2], seq - num_queries, None, None)
        _launch_fwd(q, k, v, out, lse, (heads * seq, seq), geometry, num_prefix,
                    _flags(query_sees_prefix, query_sees_self, query_sees_queries), scale)
    return out, lse


def unidirectional_bwd(grad_out, q, k, v, out, lse, num_queries, num_prefix, query_sees_prefix,
                       query_sees_self, query_sees_queries, scale):
    """Dense backward. Returns (dq, dk, dv) in the inputs' dtype."""
    batch, heads, seq, head_dim = q.shape
    key_len = k.shape[2]
    dq = _empty_bhld(batch, heads, seq, head_dim, q)
    dk = _empty_bhld(batch, heads, key_len, head_dim, k)
    dv = _empty_bhld(batch, heads, key_len, head_dim, v)
    if dq.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    geometry = (batch, heads, seq, seq, key_len, seq - num_queries, None, None)
    _launch_bwd(grad_out, q, k, v, out, lse, dq, dk, dv, (heads * seq, seq), geometry, num_prefix,
                _flags(query_sees_prefix, query_sees_self, query_sees_queries), scale)
    return dq, dk, dv


def unidirectional_varlen_fwd(q, k, v, cu_seqlens, num_queries, max_seqlen, num_prefix,
                              query_sees_prefix, query_sees_self, query_sees_queries, scale):
    """Packed forward over (tokens, heads, head_dim). Returns (out, lse (heads, tokens))."""
    tokens, heads, head_dim = q.shape
    out = _empty_thd(tokens, heads, head_dim, q)
    lse = _empty_rows(1, heads, tokens, q)[0]
    if out.numel() > 0:
        geometry = (cu_seqlens.numel() - 1, heads, max_seqlen, 0, 0, 0, cu_seqlens, num_queries)
        _launch_fwd(q, k, v, out, lse, (0, tokens), geometry, num_prefix,
                    _flags(query_sees_prefix, query_sees_self, query_sees_queries), scale)
    return out, lse


def unidirectional_varlen_bwd(grad_out, q, k, v, out, lse, cu_seqlens, num_queries, max_seqlen,
                              num_prefix, query_sees_prefix, query_sees_self, query_sees_queries,
                              scale):
    tokens, heads, head_dim = q.shape
    dq, dk, dv = (_empty_thd(tokens, heads, head_dim, t) for t in (q, k, v))
    if dq.numel() > 0:
        geometry = (cu_seqlens.numel() - 1, heads, max_seqlen, 0, 0, 0, cu_seqlens, num_queries)
        _launch_bwd(grad_out, q, k, v, out, lse, dq, dk, dv, (0, tokens), geometry, num_prefix,
                    _flags(query_sees_prefix, query_sees_self, query_sees_queries), scale)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------
# Custom ops and autograd
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("adclr_kernels::unidirectional_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_queries: int, num_prefix: int,
            query_sees_prefix: bool, query_sees_self: bool, query_sees_queries: bool,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return unidirectional_fwd(q, k, v, num_queries, num_prefix, query_sees_prefix,
                              query_sees_self, query_sees_queries, scale)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, num_queries, num_prefix, query_sees_prefix, query_sees_self,
              query_sees_queries, scale):
    batch, heads, seq, head_dim = q.shape
    return (_empty_bhld(batch, heads, seq, head_dim, q),
            _empty_rows(batch, heads, seq, q))


@torch.library.custom_op("adclr_kernels::unidirectional_attention_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, num_queries: int, num_prefix: int,
            query_sees_prefix: bool, query_sees_self: bool, query_sees_queries: bool,
            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return unidirectional_bwd(grad_out, q, k, v, out, lse, num_queries, num_prefix,
                              query_sees_prefix, query_sees_self, query_sees_queries, scale)


@_bwd_op.register_fake
def _bwd_fake(grad_out, q, k, v, out, lse, num_queries, num_prefix, query_sees_prefix,
              query_sees_self, query_sees_queries, scale):
    batch, heads, seq, head_dim = q.shape
    return (_empty_bhld(batch, heads, seq, head_dim, q),
            _empty_bhld(batch, heads, k.shape[2], head_dim, k),
            _empty_bhld(batch, heads, k.shape[2], head_dim, v))


def _setup_context(ctx, inputs, output):
    q, k, v, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = args
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_op(grad_out, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("adclr_kernels::unidirectional_attention_varlen_fwd", mutates_args=())
def _varlen_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                   num_queries: torch.Tensor, max_seqlen: int, num_prefix: int,
                   query_sees_prefix: bool, query_sees_self: bool, query_sees_queries: bool,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return unidirectional_varlen_fwd(q, k, v, cu_seqlens, num_queries, max_seqlen, num_prefix,
                                     query_sees_prefix, query_sees_self, query_sees_queries, scale)


@_varlen_fwd_op.register_fake
def _varlen_fwd_fake(q, k, v, cu_seqlens, num_queries, max_seqlen, num_prefix, *flags_and_scale):
    tokens, heads, head_dim = q.shape
    return _empty_thd(tokens, heads, head_dim, q), _empty_rows(1, heads, tokens, q)[0]


@torch.library.custom_op("adclr_kernels::unidirectional_attention_varlen_bwd", mutates_args=())
def _varlen_bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor,
                   num_queries: torch.Tensor, max_seqlen: int, num_prefix: int,
                   query_sees_prefix: bool, query_sees_self: bool, query_sees_queries: bool,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return unidirectional_varlen_bwd(grad_out, q, k, v, out, lse, cu_seqlens, num_queries,
                                     max_seqlen, num_prefix, query_sees_prefix, query_sees_self,
                                     query_sees_queries, scale)


@_varlen_bwd_op.register_fake
def _varlen_bwd_fake(grad_out, q, k, v, *rest):
    return tuple(_empty_thd(*t.shape, t) for t in (q, k, v))


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, num_queries, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, num_queries)
    ctx.args = args
    ctx.mark_non_differentiable(lse)


def _varlen_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens, num_queries = ctx.saved_tensors
    dq, dk, dv = _varlen_bwd_op(grad_out, q, k, v, out, lse, cu_seqlens, num_queries, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_varlen_fwd_op.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


def triton_unidirectional_attention(q, k, v, num_queries, num_prefix, *, query_sees_prefix=False,
                                    query_sees_self=False, query_sees_queries=False, scale=None):
    """The Triton backend; inputs are assumed checked by `unidirectional_attention`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, _ = _fwd_op(q, k, v, num_queries, num_prefix, query_sees_prefix, query_sees_self,
                     query_sees_queries, scale)
    return out
