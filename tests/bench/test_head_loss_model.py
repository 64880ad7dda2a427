"""The static memory model of the head + loss (bench/head_loss.py) against the profiler."""

import pytest

from bench.head_loss import HeadLossWorkload, measure_cpu, static_peak_bytes, vit_s16


@pytest.mark.parametrize("workload", [HeadLossWorkload("small", 6, 3, 5, 2000, 8),
                                      HeadLossWorkload("odd", 5, 1, 3, 1037, 8)])
def test_unfused_model_matches_the_cpu_peak(workload):
    """Where the K-wide buffers dominate (small (K, D) weights), the model counts them all."""
    measured, _ = measure_cpu(workload, "unfused")
    model, _ = static_peak_bytes(workload, "unfused", 4)
    assert abs(measured - model) <= 0.02 * model, (measured, model)


def test_model_at_vit_s16():
    """The figures bench/NOTES.md quotes: at least 5x less memory fused, either precision."""
    w = vit_s16(128)
    assert (w.student_rows, w.teacher_rows) == (4096, 2816)
    for logits_bytes in (2, 4):
        unfused, _ = static_peak_bytes(w, "unfused", logits_bytes)
        for path in ("fused-triton", "fused-torch"):
            assert static_peak_bytes(w, path, logits_bytes)[0] * 5 <= unfused
    assert static_peak_bytes(w, "unfused", 4)[0] == 5568 * 2**20
