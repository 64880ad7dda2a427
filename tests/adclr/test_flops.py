"""adclr.flops: the step's FLOPs from the Config against torch's FlopCounterMode on a real step."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from adclr import Config, build, train_step
from adclr.data import synthetic_batch
from adclr.flops import PAIR_FLOPS_PER_LOGIT, SOFTMAX_FLOPS_PER_LOGIT, attention_pairs, mfu, peak_tflops, step_flops
from adclr_kernels.dino_loss import dino_pairing

# FlopCounterMode counts by aten op; which of our terms each op carries on the tiny
# CPU step (reference attention: explicit matmuls, so bmm is the attention alone).
OP_TERMS = {
    "conv": (("convolution", "convolution_backward"), ("patch_embed",)),
    "attention": (("bmm",), ("attention", "dense_match", "decoder_attention")),
    "linear": (("addmm", "mm"), ("linear", "head_mlp", "head_last_layer", "dense_mlp", "decoder_linear",
                                 "pos_embed")),
}
CPU_SDPA_COUNTED = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in flop_registry


def counted_by_op(cfg):
    trainer = build(cfg, "cpu")
    batch = synthetic_batch(cfg, cfg.batch_size, "cpu", generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(trainer, batch, 0)
    ops = {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), ops


def ours_by_op(breakdown, invisible=()):
    """Our breakdown grouped as OP_TERMS, leaving out the terms the counter cannot see."""
    return {group: sum(v for k, v in breakdown.items()
                       if k.split("/")[-1] in terms and k.split("/")[-1] not in invisible)
            for group, (_, terms) in OP_TERMS.items()}


@pytest.mark.parametrize("overrides, rel", [
    ({}, 0),
    ({"num_queries": 0}, 0),
    ({"lambda_query": 0.0}, 0),  # queries given but unused: plain DINO
    ({"num_local_crops": 0}, 0),
    ({"pack_crops": "on"}, 0),
    ({"query_sees_prefix": True, "query_sees_queries": True}, 0),
    ({"norm_last_layer": False, "out_dim": 96}, 0),
    # The reference computes each query's own score as an elementwise product, which the
    # counter does not see: one key column per query row out of N + 1.
    ({"query_sees_self": True}, 0.01),
], ids=["default", "no-queries", "lambda0", "no-locals", "packed", "prefix+queries", "gain", "self"])
def test_matches_flop_counter(tiny_config, overrides, rel):
    cfg = tiny_config(attention="reference", fused_head_loss="off", compile="off",
                      head_hidden_dim=64, head_bottleneck_dim=32, **overrides)
    total, breakdown = step_flops(cfg)
    counted, ops = counted_by_op(cfg)
    # The loss is elementwise: the counter sees only matmuls and convolutions.
    assert total - breakdown["loss"] == pytest.approx(counted, rel=rel)
    ours = ours_by_op(breakdown)
    for group, (op_names, _) in OP_TERMS.items():
        assert ours[group] == pytest.approx(sum(ops.get(op, 0) for op in op_names), rel=rel), group
    assert set(ops) <= {op for names, _ in OP_TERMS.values() for op in names}


@pytest.mark.parametrize("method", ["densecl", "ccmim"])
def test_other_methods_match_the_flop_counter(tiny_config, method):
    """MFU for --method densecl and ccmim once counted ADCLR's step."""
    cfg = tiny_config(method=method, attention="reference", fused_head_loss="off", compile="off",
                      head_hidden_dim=64, head_bottleneck_dim=32)
    total, breakdown = step_flops(cfg)
    counted, ops = counted_by_op(cfg)
    # DenseCL's dense last layer runs inside the fused head loss (one custom op); ccMIM's
    # decoder block is on the auto backend, CPU SDPA here.
    invisible = ("dense_last_layer",) + (() if CPU_SDPA_COUNTED else ("decoder_attention",))
    unseen = breakdown["loss"] + sum(v for k, v in breakdown.items() if k.split("/")[-1] in invisible)
    assert total - unseen == counted
    ours = ours_by_op(breakdown, invisible)
    # The dense head on (2B, N, D) patches runs some of its products as bmm: the split
    # between the matrix-product groups is aten's, only their sum is ours to hold.
    assert ours["conv"] == ops["convolution"] + ops["convolution_backward"]
    assert ours["attention"] + ours["linear"] == sum(ops.get(op, 0) for op in ("bmm", "addmm", "mm"))
    adclr_total = step_flops(tiny_config(attention="reference", fused_head_loss="off", compile="off",
                                         head_hidden_dim=64, head_bottleneck_dim=32))[0]
    assert total != adclr_total


