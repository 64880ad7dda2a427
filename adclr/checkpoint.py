"""Checkpoints: writing them so that a kill never leaves a broken one, reading them back
only after checking every part, and the RNG states that make a resumed run the same run;
the files and folders a run writes.

OUT/checkpoint.pt is a dict: "student", "teacher" (state dicts), "optimizer", "loss" (the
two centres), "scaler" (fp16 runs only), "step", "config" (the run's Config as a dict) and
"rng" (one entry per process). Every file is written beside its target and renamed over
it: a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import re
import shutil
import socket
import stat
import sys
import tempfile

import torch
import torch.distributed as dist

from .config import FORMER_BEHAVIOUR, RESUMABLE, saved_config_errors
from .model import ARCHS


def save_checkpoint(trainer, path, step, rng, skipped_images=0, images=None):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact.
    skipped_images: the unreadable files passed over so far, a file once for each sample that
    met it (metrics.jsonl counts on from it after a resume). images: how many image files
    --data held, so that a resume can say when that changed (the data order with it)."""
    state = {
        "student": trainer.student_module.state_dict(),
        "teacher": trainer.teacher.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "loss": trainer.loss.state_dict(),  # the two centres
        **({"scaler": trainer.scaler.state_dict()} if trainer.scaler else {}),
        "step": step,
        "config": dataclasses.asdict(trainer.cfg),
        "rng": rng,
        "skipped_images": skipped_images,
        **({"images": images} if images is not None else {}),
    }
    # Through a Python file: torch.save to a path reports a full disk as a C++ iostream error.
    write_atomically(path, lambda f: torch.save(state, f))


def copy_atomically(source, target):
    with open(source, "rb") as original:
        write_atomically(target, lambda f: shutil.copyfileobj(original, f))


def write_json_atomically(path, value):
    write_atomically(path, lambda f: f.write((json.dumps(value, indent=2) + "\n").encode()))


# --------------------------------------------------------------------------- files and folders

class WriteError(Exception):
    """A file could not be written; the message names it and why (a full disk by where it is mounted)."""


def write_atomically(path, write):
    """Call write(f) on a new binary file beside `path`'s target, then rename it over that target.

    A reader, or a run killed mid-write, sees the old file or the new one, never half of
    one; the new one is on disk (fsync) before it replaces the old. A link is written
    through to the file it points to; an existing file keeps its permissions, a new one
    gets the umask's; a folder or device is never replaced. On any failure the partial
    file is removed; WriteError (naming `path`) when the system refuses the write: a full
    disk, no permission.
    """
    kind = not_a_file(path)
    if kind:
        raise WriteError(f"cannot write {path}: it is {kind}, not a regular file")
    real = os.path.realpath(path)
    tmp = f"{real}.{os.getpid()}.tmp"  # one per process: two writers of one path never share a partial file
    try:
        with open(tmp, "wb") as f:
            write(f)
            # On disk before the rename: after a machine's crash (not a process's) a file
            # system may keep the rename and lose the data, leaving an empty checkpoint.pt.
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(real):
            os.chmod(tmp, stat.S_IMODE(os.stat(real).st_mode))
        os.replace(tmp, real)
        _sync_folder(os.path.dirname(real))
    except BaseException as error:  # Ctrl-C too: leave no partial file behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = _os_error(error)
        if cause is None:
            raise
        raise WriteError(why_not_written(path, cause)) from None


def _sync_folder(folder):
    """Put a rename in `folder` on disk (where the system lets a folder be opened and synced)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def not_a_file(path):
    """What `path` (through links) is when it exists and is not a regular file: "a folder",
    "a device" or "a special file"; None otherwise."""
    real = os.path.realpath(path)
    if not os.path.exists(real) or os.path.isfile(real):
        return None
    mode = os.stat(real).st_mode
    return "a folder" if stat.S_ISDIR(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
        else "a special file"


def _os_error(error):
    """The OSError behind `error`: itself, or the one a library's error was raised while handling."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def why_not_written(path, error):
    """"cannot write PATH: why" for the OSError a write of `path` met; a full disk named by its mount point."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot write {path}: {error.strerror or error}"
    mount = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    if error.errno == errno.EDQUOT:
        return f"cannot write {path}: disk quota exceeded (on the disk mounted at {mount})"
    return f"cannot write {path}: no space left on device (the disk mounted at {mount} is full)"


def make_folder(folder, flag="--out"):
    """Make `folder` (and its parents), or exit with one line naming `flag` and why it cannot be."""
    if not folder:
        raise SystemExit(f"error: {flag} is empty; give a folder")
    link = _dangling_link(folder)
    if link:
        raise SystemExit(f"error: {flag} {folder}: {link} is a link to {os.readlink(link)}, which does not "
                         f"exist; make that folder, or choose another {flag}")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SystemExit(f"error: {flag} {folder} is a file, not a folder; choose another {flag}")
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        resume = os.path.exists(os.path.join(folder, "checkpoint.pt"))
        raise SystemExit(f"error: {flag} {folder} is not writable ({error.strerror or error}); "
                         + ("it holds a run: make it writable to resume it, or choose another "
                            f"{flag} to start over" if resume else f"choose another {flag}")) from None


def _dangling_link(folder):
    """The first of `folder` and its parents that is a link to nothing, or None."""
    path = os.path.normpath(folder)
    while path not in ("", os.sep, "."):
        if os.path.islink(path) and not os.path.exists(path):
            return path
        if os.path.exists(path):
            return None
        path = os.path.dirname(path)
    return None


class FolderInUse(Exception):
    """Another process holds the lock of a run folder; the message names the folder and that process."""


LOCK = ".lock"  # in a run folder: the flock a run holds, with "PID HOST" of the holder in it
_held_locks = set()  # the file descriptors of the folder locks this process holds


def _drop_inherited_locks():
    """In a forked child (a DataLoader worker): close the lock files it inherited. An flock
    belongs to the open file, which a child shares, so a worker outliving a killed run
    would otherwise hold the run's folder for a while."""
    for fd in _held_locks:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextlib.contextmanager
