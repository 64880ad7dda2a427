"""The two neighbours ADCLR's paper argues against, on the same trainer and kernels
(docs/methods.md says what matches each paper and what differs):

- densecl: DINO's CLS loss plus a dense loss over the patches of the two global views,
  each student patch matched to the patch of the other view whose backbone feature is
  most similar; L = (1 - lambda_dense) L_global + lambda_dense L_dense.
- ccmim: one view; the patches to mask drawn by the teacher's last-block CLS attention
  (the op's prefix-row probabilities), without replacement; a light decoder rebuilds
  their normalised pixels from the visible ones, and the CLS tokens of the visible and
  masked sets are aligned; L = L_reconstruction + lambda_align L_align.

Each `*_losses(trainer, batch, teacher_temp)` returns (loss, {name: term}) like the
ADCLR step's `_losses`, and is called inside `train_step`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cls_loss(trainer, student_cls, teacher_cls, teacher_temp):
    """DINO's CLS loss over the views, fused with the head's last layer when the trainer is."""
    t = trainer
    if not t.fused_head_loss:
        return t.loss(student_cls, teacher_cls, teacher_temp)[1]
    last, teacher_last = t.student_module.head.last_layer, t.teacher.head.last_layer
    return t.loss.fused(student_cls, teacher_cls, teacher_temp, last.weight, teacher_last.weight,
                        gain=last.gain, teacher_gain=teacher_last.gain)[1]


# --------------------------------------------------------------------------- DenseCL

def match_patches(student_patch, teacher_patch):
    """DenseCL's correspondence. student_patch, teacher_patch: (2B, N, D) backbone patch
    features of views A then B. For each student patch, the index of the patch of the
    other view whose teacher feature has the highest cosine similarity: (2B, N)."""
    other = teacher_patch.roll(teacher_patch.shape[0] // 2, 0)  # view B beside view A, and back
    similarity = F.normalize(student_patch.float(), dim=-1) @ F.normalize(other.float(), dim=-1).transpose(1, 2)
    return similarity.argmax(-1)


def densecl_losses(trainer, batch, teacher_temp):
    t, cfg = trainer, trainer.cfg
    globals_, local = batch["globals"], batch["locals"]
    fused = t.fused_head_loss
    with t.autocast:
        with torch.no_grad():
            teacher_cls, _, (teacher_patch, teacher_dense) = t.teacher(globals_, project=not fused)
        student_cls, _, (student_patch, student_dense) = t.student(globals_, None, local, project=not fused)
        loss_global = cls_loss(t, student_cls, teacher_cls, teacher_temp)
        with torch.no_grad():
            index = match_patches(student_patch, teacher_patch)
            other = teacher_dense.roll(teacher_dense.shape[0] // 2, 0)
            targets = other.gather(1, index[..., None].expand(-1, -1, other.shape[-1]))
        last, teacher_last = t.student_module.dense_head.last_layer, t.teacher.dense_head.last_layer
        loss_dense = t.loss.dense(student_dense, targets, teacher_temp, last.weight, teacher_last.weight,
                                  gain=last.gain, teacher_gain=teacher_last.gain)
    loss = (1 - cfg.lambda_dense) * loss_global + cfg.lambda_dense * loss_dense
    return loss, {"loss_global": loss_global, "loss_dense": loss_dense}


# --------------------------------------------------------------------------- ccMIM

def importance_masks(weights, mask_ratio):
    """(visible, masked) patch indices, (B, N - m) and (B, m), m = round(mask_ratio * N):
    the masked patches drawn without replacement with probability proportional to
    `weights` (B, N) (the CLS attention), each set in ascending patch order."""
    num = weights.shape[1]
    hidden = round(mask_ratio * num)
    drawn = torch.multinomial(weights.float(), hidden, replacement=False)
    chosen = torch.zeros(weights.shape, dtype=torch.uint8, device=weights.device).scatter_(1, drawn, 1)
    order = torch.argsort(chosen, dim=1, stable=True)  # unchosen first, each set in index order
    return order[:, :num - hidden], order[:, num - hidden:]


def patchify(images, patch_size):
    """(B, 3, H, W) -> (B, N, p * p * 3), patches in row-major order (the tokens' order)."""
    p = patch_size
    patches = images.unfold(2, p, p).unfold(3, p, p)  # (B, 3, h, w, p, p)
    return patches.permute(0, 2, 3, 4, 5, 1).reshape(images.shape[0], -1, p * p * 3)


def reconstruction_loss(pixels, images, masked, patch_size):
    """MAE's loss with normalised pixels: the mean squared error over the masked patches,
    each target patch normalised by its own mean and variance."""
    target = patchify(images.float(), patch_size)
    target = target.gather(1, masked[..., None].expand(-1, -1, target.shape[-1]))
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6).sqrt()
    return (pixels.float() - target).square().mean()


def ccmim_losses(trainer, batch, teacher_temp):
    t, cfg = trainer, trainer.cfg
    images = batch["globals"][: batch["globals"].shape[0] // 2]  # view A alone: ccMIM has one view
    fused = t.fused_head_loss
    with t.autocast:
        with torch.no_grad():
            attention = t.teacher.backbone.forward_features(images, cls_attention=True)["cls_attention"]
            visible, masked = importance_masks(attention[:, :, 1:].float().mean(1), cfg.mask_ratio)
            teacher_cls, _ = t.teacher.forward_masked(images, visible, masked, project=not fused, decode=False)
        student_cls, pixels = t.student(images, project=not fused, masks=(visible, masked))
        loss_align = cls_loss(t, student_cls, teacher_cls, teacher_temp)
    loss_reconstruction = reconstruction_loss(pixels, images, masked, cfg.patch_size)
    loss = loss_reconstruction + cfg.lambda_align * loss_align
    return loss, {"loss_reconstruction": loss_reconstruction, "loss_align": loss_align}
