"""ADCLR pretraining: build the models, one training step, and the training loop.

For benchmarks and custom loops the two pieces are usable on their own:

    trainer = build(cfg, device)                 # models, optimizer, loss, schedules
    batch = adclr.data.synthetic_batch(cfg, cfg.batch_size, device)
    metrics = train_step(trainer, batch, step)   # one full step, no host sync inside

`train(cfg)` is the whole run behind `adclr train`: data, logging, checkpoints and
resume, DistributedDataParallel under torchrun. The settings are adclr.config's Config;
checkpoint files are adclr.checkpoint's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

from adclr_kernels.backends import TRITON_AVAILABLE

from .checkpoint import (LOCK, CheckpointError, FolderInUse, WriteError, all_rng_states, check_resumable, copy_atomically,
                         folder_lock, load_checkpoint, make_folder, not_a_file, restore, save_checkpoint,
                         set_rng_states, why_not_written, write_atomically, write_json_atomically)
from .config import ALLOWED, WHOLE_STEP_FP16, config_errors, value_error
from .data import (Augment, DeviceCrops, ImageFolder, decode_mode, open_dataset, replacement, train_loader,
                   warn_unreadable)
from .flops import peak_tflops, step_flops
from .loss import ADCLRLoss
from .methods import ccmim_losses, densecl_losses
from .model import ADCLRModel, DINOHead, MaskedDecoder, build_backbone


def cosine(step, total, start, end, warmup=0, warmup_start=0.0):
    """Linear warm-up from warmup_start to start over `warmup` steps, then cosine to end."""
    if step < warmup:
        return warmup_start + (start - warmup_start) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(1.0, progress)))


def epochs_to_steps(epochs, steps_per_epoch):
    """round(epochs * steps_per_epoch); a product beyond float range (--warmup-epochs 1e308) is
    as good as endless, not an OverflowError."""
    steps = epochs * steps_per_epoch
    return round(steps) if math.isfinite(steps) else sys.maxsize


def run_length(cfg, steps_per_epoch):
    """The run's steps: --epochs, or --max-steps where that is fewer (the schedules span it)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps) if cfg.epochs else cfg.max_steps
    return total


class Trainer:
    """Everything one training step needs; made by `build`.

    compile: what --compile resolved to ("off", "on", "step" or "graph"); for "step" and
    "graph" `whole_step` runs every step (see WholeStep), else `train_step`'s eager code.
    """

    def __init__(self, cfg, device, student, teacher, loss, optimizer, steps_per_epoch, compile="off"):
        self.cfg, self.device, self.compile = cfg, device, compile
        self.compiled = compile != "off"
        self.whole_step = None
        self.student = student  # DistributedDataParallel-wrapped when distributed
        self.student_module = student.module if isinstance(student, DistributedDataParallel) else student
        self.teacher, self.loss, self.optimizer = teacher, loss, optimizer
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = run_length(cfg, steps_per_epoch)
        self.student_params = [p for p in self.student_module.parameters()]
        self.teacher_params = [p for p in teacher.parameters()]
        precision = cfg.precision if cfg.precision != "auto" else "bf16" if device.type == "cuda" else "fp32"
        self.precision = precision
        self.autocast = (contextlib.nullcontext() if precision == "fp32" else
                         torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16))
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range.
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.fused_head_loss = cfg.fused_head_loss == "on" or (cfg.fused_head_loss == "auto"
                                                                and device.type == "cuda")

    def frozen(self, step):
        """Whether `step` is in the last-layer freeze (DINO's first epoch)."""
        return step < self.cfg.freeze_last_layer_epochs * self.steps_per_epoch

    def schedule(self, step, total=None):
        """lr, weight decay, teacher momentum and teacher temperature at `step` (Python floats),
        for a run of `total` steps (default: this one's)."""
        cfg, spe = self.cfg, self.steps_per_epoch
        total = self.total_steps if total is None else total
        lr = cosine(step, total, cfg.base_lr * cfg.batch_size / 256, cfg.min_lr,
                    warmup=min(total, epochs_to_steps(cfg.warmup_epochs, spe)))
        temp_warmup = epochs_to_steps(cfg.warmup_teacher_temp_epochs, spe)
        temp = (cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * step / temp_warmup
                if step < temp_warmup else cfg.teacher_temp)
        return {"lr": lr,
                "weight_decay": cosine(step, total, cfg.weight_decay, cfg.weight_decay_end),
                "momentum": cosine(step, total, cfg.momentum_teacher, 1.0),
                "teacher_temp": temp}


COMPILE_BACKEND = "inductor"  # torch.compile's default; the CPU tests use "aot_eager" (no C++ build)


def compile_mode(cfg, device):
    """--compile resolved: auto is "on" on CUDA, "off" elsewhere."""
    return cfg.compile if cfg.compile != "auto" else "on" if device.type == "cuda" else "off"


def whole_step_error(cfg, device, distributed):
    """Why --compile step or graph cannot run here (a message to follow "error: "), or None."""
    mode = compile_mode(cfg, device)
    if mode not in ("step", "graph"):
        return None
    if cfg.precision == "fp16":
        return WHOLE_STEP_FP16.format(mode=mode)
    if cfg.method != "adclr":
        return f"--compile {mode} compiles ADCLR's step; --method {cfg.method} runs with --compile on or off"
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        return f"--compile {mode} needs torch >= 2.11 (Dynamo tracing the backward); this is {torch.__version__}"
    if distributed:
        return (f"--compile {mode} runs a single process (its graph holds no gradient all-reduce); "
                "under torchrun use --compile on")
    if mode == "graph" and device.type != "cuda":
        return f"--compile graph replays a CUDA graph; the device is {device}: use --compile step"
    return None


def build(cfg, device, steps_per_epoch=1000):
    """Student, EMA teacher, loss, AdamW and schedules for `cfg` on `device`.

    Wraps the student in DistributedDataParallel when torch.distributed is initialised.
    `steps_per_epoch` sets the epoch-based schedules (warm-ups, last-layer freeze).
    """
    device = torch.device(device)
    torch.manual_seed(cfg.seed)  # identical initial weights on every process
    if cfg.pack_crops not in ("auto", "on", "off"):
        raise ValueError(f"pack_crops must be auto, on or off, got {cfg.pack_crops!r}")
    for name in ("precision", "compile"):  # else an unknown value would mean fp16, or no compile
        problem = value_error(getattr(cfg, name), ALLOWED[name])
        if problem:
            raise ValueError(f"--{name}: {problem}")
    distributed = dist.is_available() and dist.is_initialized()
    problem = whole_step_error(cfg, device, distributed)
    if problem:
        raise ValueError(problem)
    # Packing pays where the backend has a real varlen kernel; the PyTorch backends would
    # loop over sequences, so "auto" packs only for Triton on CUDA.
    pack = cfg.pack_crops == "on" or (cfg.pack_crops == "auto" and device.type == "cuda" and TRITON_AVAILABLE
                                      and cfg.attention in ("auto", "triton"))
    student = _model(cfg, device, cfg.drop_path, pack)
    teacher = _model(cfg, device, 0.0, pack)  # DINO's teacher has no stochastic depth
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    mode = compile_mode(cfg, device)
    if mode == "on":
        # In place (the state dict keeps its names). fullgraph: the op is a torch.library
        # custom op, so nothing in a step breaks the graph; a break would be an error here.
        student.compile(fullgraph=True, backend=COMPILE_BACKEND)
        teacher.compile(fullgraph=True, backend=COMPILE_BACKEND)
    optimizer = _adamw(student, device)
    if distributed:
        student = DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    loss = ADCLRLoss(cfg.out_dim, cfg.lambda_query, cfg.student_temp, cfg.center_momentum,
                     dense=cfg.method == "densecl").to(device)
    trainer = Trainer(cfg, device, student, teacher, loss, optimizer, steps_per_epoch, mode)
    if mode in ("step", "graph"):
        trainer.whole_step = WholeStep(trainer, graph=mode == "graph")
    return trainer


