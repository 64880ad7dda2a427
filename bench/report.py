"""Turn a pytest-benchmark JSON file into a markdown report and a PNG chart.

    pytest bench/ --benchmark-json=results.json
    python -m bench.report results.json [--out DIR] [--no-chart]

writes DIR/report.md (default: the JSON's folder) and DIR/chart.png. The chart is drawn
with Pillow; without it the markdown is still written and says why there is no chart.

Every figure comes from the JSON: the device, software and date in the header are the
ones the benchmark run recorded, and speed-ups are recomputed from the medians.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

# Kept in sync with bench.workloads (not imported: this module needs no torch).
REFERENCE = "reference"
UNMASKED_SDPA = "sdpa_unmasked"
BACKEND_ORDER = ("triton", "reference", "sdpa", "flex", "xformers", UNMASKED_SDPA)
MODE_ORDER = ("forward", "forward+backward", "train step")
COLORS = {"triton": (214, 39, 40), "reference": (127, 127, 127), "sdpa": (31, 119, 180),
          "flex": (44, 160, 44), "xformers": (148, 103, 189), UNMASKED_SDPA: (188, 189, 34)}


# ---------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------


def _median(bench) -> float:
    return bench["stats"]["median"]


def add_ratios(benchmarks) -> None:
    """Add speed-ups (time ratios, > 1 is faster) to each benchmark's extra_info.

    Within one group (same mode and shape): vs `reference`, vs the fastest *other* op
    backend (the yardstick is no peer: it does not compute the op, and "triton+packed"
    is no peer of "triton": the same backend on another path), and vs the unmasked
    SDPA yardstick. A ratio whose counterpart did not run is left out.
    """
    groups = defaultdict(list)
    for bench in benchmarks:
        groups[bench["group"]].append(bench)
    for members in groups.values():
        by_backend = {b["extra_info"].get("backend"): b for b in members}
        for bench in members:
            info, time = bench["extra_info"], _median(bench)
            backend = info.get("backend")
            for key in ("speedup_vs_reference", "speedup_vs_best_peer", "best_peer",
                        "speedup_vs_unmasked_sdpa"):
                info.pop(key, None)
            if REFERENCE in by_backend:
                info["speedup_vs_reference"] = _median(by_backend[REFERENCE]) / time
            if UNMASKED_SDPA in by_backend and backend != UNMASKED_SDPA:
                info["speedup_vs_unmasked_sdpa"] = _median(by_backend[UNMASKED_SDPA]) / time
            base = (backend or "").split("+")[0]
            peers = {name: _median(b) for name, b in by_backend.items()
                     if name != UNMASKED_SDPA and name.split("+")[0] != base}
            if peers and backend != UNMASKED_SDPA:
                best = min(peers, key=peers.get)
                info["best_peer"] = best
                info["speedup_vs_best_peer"] = peers[best] / time
            _add_device_ratios(info, by_backend, base)


def _device_time(bench):
    return bench["extra_info"].get("device_s_per_call")


def _add_device_ratios(info, by_backend, base):
    """The same two ratios in device time per call (kernels only, no launch time), where
    the profiler recorded it: they tell a kernel's speed apart from its host overhead."""
    for key in ("device_speedup_vs_best_peer", "device_best_peer", "device_speedup_vs_unmasked_sdpa"):
        info.pop(key, None)
    own = info.get("device_s_per_call")
    if not own or info.get("backend") == UNMASKED_SDPA:
        return
    if UNMASKED_SDPA in by_backend and _device_time(by_backend[UNMASKED_SDPA]):
        info["device_speedup_vs_unmasked_sdpa"] = _device_time(by_backend[UNMASKED_SDPA]) / own
    peers = {name: _device_time(b) for name, b in by_backend.items()
             if name != UNMASKED_SDPA and name.split("+")[0] != base and _device_time(b)}
    if peers:
        best = min(peers, key=peers.get)
        info["device_best_peer"] = best
        info["device_speedup_vs_best_peer"] = peers[best] / own


