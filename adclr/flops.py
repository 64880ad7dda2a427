"""FLOPs of one training step (ADCLR, and the DenseCL and ccMIM steps), counted once from
the Config, and MFU.

What is counted (model FLOPs, the convention of MFU as PaLM and nanoGPT report it):
every matrix product at 2 FLOPs per multiply-add, forward and backward, as the model
defines it:

- student, forward and backward, over every crop: 2 global crops with the query
  tokens, the local crops without;
- teacher, forward only, over the 2 global crops with the query tokens;
- in each: the patch embedding (a convolution; its backward needs only the weight
  gradient, the images take none), the blocks' linear layers (qkv, proj, fc1, fc2), the
  attention's two products (scores and probabilities times values) over exactly the
  (row, key) pairs each row sees under the unidirectional mask, and the DINO head (its
  MLP, then the last layer over out_dim) on every CLS and query token;
- the loss, an estimate of its elementwise work over the (rows, out_dim) logits
  (LOSS_FLOPS_PER_LOGIT); under 0.1 % of the step at ViT-S/16 shapes.

DenseCL's step adds the dense head on every patch of the two global views (its last
layer inside the dense loss) and the patch matching's similarities; ccMIM's runs one
view through the teacher whole, then its visible and masked sets through teacher and
student, and the student's decoder; both without query tokens.

The positional embedding's resize for the local crops is a product too (a resampling
matrix, once per backbone forward of the crops, whatever the batch) and is counted:
3e-7 of the step at ViT-S/16 with 256 images.

What is not counted: LayerNorm, GELU, softmax inside the attention, residual adds,
stochastic depth, the head's weight normalisation, gradient clipping, AdamW and the
teacher's EMA: elementwise work that is small next to the products and runs at memory
speed, not at the matmul peak. A backward
counts twice its forward's products (input and weight gradients); a kernel that
recomputes (FlashAttention's backward, the fused head loss's sweeps, which do about
1.8x the last layer's products) does more hardware FLOPs than counted here, so MFU is
the useful fraction of the peak, not the busy fraction.
"""

from __future__ import annotations

import dataclasses
import re

from .model import ARCHS

MLP_RATIO = 4  # the blocks `build_backbone` makes
NUM_PREFIX = 1  # the CLS token

# Elementwise work of the loss per logit: a (log-)softmax over a row (temperature,
# shift, exp, sum, normalise) ~5 per element, and a cross-entropy between a teacher
# row and a student row ~2 per element (product, sum). The backward does the student's
# softmax and pair terms again; the teacher takes no gradient.
SOFTMAX_FLOPS_PER_LOGIT = 5
PAIR_FLOPS_PER_LOGIT = 2


def attention_pairs(num_patches, num_queries, *, query_sees_prefix=False, query_sees_self=False,
                    query_sees_queries=False):
    """(row, key) pairs one sequence's attention computes under the unidirectional mask.

    CLS and patch rows see the 1 + N visible tokens; each query row sees the N patches,
    the CLS with query_sees_prefix, and every query (query_sees_queries) or itself
    (query_sees_self).
    """
    visible = NUM_PREFIX + num_patches
    if not num_queries:
        return visible * visible
    keys = num_patches + (NUM_PREFIX if query_sees_prefix else 0)
    keys += num_queries if query_sees_queries else 1 if query_sees_self else 0
    return visible * visible + num_queries * keys


