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
The kernels and their launchers are in `dino_loss_triton.py`; the CPU backend ("torch")
runs the same two primitives as chunked matmuls (`dino_loss_torch.py`).
"""

from __future__ import annotations

import math
import numbers

import torch

from .backends import DINO_LOSS_BACKENDS, FLOAT_DTYPES, TRITON_AVAILABLE, resolve
from .dino_loss_torch import effective_weight, row_softmax_chunked, weight_grad_chunked

if TRITON_AVAILABLE:  # else resolve() never picks it, and backend="triton" raises there
    from ._triton_common import LOG2E
    from .dino_loss_triton import row_softmax, weight_grad

BACKENDS = DINO_LOSS_BACKENDS


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
    # The lse's stay in the backend's own units for its backward (Triton's in base 2).
    if backend == "triton":
        teacher_lse, u = row_softmax(teacher, teacher_weight, weight, teacher_temp, center)
        student_lse, q = row_softmax(student, weight, weight, student_temp)
        student_lse_e = student_lse / LOG2E
    else:
        teacher_lse, u = row_softmax_chunked(teacher, teacher_weight, weight, teacher_temp, center, acc)
        student_lse, q = row_softmax_chunked(student, weight, weight, student_temp, None, acc)
        student_lse_e = student_lse
    # z: per student row, its pair-weighted teacher u's; a: its total pair weight.
    z = _mix(u.view(num_teacher_views, rows, dim), [list(col) for col in zip(*matrix)])
    a = torch.cat([student_lse.new_full((rows,), sum(col)) for col in zip(*matrix)])
    x = student.to(acc)
    loss = ((a * student_lse_e).sum() - (x * z).sum() / student_temp) / rows
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
    for name, n in (("num_student_views", num_student_views), ("num_teacher_views", num_teacher_views)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    terms = sum(v != t for t in range(num_teacher_views) for v in range(num_student_views))
    if terms == 0:
        raise ValueError(f"no pair: {num_teacher_views} teacher view(s) and {num_student_views} "
                         "student view(s) leave no view to compare with a different one")
    return [[0.0 if v == t else 1.0 / terms for v in range(num_student_views)]
            for t in range(num_teacher_views)]


def _check_pairing(pairing):
    """Flat list of weights and the number of teacher views."""
    if isinstance(pairing, torch.Tensor):
        # Read on the host for every call: a tensor would be copied from its device each time.
        raise TypeError("pairing must be a (teacher_views x student_views) nested list of floats, "
                        "got a tensor (pairing.tolist() gives the list)")
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
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise TypeError(f"pairing weights must be finite floats, got {w!r}")
        flat.append(float(w))
    return flat, len(rows)


# The smallest temperature taken: the smallest normal float32. Below it the kernels'
# 1 / temp overflows to inf, and the loss and its gradients turn to NaN.
MIN_TEMP = torch.finfo(torch.float32).tiny


def _check_temp(name, value):
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a positive finite float, got a tensor (only teacher_temp "
                        "may be one: a schedule's value on the student's device)")
    # Comparisons, not math.isfinite: under torch.compile a float argument that changed
    # between calls becomes a SymFloat (automatic dynamic), which math.isfinite can't trace.
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0
            or value == math.inf):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    if value < MIN_TEMP:
        raise ValueError(f"{name} must be at least {MIN_TEMP:.3g} (the smallest normal float32; "
                         f"1 / {name} must be finite), got {value!r}")
    return float(value)


def _teacher_temp_tensor(value, device):
    """teacher_temp as the op takes it: a float64 0-dim tensor on `device`.

    A tensor stays on the device (its value is not checked: that would wait for it), so a
    schedule that changes it every step neither synchronises nor, under torch.compile,
    recompiles, and a CUDA graph reads its current value.
    """
    if not isinstance(value, torch.Tensor):
        return torch.full((), _check_temp("teacher_temp", value), dtype=torch.float64, device=device)
    if value.numel() != 1 or not value.is_floating_point():
        raise ValueError("teacher_temp must be a positive finite float or a one-element floating-point "
                         f"tensor, got a {value.dtype} tensor of shape {tuple(value.shape)}")
    if value.device != device:
        raise RuntimeError(f"teacher_temp must be on student's device {device}, got {value.device}")
    # A copy: the backward reads it again, and a schedule may update it in place in between.
    return value.detach().to(torch.float64, copy=True).reshape(())


def check_inputs(student, teacher, weight, center, pairing, student_temp, teacher_temp,
                 teacher_weight, gain, teacher_gain):
    """Validate a call; returns (flat pairing, teacher views, student_temp as a float,
    teacher_temp as a float64 0-dim tensor). Raises before anything runs, with the
    argument's name."""
    for name, t in (("student", student), ("teacher", teacher), ("weight", weight), ("center", center),
                    ("teacher_weight", teacher_weight), ("gain", gain), ("teacher_gain", teacher_gain)):
        if t is None and name in ("teacher_weight", "gain", "teacher_gain"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
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
        if g is not None and g.shape not in ((num_cols,), (num_cols, 1)):
            raise ValueError(f"{name} must have shape ({num_cols},) or ({num_cols}, 1) (one per prototype, "
                             f"as weight_norm's weight_g), got {tuple(g.shape)}")
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
            _teacher_temp_tensor(teacher_temp, student.device))


