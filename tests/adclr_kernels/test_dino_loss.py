"""The fused DINO head + cross-entropy (dino_loss.py) against its float64 definition,
through both backends: results, errors, the custom op under opcheck and torch.compile.

Tolerance: float32 inputs (Triton, interpreter or GPU, and the chunked torch backend)
are held to the float64 reference at a relative error below 1e-5 for the loss, the
teacher mean and every gradient; bf16 to the FlashAttention convention (error at most
twice the unfused bf16 path's, logits rounded to bf16 as F.linear under autocast leaves
them, plus 1e-5).
"""

import pytest
import torch
import torch.nn.functional as F

from adclr_kernels import backends, dino_loss
from adclr_kernels.dino_loss import dino_head_loss, dino_pairing
from adclr_kernels.dino_loss_torch import effective_weight, naive_dino_head_loss
from kernel_testing import (DEVICE, VIEWS, assert_loss_matches, loss_and_grads, make_loss_inputs,
                            naive_loss, rms_err)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("views", ["cls", "query"])
@pytest.mark.parametrize("rows,out_dim,dim,temps", [
    (1, 1000, 32, (0.1, 0.04)),   # teacher temperature: start of DINO's warm-up ...
    (7, 1037, 32, (0.1, 0.07)),   # ... and its end; K not a multiple of any tile
    (5, 200, 24, (0.3, 1.0)),     # dim not a power of 2, soft temperatures
    (3, 17, 16, (0.05, 0.02)),    # fewer prototypes than one tile, sharp temperatures
])
def test_matches_float64_reference(poisoned, backend, views, rows, out_dim, dim, temps):
    inputs = make_loss_inputs(rows, VIEWS[views], dim, out_dim, gain=rows in (5, 7), teacher_weight=rows in (3, 7))
    pairing = dino_pairing(VIEWS[views])
    ref = loss_and_grads(naive_loss, inputs, torch.float64, pairing, temps)
    got = loss_and_grads(dino_head_loss, inputs, torch.float32, pairing, temps, backend=backend)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert_loss_matches(got, ref, 1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_teacher_temp_as_a_tensor_equals_the_float(backend, dtype):
    """A schedule's temperature stays on the device: the same loss and gradients, bit for bit."""
    inputs = make_loss_inputs(7, 4, 32, 1037, gain=True)
    pairing = dino_pairing(4)
    as_float = loss_and_grads(dino_head_loss, inputs, torch.float32, pairing, (0.1, 0.07), backend=backend)
    as_tensor = loss_and_grads(dino_head_loss, inputs, torch.float32, pairing,
                               (0.1, torch.tensor([0.07], dtype=dtype, device=DEVICE)), backend=backend)
    if dtype == torch.float64:  # the float's own value
        assert torch.equal(as_tensor[0], as_float[0]) and torch.equal(as_tensor[1], as_float[1])
        for name in as_float[2]:
            assert torch.equal(as_tensor[2][name], as_float[2][name]), name
    else:  # 0.07 rounded to float32 first
        assert_loss_matches(as_tensor, as_float, 1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bf16_within_twice_the_unfused_error(backend):
    """bf16 operands: no worse than twice the unfused autocast path (bf16 logits)."""
    inputs = make_loss_inputs(5, 4, 32, 1037, gain=True)
    pairing = dino_pairing(4)
    ref = loss_and_grads(naive_loss, inputs, torch.float64, pairing, (0.1, 0.04))

    def unfused(student, teacher, weight, center, pairing, *, student_temp, teacher_temp, **kw):
        # F.linear under autocast: bf16 operands, bf16 logits, then the loss in float32.
        w = effective_weight(weight, kw.pop("gain")).bfloat16()
        logits = (student.bfloat16() @ w.T).float()
        w_t = effective_weight(kw.pop("teacher_weight"), kw.pop("teacher_gain")).bfloat16()
        teacher_logits = (teacher.bfloat16() @ w_t.T).float()
        identity = torch.eye(logits.shape[1], dtype=torch.float32, device=logits.device)
        return naive_dino_head_loss(logits, teacher_logits, identity, center, pairing, student_temp,
                                    teacher_temp, teacher_weight=identity)

    base = loss_and_grads(unfused, inputs, torch.float32, pairing, (0.1, 0.04))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = loss_and_grads(dino_head_loss, inputs, torch.float32, pairing, (0.1, 0.04), backend=backend)
    assert got[2]["weight"].dtype == torch.float32  # gradients reach the float32 leaves
    for name, a, b, r in [("loss", got[0], base[0], ref[0]), ("teacher_mean", got[1], base[1], ref[1])] + [
            (f"d{k}", got[2][k], base[2][k], ref[2][k]) for k in ref[2]]:
        assert torch.isfinite(a).all(), name
        err, unfused_err = rms_err(a, r), rms_err(b, r)
        assert err <= 2 * unfused_err + 1e-5, f"{name}: {err:.3e} > 2 * {unfused_err:.3e} + 1e-5"


def test_grad_scales_with_the_incoming_gradient():
    inputs = make_loss_inputs(3, 2, 16, 300)
    leaves = [inputs[k].float().requires_grad_() for k in ("student", "weight")]
    loss, _ = dino_head_loss(leaves[0], inputs["teacher"].float(), leaves[1], inputs["center"].float(),
                             dino_pairing(2), student_temp=0.1, teacher_temp=0.04, backend="triton")
    once = torch.autograd.grad(loss, leaves, retain_graph=True)
    scaled = torch.autograd.grad(-2.5 * loss, leaves)
    for a, b in zip(once, scaled):
        torch.testing.assert_close(b, -2.5 * a)


def test_dino_pairing():
    assert dino_pairing(2) == [[0.0, 0.5], [0.5, 0.0]]
    m = dino_pairing(12)  # 2 globals + 10 locals: 22 pairs
    assert [row[:3] for row in m] == [[0.0, 1 / 22, 1 / 22], [1 / 22, 0.0, 1 / 22]]
    assert sum(map(sum, m)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no pair"):
        dino_pairing(1, 1)
    with pytest.raises(ValueError, match="num_student_views must be a non-negative int, got 2.5"):
        dino_pairing(2.5)


def _call(dtype=torch.float32, **overrides):
    inputs = make_loss_inputs(3, 2, 16, 100)
    args = dict(student=inputs["student"], teacher=inputs["teacher"], weight=inputs["weight"],
                center=inputs["center"], pairing=dino_pairing(2), student_temp=0.1, teacher_temp=0.04)
    args = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    args.update(overrides)
    return dino_head_loss(args.pop("student"), args.pop("teacher"), args.pop("weight"),
                          args.pop("center"), args.pop("pairing"), **args)


@pytest.mark.parametrize("overrides,error,match", [
    (dict(student=torch.zeros(6, 16).tolist()), TypeError, "student must be a torch.Tensor"),
    (dict(student=torch.zeros(6, 16, dtype=torch.int64)), TypeError, "student must be float16"),
    (dict(student=torch.zeros(6, 4, 4)), ValueError, r"student must have a non-empty shape \(student_rows, dim\)"),
    (dict(teacher=torch.zeros(6, 17)), ValueError, "teacher has dim 17"),
    (dict(weight=torch.zeros(0, 16)), ValueError, "weight must have a non-empty shape"),
    (dict(teacher_weight=torch.zeros(99, 16)), ValueError, "teacher_weight must have weight's shape"),
    (dict(center=torch.zeros(2, 100)), ValueError, r"center must have shape \(100,\) or \(1, 100\)"),
    (dict(gain=torch.ones(1, 100)), ValueError, r"gain must have shape \(100,\) or \(100, 1\)"),
    (dict(teacher_gain=torch.ones(99)), ValueError, r"teacher_gain must have shape \(100,\)"),
    (dict(teacher_gain=torch.ones(100)), ValueError, "teacher_gain needs teacher_weight"),
    (dict(student=torch.zeros(5, 16)), ValueError, "multiples of those counts"),
    (dict(student=torch.zeros(8, 16)), ValueError, "teacher and student views must have the same rows"),
    (dict(pairing=[[0.0, 1.0], [1.0]]), ValueError, "pairing rows must all have the same length"),
    (dict(pairing=[]), TypeError, "pairing must be a non-empty"),
    (dict(pairing=[[0.0, float("nan")]]), TypeError, "pairing weights must be finite"),
    (dict(pairing=torch.tensor(dino_pairing(2))), TypeError, r"got a tensor \(pairing.tolist\(\) gives the list\)"),
    (dict(student_temp=0.0), ValueError, "student_temp must be a positive finite float"),
    (dict(teacher_temp=float("inf")), ValueError, "teacher_temp must be a positive finite float"),
    (dict(student_temp=1e-45), ValueError, r"student_temp must be at least 1.18e-38 .*got 1e-45"),
    (dict(teacher_temp=1e-40), ValueError, r"teacher_temp must be at least 1.18e-38"),
    (dict(teacher_temp=torch.tensor([0.04, 0.07])), ValueError, r"one-element floating-point tensor, got a "
                                                                r"torch.float32 tensor of shape \(2,\)"),
    (dict(teacher_temp=torch.tensor(1)), ValueError, "one-element floating-point tensor"),
    (dict(student_temp=torch.tensor(0.1)), TypeError, "got a tensor \\(only teacher_temp may be one"),
    (dict(teacher=torch.zeros(6, 16, dtype=torch.float64)), TypeError, "must share one dtype"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_inputs_name_the_argument(overrides, error, match):
    overrides = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in overrides.items()}
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_numpy_scalars_are_taken_where_floats_are():
    import numpy as np

    plain = _call()
    numpy_args = _call(student_temp=np.float32(0.1), teacher_temp=np.float32(0.04),
                       pairing=[[np.float32(w) for w in row] for row in dino_pairing(2)])
    assert torch.allclose(numpy_args[0], plain[0], rtol=1e-6)


def test_a_tensor_teacher_temp_updated_in_place_before_backward_leaves_the_gradient():
    """A schedule's tensor updated in place between forward and backward (as the centre
    is): the backward reads the value the forward used."""
    temp = torch.tensor(0.04, dtype=torch.float64, device=DEVICE)
    student = make_loss_inputs(3, 2, 16, 100)["student"].float().to(DEVICE).requires_grad_()
    (expected,) = torch.autograd.grad(_call(student=student, teacher_temp=0.04)[0], student)
    loss = _call(student=student, teacher_temp=temp)[0]
    temp.fill_(0.07)
    (grad,) = torch.autograd.grad(loss, student)
    torch.testing.assert_close(grad, expected)


def test_autocast_leaves_float64_inputs_as_they_are():
    # F.linear's rule under autocast: float32 operands go to its dtype, float64 ones stay
    # (the Triton backend takes no float64: the torch one runs them).
    want = _call(torch.float64)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = _call(torch.float64)
        with pytest.raises(TypeError, match="autocast .*leaves float64 as it is"):
            _call(torch.float64, weight=make_loss_inputs(3, 2, 16, 100)["weight"].float())
    assert got[0].dtype == got[1].dtype == torch.float64
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_backend_rules(monkeypatch):
    with pytest.raises(TypeError, match="backend='triton' takes float16, bfloat16 or float32"):
        _call(torch.float64, backend="triton")
    if DEVICE == "cpu":
        monkeypatch.setattr(backends, "triton_interpreter_enabled", lambda: False)
        with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
            _call(backend="triton")


def test_meta_tensors_trace_shapes():
    """Shapes only, no kernel: what a static model of the step runs on."""
    inputs = make_loss_inputs(3, 4, 16, 100)
    student = inputs["student"].float().to("meta").requires_grad_()
    weight = inputs["weight"].float().to("meta").requires_grad_()
    loss, mean = dino_head_loss(student, inputs["teacher"].float().to("meta"), weight,
                                inputs["center"].float().to("meta"), dino_pairing(4),
                                student_temp=0.1, teacher_temp=0.04, backend="triton")
    assert loss.shape == () and mean.shape == (100,) and loss.device.type == "meta"
    d_student, d_weight = torch.autograd.grad(loss, (student, weight))
    assert d_student.shape == student.shape and d_weight.shape == weight.shape


def _inputs():
    inputs = make_loss_inputs(3, 2, 16, 100)
    return {k: v.float() for k, v in inputs.items() if v is not None}


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_opcheck(backend):
    inputs = _inputs()
    student = inputs["student"].requires_grad_()
    weight = F.normalize(inputs["weight"], dim=-1).requires_grad_()
    args = (student, inputs["teacher"], weight, F.normalize(inputs["teacher_weight"], dim=-1),
            inputs["center"], sum(dino_pairing(2), []), 2, 0.1,
            torch.tensor(0.04, dtype=torch.float64, device=DEVICE), backend)
    torch.library.opcheck(dino_loss._fwd_op, args)
    _, _, student_lse, teacher_lse, _ = dino_loss._fwd_op(*args)
    torch.library.opcheck(dino_loss._bwd_op, (torch.tensor(1.0, device=DEVICE), *[a.detach() for a in args[:5]],
                                              student_lse, teacher_lse, *args[5:]))


class TinyHead(torch.nn.Module):
    """A DINO-head-like caller: projection, normalisation, the fused last layer + loss."""

    def __init__(self, dim=24, bottleneck=16, out_dim=300):
        super().__init__()
        self.proj = torch.nn.Linear(dim, bottleneck)
        self.last = torch.nn.Parameter(torch.randn(out_dim, bottleneck))
        self.teacher_temp = 0.04

    def forward(self, x, teacher, center):
        feats = F.normalize(self.proj(x), dim=-1)
        return dino_head_loss(feats, teacher, self.last, center, dino_pairing(4), student_temp=0.1,
                              teacher_temp=self.teacher_temp, backend="triton")


def test_compiled_with_a_tensor_temperature_does_not_recompile_when_it_changes():
    """The warm-up schedule changes teacher_temp every step: as a tensor it is an input of
    the graph, not a constant baked into it (as a float would be, or a recompile)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = TinyHead().to(DEVICE)
    x = torch.randn(12, 24, device=DEVICE)
    teacher = F.normalize(torch.randn(6, 16, device=DEVICE), dim=-1)
    center = torch.randn(300, device=DEVICE) * 0.1
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    temp = torch.zeros((), dtype=torch.float64, device=DEVICE)
    compiles = []
    for value in (0.04, 0.05, 0.06):
        temp.fill_(value)
        model.teacher_temp = value
        eager, _ = model(x, teacher, center)
        model.teacher_temp = temp
        loss, _ = compiled(x, teacher, center)
        assert torch.equal(loss, eager)
        compiles.append(counter.frame_count)
    assert compiles[0] >= 1 and compiles[1:] == compiles[:1] * 2  # compiled at the first call only
    torch._dynamo.reset()  # TinyHead.forward's cache holds a tensor temperature; the next test passes a float


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    torch.manual_seed(0)
    model = TinyHead().to(DEVICE)
    x = torch.randn(12, 24, device=DEVICE)
    teacher = F.normalize(torch.randn(6, 16, device=DEVICE), dim=-1)
    center = torch.randn(300, device=DEVICE) * 0.1
    eager_loss, eager_mean = model(x, teacher, center)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled = torch.compile(model, backend=compile_backend, fullgraph=True)
    loss, mean = compiled(x, teacher, center)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(mean, eager_mean)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_compiled_fullgraph_with_a_float_temperature_that_changes():
    """DINO's warm-up schedule passes teacher_temp as a Python float that changes every
    epoch: torch.compile's automatic dynamic then makes it a SymFloat at the second
    value, and the checks must trace it (math.isfinite cannot)."""
    torch.manual_seed(0)
    inputs = _inputs()
    student = inputs["student"].requires_grad_()

    def step(student, teacher_temp, student_temp):
        return dino_head_loss(student, inputs["teacher"], inputs["weight"], inputs["center"], dino_pairing(2),
                              student_temp=student_temp, teacher_temp=teacher_temp, backend="torch")[0]

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for teacher_temp, student_temp in ((0.04, 0.1), (0.05, 0.1), (0.06, 0.2)):
        torch.testing.assert_close(compiled(student, teacher_temp, student_temp),
                                   step(student, teacher_temp, student_temp))
    torch._dynamo.reset()


def test_double_backward_raises_instead_of_dropping_the_second_derivative():
    """create_graph=True: the student gradient is a constant saved by the forward, so a
    gradient penalty through it would silently lose the op's Hessian; raise instead."""
    inputs = _inputs()
    student = inputs["student"].requires_grad_()
    loss, _ = dino_head_loss(student, inputs["teacher"], inputs["weight"], inputs["center"], dino_pairing(2),
                             student_temp=0.1, teacher_temp=0.04, backend="torch")
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss, student, create_graph=True)


def test_a_gain_of_shape_out_dim_by_1_is_weight_norms_weight_g():
    """nn.utils.weight_norm's weight_g and NormalizedLinear's gain are (out_dim, 1)."""
    gain = torch.rand(100, device=DEVICE) + 0.5
    flat, column = gain.clone().requires_grad_(), gain.clone()[:, None].requires_grad_()
    losses = [_call(gain=g)[0] for g in (flat, column)]
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    grads = [torch.autograd.grad(loss, g)[0] for loss, g in zip(losses, (flat, column))]
    assert grads[1].shape == (100, 1)
    torch.testing.assert_close(grads[1][:, 0], grads[0], rtol=0, atol=0)
