"""The report tool on a small JSON recorded by `pytest bench/ --benchmark-json` on CPU."""

import copy
import json
import struct
from pathlib import Path

import pytest

from bench import report

RESULTS = Path(__file__).parent / "data" / "cpu_results.json"


@pytest.fixture
def raw():
    return json.loads(RESULTS.read_text())


def _bench(group, backend, median, mode="forward"):
    return {"group": group, "stats": {"median": median, "rounds": 5},
            "extra_info": {"backend": backend, "mode": mode}}


def _by(data, mode, backend):
    (match,) = [b for b in data["benchmarks"]
                if b["extra_info"]["mode"] == mode and b["extra_info"]["backend"] == backend]
    return match


def test_load_keeps_every_result_in_mode_then_backend_order(raw):
    data = report.load(RESULTS)
    assert len(data["benchmarks"]) == len(raw["benchmarks"]) == 9
    modes = [b["extra_info"]["mode"] for b in data["benchmarks"]]
    assert modes == sorted(modes, key=report.MODE_ORDER.index)
    forward = [b["extra_info"]["backend"] for b in data["benchmarks"]
               if b["extra_info"]["mode"] == "forward"]
    assert forward == ["reference", "sdpa", "flex", "sdpa_unmasked"]


def test_split_runs_merge_with_ratios_over_the_union(raw, tmp_path):
    # A GPU session runs flex apart (its compiles get their own time limit): the merged
    # report compares every backend of a group as if they had run in one file.
    flex = [b for b in raw["benchmarks"] if b["extra_info"]["backend"] == "flex"]
    rest = [b for b in raw["benchmarks"] if b["extra_info"]["backend"] != "flex"]
    paths = []
    for name, benches in (("rest", rest), ("flex", flex)):
        part = dict(raw, benchmarks=benches)
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(part))
    merged, whole = report.load(*paths), report.load(RESULTS)
    assert len(merged["benchmarks"]) == len(whole["benchmarks"])
    for a, b in zip(merged["benchmarks"], whole["benchmarks"]):
        assert a["extra_info"] == b["extra_info"]
    with pytest.raises(ValueError, match="no adclr benchmark"):
        empty = tmp_path / "empty.json"
        empty.write_text(json.dumps(dict(raw, benchmarks=[])))
        report.load(paths[0], empty)
    # Files of another device, or the same test twice, do not merge.
    other = json.loads(paths[1].read_text())
    other["machine_info"]["adclr"]["device"] = "another GPU"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="one device and software"):
        report.load(paths[0], tmp_path / "other.json")
    with pytest.raises(ValueError, match="appears twice"):
        report.load(paths[0], paths[0])


def test_ratios_are_recomputed_from_the_recorded_medians(raw):
    data = report.load(RESULTS)
    median = {b["extra_info"]["backend"]: b["stats"]["median"] for b in raw["benchmarks"]
              if b["extra_info"]["mode"] == "forward"}
    sdpa = _by(data, "forward", "sdpa")["extra_info"]
    assert sdpa["speedup_vs_reference"] == pytest.approx(median["reference"] / median["sdpa"])
    assert sdpa["speedup_vs_unmasked_sdpa"] == pytest.approx(
        median["sdpa_unmasked"] / median["sdpa"])
    best = min(("reference", "flex"), key=median.get)
    assert sdpa["best_peer"] == best
    assert sdpa["speedup_vs_best_peer"] == pytest.approx(median[best] / median["sdpa"])
    assert _by(data, "forward", "reference")["extra_info"]["speedup_vs_reference"] == 1.0
    # The yardstick computes no unidirectional attention: it has no peer.
    assert "best_peer" not in _by(data, "forward", "sdpa_unmasked")["extra_info"]


def test_ratios_on_hand_made_medians():
    benches = [_bench("g", "reference", 4.0), _bench("g", "sdpa", 2.0),
               _bench("g", "triton", 1.0), _bench("g", "sdpa_unmasked", 0.5),
               _bench("h", "sdpa", 3.0)]  # another group: never compared with "g"
    report.add_ratios(benches)
    triton = benches[2]["extra_info"]
    assert triton["speedup_vs_reference"] == 4.0
    assert (triton["best_peer"], triton["speedup_vs_best_peer"]) == ("sdpa", 2.0)
    assert triton["speedup_vs_unmasked_sdpa"] == 0.5
    assert benches[1]["extra_info"]["speedup_vs_best_peer"] == 0.5  # sdpa is slower than triton
    alone = benches[4]["extra_info"]
    assert not {"speedup_vs_reference", "best_peer", "speedup_vs_unmasked_sdpa"} & alone.keys()


