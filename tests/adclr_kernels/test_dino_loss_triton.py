"""The DINO head loss's Triton kernels (dino_loss_triton.py): column splits, strides,
determinism, and both kernels compiled for sm_90 within shared memory."""

import json
import os
import subprocess
import sys

import pytest
import torch

from adclr_kernels import dino_loss_triton
from adclr_kernels._triton_common import LOG2E, block_d, dot_mode
from adclr_kernels.dino_loss import dino_head_loss, dino_pairing
from adclr_kernels.dino_loss_torch import row_softmax_chunked
from kernel_testing import DEVICE, assert_rel_close, loss_and_grads, make_loss_inputs, naive_loss


@pytest.mark.parametrize("num_splits", [1, 2, 3, 9])
def test_row_softmax_column_splits(poisoned, num_splits):
    """Column splits merge to the unsplit statistics (9 asks for more splits than tiles)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 32, generator=g, dtype=torch.float64).to(DEVICE)
    w_logit, w_value = (torch.randn(1037, 32, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    shift = torch.randn(1037, generator=g, dtype=torch.float64).to(DEVICE)
    ref_lse, ref_out = row_softmax_chunked(x, w_logit, w_value, 0.07, shift, torch.float64)
    lse, out = dino_loss_triton.row_softmax(x.float(), w_logit.float(), w_value.float(), 0.07, shift.float(),
                                            num_splits)
    assert_rel_close("lse (base 2)", lse, ref_lse * LOG2E)
    assert_rel_close("out", out, ref_out)


@pytest.mark.parametrize("temps,weight_scale,centre,feature_scale", [
    ((0.1, 1e-5), 1 / 0.3, True, 1.0), ((0.1, 1e-4), 1 / 0.3, False, 1.0), ((0.1, 0.04), 1.0, True, 300.0),
], ids=["teacher_temp 1e-5", "teacher_temp 1e-4, no centre", "features x300"])
def test_weight_gradient_holds_at_small_temperatures_and_large_logits(poisoned, temps, weight_scale, centre,
                                                                      feature_scale):
    """The weight gradient recomputes the probabilities from the forward's logsumexp: at
    scores of 1e3 to 1e5 each rounding of it is an error in every probability. Kept in
    the kernels' base 2 it matches to 1e-7; a round trip through base e had these cases'
    gradients off by 1.6e-4, 1.8e-5 and 3.5e-5, relative."""
    inputs = make_loss_inputs(3, 2, 32, 300)
    inputs["weight"], inputs["teacher_weight"] = (inputs[k] * weight_scale for k in ("weight", "teacher_weight"))
    inputs["student"], inputs["teacher"] = (inputs[k] * feature_scale for k in ("student", "teacher"))
    inputs["center"] = inputs["center"] * centre
    inputs = {k: None if v is None else v.float().double() for k, v in inputs.items()}  # fp32 values
    pairing = dino_pairing(2)
    got = loss_and_grads(dino_head_loss, inputs, torch.float32, pairing, temps, backend="triton")
    ref = loss_and_grads(naive_loss, inputs, torch.float64, pairing, temps)
    assert_rel_close("dweight", got[2]["weight"], ref[2]["weight"], tol=2e-6)
    assert_rel_close("dstudent", got[2]["student"], ref[2]["student"], tol=2e-6)


def test_strided_inputs_and_no_teacher_gradient(poisoned):
    """Views with any strides (a slice of a wider buffer, a transposed weight) give the
    contiguous result; the teacher side gets no gradient."""
    inputs = make_loss_inputs(3, 2, 32, 1000)
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
    ref = loss_and_grads(naive_loss, inputs | {"teacher_weight": None}, torch.float64, dino_pairing(2), (0.1, 0.04))
    assert_rel_close("loss", loss, ref[0])
    assert_rel_close("dstudent", d_student, ref[2]["student"])
    assert_rel_close("dweight", d_weight, ref[2]["weight"])


def test_backward_is_deterministic():
    inputs = make_loss_inputs(7, 4, 32, 1037)
    pairing = dino_pairing(4)
    a, b = (loss_and_grads(dino_head_loss, inputs, torch.float32, pairing, (0.1, 0.04), backend="triton")
            for _ in range(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[2]["weight"], b[2]["weight"])


# Shared memory per block that every GPU the library targets has (see test_attention_triton).
SHARED_LIMIT = 99 * 1024


def compile_for_hopper(dtype, dim):
    """Both kernels through the real Triton pipeline for sm_90, with the launchers' GPU configs."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton

    padded_dim = block_d(dim)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    fp32_pointers = {"SHIFT", "LSE", "OUT", "LSE_S", "LSE_T", "GRAD_SCALE", "DW", "SCALE", "SCALES"}
    kernels = dino_loss_triton
    for kernel, cfg, constexprs in (
            (kernels._row_softmax_kernel, kernels._row_config(padded_dim, torch_dtype), dict(HAS_SHIFT=True)),
            (kernels._weight_grad_kernel, kernels._grad_config(padded_dim, torch_dtype),
             dict(SCORES_AS_FORWARD=False))):
        constexprs = dict(constexprs, BLOCK_D=padded_dim, DOT=dot_mode(torch_dtype),
                          **{k: v for k, v in cfg.items() if k.startswith("BLOCK")})
        names = kernel.arg_names
        signature = {n: "constexpr" if n in constexprs else
                     ("*fp32" if n in fp32_pointers else "*" + dtype) if n.isupper() else
                     "i32" for n in names}
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
