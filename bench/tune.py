"""Time each candidate kernel config on the GPU, per workload, forward and backward; or
predict each one with bench.static, anywhere.

    python -m bench.tune [--workloads vit_s16_global,...] [--out DIR]   # on a GPU
    python -m bench.tune --predict [--out DIR]                          # anywhere, no GPU

The kernels' configs are static rules in adclr_kernels (the one-shot kernels of short
crops, `oneshot_config`; the one-pass backward, `onepass_config`; the flash kernels,
`_fwd_config` / `_bwd_config`), chosen with bench.static. A candidate names the path
(`kernel`: oneshot, onepass or flash) and its tiles, register cap included; the rules
are swapped for it on the op as the model calls it (packed qkv, bf16). The kernels' own
pick is timed first, exactly as the op launches it. A candidate is timed only if its
output (forward) or gradient (backward) matches the own config's to bf16 rounding, so a
winner is never a wrong config. The backward is timed alone, on a saved forward
(autograd.grad with retain_graph).

On a GPU this writes DIR/tune.json and tune.md (default bench/results/<device>): each
candidate's median time beside the own config's, and, where `--predict` has written
bench/results/static/tune_predicted.json, the model's estimate of each: whether the
model ranks the candidates as the GPU does is what a GPU run of this answers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

PREDICTED = Path(__file__).parent / "results" / "static" / "tune_predicted.json"


def _flash_fwd(m, n, warps, stages, maxnreg=None):
    return dict(kernel="flash", BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages,
                maxnreg=maxnreg)


def _flash_bwd(m1, n1, m2, n2, warps, stages, maxnreg=None):
    return dict(kernel="flash", BLOCK_M1=m1, BLOCK_N1=n1, BLOCK_M2=m2, BLOCK_N2=n2,
                num_warps=warps, num_stages=stages, maxnreg=maxnreg)


def _onepass(m, n, maxnreg=168):
    return dict(kernel="onepass", BLOCK_M=m, BLOCK_N=n, num_warps=4, num_stages=1,
                maxnreg=maxnreg)


def _oneshot(m, warps, maxnreg=None):
    return dict(kernel="oneshot", BLOCK_M=m, num_warps=warps, maxnreg=maxnreg)


# Per head_dim, most telling first (a time limit may cut the sweep short). The own config
# of each workload is timed first and not again. What bench/NOTES.md left for a GPU:
# the 128 x 64 forward on 8 warps at 128 registers (the model's first at 207 tokens),
# the d128 backward's 128-key blocks on 8 warps, the one-pass backward's tiles and cap.
FWD_CANDIDATES = {
    64: [_flash_fwd(128, 32, 4, 2, 168), _flash_fwd(128, 64, 8, 2, 128),
         _flash_fwd(128, 64, 8, 3, 128), _flash_fwd(64, 64, 4, 2, 128),
         _flash_fwd(128, 32, 4, 3, 168), _flash_fwd(64, 64, 4, 3, 128),
         _flash_fwd(128, 64, 8, 2), _flash_fwd(128, 128, 8, 2),
         _oneshot(128, 8), _oneshot(64, 4)],
    128: [_flash_fwd(64, 32, 4, 2), _flash_fwd(64, 64, 4, 2), _flash_fwd(64, 32, 4, 3),
          _flash_fwd(128, 64, 8, 2), _flash_fwd(128, 32, 8, 2), _flash_fwd(64, 64, 8, 2)],
}
BWD_CANDIDATES = {
    64: [_onepass(32, 64), _onepass(16, 64), _onepass(32, 32), _onepass(32, 64, None),
         _flash_bwd(32, 64, 64, 32, 4, 2), _flash_bwd(16, 64, 64, 16, 4, 2),
         _flash_bwd(64, 64, 64, 64, 8, 2), _flash_bwd(32, 128, 128, 32, 8, 2),
         _oneshot(64, 4), _oneshot(32, 4)],
    128: [_flash_bwd(32, 64, 64, 32, 4, 1), _flash_bwd(32, 128, 128, 32, 8, 1, 128),
          _flash_bwd(32, 128, 128, 32, 8, 1), _flash_bwd(16, 64, 64, 16, 4, 1),
          _flash_bwd(16, 64, 64, 16, 4, 2), _flash_bwd(32, 64, 64, 32, 8, 1),
          _flash_bwd(32, 32, 32, 32, 4, 1)],
}

# What a rule's dict holds besides the tiles: worked out from the call, not tuned.
_DERIVED = ("HEAD_DIM", "BLOCK_D", "DOT", "VARLEN", "GROUP", "PROGRAM_BLOCK", "SPLIT_ROWS")


def own_config(kind, workload, capability):
    """The config the op launches for this workload (batched, default mask), as a
    candidate."""
    w = workload
    return as_candidate(op_config(kind, w.head_dim, w.heads, capability, w.seq_len, w.batch, False))


def op_config(kind, head_dim, heads, capability, max_len, seqs, packed):
    """The config the op's rules pick for one pass (bf16, default mask) over `seqs`
    sequences of at most max_len tokens, batched or packed: the one-shot kernels' (`kernel`
    "oneshot"), the one-pass backward's ("onepass") or the flash kernels' (no `kernel`)."""
    import torch

    from adclr_kernels import attention_triton as T

    dtype, interpreted = torch.bfloat16, T.triton_interpreter_enabled()
    if not packed:  # short batched sequences run the one-shot kernels
        oneshot = T.oneshot_config(kind, max_len, head_dim, dtype, capability, interpreted)
        if oneshot is not None:
            return dict(zip(("BLOCK_M", "GROUP", "num_warps", "maxnreg"), oneshot), kernel="oneshot")
    if kind == "fwd":
        return T._fwd_config(head_dim, dtype, capability, max_len, packed)
    onepass = T.onepass_config(max_len, head_dim, dtype, capability, interpreted, packed,
                               seqs * heads)
    if onepass is not None:  # the default rule
        return dict(onepass, kernel="onepass")
    return T._bwd_config(head_dim, dtype, capability, packed, max_len=max_len)


def as_candidate(cfg):
    """A rule's config (or bench.calibrate's record of one: `kernel` names the one-shot
    and one-pass kernels, none the flash ones) as a candidate: its path and tiles."""
    cfg = dict({"kernel": "flash"}, **{k: v for k, v in cfg.items() if k not in _DERIVED})
    cfg.setdefault("maxnreg", None)
    return cfg


def candidates(kind, workload, capability):
    """The own config, then every listed candidate that is not it and fits the workload
    (a one-shot tile holds at least one whole sequence)."""
    own = own_config(kind, workload, capability)
    listed = (FWD_CANDIDATES if kind == "fwd" else BWD_CANDIDATES).get(workload.head_dim, [])
    fits = [c for c in listed if c != own
            and (c["kernel"] != "oneshot" or c["BLOCK_M"] >= workload.seq_len)]
    return [own] + fits


def describe(cfg):
    """A candidate in one line: `flash BLOCK_M=128, BLOCK_N=32, num_warps=4, ...`."""
    return cfg["kernel"] + " " + ", ".join(f"{k}={v}" for k, v in cfg.items()
                                           if k != "kernel" and v is not None)


@contextlib.contextmanager
def swapped(kind, cfg):
    """The op takes cfg's path and tiles for `kind`'s kernels (the other kind's rules stay)."""
    from adclr_kernels import attention_triton as T

    saved = dict(oneshot_config=T.oneshot_config, onepass_config=T.onepass_config,
                 _fwd_config=T._fwd_config, _bwd_config=T._bwd_config)
    path = cfg["kernel"]
    tiles = {k: v for k, v in cfg.items() if k != "kernel" and v is not None}

    def oneshot(k, seq_len, head_dim, dtype, capability, interpreted):
        if k != kind:
            return saved["oneshot_config"](k, seq_len, head_dim, dtype, capability, interpreted)
        if path != "oneshot" or seq_len == 0:
            return None
        return tiles["BLOCK_M"], tiles["BLOCK_M"] // seq_len, tiles["num_warps"], tiles.get("maxnreg")

    def onepass(seq_len, head_dim, dtype, capability, interpreted, varlen=False, programs=0,
                runs=False):
        if path != "onepass":
            return None
        return dict(tiles, HEAD_DIM=head_dim, BLOCK_D=T.block_d(head_dim), DOT=T.dot_mode(dtype),
                    VARLEN=varlen)

    T.oneshot_config = oneshot
    if kind == "bwd":
        T.onepass_config = onepass
    if path == "flash" and kind == "fwd":
        T._fwd_config = lambda *a, **k: dict(tiles)
    elif path == "flash":
        T._bwd_config = lambda *a, packed=False, max_len=0, **k: dict(
            tiles, PROGRAM_BLOCK=min(tiles["BLOCK_N1"], tiles["BLOCK_M2"]),
            SPLIT_ROWS=T.split_rows(tiles["BLOCK_M1"], packed, max_len))
    try:
        yield
    finally:
        for name, rule in saved.items():
            setattr(T, name, rule)


def _close(a, b):
    import torch

    # Two bf16 results of the same math in another order: within a few bf16 ulps of
    # the larger magnitude; an unwritten tile or a wrong mask is far outside.
    err = (a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)
    return bool(torch.isfinite(a).all()) and err.item() < 2e-2


def tune(workloads, log=print, device="cuda", timer=None, on_row=None):
    """Rows of (workload, kernel, config, default, ok, ms). timer(fn) -> ms defaults to the
    median of triton.testing.do_bench; device and timer are parameters for the CPU test;
    on_row(rows) is called after each config (to save partial results)."""
    import torch

    from adclr_kernels import attention_triton as T
    from adclr_kernels import unidirectional_attention_qkvpacked

    if timer is None:
        from triton.testing import do_bench

        timer = lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    rows = []
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
        for kind in ("fwd", "bwd"):
            for i, cfg in enumerate(candidates(kind, w, capability)):
                row = dict(workload=w.id, kernel=kind, config=cfg, default=i == 0)
                try:
                    with swapped(kind, cfg):
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
                rows.append(row)
                if on_row:
                    on_row(rows)
                log(f"  {w.id} {kind} {describe(cfg)}: "
                    + (f"{row['ms'] * 1e3:.1f} us" if row.get("ms") else "-")
                    + ("" if row["ok"] else f"  REJECTED {row.get('error', 'mismatch')}"))
    return rows


def predict(workloads, gpu_key="sm90", log=print, on_row=None):
    """bench.static's estimate of every candidate (compiled for the GPU here, none needed):
    rows as tune's, with the estimate in `predicted_us` (the kind's kernels summed) and
    ms None. Needs the compiled kernels, not the interpreter's."""
    import torch

    from bench import static as S

    gpu = S.GPUS[gpu_key]
    rows = []
    for w in workloads:
        for kind in ("fwd", "bwd"):
            for i, cfg in enumerate(candidates(kind, w, gpu.capability)):
                row = dict(workload=w.id, kernel=kind, config=cfg, default=i == 0, ms=None)
                try:
                    with swapped(kind, cfg):
                        forward, backward = S.capture(w, torch.bfloat16, gpu.capability)
                    kernels = [S.model_kernel(launch, S.compile_launch(launch, gpu.capability),
                                              S.sequences(w), w.heads, w.head_dim, "bf16", gpu)
                               for launch in (forward if kind == "fwd" else backward)]
                    row.update(ok=True, predicted_us=sum(k["estimate_us"] for k in kernels),
                               launched=[k["kernel"].strip("_") for k in kernels],
                               registers=[k["registers"] for k in kernels],
                               spill_bytes=[k["spill_bytes"] for k in kernels],
                               programs_per_sm=[k["programs_per_sm"] for k in kernels])
                except Exception as error:  # shared memory over the GPU's, say
                    row.update(ok=False, predicted_us=None,
                               error=f"{type(error).__name__}: {error}"[:200])
                rows.append(row)
                if on_row:
                    on_row(rows)
                log(f"  {w.id} {kind} {describe(cfg)}: "
                    + (f"{row['predicted_us']:.1f} us predicted" if row["ok"]
                       else f"REJECTED {row['error']}"))
    return rows


def with_predictions(rows, predicted_rows):
    """tune's rows, each with the model's predicted_us for the same workload, kind and
    config where the predictions have it."""
    key = lambda r: (r["workload"], r["kernel"], json.dumps(r["config"], sort_keys=True))  # noqa: E731
    known = {key(r): r.get("predicted_us") for r in predicted_rows}
    return [dict(r, predicted_us=known.get(key(r))) for r in rows]


def winners(rows, field="ms"):
    """{(workload, kernel): (best row, the own config's row)} by `field` (ms measured, or
    predicted_us)."""
    best = {}
    for r in rows:
        key = (r["workload"], r["kernel"])
        entry = best.setdefault(key, [None, None])
        if r["default"]:
            entry[1] = r
        if r["ok"] and r.get(field) is not None and (entry[0] is None or r[field] < entry[0][field]):
            entry[0] = r
    return best


def _cell(value, scale=1.0):
    return "-" if value is None else f"{value * scale:.1f}"


def _ratio(own, value):
    return "-" if own is None or value is None else f"{own / value:.2f}"


def markdown(rows, meta):
    measured = any(r.get("ms") is not None for r in rows)
    predicted = any(r.get("predicted_us") is not None for r in rows)
    lines = [f"# Kernel configs {'timed on ' + meta['device'] if measured else 'predicted'} "
             f"({meta['when']})", "",
             f"`{meta['command']}`; torch {meta['torch']}, Triton {meta['triton']}, bf16. "
             + ("Measured: the median of triton.testing.do_bench (CUDA events around each call: "
                "the op's launch overhead is in it where it exceeds the kernels' time). "
                if measured else "")
             + (f"Predicted: bench.static's estimate for {meta.get('model', 'the H100 (sm_90)')}, "
                "the kind's kernels summed. " if predicted else "")
             + "Own: the config the kernels picked themselves when this ran; own / config above "
               "1 is a config faster than the own one.", "",
             "| workload | kind | config | " + ("µs | own / config | " if measured else "")
             + ("predicted µs | own / config, predicted |" if predicted else ""),
             "|---|---|---|" + ("---|---|" if measured else "") + ("---|---|" if predicted else "")]
    best = winners(rows)
    for r in rows:
        own = best[(r["workload"], r["kernel"])][1] or {}
        config = ("**own** " if r["default"] else "") + describe(r["config"])
        if not r["ok"]:
            config += f" (rejected: {r.get('error', 'output differs from the own config')})"
        cells = [r["workload"], r["kernel"], config]
        if measured:
            cells += [_cell(r.get("ms"), 1e3), _ratio(own.get("ms"), r.get("ms"))]
        if predicted:
            cells += [_cell(r.get("predicted_us")), _ratio(own.get("predicted_us"), r.get("predicted_us"))]
        lines.append("| " + " | ".join(cells) + " |")
    if measured and predicted:
        lines += ["", "Fastest per workload and kind, measured and predicted:", "",
                  "| workload | kind | fastest measured | fastest predicted | same |", "|---|---|---|---|---|"]
        by_model = winners(rows, "predicted_us")
        for key, (fastest, _) in best.items():
            model = by_model[key][0]
            lines.append(f"| {key[0]} | {key[1]} | {describe(fastest['config']) if fastest else '-'} "
                         f"| {describe(model['config']) if model else '-'} "
                         f"| {'yes' if fastest and model and fastest['config'] == model['config'] else 'no'} |")
    return "\n".join(lines) + "\n"


TUNE_WORKLOADS = "vit_s16_global,vit_l16_global,vit_b16_global_d128,vit_s8_global,vit_s16_local"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default=TUNE_WORKLOADS,
                        help="batched workloads of bench.workloads, in this order (a time limit may "
                             f"cut the sweep short; default: {TUNE_WORKLOADS})")
    parser.add_argument("--predict", action="store_true",
                        help="no GPU: bench.static's estimate of each candidate, for an H100 (sm_90), "
                             "into bench/results/static/tune_predicted.{json,md} unless --out")
    parser.add_argument("--out", default=None, help="folder (default bench/results/<device>, "
                        "or bench/results/static with --predict)")
    args = parser.parse_args(argv)
    if args.predict:
        # The compiled kernels, not the interpreter's (set before adclr_kernels is imported).
        os.environ["TRITON_INTERPRET"] = "0"
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from bench.workloads import STATIC_WORKLOADS

    by_name = {w.name: w for w in STATIC_WORKLOADS if hasattr(w, "num_queries")}
    unknown = [n for n in args.workloads.split(",") if n not in by_name]
    if unknown:
        parser.error(f"--workloads: no batched workload {', '.join(unknown)}; "
                     f"choose from {', '.join(by_name)}")
    import torch
    import triton

    if not args.predict and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: it times the kernels (--predict estimates them anywhere)")
    workloads = [by_name[name] for name in args.workloads.split(",")]
    device = "H100 (sm_90) model" if args.predict else torch.cuda.get_device_name()
    meta = dict(device=device, when=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                triton=triton.__version__,
                command="python -m bench.tune " + " ".join(argv if argv is not None else sys.argv[1:]))
    results = Path(__file__).parent / "results"
    out = Path(args.out or (results / "static" if args.predict else results / device.replace(" ", "_")))
    out.mkdir(parents=True, exist_ok=True)
    name = "tune_predicted" if args.predict else "tune"
    predictions = []
    if not args.predict and PREDICTED.exists():
        predictions = json.loads(PREDICTED.read_text())["rows"]
        meta["predicted"] = str(PREDICTED.relative_to(Path(__file__).parent.parent))

    def save(rows):
        rows = with_predictions(rows, predictions) if predictions else rows
        (out / f"{name}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        (out / f"{name}.md").write_text(markdown(rows, meta))

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    started = time.time()
    rows = (predict(workloads, log=log, on_row=save) if args.predict
            else tune(workloads, log=log, on_row=save))
    save(rows)
    print(f"wrote {out / name}.md and .json in {time.time() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
