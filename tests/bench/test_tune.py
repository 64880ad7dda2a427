"""bench.tune on CPU (Triton's interpreter): every candidate is checked against the
default config before it is timed, and a wrong one is never the winner."""

import pytest

from bench import tune as T
from bench.workloads import Workload

TINY = Workload("tiny", "tiny", images=1, views=2, heads=2, head_dim=64, num_prefix=1,
                num_raw=21, num_queries=3)


def _fake_timer(fn):
    fn()
    return _fake_timer.ms.pop(0)


@pytest.fixture
def two_candidates(monkeypatch):
    monkeypatch.setattr(T, "FWD_CANDIDATES", {64: [(32, 32, 4, 1), (16, 16, 4, 1)]})
    monkeypatch.setattr(T, "BWD_CANDIDATES", {64: [(16, 32, 32, 16, 4, 1), (16, 16, 16, 16, 4, 1)]})


def test_tune_times_each_candidate_and_picks_the_fastest(two_candidates):
    _fake_timer.ms = [0.5, 0.25, 2.0, 3.0]  # fwd default, fwd other, bwd default, bwd other
    rows = T.tune([TINY], log=lambda s: None, device="cpu", timer=_fake_timer)
    assert [(r["kernel"], r["ok"]) for r in rows] == [("fwd", True)] * 2 + [("bwd", True)] * 2
    best = T.winners(rows)
    assert best[(TINY.id, "fwd")][0]["config"]["BLOCK_M"] == 16
    assert best[(TINY.id, "bwd")][0]["config"]["BLOCK_N1"] == 32
    text = T.markdown(rows, dict(device="d", when="w", command="c", torch="t", triton="x"))
    assert f"| {TINY.id} | fwd | 500.0 | 250.0 | BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1 | 2.00 |" in text


def test_a_config_that_computes_something_else_is_rejected(two_candidates, monkeypatch):
    # The second forward candidate leaves its output unwritten (NaN poison): it must be
    # rejected, not timed and crowned, however fast the timer says it is.
    from adclr_kernels import attention_triton

    real = attention_triton.attention_fwd

    def unwritten_with_16_row_tiles(q, k, v, out, *args):
        real(q, k, v, out, *args)
        if attention_triton._fwd_config(64, q.dtype, 90, 64)["BLOCK_M"] == 16:
            out.fill_(float("nan"))

    monkeypatch.setattr(attention_triton, "attention_fwd", unwritten_with_16_row_tiles)
    _fake_timer.ms = [0.5, 2.0, 3.0]  # the rejected candidate is never timed
    rows = T.tune([TINY], log=lambda s: None, device="cpu", timer=_fake_timer)
    fwd = [r for r in rows if r["kernel"] == "fwd"]
    assert fwd[0]["ok"] and not fwd[1]["ok"] and fwd[1]["ms"] is None
    assert T.winners(rows)[(TINY.id, "fwd")][0]["config"]["BLOCK_M"] == 32
