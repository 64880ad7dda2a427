"""bench.static's ahead-of-time compiles, in a process of their own (this one's kernels are
the interpreter's): a compile stopped where Triton has laid out shared memory gives the
shared memory a whole compile gives."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHECK = """
import json, os
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import torch
from bench import static as S
from bench.workloads import Workload

forward, _ = S.capture(Workload("check", "", 4, 1, 2, 64, 1, 196, 10), torch.bfloat16, 90)
rows = []
for shared_only in (False, True):
    c = S.compile_launch(forward[0], 90, shared_only=shared_only)
    rows.append([c.registers, c.spill_bytes, c.shared_bytes, len(c.cubin)])
print(json.dumps(rows))
"""


@pytest.mark.slow  # two compiles of the forward for sm_90, one of them through ptxas
def test_a_compile_stopped_before_ptxas_gives_the_shared_memory_of_a_whole_one():
    pytest.importorskip("triton.compiler", reason="no ahead-of-time API")
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "0"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (regs, spills, shared, cubin), early = json.loads(done.stdout.splitlines()[-1])
    assert regs > 0 and spills is not None and cubin > 0
    assert shared > 16 * 1024  # the K and V tiles' buffers: something to get wrong
    assert early == [None, None, shared, 0]  # no ptxas: no registers, no spills, no cubin
