"""`python -m bench.overhead` (the op's host time per call, kernels stubbed) runs on a CPU
machine, as bench/README.md says."""

import os
import subprocess
import sys
from pathlib import Path


def test_overhead_runs_on_cpu():
    # It stubs the kernels and tells the backend check the interpreter was on at import; a
    # check added to the op later made every row fail here.
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "bench.overhead", "--calls", "2", "--rounds", "1"], cwd=root,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("batched (2 x 207 tokens)", "packed by kind, VarlenLayout", "packed, cu_seqlens + max_seqlen"):
        assert row in proc.stdout
