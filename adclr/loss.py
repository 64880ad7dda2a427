"""ADCLR loss: DINO's multi-crop loss on CLS plus the query-token loss.

    loss = DINO(CLS) + lambda * 1/2 * [ 1/Q sum_i H(t(B, q_i), s(A, q_i)) + 1/Q sum_i H(t(A, q_i), s(B, q_i)) ]

where H(t, s) = -sum softmax((t - c) / T_t) * log_softmax(s / T_s), averaged over the
batch. The query outputs have their own centre, because their statistics (a small crop
read against a whole view) differ from the CLS token's. With lambda = 0 this is DINO.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from adclr_kernels.dino_loss import dino_head_loss, dino_pairing


def cross_entropy(teacher_probs, student_logits, student_temp):
    return torch.sum(-teacher_probs * F.log_softmax(student_logits / student_temp, dim=-1), dim=-1).mean()


class ADCLRLoss(nn.Module):
    """The centres and temperatures of the teacher-student losses. dense=True adds DenseCL's
    dense loss (`dense`), with a centre of its own."""

    def __init__(self, out_dim, lambda_query=0.5, student_temp=0.1, center_momentum=0.9, dense=False):
        super().__init__()
        self.lambda_query = lambda_query
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("query_center", torch.zeros(1, out_dim))
        if dense:
            self.register_buffer("dense_center", torch.zeros(1, out_dim))

    def forward(self, student_cls, teacher_cls, teacher_temp, student_query=None, teacher_query=None):
        """All logits view-major (rows [view 0 batch | view 1 batch | ...]).

        Args:
            student_cls: (n_crops * B, K): 2 global views, then the local crops.
            teacher_cls: (2 * B, K): the 2 global views.
            teacher_temp: the warm-up schedule's value this step: a float, or a 0-dim
                tensor on the device (what a compiled step passes: not a constant of its graph).
            student_query, teacher_query: (2 * B, Q, K) query logits for the 2 global
                views, or None for plain DINO.

        Returns:
            (total, loss_global, loss_query) as 0-dim tensors; loss_query is 0 without queries.
        Updates the centres (all-reduced across processes) from the teacher outputs.
        """
        student_cls, teacher_cls = student_cls.float(), teacher_cls.float()
        crops = student_cls.chunk(student_cls.shape[0] // (teacher_cls.shape[0] // 2))
        teacher = F.softmax((teacher_cls - self.center) / teacher_temp, dim=-1).chunk(2)
        loss_global, terms = 0.0, 0
        for t, probs in enumerate(teacher):
            for v, logits in enumerate(crops):
                if v != t:  # never compare a view with itself
                    loss_global = loss_global + cross_entropy(probs, logits, self.student_temp)
                    terms += 1
        loss_global = loss_global / terms

        loss_query = student_cls.new_zeros(())
        if student_query is not None:
            student_query, teacher_query = student_query.float(), teacher_query.float()
            t_a, t_b = F.softmax((teacher_query - self.query_center) / teacher_temp, dim=-1).chunk(2)
            s_a, s_b = student_query.chunk(2)
            # Teacher on view B teaches the student on view A, and the other way round.
            loss_query = 0.5 * (cross_entropy(t_b, s_a, self.student_temp)
                                + cross_entropy(t_a, s_b, self.student_temp))
        self.update_centers(teacher_cls, teacher_query)
        return loss_global + self.lambda_query * loss_query, loss_global, loss_query

    def fused(self, student_cls, teacher_cls, teacher_temp, weight, teacher_weight,
              student_query=None, teacher_query=None, gain=None, teacher_gain=None, backend="auto"):
        """`forward` from the head's bottleneck instead of its logits: same losses, same centres.

        The head's last layer runs inside the loss (`adclr_kernels.dino_head_loss`), so
        the (rows, out_dim) logits, softmaxes and their gradients never exist.

        Args:
            student_cls, teacher_cls, student_query, teacher_query: as in `forward`, but
                the L2-normalised bottleneck features (`DINOHead(x, project=False)`).
            weight, teacher_weight: the student's and teacher's `head.last_layer.weight`;
                gain, teacher_gain: their weight-norm gains, None for 1.
            backend: "auto", "triton" or "torch" (see `dino_head_loss`).
        """
        options = dict(student_temp=self.student_temp, teacher_temp=teacher_temp,
                       teacher_weight=teacher_weight, gain=gain, teacher_gain=teacher_gain,
                       backend=backend)
        num_crops = student_cls.shape[0] // (teacher_cls.shape[0] // 2)
        loss_global, cls_mean = dino_head_loss(student_cls, teacher_cls, weight, self.center,
                                               dino_pairing(num_crops), **options)
        loss_query = loss_global.new_zeros(())
        if student_query is not None:
            # Rows (view, batch, query): the pairs of ADCLR's query loss are DINO's with 2 views.
            loss_query, query_mean = dino_head_loss(student_query.flatten(0, 1), teacher_query.flatten(0, 1),
                                                    weight, self.query_center, dino_pairing(2), **options)
        with torch.no_grad():
            self._ema(self.center, cls_mean * teacher_cls.shape[0], teacher_cls.shape[0])
            if student_query is not None:
                rows = teacher_query.shape[0] * teacher_query.shape[1]
                self._ema(self.query_center, query_mean * rows, rows)
        return loss_global + self.lambda_query * loss_query, loss_global, loss_query

    def dense(self, student, targets, teacher_temp, weight, teacher_weight, gain=None, teacher_gain=None):
        """DenseCL's dense loss in DINO's form, on the fused head + loss op.

        student: (2B, N, d) the dense head's bottleneck features of the patches of views A
        then B; targets: (2B, N, d) the teacher's dense features of the patch of the other
        view each student patch is matched to (`adclr.methods.match_patches`). The loss is
        the mean over both views' patches of H(teacher target, student patch) over the
        out_dim prototypes, whose (rows, out_dim) logits are never formed. Updates the
        dense centre from the targets.
        """
        half = student.shape[0] // 2
        # dino_pairing(2) pairs teacher view 0 with student view 1: view B's targets first.
        teacher = targets.roll(half, 0).flatten(0, 1)
        loss, teacher_mean = dino_head_loss(student.flatten(0, 1), teacher, weight, self.dense_center,
                                            dino_pairing(2), student_temp=self.student_temp,
                                            teacher_temp=teacher_temp, teacher_weight=teacher_weight, gain=gain,
                                            teacher_gain=teacher_gain)
        with torch.no_grad():
            self._ema(self.dense_center, teacher_mean * teacher.shape[0], teacher.shape[0])
        return loss

    @torch.no_grad()
    def update_centers(self, teacher_cls, teacher_query=None):
        self._ema(self.center, teacher_cls.float().sum(0), teacher_cls.shape[0])
        if teacher_query is not None:
            rows = teacher_query.float().reshape(-1, teacher_query.shape[-1])
            self._ema(self.query_center, rows.sum(0), rows.shape[0])

    def _ema(self, center, total, count):
        """center <- momentum * center + (1 - momentum) * total / count, over every process."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)  # every replica must keep the same centre
            count *= dist.get_world_size()
        center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)
