"""ADCLR pretraining: config, build, one training step, and the training loop.

For benchmarks and custom loops the two pieces are usable on their own:

    trainer = build(cfg, device)                 # models, optimizer, loss, schedules
    batch = adclr.data.synthetic_batch(cfg, cfg.batch_size, device)
    metrics = train_step(trainer, batch, step)   # one full step, no host sync inside

`train(cfg)` is the whole run behind `adclr train`: data, logging, checkpoints and
resume, DistributedDataParallel under torchrun.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from adclr_kernels import BACKENDS

from .data import Augment, open_dataset, train_loader, warn_unreadable
from .loss import ADCLRLoss
from .model import ARCHS, ADCLRModel, DINOHead, build_backbone


@dataclass
class Config:
    """Every field is an `adclr train --flag` (underscores become dashes)."""
    out: str = "runs/adclr"                  # run folder: checkpoint.pt, metrics.jsonl, tensorboard
    data: str = "builtin"                    # image folder (ImageFolder layout), "builtin" (shapes) or "builtin:scenes"
    # model
    arch: str = "vit_small"                  # vit_tiny | vit_small | vit_base (paper); vit_mini, vit_test (CPU)
    patch_size: int = 16
    image_size: int = 224                    # global crops (and the positional-embedding grid)
    local_size: int = 96
    out_dim: int = 65536                     # DINO head output (prototypes)
    head_hidden_dim: int = 2048              # DINO head MLP width
    head_bottleneck_dim: int = 256
    norm_last_layer: bool = True             # fix the head's last-layer gain at 1 (DINO's default); --no-norm-last-layer trains it
    drop_path: float = 0.1                   # stochastic depth of the student
    attention: str = "auto"                  # adclr_kernels backend: auto | triton | sdpa | reference | flex | xformers
    query_sees_prefix: bool = False          # query tokens also attend to CLS
    query_sees_self: bool = False
    query_sees_queries: bool = False         # PQCL variant
    pack_crops: str = "auto"                 # all student crops in one packed backbone pass: auto (Triton on CUDA) | on | off
    compile: str = "auto"                    # torch.compile student and teacher, fullgraph: auto (on on CUDA) | on | off
    # crops
    num_local_crops: int = 10
    num_queries: int = 10
    global_scale: tuple = (0.4, 1.0)
    local_scale: tuple = (0.05, 0.4)
    query_scale: tuple = (0.05, 0.15)        # of the raw image; each resized to one patch
    # loss
    lambda_query: float = 0.5                # 0 = plain DINO
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: float = 30.0
    center_momentum: float = 0.9
    fused_head_loss: str = "auto"            # head last layer + loss in one op, no out_dim-wide logits: auto (CUDA) | on | off
    # optimisation
    batch_size: int = 256                    # total over all processes (DINO's --batch_size_per_gpu times the GPUs)
    epochs: int = 100
    max_steps: int = 0                       # stop (and end the schedules) after this many steps; 0 = epochs
    base_lr: float = 5e-4                    # lr = base_lr * batch_size / 256
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996          # teacher EMA, cosine to 1; raise it for small batches (DINO: 0.9995 at batch 256)
    clip_grad: float = 3.0                   # clip each parameter's gradient norm to this on its own (DINO); 0 = off
    freeze_last_layer_epochs: float = 1.0
    precision: str = "auto"                  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 (with a gradient scaler) | fp32
    # running
    device: str = "auto"                     # auto | cpu | cuda | cuda:N
    seed: int = 0
    num_workers: int = -1                    # loader processes; -1 = one per free core (max 8)
    log_every: int = 10
    checkpoint_every: int = 500              # steps between writes of OUT/checkpoint.pt
    saveckp_freq: int = 20                   # also keep OUT/checkpointNNNN.pt every this many epochs; 0 = never


def device_error(device):
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", device) is None:
        return f"must be auto, cpu, cuda or cuda:N, got {device!r}"
    return None


# What each field accepts, checked on the command line as each flag is parsed and by
# `config_errors` on a whole Config. A new field gets its entry here (the tests insist
# for every numeric one): a range ">= 1", "> 0", "[0, 1]", "(0, 1]", "[0, 1)" (for a
# (LOW, HIGH) pair: both, and LOW <= HIGH), a tuple of the allowed strings, or a
# function returning what is wrong with a value (None if nothing).
ALLOWED = {
    "arch": tuple(ARCHS), "patch_size": ">= 1", "image_size": ">= 1", "local_size": ">= 1",
    "out_dim": ">= 1", "head_hidden_dim": ">= 1", "head_bottleneck_dim": ">= 1",
    "drop_path": "[0, 1)", "attention": BACKENDS, "pack_crops": ("auto", "on", "off"),
    "fused_head_loss": ("auto", "on", "off"), "compile": ("auto", "on", "off"),
    "num_local_crops": ">= 0", "num_queries": ">= 0",
    "global_scale": "(0, 1]", "local_scale": "(0, 1]", "query_scale": "(0, 1]",
    "lambda_query": ">= 0", "student_temp": "> 0", "warmup_teacher_temp": "> 0", "teacher_temp": "> 0",
    "warmup_teacher_temp_epochs": ">= 0", "center_momentum": "[0, 1]",
    "batch_size": ">= 1", "epochs": ">= 1", "max_steps": ">= 0", "base_lr": "> 0", "min_lr": ">= 0",
    "warmup_epochs": ">= 0", "weight_decay": ">= 0", "weight_decay_end": ">= 0",
    "momentum_teacher": "[0, 1]", "clip_grad": ">= 0", "freeze_last_layer_epochs": ">= 0",
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "device": device_error,
    # Sample seeds are (seed * 100003 + epoch) * 10000019 + i, which must stay below 2**64.
    "seed": "[0, 10000000]",
    "num_workers": ">= -1", "log_every": ">= 1", "checkpoint_every": ">= 1", "saveckp_freq": ">= 0",
}


def value_error(value, allowed):
    """What is wrong with `value` under an ALLOWED entry (a message to follow "--flag: "), or None."""
    if callable(allowed):
        return allowed(value)
    if isinstance(allowed, tuple):
        return None if value in allowed else f"invalid choice: {value!r} (choose from {', '.join(allowed)})"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if allowed.startswith(">"):
        op, low = allowed.split()
        ok = value >= float(low) if op == ">=" else value > float(low)
        return None if ok else f"must be {allowed}, got {value}"
    low, high = (float(x) for x in allowed[1:-1].split(","))
    ok = ((low <= value) if allowed[0] == "[" else (low < value)) and \
         ((value <= high) if allowed[-1] == "]" else (value < high))
    return None if ok else f"must be in {allowed}, got {value}"


def config_errors(cfg):
    """Everything wrong with `cfg`, as "--flag: message" lines; empty when it can run.

    Each field against ALLOWED and its type, then what depends on several fields.
    """
    errors = []
    defaults = Config()
    for f in dataclasses.fields(cfg):
        value, default, flag = getattr(cfg, f.name), getattr(defaults, f.name), "--" + f.name.replace("_", "-")
        if isinstance(default, tuple):
            if not (isinstance(value, (tuple, list)) and len(value) == len(default)
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                errors.append(f"{flag}: must be two numbers LOW HIGH, got {value!r}")
                continue
            problems = [value_error(float(v), ALLOWED[f.name]) for v in value]
            problems.append(None if value[0] <= value[1] else
                            f"LOW must be <= HIGH, got {value[0]} {value[1]}")
            errors += [f"{flag}: {p}" for p in problems if p][:1]
            continue
        kinds = (int, float) if isinstance(default, float) else type(default)
        if not isinstance(value, kinds) or (isinstance(value, bool) and not isinstance(default, bool)):
            errors.append(f"{flag}: must be {type(default).__name__}, got {value!r}")
            continue
        problem = value_error(value, ALLOWED[f.name]) if f.name in ALLOWED else None
        if problem:
            errors.append(f"{flag}: {problem}")
    if errors:  # the checks below assume each field in range
        return errors
    if cfg.image_size % cfg.patch_size:
        errors.append(f"--image-size: must be a multiple of --patch-size {cfg.patch_size}, got {cfg.image_size}")
    if cfg.num_local_crops and cfg.local_size % cfg.patch_size:
        errors.append(f"--local-size: must be a multiple of --patch-size {cfg.patch_size}, got {cfg.local_size}")
    return errors


# Fields that may change between a run and its resumption; any other difference is an error.
RESUMABLE = {"out", "data", "epochs", "max_steps", "device", "num_workers", "log_every",
             "checkpoint_every", "saveckp_freq", "attention", "pack_crops", "fused_head_loss",
             "precision", "compile"}

# Fields added after checkpoints were written without them: the value that does what the
# trainer did before the field existed, so that those runs still resume.
FORMER_BEHAVIOUR = {"norm_last_layer": True}


def cosine(step, total, start, end, warmup=0, warmup_start=0.0):
    """Linear warm-up from warmup_start to start over `warmup` steps, then cosine to end."""
    if step < warmup:
        return warmup_start + (start - warmup_start) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Everything one training step needs; made by `build`."""

    def __init__(self, cfg, device, student, teacher, loss, optimizer, steps_per_epoch, compiled=False):
        self.cfg, self.device, self.compiled = cfg, device, compiled
        self.student = student  # DistributedDataParallel-wrapped when distributed
        self.student_module = student.module if isinstance(student, DistributedDataParallel) else student
        self.teacher, self.loss, self.optimizer = teacher, loss, optimizer
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.epochs * steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps) if cfg.epochs else cfg.max_steps
        self.student_params = [p for p in self.student_module.parameters()]
        self.teacher_params = [p for p in teacher.parameters()]
        precision = cfg.precision if cfg.precision != "auto" else "bf16" if device.type == "cuda" else "fp32"
        self.autocast = (contextlib.nullcontext() if precision == "fp32" else
                         torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16))
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range.
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.fused_head_loss = cfg.fused_head_loss == "on" or (cfg.fused_head_loss == "auto"
                                                                and device.type == "cuda")

    def schedule(self, step):
        """lr, weight decay, teacher momentum and teacher temperature at `step` (Python floats)."""
        cfg, total, spe = self.cfg, self.total_steps, self.steps_per_epoch
        lr = cosine(step, total, cfg.base_lr * cfg.batch_size / 256, cfg.min_lr,
                    warmup=min(total, round(cfg.warmup_epochs * spe)))
        temp_warmup = round(cfg.warmup_teacher_temp_epochs * spe)
        temp = (cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * step / temp_warmup
                if step < temp_warmup else cfg.teacher_temp)
        return {"lr": lr,
                "weight_decay": cosine(step, total, cfg.weight_decay, cfg.weight_decay_end),
                "momentum": cosine(step, total, cfg.momentum_teacher, 1.0),
                "teacher_temp": temp}


