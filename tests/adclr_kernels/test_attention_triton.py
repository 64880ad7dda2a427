"""The Triton implementation (attention_triton.py): the kernels against float64 references
(interpreter on CPU, native on CUDA), their GPU tile configs, the custom ops (opcheck,
torch.compile, the eager path), and the launched kernels compiled for every GPU target.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import adclr_kernels.attention_triton as T
from adclr_kernels import (VarlenLayout, unidirectional_attention, unidirectional_attention_qkvpacked,
                           unidirectional_attention_varlen, unidirectional_attention_varlen_qkvpacked)
from adclr_kernels._triton_common import SHARED_MEMORY_PER_PROGRAM
from adclr_kernels.attention_torch import dense_masked_attention
from adclr_kernels.mask import query_mask
from kernel_testing import (DEVICE, ON_CUDA, OPTION_SETS, assert_fa_close, assert_rel_close, make_qkv, mask_of,
                            option_id, options, reference_grads)

pytestmark = pytest.mark.usefixtures("poisoned")

def check_triton(batch, heads, num_prefix, num_raw, num_queries, head_dim, opts,
                 dtype=torch.float32, seed=0, qkv=None, **make_kw):
    q, k, v = qkv or make_qkv(batch, heads, num_prefix, num_raw, num_queries, head_dim, opts,
                              dtype=dtype, seed=seed, **make_kw)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(q.shape, generator=g, dtype=torch.float64).to(DEVICE)
    kw = dict(num_queries=num_queries, num_prefix=num_prefix)

    # Leaves that keep the packed strides, so the kernel really reads strided views.
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = unidirectional_attention(*leaves, backend="triton", **kw, **opts)
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))

    assert out.shape == q.shape and out.dtype == dtype
    ref64, grads64 = reference_grads(dense_masked_attention, q.double(), k.double(),
                                     v.double(), grad_out, mask=mask_of(opts), **kw)
    if dtype == torch.float32:
        assert_rel_close("out", out, ref64)
        for name, got, want in zip("qkv", grads, grads64):
            assert_rel_close(f"d{name}", got, want)
    else:
        ref_lo, grads_lo = reference_grads(dense_masked_attention, q, k, v, grad_out.to(dtype),
                                           mask=mask_of(opts), **kw)
        assert_fa_close("out", out, ref64, ref_lo)
        for name, got, want, lo in zip("qkv", grads, grads64, grads_lo):
            assert_fa_close(f"d{name}", got, want, lo)
    return out, grads


@pytest.mark.parametrize("opt_set", OPTION_SETS, ids=option_id)
@pytest.mark.parametrize("num_prefix", [1, 4])
@pytest.mark.parametrize("num_queries", [0, 1, 10])
def test_every_option_prefix_and_query_count(opt_set, num_prefix, num_queries):
    # 37 raw tokens: P + N + Q is 38..51, never a multiple of a block.
    check_triton(2, 2, num_prefix, 37, num_queries, 64, options(opt_set))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [32, 48, 64, 80, 96, 128])
def test_head_dims_and_dtypes(head_dim, dtype):
    check_triton(2, 3, 1, 49, 10, head_dim, options(OPTION_SETS[0]), dtype=dtype)


@pytest.mark.parametrize("num_prefix,num_raw,num_queries,opt_set", [
    (1, 1, 1, OPTION_SETS[0]),        # shortest sequence with a query token
    (1, 130, 7, OPTION_SETS[0]),      # several row and column blocks
    (5, 96, 33, OPTION_SETS[4]),      # queries span two blocks and see each other
    (3, 61, 40, OPTION_SETS[2]),      # the self-diagonal crosses a block edge
    (2, 0, 3, OPTION_SETS[1]),        # no raw tokens: queries see only the prefix
    (0, 0, 5, OPTION_SETS[2]),        # queries only, each seeing just itself
    (0, 20, 4, OPTION_SETS[0]),       # no prefix token at all
    (4, 29, 0, OPTION_SETS[5]),       # options with no query tokens
    (40, 20, 6, OPTION_SETS[0]),      # whole key blocks of prefix only, skipped by queries
])
def test_odd_layouts(num_prefix, num_raw, num_queries, opt_set):
    check_triton(1, 2, num_prefix, num_raw, num_queries, 32, options(opt_set))


@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA every test already runs the GPU tiles")
@pytest.mark.parametrize("opt_set", [OPTION_SETS[0], OPTION_SETS[3], OPTION_SETS[4]])
@pytest.mark.parametrize("num_prefix,num_raw,num_queries", [(1, 196, 10), (70, 120, 17),
                                                             (1, 600, 10)])
def test_gpu_tile_sizes_in_the_interpreter(monkeypatch, opt_set, num_prefix, num_raw, num_queries):
    # The interpreter normally runs small tiles; this runs the tiles a GPU launches
    # (fp32: 64-row blocks over 32-key blocks), incl. prefix-only key blocks at P = 70.
    monkeypatch.setattr(T, "triton_interpreter_enabled", lambda: False)
    assert T._fwd_config(64, torch.float32, 90, 207)["BLOCK_M"] == 64
    check_triton(1, 1, num_prefix, num_raw, num_queries, 64, options(opt_set))


@pytest.mark.parametrize("sees_queries,capability,capped", [(False, 90, True), (True, 90, False),
                                                           (False, 80, False)])
def test_forward_register_cap_of_64_row_tiles(monkeypatch, sees_queries, capability, capped):
    # On sm_90 the 64 x 64 forward is capped at 128 registers (4 programs per SM), except
    # for query rows that see query keys, which would spill inside the loops there.
    monkeypatch.setattr(T, "triton_interpreter_enabled", lambda: False)
    mask = query_mask(False, False, sees_queries)
    for max_len in (37, 795):  # a local crop, ViT-S/8
        cfg = T._fwd_config(64, torch.bfloat16, capability, max_len, mask=mask)
        assert (cfg["BLOCK_M"], cfg.get("maxnreg")) == (64, 128 if capped else None)


@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA every test already runs the GPU tiles")
@pytest.mark.parametrize("capability", [90, 80, 86])
@pytest.mark.parametrize("dtype,head_dim,num_raw", [
    (torch.float16, 64, 196), (torch.float16, 64, 600), (torch.float16, 128, 196),
    (torch.float32, 128, 100), (torch.float32, 256, 60)])
def test_every_gpu_config_in_the_interpreter(monkeypatch, capability, dtype, head_dim, num_raw):
    # Each target's configs (tiles, warps, stages) run in the interpreter. fp16 stands
    # for bf16 here: the two share their configs, and the interpreter's bf16 dot is wrong.
    # The forward's unmasked tiles sum l on the tensor cores for 16-bit inputs on sm_90.
    monkeypatch.setattr(T, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(T, "device_capability", lambda device: capability)
    launched = []
    real = T._unidirectional_fwd_kernel.run
    monkeypatch.setattr(T._unidirectional_fwd_kernel, "run",
                        lambda *a, **k: launched.append(k) or real(*a, **k))
    check_triton(1, 1, 1, num_raw, 10, head_dim, options(OPTION_SETS[3]), dtype=dtype)
    assert [k["ROWSUM_MMA"] for k in launched] == [capability >= 90 and dtype == torch.float16]


@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA every test already runs the GPU tiles")
@pytest.mark.parametrize("num_prefix,num_raw,num_queries,opt_set,steps", [
    (1, 52, 10, OPTION_SETS[0], 16),   # 63 tokens: one 64-row block
    (4, 60, 0, OPTION_SETS[3], 16),    # 64 tokens, no query rows
    (1, 63, 1, OPTION_SETS[2], 32),    # 65: the first token of a second block
    (4, 51, 10, OPTION_SETS[4], 32),   # 65, query rows seeing query keys
    (4, 115, 10, OPTION_SETS[0], 32),  # 129, across three blocks
])
def test_head_dim_128_backward_tiles_in_the_interpreter(monkeypatch, num_prefix, num_raw,
                                                        num_queries, opt_set, steps):
    # sm_90's 16-bit backward at head_dim 128 (fp16 standing for bf16): 32-wide row and key
    # steps in 64-row blocks for sequences of more than one block, 16-wide for one; past
    # two row steps the first dK/dV pass takes its whole row tiles unmasked, then the last.
    monkeypatch.setattr(T, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(T, "device_capability", lambda device: 90)
    launched = []
    real = T._unidirectional_bwd_kernel.run
    monkeypatch.setattr(T._unidirectional_bwd_kernel, "run",
                        lambda *a, **k: launched.append(k) or real(*a, **k))
    check_triton(1, 2, num_prefix, num_raw, num_queries, 128, options(opt_set), dtype=torch.float16)
    assert [(k["BLOCK_M1"], k["BLOCK_N1"], k["BLOCK_M2"], k["BLOCK_N2"]) for k in launched] == [
        (steps, 64, 64, steps)]
    assert launched[0]["SPLIT_ROWS"] == (num_prefix + num_raw + num_queries > 2 * steps)


@pytest.mark.parametrize("dtype,gpu_tiles", [(torch.float32, False), (torch.float16, False),
                                             (torch.float16, True)])
def test_rising_and_jumping_row_maxima(monkeypatch, dtype, gpu_tiles):
    # With 16-bit inputs the forward's interior tiles rescale only when a row's maximum has
    # risen more than RESCALE_SLACK (15, log2 units) above the m they subtract (fp32 rescales
    # every tile). Channel 0 makes the scores of even rows climb about 6.5 per 32 keys, 40
    # in all, with a jump of 20 at key 150, and those of odd rows fall: tiles that skip the
    # rescale (p up to 2^15) and tiles that take it, in every block. Without the rescale p
    # would reach 2^40, past fp16.
    if gpu_tiles:
        if DEVICE == "cuda":
            pytest.skip("on CUDA every test already runs the GPU tiles")
        monkeypatch.setattr(T, "triton_interpreter_enabled", lambda: False)
        monkeypatch.setattr(T, "device_capability", lambda device: 90)
    num_prefix, num_raw, num_queries = 1, 196, 10
    q, k, v = make_qkv(1, 2, num_prefix, num_raw, num_queries, 64, options(OPTION_SETS[0]))
    q[..., 0] = torch.where(torch.arange(q.shape[2], device=DEVICE) % 2 == 0, 8.0, -8.0)
    k[..., 0] = torch.arange(k.shape[2], device=DEVICE) * 0.14
    k[:, :, 150, 0] += 14.0
    qkv = tuple(t.to(dtype) for t in (q, k, v))
    out, _ = check_triton(1, 2, num_prefix, num_raw, num_queries, 64, options(OPTION_SETS[0]),
                          dtype=dtype, qkv=qkv)
    # Row 3's scores now climb 3.75x as fast: its block rescales in other tiles, which
    # leaves every other row's output bit for bit.
    q3 = qkv[0].clone()
    q3[:, :, 3, 0] = 30.0
    moved = unidirectional_attention(q3, *qkv[1:], num_queries, num_prefix, backend="triton")
    assert not torch.equal(moved[:, :, 3], out[:, :, 3])
    others = torch.arange(out.shape[2], device=DEVICE) != 3
    assert torch.equal(moved[:, :, others], out[:, :, others])


@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA every test already runs the GPU tiles")
@pytest.mark.parametrize("num_prefix,num_raw", [(20, 600), (40, 590)])
def test_wide_first_tile_in_the_interpreter(monkeypatch, num_prefix, num_raw):
    # Past 512 tokens the forward's first tile is 32 columns wide: a prefix that fits in it
    # (20) and one that goes on column by column after it (40); the other blocks leave more
    # columns over after whole key steps (620 % 64 = 44, 630 % 64 = 54) than it takes.
    # (1 prefix, 600 raw tokens: 25 left over, all in the tile, runs in the test above.)
    monkeypatch.setattr(T, "triton_interpreter_enabled", lambda: False)
    assert T._fwd_config(64, torch.float16, 90, num_prefix + num_raw + 10)["FIRST_BLOCK"] == 32
    check_triton(1, 1, num_prefix, num_raw, 10, 64, options(OPTION_SETS[0]), dtype=torch.float16)


@pytest.mark.parametrize("num_prefix,num_raw,head_dim,dtype", [
    (1, 196, 64, torch.float16), (4, 193, 64, torch.float16), (2, 600, 64, torch.float16),
    (1, 196, 128, torch.float16), (1, 196, 64, torch.bfloat16), (2, 193, 64, torch.float32)],
    ids=["fp16-P1", "fp16-P4", "fp16-L612", "fp16-d128", "bf16", "fp32"])
@pytest.mark.parametrize("tensor,value", [(2, float("nan")), (2, float("inf")), (1, float("nan"))],
                         ids=["v-nan", "v-inf", "k-nan"])
def test_first_tile_mixes_prefix_and_raw_columns_at_gpu_tiles(monkeypatch, num_prefix, num_raw, head_dim,
                                                               dtype, tensor, value):
    # The forward's and dQ's first narrow tile takes a block's prefix columns, which its
    # query rows do not see, beside the raw columns left over after whole key steps, which
    # all rows see (ViT-S/16's 207 tokens: 4 of them at 128 x 32; ViT-S/8's: 16 at 64 x 64;
    # dQ at 64 x 32). A non-finite prefix value or key must reach every raw row's output
    # and dq, and leave the query rows' bit for bit. (bf16 in the interpreter takes fp32
    # products, and its bf16 arithmetic is on the bits.)
    if DEVICE != "cuda":
        monkeypatch.setattr(T, "triton_interpreter_enabled", lambda: False)
        monkeypatch.setattr(T, "device_capability", lambda device: 90)
    num_queries, opts = 10, options(OPTION_SETS[0])
    qkv = make_qkv(1, 1, num_prefix, num_raw, num_queries, head_dim, opts, dtype=dtype)
    clean, (clean_dq, _, _) = check_triton(1, 1, num_prefix, num_raw, num_queries, head_dim, opts,
                                           dtype=dtype, qkv=qkv)
    dirty = [t.clone() for t in qkv]
    dirty[tensor][0, 0, num_prefix - 1, 5] = value
    leaves = [t.requires_grad_() for t in dirty]
    out = unidirectional_attention(*leaves, num_queries, num_prefix, backend="triton")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64).to(DEVICE, dtype)
    (dq,) = torch.autograd.grad(out, leaves[:1], grad_out)
    visible = num_prefix + num_raw
    for name, got, want in (("out", out, clean), ("dq", dq, clean_dq)):
        assert torch.equal(got[0, 0, visible:], want[0, 0, visible:]), f"a query row's {name} moved"
        assert not got[0, 0, :visible].isfinite().all(-1).any(), f"a raw row's {name} stayed finite"


@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA every test already runs the GPU tiles")
@pytest.mark.parametrize("opt_set,num_raw,num_queries", [(OPTION_SETS[0], 46, 0), (OPTION_SETS[3], 36, 10),
                                                         (OPTION_SETS[4], 53, 10)])
def test_short_sequence_backward_computes_delta_in_its_program(monkeypatch, opt_set, num_raw, num_queries):
    # A sequence too long for the one-shot kernels (47 tokens; 64 at most) fits one 64-row
    # program at the fp16/bf16 GPU tiles: the backward runs without the delta pre-pass,
    # under the register cap.
    monkeypatch.setattr(T, "triton_interpreter_enabled", lambda: False)
    launched = []
    real = T._unidirectional_bwd_delta_kernel.run
    monkeypatch.setattr(T._unidirectional_bwd_delta_kernel, "run",
                        lambda *a, **k: launched.append(1) or real(*a, **k))
    check_triton(2, 2, 1, num_raw, num_queries, 64, options(opt_set), dtype=torch.float16)
    assert not launched


@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA every test already runs the GPU tiles")
@pytest.mark.parametrize("lengths,queries,num_prefix", [
    ([1 + 196 + 10, 1 + 36, 1 + 196 + 10], [10, 0, 10], 1),  # the trainer's crops
    ([70 + 120 + 17, 70 + 30 + 3], [17, 3], 70),             # prefix wider than a key tile
    ([50, 37], [0, 0], 0),                                  # no prefix, no queries
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_tile_sizes_packed_in_the_interpreter(monkeypatch, lengths, queries, num_prefix, dtype):
    # The packed-qkv varlen path with a VarlenLayout at the tiles a GPU launches:
    # interior, boundary and prefix tiles, and the tile table; fp16 (bf16's configs,
    # which the interpreter cannot dot) with the packed backward's register cap.
    monkeypatch.setattr(T, "triton_interpreter_enabled", lambda: False)
    if dtype == torch.float16:
        assert T._bwd_config(64, dtype, 90, packed=True).get("maxnreg")
    layout = VarlenLayout(lengths, queries)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(sum(lengths), 3, 1, 64, generator=g).to(dtype).requires_grad_()
    grad_out = torch.randn(sum(lengths), 1, 64, generator=g).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-3  # fp16 inputs, fp32 accumulation
    out = unidirectional_attention_varlen_qkvpacked(qkv, layout, num_prefix=num_prefix,
                                                    backend="triton")
    (dqkv,) = torch.autograd.grad(out, qkv, grad_out)
    for (start, end), nq in zip(layout.bounds(), queries):
        batched = [t.detach().double()[start:end].transpose(0, 1)[None].requires_grad_()
                   for t in qkv.unbind(1)]
        ref = dense_masked_attention(*batched, nq, num_prefix)
        grads = torch.autograd.grad(ref, batched, grad_out.double()[start:end].transpose(0, 1)[None])
        assert_rel_close("out", out[start:end], ref[0].transpose(0, 1), tol)
        for i, want in enumerate(grads):
            assert_rel_close(f"d{'qkv'[i]}", dqkv[start:end, i], want[0].transpose(0, 1), tol)


@pytest.mark.parametrize("packed", [True, False], ids=["packed_qkv", "separate"])
def test_full_length_keys_are_ignored_without_options(packed):
    # k/v of length seq with no option: query keys exist but nobody may read them,
    # so their gradient is exactly zero.
    _, (_, dk, dv) = check_triton(2, 2, 1, 37, 10, 64, options(OPTION_SETS[1]),
                                  short_keys=False, packed=packed)
    assert dk.shape[2] == 48
    assert torch.all(dk[:, :, 38:] == 0) and torch.all(dv[:, :, 38:] == 0)


def test_output_is_a_view_of_a_token_major_buffer():
    q, k, v = make_qkv(2, 3, 1, 20, 4, 32, options(OPTION_SETS[0]), dtype=torch.float32)
    out = unidirectional_attention(q, k, v, 4, backend="triton")
    # (batch, seq, heads * head_dim) for the output projection without a copy.
    assert out.transpose(1, 2).is_contiguous()


def test_sum_backward_with_stride_zero_grad():
    q, k, v = make_qkv(2, 2, 1, 37, 10, 32, options(OPTION_SETS[0]), dtype=torch.float32)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    unidirectional_attention(*leaves, 10, backend="triton").sum().backward()
    ref = [t.detach().requires_grad_() for t in (q.double(), k.double(), v.double())]
    dense_masked_attention(*ref, 10, 1).sum().backward()
    for got, want in zip(leaves, ref):
        assert_rel_close("grad", got.grad, want.grad)


def test_raw_outputs_do_not_depend_on_query_tokens():
    opts = options(OPTION_SETS[4])  # the widest option: queries see everything allowed
    q, k, v = make_qkv(2, 2, 1, 37, 10, 64, opts, dtype=torch.float16, seed=3)
    out1 = unidirectional_attention(q, k, v, 10, **opts, backend="triton")
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, 38:] = torch.randn_like(t[:, :, 38:])
    out2 = unidirectional_attention(q2, k2, v2, 10, **opts, backend="triton")
    assert torch.equal(out1[:, :, :38], out2[:, :, :38])
    assert not torch.equal(out1[:, :, 38:], out2[:, :, 38:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_backward_is_bitwise_deterministic(dtype):
    opts = options(OPTION_SETS[5])
    q, k, v = make_qkv(2, 2, 3, 70, 10, 64, opts, dtype=dtype, seed=5)
    grad_out = torch.randn_like(q)

    def grads():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = unidirectional_attention(*leaves, 10, 3, **opts, backend="triton")
        return torch.autograd.grad(out, leaves, grad_out)

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def test_empty_batch():
    q, k, v = make_qkv(0, 2, 1, 10, 3, 32, options(OPTION_SETS[0]), dtype=torch.float32)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = unidirectional_attention(*leaves, 3, backend="triton")
    assert out.shape == (0, 2, 14, 32)
    out.sum().backward()
    assert leaves[1].grad.shape == k.shape


# ---------------------------------------------------------------------------------------
# The custom ops: opcheck, torch.compile, and the eager path beside them
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", ["batched", "runs"])
@pytest.mark.parametrize("opt_set", [OPTION_SETS[0], OPTION_SETS[5]])
def test_opcheck(opt_set, packing):
    opts = options(opt_set)
    q, k, v = make_qkv(1, 2, 1, 20, 4, 32, opts, dtype=torch.float32)
    if packing == "batched":
        geometry = (None, None, None, None, None, 4, 0, [])
    else:  # two runs (T.batched_runs): the forward takes them by runs, and the backward too
        # under query_sees_queries (no packed one-pass kernel; both runs one-shot's here)
        layout = VarlenLayout([9, 9, 20], [0, 0, 4], device=DEVICE)
        q, k, v = (torch.randn(layout.total_tokens, 2, 32, device=DEVICE) for _ in range(3))
        cu, nq, max_len, fwd_tiles, bwd_tiles, seq_tiles, runs = T.varlen_tables(layout, q)
        assert runs
        geometry = (cu, nq, fwd_tiles, bwd_tiles, seq_tiles, 0, max_len, list(runs))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    args = (*leaves, *geometry, 1, *opt_set, 32 ** -0.5)
    torch.library.opcheck(T._fwd_op, args)
    out, lse = T._fwd_op(*args)
    torch.library.opcheck(T._bwd_op, (torch.randn_like(out), *[t.detach() for t in leaves],
                                    out.detach(), lse, *args[3:]))


class TinyAttention(torch.nn.Module):
    """A ViT-style caller: packed qkv projection, the op, output projection."""

    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, num_queries):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = unidirectional_attention(q, k, v, num_queries, backend="triton")
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_and_backward(compile_backend):
    torch.manual_seed(0)
    model = TinyAttention().to(DEVICE)
    x = torch.randn(2, 21, 64, device=DEVICE)
    eager_out = model(x, 4)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, backend=compile_backend, fullgraph=True)
    out = compiled(x, 4)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_compiled_matches_reference():
    opts = options(OPTION_SETS[3])
    q, k, v = make_qkv(1, 2, 2, 30, 6, 32, opts, dtype=torch.float32)
    fn = torch.compile(lambda a, b, c: unidirectional_attention(a, b, c, 6, 2, backend="triton", **opts),
                       backend="aot_eager", fullgraph=True)
    assert_rel_close("out", fn(q, k, v), dense_masked_attention(q.double(), k.double(), v.double(), 6, 2,
                                                                mask_of(opts)))


@pytest.mark.parametrize("packed_qkv", [False, True])
def test_eager_calls_skip_the_dispatcher_and_match_the_custom_op(monkeypatch, packed_qkv):
    # Eager calls go through an autograd.Function straight to the kernels (the custom
    # op's dispatcher was two thirds of the host time per call); compile takes the op.
    # Both paths must give the same outputs and gradients, bit for bit.
    torch.manual_seed(0)
    qkv = torch.randn(2, 25, 3, 2, 32, device=DEVICE, requires_grad=True)
    grad = torch.randn(2, 25, 2, 32, device=DEVICE)

    def run():
        if packed_qkv:
            out = unidirectional_attention_qkvpacked(qkv, 4, backend="triton")
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out = unidirectional_attention(q, k, v, 4, backend="triton").transpose(1, 2)
        return out, torch.autograd.grad(out, qkv, grad)[0]

    calls = {"op": 0}
    name = "_qkv_bwd_op" if packed_qkv else "_bwd_op"
    real_op = getattr(T, name)

    def counted(*args):
        calls["op"] += 1
        return real_op(*args)

    monkeypatch.setattr(T, name, counted)
    eager_out, eager_grad = run()
    assert calls["op"] == 0  # the eager backward ran the body, not the op
    monkeypatch.setattr(T, "_eager", lambda *tensors: False)
    op_out, op_grad = run()
    assert calls["op"] == 1  # the custom op's own registration ran this time
    assert torch.equal(eager_out, op_out) and torch.equal(eager_grad, op_grad)


@pytest.mark.parametrize("packed_qkv", [False, True])
def test_eager_call_is_one_node_with_one_output_in_the_callers_layout(monkeypatch, packed_qkv):
    # Autograd's work per call grows with the Function's inputs, outputs and the nodes
    # around it: an eager call is one node, fed by the differentiable tensors, whose one
    # output is allocated in the caller's layout (not a view: no transpose node, no view
    # bookkeeping). The logsumexp is saved for the backward without being an output, and
    # outside the torch.func transforms Function.apply's Python is not run.
    applied = []
    apply = T._EagerAttention.apply
    monkeypatch.setattr(T._EagerAttention, "apply", lambda *a: applied.append(1) or apply(*a))
    qkv = torch.randn(2, 13, 3, 2, 16, device=DEVICE, requires_grad=True)
    if packed_qkv:
        out = unidirectional_attention_qkvpacked(qkv, 3, backend="triton")
        inputs = [qkv]
    else:
        inputs = list(qkv.permute(2, 0, 3, 1, 4).unbind(0))
        out = unidirectional_attention(*inputs, 3, backend="triton")
    node = out.grad_fn
    assert type(node).__name__ == "_EagerAttentionBackward" and out._base is None
    assert len(node.next_functions) == len(inputs)  # the call description is no input edge
    assert out.shape == ((2, 13, 2, 16) if packed_qkv else (2, 2, 13, 16))
    assert out.transpose(1, 2).is_contiguous() != packed_qkv  # token-major memory either way
    saved = node.saved_tensors
    assert len(saved) == len(inputs) + 2 and saved[-1].shape == (2, 2, 13)  # ..., out, lse
    assert node.call.stash is None  # handed to the backward, not kept in the call
    assert not applied
    torch.func.grad(lambda t: unidirectional_attention_qkvpacked(t, 3, backend="triton").sum())(qkv)
    assert applied  # the transforms take Function.apply


def test_eager_backward_reuses_the_forwards_views_once():
    # A packed call's backward takes the q, k, v views its forward made, then lets them
    # go; a retained graph's second backward unbinds qkv again, to the same bits.
    qkv = torch.randn(2, 13, 3, 2, 16, device=DEVICE, requires_grad=True)
    out = unidirectional_attention_qkvpacked(qkv, 3, backend="triton")
    grad = torch.randn_like(out)
    assert len(out.grad_fn.views) == 3
    first, = torch.autograd.grad(out, qkv, grad, retain_graph=True)
    assert out.grad_fn.views is None
    second, = torch.autograd.grad(out, qkv, grad)
    assert torch.equal(first, second)


def test_vmap_through_prefix_probs():
    # Under the transforms the forward returns the logsumexp as a second output (they
    # carry to setup_context only what it returns); the vmap rule maps both outputs.
    torch.manual_seed(0)
    batch = torch.randn(3, 2, 13, 3, 2, 16, device=DEVICE)

    def f(t):
        return unidirectional_attention_qkvpacked(t, 3, 2, backend="triton", return_prefix_probs=True)

    mapped = torch.func.vmap(f)(batch)
    for got, want in zip(mapped, zip(*[f(b) for b in batch])):
        assert torch.equal(got, torch.stack(want))


@pytest.mark.parametrize("packed_qkv", [True, False])
def test_eager_path_refuses_a_second_derivative_and_serves_vmap(packed_qkv):
    # Eager calls must not differ from the custom op where the op is strict: a second
    # derivative is an error that says so (not a silently missing term, nor the custom
    # op's bare "no autograd formula"), and vmap, which the custom op serves by its
    # fallback, still works.
    torch.manual_seed(0)
    x = torch.randn(2, 13, 3, 2, 16, device=DEVICE, requires_grad=True)

    def f(t):
        if packed_qkv:
            return unidirectional_attention_qkvpacked(t, 3, backend="triton")
        q, k, v = t.permute(2, 0, 3, 1, 4).unbind(0)
        return unidirectional_attention(q, k, v, 3, backend="triton")

    g, = torch.autograd.grad(f(x).square().sum() + x.pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative through backend=.triton."):
        torch.autograd.grad(g.sum(), x)
    batch = torch.randn(3, *x.shape, device=DEVICE)
    torch.testing.assert_close(torch.func.vmap(f)(batch), torch.stack([f(b) for b in batch]))


@pytest.mark.parametrize("packed_qkv", [False, True, "runs"])
def test_torch_func_grad_and_vmap_of_grad(packed_qkv, monkeypatch):
    # The transforms refuse the autograd.Function torch.library builds for a custom op;
    # the op's own Function serves them, and its backward has no derivative either.
    # "runs": a packed layout of two runs, both passes by the batched kernels (the runs
    # reach the vmap rule as a list of ints).
    torch.manual_seed(0)
    qkv = torch.randn(2, 13, 3, 2, 16, device=DEVICE)
    grad = torch.randn(2, 13, 2, 16, device=DEVICE)
    layout = VarlenLayout([9, 9, 8], [3, 3, 0], device=DEVICE)
    if packed_qkv == "runs":
        monkeypatch.setattr(T, "_fwd_by_runs", lambda *a: True)
        monkeypatch.setattr(T, "_bwd_by_runs", lambda *a: True)

    def f(t):
        if packed_qkv == "runs":
            out = unidirectional_attention_varlen_qkvpacked(t.flatten(0, 1), layout,
                                                            backend="triton").view(grad.shape)
        elif packed_qkv:
            out = unidirectional_attention_qkvpacked(t, 3, backend="triton")
        else:
            q, k, v = t.permute(2, 0, 3, 1, 4).unbind(0)
            out = unidirectional_attention(q, k, v, 3, backend="triton").transpose(1, 2)
        return (out * grad).sum()

    leaf = qkv.clone().requires_grad_()
    want, = torch.autograd.grad(f(leaf), leaf)
    assert torch.equal(torch.func.grad(f)(qkv), want)
    batch = torch.stack([qkv, qkv.flip(1)])
    mapped = torch.func.vmap(torch.func.grad(f))(batch)
    assert torch.equal(mapped[0], want) and torch.equal(mapped[1], torch.func.grad(f)(batch[1]))
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.func.grad(lambda t: torch.func.grad(f)(t).sum())(qkv)


# ---------------------------------------------------------------------------------------
# The launched kernels compiled for every GPU target
#
# The kernels the op launches compile for every GPU generation it targets, within its
# shared memory, and (bf16/fp16 on Hopper, head_dim <= 128) without spilling registers in
# a loop.
#
# CI has no GPU and runs the kernels in Triton's interpreter, which accepts code that the
# real compiler rejects. Here the launchers run on meta tensors and their launches are
# compiled ahead of time down to ptxas (bench.static's capture: the real arguments, so the
# real specialization; the fp32 ones down to Triton's LLVM IR), in a fresh process: this
# one's kernels were built for the interpreter.
# ---------------------------------------------------------------------------------------

try:
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.compiler import ASTSource  # noqa: F401
except ImportError:  # an older or newer Triton without this API
    GPUTarget = None

needs_aot = pytest.mark.skipif(GPUTarget is None, reason="this Triton has no ahead-of-time API")

# (dtype, head_dim, packed, (query_sees_prefix, query_sees_self, query_sees_queries))
COMPILE_CASES = [
    ("bf16", 64, False, (False, False, False)),
    ("bf16", 64, False, (False, True, False)),  # the batched flash backward at head_dim 64
    ("bf16", 64, True, (False, False, False)),
    ("fp16", 80, True, (True, True, False)),
    ("bf16", 128, False, (False, False, True)),
    ("fp32", 128, False, (False, True, True)),
    ("bf16", 256, True, (False, False, False)),
    ("fp32", 256, False, (False, False, False)),
]

# sm_86 (A10, RTX 30 series: 99 KB of shared memory a program, against sm_80's 163) is
# checked beside sm_80: its launcher rules choose the launches, compiled for sm_80
# (compile_check's compile_for), so the launches both take compile once. Triton lowers the
# two alike; one case compiled for sm_86 itself checks that the shared memory is the same.
SM86_ITSELF = ("bf16", 64, False, (False, True, False))

COMPILE_CHECK = """
import json, os, sys
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
from bench.static import compile_check
jobs = json.loads(sys.argv[1])
print(json.dumps([[compile_check(d, t, capability, packed, tuple(f), compile_for=compile_for,
                                  ptxas_for=ptxas_for)
                    for t, d, packed, f, ptxas_for in cases]
                   for capability, cases, compile_for in jobs]))
