"""DenseCL and ccMIM (adclr/methods.py): each loss against a float64 reference written
out term by term on tiny inputs, the importance sampling, and a tiny training run of each
method that resumes exactly."""

import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F
from trainer_testing import crash_in_step, read_metrics

import adclr.methods
import adclr.train
from adclr.checkpoint import load_checkpoint
from adclr.data import synthetic_batch
from adclr.loss import ADCLRLoss
from adclr.methods import (ccmim_losses, densecl_losses, importance_masks, match_patches, patchify,
                           reconstruction_loss)
from adclr.model import MaskedDecoder
from adclr.train import build, train


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_match_patches_picks_the_most_similar_patch_of_the_other_view():
    B, N, D = 2, 5, 4
    student, teacher = randn(2 * B, N, D), randn(2 * B, N, D, seed=1)
    index = match_patches(student, teacher)
    for v in range(2):
        for b in range(B):
            for i in range(N):
                s = student[v * B + b, i]
                other = teacher[(1 - v) * B + b]  # the other view of the same image
                cosines = [float(s @ t / (s.norm() * t.norm())) for t in other]
                assert index[v * B + b, i] == max(range(N), key=cosines.__getitem__)


def test_dense_loss_against_a_float64_reference():
    """H(teacher target, student patch) over the prototypes, averaged over both views'
    patches, each student patch against the teacher feature matched to it."""
    B, N, d, K, t_s, t_t = 2, 3, 8, 11, 0.1, 0.05
    student = F.normalize(randn(2 * B, N, d), dim=-1).requires_grad_()
    targets = F.normalize(randn(2 * B, N, d, seed=1), dim=-1)
    weight, teacher_weight, center = randn(K, d, seed=2), randn(K, d, seed=3), randn(1, K, seed=4) * 0.1
    loss_fn = ADCLRLoss(K, student_temp=t_s, center_momentum=0.9, dense=True).double()
    loss_fn.dense_center.copy_(center)
    loss = loss_fn.dense(student, targets, t_t, weight.requires_grad_(), teacher_weight)

    w, w_t = F.normalize(weight.detach(), dim=-1), F.normalize(teacher_weight, dim=-1)
    total, s = 0.0, student.detach()
    for r in range(2 * B):
        for i in range(N):
            p = torch.softmax((targets[r, i] @ w_t.T - center[0]) / t_t, -1)
            total += -(p * torch.log_softmax(s[r, i] @ w.T / t_s, -1)).sum()
    want = total / (2 * B * N)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    # The dense centre moved towards the targets' mean logits.
    mean = (targets.reshape(-1, d) @ w_t.T).mean(0)
    torch.testing.assert_close(loss_fn.dense_center[0], 0.9 * center[0] + 0.1 * mean)
    loss.backward()
    assert student.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0


def test_reconstruction_loss_against_a_float64_reference():
    B, p = 2, 4
    images = randn(B, 3, 8, 12)  # a 2 x 3 grid of patches
    masked = torch.tensor([[0, 4], [5, 1]])
    pixels = randn(B, 2, p * p * 3, seed=1)
    total = 0.0
    for b in range(B):
        for j, index in enumerate(masked[b].tolist()):
            row, col = divmod(index, 3)
            patch = images[b, :, row * p:(row + 1) * p, col * p:(col + 1) * p].permute(1, 2, 0).reshape(-1)
            target = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
            total += (pixels[b, j] - target).square().sum()
    want = total / pixels.numel()
    torch.testing.assert_close(reconstruction_loss(pixels, images, masked, p).double(), want, rtol=1e-6, atol=0)
    assert patchify(images, p).shape == (B, 6, p * p * 3)


def test_importance_masks_split_every_patch_once_and_follow_the_weights():
    torch.manual_seed(0)
    weights = torch.tensor([[0.97] + [0.01] * 3] * 2000)  # patch 0 holds nearly all the attention
    visible, masked = importance_masks(weights, 0.25)
    assert visible.shape == (2000, 3) and masked.shape == (2000, 1)
    both = torch.cat([visible, masked], 1).sort(1).values
    assert torch.equal(both, torch.arange(4).expand(2000, 4))
    assert (visible.diff(dim=1) > 0).all()
    share = (masked[:, 0] == 0).double().mean().item()
    assert 0.95 < share < 0.99  # drawn with probability 0.97, not always (no top-k)
    # Without replacement: two draws from two patches take both.
    _, both_masked = importance_masks(torch.tensor([[0.99, 0.01]]), 1.0 - 1e-9)
    assert sorted(both_masked[0].tolist()) == [0, 1]
    # The second of two draws is among the other patches alike, never patch 0 again (drawn
    # with replacement, patch 0 twice, the last patch would fill the masked set).
    _, two = importance_masks(weights, 0.5)
    shares = [(two == j).any(1).double().mean().item() for j in range(4)]
    assert shares[0] > 0.95 and all(0.25 < share < 0.42 for share in shares[1:]), shares


def test_decoder_predicts_the_masked_patches_only():
    torch.manual_seed(0)
    decoder = MaskedDecoder(64, 16, 8)
    visible, masked = torch.tensor([[0, 2, 5], [1, 3, 4]]), torch.tensor([[1, 7], [0, 15]])
    tokens = torch.randn(2, 3, 64)
    out = decoder(tokens, visible, masked)
    assert out.shape == (2, 2, 8 * 8 * 3)
    # Each visible token goes to its own patch, in whatever order they come.
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(decoder(tokens[:, perm], visible[:, perm], masked), out)


