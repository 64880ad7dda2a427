"""Where a training step's time goes: one step (or a few) under torch.profiler, as shares.

    python -m bench.profile                      # CUDA: ViT-S/16 multi-crop; CPU: the tiny model
    python -m bench.profile --model tiny --device cpu
    python -m bench.profile --compile off --fused-head-loss off --steps 3 --json out.json

After warm-up the step is timed without the profiler (--time-steps back to back), which
gives the step's MFU from `adclr.flops`; then --steps steps run under the profiler and
their time is split into BUCKETS:

- on CUDA, device time: each kernel, memcpy and memset, and the idle gaps between them
  from the first step's start to the last kernel's end;
- on CPU, the step's wall time: each operator's self time, and as "idle / host" the
  time spent outside any computing operator (Python, dispatch, autograd bookkeeping,
  allocation, views). A compiled step's C++ kernels (Inductor's) are profiled as ranges
  of their own (its cpp.enable_kernel_profile), else their time would be the compiled
  graph's call, host time.

A piece of time is classified by the names around it: the kernel, the operator that
launched it, every operator and record_function range it ran inside, and for backward
work the forward operator whose gradient it computes (autograd's sequence numbers).
CONTEXT is tried first on all of those names, then KINDS on the kernel's or operator's
own name; the first pattern that matches wins. The ranges come from the step itself
(RANGES: `adclr.train.train_step` opens them around its phases, and the optimizer its own
"Optimizer.step#..."), and in eager mode this tool adds "adclr/head" around the DINO
heads with module hooks. Inside a compiled graph there are no ranges (Dynamo drops
them): with --compile on the models' time, and with --compile step or graph the whole
step's, is classified by kernel and operator names alone. A second table splits the
same time by range.

On a CPU shared with other work, OMP_NUM_THREADS=1 keeps the figures steady.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from adclr import Config, build, train_step
from adclr.train import whole_step_error
from adclr.data import synthetic_batch
from adclr.flops import mfu, peak_tflops, step_flops

BUCKETS = ("attention", "GEMMs", "norms + elementwise", "head + loss", "optimizer + EMA",
           "copies", "idle / host", "other")

# Tried on every name around a piece of time (see the module docstring).
CONTEXT = (
    # The optimizer's own range, per-parameter clipping and the teacher's EMA (foreach
    # ops; their CUDA kernels are multi_tensor_apply, Inductor's triton_for), fused AdamW.
    ("optimizer + EMA", r"^Optimizer\.|^adclr/(optimizer|clip|ema)$|_foreach_|multi_tensor_apply"
                        r"|triton_for_fused|[Ff]used_?[Aa]dam|^aten::lerp"),
    # Both heads (MLP and last layer), the loss and its centres, the fused head-loss op
    # and its two Triton kernels.
    ("head + loss", r"^adclr/(head|loss)$|dino_head_loss|_row_softmax_kernel|_weight_grad_kernel"),
    # Every backend's op, kernel or autograd node (Triton's _unidirectional_*_kernel, the
    # one-shot and one-pass kernels and _EagerAttention, SDPA's flash / memory-efficient /
    # cuDNN kernels, flex); bmm is the reference backend's batched products (nothing else
    # in the step is batched).
    ("attention", r"[Aa]ttention|attn|flash|fmha|unidirectional|_oneshot_|_onepass_|sdpa"
                  r"|^aten::b(add)?mm$"),
)
# Tried on the kernel's name, then on its operator's.
KINDS = (
    # A compiler's fused kernels (Inductor's Triton and C++ ones, named after the ops in
    # them) are elementwise and reduction work even when a copy is among those ops.
    ("norms + elementwise", r"^triton_(poi|red|per)_|^(graph_\d+_)?cpp_fused_"),
    ("copies", r"[Cc]opy|Memcpy|Memset|CatArray|FillFunctor|index_select|gather|scatter"
               r"|^aten::(cat|stack|repeat|index|clone|contiguous|fill_|zero_|zeros|ones|full"
               r"|new_zeros|ones_like|zeros_like|flip|constant_pad_nd|to|_to_copy"
               r"|(slice|select|index|narrow)_backward)$"),
    ("GEMMs", r"gemm|gemv|GEMM|cutlass|cublas|nvjet|xmma|wgmma|s16816|cudnn|fprop|dgrad|wgrad"
              r"|triton_tem_fused_.*mm|^aten::(mm|addmm|matmul|linear|conv2d|_?convolution(_backward)?"
              r"|mkldnn_convolution|cudnn_convolution.*)$"),
    # Host-only work (CPU only: no kernel is host time): Python, dispatch, autograd, views
    # and allocation.
    ("idle / host", r"^(aten::)?(empty.*|new_empty.*|resize_|as_strided_?|view|_unsafe_view|reshape"
                    r"|_reshape_alias|t|transpose|expand|expand_as|slice|select|unsqueeze|squeeze"
                    r"|permute|narrow|detach|alias|split|chunk|unbind|flatten|unfold|lift.*|resolve_.*"
                    r"|result_type|dropout|_local_scalar_dense|item|is_nonzero|set_)$|^autograd::"
                    r"|^torch::autograd::|Backward\d*$|^profile/|^adclr/|^Optimizer\."
                    r"|^CompiledFunction|^Torch-Compiled Region|^TorchDynamo|CompiledFxGraph"
                    r"|bytecode|AOTDispatcher"),
    ("norms + elementwise", r"norm|elementwise|reduce|[Rr]eduction|gelu|softmax|Functor"
                            r"|^aten::|^prims::"),
)

# The ranges the step opens (adclr.train.train_step): (range, phase in the second table).
RANGES = {"adclr/teacher": "teacher forward", "adclr/student": "student forward",
          "adclr/loss": "loss", "adclr/backward": "backward", "adclr/clip": "clip",
          "adclr/optimizer": "optimizer", "adclr/ema": "EMA"}
STEP_RANGE = "profile/step"
# Kineto's device activities that are work; not its ranges mirrored on the GPU
# (gpu_user_annotation) nor its synchronisation waits (cuda_sync), which would hide idle time.
DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


def classify(names, own, kernel=False):
    """The bucket of a piece of time: `names` all names around it, `own` its kernel's and
    operator's names (innermost first); kernel: device time, never host time."""
    for bucket, pattern in CONTEXT:
        if any(re.search(pattern, n) for n in names):
            return bucket
    for bucket, pattern in KINDS:
        if kernel and bucket == "idle / host":
            continue
        if any(re.search(pattern, n) for n in own):
            return bucket
    return "other"


