"""The calibration table's join of measured kernel times with the static estimates."""

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
