"""Time every tile config of a candidate set on the GPU, per workload, forward and backward.

    python -m bench.tune [--workloads vit_s16_global,...] [--out DIR]

The kernels' configs are static (`_fwd_config` / `_bwd_config` in
adclr_kernels/attention_triton.py), chosen with bench.static: no spills, shared memory in
bounds, lowest estimated time. This measures the candidates that pass the same static
checks on the device, one at a time, on the op as the model calls it (packed qkv, bf16),
and writes DIR/tune.json and tune.md: each config's median time and the winner per
workload and kernel. A config is timed only if its output (forward) or gradient
(backward) matches the default config's to bf16 rounding, so a winner is never a wrong
config. The backward is timed alone, on a saved forward (autograd.grad with
retain_graph), and includes the small delta kernel.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# (BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward.
FWD_CANDIDATES = {
    64: [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (64, 128, 4, 2), (64, 64, 8, 2),
         (32, 64, 4, 2), (128, 64, 8, 2), (128, 64, 4, 2), (128, 128, 8, 2), (128, 32, 4, 2),
         (64, 64, 4, 1), (128, 64, 8, 3)],
    128: [(64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (128, 32, 8, 2),
          (128, 64, 8, 2), (64, 32, 4, 3)],
}
# (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages) for the backward.
BWD_CANDIDATES = {
    64: [(32, 64, 64, 32, 4, 2), (32, 64, 64, 32, 4, 1), (32, 64, 64, 32, 4, 3),
         (32, 64, 64, 32, 8, 2), (16, 64, 64, 16, 4, 2), (64, 64, 64, 64, 4, 2),
         (64, 64, 64, 64, 8, 2), (32, 32, 32, 32, 4, 2), (16, 32, 32, 16, 4, 2),
         (32, 128, 128, 32, 8, 2), (64, 128, 128, 64, 8, 2)],
    128: [(16, 64, 64, 16, 4, 1), (16, 64, 64, 16, 4, 2), (16, 64, 64, 16, 8, 2),
          (32, 32, 32, 32, 4, 1), (32, 64, 64, 32, 8, 1), (32, 64, 64, 32, 8, 2),
          (16, 32, 32, 16, 4, 2)],
}


def _fwd_cfg(c):
    return dict(BLOCK_M=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3])


def _bwd_cfg(c):
    return dict(BLOCK_M1=c[0], BLOCK_N1=c[1], BLOCK_M2=c[2], BLOCK_N2=c[3], num_warps=c[4],
                num_stages=c[5], PROGRAM_BLOCK=min(c[1], c[2]))


def _key(cfg):
    """A config dict as the candidate tuples above write it."""
    names = (("BLOCK_M", "BLOCK_N") if "BLOCK_M" in cfg else
             ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"))
    return tuple(cfg[n] for n in names + ("num_warps", "num_stages"))


def _close(a, b):
    import torch

    # Two bf16 results of the same math in another order: within a few bf16 ulps of
    # the larger magnitude; an unwritten tile or a wrong mask is far outside.
    err = (a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)
    return bool(torch.isfinite(a).all()) and err.item() < 2e-2


def tune(workloads, log=print, device="cuda", timer=None, on_row=None):
    """Rows of (workload, kernel, config, ok, ms). timer(fn) -> ms defaults to the median
    of triton.testing.do_bench; device and timer are parameters for the CPU test;
    on_row(rows) is called after each config (to save partial results)."""
    import torch
    from triton.testing import do_bench

    timer = timer or (lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median"))

    from adclr_kernels import unidirectional_attention_qkvpacked
    from adclr_kernels import attention_triton as T

    rows = []
    default_fwd, default_bwd = T._fwd_config, T._bwd_config
    try:
        for w in workloads:
            torch.manual_seed(0)
            qkv = torch.randn(w.batch, w.seq_len, 3, w.heads, w.head_dim, device=device,
                              dtype=torch.bfloat16, requires_grad=True)
            grad = torch.randn(w.batch, w.seq_len, w.heads, w.head_dim, device=device,
                               dtype=torch.bfloat16)

            def forward():
                return unidirectional_attention_qkvpacked(qkv, w.num_queries, w.num_prefix,
                                                          backend="triton")

            with torch.no_grad():
                ref_out = forward()
            ref_grad, = torch.autograd.grad(forward(), qkv, grad)
            capability = 90 if device == "cpu" else T.device_capability(qkv.device)
            # The kernels' own pick first: the baseline every candidate is compared with.
            own = dict(fwd=_key(default_fwd(w.head_dim, torch.bfloat16, capability, w.seq_len)),
                       bwd=_key(default_bwd(w.head_dim, torch.bfloat16, capability,
                                            max_len=w.seq_len)))
            for kind, candidates in (("fwd", FWD_CANDIDATES), ("bwd", BWD_CANDIDATES)):
                listed = candidates.get(w.head_dim, [])
                for c in [own[kind]] + [c for c in listed if c != own[kind]]:
                    cfg = _fwd_cfg(c) if kind == "fwd" else _bwd_cfg(c)
                    if kind == "fwd":
                        T._fwd_config = lambda *a, cfg=cfg, **k: dict(cfg)
                    else:
                        T._bwd_config = lambda *a, cfg=cfg, packed=False, max_len=0, **k: dict(
                            cfg, SPLIT_ROWS=T.split_rows(cfg["BLOCK_M1"], packed, max_len))
                    row = dict(workload=w.id, kernel=kind, config=cfg, default=c == own[kind])
                    try:
                        if kind == "fwd":
                            with torch.no_grad():
                                ok = _close(forward(), ref_out)
                                ms = timer(forward) if ok else None
                        else:
                            out = forward()
                            got, = torch.autograd.grad(out, qkv, grad, retain_graph=True)
                            ok = _close(got, ref_grad)
                            ms = timer(lambda: torch.autograd.grad(
                                out, qkv, grad, retain_graph=True)) if ok else None
                        row.update(ok=ok, ms=ms)
                    except Exception as error:  # a config the compiler refuses (shared memory)
                        row.update(ok=False, ms=None, error=f"{type(error).__name__}: {error}"[:200])
                    finally:
                        T._fwd_config, T._bwd_config = default_fwd, default_bwd
                    rows.append(row)
                    if on_row:
                        on_row(rows)
                    log(f"  {w.id} {kind} {c}: "
                        + (f"{row['ms'] * 1e3:.1f} us" if row.get("ms") else "-")
                        + ("" if row["ok"] else f"  REJECTED {row.get('error', 'mismatch')}"))
    finally:
        T._fwd_config, T._bwd_config = default_fwd, default_bwd
    return rows


def winners(rows):
    """{(workload, kernel): (best row, the kernels' own config's row)}."""
    best = {}
    for r in rows:
        key = (r["workload"], r["kernel"])
        best.setdefault(key, [None, r])
        if r["ok"] and r["ms"] is not None and (best[key][0] is None or r["ms"] < best[key][0]["ms"]):
            best[key][0] = r
    return best


def markdown(rows, meta):
    lines = [f"# Tile configs timed on {meta['device']} ({meta['when']})", "",
             f"`{meta['command']}`; torch {meta['torch']}, Triton {meta['triton']}, bf16, "
             "median of triton.testing.do_bench (CUDA events around each call: the op's "
             "launch overhead is in it where it exceeds the kernels' time). Default: the "
             "config the kernels picked themselves when this ran.", "",
             "| workload | kernel | default µs | best µs | best config | default / best |",
             "|---|---|---|---|---|---|"]
    for (workload, kernel), (best, default) in winners(rows).items():
        if best is None or default.get("ms") is None:
            lines.append(f"| {workload} | {kernel} | - | - | none passed | - |")
            continue
        cfg = ", ".join(f"{k}={v}" for k, v in best["config"].items() if k != "PROGRAM_BLOCK")
        lines.append(f"| {workload} | {kernel} | {default['ms'] * 1e3:.1f} | {best['ms'] * 1e3:.1f} "
                     f"| {cfg} | {default['ms'] / best['ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    import torch
    import triton

    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="vit_s16_local,vit_s16_global,vit_b16_global,"
                        "vit_s8_global,vit_b16_global_d128,vit_b16_local",
                        help="in this order (the sweep may be cut short by a time limit)")
    parser.add_argument("--out", default=None, help="folder (default bench/results/<device>)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: it times the kernels")
    from bench.workloads import STATIC_WORKLOADS

    by_name = {w.name: w for w in STATIC_WORKLOADS if hasattr(w, "num_queries")}
    workloads = [by_name[name] for name in args.workloads.split(",")]
    device = torch.cuda.get_device_name()
    meta = dict(device=device, when=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                triton=triton.__version__,
                command="python -m bench.tune " + " ".join(argv or sys.argv[1:]))
    out = Path(args.out or Path(__file__).parent / "results" / device.replace(" ", "_"))
    out.mkdir(parents=True, exist_ok=True)

    def save(rows):
        (out / "tune.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        (out / "tune.md").write_text(markdown(rows, meta))

    rows = tune(workloads, log=lambda s: print(s, file=sys.stderr, flush=True), on_row=save)
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
