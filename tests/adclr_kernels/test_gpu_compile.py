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


def compile_for_hopper(kernel, dtype, constexprs):
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else _arg_type(n, dtype) for n in names}
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))


def compile_all(dtype, varlen, flags):
    from adclr_kernels import unidirectional as U

    fl = dict(SEES_PREFIX=flags[0], SEES_SELF=flags[1], SEES_QUERIES=flags[2])
    # num_prefix = 1 and visible = 1 are what Triton specialises into constants at run
    # time: the kernels must type-check with them constant too.
    common = dict(HEAD_DIM=80, BLOCK_D=128, VARLEN=varlen, num_prefix=1, visible=1)
    if not varlen:
        common.update(CU_SEQLENS=None, NUM_QUERIES=None)
    dot = dict(DOT_FP32=dtype == "fp32")
    compile_for_hopper(U._unidirectional_fwd_kernel, dtype,
                       dict(BLOCK_M=64, BLOCK_N=32, **dot, **fl, **common))
    compile_for_hopper(U._unidirectional_bwd_kernel, dtype,
                       dict(BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32, **dot, **fl, **common))
    delta = {k: v for k, v in common.items() if k not in ("num_prefix", "visible")}
    compile_for_hopper(U._unidirectional_bwd_delta_kernel, dtype, dict(BLOCK_M=64, **delta))


@pytest.mark.parametrize("dtype,varlen,flags", [
    ("bf16", False, (False, False, False)),
    ("fp16", True, (True, True, False)),
    ("fp32", False, (False, True, True)),
])
def test_kernels_compile_for_sm90(dtype, varlen, flags):
    # A fresh process: the kernels of this one were decorated for the interpreter.
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, __file__, json.dumps([dtype, varlen, flags])],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


if __name__ == "__main__":
    compile_all(*json.loads(sys.argv[1]))