def _backbone_forward(cfg, num_seqs, image_size, num_queries, kept=None):
    """Forward FLOPs of the backbone on num_seqs crops of image_size with num_queries each;
    kept: the patches that enter the blocks (a masked image model's set; all by default),
    while the patch embedding always runs over every patch."""
    dim, depth, _ = ARCHS[cfg.arch]
    patches = (image_size // cfg.patch_size) ** 2
    kept = patches if kept is None else kept
    tokens = NUM_PREFIX + kept + num_queries
    pairs = attention_pairs(kept, num_queries, query_sees_prefix=cfg.query_sees_prefix,
                            query_sees_self=cfg.query_sees_self,
                            query_sees_queries=cfg.query_sees_queries)
    terms = {
        "patch_embed": num_seqs * (patches + num_queries) * 2 * 3 * cfg.patch_size ** 2 * dim,
        "linear": num_seqs * tokens * _block_linear(dim) * depth,
        "attention": num_seqs * pairs * 2 * 2 * dim * depth,  # q k^T and p v, all heads
    }
    if image_size != cfg.image_size:  # the positional embedding resized, once per forward
        terms["pos_embed"] = 2 * patches * (cfg.image_size // cfg.patch_size) ** 2 * dim
    return terms


def _block_linear(dim):
    """Linear-layer FLOPs per token of one block: qkv, proj, fc1, fc2."""
    return (2 * 3 * dim + 2 * dim + 2 * 2 * MLP_RATIO * dim) * dim


def _head_forward(cfg, rows, prefix="head"):
    """The DINO head's MLP and last layer on `rows` tokens (a dense head: prefix "dense")."""
    dim = ARCHS[cfg.arch][0]
    hidden, bottleneck = cfg.head_hidden_dim, cfg.head_bottleneck_dim
    return {f"{prefix}_mlp": rows * 2 * (dim * hidden + hidden * hidden + hidden * bottleneck),
            f"{prefix}_last_layer": rows * 2 * bottleneck * cfg.out_dim}


def _add(*terms):
    total = {}
    for term in terms:
        for k, v in term.items():
            total[k] = total.get(k, 0) + v
    return total


def _loss_flops(cfg, teacher_rows, student_rows, pair_rows):
    """The loss's elementwise work: softmaxes over every row, the cross-entropy terms over
    every (teacher row, student row) pair, forward and the student's backward."""
    forward = SOFTMAX_FLOPS_PER_LOGIT * (teacher_rows + student_rows) + PAIR_FLOPS_PER_LOGIT * pair_rows
    backward = SOFTMAX_FLOPS_PER_LOGIT * student_rows + PAIR_FLOPS_PER_LOGIT * pair_rows
    return (forward + backward) * cfg.out_dim


def _adclr_terms(cfg, B):
    """(teacher forward, student forward, loss, extra): ADCLR's step, DINO's with lambda_query 0."""
    Q = cfg.num_queries if cfg.lambda_query else 0
    L = cfg.num_local_crops
    teacher = _backbone_forward(cfg, 2 * B, cfg.image_size, Q)
    student = _add(teacher, _backbone_forward(cfg, L * B, cfg.local_size, 0)) if L else dict(teacher)
    teacher_rows, student_rows = 2 * B * (1 + Q), (2 + L) * B + 2 * B * Q
    teacher.update(_head_forward(cfg, teacher_rows))
    student.update(_head_forward(cfg, student_rows))
    # Pairs of (teacher row, student row): every teacher view against every other crop,
    # and the query loss's view A against view B and back.
    pair_rows = 2 * (2 + L - 1) * B + 2 * B * Q
    return teacher, student, _loss_flops(cfg, teacher_rows, student_rows, pair_rows), {}


def _densecl_terms(cfg, B):
    """DINO's CLS step, plus the dense head on every patch of the two global views (its last
    layer inside the dense loss) and the patch matching, which takes no gradient."""
    teacher, student, loss, _ = _adclr_terms(dataclasses.replace(cfg, lambda_query=0.0), B)
    dim = ARCHS[cfg.arch][0]
    rows = 2 * B * (cfg.image_size // cfg.patch_size) ** 2
    teacher.update(_head_forward(cfg, rows, "dense"))
    student.update(_head_forward(cfg, rows, "dense"))
    patches = rows // (2 * B)
    match = 2 * B * patches * patches * 2 * dim  # cosine similarities of every patch pair across the views
    return teacher, student, loss + _loss_flops(cfg, rows, rows, rows), {"dense_match": match}


def _ccmim_terms(cfg, B):
    """One view: the teacher's full pass (for its CLS attention), then the visible and the
    masked sets each through teacher and student, the head on both CLS tokens, and the
    student's decoder (one block of half the width over every patch position)."""
    patches = (cfg.image_size // cfg.patch_size) ** 2
    hidden = round(cfg.mask_ratio * patches)
    sets = _add(_backbone_forward(cfg, B, cfg.image_size, 0, kept=patches - hidden),
                _backbone_forward(cfg, B, cfg.image_size, 0, kept=hidden))
    teacher = _add(_backbone_forward(cfg, B, cfg.image_size, 0), sets, _head_forward(cfg, 2 * B))
    student = _add(sets, _head_forward(cfg, 2 * B))
    dim = ARCHS[cfg.arch][0]
    teacher["attention"] += B * (NUM_PREFIX + patches) * 2 * dim  # the CLS row's scores again, for its probabilities
    width = max(32, dim // 2)  # MaskedDecoder's
    student["decoder_linear"] = B * ((patches - hidden) * 2 * dim * width  # its input projection
                                     + patches * _block_linear(width)
                                     + patches * 2 * width * 3 * cfg.patch_size ** 2)  # pixels of every position
    student["decoder_attention"] = B * patches * patches * 2 * 2 * width
    # The alignment loss pairs the visible set's CLS with the masked set's and back; the
    # reconstruction loss is elementwise over the masked pixels, not counted.
    return teacher, student, _loss_flops(cfg, 2 * B, 2 * B, 2 * B), {}


METHOD_TERMS = {"adclr": _adclr_terms, "densecl": _densecl_terms, "ccmim": _ccmim_terms}


def step_flops(cfg, batch_size=None):
    """FLOPs of one `train_step` of `cfg`: (total, breakdown).

    batch_size: images per step, cfg.batch_size by default (the whole batch; under
    DistributedDataParallel pass the per-process share for a per-device count).
    breakdown: "student/..." and "teacher/..." terms (patch_embed, linear, attention,
    head_mlp, head_last_layer, and pos_embed for crops resized; DenseCL adds dense_mlp, dense_last_layer and a
    "dense_match"; ccMIM's student adds decoder_linear, decoder_attention) and "loss", in
    FLOPs (ints); they sum to the total. Queries take part when the step uses them
    (num_queries > 0 and lambda_query > 0), as `train_step` decides.
    """
    B = cfg.batch_size if batch_size is None else batch_size
    teacher, student, loss, extra = METHOD_TERMS[cfg.method](cfg, B)
    breakdown = {f"teacher/{k}": v for k, v in teacher.items()}
    for k, v in student.items():
        # The images take no gradient: the patch embedding's backward is its weight gradient
        # only; the resize matrix takes none, so the resize's is the embedding's gradient only.
        breakdown[f"student/{k}"] = v * (2 if k in ("patch_embed", "pos_embed") else 3)
    breakdown.update(extra)
    breakdown["loss"] = loss
    return sum(breakdown.values()), breakdown


# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets
# (NVIDIA lists them with sparsity; dense is half). Searched in order against
# torch.cuda.get_device_name(): the first pattern that matches wins, so the PCIe
# and NVL forms come before the bare names. None: a form whose figure differs and is
# not in this table; pass the peak explicitly for it.
PEAK_BF16_TFLOPS = (
    (r"H100.*(PCIe|PCIE)", 756.5),
    (r"H[12]00.*NVL", None),
    (r"H100", 989.4),        # SXM5 ("NVIDIA H100 80GB HBM3")
    (r"H200", 989.4),        # SXM
    (r"A100", 312.0),        # SXM4 and PCIe
    (r"L40S", 362.05),
    (r"RTX 4090", 165.2),    # GeForce: fp32 accumulate
)


def peak_tflops(device_name=None):
    """Dense bf16 peak TFLOP/s of a device (default: the current CUDA device), or None."""
    if device_name is None:
        import torch

        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for pattern, peak in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return peak
    return None


def mfu(step_seconds, flops, peak):
    """Model FLOPs utilisation: the fraction of `peak` (TFLOP/s) that `flops` per step is."""
    return flops / step_seconds / (peak * 1e12)
