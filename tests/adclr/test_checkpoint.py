"""Checkpoints: a corrupt one is refused with its one-line reason by every command that
reads it, and a run resumes only with its own settings."""

import dataclasses
import errno
import io
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import torch
from trainer_testing import TINY, read_metrics, run

import adclr.checkpoint
from adclr.checkpoint import FolderInUse, folder_lock, load_checkpoint, write_atomically
from adclr.config import Config
from adclr.train import train


class RunsCode:
    """Pickles as a call of os.mkdir: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def corrupt(kind, good, tmp_path):
    """The bytes of a checkpoint broken in the way `kind` says; and the reason the error must give."""
    if kind == "empty":
        return b"", "is unreadable, not an adclr checkpoint (the file is empty)"
    if kind == "truncated":
        return good[:len(good) // 2], "is unreadable, not an adclr checkpoint (not a complete PyTorch file: truncated or corrupted)"
    if kind == "random bytes":
        return (torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                              dtype=torch.uint8).numpy().tobytes(),
                "is unreadable, not an adclr checkpoint (not a PyTorch checkpoint file)")
    if kind == "text":
        return b"hello\n", "is unreadable, not an adclr checkpoint (not a PyTorch checkpoint file)"
    state = torch.load(io.BytesIO(good), weights_only=True)
    if kind == "disallowed global":
        state["student"] = RunsCode(str(tmp_path / "pwned"))
        reason = (f"is unreadable, not an adclr checkpoint (it refers to {os.mkdir.__module__}.mkdir, which is not "
                  "a tensor or plain data; it was not loaded, since unpickling that could run code)")
    elif kind == "not a dict":
        state, reason = [state], "is not an adclr checkpoint (it holds a list, not a dict)"
    elif kind == "missing keys":
        del state["optimizer"], state["rng"]
        reason = "is not an adclr checkpoint (no optimizer, rng in it)"
    elif kind == "step of the wrong type":
        state["step"], reason = "1", "is not an adclr checkpoint ('step' is '1', not a step number)"
    elif kind == "negative skipped count":
        state["skipped_images"], reason = -1, "is not an adclr checkpoint ('skipped_images' is -1, not a count)"
    elif kind == "step of type bool":  # a bool is an int to isinstance
        state["step"], reason = True, "is not an adclr checkpoint ('step' is True, not a step number)"
    elif kind == "negative image count":
        state["images"], reason = -1, "is not an adclr checkpoint ('images' is -1, not a count)"
    elif kind == "weights of the wrong type":
        state["teacher"] = list(state["teacher"].values())
        reason = "is not an adclr checkpoint ('teacher' is not a dict of tensors)"
    elif kind == "centres of the wrong type":
        state["loss"] = list(state["loss"].values())
        reason = "is not an adclr checkpoint ('loss' is not a dict of tensors)"
    elif kind == "config of the wrong type":
        state["config"]["arch"] = "resnet50"
        reason = "is not an adclr checkpoint ('config' is not an adclr train config)"
    elif kind == "scaler of the wrong type":
        state["scaler"] = {"scale": "big"}
        reason = "is not an adclr checkpoint ('scaler' is not a gradient scaler state dict)"
    elif kind == "infinite scaler value":
        state["scaler"] = {"scale": float("inf")}
        reason = "is not an adclr checkpoint ('scaler' is not a gradient scaler state dict)"
    elif kind == "NaN in the optimizer state":
        i, moments = next(iter(state["optimizer"]["state"].items()))
        moments["exp_avg"].view(-1)[0] = float("nan")
        reason = f"holds non-finite values (NaN or inf) in optimizer state of parameter {i}: the run it comes from"
    elif kind == "NaN weights":
        state["teacher"]["backbone.blocks.0.attn.qkv.weight"][0, 0] = float("nan")
        reason = ("holds non-finite values (NaN or inf) in teacher['backbone.blocks.0.attn.qkv.weight']: the run "
                  "it comes from diverged before it was written, or the file was damaged since")
    elif kind in SAVED_CONFIGS:  # the model cannot be built: ZeroDivisionError, ValueError, or -64 exported
        field, value, problem = SAVED_CONFIGS[kind]
        state["config"][field] = value
        reason = f"is not an adclr checkpoint (its 'config' is not a valid adclr train config: {problem})"
    elif kind in RNG_STATES:  # TypeError, KeyError or RuntimeError from torch.set_rng_state on resume
        state["rng"][0] = RNG_STATES[kind](state["rng"][0])
        reason = "is not an adclr checkpoint ('rng' entry 0 is not a process's RNG state)"
    elif kind == "wrong shapes":
        state["student"]["backbone.pos_embed"] = state["student"]["backbone.pos_embed"][:, :5]
        state["teacher"]["backbone.pos_embed"] = state["teacher"]["backbone.pos_embed"][:, :5]
        reason = "does not fit the model of its own config (Error(s) in loading state_dict for "
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue(), reason


SAVED_CONFIGS = {
    "patch size 0": ("patch_size", 0, "--patch-size: must be >= 1, got 0"),
    "image size off the patch grid": ("image_size", 60, "--image-size: must be a multiple of --patch-size 8, got 60"),
    "negative image size": ("image_size", -64, "--image-size: must be >= 1, got -64"),
}
RNG_STATES = {
    "RNG entry not a dict": lambda states: "x",
    "RNG entry without its CPU state": lambda states: {"cuda": states["cuda"]},
    "CPU RNG state not a tensor": lambda states: {**states, "cpu": "x"},
    "CPU RNG state of the wrong size": lambda states: {**states, "cpu": states["cpu"][:3]},
    "CPU RNG state of the wrong dtype": lambda states: {**states, "cpu": states["cpu"].float()},
    "CUDA RNG state not a tensor": lambda states: {**states, "cuda": ["x"]},
}
CORRUPTIONS = ["empty", "truncated", "random bytes", "text", "disallowed global", "not a dict", "missing keys",
               "step of the wrong type", "negative skipped count", "step of type bool", "negative image count",
               "weights of the wrong type", "centres of the wrong type", "config of the wrong type",
               "scaler of the wrong type", "infinite scaler value", "NaN weights", "NaN in the optimizer state",
               *SAVED_CONFIGS, *RNG_STATES,
               "wrong shapes"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("command", ["train", "eval", "export"])
def test_corrupt_checkpoint(kind, command, checkpoint_bytes, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    path = str(out / "checkpoint.pt")
    content, reason = corrupt(kind, checkpoint_bytes, tmp_path)
    with open(path, "wb") as f:
        f.write(content)
    if command == "train":  # resuming the run in --out
        status, err = run(["train", *TINY, "--out", str(out)], capsys)
        advice = "; remove it to start over, or choose another --out"
        prefix = "error: "
    elif command == "eval":
        status, err = run(["eval", "knn", "--checkpoint", path, "--limit", "8", "--num-workers", "0"], capsys)
        advice, prefix = "; pass the checkpoint.pt an adclr train run wrote", "error: --checkpoint: "
    else:
        status, err = run(["export", "--checkpoint", path, "--out", str(tmp_path / "b.safetensors")], capsys)
        advice, prefix = "; pass the checkpoint.pt an adclr train run wrote", "error: --checkpoint: "
    line = err.splitlines()[-1]
    assert status == 1 and line.startswith(f"{prefix}{path} {reason}") and line.endswith(advice), line
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "pwned")  # the pickled call never ran
    with open(path, "rb") as f:
        assert f.read() == content  # the evidence is left alone
    assert not os.path.exists(tmp_path / "b.safetensors")


def test_a_diverged_checkpoint_is_reported_at_load(checkpoint_bytes, tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = torch.load(io.BytesIO(checkpoint_bytes), weights_only=True)
    state["loss"]["center"].fill_(float("inf"))
    torch.save(state, path)
    with pytest.raises(adclr.checkpoint.CheckpointError, match=r"non-finite values \(NaN or inf\) in loss\['center'\]"):
        load_checkpoint(str(path))


def test_optional_checkpoint_parts_pass_the_checks(tmp_path, capsys):
    """A trained last-layer gain (--no-norm-last-layer) loads, resumes and exports; NaN in it is refused."""
    out = str(tmp_path / "run")
    assert run(["train", *TINY, "--out", out, "--no-norm-last-layer"], capsys)[0] == 0
    path = os.path.join(out, "checkpoint.pt")
    state = load_checkpoint(path)
    assert "head.last_layer.gain" in state["student"] and "head.last_layer.gain" in state["teacher"]
    assert run(["train", *TINY, "--out", out, "--no-norm-last-layer", "--max-steps", "2"], capsys)[0] == 0
    assert run(["export", "--checkpoint", path, "--out", str(tmp_path / "b.safetensors")], capsys)[0] == 0
    state = load_checkpoint(path)
    assert state["step"] == 2
    state["student"]["head.last_layer.gain"][3] = float("nan")
    torch.save(state, path)
    with pytest.raises(adclr.checkpoint.CheckpointError,
                       match=r"non-finite values \(NaN or inf\) in student\['head.last_layer.gain'\]"):
        load_checkpoint(path)


def test_resume_with_different_settings_is_refused(tiny_config):
    cfg = tiny_config(max_steps=2)
    train(cfg)
    with pytest.raises(SystemExit, match="--num-queries: checkpoint 3, now 5"):
        train(dataclasses.replace(cfg, num_queries=5))


# The flags docs/training.md says may change on resume, and --out, the run's folder.
MAY_CHANGE_ON_RESUME = {"out", "data", "epochs", "max_steps", "device", "num_workers", "decode", "attention",
                        "pack_crops", "fused_head_loss", "compile", "precision", "peak_tflops", "log_every",
                        "checkpoint_every", "saveckp_freq"}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Config)])
def test_only_the_documented_flags_may_change_on_resume(field):
    """Any other change (--seed, --lambda-query, ...) is refused, naming the flag alone."""
    saved = Config()
    value = getattr(saved, field)
    changed = (not value if isinstance(value, bool) else value + "x" if isinstance(value, str)
               else (value[0] / 2, value[1]) if isinstance(value, tuple) else value + 1)
    now = dataclasses.replace(saved, **{field: changed})
    if field in MAY_CHANGE_ON_RESUME:
        adclr.checkpoint.check_resumable(now, dataclasses.asdict(saved))
        return
    with pytest.raises(SystemExit) as refused:
        adclr.checkpoint.check_resumable(now, dataclasses.asdict(saved))
    flag = "--" + field.replace("_", "-")
    assert str(refused.value).splitlines()[1:-1] == [f"  {flag}: checkpoint {value!r}, now {changed!r}"]


def test_a_rerun_with_nothing_to_do_leaves_config_json_as_it_was(tiny_config, capsys):
    cfg = tiny_config(max_steps=3)
    train(cfg)
    with open(os.path.join(cfg.out, "config.json")) as f:
        written = f.read()
    assert train(dataclasses.replace(cfg, max_steps=2)) == 3
    assert (f"nothing to do: {os.path.join(cfg.out, 'checkpoint.pt')} is at step 3, past the end of this run "
            "(2 steps)") in capsys.readouterr().err
    with open(os.path.join(cfg.out, "config.json")) as f:
        assert f.read() == written


def test_a_refusal_after_a_run_on_own_data_says_when_data_was_left_out():
    """A run trained on a folder, resumed by a command without --data: the built-in data's
    demo settings made the differences, and the refusal says so."""
    saved = dataclasses.asdict(Config(data="/photos", batch_size=64))
    with pytest.raises(SystemExit) as refused:
        adclr.checkpoint.check_resumable(Config(out="runs/own", data="builtin", batch_size=32), saved)
    assert str(refused.value).splitlines()[1:] == [
        "  --batch-size: checkpoint 64, now 32",
        "  (the run was trained on --data /photos; without --data the built-in data's demo settings fill the flags "
        "not given: rerun with --data /photos)",
        "use another --out to start a new run"]
    with pytest.raises(SystemExit) as refused:  # another folder given: a data change, which may be meant
        adclr.checkpoint.check_resumable(Config(out="runs/own", data="/moved", batch_size=32), saved)
    assert "trained on" not in str(refused.value)


def test_checkpoints_from_before_norm_last_layer_still_resume(tiny_config):
    cfg = tiny_config(max_steps=2, checkpoint_every=2)
    train(cfg)
    path = os.path.join(cfg.out, "checkpoint.pt")
    old = load_checkpoint(path)
    del old["config"]["norm_last_layer"]  # written before the option existed: a fixed gain
    assert not any(k.endswith(".gain") for k in old["student"])
    torch.save(old, path)
    assert train(dataclasses.replace(cfg, max_steps=4)) == 4
    with pytest.raises(SystemExit, match="--norm-last-layer: checkpoint True, now False"):
        train(dataclasses.replace(cfg, max_steps=6, norm_last_layer=False))


# --------------------------------------------------------------------------- files and folders


def mount_point(path):
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def disk_full_line(out, step):
    path = os.path.join(out, "checkpoint.pt")
    return (f"error: cannot write {path}: no space left on device (the disk mounted at {mount_point(out)} is full); "
            f"{path} still holds step {step}; make room, then rerun the same command to resume from it")


def test_a_full_disk_during_a_checkpoint_write(tmp_path, monkeypatch, capsys):
    """torch.save met ENOSPC as two chained C++ iostream errors that never said "disk", and
    left its partial .tmp on the full disk."""
    out, save = str(tmp_path / "run"), torch.save

    def fill_the_disk(state, f):
        if state["step"] == 2:
            f.write(b"x" * 4096)
            try:  # as torch.save reports it: a RuntimeError raised while handling the OSError
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        save(state, f)

    monkeypatch.setattr(torch, "save", fill_the_disk)
    status, err = run(["train", *TINY, "--out", out, "--max-steps", "3", "--checkpoint-every", "1"], capsys)
    assert status == 1 and err.splitlines()[-1] == disk_full_line(out, 1) and "Traceback" not in err
    assert sorted(os.listdir(out)) == [".lock", "checkpoint.pt", "config.json", "metrics.jsonl"]  # no .tmp
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] == 1
    monkeypatch.undo()
    assert run(["train", *TINY, "--out", out, "--max-steps", "3", "--checkpoint-every", "1"], capsys)[0] == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs mounted at tmp_path/disk (root only): room for one TINY checkpoint, not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield str(disk)
    subprocess.run(["umount", str(disk)], check=True)


def test_a_really_full_disk(small_disk, capsys):
    out = os.path.join(small_disk, "run")
    status, err = run(["train", *TINY, "--out", out, "--max-steps", "4", "--checkpoint-every", "2"], capsys)
    assert status == 1 and err.splitlines()[-1] == disk_full_line(out, 2) and "Traceback" not in err
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] == 2


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_write_atomically_writes_through_links_with_the_usual_permissions(umask, tmp_path):
    """safetensors' save_file replaced a link by a 0600 file of its own."""
    previous = os.umask(umask)
    try:
        new = tmp_path / "new"
        write_atomically(str(new), lambda f: f.write(b"1"))
        assert new.read_bytes() == b"1" and stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask
        new.chmod(0o640)
        write_atomically(str(new), lambda f: f.write(b"2"))
        assert new.read_bytes() == b"2" and stat.S_IMODE(new.stat().st_mode) == 0o640  # kept
        (tmp_path / "link").symlink_to(new)
        (tmp_path / "dangling").symlink_to(tmp_path / "target")
        for link in ("link", "dangling"):
            write_atomically(str(tmp_path / link), lambda f: f.write(b"3"))
            assert (tmp_path / link).is_symlink() and (tmp_path / link).read_bytes() == b"3"
        assert sorted(os.listdir(tmp_path)) == ["dangling", "link", "new", "target"]
    finally:
        os.umask(previous)