@pytest.mark.parametrize("method,weight,total", [
    ("densecl", "lambda_dense", lambda terms, w: (1 - w) * terms["loss_global"] + w * terms["loss_dense"]),
    ("ccmim", "lambda_align", lambda terms, w: terms["loss_reconstruction"] + w * terms["loss_align"])])
def test_the_loss_is_the_methods_weighted_sum_of_its_terms(method, weight, total, tiny_config):
    cfg = tiny_config(method=method, mask_ratio=0.5, **{weight: 0.3})
    losses = {"densecl": densecl_losses, "ccmim": ccmim_losses}[method]
    loss, terms = losses(build(cfg, "cpu"), synthetic_batch(cfg, 2, "cpu"), 0.04)
    torch.testing.assert_close(loss, total(terms, 0.3))


def test_densecl_targets_are_the_teachers_matched_patches_of_the_other_view(tiny_config, monkeypatch):
    cfg = tiny_config(method="densecl")
    trainer, batch = build(cfg, "cpu"), synthetic_batch(cfg, 2, "cpu")  # views A, B: rows 0-1, 2-3
    seen, real_dense = {}, trainer.loss.dense
    monkeypatch.setattr(adclr.methods, "match_patches", lambda s, t: seen.setdefault("index", match_patches(s, t)))
    trainer.loss.dense = lambda student, targets, *a, **k: seen.update(targets=targets) or real_dense(
        student, targets, *a, **k)
    densecl_losses(trainer, batch, 0.04)
    with torch.no_grad():
        dense = trainer.teacher(batch["globals"])[2][1]
    other = dense[[2, 3, 0, 1]]
    want = torch.stack([other[r, seen["index"][r]] for r in range(4)])
    torch.testing.assert_close(seen["targets"], want)


def test_ccmim_masks_view_a_by_the_teachers_cls_attention_and_both_networks_see_that_split(tiny_config,
                                                                                           monkeypatch):
    cfg = tiny_config(method="ccmim", mask_ratio=0.5)
    trainer, batch = build(cfg, "cpu"), synthetic_batch(cfg, 2, "cpu")
    drawn, calls = {}, []

    def masks(weights, ratio):
        drawn["weights"], drawn["masks"] = weights, importance_masks(weights, ratio)
        return drawn["masks"]

    monkeypatch.setattr(adclr.methods, "importance_masks", masks)
    for model in (trainer.teacher, trainer.student_module):
        real = model.forward_masked
        model.forward_masked = lambda images, visible, masked, *a, real=real, **k: calls.append(
            (images, visible, masked)) or real(images, visible, masked, *a, **k)
    ccmim_losses(trainer, batch, 0.04)
    view_a = batch["globals"][:2]
    with torch.no_grad():
        attention = trainer.teacher.backbone.forward_features(view_a, cls_attention=True)["cls_attention"]
    torch.testing.assert_close(drawn["weights"], attention[:, :, 1:].mean(1))  # the heads' mean, CLS column out
    assert len(calls) == 2  # the teacher's, then the student's
    for images, visible, masked in calls:
        assert torch.equal(images, view_a) and visible is drawn["masks"][0] and masked is drawn["masks"][1]


def test_ccmim_trains_on_view_a_unaugmented_but_for_the_flip(tiny_config, tmp_path, monkeypatch):
    """MAE's input, not DINO's blurred and colour-jittered view A: every pixel ccMIM reads
    (and rebuilds) is a normalised 8-bit value of the loader's crop."""
    cfg = tiny_config(method="ccmim", out=str(tmp_path / "run"), max_steps=2, batch_size=4, num_local_crops=1,
                      mask_ratio=0.5)
    seen = []
    monkeypatch.setattr(adclr.train, "ccmim_losses",
                        lambda trainer, batch, *a: seen.append(batch["globals"]) or ccmim_losses(trainer, batch, *a))
    assert train(cfg) == 2 and len(seen) == 2
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    for views in seen:
        levels = (views * std + mean) * 255  # view A, then view B (DINO's, unused)
        assert (levels[:4] - levels[:4].round()).abs().max() < 1e-3
        assert (levels[4:] - levels[4:].round()).abs().max() > 0.1


@pytest.mark.parametrize("method,terms", [("densecl", ("loss_global", "loss_dense")),
                                          ("ccmim", ("loss_reconstruction", "loss_align"))])
def test_tiny_run_trains_and_resumes_exactly(method, terms, tiny_config, tmp_path, monkeypatch):
    full = tiny_config(method=method, out=str(tmp_path / "full"), max_steps=3, checkpoint_every=1,
                       num_local_crops=1, batch_size=4, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16,
                       mask_ratio=0.5)
    assert train(full) == 3
    part = dataclasses.replace(full, out=str(tmp_path / "part"))
    crash_in_step(monkeypatch, 2, lambda: train(part))
    assert train(part) == 3
    records = read_metrics(part.out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in terms), r
    a = load_checkpoint(os.path.join(full.out, "checkpoint.pt"))
    b = load_checkpoint(os.path.join(part.out, "checkpoint.pt"))
    assert a["config"]["method"] == method
    for key in ("student", "teacher", "loss"):
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=0, atol=0, msg=f"{key}.{name}")


def test_a_mask_ratio_that_masks_nothing_or_everything_is_a_config_error(tiny_config):
    from adclr.config import config_errors

    assert config_errors(tiny_config(method="ccmim", mask_ratio=0.5)) == []
    for ratio in (0.01, 0.99):  # 16 patches: round(0.16) = 0, round(15.84) = 16
        assert config_errors(tiny_config(method="ccmim", mask_ratio=ratio))[0].startswith("--mask-ratio:")
    assert config_errors(tiny_config(method="densecl", mask_ratio=0.99)) == []  # only ccMIM masks