def _sort_key(bench):
    info = bench["extra_info"]
    mode = info.get("mode", "")
    backend = info.get("backend", "")
    return (MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), mode,
            bench.get("_order", 0),
            BACKEND_ORDER.index(backend) if backend in BACKEND_ORDER else len(BACKEND_ORDER))


def load(*paths) -> dict:
    """Read pytest-benchmark JSON files of one run; keep the benchmarks this suite wrote.

    Several files (e.g. one per pytest call of a GPU session, each under its own time
    limit) are merged: the first file's machine info, every file's benchmarks, ratios
    recomputed over the union.
    """
    data, benches = None, []
    for path in paths:
        one = json.loads(Path(path).read_text())
        data = data or one
        found = [b for b in one.get("benchmarks", [])
                 if b.get("stats") and "backend" in b.get("extra_info", {})]
        if not found:
            raise ValueError(f"{path}: no adclr benchmark results in it (was it written by "
                             "`pytest bench/ --benchmark-json=...`?)")
        if one is not data and _setup(one) != _setup(data):
            raise ValueError(f"{path}: recorded with {_setup(one)}, {paths[0]} with "
                             f"{_setup(data)}: only files of one device and software merge")
        benches += found
    seen = set()
    for bench in benches:
        key = (bench["group"], bench["extra_info"].get("backend"))
        if key in seen:
            raise ValueError(f"{key[1]} appears twice in group {key[0]!r}: merge files of "
                             "disjoint tests")
        seen.add(key)
    # Keep the shapes in the order the run measured them.
    first_seen = {}
    for bench in benches:
        first_seen.setdefault(bench["group"], len(first_seen))
        bench["_order"] = first_seen[bench["group"]]
    add_ratios(benches)
    data["benchmarks"] = sorted(benches, key=_sort_key)
    return data


# ---------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------


def format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def format_bytes(nbytes) -> str:
    if nbytes is None:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"


def _ratio(info, key):
    value = info.get(key)
    return "–" if value is None else f"{value:.2f}x"


def _setup(data) -> dict:
    info = device_of(data)
    return {k: info.get(k) for k in ("device", "dtype", "torch", "triton", "cuda")}


def device_of(data) -> dict:
    """The adclr machine info the run recorded (device, versions, dtype)."""
    info = dict(data.get("machine_info", {}).get("adclr", {}))
    if "device" not in info:  # older or foreign JSON: fall back to the benchmark rows
        info.update(data["benchmarks"][0]["extra_info"])
    return info


def _round_text(benches) -> str:
    """How a round was timed, as the results recorded it (older results: one call)."""
    calls = sorted({b["extra_info"].get("calls_per_round", 1) for b in benches})
    if calls == [1]:
        return "each round is one call followed by a device synchronise (host wall clock)."
    return (f"each round is {' or '.join(map(str, calls))} back-to-back calls, then one device "
            "synchronise (host wall clock), divided by the calls (`calls_per_round` per result; "
            "the training step is one call per round).")


