"""The training run: exact resume, schedules, the step's freeze, clipping and precision,
non-finite losses, the run folder (metrics.jsonl, config.json, snapshots, stale files)."""

import dataclasses
import json
import math
import os
import shutil
import signal
import time

import pytest
import torch
from trainer_testing import TINY, crash_in_step, image_folder, read_metrics, run

import adclr.config
import adclr.train
from adclr.checkpoint import load_checkpoint
from adclr.cli import main
from adclr.train import train


@pytest.mark.parametrize("compile", ["off", pytest.param("step", marks=pytest.mark.slow)])
def test_tiny_run_logs_finite_losses_and_resumes_exactly(tiny_config, tmp_path, monkeypatch, compile_counter,
                                                         compile):
    # Uninterrupted reference run: 6 steps (--compile step: the whole step as one graph).
    full = tiny_config(out=str(tmp_path / "full"), max_steps=6, checkpoint_every=2, compile=compile)
    assert train(full) == 6
    # The same run crashing in step 5 (index 4), then the same command again.
    part = dataclasses.replace(full, out=str(tmp_path / "part"))
    crash_in_step(monkeypatch, 4, lambda: train(part))
    assert load_checkpoint(os.path.join(part.out, "checkpoint.pt"))["step"] == 4
    assert train(part) == 6

    records = read_metrics(part.out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # no step repeated or skipped
    for r in records:
        for key in ("loss", "loss_global", "loss_query", "lr", "images/s"):
            assert math.isfinite(r[key]), (key, r)
        assert r["loss_query"] > 0
    # Data order, augmentation and dropout RNG all resume: the result is the uninterrupted run's.
    a = load_checkpoint(os.path.join(full.out, "checkpoint.pt"))
    b = load_checkpoint(os.path.join(part.out, "checkpoint.pt"))
    for key in ("student", "teacher", "loss"):
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=0, atol=0, msg=f"{key}.{name}")
    for i, state in a["optimizer"]["state"].items():
        for name in state:
            assert torch.equal(b["optimizer"]["state"][i][name], state[name]), (i, name)
    assert [r["loss"] for r in read_metrics(full.out)] == [r["loss"] for r in records]
    assert set(a) >= {"student", "teacher", "optimizer", "loss", "step", "config", "rng"}
    assert not [name for name in os.listdir(part.out) if name.endswith(".tmp")]


def test_finished_run_does_nothing_more(tiny_config):
    cfg = tiny_config(max_steps=2)
    train(cfg)
    before = os.path.getmtime(os.path.join(cfg.out, "checkpoint.pt"))
    assert train(cfg) == 2
    assert os.path.getmtime(os.path.join(cfg.out, "checkpoint.pt")) == before


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, monkeypatch):
    real_step = adclr.train.train_step

    def poisoned(trainer, batch, step):
        metrics = real_step(trainer, batch, step)
        if step >= 2:  # the third step goes bad
            metrics["loss"] = metrics["loss"] * float("nan")
        return metrics

    monkeypatch.setattr(adclr.train, "train_step", poisoned)
    cfg = tiny_config(max_steps=6, checkpoint_every=2, log_every=1)
    with pytest.raises(FloatingPointError, match="non-finite.*step 2 is kept|step 2\\)"):
        train(cfg)
    assert load_checkpoint(os.path.join(cfg.out, "checkpoint.pt"))["step"] == 2
    assert [r["step"] for r in read_metrics(cfg.out)] == [1, 2]


def test_non_finite_gradient_with_a_finite_loss_stops_before_its_weights_are_saved(tiny_config, monkeypatch):
    """Per-parameter clipping turns an inf gradient into NaN weights while the loss stays
    finite: the checkpoint due after that step must not replace the last good one."""
    real_clip = adclr.train.clip_grad_per_parameter_
    steps = []

    def poisoned(params, max_norm):
        steps.append(None)
        if len(steps) == 4:  # the fourth step, a checkpoint step
            params[0].grad.view(-1)[0] = float("inf")
        return real_clip(params, max_norm)

    monkeypatch.setattr(adclr.train, "clip_grad_per_parameter_", poisoned)
    cfg = tiny_config(max_steps=6, checkpoint_every=2, log_every=1)
    with pytest.raises(FloatingPointError, match=r"^gradient norm \(the loss was finite\) became non-finite "
                                                 r"between step 3 and step 4.*step 2\) is kept"):
        train(cfg)
    assert load_checkpoint(os.path.join(cfg.out, "checkpoint.pt"))["step"] == 2  # checked: no NaN in it


def test_non_finite_loss_before_any_checkpoint_claims_none(tmp_path, monkeypatch, capsys):
    real_step = adclr.train.train_step

    def poisoned(trainer, batch, step):
        metrics = real_step(trainer, batch, step)
        metrics["loss"] = metrics["loss"] * float("nan")
        return metrics

    monkeypatch.setattr(adclr.train, "train_step", poisoned)
    out = str(tmp_path / "run")
    status, err = run(["train", *TINY, "--out", out, "--max-steps", "3", "--checkpoint-every", "2"], capsys)
    assert status == 1
    assert err.splitlines()[-1] == (
        "error: loss became non-finite between step 0 and step 1; stopping. No checkpoint was written before "
        "(--checkpoint-every 2). Start a new run (another --out) with a lower --base-lr, a lower --clip-grad or a "
        "longer --warmup-epochs.")
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))


def test_an_interrupt_after_a_non_finite_loss_keeps_the_last_good_checkpoint(tiny_config, monkeypatch, capsys):
    """A loss that went bad since the last check (no log line since) is not saved on Ctrl-C."""
    real_step, real_next = adclr.train.train_step, adclr.train.Run.next_batch

    def poisoned(trainer, batch, step):
        metrics = real_step(trainer, batch, step)
        if step == 2:  # the third step goes bad
            metrics["loss"] = metrics["loss"] * float("nan")
        return metrics

    def interrupt_before_step_4(self, data):
        if self.completed == 3:
            raise KeyboardInterrupt
        return real_next(self, data)

    monkeypatch.setattr(adclr.train, "train_step", poisoned)
    monkeypatch.setattr(adclr.train.Run, "next_batch", interrupt_before_step_4)
    cfg = tiny_config(max_steps=6, checkpoint_every=2, log_every=10)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    path = os.path.join(cfg.out, "checkpoint.pt")
    assert load_checkpoint(path)["step"] == 2
    err = capsys.readouterr().err
    assert "saved step" not in err
    assert (f"interrupted: a loss after step 2 was not finite, so the steps since are not saved; "
            f"{path} holds step 2\n") in err


