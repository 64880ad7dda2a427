"""Fused unidirectional attention in Triton: forward, backward, launchers, custom ops.

Layout of one sequence (V = P + N visible tokens, L = V + Q):

    [ P prefix | N raw patches | Q query tokens ]

Rows < V see columns < V. Query rows see the raw columns, plus the prefix with
SEES_PREFIX, plus their own column with SEES_SELF, plus all query columns with
SEES_QUERIES (`mask.py` states the same rule in PyTorch).

One launch handles raw and query rows together. A row block walks at most two column
ranges, each only over tiles it can see:
  1. the visible columns [lo, V), where lo = P for a block of query rows only when
     they do not see the prefix (the prefix tiles are skipped, not masked);
  2. the query columns [V, L) with SEES_QUERIES; with SEES_SELF alone, each query row's
     own column, row by row (no tile).
Scores are kept in base 2 (the scale is folded with log2(e)) so the softmax uses exp2;
the saved logsumexp is in the same units and is only read by this file's backward.

The backward is FlashAttention-2's: a pre-pass computes delta = rowsum(dO * O) (stored
beside each row's logsumexp, one 64-bit word a row, so the loops read both at once), then
one kernel where program j owns key block j (accumulating dK, dV over the rows that
see it) and row block j (accumulating dQ over the columns it sees). A sequence short
enough for one program skips the pre-pass: its program computes delta. Every gradient
element has exactly one writer, so there are no atomics and the result is bitwise
reproducible (the one-pass backward below reduces dQ, but only into its own program's
scratch, one thread per element). Short batched sequences (local crops) go to the one-shot kernels of
`attention_triton_short.py` instead, where the GPU rule there says they are faster.
Batched and large packed batches under the default rule (no option), or with
query_sees_prefix alone, take the one-pass backward instead (`_onepass_bwd_kernel`, where
`onepass_config` says so): one program per (sequence, head) computes delta, then walks
its key blocks once, dQ reduced into a program-private fp32 scratch (one thread per
element, so still bitwise reproducible): one launch, each score tile made once.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._triton_common import (LOG2E, ROWSUM_N, SHARED_MEMORY_PER_PROGRAM, approx_log2, block_d,
                             device_capability, dot, dot_mode, log2, ones_in_column_zero)
from ._triton_launch import fast_launch
from .attention_triton_short import oneshot_bwd, oneshot_config, oneshot_fwd
from .backends import triton_interpreter_enabled
from .mask import QueryMask, query_mask

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
# What a row cannot see cannot reach it: a NaN or inf in a column a row does not attend
# to leaves that row as a finite value there would. A probability of 0 is not enough for
# that (0 x NaN is NaN inside a product), so no product pairs a row with a value, key or
# query it does not see:
# - forward and dQ (a row sums over columns): a tile is walked only by rows that all see
#   its columns, or its result is put back for those that see none (raw rows around the
#   query-key tiles). The prefix columns of a block holding raw and query rows share a
#   narrow tile with raw columns every row sees. In the forward their non-finite values
#   go into its product as 0 and poison their columns' keys instead, so that the raw
#   rows' scores there are NaN (and so their logsumexp) and the query rows' -inf as
#   always; in dQ their non-finite keys go in as 0, and a raw row that sees one has its
#   NaN from the logsumexp. A query row's own column under SEES_SELF is walked row by
#   row (no tile).
# - dK, dV (a column sums over rows): the rows are walked in at most two passes, each of
#   rows that see the same columns of the block; after a pass the columns its rows do not
#   see are set back (a column's products only reach its own row of dK and dV).
# Interior tiles, seen whole by every row of the block, pay nothing for any of this, and
# nothing but the tensor-core products writes an accumulator inside a tile loop (ptxas
# serializes every wgmma of a kernel that does).


# Which mask a tile loop applies (a constexpr, so each loop is compiled for its case).
NO_MASK = tl.constexpr(0)      # every (row, column) of every tile is seen
COLUMN_MASK = tl.constexpr(1)  # columns past the range end are not (the last, partial tile)


@triton.jit
def _program(num_blocks, num_heads, num_seqs, seq_len, key_len, visible, total_tokens,
             CU_SEQLENS, NUM_QUERIES, TILES, VARLEN: tl.constexpr, TILED: tl.constexpr):
    """(block, b, h, first token, seq_len, key_len, visible) of this program.

    - batched: the grid is 1-D with the block index fastest, so the programs of one
      (sequence, head) run side by side and share its K/V (or Q/dO) in L2.
    - packed with a tile table (from a `VarlenLayout` or `varlen_schedule`): one program
      per (sequence, block) that has work and head, heads fastest, so that the table's
      longest-first order is the launch order (its idle slots, if any, last).
    - packed from cu_seqlens alone: as batched, up to the caller's max_seqlen (checked on
      the device against the offsets).
    What is read from memory is clamped: offsets into [0, total_tokens], a tile's sequence
    into [0, num_seqs) and its block into [0, tiles) (no sequence has more blocks than the
    table has tiles; a block past its sequence's end has no rows). So no cu_seqlens,
    num_queries or tile table, however wrong or edited, moves a load or store outside the
    tensors.
    """
    pid = tl.program_id(0)
    if TILED:
        tile = pid // num_heads
        h = pid % num_heads
        b = tl.minimum(tl.maximum(tl.load(TILES + 2 * tile), 0), num_seqs - 1)
        block = tl.minimum(tl.maximum(tl.load(TILES + 2 * tile + 1), 0), num_blocks - 1)
    else:
        block = pid % num_blocks
        pid_bh = pid // num_blocks
        b = pid_bh // num_heads
        h = pid_bh % num_heads
    start = b * 0
    if VARLEN:
        start = tl.minimum(tl.maximum(tl.load(CU_SEQLENS + b), 0), total_tokens)
        seq_len = tl.minimum(tl.maximum(tl.load(CU_SEQLENS + b + 1), start), total_tokens) - start
        key_len = seq_len
        visible = seq_len - tl.minimum(tl.maximum(tl.load(NUM_QUERIES + b), 0), seq_len)
    return block, b.to(tl.int64), h.to(tl.int64), start.to(tl.int64), seq_len, key_len, visible


@triton.jit
def _key_ranges(m0, seq_len, key_len, visible, num_prefix, BLOCK_M: tl.constexpr,
                SEES_PREFIX: tl.constexpr, SEES_QUERIES: tl.constexpr):
    """Column ranges [lo1, hi1) (visible keys) and [lo2, hi2) (query keys, with
    SEES_QUERIES) the tiles of row block m0.. walk, and the prefix columns [0, p_hi) its
    raw rows take apart.

    Without SEES_PREFIX a block holding query rows starts its tiles past the prefix; if
    it also holds raw rows, they take the prefix columns apart (CLS and registers: a
    few). With SEES_SELF alone a query row's own column is added row by row.
    """
    lo1 = m0 * 0
    hi1 = visible
    if not SEES_PREFIX:
        if (m0 + BLOCK_M > visible) & (visible < seq_len):
            lo1 = num_prefix
    p_hi = m0 * 0
    if m0 < visible:
        p_hi = lo1
    lo2 = visible
    hi2 = visible
    if SEES_QUERIES:
        if m0 + BLOCK_M > visible:
            hi2 = key_len
    if m0 >= seq_len:  # a row block past the end of a shorter packed sequence
        hi1 = lo1
        hi2 = lo2
        p_hi = m0 * 0
    return lo1, hi1, lo2, hi2, p_hi


# How far (in log2 units) a row's maximum may rise above the m its interior tiles subtract
# before they rescale (FlashAttention-4's conditional rescaling): p stays at most 2^15,
# which fp16 holds (65504), and a product with a 16-bit value stays far inside fp32.
RESCALE_SLACK = tl.constexpr(15.0)


@triton.jit
def _attend_tiles(acc, m_i, l_i, q, lo, hi, k_base, v_base, stride_kl, stride_kd, stride_vl,
                  stride_vd, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, MASK: tl.constexpr, DOT: tl.constexpr,
                  ROWSUM_MMA: tl.constexpr = False):
    """Online-softmax accumulation of one row block over key columns [lo, hi).

    Scores stay raw until the exponent: m is kept scaled (scale * log2(e), so exp2 is
    the softmax's exp) and s * qk_scale - m is one fused multiply-add per element.
    """
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    if ROWSUM_MMA:
        # l accumulates on the tensor cores, as column 0 of P @ E issued beside P @ V
        # (`ones_in_column_zero`), summing the 16-bit p that P @ V weighs. Taken by the
        # unmasked loop of 16-bit inputs; the masked one rescales every tile, where the
        # product did not pay.
        tl.static_assert(MASK == NO_MASK and DOT == "native")
        ones = ones_in_column_zero(BLOCK_N, q.dtype)
        l_acc = tl.where(tl.arange(0, ROWSUM_N)[None, :] == 0, l_i[:, None], 0.0)
    for col_start in range(lo, hi, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        if MASK == NO_MASK:
            k_t = tl.load(k_base + cols[None, :] * stride_kl + offs_d[:, None] * stride_kd,
                          mask=d_ok[:, None], other=0.0)
            s = dot(q, k_t, DOT)
            # A positive scale commutes with max (checked by the op).
            m_tile = tl.max(s, 1) * qk_scale
            # 16-bit inputs: a row's m only moves up when its maximum has grown by more
            # than RESCALE_SLACK. Below that p = exp2(s - m) is larger than 1 but just as
            # exact (fp32 sums, 16-bit p), and a tile where no row's m moves skips
            # rescaling acc: a multiply per accumulator element, a fifth of the loop. Rows
            # whose m stays are scaled by exactly 1 when others move, so a row's result
            # depends on its own scores alone. A row that has seen nothing (m = -inf)
            # moves; one that saw a NaN does not.
            if DOT == "native":
                grown = m_tile - m_i > RESCALE_SLACK
                m_new = tl.where(grown, m_tile, m_i)
                if tl.max(grown.to(tl.int32), 0) > 0:  # branch: rare
                    alpha = tl.where(grown, tl.exp2(m_i - m_new), 1.0)
                    acc = acc * alpha[:, None]
                    if ROWSUM_MMA:
                        l_acc = l_acc * alpha[:, None]
                    else:
                        l_i = l_i * alpha
            else:
                # fp32 (TF32 products, 64 x 32 tiles): the multiplies skipped would not pay
                # for the block-wide test (bench.static), so every tile rescales.
                m_new = tl.maximum(m_i, m_tile)
                alpha = tl.exp2(m_i - m_new)
                acc = acc * alpha[:, None]
                l_i = l_i * alpha
            m_i = m_new
            p = tl.exp2(s * qk_scale - m_i[:, None])
            v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                        mask=d_ok[None, :], other=0.0)
            if ROWSUM_MMA:
                p = p.to(v.dtype)
                l_acc = tl.dot(p, ones, l_acc)
                acc = tl.dot(p, v, acc)
            else:
                l_i = l_i + tl.sum(p, 1)
                acc = acc + dot(p.to(v.dtype), v, DOT)
        else:
            col_ok = cols < hi
            k_t = tl.load(k_base + cols[None, :] * stride_kl + offs_d[:, None] * stride_kd,
                          mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.where(col_ok[None, :], dot(q, k_t, DOT) * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen nothing yet keeps m = -inf; subtract 0 instead so that
            # exp2 gives 0 rather than NaN (-inf - -inf).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT)
            m_i = m_new
    if ROWSUM_MMA:
        l_i = tl.sum(l_acc, 1)
    return acc, m_i, l_i


# Prefix columns are walked this many at a time (CLS and registers: a few).
PREFIX_BLOCK = tl.constexpr(16)


@triton.jit
def _softmax_step(acc, m_i, l_i, s):
    """The online-softmax update for scores s (scaled, -inf where not seen): the new state
    with acc only rescaled, and p."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return acc * alpha[:, None], m_new, l_i * alpha + tl.sum(p, 1), p


@triton.jit
def _prefix_scores(q, k_base, keep_row, cols, end, stride_kl, stride_kd, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    """Scaled scores of columns `cols` (those < end), -inf for the rows not kept."""
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < end
    k_t = tl.load(k_base + cols[None, :] * stride_kl + offs_d[:, None] * stride_kd,
                  mask=col_ok[None, :] & (offs_d < HEAD_DIM)[:, None], other=0.0)
    return tl.where(keep_row[:, None] & col_ok[None, :], dot(q, k_t, DOT) * qk_scale,
                    float("-inf"))


@triton.jit
def _first_columns(lo1, hi1, p_hi, BLOCK_N: tl.constexpr, FIRST: tl.constexpr):
    """(n_left, t0): how many columns of [lo1, hi1) the narrow tile the forward (and dQ)
    takes first holds after its prefix columns [0, p_hi), and t0, where its key steps
    over [t0, hi1) start.

    Every block runs that tile (see `_attend_prefix`), so it puts it to work: beside the
    prefix columns its raw rows take apart (none where p_hi = 0), it takes the columns of
    [lo1, hi1) left over after whole key steps, as many as fit in FIRST, and its steps
    start after them. The masked last step then runs only where more are left over.
    """
    n_left = tl.minimum(tl.maximum(hi1 - lo1, 0) % BLOCK_N, tl.maximum(FIRST - p_hi, 0))
    return n_left, lo1 + n_left


@triton.jit
def _attend_prefix(q, rows, p_hi, lo1, n_left, k_base, v_base, stride_kl, stride_kd, stride_vl,
                   stride_vd, visible, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_D: tl.constexpr, FIRST: tl.constexpr, DOT: tl.constexpr):
    """The online-softmax state (acc, m, l) of a row block after its first columns
    (`_first_columns`): the prefix columns [0, p_hi) that its raw rows take apart when
    the block also holds query rows, which do not see them, then n_left columns from lo1
    that all its rows see.

    Taken first, while nothing is accumulated: the prefix (CLS and registers: all of it,
    up to FIRST columns) and the columns left over are one narrow tile, with no
    rescaling and no second accumulator, run by every block (under a branch, ptxas
    serializes every wgmma of the kernel, C7515). Any further prefix columns go one by
    one, for the same reason: a tile's product added to acc in a loop serializes too.
    """
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    raw_row = rows < visible
    slot = tl.arange(0, FIRST)
    in_prefix = slot < p_hi
    # p_hi is 0 or lo1 (`_key_ranges`): the prefix columns [0, p_hi), then those from lo1.
    first = lo1 - p_hi + slot
    col_ok = slot < p_hi + n_left
    # A query row's p of 0 times a non-finite prefix value would be NaN in its row of
    # P @ V. Such values go into the product as 0, and the rows that see them take a
    # NaN score for their column instead: v * 0 is NaN exactly where v is not finite, and
    # added to the column's key it makes the column's scores NaN, the query rows' among
    # them, which do not see it and take -inf there.
    k_t = tl.load(k_base + first[None, :] * stride_kl + offs_d[:, None] * stride_kd,
                  mask=col_ok[None, :] & d_ok[:, None], other=0.0)
    v_t = tl.load(v_base + first[None, :] * stride_vl + offs_d[:, None] * stride_vd,
                  mask=in_prefix[None, :] & d_ok[:, None], other=0.0)
    if DOT != "native":
        # fp32 products (so fp32 here): the interpreter's bf16 arithmetic is on the bits.
        k_t, v_t = k_t.to(tl.float32), v_t.to(tl.float32)
    k_t = k_t + v_t * 0.0
    seen = (raw_row[:, None] | ~in_prefix[None, :]) & col_ok[None, :]
    s0 = tl.where(seen, dot(q, k_t, DOT) * qk_scale, float("-inf"))
    m_i = tl.max(s0, 1)
    p0 = tl.exp2(s0 - tl.where(m_i == float("-inf"), 0.0, m_i)[:, None])
    l_i = tl.sum(p0, 1)
    v = tl.load(v_base + first[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT != "native":
        v = v.to(tl.float32)
    v = tl.where(in_prefix[:, None] & (v * 0.0 != 0.0), tl.zeros_like(v), v)
    acc = dot(p0.to(v.dtype), v, DOT)
    cols = tl.arange(0, PREFIX_BLOCK)
    for start in range(FIRST, p_hi, PREFIX_BLOCK):  # loop: fwd.prefix
        s = _prefix_scores(q, k_base, raw_row, start + cols, p_hi, stride_kl, stride_kd,
                           qk_scale, HEAD_DIM, BLOCK_D, DOT)
        acc, m_i, l_i, p = _softmax_step(acc, m_i, l_i, s)
        for j in range(start, tl.minimum(p_hi, start + PREFIX_BLOCK)):  # loop: fwd.prefix_values
            p_j = tl.sum(tl.where(start + cols[None, :] == j, p, 0.0), 1)
            v_j = tl.load(v_base + j * stride_vl + offs_d * stride_vd, mask=d_ok, other=0.0)
            acc += tl.where(raw_row[:, None], p_j[:, None] * v_j.to(tl.float32)[None, :], 0.0)
    return acc, m_i, l_i


@triton.jit
def _attend_self(acc, m_i, l_i, rows, q_base, k_base, v_base, stride_ql, stride_qd, stride_kl,
                 stride_kd, stride_vl, stride_vd, seq_len, visible, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Each query row's own column (SEES_SELF without SEES_QUERIES), row by row: a tile of
    the diagonal block would multiply every query row's zero probabilities by the other
    query tokens' values. q is read again here, in the layout of these row-wise products
    rather than the tensor cores'."""
    offs_d = tl.arange(0, BLOCK_D)
    own = (rows >= visible) & (rows < seq_len)
    own_mask = own[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(q_base + rows[:, None] * stride_ql + offs_d[None, :] * stride_qd, mask=own_mask,
                other=0.0)
    k = tl.load(k_base + rows[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=own_mask,
                other=0.0)
    s = tl.where(own, tl.sum(q.to(tl.float32) * k.to(tl.float32), 1) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, s)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe)
    alpha = tl.exp2(m_i - m_safe)
    v = tl.load(v_base + rows[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=own_mask,
                other=0.0)
    acc = acc * alpha[:, None] + tl.where(own[:, None], p[:, None] * v.to(tl.float32), 0.0)
    return acc, m_new, l_i * alpha + p


# The row strides of the tensors the tile loops read (K, V; Q and dO in the backwards, O
# in the one-pass backward's delta loop) are constexprs: a thread's addresses in a tile
# are then one base plus immediate offsets, not a multiply and a shift each (a 64 x 64
# forward step: 308 -> 287 SASS). Each layout compiles its own kernels; a model has one or
# two (a packed qkv's row is 3 x heads x head_dim).


@triton.jit
def _unidirectional_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS, NUM_QUERIES, TILES,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl: tl.constexpr, stride_kd,
    stride_vb, stride_vh, stride_vl: tl.constexpr, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_lseb, stride_lseh,
    num_blocks, num_heads, num_seqs, seq_len, key_len, visible, total_tokens, num_prefix,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SEES_PREFIX: tl.constexpr, SEES_SELF: tl.constexpr,
    SEES_QUERIES: tl.constexpr, DOT: tl.constexpr, VARLEN: tl.constexpr,
    TILED: tl.constexpr, APPROX_LOG2: tl.constexpr, FIRST_BLOCK: tl.constexpr,
    ROWSUM_MMA: tl.constexpr,
):
    block, b, h, start, seq_len, key_len, visible = _program(
        num_blocks, num_heads, num_seqs, seq_len, key_len, visible, total_tokens, CU_SEQLENS,
        NUM_QUERIES, TILES, VARLEN, TILED)
    q_base = Q + b * stride_qb + h * stride_qh + start * stride_ql
    k_base = K + b * stride_kb + h * stride_kh + start * stride_kl
    v_base = V + b * stride_vb + h * stride_vh + start * stride_vl
    o_base = O + b * stride_ob + h * stride_oh + start * stride_ol
    lse_base = LSE + b * stride_lseb + h * stride_lseh + start
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    m0 = block * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < seq_len
    q = tl.load(q_base + rows[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    lo1, hi1, lo2, hi2, p_hi = _key_ranges(m0, seq_len, key_len, visible, num_prefix, BLOCK_M,
                                           SEES_PREFIX, SEES_QUERIES)
    t0 = lo1
    if SEES_PREFIX:  # every row sees the prefix: no block takes it apart (p_hi = 0)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    else:
        n_left, t0 = _first_columns(lo1, hi1, p_hi, BLOCK_N, FIRST_BLOCK)
        acc, m_i, l_i = _attend_prefix(q, rows, p_hi, lo1, n_left, k_base, v_base, stride_kl,
                                       stride_kd, stride_vl, stride_vd, visible, qk_scale,
                                       HEAD_DIM, BLOCK_M, BLOCK_D, FIRST_BLOCK, DOT)
    if SEES_SELF and not SEES_QUERIES:
        acc, m_i, l_i = _attend_self(acc, m_i, l_i, rows, q_base, k_base, v_base, stride_ql,
                                     stride_qd, stride_kl, stride_kd, stride_vl, stride_vd, seq_len,
                                     visible, qk_scale, HEAD_DIM, BLOCK_D)
    # Whole tiles every row of the block sees, then the last, partial one.
    c2 = t0 + (hi1 - t0) // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _attend_tiles(  # loop: fwd.interior
        acc, m_i, l_i, q, t0, c2, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
        qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, NO_MASK, DOT, ROWSUM_MMA)
    acc, m_i, l_i = _attend_tiles(  # loop: fwd.boundary
        acc, m_i, l_i, q, c2, hi1, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
        qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, COLUMN_MASK, DOT)
    if SEES_QUERIES:
        # Raw rows of a block that also holds query rows walk its query-key tiles too,
        # seeing none of them: their state from before those tiles is what stands.
        acc_raw, m_raw, l_raw = acc, m_i, l_i
        acc, m_i, l_i = _attend_tiles(  # loop: fwd.queries
            acc, m_i, l_i, q, lo2, hi2, k_base, v_base, stride_kl, stride_kd, stride_vl,
            stride_vd, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, COLUMN_MASK, DOT)
        raw_row = rows < visible
        acc = tl.where(raw_row[:, None], acc_raw, acc)
        m_i = tl.where(raw_row, m_raw, m_i)
        l_i = tl.where(raw_row, l_raw, l_i)
    # Rows past seq_len saw nothing (l = 0); they are not stored, but keep them finite.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc * (1.0 / l_safe)[:, None]  # one division per row, not per element
    tl.store(o_base + rows[:, None] * stride_ol + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    # l >= 1 where a row saw anything (its largest score adds exp2(0)): no denormal input.
    tl.store(lse_base + rows, m_i + log2(l_safe, APPROX_LOG2), mask=row_ok)


@triton.jit
def _unidirectional_bwd_delta_kernel(
    O, DO, LSE, STATS, CU_SEQLENS, NUM_QUERIES, TILES,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_lseb, stride_lseh,
    num_blocks, num_heads, num_seqs, seq_len, total_tokens,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr, TILED: tl.constexpr,
):
    block, b, h, start, seq_len, _, _ = _program(
        num_blocks, num_heads, num_seqs, seq_len, seq_len, seq_len, total_tokens, CU_SEQLENS,
        NUM_QUERIES, TILES, VARLEN, TILED)
    o_base = O + b * stride_ob + h * stride_oh + start * stride_ol
    do_base = DO + b * stride_dob + h * stride_doh + start * stride_dol
    offs_d = tl.arange(0, BLOCK_D)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = (rows[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(o_base + rows[:, None] * stride_ol + offs_d[None, :] * stride_od,
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(do_base + rows[:, None] * stride_dol + offs_d[None, :] * stride_dod,
                 mask=ok, other=0.0).to(tl.float32)
    row0 = b * stride_lseb + h * stride_lseh + start
    lse = tl.load(LSE + row0 + rows, mask=rows < seq_len)
    _store_row_stats(STATS + row0 * 2, rows, lse, tl.sum(o * do, 1), rows < seq_len)


@triton.jit
def _dkdv_row_range(n0, seq_len, visible, num_prefix, BLOCK_N: tl.constexpr,
                    SEES_PREFIX: tl.constexpr, SEES_QUERIES: tl.constexpr):
    """Rows [lo, hi) that see some column of key block n0..n0+BLOCK_N other than their
    own (the diagonal of SEES_SELF is added apart)."""
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
    return lo, hi


@triton.jit
def _dkdv_passes(n0, lo, hi, visible, num_prefix, BLOCK_N: tl.constexpr,
                 SEES_PREFIX: tl.constexpr, SEES_QUERIES: tl.constexpr):
    """The rows [lo, hi) that see key block n0 walk it in two passes, [a0, a1) then
    [b0, b1), each of rows that see the same columns of the block; query rows one by one
    in [r0, hi) where no order of the two passes serves.

    Raw rows see the visible columns; query rows the raw ones, plus the prefix with
    SEES_PREFIX and the query columns with SEES_QUERIES. A block holding columns the two
    kinds see differently, walked by both, splits at V; otherwise one pass. After each
    pass the columns its rows do not see are set to 0, which is right only if the first
    pass did not see them either: so query rows go first, unless they see query columns
    of the block that raw rows do not. If the block also holds prefix columns they do not
    see, neither order serves (a short sequence, with SEES_QUERIES but not SEES_PREFIX):
    raw rows take the only pass and the query rows follow row by row.
    """
    has_prefix = n0 < 0
    if not SEES_PREFIX:
        has_prefix = n0 < num_prefix
    has_queries = n0 < 0
    if SEES_QUERIES:
        has_queries = n0 + BLOCK_N > visible
    a0 = lo
    a1 = hi
    b0 = hi
    b1 = hi
    r0 = hi
    if (has_prefix | has_queries) & (lo < visible) & (visible < hi):
        if has_queries:
            a1 = visible
            if has_prefix:
                r0 = visible
            else:
                b0 = visible
        else:
            a0 = visible
            b0 = lo
            b1 = visible
    return a0, a1, b0, b1, r0


# Which row tiles of [lo, hi) a backward row loop walks (`_dkdv_tiles`, `_onepass_rows`):
# all of them (row masks on every tile), the whole ones (no row masks), or the last,
# partial one.
ALL_TILES = tl.constexpr(0)
WHOLE_TILES = tl.constexpr(1)
PARTIAL_TILE = tl.constexpr(2)


@triton.jit
def _tile_bounds(lo, hi, BLOCK_M: tl.constexpr, TILES: tl.constexpr):
    """[lo, hi) narrowed to the row tiles TILES names."""
    if TILES == WHOLE_TILES:
        hi = lo + (hi - lo) // BLOCK_M * BLOCK_M
    elif TILES == PARTIAL_TILE:
        lo = lo + (hi - lo) // BLOCK_M * BLOCK_M
    return lo, hi


@triton.jit
def _store_row_stats(stats, rows, lse, delta, row_ok):
    """(lse, delta) of rows side by side, written as one 64-bit word a row (lse in the low
    half: the fp32 pair it is read back as)."""
    word = (lse.to(tl.int32, bitcast=True).to(tl.uint32).to(tl.int64)
            | (delta.to(tl.int32, bitcast=True).to(tl.int64) << 32))
    tl.store(stats.to(tl.pointer_type(tl.int64)) + rows, word, mask=row_ok)


@triton.jit
def _row_stats(stats, rows, row_ok):
    """lse and delta of rows (0 where row_ok is false), from `_store_row_stats`'s words:
    one load a row, not two, from addresses formed as a row vector's are."""
    words = stats.to(tl.pointer_type(tl.int64)) + rows
    if row_ok is None:
        word = tl.load(words)
    else:
        word = tl.load(words, mask=row_ok, other=0)
    return (word.to(tl.int32).to(tl.float32, bitcast=True),
            (word >> 32).to(tl.int32).to(tl.float32, bitcast=True))


@triton.jit
def _dkdv_step(dk, dv, k, v, rows, row_ok, offs_d, d_ok, q_base, do_base, stats,
               stride_ql, stride_qd, stride_dol, stride_dod, qk_scale, DOT: tl.constexpr,
               ROW_MASK: tl.constexpr = True, ds_scale=1.0):
    """One transposed tile of rows against a key block: dK and dV added to, and dS^T (in
    q's dtype) for a caller that also wants dQ. Rows past row_ok read zeros for q and dO;
    without ROW_MASK every row is one (no predicate, no zeroed registers per load).
    ds_scale: dS comes out multiplied by it, with delta given multiplied by it too (one
    multiply-add per element, as without)."""
    q_t = tl.load(q_base + rows[None, :] * stride_ql + offs_d[:, None] * stride_qd,
                  mask=d_ok[:, None] & row_ok[None, :] if ROW_MASK else d_ok[:, None],
                  other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_dol + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None] & d_ok[None, :] if ROW_MASK else d_ok[None, :],
                 other=0.0)
    if ROW_MASK:
        lse, delta = _row_stats(stats, rows, row_ok)
    else:
        lse, delta = _row_stats(stats, rows, None)
    p_t = tl.exp2(dot(k, q_t, DOT) * qk_scale - lse[None, :])
    dv += dot(p_t.to(do.dtype), do, DOT)
    ds_t = (p_t * (dot(v, tl.trans(do), DOT) * ds_scale - delta[None, :])).to(q_t.dtype)
    dk += dot(ds_t, tl.trans(q_t), DOT)
    return dk, dv, ds_t


@triton.jit
def _dkdv_tiles(dk, dv, k, v, lo, hi, q_base, do_base, stats, stride_ql, stride_qd,
                stride_dol, stride_dod, qk_scale, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
                TILES: tl.constexpr = ALL_TILES):
    """dK, dV of one key block accumulated over the row tiles of [lo, hi) that TILES
    names, in transposed tiles.

    Unmasked columns: rows past hi read zeros for q and dO and add nothing, and the
    columns the rows do not see are set back by the caller.
    """
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lo, hi = _tile_bounds(lo, hi, BLOCK_M, TILES)
    for row_start in range(lo, hi, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        dk, dv, _ = _dkdv_step(dk, dv, k, v, rows, rows < hi, offs_d, d_ok, q_base, do_base,
                               stats, stride_ql, stride_qd, stride_dol, stride_dod, qk_scale,
                               DOT, TILES != WHOLE_TILES)
    return dk, dv


@triton.jit
def _dkdv_rows(dk, dv, k, v, seen, lo, hi, q_base, do_base, stats, stride_ql, stride_qd,
               stride_dol, stride_dod, qk_scale, HEAD_DIM: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    """dK, dV of one key block over rows [lo, hi), added to the columns `seen` only: the
    probabilities by tiles, the sums over rows one row at a time (query rows where no
    order of the two passes serves: a few)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for row_start in range(lo, hi, BLOCK_M):  # loop: bwd.dkdv_rows
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < hi
        q_t = tl.load(q_base + rows[None, :] * stride_ql + offs_d[:, None] * stride_qd,
                      mask=d_ok[:, None] & row_ok[None, :], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dol + offs_d[None, :] * stride_dod,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse, delta = _row_stats(stats, rows, row_ok)
        p_t = tl.exp2(dot(k, q_t, DOT) * qk_scale - lse[None, :])
        ds_t = p_t * (dot(v, tl.trans(do), DOT) - delta[None, :])
        for r in range(row_start, tl.minimum(hi, row_start + BLOCK_M)):  # loop: bwd.dkdv_row
            p_r = tl.sum(tl.where(rows[None, :] == r, p_t, 0.0), 1)
            ds_r = tl.sum(tl.where(rows[None, :] == r, ds_t, 0.0), 1)
            q_r = tl.load(q_base + r * stride_ql + offs_d * stride_qd, mask=d_ok, other=0.0)
            do_r = tl.load(do_base + r * stride_dol + offs_d * stride_dod, mask=d_ok, other=0.0)
            dv += tl.where(seen[:, None], p_r[:, None] * do_r.to(tl.float32)[None, :], 0.0)
            dk += tl.where(seen[:, None], ds_r[:, None] * q_r.to(tl.float32)[None, :], 0.0)
    return dk, dv


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, lo, hi, k_base, v_base, stride_kl, stride_kd, stride_vl,
              stride_vd, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, MASK: tl.constexpr, DOT: tl.constexpr):
    """dQ of one row block accumulated over key columns [lo, hi), probabilities recomputed."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for col_start in range(lo, hi, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        if MASK == NO_MASK:
            t_mask = d_ok[:, None]
        else:
            t_mask = d_ok[:, None] & (cols < hi)[None, :]
        k_t = tl.load(k_base + cols[None, :] * stride_kl + offs_d[:, None] * stride_kd,
                      mask=t_mask, other=0.0)
        v_t = tl.load(v_base + cols[None, :] * stride_vl + offs_d[:, None] * stride_vd,
                      mask=t_mask, other=0.0)
        p = tl.exp2(dot(q, k_t, DOT) * qk_scale - lse[:, None])
        if MASK == COLUMN_MASK:
            p = tl.where((cols < hi)[None, :], p, 0.0)
        ds = p * (dot(do, v_t, DOT) - delta[:, None])
        dq += dot(ds.to(k_t.dtype), tl.trans(k_t), DOT)
    return dq


@triton.jit
def _dq_first(q, do, lse, delta, rows, start, p_hi, lo1, n_left, k_base, v_base, stride_kl,
              stride_kd, stride_vl, stride_vd, visible, qk_scale, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    """dQ of one narrow tile: the prefix columns [start, min(p_hi, start + PREFIX_BLOCK))
    for the raw rows of a block that also holds query rows, which do not see them, then
    n_left columns from lo1 that all its rows see (as `_attend_prefix`; n_left = 0 past
    the first tile). ds is 0 where the rule removes a column whatever dp holds there
    (0 x NaN is NaN), and a non-finite prefix key goes into the products as 0: a raw row
    that sees it took NaN from the forward's logsumexp (`_attend_prefix`) unless its score
    there is -inf (p = 0: nothing of that key is in its output)."""
    offs_d = tl.arange(0, BLOCK_D)
    raw_row = rows < visible
    slot = start + tl.arange(0, PREFIX_BLOCK)
    in_prefix = slot < p_hi
    cols = lo1 - p_hi + slot  # as in `_attend_prefix`: p_hi is 0 or lo1
    col_ok = slot < p_hi + n_left
    t_mask = col_ok[None, :] & (offs_d < HEAD_DIM)[:, None]
    k_t = tl.load(k_base + cols[None, :] * stride_kl + offs_d[:, None] * stride_kd,
                  mask=t_mask, other=0.0)
    v_t = tl.load(v_base + cols[None, :] * stride_vl + offs_d[:, None] * stride_vd,
                  mask=t_mask, other=0.0)
    if DOT != "native":
        # fp32 products (so fp32 here): the interpreter's bf16 arithmetic is on the bits.
        k_t = k_t.to(tl.float32)
    k_t = tl.where(in_prefix[None, :] & (k_t * 0.0 != 0.0), tl.zeros_like(k_t), k_t)
    p = tl.exp2(dot(q, k_t, DOT) * qk_scale - lse[:, None])
    seen = (raw_row[:, None] | ~in_prefix[None, :]) & col_ok[None, :]
    ds = tl.where(seen, p * (dot(do, v_t, DOT) - delta[:, None]), 0.0)
    return dot(ds.to(k_t.dtype), tl.trans(k_t), DOT)


@triton.jit
def _self_columns(dq, lse, delta, rows, q_base, do_base, k_base, v_base, stride_ql, stride_qd,
                  stride_dol, stride_dod, stride_kl, stride_kd, stride_vl, stride_vd, seq_len,
                  visible, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """SEES_SELF without SEES_QUERIES: each query row's own column, row by row. Returns dQ
    with it, and the rows' p and ds there, which make all of dK and dV of those columns
    (no other row sees them). q and dO are read again here, in the layout of these
    row-wise products rather than the tensor cores'."""
    offs_d = tl.arange(0, BLOCK_D)
    own = (rows >= visible) & (rows < seq_len)
    own_mask = own[:, None] & (offs_d < HEAD_DIM)[None, :]
    do = tl.load(do_base + rows[:, None] * stride_dol + offs_d[None, :] * stride_dod,
                 mask=own_mask, other=0.0)
    v = tl.load(v_base + rows[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=own_mask,
                other=0.0)
    dp = tl.sum(do.to(tl.float32) * v.to(tl.float32), 1)
    q = tl.load(q_base + rows[:, None] * stride_ql + offs_d[None, :] * stride_qd, mask=own_mask,
                other=0.0)
    k = tl.load(k_base + rows[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=own_mask,
                other=0.0)
    p = tl.where(own, tl.exp2(tl.sum(q.to(tl.float32) * k.to(tl.float32), 1) * qk_scale - lse),
                 0.0)
    ds = tl.where(own, p * (dp - delta), 0.0)
    return dq + tl.where(own[:, None], ds[:, None] * k.to(tl.float32), 0.0), p, ds


@triton.jit
def _unidirectional_bwd_kernel(
    Q, K, V, DO, LSE, STATS, DQ, DK, DV, CU_SEQLENS, NUM_QUERIES, TILES,
    stride_qb, stride_qh, stride_ql: tl.constexpr, stride_qd,
    stride_kb, stride_kh, stride_kl: tl.constexpr, stride_kd,
    stride_vb, stride_vh, stride_vl: tl.constexpr, stride_vd,
    stride_dob, stride_doh, stride_dol: tl.constexpr, stride_dod,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd,
    stride_dvb, stride_dvh, stride_dvl, stride_dvd,
    stride_lseb, stride_lseh,
    num_blocks, num_heads, num_seqs, seq_len, key_len, visible, total_tokens, num_prefix,
    qk_scale, sm_scale, O, stride_ob, stride_oh, stride_ol, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
    BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, SPLIT_ROWS: tl.constexpr,
    SEES_PREFIX: tl.constexpr, SEES_SELF: tl.constexpr,
    SEES_QUERIES: tl.constexpr, DOT: tl.constexpr, VARLEN: tl.constexpr,
    TILED: tl.constexpr, DELTA_ROWS: tl.constexpr = 0,
):
    block, b, h, start, seq_len, key_len, visible = _program(
        num_blocks, num_heads, num_seqs, seq_len, key_len, visible, total_tokens, CU_SEQLENS,
        NUM_QUERIES, TILES, VARLEN, TILED)
    q_base = Q + b * stride_qb + h * stride_qh + start * stride_ql
    k_base = K + b * stride_kb + h * stride_kh + start * stride_kl
    v_base = V + b * stride_vb + h * stride_vh + start * stride_vl
    do_base = DO + b * stride_dob + h * stride_doh + start * stride_dol
    stats = STATS + (b * stride_lseb + h * stride_lseh + start) * 2
    dq_base = DQ + b * stride_dqb + h * stride_dqh + start * stride_dql
    dk_base = DK + b * stride_dkb + h * stride_dkh + start * stride_dkl
    dv_base = DV + b * stride_dvb + h * stride_dvh + start * stride_dvl
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    if DELTA_ROWS > 0:
        # The program owns its whole sequence (at most DELTA_ROWS rows): delta =
        # rowsum(dO * O) of every row, stored where the loops below read it (no pre-pass
        # launch); the barrier makes the stores visible to all of the program's threads.
        all_rows = tl.arange(0, DELTA_ROWS)
        all_ok = (all_rows[:, None] < seq_len) & d_ok[None, :]
        o_all = tl.load(O + b * stride_ob + h * stride_oh + (start + all_rows[:, None]) * stride_ol
                        + offs_d[None, :] * stride_od, mask=all_ok, other=0.0).to(tl.float32)
        do_all = tl.load(do_base + all_rows[:, None] * stride_dol + offs_d[None, :] * stride_dod,
                         mask=all_ok, other=0.0).to(tl.float32)
        lse = tl.load(LSE + b * stride_lseb + h * stride_lseh + start + all_rows,
                      mask=all_rows < seq_len)
        _store_row_stats(stats, all_rows, lse, tl.sum(o_all * do_all, 1), all_rows < seq_len)
        tl.debug_barrier()

    # Program j owns key block j (BLOCK_N1 columns) and row block j (BLOCK_M2 rows).
    # ---- dK, dV for key block j: walk the rows that see it, transposed tiles.
    n0 = block * BLOCK_N1
    if n0 < key_len:
        cols = n0 + tl.arange(0, BLOCK_N1)
        col_ok = cols < key_len
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
        lo, hi = _dkdv_row_range(n0, seq_len, visible, num_prefix, BLOCK_N1, SEES_PREFIX,
                                 SEES_QUERIES)
        a0, a1, b0, b1, r0 = _dkdv_passes(n0, lo, hi, visible, num_prefix, BLOCK_N1, SEES_PREFIX,
                                          SEES_QUERIES)
        # The columns each kind of row sees (the others are set to 0 after its pass).
        raw_sees = cols < visible
        if SEES_PREFIX:
            query_sees = cols < visible
        else:
            query_sees = (cols < visible) & (cols >= num_prefix)
        if SEES_QUERIES:
            query_sees = query_sees | (cols >= visible)
        if SPLIT_ROWS:  # the first pass's whole row tiles without row masks, then the last
            dk, dv = _dkdv_tiles(  # loop: bwd.dkdv_interior
                dk, dv, k, v, a0, a1, q_base, do_base, stats, stride_ql,
                stride_qd, stride_dol, stride_dod, qk_scale, HEAD_DIM, BLOCK_M1, BLOCK_D, DOT,
                WHOLE_TILES)
            dk, dv = _dkdv_tiles(  # loop: bwd.dkdv_interior_last
                dk, dv, k, v, a0, a1, q_base, do_base, stats, stride_ql,
                stride_qd, stride_dol, stride_dod, qk_scale, HEAD_DIM, BLOCK_M1, BLOCK_D, DOT,
                PARTIAL_TILE)
        else:
            dk, dv = _dkdv_tiles(  # loop: bwd.dkdv_interior
                dk, dv, k, v, a0, a1, q_base, do_base, stats, stride_ql,
                stride_qd, stride_dol, stride_dod, qk_scale, HEAD_DIM, BLOCK_M1, BLOCK_D, DOT)
        seen = tl.where(a0 < visible, raw_sees, query_sees)
        dk = tl.where(seen[:, None], dk, 0.0)
        dv = tl.where(seen[:, None], dv, 0.0)
        dk, dv = _dkdv_tiles(  # loop: bwd.dkdv_second
            dk, dv, k, v, b0, b1, q_base, do_base, stats, stride_ql, stride_qd,
            stride_dol, stride_dod, qk_scale, HEAD_DIM, BLOCK_M1, BLOCK_D, DOT)
        seen = tl.where(b0 < visible, raw_sees, query_sees) | (b0 == b1)
        dk = tl.where(seen[:, None], dk, 0.0)
        dv = tl.where(seen[:, None], dv, 0.0)
        if SEES_QUERIES and not SEES_PREFIX:
            dk, dv = _dkdv_rows(dk, dv, k, v, query_sees, r0, hi, q_base, do_base, stats,
                                stride_ql, stride_qd, stride_dol, stride_dod, qk_scale,
                                HEAD_DIM, BLOCK_M1, BLOCK_D, DOT)
        written = kv_mask
        if SEES_SELF and not SEES_QUERIES:
            # The query columns are seen by their own rows alone: written with dQ below.
            written = kv_mask & (cols < visible)[:, None]
        dk = dk * sm_scale
        tl.store(dk_base + cols[:, None] * stride_dkl + offs_d[None, :] * stride_dkd,
                 dk.to(DK.dtype.element_ty), mask=written)
        tl.store(dv_base + cols[:, None] * stride_dvl + offs_d[None, :] * stride_dvd,
                 dv.to(DV.dtype.element_ty), mask=written)

    # ---- dQ for row block j: walk the same column ranges as the forward.
    m0 = block * BLOCK_M2
    if m0 < seq_len:
        rows = m0 + tl.arange(0, BLOCK_M2)
        row_ok = rows < seq_len
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                    mask=q_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dol + offs_d[None, :] * stride_dod,
                     mask=q_mask, other=0.0)
        lse, delta = _row_stats(stats, rows, row_ok)
        lo1, hi1, lo2, hi2, p_hi = _key_ranges(m0, seq_len, key_len, visible, num_prefix,
                                               BLOCK_M2, SEES_PREFIX, SEES_QUERIES)
        # The first tile (`_first_columns`: the prefix columns of a block holding raw and
        # query rows, then columns left over after whole key steps) into an empty dQ;
        # prefix columns past the first PREFIX_BLOCK (rare) after the tiles: ptxas serializes every
        # wgmma of the kernel (C7515) when a loop before them adds to dQ. Rows wider than
        # 128 take them all after the tiles: at head_dim 256 the first tile beside q, dO
        # and dQ spilled inside the loops (1288 B against 224 B, sm_90).
        t0 = lo1
        if SEES_PREFIX or BLOCK_D > 128:
            dq = tl.zeros([BLOCK_M2, BLOCK_D], tl.float32)
            prefix_done = 0
        else:
            n_left, t0 = _first_columns(lo1, hi1, p_hi, BLOCK_N2, PREFIX_BLOCK)
            dq = _dq_first(q, do, lse, delta, rows, 0, p_hi, lo1, n_left, k_base, v_base,
                           stride_kl, stride_kd, stride_vl, stride_vd, visible, qk_scale,
                           HEAD_DIM, BLOCK_D, DOT)
            prefix_done = PREFIX_BLOCK
        if SEES_SELF and not SEES_QUERIES:
            dq, p_own, ds_own = _self_columns(dq, lse, delta, rows, q_base, do_base, k_base,
                                              v_base, stride_ql, stride_qd, stride_dol, stride_dod,
                                              stride_kl, stride_kd, stride_vl, stride_vd, seq_len,
                                              visible, qk_scale, HEAD_DIM, BLOCK_D)
        c2 = t0 + (hi1 - t0) // BLOCK_N2 * BLOCK_N2
        dq = _dq_tiles(  # loop: bwd.dq_interior
            dq, q, do, lse, delta, t0, c2, k_base, v_base, stride_kl, stride_kd, stride_vl,
            stride_vd, qk_scale, HEAD_DIM, BLOCK_N2, BLOCK_D, NO_MASK, DOT)
        dq = _dq_tiles(  # loop: bwd.dq_boundary
            dq, q, do, lse, delta, c2, hi1, k_base, v_base, stride_kl, stride_kd, stride_vl,
            stride_vd, qk_scale, HEAD_DIM, BLOCK_N2, BLOCK_D, COLUMN_MASK, DOT)
        if SEES_QUERIES:
            dq_raw = dq  # as in the forward: raw rows keep what they had before query keys
            dq = _dq_tiles(  # loop: bwd.dq_queries
                dq, q, do, lse, delta, lo2, hi2, k_base, v_base, stride_kl, stride_kd,
                stride_vl, stride_vd, qk_scale, HEAD_DIM, BLOCK_N2, BLOCK_D, COLUMN_MASK, DOT)
            dq = tl.where((rows < visible)[:, None], dq_raw, dq)
        for p0 in range(prefix_done, p_hi, PREFIX_BLOCK):  # loop: bwd.dq_prefix
            dq += _dq_first(q, do, lse, delta, rows, p0, p_hi, lo1, 0, k_base, v_base,
                            stride_kl, stride_kd, stride_vl, stride_vd, visible, qk_scale,
                            HEAD_DIM, BLOCK_D, DOT)
        dq = dq * sm_scale
        tl.store(dq_base + rows[:, None] * stride_dql + offs_d[None, :] * stride_dqd,
                 dq.to(DQ.dtype.element_ty), mask=q_mask)
        if SEES_SELF and not SEES_QUERIES:
            # Row block j holds the query tokens whose own columns key block j holds: dK
            # and dV of those columns are written here (after dQ, whose registers are free).
            tl.static_assert(BLOCK_M2 == BLOCK_N1)
            own_mask = q_mask & (rows >= visible)[:, None]
            q = tl.load(q_base + rows[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                        mask=own_mask, other=0.0)
            tl.store(dk_base + rows[:, None] * stride_dkl + offs_d[None, :] * stride_dkd,
                     (ds_own[:, None] * q.to(tl.float32) * sm_scale).to(DK.dtype.element_ty),
                     mask=own_mask)
            do = tl.load(do_base + rows[:, None] * stride_dol + offs_d[None, :] * stride_dod,
                         mask=own_mask, other=0.0)
            tl.store(dv_base + rows[:, None] * stride_dvl + offs_d[None, :] * stride_dvd,
                     (p_own[:, None] * do.to(tl.float32)).to(DV.dtype.element_ty), mask=own_mask)


# ---- One pass per (sequence, head): batched or packed sequences, the default mask rule
# or SEES_PREFIX alone.
# A program owns one whole sequence of one head. It computes delta for all its rows, then
# walks its key blocks once: for each key block (dK, dV in registers) the rows that see
# it, tile by tile, adding each tile's dS K into a program-private fp32 dQ (global
# scratch, L2-resident). Every score tile is made once (five products, one exp pass),
# and there is no delta pre-pass launch. The adds are reductions (`red.add`, four floats
# each, done at the L2): no load of the running dQ, no wait on one, no registers held for
# it. The scratch is private and each element is added to by one thread, in the order of
# its key blocks (the barrier after each pass orders the threads of two passes): bitwise
# reproducible, as a load-add-store was. The reduction flushes subnormal inputs and sums
# (below 2^-126) to zero.


@triton.jit
def _onepass_delta(o_base, do_base, lse_base, stats, scratch, lo, hi, stride_ol, stride_od,
                   stride_dol, stride_dod, sm_scale, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, TILES: tl.constexpr):
    """delta = rowsum(dO * O) * sm_scale of rows [lo, hi), stored beside their lse, and
    their dQ scratch cleared: the row tiles TILES names (the whole ones with no row mask,
    as in `_onepass_rows`)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lo, hi = _tile_bounds(lo, hi, BLOCK_M, TILES)
    for r0 in range(lo, hi, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        if TILES == WHOLE_TILES:
            row_ok = None
            ok = d_ok[None, :]
            store_ok = None
        else:
            row_ok = rows < hi
            ok = row_ok[:, None] & d_ok[None, :]
            store_ok = row_ok[:, None]
        o = tl.load(o_base + rows[:, None] * stride_ol + offs_d[None, :] * stride_od, mask=ok,
                    other=0.0).to(tl.float32)
        do = tl.load(do_base + rows[:, None] * stride_dol + offs_d[None, :] * stride_dod,
                     mask=ok, other=0.0).to(tl.float32)
        lse = tl.load(lse_base + rows, mask=row_ok)
        _store_row_stats(stats, rows, lse, tl.sum(o * do, 1) * sm_scale, row_ok)
        tl.store(scratch + rows[:, None] * BLOCK_D + offs_d[None, :],
                 tl.zeros([BLOCK_M, BLOCK_D], tl.float32), mask=store_ok)


@triton.jit
def _onepass_rows(dk, dv, k, v, k_base, cols, seen, lo, hi, q_base, do_base, stats, scratch,
                  stride_kl, stride_kd, stride_ql, stride_qd, stride_dol, stride_dod, qk_scale,
                  ds_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                  MASKED: tl.constexpr, DOT: tl.constexpr, TILES: tl.constexpr = ALL_TILES):
    """dK, dV of one key block and dQ of rows [lo, hi) (into the scratch), in transposed
    tiles: the row tiles of [lo, hi) that TILES names. dQ's K is read again per tile
    (from L1/L2: held in registers it would be copied to shared memory every tile
    anyway), with the columns `seen` does not hold read as 0; with MASKED, dS is cleared
    there too (0 x NaN is NaN): those columns add nothing to these rows' dQ. Their dK and
    dV are set back by the caller."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lo, hi = _tile_bounds(lo, hi, BLOCK_M, TILES)
    for row_start in range(lo, hi, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < hi
        dk, dv, ds_t = _dkdv_step(dk, dv, k, v, rows, row_ok, offs_d, d_ok, q_base, do_base,
                                  stats, stride_ql, stride_qd, stride_dol, stride_dod,
                                  qk_scale, DOT, TILES != WHOLE_TILES, ds_scale)
        if MASKED:
            ds_t = tl.where(seen[:, None], ds_t, tl.zeros_like(ds_t))
        k_dq = tl.load(k_base + cols[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                       mask=seen[:, None] & d_ok[None, :], other=0.0)
        tl.atomic_add(scratch + rows[:, None] * BLOCK_D + offs_d[None, :],
                      dot(tl.trans(ds_t), k_dq, DOT),
                      mask=row_ok[:, None] if TILES != WHOLE_TILES else None, sem="relaxed",
                      scope="cta")
    # The next pass tiles these rows differently: other threads add to what these added.
    tl.debug_barrier()
    return dk, dv


@triton.jit
def _onepass_passes(n0, seq_len, visible, num_prefix, BLOCK_N: tl.constexpr):
    """The two passes of key block n0 (default rule): query rows [V, q_hi) first, where the
    block holds prefix columns and others (the query rows see only the others), then rows
    [0, raw_hi): the raw rows where the block holds prefix columns, else every row."""
    q_hi = visible
    raw_hi = seq_len
    if n0 < num_prefix:
        raw_hi = visible
        if n0 + BLOCK_N > num_prefix:
            q_hi = seq_len
    return q_hi, raw_hi


@triton.jit
def _onepass_keys(k_base, cols, first, vis, offs_d, d_ok, stride_kl, stride_kd):
    """K of a key block. Columns past V (padding, and query keys, which no row sees) take
    the key of column V - 1 (their value is 0): every row walking the block sees V - 1, so
    its probability there is at most 1 and dS stays finite (a zero key's 2^-lse would
    overflow for a row whose scores are all far below 0). Kept inside the sequence: one
    without visible tokens, which the op refuses."""
    return tl.load(k_base + tl.maximum(tl.minimum(cols, vis - 1), first)[:, None] * stride_kl
                   + offs_d[None, :] * stride_kd, mask=d_ok[None, :], other=0.0)


@triton.jit
def _onepass_bwd_kernel(
    Q, K, V, O, DO, LSE, STATS, SCRATCH, DQ, DK, DV,
    stride_qb, stride_qh, stride_ql: tl.constexpr, stride_qd,
    stride_kb, stride_kh, stride_kl: tl.constexpr, stride_kd,
    stride_vb, stride_vh, stride_vl: tl.constexpr, stride_vd,
    stride_ob, stride_oh, stride_ol: tl.constexpr, stride_od,
    stride_dob, stride_doh, stride_dol: tl.constexpr, stride_dod,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd,
    stride_dvb, stride_dvh, stride_dvl, stride_dvd,
    stride_lseb, stride_lseh,
    num_heads, num_seqs, seq_len, key_len, visible, total_tokens, num_prefix, qk_scale,
    sm_scale, CU_SEQLENS, NUM_QUERIES, TILES,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT: tl.constexpr, VARLEN: tl.constexpr,
    SEES_PREFIX: tl.constexpr = False, TILED: tl.constexpr = False,
):
    """The default rule, or SEES_PREFIX alone: raw rows see the visible columns [0, V),
    query rows the raw ones [P, V) (with SEES_PREFIX, [0, V) too: every row walks every
    visible block in one pass); no row sees a query key (k may hold them: their dK, dV
    are 0).

    Packed (VARLEN): program (b, h) takes packed sequence b, its offsets read (and
    clamped) by `_program`; with TILED, b is the sequence of the program's entry in TILES
    (`VarlenLayout.sequence_tiles`: the longest sequences first), heads fastest. Rows and
    columns are token indices of the whole tensor ([first, end) for this sequence), in int32
    (the launcher keeps every token offset under 2^31): the base pointers then hang on the
    program id alone, like the batched ones. Pointers moved by the loaded offset held more
    registers (16-row tiles spilled 16 bytes under the cap that way, none this way). The
    scratch has lse's layout, BLOCK_D floats a row; STATS too, a row's lse and delta side by
    side (written here, then read in every row tile as one word).
    """
    _, b, h, start, seq_len, key_len, visible = _program(
        1, num_heads, num_seqs, seq_len, key_len, visible, total_tokens, CU_SEQLENS,
        NUM_QUERIES, TILES, VARLEN, TILED)
    first = start.to(tl.int32)
    if VARLEN:
        b = b * 0  # packed tensors have no batch stride: fewer 64-bit values held
    end = first + seq_len
    vis = first + visible
    pre = first + num_prefix
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    do_base = DO + b * stride_dob + h * stride_doh
    row0 = b * stride_lseb + h * stride_lseh
    lse_base = LSE + row0
    stats = STATS + row0 * 2
    scratch = SCRATCH + row0 * BLOCK_D
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    # dS carries the softmax scale (delta too, below), which dQ and dK both take: no
    # multiply of them per element.
    # delta = rowsum(dO * O) of every row, and an empty dQ.
    o_base = O + b * stride_ob + h * stride_oh
    _onepass_delta(  # loop: bwd1.delta
        o_base, do_base, lse_base, stats, scratch, first, end, stride_ol, stride_od, stride_dol,
        stride_dod, sm_scale, HEAD_DIM, BLOCK_M, BLOCK_D, WHOLE_TILES)
    # The rows after the whole tiles in half-height tiles: no accumulator is held yet, so
    # the narrower tile costs no registers, and a few rows left do half a tile's work.
    _onepass_delta(  # loop: bwd1.delta_last
        o_base, do_base, lse_base, stats, scratch, first + seq_len // BLOCK_M * BLOCK_M, end,
        stride_ol, stride_od, stride_dol, stride_dod, sm_scale, HEAD_DIM, BLOCK_M // 2, BLOCK_D,
        ALL_TILES)
    tl.debug_barrier()

    key_end = first + key_len
    for n0 in range(first, key_end, BLOCK_N):  # loop: bwd1.keys
        cols = n0 + tl.arange(0, BLOCK_N)
        k = _onepass_keys(k_base, cols, first, vis, offs_d, d_ok, stride_kl, stride_kd)
        v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                    mask=(cols < vis)[:, None] & d_ok[None, :], other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        # A block holding prefix columns: the query rows first (they do not see those),
        # then those columns are set back, then the raw rows. Otherwise every row at once.
        raw_hi = end
        if not SEES_PREFIX:
            query_sees = (cols >= pre) & (cols < vis)
            q_hi, raw_hi = _onepass_passes(n0, end, vis, pre, BLOCK_N)
            # The query rows' scores at the prefix columns may overflow (their lse leaves
            # those out): they reach only those columns' dK and dV, set back after the pass.
            dk, dv = _onepass_rows(  # loop: bwd1.query_rows
                dk, dv, k, v, k_base, cols, query_sees, vis, q_hi, q_base, do_base, stats,
                scratch, stride_kl, stride_kd, stride_ql, stride_qd,
                stride_dol, stride_dod, qk_scale, sm_scale, HEAD_DIM, BLOCK_M, BLOCK_D, True,
                DOT)
            if n0 < pre:  # branch: rare
                cleared = query_sees | (q_hi == vis)
                dk = tl.where(cleared[:, None], dk, 0.0)
                dv = tl.where(cleared[:, None], dv, 0.0)
        if n0 >= vis:  # query keys: no row sees them
            raw_hi = first
        # The columns these rows do not see hold key V - 1 (`_onepass_keys`), which every
        # one of them sees, and a value of 0: their dS is finite, dQ's K reads 0 there, and
        # their dK and dV are cleared below.
        # The last, partial row tile, then the whole ones without row masks.
        dk, dv = _onepass_rows(  # loop: bwd1.rows_last
            dk, dv, k, v, k_base, cols, cols < vis, first, raw_hi, q_base, do_base, stats,
            scratch, stride_kl, stride_kd, stride_ql, stride_qd, stride_dol,
            stride_dod, qk_scale, sm_scale, HEAD_DIM, BLOCK_M, BLOCK_D, False, DOT,
            PARTIAL_TILE)
        dk, dv = _onepass_rows(  # loop: bwd1.rows
            dk, dv, k, v, k_base, cols, cols < vis, first, raw_hi, q_base, do_base, stats,
            scratch, stride_kl, stride_kd, stride_ql, stride_qd, stride_dol,
            stride_dod, qk_scale, sm_scale, HEAD_DIM, BLOCK_M, BLOCK_D, False, DOT,
            WHOLE_TILES)
        written = (cols < key_end)[:, None] & d_ok[None, :]
        if n0 + BLOCK_N > vis:  # branch: rare
            kv_mask = (cols < vis)[:, None] & d_ok[None, :]
            dk = tl.where(kv_mask, dk, 0.0)
            dv = tl.where(kv_mask, dv, 0.0)
        tl.store(DK + b * stride_dkb + h * stride_dkh + cols[:, None] * stride_dkl
                 + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=written)
        tl.store(DV + b * stride_dvb + h * stride_dvh + cols[:, None] * stride_dvl
                 + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=written)

    dq_base = DQ + b * stride_dqb + h * stride_dqh
    # A pointer carried by the loop: addressed from `scratch` per trip, Triton 3.6's
    # compiler reloaded that spilled pointer in every trip.
    dq_src = scratch + first * BLOCK_D + tl.arange(0, BLOCK_M)[:, None] * BLOCK_D
    for r0 in range(first, end, BLOCK_M):  # loop: bwd1.dq
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        # Read at the L2, where the reductions were done: never a line of this scratch that
        # the zeroing left in L1.
        dq = tl.load(dq_src + offs_d[None, :], mask=row_ok[:, None], other=0.0,
                     cache_modifier=".cg")
        dq_src += BLOCK_M * BLOCK_D
        tl.store(dq_base + rows[:, None] * stride_dql
                 + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _block_counts(CU_SEQLENS, stride_cu, s, ok, max_seqlen, BLOCK: tl.constexpr):
    """Blocks of BLOCK rows of sequences s (0 where not ok)."""
    a = tl.load(CU_SEQLENS + s * stride_cu, mask=ok, other=0)
    b = tl.load(CU_SEQLENS + (s + 1) * stride_cu, mask=ok, other=0)
    # Lengths outside [0, max_seqlen] are errors; clamped, they cannot overrun a table.
    return (tl.minimum(tl.maximum(b - a, 0), max_seqlen) + BLOCK - 1) // BLOCK


@triton.jit
def _write_tile_table(TILES, CU_SEQLENS, stride_cu, num_seqs, max_seqlen, capacity, idle_block,
                      classes, top, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Every (sequence, row block) pair with rows, in `longest_first`'s order: a pass over
    the sequences per class of block counts, [top, 2 top) first, then idle slots."""
    used = num_seqs * 0
    low = top
    for c in range(0, classes):
        for c0 in range(0, num_seqs, CHUNK):
            s = c0 + tl.arange(0, CHUNK)
            ok = s < num_seqs
            count = _block_counts(CU_SEQLENS, stride_cu, s, ok, max_seqlen, BLOCK)
            count = tl.where(ok & (count >= low) & (count < 2 * low), count, 0)
            first = used + tl.cumsum(count, 0) - count
            for j in range(0, tl.max(count, 0)):  # no trip for a chunk without the class
                slot = first + j
                # slot >= 0: offsets that claim 2^31 blocks in all wrap it, and must not write.
                written = (j < count) & (slot >= 0) & (slot < capacity)
                tl.store(TILES + 2 * slot, s, mask=written)
                tl.store(TILES + 2 * slot + 1, s * 0 + j, mask=written)
            used += tl.sum(count, 0)
        low = low // 2
    # Slots past the last tile: a block past the end of sequence 0, so those programs load
    # and store nothing.
    for start in range(used, capacity, CHUNK):
        slot = start + tl.arange(0, CHUNK)
        ok = slot < capacity
        tl.store(TILES + 2 * slot, slot * 0, mask=ok)
        tl.store(TILES + 2 * slot + 1, slot * 0 + idle_block, mask=ok)


@triton.jit
def _write_sequence_tiles(TILES, CU_SEQLENS, stride_cu, num_seqs, max_seqlen, classes, top,
                          BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """(s, 0) for every sequence, in `longest_first`'s order: a pass per class of block
    counts, [top, 2 top) first, and a last one for the sequences without rows ([0, 1)):
    every sequence once, so the table has no idle slot."""
    used = num_seqs * 0
    low = top
    for c in range(0, classes + 1):
        for c0 in range(0, num_seqs, CHUNK):
            s = c0 + tl.arange(0, CHUNK)
            ok = s < num_seqs
            count = _block_counts(CU_SEQLENS, stride_cu, s, ok, max_seqlen, BLOCK)
            mine = (ok & (count >= low) & (count < tl.maximum(2 * low, 1))).to(tl.int32)
            slot = used + tl.cumsum(mine, 0) - mine
            tl.store(TILES + 2 * slot, s, mask=mine != 0)
            tl.store(TILES + 2 * slot + 1, s * 0, mask=mine != 0)
            used += tl.sum(mine, 0)
        low = low // 2


@triton.jit
def _varlen_schedule_kernel(
    CU_SEQLENS, NUM_QUERIES, CU_OUT, QUERIES_OUT, FWD_TILES, BWD_TILES, SEQ_TILES, STATUS,
    stride_cu, stride_nq, num_seqs, total_tokens, max_seqlen, all_queries, num_prefix,
    fwd_capacity, bwd_capacity, fwd_classes, fwd_top, bwd_classes, bwd_top, seq_classes, seq_top,
    FWD_BLOCK: tl.constexpr, BWD_BLOCK: tl.constexpr, SEQ_BLOCK: tl.constexpr, CHUNK: tl.constexpr,
    PER_SEQUENCE: tl.constexpr, NEEDS_RAW: tl.constexpr,
):
    """Offsets given with max_seqlen, in one program and without a host sync: checks their
    values (STATUS[0] one bit per broken rule, STATUS[1] 1 when none is), copies them
    (contiguous int32 counts), and writes the tile tables of the launches that follow,
    FlashAttention-3 style: every (sequence, row block) with rows, longest sequences first
    as a `VarlenLayout` orders them, then idle slots up to the capacity the host sized the
    grids for; and every sequence once in the same order (the one-pass backward's)."""
    errors = (tl.load(CU_SEQLENS) != 0) | (tl.load(CU_SEQLENS + num_seqs * stride_cu) != total_tokens)
    errors = errors.to(tl.int32)
    for c0 in range(0, num_seqs, CHUNK):
        s = c0 + tl.arange(0, CHUNK)
        ok = s < num_seqs
        a = tl.load(CU_SEQLENS + s * stride_cu, mask=ok, other=0)
        b = tl.load(CU_SEQLENS + (s + 1) * stride_cu, mask=ok, other=0)
        length = b - a
        if PER_SEQUENCE:
            queries = tl.load(NUM_QUERIES + s * stride_nq, mask=ok, other=0).to(tl.int64)
        else:
            queries = (s * 0).to(tl.int64) + all_queries
        raw = length - queries - num_prefix
        bits = tl.where(length < 0, 2, 0)
        bits |= tl.where((queries < 0) | (queries > length), 4, 0)
        bits |= tl.where(raw < 0, 8, 0)
        if NEEDS_RAW:
            bits |= tl.where((queries > 0) & (raw <= 0), 16, 0)
        bits |= tl.where(length > max_seqlen, 32, 0)
        errors |= tl.reduce(tl.where(ok, bits, 0), 0, _or)
        tl.store(CU_OUT + s, a, mask=ok)
        tl.store(QUERIES_OUT + s, tl.minimum(tl.maximum(queries, -1), 2**31 - 1).to(tl.int32), mask=ok)
    tl.store(CU_OUT + num_seqs, tl.load(CU_SEQLENS + num_seqs * stride_cu))
    _write_tile_table(FWD_TILES, CU_SEQLENS, stride_cu, num_seqs, max_seqlen, fwd_capacity,
                      total_tokens // FWD_BLOCK + 1, fwd_classes, fwd_top, FWD_BLOCK, CHUNK)
    _write_tile_table(BWD_TILES, CU_SEQLENS, stride_cu, num_seqs, max_seqlen, bwd_capacity,
                      total_tokens // BWD_BLOCK + 1, bwd_classes, bwd_top, BWD_BLOCK, CHUNK)
    _write_sequence_tiles(SEQ_TILES, CU_SEQLENS, stride_cu, num_seqs, max_seqlen, seq_classes,
                          seq_top, SEQ_BLOCK, CHUNK)
    tl.store(STATUS, errors)
    tl.store(STATUS + 1, (errors == 0).to(tl.int32))


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


# Tile configs. Chosen with bench.static (python -m bench.static; bench/NOTES.md has the
# figures): per target, no register spills at head_dim <= 128 and shared memory within
# what the GPU gives one program; among those, the lowest estimated time.


def _fwd_config(head_dim, dtype, capability, max_len, packed=False, mask=None):
    if triton_interpreter_enabled():
        # The interpreter runs each program in numpy: big tiles are fewer Python loops.
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        # Three TF32 products per dot hold more registers: narrow key tiles. Wide heads
        # also take half the rows and one stage where shared memory is short (fp32 at
        # head_dim 128 needs 112 KB in 64-row tiles, 208 KB at 256).
        shared = SHARED_MEMORY_PER_PROGRAM.get(capability, 99 * 1024)
        if head_dim > 128 or (head_dim > 64 and shared < 128 * 1024):
            return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if head_dim <= 64 and 64 < max_len <= 512 and capability >= 90 and not packed:
        # Measured on an H200 (bench/results/NVIDIA_H200/tune.md): at 207 tokens, 128-row
        # tiles over 32-key steps beat 64 x 64 by 1.14x (ViT-B/16 global), and came first
        # on both global shapes. Short sequences waste most of a 128-row tile, and the
        # packed batch mixes 37-token crops in, so both keep 64 x 64.
        cfg = dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=2)
        if not (mask and mask.sees_self) and torch.version.hip is None:
            # 3 programs per SM: without a cap ptxas takes 175-180 registers (2 per SM) and
            # spills 8 bytes with it, outside the loops (bench.static). Query rows that
            # see query keys hold more state; they keep what they take.
            cfg["maxnreg"] = 168
        return cfg
    # Also past 512 tokens (ViT-S/8): measured, 64 x 64 on 4 warps beat the 128 x 128
    # tiles on 8 warps that the static model had ranked first, by 1.18x on the H200.
    cfg = dict(BLOCK_M=64, BLOCK_N=64 if head_dim <= 64 else 32, num_warps=4, num_stages=2)
    if cfg["BLOCK_N"] == 64 and max_len > 512 and not packed:
        # A first tile 32 columns wide (`_first_columns`): at ViT-S/8's 785 visible tokens
        # the 17 left over after whole key steps go there, not to a masked step. Shorter
        # and packed sequences keep 16: the wider tile costs them more than it saves
        # (bench/NOTES.md).
        cfg["FIRST_BLOCK"] = 32
    if (head_dim <= 64 and capability >= 90 and not (mask and mask.sees_queries)
            and torch.version.hip is None):
        # 4 programs per SM: ptxas takes 128-131 registers (3 per SM past 128), and at 128
        # spills at most 8 bytes, outside the loops (bench.static). Query rows that see
        # query keys would spill inside them: they keep what they take.
        cfg["maxnreg"] = 128
    return cfg


def _bwd_config(head_dim, dtype, capability, packed=False, max_len=0):
    if triton_interpreter_enabled():
        cfg = dict(BLOCK_M1=16, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=16, num_warps=4, num_stages=1)
    elif dtype == torch.float32 and head_dim > 128:
        # fp32 at head_dim 256 holds 192 KB of shared memory even in 32 x 32 tiles.
        cfg = dict(BLOCK_M1=16, BLOCK_N1=16, BLOCK_M2=16, BLOCK_N2=16, num_warps=4, num_stages=1)
    elif head_dim > 128 or dtype == torch.float32:
        # fp32 (three TF32 products per dot) spills at 64-key blocks, and head_dim 256
        # needs over 164 KB of shared memory there: 32 x 32 tiles, one stage.
        cfg = dict(BLOCK_M1=32, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=32, num_warps=4, num_stages=1)
    elif head_dim > 64 and capability >= 90 and packed:
        # The packed backward's sequence bookkeeping and the row-by-row prefix and own-
        # column passes take the 64-row blocks below to 255 registers and 224 B of spills
        # (fp16, head_dim 80, query rows seeing prefix and self): 32-row blocks.
        cfg = dict(BLOCK_M1=16, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=16, num_warps=4, num_stages=1)
    elif head_dim > 64 and capability >= 90 and max_len > 64:
        # dK, dV, dQ accumulators of 128 columns in 64-row blocks: 32-wide row and key
        # steps fit 254 registers without a spill in a loop and take fewer instructions
        # per (row, column) pair than 16-wide ones (bench/NOTES.md, "the head_dim-128
        # backward"). Two stages spill, and 8 warps over 128-row blocks (one program per
        # SM) gain or lose with how the length falls on 128-row blocks.
        cfg = dict(BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32, num_warps=4, num_stages=1)
    elif head_dim > 64 and capability >= 90:
        # A sequence of one block: 16-wide steps pad a short one less (a 37-token crop
        # walks 48 rows and keys, not 64).
        cfg = dict(BLOCK_M1=16, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=16, num_warps=4, num_stages=1)
    elif head_dim > 64:
        # On sm_80 (mma.sync) the 64-row blocks above spill; 32 x 32 tiles do not.
        cfg = dict(BLOCK_M1=32, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=32, num_warps=4, num_stages=1)
    elif capability == 80 and max_len > 64 and not packed:
        # sm_80 (mma.sync): the 64-row blocks below take 255 registers, 2 programs per SM;
        # 32 x 32 tiles take 166, 3 per SM, and are predicted faster for batched sequences
        # past one block (bench.static: ViT-S/8 1505 -> 1304 µs), except in calls of under
        # about 100 (sequence, head) pairs (48 of 207 tokens: 24.3 -> 33.3, a few µs of a
        # host-bound call); not for one block (64 crops of 37 tokens: 22.0 -> 26.4) nor
        # packed (4 multi-crop images by offsets: 40.7 -> 46.7).
        cfg = dict(BLOCK_M1=32, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=32, num_warps=4, num_stages=2)
    else:
        cfg = dict(BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32, num_warps=4, num_stages=2)
        if packed and capability >= 90 and torch.version.hip is None:
            # The packed backward's sequence bookkeeping takes it to 174-192 registers, 2
            # programs per SM; the H200 showed these kernels latency-bound, faster with
            # more warps resident. Capped at 168: 3 programs, 16 bytes of spills, none in
            # a loop (bench/NOTES.md, "v3"). ROCm's Triton has no maxnreg, and an MI300
            # reports capability 9.4.
            cfg["maxnreg"] = 168
    return dict(cfg, PROGRAM_BLOCK=min(cfg["BLOCK_N1"], cfg["BLOCK_M2"]),
                SPLIT_ROWS=split_rows(cfg["BLOCK_M1"], packed, max_len))


def split_rows(block_m1, packed, max_len):
    """Whether the backward's first dK/dV pass walks its whole row tiles without row masks,
    then the partial one, in a loop of its own: for batched sequences longer than two row
    tiles. Shorter sequences (local crops on sm_80) and packed batches of them lose more to
    the second copy of the loop than the masks cost them (bench.static, bench/NOTES.md)."""
    return not packed and max_len > 2 * block_m1


def _table_blocks(q, max_len):
    """Rows per program of the packed forward and backward launches for q (any tensor with
    q's head_dim, dtype and device): the blocks their tile tables count in."""
    head_dim, capability = q.shape[-1], device_capability(q.device)
    return (_fwd_config(head_dim, q.dtype, capability, max_len, packed=True)["BLOCK_M"],
            _bwd_config(head_dim, q.dtype, capability, packed=True, max_len=max_len)["PROGRAM_BLOCK"])


# The packed one-pass backward takes its sequences (one program each, `_onepass_bwd_kernel`)
# longest first, in classes of powers of two of their blocks of this many rows: its
# key blocks, whose count times its row tiles' is a program's work.
SEQUENCE_BLOCK = 64

# A layout of at most this many runs of alike sequences (`VarlenLayout.runs`; a multi-crop
# batch packed by crop size is one run per size) may be attended run by run by the batched
# kernels, on views of the packed tensors, in a pass where `_fwd_by_runs` or
# `_bwd_by_runs` says so. Longer lists of runs (lengths that vary) stay packed.
MAX_BATCHED_RUNS = 4


def batched_runs(layout):
    """A layout's runs as the launchers take them, (count, length, num_queries) of each
    run flattened, or () when there are more than MAX_BATCHED_RUNS."""
    if len(layout.runs) > MAX_BATCHED_RUNS:
        return ()
    return tuple(n for run in layout.runs for n in run)


def varlen_tables(layout, q):
    """What the kernels take for a `VarlenLayout`: (cu_seqlens, num_queries tensor,
    max_seqlen, forward tiles, backward tiles, sequence tiles, runs: `batched_runs`), the
    tile tables built for the rows per program the launchers pick for q's head_dim, dtype
    and device (the sequence tiles, the one-pass backward's, in SEQUENCE_BLOCK rows)."""
    fwd_block, bwd_block = _table_blocks(q, layout.max_seqlen)
    return (layout.cu_seqlens, layout.num_queries, layout.max_seqlen, layout.tiles(fwd_block),
            layout.tiles(bwd_block), layout.sequence_tiles(SEQUENCE_BLOCK), batched_runs(layout))


def tile_capacity(num_seqs, total_tokens, max_seqlen, block):
    """Slots of a tile table for offsets known only on the device: at most
    ceil(max_seqlen / block) blocks per sequence, and at most (total_tokens + num_seqs *
    (block - 1)) // block in all (each sequence wastes under one block)."""
    return min(num_seqs * -(-max_seqlen // block), (total_tokens + num_seqs * (block - 1)) // block)


# The rules _varlen_schedule_kernel checks, by bit, in the order they are reported.
SCHEDULE_ERRORS = (
    (1, "cu_seqlens must start at 0 and end at total_tokens = {total}"),
    (2, "cu_seqlens must be non-decreasing"),
    (4, "num_queries[i] must be in [0, length of sequence i]"),
    (8, "num_prefix ({num_prefix}) exceeds the visible tokens of a sequence"),
    (16, "query rows of a sequence would attend to nothing: it has no raw tokens; {advice}"),
    (32, "max_seqlen ({max_seqlen}) is smaller than the longest sequence"),
)


# The device assert's message: which rule broke is known only on the device.
_SCHEDULE_ASSERT = ("cu_seqlens, num_queries or max_seqlen break a rule of the varlen op ("
                    + "; ".join(m.format(total="total_tokens", num_prefix="num_prefix",
                                         max_seqlen="given", advice=QueryMask().seeing_advice(1))
                                for _, m in SCHEDULE_ERRORS) + ")")


def _count_classes(max_seqlen, block):
    """(classes, the largest class's least count) of `longest_first` for sequences of up
    to max_seqlen rows in blocks of `block` (the classes of sequences with rows: (0, 0)
    when none has any)."""
    classes = (-(-max_seqlen // block)).bit_length()
    return classes, 1 << (classes - 1) if classes else 0


def varlen_schedule(q, cu_seqlens, num_queries, max_seqlen, num_prefix, mask):
    """What the kernels take for offsets given with max_seqlen, from one small launch and
    no host sync: (cu_seqlens, num_queries tensor, max_seqlen, forward tiles, backward
    tiles, sequence tiles, ()): offsets known only on the device take the packed kernels. The launch
    checks the offsets' values; a broken rule raises here on CPU (the interpreter runs
    synchronously) and fails a device assert on CUDA, which surfaces at the next
    synchronising call.

    The grids then have one program per tile-table slot and head: every (sequence, row
    block) with rows, and the few idle slots that the host's bound on their number leaves.
    """
    num_seqs, total = cu_seqlens.numel() - 1, q.shape[0]
    fwd_block, bwd_block = _table_blocks(q, max_seqlen)
    fwd_capacity = tile_capacity(num_seqs, total, max_seqlen, fwd_block)
    bwd_capacity = tile_capacity(num_seqs, total, max_seqlen, bwd_block)
    ints = torch.empty(4 * num_seqs + 3 + 2 * (fwd_capacity + bwd_capacity), dtype=torch.int32,
                       device=q.device)
    cu_out, queries_out, status, fwd_tiles, bwd_tiles, seq_tiles = ints.split(
        [num_seqs + 1, num_seqs, 2, 2 * fwd_capacity, 2 * bwd_capacity, 2 * num_seqs])
    per_sequence = isinstance(num_queries, torch.Tensor)
    _varlen_schedule_kernel.run(
        cu_seqlens, num_queries if per_sequence else cu_seqlens, cu_out, queries_out, fwd_tiles,
        bwd_tiles, seq_tiles, status, cu_seqlens.stride(0),
        num_queries.stride(0) if per_sequence else 0,
        num_seqs, total, max_seqlen, 0 if per_sequence else num_queries, num_prefix,
        fwd_capacity, bwd_capacity, *_count_classes(max_seqlen, fwd_block),
        *_count_classes(max_seqlen, bwd_block), *_count_classes(max_seqlen, SEQUENCE_BLOCK),
        grid=(1,), warmup=False, FWD_BLOCK=fwd_block, BWD_BLOCK=bwd_block,
        SEQ_BLOCK=SEQUENCE_BLOCK, CHUNK=128, PER_SEQUENCE=per_sequence,
        NEEDS_RAW=not (mask.sees_self or (mask.sees_prefix and num_prefix > 0)), num_warps=4)
    if q.device.type == "cuda":
        torch._assert_async(status[1], _SCHEDULE_ASSERT)
    else:
        errors = int(status[0])
        for bit, message in SCHEDULE_ERRORS:
            if errors & bit:
                raise RuntimeError(message.format(total=total, num_prefix=num_prefix,
                                                  max_seqlen=max_seqlen,
                                                  advice=mask.seeing_advice(num_prefix)))
    return (cu_out, queries_out, max_seqlen, fwd_tiles.view(fwd_capacity, 2),
            bwd_tiles.view(bwd_capacity, 2), seq_tiles.view(num_seqs, 2), ())


# Every launch of the op's kernels after a specialization's first skips Triton's argument
# binding: for the backward's 40-odd arguments it cost about as much host time as the
# rest of an eager call (see _triton_launch). Interpreted kernels are left as they are.
for _kernel in (_unidirectional_fwd_kernel, _unidirectional_bwd_delta_kernel,
                _unidirectional_bwd_kernel, _onepass_bwd_kernel, _varlen_schedule_kernel):
    fast_launch(_kernel)
del _kernel


def _bhld_strides(t):
    """Strides as (batch, head, token, dim); packed (tokens, heads, dim) tensors have no batch."""
    if t.dim() == 3:
        return (0, t.stride(1), t.stride(0), t.stride(2))
    return t.stride()


def _flags(mask):
    """The kernels' constexprs for a QueryMask (each combination compiles its own code)."""
    return dict(SEES_PREFIX=mask.sees_prefix, SEES_SELF=mask.sees_self,
                SEES_QUERIES=mask.sees_queries)


class Geometry(NamedTuple):
    """Where the sequences are. Batched: num_seqs = batch equal sequences of the given
    lengths. Packed: lengths and query counts are read per sequence from cu_seqlens and
    num_queries, and optional tile tables list the (sequence, block) pairs to run (and the
    sequences, for the one-pass backward's programs); runs
    (`batched_runs`) lists the runs of alike sequences a pass may take by the batched
    kernels, where `_fwd_by_runs` or `_bwd_by_runs` says so."""
    num_seqs: int
    heads: int
    max_len: int
    seq_len: int = 0
    key_len: int = 0
    visible: int = 0
    total_tokens: int = 0
    cu_seqlens: torch.Tensor | None = None
    num_queries: torch.Tensor | None = None
    fwd_tiles: torch.Tensor | None = None
    bwd_tiles: torch.Tensor | None = None
    seq_tiles: torch.Tensor | None = None
    runs: tuple = ()

    def grid(self, block, tiles):
        if tiles is not None:  # one program per (tile, head): none is empty
            return tiles.shape[0], tiles.shape[0] * self.heads
        blocks = -(-self.max_len // block)  # triton.cdiv is a constexpr_function: slow on the host
        return blocks, blocks * self.num_seqs * self.heads

    def run_geometries(self):
        """The batched geometry of each run of a packed call's alike sequences (runs)."""
        return _run_geometries(self.runs, self.heads)

    def run_views(self, *tensors):
        """Each run's batched geometry, and the tensors' views of its tokens: (count,
        heads, length, ...) of a (tokens, heads, ...) tensor, (count, heads, length) of
        per-row (heads, tokens) ones."""
        # One as_strided per view: slicing, splitting and transposing took three times the
        # host time, paid for every tensor of every run of every call.
        layouts = [(t, t.stride(), t.storage_offset()) for t in tensors]
        start = 0
        for geo in self.run_geometries():
            count, length = geo.num_seqs, geo.seq_len
            views = []
            for t, st, offset in layouts:
                if len(st) == 2:  # (heads, tokens) rows
                    views.append(t.as_strided((count, t.shape[0], length), (length * st[1], st[0], st[1]),
                                              offset + start * st[1]))
                else:
                    views.append(t.as_strided((count, t.shape[1], length, t.shape[2]),
                                              (length * st[0], st[1], st[0], st[2]),
                                              offset + start * st[0]))
            yield geo, views
            start += count * length


@functools.lru_cache(maxsize=256)
def _run_geometries(runs, heads):
    # Made once per layout and head count: a call's host time otherwise rebuilt them.
    return tuple(Geometry(count, heads, length, length, length, length - queries)
                 for count, length, queries in zip(runs[::3], runs[1::3], runs[2::3]))


def _row_strides(rows):
    """(batch, head) strides of per-row statistics: lse's, which the backwards also index
    their (lse, delta) words with: (batch, heads, seq), or (heads, tokens) packed; unit
    stride along the rows."""
    # The forward makes lse so, and a run's view of it keeps that stride.
    assert rows.stride(-1) == 1, "per-row statistics need unit stride along the rows"
    if rows.dim() == 3:
        return rows.stride(0), rows.stride(1)
    return 0, rows.stride(0)


def batched_geometry(q, k, num_queries):
    batch, heads, seq, _ = q.shape
    return Geometry(batch, heads, seq, seq, k.shape[2], seq - num_queries)


def varlen_geometry(q, cu_seqlens, num_queries, max_seqlen, fwd_tiles, bwd_tiles, seq_tiles,
                    runs=()):
    return Geometry(cu_seqlens.numel() - 1, q.shape[1], max_seqlen, total_tokens=q.shape[0],
                    cu_seqlens=cu_seqlens, num_queries=num_queries, fwd_tiles=fwd_tiles,
                    bwd_tiles=bwd_tiles, seq_tiles=seq_tiles, runs=tuple(runs))


def _empty_bhld(batch, heads, seq, head_dim, like):
    # (batch, seq, heads, head_dim) memory seen as (batch, heads, seq, head_dim): the
    # caller's output projection reads it as (batch, seq, heads * head_dim) for free.
    # Allocated with these strides rather than as a transposed view: autograd does more
    # work for a Function output that is a view.
    # Tensor.new_* and empty_like take dtype and device from `like`: parsing them as
    # keyword arguments (a torch.Size shape too) cost twice the allocation on the host.
    return like.new_empty_strided((batch, heads, seq, head_dim),
                                  (seq * heads * head_dim, head_dim, heads * head_dim, 1))


def _empty_tokens(shape, like):
    """Token-major memory, (..., tokens, heads, head_dim), like the caller's projections."""
    return like.new_empty(tuple(shape))


def _empty_rows(batch, heads, seq, like):
    """Per-row fp32 statistics (the logsumexp)."""
    return torch.empty(batch, heads, seq, dtype=torch.float32, device=like.device)


def _empty_out(q):
    """The output for q's layout: (B, H, L, D) over token-major memory, or (T, H, D)."""
    if q.dim() == 4:
        return _empty_bhld(*q.shape, q)
    return _empty_tokens(q.shape, q)


def _empty_qkv(qkv):
    """The gradient of a packed qkv projection: one buffer, written by the backward."""
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _empty_lse(q):
    if q.dim() == 4:
        return _empty_rows(*q.shape[:3], q)
    return _empty_rows(1, q.shape[1], q.shape[0], q)[0]


def _launch_constants(kind, head_dim, dtype, device, max_len, varlen, tiled, mask):
    """(rows per program, the kernel's constexprs, the delta kernel's) of a launch, worked
    out once per kind of call: a call's host time was otherwise spent re-deriving them.

    The key holds everything the rules read, the rules themselves included, so the
    interpreter switch, float32 matmul precision, the device's compute capability or a
    config rule swapped in by bench.tune all still take effect.
    """
    rule = _fwd_config if kind == "fwd" else _bwd_config
    interpreted, capability = triton_interpreter_enabled(), device_capability(device)
    key = (kind, head_dim, dtype, device, max_len, varlen, tiled, mask, interpreted, capability,
           torch.get_float32_matmul_precision(), rule)
    found = _CONSTANTS.get(key)
    if found is None:
        common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), VARLEN=varlen, TILED=tiled)
        if kind == "fwd":
            cfg = dict(rule(head_dim, dtype, capability, max_len, packed=varlen, mask=mask),
                       APPROX_LOG2=approx_log2())
            cfg.setdefault("FIRST_BLOCK", PREFIX_BLOCK.value)
            # l on the tensor cores (`_attend_tiles`), for 16-bit inputs on sm_90: on sm_80
            # the product's registers cost the 37-token crops a program per SM
            # (bench.static).
            cfg.setdefault("ROWSUM_MMA", dot_mode(dtype) == "native" and torch.version.hip is None
                           and (interpreted or capability >= 90))
            block, delta = cfg["BLOCK_M"], None
        else:
            cfg = dict(rule(head_dim, dtype, capability, packed=varlen, max_len=max_len))
            block = cfg.pop("PROGRAM_BLOCK")
            delta = dict(common, BLOCK_M=block)
        found = (block, dict(cfg, DOT=dot_mode(dtype), **common, **_flags(mask)), delta)
        if len(_CONSTANTS) >= 1024:  # a sweep of configs: start over rather than grow
            _CONSTANTS.clear()
        _CONSTANTS[key] = found
    return found


_CONSTANTS = {}


def _oneshot(kind, q, geo):
    """The one-shot kernels' (BLOCK_M, num_warps) for this call, or None (flash kernels)."""
    if geo.cu_seqlens is not None:
        return None
    return oneshot_config(kind, geo.seq_len, q.shape[-1], q.dtype, device_capability(q.device),
                          triton_interpreter_enabled())


# Where a packed call's runs (Geometry.runs) take the batched kernels, by bench.static
# (bf16, sm_90, multi-crop batches of ViT-S/B/L at 8 to 128 images, bench/NOTES.md):
# - the forward, where a run takes the one-shot forward (local crops: 82.3 -> 65.2 µs for
#   128 ViT-S/16 images' ten crops, forward 177.0 -> 162.4 µs in all);
# - the backward, where the packed call is too small for the packed one-pass backward
#   (its flash backward runs instead) and every run takes a one-shot or a one-pass
#   backward of its own (32 ViT-S/16 images: 124.6 -> 91.9 µs). Where the packed one-pass
#   backward runs, it ties or wins: its short sequences' programs fill the waves that the
#   global crops' leave part-empty (43 images: 126.0 against 163.8 µs by runs).


def _fwd_by_runs(q, geo):
    """Whether the forward of a packed call of runs takes the batched kernels, run by run."""
    return any(_oneshot("fwd", q, run) for run in geo.run_geometries())


def _bwd_by_runs(q, geo, mask, packed_onepass):
    """Whether the backward of a packed call of runs takes the batched kernels, run by run
    (packed_onepass: whether the packed one-pass kernel would take it)."""
    # An empty run needs no kernel (its gradients are zeroed).
    return not packed_onepass and all(
        run.seq_len == 0 or _oneshot("bwd", q, run) or _onepass(q, run, mask)
        for run in geo.run_geometries())


def _onepass_or_runs(q, geo, mask, tensors):
    """(the one-pass backward's constexprs or None, whether the call goes run by run)."""
    constants = _onepass(q, geo, mask, tensors)
    if not geo.runs:
        return constants, False
    if _bwd_by_runs(q, geo, mask, constants is not None):
        return None, True
    # Runs that cannot all take the batched kernels: a packed call like one by offsets.
    return constants or _onepass(q, geo._replace(runs=()), mask, tensors), False


def attention_fwd(q, k, v, out, lse, geo, num_prefix, mask, scale):
    """Forward into out and lse (base-2 logsumexp, fp32), any q/k/v/out strides."""
    if out.numel() == 0:
        return
    if geo.runs and _fwd_by_runs(q, geo):
        for run, views in geo.run_views(q, k, v, out, lse):
            attention_fwd(*views, run, num_prefix, mask, scale)
        return
    config = _oneshot("fwd", q, geo)
    if config is not None:
        oneshot_fwd(q, k, v, out, lse, config, geo.seq_len - geo.visible, num_prefix, mask, scale)
        return
    varlen = geo.cu_seqlens is not None
    block, constants, _ = _launch_constants("fwd", q.shape[-1], q.dtype, q.device, geo.max_len,
                                            varlen, geo.fwd_tiles is not None, mask)
    blocks, programs = geo.grid(block, geo.fwd_tiles)
    if programs == 0:  # an empty tile table: offsets that failed their device check
        return
    _unidirectional_fwd_kernel.run(
        q, k, v, out, lse, geo.cu_seqlens, geo.num_queries, geo.fwd_tiles,
        *_bhld_strides(q), *_bhld_strides(k), *_bhld_strides(v), *_bhld_strides(out),
        *_row_strides(lse), blocks, geo.heads, geo.num_seqs, geo.seq_len, geo.key_len,
        geo.visible, geo.total_tokens, num_prefix, scale * LOG2E, grid=(programs,), warmup=False,
        **constants)


def _delta_inside(q, geo, blocks):
    """Whether the backward computes delta in its own programs, without the pre-pass: when
    one program per (sequence, head) owns every row (batched, at most one block long),
    for the configs bench.static predicted it for (bf16/fp16, head_dim <= 64, sm_90 with
    Triton's register cap), and always in the interpreter, where the tests run it."""
    if blocks != 1 or geo.cu_seqlens is not None:
        return False
    if triton_interpreter_enabled():
        return True
    return (q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 64
            and device_capability(q.device) >= 90 and torch.version.hip is None)


# The longest sequence the one-pass backward takes on a GPU, and the fewest (sequence,
# head) programs of a call it takes. Packed: with fewer, the longest sequence, walked by
# one program, sets the time (bench.static, the multi-crop batch by offsets: 11 images tie
# at 792 programs, 12 win 47 to 56 µs). A layout of a few runs (`Geometry.runs`) goes run
# by run instead below ONEPASS_MIN_PROGRAMS_OVER_RUNS where every run can (32 images,
# trainer order: 79 µs by runs, 84 packed); where not, it is a packed call like any other.
# Batched: under about half a wave (3 programs per SM on 132 SMs), one program walking a
# whole sequence takes longer than the flash backward's programs, one per row block, take
# in all (bench.static: at 144 programs 795 tokens lose 390 to 361 µs; at 192, 207 tokens
# win 46 to 58 µs and 795 tokens 390 to 452).
ONEPASS_MAX_LEN = 1024
ONEPASS_MIN_PACKED_PROGRAMS = 864
ONEPASS_MIN_PROGRAMS_OVER_RUNS = 3072
ONEPASS_MIN_BATCHED_PROGRAMS = 192
# On sm_80 (an A100's 108 SMs, 3 programs each; an A30 has 56): one program walking a
# whole sequence loses to the flash backward below about one and a half waves, and past
# 512 tokens (bench.static,
# 207 tokens: 288 programs 92.0 against 117.7 µs, 384 programs 183.9 against 151.4, 576
# 183.9 against 220.3; ViT-S/8's 795 at 384 programs 1917 against 1304).
ONEPASS_MAX_LEN_SM80 = 512
ONEPASS_MIN_PROGRAMS_SM80 = 486


def onepass_config(seq_len, head_dim, dtype, capability, interpreted, varlen=False, programs=0,
                   runs=False):
    """The one-pass backward's constexprs for `programs` (sequence, head) pairs of at most
    seq_len tokens (batched, or packed with varlen; with runs, a layout of a few runs)
    under the default mask rule or query_sees_prefix alone, or None (the flash backward,
    or the runs' own kernels): where bench.static predicted it (bf16/fp16, head_dim <= 64,
    sm_90, at least ONEPASS_MIN_BATCHED_PROGRAMS, ONEPASS_MIN_PACKED_PROGRAMS or
    ONEPASS_MIN_PROGRAMS_OVER_RUNS; sm_80 within ONEPASS_MAX_LEN_SM80 and from
    ONEPASS_MIN_PROGRAMS_SM80 too), and always in the interpreter, where the tests run
    it."""
    if not varlen:
        fewest = ONEPASS_MIN_BATCHED_PROGRAMS
    else:
        fewest = ONEPASS_MIN_PROGRAMS_OVER_RUNS if runs else ONEPASS_MIN_PACKED_PROGRAMS
    if interpreted:
        cfg = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)
    elif (dtype in (torch.float16, torch.bfloat16) and head_dim <= 64 and capability == 80
          and torch.version.hip is None and seq_len <= ONEPASS_MAX_LEN_SM80
          and programs >= max(fewest, ONEPASS_MIN_PROGRAMS_SM80)):
        # sm_80 (mma.sync), bench.static: 32 x 64 tiles spill 392 bytes under the cap;
        # 32 x 32 take 168 registers, 3 programs per SM, none spilled.
        cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1, maxnreg=168)
    elif (dtype in (torch.float16, torch.bfloat16) and head_dim <= 64 and capability >= 90
          and torch.version.hip is None and seq_len <= ONEPASS_MAX_LEN and programs >= fewest):
        # bench.static (bench/NOTES.md, "the one-pass backward" and "dQ by reductions"):
        # uncapped, ptxas takes 210 registers (2 programs per SM); at 168, 3 per SM
        # without a spill (Triton 3.6: 8 bytes, reloaded once outside the loops). At 128
        # (4 per SM) it spills inside the tile loops; two stages spill too.
        cfg = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1, maxnreg=168)
    else:
        return None
    return dict(cfg, HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), DOT=dot_mode(dtype),
                VARLEN=varlen)


def _onepass(q, geo, mask, tensors=()):
    """The one-pass backward's constexprs for this call, or None. A packed call's token
    offsets must fit in int32 in every tensor (the kernel's row indices), tensors being
    the call's packed (tokens, heads, dim) ones."""
    if mask.sees_self or mask.sees_queries:
        return None
    varlen = geo.cu_seqlens is not None
    if varlen and max(t.shape[0] * t.stride(0) + t.shape[2] * t.stride(2)
                      for t in tensors) >= 2**31:
        return None
    cfg = onepass_config(geo.max_len, q.shape[-1], q.dtype, device_capability(q.device),
                         triton_interpreter_enabled(), varlen, geo.num_seqs * geo.heads,
                         bool(geo.runs))
    return cfg and dict(cfg, SEES_PREFIX=mask.sees_prefix, TILED=geo.seq_tiles is not None)


def _empty_scratch(lse, width):
    """`width` fp32 values for every row of lse, laid out as lse is: the backwards' (lse,
    delta) words (width 2), the one-pass backward's dQ (each of its programs owns its
    sequence's rows of one head). Where lse is a run's view of a packed call's statistics,
    the buffer spans that call's rows, as the kernels index it with lse's strides."""
    return lse.new_empty_strided((*lse.shape, width), (*(s * width for s in lse.stride()), 1))


def onepass_bwd(grad_out, q, k, v, out, lse, dq, dk, dv, constants, geo, num_prefix, scale):
    """The one-pass backward into dq, dk, dv (batched views or packed tokens): one launch,
    one program per (sequence, head)."""
    programs = geo.num_seqs * geo.heads
    stats = _empty_scratch(lse, 2)
    scratch = _empty_scratch(lse, constants["BLOCK_D"])
    _onepass_bwd_kernel.run(
        q, k, v, out, grad_out, lse, stats, scratch, dq, dk, dv, *_bhld_strides(q),
        *_bhld_strides(k), *_bhld_strides(v), *_bhld_strides(out), *_bhld_strides(grad_out),
        *_bhld_strides(dq), *_bhld_strides(dk), *_bhld_strides(dv), *_row_strides(lse),
        geo.heads, geo.num_seqs, geo.seq_len, geo.key_len, geo.visible, geo.total_tokens,
        num_prefix, scale * LOG2E, scale, geo.cu_seqlens, geo.num_queries, geo.seq_tiles,
        grid=(programs,), warmup=False, **constants)


def attention_bwd(grad_out, q, k, v, out, lse, dq, dk, dv, geo, num_prefix, mask, scale):
    """Backward into dq, dk, dv (any strides: e.g. views of one dqkv buffer)."""
    if dq.numel() == 0:
        dk.zero_(), dv.zero_()
        return
    config = _oneshot("bwd", q, geo)
    if config is not None:
        oneshot_bwd(grad_out, q, k, v, out, lse, dq, dk, dv, config, geo.seq_len - geo.visible,
                    num_prefix, mask, scale)
        return
    constants, by_runs = _onepass_or_runs(q, geo, mask, (grad_out, q, k, v, out, dq, dk, dv))
    if by_runs:
        for run, views in geo.run_views(grad_out, q, k, v, out, lse, dq, dk, dv):
            attention_bwd(*views, run, num_prefix, mask, scale)
        return
    if constants is not None:
        onepass_bwd(grad_out, q, k, v, out, lse, dq, dk, dv, constants, geo, num_prefix, scale)
        return
    varlen, tiled = geo.cu_seqlens is not None, geo.bwd_tiles is not None
    block, constants, delta_constants = _launch_constants(
        "bwd", q.shape[-1], q.dtype, q.device, geo.max_len, varlen, tiled, mask)
    blocks, programs = geo.grid(block, geo.bwd_tiles)
    if programs == 0:
        return
    stats = _empty_scratch(lse, 2)
    delta_rows = block if _delta_inside(q, geo, blocks) else 0
    if delta_rows and not triton_interpreter_enabled():
        # bench.static (bf16, sm_90, 37 tokens): the delta takes the kernel from 160 to 172
        # registers, 3 to 2 programs per SM (backward 187 -> 261 µs); capped at 168 it keeps
        # 3, 8 bytes spilled outside the loops (187 -> 174 µs, one launch less).
        constants = dict(constants, maxnreg=168)
    if not delta_rows:
        _unidirectional_bwd_delta_kernel.run(
            out, grad_out, lse, stats, geo.cu_seqlens, geo.num_queries, geo.bwd_tiles,
            *_bhld_strides(out), *_bhld_strides(grad_out), *_row_strides(lse), blocks, geo.heads,
            geo.num_seqs, geo.seq_len, geo.total_tokens, grid=(programs,), warmup=False, **delta_constants)
    _unidirectional_bwd_kernel.run(
        q, k, v, grad_out, lse, stats, dq, dk, dv, geo.cu_seqlens, geo.num_queries, geo.bwd_tiles,
        *_bhld_strides(q), *_bhld_strides(k), *_bhld_strides(v), *_bhld_strides(grad_out),
        *_bhld_strides(dq), *_bhld_strides(dk), *_bhld_strides(dv), *_row_strides(lse),
        blocks, geo.heads, geo.num_seqs, geo.seq_len, geo.key_len, geo.visible, geo.total_tokens,
        num_prefix, scale * LOG2E, scale, out, *_bhld_strides(out), grid=(programs,), warmup=False,
        DELTA_ROWS=delta_rows, **constants)


# ----------------------------------------------------------------------------------------
# Custom ops and autograd
# ----------------------------------------------------------------------------------------
# Two op pairs, each serving batched (batch, heads, seq, dim) and packed (tokens, heads,
# dim) inputs (cu_seqlens given): one on q, k, v, and one on the packed qkv projection
# output, whose backward writes dq, dk, dv into one (..., 3, heads, dim) gradient, so
# that autograd has nothing to stack or copy on the way to the qkv projection.


def _geometry(q, k, num_queries, cu_seqlens, num_queries_t, fwd_tiles, bwd_tiles, seq_tiles,
              max_seqlen, runs=()):
    if cu_seqlens is None:
        return batched_geometry(q, k, num_queries)
    return varlen_geometry(q, cu_seqlens, num_queries_t, max_seqlen, fwd_tiles, bwd_tiles,
                           seq_tiles, runs)


def _unpack(qkv):
    """q, k, v views of a (B, L, 3, H, D) or (T, 3, H, D) projection, in the op's layout."""
    if qkv.dim() == 5:
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return qkv.unbind(1)


def _forward(q, k, v, geo, num_prefix, mask, scale):
    out, lse = _empty_out(q), _empty_lse(q)
    attention_fwd(q, k, v, out, lse, geo, num_prefix, mask, scale)
    return out, lse


def _backward_qkv(grad_out, q, k, v, out, lse, geo, num_prefix, mask, scale):
    dq, dk, dv = _empty_out(q), _empty_out(k), _empty_out(v)
    attention_bwd(grad_out, q, k, v, out, lse, dq, dk, dv, geo, num_prefix, mask, scale)
    return dq, dk, dv


def _backward_packed(grad_out, qkv, out, lse, geo, num_prefix, mask, scale, views=None):
    """views: q, k, v as `_unpack(qkv)` gives them, when the caller has them already."""
    dqkv = _empty_qkv(qkv)
    attention_bwd(grad_out, *(views or _unpack(qkv)), out, lse, *_unpack(dqkv), geo, num_prefix,
                  mask, scale)
    return dqkv


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor],
            num_queries_t: Optional[Tensor], fwd_tiles: Optional[Tensor],
            bwd_tiles: Optional[Tensor], seq_tiles: Optional[Tensor], num_queries: int,
            max_seqlen: int, runs: list[int],
            num_prefix: int, query_sees_prefix: bool, query_sees_self: bool,
            query_sees_queries: bool, scale: float) -> tuple[Tensor, Tensor]:
    geo = _geometry(q, k, num_queries, cu_seqlens, num_queries_t, fwd_tiles, bwd_tiles, seq_tiles,
                    max_seqlen, runs)
    return _forward(q, k, v, geo, num_prefix,
                    query_mask(query_sees_prefix, query_sees_self, query_sees_queries), scale)


_fwd_op = torch.library.custom_op("adclr_kernels::unidirectional_attention_fwd", _fwd_impl,
                                  mutates_args=())


@_fwd_op.register_fake
def _fwd_fake(q, k, v, *args):
    return _empty_out(q), _empty_lse(q)


def _bwd_impl(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
            cu_seqlens: Optional[Tensor], num_queries_t: Optional[Tensor],
            fwd_tiles: Optional[Tensor], bwd_tiles: Optional[Tensor],
            seq_tiles: Optional[Tensor], num_queries: int, max_seqlen: int, runs: list[int],
            num_prefix: int, query_sees_prefix: bool,
            query_sees_self: bool, query_sees_queries: bool,
            scale: float) -> tuple[Tensor, Tensor, Tensor]:
    geo = _geometry(q, k, num_queries, cu_seqlens, num_queries_t, fwd_tiles, bwd_tiles, seq_tiles,
                    max_seqlen, runs)
    return _backward_qkv(grad_out, q, k, v, out, lse, geo, num_prefix,
                         query_mask(query_sees_prefix, query_sees_self, query_sees_queries), scale)


_bwd_op = torch.library.custom_op("adclr_kernels::unidirectional_attention_bwd", _bwd_impl,
                                  mutates_args=())


@_bwd_op.register_fake
def _bwd_fake(grad_out, q, k, v, *args):
    return _empty_out(q), _empty_out(k), _empty_out(v)


def _setup_context(ctx, inputs, output):
    q, k, v, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = args
    ctx.mark_non_differentiable(lse)
    # The logsumexp output gets no gradient; without this autograd would fill one with
    # zeros (a kernel launch per layer) only to pass it here unused.
    ctx.set_materialize_grads(False)


# What differentiating the backward again raises, on every path (the custom ops', the
# eager Function's and the torch.func transforms').
NO_SECOND_DERIVATIVE = ("the Triton attention backward has no autograd formula: no second "
                        "derivative through backend='triton' (backend='reference' has one)")


def _no_second_derivative(ctx, *grads):
    raise RuntimeError(NO_SECOND_DERIVATIVE)


def _backward(ctx, grad_out, grad_lse):
    if grad_out is None:
        return (None,) * (3 + len(ctx.args))
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_op(grad_out, q, k, v, out, lse, *ctx.args)
    return (dq, dk, dv) + (None,) * len(ctx.args)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_bwd_op.register_autograd(_no_second_derivative, setup_context=lambda ctx, inputs, output: None)


def _qkv_fwd_impl(qkv: Tensor, cu_seqlens: Optional[Tensor], num_queries_t: Optional[Tensor],
                fwd_tiles: Optional[Tensor], bwd_tiles: Optional[Tensor],
                seq_tiles: Optional[Tensor], num_queries: int, max_seqlen: int, runs: list[int],
                num_prefix: int, query_sees_prefix: bool,
                query_sees_self: bool, query_sees_queries: bool,
                scale: float) -> tuple[Tensor, Tensor]:
    return _fwd_impl(*_unpack(qkv), cu_seqlens, num_queries_t, fwd_tiles, bwd_tiles, seq_tiles,
                     num_queries, max_seqlen, runs, num_prefix, query_sees_prefix, query_sees_self,
                     query_sees_queries, scale)


_qkv_fwd_op = torch.library.custom_op("adclr_kernels::qkvpacked_attention_fwd", _qkv_fwd_impl,
                                      mutates_args=())


@_qkv_fwd_op.register_fake
def _qkv_fwd_fake(qkv, *args):
    return _fwd_fake(*_unpack(qkv))


def _qkv_bwd_impl(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor,
                cu_seqlens: Optional[Tensor], num_queries_t: Optional[Tensor],
                fwd_tiles: Optional[Tensor], bwd_tiles: Optional[Tensor],
                seq_tiles: Optional[Tensor], num_queries: int, max_seqlen: int, runs: list[int],
                num_prefix: int, query_sees_prefix: bool,
                query_sees_self: bool, query_sees_queries: bool, scale: float) -> Tensor:
    q, k, _ = _unpack(qkv)
    geo = _geometry(q, k, num_queries, cu_seqlens, num_queries_t, fwd_tiles, bwd_tiles, seq_tiles,
                    max_seqlen, runs)
    return _backward_packed(grad_out, qkv, out, lse, geo, num_prefix,
                            query_mask(query_sees_prefix, query_sees_self, query_sees_queries), scale)


_qkv_bwd_op = torch.library.custom_op("adclr_kernels::qkvpacked_attention_bwd", _qkv_bwd_impl,
                                      mutates_args=())


@_qkv_bwd_op.register_fake
def _qkv_bwd_fake(grad_out, qkv, *args):
    return _empty_qkv(qkv)


def _qkv_setup_context(ctx, inputs, output):
    qkv, *args = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.args = args
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _qkv_backward(ctx, grad_out, grad_lse):
    if grad_out is None:
        return (None,) * (1 + len(ctx.args))
    qkv, out, lse = ctx.saved_tensors
    return (_qkv_bwd_op(grad_out, qkv, out, lse, *ctx.args),) + (None,) * len(ctx.args)


_qkv_fwd_op.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)
_qkv_bwd_op.register_autograd(_no_second_derivative,
                              setup_context=lambda ctx, inputs, output: None)


def _eager(*tensors):
    """Whether a call may skip the custom-op dispatcher: calls on real tensors that
    nothing traces.

    The dispatcher's Python (default filling, wrapper unwrapping) was two thirds of the
    op's host time per call (cProfile on CPU), and on the H200 the op's calls, not its
    kernels, set its time at ViT sizes. Anything that traces (torch.compile, fake and
    meta tensors, a dispatch mode such as make_fx's) takes the registered custom ops,
    which trace through their fake implementations. The torch.func transforms (grad,
    vmap, ...) take the autograd.Function below: torch.func.grad refuses the one that
    torch.library builds for a custom op (it has no setup_context).
    """
    return (not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0
            and all(type(t) in (torch.Tensor, torch.nn.Parameter) and not t.is_meta
                    for t in tensors))


def _map_calls(apply, info, in_dims, first, inputs):
    """A vmap rule: one call per element of the mapped dimension, as a custom op's
    fallback does; every output stacked along dimension 0. `first` (not a tensor) is
    passed to every call as it is."""
    outs = []
    for i in range(info.batch_size):
        # A mapped tensor has an int dim; the rest (a list of ints too) pass as they are.
        args = [x.select(d, i) if isinstance(d, int) else x for x, d in zip(inputs, in_dims[1:])]
        out = apply(first, *args)
        outs.append(out if isinstance(out, tuple) else (out,))
    stacked = tuple(torch.stack(t) for t in zip(*outs))
    if len(stacked) == 1:
        return stacked[0], 0
    return stacked, (0,) * len(stacked)


class _TransformBackward(torch.autograd.Function):
    """The backward body as a function the torch.func transforms take. It has no
    derivative, as the custom op has none: differentiating it again raises."""

    @staticmethod
    def forward(packed_qkv, *inputs):
        return (_qkv_bwd_impl if packed_qkv else _bwd_impl)(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(NO_SECOND_DERIVATIVE)

    @staticmethod
    def vmap(info, in_dims, packed_qkv, *inputs):
        return _map_calls(_TransformBackward.apply, info, in_dims, packed_qkv, inputs)


class _Call:
    """An eager call past its checks: everything the kernels take besides the
    differentiable tensors, the geometry worked out once for both passes.

    A plain object, not a tuple: the torch.func transforms pass it through as one
    argument (a NamedTuple would be taken apart as a pytree).
    """

    __slots__ = ("packed_qkv", "geo", "num_queries", "num_prefix", "mask", "scale", "varlen",
                 "with_lse", "stash")

    def __init__(self, packed_qkv, geo, num_queries, num_prefix, mask, scale, varlen, with_lse):
        self.packed_qkv, self.geo, self.num_queries = packed_qkv, geo, num_queries
        self.num_prefix, self.mask, self.scale = num_prefix, mask, scale
        # (cu_seqlens, num_queries tensor, max_seqlen, fwd_tiles, bwd_tiles, seq_tiles, runs)
        self.varlen = varlen
        # Whether the forward returns its logsumexp as a second output: for the prefix
        # probabilities, and under the torch.func transforms, which only carry to
        # setup_context what the forward returns. Otherwise the forward leaves it in
        # `stash` for setup_context (autograd's work per call grows with the outputs),
        # with a packed qkv's q, k, v views for the backward (unbinding them is not free).
        self.with_lse, self.stash = with_lse, None

    def op_args(self):
        """The custom ops' arguments after the tensors (their schemas take plain bools)."""
        cu_seqlens, queries, max_seqlen, fwd_tiles, bwd_tiles, seq_tiles, runs = self.varlen
        mask = self.mask
        return (cu_seqlens, queries, fwd_tiles, bwd_tiles, seq_tiles, self.num_queries, max_seqlen,
                list(runs), self.num_prefix, mask.sees_prefix, mask.sees_self, mask.sees_queries,
                self.scale)

    def prefix_probs(self, q, k, lse):
        cu_seqlens, queries, max_seqlen, *_ = self.varlen
        return _prefix_probs_op(q, k, lse, cu_seqlens, queries, self.num_queries, max_seqlen,
                                self.num_prefix, self.scale)


def _op_layout(call, out):
    """The op's (B, H, L, D) view of a packed qkv call's (B, L, H, D) output or gradient."""
    return out.transpose(1, 2) if call.packed_qkv and out.dim() == 4 else out


class _EagerAttention(torch.autograd.Function):
    """The custom ops' bodies and autograd rules, called directly (see `_eager`), in the
    form the torch.func transforms take: forward without ctx, setup_context, a vmap rule.

    Autograd's work per call grows with the Function's inputs and outputs and with the
    nodes around it, so its inputs are one `_Call` and the differentiable tensors (qkv,
    or q, k, v), and its one output is the attention output in the caller's layout
    ((B, L, H, D) for a packed qkv: no transpose node), allocated as such (autograd
    pays more for an output that is a view).
    """

    @staticmethod
    def forward(call, *tensors):
        if call.packed_qkv:
            qkv = tensors[0]
            q, k, v = _unpack(qkv)
            out = _empty_tokens((*qkv.shape[:-3], *qkv.shape[-2:]), qkv)
        else:
            q, k, v = tensors
            out = _empty_out(q)
        lse = _empty_lse(q)
        attention_fwd(q, k, v, _op_layout(call, out), lse, call.geo, call.num_prefix, call.mask,
                      call.scale)
        if call.with_lse:
            return out, lse
        call.stash = lse, ((q, k, v) if call.packed_qkv else None)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        call, *tensors = inputs
        if call.with_lse:
            out, lse = output
            ctx.mark_non_differentiable(lse)
            # No zero gradient is made for lse (a kernel launch per layer) only to be unused.
            ctx.set_materialize_grads(False)
            ctx.views = None
        else:
            # Views of an input, not of the output: kept on ctx they close no cycle.
            out, (lse, ctx.views), call.stash = output, call.stash, None
        ctx.save_for_backward(*tensors, out, lse)
        ctx.call = call

    @staticmethod
    def backward(ctx, grad_out, *grad_lse):
        call = ctx.call
        *tensors, out, lse = ctx.saved_tensors
        if grad_out is None:  # only the logsumexp was used
            return (None,) * (1 + len(tensors))
        grad_out, out = _op_layout(call, grad_out), _op_layout(call, out)
        if torch._C._are_functorch_transforms_active():
            # The transforms differentiate with a graph and refuse the custom op's Function.
            grads = _TransformBackward.apply(call.packed_qkv, grad_out, *tensors, out, lse,
                                             *call.op_args())
        elif not torch.is_grad_enabled() and _eager(grad_out):
            if call.packed_qkv:
                # The views are let go with the saved tensors (a retained graph's next
                # backward unbinds qkv again).
                views, ctx.views = ctx.views, None
                grads = _backward_packed(grad_out, tensors[0], out, lse, call.geo,
                                         call.num_prefix, call.mask, call.scale, views)
            else:
                grads = _backward_qkv(grad_out, *tensors, out, lse, call.geo, call.num_prefix,
                                      call.mask, call.scale)
        else:
            # A traced backward (compiled autograd, a dispatch mode around .backward())
            # takes the op, and so does create_graph=True, where only the op raises on a
            # second derivative (the body would give gradients with no graph: a silently
            # missing second-order term).
            op = _qkv_bwd_op if call.packed_qkv else _bwd_op
            grads = op(grad_out, *tensors, out, lse, *call.op_args())
        return (None, grads) if call.packed_qkv else (None, *grads)

    @staticmethod
    def vmap(info, in_dims, call, *tensors):
        return _map_calls(_EagerAttention.apply, info, in_dims, call, tensors)


# torch.autograd.Function.apply binds every call's arguments to forward's signature
# (inspect.signature, for defaults it has none of) before reaching C++: about 45 µs a
# call on this host, more than everything else of an eager forward. Outside the
# torch.func transforms the C++ apply below it is all Function.apply would run.
_APPLY = super(torch.autograd.Function, _EagerAttention).apply
_unwrap_dead_wrappers = torch._functorch.utils.unwrap_dead_wrappers


def _attend(call, *tensors):
    """_EagerAttention.apply(call, *tensors), without Function.apply's Python where no
    torch.func transform is active. Under one the forward also returns the logsumexp,
    which setup_context can then save (they carry nothing else to it)."""
    if torch._C._are_functorch_transforms_active():
        call.with_lse = True
        out = _EagerAttention.apply(call, *tensors)
    else:
        out = _APPLY(call, *_unwrap_dead_wrappers(tensors))
    return out if call.with_lse else (out, None)


def _qkv_geometry(qkv, num_queries, varlen):
    """The geometry of a packed qkv call, read off qkv's shape without unpacking it."""
    cu_seqlens, queries, max_seqlen, fwd_tiles, bwd_tiles, seq_tiles, runs = varlen
    if cu_seqlens is None:
        batch, seq, _, heads, _ = qkv.shape
        return Geometry(batch, heads, seq, seq, seq, seq - num_queries)
    return Geometry(cu_seqlens.numel() - 1, qkv.shape[2], max_seqlen, total_tokens=qkv.shape[0],
                    cu_seqlens=cu_seqlens, num_queries=queries, fwd_tiles=fwd_tiles,
                    bwd_tiles=bwd_tiles, seq_tiles=seq_tiles, runs=tuple(runs))


_BATCHED = (None, None, 0, None, None, None, ())


def triton_attention(q, k, v, num_queries, num_prefix, mask, scale, varlen=None, prefix_probs=False):
    """The Triton backend on checked inputs: batched when varlen is None, else packed.

    mask: a QueryMask. varlen: (cu_seqlens, num_queries tensor, max_seqlen, fwd_tiles,
    bwd_tiles, seq_tiles, runs), e.g. `varlen_tables(layout, q)`. prefix_probs: return (out,
    the prefix rows' probabilities) (see `_prefix_probs_kernel`).
    """
    varlen = _BATCHED if varlen is None else varlen
    if _eager(q, k, v):
        cu_seqlens, queries, max_seqlen, fwd_tiles, bwd_tiles, seq_tiles, runs = varlen
        geo = _geometry(q, k, num_queries, cu_seqlens, queries, fwd_tiles, bwd_tiles, seq_tiles,
                        max_seqlen, runs)
        call = _Call(False, geo, num_queries, num_prefix, mask, scale, varlen, prefix_probs)
        out, lse = _attend(call, q, k, v)
    else:
        call = _Call(False, None, num_queries, num_prefix, mask, scale, varlen, prefix_probs)
        out, lse = _fwd_op(q, k, v, *call.op_args())
    if prefix_probs:
        return out, call.prefix_probs(q, k, lse)
    return out


def triton_qkvpacked_attention(qkv, num_queries, num_prefix, mask, scale, varlen=None,
                               prefix_probs=False):
    """As `triton_attention` on a packed qkv projection; the output is (B, L, H, D) or
    (T, H, D), and the gradient reaches qkv as one tensor."""
    varlen = _BATCHED if varlen is None else varlen
    if _eager(qkv):
        call = _Call(True, _qkv_geometry(qkv, num_queries, varlen), num_queries, num_prefix, mask,
                     scale, varlen, prefix_probs)
        out, lse = _attend(call, qkv)  # already (B, L, H, D) or (T, H, D)
    else:
        call = _Call(True, None, num_queries, num_prefix, mask, scale, varlen, prefix_probs)
        out, lse = _qkv_fwd_op(qkv, *call.op_args())
        out = out.transpose(1, 2) if qkv.dim() == 5 else out
    if prefix_probs:
        q, k, _ = _unpack(qkv)
        return out, call.prefix_probs(q, k, lse)
    return out


# ----------------------------------------------------------------------------------------
# Prefix-row probabilities: an optional output
# ----------------------------------------------------------------------------------------
# The attention weights of the P prefix rows (CLS, registers) to every column, for callers
# that read them (attention maps, attention-guided masking). Prefix rows see the visible
# columns only, whatever the query options, and the forward saved their logsumexp: one
# small kernel recomputes just these P rows' scores against every column and normalises
# them with it. No other row is read again, and the attention kernels above are the same
# whether or not a caller asks. The gradient is PyTorch's (P rows).


@triton.jit
def _prefix_probs_kernel(
    Q, K, LSE, PROBS, CU_SEQLENS, NUM_QUERIES,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_lseb, stride_lseh,
    stride_pb, stride_ph, stride_pp, stride_pl,
    num_blocks, num_heads, seq_len, key_len, visible, total_tokens, num_prefix, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT: tl.constexpr, VARLEN: tl.constexpr,
):
    """probs[p, j] = exp2(s[p, j] * qk_scale - lse[p]) for the prefix rows p of one
    (sequence, head) and one block of BLOCK_N columns; 0 for columns they do not see."""
    block, b, h, start, seq_len, key_len, visible = _program(
        num_blocks, num_heads, 0, seq_len, key_len, visible, total_tokens, CU_SEQLENS,
        NUM_QUERIES, None, VARLEN, False)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    rows = tl.arange(0, BLOCK_P)
    row_ok = (rows < num_prefix) & (rows < seq_len)
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < key_len
    q = tl.load(Q + b * stride_qb + h * stride_qh + (start + rows[:, None]) * stride_ql
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_t = tl.load(K + b * stride_kb + h * stride_kh + (start + cols[None, :]) * stride_kl
                  + offs_d[:, None] * stride_kd, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
    lse = tl.load(LSE + b * stride_lseb + h * stride_lseh + start + rows, mask=row_ok, other=0.0)
    p = tl.exp2(dot(q, k_t, DOT) * qk_scale - lse[:, None])
    p = tl.where(row_ok[:, None] & (cols < visible)[None, :], p, 0.0)
    tl.store(PROBS + b * stride_pb + h * stride_ph + rows[:, None] * stride_pp
             + (start + cols[None, :]) * stride_pl, p, mask=row_ok[:, None] & col_ok[None, :])


def _empty_prefix_probs(q, k, num_prefix):
    """(batch, heads, P, key_len) batched; (heads, P, tokens) packed: column j of a packed
    row belongs to token j's own sequence."""
    if q.dim() == 4:
        return torch.empty(q.shape[0], q.shape[1], num_prefix, k.shape[2], dtype=torch.float32,
                           device=q.device)
    return torch.empty(q.shape[1], num_prefix, q.shape[0], dtype=torch.float32, device=q.device)


def prefix_probs_fwd(q, k, lse, probs, geo, num_prefix, scale):
    """Fill probs (fp32) from the forward's base-2 logsumexp `lse`."""
    if probs.numel() == 0:
        return
    head_dim = q.shape[-1]
    # Key tiles of 64 columns for rows up to 256 bytes (head_dim 128 in bf16), 32 for wider
    # rows: fp32 at head_dim 256 spilled 4.7 KB in 64 columns, 96 bytes in 32 and 4.1 KB in
    # 16 (ptxas, sm_90).
    wide_rows = head_dim * q.element_size() > 256
    block_n = 32 if triton_interpreter_enabled() or wide_rows else 64
    max_len = geo.max_len if geo.cu_seqlens is not None else geo.key_len
    blocks = triton.cdiv(max_len, block_n)
    strides = probs.stride() if probs.dim() == 4 else (0, *probs.stride())
    _prefix_probs_kernel[(blocks * geo.num_seqs * geo.heads,)](
        q, k, lse, probs, geo.cu_seqlens, geo.num_queries,
        *_bhld_strides(q), *_bhld_strides(k), *_row_strides(lse), *strides,
        blocks, geo.heads, geo.seq_len, geo.key_len, geo.visible, geo.total_tokens, num_prefix,
        scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_P=max(16, triton.next_power_of_2(num_prefix)), BLOCK_N=block_n,
        BLOCK_D=block_d(head_dim), DOT=dot_mode(q.dtype), VARLEN=geo.cu_seqlens is not None,
        num_warps=4, num_stages=1)


def prefix_probs_bwd(grad, probs, q, k, cu_seqlens, num_prefix, scale):
    """(dq, dk) of the prefix probabilities, by the softmax rule: for scores s = scale q.k,
    ds = probs * (grad - rowsum(grad * probs)). Batched or packed, any float dtype."""
    wide = probs.dtype
    # The columns no prefix row sees have ds = 0; where() rather than a product keeps a
    # NaN or inf there (0 x NaN is NaN) out of the prefix rows' dq and the column's dk.
    if q.dim() == 4:
        seen = (probs != 0).any(-2)[..., None]                                  # (B, H, L, 1)
        ds = probs * (grad - (grad * probs).sum(-1, keepdim=True)) * scale
        dq = torch.zeros(q.shape, dtype=wide, device=q.device)
        dq[:, :, :num_prefix] = ds @ torch.where(seen, k.to(wide), 0)
        dk = torch.where(seen, ds.transpose(-2, -1) @ q[:, :, :num_prefix].to(wide), 0)
        return dq.to(q.dtype), dk.to(k.dtype)
    # Packed: column j meets the prefix rows of its own sequence, tokens first[j] + p.
    tokens = q.shape[0]
    seq = torch.searchsorted(cu_seqlens, torch.arange(tokens, device=q.device, dtype=cu_seqlens.dtype),
                             right=True) - 1
    prefix_tokens = cu_seqlens[seq].long()[:, None] + torch.arange(num_prefix, device=q.device)
    row_sums = torch.zeros(*probs.shape[:2], cu_seqlens.numel() - 1, dtype=wide, device=q.device)
    row_sums.index_add_(2, seq, grad * probs)
    ds = probs * (grad - row_sums[:, :, seq]) * scale                      # (H, P, T)
    seen = (probs != 0).any(1).transpose(0, 1)[..., None]                   # (T, H, 1)
    dk = torch.where(seen, torch.einsum("hpt,tphd->thd", ds, q[prefix_tokens].to(wide)), 0)
    dq = torch.zeros(q.shape, dtype=wide, device=q.device)
    dq.index_add_(0, prefix_tokens.flatten(),
                  torch.einsum("hpt,thd->tphd", ds, torch.where(seen, k.to(wide), 0)).flatten(0, 1))
    return dq.to(q.dtype), dk.to(k.dtype)


@torch.library.custom_op("adclr_kernels::prefix_probs", mutates_args=())
def _prefix_probs_op(q: Tensor, k: Tensor, lse: Tensor, cu_seqlens: Optional[Tensor],
                     num_queries_t: Optional[Tensor], num_queries: int, max_seqlen: int,
                     num_prefix: int, scale: float) -> Tensor:
    probs = _empty_prefix_probs(q, k, num_prefix)
    geo = _geometry(q, k, num_queries, cu_seqlens, num_queries_t, None, None, None, max_seqlen)
    prefix_probs_fwd(q, k, lse, probs, geo, num_prefix, scale)
    return probs


@_prefix_probs_op.register_fake
def _prefix_probs_fake(q, k, lse, cu_seqlens, num_queries_t, num_queries, max_seqlen, num_prefix, scale):
    return _empty_prefix_probs(q, k, num_prefix)


def _prefix_probs_setup(ctx, inputs, output):
    q, k, _, cu_seqlens, *_, num_prefix, scale = inputs
    ctx.save_for_backward(q, k, output, cu_seqlens)
    ctx.num_prefix, ctx.scale = num_prefix, scale


def _prefix_probs_backward(ctx, grad):
    q, k, probs, cu_seqlens = ctx.saved_tensors
    dq, dk = prefix_probs_bwd(grad, probs, q, k, cu_seqlens, ctx.num_prefix, ctx.scale)
    return dq, dk, None, None, None, None, None, None, None


_prefix_probs_op.register_autograd(_prefix_probs_backward, setup_context=_prefix_probs_setup)