def _model(cfg, device, drop_path, pack):
    backbone = build_backbone(cfg.arch, cfg.image_size, cfg.patch_size, drop_path, cfg.attention,
                              query_sees_prefix=cfg.query_sees_prefix,
                              query_sees_self=cfg.query_sees_self,
                              query_sees_queries=cfg.query_sees_queries)
    def head():
        return DINOHead(backbone.embed_dim, cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim,
                        cfg.norm_last_layer)

    dense_head = head() if cfg.method == "densecl" else None
    decoder = (MaskedDecoder(backbone.embed_dim, (cfg.image_size // cfg.patch_size) ** 2, cfg.patch_size)
               if cfg.method == "ccmim" else None)
    return ADCLRModel(backbone, head(), pack, dense_head, decoder).to(device)


def _adamw(model, device):
    """AdamW with DINO's rule: no weight decay on biases and norm parameters (1-D); the
    head's last-layer gain is (out_dim, 1), so it is decayed, as DINO's weight_g is.

    Fused on CPU too: the default there updates one parameter at a time, ~15 operators
    each; the fused kernel does a whole group in one."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith(".bias") or p.dim() == 1 else decay).append(p)
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=0.0, fused=True)


def clip_grad_per_parameter_(params, max_norm):
    """DINO's clipping: scale each parameter's gradient to norm <= max_norm on its own.

    Unlike a global-norm clip, a large gradient in one parameter does not shrink the
    others. Parameters without a gradient are skipped. Returns the global norm of the
    gradients before clipping (for logging). No host synchronisation.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else None)
    return clip_per_tensor_(grads, max_norm)


def clip_per_tensor_(grads, max_norm):
    """`clip_grad_per_parameter_` on a list of gradients, in place; their norm before."""
    norms = torch.stack(torch._foreach_norm(grads))
    total = torch.linalg.vector_norm(norms)
    if max_norm:
        # DINO's factor, max_norm / (norm + 1e-6) (a zero gradient stays zero), on one
        # tensor of norms rather than one per parameter.
        scales = (max_norm / (norms + 1e-6)).clamp_(max=1.0)
        torch._foreach_mul_(grads, list(scales.unbind()))
    return total



def _range(name):
    """A profiler range around a phase of the step, named as bench.profile reads it. Only
    while a profiler runs (a range costs ~30 us of host time even when nothing records
    it, the check ~1 us), and never inside a compiled graph (Dynamo drops ranges there)."""
    if torch.compiler.is_compiling() or not torch.autograd._profiler_enabled():
        return contextlib.nullcontext()
    return record_function(name)


def train_step(trainer, batch, step):
    """One full ADCLR step on a ready batch (see adclr.data) already on the device.

    Student and teacher forward, loss, backward, last-layer freeze, per-parameter grad
    clipping, AdamW step with the scheduled lr / weight decay, EMA update of the
    teacher and of the centres. No host synchronisation (AdamW is fused, so the fp16
    gradient scaler hands it its inf check on the device): returns detached 0-dim
    tensors: loss, the method's terms (ADCLR: loss_global, loss_query; densecl:
    loss_global, loss_dense; ccmim: loss_reconstruction, loss_align) and grad_norm, the
    global norm of the gradients the optimizer gets, before clipping. With --compile step
    or graph the same ADCLR step runs as one compiled graph (WholeStep).
    """
    t, cfg = trainer, trainer.cfg
    if t.whole_step is not None:
        return t.whole_step(batch, step)
    sched = t.schedule(step)
    decay_group, no_decay_group = t.optimizer.param_groups
    decay_group["lr"] = no_decay_group["lr"] = sched["lr"]
    decay_group["weight_decay"] = sched["weight_decay"]
    if cfg.method == "adclr":
        loss, loss_global, loss_query = _losses(t, batch, sched["teacher_temp"])
        terms = {"loss_global": loss_global, "loss_query": loss_query}
    else:
        losses = {"densecl": densecl_losses, "ccmim": ccmim_losses}[cfg.method]
        loss, terms = losses(t, batch, sched["teacher_temp"])

    with _range("adclr/backward"):
        t.optimizer.zero_grad(set_to_none=True)
        (t.scaler.scale(loss) if t.scaler else loss).backward()
    if t.frozen(step):
        # DINO: keeping the prototypes (weight and gain) fixed at first stabilises the
        # start of training. No gradient: AdamW neither moves nor decays them.
        heads = [t.student_module.head, t.student_module.dense_head]
        for p in (p for head in heads if head is not None for p in head.last_layer.parameters()):
            p.grad = None
    with _range("adclr/clip"):
        if t.scaler:
            t.scaler.unscale_(t.optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = clip_grad_per_parameter_(t.student_params, cfg.clip_grad)
    with _range("adclr/optimizer"):
        if t.scaler:
            t.scaler.step(t.optimizer)  # skipped when a gradient is inf/nan; the scale then drops
            t.scaler.update()
        else:
            t.optimizer.step()
    with _range("adclr/ema"), torch.no_grad():
        torch._foreach_lerp_(t.teacher_params, t.student_params, 1.0 - sched["momentum"])
    return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}, "grad_norm": grad_norm.detach()}


def _inputs(trainer, batch):
    """(global views, query crops or None, local crops) of a batch, as the models take them."""
    queries = batch["queries"] if trainer.cfg.lambda_query and trainer.cfg.num_queries else None  # lambda 0: plain DINO
    if queries is not None:
        queries = queries.repeat(2, 1, 1, 1, 1)  # the same query crops for both global views
    return batch["globals"], queries, batch["locals"]


def _losses(trainer, batch, teacher_temp):
    """(loss, loss_global, loss_query) of the student against the teacher on `batch`."""
    t = trainer
    globals_, queries, local = _inputs(t, batch)
    fused = t.fused_head_loss  # the heads stop at the bottleneck; the loss runs their last layer
    with t.autocast:
        with _range("adclr/teacher"), torch.no_grad():
            teacher_cls, teacher_query = t.teacher(globals_, queries, project=not fused)
        with _range("adclr/student"):
            student_cls, student_query = t.student(globals_, queries, local, project=not fused)
        with _range("adclr/loss"):
            if fused:
                last, teacher_last = t.student_module.head.last_layer, t.teacher.head.last_layer
                return t.loss.fused(student_cls, teacher_cls, teacher_temp, last.weight, teacher_last.weight,
                                    student_query, teacher_query, gain=last.gain,
                                    teacher_gain=teacher_last.gain)
            return t.loss(student_cls, teacher_cls, teacher_temp, student_query, teacher_query)


SCHEDULES = ("lr", "weight_decay", "momentum", "teacher_temp")


