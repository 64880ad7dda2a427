"""Shared set-up of the benchmarks: device, shape matrix, timing and memory helper.

`pytest bench/` runs the full matrix (bf16, ADCLR's real per-GPU batches, every
backend) on a CUDA machine and a small fp32 subset with the CPU backends elsewhere.
Any test that takes `workload` and `backend` arguments is parametrized over the matrix
of this device; a backend that cannot run here is skipped with its reason.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from bench.report import add_ratios
from bench.workloads import (BACKENDS, CPU_WORKLOADS, CUDA_WORKLOADS, FLOP_CONVENTION,
                             INPUT_LAYOUT, device_info)

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

if ON_CUDA:
    # One process compiles flex for every shape of the matrix (forward and backward, the
    # training step's too): past dynamo's default of 8 recompiles it would silently fall
    # back to eager flex, and the figures would be of the wrong thing.
    import torch._dynamo

    _config = torch._dynamo.config
    _limit = "recompile_limit" if hasattr(_config, "recompile_limit") else "cache_size_limit"
    setattr(_config, _limit, max(getattr(_config, _limit), 64))

SUBSET_NOTE = (
    f"adclr bench: CUDA, full matrix, {DTYPE}, device {torch.cuda.get_device_name()}"
    if ON_CUDA else
    "adclr bench: NO GPU -- running the small CPU subset (fp32, few images, CPU "
    "backends only; triton/xformers are skipped). Figures from it say nothing about "
    "GPU speed; run on a CUDA machine for the full matrix."
)


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("benchmark"):
        raise pytest.UsageError("bench/ needs pytest-benchmark: pip install -e '.[dev]'")
    # Eager flex on CPU warns that it is unfused; that is what is being measured, not news.
    config.addinivalue_line("filterwarnings",
                            "ignore:flex_attention called without torch.compile")
    # Skipped backends are part of the result: always list them with their reasons.
    if "s" not in config.option.reportchars and "a" not in config.option.reportchars:
        config.option.reportchars += "s"


def pytest_report_header(config):
    return SUBSET_NOTE


def pytest_terminal_summary(terminalreporter):
    # Printed even under -q, where the header is not.
    terminalreporter.write_line(SUBSET_NOTE)


def pytest_generate_tests(metafunc):
    if "workload" in metafunc.fixturenames:
        metafunc.parametrize("workload", WORKLOADS, ids=[w.id for w in WORKLOADS])
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["adclr"] = device_info(DEVICE) | dict(dtype=str(DTYPE).removeprefix("torch."))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # Ratios need every backend of a group, so they are added once all have run.
    add_ratios(output_json["benchmarks"])


def _synchronize():
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


@pytest.fixture
def measure(benchmark):
    """Time fn with pytest-benchmark and record what a reader needs in extra_info.

    A round is `calls` back-to-back calls of fn and one device synchronise; the time
    per call is the round's host wall clock over `calls`, median over ROUNDS[1] rounds.
    Pass `flops` for TFLOP/s, or `items` (e.g. images) for a rate in items/s;
    `rounds` is (warm-up rounds, timed rounds).
    """

    def run(fn, *, mode, group, backend, workload=None, flops=None, items=None, rounds=ROUNDS,
            calls=CALLS_PER_ROUND, **extra):
        def timed():
            fn()
            _synchronize()

        count = itertools.count(1)

        def queued():
            # pytest-benchmark times `iterations` calls per round: synchronise after the
            # last of them only.
            fn()
            if next(count) % calls == 0:
                _synchronize()

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
        benchmark.pedantic(queued, warmup_rounds=rounds[0], rounds=rounds[1], iterations=calls)
        if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
            return
        median = benchmark.stats.stats.median
        info["median_s"] = median
        if flops is not None:
            info.update(flops=flops, tflops=flops / median / 1e12, flop_convention=FLOP_CONVENTION)
        if items is not None:
            info.update(items=items, items_per_s=items / median)

    return run
