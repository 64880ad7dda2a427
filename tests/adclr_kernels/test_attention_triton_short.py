"""The one-shot kernels (attention_triton_short.py): several whole short sequences of one
head per program, against the float64 reference, with every test checking that they,
and not the flash kernels, ran.

In the interpreter they take sequences of at most 32 tokens in 32-row tiles (32 // L
sequences per program); the GPU configs are run in the interpreter too (fp16, since the
interpreter's bf16 dot is wrong).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import adclr_kernels.attention_triton as T
import adclr_kernels.attention_triton_short as S
import test_visibility
from adclr_kernels import unidirectional_attention, unidirectional_attention_qkvpacked
from adclr_kernels._triton_common import SHARED_MEMORY_PER_PROGRAM
from kernel_testing import ON_CUDA, OPTION_SETS, option_id, options
from test_attention_triton import check_triton, needs_aot

pytestmark = [pytest.mark.usefixtures("poisoned"),
              pytest.mark.skipif(ON_CUDA, reason="the interpreter's tiles: on CUDA the GPU rule applies")]


@pytest.fixture
def launched(monkeypatch):
    """The kernels each call launches: [(name, sequences per program)]."""
    calls = []
    for kernel in (S._oneshot_fwd_kernel, S._oneshot_bwd_kernel, T._unidirectional_fwd_kernel,
                   T._unidirectional_bwd_kernel, T._unidirectional_bwd_delta_kernel,
                   T._onepass_bwd_kernel):
        def run(*args, _real=kernel.run, _name=kernel.fn.__name__, **kwargs):
            calls.append((_name, kwargs.get("GROUP")))
            return _real(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", run)
    return calls


def oneshot(group):
    return [("_oneshot_fwd_kernel", group), ("_oneshot_bwd_kernel", group)]


# (P, N, Q): one token (32 to a tile), two, boundaries inside the tile with B = 5 not a
# multiple of the sequences per program, and the longest sequence the rule takes (32).
LAYOUTS = [(1, 0, 0), (0, 1, 0), (1, 1, 0), (1, 8, 1), (4, 5, 1), (1, 6, 10), (4, 2, 10),
           (1, 21, 10), (4, 28, 0)]


@pytest.mark.parametrize("opt_set", OPTION_SETS, ids=option_id)
@pytest.mark.parametrize("num_prefix,num_raw,num_queries", LAYOUTS)
def test_matches_float64(launched, opt_set, num_prefix, num_raw, num_queries):
    if num_raw == 0 and num_queries:
        pytest.skip("query rows would see nothing")
    check_triton(5, 2, num_prefix, num_raw, num_queries, 16, options(opt_set))
    assert launched == oneshot(32 // (num_prefix + num_raw + num_queries))


@pytest.mark.parametrize("head_dim", [32, 48, 80, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_head_dims_and_dtypes(launched, head_dim, dtype):
    # 11 tokens with query rows that see prefix and self: two sequences per program.
    check_triton(3, 1, 1, 5, 5, head_dim, options(OPTION_SETS[3]), dtype=dtype)
    assert launched == oneshot(2)


def test_longer_sequences_take_the_flash_kernels(launched):
    check_triton(3, 1, 1, 22, 10, 16, options(OPTION_SETS[0]))
    # The flash forward, and the one-pass backward (batched, no mask option).
    assert [name for name, _ in launched] == ["_unidirectional_fwd_kernel", "_onepass_bwd_kernel"]


def test_any_strides(launched):
    # q contiguous as (B, H, L, D), k a slice of a longer buffer (batch stride != L x token
    # stride), v token-major (B, L, H, D) memory, the output gradient broadcast (stride 0).
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 2, 9, 16, generator=g).requires_grad_()
    k_buffer = torch.randn(5, 2, 13, 16, generator=g)
    k = k_buffer[:, :, 2:11].detach().requires_grad_()
    v = torch.randn(5, 9, 2, 16, generator=g).transpose(1, 2).detach().requires_grad_()
    kw = dict(num_queries=2, num_prefix=1, query_sees_self=True)
    out = unidirectional_attention(q, k, v, backend="triton", **kw)
    out.sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = unidirectional_attention(*leaves, backend="reference", **kw)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for got, want in zip((q, k, v), leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-6)
    assert launched == oneshot(3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkvpacked_and_bitwise_deterministic(launched, dtype):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(7, 10, 3, 2, 32, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(7, 10, 2, 32, generator=g).to(dtype)
    runs = []
    for _ in range(2):
        out = unidirectional_attention_qkvpacked(qkv, 3, 1, query_sees_queries=True, backend="triton")
        runs.append((out, *torch.autograd.grad(out, qkv, grad)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert launched == oneshot(3) * 2


@pytest.mark.parametrize("layout,group", [((9, 3), 2), ((4, 2), 4)])
@pytest.mark.parametrize("opt_set", OPTION_SETS, ids=option_id)
def test_unseen_values_stay_out(monkeypatch, poisoned, launched, layout, group, opt_set):
    # test_visibility's property with several sequences per program and a last program
    # partly empty (5 sequences): NaN and inf in q, k, v reach only the rows and
    # gradients that depend on them.
    monkeypatch.setattr(test_visibility, "BATCHED", [layout] * 5)
    form = ("batched", "qkvpacked")[OPTION_SETS.index(opt_set) % 2]
    test_visibility.test_a_value_reaches_only_what_depends_on_it("triton", opt_set, form, poisoned)
    assert set(launched) == set(oneshot(group))


def test_a_non_finite_gradient_stays_in_its_own_sequence(launched):
    """Sequences share a program's tile: P^T dO once spread one crop's NaN gradient row
    into the dV of every crop beside it."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 6, 16, requires_grad=True) for _ in range(3))
    out = unidirectional_attention(q, k, v, 2, 1, backend="triton")
    grad = torch.randn_like(out)
    grad[0, 0, 0, 0] = float("nan")  # a raw row of sequence 0, head 0
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    assert launched == oneshot(5)
    for g in (dq, dk, dv):
        assert torch.isfinite(g[1:]).all() and torch.isfinite(g[:, 1]).all()  # other crops, other head
    # Within its sequence the NaN reaches what that row sees: the raw columns' dV.
    assert dv[0, 0, :4].isnan().any(-1).all() and torch.isfinite(dv[0, 0, 4:]).all()
    others = [t.detach()[1:].double().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(unidirectional_attention(*others, 2, 1, backend="reference"),
                                   others, grad[1:].double())
    for g, e in zip((dq, dk, dv), expected):
        torch.testing.assert_close(g[1:].double(), e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_raw,num_queries,fwd_group,bwd_group", [
    (36, 0, 3, 1),   # a ViT local crop: three to a forward program
    (9, 4, 9, 4),    # 14 tokens
])
def test_gpu_configs_in_the_interpreter(monkeypatch, launched, num_raw, num_queries, fwd_group,
                                        bwd_group):
    monkeypatch.setattr(T, "triton_interpreter_enabled", lambda: False)
    check_triton(4, 2, 1, num_raw, num_queries, 64, options(OPTION_SETS[5]), dtype=torch.float16)
    assert launched == [("_oneshot_fwd_kernel", fwd_group), ("_oneshot_bwd_kernel", bwd_group)]