def phase(ancestors):
    """The range a piece of time ran inside (not its forward's: a head's backward is backward)."""
    for name in ancestors:
        if name in RANGES:
            return RANGES[name]
        if name.startswith("Optimizer."):
            return "optimizer"
        if name.startswith("autograd::engine::"):
            return "backward"
    return "outside any range"


class Events:
    """The profiler's events with their ancestry, and backward work linked to its forward."""

    def __init__(self, events):
        self.cpu = [e for e in events if e.device_type == DeviceType.CPU]
        self.device = [e for e in events if e.device_type != DeviceType.CPU]
        self.by_id = {e.id: e for e in self.cpu if not getattr(e, "linked_correlation_id", 0)}
        self.forward = {}
        for e in self.cpu:
            if e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
                self.forward.setdefault((e.thread, e.sequence_nr), e)

    @staticmethod
    def ancestors(e):
        names = []
        while e is not None:
            names.append(e.name)
            e = e.cpu_parent
        return names

    def forward_of(self, e):
        """The forward operator whose backward `e` runs in, or None."""
        while e is not None:
            if e.name.startswith("autograd::engine::evaluate_function") and e.sequence_nr >= 0:
                return self.forward.get((e.fwd_thread, e.sequence_nr))
            e = e.cpu_parent
        return None

    def context(self, e):
        """(all names around op `e`, including its forward's, its own ancestors)."""
        own = self.ancestors(e)
        forward = self.forward_of(e)
        return own + (self.ancestors(forward) if forward is not None else []), own


def _add(table, bucket, name, us):
    entry = table[bucket]
    entry["us"] += us
    entry["names"][name] += us


def _empty_table():
    return defaultdict(lambda: {"us": 0.0, "names": defaultdict(float)})


def split_cpu(ev, steps):
    """Bucket and phase tables of CPU self time inside the step ranges."""
    kinds, phases = _empty_table(), _empty_table()
    for e in ev.cpu:
        if e.is_async or not any(n == STEP_RANGE for n in ev.ancestors(e)) or e.self_cpu_time_total <= 0:
            continue
        names, own = ev.context(e)
        bucket = "idle / host" if e.name == STEP_RANGE else classify(names, [e.name])
        _add(kinds, bucket, e.name, e.self_cpu_time_total)
        _add(phases, phase(own), e.name, e.self_cpu_time_total)
    return kinds, phases


