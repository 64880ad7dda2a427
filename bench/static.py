"""A static model of the attention kernels on H100 (sm_90a) and A100 (sm_80), no GPU needed.

    python -m bench.static                       # every workload, bf16/fp16/fp32, both targets
    python -m bench.static --dtypes bf16 --targets sm90 --workloads vit_s16_global

What it does, per workload of `bench.workloads` and per dtype:
1. Capture. The op's own launchers run on meta tensors built as the model builds its
   inputs (views of one packed qkv projection); every `kernel[grid](...)` they issue is
   recorded instead of run, with its real arguments.
2. Compile. Triton's own binder turns those arguments into the specialization a GPU
   launch would get (pointer dtypes, 16-byte divisibility of pointers and integers,
   integers equal to 1 folded to constants, constexprs), then Triton compiles it for the
   target. Registers and local (spill) bytes come from `cuobjdump -res-usage`, shared
   memory from the compiled metadata, SASS from `nvdisasm`, all from the Triton wheel.
3. Read the loops. A loop is a backward branch in the SASS; the line info names the
   source line it belongs to, and a `# loop: <name>` comment on that line (or on the
   call that inlined it) names it. Per iteration: instructions, tensor-core ones
   (HGMMA/HMMA), MUFU (exp2, rcp), selects (SEL/FSEL) and compares (ISETP/FSETP).
4. Estimate. Trip counts per program come from the launch geometry (a mirror of the
   kernels' range arithmetic, below); each program then costs its instructions at the
   SM's issue rate and its tensor-core FLOPs at the SM's MMA rate, programs are placed
   on SM slots in launch order (occupancy from registers, shared memory and threads),
   and the kernel takes the longer of that schedule and its compulsory bytes at DRAM
   bandwidth. The floor is max(useful FLOPs / MMA rate, compulsory bytes / bandwidth).
   The assumptions are in bench/NOTES.md; a GPU run calibrates them.
5. Count what runs around the kernels: a dispatch mode records every ATen op of the
   drop-in attention module's forward and backward (meta tensors, full size), and the
   copies (stack, cat, clone, copy_, contiguous, fills) with their bytes.

Writes bench/results/static/static.json and static.md.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import functools
import json
import linecache
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton

from bench.workloads import PackedWorkload

RESULTS = Path(__file__).parent / "results" / "static"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------
# The GPUs
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    name: str
    capability: int
    sms: int
    clock_hz: float          # sustained SM clock under load
    dram_bytes_per_s: float  # bytes read + written per second
    mma_flops: dict          # dense tensor-core FLOP/s by input dtype (fp32: TF32)
    smem_per_sm: int         # shared memory an SM can give its resident programs
    smem_per_program: int    # the most one program may use
    regs_per_sm: int = 65536
    max_threads: int = 2048
    max_programs: int = 32
    issue_per_sm: int = 4    # warp-instructions per cycle (one per sub-partition)
    # What these kernels achieve, fitted to 24 kernel times measured on an H200
    # (`python -m bench.calibrate --fit`, bench/NOTES.md "Calibration"): an SM issues
    # about 0.14 warp-instructions per cycle per resident warp (each warp waits on its
    # loads, MMAs and exponentials), at most 1.9, far under the 4 it could; the
    # memory-bound delta kernel moves 75% of what a copy moves. 4, 4 and 1 give the
    # peak-rate model of the v1/v2 tables.
    ipc_per_warp: float = 0.14
    max_ipc: float = 1.9
    memory_efficiency: float = 0.75


# H100 SXM: PERF.md's ceilings (bf16 ~800 TFLOP/s on large products, ~3.0 TB/s copy),
# 1.755 GHz sustained. A100 SXM 80 GB: spec-sheet figures (bench/NOTES.md, "What is assumed").
H100 = Gpu("H100 SXM", 90, 132, 1.755e9, 3.0e12,
           {"bf16": 800e12, "fp16": 800e12, "fp32": 400e12}, 228 * 1024, 227 * 1024)
A100 = Gpu("A100 SXM", 80, 108, 1.41e9, 1.9e12,
           {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}, 164 * 1024, 163 * 1024)
# H200: the H100's chip (132 SMs, same clocks) with faster memory; the two ceilings are
# the ones measured on the device machine (bench/results/NVIDIA_H200/calibration.md).
H200 = Gpu("H200", 90, 132, 1.755e9, 4.25e12,
           {"bf16": 701e12, "fp16": 701e12, "fp32": 350e12}, 228 * 1024, 227 * 1024)
GPUS = {"sm90": H100, "sm80": A100, "h200": H200}


# ----------------------------------------------------------------------------------------
# 1. Capture
# ----------------------------------------------------------------------------------------


@dataclass
class Launch:
    kernel: object   # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple

    @property
    def name(self):
        return self.kernel.fn.__name__

    def bound(self):
        """Argument name -> value, as the kernel sees them (defaults applied)."""
        import inspect

        bound = inspect.signature(self.kernel.fn).bind(*self.args, **{
            k: v for k, v in self.kwargs.items() if k in self.kernel.arg_names})
        bound.apply_defaults()
        return dict(bound.arguments)


def _kernels():
    from adclr_kernels import attention_triton, attention_triton_short

    kernels = list({id(obj): obj for module in (attention_triton, attention_triton_short)
                    for obj in vars(module).values()
                    if isinstance(obj, triton.runtime.JITFunction)}.values())
    if not kernels:
        raise RuntimeError("the kernels were built for Triton's interpreter: run bench.static "
                           "in a process without TRITON_INTERPRET (python -m bench.static)")
    return kernels


@contextlib.contextmanager
def recording(capability):
    """Record every kernel launch instead of running it; the launchers see `capability`."""
    from adclr_kernels import attention_triton

    launches = []
    kernels = _kernels()

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            launches.append(Launch(kernel, args, kwargs, grid))
        return run

    saved_capability = attention_triton.device_capability
    attention_triton.device_capability = lambda device: capability
    for kernel in kernels:
        kernel.run = recorder(kernel)
    try:
        yield launches
    finally:
        attention_triton.device_capability = saved_capability
        for kernel in kernels:
            del kernel.run


def _meta_qkv(batch_shape, heads, head_dim, dtype):
    """A packed qkv projection output (batch_shape..., 3, H, D) on the meta device."""
    return torch.empty(*batch_shape, 3, heads, head_dim, dtype=dtype, device="meta")


def capture(workload, dtype, capability, flags=(False, False, False)):
    """(forward launches, backward launches) of one attention layer's op call.

    Runs the bodies of the custom ops the drop-in module calls (the packed-qkv op,
    batched or with the trainer's VarlenLayout) on meta tensors, so every buffer, stride
    and grid is the one a GPU call would get.
    """
    from adclr_kernels import VarlenLayout
    from adclr_kernels import attention_triton as T

    scale = workload.head_dim ** -0.5
    with recording(capability) as launches:
        if isinstance(workload, PackedWorkload):
            lengths, queries = zip(*workload.sequences())
            qkv = _meta_qkv((workload.tokens,), workload.heads, workload.head_dim, dtype)
            layout = VarlenLayout(lengths, queries, device="meta")
            cu, nq, max_len, fwd_tiles, bwd_tiles, seq_tiles, runs = T.varlen_tables(layout, qkv[:, 0])
            if workload.offsets:  # tables of the capacity varlen_schedule sizes them to
                runs = ()
                fwd_tiles, bwd_tiles = (
                    torch.empty(T.tile_capacity(len(lengths), workload.tokens, max_len, block), 2,
                                dtype=torch.int32, device="meta")
                    for block in T._table_blocks(qkv, max_len))
            geometry = (cu, nq, fwd_tiles, bwd_tiles, seq_tiles, 0, max_len, list(runs))
        else:
            qkv = _meta_qkv((workload.batch, workload.seq_len), workload.heads,
                            workload.head_dim, dtype)
            geometry = (None, None, None, None, None, workload.num_queries, 0, [])
        args = (*geometry, workload.num_prefix, *flags, scale)
        out, lse = T._qkv_fwd_impl(qkv, *args)
        n_fwd = len(launches)
        T._qkv_bwd_impl(torch.empty_like(out), qkv, out, lse, *args)
    return launches[:n_fwd], launches[n_fwd:]


def sequences(workload):
    if isinstance(workload, PackedWorkload):
        return [Sequence(length, q, workload.num_prefix) for length, q in workload.sequences()]
    return [Sequence(workload.seq_len, workload.num_queries, workload.num_prefix)] * workload.batch


# ----------------------------------------------------------------------------------------
# 2. Compile, and read registers, spills, shared memory and SASS
# ----------------------------------------------------------------------------------------


def _tool(name):
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


@dataclass
class Instr:
    addr: int
    opcode: str
    frames: tuple   # ((file, line), ...) innermost first


@dataclass
class Compiled:
    name: str
    capability: int
    num_warps: int
    registers: int | None     # None: compiled shared_only (no ptxas)
    spill_bytes: int | None   # local memory per thread (spills and stack)
    shared_bytes: int
    cubin: bytes = field(repr=False)

    # Disassembled when first asked for: nvdisasm takes about a second a kernel, as long
    # as ptxas, and a compile check of a kernel with no local memory needs no SASS.
    @functools.cached_property
    def _sass(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "kernel.cubin"
            path.write_bytes(self.cubin)
            return parse_sass(subprocess.run([_tool("nvdisasm"), "-c", "-gi", str(path)],
                                             capture_output=True, text=True, check=True).stdout)

    @property
    def instrs(self):
        return self._sass[0]

    @property
    def branches(self):  # (branch addr, target addr)
        return self._sass[1]


def specialization(launch, capability):
    """Triton's own (signature, constexprs, attrs, options) for this launch on a target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.kwargs, debug=False)
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    return target, signature, constexprs, attrs, options


_COMPILED = {}


@functools.cache
def _private_cache_dir(kind=""):
    """This process's own Triton cache. The shared one is keyed by a kernel's source text,
    not its file: a kernel compiled in another checkout (a worktree, an edited copy)
    would come back with that file's line numbers, and the loops, named by the markers on
    those lines, would be misnamed or unnamed, with their trip counts wrong. Compiles
    stopped early (`_through_llir`) keep a cache of their own: Triton 3.6 does not key
    its cache by the pipeline."""
    path = tempfile.mkdtemp(prefix=f"adclr-static-triton{kind}-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@contextlib.contextmanager
def _cache_dir(path):
    previous = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = path
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_CACHE_DIR"]
        else:
            os.environ["TRITON_CACHE_DIR"] = previous


def compile_launch(launch, capability, shared_only=False):
    """The launch compiled for a target: registers, spills and SASS from ptxas's cubin.
    shared_only: stop where Triton has laid out shared memory (its LLVM IR), before PTX
    and ptxas, which take most of a wide fp32 kernel's compile; registers and spill bytes
    are then None."""
    target, signature, constexprs, attrs, options = specialization(launch, capability)
    key = (launch.name, capability, shared_only, repr(signature), repr(constexprs),
           repr(attrs), repr(sorted(options.__dict__.items())))
    if key not in _COMPILED:
        from triton.compiler import ASTSource

        src = ASTSource(launch.kernel, signature, constexprs, attrs)
        with _cache_dir(_private_cache_dir("-llir" if shared_only else "")), (
                _through_llir() if shared_only else contextlib.nullcontext()):
            compiled = triton.compile(src, target=target, options=options.__dict__)
        _COMPILED[key] = (
            Compiled(launch.name, capability, compiled.metadata.num_warps, None, None,
                     compiled.metadata.shared, b"") if shared_only
            else _read_cubin(launch.name, capability, compiled))
    return _COMPILED[key]


@contextlib.contextmanager
def _through_llir():
    """Triton's pipeline with its PTX and cubin stages left empty (its stages hook)."""
    from triton import knobs

    def hook(*args):
        if not args:  # Triton 3.9 asks first for a part of its cache key
            return "adclr-through-llir", "adclr-through-llir"
        stages = args[1]

        def no_ptx(llir, metadata):
            # make_ptx names the kernel, from the PTX; the LLVM IR's one definition names it
            metadata["name"] = re.search(r"define[^@]*@([\w$.]+)\(", llir).group(1)
            return ""
        stages["ptx"] = no_ptx
        stages["cubin"] = lambda ptx, metadata: b""

    previous = knobs.runtime.add_stages_inspection_hook
    knobs.runtime.add_stages_inspection_hook = hook
    try:
        yield
    finally:
        knobs.runtime.add_stages_inspection_hook = previous


def _read_cubin(name, capability, compiled):
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    return Compiled(name, capability, compiled.metadata.num_warps, regs, local + stack,
                    compiled.metadata.shared, compiled.asm["cubin"])


_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")


def parse_sass(text):
    """Instructions (address, opcode, source frames) and the branches (from, to).

    nvdisasm -gi prints a location only when it changes, as a group of `//##` lines:
    the innermost source line first, then each call site that inlined it.
    """
    instrs, labels, branches_to = [], {}, []
    frames, group, pending_labels = (), [], []
    for line in text.splitlines():
        line = line.strip()
        m = _LINE.match(line)
        if m:
            group.append((m.group(1), int(m.group(2))))
            continue
        if group:
            frames, group = tuple(group), []
        label = _LABEL.match(line)
        if label:
            pending_labels.append(label.group(1))
            continue
        m = _INSTR.search(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for name in pending_labels:
            labels[name] = addr
        pending_labels = []
        instrs.append(Instr(addr, m.group(3), frames))
        if m.group(3) == "BRA":
            target = re.search(r"(\.L_x_\d+)", m.group(4))
            if target:
                branches_to.append((addr, target.group(1)))
    return instrs, [(addr, labels[name]) for addr, name in branches_to if name in labels]


def compile_check(head_dim, dtype_name, capability, packed=False, flags=(False, False, False),
                  layout=(1, 196, 10), compile_for=None, ptxas_for=None):
    """Compile what the op launches for a ViT-S/16-like layer of this head_dim (batched
    sequences of (prefix, raw, query) tokens): one row (kernel, registers, spill bytes,
    shared bytes, what the loops' spills cost as they run: `spills_run`) per kernel. For
    tests and CI.

    compile_for: the target to compile the launches for, where not `capability` (whose
    launcher rules choose them). sm_86's launches compiled for sm_80 share the compiles of
    launches sm_80 takes too: Triton lowers the two alike, so shared memory is the same
    (registers and spills, ptxas's, are sm_80's then).

    ptxas_for: the kernels (by name) whose registers and spills are asked for; the others
    are compiled only until their shared memory is known (None: every kernel)."""
    from adclr_kernels.attention_triton import ONEPASS_MIN_BATCHED_PROGRAMS, ONEPASS_MIN_PROGRAMS_SM80
    from bench.workloads import Workload

    # Batched: enough (sequence, head) programs for the one-pass backward's rules. Packed:
    # three images' crops image by image, more runs than go by runs: the packed kernels.
    programs = max(ONEPASS_MIN_BATCHED_PROGRAMS, ONEPASS_MIN_PROGRAMS_SM80)
    workload = (PackedWorkload("check", "", 3, 2, head_dim, by_image=True) if packed
                else Workload("check", "", programs // 2, 1, 2, head_dim, *layout))
    forward, backward = capture(workload, DTYPES[dtype_name], capability, flags)
    rows = []
    for launch in forward + backward:
        compiled = compile_launch(launch, compile_for or capability,
                                  shared_only=ptxas_for is not None and launch.name not in ptxas_for)
        per_program, repeated, in_loops = 0, [], 0
        if compiled.spill_bytes:  # no local memory, nothing spilled: no SASS to read
            trips = loop_trips(launch, sequences(workload), workload.heads)
            loop_rows = [dict(l.row(), trips=trips.get(name, 0))
                         for name, l in loops(compiled)[0].items()]
            per_program, repeated = spills_run(loop_rows, launch.grid[0])
            in_loops = loop_spills(compiled)
        rows.append(dict(kernel=launch.name, registers=compiled.registers,
                         spill_bytes=compiled.spill_bytes, shared_bytes=compiled.shared_bytes,
                         loop_spill_instrs=in_loops,
                         loop_spills_per_program=per_program, repeated_spill_stores=repeated,
                         maxnreg=launch.kwargs.get("maxnreg"), compiled_for=compile_for or capability))
    return rows


# ----------------------------------------------------------------------------------------
# 3. Loops
# ----------------------------------------------------------------------------------------

_MARKER = re.compile(r"#\s*loop:\s*([\w.]+)")
_RARE = re.compile(r"#\s*branch:\s*rare")


@dataclass
class Loop:
    name: str
    instrs: int      # SASS per iteration (nested loops excluded)
    mma: int         # HGMMA / HMMA
    mufu: int
    select: int      # SEL, FSEL
    compare: int     # ISETP, FSETP
    mma_flops: int   # tensor-core FLOPs per iteration, whole program
    setup: int       # SASS of this loop outside its body (pipeline prologue and
                     # epilogue, or the whole body where the compiler proved one trip):
                     # run once when the loop runs at all
    setup_mma_flops: int
    rare: int = 0    # SASS of the body behind a `# branch: rare` (in instrs too): charged
                     # on one trip per program, the first, not on every trip
    spills: int = 0  # local-memory loads and stores (LDL, STL) in the body
    spill_stores: int = 0

    def row(self):
        return dataclasses.asdict(self)


def mma_flops(opcode, num_warps):
    """FLOPs one program does when its warps execute this instruction once."""
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", opcode)
    if m:  # one instruction per warpgroup of 4 warps
        return 2 * math.prod(map(int, m.groups())) * (num_warps // 4)
    m = re.match(r"HMMA\.(16)(8)(8|16)", opcode)
    if m:  # one instruction per warp
        return 2 * math.prod(map(int, m.groups())) * num_warps
    return 0


def _loop_name(frames):
    """The `# loop:` marker on the loop's own `for` line or on the call that inlined it
    (looked for from the outermost frame in), or None."""
    for file, line in reversed(frames):
        m = _MARKER.search(linecache.getline(file, line))
        if m:
            return m.group(1)
    return None


def _regions(compiled):
    """(first, last) instruction index of every loop (a backward branch), innermost
    first. A branch to itself is the trap every kernel ends with, not a loop."""
    by_addr = {ins.addr: i for i, ins in enumerate(compiled.instrs)}
    return sorted(((by_addr[to], by_addr[frm]) for frm, to in compiled.branches if to < frm),
                  key=lambda r: r[1] - r[0])


def loop_spills(compiled):
    """Local-memory loads and stores (spills) inside loop bodies: those run every
    iteration (`spills_run` weighs them by trips). A spill outside the loops runs once per
    program."""
    inside = {i for lo, hi in _regions(compiled) for i in range(lo, hi + 1)}
    return sum(compiled.instrs[i].opcode.startswith(("LDL", "STL")) for i in inside)


def _rare_instrs(compiled, body):
    """Instructions of `body` (instruction indices) that a forward branch from a line
    marked `# branch: rare` skips: the SASS between that branch and its target."""
    frames = {compiled.instrs[i].addr: compiled.instrs[i].frames for i in body}
    skipped = set()
    for frm, to in compiled.branches:
        if frm in frames and to > frm and frames[frm] and _RARE.search(
                linecache.getline(*frames[frm][0])):
            skipped |= {a for a in frames if frm < a < to}
    return len(skipped)


def loop_trips(launch, seqs, heads):
    """{loop name: trips summed over the launch's programs}."""
    totals = {}
    for trips in programs(launch, seqs, heads):
        for name, count in trips.items():
            totals[name] = totals.get(name, 0) + count
    return totals


def spills_run(loop_rows, grid):
    """What a kernel's loop spills cost as they run: (spill instructions a program runs in
    its loops, on average; names of loops that store a spill and run more than once per
    program). loop_rows: the `loops` of a table row (name, spills, spill_stores, trips)."""
    per_program = sum(l["spills"] * l["trips"] for l in loop_rows) / grid
    repeated = [l["name"] for l in loop_rows if l["spill_stores"] and l["trips"] > grid]
    return per_program, repeated


def loops(compiled):
    """The loops read off the SASS, and what no loop claims (every program runs it once):
    returns ({name: Loop}, straight-line instructions, their tensor-core FLOPs)."""
    instrs, warps = compiled.instrs, compiled.num_warps
    in_body, found = {}, {}
    for lo, hi in _regions(compiled):
        name = _loop_name(instrs[hi].frames) or f"unnamed@{instrs[lo].addr:#x}"
        if name in found:
            raise RuntimeError(f"{compiled.name}: two loops are named {name!r}")
        body = [i for i in range(lo, hi + 1) if i not in in_body]  # inner loops have theirs
        for i in body:
            in_body[i] = name
        ops = [instrs[i].opcode for i in body]
        found[name] = Loop(
            name, len(ops), rare=_rare_instrs(compiled, body),
            spills=sum(op.startswith(("LDL", "STL")) for op in ops),
            spill_stores=sum(op.startswith("STL") for op in ops),
            mma=sum(op.startswith(("HGMMA", "HMMA")) for op in ops),
            mufu=sum(op.startswith("MUFU") for op in ops),
            select=sum(op.split(".")[0] in ("SEL", "FSEL") for op in ops),
            compare=sum(op.split(".")[0] in ("ISETP", "FSETP") for op in ops),
            mma_flops=sum(mma_flops(op, warps) for op in ops), setup=0, setup_mma_flops=0)
    straight = straight_flops = 0
    for i, ins in enumerate(instrs):
        if i in in_body:
            continue
        name = _loop_name(ins.frames)
        if name is None:
            straight += 1
            straight_flops += mma_flops(ins.opcode, warps)
            continue
        loop = found.setdefault(name, Loop(name, 0, 0, 0, 0, 0, 0, 0, 0))
        loop.setup += 1
        loop.setup_mma_flops += mma_flops(ins.opcode, warps)
    return found, straight, straight_flops


# ----------------------------------------------------------------------------------------
# 4. Trip counts, and the time model
# ----------------------------------------------------------------------------------------
# The range arithmetic below mirrors the kernels' (`_key_ranges`, `_dkdv_row_range`,
# `_dkdv_passes`, `_onepass_passes` in adclr_kernels/attention_triton.py), argument for
# argument; tests/bench/test_static_model.py runs both over a grid of layouts, blocks and masks.


@dataclass(frozen=True)
class Sequence:
    seq_len: int
    num_queries: int
    num_prefix: int = 1

    @property
    def visible(self):
        return self.seq_len - self.num_queries


PREFIX_BLOCK = 16  # attention_triton.PREFIX_BLOCK


def _trips(lo, hi, step):
    return max(0, -(-(hi - lo) // step))


def _key_ranges(m0, seq_len, key_len, visible, num_prefix, block_m, mask):
    """Columns [lo1, hi1) (visible) and [lo2, hi2) (query keys) the tiles of row block m0
    walk, and the prefix columns [0, p_hi) its raw rows walk one by one."""
    holds_queries = m0 + block_m > visible and visible < seq_len
    lo1 = num_prefix if (holds_queries and not mask.sees_prefix) else 0
    p_hi = lo1 if m0 < visible else 0
    hi1, lo2, hi2 = visible, visible, visible
    if mask.sees_queries and m0 + block_m > visible:
        hi2 = key_len
    if m0 >= seq_len:
        hi1, hi2, p_hi = lo1, lo2, 0
    return lo1, hi1, lo2, hi2, p_hi


def _first_columns(lo1, hi1, p_hi, block_n, first):
    """(n_left, t0): the columns of [lo1, hi1) the first narrow tile (forward, and dQ)
    holds after its p_hi prefix columns, and where its key steps start."""
    n_left = min(max(hi1 - lo1, 0) % block_n, max(first - p_hi, 0))
    return n_left, lo1 + n_left


def _dkdv_row_range(n0, seq_len, visible, num_prefix, block_n, mask):
    """Rows [lo, hi) that see some column of the key block n0 other than their own."""
    if n0 < visible:
        return 0, (seq_len if mask.sees_prefix or n0 + block_n > num_prefix else visible)
    if mask.sees_queries:
        return visible, seq_len
    return 0, 0


def _dkdv_passes(n0, lo, hi, visible, num_prefix, block_n, mask):
    """(a0, a1, b0, b1, r0): the two passes [a0, a1), [b0, b1) over the rows of key block
    n0, and [r0, hi), the query rows taken one by one."""
    has_prefix = not mask.sees_prefix and n0 < num_prefix
    has_queries = mask.sees_queries and n0 + block_n > visible
    a0, a1, b0, b1, r0 = lo, hi, hi, hi, hi
    if (has_prefix or has_queries) and lo < visible < hi:
        if has_queries:
            a1 = visible
            if has_prefix:
                r0 = visible
            else:
                b0 = visible
        else:
            a0, b0, b1 = visible, lo, visible
    return a0, a1, b0, b1, r0


def _row_block_trips(m0, s, block_m, block_n, loop, mask, first=PREFIX_BLOCK):
    """Trips of the four column loops of a row block (forward, and dQ)."""
    if m0 >= s.seq_len:
        return {}
    lo1, hi1, lo2, hi2, p_hi = _key_ranges(m0, s.seq_len, s.seq_len, s.visible, s.num_prefix,
                                           block_m, mask)
    t0 = lo1
    if not mask.sees_prefix:
        t0 = _first_columns(lo1, hi1, p_hi, block_n, first)[1]
    c2 = t0 + (hi1 - t0) // block_n * block_n
    # The prefix columns: the first `first` in the first tile, outside any loop, the rest
    # in groups of PREFIX_BLOCK (the forward's one trip per column inside each).
    prefix = {f"{loop}prefix": _trips(first, p_hi, PREFIX_BLOCK)}
    if loop == "fwd.":
        prefix["fwd.prefix_values"] = max(0, p_hi - first)
    return {**prefix, f"{loop}interior": _trips(t0, c2, block_n),
            f"{loop}boundary": _trips(c2, hi1, block_n), f"{loop}queries": _trips(lo2, hi2, block_n)}


def _key_block_trips(n0, s, block_m, block_n, mask, split_rows):
    """Trips of the row loops of a key block (dK, dV)."""
    if n0 >= s.seq_len:  # the op's keys: every token of the sequence
        return {}
    lo, hi = _dkdv_row_range(n0, s.seq_len, s.visible, s.num_prefix, block_n, mask)
    a0, a1, b0, b1, r0 = _dkdv_passes(n0, lo, hi, s.visible, s.num_prefix, block_n, mask)
    first = ({"bwd.dkdv_interior": (a1 - a0) // block_m,
              "bwd.dkdv_interior_last": int((a1 - a0) % block_m != 0)} if split_rows
             else {"bwd.dkdv_interior": _trips(a0, a1, block_m)})
    return {**first, "bwd.dkdv_second": _trips(b0, b1, block_m),
            "bwd.dkdv_rows": _trips(r0, hi, block_m), "bwd.dkdv_row": hi - r0}


def _onepass_passes(n0, seq_len, visible, num_prefix, block_n):
    """(q_hi, raw_hi): the one-pass backward's query rows [V, q_hi) and rows [0, raw_hi) of
    key block n0."""
    q_hi, raw_hi = visible, seq_len
    if n0 < num_prefix:
        raw_hi = visible
        if n0 + block_n > num_prefix:
            q_hi = seq_len
    return q_hi, raw_hi


def _onepass_trips(s, a):
    """Trips of the one-pass backward's loops for one (sequence, head): the mirror of
    `_onepass_bwd_kernel`'s key-block walk (default mask rule, or SEES_PREFIX alone)."""
    block_m, block_n = a["BLOCK_M"], a["BLOCK_N"]
    key_len = s.seq_len if a["VARLEN"] else a["key_len"]  # packed: each sequence's own keys
    # delta: the whole row tiles, then the rows left in half-height tiles.
    trips = {"bwd1.delta": s.seq_len // block_m,
             "bwd1.delta_last": _trips(0, s.seq_len % block_m, block_m // 2),
             "bwd1.dq": _trips(0, s.seq_len, block_m),
             "bwd1.keys": _trips(0, key_len, block_n), "bwd1.query_rows": 0, "bwd1.rows": 0,
             "bwd1.rows_last": 0}
    for n0 in range(0, key_len, block_n):
        q_hi, raw_hi = _onepass_passes(n0, s.seq_len, s.visible, s.num_prefix, block_n)
        if a["SEES_PREFIX"]:  # every row walks every visible block, in one pass
            q_hi, raw_hi = s.visible, s.seq_len
        if n0 >= s.visible:  # query keys: no row sees them
            raw_hi = 0
        trips["bwd1.query_rows"] += _trips(s.visible, q_hi, block_m)
        trips["bwd1.rows"] += raw_hi // block_m
        trips["bwd1.rows_last"] += int(raw_hi % block_m != 0)
    return trips


def _program_blocks(launch, seqs, heads, block):
    """(sequence, block index) of every program in launch order (one block each)."""
    a = launch.bound()
    if launch.kwargs.get("TILED"):
        from adclr_kernels.varlen import longest_first

        counts = [-(-s.seq_len // block) for s in seqs]
        tiles = [(i, j) for i in longest_first(counts) for j in range(counts[i])]
        assert len(tiles) <= a["num_blocks"], "tile table mirror out of step with the layout"
        # A table written on the device (varlen_schedule) ends in idle slots: a block past
        # the end of sequence 0.
        idle = (0, max(s.seq_len for s in seqs) // block + 1)
        tiles += [idle] * (a["num_blocks"] - len(tiles))
        return [tiles[pid // heads] for pid in range(launch.grid[0])]  # heads fastest
    blocks = a["num_blocks"]
    return [(pid // blocks // heads, pid % blocks) for pid in range(launch.grid[0])]


def launch_sequences(launch, seqs):
    """The sequences of the workload's `seqs` that a launch attends: all of them, but for a
    batched launch its own num_seqs sequences of its length (one run of a packed layout
    attended run by run: `batched_runs`), which every batched workload's are."""
    a = launch.bound()
    if a.get("VARLEN"):
        return seqs
    length = a["seq_len"] if "seq_len" in a else a["SEQ_LEN"]
    alike = [s for s in seqs if s.seq_len == length and a.get("visible", s.visible) == s.visible]
    assert len(alike) >= a["num_seqs"], "a batched launch of sequences the workload lacks"
    return alike[:1] * a["num_seqs"]


def programs(launch, seqs, heads):
    """Trip counts of every program of a launch, in launch order: [{loop: trips}]."""
    from adclr_kernels.mask import QueryMask

    seqs = launch_sequences(launch, seqs)
    a = launch.bound()
    if launch.name in ONESHOT:
        # Straight-line code over GROUP whole sequences per program (the grid has no
        # program without one); the non-finite path's 0-or-1-trip loop is not taken.
        assert launch.grid[0] == -(-a["num_seqs"] // a["GROUP"]) * a["num_heads"]
        return [{"group": 1}] * launch.grid[0]
    if launch.name == "_onepass_bwd_kernel":
        order = range(len(seqs))
        if launch.kwargs.get("TILED"):  # VarlenLayout.sequence_tiles: one program per sequence
            from adclr_kernels.attention_triton import SEQUENCE_BLOCK
            from adclr_kernels.varlen import longest_first

            order = longest_first([-(-s.seq_len // SEQUENCE_BLOCK) for s in seqs])
        return [_onepass_trips(seqs[order[pid // heads]], a) for pid in range(launch.grid[0])]
    mask = QueryMask(*(bool(a.get(f"SEES_{x}", False)) for x in ("PREFIX", "SELF", "QUERIES")))
    # The backward's programs step by min(BLOCK_N1, BLOCK_M2) rows, the others by BLOCK_M.
    block_rows = min(a["BLOCK_N1"], a["BLOCK_M2"]) if "BLOCK_N1" in a else a["BLOCK_M"]
    out = []
    for seq, block in _program_blocks(launch, seqs, heads, block_rows):
        s = seqs[seq]
        if launch.name == "_unidirectional_fwd_kernel":
            trips = _row_block_trips(block * a["BLOCK_M"], s, a["BLOCK_M"], a["BLOCK_N"], "fwd.", mask,
                                     a["FIRST_BLOCK"])
        elif launch.name == "_unidirectional_bwd_kernel":
            trips = _key_block_trips(block * a["BLOCK_N1"], s, a["BLOCK_M1"], a["BLOCK_N1"], mask,
                                     a["SPLIT_ROWS"])
            # dQ's first narrow tile: none for rows wider than 128 (all prefix columns after
            # the tiles).
            trips.update(_row_block_trips(block * a["BLOCK_M2"], s, a["BLOCK_M2"], a["BLOCK_N2"],
                                          "bwd.dq_", mask, PREFIX_BLOCK if a["BLOCK_D"] <= 128 else 0))
        else:
            trips = {"rows": int(block * a["BLOCK_M"] < s.seq_len)}
        out.append(trips)
    return out


def occupancy(compiled, gpu):
    """Programs resident per SM: the tightest of registers, shared memory, threads."""
    if compiled.shared_bytes > gpu.smem_per_program:
        return 0
    warps = compiled.num_warps
    regs_per_warp = -(-compiled.registers * 32 // 256) * 256  # allocated in 256-register units
    by_regs = (gpu.regs_per_sm // regs_per_warp) // warps
    by_smem = gpu.smem_per_sm // (compiled.shared_bytes + 1024)  # 1 KB reserved per program
    return min(by_regs, by_smem, gpu.max_threads // (32 * warps), gpu.max_programs)


def achieved_ipc(gpu, resident_warps):
    """Warp-instructions an SM issues per cycle with this many warps resident."""
    return min(gpu.issue_per_sm, gpu.max_ipc, gpu.ipc_per_warp * resident_warps)


def schedule(costs, occ, gpu, mma_rate, num_warps):
    """Finish time of programs placed, in launch order, on the first free SM slot.

    costs: (warp-instructions, tensor-core FLOPs) per program. The occ programs on an SM
    share its issue slots (at the rate their occ * num_warps warps achieve) and tensor
    cores; a program takes the longer of the two.
    """
    import heapq

    # A launch of fewer programs than the SMs hold spreads them out: an SM shares its issue
    # slots among the programs it is given, not among as many as would fit.
    occ = min(occ, max(1, -(-len(costs) // gpu.sms)))
    issue_rate = gpu.clock_hz * achieved_ipc(gpu, occ * num_warps) / occ
    mma_per_slot = mma_rate / gpu.sms / occ
    slots = [0.0] * (gpu.sms * occ)
    for instrs, flops in costs:
        start = heapq.heappop(slots)
        heapq.heappush(slots, start + max(instrs / issue_rate, flops / mma_per_slot))
    return max(slots)


@dataclass(frozen=True)
class Traffic:
    """Compulsory work of one kernel: bytes it must move, FLOPs it must do."""
    bytes: float
    flops: float


def traffic(name, seqs, heads, head_dim, elem):
    """Bytes and useful FLOPs (default options: rows see the visible keys, queries the
    raw ones) of each kernel kind, summed over sequences and heads."""
    total_bytes = total_flops = 0
    for s in seqs:
        L, V, Q = s.seq_len, s.visible, s.num_queries
        pairs = V * V + Q * (V - s.num_prefix)
        row, key = L * head_dim * elem, V * head_dim * elem
        if name == "fwd":      # q, k, v in; o and the logsumexp out
            b, f = 2 * row + 2 * key + 4 * L, 4 * head_dim * pairs
        elif name == "delta":  # o, dO, lse in; (lse, delta) out
            b, f = 2 * row + 12 * L, 0
        else:                  # q, k, v, dO, lse, delta in; dq, dk, dv (all L rows) out
            b, f = 2 * row + 2 * key + 8 * L + 3 * row, 10 * head_dim * pairs
        total_bytes += b * heads
        total_flops += f * heads
    return Traffic(total_bytes, total_flops)


KIND = {"_unidirectional_fwd_kernel": "fwd", "_unidirectional_bwd_delta_kernel": "delta",
        "_unidirectional_bwd_kernel": "bwd", "_oneshot_fwd_kernel": "fwd",
        "_oneshot_bwd_kernel": "bwd", "_onepass_bwd_kernel": "bwd"}
ONESHOT = ("_oneshot_fwd_kernel", "_oneshot_bwd_kernel")


@dataclass(frozen=True)
class KernelWork:
    """What a launch's programs execute, whatever the GPU: the kernel's loops and
    straight-line SASS, each program's (warp-instructions, tensor-core FLOPs), the programs
    with nothing to do, and each loop's trips summed over the programs."""
    loop_stats: dict
    base_instrs: int
    costs: list
    empty: int
    trip_totals: dict


def kernel_work(launch, compiled, seqs, heads):
    loop_stats, base_instrs, base_flops = loops(compiled)
    warps = compiled.num_warps
    costs, empty, trip_totals = [], 0, {name: 0 for name in loop_stats}
    for trips in programs(launch, seqs, heads):
        if not any(trips.values()):
            empty += 1
        instrs, flops = base_instrs * warps, base_flops
        for name, count in trips.items():
            loop = loop_stats.get(name)
            if loop is None or count == 0:
                continue
            instrs += (count * (loop.instrs - loop.rare) + loop.rare + loop.setup) * warps
            flops += count * loop.mma_flops + loop.setup_mma_flops
            trip_totals[name] += count
        costs.append((instrs, flops))
    return KernelWork(loop_stats, base_instrs, costs, empty, trip_totals)


def model_kernel(launch, compiled, seqs, heads, head_dim, dtype_name, gpu, work=None):
    """One row of the table: what the compiled kernel is, and how long it should take.
    work: `kernel_work` of the same arguments, where one kernel is modelled on many GPUs
    (bench.calibrate's fit)."""
    work = work or kernel_work(launch, compiled, seqs, heads)
    costs, loop_stats, trip_totals = work.costs, work.loop_stats, work.trip_totals
    warps = compiled.num_warps
    occ = occupancy(compiled, gpu)
    mma_rate = gpu.mma_flops[dtype_name]
    seqs = launch_sequences(launch, seqs)
    need = traffic(KIND[launch.name], seqs, heads, head_dim, DTYPES[dtype_name].itemsize)
    if launch.name == "_onepass_bwd_kernel":  # reads o for delta (the one-shot: P dP)
        elem = DTYPES[dtype_name].itemsize
        need = Traffic(need.bytes + sum(s.seq_len for s in seqs) * heads * (head_dim * elem - 4),
                       need.flops)
    floor_s = max(need.flops / mma_rate, need.bytes / gpu.dram_bytes_per_s)
    memory_s = need.bytes / (gpu.dram_bytes_per_s * gpu.memory_efficiency)
    if occ == 0:
        estimate_s, bound = float("inf"), "does not fit"
    else:
        estimate_s = max(schedule(costs, occ, gpu, mma_rate, warps), memory_s)
        bounds = {"issue": schedule([(i, 0) for i, _ in costs], occ, gpu, mma_rate, warps),
                  "tensor cores": schedule([(0, f) for _, f in costs], occ, gpu, mma_rate, warps),
                  "memory": memory_s}
        bound = max(bounds, key=bounds.get)
    hot = max((l for l in loop_stats.values() if l.instrs),
              key=lambda l: trip_totals[l.name] * l.instrs, default=None)
    return dict(
        kernel=launch.name, kind=KIND[launch.name], grid=launch.grid[0], empty_programs=work.empty,
        num_warps=warps, registers=compiled.registers, spill_bytes=compiled.spill_bytes,
        loop_spill_instrs=loop_spills(compiled),
        maxnreg=launch.kwargs.get("maxnreg"),
        shared_bytes=compiled.shared_bytes, programs_per_sm=occ,
        constexprs={k: v for k, v in launch.kwargs.items() if k.isupper()},
        straight_line_sass=work.base_instrs,
        loops=[dict(l.row(), trips=trip_totals[l.name]) for l in loop_stats.values()],
        hot_loop=hot.name if hot else None, hot_loop_sass=hot.instrs if hot else None,
        bytes=need.bytes, useful_flops=need.flops,
        **({f"{k.replace(' ', '_')}_us": v * 1e6 for k, v in bounds.items()} if occ else {}),
        estimate_us=estimate_s * 1e6, floor_us=floor_s * 1e6, bound=bound,
        vs_floor=estimate_s / floor_s if floor_s else None)


# ----------------------------------------------------------------------------------------
# 5. What runs around the kernels
# ----------------------------------------------------------------------------------------

COPY_OPS = ("stack", "cat", "clone", "copy_", "contiguous", "_to_copy", "zeros", "zero_",
            "fill_", "new_zeros", "zeros_like", "index_put_", "constant_pad_nd")


def autograd_work(workload, dtype, qk_norm=False):
    """Every ATen and custom op of one drop-in attention layer, forward and backward.

    The layer runs as the trainer runs it (`adclr_kernels.nn.UnidirectionalAttention`,
    Triton backend) on meta tensors of the workload's full size: the kernels are the
    custom ops' fake implementations, so what is recorded is exactly what autograd and
    the module add around them. Returns (kernel launches by op, copies [(op, bytes)]).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    from adclr_kernels.nn import UnidirectionalAttention

    custom, copies = [], []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if func.namespace == "adclr_kernels":
                custom.append(name)
            elif name in COPY_OPS:
                outs = out if isinstance(out, (tuple, list)) else [out]
                copies.append((name, sum(t.numel() * t.element_size() for t in outs
                                         if isinstance(t, torch.Tensor))))
            return out

    heads, dim = workload.heads, workload.heads * workload.head_dim
    layer = UnidirectionalAttention(dim, heads, qkv_bias=True, qk_norm=qk_norm, backend="triton")
    layer = layer.to(device="meta", dtype=dtype)
    if isinstance(workload, PackedWorkload):
        from adclr_kernels import VarlenLayout

        layout = VarlenLayout(*zip(*workload.sequences()), device="meta")
        x = torch.empty(workload.tokens, dim, dtype=dtype, device="meta", requires_grad=True)
        call = lambda: layer(x, None, workload.num_prefix, cu_seqlens=layout)  # noqa: E731
    else:
        x = torch.empty(workload.batch, workload.seq_len, dim, dtype=dtype, device="meta",
                        requires_grad=True)
        call = lambda: layer(x, workload.num_queries, workload.num_prefix)  # noqa: E731
    with Record():
        call().sum().backward()
    return custom, copies


# ----------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------


def run(workloads, dtype_names, gpu_keys, log=print):
    rows, layers = [], []
    for workload in workloads:
        seqs = sequences(workload)
        for dtype_name in dtype_names:
            for gpu_key in gpu_keys:
                gpu = GPUS[gpu_key]
                forward, backward = capture(workload, DTYPES[dtype_name], gpu.capability)
                for launch in forward + backward:
                    t0 = time.perf_counter()
                    compiled = compile_launch(launch, gpu.capability)
                    row = model_kernel(launch, compiled, seqs, workload.heads, workload.head_dim,
                                       dtype_name, gpu)
                    row.update(workload=workload.id, label=workload.describe(), dtype=dtype_name,
                               gpu=gpu.name, target=f"sm_{gpu.capability}")
                    rows.append(row)
                    log(f"  {gpu_key} {dtype_name} {workload.id} {row['kernel']}: "
                        f"{row['registers']} regs, {row['spill_bytes']} B spilled, "
                        f"{row['shared_bytes']} B shared, "
                        + (f"hot loop {row['hot_loop_sass']} SASS, " if row["hot_loop_sass"] else "no loop, ")
                        + f"{row['estimate_us']:.1f} us (floor {row['floor_us']:.1f}, {row['bound']}) "
                        f"[{time.perf_counter() - t0:.1f} s]")
            custom, copies = autograd_work(workload, DTYPES[dtype_name])
            layers.append(dict(workload=workload.id, dtype=dtype_name, custom_ops=custom,
                               copies=[dict(op=op, bytes=b) for op, b in copies],
                               copy_bytes=sum(b for _, b in copies)))
    return rows, layers


def op_floor(workload, dtype_name, gpu):
    """Floor of the whole op (forward, backward) whatever its kernels: forward reads q, k,
    v and writes o and the logsumexp; backward reads q, k, v, o, dO and the logsumexp and
    writes dq, dk, dv; FLOPs are the useful ones (backward 2.5x the forward)."""
    elem = DTYPES[dtype_name].itemsize
    seqs = sequences(workload)
    fwd = traffic("fwd", seqs, workload.heads, workload.head_dim, elem)
    bwd = traffic("bwd", seqs, workload.heads, workload.head_dim, elem)
    # The backward's own floor reads o once (for delta) but not delta itself.
    bwd_bytes = bwd.bytes + sum(s.seq_len * (workload.head_dim * elem - 4) for s in seqs) * workload.heads
    rate = gpu.mma_flops[dtype_name]
    return (max(fwd.flops / rate, fwd.bytes / gpu.dram_bytes_per_s) * 1e6,
            max(bwd.flops / rate, bwd_bytes / gpu.dram_bytes_per_s) * 1e6)


def summarize(rows, workloads):
    """Per (target, dtype, workload): forward and backward estimates against the floor."""
    ops = []
    by_id = {w.id: w for w in workloads}
    keys = sorted({(r["target"], r["dtype"], r["workload"]) for r in rows},
                  key=lambda k: (k[0], k[1], list(by_id).index(k[2])))
    for target, dtype_name, wid in keys:
        mine = [r for r in rows if (r["target"], r["dtype"], r["workload"]) == (target, dtype_name, wid)]
        gpu = next(g for g in GPUS.values() if f"sm_{g.capability}" == target)
        fwd_floor, bwd_floor = op_floor(by_id[wid], dtype_name, gpu)
        fwd = sum(r["estimate_us"] for r in mine if r["kind"] == "fwd")
        bwd = sum(r["estimate_us"] for r in mine if r["kind"] != "fwd")
        ops.append(dict(target=target, dtype=dtype_name, workload=wid,
                        forward_kernels=sum(r["kind"] == "fwd" for r in mine),
                        backward_kernels=sum(r["kind"] != "fwd" for r in mine),
                        forward_us=fwd, backward_us=bwd, forward_floor_us=fwd_floor,
                        backward_floor_us=bwd_floor,
                        vs_floor=(fwd + bwd) / (fwd_floor + bwd_floor)))
    return ops


def _loop_cell(row):
    hot = next((l for l in row["loops"] if l["name"] == row["hot_loop"]), None)
    if hot is None:
        return "-"
    return f"{hot['name']}: {hot['instrs']} ({hot['mma']}/{hot['mufu']}/{hot['select']}/{hot['compare']})"


def _spills(row):
    if not row["spill_bytes"]:
        return "0"
    cap = f", maxnreg {row['maxnreg']}" if row.get("maxnreg") else ""
    return f"{row['spill_bytes']} ({row['loop_spill_instrs']} in loops{cap})"


def markdown(rows, ops, layers, meta):
    lines = [f"# Static model of the attention kernels ({meta['when']})", "",
             f"`{meta['command']}`; Triton {meta['triton']}, torch {meta['torch']}. "
             "Estimates are from compiled code and the model in bench/static.py "
             "(assumptions in bench/NOTES.md), not measurements.", ""]
    for target in sorted({r["target"] for r in rows}, reverse=True):
        gpu = next(g for g in GPUS.values() if f"sm_{g.capability}" == target)
        lines += [f"## {target} ({gpu.name})", "",
                  "### The op per layer: estimate against the floor", "",
                  "| dtype | workload | fwd kernels | bwd kernels | fwd µs | fwd floor | bwd µs | bwd floor | total / floor |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for o in ops:
            if o["target"] == target:
                lines.append(f"| {o['dtype']} | {o['workload']} | {o['forward_kernels']} | "
                             f"{o['backward_kernels']} | {o['forward_us']:.1f} | {o['forward_floor_us']:.1f} | "
                             f"{o['backward_us']:.1f} | {o['backward_floor_us']:.1f} | {o['vs_floor']:.2f} |")
        lines += ["", "### Kernels", "",
                  "hot loop: SASS per iteration (tensor-core / MUFU / select / compare)", "",
                  "| dtype | workload | kernel | grid | empty | warps | regs | spill B | smem KB | per SM | hot loop | est µs | floor µs | bound | est / floor |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["target"] != target:
                continue
            ratio = f"{r['vs_floor']:.2f}" if r["vs_floor"] else "-"
            lines.append(
                f"| {r['dtype']} | {r['workload']} | {r['kernel'].strip('_')} | {r['grid']} | "
                f"{r['empty_programs']} | {r['num_warps']} | {r['registers']} | {_spills(r)} | "
                f"{r['shared_bytes'] / 1024:.1f} | {r['programs_per_sm']} | {_loop_cell(r)} | "
                f"{r['estimate_us']:.1f} | {r['floor_us']:.1f} | {r['bound']} | {ratio} |")
        lines.append("")
    lines += ["## Around the kernels: one attention layer, forward and backward", "",
              "`adclr_kernels.nn.UnidirectionalAttention` (Triton backend), full size on meta "
              "tensors; copies are stack, cat, clone, copy_, contiguous, dtype casts and fills.", "",
              "| dtype | workload | custom ops | copies | copy MB |", "|---|---|---|---|---|"]
    for layer in layers:
        copies = ", ".join(f"{c['op']} {c['bytes'] / 1e6:.1f} MB" for c in layer["copies"]) or "none"
        lines.append(f"| {layer['dtype']} | {layer['workload']} | {', '.join(layer['custom_ops'])} | "
                     f"{copies} | {layer['copy_bytes'] / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    # The kernels must be real JITFunctions, not the interpreter's (set before adclr_kernels
    # is imported), and FP fusion is left as the GPU's Triton does it (set to silence
    # Triton 3.9's warning about its default).
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from bench.workloads import STATIC_WORKLOADS

    parser = argparse.ArgumentParser(prog="python -m bench.static", description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="all",
                        help="comma-separated workload names (default: all of bench.workloads.STATIC_WORKLOADS)")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--targets", default="sm90,sm80")
    parser.add_argument("--out", default=str(RESULTS), help="folder for static.json and static.md")
    args = parser.parse_args(argv)
    names = args.workloads.split(",")
    workloads = [w for w in STATIC_WORKLOADS if args.workloads == "all" or w.name in names]
    if not workloads:
        parser.error(f"no workload named {args.workloads}; "
                     f"choose from {', '.join(w.name for w in STATIC_WORKLOADS)}")
    dtypes, targets = args.dtypes.split(","), args.targets.split(",")
    for value, known, flag in ((dtypes, DTYPES, "--dtypes"), (targets, GPUS, "--targets")):
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    started = time.time()
    print(f"compiling {len(workloads)} workloads x {dtypes} for {targets} ...", file=sys.stderr)
    rows, layers = run(workloads, dtypes, targets, log=lambda m: print(m, file=sys.stderr))
    ops = summarize(rows, workloads)
    meta = dict(when=time.strftime("%Y-%m-%d"), command="python -m bench.static " + " ".join(argv or sys.argv[1:]),
                triton=triton.__version__, torch=torch.__version__,
                gpus={k: dataclasses.asdict(g) for k, g in GPUS.items() if k in targets})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "static.json").write_text(json.dumps(dict(meta=meta, ops=ops, kernels=rows, layers=layers),
                                                indent=1, default=str))
    (out / "static.md").write_text(markdown(rows, ops, layers, meta))
    print(f"wrote {out / 'static.md'} and static.json in {time.time() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