@pytest.mark.parametrize("overrides, invisible", [
    # The fused head loss is one custom op: the counter sees neither the last layer nor the loss.
    ({"attention": "reference", "fused_head_loss": "on"}, ("head_last_layer",)),
    # CPU SDPA runs aten._scaled_dot_product_flash_attention_for_cpu, which the counter
    # has no formula for (it has the CUDA flash, efficient and cuDNN ones).
    ({"attention": "sdpa", "fused_head_loss": "off"}, () if CPU_SDPA_COUNTED else ("attention",)),
], ids=["fused-head-loss", "sdpa"])
def test_terms_the_counter_cannot_see(tiny_config, overrides, invisible):
    cfg = tiny_config(compile="off", **overrides)
    total, breakdown = step_flops(cfg)
    counted, _ = counted_by_op(cfg)
    unseen = breakdown["loss"] + sum(v for k, v in breakdown.items() if k.split("/")[-1] in invisible)
    assert total - unseen == counted


def test_breakdown_sums_and_scales(tiny_config):
    cfg = tiny_config()
    total, breakdown = step_flops(cfg)
    assert total == sum(breakdown.values())
    assert all(v > 0 for v in breakdown.values())
    double, _ = step_flops(cfg, batch_size=2 * cfg.batch_size)
    resize = breakdown["student/pos_embed"]  # the local crops' positional embedding, once per step
    assert double - resize == 2 * (total - resize)  # every other term is per image


@pytest.mark.parametrize("overrides", [{}, {"num_local_crops": 0}, {"lambda_query": 0.0}])
def test_loss_counts_the_pairs_the_loss_takes(tiny_config, overrides):
    """Softmaxes over every teacher and student row (the student's again in the backward),
    and the cross-entropy over each (teacher row, student row) pair that dino_pairing
    weighs, forward and backward: never a view against itself."""
    cfg = tiny_config(**overrides)
    B, Q, views = cfg.batch_size, cfg.num_queries if cfg.lambda_query else 0, 2 + cfg.num_local_crops
    pairs = B * sum(w > 0 for row in dino_pairing(views) for w in row) + B * Q * sum(
        w > 0 for row in dino_pairing(2) for w in row)
    teacher_rows, student_rows = 2 * B * (1 + Q), views * B + 2 * B * Q
    per_logit = SOFTMAX_FLOPS_PER_LOGIT * (teacher_rows + 2 * student_rows) + 2 * PAIR_FLOPS_PER_LOGIT * pairs
    assert step_flops(cfg)[1]["loss"] == per_logit * cfg.out_dim


def test_vit_small_step():
    """ViT-S/16, 128 images, 2 x 224 + 10 x 96 crops, Q = 10, out_dim 65536: ~17 TFLOP,
    three quarters of it the student's linear layers."""
    total, breakdown = step_flops(Config(batch_size=128))
    assert 16.5e12 < total < 17e12
    assert 0.7 < breakdown["student/linear"] / total < 0.8
    assert breakdown["loss"] / total < 1e-3


@pytest.mark.parametrize("options, keys", [
    ({}, 196),
    ({"query_sees_prefix": True}, 197),
    ({"query_sees_self": True}, 197),
    ({"query_sees_queries": True}, 206),
    ({"query_sees_self": True, "query_sees_queries": True}, 206),  # self is one of the queries
])
def test_attention_pairs(options, keys):
    assert attention_pairs(196, 0) == 197 * 197
    assert attention_pairs(196, 10, **options) == 197 * 197 + 10 * keys


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.05),
    ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA H100 NVL", None), ("NVIDIA H200 NVL", None), ("NVIDIA L40", None), ("Tesla T4", None),
])
def test_peak_tflops(name, peak):
    assert peak_tflops(name) == peak


def test_mfu():
    assert mfu(1.0, 1e12, 1.0) == 1.0
    assert mfu(0.1, 16.7e12, 989.4) == pytest.approx(0.1688, abs=1e-4)