@pytest.mark.parametrize("dtype,head_dim,capability,length", [
    (torch.float32, 64, 90, 37), (torch.float16, 128, 90, 37), (torch.bfloat16, 64, 86, 37),
    (torch.bfloat16, 64, 90, S.ONESHOT_MAX_LEN + 1), (torch.bfloat16, 64, 80, S.ONESHOT_MAX_LEN + 1)])
def test_gpu_rule_keeps_the_flash_kernels_where_not_predicted_to_win(dtype, head_dim, capability,
                                                                     length):
    assert S.oneshot_config("fwd", S.ONESHOT_MAX_LEN, 64, torch.bfloat16, 90, False)
    assert S.oneshot_config("fwd", length, head_dim, dtype, capability, False) is None
    assert S.oneshot_config("bwd", length, head_dim, dtype, capability, False) is None


@pytest.mark.parametrize("capability, bwd_cap", [(90, None), (80, 168), (100, None)])
def test_gpu_rule_takes_the_crops_on_sm80_and_sm90(capability, bwd_cap):
    # (BLOCK_M, sequences per program, warps, register cap): sm_80's backward capped for
    # 3 programs per SM (bench.static); later GPUs take sm_90's rule.
    assert S.oneshot_config("fwd", 37, 64, torch.bfloat16, capability, False) == (128, 3, 8, None)
    assert S.oneshot_config("bwd", 37, 64, torch.float16, capability, False) == (64, 1, 4, bwd_cap)


COMPILE = """
import json, os, sys
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
from bench.static import compile_check
capability, cases = json.loads(sys.argv[1])
print(json.dumps([compile_check(64, t, capability, flags=tuple(f), layout=tuple(l))
                  for t, l, f in cases]))
"""
# (dtype, (P, N, Q), options): the ViT local crop, and query rows under two mask rules.
COMPILE_CASES = [("bf16", (1, 36, 0), (False, False, False)),
                 ("fp16", (1, 30, 6), (True, True, False)),
                 ("bf16", (4, 20, 10), (False, False, True))]


@pytest.mark.slow
@needs_aot
@pytest.mark.parametrize("capability", [80, 90])
def test_gpu_kernels_compile_without_spills_in_loops(capability):
    # The real Triton pipeline, which the interpreter does not run: the GPU rule's
    # configs compile and keep every value in registers, but for sm_80's backward under
    # its register cap: 56 to 112 bytes, stored and loaded once per program (the kernels
    # have no loops), which bench.static counts in its estimate and still finds faster
    # than 2 programs per SM without the cap (bench/NOTES.md).
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", COMPILE, json.dumps([capability, COMPILE_CASES])],
                          cwd=root, env={**os.environ, "TRITON_INTERPRET": "0"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = SHARED_MEMORY_PER_PROGRAM[capability]
    for case, rows in zip(COMPILE_CASES, json.loads(proc.stdout)):
        assert [row["kernel"] for row in rows] == ["_oneshot_fwd_kernel", "_oneshot_bwd_kernel"], case
        for row in rows:
            assert row["shared_bytes"] <= shared, (case, row)
            assert row["spill_bytes"] <= (128 if row["maxnreg"] else 0), (case, row)