@pytest.mark.parametrize("where", ["between steps", "inside a step"])
def test_an_interrupt_keeps_the_steps_done_unless_it_hits_inside_a_step(where, tiny_config, monkeypatch, capsys):
    """Ctrl-C saves the steps finished since the last checkpoint, but not a step's half-updated state."""
    cfg = tiny_config(max_steps=6, checkpoint_every=4)
    if where == "between steps":
        real_log = adclr.train.Logger.log

        def log_then_interrupt(self, record, total_steps):
            real_log(self, record, total_steps)
            if record["step"] == 3:
                raise KeyboardInterrupt

        monkeypatch.setattr(adclr.train.Logger, "log", log_then_interrupt)
    else:
        real_step = adclr.train.train_step

        def interrupt_step_4(trainer, batch, step):
            if step == 3:
                raise KeyboardInterrupt
            return real_step(trainer, batch, step)

        monkeypatch.setattr(adclr.train, "train_step", interrupt_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    path, err = os.path.join(cfg.out, "checkpoint.pt"), capsys.readouterr().err
    if where == "between steps":
        assert load_checkpoint(path)["step"] == 3
        assert f"interrupted: saved step 3 to {path}; rerun the same command to resume" in err
    else:
        assert not os.path.exists(path)
        assert err.rstrip().endswith("interrupted inside step 4: stopped at once, nothing more saved; no "
                                     "checkpoint was written")


def train_until_interrupted(cfg):
    """train(cfg), which must end in KeyboardInterrupt, under Python's own SIGINT handler, as
    in a terminal (a suite started in the background by a shell without job control, as
    CI's, inherits SIGINT ignored, which the run leaves as it is). Returns the handler the
    run left in place."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
        return signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("presses,apart,checkpoint_every", [(1, 0, 5), (1, 0, 4), (2, 1.1, 5), (2, 0, 5)])
def test_ctrl_c_inside_a_step_finishes_it_then_saves_a_second_stops_at_once(presses, apart, checkpoint_every,
                                                                            tiny_config, monkeypatch, capsys):
    """A real SIGINT during step 4 (not the data wait): one lets it finish, then saves step 4
    (or says it is saved, when step 4 writes a checkpoint anyway) and stops; a second one a
    second later stops inside it, saving nothing; one that comes with the first (torchrun
    passes the terminal's Ctrl-C on) counts as the first. The handler is put back."""
    import time

    cfg = tiny_config(max_steps=6, checkpoint_every=checkpoint_every)
    real_step = adclr.train.train_step

    def ctrl_c_in_step_4(trainer, batch, step):
        if step == 3:
            for press in range(presses):
                time.sleep(apart if press else 0)
                os.kill(os.getpid(), signal.SIGINT)
        return real_step(trainer, batch, step)

    monkeypatch.setattr(adclr.train, "train_step", ctrl_c_in_step_4)
    assert train_until_interrupted(cfg) is signal.default_int_handler  # put back
    path, err = os.path.join(cfg.out, "checkpoint.pt"), capsys.readouterr().err
    assert "interrupt: finishing step 4, then saving it; Ctrl-C again to stop at once" in err
    records = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))]
    if presses == 2 and apart:
        assert not os.path.exists(path) and "interrupted:" not in err and records[-1]["step"] == 3
        assert "interrupted inside step 4: stopped at once, nothing more saved; no checkpoint was written" in err
    else:
        assert load_checkpoint(path)["step"] == 4 and records[-1]["step"] == 4
        said = "saved step 4 to {}" if checkpoint_every == 5 else "step 4 is saved in {}"
        assert f"interrupted: {said.format(path)}; rerun the same command to resume" in err


def test_a_ctrl_c_swallowed_between_steps_still_stops_the_run(tiny_config, monkeypatch, capsys):
    """Ctrl-C between steps whose KeyboardInterrupt is swallowed (Python ignores one raised
    in a __del__ running as the signal lands; here step 2's log call swallows it): the run
    stops at the end of that step, saved, and does not go on to its end deaf to further
    signals."""
    cfg = tiny_config(max_steps=6, checkpoint_every=5)
    real_log = adclr.train.Logger.log

    def log_then_swallow_a_ctrl_c(self, record, total_steps):
        real_log(self, record, total_steps)
        if record["step"] == 2:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)  # the handler runs here
            except KeyboardInterrupt:
                pass

    monkeypatch.setattr(adclr.train.Logger, "log", log_then_swallow_a_ctrl_c)
    train_until_interrupted(cfg)
    path = os.path.join(cfg.out, "checkpoint.pt")
    assert load_checkpoint(path)["step"] == 2
    assert f"interrupted: saved step 2 to {path}; rerun the same command to resume" in capsys.readouterr().err


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_a_checkpoint_write_lets_it_finish_then_stops(presses, tiny_config, monkeypatch, capsys):
    """A real SIGINT while step 4's checkpoint is written (inside torch.save it would end as
    the zip writer's error, the checkpoint lost): the write finishes, then the run stops."""
    cfg = tiny_config(max_steps=6, checkpoint_every=4)
    real_save = adclr.train.save_checkpoint

    def ctrl_c_then_save(*args, **kwargs):
        for _ in range(presses):
            os.kill(os.getpid(), signal.SIGINT)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(adclr.train, "save_checkpoint", ctrl_c_then_save)
    train_until_interrupted(cfg)
    path, err = os.path.join(cfg.out, "checkpoint.pt"), capsys.readouterr().err
    assert load_checkpoint(path)["step"] == 4
    assert err.count("interrupt: writing the checkpoint of step 4 first, then stopping") == 1
    assert f"interrupted: step 4 is saved in {path}; rerun the same command to resume" in err


SIGTERM_IN_STEP_4 = """
import os, signal, sys
import adclr.train
from adclr.cli import main
real_step = adclr.train.train_step
def sigterm_in_step_4(trainer, batch, step):
    if step == 3:
        for _ in range(int(sys.argv[1])):
            os.kill(os.getpid(), signal.SIGTERM)
    return real_step(trainer, batch, step)
adclr.train.train_step = sigterm_in_step_4
main(sys.argv[2:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("signals", [1, 2])
def test_sigterm_inside_a_step_finishes_it_then_saves(signals, tmp_path):
    """SIGTERM (a scheduler's or container's stop) as Ctrl-C: the step finishes, is saved,
    and the run exits 143 (128 + SIGTERM) with its line. A second one does the same (SLURM
    signals every process of a job, and torchrun passes its own on: two arrive together).
    It used to end the process there, losing every step since the last checkpoint."""
    import subprocess
    import sys

    out = str(tmp_path / "run")
    argv = ["train", *TINY, "--out", out, "--max-steps", "6", "--checkpoint-every", "5"]
    proc = subprocess.run([sys.executable, "-c", SIGTERM_IN_STEP_4, str(signals), *argv],
                          capture_output=True, text=True, timeout=300)
    path = os.path.join(out, "checkpoint.pt")
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in proc.stderr, proc.stderr
    assert "SIGTERM: finishing step 4, then saving it\n" in proc.stderr
    assert load_checkpoint(path)["step"] == 4
    assert f"terminated: saved step 4 to {path}; rerun the same command to resume" in proc.stderr


SIGINT_IN_STEP_4_THEN_SIGTERM = """
import os, signal, sys
import adclr.train
from adclr.cli import main
real_step, real_save = adclr.train.train_step, adclr.train.Run.save_interrupted
def sigint_in_step_4(trainer, batch, step):
    if step == 3:
        os.kill(os.getpid(), signal.SIGINT)
    return real_step(trainer, batch, step)
def sigterm_before_the_save(run):
    os.kill(os.getpid(), signal.SIGTERM)
    return real_save(run)