def split_device(ev, steps):
    """Bucket and phase tables of device time from the first step's start to the last kernel."""
    annotations = {e.name for e in ev.cpu if getattr(e, "is_user_annotation", False)} | {STEP_RANGE}
    work = [e for e in ev.device if e.name not in annotations and e.time_range.elapsed_us() > 0
            and getattr(e, "activity_type", None) in (None, *DEVICE_WORK)]
    kinds, phases = _empty_table(), _empty_table()
    for k in work:
        op = ev.by_id.get(getattr(k, "linked_correlation_id", 0))
        names, own = ev.context(op) if op is not None else ([], [])
        bucket = classify([k.name] + names, [k.name] + ([op.name] if op is not None else []), kernel=True)
        _add(kinds, bucket, k.name, k.time_range.elapsed_us())
        _add(phases, phase(own), k.name, k.time_range.elapsed_us())
    start = min(s.time_range.start for s in steps)
    end = max([k.time_range.end for k in work] + [s.time_range.end for s in steps])
    busy, reach = 0.0, start
    for k in sorted(work, key=lambda k: k.time_range.start):  # union of the busy intervals
        lo, hi = max(k.time_range.start, reach), min(k.time_range.end, end)
        if hi > lo:
            busy += hi - lo
            reach = hi
    idle = max(0.0, end - start - busy)
    _add(kinds, "idle / host", "device idle", idle)
    _add(phases, "idle", "device idle", idle)
    return kinds, phases


def shares(table, top=3):
    total = sum(v["us"] for v in table.values()) or 1.0
    return {name: {"ms": v["us"] / 1e3, "share": 100 * v["us"] / total,
                   "top": [n for n, _ in sorted(v["names"].items(), key=lambda kv: -kv[1])[:top]]}
            for name, v in sorted(table.items(), key=lambda kv: -kv[1]["us"])}


# --------------------------------------------------------------------------- the step

MODELS = {
    # The DINO/ADCLR ViT-S/16 recipe on one GPU, and a model a 2-core CPU runs in a second.
    "vit_s16": dict(arch="vit_small", patch_size=16, image_size=224, local_size=96, num_local_crops=10,
                    num_queries=10, out_dim=65536, batch_size=128),
    "tiny": dict(arch="vit_test", patch_size=8, image_size=32, local_size=16, num_local_crops=4,
                 num_queries=4, out_dim=1024, head_hidden_dim=256, head_bottleneck_dim=64, batch_size=8),
}
STEADY_STEP = 10_000  # past the warm-ups and the last-layer freeze: every parameter is updated


def add_ranges(trainer):
    """Open "adclr/head" around both DINO heads, unless the models run compiled (a hook in
    a compiled graph is traced, its range dropped). The step opens RANGES itself where it
    runs eagerly. Returns the function that removes them."""
    handles, open_ranges = [], []

    def around(module, name):
        def enter(*_):
            open_ranges.append(record_function(name).__enter__())

        def leave(*_):
            open_ranges.pop().__exit__(None, None, None)
        handles.extend([module.register_forward_pre_hook(enter), module.register_forward_hook(leave)])

    if not trainer.compiled:
        around(trainer.teacher.head, "adclr/head")
        around(trainer.student_module.head, "adclr/head")

    def remove():
        for h in handles:
            h.remove()
    return remove


def run(cfg, device, warmup, time_steps, steps):
    """Warm up, time, profile. Returns (seconds per step, kinds table, phases table)."""
    trainer = build(cfg, device)
    batch = synthetic_batch(cfg, cfg.batch_size, device, generator=torch.Generator().manual_seed(0))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step = STEADY_STEP
    for _ in range(warmup):
        train_step(trainer, batch, step)
        step += 1
    sync()
    # Back to back, one synchronise at the end: as the training loop queues its steps.
    start = time.perf_counter()
    for _ in range(time_steps):
        train_step(trainer, batch, step)
        step += 1
    sync()
    seconds = (time.perf_counter() - start) / time_steps
    remove = add_ranges(trainer)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(STEP_RANGE):
                train_step(trainer, batch, step)
            step += 1
        sync()
    remove()
    ev = Events(prof.events())
    step_ranges = [e for e in ev.cpu if e.name == STEP_RANGE]
    kinds, phases = (split_device if device.type == "cuda" else split_cpu)(ev, step_ranges)
    return seconds, shares(kinds), shares(phases)


