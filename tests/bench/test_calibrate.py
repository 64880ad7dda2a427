"""The calibration table's join of measured kernel times with the static estimates."""

import pytest

from bench.calibrate import join, markdown


def test_measured_times_meet_their_static_rows():
    static = [
        dict(target="sm_90", dtype="bf16", workload="w-b1", kernel="_unidirectional_fwd_kernel",
             estimate_us=50.0, floor_us=40.0, bound="issue"),
        dict(target="sm_80", dtype="bf16", workload="w-b1", kernel="_unidirectional_fwd_kernel",
             estimate_us=90.0, floor_us=80.0, bound="issue"),
        dict(target="sm_90", dtype="fp32", workload="w-b1", kernel="_unidirectional_fwd_kernel",
             estimate_us=500.0, floor_us=80.0, bound="issue"),
    ]
    measured = {("w-b1", "_unidirectional_fwd_kernel"): 75.0,
                ("w-b1", "_unidirectional_bwd_kernel"): 200.0}
    rows = join(measured, static, "sm_90")
    by_kernel = {r["kernel"]: r for r in rows}
    fwd = by_kernel["_unidirectional_fwd_kernel"]
    assert fwd["estimate_us"] == 50.0 and fwd["vs_estimate"] == 1.5 and fwd["vs_floor"] == 1.875
    assert by_kernel["_unidirectional_bwd_kernel"]["estimate_us"] is None  # not in the table
    text = markdown(rows, dict(device="H100", when="today", command="c", torch="t", triton="x",
                               static="s.json"))
    assert "| w-b1 | unidirectional_fwd_kernel | 75.0 | 50.0 | issue | 1.50 | 1.88 |" in text
    assert "| w-b1 | unidirectional_bwd_kernel | 200.0 | - | - | - | - |" in text


@pytest.mark.slow
def test_fit_replays_a_calibration_recorded_before_newer_config_keys(tmp_path):
    # The H200's calibration.json records backward configs without SPLIT_ROWS, which the
    # kernels take since: `python -m bench.calibrate --fit` on it failed with a TypeError.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    recorded = json.loads((root / "bench/results/NVIDIA_H200/calibration.json").read_text())
    keep = "vit_b16_global_d128-b128"  # flash forward and backward, as then: quick to compile
    assert "SPLIT_ROWS" not in recorded["configs"][keep]["bwd"]
    gone = dict(recorded["rows"][0], workload=keep, kernel="_renamed_since_kernel")
    small = dict(recorded, configs={keep: recorded["configs"][keep]},
                 rows=[r for r in recorded["rows"] if r["workload"] == keep] + [gone])
    (tmp_path / "calibration.json").write_text(json.dumps(small))
    proc = subprocess.run([sys.executable, "-m", "bench.calibrate", "--fit", str(tmp_path / "calibration.json")],
                          cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    fitted = json.loads((tmp_path / "fit.json").read_text())
    assert {r["kernel"] for r in fitted["rows"]} == {
        "_unidirectional_fwd_kernel", "_unidirectional_bwd_delta_kernel", "_unidirectional_bwd_kernel"}
    # A measured kernel this checkout does not launch is named, not dropped silently.
    assert fitted["meta"]["left_out"] == [f"{keep} _renamed_since_kernel"]
    assert "1 of 4 measured kernels are not launched" in proc.stderr
    assert "so left out: vit_b16_global_d128-b128 _renamed_since_kernel." in (tmp_path / "fit.md").read_text()


def test_a_measurement_cut_short_keeps_the_workloads_it_measured(tmp_path, monkeypatch):
    """The GPU session stops a stage at its time limit: calibration.json was written once, at
    the end, so a cut-short run returned nothing. It is rewritten after each workload."""
    import json

    import pytest
    import torch

    import bench.calibrate

    def measure(workloads, rounds, on_workload):  # the first workload measured, then the limit
        on_workload({("w-b1", "_unidirectional_fwd_kernel"): 75.0}, {"w-b1": {"fwd": {}}})
        raise KeyboardInterrupt

    for name, value in (("is_available", lambda: True), ("get_device_name", lambda: "Fake GPU"),
                        ("get_device_capability", lambda: (9, 0))):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(bench.calibrate, "ceilings", lambda: dict(bf16_matmul_tflops=700.0, copy_tb_per_s=4.0,
                                                                  matmul="stand-in", copy="stand-in"))
    monkeypatch.setattr(bench.calibrate, "measure", measure)
    with pytest.raises(KeyboardInterrupt):
        bench.calibrate.main(["--out", str(tmp_path)])
    kept = json.loads((tmp_path / "calibration.json").read_text())
    assert [(r["workload"], r["kernel"], r["measured_us"]) for r in kept["rows"]] == [
        ("w-b1", "_unidirectional_fwd_kernel", 75.0)]
    assert "| w-b1 | unidirectional_fwd_kernel | 75.0 |" in (tmp_path / "calibration.md").read_text()


FIT_ONEPASS = """
import json, os
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
from bench.calibrate import fit, launch_configs
from bench.workloads import STATIC_WORKLOADS
w = next(w for w in STATIC_WORKLOADS if w.name == "vit_s16_packed_small")
names = ["_unidirectional_fwd_kernel", "_oneshot_fwd_kernel", "_onepass_bwd_kernel"]
cal = dict(meta=dict(device="NVIDIA A100-SXM4-80GB"), configs={w.id: launch_configs(w, 80)},
           rows=[dict(workload=w.id, kernel=n, measured_us=50.0 + i) for i, n in enumerate(names)])
best, rows = fit(cal)
print(json.dumps(dict(configs=cal["configs"], rows=rows)))
"""


@pytest.mark.slow
def test_fit_replays_one_shot_and_one_pass_configs():
    # A calibration whose backward ran the packed one-pass kernel (an A100's, 32 images of
    # multi-crops) recorded a config without the flash tiles: the fit stopped on a
    # KeyError. Each recorded kernel must be compiled and fitted.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", FIT_ONEPASS], cwd=root, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "0",
                                                       "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    (bwd_config,) = [c["bwd"] for c in out["configs"].values()]
    assert bwd_config["kernel"] == "onepass" and bwd_config["BLOCK_N"] == 32
    assert sorted(r["kernel"] for r in out["rows"]) == [
        "_onepass_bwd_kernel", "_oneshot_fwd_kernel", "_unidirectional_fwd_kernel"]
    assert all(r["fitted_estimate_us"] > 0 for r in out["rows"])


def test_fit_writes_into_an_out_folder_it_makes(tmp_path, monkeypatch):
    """--fit --out into a folder that is not there yet: made, not a FileNotFoundError after
    the whole fit (the fit itself stubbed: the other tests here run it)."""
    import json

    import bench.calibrate

    row = dict(workload="w-b1", kernel="_unidirectional_fwd_kernel", num_warps=4, programs_per_sm=2,
               measured_us=75.0, peak_estimate_us=50.0, fitted_estimate_us=70.0, fitted_bound="issue")
    monkeypatch.setattr(bench.calibrate, "fit", lambda calibration: ({"ipc_per_warp": 0.5}, [row]))
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps(dict(meta=dict(device="NVIDIA H200", when="2026-11-26"),
                                           rows=[dict(row, measured_us=75.0)], configs={})))
    out = tmp_path / "new" / "fit"
    bench.calibrate.main(["--fit", str(calibration), "--out", str(out)])
    assert json.loads((out / "fit.json").read_text())["rows"] == [row]
    assert "| w-b1 | unidirectional_fwd_kernel | 4 x 2 |" in (out / "fit.md").read_text()