COMPILE_BACKEND = "inductor"  # torch.compile's default; the CPU tests use "aot_eager" (no C++ build)


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
    # Packing pays where the backend has a real varlen kernel; the PyTorch backends would
    # loop over sequences, so "auto" packs only for Triton on CUDA.
    pack = cfg.pack_crops == "on" or (cfg.pack_crops == "auto" and device.type == "cuda"
                                      and cfg.attention in ("auto", "triton"))

    def model(drop_path):
        backbone = build_backbone(cfg.arch, cfg.image_size, cfg.patch_size, drop_path, cfg.attention,
                                  query_sees_prefix=cfg.query_sees_prefix,
                                  query_sees_self=cfg.query_sees_self,
                                  query_sees_queries=cfg.query_sees_queries)
        return ADCLRModel(backbone, DINOHead(backbone.embed_dim, cfg.out_dim, cfg.head_hidden_dim,
                                             cfg.head_bottleneck_dim, cfg.norm_last_layer), pack).to(device)

    student, teacher = model(cfg.drop_path), model(0.0)  # DINO's teacher has no stochastic depth
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    compiled = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    if compiled:
        # In place (the state dict keeps its names). fullgraph: the op is a torch.library
        # custom op, so nothing in a step breaks the graph; a break would be an error here.
        student.compile(fullgraph=True, backend=COMPILE_BACKEND)
        teacher.compile(fullgraph=True, backend=COMPILE_BACKEND)

    # DINO's rule: no weight decay on biases and norm parameters (1-D); the head's
    # last-layer gain is (out_dim, 1), so it is decayed, as DINO's weight_g is.
    decay, no_decay = [], []
    for name, p in student.named_parameters():
        (no_decay if name.endswith(".bias") or p.dim() == 1 else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=0.0, fused=device.type == "cuda")
    if dist.is_available() and dist.is_initialized():
        student = DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    loss = ADCLRLoss(cfg.out_dim, cfg.lambda_query, cfg.student_temp, cfg.center_momentum).to(device)
    return Trainer(cfg, device, student, teacher, loss, optimizer, steps_per_epoch, compiled)


