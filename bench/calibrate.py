"""Calibrate the static model on a GPU: each kernel's measured time against its estimate.

    python -m bench.static --targets sm90 --dtypes bf16      # on any machine (or the committed table)
    python -m bench.calibrate [--static bench/results/static/static.json] [--out DIR]

On a CUDA machine, runs one attention layer's op (forward, then backward) per workload
of `bench.workloads.STATIC_WORKLOADS` in bf16, as the drop-in module calls it (packed
qkv; the packed multi-crop batch through a VarlenLayout), under the torch profiler,
and takes every Triton kernel's device time per call. Joined with the static table's
row for the same workload, kernel and target, it writes DIR/calibration.json and .md:
measured, estimated, floor, and measured / estimated per kernel. A ratio far from 1
says which assumption of bench/NOTES.md to fix (issue-rate bound where latency rules,
a bandwidth that is not reached, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STATIC = Path(__file__).parent / "results" / "static" / "static.json"


def join(measured, static_rows, target):
    """Rows of (workload, kernel, measured µs, estimated µs, floor µs, ratios).

    measured: {(workload id, kernel name): µs per call}; static_rows: the "kernels" of
    a bench.static JSON; target: e.g. "sm_90".
    """
    rows = []
    by_key = {(r["workload"], r["kernel"]): r for r in static_rows
              if r["target"] == target and r["dtype"] == "bf16"}
    for (workload, kernel), us in sorted(measured.items()):
        row = by_key.get((workload, kernel))
        if row is None:
            rows.append(dict(workload=workload, kernel=kernel, measured_us=us, estimate_us=None,
                             floor_us=None, vs_estimate=None, vs_floor=None))
            continue
        rows.append(dict(workload=workload, kernel=kernel, measured_us=us,
                         estimate_us=row["estimate_us"], floor_us=row["floor_us"],
                         bound=row["bound"], vs_estimate=us / row["estimate_us"],
                         vs_floor=us / row["floor_us"]))
    return rows


def markdown(rows, meta):
    lines = [f"# Static model calibration on {meta['device']} ({meta['when']})", "",
             f"`{meta['command']}`; torch {meta['torch']}, Triton {meta['triton']}, "
             f"static table {meta['static']}.", "",
             "| workload | kernel | measured µs | estimated µs | bound | measured / estimate | measured / floor |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        est = "-" if r["estimate_us"] is None else f"{r['estimate_us']:.1f}"
        ratio = "-" if r["vs_estimate"] is None else f"{r['vs_estimate']:.2f}"
        floor = "-" if r["vs_floor"] is None else f"{r['vs_floor']:.2f}"
        lines.append(f"| {r['workload']} | {r['kernel'].strip('_')} | {r['measured_us']:.1f} | {est} | "
                     f"{r.get('bound', '-')} | {ratio} | {floor} |")
    return "\n".join(lines) + "\n"


def measure(workloads, rounds=20):
    """{(workload id, kernel name): device µs per call} of the op's Triton kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from adclr_kernels import (VarlenLayout, unidirectional_attention_qkvpacked,
                               unidirectional_attention_varlen_qkvpacked)
    from bench.workloads import PackedWorkload

    out = {}
    for w in workloads:
        if isinstance(w, PackedWorkload):
            lengths, queries = zip(*w.sequences())
            layout = VarlenLayout(lengths, queries, device="cuda")
            qkv = torch.randn(w.tokens, 3, w.heads, w.head_dim, device="cuda", dtype=torch.bfloat16)

            def op(x, layout=layout):
                return unidirectional_attention_varlen_qkvpacked(x, layout, backend="triton")
        else:
            qkv = torch.randn(w.batch, w.seq_len, 3, w.heads, w.head_dim, device="cuda",
                              dtype=torch.bfloat16)

            def op(x, w=w):
                return unidirectional_attention_qkvpacked(x, w.num_queries, backend="triton")
        qkv.requires_grad_()
        grad = torch.randn(qkv.shape[:-3] + qkv.shape[-2:], device="cuda", dtype=torch.bfloat16)
        for _ in range(3):  # compile and warm up
            op(qkv).backward(grad)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(rounds):
                op(qkv).backward(grad)
            torch.cuda.synchronize()
        # The kernels by their Triton names (the custom ops around them are named
        # adclr_kernels::..., and hold the same time again).
        totals = {avg.key: avg.device_time_total for avg in prof.key_averages()
                  if avg.key.startswith("_unidirectional")}
        for name, total in totals.items():
            out[(w.id, name)] = total / rounds
        print(f"  {w.id}: " + ", ".join(f"{n.strip('_')} {t / rounds:.1f} us"
                                        for n, t in sorted(totals.items())), file=sys.stderr)
    return out


def main(argv=None):
    import time

    import torch
    import triton

    parser = argparse.ArgumentParser(prog="python -m bench.calibrate", description=__doc__.split("\n")[0])
    parser.add_argument("--static", default=str(STATIC), help="a bench.static JSON")
    parser.add_argument("--out", default=None, help="folder (default bench/results/<device>)")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: it measures the kernels the static model estimates")
    from bench.workloads import STATIC_WORKLOADS

    device = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    static = json.loads(Path(args.static).read_text())
    rows = join(measure(STATIC_WORKLOADS, args.rounds), static["kernels"], f"sm_{10 * major + minor}")
    meta = dict(device=device, when=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                triton=triton.__version__, static=args.static,
                command="python -m bench.calibrate " + " ".join(argv or sys.argv[1:]))
    out = Path(args.out or Path(__file__).parent / "results" / device.replace(" ", "_"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (out / "calibration.md").write_text(markdown(rows, meta))
    print(f"wrote {out / 'calibration.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