@pytest.mark.parametrize("stop", [OSError(errno.EACCES, "Permission denied"), KeyboardInterrupt()])
def test_write_atomically_leaves_the_old_file_and_no_partial_one(stop, tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"old")

    def write(f):
        f.write(b"half")
        raise stop

    if isinstance(stop, OSError):
        with pytest.raises(adclr.checkpoint.WriteError, match=f"^cannot write {path}: Permission denied$"):
            write_atomically(str(path), write)
    else:
        with pytest.raises(KeyboardInterrupt):
            write_atomically(str(path), write)
    assert os.listdir(tmp_path) == ["file"] and path.read_bytes() == b"old"


def test_write_atomically_syncs_the_new_file_before_it_replaces_the_old(tmp_path, monkeypatch):
    """A machine's crash after the rename must not leave an empty file where the old one
    was: the data reach the disk first, the folder's rename after."""
    path, events = tmp_path / "file", []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", str(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_atomically(str(path), lambda f: f.write(b"new"))
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"] and path.read_bytes() == b"new"
    if os.path.exists("/proc/self/fd"):
        assert events[0][1].endswith(".tmp") and events[2][1] == str(tmp_path)


@pytest.mark.parametrize("kind", ["a folder", "a device", "a special file"])
def test_write_atomically_never_replaces_what_is_not_a_file(kind, tmp_path):
    """As root, --out /dev/full replaced the device node."""
    if kind == "a folder":
        target = str(tmp_path / "folder")
        os.mkdir(target)
    elif kind == "a device":
        target = "/dev/full"
    else:
        target = str(tmp_path / "fifo")
        os.mkfifo(target)
    link = tmp_path / "link"
    link.symlink_to(target)
    before = os.stat(target)
    for path in (target, str(link)):
        with pytest.raises(adclr.checkpoint.WriteError,
                           match=f"^cannot write {path}: it is {kind}, not a regular file$"):
            write_atomically(path, lambda f: f.write(b"x"))
    assert os.stat(target).st_ino == before.st_ino and os.stat(target).st_mode == before.st_mode


