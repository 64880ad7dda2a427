"""The kernels compile for Hopper without a GPU.

CI has no GPU and runs the kernels in Triton's interpreter, which accepts code that
the real compiler rejects (mismatched types across branches, for one). Compiling
ahead of time for sm_90 runs the real pipeline, down to ptxas, on CPU.
"""

import json
import os
import subprocess
import sys

import pytest
import triton

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # an older or newer Triton without this API
    GPUTarget = None

pytestmark = pytest.mark.skipif(GPUTarget is None, reason="this Triton has no ahead-of-time API")


def _arg_type(name, dtype):
    if name in ("CU_SEQLENS", "NUM_QUERIES"):
        return "*i32"
    if name in ("LSE", "DELTA"):
        return "*fp32"
    if name.isupper():
        return "*" + dtype
    return "fp32" if name in ("qk_scale", "sm_scale") else "i32"


def compile_for_hopper(kernel, dtype, constexprs, num_warps, num_stages):
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else _arg_type(n, dtype) for n in names}
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


# Shared memory per block that every GPU the library targets has: sm_86/sm_89 allow
# 99 KB, A100 164 KB, H100 228 KB.
SHARED_LIMIT = 99 * 1024


def compile_all(dtype, varlen, flags, head_dim):
    """Compile the three kernels with the launchers' own GPU tile configs."""
    import torch

    from adclr_kernels import unidirectional as U

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    fl = dict(SEES_PREFIX=flags[0], SEES_SELF=flags[1], SEES_QUERIES=flags[2])
    # Integer arguments equal to 1 are what Triton specialises into constants at run
    # time: the kernels must type-check with the lengths constant too.
    common = dict(HEAD_DIM=head_dim, BLOCK_D=U._block_d(head_dim), VARLEN=varlen,
                  num_prefix=1, visible=1, key_len=1, seq_len=1, DOT_FP32=U._dot_fp32(torch_dtype), **fl)
    if not varlen:
        common.update(CU_SEQLENS=None, NUM_QUERIES=None)

    def tiles(cfg):
        return {k: v for k, v in cfg.items() if k.startswith("BLOCK")}, cfg["num_warps"], cfg["num_stages"]

    for kernel, cfg in ((U._unidirectional_fwd_kernel, U._fwd_config(head_dim, torch_dtype)),
                        (U._unidirectional_bwd_kernel, U._bwd_config(head_dim, torch_dtype))):
        blocks, warps, stages = tiles(cfg)
        compiled = compile_for_hopper(kernel, dtype, dict(**blocks, **common), warps, stages)
        shared = compiled.metadata.shared
        assert shared <= SHARED_LIMIT, f"{kernel.__name__} {dtype} hd={head_dim}: {shared} B shared"
    delta_args = U._unidirectional_bwd_delta_kernel.arg_names
    delta = {k: v for k, v in common.items() if k in delta_args}
    compile_for_hopper(U._unidirectional_bwd_delta_kernel, dtype, dict(BLOCK_M=64, **delta), 4, 2)


@pytest.mark.parametrize("dtype,varlen,flags,head_dim", [
    ("bf16", False, (False, False, False), 64),
    ("fp16", True, (True, True, False), 80),
    ("fp32", False, (False, True, True), 128),
    ("bf16", True, (False, False, False), 256),
])
def test_kernels_compile_for_sm90_within_shared_memory(dtype, varlen, flags, head_dim):
    # A fresh process: the kernels of this one were decorated for the interpreter.
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, __file__, json.dumps([dtype, varlen, flags, head_dim])],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


if __name__ == "__main__":
    compile_all(*json.loads(sys.argv[1]))