"""


def with_ptxas_for(cases):
    """The cases with the kernels to take through PTX and ptxas (None: all). The fp32 cases'
    rows are read for shared memory alone, which Triton has laid out before its PTX:
    compiled that far and no further (their PTX, ptxas and SASS reading took a third of
    this test's time)."""
    return [(*case, [] if case[0] == "fp32" else None) for case in cases]


def check_onepass_at_gpu_tiles(monkeypatch, packed, dtype, heads, seqs):
    """The one-pass backward where the GPU rule gives it the call (32 x 64 tiles, dQ by
    reductions into its fp32 scratch): against float64, and bitwise the same twice.
    Batched: seqs sequences of 1 + 196 + 10 tokens; packed: seqs of 207 and 37 tokens in
    turn (more runs than go run by run)."""
    from test_varlen import dense_per_sequence, make_packed

    tiles, run = [], T._onepass_bwd_kernel.run

    def tiled_run(*args, **kwargs):
        tiles.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"]))
        return run(*args, **kwargs)
    monkeypatch.setattr(T._onepass_bwd_kernel, "run", tiled_run)
    opts = options(OPTION_SETS[0])
    if not packed:
        first, again = (check_triton(seqs, heads, 1, 196, 10, 64, opts, dtype=dtype)
                        for _ in range(2))
    else:
        lengths = [(207, 37)[s % 2] for s in range(seqs)]
        queries = [(10, 0)[s % 2] for s in range(seqs)]
        q, k, v, cu = make_packed(lengths, heads, 64, dtype=dtype)
        grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q)

        def attend():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = unidirectional_attention_varlen(
                *leaves, VarlenLayout(lengths, queries, device=DEVICE), None, 1, backend="triton")
            return out, torch.autograd.grad(out, leaves, grad_out)
        first, again = attend(), attend()
        ref, ref_grads = dense_per_sequence(q, k, v, cu, queries, 1, grad_out, opts)
        for name, got, want in zip(("out", "dq", "dk", "dv"), (first[0], *first[1]),
                                   (ref, *ref_grads)):
            assert_rel_close(name, got, want, 2e-2)  # 16-bit inputs, fp32 accumulation
    assert tiles == [(32, 64)] * 2
    for got, want in zip((first[0], *first[1]), (again[0], *again[1])):
        assert torch.equal(got, want)


