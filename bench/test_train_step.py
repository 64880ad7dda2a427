"""One whole ADCLR training step, in images/s, for each attention backend.

The step is `adclr.train.train_step`: student and teacher forward, loss, backward,
grad clipping, AdamW, EMA of the teacher and the centres, on a synthetic batch that is
already on the device (`adclr.data.synthetic_batch`), so data loading is not timed.
On CUDA it is ViT-S/16 with full multi-crop under bf16 autocast; on CPU a tiny model,
eager only. Each result also records the step's model FLOPs, TFLOP/s and, on a GPU
with a known peak, MFU (`adclr.flops`).
"""

import dataclasses

import pytest

from bench.timing import DEVICE, ON_CUDA
from bench.workloads import OP_BACKENDS, skip_reason

try:
    from adclr.data import synthetic_batch
    from adclr.config import Config
    from adclr.flops import mfu, peak_tflops, step_flops
    from adclr.train import build, train_step, whole_step_error
except ImportError as error:  # the trainer is optional for the op benchmarks
    pytest.skip(f"the trainer API (adclr.train.build/train_step, adclr.data.synthetic_batch) "
                f"is not importable: {error}", allow_module_level=True)

if ON_CUDA:
    # DINO/ADCLR ViT-S/16 recipe, one GPU's share: 2 x 224 px globals with Q = 10 query
    # crops, 10 x 96 px locals, 65536 prototypes.
    NAME, IMAGES = "vit_s16_multicrop", 128
    CONFIG = dict(arch="vit_small", patch_size=16, image_size=224, local_size=96,
                  num_local_crops=10, num_queries=10, out_dim=65536)
    ROUNDS = (3, 20)
else:
    # Small enough for a 2-core laptop: the harness and the backends, not the speed story.
    NAME, IMAGES = "vit_test_multicrop", 4
    CONFIG = dict(arch="vit_test", patch_size=16, image_size=64, local_size=32,
                  num_local_crops=4, num_queries=10, out_dim=1024)
    ROUNDS = (1, 5)

# Past the warm-ups and the last-layer freeze, so every parameter is updated.
STEADY_STEP = 10_000


def _label(cfg):
    return (f"{cfg.arch}/{cfg.patch_size} step ({IMAGES} images: 2x{cfg.image_size} px "
            f"+ {cfg.num_local_crops}x{cfg.local_size} px, Q={cfg.num_queries}, "
            f"out_dim={cfg.out_dim})")


# Every backend runs the per-resolution path (one backbone pass per crop size), eagerly:
# the like-for-like comparison; the backends with a real varlen kernel also run packed
# (every crop in one pass), reported as "<backend>+packed" in the same group. The packed
# Triton step (the CUDA default) also runs under each --compile: "+compile-on" (student
# and teacher), "+compile-step" (the whole step, one graph), "+compile-graph" (that,
# replayed as a CUDA graph).
STEPS = ([(b, "off", "off") for b in OP_BACKENDS] + [("triton", "on", "off"), ("flex", "on", "off")]
         + [("triton", "on", mode) for mode in ("on", "step", "graph")])
COMPILED = {"off": "", "on": "+compile-on", "step": "+compile-step", "graph": "+compile-graph"}


def _name(attention, pack_crops, compile):
    return attention + ("+packed" if pack_crops == "on" else "") + COMPILED[compile]


@pytest.mark.parametrize("attention,pack_crops,compile", STEPS, ids=[_name(*s) for s in STEPS])
def test_train_step(measure, benchmark, attention, pack_crops, compile):
    reason = skip_reason(attention, DEVICE, "forward+backward")
    if reason:
        pytest.skip(reason)
    if compile != "off" and not ON_CUDA:
        pytest.skip("compiled steps are timed on CUDA only (on CPU inductor builds C++ for a step "
                    "whose figures would say nothing of the GPU's)")
    cfg = Config(**CONFIG, batch_size=IMAGES, attention=attention, pack_crops=pack_crops,
                 compile=compile, device=DEVICE.type)
    reason = whole_step_error(cfg, DEVICE, distributed=False)
    if reason:  # torch < 2.11: no whole-step graph
        pytest.skip(reason)
    trainer = build(cfg, DEVICE)
    batch = synthetic_batch(cfg, IMAGES, DEVICE)

    measure(lambda: train_step(trainer, batch, STEADY_STEP), mode="train step",
            group=f"train step | {NAME}-{IMAGES}", backend=_name(attention, pack_crops, compile), items=IMAGES,
            rounds=ROUNDS, calls=1, train_config=NAME, workload_label=_label(cfg),
            config=dataclasses.asdict(cfg),
            autocast="bf16" if ON_CUDA else "none (fp32)")
    if benchmark.stats is not None:  # the step's model FLOPs (adclr.flops) and MFU, as the trainer logs them
        seconds, flops = benchmark.stats.stats.median, step_flops(cfg)[0]
        peak = peak_tflops() if ON_CUDA else None
        benchmark.extra_info.update(step_flops=flops, step_tflops=flops / seconds / 1e12,
                                    **({"mfu": mfu(seconds, flops, peak), "peak_tflops": peak} if peak else {}))
