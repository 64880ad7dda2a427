"""The kernels the op launches compile for every GPU generation it targets, within its
shared memory, and (bf16/fp16 on Hopper, head_dim <= 128) without spilling registers in
a loop.

CI has no GPU and runs the kernels in Triton's interpreter, which accepts code that the
real compiler rejects. Here the launchers run on meta tensors and their launches are
compiled ahead of time down to ptxas (bench.static's capture: the real arguments, so the
real specialization), in a fresh process: this one's kernels were built for the
interpreter.
"""

import json
import os
import subprocess
import sys

import pytest

from adclr_kernels.unidirectional import SHARED_MEMORY_PER_PROGRAM

try:
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.compiler import ASTSource  # noqa: F401
except ImportError:  # an older or newer Triton without this API
    GPUTarget = None

pytestmark = pytest.mark.skipif(GPUTarget is None, reason="this Triton has no ahead-of-time API")

# (dtype, head_dim, packed, (query_sees_prefix, query_sees_self, query_sees_queries))
CASES = [
    ("bf16", 64, False, (False, False, False)),
    ("bf16", 64, True, (False, False, False)),
    ("fp16", 80, True, (True, True, False)),
    ("bf16", 128, False, (False, False, True)),
    ("fp32", 128, False, (False, True, True)),
    ("bf16", 256, True, (False, False, False)),
    ("fp32", 256, False, (False, False, False)),
]

CHECK = """
import json, os, sys
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
from bench.static import compile_check
capability, cases = json.loads(sys.argv[1])
print(json.dumps([compile_check(d, t, capability, packed, tuple(f)) for t, d, packed, f in cases]))
"""


@pytest.mark.parametrize("capability", [80, 86, 90])
def test_launched_kernels_compile_and_fit(capability):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", CHECK, json.dumps([capability, CASES])], env=env,
                          cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    limit = SHARED_MEMORY_PER_PROGRAM[capability]
    for (dtype, head_dim, packed, flags), rows in zip(CASES, json.loads(proc.stdout)):
        assert len(rows) == 3, rows  # forward, delta, backward
        for row in rows:
            where = f"sm_{capability} {dtype} d{head_dim} packed={packed} {flags} {row['kernel']}"
            assert row["shared_bytes"] <= limit, f"{where}: {row['shared_bytes']} B shared > {limit}"
            if capability == 90 and dtype != "fp32" and head_dim <= 128:
                # A register cap (maxnreg) may spill a few bytes once per program, never
                # inside a loop.
                assert row["loop_spill_instrs"] == 0, f"{where}: spills inside a loop"
                assert row["spill_bytes"] == 0 or (row["maxnreg"] and row["spill_bytes"] <= 64), \
                    f"{where}: spills {row['spill_bytes']} B"