def clip_grad_per_parameter_(params, max_norm):
    """DINO's clipping: scale each parameter's gradient to norm <= max_norm on its own.

    Unlike a global-norm clip, a large gradient in one parameter does not shrink the
    others. Parameters without a gradient are skipped. Returns the global norm of the
    gradients before clipping (for logging). Foreach ops, no host synchronisation.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else None)
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm:
        scales = torch._foreach_add(norms, 1e-6)  # DINO's epsilon: a zero gradient stays zero
        torch._foreach_reciprocal_(scales)
        torch._foreach_mul_(scales, max_norm)
        torch._foreach_clamp_max_(scales, 1.0)
        torch._foreach_mul_(grads, scales)
    return total


def _gain(layer):
    """A NormalizedLinear's trained gain as the fused loss takes it, (out_dim,), or None."""
    return None if layer.gain is None else layer.gain.view(-1)


def train_step(trainer, batch, step):
    """One full ADCLR step on a ready batch (see adclr.data) already on the device.

    Student and teacher forward, loss, backward, last-layer freeze, per-parameter grad
    clipping, AdamW step with the scheduled lr / weight decay, EMA update of the
    teacher and of the centres. No host synchronisation (except the fp16 gradient
    scaler's inf check with a non-fused optimizer, i.e. off CUDA): returns detached
    0-dim tensors (loss, loss_global, loss_query, grad_norm), grad_norm being the
    global norm of the gradients the optimizer gets, before clipping.
    """
    t, cfg = trainer, trainer.cfg
    sched = t.schedule(step)
    decay_group, no_decay_group = t.optimizer.param_groups
    decay_group["lr"] = no_decay_group["lr"] = sched["lr"]
    decay_group["weight_decay"] = sched["weight_decay"]

    globals_, local = batch["globals"], batch["locals"]
    queries = batch["queries"] if cfg.lambda_query and cfg.num_queries else None  # lambda 0: plain DINO
    if queries is not None:
        queries = queries.repeat(2, 1, 1, 1, 1)  # the same query crops for both global views
    fused = t.fused_head_loss  # the heads stop at the bottleneck; the loss runs their last layer
    with t.autocast:
        with torch.no_grad():
            teacher_cls, teacher_query = t.teacher(globals_, queries, project=not fused)
        student_cls, student_query = t.student(globals_, queries, local, project=not fused)
        if fused:
            last, teacher_last = t.student_module.head.last_layer, t.teacher.head.last_layer
            loss, loss_global, loss_query = t.loss.fused(
                student_cls, teacher_cls, sched["teacher_temp"], last.weight, teacher_last.weight,
                student_query, teacher_query, gain=_gain(last), teacher_gain=_gain(teacher_last))
        else:
            loss, loss_global, loss_query = t.loss(student_cls, teacher_cls, sched["teacher_temp"],
                                                   student_query, teacher_query)

    t.optimizer.zero_grad(set_to_none=True)
    (t.scaler.scale(loss) if t.scaler else loss).backward()
    if step < cfg.freeze_last_layer_epochs * t.steps_per_epoch:
        # DINO: keeping the prototypes (weight and gain) fixed at first stabilises the
        # start of training. No gradient: AdamW neither moves nor decays them.
        for p in t.student_module.head.last_layer.parameters():
            p.grad = None
    if t.scaler:
        t.scaler.unscale_(t.optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = clip_grad_per_parameter_(t.student_params, cfg.clip_grad)
    if t.scaler:
        t.scaler.step(t.optimizer)  # skipped when a gradient is inf/nan; the scale then drops
        t.scaler.update()
    else:
        t.optimizer.step()
    with torch.no_grad():
        torch._foreach_lerp_(t.teacher_params, t.student_params, 1.0 - sched["momentum"])
    return {"loss": loss.detach(), "loss_global": loss_global.detach(),
            "loss_query": loss_query.detach(), "grad_norm": grad_norm.detach()}


# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(trainer, path, step, rng):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    state = {
        "student": trainer.student_module.state_dict(),
        "teacher": trainer.teacher.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "loss": trainer.loss.state_dict(),  # the two centres
        **({"scaler": trainer.scaler.state_dict()} if trainer.scaler else {}),
        "step": step,
        "config": dataclasses.asdict(trainer.cfg),
        "rng": rng,
    }
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _copy_atomically(source, target):
    shutil.copyfile(source, target + ".tmp")
    os.replace(target + ".tmp", target)