class WholeStep:
    """`train_step` as one compiled graph (--compile step), optionally replayed as a CUDA
    graph (--compile graph): forward, loss, backward, clipping, AdamW and the teacher's EMA.

    What makes one graph of it, the same graph every step:
    - the backward is `torch.autograd.grad` traced into the graph (Dynamo's
      trace_autograd_ops); the gradients are values of the graph, never `.grad`;
    - the four schedules are a float64 tensor on the device, written before each step
      (from pinned memory on CUDA: no synchronisation), so they are inputs of the
      graph, not constants in it;
    - AdamW is written here in foreach ops with a tensor lr (torch.optim's capturable
      formulation; its own step() breaks the graph), its decay as a foreach multiply
      (AdamW's decoupled decay, the same arithmetic); the state stays the optimizer's,
      so checkpoints are those of the eager step;
    - the last-layer freeze is a host switch between two graphs (with and without the
      last layer among the updated parameters), each compiled once;
    - the packed layout's host tables are built by one eval-mode forward (no RNG drawn)
      before the first trace, so the first trace does not build them and the second
      recompile.
    The step reads no value on the host and its shapes are the run's, so nothing
    recompiles from one step to the next.
    """

    def __init__(self, trainer, graph=False):
        t = self.trainer = trainer
        self.graph = graph
        last = {id(p) for p in t.student_module.head.last_layer.parameters()}
        decayed = {id(p) for p in t.optimizer.param_groups[0]["params"]}
        self.params = {frozen: [p for p in t.student_params if not (frozen and id(p) in last)]
                       for frozen in (False, True)}
        self.decayed = {frozen: [p for p in params if id(p) in decayed] for frozen, params in self.params.items()}
        self.beta1, self.beta2 = t.optimizer.defaults["betas"]
        self.eps = t.optimizer.defaults["eps"]
        self.schedule_values = torch.zeros(len(SCHEDULES), dtype=torch.float64, device=t.device)
        self.states = None  # AdamW's state tensors, read at the first step (after a resume)
        options = dict(mode="reduce-overhead") if graph else {}
        self.compiled = torch.compile(self.step, fullgraph=True, backend=COMPILE_BACKEND, **options)

    def __call__(self, batch, step):
        t = self.trainer
        if self.states is None:
            self.prepare(batch)
        sched = t.schedule(step)
        for group in t.optimizer.param_groups:  # what the checkpoint records, as the eager step's
            group["lr"] = sched["lr"]
        t.optimizer.param_groups[0]["weight_decay"] = sched["weight_decay"]
        values = torch.tensor([sched[k] for k in SCHEDULES], dtype=torch.float64)
        on_cuda = t.device.type == "cuda"
        self.schedule_values.copy_(values.pin_memory() if on_cuda else values, non_blocking=on_cuda)
        if self.graph:
            torch.compiler.cudagraph_mark_step_begin()
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            out = self.compiled(batch, t.frozen(step))
        if self.graph:
            out = out.clone()  # the graph's output memory is rewritten by the next replay
        return dict(zip(("loss", "loss_global", "loss_query", "grad_norm"), out.unbind()))

    def prepare(self, batch):
        """AdamW's state for every parameter, and the host tables of the batch's layout."""
        t = self.trainer
        for p in t.student_params:
            state = t.optimizer.state[p]
            if not state:  # made at its first update in the eager step
                state.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p),
                             exp_avg_sq=torch.zeros_like(p))
            state["step"] = state["step"].to(p.device, torch.float32)  # an input on the device, like the rest
        self.states = {frozen: [[t.optimizer.state[p][key] for p in params]
                                for key in ("exp_avg", "exp_avg_sq", "step")]
                       for frozen, params in self.params.items()}
        for tensor in [self.schedule_values] + [x for lists in self.states[False] for x in lists]:
            torch._dynamo.mark_static_address(tensor)  # a CUDA graph reads them in place
        modes = [(m, m.training) for m in (t.student_module, t.teacher)]
        globals_, queries, local = _inputs(t, batch)
        with torch.no_grad(), t.autocast:
            for model, _ in modes:
                model.eval()  # no stochastic depth: the RNG is left as it was
            t.teacher(globals_, queries, project=not t.fused_head_loss)
            t.student(globals_, queries, local, project=not t.fused_head_loss)
        for model, training in modes:
            model.train(training)

    def step(self, batch, frozen):
        """The compiled step; returns (loss, loss_global, loss_query, grad_norm) stacked."""
        t = self.trainer
        lr, weight_decay, momentum, teacher_temp = self.schedule_values.unbind()
        loss, loss_global, loss_query = _losses(t, batch, teacher_temp)
        grads = list(torch.autograd.grad(loss, self.params[frozen]))
        with torch.no_grad():
            grad_norm = self.update(grads, frozen, lr, weight_decay, momentum)
        return torch.stack([loss.detach(), loss_global.detach(), loss_query.detach(), grad_norm])

    def update(self, grads, frozen, lr, weight_decay, momentum):
        """Clip, AdamW, the teacher's EMA: foreach ops that compile into a few fused
        kernels (no per-parameter fallback). Returns the gradients' norm before clipping."""
        t, params = self.trainer, self.params[frozen]
        grad_norm = clip_per_tensor_(grads, t.cfg.clip_grad)
        torch._foreach_mul_(self.decayed[frozen], 1 - lr * weight_decay)
        adamw_(params, grads, *self.states[frozen], lr, self.beta1, self.beta2, self.eps)
        # The teacher's EMA as lerp computes it for a weight below 1/2, teacher +
        # w (student - teacher), in three foreach ops: _foreach_lerp_ takes a tensor
        # weight only as a list, which compiles to a fallback, one kernel per parameter.
        delta = torch._foreach_sub(t.student_params, t.teacher_params)
        torch._foreach_mul_(delta, (1 - momentum).float())
        torch._foreach_add_(t.teacher_params, delta)
        return grad_norm


def adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps):
    """Adam's update (weight decay is the caller's) with lr a tensor on the device, in
    foreach ops that a compiler fuses: torch.optim's capturable formulation, each
    parameter with its own step count."""
    torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step_size = torch._foreach_pow(beta1, steps)
    torch._foreach_sub_(step_size, 1)
    torch._foreach_div_(step_size, lr)
    torch._foreach_reciprocal_(step_size)  # lr / (beta1^t - 1): minus the step size
    bias_correction2 = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(bias_correction2)
    torch._foreach_add_(bias_correction2, 1)
    torch._foreach_sqrt_(bias_correction2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2)
    torch._foreach_add_(denom, eps)
    torch._foreach_div_(denom, step_size)
    torch._foreach_addcdiv_(params, exp_avgs, denom)


# --------------------------------------------------------------------------- the run

def setup_distributed(cfg):
    """(rank, world_size, device); initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device {cfg.device} but CUDA is not available")
        if device.index >= torch.cuda.device_count():
            raise SystemExit(f"error: --device {cfg.device} but there are {torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


class Logger:
    """Progress line on stderr, JSON lines in OUT/metrics.jsonl, TensorBoard when installed."""

    def __init__(self, out, enabled, start=0):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.path = os.path.join(out, "metrics.jsonl")
        try:
            self.file = open(self.path, "a") if enabled else None
        except OSError as error:
            raise WriteError(why_not_written(self.path, error)) from None
        self.tb, self.failed = None, False
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # purge_step: a resumed run drops the events logged after its checkpoint, a
                # new one (start 0) an earlier run's in the same folder.
                self.tb = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=start + 1)
            except Exception:  # tensorboard not installed: JSON lines are enough
                pass

    def log(self, record, total_steps):
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as error:  # a full disk
            self.failed = True
            raise WriteError(why_not_written(self.path, error)) from None
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k.replace("/", "_per_"), v, record["step"])
        terms = ", ".join(f"{k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("loss_") and k != "loss_scale")
        line = (f"step {record['step']}/{total_steps} | loss {record['loss']:.4f} ({terms}) | "
                f"lr {record['lr']:.2e} | {record['images/s']:.1f} img/s | {record['tflops']:.3g} TFLOP/s")
        if "mfu" in record:
            line += f", MFU {100 * record['mfu']:.1f}%"
        line += f" | eta {_duration(record['eta_s'])} | data {record['data_wait']:.0%}"
        if record["skipped_images"]:
            n = record["skipped_images"]
            line += f" | {n} unreadable file{'s' * (n != 1)} passed over"
        print(("\r" + line + " " * 4) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def warn(self, text):
        """A warning line between the progress lines (on a terminal, below the current one)."""
        if self.enabled:
            print(("\n" if self.tty else "") + "warning: " + text, file=sys.stderr, flush=True)

    def close(self):
        if self.enabled:
            if self.tty:
                print(file=sys.stderr)
            try:
                self.file.close()  # flushes what a failed write left in its buffer: fails again
            except OSError as error:
                if not self.failed:  # else the failed write's WriteError says it, not this
                    raise WriteError(why_not_written(self.path, error)) from None
            if self.tb:
                self.tb.close()


def _duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@contextlib.contextmanager
def claim_out(out, rank, world):
    """Make the run folder and hold its lock for the block: the run's files are this run's.

    Rank 0 takes the lock (the processes of one run share the folder) and checks that what
    the run writes can be files, then tells the others, so that a refused run ends on every
    process with the same one line. Then it drops a checkpoint a killed run was writing.
    """
    created = not os.path.exists(out)
    make_folder(out)
    try:
        with _claimed(out, rank, world):
            yield
    except BaseException:
        if created and rank == 0:
            _remove_if_unused(out)
        raise


def _remove_if_unused(out):
    """Remove the run folder this run made, when the run stopped before writing into it."""
    try:
        if set(os.listdir(out)) <= {LOCK}:
            if os.path.exists(os.path.join(out, LOCK)):
                os.remove(os.path.join(out, LOCK))
            os.rmdir(out)
    except OSError:  # another run made something there meanwhile: it stays
        pass


@contextlib.contextmanager
def _claimed(out, rank, world):
    """claim_out's lock and checks, in a folder that exists."""
    with contextlib.ExitStack() as held:
        problem = None
        if rank == 0:
            try:
                held.enter_context(folder_lock(out))
                problem = _not_files(out)
            except FolderInUse as error:
                problem = f"--out {error}; wait for it to end, or choose another --out"
            except WriteError as error:
                problem = str(error)
        if world > 1:
            shared = [problem]
            dist.broadcast_object_list(shared, src=0)
            problem = shared[0]
        if problem:
            raise SystemExit(f"error: {problem}")
        if rank == 0:
            _drop_partial_checkpoints(out)
        yield