def test_device_time_ratios_beside_the_wall_clock_ones():
    # Queued wall clock says triton loses to sdpa (host-bound); device time says its kernels win.
    times = {"sdpa": (1.0, 0.8), "triton": (1.5, 0.4), "sdpa_unmasked": (0.9, 0.5), "flex": (2.0, None)}
    benches = []
    for backend, (median, device) in times.items():
        benches.append(_bench("g", backend, median))
        benches[-1]["extra_info"]["device_s_per_call"] = device
    report.add_ratios(benches)
    triton = benches[1]["extra_info"]
    assert triton["best_peer"] == "sdpa" and triton["speedup_vs_best_peer"] == pytest.approx(1 / 1.5)
    assert triton["device_best_peer"] == "sdpa" and triton["device_speedup_vs_best_peer"] == pytest.approx(2.0)
    assert triton["device_speedup_vs_unmasked_sdpa"] == pytest.approx(1.25)
    assert "device_best_peer" not in benches[3]["extra_info"]  # flex has no device time
    assert benches[0]["extra_info"]["device_best_peer"] == "triton"  # flex is no peer without one
    data = {"benchmarks": benches, "machine_info": {}}
    row = next(line for line in report.to_markdown(data, chart_name=None).splitlines()
               if line.startswith("| g | triton") or "| triton |" in line)
    assert row.endswith(f"| {report.format_time(0.4)} | 2.00x (sdpa) | 1.25x |"), row


def test_a_packed_variant_is_not_a_peer_of_its_own_backend():
    benches = [_bench("g", "sdpa", 3.0), _bench("g", "triton", 2.0), _bench("g", "triton+packed", 1.0)]
    report.add_ratios(benches)
    assert benches[2]["extra_info"]["best_peer"] == "sdpa"
    assert benches[1]["extra_info"]["best_peer"] == "sdpa"
    assert benches[0]["extra_info"]["best_peer"] == "triton+packed"


def test_markdown_names_the_device_and_has_a_row_per_result():
    data = report.load(RESULTS)
    text = report.to_markdown(data)
    assert text.startswith("# adclr benchmarks: CPU: AMD EPYC")
    assert "torch 2.13.0+cpu" in text and "dtype float32" in text
    assert "**CPU run**" in text  # a CPU figure never passes for a GPU one
    for section in ("## forward\n", "## forward+backward\n", "## train step\n"):
        assert section in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line
            and not line.startswith("| shape")]
    assert len(rows) == len(data["benchmarks"])
    for bench, row in zip(data["benchmarks"], rows):
        assert row.split(" | ")[1].strip("*") == bench["extra_info"]["backend"]
        assert report.format_time(bench["stats"]["median"]) in row
    # The training step reports images/s and has no yardstick column.
    step_table = text.split("## train step")[1]
    assert "images/s" in step_table and "unmasked" not in step_table
    sdpa = _by(data, "train step", "sdpa")["extra_info"]
    assert f"{sdpa['items_per_s']:.3g}" in step_table


def test_fastest_backend_is_bold():
    data = report.load(RESULTS)
    text = report.to_markdown(data).split("## forward+backward")[0]
    fastest = min((b for b in data["benchmarks"] if b["extra_info"]["mode"] == "forward"
                   and b["extra_info"]["backend"] != "sdpa_unmasked"),
                  key=lambda b: b["stats"]["median"])
    assert f"**{fastest['extra_info']['backend']}**" in text
    assert "**sdpa_unmasked**" not in text


def test_command_writes_markdown_and_png(tmp_path, capsys):
    assert report.main([str(RESULTS), "--out", str(tmp_path)]) == 0
    markdown = (tmp_path / "report.md").read_text()
    assert "![speed-up over the reference backend](chart.png)" in markdown
    png = (tmp_path / "chart.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width == 1000 and height > 300  # one bar per result, not an empty canvas
    assert "wrote" in capsys.readouterr().out


def test_markdown_without_the_chart_library_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "PIL", None)  # import PIL now fails
    assert report.main([str(RESULTS), "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "chart.png").exists()
    assert "No chart: Pillow is not installed" in (tmp_path / "report.md").read_text()
    assert "no chart: Pillow is not installed" in capsys.readouterr().out


def test_json_without_bench_results_is_refused(tmp_path, raw):
    foreign = copy.deepcopy(raw)
    for bench in foreign["benchmarks"]:
        del bench["extra_info"]["backend"]
    path = tmp_path / "other.json"
    path.write_text(json.dumps(foreign))
    with pytest.raises(ValueError, match="no adclr benchmark results"):
        report.load(path)