def to_markdown(data, chart_name: str | None = "chart.png", chart_note: str | None = None) -> str:
    dev = device_of(data)
    benches = data["benchmarks"]
    rounds = sorted({b["stats"]["rounds"] for b in benches})
    versions = f"torch {dev.get('torch', '?')}, triton {dev.get('triton', '?')}"
    if dev.get("cuda"):
        versions += f", CUDA {dev['cuda']}"
    lines = [
        f"# adclr benchmarks: {dev.get('device', 'unknown device')}",
        "",
        f"- Measured {data.get('datetime', '(date not recorded)')[:19].replace('T', ' ')} UTC "
        f"on **{dev.get('device', 'unknown device')}**; {versions}; dtype {dev.get('dtype', '?')}.",
        f"- Time: median of {'/'.join(map(str, rounds))} timed rounds after warm-up; "
        + _round_text(benches),
        "- TFLOP/s counts useful work only: 4·B·H·D FLOPs per visible (row, column) pair "
        "in the forward; the backward counts 2.5x the forward, so forward+backward is 3.5x. "
        "Every backend, the unmasked yardstick too, is credited with the same count.",
        "- Speed-ups are time ratios (> 1 is faster): vs `reference` (the paper's two-path "
        "formulation), vs the fastest other backend (named), and vs `sdpa_unmasked` "
        "(plain SDPA, no mask, same rows and columns: the op if the mask were free).",
        "- Inputs: q, k, v are strided views of one packed qkv projection (B, L, 3, H, D), "
        "as the model calls the op. Backends missing from a group were skipped on this "
        "machine (the pytest output says why).",
        "- Peak memory: bytes torch allocated during one call above what was live before "
        + ("(torch.cuda.max_memory_allocated)." if dev.get("device_type") == "cuda" else
           "(CPU allocations recorded by the torch profiler)."),
    ]
    if dev.get("device_type") == "cpu":
        lines += ["", "> **CPU run**: small shapes and the CPU backends only. These figures "
                  "show that the harness works; they say nothing about GPU speed."]
    if chart_name:
        lines += ["", f"![speed-up over the reference backend]({chart_name})"]
    elif chart_note:
        lines += ["", f"(No chart: {chart_note}.)"]

    by_mode = defaultdict(list)
    for bench in benches:
        by_mode[bench["extra_info"].get("mode", "?")].append(bench)
    for mode, members in by_mode.items():
        rate_key, rate_head = (("items_per_s", "images/s")
                               if any("items_per_s" in b["extra_info"] for b in members)
                               else ("tflops", "TFLOP/s"))
        # The yardstick exists for the op only: no such column for the training step.
        yardstick = any("speedup_vs_unmasked_sdpa" in b["extra_info"] for b in members)
        device = any(_device_time(b) for b in members)
        lines += ["", f"## {mode}", "",
                  f"| shape | backend | median | {rate_head} | peak memory | vs reference "
                  "| vs best peer |" + (" vs unmasked SDPA |" if yardstick else "")
                  + (" device / call | device vs best peer | device vs unmasked SDPA |" if device else ""),
                  "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if yardstick else "")
                  + ("---:|---:|---:|" if device else "")]
        fastest = {}
        for bench in members:
            if bench["extra_info"]["backend"] != UNMASKED_SDPA:
                group = bench["group"]
                if group not in fastest or _median(bench) < _median(fastest[group]):
                    fastest[group] = bench
        last_group = None
        for bench in members:
            info = bench["extra_info"]
            label = info.get("workload_label", bench["group"])
            backend = info["backend"]
            name = f"**{backend}**" if fastest.get(bench["group"]) is bench else backend
            rate = info.get(rate_key)
            peer = _ratio(info, "speedup_vs_best_peer")
            if "best_peer" in info:
                peer += f" ({info['best_peer']})"
            lines.append(
                f"| {label if bench['group'] != last_group else ''} | {name} "
                f"| {format_time(_median(bench))} | {'–' if rate is None else f'{rate:.3g}'} "
                f"| {format_bytes(info.get('peak_memory_bytes'))} "
                f"| {_ratio(info, 'speedup_vs_reference')} | {peer} |"
                + (f" {_ratio(info, 'speedup_vs_unmasked_sdpa')} |" if yardstick else "")
                + (_device_cells(info) if device else ""))
            last_group = bench["group"]
    lines += ["", "Bold: the fastest op backend of each shape."]
    if any(_device_time(b) for b in benches):
        lines += ["Device time: the kernels' and copies' time per call in the torch profiler "
                  "(no host launch time); its ratios compare the backends' kernels alone."]
    return "\n".join(lines) + "\n"


def _device_cells(info):
    seconds = info.get("device_s_per_call")
    peer = _ratio(info, "device_speedup_vs_best_peer")
    if "device_best_peer" in info:
        peer += f" ({info['device_best_peer']})"
    return (f" {'–' if not seconds else format_time(seconds)} | {peer} "
            f"| {_ratio(info, 'device_speedup_vs_unmasked_sdpa')} |")