def _not_files(out):
    """What is wrong when a file the run writes is a folder (or a device) in `out`, or None."""
    for name in ("checkpoint.pt", "metrics.jsonl", "config.json"):
        kind = not_a_file(os.path.join(out, name))
        if kind:
            return f"{os.path.join(out, name)} is {kind}, not a file; move it away, or choose another --out"
    return None


def _drop_partial_checkpoints(out):
    """Remove what a run killed while writing checkpoint.pt or a numbered snapshot left; the
    file it was to replace is intact."""
    for name in sorted(os.listdir(out)):
        if re.fullmatch(r"checkpoint(\d+)?\.pt(\.\d+)?\.tmp", name):
            stale = os.path.join(out, name)
            os.remove(stale)
            print(f"removed {stale}, left by a run stopped while writing a checkpoint", file=sys.stderr)


def drop_records_after(metrics, step):
    """Keep the metrics.jsonl records up to `step`: the resumed run logs the later ones again."""
    if not os.path.exists(metrics):
        return
    with open(metrics) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            pass
    if len(kept) < len(lines):
        write_atomically(metrics, lambda f: f.write("".join(kept).encode()))


def check_backend(cfg, device):
    """--attention must run on `device` with gradients; one tiny call lets the op say why not."""
    if cfg.attention in ("auto", "sdpa", "reference"):  # run everywhere
        return
    from adclr_kernels import unidirectional_attention

    q = torch.zeros(1, 1, 2, 64, device=device, requires_grad=True)
    try:
        unidirectional_attention(q, q, q, num_queries=0, backend=cfg.attention)
    except (RuntimeError, TypeError) as error:
        raise SystemExit(f"error: --attention {cfg.attention}: {error}") from None


# What a user who meets a bad OUT/checkpoint.pt can do about it.
START_OVER = "remove it to start over, or choose another --out"


def train(cfg):
    """The full run; resumes from OUT/checkpoint.pt when it exists. Returns the final step.

    The run holds a lock on --out from start to end: a second run there is refused. A bad
    config raises ValueError; what a user must fix (the data, --out, a corrupt checkpoint,
    a run with other settings in --out, another run in it) raises SystemExit with one line;
    a file the system will not let it write (a full disk), WriteError naming the file.
    """
    errors = config_errors(cfg)
    if errors:
        raise ValueError("invalid config: " + "; ".join(errors))
    if cfg.data and not cfg.data.startswith("builtin"):
        # Kept in config.json and the checkpoint, where eval and show read it from any
        # directory: a path relative to where train ran would not be found there.
        cfg = dataclasses.replace(cfg, data=os.path.abspath(cfg.data))
    joined = dist.is_available() and dist.is_initialized()  # a caller's group stays theirs
    rank, world, device = setup_distributed(cfg)
    problem = whole_step_error(cfg, device, world > 1)
    if problem:
        raise SystemExit(f"error: {problem}")
    check_backend(cfg, device)
    with claim_out(cfg.out, rank, world):
        step = _train(cfg, rank, world, device)
    # The group this run made ends with it: what the process does next (the demo's k-NN
    # check, on rank 0 alone) builds models without DistributedDataParallel. Not on an
    # error: a rank that fails alone leaves its group as it is, since destroying an NCCL
    # group while other ranks wait in a collective can block, and the failure would not
    # reach the launcher.
    if not joined and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return step


def _train(cfg, rank, world, device):
    """`train` in its claimed run folder."""
    main = rank == 0
    path = os.path.join(cfg.out, "checkpoint.pt")
    if world == 1:
        checkpoint = _open_checkpoint(cfg, path)
    else:
        checkpoint = _agree_on_the_checkpoint(cfg, path, rank, world)
    start = 0 if checkpoint is None else checkpoint["step"]
    images = _open_images(cfg, world)
    loader, steps_per_epoch = train_loader(cfg, rank, world, start, images, _decode_mode(cfg, device))
    data = iter(loader)  # draws from the global RNG: before seeding, so that a resume replays exactly
    trainer = build(cfg, device, steps_per_epoch)
    torch.manual_seed(cfg.seed + 1000 * (rank + 1))  # augmentations differ between processes
    skipped = 0
    if checkpoint is not None:
        _resume(trainer, checkpoint, path, rank, world)
        skipped = checkpoint.get("skipped_images", 0)
        saved = checkpoint.get("images")
        if main and saved is not None and saved != len(images):
            print(f"warning: --data holds {len(images)} image files, {saved} when {path} was saved: from step "
                  f"{start} the images come in another order than in a run that had not stopped", file=sys.stderr)
        if main:
            _note_a_new_length(trainer, checkpoint, start)
        del checkpoint  # its tensors are copied into the trainer: free them before the loop
    if main and start:
        _write_a_missing_snapshot(cfg, path, start, steps_per_epoch)
    total = trainer.total_steps
    if start >= total:  # before config.json is written: it keeps describing the run as trained
        if main:
            where = "the end of this run" if start == total else "past the end of this run"
            print(f"nothing to do: {path} is at step {start}, {where} ({total} steps)", file=sys.stderr)
        return start
    if main:
        _announce(trainer, world, start, images)
    Run(trainer, path, rank, world, start, loader, skipped).steps(data)
    if main:
        print(f"done: {total} step{'' if total == 1 else 's'}, checkpoint {path}", file=sys.stderr)
    return total


def _handle_stops(on_stop):
    """Make `on_stop` the SIGINT and SIGTERM handler; returns {signal: the handler to put
    back}. SIGINT ignored (a background job of a shell without job control), a handler
    installed outside Python (None: it could not be put back), or a caller's own SIGTERM
    handler: left as they are."""
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is signal.SIG_IGN or handler is None or (
                signum == signal.SIGTERM and handler is not signal.SIG_DFL):
            continue
        previous[signum] = handler
        signal.signal(signum, on_stop)
    return previous


