"""Checkpoints: writing them so that a kill never leaves a broken one, reading them back
only after checking every part, and the RNG states that make a resumed run the same run.

OUT/checkpoint.pt is a dict: "student", "teacher" (state dicts), "optimizer", "loss" (the
two centres), "scaler" (fp16 runs only), "step", "config" (the run's Config as a dict) and
"rng" (one entry per process). Every file is written beside its target and renamed over
it: a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil

import torch
import torch.distributed as dist

from .config import FORMER_BEHAVIOUR, RESUMABLE
from .model import ARCHS


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


def copy_atomically(source, target):
    shutil.copyfile(source, target + ".tmp")
    os.replace(target + ".tmp", target)


def write_json_atomically(path, value):
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
    problem = _malformed(state)
    if problem:
        raise CheckpointError(f"{path} is not an adclr checkpoint ({problem})")
    for name, t in _named_tensors(state):
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


def _malformed(state):
    """What is wrong with the structure of a loaded checkpoint, or None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        return f"no {', '.join(missing)} in it"
    for key in ("student", "teacher", "loss"):
        if not (isinstance(state[key], dict) and all(isinstance(v, torch.Tensor) for v in state[key].values())):
            return f"'{key}' is not a dict of tensors"
    optimizer = state["optimizer"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        return "'optimizer' is not an optimizer state dict"
    if isinstance(state["step"], bool) or not isinstance(state["step"], int) or state["step"] < 0:
        return f"'step' is {state['step']!r}, not a step number"
    config = state["config"]
    if not isinstance(config, dict) or not all(isinstance(config.get(k), int) for k in ("patch_size", "image_size")) \
            or config.get("arch") not in ARCHS:
        return "'config' is not an adclr train config"
    if not isinstance(state["rng"], list):
        return "'rng' is not a list of RNG states"
    scaler = state.get("scaler", {})  # only in fp16 runs
    if not (isinstance(scaler, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                             and math.isfinite(v) for v in scaler.values())):
        return "'scaler' is not a gradient scaler state dict"
    return None


def _named_tensors(state):
    """(name as an error states it, tensor) of every weight, centre and optimizer state."""
    tensors = [(f"{key}[{name!r}]", t) for key in ("student", "teacher", "loss") for name, t in state[key].items()]
    tensors += [(f"optimizer state of parameter {i}", t) for i, s in state["optimizer"]["state"].items()
                for t in (s.values() if isinstance(s, dict) else ()) if isinstance(t, torch.Tensor)]
    return tensors


def restore(trainer, state, path):
    """Load a checkpoint's weights, optimizer, centres and gradient scaler into `trainer`.

    CheckpointError when the state does not fit the trainer's model (names or shapes).
    """
    try:
        trainer.student_module.load_state_dict(state["student"])
        trainer.teacher.load_state_dict(state["teacher"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.loss.load_state_dict(state["loss"])
        if trainer.scaler and state.get("scaler"):  # absent: a run saved in another precision
            trainer.scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path} does not fit the model of its own config ({reason})") from None


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


# --------------------------------------------------------------------------- RNG state

def rng_states():
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    torch.set_rng_state(states["cpu"])
    if torch.cuda.is_available() and states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def all_rng_states(world):
    """Every process's `rng_states()`, in rank order (a collective: every process calls it)."""
    if world == 1:
        return [rng_states()]
    states = [None] * world
    dist.all_gather_object(states, rng_states())
    return states
