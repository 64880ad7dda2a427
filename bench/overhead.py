"""Host time per call of the Triton op, its kernels stubbed out: what launch latency
costs besides Triton's own launcher.

    python -m bench.overhead [--calls 2000]

On the H200 the op's calls, not its kernels, set its time at ViT sizes (bench/NOTES.md):
a 0.87 ms forward + backward call around 0.27 ms of kernels at ViT-S/16 local. This
times the Python path of one call (checks, autograd, the custom op or the eager
autograd.Function, buffer allocation) on any machine, CPU tensors, kernels replaced by
no-ops, for both paths the op can take, forward and forward + backward.
"""

from __future__ import annotations

import argparse
import time


def host_us_per_call(fn, calls):
    for _ in range(calls // 20):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv=None):
    import torch

    import adclr_kernels.attention_triton as T
    import adclr_kernels.backends as B
    from adclr_kernels import unidirectional_attention_qkvpacked

    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)

    # The launchers become no-ops; everything around them runs as in a real call. The
    # backend check accepts CPU tensors only with the interpreter switched on.
    T.attention_fwd = T.attention_bwd = lambda *a, **k: None
    T.triton_interpreter_enabled = B.triton_interpreter_enabled = lambda: True

    qkv = torch.randn(2, 207, 3, 6, 64, requires_grad=True)
    grad = torch.randn(2, 207, 6, 64)

    def forward():
        return unidirectional_attention_qkvpacked(qkv, 10, backend="triton")

    def forward_backward():
        return torch.autograd.grad(forward(), qkv, grad)

    eager = T._eager
    print(f"host µs per call, kernels stubbed ({args.calls} calls, torch {torch.__version__}):")
    for name, path in (("custom op (as under torch.compile)", lambda *t: False),
                       ("eager autograd.Function (default)", eager)):
        T._eager = path
        print(f"  {name:36} forward {host_us_per_call(forward, args.calls):6.0f}   "
              f"forward + backward {host_us_per_call(forward_backward, args.calls):6.0f}")
    T._eager = eager


if __name__ == "__main__":
    main()