adclr.train.train_step = sigint_in_step_4
adclr.train.Run.save_interrupted = sigterm_before_the_save
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_sigterm_between_a_stop_and_its_save_lets_it_save_and_exits_143(tmp_path):
    """Ctrl-C in step 4, then SIGTERM after the step ends, before its save starts (a
    scheduler's stop after a user's): the save is made and the run exits 143, as for
    SIGTERM alone. It used to skip the save and exit 130."""
    import subprocess
    import sys

    out = str(tmp_path / "run")
    argv = ["train", *TINY, "--out", out, "--max-steps", "6", "--checkpoint-every", "5"]
    proc = subprocess.run([sys.executable, "-c", SIGINT_IN_STEP_4_THEN_SIGTERM, *argv],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in proc.stderr, proc.stderr
    path = os.path.join(out, "checkpoint.pt")
    assert load_checkpoint(path)["step"] == 4
    assert f"terminated: saved step 4 to {path}; rerun the same command to resume" in proc.stderr


def test_a_full_disk_at_the_save_on_ctrl_c_says_what_is_kept(tiny_config, monkeypatch):
    """The save on an interrupt names what a rerun resumes from, as the scheduled saves do."""
    from adclr.checkpoint import WriteError

    cfg = tiny_config(max_steps=6, checkpoint_every=3)  # saved at 3; step 4's save is the interrupt's
    real_step, real_save = adclr.train.train_step, adclr.train.save_checkpoint

    def ctrl_c_in_step_4(trainer, batch, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(trainer, batch, step)

    def full_after_step_3(trainer, path, step, *args):
        if step > 3:
            raise WriteError(f"cannot write {path}: no space left on device")
        return real_save(trainer, path, step, *args)

    monkeypatch.setattr(adclr.train, "train_step", ctrl_c_in_step_4)
    monkeypatch.setattr(adclr.train, "save_checkpoint", full_after_step_3)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        path = os.path.join(cfg.out, "checkpoint.pt")
        with pytest.raises(WriteError, match=f"no space left on device; {path} still holds step 3; make room"):
            train(cfg)
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("before", ["default", "a caller's handler"])
def test_sigterm_handler_is_the_runs_only_while_it_steps(before, tiny_config, monkeypatch):
    """The run takes SIGTERM while it steps and puts the default back after; a handler
    the caller installed is left in place throughout."""
    def callers_handler(signum, frame):
        pass

    previous = signal.SIG_DFL if before == "default" else callers_handler
    seen = []
    real_step = adclr.train.train_step

    def step(trainer, batch, index):
        seen.append(signal.getsignal(signal.SIGTERM))
        return real_step(trainer, batch, index)

    monkeypatch.setattr(adclr.train, "train_step", step)
    saved = signal.signal(signal.SIGTERM, previous)
    try:
        train(tiny_config(max_steps=2))
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, saved)
    if before == "default":
        assert all(callable(h) and h is not callers_handler for h in seen) and len(seen) == 2
    else:
        assert seen == [callers_handler, callers_handler]


@pytest.mark.slow
def test_sigterm_to_the_whole_job_saves_and_leaves_no_worker(tmp_path):
    """SLURM's stop reaches every process of the job, the loader's workers too: one it
    killed made the loader raise inside the main process's save (a traceback, no
    checkpoint). Workers now end quietly on it, and the run saves."""
    import subprocess
    import sys
    import time

    out = str(tmp_path / "run")
    argv = [sys.executable, "-m", "adclr.cli", "train", *TINY, "--out", out, "--max-steps", "500",
            "--num-workers", "1", "--checkpoint-every", "1000"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stderr:
        if line.startswith("step 3/"):
            os.killpg(proc.pid, signal.SIGTERM)
            break
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "terminated: saved step" in err
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] >= 3
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the worker notices within its watchdog's interval
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("a loader worker outlived the run")


class FailingBatches:
    """The run's loader, whose fourth batch fails: the loader raises (a worker's error), or
    a sample of it has no readable file."""

    def __init__(self, loader, how):
        self.batches, self.served, self.how = iter(loader), 0, how

    def __next__(self):
        self.served += 1
        batch = next(self.batches)
        if self.served == 4 and self.how == "the loader raises":
            raise RuntimeError("Caught OSError in DataLoader worker process 0")
        if self.served == 4:
            batch["readable"][1] = False
        return batch


@pytest.mark.parametrize("how", ["the loader raises", "no readable file for a sample"])
def test_a_batch_that_cannot_be_had_saves_the_steps_done_then_raises(how, tiny_config, tmp_path, monkeypatch,
                                                                    capsys):
    """Its error used to end the run where it was raised: every step since the last
    checkpoint (500 by default) was lost. The steps done are saved, the error is raised as
    it was, and the same command resumes."""
    cfg = tiny_config(max_steps=6, epochs=6, checkpoint_every=5, data=image_folder(tmp_path / "data"))
    monkeypatch.setattr(adclr.train, "iter", lambda loader: FailingBatches(loader, how), raising=False)
    expected = (RuntimeError, "worker process 0") if how == "the loader raises" else (SystemExit, "cannot be read")
    with pytest.raises(expected[0], match=expected[1]):
        train(cfg)
    path = os.path.join(cfg.out, "checkpoint.pt")
    assert load_checkpoint(path)["step"] == 3
    assert f"data error: saved step 3 to {path}; rerun the same command to resume" in capsys.readouterr().err
    monkeypatch.undo()
    assert train(cfg) == 6
    assert [r["step"] for r in read_metrics(cfg.out)] == [1, 2, 3, 4, 5, 6]


def test_a_data_error_before_the_first_step_is_the_error_alone(tiny_config, monkeypatch, capsys):
    """Nothing to save: no line about saving stands before the error."""
    cfg = tiny_config(max_steps=6)

    def failing(loader):
        raise RuntimeError("no batch")

    monkeypatch.setattr(adclr.train, "iter", lambda loader: type("Loader", (), {"__next__": failing})(),
                        raising=False)
    with pytest.raises(RuntimeError, match="no batch"):
        train(cfg)
    assert not os.path.exists(os.path.join(cfg.out, "checkpoint.pt"))
    assert "data error" not in capsys.readouterr().err


# `adclr train` whose fourth step says so on stderr, then takes a second: time for the
# test to kill a loader worker inside it.
SLOW_FOURTH_STEP = """
import sys, time
import adclr.train
from adclr.cli import main

real_step = adclr.train.train_step

def step(trainer, batch, step):
    if step == 3:
        print("inside step 4", file=sys.stderr, flush=True)
        time.sleep(1.0)
    return real_step(trainer, batch, step)

adclr.train.train_step = step
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_loader_worker_killed_inside_a_step_stops_the_run_after_it_with_a_save(tmp_path):
    """The kernel's OOM killer ends a loader worker mostly while the process is inside a step:
    torch's SIGCHLD handler raised its error there, mid-step, and nothing was saved. The
    step now finishes; the loader's next call finds the dead worker and the run saves."""
    import subprocess
    import sys

    out = str(tmp_path / "run")
    argv = [sys.executable, "-c", SLOW_FOURTH_STEP, "train", *TINY, "--out", out, "--max-steps", "50",
            "--num-workers", "1", "--checkpoint-every", "1000"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("inside step 4"):
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                [worker] = f.read().split()
            os.kill(int(worker), signal.SIGKILL)
            break
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1, err
    assert err.splitlines()[-1].startswith(f"RuntimeError: DataLoader worker (pid(s) {worker}) exited unexpectedly")
    step = load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"]
    assert step >= 4 and f"data error: saved step {step} to " in err


def test_an_ignored_ctrl_c_stays_ignored(tiny_config, monkeypatch, capsys):
    """A run whose SIGINT is ignored (a background job without job control) runs on."""
    cfg = tiny_config(max_steps=6, checkpoint_every=5)
    real_step = adclr.train.train_step

    def ctrl_c_in_step_4(trainer, batch, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(trainer, batch, step)

    monkeypatch.setattr(adclr.train, "train_step", ctrl_c_in_step_4)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        train(cfg)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert load_checkpoint(os.path.join(cfg.out, "checkpoint.pt"))["step"] == 6
    assert "interrupt" not in capsys.readouterr().err


def test_schedules(tiny_config):
    cfg = tiny_config(epochs=10, max_steps=0, warmup_epochs=2, warmup_teacher_temp_epochs=5,
                      batch_size=512)
    trainer = adclr.train.build(cfg, "cpu", steps_per_epoch=10)
    assert trainer.total_steps == 100
    s = [trainer.schedule(i) for i in range(101)]
    peak = 5e-4 * 512 / 256
    assert s[0]["lr"] == 0 and s[20]["lr"] == pytest.approx(peak) and s[10]["lr"] == pytest.approx(peak / 2)
    assert s[100]["lr"] == pytest.approx(1e-6)
    assert s[0]["weight_decay"] == pytest.approx(0.04) and s[100]["weight_decay"] == pytest.approx(0.4)
    assert s[0]["momentum"] == pytest.approx(0.996) and s[100]["momentum"] == pytest.approx(1.0)
    assert s[0]["teacher_temp"] == pytest.approx(0.04) and s[50]["teacher_temp"] == pytest.approx(0.07)
    assert all(a["lr"] >= b["lr"] for a, b in zip(s[20:], s[21:]))  # cosine decay after warm-up


def test_epochs_to_steps_rounds():
    # 0.29 * 100 is 28.999999999999996 in floats: truncated, the warm-up would lose a step.
    assert adclr.train.epochs_to_steps(0.29, 100) == 29
    assert adclr.train.epochs_to_steps(0.5, 3) == 2 and adclr.train.epochs_to_steps(0.01, 10) == 0


def test_weight_decay_spares_biases_and_norms_and_follows_its_schedule(tiny_config):
    """DINO's get_params_groups: no weight decay on biases and 1-D (norm) parameters; the
    step writes the scheduled decay into the other group only."""
    from adclr.data import synthetic_batch

    cfg = tiny_config()
    trainer = adclr.train.build(cfg, "cpu")
    decay, no_decay = trainer.optimizer.param_groups
    names = {p: name for name, p in trainer.student_module.named_parameters()}
    undecayed = {names[p] for p in no_decay["params"]}
    assert {"backbone.norm.weight", "backbone.blocks.0.norm1.weight", "backbone.blocks.1.norm2.bias"} <= undecayed
    assert undecayed == {name for name in names.values() if name.endswith(".bias") or ".norm" in name}
    assert len(decay["params"]) + len(undecayed) == len(names)  # cls_token and pos_embed decayed, as DINO's
    batch = synthetic_batch(cfg, 4, "cpu")
    for step in range(3):
        adclr.train.train_step(trainer, batch, step)
        assert decay["weight_decay"] == trainer.schedule(step)["weight_decay"]
        assert no_decay["weight_decay"] == 0.0
    assert decay["weight_decay"] > 0.2  # the schedule has moved on from 0.04


def test_the_teacher_is_the_students_ema_at_the_scheduled_momentum(tiny_config):
    from adclr.data import synthetic_batch

    cfg = tiny_config(momentum_teacher=0.6, base_lr=1.0, warmup_epochs=0)  # steps that move the student far
    trainer = adclr.train.build(cfg, "cpu")
    batch = synthetic_batch(cfg, 4, "cpu")
    for step in range(3):  # from step 1 on the teacher is no longer the student, and m rises from 0.6
        before = [p.detach().clone() for p in trainer.teacher_params]
        adclr.train.train_step(trainer, batch, step)
        m = trainer.schedule(step)["momentum"]
        for old, teacher, student in zip(before, trainer.teacher_params, trainer.student_params):
            torch.testing.assert_close(teacher, m * old + (1 - m) * student.detach())


def test_both_global_views_get_their_own_images_query_crops(tiny_config):
    """Row j of the global views is image j % B of view j // B; its query crops must be image j % B's."""
    from adclr.data import synthetic_batch

    cfg = tiny_config()
    batch = synthetic_batch(cfg, 4, "cpu")
    globals_, queries, local = adclr.train._inputs(adclr.train.build(cfg, "cpu"), batch)
    assert globals_ is batch["globals"] and local is batch["locals"]
    assert torch.equal(queries, torch.cat([batch["queries"], batch["queries"]]))
    plain = adclr.train._inputs(adclr.train.build(tiny_config(lambda_query=0.0), "cpu"), batch)
    assert plain[1] is None  # lambda 0: DINO, no query tokens


def test_endless_warm_ups_are_warm_ups_not_overflows(tiny_config):
    """--warmup-epochs 1e308 (or the teacher's) times the steps per epoch is beyond a float:
    round() raised OverflowError. The schedule stays at its start, as a very long warm-up does."""
    cfg = tiny_config(epochs=10, max_steps=0, warmup_epochs=1e308, warmup_teacher_temp_epochs=1e308)
    trainer = adclr.train.build(cfg, "cpu", steps_per_epoch=10)
    for step in (0, 50, 100):
        s = trainer.schedule(step)
        assert s["lr"] == pytest.approx(5e-4 * 8 / 256 * step / 100)  # warm-up capped at the run's length
        assert s["teacher_temp"] == pytest.approx(0.04)


@pytest.mark.parametrize("method, heads", [("adclr", ["head"]), ("densecl", ["head", "dense_head"])],
                         ids=["adclr", "densecl"])
def test_last_layer_is_frozen_in_the_first_epoch(tiny_config, method, heads):
    from adclr.data import synthetic_batch

    cfg = tiny_config(freeze_last_layer_epochs=1, method=method)
    trainer = adclr.train.build(cfg, "cpu", steps_per_epoch=2)
    batch = synthetic_batch(cfg, 4, "cpu")
    last = [getattr(trainer.student_module, head).last_layer.weight for head in heads]
    first_mlp = trainer.student_module.head.mlp[0].weight
    w0, m0 = [w.detach().clone() for w in last], first_mlp.detach().clone()
    adclr.train.train_step(trainer, batch, 0)
    adclr.train.train_step(trainer, batch, 1)
    assert all(torch.equal(w, w_0) for w, w_0 in zip(last, w0)) and not torch.equal(first_mlp, m0)
    adclr.train.train_step(trainer, batch, 2)
    assert not any(torch.equal(w, w_0) for w, w_0 in zip(last, w0))


def test_warm_up_longer_than_the_run_is_reported(tiny_config, capsys):
    from adclr.train import train

    # 1250 steps per epoch: 0.01 epochs of warm-up is 12 steps, 5 epochs of freeze 6250.
    train(tiny_config(max_steps=16, checkpoint_every=16, freeze_last_layer_epochs=5.0))
    err = capsys.readouterr().err
    assert "warning: --freeze-last-layer-epochs 5.0" in err and "covers the whole 16-step run" in err
    assert "torch.compile off" in err.splitlines()[0]  # the default on CPU, reported at the start
    assert "--warmup-epochs" not in err


def test_trained_last_layer_gain_is_decayed_frozen_and_followed_by_the_teacher(tiny_config):
    from adclr.data import synthetic_batch

    cfg = tiny_config(norm_last_layer=False, freeze_last_layer_epochs=1, momentum_teacher=0.5, epochs=10, max_steps=0)
    trainer = adclr.train.build(cfg, "cpu", steps_per_epoch=2)
    gain = trainer.student_module.head.last_layer.gain
    assert gain.shape == (cfg.out_dim, 1) and torch.equal(gain, torch.ones_like(gain))
    decay, no_decay = trainer.optimizer.param_groups
    assert any(p is gain for p in decay["params"])  # 2-D, like DINO's weight_g: weight-decayed
    assert "head.last_layer.gain" in trainer.teacher.state_dict()
    batch = synthetic_batch(cfg, 4, "cpu")
    for step in range(2):  # the first epoch: frozen with the layer's weight
        adclr.train.train_step(trainer, batch, step)
        assert torch.equal(gain, torch.ones_like(gain))
    adclr.train.train_step(trainer, batch, 2)
    assert not torch.equal(gain, torch.ones_like(gain))
    teacher_gain = trainer.teacher.head.last_layer.gain
    assert not torch.equal(teacher_gain, torch.ones_like(teacher_gain))  # the EMA moves it too
    # The default (DINO's norm_last_layer=True) has no gain parameter at all.
    fixed = adclr.train.build(tiny_config(), "cpu").student_module.head.last_layer
    assert fixed.gain is None and "head.last_layer.gain" not in adclr.train.build(tiny_config(), "cpu").teacher.state_dict()


def _gradients_seen_by_the_optimizer(trainer, batch, step):
    """(name -> gradient the optimizer steps with, or None; the step's metrics)."""
    seen = {}

    def record(optimizer, args, kwargs):
        seen.update({name: None if p.grad is None else p.grad.clone()
                     for name, p in trainer.student_module.named_parameters()})

    trainer.optimizer.register_step_pre_hook(record)
    return seen, adclr.train.train_step(trainer, batch, step)


def test_each_gradient_is_clipped_on_its_own_after_the_freeze(tiny_config):
    """DINO's clip_gradients: a parameter's gradient is scaled only if its own norm exceeds
    clip_grad; a global-norm clip would scale every gradient by the same factor."""
    from adclr.data import synthetic_batch

    cfg = tiny_config(drop_path=0.0, freeze_last_layer_epochs=1)  # deterministic forward; step 0 frozen
    batch = synthetic_batch(cfg, 4, "cpu", generator=torch.Generator().manual_seed(0))
    build = lambda clip: adclr.train.build(dataclasses.replace(cfg, clip_grad=clip), "cpu", steps_per_epoch=2)  # noqa: E731
    raw, raw_metrics = _gradients_seen_by_the_optimizer(build(0.0), batch, 0)
    norms = {name: g.norm() for name, g in raw.items() if g is not None}
    clip = torch.stack(list(norms.values())).median().item()  # half the parameters above, half below
    clipped, metrics = _gradients_seen_by_the_optimizer(build(clip), batch, 0)

    # The frozen last layer's gradient is dropped before clipping and never reaches AdamW.
    assert raw["head.last_layer.weight"] is None and clipped["head.last_layer.weight"] is None
    assert sum(n > clip for n in norms.values()) >= 3 and sum(n < clip for n in norms.values()) >= 3
    for name, norm in norms.items():
        expected = raw[name] * min(1.0, clip / (norm.item() + 1e-6))
        torch.testing.assert_close(clipped[name], expected, rtol=1e-5, atol=1e-7, msg=name)
    # The logged norm is the global norm of those gradients (frozen layer excluded), before clipping.
    total = torch.stack(list(norms.values())).norm()
    assert metrics["grad_norm"].item() == pytest.approx(total.item(), rel=1e-5)
    assert raw_metrics["grad_norm"].item() == pytest.approx(total.item(), rel=1e-5)


@pytest.mark.parametrize("precision, dtype", [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_precision(tiny_config, precision, dtype):
    # A small head: fp16 matmuls are emulated on CPU, slowly.
    cfg = tiny_config(precision=precision, max_steps=3, checkpoint_every=2, head_hidden_dim=64, head_bottleneck_dim=32)
    trainer = adclr.train.build(cfg, "cpu")
    if dtype is None:
        assert not isinstance(trainer.autocast, torch.autocast) and trainer.scaler is None
    else:
        assert trainer.autocast.fast_dtype == dtype
        assert (trainer.scaler is not None) == (precision == "fp16")  # fp16 needs loss scaling
    assert train(cfg) == 3
    records = read_metrics(cfg.out)
    assert all(math.isfinite(r["loss"]) for r in records)
    checkpoint = load_checkpoint(os.path.join(cfg.out, "checkpoint.pt"))
    assert ("scaler" in checkpoint) == (precision == "fp16")
    assert ("loss_scale" in records[-1]) == (precision == "fp16")
    # Resumes: the fp16 scaler's state passes the checkpoint checks and is restored.
    assert train(dataclasses.replace(cfg, max_steps=4)) == 4
    with pytest.raises(ValueError, match="--precision: invalid choice: 'fp8'"):
        adclr.train.build(tiny_config(precision="fp8"), "cpu")


def test_fp16_clips_and_logs_the_unscaled_gradients(tiny_config):
    """The gradient scaler's factor is taken out before clipping: an fp16 step's gradient
    norm is the fp32 step's, not the scale times it."""
    from adclr.data import synthetic_batch

    cfg = tiny_config(drop_path=0.0, head_hidden_dim=64, head_bottleneck_dim=32)  # a deterministic step
    batch = synthetic_batch(cfg, 4, "cpu", generator=torch.Generator().manual_seed(0))
    norms = {}
    for precision in ("fp32", "fp16"):
        trainer = adclr.train.build(dataclasses.replace(cfg, precision=precision), "cpu")
        if trainer.scaler:  # a scale the fp16 gradients hold without overflow: the step is not skipped
            trainer.scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
        norms[precision] = adclr.train.train_step(trainer, batch, 0)["grad_norm"].item()
    assert trainer.scaler.get_scale() == 16.0  # no inf: the scale stayed
    assert norms["fp16"] == pytest.approx(norms["fp32"], rel=0.03)


def test_numbered_snapshots_and_config_json(tiny_config, tmp_path, monkeypatch):
    from PIL import Image

    for i in range(16):  # 16 images, batch 8: 2 steps per epoch
        (tmp_path / "images").mkdir(exist_ok=True)
        Image.new("RGB", (40, 40), (i * 15, 100, 200 - i * 10)).save(tmp_path / "images" / f"{i}.png")
    cfg = tiny_config(data=str(tmp_path / "images"), epochs=5, max_steps=0, saveckp_freq=2, checkpoint_every=3,
                      head_hidden_dim=64, head_bottleneck_dim=32)
    config_path = os.path.join(cfg.out, "config.json")
    real_step = adclr.train.train_step

    def step_after_config_is_written(trainer, batch, step):
        assert os.path.exists(config_path)  # written at the start, not at the end
        return real_step(trainer, batch, step)

    monkeypatch.setattr(adclr.train, "train_step", step_after_config_is_written)
    assert train(cfg) == 10
    with open(config_path) as f:
        assert json.load(f) == json.loads(json.dumps(dataclasses.asdict(cfg)))
    snapshots = sorted(f for f in os.listdir(cfg.out) if f.startswith("checkpoint0"))
    assert snapshots == ["checkpoint0002.pt", "checkpoint0004.pt"]  # every 2 epochs, named by epochs done
    assert [load_checkpoint(os.path.join(cfg.out, f))["step"] for f in snapshots] == [4, 8]
    assert load_checkpoint(os.path.join(cfg.out, "checkpoint.pt"))["step"] == 10  # the rolling one goes on


def test_resume_drops_the_records_logged_after_the_checkpoint(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    argv = ["train", *TINY, "--out", out, "--max-steps", "4", "--checkpoint-every", "2"]
    crash_in_step(monkeypatch, 3, lambda: main(argv))
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "lo')  # a record cut short by a kill
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f.readlines()[:3]] == [1, 2, 3]  # 3: past the checkpoint
    assert run(argv, capsys)[0] == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


def test_unreadable_image_warned_once_and_counted(tmp_path, capsys):
    data = image_folder(tmp_path / "data", per_class=2, unreadable=("a/1.png",))
    out = str(tmp_path / "run")
    # 4 images, batch 2: 2 steps an epoch, the bad file met once or twice an epoch for 3 epochs.
    status, err = run(["train", *TINY, "--data", data, "--batch-size", "2", "--max-steps", "6",
                       "--out", out, "--num-local-crops", "0"], capsys)
    assert status == 0
    bad = os.path.join(data, "a", "1.png")
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipping")]
    assert warnings == [f"warning: skipping unreadable image {bad}: cannot identify image file {bad!r}"]
    counts = [r["skipped_images"] for r in read_metrics(out)]
    assert counts == sorted(counts) and counts[-1] >= 3
    assert f"| {counts[-1]} unreadable files passed over" in err.splitlines()[-2]
    assert "adclr train: 1 process(es) on cpu, 4 image files in 2 folders, 2 steps/epoch" in err


def test_a_resume_says_when_the_data_holds_another_number_of_images(tmp_path, capsys):
    """The data order is a permutation of the image count: another count, another order."""
    data = image_folder(tmp_path / "data", per_class=2)
    argv = ["train", *TINY, "--data", data, "--batch-size", "2", "--out", str(tmp_path / "run"),
            "--num-local-crops", "0"]
    assert run([*argv, "--max-steps", "2"], capsys)[0] == 0
    image_folder(tmp_path / "data", per_class=3)  # one more image in each class
    status, err = run([*argv, "--max-steps", "4"], capsys)
    assert status == 0 and "warning: --data holds 6 image files, 4 when" in err
    assert "from step 2 the images come in another order" in err


def test_unreadable_images_counted_across_a_resume(tmp_path, monkeypatch, capsys):
    """The count in metrics.jsonl is the run's since its start: a resumed run counts on
    from its checkpoint, as the uninterrupted run does (it began again from 0)."""
    data = image_folder(tmp_path / "data", per_class=2, unreadable=("a/1.png",))
    runs = {}
    for name in ("whole", "resumed"):
        out = str(tmp_path / name)
        argv = ["train", *TINY, "--data", data, "--batch-size", "2", "--max-steps", "6", "--out", out,
                "--num-local-crops", "0", "--checkpoint-every", "2"]
        if name == "resumed":
            crash_in_step(monkeypatch, 4, lambda: main(argv))
        assert run(argv, capsys)[0] == 0
        runs[name] = [(r["step"], r["skipped_images"]) for r in read_metrics(out)]
    assert runs["resumed"] == runs["whole"] and runs["whole"][-1][1] >= 3


@pytest.mark.parametrize("name", ["checkpoint.pt.4242.tmp", "checkpoint0004.pt.4242.tmp",  # rolling, numbered
                                  "checkpoint.pt.tmp"])  # the name older versions wrote
def test_stale_tmp_checkpoint_is_removed_at_start(name, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / name
    stale.write_bytes(b"half a checkpoint")
    monkeypatch.setattr(adclr.train, "train_step", lambda *args: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError, match="crash"):  # no checkpoint written over it in this run
        main(["train", *TINY, "--out", str(out)])
    assert not stale.exists()
    assert f"removed {stale}, left by a run stopped while writing a checkpoint" in capsys.readouterr().err


def test_compile_auto_is_off_on_cpu_and_checked(tiny_config):
    """--compile auto compiles on CUDA only; a config.json or checkpoint with another value
    is refused like a bad flag."""
    assert not adclr.train.build(tiny_config(compile="auto"), "cpu").compiled
    assert adclr.config.config_errors(tiny_config(compile="yes")) == [
        "--compile: invalid choice: 'yes' (choose from auto, on, off, step, graph)"]
    with pytest.raises(ValueError, match=r"--compile: invalid choice: 'yes'"):
        adclr.train.build(tiny_config(compile="yes"), "cpu")


@pytest.fixture
def compile_counter(monkeypatch):
    """torch.compile in the trainer with aot_eager (the same tracing as inductor, no C++
    build on CPU), counting compiles; Dynamo's caches emptied before and after, as each
    test's trainer is a new object that its guards would otherwise meet as a recompile."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(adclr.train, "COMPILE_BACKEND", counter)
    yield counter
    torch._dynamo.reset()


@pytest.mark.slow  # ~2 min on 2 cores: Triton-interpreter steps, and the compiles
@pytest.mark.parametrize("compile", ["on", "step"])
def test_compiled_step_has_no_graph_break_and_equals_eager(tiny_config, compile_counter, compile):
    """--compile on (student and teacher) and step (the whole step) with fullgraph=True,
    so any graph break (around the op's custom op, or anywhere in a step) is an error;
    the step equals the eager one. The CUDA defaults (Triton, packed crops, fused head
    loss) on the tiny model."""
    from adclr.data import synthetic_batch

    results = []
    for mode in ("off", compile):
        cfg = tiny_config(compile=mode, pack_crops="on", fused_head_loss="on", attention="triton", drop_path=0.0,
                          head_hidden_dim=64, head_bottleneck_dim=32)
        trainer = adclr.train.build(cfg, "cpu")
        assert trainer.compiled == (mode != "off") and trainer.compile == mode
        batch = synthetic_batch(cfg, 2, "cpu", generator=torch.Generator().manual_seed(0))
        metrics = [adclr.train.train_step(trainer, batch, step) for step in range(2)]
        results.append((metrics, trainer.student_module.state_dict()))
    (eager, eager_state), (compiled, compiled_state) = results
    assert compile_counter.frame_count >= 1
    for e, c in zip(eager, compiled):
        for key in e:
            torch.testing.assert_close(c[key], e[key], rtol=1e-5, atol=1e-6, msg=key)
    assert list(compiled_state) == list(eager_state)  # compiled in place: checkpoints keep their names
    for name in eager_state:
        if not name.endswith("qkv.bias"):  # its key part has no gradient but noise, which AdamW amplifies
            torch.testing.assert_close(compiled_state[name], eager_state[name], rtol=1e-4, atol=1e-5, msg=name)


def _changing_schedules(tiny_config, **overrides):
    """A config whose four schedules change at every step of a short run, with the last
    layer frozen for the first two steps (1 step an epoch)."""
    return tiny_config(epochs=10, max_steps=0, warmup_epochs=3, warmup_teacher_temp_epochs=4,
                       freeze_last_layer_epochs=2, drop_path=0.0, head_hidden_dim=64, head_bottleneck_dim=32,
                       **overrides)


@pytest.mark.slow
def test_whole_step_compiles_once_per_freeze_state_and_equals_eager(tiny_config, compile_counter):
    """--compile step: one graph for the whole step, compiled at the first step and again
    only where the last-layer freeze ends, while lr, weight decay, momentum and the
    teacher temperature change every step; its losses are those of the same step run
    eagerly and of the eager train_step, to float32 rounding."""
    from adclr.data import synthetic_batch

    cfg = _changing_schedules(tiny_config, compile="step")
    trainer = adclr.train.build(cfg, "cpu", steps_per_epoch=1)
    schedules = [trainer.schedule(step) for step in range(5)]
    assert all(a[k] != b[k] for a, b in zip(schedules, schedules[1:4]) for k in a)
    batch = synthetic_batch(cfg, 4, "cpu", generator=torch.Generator().manual_seed(0))
    last = trainer.student_module.head.last_layer.weight
    before = last.detach().clone()
    compiled, compiles = [], []
    for step in range(5):
        compiled.append(adclr.train.train_step(trainer, batch, step))
        compiles.append(compile_counter.frame_count)
        assert torch.equal(last, before) == (step < 2)  # frozen, then trained
    assert compiles[0] == compiles[1] and compiles[2] > compiles[1] and compiles[2:] == [compiles[2]] * 3
    assert not torch._dynamo.utils.counters["graph_break"]

    uncompiled = adclr.train.build(cfg, "cpu", steps_per_epoch=1)
    uncompiled.whole_step.compiled = uncompiled.whole_step.step  # the same step, not compiled
    eager = adclr.train.build(dataclasses.replace(cfg, compile="off"), "cpu", steps_per_epoch=1)
    for step, c in enumerate(compiled):
        same_step = adclr.train.train_step(uncompiled, batch, step)
        classic = adclr.train.train_step(eager, batch, step)
        for key in c:
            torch.testing.assert_close(c[key], same_step[key], rtol=1e-6, atol=0, msg=key)
            torch.testing.assert_close(c[key], classic[key], rtol=1e-5, atol=0, msg=key)
    assert compile_counter.frame_count == compiles[-1]  # the eager runs compiled nothing
    # The checkpoint's optimizer state: the eager step's (the frozen layer's 2 steps fewer).
    state = trainer.optimizer.state_dict()["state"]
    steps = sorted({float(s["step"]) for s in state.values()})
    assert steps == [3.0, 5.0] and state.keys() == eager.optimizer.state_dict()["state"].keys()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's GPU code and CUDA graphs need CUDA")
@pytest.mark.parametrize("compile", ["step", "graph"])
def test_whole_step_on_cuda(tiny_config, compile):
    """On a GPU, with inductor and the CUDA defaults (Triton, packed crops, fused head
    loss, bf16): the whole step compiles once per freeze state, --compile graph replays
    it as a CUDA graph (inductor skips none), and its losses are the eager step's within
    bf16 rounding."""
    from adclr.data import synthetic_batch

    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    counters.clear()
    cfg = _changing_schedules(tiny_config, compile=compile, device="cuda", pack_crops="on",
                              fused_head_loss="on", attention="triton", precision="bf16")
    trainers = {mode: adclr.train.build(dataclasses.replace(cfg, compile=mode), "cuda", steps_per_epoch=1)
                for mode in ("off", compile)}
    batch = synthetic_batch(cfg, 4, "cuda", generator=torch.Generator().manual_seed(0))
    graphs = []
    for step in range(5):
        eager = adclr.train.train_step(trainers["off"], batch, step)
        compiled = adclr.train.train_step(trainers[compile], batch, step)
        graphs.append(counters["stats"]["unique_graphs"])
        for key in ("loss", "loss_global", "loss_query"):
            torch.testing.assert_close(compiled[key], eager[key], rtol=2e-2, atol=1e-2, msg=f"step {step} {key}")
    assert graphs[0] == graphs[1] and graphs[2] > graphs[1] and graphs[2:] == [graphs[2]] * 3
    assert counters["inductor"]["cudagraph_skips"] == 0
    torch._dynamo.reset()


@pytest.mark.slow  # ~1 min: inductor builds C++ for the update
def test_whole_step_update_compiles_to_fused_kernels_without_fallbacks(tiny_config):
    """Inductor lowers every op of clipping, AdamW and the EMA into its own fused kernels
    but the gradients' norms (one multi-tensor op): a fallback such as _foreach_lerp_
    with tensor weights would run one kernel per parameter on a GPU."""
    import re

    from adclr.data import synthetic_batch
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    cfg = tiny_config(compile="step", arch="vit_test", head_hidden_dim=32, head_bottleneck_dim=16, out_dim=64)
    trainer = adclr.train.build(cfg, "cpu")
    whole = trainer.whole_step
    whole.prepare(synthetic_batch(cfg, 2, "cpu"))
    grads = [torch.randn_like(p) for p in whole.params[False]]
    lr, weight_decay, momentum = (torch.tensor(x, dtype=torch.float64) for x in (1e-3, 0.04, 0.996))

    def update():
        with torch.no_grad():
            return whole.update([g.clone() for g in grads], False, lr, weight_decay, momentum)

    _, code = run_and_get_code(torch.compile(update, fullgraph=True, backend="inductor"))
    called = set(re.findall(r"torch\.ops\.aten\.(\w+)\.\w+\(", "\n".join(code)))
    assert called <= {"_foreach_norm"}, called
    torch._dynamo.reset()


def test_whole_step_refuses_what_it_cannot_run(tiny_config):
    assert adclr.config.config_errors(tiny_config(compile="step", precision="fp16")) == [
        "--compile: --compile step does not take --precision fp16 (its gradient scaler skips steps from the "
        "host); use bf16, which needs no scaler"]
    cpu = torch.device("cpu")
    assert adclr.train.whole_step_error(tiny_config(compile="graph"), cpu, False) == (
        "--compile graph replays a CUDA graph; the device is cpu: use --compile step")
    assert adclr.train.whole_step_error(tiny_config(compile="step"), cpu, True).startswith(
        "--compile step runs a single process")
    for mode in ("off", "on", "auto"):
        assert adclr.train.whole_step_error(tiny_config(compile=mode), cpu, True) is None
    with pytest.raises(ValueError, match="--compile graph replays a CUDA graph"):
        adclr.train.build(tiny_config(compile="graph"), "cpu")


def test_train_step_opens_the_ranges_bench_profile_reads(tiny_config):
    from adclr.data import synthetic_batch
    from bench.profile import RANGES

    cfg = tiny_config(head_hidden_dim=64, head_bottleneck_dim=32)
    trainer = adclr.train.build(cfg, "cpu")
    batch = synthetic_batch(cfg, 2, "cpu")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        adclr.train.train_step(trainer, batch, 0)
    assert set(RANGES) <= {e.name for e in prof.events()}


@pytest.mark.parametrize("peak", [None, "0.5"])
def test_tflops_and_mfu_are_logged(tmp_path, capsys, peak):
    """tflops: the step's FLOPs (adclr.flops) per second of the logged interval; mfu only
    with a peak, which a CPU has only from --peak-tflops."""
    from adclr.flops import step_flops

    out = str(tmp_path / "run")
    status, err = run(["train", *TINY, "--out", out, "--max-steps", "2"] + (["--peak-tflops", peak] if peak else []),
                      capsys)
    assert status == 0
    cfg = adclr.config.Config(**load_checkpoint(os.path.join(out, "checkpoint.pt"))["config"])
    flops = step_flops(cfg)[0]
    for record in read_metrics(out):
        assert record["tflops"] == pytest.approx(flops * record["images/s"] / cfg.batch_size / 1e12, rel=1e-9)
        assert ("mfu" in record) == (peak is not None)
        if peak:
            assert record["mfu"] == pytest.approx(record["tflops"] / float(peak), rel=1e-12)
    last = [line for line in err.splitlines() if line.startswith("step 2/2")][-1]
    assert "TFLOP/s" in last and ("MFU" in last) == (peak is not None)
    assert "note: no known peak" not in err  # a CPU is not expected to have one


@pytest.mark.parametrize("device, name, precision, flag, peak, note", [
    ("cpu", None, "fp32", 0.0, None, None),
    ("cpu", None, "fp32", 2.5, 2.5, None),
    ("cuda", "NVIDIA H200", "bf16", 0.0, 989.4, None),
    ("cuda", "NVIDIA H200", "fp16", 0.0, 989.4, None),
    ("cuda", "NVIDIA H200", "bf16", 700.0, 700.0, None),
    ("cuda", "NVIDIA H200", "fp32", 0.0, None, "fp32 steps"),
    ("cuda", "Tesla T4", "bf16", 0.0, None, "Tesla T4"),
])
def test_mfu_peak(monkeypatch, device, name, precision, flag, peak, note):
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    trainer = SimpleNamespace(cfg=adclr.config.Config(peak_tflops=flag), device=torch.device(device),
                              precision=precision)
    got, message = adclr.train.mfu_peak(trainer)
    assert got == peak
    assert (message is None) == (note is None)
    if note:
        assert message == (f"note: no known peak for {note}: metrics.jsonl logs tflops, not mfu; "
                           "pass --peak-tflops for MFU")


def test_a_full_disk_while_logging_is_one_line(tmp_path, monkeypatch, capsys):
    """metrics.jsonl is appended at every log line: a full disk there ended in an OSError
    traceback, and then in a second one from closing the file, whose flush fails again."""
    import errno

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def write(self, text):  # into the buffer: the flush meets the full disk
            pass

        def flush(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            self.file.close()
            self.flush()

        def __getattr__(self, name):
            return getattr(self.file, name)

    opened = adclr.train.Logger.__init__

    def fill_the_disk(self, *args, **kwargs):
        opened(self, *args, **kwargs)
        self.file = FullDisk(self.file)

    monkeypatch.setattr(adclr.train.Logger, "__init__", fill_the_disk)
    out = str(tmp_path / "run")
    status, err = run(["train", *TINY, "--out", out], capsys)
    path, mount = os.path.join(out, "metrics.jsonl"), os.path.realpath(out)
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    assert status == 1 and "Traceback" not in err and "During handling" not in err
    assert err.splitlines()[-1] == (f"error: cannot write {path}: no space left on device (the disk mounted at "
                                    f"{mount} is full); no checkpoint was written yet; make room, then rerun")


def _run_with_snapshots(tmp_path, max_steps):
    """A TINY run on 8 images, batch 4: 2 steps per epoch, a snapshot every epoch."""
    data = image_folder(tmp_path / "data", per_class=4)
    out = str(tmp_path / "run")
    return out, ["train", *TINY, "--data", data, "--out", out, "--max-steps", str(max_steps),
                 "--saveckp-freq", "1", "--checkpoint-every", "100"]


def test_a_snapshot_a_kill_left_unwritten_is_written_on_resume(tmp_path, capsys):
    """A kill between the rename of checkpoint.pt and the end of the numbered snapshot's
    copy (its .tmp is removed on resume): the resumed run starts after that step, so the
    snapshot used to be missing for good."""
    out, argv = _run_with_snapshots(tmp_path, 2)
    assert run(argv, capsys)[0] == 0
    os.replace(os.path.join(out, "checkpoint0001.pt"), os.path.join(out, f"checkpoint0001.pt.{os.getpid()}.tmp"))
    argv[len(argv) - 1 - argv[::-1].index("--max-steps") + 1] = "4"  # the last one given
    status, err = run(argv, capsys)
    assert status == 0, err
    assert f"wrote {os.path.join(out, 'checkpoint0001.pt')}, the snapshot of step 2" in err
    assert load_checkpoint(os.path.join(out, "checkpoint0001.pt"))["step"] == 2
    assert load_checkpoint(os.path.join(out, "checkpoint0002.pt"))["step"] == 4


def test_a_corrupt_checkpoint_names_the_snapshot_to_resume_from(tmp_path, capsys):
    out, argv = _run_with_snapshots(tmp_path, 5)
    assert run(argv, capsys)[0] == 0
    path = os.path.join(out, "checkpoint.pt")
    with open(path, "r+b") as f:
        f.truncate(1000)
    status, err = run(argv, capsys)
    snapshot = os.path.join(out, "checkpoint0002.pt")
    assert status == 1 and err.splitlines()[-1].startswith(f"error: {path} is unreadable")
    assert f"copy the last numbered snapshot over it to resume from there (cp {snapshot} {path})" in err


def test_a_new_run_beside_an_earlier_runs_snapshots_is_refused(tmp_path, capsys):
    """checkpoint.pt removed to start over, the numbered snapshots left: a new run would
    write its own among them, and name them as its fallback."""
    out, argv = _run_with_snapshots(tmp_path, 2)
    assert run(argv, capsys)[0] == 0
    path, snapshot = os.path.join(out, "checkpoint.pt"), os.path.join(out, "checkpoint0001.pt")
    os.remove(path)
    status, err = run(argv, capsys)
    assert status == 1 and err.splitlines()[-1].startswith(
        f"error: {out} holds numbered snapshots of an earlier run but no checkpoint.pt; copy one over it to "
        f"resume from there (cp {snapshot} {path}), or move them away")
    assert not os.path.exists(path)
    shutil.copy(snapshot, path)  # as the message says
    status, err = run(argv[:-5] + ["4"] + argv[-4:], capsys)
    assert status == 0 and "resuming at step 2" in err, err


def test_a_resume_on_another_number_of_processes_says_so(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    argv = ["train", *TINY, "--out", out, "--max-steps", "2"]
    seeds, real_seed = [], torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda seed: seeds.append(seed) or real_seed(seed))
    assert run(argv, capsys)[0] == 0
    new_run_seeds = seeds[:]
    path = os.path.join(out, "checkpoint.pt")
    state = torch.load(path, weights_only=True)
    torch.save({**state, "rng": state["rng"] * 2}, path)  # as two processes write it
    seeds.clear()
    status, err = run(argv[:-1] + ["3"], capsys)
    assert status == 0, err
    assert f"note: {path} was written by 2 processes, resumed by 1: the step (2)" in err
    # The saved states do not fit one process: its draws are seeded anew, not as a new run's.
    assert set(seeds) - set(new_run_seeds), (seeds, new_run_seeds)


def test_a_resume_with_another_length_says_how_the_schedules_move(tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = ["train", *TINY, "--out", out, "--max-steps", "2", "--base-lr", "0.0512"]
    assert run(argv, capsys)[0] == 0
    status, err = run(argv[:-3] + ["4", "--base-lr", "0.0512"], capsys)  # the same run, twice as long
    assert status == 0, err
    peak, end = 0.0512 * 4 / 256, adclr.config.Config.min_lr  # batch 4, no warm-up
    # Step 2 ended the 2-step cosine at its end value; it is half way down the 4-step one.
    assert (f"note: the run is now 4 steps long, 2 when its checkpoint was saved: the lr, weight decay and "
            f"teacher momentum schedules span the new length, so at step 2 the lr goes from {end:.3g} to "
            f"{(peak + end) / 2:.3g}") in err
    status, err = run(argv[:-3] + ["4", "--base-lr", "0.0512"], capsys)
    assert status == 0 and "nothing to do" in err and "note: the run is now" not in err


def test_the_eta_is_the_mean_step_time_after_the_first_interval(tiny_config, monkeypatch):
    """Not the last interval's time alone, which a busy machine swings, and not the first
    interval's, which holds the workers' start and compilation."""
    import types

    now = [0.0]
    clock = types.SimpleNamespace(**{**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")},
                                     "perf_counter": lambda: now[0]})
    seconds = [50.0, 1.0, 3.0, 1.0, 3.0, 1.0]  # step 1 compiles
    real_step = adclr.train.train_step

    def timed_step(trainer, batch, step):
        now[0] += seconds[step]
        return real_step(trainer, batch, step)

    monkeypatch.setattr(adclr.train, "time", clock)
    monkeypatch.setattr(adclr.train, "train_step", timed_step)
    cfg = tiny_config(max_steps=6, log_every=1)
    train(cfg)
    etas = [r["eta_s"] for r in read_metrics(cfg.out)]
    assert etas == pytest.approx([5 * 50.0, 4 * 1.0, 3 * 2.0, 2 * 5 / 3, 1 * 2.0, 0.0])


def test_a_resume_on_a_larger_dataset_says_how_the_schedules_move(tiny_config, tmp_path, monkeypatch, capsys):
    """--data may change on resume; with epochs, its size changes the run's length too."""
    small, large = image_folder(tmp_path / "small", per_class=4), image_folder(tmp_path / "large", per_class=6)
    cfg = tiny_config(data=small, batch_size=4, epochs=2, max_steps=0)  # 8 images: 2 steps an epoch, 4 steps
    crash_in_step(monkeypatch, 2, lambda: train(cfg))
    capsys.readouterr()
    assert train(dataclasses.replace(cfg, data=large)) == 6  # 12 images: 3 steps an epoch
    assert "note: the run is now 6 steps long, 4 when its checkpoint was saved" in capsys.readouterr().err
