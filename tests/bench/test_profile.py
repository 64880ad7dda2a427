"""bench.profile: the step's time split into buckets, on the tiny CPU model and on made-up CUDA events."""

import json

import pytest
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from adclr import Config
from adclr.flops import step_flops
from bench import profile

# Buckets the tiny CPU step must fill: it has attention (SDPA), linear layers, norms and
# GELUs, a head and loss, AdamW + EMA, copies (the queries' repeat, the crops' cat) and
# Python between operators.
NON_ZERO = ("attention", "GEMMs", "norms + elementwise", "head + loss", "optimizer + EMA", "copies",
            "idle / host")


def test_tiny_cpu_step(tmp_path, capsys):
    out = tmp_path / "profile.json"
    result = profile.main(["--device", "cpu", "--model", "tiny", "--warmup", "1", "--time-steps", "1",
                           "--json", str(out)])
    for table in (result["by_kind"], result["by_range"]):
        assert sum(row["share"] for row in table.values()) == pytest.approx(100, abs=0.01)
        assert set(table) and all(row["ms"] >= 0 for row in table.values())
    kinds = result["by_kind"]
    assert set(kinds) <= set(profile.BUCKETS)
    for bucket in NON_ZERO:
        assert kinds.get(bucket, {"ms": 0})["ms"] > 0, bucket
    assert kinds.get("other", {"share": 0})["share"] < 1  # the patterns name nearly everything
    # The hooks' ranges: the forward passes, the loss, and the optimizer's own range.
    assert {"teacher forward", "student forward", "loss", "backward", "optimizer"} <= set(result["by_range"])
    cfg = Config(**profile.MODELS["tiny"], device="cpu")
    assert result["flops"] == step_flops(cfg)[0]
    saved = json.loads(out.read_text())
    assert saved["by_kind"].keys() == kinds.keys() and saved["flops"] == result["flops"]
    printed = capsys.readouterr().out
    assert "by kind" in printed and "MFU n/a" in printed


def test_a_step_the_trainer_refuses_is_one_line_before_any_work():
    # The trainer's own reason (a CUDA graph needs CUDA), not its traceback from build().
    with pytest.raises(SystemExit, match=r"^python -m bench.profile: error: --compile graph replays a CUDA graph"):
        profile.main(["--device", "cpu", "--compile", "graph"])


@pytest.mark.parametrize("kernel, op, ranges, bucket", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "aten::mm", (),
     "GEMMs"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "aten::addmm", (), "GEMMs"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "aten::addmm", ("adclr/head", "adclr/student"),
     "head + loss"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x1_nn_align8>",
     "aten::bmm", (), "attention"),
    ("_unidirectional_fwd_kernel", "_EagerAttention", (), "attention"),
    ("_unidirectional_bwd_kernel", None, (), "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>",
     "aten::_flash_attention_forward", (), "attention"),
    ("_row_softmax_kernel", "adclr_kernels::dino_head_loss_fwd", (), "head + loss"),
    ("_weight_grad_kernel", None, (), "head + loss"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>",
     "aten::native_layer_norm", (), "norms + elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "aten::gelu", (),
     "norms + elementwise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>", "aten::sum",
     ("adclr/loss",), "head + loss"),
    ("void cunn_SoftMaxForward<4, float>", "aten::_softmax", (), "norms + elementwise"),
    ("triton_poi_fused_add_native_layer_norm_3", None, (), "norms + elementwise"),
    ("triton_tem_fused_addmm_gelu_1", None, (), "GEMMs"),
    ("triton_poi_fused__to_copy_add_native_layer_norm_4", None, (), "norms + elementwise"),
    ("void at::native::elementwise_kernel<128, 4, at::native::direct_copy_kernel_cuda>", "aten::copy_", (),
     "copies"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, 4>", "aten::cat", (), "copies"),
    ("Memcpy DtoH (Device -> Pageable)", "aten::_local_scalar_dense", (), "copies"),
    ("Memset (Device)", None, (), "copies"),
    ("void at::native::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>, FusedAdamMathFunctor>",
     "aten::_fused_adamw_", ("Optimizer.step#AdamW.step",), "optimizer + EMA"),
    ("void at::native::multi_tensor_apply_kernel<TensorListMetadata<2>, LerpFunctor>", "aten::_foreach_lerp_",
     (), "optimizer + EMA"),
    ("triton_for_fused_0", None, (), "optimizer + EMA"),
    ("some_kernel_nobody_knows", None, (), "other"),
])
def test_classify_kernels(kernel, op, ranges, bucket):
    own = [kernel] + ([op] if op else [])
    assert profile.classify(own + list(ranges), own, kernel=True) == bucket


