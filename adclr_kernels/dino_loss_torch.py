"""PyTorch implementations of the fused DINO head + cross-entropy (`dino_loss.py`).

- `naive_dino_head_loss`: the definition, written the way DINO's loss is, with every
  (rows, K) logits matrix materialised and autograd for the gradients. Tests run it in
  float64 as the ground truth.
- `row_softmax_chunked` and `weight_grad_chunked`: the two primitives of the fused op
  (see `dino_loss.py` for the algebra) as plain matmuls over chunks of rows, the op's
  CPU backend. A chunk is `chunk_rows` rows at the full width K, so the extra memory is
  a few (chunk_rows, K) buffers whatever the number of rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows per chunk: (chunk_rows x K) float32 buffers of at most 64 MiB each.
CHUNK_ELEMENTS = 1 << 24


def effective_weight(weight, gain=None):
    """The weight-normalised last layer: W_k = g_k v_k / |v_k| (g = 1 when gain is None)."""
    w = F.normalize(weight, dim=-1)
    return w if gain is None else w * gain[:, None]


def naive_dino_head_loss(student, teacher, weight, center, pairing, student_temp, teacher_temp,
                         teacher_weight=None, gain=None, teacher_gain=None):
    """The loss and the teacher logits' column mean, from materialised logits.

    pairing[t][v] weighs the mean over b of H(teacher row (t, b), student row (v, b)),
    rows view-major; see `adclr_kernels.dino_loss.dino_head_loss`.
    """
    if teacher_weight is None:  # the student's last layer, gain included
        teacher_weight, teacher_gain = weight, gain
    student_logits = student @ effective_weight(weight, gain).T
    teacher_logits = (teacher @ effective_weight(teacher_weight, teacher_gain).T).detach()
    probs = F.softmax((teacher_logits - center.reshape(-1)) / teacher_temp, dim=-1)
    log_probs = F.log_softmax(student_logits / student_temp, dim=-1)
    num_teacher_views, num_student_views = len(pairing), len(pairing[0])
    teacher_views = probs.chunk(num_teacher_views)
    student_views = log_probs.chunk(num_student_views)
    loss = student_logits.new_zeros(())
    for t, row in enumerate(pairing):
        for v, w in enumerate(row):
            if w:
                loss = loss + w * torch.sum(-teacher_views[t] * student_views[v], dim=-1).mean()
    return loss, teacher_logits.mean(0)


def _chunk_rows(num_cols):
    return max(1, CHUNK_ELEMENTS // max(num_cols, 1))


def _scaled_logits(x, w_logit, temp, shift, acc_dtype):
    """(x W^T - shift) / temp for one chunk; w_logit and shift already in acc_dtype.

    Operands keep their rounding (bf16 under autocast), products and sums are in
    acc_dtype: the kernels' bf16-in, fp32-accumulate contract.
    """
    logits = x.to(acc_dtype) @ w_logit.T
    if shift is not None:
        logits.sub_(shift)
    return logits.div_(temp)


def row_softmax_chunked(x, w_logit, w_value, temp, shift=None, acc_dtype=torch.float32):
    """Per row of x: lse = logsumexp((x W_logit^T - shift) / temp) and softmax(...) @ W_value.

    Returns (lse (rows,), out (rows, D)) in acc_dtype.
    """
    lse = torch.empty(x.shape[0], dtype=acc_dtype, device=x.device)
    out = torch.empty(x.shape[0], w_value.shape[1], dtype=acc_dtype, device=x.device)
    w_logit, values = w_logit.to(acc_dtype), w_value.to(acc_dtype)
    shift = None if shift is None else shift.to(acc_dtype)
    step = _chunk_rows(w_logit.shape[0])
    for start in range(0, x.shape[0], step):
        s = _scaled_logits(x[start:start + step], w_logit, temp, shift, acc_dtype)
        lse[start:start + step] = torch.logsumexp(s, dim=-1)
        torch.mm(s.sub_(lse[start:start + step, None]).exp_(), values, out=out[start:start + step])
    return lse, out


def weight_grad_chunked(student, student_lse, student_values, teacher, teacher_lse,
                        teacher_values, weight, teacher_weight, center, student_temp,
                        teacher_temp, acc_dtype=torch.float32):
    """sum_s P_s^T student_values - sum_t P_t^T teacher_values, a (K, D) acc_dtype tensor.

    P_s = softmax(x_s W^T / student_temp), P_t = softmax((x_t W_t^T - center) / teacher_temp),
    recomputed chunk by chunk from the saved logsumexps.
    """
    grad = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
    step = _chunk_rows(weight.shape[0])
    for x, lse, values, w, temp, shift, sign in (
            (student, student_lse, student_values, weight, student_temp, None, 1.0),
            (teacher, teacher_lse, teacher_values, teacher_weight, teacher_temp, center, -1.0)):
        w, shift = w.to(acc_dtype), None if shift is None else shift.to(acc_dtype)
        for start in range(0, x.shape[0], step):
            s = _scaled_logits(x[start:start + step], w, temp, shift, acc_dtype)
            p = s.sub_(lse[start:start + step, None]).exp_()
            grad.addmm_(p.T, values[start:start + step].to(acc_dtype), alpha=sign)
    return grad
