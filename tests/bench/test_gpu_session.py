"""bench/gpu_session.sh's own logic, without a GPU: a stand-in `python` and `nvidia-smi`
take every command, so the stage list, the budget and the archive are what run. A mistake
here costs a lent GPU's minutes."""

import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

STUB_PYTHON = """#!/usr/bin/env bash
case "$*" in
  *get_device_name*) echo Fake_GPU ;;
  *"import pytest_timeout"*) exit "$STUB_NO_TIMEOUT" ;;
  *"import "*) echo stub ;;
  *) echo "$*" >> "$STUB_LOG"
     trap 'echo "signal INT" >> "$STUB_LOG"; kill $!; exit 130' INT
     trap 'echo "signal TERM" >> "$STUB_LOG"; kill $!; exit 143' TERM
     sleep "$STUB_SLEEP" & wait $! ;;
esac
"""


def session(tmp_path, *stages, budget=570, sleep=0, pytest_timeout=False, **env_vars):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("python", STUB_PYTHON), ("nvidia-smi", "#!/usr/bin/env bash\necho stub\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "STUB_LOG": str(tmp_path / "ran"), "STUB_SLEEP": str(sleep), "BUDGET": str(budget),
           "STUB_NO_TIMEOUT": "0" if pytest_timeout else "1",
           "COLLECT": str(tmp_path / "collect"), **env_vars}
    if budget is None:
        del env["BUDGET"]
    proc = subprocess.run(["bash", "bench/gpu_session.sh", *stages], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    ran = (tmp_path / "ran").read_text().splitlines() if (tmp_path / "ran").exists() else []
    return proc, ran


@pytest.mark.parametrize("stages", [("tests", "opps"), ("-n",), ("-e", "tests"), ("*",)])
def test_an_unknown_stage_runs_nothing(tmp_path, stages):
    proc, ran = session(tmp_path, *stages)
    assert proc.returncode == 2 and f"unknown stage '{[s for s in stages if s != 'tests'][0]}'" in proc.stderr
    assert ran == []


def test_each_stage_runs_in_order_into_the_archive(tmp_path):
    proc, ran = session(tmp_path, "tests ops", "traincompiled")  # one argument may hold several
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[1:3] for line in ran] == [["pytest", "tests/adclr_kernels"],
                                                   ["pytest", "-q"], ["pytest", "-q"]]
    assert "bench/test_attention.py" in ran[1] and "-k compile" in ran[2]
    assert "--timeout" not in " ".join(ran)  # pytest-timeout is not installed here
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["tests", "ops", "traincompiled"]
    with tarfile.open(tmp_path / "out" / "results.tgz") as archive:
        assert "bench/results/Fake_GPU/versions.txt" in archive.getnames()


def test_per_test_limits_where_pytest_timeout_is_installed(tmp_path):
    # The compiled steps' tests compile first: they keep a longer per-test limit.
    proc, ran = session(tmp_path, "ops", "traincompiled", pytest_timeout=True)
    assert proc.returncode == 0, proc.stderr
    assert "--timeout 150" in ran[0] and "--timeout 300" in ran[1]


def test_stages_past_the_budget_are_skipped_and_said_so(tmp_path):
    # 40 s: the first stage starts with over 30 s left (the script's start-up may take up to
    # 10 s) and ends with under 30.
    proc, ran = session(tmp_path, "tests", "ops", "train", budget=40, sleep=12)
    assert proc.returncode == 0, proc.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("tests: rc 0") and len(ran) == 1
    assert [line.split(",")[0] for line in summary[1:]] == ["ops: skipped", "train: skipped"]


@pytest.mark.parametrize("scale", [None, "3"])
def test_on_ones_own_gpu_no_budget_and_limits_scaled(tmp_path, scale):
    """Run on one's own node (no BUDGET), no stage is cut to a budget or skipped; on a
    slower GPU than the one the limits were set on, LIMIT_SCALE stretches each of them
    (tests' 600 s would have been cut to the lent machine's 570 before)."""
    proc, ran = session(tmp_path, "tests", "ops", "train", budget=None,
                        **({"LIMIT_SCALE": scale} if scale else {}))
    assert proc.returncode == 0, proc.stderr
    assert len(ran) == 3 and "skipped" not in (tmp_path / "out" / "summary.txt").read_text()
    factor = int(scale or 1)
    assert [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("== ")] == [
        f"== tests (limit {200 * factor} s)", f"== ops (limit {120 * factor} s)", f"== train (limit {100 * factor} s)"]


@pytest.mark.parametrize("budget,scale,min_stage", [("ten", "1", "30"), ("570", "0", "30"), ("570", "1.5", "30"),
                                                     ("5 5", "1", "30"), ("570", "1", "0"), ("570", "1", "5 5")])
def test_a_budget_or_scale_that_is_not_a_whole_number_runs_nothing(tmp_path, budget, scale, min_stage):
    proc, ran = session(tmp_path, "tests", budget=budget, LIMIT_SCALE=scale, MIN_STAGE=min_stage)
    assert proc.returncode == 2 and "nothing run" in proc.stderr and ran == []


def test_a_stage_past_its_limit_is_interrupted_so_pytest_keeps_what_finished(tmp_path):
    """timeout's SIGTERM ended pytest without its session's end, where pytest-benchmark
    writes its JSON: a stage cut short returned no figure at all. SIGINT lets it end."""
    # Over MIN_STAGE left after the script's start (up to 10 s on a loaded machine).
    proc, ran = session(tmp_path, "calibrate", budget=15, sleep=60, MIN_STAGE="5")
    assert proc.returncode == 0, proc.stderr
    assert ran[1:] == ["signal INT"], ran
    assert (tmp_path / "out" / "summary.txt").read_text().startswith("calibrate: rc 124,")  # timeout's own
