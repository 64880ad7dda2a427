"""Host time per call of the Triton op, its kernels stubbed out: what a call costs the
CPU besides the GPU's work.

    python -m bench.overhead [--calls 200] [--rounds 15]

On the H200 the op's calls, not its kernels, set its time at ViT sizes (bench/NOTES.md):
a 0.87 ms forward + backward call around 0.27 ms of kernels at ViT-S/16 local. This
times the Python path of one call on CPU tensors (bf16, the launchers taking the
kernels and tile configs an sm_90 GPU's call gets), on any machine, for both paths the
op can take (the custom op, as under torch.compile, and the eager autograd.Function),
forward and forward + backward, at two depths of stubbing:

- launchers: `attention_fwd` / `attention_bwd` are no-ops (checks, autograd, buffers);
- kernels: every Triton kernel's `run` is a no-op, so the launchers' own work (tile
  configs, strides, grids, the arguments) counts too; Triton's launcher does not, and
  its argument binding is timed on its own, with the binder a CUDA launch would use,
  and so is its launch path up to the compiled kernel's launcher (a stand-in driver
  for a CUDA target, nothing compiled), Triton's `run` against `fast_launch`'s.

Packed rows time a multi-crop batch (8 images x (2 x 207 + 10 x 37) tokens): with a
`VarlenLayout` of the crops packed by kind, as the trainer packs them (two runs of alike
sequences: the forward goes by runs, the batched kernels run by run), of the crops packed
image by image (the packed kernels), and with cu_seqlens + max_seqlen (no host sync).

Each figure is the calling thread's CPU time (not wall time: on a shared machine the
wait for a core is someone else's), the best of --rounds rounds of --calls calls.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time


def host_us_per_call(fn, calls, rounds):
    for _ in range(max(calls // 10, 2)):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, time.thread_time() - start)
    return best / calls * 1e6


@contextlib.contextmanager
def stubbed(depth, launches):
    """Kernels (or the whole launchers) replaced by no-ops; at depth "kernels", launches
    (a dict) keeps each kernel's first arguments."""
    import triton

    import adclr_kernels.attention_triton as T
    import adclr_kernels.attention_triton_short as S

    saved = T.attention_fwd, T.attention_bwd
    kernels = [k for module in (T, S) for k in vars(module).values()
               if isinstance(k, triton.runtime.JITFunction)]
    schedule = getattr(T, "_varlen_schedule_kernel", None)
    if schedule is not None:  # offsets with max_seqlen: report "no broken rule"
        status = schedule.arg_names.index("STATUS")
        schedule.run = lambda *args, grid, warmup, **kwargs: args[status].zero_()
    if depth == "launchers":
        T.attention_fwd = T.attention_bwd = lambda *a, **k: None
    else:
        def recorder(kernel):
            def run(*args, grid, warmup, **kwargs):
                launches.setdefault(kernel.fn.__name__, (kernel, args, kwargs))
            return run
        for kernel in kernels:
            if kernel is not schedule:
                kernel.run = recorder(kernel)
    try:
        yield
    finally:
        T.attention_fwd, T.attention_bwd = saved
        for kernel in kernels:
            vars(kernel).pop("run", None)


def binder_us(launches, calls, rounds):
    """Triton's argument binding (specialization) per launch, with a CUDA target's binder:
    the part of Triton's launcher that grows with the kernel's argument count."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    times = []
    for kernel, args, kwargs in launches.values():
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        kw = dict(kwargs, debug=False)
        times.append(host_us_per_call(lambda: binder(*args, **kw), calls, rounds))
    return times


class _Driver:
    """What Triton's launch path asks of the active driver, for a CUDA sm_90 target."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)


class _Compiled:
    """A compiled specialization whose launcher does nothing."""

    function = packed_metadata = None

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        pass