def _write_json(path, value):
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


class CheckpointError(ValueError):
    """`path` is not a usable adclr checkpoint; the message names the file and why."""


CHECKPOINT_KEYS = ("student", "teacher", "optimizer", "loss", "step", "config", "rng")


def load_checkpoint(path):
    """The checkpoint written by `save_checkpoint`, checked before anything uses it.

    Raises CheckpointError for a file that is missing, unreadable (empty, truncated,
    not a PyTorch file), would run code to load (torch.load's weights_only refuses
    any pickled global that is not a tensor or plain data), lacks a part, holds a part
    of the wrong type, or holds non-finite weights (a run that diverged). Optional
    parts: "scaler" (fp16 runs), a head's "last_layer.gain" (--no-norm-last-layer).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    except Exception as error:  # whatever a bad file makes the unpickler or zip reader raise
        raise CheckpointError(f"{path} is unreadable, not an adclr checkpoint ({_why_unreadable(path, error)})") from None

    def bad(what):
        return CheckpointError(f"{path} is not an adclr checkpoint ({what})")

    if not isinstance(state, dict):
        raise bad(f"it holds a {type(state).__name__}, not a dict")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise bad(f"no {', '.join(missing)} in it")
    for key in ("student", "teacher", "loss"):
        if not (isinstance(state[key], dict) and all(isinstance(v, torch.Tensor) for v in state[key].values())):
            raise bad(f"'{key}' is not a dict of tensors")
    optimizer = state["optimizer"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        raise bad("'optimizer' is not an optimizer state dict")
    if isinstance(state["step"], bool) or not isinstance(state["step"], int) or state["step"] < 0:
        raise bad(f"'step' is {state['step']!r}, not a step number")
    config = state["config"]
    if not isinstance(config, dict) or not all(isinstance(config.get(k), int) for k in ("patch_size", "image_size")) \
            or config.get("arch") not in ARCHS:
        raise bad("'config' is not an adclr train config")
    if not isinstance(state["rng"], list):
        raise bad("'rng' is not a list of RNG states")
    scaler = state.get("scaler", {})  # only in fp16 runs
    if not (isinstance(scaler, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                             and math.isfinite(v) for v in scaler.values())):
        raise bad("'scaler' is not a gradient scaler state dict")
    tensors = [(f"{key}[{name!r}]", t) for key in ("student", "teacher", "loss") for name, t in state[key].items()]
    tensors += [(f"optimizer state of parameter {i}", t) for i, s in optimizer["state"].items()
                for t in (s.values() if isinstance(s, dict) else ()) if isinstance(t, torch.Tensor)]
    for name, t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{path} holds non-finite values (NaN or inf) in {name}: the run it "
                                  "comes from diverged before it was written")
    return state


def _why_unreadable(path, error):
    if isinstance(error, EOFError):
        return "the file is empty" if os.path.getsize(path) == 0 else "the file ends early"
    refused = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(error))  # its wording varies
    if refused:
        return (f"it refers to {refused.group(1)}, which is not a tensor or plain data; "
                "it was not loaded, since unpickling that could run code")
    if "central directory" in str(error) or "zip archive" in str(error):
        return "not a complete PyTorch file: truncated or corrupted"
    return "not a PyTorch checkpoint file"


def check_resumable(cfg, saved):
    """The run in `cfg.out` must be the same run; say exactly what differs if not."""
    current = dataclasses.asdict(cfg)
    saved = {**FORMER_BEHAVIOUR, **saved}
    diff = {k: (saved.get(k), v) for k, v in current.items()
            if k not in RESUMABLE and _plain(saved.get(k)) != _plain(v)}
    if diff:
        lines = "\n".join(f"  --{k.replace('_', '-')}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise SystemExit(f"error: {cfg.out} holds a different run; resuming needs the same settings:\n"
                         f"{lines}\nuse another --out to start a new run")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def rng_states():
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    torch.set_rng_state(states["cpu"])
    if torch.cuda.is_available() and states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


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
        self.file = open(os.path.join(out, "metrics.jsonl"), "a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # purge_step: a resumed run drops the events logged after its checkpoint.
                self.tb = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=start + 1 if start else None)
            except Exception:  # tensorboard not installed: JSON lines are enough
                pass

    def log(self, record, total_steps):
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k.replace("/", "_per_"), v, record["step"])
        line = (f"step {record['step']}/{total_steps} | loss {record['loss']:.4f} "
                f"(global {record['loss_global']:.4f}, query {record['loss_query']:.4f}) | "
                f"lr {record['lr']:.2e} | {record['images/s']:.1f} img/s | eta {_duration(record['eta_s'])}")
        if record["skipped_images"]:
            line += f" | {record['skipped_images']} unreadable images skipped"
        print(("\r" + line + " " * 4) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self):
        if self.enabled:
            if self.tty:
                print(file=sys.stderr)
            self.file.close()
            if self.tb:
                self.tb.close()


def _duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def prepare_out(out, main):
    """Make the run folder, or say in one line why it cannot be; drop a half-written checkpoint."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"error: --out {out} is a file, not a folder; choose another --out")
    try:
        os.makedirs(out, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as error:
        raise SystemExit(f"error: --out {out} is not writable ({error.strerror or error}); choose another --out")
    if not main:
        return
    # A kill while writing checkpoint.pt or a numbered snapshot; the file it was to replace is intact.
    for name in sorted(os.listdir(out)):
        if re.fullmatch(r"checkpoint(\d+)?\.pt\.tmp", name):
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
        with open(metrics + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics + ".tmp", metrics)


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


def train(cfg):
    """The full run; resumes from OUT/checkpoint.pt when it exists. Returns the final step.

    A bad config raises ValueError; what a user must fix (the data, --out, a corrupt
    checkpoint, a run with other settings in --out) raises SystemExit with one line.
    """
    errors = config_errors(cfg)
    if errors:
        raise ValueError("invalid config: " + "; ".join(errors))
    rank, world, device = setup_distributed(cfg)
    main = rank == 0
    check_backend(cfg, device)
    prepare_out(cfg.out, main)
    path = os.path.join(cfg.out, "checkpoint.pt")
    checkpoint, start = None, 0
    if os.path.exists(path):
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError as error:
            raise SystemExit(f"error: {error}; remove it to start over, or choose another --out") from None
        check_resumable(cfg, checkpoint["config"])
        start = checkpoint["step"]

    try:
        images = open_dataset(cfg.data, "train")
    except OSError as error:  # ImageFolder: no such folder, no images in it, no permission
        raise SystemExit(f"error: --data: {error}") from None
    if len(images) < cfg.batch_size:
        raise SystemExit(f"error: --batch-size {cfg.batch_size} is larger than the dataset "
                         f"({len(images)} images in {cfg.data})")
    if cfg.batch_size % world:
        raise SystemExit(f"error: --batch-size {cfg.batch_size} (the total over all processes) "
                         f"is not divisible by the {world} processes")
    loader, steps_per_epoch = train_loader(cfg, rank, world, start, images)
    data = iter(loader)  # draws from the global RNG: before seeding, so that a resume replays exactly
    trainer = build(cfg, device, steps_per_epoch)
    torch.manual_seed(cfg.seed + 1000 * (rank + 1))  # augmentations differ between processes
    if checkpoint is not None:
        try:
            trainer.student_module.load_state_dict(checkpoint["student"])
            trainer.teacher.load_state_dict(checkpoint["teacher"])
            trainer.optimizer.load_state_dict(checkpoint["optimizer"])
            trainer.loss.load_state_dict(checkpoint["loss"])
            if trainer.scaler and checkpoint.get("scaler"):  # absent: a run saved in another precision
                trainer.scaler.load_state_dict(checkpoint["scaler"])
        except (RuntimeError, ValueError, KeyError) as error:  # names or shapes not the config's model
            reason = str(error).strip().splitlines()[0]
            raise SystemExit(f"error: {path} does not fit the model of its own config ({reason}); "
                             "remove it to start over, or choose another --out") from None
        if len(checkpoint["rng"]) == world:
            set_rng_states(checkpoint["rng"][rank])
        del checkpoint
    total = trainer.total_steps
    if main:
        print(f"adclr train: {world} process(es) on {device}, {steps_per_epoch} steps/epoch, "
              f"{total} steps, torch.compile {'on' if trainer.compiled else 'off'}"
              + (f", resuming at step {start}" if start else ""), file=sys.stderr)
        print("config: " + json.dumps(dataclasses.asdict(cfg)), file=sys.stderr)
        _write_json(os.path.join(cfg.out, "config.json"), dataclasses.asdict(cfg))
        # Epoch-based warm-ups silently cover all of a run shortened by --max-steps: the
        # lr would never leave warm-up, or the last layer never unfreeze.
        for name in ("warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer_epochs"):
            if 0 < total <= getattr(cfg, name) * steps_per_epoch:
                print(f"warning: --{name.replace('_', '-')} {getattr(cfg, name)} "
                      f"({getattr(cfg, name) * steps_per_epoch:.0f} steps) covers the whole "
                      f"{total}-step run", file=sys.stderr)
    if start >= total:
        if main:
            print(f"nothing to do: {path} is already at step {start} of {total}", file=sys.stderr)
        return start

    augment = Augment().to(device)
    if main:
        drop_records_after(os.path.join(cfg.out, "metrics.jsonl"), start)
    logger = Logger(cfg.out, main, start)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    last_good, saved, completed, skipped = start, start, start, 0  # saved: step of checkpoint.pt, 0 = none
    warned = set()  # unreadable files already reported
    t0, images_since = time.perf_counter(), 0
    in_step = False

    def checkpoint_now(step):
        rng = [rng_states()]
        if world > 1:
            rng = [None] * world
            dist.all_gather_object(rng, rng_states())
        if main:
            save_checkpoint(trainer, path, step, rng)

    def check_finite(step):
        flag = bad.clone()
        if world > 1:  # every process must stop together
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            raise FloatingPointError(
                f"loss became non-finite between step {last_good} and step {step}; stopping. "
                + (f"The last good checkpoint (step {saved}) is kept in {path}. " if saved else
                   f"No checkpoint was written before (--checkpoint-every {cfg.checkpoint_every}). ")
                + "Try a lower --base-lr, a lower --clip-grad or a longer --warmup-epochs.")

    try:
        for step in range(start, total):
            raw = next(data)
            first, skips = raw.pop("index"), raw.pop("skipped")
            if skips.any():
                skipped += int(skips.sum())
                for i, n in zip(first[skips > 0].tolist(), skips[skips > 0].tolist()):
                    warn_unreadable(images, range(i, i + n), warned)
            raw = {k: v.to(device, non_blocking=True) for k, v in raw.items()}
            in_step = True
            metrics = train_step(trainer, augment(raw), step)
            in_step = False
            bad |= ~torch.isfinite(metrics["loss"])
            images_since += cfg.batch_size
            done = completed = step + 1
            if done % cfg.log_every == 0 or done == total:
                check_finite(done)
                last_good = done
                elapsed = time.perf_counter() - t0
                sched = trainer.schedule(step)
                record = {"step": done, "epoch": round(done / steps_per_epoch, 4),
                          **{k: v.item() for k, v in metrics.items()},
                          "lr": sched["lr"], "weight_decay": sched["weight_decay"],
                          "momentum": sched["momentum"], "teacher_temp": sched["teacher_temp"],
                          "images/s": images_since / elapsed, "skipped_images": skipped,
                          **({"loss_scale": trainer.scaler.get_scale()} if trainer.scaler else {}),
                          "eta_s": (total - done) * elapsed / (images_since / cfg.batch_size)}
                logger.log(record, total)
                t0, images_since = time.perf_counter(), 0
            snapshot = cfg.saveckp_freq and done % (cfg.saveckp_freq * steps_per_epoch) == 0
            if done % cfg.checkpoint_every == 0 or done == total or snapshot:
                check_finite(done)
                last_good = done
                checkpoint_now(done)
                saved = done
                if snapshot and main:  # a numbered copy that later checkpoints do not replace
                    _copy_atomically(path, os.path.join(cfg.out, f"checkpoint{done // steps_per_epoch:04d}.pt"))
    except KeyboardInterrupt:
        # Keep what was done, unless the interrupt hit inside a step (half-updated state).
        if world == 1 and not in_step and completed > saved and not bad.item():
            save_checkpoint(trainer, path, completed, [rng_states()])
            print(f"\ninterrupted: saved step {completed} to {path}; rerun the same command to resume",
                  file=sys.stderr)
        raise
    finally:
        logger.close()
    if main:
        print(f"done: {total} steps, checkpoint {path}", file=sys.stderr)
    return total
