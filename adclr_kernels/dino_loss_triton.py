"""The DINO head loss in Triton: the row-softmax sweep and the weight-gradient kernels,
and their launchers. The algebra they serve is in `dino_loss.py`'s docstring."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import LOG2E, block_d, dot, dot_mode
from .backends import triton_interpreter_enabled

_LOG2E = tl.constexpr(LOG2E)  # kernels may read only constexpr globals


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _row_softmax_kernel(
    X, W_LOGIT, W_VALUE, SHIFT, LSE, OUT,
    num_rows, num_cols, dim, cols_per_split,
    stride_xm, stride_xd, stride_lk, stride_ld, stride_vk, stride_vd,
    stride_lse_s, stride_out_s, stride_out_m, stride_out_d,
    SCALE,
    HAS_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT: tl.constexpr,
):
    """Rows m of X, columns [split * cols_per_split, ...): the base-2 logsumexp of
    (x W_logit^T - shift) / T and softmax(...) @ W_value, for this split of the columns.

    SCALE holds log2(e) / T: scores are kept in base 2 so that the softmax uses exp2. The
    logsumexp stays in base 2 for `_weight_grad_kernel`, which subtracts it from scores it
    makes again: at small temperatures (scores of 1e3 to 1e5) a round trip through base e
    rounds it twice more, and each ulp of it is an error of |lse| * 2^-24 in every
    probability.
    """
    scale = tl.load(SCALE)
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    d_ok = offs_d < dim
    x = tl.load(X + rows[:, None] * stride_xm + offs_d[None, :] * stride_xd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    lo = split * cols_per_split
    hi = tl.minimum(lo + cols_per_split, num_cols)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for col_start in range(lo, hi, BLOCK_K):
        cols = col_start + tl.arange(0, BLOCK_K)
        col_ok = cols < hi
        w_t = tl.load(W_LOGIT + cols[None, :] * stride_lk + offs_d[:, None] * stride_ld,
                      mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = dot(x, w_t, DOT) * scale
        if HAS_SHIFT:
            shift = tl.load(SHIFT + cols, mask=col_ok, other=0.0).to(tl.float32)
            s = s - shift[None, :] * scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        # Every tile holds at least one column (col_start < hi), so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(W_VALUE + cols[:, None] * stride_vk + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT)
        m_i = m_new

    tl.store(LSE + split * stride_lse_s + rows, m_i + tl.log2(l_i), mask=row_ok)
    tl.store(OUT + split * stride_out_s + rows[:, None] * stride_out_m + offs_d[None, :] * stride_out_d,
             acc / l_i[:, None], mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _add_probs_t_values(acc, w, shift, X, LSE, VALUES, num_rows, dim,
                        stride_xm, stride_xd, stride_vm, stride_vd, scale, sign,
                        HAS_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                        DOT: tl.constexpr, SCORES_AS_FORWARD: tl.constexpr):
    """acc += sign * P^T @ VALUES over every row, P recomputed tile by tile from the lse."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    for row_start in range(0, num_rows, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < num_rows
        x = tl.load(X + rows[:, None] * stride_xm + offs_d[None, :] * stride_xd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if SCORES_AS_FORWARD:
            # The interpreter's numpy BLAS may sum w x^T in another order than the forward's
            # x w^T (seen on AVX2 CPUs): at scores of 1e5 an ulp apart is a percent in a
            # probability. On the GPU w x^T keeps wgmma (the transposed form drops to
            # mma.sync for the bf16 tiles).
            s_t = tl.trans(dot(x, tl.trans(w), DOT)) * scale
        else:
            s_t = dot(w, tl.trans(x), DOT) * scale  # (columns, rows)
        if HAS_SHIFT:
            s_t = s_t - shift[:, None]
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        p_t = tl.where(row_ok[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
        values = tl.load(VALUES + rows[:, None] * stride_vm + offs_d[None, :] * stride_vd,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        acc += sign * dot(p_t.to(values.dtype), values, DOT)
    return acc


@triton.jit
def _weight_grad_kernel(
    XS, LSE_S, VS, XT, LSE_T, VT, W, WT, SHIFT, GRAD_SCALE, DW,
    num_student, num_teacher, num_cols, dim,
    stride_xs_m, stride_xs_d, stride_vs_m, stride_vs_d,
    stride_xt_m, stride_xt_d, stride_vt_m, stride_vt_d,
    stride_wk, stride_wd, stride_wtk, stride_wtd, stride_dwk, stride_dwd,
    SCALES,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
    SCORES_AS_FORWARD: tl.constexpr,
):
    """dW for one tile of columns: GRAD_SCALE * (P_s^T VS - P_t^T VT); SCALES holds
    log2(e) / T for the student, then the teacher."""
    student_scale = tl.load(SCALES)
    teacher_scale = tl.load(SCALES + 1)
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < num_cols
    w_mask = col_ok[:, None] & (offs_d < dim)[None, :]
    w = tl.load(W + cols[:, None] * stride_wk + offs_d[None, :] * stride_wd, mask=w_mask, other=0.0)
    w_t = tl.load(WT + cols[:, None] * stride_wtk + offs_d[None, :] * stride_wtd, mask=w_mask, other=0.0)
    shift = tl.load(SHIFT + cols, mask=col_ok, other=0.0).to(tl.float32) * teacher_scale

    acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    acc = _add_probs_t_values(acc, w, shift, XS, LSE_S, VS, num_student, dim,
                              stride_xs_m, stride_xs_d, stride_vs_m, stride_vs_d, student_scale, 1.0,
                              False, BLOCK_M, BLOCK_D, DOT, SCORES_AS_FORWARD)
    acc = _add_probs_t_values(acc, w_t, shift, XT, LSE_T, VT, num_teacher, dim,
                              stride_xt_m, stride_xt_d, stride_vt_m, stride_vt_d, teacher_scale, -1.0,
                              True, BLOCK_M, BLOCK_D, DOT, SCORES_AS_FORWARD)
    acc = acc * tl.load(GRAD_SCALE).to(tl.float32)
    tl.store(DW + cols[:, None] * stride_dwk + offs_d[None, :] * stride_dwd,
             acc.to(DW.dtype.element_ty), mask=w_mask)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


# GPU tiles by the bytes of one feature row (block_d x element size): the widest, fp32 at
# dim 256, would need over 99 KB of shared memory (what sm_86/89 allow) at the bf16 tiles.


def _row_config(block_d, dtype):
    if triton_interpreter_enabled():
        # The interpreter runs each program in numpy: big tiles are fewer Python loops.
        return dict(BLOCK_M=32, BLOCK_K=128, num_warps=4, num_stages=1)
    row_bytes = block_d * dtype.itemsize
    if row_bytes > 512:
        return dict(BLOCK_M=32, BLOCK_K=32, num_warps=8, num_stages=1)
    if row_bytes > 256:
        return dict(BLOCK_M=64, BLOCK_K=32, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=2)


def _grad_config(block_d, dtype):
    if triton_interpreter_enabled():
        return dict(BLOCK_K=128, BLOCK_M=32, num_warps=4, num_stages=1)
    row_bytes = block_d * dtype.itemsize
    if row_bytes > 512:
        return dict(BLOCK_K=32, BLOCK_M=16, num_warps=8, num_stages=1)
    if row_bytes > 256:
        return dict(BLOCK_K=64, BLOCK_M=32, num_warps=8, num_stages=2)
    return dict(BLOCK_K=64, BLOCK_M=64, num_warps=4, num_stages=2)


def _empty(*shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def _log2e_over(temps, device):
    """log2(e) / T for each temperature, float32 on the device, where the kernels read it.

    A temperature may be a tensor (a schedule's value on the device): it is never brought
    to the host, so nothing waits for it and a CUDA graph replays it with its new value.
    Computed in float64, then rounded once, as a Python float's quotient would be.
    """
    parts = [t.detach().to(torch.float64).reshape(1) if isinstance(t, torch.Tensor)
             else torch.full((1,), float(t), dtype=torch.float64, device=device) for t in temps]
    return (LOG2E / torch.cat(parts)).float()


def _num_splits(x, num_rows, num_cols, cfg):
    """Column splits per row block: enough programs for two per SM, none empty."""
    col_tiles = triton.cdiv(num_cols, cfg["BLOCK_K"])
    if not x.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return max(1, min(col_tiles, triton.cdiv(2 * sms, triton.cdiv(num_rows, cfg["BLOCK_M"]))))


def row_softmax(x, w_logit, w_value, temp, shift=None, num_splits=None):
    """Triton: per row of x, lse2 = log2 sum exp((x W_logit^T - shift) / temp) (the
    logsumexp in base 2: the kernels' units, as `weight_grad` takes it) and softmax(...) @
    W_value. Returns (lse2 (rows,), out (rows, D)) in float32.

    temp: a float, or a one-element tensor on x's device.

    num_splits: column splits per row block (default: enough to fill the GPU).
    """
    num_rows, dim = x.shape
    num_cols = w_logit.shape[0]
    padded_dim = block_d(dim)
    cfg = _row_config(padded_dim, x.dtype)
    if num_splits is None:
        num_splits = _num_splits(x, num_rows, num_cols, cfg)
    # Equal splits of whole tiles, and no empty split (its lse would be -inf, out 0/0).
    cols_per_split = triton.cdiv(triton.cdiv(num_cols, cfg["BLOCK_K"]), num_splits) * cfg["BLOCK_K"]
    num_splits = triton.cdiv(num_cols, cols_per_split)
    lse = _empty(num_splits, num_rows, dtype=torch.float32, device=x.device)
    out = _empty(num_splits, num_rows, dim, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(num_rows, cfg["BLOCK_M"]), num_splits)
    _row_softmax_kernel[grid](
        x, w_logit, w_value, shift, lse, out,
        num_rows, num_cols, dim, cols_per_split,
        *x.stride(), *w_logit.stride(), *w_value.stride(), lse.stride(0), *out.stride(),
        _log2e_over([temp], x.device),
        HAS_SHIFT=shift is not None, BLOCK_D=padded_dim, DOT=dot_mode(x.dtype), **cfg)
    if num_splits == 1:
        return lse[0], out[0]
    # FlashDecoding's merge: each split's result weighted by its share of the sum.
    top = lse.max(0).values
    total = top + torch.exp2(lse - top).sum(0).log2()
    weights = torch.exp2(lse - total)
    return total, torch.einsum("sm,smd->md", weights, out)


def weight_grad(student, student_lse, student_values, teacher, teacher_lse, teacher_values,
                weight, teacher_weight, center, student_temp, teacher_temp, grad_scale):
    """Triton: grad_scale * (P_s^T student_values - P_t^T teacher_values), (K, D) float32;
    the logsumexps in base 2, as `row_softmax` gives them."""
    num_cols, dim = weight.shape
    padded_dim = block_d(dim)
    cfg = _grad_config(padded_dim, weight.dtype)
    grad = _empty(num_cols, dim, dtype=torch.float32, device=weight.device)
    _weight_grad_kernel[(triton.cdiv(num_cols, cfg["BLOCK_K"]),)](
        student, student_lse, student_values, teacher, teacher_lse, teacher_values,
        weight, teacher_weight, center, grad_scale, grad,
        student.shape[0], teacher.shape[0], num_cols, dim,
        *student.stride(), *student_values.stride(), *teacher.stride(), *teacher_values.stride(),
        *weight.stride(), *teacher_weight.stride(), *grad.stride(),
        _log2e_over([student_temp, teacher_temp], weight.device),
        BLOCK_D=padded_dim, DOT=dot_mode(weight.dtype), SCORES_AS_FORWARD=triton_interpreter_enabled(), **cfg)
    return grad
