"""The DINO head's last layer + ADCLR loss, forward and backward: unfused against fused.

From the bottleneck features to the gradients of the features and of the last-layer
weight (see `bench/head_loss.py`): `unfused` is F.linear + ADCLRLoss.forward, `fused-*`
is ADCLRLoss.fused on the Triton or chunked-PyTorch backend. On CUDA the ViT-S/16 recipe
at 128 images per GPU under bf16 autocast; on CPU a small subset, float32: 2 images and
8192 prototypes (the full-size CPU memory measurement is `python -m bench.head_loss`).
Each result also records the static memory model's peak for its path.
"""

import contextlib
import dataclasses

import pytest
import torch

from bench.timing import DEVICE, ON_CUDA
from bench.head_loss import fused_step, make_inputs, static_peak_bytes, unfused_step, vit_s16

WORKLOAD = vit_s16(128) if ON_CUDA else dataclasses.replace(vit_s16(2), out_dim=8192)
PATHS = ("unfused", "fused-triton", "fused-torch")
FLOP_CONVENTION = ("useful FLOPs: the unfused path's matmuls, 2*K*D per (row, prototype) "
                   "product: teacher logits, student logits, and their two backward products; "
                   "every path is credited with the same count")


def useful_flops(w):
    return 2 * w.out_dim * w.dim * (3 * w.student_rows + w.teacher_rows)


@pytest.mark.parametrize("path", PATHS)
def test_head_loss(measure, path):
    if path == "fused-triton" and not ON_CUDA:
        pytest.skip("triton needs CUDA; on CPU it only runs in Triton's interpreter "
                    "(TRITON_INTERPRET=1), far too slow to be a benchmark")
    inputs = make_inputs(WORKLOAD, DEVICE)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if ON_CUDA else contextlib.nullcontext()

    def fn():
        with autocast:
            return unfused_step(inputs) if path == "unfused" else fused_step(inputs, path.split("-")[1])

    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count if ON_CUDA else 132
    model_bytes, _ = static_peak_bytes(WORKLOAD, path, 2 if ON_CUDA else 4, sms=sms)
    measure(fn, mode="head+loss forward+backward", group=f"head+loss | {WORKLOAD.id}", backend=path,
            workload=WORKLOAD, flops=useful_flops(WORKLOAD), flop_convention_head=FLOP_CONVENTION,
            static_peak_memory_bytes=model_bytes,
            autocast="bf16" if ON_CUDA else "none (fp32)")