TRAINER_FLAGS = ("attention", "pack_crops", "fused_head_loss", "compile", "precision")


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda[:N]")
    parser.add_argument("--model", choices=MODELS, help="default: vit_s16 on CUDA, tiny on CPU")
    parser.add_argument("--batch-size", type=int, help="images per step (default: the model's)")
    for flag in TRAINER_FLAGS:
        parser.add_argument("--" + flag.replace("_", "-"), default="auto", help="as adclr train's")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 5 on CUDA, 2 on CPU)")
    parser.add_argument("--time-steps", type=int, help="timed steps, no profiler (default 10 / 3)")
    parser.add_argument("--steps", type=int, default=1, help="profiled steps (default 1)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak (default: adclr.flops' table)")
    parser.add_argument("--json", help="also write the tables and figures here")
    return parser.parse_args(argv)


def describe(cfg, device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    flags = ", ".join(f"{f} {getattr(cfg, f)}" for f in TRAINER_FLAGS)
    return (f"{cfg.arch}/{cfg.patch_size}, {cfg.batch_size} images (2x{cfg.image_size} + "
            f"{cfg.num_local_crops}x{cfg.local_size} px, Q={cfg.num_queries}, out_dim {cfg.out_dim}) "
            f"on {name}; {flags}")


def print_table(title, table, total_ms):
    print(f"\n{title} ({total_ms:.2f} ms in all)")
    print(f"  {'':22} {'ms':>9} {'share':>7}   largest")
    for name, row in table.items():
        print(f"  {name:22} {row['ms']:9.3f} {row['share']:6.1f}%   {', '.join(row['top'])}")
    print(f"  {'total':22} {total_ms:9.3f} {sum(r['share'] for r in table.values()):6.1f}%")


def print_report(result, what):
    flops, seconds, peak = result["flops"], result["step_ms"] / 1e3, result["peak_tflops"]
    print(f"adclr train step: {result['device']}")
    utilisation = (f"MFU {100 * result['mfu']:.1f}% of {peak:g} TFLOP/s (dense bf16)" if peak
                   else "MFU n/a (no known peak for this device; pass --peak-tflops)")
    print(f"step {result['step_ms']:.2f} ms (mean of {result['timed_steps']}, no profiler), "
          f"{flops / 1e9:.3g} GFLOP -> {flops / seconds / 1e12:.3g} TFLOP/s, {utilisation}")
    largest = sorted(result["flops_breakdown"].items(), key=lambda kv: -kv[1])
    print("FLOPs: " + ", ".join(f"{k} {100 * v / flops:.1f}%" for k, v in largest if v >= 0.01 * flops))
    total_ms = sum(r["ms"] for r in result["by_kind"].values())
    print_table(f"share of {what} in {result['profiled_steps']} profiled step(s), by kind",
                result["by_kind"], total_ms)
    print_table(f"share of {what}, by range", result["by_range"], total_ms)


def main(argv=None):
    """Profile, print the tables, and return them (with the step's time, FLOPs and MFU)."""
    args = parse(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    on_cuda = device.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise SystemExit(f"python -m bench.profile: error: --device {args.device}: CUDA is not available here")
    settings = dict(MODELS[args.model or ("vit_s16" if on_cuda else "tiny")])
    settings["batch_size"] = args.batch_size or settings["batch_size"]
    cfg = Config(**settings, **{f: getattr(args, f) for f in TRAINER_FLAGS}, device=device.type)
    problem = whole_step_error(cfg, device, distributed=False)
    if problem:
        raise SystemExit(f"python -m bench.profile: error: {problem}")
    warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 2)
    time_steps = args.time_steps or (10 if on_cuda else 3)

    if not on_cuda:  # inductor's C++ kernels as ranges of their own, not the compiled graph's time
        from torch._inductor import config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
    seconds, kinds, phases = run(cfg, device, warmup, time_steps, args.steps)
    flops, breakdown = step_flops(cfg)
    peak = args.peak_tflops or (peak_tflops(torch.cuda.get_device_name(device)) if on_cuda else None)
    result = {"device": describe(cfg, device), "config": dataclasses.asdict(cfg),
              "step_ms": seconds * 1e3, "timed_steps": time_steps, "flops": flops,
              "flops_breakdown": breakdown, "peak_tflops": peak,
              "mfu": mfu(seconds, flops, peak) if peak else None,
              "profiled_steps": args.steps, "by_kind": kinds, "by_range": phases}
    print_report(result, "device time" if on_cuda else "CPU time")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
