"""The DINO head's last layer + ADCLR loss, unfused and fused: shapes, runs, memory.

    python -m bench.head_loss                 # static model + CPU measurement, ViT-S/16 b128
    python -m bench.head_loss --images 16     # the same at a smaller batch

Both paths start from the head's L2-normalised bottleneck features (the MLP runs in
PyTorch either way) and end with the gradients of the student features and of the
last layer's weight:

- unfused: `F.linear` to the (rows, out_dim) logits, then `ADCLRLoss.forward`, as the
  trainer does with `--fused-head-loss off`;
- fused: `ADCLRLoss.fused` (`adclr_kernels.dino_head_loss`), backend "triton" or
  "torch" (the chunked PyTorch path).

`static_peak_bytes` is the memory model: the buffers of each path that are alive at its
peak, from the shapes alone. The CLI prints it beside the peak the torch profiler
records on CPU (float32, no autocast) for the same shapes.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adclr.loss import ADCLRLoss

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


@dataclass(frozen=True)
class HeadLossWorkload:
    """One GPU's share of a DINO/ADCLR step, as rows of the head's last layer."""
    name: str
    images: int        # per GPU
    local_crops: int
    num_queries: int   # per global view
    out_dim: int
    dim: int           # bottleneck

    @property
    def id(self) -> str:
        return f"{self.name}-b{self.images}"

    @property
    def student_cls_rows(self) -> int:
        return (2 + self.local_crops) * self.images

    @property
    def query_rows(self) -> int:  # per side (student or teacher): 2 views x images x Q
        return 2 * self.images * self.num_queries

    @property
    def student_rows(self) -> int:
        return self.student_cls_rows + self.query_rows

    @property
    def teacher_rows(self) -> int:
        return 2 * self.images + self.query_rows

    def describe(self) -> str:
        return (f"{self.name} head+loss ({self.images} images: 2 global + {self.local_crops} local "
                f"crops, Q={self.num_queries}; {self.student_rows} student / {self.teacher_rows} "
                f"teacher rows, out_dim={self.out_dim}, bottleneck={self.dim})")

    def shape(self) -> dict:
        return dict(images=self.images, local_crops=self.local_crops, num_queries=self.num_queries,
                    out_dim=self.out_dim, dim=self.dim, student_rows=self.student_rows,
                    teacher_rows=self.teacher_rows)


def vit_s16(images=128):
    """DINO/ADCLR ViT-S/16: 2 x 224 + 10 x 96 px crops, 10 queries, 65536 x 256 head."""
    return HeadLossWorkload("ViT-S/16", images, 10, 10, 65536, 256)


def make_inputs(w: HeadLossWorkload, device, seed=0):
    """Bottleneck features (normalised, float32), both last-layer weights, the loss module."""
    g = torch.Generator().manual_seed(seed)

    def features(*shape):
        return F.normalize(torch.randn(*shape, w.dim, generator=g), dim=-1).to(device)

    weight = (torch.randn(w.out_dim, w.dim, generator=g) * 0.02).to(device)
    loss = ADCLRLoss(w.out_dim, lambda_query=0.5, student_temp=STUDENT_TEMP).to(device)
    return dict(student_cls=features(w.student_cls_rows), teacher_cls=features(2 * w.images),
                student_query=features(2 * w.images, w.num_queries),
                teacher_query=features(2 * w.images, w.num_queries),
                weight=weight.requires_grad_(), teacher_weight=weight.detach().clone(), loss=loss)


def unfused_step(inputs):
    """Logits, ADCLRLoss.forward, gradients of the features and weight (trainer, fused off)."""
    student_cls = inputs["student_cls"].detach().requires_grad_()
    student_query = inputs["student_query"].detach().requires_grad_()
    w = F.normalize(inputs["weight"], dim=-1)
    with torch.no_grad():
        w_t = F.normalize(inputs["teacher_weight"], dim=-1)
        teacher_cls, teacher_query = F.linear(inputs["teacher_cls"], w_t), F.linear(inputs["teacher_query"], w_t)
    # One head call for CLS and query rows, as ADCLRModel does.
    logits = F.linear(torch.cat([student_cls, student_query.flatten(0, 1)]), w)
    cls, query = logits[:student_cls.shape[0]], logits[student_cls.shape[0]:].view(*student_query.shape[:2], -1)
    loss, _, _ = inputs["loss"](cls, teacher_cls, TEACHER_TEMP, query, teacher_query)
    return torch.autograd.grad(loss, (student_cls, student_query, inputs["weight"]))


def fused_step(inputs, backend):
    """ADCLRLoss.fused on the same features (trainer, fused on)."""
    student_cls = inputs["student_cls"].detach().requires_grad_()
    student_query = inputs["student_query"].detach().requires_grad_()
    loss, _, _ = inputs["loss"].fused(student_cls, inputs["teacher_cls"], TEACHER_TEMP, inputs["weight"],
                                      inputs["teacher_weight"], student_query, inputs["teacher_query"],
                                      backend=backend)
    return torch.autograd.grad(loss, (student_cls, student_query, inputs["weight"]))


def static_peak_bytes(w: HeadLossWorkload, path: str, logits_bytes: int, chunk_rows=256, sms=132):
    """Peak bytes above the inputs, from the shapes: the buffers alive at each path's peak.

    logits_bytes: 2 under bf16 autocast (CUDA: bf16 logits and weights for the matmuls),
    4 in float32 (CPU). Returns (bytes, {buffer: bytes}).

    Unfused, the peak is at the last product of ADCLRLoss.forward: autograd keeps, for
    every (teacher view, student view) pair, the negated teacher probabilities and the
    student log-softmax that `cross_entropy` multiplies, besides the logits themselves.
    Fused, no buffer is K wide per row, and the larger of two moments is the peak:
    the backward of the weight normalisation (seven (K, D) float32 tensors: the
    gradient of the normalised weight, the four temporaries of the division's backward,
    the weight gradient itself, one normalised weight still held), or the forward of
    the second (query) call (the normalised student and teacher weights of both calls,
    and the (rows, D) vectors; the torch backend adds one chunk of rows at full width,
    Triton the column-split partials of a row sweep: splits are chosen for about two
    programs of 64 rows per SM, so about 2 * sms * 64 rows of D floats; sms = 132 on
    an H100).
    """
    K, D, B, Q = w.out_dim, w.dim, w.images, w.num_queries
    f32, row = 4, w.out_dim * 4  # row: one float32 K-wide row
    weight = K * D * f32
    if path == "unfused":
        cls_pairs = 2 * (2 + w.local_crops - 1)
        parts = {"normalised weights (student, teacher)": 2 * weight}
        if logits_bytes == 2:
            parts["their bf16 copies for F.linear"] = 2 * K * D * 2
        parts["student logits"] = w.student_rows * K * logits_bytes
        parts["teacher logits"] = w.teacher_rows * K * logits_bytes
        if logits_bytes == 2:
            parts["float32 copies of the logits (ADCLRLoss)"] = (w.student_rows + w.teacher_rows) * row
        parts["teacher probabilities"] = w.teacher_rows * row
        parts["per pair: -probabilities and log-softmax kept for backward"] = 2 * (cls_pairs * B + 2 * B * Q) * row
        parts["product of the last pair"] = B * Q * row
    elif path in ("fused-triton", "fused-torch"):
        rows = w.student_rows + w.teacher_rows
        vectors = rows * (f32 + 3 * D * f32)  # lse; u or q, z, the feature gradient
        backward = {"(K, D) float32 tensors of the weight-norm backward": 7 * weight,
                    "(rows, D) feature gradients": w.student_rows * D * f32}
        forward = {"normalised weights of both calls": 4 * weight + (4 * K * D * 2 if logits_bytes == 2 else 0),
                   "per-row lse and D-vectors": vectors}
        if path == "fused-torch":
            forward["one chunk of rows at full width (logits, probabilities)"] = 2 * chunk_rows * row
        else:
            forward["column-split partials"] = 2 * sms * 64 * D * f32
        parts = max(backward, forward, key=lambda p: sum(p.values()))
    else:
        raise ValueError(f"unknown path {path!r}")
    return sum(parts.values()), parts


def measure_cpu(w: HeadLossWorkload, path: str):
    """(peak bytes recorded by the torch profiler on CPU, seconds) for one step of path."""
    from bench.timing import peak_memory_bytes

    inputs = make_inputs(w, "cpu")
    fn = (lambda: unfused_step(inputs)) if path == "unfused" else (lambda: fused_step(inputs, path.split("-")[1]))
    start = time.perf_counter()
    peak = peak_memory_bytes(fn)
    return peak, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128, help="images per GPU (default 128)")
    parser.add_argument("--no-measure", action="store_true", help="print the static model only")
    args = parser.parse_args(argv)
    w = vit_s16(args.images)
    print(w.describe())
    mib = 2 ** 20
    print("\nstatic model, peak bytes above the inputs:")
    for logits_bytes, where in ((2, "CUDA, bf16 autocast"), (4, "CPU, float32")):
        unfused = static_peak_bytes(w, "unfused", logits_bytes)[0]
        for path in ("unfused", "fused-triton", "fused-torch"):
            total, parts = static_peak_bytes(w, path, logits_bytes)
            detail = ", ".join(f"{k} {v / mib:.0f}" for k, v in parts.items())
            ratio = "" if path == "unfused" else f" ({_compared(unfused, total)} than unfused)"
            print(f"  {where:20s} {path:13s} {total / mib:6.0f} MiB{ratio}  [{detail}]")
    if args.no_measure:
        return
    torch.set_num_threads(torch.get_num_threads())
    print(f"\nmeasured on CPU (float32, torch profiler allocation records, {torch.get_num_threads()} threads):")
    results = {}
    for path in ("unfused", "fused-torch"):
        results[path], seconds = measure_cpu(w, path)
        print(f"  {path:13s} {results[path] / mib:9.0f} MiB peak  ({seconds:.1f} s with the profiler; "
              f"model: {static_peak_bytes(w, path, 4)[0] / mib:.0f} MiB)")
    print(f"  fused-torch uses {_compared(results['unfused'], results['fused-torch'])} than unfused")


def _compared(unfused, fused):
    # At a few images the fused path's fixed buffers can outweigh the logits it saves.
    return f"{unfused / fused:.1f}x less" if fused <= unfused else f"{fused / unfused:.1f}x more"


if __name__ == "__main__":
    main()