def launch_us(launches, calls, rounds):
    """(Triton's launch path, the fast relaunch) per launch, each up to the compiled
    kernel's launcher: a stand-in driver for a CUDA target, compiling nothing."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from adclr_kernels._triton_launch import fast_launch

    def compile_(self, key, *args, **kwargs):
        kernel = self.device_caches[0][0][key] = _Compiled()
        return kernel

    saved = driver._active, JITFunction._do_compile
    driver._active, JITFunction._do_compile = _Driver(), compile_
    try:
        times = []
        for kernel, args, kwargs in launches.values():
            times.append(tuple(
                host_us_per_call(lambda: jit.run(*args, grid=(1,), warmup=False, **kwargs), calls, rounds)
                for jit in (JITFunction(kernel.fn), fast_launch(JITFunction(kernel.fn)))))
        return times
    finally:
        driver._active, JITFunction._do_compile = saved


def main(argv=None):
    os.environ["TRITON_INTERPRET"] = "0"  # real JITFunctions, whose run is stubbed
    import torch

    import adclr_kernels.attention_triton as T
    import adclr_kernels.backends as B
    from adclr_kernels import (VarlenLayout, unidirectional_attention_qkvpacked,
                               unidirectional_attention_varlen_qkvpacked)

    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)

    # The backend check accepts CPU tensors only with the interpreter switched on; the
    # launchers keep the GPU's rules (sm_90, as for any tensor not on CUDA, in bf16), so
    # each call takes the kernels an H100 call would.
    B.triton_interpreter_enabled = lambda: True
    B.INTERPRETED_AT_IMPORT = True  # as if set before the import, which the check asks for
    T.triton_interpreter_enabled = lambda: False

    def randn(*shape, requires_grad=False):
        return torch.randn(*shape, dtype=torch.bfloat16).requires_grad_(requires_grad)

    qkv = randn(2, 207, 3, 6, 64, requires_grad=True)
    grad = randn(2, 207, 6, 64)
    lengths, queries = [207, 207] + [37] * 10, [10, 10] + [0] * 10
    layout = VarlenLayout(lengths * 8, queries * 8)
    by_kind = VarlenLayout([207] * 16 + [37] * 80, [10] * 16 + [0] * 80)
    cu, nq = layout.cu_seqlens, layout.num_queries
    packed = randn(layout.total_tokens, 3, 6, 64, requires_grad=True)
    packed_grad = randn(layout.total_tokens, 6, 64)
    calls = {
        "batched (2 x 207 tokens)": (
            lambda: unidirectional_attention_qkvpacked(qkv, 10, backend="triton"), qkv, grad),
        "packed by kind, VarlenLayout": (
            lambda: unidirectional_attention_varlen_qkvpacked(packed, by_kind, backend="triton"),
            packed, packed_grad),
        "packed by image, VarlenLayout": (
            lambda: unidirectional_attention_varlen_qkvpacked(packed, layout, backend="triton"),
            packed, packed_grad),
        "packed, cu_seqlens + max_seqlen": (
            lambda: unidirectional_attention_varlen_qkvpacked(packed, cu, nq, max_seqlen=207,
                                                              backend="triton"),
            packed, packed_grad),
    }

    def timed(forward, leaf, grad_out):
        fwd = host_us_per_call(forward, args.calls, args.rounds)
        both = host_us_per_call(lambda: torch.autograd.grad(forward(), leaf, grad_out), args.calls,
                                args.rounds)
        return fwd, both

    eager = T._eager
    print(f"host CPU µs per call, best of {args.rounds} x {args.calls} calls, torch {torch.__version__}:")
    print(f"  {'stubbed':9} {'call':33} {'path':8} {'forward':>8} {'fwd + bwd':>10}")
    launches = {}
    for depth in ("launchers", "kernels"):
        with stubbed(depth, launches):
            for name, (forward, leaf, grad_out) in calls.items():
                for path, rule in (("op", lambda *t: False), ("eager", eager)):
                    T._eager = rule
                    fwd, both = timed(forward, leaf, grad_out)
                    print(f"  {depth:9} {name:33} {path:8} {fwd:8.1f} {both:10.1f}", flush=True)
                T._eager = eager
    names = ", ".join(f"{name.strip('_')} {t:.1f}"
                      for name, t in zip(launches, binder_us(launches, args.calls, args.rounds)))
    print(f"  Triton's argument binding per launch (batched layer, not in the rows above): {names}")
    paths = launch_us(launches, args.calls, args.rounds)
    names = ", ".join(f"{name.strip('_')} {triton:.1f} -> {fast:.1f}"
                      for name, (triton, fast) in zip(launches, paths))
    print(f"  Triton's launch path per launch, Triton's run -> fast relaunch (not in the rows above): {names}")


if __name__ == "__main__":
    main()