def folder_lock(folder):
    """Hold an exclusive lock on `folder` (on its file .lock) for the duration of the block.

    FolderInUse if another process holds it, WriteError if the lock file cannot be opened.
    The lock is an flock: the system drops it when the process ends, however it ends
    (SIGKILL, a crash), so a stale lock never blocks a rerun; forked children do not keep
    it. Where the file system has no flock, the block runs unlocked, after a warning on stderr.
    """
    path = os.path.join(folder, LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:  # a folder of that name, no permission
        raise WriteError(why_not_written(path, error)) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").split()
            who = f" (process {holder[0]} on {holder[1]})" if len(holder) == 2 else ""
            raise FolderInUse(f"{folder} is in use by another adclr run{who}") from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f"warning: the file system of {folder} cannot lock it ({error.strerror or error}); "
                  "nothing stops a second run from writing into it at the same time", file=sys.stderr)
        _held_locks.add(fd)
        try:  # who holds it, for the message of a run refused: a full disk refuses this one
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError as error:
            raise WriteError(why_not_written(path, error)) from None
        yield
    finally:
        _held_locks.discard(fd)
        os.close(fd)


class CheckpointError(ValueError):
    """`path` is not a usable adclr checkpoint; the message names the file and why."""


CHECKPOINT_KEYS = ("student", "teacher", "optimizer", "loss", "step", "config", "rng")


def load_checkpoint(path):
    """The checkpoint written by `save_checkpoint`, checked before anything uses it.

    Raises CheckpointError for a file that is missing, unreadable (empty, truncated,
    not a PyTorch file), would run code to load (torch.load's weights_only refuses
    any pickled global that is not a tensor or plain data), lacks a part, holds a part
    of the wrong type, or holds non-finite weights (a run that diverged). Optional
    parts: "scaler" (fp16 runs), a head's "last_layer.gain" (--no-norm-last-layer),
    "skipped_images" (absent before runs counted them), "images" (likewise).
    """
    kind = not_a_file(path)
    if kind:  # torch.load would wait forever on a fifo and read a device until memory runs out
        raise CheckpointError(f"{path} is {kind}, not a regular file")
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
                                  "comes from diverged before it was written, or the file was damaged since")
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
    for key, what in (("step", "a step number"), ("skipped_images", "a count"), ("images", "a count")):
        value = state.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"'{key}' is {value!r}, not {what}"
    config = state["config"]
    if not isinstance(config, dict) or not all(isinstance(config.get(k), int) for k in ("patch_size", "image_size")) \
            or config.get("arch") not in ARCHS:
        return "'config' is not an adclr train config"
    errors = saved_config_errors(config)
    if errors:
        return f"its 'config' is not a valid adclr train config: {errors[0]}"
    problem = _rng_problem(state["rng"])
    if problem:
        return problem
    scaler = state.get("scaler", {})  # only in fp16 runs
    if not (isinstance(scaler, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                             and math.isfinite(v) for v in scaler.values())):
        return "'scaler' is not a gradient scaler state dict"
    return None


def _rng_problem(rng):
    """What is wrong with a checkpoint's "rng" entry, or None: a list of `rng_states()`."""
    if not isinstance(rng, list):
        return "'rng' is not a list of RNG states"
    for i, states in enumerate(rng):
        if not (isinstance(states, dict) and _is_rng_state(states.get("cpu"), torch.get_rng_state().shape)
                and isinstance(states.get("cuda"), list) and all(_is_rng_state(t) for t in states["cuda"])):
            return f"'rng' entry {i} is not a process's RNG state"
    return None


def _is_rng_state(t, shape=None):
    return isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 and shape in (None, t.shape)


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
        trained_on = str(saved.get("data") or "builtin")
        if str(cfg.data or "builtin").startswith("builtin") and not trained_on.startswith("builtin"):
            # --data may change on resume, but a command without it selects the built-in
            # data, whose CPU demo settings then fill every flag not given.
            lines += (f"\n  (the run was trained on --data {trained_on}; without --data the built-in data's "
                      f"demo settings fill the flags not given: rerun with --data {trained_on})")
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