# ----------------------------------------------------------------------------------------
# Custom ops and autograd
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("adclr_kernels::dino_head_loss_fwd", mutates_args=())
def _fwd_op(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor,
            teacher_weight: torch.Tensor, center: torch.Tensor, pairing: list[float],
            num_teacher_views: int, student_temp: float, teacher_temp: torch.Tensor,
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
            num_teacher_views: int, student_temp: float, teacher_temp: torch.Tensor,
            backend: str) -> torch.Tensor:
    with torch.autocast(student.device.type, enabled=False):
        return dino_head_loss_bwd(grad_loss, student, teacher, weight, teacher_weight, center,
                                  student_lse, teacher_lse, pairing, num_teacher_views,
                                  student_temp, teacher_temp, backend)


@_bwd_op.register_fake
def _bwd_fake(grad_loss, student, teacher, weight, *args):
    return torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    student, teacher, weight, teacher_weight, center, pairing, num_views, student_temp, teacher_temp, backend = inputs
    _, teacher_mean, student_lse, teacher_lse, student_grad = output
    ctx.save_for_backward(student, teacher, weight, teacher_weight, center, teacher_temp, student_lse,
                          teacher_lse, student_grad)
    ctx.args = (pairing, num_views, student_temp, backend)
    ctx.mark_non_differentiable(teacher_mean, student_lse, teacher_lse, student_grad)


def _backward(ctx, grad_loss, *unused):
    (student, teacher, weight, teacher_weight, center, teacher_temp, student_lse, teacher_lse,
     student_grad) = ctx.saved_tensors
    pairing, num_views, student_temp, backend = ctx.args
    if torch.is_grad_enabled() and any(ctx.needs_input_grad):
        # create_graph=True: the student gradient is a saved constant and the weight
        # gradient's op has no autograd, so a second derivative would be silently partial.
        raise RuntimeError("dino_head_loss has no double backward (create_graph=True); "
                           "use the unfused loss (adclr_kernels.dino_loss_torch.naive_dino_head_loss)")
    grad_student = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_student = (grad_loss * student_grad).to(student.dtype)
    if ctx.needs_input_grad[2]:
        grad_weight = _bwd_op(grad_loss, student, teacher, weight, teacher_weight, center, student_lse,
                              teacher_lse, pairing, num_views, student_temp, teacher_temp, backend)
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
        student_temp, teacher_temp: positive floats; teacher_temp may also be a
            one-element tensor on the student's device (a schedule's value: read there,
            never synchronised, not checked, and given no gradient).
        teacher_weight: the teacher's last-layer weight (default: the student's weight
            and gain, detached).
        gain, teacher_gain: (out_dim,) or (out_dim, 1) weight-norm gains g (default 1: DINO's
            norm_last_layer); gain gets a gradient, teacher_gain goes with teacher_weight.
        backend: "auto" (Triton on CUDA, chunked PyTorch elsewhere), "triton" or "torch".

    There is no double backward (`create_graph=True` raises: a second-order optimiser or
    a gradient penalty through the loss needs `dino_loss_torch.naive_dino_head_loss`).

    Under autocast the matmul operands are cast to the autocast dtype, as F.linear's
    would be (float64 ones are left as they are); accumulation and softmax statistics
    are float32 (float64 for float64 inputs on the torch backend).

    Returns:
        (loss, teacher_mean): the 0-dim loss and the (out_dim,) column mean of the
        teacher logits before centring (what the centre update needs), float32 (float64
        for float64 inputs).
    """
    flat, num_teacher_views, student_temp, teacher_temp = check_inputs(
        student, teacher, weight, center, pairing, student_temp, teacher_temp, teacher_weight,
        gain, teacher_gain)
    device_type = student.device.type
    # Autocast leaves float64 as it is (F.linear's rule): then the operands must agree.
    autocast = (device_type != "meta" and torch.is_autocast_enabled(device_type)
                and student.dtype != torch.float64)
    if autocast:
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = student.dtype
        for name, t in (("teacher", teacher), ("weight", weight), ("teacher_weight", teacher_weight)):
            if t is not None and t.dtype != dtype:
                raise TypeError(f"student, teacher, weight and teacher_weight must share one dtype "
                                f"outside autocast (which leaves float64 as it is); student is "
                                f"{dtype}, {name} is {t.dtype}")
    backend = resolve(backend, student, known=DINO_LOSS_BACKENDS, fallback="torch", dtype=dtype,
                      dim_name="dim")
    gain = None if gain is None else gain.reshape(-1)
    teacher_gain = None if teacher_gain is None else teacher_gain.reshape(-1)
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
