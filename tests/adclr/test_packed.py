"""Packed multi-crop: one backbone pass over every crop gives the per-resolution result."""

import dataclasses

import pytest
import torch

from adclr.data import synthetic_batch
from adclr.train import build, train_step


def _losses_and_grads(trainer, batch):
    queries = batch["queries"].repeat(2, 1, 1, 1, 1)
    with torch.no_grad():
        teacher_cls, teacher_query = trainer.teacher(batch["globals"], queries)
    student_cls, student_query = trainer.student(batch["globals"], queries, batch["locals"])
    losses = trainer.loss(student_cls, teacher_cls, 0.04, student_query, teacher_query)
    losses[0].backward()
    return [x.detach() for x in losses], {n: p.grad for n, p in trainer.student.named_parameters()}


@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_packed_crops_give_the_same_losses_and_gradients(tiny_config, attention):
    cfg = tiny_config(drop_path=0.0, attention=attention)
    batch = synthetic_batch(cfg, 4, "cpu", generator=torch.Generator().manual_seed(0))
    results = {}
    for pack in ("off", "on"):
        trainer = build(dataclasses.replace(cfg, pack_crops=pack), "cpu")
        assert trainer.student.pack_crops == (pack == "on")
        results[pack] = _losses_and_grads(trainer, batch)
    (losses_a, grads_a), (losses_b, grads_b) = results["off"], results["on"]
    for a, b in zip(losses_a, losses_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_training_step_runs_with_stochastic_depth(tiny_config):
    cfg = tiny_config(drop_path=0.5, pack_crops="on")
    trainer = build(cfg, "cpu")
    batch = synthetic_batch(cfg, 4, "cpu", generator=torch.Generator().manual_seed(1))
    out = train_step(trainer, batch, 0)
    assert torch.isfinite(out["loss"]) and out["grad_norm"] > 0


def test_pack_crops_auto_is_on_for_cuda_only(tiny_config):
    assert build(tiny_config(pack_crops="auto"), "cpu").student.pack_crops is False
    with pytest.raises(ValueError, match="pack_crops"):
        build(tiny_config(pack_crops="yes"), "cpu")


def test_the_packed_layout_is_one_run_per_crop_size(tiny_config):
    # Every global crop, then every local crop: two runs of alike sequences, which the
    # Triton op may attend run by run with its batched kernels (docs/operator.md).
    cfg = tiny_config(pack_crops="on")
    trainer = build(cfg, "cpu")
    batch = synthetic_batch(cfg, 4, "cpu", generator=torch.Generator().manual_seed(2))
    queries = batch["queries"].repeat(2, 1, 1, 1, 1)
    with torch.no_grad():
        trainer.student(batch["globals"], queries, batch["locals"])
    (packing,) = trainer.student.backbone._packings.values()
    (globals_, global_len, num_queries), (locals_, local_len, local_queries) = packing.layout.runs
    assert (globals_, locals_) == (batch["globals"].shape[0], batch["locals"].shape[0])
    assert num_queries == queries.shape[1] and local_queries == 0
    assert global_len > local_len + num_queries
