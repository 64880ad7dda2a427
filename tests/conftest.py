"""Shared test set-up.

Without a GPU the Triton kernels run in Triton's interpreter, which must be switched
on before Triton decorates any kernel, so before adclr_kernels is imported.
"""

import os

# One thread unless told otherwise: the suite's tensors are small, so a second thread
# gains little, and where another job shares the cores (CI builds the integrations'
# environment beside the suite) OpenMP threads that spin for a busy core slowed some
# tests tenfold. Set before torch starts its pool; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_the_language_once_per_kernel_run():
    """Triton's interpreter patches triton.language for a kernel's run, and again at every
    call of a @triton.jit helper inside it (inspect.getmembers over the language's modules:
    about a fifth of an interpreted kernel's time in this suite, whose kernels call
    helpers in their loops). Inside a run, a helper whose language modules the kernel has
    patched already is called as it is; anything else takes Triton's own path."""
    try:
        import functools
        import inspect

        from triton.runtime import interpreter
        run_kernel, call_helper = interpreter.GridExecutor.__call__, interpreter.InterpretedFunction.__call__
        modules = (interpreter.tl, interpreter.tl.core)
        rewrite, error = interpreter.InterpretedFunction.rewrite, interpreter.InterpreterError
    except (ImportError, AttributeError):  # another Triton: its interpreter as it is
        return
    running = []  # the language modules each kernel being run patched, innermost last

    @functools.cache  # a function's module imports what it imports once
    def language_of(fn):
        return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in modules)

    def run(self, *args, **kwargs):
        running.append(language_of(self.fn))
        try:
            return run_kernel(self, *args, **kwargs)
        finally:
            running.pop()

    def call(self, *args, **kwargs):
        if not running or not language_of(self.fn) <= running[-1]:
            return call_helper(self, *args, **kwargs)
        try:
            return rewrite(self)(*args, **kwargs)
        except Exception as e:  # as Triton's own path reports it
            raise error(repr(e)) from e

    interpreter.GridExecutor.__call__ = run
    interpreter.InterpretedFunction.__call__ = call


def _keep_what_the_interpreter_recomputes():
    """Two look-ups Triton's interpreter redoes with the same answer: the builtins of five
    modules and classes, listed (inspect.getmembers) at every patch of the language, so at
    every kernel run; and a triton -> numpy dtype table it builds at every call, many per
    operation. Each is kept after its first answer; the builtins are listed from the
    unpatched language, as Triton lists them."""
    try:
        import inspect

        from triton.runtime import interpreter
        is_builtin, patch_attr = interpreter.tl.core.is_builtin, interpreter._patch_attr
        numpy_dtype_of, block_type = interpreter._get_np_dtype, interpreter.tl.block_type
    except (ImportError, AttributeError):
        return
    if not hasattr(interpreter, "_patch_builtin"):  # what is replaced below
        return
    builtins, numpy_dtypes = {}, {}

    def patch_builtin(pkg, builder, scope):
        if pkg not in builtins:
            builtins[pkg] = [(name, m) for name, m in inspect.getmembers(pkg) if is_builtin(m)]
        for name, member in builtins[pkg]:
            patch_attr(pkg, name, member, builder, scope)

    def get_np_dtype(tt_dtype):
        # A block's is its element's; a type's name says all of it (fp32, pointer<bf16>).
        element = tt_dtype.element_ty if isinstance(tt_dtype, block_type) else tt_dtype
        if element.name not in numpy_dtypes:
            numpy_dtypes[element.name] = numpy_dtype_of(element)
        return numpy_dtypes[element.name]

    interpreter._patch_builtin, interpreter._get_np_dtype = patch_builtin, get_np_dtype


def _skip_the_overflow_checks_the_interpreter_drops():
    """Triton's interpreter sanitizes every int32 add, sub and mul for overflow: both sides
    cast to int64, the operation again, two compares and an and, all built as interpreted
    tensors, then handed to device_assert, which drops them unless the options ask for
    debug, and the interpreter's never do. A quarter of the kernel tests' time in this
    suite (bench/NOTES.md); where debug is on, the checks stay."""
    try:
        import dataclasses

        from triton.runtime import interpreter
        options = interpreter.interpreter_builder.options
        checked, debug = options.sanitize_overflow, options.debug
    except (ImportError, AttributeError):
        return
    if checked and not debug:
        interpreter.interpreter_builder.options = dataclasses.replace(options, sanitize_overflow=False)


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_the_language_once_per_kernel_run()
    _keep_what_the_interpreter_recomputes()
    _skip_the_overflow_checks_the_interpreter_drops()

# Every worker on a CUDA machine opens its own CUDA context, all on the one GPU: `-n auto`
# stops at this many there, and is one per core on CPU.
MAX_CUDA_WORKERS = 8


def pytest_configure(config):
    # pytest-xdist hands each worker a quarter of its share of the tests at once, in
    # collection order: every slow test (first, below) would go to the first worker. One
    # test at a time instead (each worker keeps two queued), so that the slow ones are
    # shared out as the workers free up.
    if getattr(config.option, "maxschedchunk", 0) is None:
        config.option.maxschedchunk = 1


def pytest_collection_modifyitems(config, items):
    """The tests marked slow (10 s to 3 min each on 2 cores) first, in their order: with
    one worker per core, a long test handed out last keeps its core busy while the others
    have nothing left to run."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(optionalhook=True)  # plain pytest, without pytest-xdist, knows no such hook
def pytest_xdist_auto_num_workers(config):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(cores, MAX_CUDA_WORKERS) if torch.cuda.is_available() else cores
