"""pytest hooks and fixtures of the benchmarks (the helpers they use are in timing.py).

`pytest bench/` runs the full matrix (bf16, ADCLR's real per-GPU batches, every
backend) on a CUDA machine and a small fp32 subset with the CPU backends elsewhere.
Any test that takes `workload` and `backend` arguments is parametrized over the matrix
of this device; a backend that cannot run here is skipped with its reason.
"""

from __future__ import annotations

import functools

import pytest

from bench import timing
from bench.report import add_ratios
from bench.workloads import BACKENDS, device_info


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("benchmark"):
        raise pytest.UsageError("bench/ needs pytest-benchmark: pip install -e '.[dev]'")
    if timing.ON_CUDA:
        timing.allow_flex_recompiles()
    # Eager flex on CPU warns that it is unfused; that is what is being measured, not news.
    config.addinivalue_line("filterwarnings",
                            "ignore:flex_attention called without torch.compile")
    # Skipped backends are part of the result: always list them with their reasons.
    if "s" not in config.option.reportchars and "a" not in config.option.reportchars:
        config.option.reportchars += "s"


def pytest_report_header(config):
    return timing.SUBSET_NOTE


def pytest_terminal_summary(terminalreporter):
    # Printed even under -q, where the header is not.
    terminalreporter.write_line(timing.SUBSET_NOTE)


def pytest_generate_tests(metafunc):
    if "workload" in metafunc.fixturenames:
        metafunc.parametrize("workload", timing.WORKLOADS, ids=[w.id for w in timing.WORKLOADS])
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["adclr"] = device_info(timing.DEVICE) | dict(dtype=str(timing.DTYPE).removeprefix("torch."))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # Ratios need every backend of a group, so they are added once all have run.
    add_ratios(output_json["benchmarks"])


@pytest.fixture
def measure(benchmark):
    """measure(fn, mode=..., group=..., backend=..., ...): `timing.measure` with this
    test's benchmark fixture."""
    return functools.partial(timing.measure, benchmark)