@pytest.mark.parametrize("op, ranges, bucket", [
    ("aten::view", (), "idle / host"),
    ("autograd::engine::evaluate_function: AddmmBackward0", (), "idle / host"),
    ("profile/step", (), "idle / host"),
    ("aten::item", ("Optimizer.step#AdamW.step",), "optimizer + EMA"),
    ("aten::mkldnn_convolution", ("aten::convolution",), "GEMMs"),
    ("aten::native_layer_norm", (), "norms + elementwise"),
    ("aten::repeat", (), "copies"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", (), "attention"),
    ("Torch-Compiled Region: 0/0", (), "idle / host"),
    ("CompiledFunctionBackward", (), "idle / host"),
    ("prims::convert_element_type", ("CompiledFunction",), "norms + elementwise"),
    # Inductor's C++ kernels (cpp.enable_kernel_profile): fused elementwise work, and the
    # compiled step's AdamW + EMA.
    ("graph_0_cpp_fused__log_softmax__softmax_copy__div_sum_25", (), "norms + elementwise"),
    ("graph_0_cpp_fused__foreach_add__foreach_addcdiv__foreach_lerp_56", (), "optimizer + EMA"),
    ("## Call CompiledFxGraph fgdfzlwoq4diiscjdytwr5r6y2xhk44vu5h3z3e7zgp5ykbcrnwg ##", (), "idle / host"),
])
def test_classify_cpu_ops(op, ranges, bucket):
    assert profile.classify([op, *ranges], [op]) == bucket


def _event(id, name, start, end, device=DeviceType.CPU, parent=None, linked=0, annotation=False,
           activity=None):
    e = FunctionEvent(id=id, name=name, thread=1, start_us=start, end_us=end, device_type=device,
                      linked_correlation_id=linked, is_user_annotation=annotation, activity_type=activity)
    if parent is not None:
        e.set_cpu_parent(parent)
        parent.append_cpu_child(e)
    return e


def test_split_device_with_idle_gaps():
    """Kernels linked to their operators and ranges; the gaps between them up to the step's end."""
    step = _event(1, profile.STEP_RANGE, 0, 100, annotation=True)
    mm = _event(2, "aten::mm", 10, 20, parent=step)
    head = _event(3, "adclr/head", 30, 50, parent=step, annotation=True)
    addmm = _event(4, "aten::addmm", 31, 40, parent=head)
    cuda = DeviceType.CUDA
    kernels = [
        _event(10, "sm90_xmma_gemm_bf16", 20, 40, cuda, linked=2),          # 20 us GEMM
        _event(11, "nvjet_tst_128x256", 45, 55, cuda, linked=4),            # 10 us head
        _event(12, "_unidirectional_fwd_kernel", 50, 60, cuda),             # overlaps: 5 us busy more
        _event(13, "Memcpy DtoD (Device -> Device)", 70, 75, cuda, activity="gpu_memcpy"),  # 5 us copy
        # Not work: the range mirrored on the GPU, a synchronisation wait.
        _event(14, profile.STEP_RANGE, 0, 100, cuda, activity="gpu_user_annotation"),
        _event(15, "Context Sync", 75, 100, cuda, activity="cuda_sync"),
    ]
    ev = profile.Events([step, mm, head, addmm, *kernels])
    kinds, phases = profile.split_device(ev, [step])
    us = {k: v["us"] for k, v in kinds.items()}
    assert us == {"GEMMs": 20, "head + loss": 10, "attention": 10, "copies": 5,
                  "idle / host": 100 - (20 + 15 + 5)}
    assert {k: v["us"] for k, v in phases.items()}["idle"] == 60
    assert sum(v["share"] for v in profile.shares(kinds).values()) == pytest.approx(100)
