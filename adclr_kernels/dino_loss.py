"""Fused DINO head last layer + cross-entropy: the (rows, K) logits are never stored.

The DINO head ends in a weight-normalised linear layer, W_k = g_k v_k / |v_k| for K
prototypes (65536) of dimension D (256), and the loss compares softmaxes over all K:

    H(t, s) = -sum_k softmax((t - c) / T_t)_k log softmax(s / T_s)_k

for a teacher row t = x_t W_t^T (c: the centre) and a student row s = x_s W^T, summed
with weights over pairs of rows (DINO: every teacher view against every other student
view; ADCLR's queries: view A against view B). The teacher probabilities p sum to 1, so

    H = lse_s - x_s . u_t / T_s,    lse_s = logsumexp(s / T_s),    u_t = p_t @ W,

and a row enters the loss through one scalar and one D-vector, each the result of an
online-softmax sweep over column tiles: FlashAttention's forward with the features as
queries and the prototypes as keys and values (`_row_softmax_kernel`):

  1. teacher rows, keys W_t shifted by the centre, values W: lse_t and u;
  2. student rows, keys and values W: lse_s and q = softmax(s / T_s) @ W.

What remains is small (rows x D) PyTorch: the pairing sums, the loss, and the student
gradient dL/dx_s = (a_s q_s - z_s) / T_s (a_s: the row's total pair weight, z_s: its
pair-weighted u's). The prototypes' gradient

    dL/dW_k = (1 / T_s) [ sum_s a_s softmax(s / T_s)_k x_s  -  sum_t p_t,k y_t ]

(y_t: the pair-weighted student features of teacher row t) has FlashAttention's dK/dV
shape: one program per column tile walks every row, recomputing the probabilities from
the saved lse (`_weight_grad_kernel`). It is the only writer of its tile, so there are
no atomics and the result is bitwise reproducible. The centre update needs the teacher
logits' column mean, which is W_t @ mean(x_t): a matrix-vector product, no second pass.

Why this design. Liger-Kernel's fused linear + cross-entropy takes a chunk of rows at
the full width K and computes the gradients in the forward; at K = 65536 a chunk of
1024 rows is still 256 MiB per fp32 buffer, and it needs several. Tiling the columns
as well leaves nothing per row but lse and a D-vector (D = 256 << K), so the extra
memory of the head + loss is the (K, D) weight gradient and (rows, D) vectors. The
price is matmul work: 2 (row, column) products per row in the forward sweeps and 2 in
the weight gradient, against 3 per student row and 1 per teacher row unfused, about
1.8x the FLOPs at ViT-S shapes, bought back by not writing and reading the logits,
softmaxes and their gradients (GBs per step). Matmuls take the inputs' dtype (bf16
under autocast) and accumulate in fp32; the softmax statistics are fp32.

The row sweeps split the columns across programs when there are too few row blocks to
fill the GPU (FlashDecoding); the launcher merges the per-split (lse, out) in PyTorch.
The CPU backend ("torch") runs the same two primitives as chunked matmuls
(`dino_loss_reference.py`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention import triton_interpreter_enabled
from .dino_loss_reference import effective_weight, row_softmax_chunked, weight_grad_chunked
from .unidirectional import LOG2E, _dot, _dot_mode

BACKENDS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_DTYPES = _TRITON_DTYPES + (torch.float64,)
TRITON_MAX_DIM = 256
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
    scale,
    HAS_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT: tl.constexpr,
):
    """Rows m of X, columns [split * cols_per_split, ...): the base-e logsumexp of
    (x W_logit^T - shift) / T and softmax(...) @ W_value, for this split of the columns.

    scale = log2(e) / T: scores are kept in base 2 so that the softmax uses exp2.
    """
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
        s = _dot(x, w_t, DOT) * scale
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
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT)
        m_i = m_new

    tl.store(LSE + split * stride_lse_s + rows, (m_i + tl.log2(l_i)) / _LOG2E, mask=row_ok)
    tl.store(OUT + split * stride_out_s + rows[:, None] * stride_out_m + offs_d[None, :] * stride_out_d,
             acc / l_i[:, None], mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _add_probs_t_values(acc, w, shift, X, LSE, VALUES, num_rows, dim,
                        stride_xm, stride_xd, stride_vm, stride_vd, scale, sign,
                        HAS_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                        DOT: tl.constexpr):
    """acc += sign * P^T @ VALUES over every row, P recomputed tile by tile from the lse."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    for row_start in range(0, num_rows, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < num_rows
        x = tl.load(X + rows[:, None] * stride_xm + offs_d[None, :] * stride_xd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        s_t = _dot(w, tl.trans(x), DOT) * scale  # (columns, rows)
        if HAS_SHIFT:
            s_t = s_t - shift[:, None]
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0) * _LOG2E
        p_t = tl.where(row_ok[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
        values = tl.load(VALUES + rows[:, None] * stride_vm + offs_d[None, :] * stride_vd,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        acc += sign * _dot(p_t.to(values.dtype), values, DOT)
    return acc


@triton.jit
def _weight_grad_kernel(
    XS, LSE_S, VS, XT, LSE_T, VT, W, WT, SHIFT, GRAD_SCALE, DW,
    num_student, num_teacher, num_cols, dim,
    stride_xs_m, stride_xs_d, stride_vs_m, stride_vs_d,
    stride_xt_m, stride_xt_d, stride_vt_m, stride_vt_d,
    stride_wk, stride_wd, stride_wtk, stride_wtd, stride_dwk, stride_dwd,
    student_scale, teacher_scale,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
):
    """dW for one tile of columns: GRAD_SCALE * (P_s^T VS - P_t^T VT)."""
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
                              False, BLOCK_M, BLOCK_D, DOT)
    acc = _add_probs_t_values(acc, w_t, shift, XT, LSE_T, VT, num_teacher, dim,
                              stride_xt_m, stride_xt_d, stride_vt_m, stride_vt_d, teacher_scale, -1.0,
                              True, BLOCK_M, BLOCK_D, DOT)
    acc = acc * tl.load(GRAD_SCALE).to(tl.float32)
    tl.store(DW + cols[:, None] * stride_dwk + offs_d[None, :] * stride_dwd,
             acc.to(DW.dtype.element_ty), mask=w_mask)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _block_d(dim):
    # tl.dot needs every dimension >= 16; other widths are padded inside the kernels.
    return max(16, triton.next_power_of_2(dim))


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


def _num_splits(x, num_rows, num_cols, cfg):
    """Column splits per row block: enough programs for two per SM, none empty."""
    col_tiles = triton.cdiv(num_cols, cfg["BLOCK_K"])
    if not x.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return max(1, min(col_tiles, triton.cdiv(2 * sms, triton.cdiv(num_rows, cfg["BLOCK_M"]))))


def row_softmax(x, w_logit, w_value, temp, shift=None, num_splits=None):
    """Triton: per row of x, lse = logsumexp((x W_logit^T - shift) / temp) (base e) and
    softmax(...) @ W_value. Returns (lse (rows,), out (rows, D)) in float32.

    num_splits: column splits per row block (default: enough to fill the GPU).
    """
    num_rows, dim = x.shape
    num_cols = w_logit.shape[0]
    block_d = _block_d(dim)
    cfg = _row_config(block_d, x.dtype)
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
        LOG2E / temp,
        HAS_SHIFT=shift is not None, BLOCK_D=block_d, DOT=_dot_mode(x.dtype), **cfg)
    if num_splits == 1:
        return lse[0], out[0]
    # FlashDecoding's merge: each split's result weighted by its share of the sum.
    total = torch.logsumexp(lse, 0)
    weights = torch.exp(lse - total)
    return total, torch.einsum("sm,smd->md", weights, out)


def weight_grad(student, student_lse, student_values, teacher, teacher_lse, teacher_values,
                weight, teacher_weight, center, student_temp, teacher_temp, grad_scale):
    """Triton: grad_scale * (P_s^T student_values - P_t^T teacher_values), (K, D) float32."""
    num_cols, dim = weight.shape
    block_d = _block_d(dim)
    cfg = _grad_config(block_d, weight.dtype)
    grad = _empty(num_cols, dim, dtype=torch.float32, device=weight.device)
    _weight_grad_kernel[(triton.cdiv(num_cols, cfg["BLOCK_K"]),)](
        student, student_lse, student_values, teacher, teacher_lse, teacher_values,
        weight, teacher_weight, center, grad_scale, grad,
        student.shape[0], teacher.shape[0], num_cols, dim,
        *student.stride(), *student_values.stride(), *teacher.stride(), *teacher_values.stride(),
        *weight.stride(), *teacher_weight.stride(), *grad.stride(),
        LOG2E / student_temp, LOG2E / teacher_temp,
        BLOCK_D=block_d, DOT=_dot_mode(weight.dtype), **cfg)
    return grad


def _pairing_matrix(pairing, num_teacher_views):
    num_student_views = len(pairing) // num_teacher_views
    return [pairing[t * num_student_views:(t + 1) * num_student_views] for t in range(num_teacher_views)]


def _mix(views, weights):
    """out[o] = sum_i weights[o][i] * views[i], for views (n_in, R, D)."""
    out = views.new_zeros(len(weights), *views.shape[1:])
    for o, row in enumerate(weights):
        for i, w in enumerate(row):
            if w:
                out[o].add_(views[i], alpha=w)
    return out.flatten(0, 1)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def dino_head_loss_fwd(student, teacher, weight, teacher_weight, center, pairing, num_teacher_views,
                       student_temp, teacher_temp, backend):
    """(loss, teacher logits' column mean, student lse, teacher lse, dloss/dstudent).

    weight, teacher_weight: the effective (weight-normalised) last layers; inputs checked
    by `dino_head_loss`.
    """
    acc = _acc_dtype(student.dtype)
    matrix = _pairing_matrix(pairing, num_teacher_views)
    rows, dim = teacher.shape[0] // num_teacher_views, student.shape[1]
    center = center.reshape(-1)
    if backend == "triton":
        teacher_lse, u = row_softmax(teacher, teacher_weight, weight, teacher_temp, center)
        student_lse, q = row_softmax(student, weight, weight, student_temp)
    else:
        teacher_lse, u = row_softmax_chunked(teacher, teacher_weight, weight, teacher_temp, center, acc)
        student_lse, q = row_softmax_chunked(student, weight, weight, student_temp, None, acc)
    # z: per student row, its pair-weighted teacher u's; a: its total pair weight.
    z = _mix(u.view(num_teacher_views, rows, dim), [list(col) for col in zip(*matrix)])
    a = torch.cat([student_lse.new_full((rows,), sum(col)) for col in zip(*matrix)])
    x = student.to(acc)
    loss = ((a * student_lse).sum() - (x * z).sum() / student_temp) / rows
    student_grad = (a[:, None] * q - z) / (rows * student_temp)
    teacher_mean = teacher_weight.to(acc) @ teacher.to(acc).mean(0)
    return loss, teacher_mean, student_lse, teacher_lse, student_grad


def dino_head_loss_bwd(grad_loss, student, teacher, weight, teacher_weight, center, student_lse,
                       teacher_lse, pairing, num_teacher_views, student_temp, teacher_temp, backend):
    """dloss/dweight (effective weight), in weight's dtype."""
    acc = _acc_dtype(student.dtype)
    matrix = _pairing_matrix(pairing, num_teacher_views)
    rows, dim = teacher.shape[0] // num_teacher_views, student.shape[1]
    x = student.to(acc)
    # Values of the two terms: a_s x_s for the student rows, y_t = the pair-weighted
    # student features for the teacher rows.
    a = torch.cat([x.new_full((rows,), sum(col)) for col in zip(*matrix)])
    student_values = (x * a[:, None]).to(student.dtype)
    teacher_values = _mix(x.view(-1, rows, dim), matrix).to(student.dtype)
    grad_scale = grad_loss.to(acc) / (rows * student_temp)
    center = center.reshape(-1)
    if backend == "triton":
        grad = weight_grad(student, student_lse, student_values, teacher, teacher_lse, teacher_values,
                           weight, teacher_weight, center, student_temp, teacher_temp, grad_scale)
    else:
        grad = weight_grad_chunked(student, student_lse, student_values, teacher, teacher_lse,
                                   teacher_values, weight, teacher_weight, center, student_temp,
                                   teacher_temp, acc).mul_(grad_scale)
    return grad.to(weight.dtype)


def dino_pairing(num_student_views, num_teacher_views=2):
    """DINO's pairing: every teacher view against every other student view, averaged.

    With 2 student views it is ADCLR's query pairing: teacher A teaches student B and
    teacher B student A, half each.
    """
    terms = sum(v != t for t in range(num_teacher_views) for v in range(num_student_views))
    if terms == 0:
        raise ValueError(f"no pair: {num_teacher_views} teacher view(s) and {num_student_views} "
                         "student view(s) leave no view to compare with a different one")
    return [[0.0 if v == t else 1.0 / terms for v in range(num_student_views)]
            for t in range(num_teacher_views)]


def _check_pairing(pairing):
    """Flat list of weights and the number of teacher views."""
    if isinstance(pairing, (str, bytes)) or not hasattr(pairing, "__len__") or len(pairing) == 0:
        raise TypeError("pairing must be a non-empty (teacher_views x student_views) nested "
                        f"list of floats, got {type(pairing).__name__}")
    rows = []
    for row in pairing:
        if isinstance(row, (str, bytes)) or not hasattr(row, "__len__") or len(row) == 0:
            raise TypeError("pairing must be a non-empty (teacher_views x student_views) nested "
                            f"list of floats; a row is {row!r}")
        rows.append(list(row))
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"pairing rows must all have the same length, got {[len(r) for r in rows]}")
    flat = []
    for w in (w for r in rows for w in r):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise TypeError(f"pairing weights must be finite floats, got {w!r}")
        flat.append(float(w))
    return flat, len(rows)


