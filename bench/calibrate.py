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
             *([f"Measured ceilings: bf16 matmul {meta['ceilings']['bf16_matmul_tflops']:.0f} TFLOP/s "
                f"({meta['ceilings']['matmul']}), copy {meta['ceilings']['copy_tb_per_s']:.2f} TB/s "
                f"({meta['ceilings']['copy']}, bytes read + written).", ""]
              if meta.get("ceilings") else []),
             "| workload | kernel | measured µs | estimated µs | bound | measured / estimate | measured / floor |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        est = "-" if r["estimate_us"] is None else f"{r['estimate_us']:.1f}"
        ratio = "-" if r["vs_estimate"] is None else f"{r['vs_estimate']:.2f}"
        floor = "-" if r["vs_floor"] is None else f"{r['vs_floor']:.2f}"
        lines.append(f"| {r['workload']} | {r['kernel'].strip('_')} | {r['measured_us']:.1f} | {est} | "
                     f"{r.get('bound', '-')} | {ratio} | {floor} |")
    return "\n".join(lines) + "\n"


def measure(workloads, rounds=20, on_workload=None):
    """{(workload id, kernel name): device µs per call} of the op's Triton kernels, and each
    workload's launch configs; on_workload(measured, configs) after each workload (to save
    what is measured so far: a run cut short keeps it)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from adclr_kernels import (VarlenLayout, unidirectional_attention_qkvpacked,
                               unidirectional_attention_varlen_qkvpacked)
    from bench.workloads import PackedWorkload

    out, configs = {}, {}
    for w in workloads:
        configs[w.id] = launch_configs(w, 10 * torch.cuda.get_device_capability()[0]
                                       + torch.cuda.get_device_capability()[1])
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
        # The kernels by their Triton names (rows of wrappers around them, such as the
        # custom ops' adclr_kernels::... under torch.compile, would count it again).
        totals = {avg.key: avg.device_time_total for avg in prof.key_averages()
                  if avg.key.startswith(("_unidirectional", "_oneshot", "_onepass"))}
        for name, total in totals.items():
            out[(w.id, name)] = total / rounds
        print(f"  {w.id}: " + ", ".join(f"{n.strip('_')} {t / rounds:.1f} us"
                                        for n, t in sorted(totals.items())), file=sys.stderr)
        if on_workload:
            on_workload(out, configs)
    return out, configs


def launch_configs(workload, capability):
    """The tile configs the op launches for this workload (bf16), as the kernels pick them:
    per pass, those of the flash or one-pass kernel (of the longest run, where the pass
    takes a packed layout's runs by the batched kernels), or of the one-shot kernels."""
    from bench.workloads import PackedWorkload

    packed = isinstance(workload, PackedWorkload)
    whole = ((max(n for n, _ in workload.sequences()), len(workload.sequences()), True) if packed
             else (workload.seq_len, workload.batch, False))
    passes = dict(fwd=whole, bwd=whole)
    if packed and not workload.offsets:
        passes.update(_by_runs(workload, capability))
    from bench.tune import op_config

    return {kind: op_config(kind, workload.head_dim, workload.heads, capability, *how)
            for kind, how in passes.items()}


def _by_runs(workload, capability):
    """{pass: (length, sequences, packed=False)} of the longest run, for each pass that the
    op takes run by run (attention_triton's `_fwd_by_runs`, `_bwd_by_runs`) on the GPU."""
    import torch

    from adclr_kernels import VarlenLayout
    from adclr_kernels import attention_triton as T
    from adclr_kernels.mask import QueryMask
    from bench.static import recording

    layout = VarlenLayout(*zip(*workload.sequences()), device="meta")
    q = torch.empty(layout.total_tokens, workload.heads, workload.head_dim, dtype=torch.bfloat16,
                    device="meta")
    geo = T.varlen_geometry(q, layout.cu_seqlens, layout.num_queries, layout.max_seqlen, None,
                            None, None, T.batched_runs(layout))
    if not geo.runs:
        return {}
    with recording(capability):
        taken = dict(fwd=T._fwd_by_runs(q, geo),
                     bwd=T._bwd_by_runs(q, geo, QueryMask(),
                                        T._onepass(q, geo, QueryMask(), (q,)) is not None))
    longest = max(geo.run_geometries(), key=lambda run: run.seq_len)
    return {kind: (longest.seq_len, longest.num_seqs, False) for kind, yes in taken.items() if yes}


# The latency parameters of bench.static's Gpu tried by --fit: warp-instructions per
# cycle per resident warp, the most per SM, and the fraction of copy bandwidth reached.
FIT_GRID = dict(ipc_per_warp=(0.11, 0.12, 0.125, 0.13, 0.135, 0.14, 0.15, 0.16),
                max_ipc=(1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.2),
                memory_efficiency=(0.7, 0.75, 0.8, 0.85, 0.9))


def _gpu_key(device_name):
    """bench.static's GPU entry for a measured device's name."""
    for key, word in (("h200", "H200"), ("sm90", "H100"), ("sm80", "A100")):
        if word in device_name:
            return key
    raise ValueError(f"bench.static has no GPU entry for {device_name!r}: add one to "
                     "bench.static.GPUS (SMs, clock, capability) before fitting to it")


def fit(calibration, gpu_key=None):
    """Fit the static model's latency parameters to measured kernel times.

    calibration: a calibration.json (measured µs per kernel, and the configs each
    workload launched). Compiles every kernel with those configs (here, no GPU), then
    picks the parameters of FIT_GRID with the smallest worst-case |log(measured /
    estimate)|. Returns (best parameters, rows with the peak-rate and fitted estimates).
    """
    import contextlib
    import dataclasses
    import itertools
    import math

    import torch

    from adclr_kernels import attention_triton as T
    from bench import static as S
    from bench.tune import as_candidate, swapped
    from bench.workloads import STATIC_WORKLOADS

    if "configs" not in calibration:
        raise ValueError("this calibration.json does not record the configs its kernels ran "
                         "with (bench.calibrate before 2026-11-26): add them, or measure again")
    measured = {(r["workload"], r["kernel"]): r["measured_us"] for r in calibration["rows"]}
    ceil = calibration["meta"].get("ceilings") or {}
    gpu = S.GPUS[gpu_key or _gpu_key(calibration["meta"]["device"])]
    if ceil:
        rate = ceil["bf16_matmul_tflops"] * 1e12
        gpu = dataclasses.replace(gpu, dram_bytes_per_s=ceil["copy_tb_per_s"] * 1e12,
                                  mma_flops=dict(gpu.mma_flops, bf16=rate, fp16=rate))
    kernels = []
    real_fwd, real_bwd = T._fwd_config, T._bwd_config
    try:
        for w in STATIC_WORKLOADS:
            cfg = calibration["configs"].get(w.id)
            if cfg is None:
                continue
            with contextlib.ExitStack() as swaps:
                # A one-shot or one-pass config takes its kernel's rule; a flash config the
                # flash rule alone, as the first calibrations recorded them (where today's
                # rules pick another kernel, the flash kernels measured are left out).
                for kind, c in cfg.items():
                    if c.get("kernel") in ("oneshot", "onepass"):
                        swaps.enter_context(swapped(kind, as_candidate(c)))
                    elif kind == "fwd":
                        T._fwd_config = lambda *a, c=c, **k: dict(c)
                    else:
                        # SPLIT_ROWS came after the first calibration: a config without it
                        # takes the launcher's rule, as tune's candidates do.
                        T._bwd_config = lambda *a, c=c, packed=False, max_len=0, **k: dict(
                            {"SPLIT_ROWS": T.split_rows(c["BLOCK_M1"], packed, max_len)}, **c)
                forward, backward = S.capture(w, torch.bfloat16, gpu.capability)
            for launch in forward + backward:
                if (w.id, launch.name) in measured:
                    kernels.append((w, launch, S.compile_launch(launch, gpu.capability)))
    finally:
        T._fwd_config, T._bwd_config = real_fwd, real_bwd

    # What each kernel's programs execute does not depend on the parameters fitted: worked
    # out once, not at every point of the grid.
    work = [S.kernel_work(launch, compiled, S.sequences(w), w.heads) for w, launch, compiled in kernels]

    def estimates(g):
        return [S.model_kernel(launch, compiled, S.sequences(w), w.heads, w.head_dim, "bf16", g, done)
                for (w, launch, compiled), done in zip(kernels, work)]

    def worst(rows):
        return max(abs(math.log(measured[(w.id, r["kernel"])] / r["estimate_us"]))
                   for (w, _, _), r in zip(kernels, rows))

    peak = estimates(dataclasses.replace(gpu, ipc_per_warp=gpu.issue_per_sm, max_ipc=gpu.issue_per_sm,
                                         memory_efficiency=1.0))
    best = min((dict(zip(FIT_GRID, values)) for values in itertools.product(*FIT_GRID.values())),
               key=lambda p: worst(estimates(dataclasses.replace(gpu, **p))))
    fitted = estimates(dataclasses.replace(gpu, **best))
    rows = [dict(workload=w.id, kernel=launch.name, num_warps=f["num_warps"],
                 programs_per_sm=f["programs_per_sm"], measured_us=measured[(w.id, launch.name)],
                 peak_estimate_us=p["estimate_us"], fitted_estimate_us=f["estimate_us"],
                 fitted_bound=f["bound"])
            for (w, launch, _), p, f in zip(kernels, peak, fitted)]
    return best, rows


def fit_markdown(best, rows, meta):
    lines = [f"# Static model fitted to the {meta['device']} measurements ({meta['when']})", "",
             f"`{meta['command']}`: each kernel recompiled here with the configs it ran with "
             "on the GPU, its time estimated by bench.static with the device's measured ceilings, "
             "first at peak issue rate (the v1/v2 model), then with the fitted latency "
             "parameters: " + ", ".join(f"{k} = {v}" for k, v in best.items()) + ".", "",
             "| workload | kernel | warps x programs/SM | measured µs | peak-rate estimate | measured / peak | fitted estimate | measured / fitted |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['kernel'].strip('_')} | {r['num_warps']} x {r['programs_per_sm']} "
                     f"| {r['measured_us']:.1f} | {r['peak_estimate_us']:.1f} "
                     f"| {r['measured_us'] / r['peak_estimate_us']:.2f} | {r['fitted_estimate_us']:.1f} "
                     f"| {r['measured_us'] / r['fitted_estimate_us']:.2f} |")
    if meta.get("left_out"):
        lines += ["", "Measured, but not launched by the kernels of this fit's checkout (replaced or renamed "
                  "since), so left out: " + ", ".join(meta["left_out"]) + "."]
    return "\n".join(lines) + "\n"


def ceilings():
    """The device's two measured ceilings that the static model assumes (bench/NOTES.md):
    a bf16 matmul's rate on random data and a device-to-device copy's bandwidth, counting
    bytes read plus written; medians of triton.testing.do_bench."""
    import torch
    from triton.testing import do_bench

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    matmul_ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    del a, b
    x = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    copy_ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return dict(bf16_matmul_tflops=2 * n**3 / matmul_ms / 1e9,
                copy_tb_per_s=2 * x.numel() * x.element_size() / copy_ms / 1e9,
                matmul="8192 x 8192 x 8192 bf16, random data", copy="1 GiB bf16 copy_")


def main(argv=None):
    import time

    import torch
    import triton

    parser = argparse.ArgumentParser(prog="python -m bench.calibrate", description=__doc__.split("\n")[0])
    parser.add_argument("--static", default=str(STATIC), help="a bench.static JSON")
    parser.add_argument("--out", default=None, help="folder (default bench/results/<device>)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--fit", metavar="CALIBRATION_JSON",
                        help="no GPU needed: fit the static model's latency parameters to a "
                             "calibration.json measured earlier; writes fit.md and fit.json into "
                             "--out (default: beside it, replacing the fit there)")
    args = parser.parse_args(argv)
    if args.fit:
        if not Path(args.fit).is_file():
            parser.error(f"--fit: {args.fit} is not a file")
        calibration = json.loads(Path(args.fit).read_text())
        best, rows = fit(calibration)
        # Kernels replaced or renamed since the measurement are not launched by this
        # checkout: their times cannot be fitted, and the fit says which it left out.
        fitted = {(r["workload"], r["kernel"]) for r in rows}
        left_out = sorted(f"{r['workload']} {r['kernel']}" for r in calibration["rows"]
                          if (r["workload"], r["kernel"]) not in fitted)
        if left_out:
            print(f"note: {len(left_out)} of {len(calibration['rows'])} measured kernels are not launched by "
                  "this checkout with the recorded configs, and are left out of the fit: "
                  + ", ".join(left_out), file=sys.stderr)
        meta = dict(calibration["meta"], when=calibration["meta"]["when"], left_out=left_out,
                    command="python -m bench.calibrate " + " ".join(argv or sys.argv[1:]))
        out = Path(args.out or Path(args.fit).parent)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fit.json").write_text(json.dumps(dict(meta=meta, best=best, rows=rows), indent=1))
        (out / "fit.md").write_text(fit_markdown(best, rows, meta))
        print(fit_markdown(best, rows, meta))
        return
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: it measures the kernels the static model estimates")
    from bench.workloads import STATIC_WORKLOADS

    device = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    static = json.loads(Path(args.static).read_text())
    measured_ceilings = ceilings()
    print("ceilings: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                   for k, v in measured_ceilings.items()), file=sys.stderr)
    meta = dict(device=device, when=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                triton=triton.__version__, static=args.static,
                command="python -m bench.calibrate " + " ".join(argv or sys.argv[1:]),
                ceilings=measured_ceilings)
    out = Path(args.out or Path(__file__).parent / "results" / device.replace(" ", "_"))
    out.mkdir(parents=True, exist_ok=True)

    def write(measured, configs):  # after every workload: a run cut short keeps what it measured
        rows = join(measured, static["kernels"], f"sm_{10 * major + minor}")
        (out / "calibration.json").write_text(json.dumps(dict(meta=meta, rows=rows, configs=configs),
                                                         indent=1))
        (out / "calibration.md").write_text(markdown(rows, meta))

    write(*measure(STATIC_WORKLOADS, args.rounds, on_workload=write))
    print(f"wrote {out / 'calibration.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