def test_folder_lock_is_held_for_the_block_and_dropped_with_its_process(tmp_path):
    (tmp_path / ".lock").write_text("4194304 the-longer-host-name-of-an-earlier-run\n")  # replaced, not overwritten
    with folder_lock(str(tmp_path)):
        with pytest.raises(FolderInUse, match=f"^{tmp_path} is in use by another adclr run "
                                              f"\\(process {os.getpid()} on {socket.gethostname()}\\)$"):
            with folder_lock(str(tmp_path)):
                pass
    with folder_lock(str(tmp_path)):  # released on leaving the block
        pass
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom adclr.checkpoint import folder_lock\n"
                               f"with folder_lock({str(tmp_path)!r}):\n    print('held', flush=True)\n"
                               "    time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(FolderInUse, match=f"process {holder.pid} on"):
        with folder_lock(str(tmp_path)):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with folder_lock(str(tmp_path)):  # the system dropped the killed process's lock
        pass


def test_a_full_disk_at_a_new_runs_lock_is_one_line(tmp_path, monkeypatch, capsys):
    """A new run writes who holds its folder into .lock, the first byte it writes there: on
    a full disk that ended in an OSError traceback."""
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    out = str(tmp_path / "run")
    status, err = run(["train", *TINY, "--out", out], capsys)
    assert status == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"error: cannot write {os.path.join(out, '.lock')}: no space left on "
                                    f"device (the disk mounted at {mount_point(out)} is full)")


