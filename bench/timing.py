"""What the benchmarks measure with: this machine's device, dtype and shape matrix, a
timed call recorded into pytest-benchmark, and the peak memory of one call.

`bench/conftest.py` holds the pytest side (hooks, the `measure` fixture); this module is
plain Python, so scripts (`python -m bench.head_loss`) use it too.
"""

from __future__ import annotations

import itertools

import torch

from bench.workloads import CPU_WORKLOADS, CUDA_WORKLOADS, FLOP_CONVENTION, INPUT_LAYOUT, device_info

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda") if ON_CUDA else torch.device("cpu")
DTYPE = torch.bfloat16 if ON_CUDA else torch.float32
WORKLOADS = CUDA_WORKLOADS if ON_CUDA else CPU_WORKLOADS
# (warm-up rounds, timed rounds). The first warm-up call also compiles (Triton, flex).
ROUNDS = (10, 50) if ON_CUDA else (2, 15)
# Calls per round on CUDA: back to back, then one synchronise, as a training step queues
# them. One call per synchronise measured launch latency instead: on the H200 the
# Triton op's kernels took 0.27 ms of device time (profiler) in a 0.87 ms call.
CALLS_PER_ROUND = 10 if ON_CUDA else 1

SUBSET_NOTE = (
    f"adclr bench: CUDA, full matrix, {DTYPE}, device {torch.cuda.get_device_name()}"
    if ON_CUDA else
    "adclr bench: NO GPU -- running the small CPU subset (fp32, few images, CPU "
    "backends only; triton/xformers are skipped). Figures from it say nothing about "
    "GPU speed; run on a CUDA machine for the full matrix."
)


def allow_flex_recompiles():
    """One process compiles flex for every shape of the matrix (forward and backward, the
    training step's too): past dynamo's default of 8 recompiles it would silently fall
    back to eager flex, and the figures would be of the wrong thing."""
    import torch._dynamo

    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 64))


def synchronize():
    if ON_CUDA:
        torch.cuda.synchronize()


def peak_memory_bytes(fn) -> int:
    """Peak bytes torch allocates during one call of fn, above what was live before.

    CUDA: the caching allocator's own counter. CPU: torch's CPU allocations recorded by
    the profiler (profile_memory), replayed in time order; only torch tensors count.
    """
    if ON_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.nbytes()):
        live += nbytes
        peak = max(peak, live)
    return peak


def device_seconds_per_call(fn, calls=CALLS_PER_ROUND):
    """Seconds of device work per call of fn, from the torch profiler's kernel (and copy)
    records over `calls` calls: the kernels' speed without the host's launch time, which
    the queued wall clock includes. None off CUDA."""
    if not ON_CUDA:
        return None
    from torch.profiler import ProfilerActivity, profile

    synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        synchronize()
    return device_total_us(prof.key_averages()) / calls / 1e6


def device_total_us(averages):
    """µs of device time in a profiler's key_averages(): the device-side rows only (the
    kernels and copies), so that a host op is not counted again over the kernels it launched."""
    from torch.autograd import DeviceType

    return sum(a.device_time_total for a in averages if a.device_type != DeviceType.CPU)


def measure(benchmark, fn, *, mode, group, backend, workload=None, flops=None, items=None,
            rounds=ROUNDS, calls=CALLS_PER_ROUND, **extra):
    """Time fn with pytest-benchmark and record what a reader needs in extra_info.

    A round is `calls` back-to-back calls of fn and one device synchronise; the time
    per call is the round's host wall clock over `calls`, median over rounds[1] rounds.
    On CUDA the device time per call (the profiler's kernel records) is kept beside it.
    Pass `flops` for TFLOP/s, or `items` (e.g. images) for a rate in items/s;
    `rounds` is (warm-up rounds, timed rounds).
    """
    def timed():
        fn()
        synchronize()

    count = itertools.count(1)

    def queued():
        # pytest-benchmark times `iterations` calls per round: synchronise after the
        # last of them only.
        fn()
        if next(count) % calls == 0:
            synchronize()

    timed()  # compile / autotune / cache the mask before anything is measured
    benchmark.group = group
    info = benchmark.extra_info
    info.update(device_info(DEVICE), dtype=str(DTYPE).removeprefix("torch."),
                backend=backend, mode=mode, group=group, **extra)
    if workload is not None:
        info.update(workload=workload.name, workload_label=workload.describe(),
                    shape=workload.shape(), input_layout=INPUT_LAYOUT)
    info["peak_memory_bytes"] = peak_memory_bytes(timed)
    info["peak_memory_note"] = ("torch.cuda.max_memory_allocated during one call, "
                                "minus what was allocated before" if ON_CUDA else
                                "torch CPU allocations during one call (profiler)")
    info["calls_per_round"] = calls
    try:
        info["device_s_per_call"] = device_seconds_per_call(fn, calls)
    except Exception as error:  # the profiler is a diagnostic here: the timing goes on without it
        info["device_time_note"] = f"no device time: {type(error).__name__}: {error}"
    benchmark.pedantic(queued, warmup_rounds=rounds[0], rounds=rounds[1], iterations=calls)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    median = benchmark.stats.stats.median
    info["median_s"] = median
    if flops is not None:
        info.update(flops=flops, tflops=flops / median / 1e12, flop_convention=FLOP_CONVENTION)
    if items is not None:
        info.update(items=items, items_per_s=items / median)
