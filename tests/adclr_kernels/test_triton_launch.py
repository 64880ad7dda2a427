"""The direct relaunch of compiled Triton kernels (_triton_launch.py), on the host alone.

No GPU is needed: Triton's own launch path runs with a stand-in driver (a CUDA target)
and a stand-in for the compiler, which hands out one recording kernel per specialization
Triton asks for. The fast path must launch what Triton's path would, with the same
arguments, and fall back to it for every new specialization.
"""

import pytest
import torch
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

import adclr_kernels.attention_triton as T
from adclr_kernels import unidirectional_attention_qkvpacked
from adclr_kernels._triton_launch import FastLaunchFunction, fast_launch


def _kernel(X, Y, OPTIONAL, n, stride, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):
    pass


class _Driver:
    """What Triton's launch path asks of the active driver, for a CUDA sm_90 target."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 7

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


class _Compiled:
    """A compiled specialization whose launcher records its calls."""

    function, packed_metadata = "function", "metadata"

    def __init__(self, key, launches):
        self.key, self.launches = key, launches

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        self.launches.append((self, args))


@pytest.fixture
def kernels(monkeypatch):
    """(Triton's kernel, the fast one, launches, specializations compiled), both kernels
    compiled from `_kernel` by the stand-in compiler."""
    monkeypatch.setattr(driver, "_active", _Driver())
    launches, compiled = [], []

    def compile_(self, key, *args, **kwargs):
        kernel = _Compiled(key, launches)
        compiled.append(kernel)
        self.device_caches[0][0][key] = kernel
        return kernel

    monkeypatch.setattr(JITFunction, "_do_compile", compile_)
    return JITFunction(_kernel), fast_launch(JITFunction(_kernel)), launches, compiled


def _variants():
    x = torch.zeros(64, dtype=torch.float16)
    y = torch.zeros(64)
    yield (x, y, None, 64, 16, 0.5), dict(BLOCK=16, num_warps=4)
    yield (x, y, None, 64, 16, 0.25), dict(BLOCK=16, num_warps=4)  # same specialization
    yield (x, y, y, 64, 16, 0.5), dict(BLOCK=16, num_warps=4)  # a pointer, not None
    yield (x[1:], y, None, 64, 16, 0.5), dict(BLOCK=16, num_warps=4)  # x not 16-byte aligned
    yield (x[8:], y, None, 64, 16, 0.5), dict(BLOCK=16, num_warps=4)  # aligned again
    yield (x.float(), y, None, 64, 16, 0.5), dict(BLOCK=16, num_warps=4)  # another dtype
    yield (x, y, None, 1, 16, 0.5), dict(BLOCK=16, num_warps=4)  # an int equal to 1
    yield (x, y, None, 63, 16, 0.5), dict(BLOCK=16, num_warps=4)  # not divisible by 16
    yield (x, y, None, 2 ** 40, 16, 0.5), dict(BLOCK=16, num_warps=4)  # past int32
    yield (x, y, None, True, 16, 0.5), dict(BLOCK=16, num_warps=4)  # True, not 1
    yield (x, y, None, 64, 16, 0.5), dict(BLOCK=32, num_warps=4)  # another constexpr
    yield (x, y, None, 64, 16, 0.5), dict(BLOCK=16, FLAG=True, num_warps=4)
    yield (x, y, None, 64, 16, 0.5), dict(BLOCK=16, num_warps=8)  # another launch option


def test_fast_launch_runs_what_tritons_path_runs_with_the_same_arguments(kernels):
    # Every variant twice through each kernel (each has its own cache): the fast
    # kernel's second launch skips Triton's binder, and must still launch the
    # specialization Triton's key names, with the arguments Triton's launch passes.
    triton_kernel, fast, launches, compiled = kernels
    for args, kwargs in list(_variants()) * 2:
        for kernel in (triton_kernel, fast):
            kernel[(3, 2)](*args, **kwargs)
        (want, want_args), (got, got_args) = launches[-2:]
        assert got.key == want.key  # the key Triton's path computed for these arguments
        assert len(got_args) == len(want_args) and all(a is b for a, b in zip(got_args[4:], want_args[4:]))
        assert got_args[:4] == (3, 2, 1, 7)  # the grid and the driver's stream
    specializations = len(list(_variants())) - 2  # 0.5 and 0.25 are one, x and x[8:] too
    assert len(compiled) == 2 * specializations  # each kernel compiled each once
    assert len(fast._launches) == specializations + 1  # but 0.5 and 0.25 are two keys


def test_fast_launch_of_the_attention_kernels(kernels, monkeypatch):
    # The op's own kernels (up to 57 arguments, constexprs by keyword, defaults), with
    # the arguments their launchers pass for a packed qkv call and its backward.
    launches = {}
    names = ("_unidirectional_fwd_kernel", "_unidirectional_bwd_kernel", "_onepass_bwd_kernel")
    for name in names:
        kernel = getattr(T, name)
        monkeypatch.setattr(kernel, "run", lambda *a, grid, warmup, name=name, fn=kernel.fn, **k:
                            launches.setdefault(name, (fn, a, dict(k, grid=grid))))
    qkv = torch.randn(2, 40, 3, 2, 16, requires_grad=True)
    for sees_self in (False, True):  # the one-pass backward, then the flash backward
        out = unidirectional_attention_qkvpacked(qkv, 5, backend="triton", query_sees_self=sees_self)
        torch.autograd.grad(out, qkv, torch.randn_like(out))
    _, _, recorded, _ = kernels
    assert set(launches) == set(names)
    for fn, args, kwargs in launches.values():
        paths = JITFunction(fn), fast_launch(JITFunction(fn))
        for kernel in paths * 2:
            kernel.run(*args, warmup=False, **kwargs)
        (_, want), (fast_compiled, first), (_, _), (compiled, fast) = recorded[-4:]
        assert compiled is fast_compiled and len(fast) == len(want) == len(first)
        assert all(a is b for a, b in zip(fast[4:], want[4:]))
        assert len(paths[1]._launches) == 1


def test_fast_launch_binds_nothing_once_a_key_is_known(kernels, monkeypatch):
    _, fast, launches, _ = kernels
    args, kwargs = next(_variants())
    fast[(1,)](*args, **kwargs)
    monkeypatch.setattr(JITFunction, "run", lambda *a, **k: pytest.fail("took Triton's path"))
    fast[(1,)](*args, **kwargs)
    x = args[0]
    fast[(1,)](torch.zeros_like(x), *args[1:], **kwargs)  # another aligned buffer: same key
    assert len(launches) == 3
    with pytest.raises(pytest.fail.Exception):  # a new key: Triton's path
        fast[(1,)](x[1:], *args[1:], **kwargs)


@pytest.mark.parametrize("hook", ["warmup", "pre_run_hook"])
def test_fast_launch_leaves_warmup_and_hooks_to_triton(kernels, monkeypatch, hook):
    _, fast, _, _ = kernels
    args, kwargs = next(_variants())
    fast[(1,)](*args, **kwargs)
    taken = []
    run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda *a, **k: taken.append(1) or run(*a, **k))
    if hook == "warmup":
        fast.run(*args, grid=(1,), warmup=True, **kwargs)
    else:
        fast.pre_run_hooks.append(lambda *a, **k: None)
        fast[(1,)](*args, **kwargs)
    assert taken


def test_interpreted_kernels_keep_tritons_path():
    # Under TRITON_INTERPRET=1 (the tests' CPU runs) the kernels are the interpreter's;
    # fast_launch leaves them as they are.
    kernel = T._unidirectional_fwd_kernel
    assert not isinstance(kernel, JITFunction)
    assert fast_launch(kernel) is kernel and type(kernel) is not FastLaunchFunction


def test_the_environment_can_turn_fast_launch_off(monkeypatch):
    monkeypatch.setenv("ADCLR_FAST_LAUNCH", "0")
    kernel = JITFunction(_kernel)
    assert fast_launch(kernel) is kernel and type(kernel) is JITFunction


@pytest.mark.skipif(not torch.cuda.is_available(), reason="launches compiled kernels")
def test_fast_launch_on_the_gpu_gives_what_tritons_path_gives(monkeypatch):
    # The op's forward and backward through Triton's path (tables emptied), then again
    # through the fast one: bit for bit the same outputs and gradients.
    kernels = (T._unidirectional_fwd_kernel, T._unidirectional_bwd_delta_kernel,
               T._unidirectional_bwd_kernel)
    assert all(type(k) is FastLaunchFunction for k in kernels)
    qkv = torch.randn(2, 207, 3, 6, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(2, 207, 6, 64, device="cuda", dtype=torch.bfloat16)

    def run():
        out = unidirectional_attention_qkvpacked(qkv, 10, backend="triton")
        return out, torch.autograd.grad(out, qkv, grad)[0]

    for kernel in kernels:
        kernel._launches.clear()
    want = run()
    taken = []
    real = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda *a, **k: taken.append(1) or real(*a, **k))
    got = run()
    assert not taken  # every launch was a fast one
    assert all(torch.equal(a, b) for a, b in zip(got, want))