def _cpu_group():
    """A gloo group of every process, for flags the CPUs agree on without the GPUs (the
    default group where it is gloo already). Where gloo cannot connect (a host name that
    resolves to a loopback address: set GLOO_SOCKET_IFNAME), the default group, whose
    NCCL all-reduce then waits for the GPU once a step."""
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    try:
        return dist.new_group(backend="gloo")
    except Exception as error:  # noqa: BLE001: any failure to connect
        if dist.get_rank() == 0:
            print(f"warning: no gloo group ({error}); the stop flag goes through "
                  f"{dist.get_backend()} (set GLOO_SOCKET_IFNAME to the network interface)", file=sys.stderr)
        return dist.group.WORLD


def _snapshot_path(cfg, step, steps_per_epoch):
    """OUT/checkpointNNNN.pt when step `step` keeps a numbered snapshot, else None."""
    if cfg.saveckp_freq and step % (cfg.saveckp_freq * steps_per_epoch) == 0:
        return os.path.join(cfg.out, f"checkpoint{step // steps_per_epoch:04d}.pt")
    return None


def _write_a_missing_snapshot(cfg, path, start, steps_per_epoch):
    """The numbered snapshot of step `start`, when checkpoint.pt holds that step and the
    snapshot is not there: a run stopped (a kill, a full disk) between writing checkpoint.pt
    and copying it. The resumed run starts after that step, so it would never write it."""
    snapshot = _snapshot_path(cfg, start, steps_per_epoch)
    if snapshot and not os.path.lexists(snapshot):
        copy_atomically(path, snapshot)
        print(f"wrote {snapshot}, the snapshot of step {start} a stopped run left unwritten", file=sys.stderr)


def _latest_snapshot(out):
    """The numbered snapshot of `out` with the most epochs, or None."""
    try:
        names = [n for n in os.listdir(out) if re.fullmatch(r"checkpoint\d+\.pt", n)]
    except OSError:
        return None
    return os.path.join(out, max(names, key=lambda n: int(n[10:-3]))) if names else None


def _open_checkpoint(cfg, path):
    """The checked checkpoint of the run in --out, or None for a new run; SystemExit when it
    is unusable or was written with other settings."""
    if not os.path.exists(path):
        snapshot = _latest_snapshot(cfg.out)
        if snapshot:  # every snapshot is a copy of checkpoint.pt: these are an earlier run's
            raise SystemExit(f"error: {cfg.out} holds numbered snapshots of an earlier run but no checkpoint.pt; "
                             f"copy one over it to resume from there (cp {shlex.quote(snapshot)} {shlex.quote(path)}), "
                             f"or move them away to start over (a new run's snapshots would mix with them), "
                             f"or choose another --out")
        return None
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as error:
        snapshot = _latest_snapshot(cfg.out)
        advice = (f"copy the last numbered snapshot over it to resume from there "
                  f"(cp {shlex.quote(snapshot)} {shlex.quote(path)}), remove it and the snapshots to start over, "
                  f"or choose another --out" if snapshot else START_OVER)
        raise SystemExit(f"error: {error}; {advice}") from None
    check_resumable(cfg, checkpoint["config"])
    return checkpoint


def _agree_on_the_checkpoint(cfg, path, rank, world):
    """`_open_checkpoint` on every process, which must all read the same one. Each resumes
    from its own read of OUT/checkpoint.pt: where --out is not one folder they all see (a
    node's own disk, a stale network file system cache), they would train on from different
    steps or weights, which DDP's gradient averaging never notices. A process that cannot
    use its read stops every process (the others would wait in this collective)."""
    try:
        checkpoint, problem = _open_checkpoint(cfg, path), None
    except SystemExit as error:
        checkpoint, problem = None, str(error.code)
    mine = (problem, 0, "") if checkpoint is None else (None, checkpoint["step"], _weights_digest(checkpoint))
    read = [None] * world
    dist.all_gather_object(read, mine)
    failed = [(r, p) for r, (p, _, _) in enumerate(read) if p]
    if failed:
        raise SystemExit(problem or f"error: process {failed[0][0]} stopped: {failed[0][1].removeprefix('error: ')}")
    if len({(s, d) for _, s, d in read}) > 1:
        steps = ", ".join(f"rank {r}: {f'step {s}' if s else 'none'}" for r, (_, s, _) in enumerate(read))
        raise SystemExit(f"error: the processes read different checkpoints as {path} ({steps}"
                         f"{'; the same step with other weights' if len({s for _, s, _ in read}) == 1 else ''}); "
                         f"--out must be one folder that every process sees")
    return checkpoint


def _weights_digest(checkpoint):
    """A digest of the student's tensors' bytes (not a float sum, which could round apart
    on machines whose vector units differ)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in checkpoint["student"].items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _open_images(cfg, world):
    """The training images of --data, enough of them for one batch split over `world` processes."""
    try:
        images = open_dataset(cfg.data, "train")
    except OSError as error:  # ImageFolder: no such folder, no images in it, no permission
        raise SystemExit(f"error: --data: {error}") from None
    if len(images) < cfg.batch_size:
        # Files with an image's name: whether they can be read is known when they are.
        files = f"{len(images)} image file{'s' if len(images) != 1 else ''}"
        raise SystemExit(f"error: --batch-size {cfg.batch_size} is larger than the dataset "
                         f"({files} in {cfg.data})")
    if cfg.batch_size % world:
        raise SystemExit(f"error: --batch-size {cfg.batch_size} (the total over all processes) "
                         f"is not divisible by the {world} processes")
    return images


def _decode_mode(cfg, device):
    try:
        return decode_mode(cfg.decode, device)
    except ValueError as error:  # --decode gpu without a CUDA device or torchvision for it
        raise SystemExit(f"error: --decode {cfg.decode}: {error}") from None


def _resume(trainer, checkpoint, path, rank, world):
    try:
        restore(trainer, checkpoint, path)
    except CheckpointError as error:  # names or shapes not the config's model
        raise SystemExit(f"error: {error}; {START_OVER}") from None
    if len(checkpoint["rng"]) != world and rank == 0:
        saved = len(checkpoint["rng"])
        print(f"note: {path} was written by {saved} process{'es' * (saved != 1)}, resumed by {world}: "
              f"the step ({checkpoint['step']}), the data order and the schedules carry over (--batch-size is "
              "the total); the augmentations' random draws differ from a run that had not stopped",
              file=sys.stderr)
    if len(checkpoint["rng"]) != world:
        # Not the seed of step 0 again: the resumed steps would draw the augmentations and
        # drop paths the run began with.
        torch.manual_seed((trainer.cfg.seed * 1_000_003 + checkpoint["step"]) * 1009 + rank + 1)
    else:
        try:
            set_rng_states(checkpoint["rng"][rank])
        except (RuntimeError, TypeError) as error:  # a CUDA state this machine's generators do not take
            raise SystemExit(f"error: {path}: its RNG state does not fit this machine ({error}); "
                             f"{START_OVER}") from None


def _note_a_new_length(trainer, checkpoint, start):
    """Say so when a resume with another --epochs, --max-steps or --data size moves the
    schedules: they span the run's length, so a longer run's lr rises again where the saved
    one had decayed."""
    cfg, saved = trainer.cfg, checkpoint["config"]
    images = checkpoint.get("images")  # the dataset's size when saved (steps per epoch then)
    was = run_length(dataclasses.replace(cfg, epochs=saved.get("epochs", cfg.epochs),
                                         max_steps=saved.get("max_steps", cfg.max_steps)),
                     images // cfg.batch_size if images else trainer.steps_per_epoch)
    total = trainer.total_steps
    if was == total or start >= total:
        return
    before, after = trainer.schedule(start, was)["lr"], trainer.schedule(start)["lr"]
    print(f"note: the run is now {total} steps long, {was} when its checkpoint was saved: the lr, weight decay "
          f"and teacher momentum schedules span the new length, so at step {start} the lr goes from "
          f"{before:.3g} to {after:.3g}", file=sys.stderr)


COMPILED = {"off": "off", "on": "on (student and teacher)", "step": "step (the whole step, one graph)",
            "graph": "graph (the whole step, replayed as a CUDA graph)"}


def _announce(trainer, world, start, images):
    """The run's first lines on stderr, and OUT/config.json."""
    cfg, total, steps_per_epoch = trainer.cfg, trainer.total_steps, trainer.steps_per_epoch
    folders = len(getattr(images, "classes", []))  # a folder's class folders say how it was read
    found = f"{len(images)} images" if not isinstance(images, ImageFolder) else f"{len(images)} image files" + (
        f" in {folders} folder{'s' * (folders != 1)}" if folders else "")
    print(f"adclr train: {world} process(es) on {trainer.device}, {found}, {steps_per_epoch} steps/epoch, "
          f"{total} steps, torch.compile {COMPILED[trainer.compile]}"
          + (f", resuming at step {start}" if start else ""), file=sys.stderr)
    print("config: " + json.dumps(dataclasses.asdict(cfg)), file=sys.stderr)
    write_json_atomically(os.path.join(cfg.out, "config.json"), dataclasses.asdict(cfg))
    # Epoch-based warm-ups silently cover all of a run shortened by --max-steps: the
    # lr would never leave warm-up, or the last layer never unfreeze.
    for name in ("warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer_epochs"):
        if 0 < total <= getattr(cfg, name) * steps_per_epoch:
            print(f"warning: --{name.replace('_', '-')} {getattr(cfg, name)} "
                  f"({getattr(cfg, name) * steps_per_epoch:.0f} steps) covers the whole "
                  f"{total}-step run", file=sys.stderr)


