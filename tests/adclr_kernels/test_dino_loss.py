"""The fused DINO head + cross-entropy against its float64 definition.

Tolerance: float32 inputs (Triton, interpreter or GPU, and the chunked torch backend)
are held to the float64 reference at a relative error below 1e-5 for the loss, the
teacher mean and every gradient; float64 through the torch backend below 1e-12;
bf16 to the FlashAttention convention (error at most twice the unfused bf16 path's,
logits rounded to bf16 as F.linear under autocast leaves them, plus 1e-5).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from adclr_kernels import dino_loss
from adclr_kernels.dino_loss import dino_head_loss, dino_pairing, row_softmax
from adclr_kernels.dino_loss_reference import naive_dino_head_loss, row_softmax_chunked
from kernel_testing import DEVICE, assert_rel_close, rms_err

# (student views, teacher views): DINO with 2 local crops, ADCLR's queries (A, B).
VIEWS = {"cls": 4, "query": 2}


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the Triton launchers allocate starts as NaN."""
    real = dino_loss._empty
    monkeypatch.setattr(dino_loss, "_empty", lambda *a, **k: real(*a, **k).fill_(float("nan")))


def make_inputs(rows, views, dim, out_dim, *, gain=False, teacher_weight=True, seed=0):
    """Normalised features, raw weights (not unit rows), a centre: float64 on DEVICE."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    inputs = dict(
        student=F.normalize(randn(views * rows, dim), dim=-1),
        teacher=F.normalize(randn(2 * rows, dim), dim=-1),
        weight=randn(out_dim, dim) * 0.3,
        center=randn(out_dim) * 0.2,
        teacher_weight=randn(out_dim, dim) * 0.3 if teacher_weight else None,
        gain=torch.rand(out_dim, generator=g, dtype=torch.float64) + 0.5 if gain else None,
    )
    return {k: v.to(DEVICE) if v is not None else None for k, v in inputs.items()}


def loss_and_grads(fn, inputs, dtype, pairing, temps, **kw):
    """(loss, teacher_mean, grads of student, weight and gain) of fn on fresh leaves."""
    leaves = {k: inputs[k].detach().to(dtype).requires_grad_() for k in ("student", "weight", "gain")
              if inputs[k] is not None}
    args = {k: (leaves[k] if k in leaves else v.to(dtype) if v is not None else None)
            for k, v in inputs.items()}
    loss, mean = fn(args.pop("student"), args.pop("teacher"), args.pop("weight"), args.pop("center"),
                    pairing, student_temp=temps[0], teacher_temp=temps[1], **args, **kw)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), mean, dict(zip(leaves, grads))


def naive(student, teacher, weight, center, pairing, *, student_temp, teacher_temp, **kw):
    return naive_dino_head_loss(student, teacher, weight, center, pairing, student_temp, teacher_temp, **kw)


def assert_matches(got, ref, tol):
    assert_rel_close("loss", got[0], ref[0], tol)
    assert_rel_close("teacher_mean", got[1], ref[1], tol)
    assert got[2].keys() == ref[2].keys()
    for name in ref[2]:
        assert_rel_close(f"d{name}", got[2][name], ref[2][name], tol)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("views", ["cls", "query"])
@pytest.mark.parametrize("rows,out_dim,dim,temps", [
    (1, 1000, 32, (0.1, 0.04)),   # teacher temperature: start of DINO's warm-up ...
    (7, 1037, 32, (0.1, 0.07)),   # ... and its end; K not a multiple of any tile
    (5, 200, 24, (0.3, 1.0)),     # dim not a power of 2, soft temperatures
    (3, 17, 16, (0.05, 0.02)),    # fewer prototypes than one tile, sharp temperatures
])
def test_matches_float64_reference(poisoned, backend, views, rows, out_dim, dim, temps):
    inputs = make_inputs(rows, VIEWS[views], dim, out_dim, gain=rows in (5, 7), teacher_weight=rows in (3, 7))
    pairing = dino_pairing(VIEWS[views])
    ref = loss_and_grads(naive, inputs, torch.float64, pairing, temps)
    got = loss_and_grads(dino_head_loss, inputs, torch.float32, pairing, temps, backend=backend)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert_matches(got, ref, 1e-5)


def test_torch_backend_float64_is_exact():
    inputs = make_inputs(7, 4, 32, 1037, gain=True)
    pairing = [[0.0, 0.3, 0.1, 0.2], [0.25, 0.0, 0.05, 0.6]]  # any weights, not only DINO's
    ref = loss_and_grads(naive, inputs, torch.float64, pairing, (0.1, 0.04))
    got = loss_and_grads(dino_head_loss, inputs, torch.float64, pairing, (0.1, 0.04), backend="torch")
    assert_matches(got, ref, 1e-12)


def test_chunks_smaller_than_the_rows(monkeypatch):
    """The torch backend's row chunks: several chunks give the one-chunk result."""
    inputs = make_inputs(7, 4, 16, 300)
    pairing = dino_pairing(4)
    ref = loss_and_grads(naive, inputs, torch.float64, pairing, (0.1, 0.04))
    monkeypatch.setattr("adclr_kernels.dino_loss_reference.CHUNK_ELEMENTS", 300 * 3)  # 3 rows a chunk
    got = loss_and_grads(dino_head_loss, inputs, torch.float64, pairing, (0.1, 0.04), backend="torch")
    assert_matches(got, ref, 1e-12)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 9])
