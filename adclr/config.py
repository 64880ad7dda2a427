"""The settings of a run: the Config dataclass and what each of its fields accepts.

One table (ALLOWED) states every field's range in a small language ("> 0", "[0, 1)",
a tuple of choices, or a function); the command line checks each flag against it as it
is parsed (adclr.cli), and `config_errors` checks a whole Config built in Python, so both
give the same "--flag: message" text.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from adclr_kernels import BACKENDS

from .data import BLUR_TAPS, DECODE, SMALLEST_BLURRED_CROP
from .model import ARCHS


@dataclass
class Config:
    """Every field is an `adclr train --flag` (underscores become dashes)."""
    out: str = "runs/adclr"                  # run folder: checkpoint.pt, metrics.jsonl, tensorboard
    data: str = "builtin"                    # image folder (ImageFolder layout), builtin (shapes), builtin:scenes, builtin:shape-scenes, builtin:few-shape-scenes, builtin:grey-ground-scenes
    method: str = "adclr"                    # adclr (lambda_query 0: DINO) | densecl | ccmim (docs/methods.md)
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
    query_sees_self: bool = False            # query tokens also attend to their own key
    query_sees_queries: bool = False         # PQCL variant
    pack_crops: str = "auto"                 # all student crops in one packed backbone pass: auto (Triton on CUDA) | on | off
    compile: str = "auto"                    # torch.compile: on (student, teacher) | step (whole step) | graph (+ CUDA graph) | off; auto: on on CUDA
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
    lambda_dense: float = 0.5                # densecl: loss = (1 - lambda) global + lambda dense (DenseCL's 0.5)
    mask_ratio: float = 0.75                 # ccmim: share of the patches masked, sampled by the CLS attention
    lambda_align: float = 1.0                # ccmim: loss = reconstruction + lambda * visible/masked alignment
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
    num_workers: int = -1                    # loader processes; -1 = one per free core (less one per process)
    decode: str = "auto"                     # auto (cpu on CUDA, else pillow) | pillow (workers crop) | cpu (workers decode, the device crops) | gpu (nvJPEG decodes too)
    log_every: int = 10
    checkpoint_every: int = 500              # steps between writes of OUT/checkpoint.pt
    saveckp_freq: int = 20                   # also keep OUT/checkpointNNNN.pt every this many epochs; 0 = never
    peak_tflops: float = 0.0                 # the device's peak TFLOP/s for the logged MFU; 0 = the known bf16 peak of the GPU


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
    "method": ("adclr", "densecl", "ccmim"), "arch": tuple(ARCHS), "patch_size": ">= 1", "image_size": ">= 1", "local_size": ">= 1",
    "out_dim": ">= 1", "head_hidden_dim": ">= 1", "head_bottleneck_dim": ">= 1",
    "drop_path": "[0, 1)", "attention": BACKENDS, "pack_crops": ("auto", "on", "off"),
    "fused_head_loss": ("auto", "on", "off"), "compile": ("auto", "on", "off", "step", "graph"),
    "num_local_crops": ">= 0", "num_queries": ">= 0",
    "global_scale": "(0, 1]", "local_scale": "(0, 1]", "query_scale": "(0, 1]",
    "lambda_query": ">= 0", "lambda_dense": "[0, 1]", "mask_ratio": "(0, 1)", "lambda_align": ">= 0",
    "student_temp": "> 0", "warmup_teacher_temp": "> 0", "teacher_temp": "> 0",
    "warmup_teacher_temp_epochs": ">= 0", "center_momentum": "[0, 1]",
    "batch_size": ">= 1", "epochs": ">= 1", "max_steps": ">= 0", "base_lr": "> 0", "min_lr": ">= 0",
    "warmup_epochs": ">= 0", "weight_decay": ">= 0", "weight_decay_end": ">= 0",
    "momentum_teacher": "[0, 1]", "clip_grad": ">= 0", "freeze_last_layer_epochs": ">= 0",
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "device": device_error,
    # Sample seeds are (seed * 100003 + epoch) * 10000019 + i, which must stay below 2**64.
    "seed": "[0, 10000000]",
    "num_workers": ">= -1", "decode": DECODE, "log_every": ">= 1", "checkpoint_every": ">= 1", "saveckp_freq": ">= 0",
    "peak_tflops": ">= 0",
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
    return field_errors(cfg) or crop_errors(cfg) + schedule_errors(cfg)


def field_errors(cfg):
    """Each field of `cfg` against its type and its ALLOWED entry."""
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
    return errors


def crop_errors(cfg):
    """Crop sizes the model and the augmentation take (each field already in range)."""
    errors = []
    if cfg.image_size % cfg.patch_size:
        errors.append(f"--image-size: must be a multiple of --patch-size {cfg.patch_size}, got {cfg.image_size}")
    if cfg.num_local_crops and cfg.local_size % cfg.patch_size:
        errors.append(f"--local-size: must be a multiple of --patch-size {cfg.patch_size}, got {cfg.local_size}")
    blurred = [("--image-size", cfg.image_size)] + ([("--local-size", cfg.local_size)] if cfg.num_local_crops else [])
    for flag, size in blurred:
        if size < SMALLEST_BLURRED_CROP:
            errors.append(f"{flag}: must be >= {SMALLEST_BLURRED_CROP}, the smallest crop the augmentation's "
                          f"{BLUR_TAPS}-tap blur takes, got {size}")
    patches = (cfg.image_size // cfg.patch_size) ** 2
    if cfg.method == "ccmim" and not 1 <= round(cfg.mask_ratio * patches) < patches:
        errors.append(f"--mask-ratio: must mask at least one of the {patches} patches and leave one, "
                      f"got {cfg.mask_ratio}")
    if cfg.compile in ("step", "graph") and cfg.precision == "fp16":
        errors.append("--compile: " + WHOLE_STEP_FP16.format(mode=cfg.compile))
    return errors


# The whole-step graph has no place for the fp16 gradient scaler's host decisions.
WHOLE_STEP_FP16 = ("--compile {mode} does not take --precision fp16 (its gradient scaler skips steps "
                   "from the host); use bf16, which needs no scaler")


def schedule_errors(cfg):
    """The lr schedule: a cosine from the peak lr down to --min-lr (each field already in range)."""
    peak = cfg.base_lr * cfg.batch_size / 256
    if cfg.min_lr > peak:
        return [f"--min-lr: must be at most the peak lr, --base-lr x --batch-size / 256 = {peak:g}, "
                f"got {cfg.min_lr:g}"]
    return []


def saved_config_errors(saved):
    """What is wrong with a checkpoint's config dict for building its model, as `config_errors`
    says it: a field it lacks takes FORMER_BEHAVIOUR's value or the default (fields added
    since); a field this version does not know is ignored; the lr schedule is not checked
    (a run made with an older version's rules is still evaluated and exported)."""
    known = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{**FORMER_BEHAVIOUR, **{k: v for k, v in saved.items() if k in known}})
    return field_errors(cfg) or crop_errors(cfg)


# Fields that may change between a run and its resumption; any other difference is an error.
RESUMABLE = {"out", "data", "epochs", "max_steps", "device", "num_workers", "decode", "log_every",
             "checkpoint_every", "saveckp_freq", "attention", "pack_crops", "fused_head_loss",
             "precision", "compile", "peak_tflops"}

# Fields added after checkpoints were written without them: the value that does what the
# trainer did before the field existed, so that those runs still resume.
FORMER_BEHAVIOUR = {"norm_last_layer": True, "method": "adclr", "lambda_dense": 0.5, "mask_ratio": 0.75,
                    "lambda_align": 1.0}

