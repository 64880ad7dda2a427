"""The fused head + loss (`ADCLRLoss.fused`, `--fused-head-loss`) against the unfused path."""

import dataclasses
import json
import os

import pytest
import torch

from adclr.loss import ADCLRLoss
from adclr.model import DINOHead
from adclr.train import build, train

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(got, ref):
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("lambda_query,num_local_crops", [(0.0, 2), (0.5, 0), (0.5, 2)])
def test_fused_matches_head_and_adclr_loss(backend, lambda_query, num_local_crops):
    """Same losses, same gradients for the head and its input, same centres after."""
    torch.manual_seed(0)
    B, Q, dim, out_dim, temp = 3, 5, 32, 1037, 0.05
    student_head = DINOHead(dim, out_dim, hidden_dim=48, bottleneck_dim=24).to(DEVICE)
    teacher_head = DINOHead(dim, out_dim, hidden_dim=48, bottleneck_dim=24).to(DEVICE)
    cls = torch.randn((2 + num_local_crops) * B, dim, device=DEVICE)
    query = torch.randn(2 * B, Q, dim, device=DEVICE) if lambda_query else None
    teacher_cls = torch.randn(2 * B, dim, device=DEVICE)
    teacher_query = torch.randn(2 * B, Q, dim, device=DEVICE) if lambda_query else None
    results = {}
    for fused in (False, True):
        loss_fn = ADCLRLoss(out_dim, lambda_query).to(DEVICE)
        loss_fn.center.normal_(generator=torch.Generator(DEVICE).manual_seed(1))
        loss_fn.query_center.normal_(generator=torch.Generator(DEVICE).manual_seed(2))
        inputs = [cls.clone().requires_grad_()] + ([query.clone().requires_grad_()] if lambda_query else [])
        with torch.no_grad():
            t_cls = teacher_head(teacher_cls, project=not fused)
            t_query = teacher_head(teacher_query, project=not fused) if lambda_query else None
        s_cls = student_head(inputs[0], project=not fused)
        s_query = student_head(inputs[1], project=not fused) if lambda_query else None
        if fused:
            losses = loss_fn.fused(s_cls, t_cls, temp, student_head.last_layer.weight,
                                   teacher_head.last_layer.weight, s_query, t_query, backend=backend)
        else:
            losses = loss_fn(s_cls, t_cls, temp, s_query, t_query)
        grads = torch.autograd.grad(losses[0], inputs + list(student_head.parameters()))
        results[fused] = (losses, grads, loss_fn.center.clone(), loss_fn.query_center.clone())

    (ref_losses, ref_grads, ref_c, ref_qc), (losses, grads, c, qc) = results[False], results[True]
    for name, a, b in zip(("loss", "loss_global", "loss_query"), losses, ref_losses):
        assert abs(a.item() - b.item()) <= 1e-5 * max(1.0, abs(b.item())), (name, a.item(), b.item())
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert rel_err(a, b) < 1e-5, (i, rel_err(a, b))
    assert rel_err(c, ref_c) < 1e-6 and rel_err(qc, ref_qc) < 1e-6
    if not lambda_query:
        assert losses[2] == 0 and torch.equal(qc, results[False][3])  # query centre untouched


@pytest.mark.parametrize("lambda_query,norm_last_layer", [(0.0, True), (0.5, True), (0.5, False)])
def test_loss_curve_matches_the_unfused_run(tiny_config, tmp_path, lambda_query, norm_last_layer):
    """A short run logs the same losses either way, and ends at the same weights (the
    trained last-layer gain of --no-norm-last-layer included)."""
    runs = {}
    for fused in ("off", "on"):
        cfg = tiny_config(out=str(tmp_path / fused), fused_head_loss=fused, lambda_query=lambda_query,
                          max_steps=5, checkpoint_every=5, drop_path=0.1,
                          norm_last_layer=norm_last_layer, freeze_last_layer_epochs=0.0)
        train(cfg)
        with open(os.path.join(cfg.out, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        runs[fused] = (records, torch.load(os.path.join(cfg.out, "checkpoint.pt"), weights_only=True))
    (off, off_ckpt), (on, on_ckpt) = runs["off"], runs["on"]
    assert [r["step"] for r in on] == [r["step"] for r in off] == [1, 2, 3, 4, 5]
    for a, b in zip(on, off):
        for key in ("loss", "loss_global", "loss_query", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    if lambda_query == 0:
        assert all(r["loss_query"] == 0 for r in on)
    if not norm_last_layer:
        assert "head.last_layer.gain" in on_ckpt["student"]
    for key in ("student", "teacher", "loss"):
        for name, ref in off_ckpt[key].items():
            torch.testing.assert_close(on_ckpt[key][name], ref, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")


def test_flag_resolution(tiny_config):
    assert not build(tiny_config(fused_head_loss="auto"), "cpu").fused_head_loss  # CPU: off unless asked
    assert build(tiny_config(fused_head_loss="on"), "cpu").fused_head_loss
    from adclr.config import config_errors

    assert config_errors(tiny_config(fused_head_loss="yes")) == [
        "--fused-head-loss: invalid choice: 'yes' (choose from auto, on, off)"]


def test_model_stops_at_the_bottleneck(tiny_config):
    cfg = dataclasses.replace(tiny_config(), head_bottleneck_dim=24)
    model = build(cfg, "cpu").teacher
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    queries = torch.randn(2, cfg.num_queries, 3, cfg.patch_size, cfg.patch_size)
    with torch.no_grad():
        cls, query = model(images, queries, project=False)
        logits, query_logits = model(images, queries)
    assert cls.shape == (2, 24) and query.shape == (2, cfg.num_queries, 24)
    torch.testing.assert_close(cls.norm(dim=-1), torch.ones(2))
    w = torch.nn.functional.normalize(model.head.last_layer.weight, dim=-1)
    torch.testing.assert_close(logits, cls @ w.T)
    torch.testing.assert_close(query_logits, query @ w.T)
