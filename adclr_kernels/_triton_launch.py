"""Relaunching a Triton kernel's compiled specialization without Triton's per-launch
argument binding.

`JITFunction.run` binds every argument to the kernel's signature, works out its
specialization (each pointer's 16-byte alignment, each integer's value class), turns it
into a cache key and only then reaches the compiled kernel's launcher: for the attention
backward's 40-odd arguments, about as much host time as the rest of an eager call.
`fast_launch` gives a kernel a `run` that remembers, per key of its own, the compiled
kernel Triton chose, and calls its launcher directly the next time.

The key is finer than Triton's specialization, never coarser: every non-tensor argument
by type and value, every tensor by dtype and its pointer's offset from 16 bytes, the
keyword arguments (constexprs and launch options) by type and value, the current device,
and the compile options Triton reads from its knobs. The first launch of a key, and any
launch with a pre-run hook, a stages-inspection hook or `warmup`, takes Triton's own
path; so does a kernel compiled under the interpreter, which is not a plain
`JITFunction`. The launcher is called as `JITFunction.run` calls it (Triton 3.6 to 3.9);
an older Triton, whose internals differ, keeps every kernel on its own path, as
`ADCLR_FAST_LAUNCH=0` in the environment does.
"""

from __future__ import annotations

import operator
import os

import torch
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

_LIMIT = 1024  # keys per kernel before the table starts over (a sweep of shapes)
# The launcher's calling convention and the knobs the key reads are Triton 3.6's to 3.9's;
# an older Triton never reaches this module (backends.TRITON_FLOOR sets it aside).


_DTYPE, _DATA_PTR = operator.attrgetter("dtype"), operator.methodcaller("data_ptr")


def _getter(indices):
    """A function of args giving the tuple of args at these indices."""
    if len(indices) == 1:
        return lambda args, i=indices[0]: (args[i],)
    return operator.itemgetter(*indices) if indices else lambda args: ()


class FastLaunchFunction(JITFunction):
    """A JITFunction whose launches of a specialization it has launched before skip the
    binder (see the module's docstring). Made by `fast_launch`, never constructed."""

    def run(self, *args, grid, warmup, **kwargs):
        if warmup or self.pre_run_hooks or getattr(knobs.runtime, "add_stages_inspection_hook", None):
            return super().run(*args, grid=grid, warmup=warmup, **kwargs)
        device = driver.active.get_current_device()
        key = self._launch_key(device, args, kwargs)
        try:
            entry = self._launches.get(key)
        except TypeError:  # an unhashable keyword argument: Triton's path every time
            return super().run(*args, grid=grid, warmup=False, **kwargs)
        if entry is None:
            kernel = super().run(*args, grid=grid, warmup=False, **kwargs)
            self._remember(key, kernel, args, kwargs)
            return kernel
        kernel, tail = entry
        bound = args + tail
        stream = driver.active.get_current_stream(device)
        grid = grid(dict(zip(self.arg_names, bound))) if callable(grid) else grid
        size = len(grid)
        enter, exit_ = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        kernel.run(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, stream,
                   kernel.function, kernel.packed_metadata, kernel.launch_metadata(grid, stream, *bound),
                   enter, exit_, *bound)
        return kernel

    def _launch_key(self, device, args, kwargs):
        # Built with C-level maps over the arguments: a loop in Python would cost what
        # the binder does.
        types = tuple(map(type, args))
        split = self._splits.get(types)
        if split is None:
            tensors = [i for i, t in enumerate(types) if issubclass(t, torch.Tensor)]
            split = self._splits[types] = (_getter(tensors),
                                           _getter([i for i in range(len(args)) if i not in tensors]))
        tensors, others = split[0](args), split[1](args)
        return (device, types, others, tuple(map(_DTYPE, tensors)),
                tuple(map((15).__and__, map(_DATA_PTR, tensors))),  # 0: 16-byte aligned
                tuple(kwargs.items()), tuple(map(type, kwargs.values())), knobs.runtime.debug,
                knobs.compilation.instrumentation_mode,
                getattr(knobs.compilation, "fpsan_homomorphic_casts", None))

    def _remember(self, key, kernel, args, kwargs):
        """Keep what a launch of this key needs: the compiled kernel and the values of the
        parameters after the positional ones (constexprs only), in signature order."""
        rest = self.params[len(args):]
        if (kernel is None or not all(p.is_constexpr for p in rest)
                or not all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata",
                                                        "launch_metadata"))):
            return
        defaults = self.signature.parameters
        tail = tuple(kwargs[p.name] if p.name in kwargs else defaults[p.name].default for p in rest)
        if len(self._launches) >= _LIMIT:
            self._launches.clear()
        self._launches[key] = (kernel, tail)


def fast_launch(kernel):
    """`kernel`, launching its compiled specializations directly after their first
    launch; unchanged unless it is a plain `JITFunction` (the interpreter's kernels are not)."""
    if type(kernel) is JITFunction and os.environ.get("ADCLR_FAST_LAUNCH", "1") != "0":
        kernel.__class__ = FastLaunchFunction
        kernel._launches, kernel._splits = {}, {}
    return kernel