@pytest.mark.skipif(not ON_CUDA or torch.cuda.get_device_capability() < (9, 0),
                    reason="the one-pass backward's GPU tiles: an sm_90 GPU")
@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_onepass_backward_on_a_hopper_gpu(monkeypatch, packed):
    programs = T.ONEPASS_MIN_PACKED_PROGRAMS if packed else T.ONEPASS_MIN_BATCHED_PROGRAMS
    check_onepass_at_gpu_tiles(monkeypatch, packed, torch.bfloat16, 6, -(-programs // 6))


@pytest.mark.slow  # ptxas, for every launched kernel
@needs_aot
@pytest.mark.parametrize("capability", [80, 90])
def test_launched_kernels_compile_and_fit(capability, tmp_path):
    shared_cache = tmp_path / "triton-cache"
    shared_cache.mkdir()
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(shared_cache)}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    jobs = [(capability, COMPILE_CASES, None)]
    if capability == 80:
        jobs += [(86, COMPILE_CASES, 80), (86, [SM86_ITSELF], None)]
    sent = [(target, with_ptxas_for(cases), compile_for)
            for target, cases, compile_for in jobs]
    proc = subprocess.run([sys.executable, "-c", COMPILE_CHECK, json.dumps(sent)], env=env,
                          cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # bench.static compiles into a cache of its own: from the shared one, a kernel built in
    # another checkout came back with that file's line numbers and misnamed loops.
    assert not any(shared_cache.iterdir())
    results = json.loads(proc.stdout)
    for (target, cases, _), case_rows in zip(jobs, results):
        for case, rows in zip(cases, case_rows):
            check_launched_kernels(target, *case, rows)
    if capability == 80:
        as_sm80, itself = results[1][COMPILE_CASES.index(SM86_ITSELF)], results[2][0]
        assert [r["compiled_for"] for r in itself] == [86] * len(itself)
        assert ([(r["kernel"], r["shared_bytes"]) for r in itself]
                == [(r["kernel"], r["shared_bytes"]) for r in as_sm80])


def check_launched_kernels(capability, dtype, head_dim, packed, flags, rows):
    limit = SHARED_MEMORY_PER_PROGRAM[capability]
    # forward, delta, backward; or forward and the one-pass backward (sm_80 and sm_90,
    # 16-bit, head_dim <= 64, no mask option but query_sees_prefix; batched: the packed
    # check is a pack too small for it, bench/test_static.py compiles a large one)
    onepass = (capability in (80, 90) and dtype != "fp32" and head_dim <= 64 and not packed
               and not (flags[1] or flags[2]))
    assert [r["kernel"] for r in rows][1:] == (
        ["_onepass_bwd_kernel"] if onepass
        else ["_unidirectional_bwd_delta_kernel", "_unidirectional_bwd_kernel"]), rows
    for row in rows:
        where = f"sm_{capability} {dtype} d{head_dim} packed={packed} {flags} {row['kernel']}"
        assert row["shared_bytes"] <= limit, f"{where}: {row['shared_bytes']} B shared > {limit}"
        if capability == 90 and dtype != "fp32" and head_dim <= 128:
            # A few bytes spilled once per program (under a register cap, or beside the
            # packed backward's row-by-row passes) cost nothing measurable; a spill inside
            # a loop is paid at every step. As the loops run: at most 8 spill instructions
            # per program, and stores only in a loop that runs at most once per program
            # (the one-pass backward's query-row pass).
            assert row["loop_spills_per_program"] <= 8, f"{where}: spills inside loops"
            assert not row["repeated_spill_stores"], where
            assert row["spill_bytes"] <= 64, f"{where}: spills {row['spill_bytes']} B"
        if capability == 80 and row["kernel"] == "_onepass_bwd_kernel":
            # sm_80's one-pass tiles were chosen for keeping every value in registers.
            assert row["spill_bytes"] == 0, f"{where}: spills {row['spill_bytes']} B"
