"""`python -m bench.static` on CPU: the kernels compile for sm_90 and the model reads them.

A run on two workloads (ViT-S/16 global, dense; the packed multi-crop batch) in bf16 for
sm_90: every launch compiles, every loop of the SASS is named by its `# loop:` marker,
and the structural properties the static model exists to watch hold.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.static import spills_run


def test_static_model_compiles_and_reads_the_kernels(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "bench.static", "--workloads", "vit_s16_global,vit_s16_packed",
           "--dtypes", "bf16", "--targets", "sm90", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).parent.parent, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "static.json").read_text())
    assert (tmp_path / "static.md").read_text().startswith("# Static model")

    kernels = result["kernels"]
    # Forward and the one-pass backward, for ViT-S/16 global and for the packed batch (128
    # images: enough (sequence, head) programs for it), whose forward takes its two runs
    # by the batched kernels: the global crops', then the local crops' one-shot kernel.
    assert [r["kernel"] for r in kernels] == [
        "_unidirectional_fwd_kernel", "_onepass_bwd_kernel", "_unidirectional_fwd_kernel",
        "_oneshot_fwd_kernel", "_onepass_bwd_kernel"]
    for row in kernels:
        # No spills, except a few where a config caps the registers (maxnreg) to fit more
        # programs per SM: as they run, at most 8 spill instructions per program in its
        # loops, and a store only in a loop that runs at most once per program (the
        # one-pass backward's query-row pass: one tile, in the key block holding the prefix).
        per_program, repeated = spills_run(row["loops"], row["grid"])
        assert row["registers"] > 0 and per_program <= 8 and not repeated, row["kernel"]
        assert row["spill_bytes"] == 0 or (row["maxnreg"] and row["spill_bytes"] <= 64), row
        assert not [l["name"] for l in row["loops"] if l["name"].startswith("unnamed")]
        assert row["empty_programs"] == 0, f"{row['workload']} {row['kernel']}: empty programs"
        assert row["estimate_us"] >= row["floor_us"] > 0
    forward = next(r for r in kernels if r["workload"].startswith("vit_s16_global")
                   and r["kind"] == "fwd")
    interior = next(l for l in forward["loops"] if l["name"] == "fwd.interior")
    assert interior["trips"] > 0 and interior["mma"] > 0
    # A mask would select per element (32 per thread in a 128 x 32 tile); the conditional
    # rescale selects per row (4 rows per thread).
    assert interior["select"] < 16, "the interior loop evaluates a mask"
    # The rescale is found behind its `# branch: rare` marker, and charged once.
    assert 0 < interior["rare"] < interior["instrs"] // 3

    for row in (r for r in kernels if r["kernel"] == "_onepass_bwd_kernel"):
        # delta walks the whole 32-row tiles (207 tokens: 6; 37: 1), then the rows left in
        # 16-row tiles (15 and 5 rows: one each); the dQ store walks 32-row tiles (7 and 2).
        trips = {l["name"]: l["trips"] for l in row["loops"]}
        assert trips["bwd1.delta"] + trips["bwd1.delta_last"] == trips["bwd1.dq"] > 0
        assert 0 < trips["bwd1.delta_last"] <= row["grid"] < trips["bwd1.delta"]

    for op in result["ops"]:
        assert op["forward_kernels"] == (2 if op["workload"].startswith("vit_s16_packed") else 1)
        assert op["backward_kernels"] == 1
    for layer in result["layers"]:
        assert layer["copies"] == [], layer