def started_then_asleep(started):
    started.set()
    time.sleep(60)


def test_a_forked_child_does_not_keep_the_folder_lock(tmp_path):
    """A DataLoader worker is a forked child: it shared the lock's open file, so a worker
    outliving its killed run held the folder."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    started = fork.Event()
    with folder_lock(str(tmp_path)):
        child = fork.Process(target=started_then_asleep, args=(started,))
        child.start()
        assert started.wait(60)  # past the fork and its handlers
    try:
        with folder_lock(str(tmp_path)):  # released although the child still runs
            assert child.is_alive()
    finally:
        child.kill()
        child.join()


def test_two_writers_of_one_path_do_not_share_a_partial_file(tmp_path):
    """Two `adclr export` runs to one path wrote the same PATH.tmp: the second truncated the
    first's partial file, and the first's rename then failed."""
    path = tmp_path / "backbone.safetensors"

    def write_while_another_process_writes(f):
        f.write(b"first ")
        child = os.fork()
        if child == 0:  # the other writer, from start to finish
            try:
                write_atomically(str(path), lambda g: g.write(b"second, whole"))
            finally:
                os._exit(0)
        assert os.waitpid(child, 0)[1] == 0
        f.write(b"whole")

    write_atomically(str(path), write_while_another_process_writes)
    assert path.read_bytes() == b"first whole" and os.listdir(tmp_path) == ["backbone.safetensors"]


@pytest.mark.parametrize("command", ["eval", "export"])
def test_a_fifo_given_as_checkpoint_is_refused_not_waited_on(command, tmp_path, capsys):
    """torch.load blocked forever opening a fifo for reading."""
    path = str(tmp_path / "checkpoint.pt")
    os.mkfifo(path)
    def waited(signum, frame):
        raise TimeoutError(f"still waiting on the fifo {path}")

    previous = signal.signal(signal.SIGALRM, waited)  # a regression fails here instead of hanging the suite
    signal.alarm(30)
    try:
        if command == "eval":
            status, err = run(["eval", "knn", "--checkpoint", path, "--limit", "8", "--num-workers", "0"], capsys)
        else:
            status, err = run(["export", "--checkpoint", path, "--out", str(tmp_path / "b.safetensors")], capsys)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert status == 1 and err.splitlines()[-1].startswith(
        f"error: --checkpoint: {path} is a special file, not a regular file"), err
    assert "Traceback" not in err


def test_a_file_system_without_flock_runs_unlocked_with_a_warning(tmp_path, monkeypatch, capsys):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(adclr.checkpoint.fcntl, "flock", no_flock)
    with folder_lock(str(tmp_path)):
        with folder_lock(str(tmp_path)):  # nothing to stop it: said once per lock taken
            pass
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: the file system of {tmp_path} cannot lock it (No locks available); nothing "
                   "stops a second run from writing into it at the same time"] * 2