def mfu_peak(trainer):
    """(the peak TFLOP/s that MFU is a fraction of, or None; a note to print once, or None).

    --peak-tflops when given; else on CUDA the dense bf16 peak of a known device
    (adclr.flops), which bf16 and fp16 steps run at. No MFU on CPU, for fp32 on CUDA
    (TF32 and FP32 peaks differ) or on a device missing from the table; the last two
    say so once.
    """
    if trainer.cfg.peak_tflops:
        return trainer.cfg.peak_tflops, None
    if trainer.device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(trainer.device)
    peak = peak_tflops(name) if trainer.precision != "fp32" else None
    if peak is None:
        why = "fp32 steps" if trainer.precision == "fp32" else name
        return None, f"note: no known peak for {why}: metrics.jsonl logs tflops, not mfu; pass --peak-tflops for MFU"
    return peak, None


DATA_ERROR = 3  # agree_on_a_stop's value for a process that could not get its batch


class Run:
    """The step loop and what it keeps between steps: the steps done, the last step whose
    loss was checked finite, the step of checkpoint.pt, and the throughput and the time
    spent waiting for data since the last log line. The logging, the checkpoints and the
    interrupt path read the same numbers.
    """

    def __init__(self, trainer, path, rank, world, start, loader, skipped=0):
        self.trainer, self.cfg, self.path = trainer, trainer.cfg, path
        self.world, self.main = world, rank == 0
        self.crops, self.workers = DeviceCrops(loader.dataset, trainer.device), loader.num_workers
        self.augment = Augment(plain_view_a=self.cfg.method == "ccmim").to(trainer.device)
        if self.main:
            drop_records_after(os.path.join(self.cfg.out, "metrics.jsonl"), start)
        self.logger = Logger(self.cfg.out, self.main, start)
        # warned: unreadable files already reported; skipped: counted since the run began
        self.images, self.warned, self.skipped = loader.dataset.base, set(), skipped
        self.skipped_here = 0  # under DDP: this process's since the count was last summed (sum_skipped)
        # On the device: any loss not finite, any gradient not finite (without the fp16
        # scaler, which skips such a step itself; clipping turns an inf gradient into NaN
        # weights, which the next checkpoint would save with a finite loss).
        self.bad = torch.zeros(2, dtype=torch.bool, device=trainer.device)
        self.completed = self.last_good = self.saved = start  # saved: the step of checkpoint.pt, 0 = none
        self.in_step = self.stop_asked = False  # stop_asked: Ctrl-C inside a step, which then ends it
        self.signalled = False  # under DDP: this process got a SIGTERM or SIGINT (stop_asked: all agreed)
        self.first_stop = 0.0  # time.monotonic() of the first signal
        self.stop_group = _cpu_group() if world > 1 else None  # agree_on_a_stop's
        self.stopping = False  # the run is stopping: what is left is its save and its exit
        self.stopped_by = "interrupted"  # or "terminated" (SIGTERM): the stop's message and exit code
        self.in_save = False  # writing a checkpoint: a Ctrl-C waits for the write
        self.fetching = False  # in the loader's next(): where a dead worker may raise
        self.t0, self.images_since = time.perf_counter(), 0
        self.data_wait, self.intervals, self.wait_warned = 0.0, 0, False  # data_wait: seconds in next(data)
        self.timed_seconds, self.timed_steps = 0.0, 0  # since the first log line, for the ETA
        self.flops = step_flops(self.cfg, self.cfg.batch_size // world)[0]  # one process's share
        self.peak, note = mfu_peak(trainer)
        if note and self.main:
            print(note, file=sys.stderr)

    def steps(self, data):
        """Run the remaining steps on the batches of `data`; on an interrupt, or data that
        fails between steps, keep what was done."""
        previous = self.finish_the_step_on_a_stop() | self.leave_a_dead_worker_to_the_loader()
        try:
            for step in range(self.completed, self.trainer.total_steps):
                self.step(*self.next_batch(data), step)
                if self.stop_asked:
                    self.stopping = True
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            try:
                self.save_interrupted()
            finally:
                if self.world > 1 and self.stopping:
                    # Together: a process that exits first makes torchrun end the others,
                    # rank 0 in the middle of its write.
                    dist.barrier(group=self.stop_group)
            if self.stopped_by == "terminated":
                raise SystemExit(128 + signal.SIGTERM) from None  # as the signal's default would
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.logger.close()
            if self.stop_group is not None and self.stop_group is not dist.group.WORLD:
                dist.destroy_process_group(self.stop_group)

    def finish_the_step_on_a_stop(self):
        """Let a first Ctrl-C (or SIGTERM: a scheduler's or container's stop) that lands inside
        a step (nearly all of them: the data wait is a few percent of a step) finish that step,
        then save and stop, instead of losing every step since the last checkpoint; a second
        one stops at once. Returns {signal: the handler to put back}: a single process's main
        thread only (under DDP the launcher owns the signals, and a save needs every process),
        and a SIGTERM nobody else handles."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        if self.world != 1:
            return self.mark_a_stop_under_ddp()

        def on_stop(signum, frame):
            if signum == signal.SIGTERM:
                self.stopped_by = "terminated"
            if self.stopping:
                # Raised between the stop and its save, it would skip the save and end the
                # run as a bare KeyboardInterrupt (exit 130, even for SIGTERM).
                return
            if self.in_save:
                # Raised inside torch.save, it would end as the zip writer's own error, with
                # the checkpoint unwritten (and the steps since the last one lost).
                if not self.stop_asked:
                    print(f"\n{self.stop_name(signum)}: writing the checkpoint of step {self.completed} first, "
                          "then stopping", file=sys.stderr, flush=True)
                self.stop_asked = True
                return
            if not self.in_step or (self.stop_asked and self.escalates(signum)):
                # Between steps at once; a first stop there may be swallowed (Python ignores
                # an exception raised in a __del__), so its time counts for escalates too.
                self.first_stop = self.first_stop or time.monotonic()
                self.stopping = self.stop_asked = True
                raise KeyboardInterrupt
            if self.stop_asked:  # a repeated SIGTERM, or a Ctrl-C that came with the first
                return
            self.stop_asked, self.first_stop = True, time.monotonic()
            print(f"\n{self.stop_name(signum)}: finishing step {self.completed + 1}, then saving it"
                  + ("; Ctrl-C again to stop at once" if signum == signal.SIGINT else ""),
                  file=sys.stderr, flush=True)

        return _handle_stops(on_stop)

    def leave_a_dead_worker_to_the_loader(self):
        """Let torch's SIGCHLD handler, which raises where it lands when a loader worker dies
        (the kernel's OOM killer), run only while the loader is asked for a batch: inside a
        step the state would be half-updated, inside a save the file unwritten, and nothing
        could be saved. Elsewhere the loader's next call finds the dead worker itself (its
        status check, within 5 s) and raises there, where `next_batch` saves the steps done.
        Returns {SIGCHLD: the handler to put back}, or {} where there is none (no workers)
        or this is not the main thread."""
        handler = signal.getsignal(signal.SIGCHLD)
        if not callable(handler) or threading.current_thread() is not threading.main_thread():
            return {}

        def on_child(signum, frame):
            if self.fetching:
                handler(signum, frame)

        signal.signal(signal.SIGCHLD, on_child)
        return {signal.SIGCHLD: handler}

    def escalates(self, signum):
        """Whether a repeated signal stops the run at once, without its save: a Ctrl-C a
        second or more after the first (a person's second press). Not a SIGTERM: SLURM
        sends one to every process and torchrun passes its own on, so a process gets two
        within milliseconds, and SIGKILL follows anyway; nor a Ctrl-C that torchrun
        passes on beside the terminal's."""
        return signum == signal.SIGINT and time.monotonic() - self.first_stop >= 1.0

    def mark_a_stop_under_ddp(self):
        """Under torchrun: SIGTERM (a scheduler's preemption, which torchrun passes on to every
        process, or one process's own) or SIGINT (torchrun's Ctrl-C) only marks the stop; after
        each batch is fetched the processes agree on it (`next_batch_or_stop`), then save
        together and stop. Raised where it lands, it would end one process mid-step and the
        rest with it, keeping only the last checkpoint. A Ctrl-C a second later stops the
        process at once (`escalates`). Returns {signal: the handler to put back}, as
        finish_the_step_on_a_stop."""
        def on_stop(signum, frame):
            if signum == signal.SIGTERM:
                self.stopped_by = "terminated"
            if self.signalled:
                if self.escalates(signum) and not self.stopping and not self.in_save:
                    raise KeyboardInterrupt  # at once (no save: the others are not here)
                return
            if self.main:
                print(f"\n{self.stop_name(signum)}: every process stops after this step, then saves it",
                      file=sys.stderr, flush=True)
            self.signalled, self.first_stop = True, time.monotonic()

        return _handle_stops(on_stop)

    def next_batch(self, data):
        """(The next batch's crops on the device, the unreadable files it skipped), or the
        run's stop before this step. A signal raises KeyboardInterrupt (under DDP any
        process's, once they agree; SLURM and torchrun end the loader's workers too, so a
        batch that then cannot come counts as that process's stop). A batch that cannot be
        had (the loader's error: a worker killed for memory, a bug in a dataset; no
        readable file for a sample) stops the run after saving the steps done, on every
        process: raised where it fails, it lost every step since the last checkpoint, and
        under DDP left the other processes waiting in the next all-reduce."""
        asked, error, batch = time.perf_counter(), None, None
        try:
            self.fetching = True
            raw = next(data)
        except Exception as failure:  # noqa: BLE001: whatever the loader raises
            error = failure
        finally:
            self.fetching = False
        self.data_wait += time.perf_counter() - asked
        if error is None and not self.signalled:
            try:
                batch = self.to_device(raw)
            except (Exception, SystemExit) as failure:  # noqa: BLE001: SystemExit is stop_unreadable's
                error = failure
        if self.world == 1:
            if error is not None:
                self.stop_on_a_data_error(error)
            return batch
        agreed = self.agree_on_a_stop(failed=error is not None and not self.signalled)
        if agreed == DATA_ERROR:
            self.stop_on_a_data_error(None if self.signalled else error)
        if agreed:
            raise KeyboardInterrupt
        return batch

    def agree_on_a_stop(self, failed=False):
        """Under DDP, before each step: whether any process was asked to stop, or failed to get
        its batch (then every process stops here, after the same step): 0 none, else the
        strongest reason (interrupt 1, SIGTERM 2, DATA_ERROR 3). The flag goes through a CPU
        (gloo) group: the GPUs' stream never waits for it."""
        asked = DATA_ERROR if failed else 0 if not self.signalled else 2 if self.stopped_by == "terminated" else 1
        on_cpu = dist.get_backend(self.stop_group) == "gloo"
        flag = torch.tensor([asked], dtype=torch.int32, device="cpu" if on_cpu else self.trainer.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.stop_group)
        agreed = int(flag[0])
        if agreed == 2:
            self.stopped_by = "terminated"
        self.stop_asked = self.stopping = agreed > 0
        return agreed

    def stop_on_a_data_error(self, error):
        """Save the steps done, then raise `error`, this process's data error; None: another
        process's, which that process raises (this one exits 1, rank 0 saying why)."""
        self.stop_asked = self.stopping = True
        self.stopped_by = "data error"
        try:
            self.save_interrupted()
        except Exception:
            if error is None:
                raise
            raise error  # the save's own error shown above it
        finally:
            if self.world > 1:
                dist.barrier(group=self.stop_group)  # as on a signal: rank 0 writes while the others wait
        if error is not None:
            raise error
        raise SystemExit("error: another process could not get its batch (its error is in its output); "
                         "the run stopped on every process" if self.main else 1)

    @staticmethod
    def stop_name(signum):
        return "interrupt" if signum == signal.SIGINT else "SIGTERM"

    def step(self, batch, skipped, step):
        """Step `step` on a batch of crops, then its log record and checkpoint when they are due."""
        cfg, total = self.cfg, self.trainer.total_steps
        self.in_step = True
        metrics = train_step(self.trainer, self.augment(batch), step)
        # The step counts as done before it stops being "in step": an interrupt between
        # the two would otherwise save its update as the step before it. Its skipped
        # files too: counted before it, a save on an interrupt would count them, and the
        # resume that redoes the step would count them again.
        loss = metrics["loss"]
        self.bad |= ~torch.isfinite(torch.stack(
            [loss, metrics["grad_norm"] if self.trainer.scaler is None else loss.new_zeros(())]))
        done = self.completed = step + 1
        if self.world == 1:
            self.skipped += skipped
        else:  # summed over the processes where every process logs or saves (sum_skipped)
            self.skipped_here += skipped
        self.in_step = False
        self.images_since += cfg.batch_size
        if done % cfg.log_every == 0 or done == total:
            self.log(done, metrics)
        snapshot = _snapshot_path(cfg, done, self.trainer.steps_per_epoch)
        if done % cfg.checkpoint_every == 0 or done == total or snapshot:
            self.checkpoint(done, snapshot)

    def to_device(self, raw):
        """(A loader batch's uint8 crops on the device, the files it skipped), once those
        are reported (after the crops: a file the GPU decode falls back on may add some)."""
        crops = self.crops(raw)
        first, skips, readable = raw["index"], raw["skipped"], raw["readable"]
        if not readable.all():
            self.stop_unreadable(int(first[~readable][0]), int(skips[~readable][0]))
        if skips.any():
            for i, n in zip(first[skips > 0].tolist(), skips[skips > 0].tolist()):
                warn_unreadable(self.images, [replacement(i, k, len(self.images)) for k in range(n)], self.warned)
        return crops, int(skips.sum())

    def stop_unreadable(self, first, count):
        """Stop with one line: `count` files of --data from index `first` on cannot be read."""
        images, first = self.images, first % len(self.images)
        path = images.samples[first][0]
        what = (f"none of its {count} images can be read, e.g." if count == len(images) else
                f"{count} images tried in turn for one sample cannot be read, the first")
        raise SystemExit(f"error: --data {self.cfg.data}: {what} {path} ({images.error(first)}); "
                         "is it a folder of images? (move what cannot be read out of it)")

    def sum_skipped(self):
        """Under DDP, add every process's unreadable files since the last sum to the run's count
        (a collective: log, checkpoint and the agreed stop call it on every process at the same
        step); the count logged and saved was rank 0's alone."""
        if self.world > 1:
            here = torch.tensor([self.skipped_here], dtype=torch.int64, device=self.trainer.device)
            dist.all_reduce(here)
            self.skipped += int(here.item())
            self.skipped_here = 0

    def log(self, done, metrics):
        """The record of the run after `done` steps: losses, schedules, throughput."""
        self.check_finite(done)
        self.sum_skipped()
        elapsed = time.perf_counter() - self.t0
        t, cfg = self.trainer, self.cfg
        sched = t.schedule(done - 1)  # the values the last step used
        steps = self.images_since / cfg.batch_size
        tflops = self.flops * steps / elapsed / 1e12  # per process, as the peak is per device
        record = {"step": done, "epoch": round(done / t.steps_per_epoch, 4),
                  **{k: v.item() for k, v in metrics.items()},
                  "lr": sched["lr"], "weight_decay": sched["weight_decay"],
                  "momentum": sched["momentum"], "teacher_temp": sched["teacher_temp"],
                  "images/s": self.images_since / elapsed, "tflops": tflops,
                  **({"mfu": tflops / self.peak} if self.peak else {}),
                  "skipped_images": self.skipped, "data_wait": self.data_wait / elapsed,
                  **({"loss_scale": t.scaler.get_scale()} if t.scaler else {}),
                  "eta_s": (t.total_steps - done) * self.seconds_per_step(elapsed, steps)}
        self.warn_data_wait(record["data_wait"], done)
        try:
            self.logger.log(record, t.total_steps)
        except WriteError as error:  # a full disk: say what the checkpoint still holds
            raise WriteError(f"{error}; {self.kept()}") from None
        self.t0, self.images_since, self.data_wait = time.perf_counter(), 0, 0.0

    def seconds_per_step(self, elapsed, steps):
        """For the ETA: the mean over the intervals since the first (which holds the workers'
        start and compilation), not the last interval alone, which a busy machine swings."""
        if self.intervals == 0:  # the first log line: all there is
            return elapsed / steps
        self.timed_seconds += elapsed
        self.timed_steps += steps
        return self.timed_seconds / self.timed_steps

    def warn_data_wait(self, share, done):
        """Say once when the step waited for data more than 10% of an interval. Not of the
        first: the workers' start and the first step's compilation fall in it."""
        self.intervals += 1
        if share <= 0.1 or self.intervals == 1 or self.wait_warned:
            return
        self.wait_warned = True
        hints = [f"more loader workers (--num-workers; {self.workers} now)"]
        if self.trainer.device.type == "cuda" and self.crops.mode != "gpu":
            hints.append("--decode " + ("cpu" if self.crops.mode == "pillow" else "gpu"))
        self.logger.warn(f"the steps up to {done} waited for data {share:.0%} of the time "
                         f"(--decode {self.crops.mode}); {' or '.join(hints)} would feed them faster")

    def checkpoint(self, done, snapshot):
        """Write checkpoint.pt at step `done` (every process's RNG state in it), and the
        numbered snapshot when one is due."""
        self.check_finite(done)
        self.sum_skipped()
        rng = all_rng_states(self.world)
        with self.saving():
            if self.main:
                try:
                    save_checkpoint(self.trainer, self.path, done, rng, self.skipped, len(self.images))
                except WriteError as error:  # a full disk: the previous checkpoint.pt is whole
                    raise WriteError(f"{error}; {self.kept()}") from None
            self.saved = done
            if snapshot and self.main:  # a numbered copy that later checkpoints do not replace
                copy_atomically(self.path, snapshot)

    def kept_message(self, resume=True):
        """What a rerun resumes from, after a stop that saved nothing."""
        if not self.saved:
            return "no checkpoint was written"
        return f"{self.path} holds step {self.saved}" + ("; rerun the same command to resume from it" if resume else "")

    def kept(self):
        """What a rerun resumes from, for the message of a write that failed."""
        if self.saved:
            return f"{self.path} still holds step {self.saved}; make room, then rerun the same command to resume from it"
        return "no checkpoint was written yet; make room, then rerun"

    @contextlib.contextmanager
    def saving(self):
        """A checkpoint write: a Ctrl-C inside it waits for it (see finish_the_step_on_a_stop)."""
        self.in_save = True
        try:
            yield
        finally:
            self.in_save = False

    def check_finite(self, step):
        """Stop, on every process together, when a loss or gradient since the last check was
        not finite."""
        flag = self.bad.clone()
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        loss_bad, grad_bad = flag.tolist()
        if loss_bad or grad_bad:
            what = "loss" if loss_bad else "gradient norm (the loss was finite)"
            raise FloatingPointError(
                f"{what} became non-finite between step {self.last_good} and step {step}; stopping. "
                + (f"The last good checkpoint (step {self.saved}) is kept in {self.path}. " if self.saved else
                   f"No checkpoint was written before (--checkpoint-every {self.cfg.checkpoint_every}). ")
                # The same command would replay the same steps into the same NaN, and these
                # flags are not among those a resume may change.
                + "Start a new run (another --out) with a lower --base-lr, a lower --clip-grad or a longer "
                  "--warmup-epochs.")
        self.last_good = step

    def save_interrupted(self):
        """Keep the steps done, unless the interrupt hit inside a step (half-updated state)
        or a loss went bad. Under DDP only a stop the processes agreed on (`agree_on_a_stop`),
        not a second signal on one of them: the checkpoint gathers every process's RNG state,
        a collective they must all join."""
        if self.in_step or (self.world > 1 and not self.stopping):
            if self.main:  # under DDP: a second signal on one process, wherever it landed
                where = f"inside step {self.completed + 1}" if self.in_step else f"after step {self.completed}"
                print(f"\n{self.stopped_by} {where}: stopped at once, nothing more saved; {self.kept_message()}",
                      file=sys.stderr)
            return
        if self.completed > self.saved:
            bad = self.bad.clone()
            if self.world > 1:
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.any().item():
                if self.main:
                    what = "loss" if bad[0] else "gradient norm"
                    print(f"\n{self.stopped_by}: a {what} after step {self.last_good} was not finite, so the "
                          f"steps since are not saved; {self.kept_message(resume=False)}", file=sys.stderr)
                return
            self.sum_skipped()
            rng = all_rng_states(self.world)
            with self.saving():
                if self.main:
                    try:
                        save_checkpoint(self.trainer, self.path, self.completed, rng, self.skipped,
                                        len(self.images))
                    except WriteError as error:  # a full disk: the previous checkpoint.pt is whole
                        raise WriteError(f"{error}; {self.kept()}") from None
            self.saved = self.completed
            if self.main:
                print(f"\n{self.stopped_by}: saved step {self.completed} to {self.path}; rerun the same command "
                      "to resume", file=sys.stderr)
        elif self.stop_asked and self.main and self.saved:  # the finished step was a checkpoint step
            print(f"\n{self.stopped_by}: step {self.completed} is saved in {self.path}; rerun the same command "
                  "to resume", file=sys.stderr)
        elif self.stop_asked and self.main and self.stopped_by != "data error":  # the error says enough
            print(f"\n{self.stopped_by} before the first step: nothing to save", file=sys.stderr)