def _check_temp(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return float(value)


def check_inputs(student, teacher, weight, center, pairing, student_temp, teacher_temp,
                 teacher_weight, gain, teacher_gain):
    """Validate a call; returns (flat pairing, teacher views, temperatures). Raises
    before anything runs, with the argument's name."""
    for name, t in (("student", student), ("teacher", teacher), ("weight", weight), ("center", center),
                    ("teacher_weight", teacher_weight), ("gain", gain), ("teacher_gain", teacher_gain)):
        if t is None and name in ("teacher_weight", "gain", "teacher_gain"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.device != student.device:
            raise RuntimeError(f"{name} must be on student's device {student.device}, got {t.device}")
    for name, t in (("student", student), ("teacher", teacher), ("weight", weight)):
        if t.dim() != 2 or 0 in t.shape:
            layout = "(out_dim, dim)" if name == "weight" else f"({name}_rows, dim)"
            raise ValueError(f"{name} must have a non-empty shape {layout}, got {tuple(t.shape)}")
    num_cols, dim = weight.shape
    for name, t in (("student", student), ("teacher", teacher)):
        if t.shape[1] != dim:
            raise ValueError(f"{name} has dim {t.shape[1]}, but weight is (out_dim, dim) = {tuple(weight.shape)}")
    if teacher_weight is not None and teacher_weight.shape != weight.shape:
        raise ValueError(f"teacher_weight must have weight's shape {tuple(weight.shape)}, "
                         f"got {tuple(teacher_weight.shape)}")
    if center.shape not in ((num_cols,), (1, num_cols)):
        raise ValueError(f"center must have shape ({num_cols},) or (1, {num_cols}), got {tuple(center.shape)}")
    for name, g in (("gain", gain), ("teacher_gain", teacher_gain)):
        if g is not None and g.shape != (num_cols,):
            raise ValueError(f"{name} must have shape ({num_cols},) (one per prototype), got {tuple(g.shape)}")
    if teacher_gain is not None and teacher_weight is None:
        raise ValueError("teacher_gain needs teacher_weight; without it the teacher uses the "
                         "student's weight and gain")
    flat, num_teacher_views = _check_pairing(pairing)
    num_student_views = len(flat) // num_teacher_views
    if teacher.shape[0] % num_teacher_views or student.shape[0] % num_student_views:
        raise ValueError(f"pairing is {num_teacher_views} x {num_student_views} views, so teacher rows "
                         f"({teacher.shape[0]}) and student rows ({student.shape[0]}) must be multiples "
                         "of those counts")
    if teacher.shape[0] // num_teacher_views != student.shape[0] // num_student_views:
        raise ValueError(f"teacher and student views must have the same rows: teacher "
                         f"{teacher.shape[0]} / {num_teacher_views}, student {student.shape[0]} / "
                         f"{num_student_views}")
    return (flat, num_teacher_views, _check_temp("student_temp", student_temp),
            _check_temp("teacher_temp", teacher_temp))


def _resolve_backend(backend, x, dtype):
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and dtype in _TRITON_DTYPES and x.shape[1] <= TRITON_MAX_DIM else "torch"
    if backend == "triton":
        # Meta tensors trace shapes through the custom ops' fake implementations.
        if not (x.is_cuda or x.device.type == "meta"
                or (x.device.type == "cpu" and triton_interpreter_enabled())):
            raise RuntimeError(f"backend='triton' needs CUDA tensors (got device {x.device}); "
                               "set TRITON_INTERPRET=1 before importing adclr_kernels to run "
                               "the kernels on CPU in Triton's interpreter")
        if dtype not in _TRITON_DTYPES:
            raise TypeError(f"backend='triton' takes float16, bfloat16 or float32, got {dtype}")
        if x.shape[1] > TRITON_MAX_DIM:
            raise ValueError(f"backend='triton' supports dim up to {TRITON_MAX_DIM}, got {x.shape[1]}")
    return backend


# ----------------------------------------------------------------------------------------
# Custom ops and autograd
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("adclr_kernels::dino_head_loss_fwd", mutates_args=())
def _fwd_op(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor,
            teacher_weight: torch.Tensor, center: torch.Tensor, pairing: list[float],
            num_teacher_views: int, student_temp: float, teacher_temp: float,
            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(student.device.type, enabled=False):
        return dino_head_loss_fwd(student, teacher, weight, teacher_weight, center, pairing,
                                  num_teacher_views, student_temp, teacher_temp, backend)


@_fwd_op.register_fake
def _fwd_fake(student, teacher, weight, teacher_weight, center, *args):
    acc = _acc_dtype(student.dtype)
    return (student.new_empty((), dtype=acc), student.new_empty(weight.shape[0], dtype=acc),
            student.new_empty(student.shape[0], dtype=acc), student.new_empty(teacher.shape[0], dtype=acc),
            student.new_empty(student.shape, dtype=acc))


@torch.library.custom_op("adclr_kernels::dino_head_loss_bwd", mutates_args=())
def _bwd_op(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
            weight: torch.Tensor, teacher_weight: torch.Tensor, center: torch.Tensor,
            student_lse: torch.Tensor, teacher_lse: torch.Tensor, pairing: list[float],
            num_teacher_views: int, student_temp: float, teacher_temp: float,
            backend: str) -> torch.Tensor:
    with torch.autocast(student.device.type, enabled=False):
        return dino_head_loss_bwd(grad_loss, student, teacher, weight, teacher_weight, center,
                                  student_lse, teacher_lse, pairing, num_teacher_views,
                                  student_temp, teacher_temp, backend)


@_bwd_op.register_fake
def _bwd_fake(grad_loss, student, teacher, weight, *args):
    return torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    student, teacher, weight, teacher_weight, center, *args = inputs
    _, teacher_mean, student_lse, teacher_lse, student_grad = output
    ctx.save_for_backward(student, teacher, weight, teacher_weight, center, student_lse,
                          teacher_lse, student_grad)
    ctx.args = args
    ctx.mark_non_differentiable(teacher_mean, student_lse, teacher_lse, student_grad)


def _backward(ctx, grad_loss, *unused):
    student, teacher, weight, teacher_weight, center, student_lse, teacher_lse, student_grad = ctx.saved_tensors
    grad_student = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_student = (grad_loss * student_grad).to(student.dtype)
    if ctx.needs_input_grad[2]:
        grad_weight = _bwd_op(grad_loss, student, teacher, weight, teacher_weight, center,
                              student_lse, teacher_lse, *ctx.args)
    return grad_student, None, grad_weight, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def dino_head_loss(student, teacher, weight, center, pairing, *, student_temp, teacher_temp,
                   teacher_weight=None, gain=None, teacher_gain=None, backend="auto"):
    """DINO's last head layer and cross-entropy in one op, without the (rows, K) logits.

    loss = sum_{t,v} pairing[t][v] * mean_b H(teacher row (t, b), student row (v, b)),
    H(t, s) = -sum_k softmax((t W_t^T - center) / teacher_temp)_k
                     * log softmax(s W^T / student_temp)_k,
    W = gain * rows of weight normalised (DINO's weight-normalised last layer).

    Args:
        student: (student_views * R, dim) bottleneck features (L2-normalised by the head),
            view-major: rows [view 0 | view 1 | ...], R rows per view.
        teacher: (teacher_views * R, dim) teacher features; no gradient flows to them.
        weight: (out_dim, dim) the student's last-layer weight v (before normalisation).
        center: (out_dim,) or (1, out_dim), subtracted from the teacher logits.
        pairing: teacher_views x student_views nested list of weights, e.g.
            `dino_pairing(num_crops)`; row b of a view is paired with row b of another.
        student_temp, teacher_temp: positive floats.
        teacher_weight: the teacher's last-layer weight (default: the student's weight
            and gain, detached).
        gain, teacher_gain: (out_dim,) weight-norm gains g (default 1: DINO's
            norm_last_layer); gain gets a gradient, teacher_gain goes with teacher_weight.
        backend: "auto" (Triton on CUDA, chunked PyTorch elsewhere), "triton" or "torch".

    Under autocast the matmul operands are cast to the autocast dtype, as F.linear's
    would be; accumulation and softmax statistics are float32 (float64 for float64
    inputs on the torch backend).

    Returns:
        (loss, teacher_mean): the 0-dim loss and the (out_dim,) column mean of the
        teacher logits before centring (what the centre update needs), float32.
    """
    flat, num_teacher_views, student_temp, teacher_temp = check_inputs(
        student, teacher, weight, center, pairing, student_temp, teacher_temp, teacher_weight,
        gain, teacher_gain)
    device_type = student.device.type
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = student.dtype
        for name, t in (("teacher", teacher), ("weight", weight), ("teacher_weight", teacher_weight)):
            if t is not None and t.dtype != dtype:
                raise TypeError(f"student, teacher, weight and teacher_weight must share one dtype "
                                f"outside autocast; student is {dtype}, {name} is {t.dtype}")
    backend = _resolve_backend(backend, student, dtype)
    w = effective_weight(weight, gain)
    if teacher_weight is None:
        w_t = w.detach()
    else:
        w_t = effective_weight(teacher_weight.detach(), None if teacher_gain is None else teacher_gain.detach())
    # The backward reads the centre again, and DINO updates it in place in between.
    center = center.detach().clone(memory_format=torch.contiguous_format)
    loss, teacher_mean, *_ = _fwd_op(student.to(dtype), teacher.detach().to(dtype), w.to(dtype),
                                     w_t.to(dtype), center, flat, num_teacher_views,
                                     student_temp, teacher_temp, backend)
    return loss, teacher_mean