def test_row_softmax_column_splits(poisoned, num_splits):
    """Column splits merge to the unsplit statistics (9 asks for more splits than tiles)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 32, generator=g, dtype=torch.float64).to(DEVICE)
    w_logit, w_value = (torch.randn(1037, 32, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    shift = torch.randn(1037, generator=g, dtype=torch.float64).to(DEVICE)
    ref_lse, ref_out = row_softmax_chunked(x, w_logit, w_value, 0.07, shift, torch.float64)
    lse, out = row_softmax(x.float(), w_logit.float(), w_value.float(), 0.07, shift.float(), num_splits)
    assert_rel_close("lse", lse, ref_lse)
    assert_rel_close("out", out, ref_out)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bf16_within_twice_the_unfused_error(backend):
    """bf16 operands: no worse than twice the unfused autocast path (bf16 logits)."""
    inputs = make_inputs(5, 4, 32, 1037, gain=True)
    pairing = dino_pairing(4)
    ref = loss_and_grads(naive, inputs, torch.float64, pairing, (0.1, 0.04))

    def unfused(student, teacher, weight, center, pairing, *, student_temp, teacher_temp, **kw):
        # F.linear under autocast: bf16 operands, bf16 logits, then the loss in float32.
        w = dino_loss.effective_weight(weight, kw.pop("gain")).bfloat16()
        logits = (student.bfloat16() @ w.T).float()
        teacher_logits = (teacher.bfloat16() @ dino_loss.effective_weight(kw.pop("teacher_weight")).bfloat16().T).float()
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


def test_strided_inputs_and_no_teacher_gradient(poisoned):
    """Views with any strides (a slice of a wider buffer, a transposed weight) give the
    contiguous result; the teacher side gets no gradient."""
    inputs = make_inputs(3, 2, 32, 1000)
    wide = torch.zeros(inputs["student"].shape[0], 80, dtype=torch.float32, device=DEVICE)
    wide[:, 8:40] = inputs["student"].float()
    student = wide[:, 8:40].requires_grad_()
    weight = inputs["weight"].float().T.contiguous().T.requires_grad_()
    teacher = inputs["teacher"].float().requires_grad_()
    assert not student.is_contiguous() and not weight.is_contiguous()
    args = (inputs["center"].float(), dino_pairing(2))
    loss, _ = dino_head_loss(student, teacher, weight, *args, student_temp=0.1, teacher_temp=0.04,
                             backend="triton")
    d_student, d_weight, d_teacher = torch.autograd.grad(loss, (student, weight, teacher), allow_unused=True)
    assert d_teacher is None
    ref = loss_and_grads(naive, inputs | {"teacher_weight": None}, torch.float64, dino_pairing(2), (0.1, 0.04))
    assert_rel_close("loss", loss, ref[0])
    assert_rel_close("dstudent", d_student, ref[2]["student"])
    assert_rel_close("dweight", d_weight, ref[2]["weight"])


def test_backward_is_deterministic():
    inputs = make_inputs(7, 4, 32, 1037)
    pairing = dino_pairing(4)
    a, b = (loss_and_grads(dino_head_loss, inputs, torch.float32, pairing, (0.1, 0.04), backend="triton")
            for _ in range(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[2]["weight"], b[2]["weight"])


def test_grad_scales_with_the_incoming_gradient():
    inputs = make_inputs(3, 2, 16, 300)
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


def _call(dtype=torch.float32, **overrides):
    inputs = make_inputs(3, 2, 16, 100)
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
    (dict(gain=torch.ones(100, 1)), ValueError, r"gain must have shape \(100,\)"),
    (dict(teacher_gain=torch.ones(99)), ValueError, r"teacher_gain must have shape \(100,\)"),
    (dict(teacher_gain=torch.ones(100)), ValueError, "teacher_gain needs teacher_weight"),
    (dict(student=torch.zeros(5, 16)), ValueError, "multiples of those counts"),
    (dict(student=torch.zeros(8, 16)), ValueError, "teacher and student views must have the same rows"),
    (dict(pairing=[[0.0, 1.0], [1.0]]), ValueError, "pairing rows must all have the same length"),
    (dict(pairing=[]), TypeError, "pairing must be a non-empty"),
    (dict(pairing=[[0.0, float("nan")]]), TypeError, "pairing weights must be finite"),
    (dict(student_temp=0.0), ValueError, "student_temp must be a positive finite float"),
    (dict(teacher_temp=float("inf")), ValueError, "teacher_temp must be a positive finite float"),
    (dict(teacher=torch.zeros(6, 16, dtype=torch.float64)), TypeError, "must share one dtype"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_inputs_name_the_argument(overrides, error, match):
    overrides = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in overrides.items()}
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_backend_rules(monkeypatch):
    with pytest.raises(TypeError, match="backend='triton' takes float16, bfloat16 or float32"):
        _call(torch.float64, backend="triton")
    if DEVICE == "cpu":
        monkeypatch.setattr(dino_loss, "triton_interpreter_enabled", lambda: False)
        with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
            _call(backend="triton")


def test_meta_tensors_trace_shapes():
    """Shapes only, no kernel: what a static model of the step runs on."""
    inputs = make_inputs(3, 4, 16, 100)
    student = inputs["student"].float().to("meta").requires_grad_()
    weight = inputs["weight"].float().to("meta").requires_grad_()
    loss, mean = dino_head_loss(student, inputs["teacher"].float().to("meta"), weight,
                                inputs["center"].float().to("meta"), dino_pairing(4),
                                student_temp=0.1, teacher_temp=0.04, backend="triton")
    assert loss.shape == () and mean.shape == (100,) and loss.device.type == "meta"
    d_student, d_weight = torch.autograd.grad(loss, (student, weight))
    assert d_student.shape == student.shape and d_weight.shape == weight.shape


def _inputs():
    inputs = make_inputs(3, 2, 16, 100)
    return {k: v.float() for k, v in inputs.items() if v is not None}


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_opcheck(backend):
    inputs = _inputs()
    student = inputs["student"].requires_grad_()
    weight = F.normalize(inputs["weight"], dim=-1).requires_grad_()
    args = (student, inputs["teacher"], weight, F.normalize(inputs["teacher_weight"], dim=-1),
            inputs["center"], sum(dino_pairing(2), []), 2, 0.1, 0.04, backend)
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

    def forward(self, x, teacher, center):
        feats = F.normalize(self.proj(x), dim=-1)
        return dino_head_loss(feats, teacher, self.last, center, dino_pairing(4), student_temp=0.1,
                              teacher_temp=0.04, backend="triton")


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


# Shared memory per block that every GPU the library targets has (see test_gpu_compile).
SHARED_LIMIT = 99 * 1024


def compile_for_hopper(dtype, dim):
    """Both kernels through the real Triton pipeline for sm_90, with the launchers' GPU configs."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton

    block_d = dino_loss._block_d(dim)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    scalars = {"scale", "student_scale", "teacher_scale"}
    fp32_pointers = {"SHIFT", "LSE", "OUT", "LSE_S", "LSE_T", "GRAD_SCALE", "DW"}
    for kernel, cfg, constexprs in (
            (dino_loss._row_softmax_kernel, dino_loss._row_config(block_d, torch_dtype), dict(HAS_SHIFT=True)),
            (dino_loss._weight_grad_kernel, dino_loss._grad_config(block_d, torch_dtype), {})):
        constexprs = dict(constexprs, BLOCK_D=block_d, DOT=dino_loss._dot_mode(torch_dtype),
                          **{k: v for k, v in cfg.items() if k.startswith("BLOCK")})
        names = kernel.arg_names
        signature = {n: "constexpr" if n in constexprs else
                     ("*fp32" if n in fp32_pointers else "*" + dtype) if n.isupper() else
                     "fp32" if n in scalars else "i32" for n in names}
        src = ASTSource(fn=kernel, signature=signature,
                        constexprs={(names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        shared = compiled.metadata.shared
        assert shared <= SHARED_LIMIT, f"{kernel.__name__} {dtype} dim={dim}: {shared} B shared"
        print(kernel.__name__, dtype, dim, "shared", shared)


@pytest.mark.parametrize("dtype,dim", [("bf16", 256), ("fp32", 256)])
def test_kernels_compile_for_sm90_within_shared_memory(dtype, dim):
    pytest.importorskip("triton.backends.compiler")
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # a fresh process: ours decorated for the interpreter
    proc = subprocess.run([sys.executable, __file__, json.dumps([dtype, dim])], env=env,
                          capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]


if __name__ == "__main__":
    compile_for_hopper(*json.loads(sys.argv[1]))
