import pytest
import torch
import torch.nn.functional as F

from adclr.data import synthetic_batch
from adclr.loss import ADCLRLoss
from adclr.train import build, train_step


def dino_loss(student_output, teacher_output, center, ncrops, student_temp, teacher_temp):
    """DINO's DINOLoss.forward (facebookresearch/dino), written out independently."""
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / teacher_temp, dim=-1).chunk(2)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


@pytest.mark.parametrize("num_local_crops", [0, 2])
def test_lambda_zero_is_dino(tiny_config, num_local_crops):
    cfg = tiny_config(lambda_query=0.0, drop_path=0.0, num_local_crops=num_local_crops)
    trainer = build(cfg, "cpu", steps_per_epoch=10)
    batch = synthetic_batch(cfg, 4, "cpu", generator=torch.Generator().manual_seed(0))
    step = 3
    temp = trainer.schedule(step)["teacher_temp"]
    assert 0.04 < temp <= 0.07
    # A centre a few steps in: one that is subtracted, and moved by the step.
    centre = torch.randn(1, cfg.out_dim, generator=torch.Generator().manual_seed(1))
    trainer.loss.center.copy_(centre)
    with torch.no_grad():
        teacher_cls, _ = trainer.teacher(batch["globals"])
        student_cls, _ = trainer.student(batch["globals"], None, batch["locals"])
        expected = dino_loss(student_cls, teacher_cls, centre, 2 + num_local_crops, 0.1, temp)
    metrics = train_step(trainer, batch, step)
    torch.testing.assert_close(metrics["loss"], expected, rtol=1e-5, atol=1e-6)
    assert metrics["loss_query"] == 0
    torch.testing.assert_close(trainer.loss.center, 0.9 * centre + 0.1 * teacher_cls.mean(0, keepdim=True))
    assert torch.count_nonzero(trainer.loss.query_center) == 0  # the query centre is untouched


def test_query_term_leaves_the_global_loss_alone(tiny_config):
    """Same weights and batch: the CLS loss is the same with and without the query term."""
    batch = synthetic_batch(tiny_config(), 4, "cpu", generator=torch.Generator().manual_seed(1))
    results = {}
    for lam in (0.0, 0.5):
        cfg = tiny_config(lambda_query=lam, drop_path=0.0)
        results[lam] = train_step(build(cfg, "cpu", 10), batch, 0)
    torch.testing.assert_close(results[0.5]["loss_global"], results[0.0]["loss_global"])
    assert results[0.5]["loss_query"] > 0
    torch.testing.assert_close(results[0.5]["loss"],
                               results[0.5]["loss_global"] + 0.5 * results[0.5]["loss_query"])


def test_query_loss_matches_the_paper_formula():
    torch.manual_seed(0)
    B, Q, K, lam, temp = 3, 4, 32, 0.7, 0.05
    loss = ADCLRLoss(K, lambda_query=lam)
    loss.query_center.normal_()
    center = loss.query_center.clone()
    student_cls, teacher_cls = torch.randn(4 * B, K), torch.randn(2 * B, K)
    student_q, teacher_q = torch.randn(2 * B, Q, K), torch.randn(2 * B, Q, K)
    total, global_part, query_part = loss(student_cls, teacher_cls, temp, student_q, teacher_q)

    def H(t, s):  # cross-entropy of the centred, sharpened teacher and the student, per sample
        return -(F.softmax((t - center[0]) / temp, -1) * F.log_softmax(s / 0.1, -1)).sum(-1)

    expected = 0.0
    for b in range(B):
        for i in range(Q):  # teacher(B, q_i) vs student(A, q_i), and the other direction
            expected += H(teacher_q[B + b, i], student_q[b, i]) + H(teacher_q[b, i], student_q[B + b, i])
    expected = expected / (2 * B * Q)
    torch.testing.assert_close(query_part, expected)
    torch.testing.assert_close(total, global_part + lam * expected)
    # Its own centre, updated from the teacher's query outputs.
    torch.testing.assert_close(loss.query_center, 0.9 * center + 0.1 * teacher_q.reshape(-1, K).mean(0))
    torch.testing.assert_close(loss.center, 0.1 * teacher_cls.mean(0, keepdim=True))
