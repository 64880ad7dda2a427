"""The Triton backend against float64 references (interpreter on CPU, native on CUDA)."""

import pytest
import torch

from adclr_kernels import unidirectional_attention
from adclr_kernels.reference import dense_masked_attention
from kernel_testing import (DEVICE, OPTION_SETS, assert_fa_close, assert_rel_close, make_qkv,
                            options, reference_grads)

pytestmark = pytest.mark.usefixtures("poisoned")


def check_triton(batch, heads, num_prefix, num_raw, num_queries, head_dim, opts,
                 dtype=torch.float32, seed=0, **make_kw):
    q, k, v = make_qkv(batch, heads, num_prefix, num_raw, num_queries, head_dim, opts,
                       dtype=dtype, seed=seed, **make_kw)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(q.shape, generator=g, dtype=torch.float64).to(DEVICE)
    kw = dict(num_queries=num_queries, num_prefix=num_prefix, **opts)

    # Leaves that keep the packed strides, so the kernel really reads strided views.
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = unidirectional_attention(*leaves, backend="triton", **kw)
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))

    assert out.shape == q.shape and out.dtype == dtype
    ref64, grads64 = reference_grads(dense_masked_attention, q.double(), k.double(),
                                     v.double(), grad_out, **kw)
    if dtype == torch.float32:
        assert_rel_close("out", out, ref64)
        for name, got, want in zip("qkv", grads, grads64):
            assert_rel_close(f"d{name}", got, want)
    else:
        ref_lo, grads_lo = reference_grads(dense_masked_attention, q, k, v, grad_out.to(dtype), **kw)
        assert_fa_close("out", out, ref64, ref_lo)
        for name, got, want, lo in zip("qkv", grads, grads64, grads_lo):
            assert_fa_close(f"d{name}", got, want, lo)
    return out, grads


@pytest.mark.parametrize("opt_set", OPTION_SETS, ids=lambda s: "psq=" + "".join("01"[x] for x in s))
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
    import adclr_kernels.unidirectional as uni

    monkeypatch.setattr(uni, "triton_interpreter_enabled", lambda: False)
    assert uni._fwd_config(64, torch.float32, 90, 207)["BLOCK_M"] == 64
    check_triton(1, 1, num_prefix, num_raw, num_queries, 64, options(opt_set))


@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA every test already runs the GPU tiles")
@pytest.mark.parametrize("capability", [90, 80, 86])
@pytest.mark.parametrize("dtype,head_dim,num_raw", [
    (torch.float16, 64, 196), (torch.float16, 64, 600), (torch.float16, 128, 196),
    (torch.float32, 128, 100), (torch.float32, 256, 60)])
def test_every_gpu_config_in_the_interpreter(monkeypatch, capability, dtype, head_dim, num_raw):
    # Each target's configs (tiles, warps, stages) run in the interpreter. fp16 stands
    # for bf16 here: the two share their configs, and the interpreter's bf16 dot is wrong.
    import adclr_kernels.unidirectional as uni

    monkeypatch.setattr(uni, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(uni, "_capability", lambda device: capability)
    check_triton(1, 1, 1, num_raw, 10, head_dim, options(OPTION_SETS[3]), dtype=dtype)


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
    import adclr_kernels.unidirectional as uni
    from adclr_kernels import VarlenLayout, unidirectional_attention_varlen_qkvpacked

    monkeypatch.setattr(uni, "triton_interpreter_enabled", lambda: False)
    if dtype == torch.float16:
        assert uni._bwd_config(64, dtype, 90, packed=True).get("maxnreg")
    layout = VarlenLayout(lengths, queries)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(sum(lengths), 3, 1, 64, generator=g).to(dtype).requires_grad_()
    grad_out = torch.randn(sum(lengths), 1, 64, generator=g).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-3  # fp16 inputs, fp32 accumulation
    out = unidirectional_attention_varlen_qkvpacked(qkv, layout, num_prefix=num_prefix,
                                                    backend="triton")
    (dqkv,) = torch.autograd.grad(out, qkv, grad_out)
    for (start, end), nq in zip(layout.bounds(), queries):
        dense = [t.detach().double()[start:end].transpose(0, 1)[None].requires_grad_()
                 for t in qkv.unbind(1)]
        ref = dense_masked_attention(*dense, nq, num_prefix)
        grads = torch.autograd.grad(ref, dense, grad_out.double()[start:end].transpose(0, 1)[None])
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


@pytest.mark.parametrize("scale", [0.3, 0.0])
def test_custom_scale(scale):
    # 0 is uniform attention over what each row sees: the masked tiles must still
    # exclude what it does not (-inf * 0 would be NaN).
    opts = options(OPTION_SETS[0])
    q, k, v = make_qkv(1, 2, 1, 70, 5, 32, opts, dtype=torch.float32)
    out = unidirectional_attention(q, k, v, 5, scale=scale, backend="triton")
    assert_rel_close("out", out, dense_masked_attention(q.double(), k.double(), v.double(), 5, 1,
                                                        scale=scale))
