"""bench.tune on CPU (Triton's interpreter): the own config first, exactly as the op picks
it; each candidate's path and tiles are the ones launched; every candidate is checked
against the own config before it is timed, and a wrong one is never the winner. The
predictions (`--predict`) compile for sm_90 in a process of their own."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import tune as T
from bench.workloads import Workload

TINY = Workload("tiny", "tiny", images=1, views=2, heads=2, head_dim=64, num_prefix=1,
                num_raw=21, num_queries=3)
ROOT = Path(__file__).resolve().parents[2]


def _fake_timer(fn):
    fn()
    return _fake_timer.ms.pop(0)


@pytest.fixture
def interpreter_candidates(monkeypatch):
    # The interpreter's own pick at 25 tokens is the one-shot kernels' 32-row tile.
    monkeypatch.setattr(T, "FWD_CANDIDATES", {64: [T._oneshot(32, 4), T._flash_fwd(16, 16, 4, 1)]})
    monkeypatch.setattr(T, "BWD_CANDIDATES", {64: [T._oneshot(32, 4), T._onepass(16, 32, None),
                                                   T._flash_bwd(16, 32, 32, 16, 4, 1)]})


@pytest.fixture
def launched(monkeypatch):
    """The path and tiles of every kernel launch the op makes, by kind."""
    from adclr_kernels import attention_triton as A

    seen = []

    def spy(name, real, tiles):
        def launcher(*args, **kwargs):
            seen.append((name, tiles(args)))
            return real(*args, **kwargs)
        monkeypatch.setattr(A, name, launcher)

    spy("oneshot_fwd", A.oneshot_fwd, lambda a: a[5][0])       # config: (BLOCK_M, group, warps, cap)
    spy("oneshot_bwd", A.oneshot_bwd, lambda a: a[9][0])
    spy("onepass_bwd", A.onepass_bwd, lambda a: (a[9]["BLOCK_M"], a[9]["BLOCK_N"]))
    real_constants = A._launch_constants

    def constants(kind, *args):
        found = real_constants(kind, *args)
        seen.append((f"flash_{kind}", found[1].get("BLOCK_M", found[1].get("BLOCK_M1"))))
        return found
    monkeypatch.setattr(A, "_launch_constants", constants)
    return seen


@pytest.mark.parametrize("name, fwd, bwd", [
    ("vit_s16_global", T._flash_fwd(128, 32, 4, 2, 168), T._onepass(32, 64)),
    ("vit_s16_local", T._oneshot(128, 8), T._oneshot(64, 4)),
    ("vit_b16_global_d128", T._flash_fwd(64, 32, 4, 2), T._flash_bwd(32, 64, 64, 32, 4, 1)),
])
def test_own_config_is_the_ops_pick_on_a_gpu_with_its_register_cap(name, fwd, bwd, monkeypatch):
    from adclr_kernels import attention_triton as A
    from bench.workloads import STATIC_WORKLOADS

    monkeypatch.setattr(A, "triton_interpreter_enabled", lambda: False)  # the GPU's rules
    w = next(w for w in STATIC_WORKLOADS if w.name == name)
    assert (T.own_config("fwd", w, 90), T.own_config("bwd", w, 90)) == (fwd, bwd)


def test_the_interpreters_own_config_and_the_candidates_that_fit(interpreter_candidates):
    assert T.own_config("fwd", TINY, 90) == T._oneshot(32, 4)
    fwd = T.candidates("fwd", TINY, 90)
    assert fwd == [T._oneshot(32, 4), T._flash_fwd(16, 16, 4, 1)]  # the own one not twice
    long = Workload("long", "long", images=1, views=1, heads=1, head_dim=64, num_prefix=1,
                    num_raw=40, num_queries=0)
    assert all(c["kernel"] != "oneshot" for c in T.candidates("fwd", long, 90)[1:])


@pytest.mark.parametrize("kind, cfg, expect", [
    ("fwd", T._oneshot(32, 4), ("oneshot_fwd", 32)),
    ("fwd", T._flash_fwd(16, 16, 4, 1), ("flash_fwd", 16)),
    ("bwd", T._oneshot(32, 4), ("oneshot_bwd", 32)),
    ("bwd", T._onepass(16, 32, None), ("onepass_bwd", (16, 32))),
    ("bwd", T._flash_bwd(16, 32, 32, 16, 4, 1), ("flash_bwd", 16)),
])
def test_swapped_launches_the_candidates_path_and_tiles_and_restores_the_rules(kind, cfg, expect,
                                                                              launched):
    import torch

    from adclr_kernels import attention_triton as A
    from adclr_kernels import unidirectional_attention_qkvpacked

    rules = (A.oneshot_config, A.onepass_config, A._fwd_config, A._bwd_config)
    qkv = torch.randn(2, TINY.seq_len, 3, 2, 64, requires_grad=True)
    with T.swapped(kind, cfg):
        out = unidirectional_attention_qkvpacked(qkv, TINY.num_queries, TINY.num_prefix,
                                                 backend="triton")
        out.sum().backward()
    assert (A.oneshot_config, A.onepass_config, A._fwd_config, A._bwd_config) == rules
    taken = [entry for entry in launched if entry[0].endswith(kind)]
    assert taken == [expect]
    other = "bwd" if kind == "fwd" else "fwd"  # the other kind keeps its own pick
    assert [e[0] for e in launched if e[0].endswith(other)] == [f"oneshot_{other}"]


def test_tune_times_each_candidate_and_picks_the_fastest(interpreter_candidates):
    _fake_timer.ms = [0.5, 0.25, 2.0, 3.0, 1.0]  # fwd own, fwd flash; bwd own, onepass, flash
    rows = T.tune([TINY], log=lambda s: None, device="cpu", timer=_fake_timer)
    assert [(r["kernel"], r["default"], r["ok"]) for r in rows] == [
        ("fwd", True, True), ("fwd", False, True),
        ("bwd", True, True), ("bwd", False, True), ("bwd", False, True)]
    best = T.winners(rows)
    assert best[(TINY.id, "fwd")][0]["config"] == T._flash_fwd(16, 16, 4, 1)
    assert best[(TINY.id, "bwd")][0]["config"] == T._flash_bwd(16, 32, 32, 16, 4, 1)
    assert best[(TINY.id, "bwd")][1]["config"] == T._oneshot(32, 4)
    text = T.markdown(rows, dict(device="d", when="w", command="c", torch="t", triton="x"))
    assert (f"| {TINY.id} | fwd | flash BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1 "
            "| 250.0 | 2.00 |") in text
    assert f"| {TINY.id} | bwd | **own** oneshot BLOCK_M=32, num_warps=4 | 2000.0 | 1.00 |" in text
    assert "predicted" not in text


def test_a_config_that_computes_something_else_is_rejected(interpreter_candidates, monkeypatch):
    # The flash forward leaves its output unwritten (NaN poison): it must be rejected,
    # not timed and crowned, however fast the timer says it is.
    from adclr_kernels import attention_triton

    real = attention_triton.attention_fwd

    def unwritten(q, k, v, out, lse, geo, *args):
        real(q, k, v, out, lse, geo, *args)
        if attention_triton._oneshot("fwd", q, geo) is None:
            out.fill_(float("nan"))

    monkeypatch.setattr(attention_triton, "attention_fwd", unwritten)
    _fake_timer.ms = [0.5, 2.0, 3.0, 1.0]  # the rejected candidate is never timed
    rows = T.tune([TINY], log=lambda s: None, device="cpu", timer=_fake_timer)
    fwd = [r for r in rows if r["kernel"] == "fwd"]
    assert fwd[0]["ok"] and not fwd[1]["ok"] and fwd[1]["ms"] is None
    assert T.winners(rows)[(TINY.id, "fwd")][0]["config"] == T._oneshot(32, 4)
    assert "rejected: output differs" in T.markdown(rows, dict(device="d", when="w", command="c",
                                                                torch="t", triton="x"))


def test_measured_and_predicted_side_by_side():
    own, other = T._flash_fwd(128, 32, 4, 2, 168), T._flash_fwd(128, 64, 8, 2, 128)
    measured = [dict(workload="w", kernel="fwd", config=own, default=True, ok=True, ms=0.1),
                dict(workload="w", kernel="fwd", config=other, default=False, ok=True, ms=0.12)]
    predicted = [dict(r, ms=None, predicted_us=us) for r, us in zip(measured, (83.7, 79.7))]
    rows = T.with_predictions(measured, predicted)
    assert [r["predicted_us"] for r in rows] == [83.7, 79.7]
    text = T.markdown(rows, dict(device="GPU", when="w", command="c", torch="t", triton="x"))
    assert "| w | fwd | flash BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, maxnreg=128 " \
           "| 120.0 | 0.83 | 79.7 | 1.05 |" in text
    assert ("| w | fwd | flash BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=2, maxnreg=168 "
            "| flash BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, maxnreg=128 | no |") in text


def test_an_unknown_workload_is_named():
    with pytest.raises(SystemExit):
        T.main(["--workloads", "vit_s16_global,nope"])


PREDICT = """
import json, sys
from bench import tune as T
from bench.workloads import Workload
TINY = Workload("tiny", "tiny", images=1, views=2, heads=2, head_dim=64, num_prefix=1,
                num_raw=21, num_queries=3)
T.FWD_CANDIDATES = {64: [T._flash_fwd(64, 64, 4, 2, 128)]}
T.BWD_CANDIDATES = {64: [T._onepass(32, 64)]}
json.dump(T.predict([TINY], log=lambda s: None), sys.stdout)
"""


def test_predict_compiles_each_candidates_kernels_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", PREDICT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    got = [(r["kernel"], r["default"], r["launched"]) for r in rows]
    assert got == [("fwd", True, ["oneshot_fwd_kernel"]), ("fwd", False, ["unidirectional_fwd_kernel"]),
                   ("bwd", True, ["oneshot_bwd_kernel"]), ("bwd", False, ["onepass_bwd_kernel"])]
    assert all(r["ok"] and r["predicted_us"] > 0 and r["ms"] is None for r in rows)
    assert rows[1]["registers"][0] <= 128  # the candidate's register cap was compiled in