# ---------------------------------------------------------------------------------------
# Chart (Pillow, a core dependency: no plotting library needed)
# ---------------------------------------------------------------------------------------


def write_chart(data, path) -> str | None:
    """Horizontal bars of speed-up over `reference`, one block per shape and mode.

    Returns None when the PNG was written, else the reason it was not.
    """
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        return "Pillow is not installed (pip install pillow)"

    def font(size):
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: one bitmap size
            return ImageFont.load_default()

    title_font, text_font = font(20), font(14)
    # Build the lines to draw first, so the image gets its height from them.
    items = []  # (kind, payload)
    by_group = defaultdict(list)
    for bench in data["benchmarks"]:
        by_group[bench["group"]].append(bench)
    for group, members in by_group.items():
        times = {b["extra_info"]["backend"]: _median(b) for b in members}
        base_name = REFERENCE if REFERENCE in times else max(times, key=times.get)
        info = members[0]["extra_info"]
        items.append(("group", f"{info.get('mode', '')} | {info.get('workload_label', group)}"
                      f"   (speed-up vs {base_name})"))
        for bench in members:
            backend = bench["extra_info"]["backend"]
            items.append(("bar", (backend, times[base_name] / times[backend], _median(bench))))

    dev = device_of(data)
    width, row, label_w, margin = 1000, 24, 130, 20
    height = margin * 2 + 60 + sum(row + 10 if kind == "group" else row for kind, _ in items)
    scale_max = max((payload[1] for kind, payload in items if kind == "bar"), default=1.0)
    bar_w = width - label_w - margin * 2 - 170
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    title = f"adclr unidirectional attention, {dev.get('device', '?')} ({dev.get('dtype', '?')})"
    draw.text((margin, margin), title, fill="black", font=title_font)
    draw.text((margin, margin + 28), f"torch {dev.get('torch', '?')}, triton "
              f"{dev.get('triton', '?')}, {data.get('datetime', '')[:10]}; longer is faster",
              fill=(90, 90, 90), font=text_font)
    y = margin + 60
    # A tick at 1.0x on every bar row: bars ending left of it are slower than the baseline.
    one_x = margin + label_w + int(bar_w / scale_max)
    for kind, payload in items:
        if kind == "group":
            y += 10
            draw.text((margin, y), payload, fill="black", font=text_font)
            y += row
            continue
        backend, speedup, median = payload
        x0 = margin + label_w
        draw.text((margin + 10, y + 3), backend, fill="black", font=text_font)
        x1 = x0 + max(2, int(bar_w * speedup / scale_max))
        draw.rectangle((x0, y + 2, x1, y + row - 4), fill=COLORS.get(backend, (100, 100, 100)))
        draw.line((one_x, y, one_x, y + row - 2), fill=(60, 60, 60), width=1)
        draw.text((x1 + 6, y + 3), f"{speedup:.2f}x  ({format_time(median)})", fill="black",
                  font=text_font)
        y += row
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return None


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+",
                        help="JSON written by pytest bench/ --benchmark-json=PATH (several: merged)")
    parser.add_argument("--out", help="folder for report.md and chart.png (default: the first JSON's)")
    parser.add_argument("--no-chart", action="store_true", help="write the markdown only")
    args = parser.parse_args(argv)
    missing = [path for path in args.results if not Path(path).is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")

    data = load(*args.results)
    out = Path(args.out) if args.out else Path(args.results[0]).parent
    out.mkdir(parents=True, exist_ok=True)
    chart_note = "--no-chart was given" if args.no_chart else write_chart(data, out / "chart.png")
    markdown = to_markdown(data, None if chart_note else "chart.png", chart_note)
    (out / "report.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out / 'report.md'}")
    print(f"wrote {out / 'chart.png'}" if chart_note is None else f"no chart: {chart_note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
