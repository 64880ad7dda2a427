"""DistributedDataParallel on CPU: 2 gloo processes."""

import dataclasses
import json
import multiprocessing
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Every test starts two processes (10 to 25 s each on 2 cores).
pytestmark = pytest.mark.slow

# The processes are forked from a server that imported torch and the trainer once: each
# begins as a spawned one does (none of this test process's state; its own imports of
# the modules not listed), without seconds of imports every time.
multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "adclr.cli"])


def spawn(worker, args, nprocs=2, join=True):
    """mp.spawn, from the fork server."""
    return mp.start_processes(worker, args=args, nprocs=nprocs, join=join, start_method="forkserver")


def join_group(rank, world, results):
    """A file rendezvous in the test's own folder: no port to pick, so no race with the
    other pytest workers for one."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(results, 'rendezvous')}",
                            rank=rank, world_size=world)


def worker(rank, world, cfg_fields, results):
    from torch.nn.parallel import DistributedDataParallel

    from adclr.data import synthetic_batch
    from adclr.config import Config
    from adclr.train import build, train, train_step

    torch.set_num_threads(1)
    join_group(rank, world, results)
    cfg = Config(**cfg_fields)

    trainer = build(cfg, "cpu", steps_per_epoch=10)
    assert isinstance(trainer.student, DistributedDataParallel)
    initial = [p.detach().clone() for p in trainer.student_module.parameters()]
    out = {"initial": initial}
    for step in range(3):
        # Each rank gets its own data, as under a sharded sampler.
        batch = synthetic_batch(cfg, 4, "cpu", generator=torch.Generator().manual_seed(100 * step + rank))
        if step == 0:
            with torch.no_grad():
                cls, query = trainer.teacher(batch["globals"], batch["queries"].repeat(2, 1, 1, 1, 1))
            out["local_mean"] = cls.mean(0)
            out["local_query_mean"] = query.reshape(-1, cfg.out_dim).mean(0)
        train_step(trainer, batch, step)
        if step == 0:
            out["center"] = trainer.loss.center[0].clone()
            out["query_center"] = trainer.loss.query_center[0].clone()
    out["student"] = [p.detach().clone() for p in trainer.student_module.parameters()]
    out["teacher"] = [p.detach().clone() for p in trainer.teacher.parameters()]

    # The whole loop: sharded loader, rank-0 checkpoint and metrics.
    train(dataclasses.replace(cfg, out=os.path.join(results, "run"), max_steps=2))
    torch.save(out, os.path.join(results, f"rank{rank}.pt"))
    dist.destroy_process_group()


# The fused head + loss uses the last layer's weight outside DDP's forward: its gradient
# must be all-reduced all the same.
@pytest.mark.parametrize("fused_head_loss", ["off", "on"])
def test_ddp_two_gloo_processes(tiny_config, tmp_path, fused_head_loss):
    cfg = tiny_config(batch_size=8, drop_path=0.1, head_hidden_dim=128, head_bottleneck_dim=32,
                      fused_head_loss=fused_head_loss)
    spawn(worker, args=(2, dataclasses.asdict(cfg), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    for a, b, start in zip(r0["student"], r1["student"], r0["initial"]):
        assert torch.equal(a, b)  # replicas stay identical
    assert any(not torch.equal(a, s) for a, s in zip(r0["student"], r0["initial"]))  # and they trained
    for a, b in zip(r0["teacher"], r1["teacher"]):
        assert torch.equal(a, b)

    # Centres are all-reduced: both ranks hold 0.1 * the mean over *both* ranks' batches.
    assert not torch.allclose(r0["local_mean"], r1["local_mean"])
    for key, local in (("center", "local_mean"), ("query_center", "local_query_mean")):
        expected = 0.1 * (r0[local] + r1[local]) / 2
        torch.testing.assert_close(r0[key], expected, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(r1[key], expected, rtol=1e-4, atol=1e-7)

    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]  # written once, by rank 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 2 and len(checkpoint["rng"]) == 2


def refused_worker(rank, world, cfg_fields, results):
    from adclr.config import Config
    from adclr.train import train

    join_group(rank, world, results)
    try:
        train(Config(**cfg_fields))
        message = "trained"
    except SystemExit as exit:
        message = str(exit.code)
    with open(os.path.join(results, f"rank{rank}.txt"), "w") as f:
        f.write(message)
    dist.destroy_process_group()


def test_a_run_in_use_is_refused_on_every_process(tiny_config, tmp_path):
    """Rank 0 holds the lock of --out for the run; when it cannot, every process stops with
    its line (a rank left behind would wait in DDP's first collective for half an hour)."""
    from adclr.checkpoint import folder_lock

    cfg = tiny_config(out=str(tmp_path / "run"))
    os.makedirs(cfg.out)
    with folder_lock(cfg.out):
        spawn(refused_worker, args=(2, dataclasses.asdict(cfg), str(tmp_path)), nprocs=2, join=True)
    expected = (f"error: --out {cfg.out} is in use by another adclr run (process {os.getpid()} on "
                f"{socket.gethostname()}); wait for it to end, or choose another --out")
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == [expected, expected]


def own_folder_worker(rank, world, cfg_fields, results):
    """refused_worker with --out a folder of each process's own (a node-local disk)."""
    refused_worker(rank, world, {**cfg_fields, "out": os.path.join(results, f"run{rank}")}, results)


def test_processes_that_read_different_checkpoints_are_refused(tiny_config, tmp_path):
    """Rank 0's --out holds a run at step 1, rank 1's nothing: DDP would average the
    gradients of a resumed and a new model without a word."""
    from adclr.train import train

    cfg = tiny_config(out=str(tmp_path / "run0"), max_steps=1)
    train(cfg)
    spawn(own_folder_worker, args=(2, dataclasses.asdict(dataclasses.replace(cfg, max_steps=2)), str(tmp_path)),
          nprocs=2, join=True)
    expected = (f"error: the processes read different checkpoints as {tmp_path / 'run0' / 'checkpoint.pt'} "
                f"(rank 0: step 1, rank 1: none); --out must be one folder that every process sees")
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == expected
    assert messages[1] == expected.replace("run0", "run1")  # each names the file it read


def test_a_process_that_cannot_use_its_checkpoint_stops_the_others(tiny_config, tmp_path):
    """Rank 1's --out holds an earlier run's snapshot and no checkpoint.pt, which it refuses:
    rank 0 must not wait for it in the collective that compares what they read."""
    cfg = tiny_config(out=str(tmp_path / "run0"), max_steps=1)
    os.makedirs(tmp_path / "run1")
    (tmp_path / "run1" / "checkpoint0001.pt").write_bytes(b"an earlier run's")
    spawn(own_folder_worker, args=(2, dataclasses.asdict(cfg), str(tmp_path)), nprocs=2, join=True)
    own = (f"error: {tmp_path / 'run1'} holds numbered snapshots of an earlier run but no checkpoint.pt; copy one")
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[1].startswith(own)
    assert messages[0] == "error: process 1 stopped: " + messages[1].removeprefix("error: ")


def methods_worker(rank, world, cfg_fields, results):
    from adclr.config import Config
    from adclr.data import synthetic_batch
    from adclr.train import build, train_step

    torch.set_num_threads(1)
    join_group(rank, world, results)
    out = {}
    for method in ("densecl", "ccmim"):
        cfg = Config(**{**cfg_fields, "method": method})
        trainer = build(cfg, "cpu", steps_per_epoch=10)
        initial = [p.detach().clone() for p in trainer.student_module.parameters()]
        for step in range(2):
            batch = synthetic_batch(cfg, 4, "cpu", generator=torch.Generator().manual_seed(100 * step + rank))
            train_step(trainer, batch, step)
        out[method] = {"initial": initial,
                       "student": [p.detach().clone() for p in trainer.student_module.parameters()],
                       "centers": [b.clone() for b in trainer.loss.buffers()]}
    torch.save(out, os.path.join(results, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_with_the_other_methods(tiny_config, tmp_path):
    """DenseCL's dense last layer and ccMIM's decoder take their gradients outside the
    CLS head's path: every one of them must be all-reduced, and the dense centre too."""
    cfg = tiny_config(batch_size=8, head_hidden_dim=64, head_bottleneck_dim=32, num_queries=0)
    spawn(methods_worker, args=(2, dataclasses.asdict(cfg), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for method in ("densecl", "ccmim"):
        a, b = r0[method], r1[method]
        for x, y in zip(a["student"], b["student"]):
            assert torch.equal(x, y), method  # replicas stay identical
        for x, y in zip(a["centers"], b["centers"]):
            assert torch.equal(x, y), method
        changed = [not torch.equal(x, s) for x, s in zip(a["student"], a["initial"])]
        assert all(changed), method  # every parameter trained, the method's own parts too


def cli_worker(rank, world, argv, port, results):
    import contextlib

    import adclr.eval_knn
    from adclr.cli import main

    torch.set_num_threads(1)
    adclr.eval_knn.DEMO_IMAGES = 100
    # As torchrun sets them: the run joins its process group itself.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with open(os.path.join(results, f"rank{rank}.err"), "w") as err, contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as exit:
            code = exit.code
        except Exception as error:  # noqa: BLE001: what a process raised, for the test to read
            code = f"{type(error).__name__}: {error}"
    with open(os.path.join(results, f"rank{rank}.txt"), "w") as f:
        f.write(str(code))


def test_the_command_line_under_torchrun_ends_with_the_demo_line(tmp_path):
    """On CPU with the built-in data the run is the demo: rank 0 ends it with the k-NN line,
    after the other ranks have gone, so without the run's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["train", "--out", str(tmp_path / "run"), "--arch", "vit_test", "--patch-size", "8",
            "--image-size", "32", "--local-size", "16", "--num-local-crops", "2", "--num-queries", "3",
            "--out-dim", "256", "--batch-size", "8", "--max-steps", "2", "--num-workers", "0",
            "--device", "cpu"]
    spawn(cli_worker, args=(2, argv, port, str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["0", "0"]
    assert "teacher" in (tmp_path / "rank0.err").read_text().splitlines()[-1]
    assert "k-NN" not in (tmp_path / "rank1.err").read_text()



def spawn_within(seconds, worker, world, *args):
    """mp.spawn(worker, (world, *args), nprocs=world), failing the test where a process hangs
    past `seconds` (a wait in a collective that will never complete) or dies."""
    import time

    context = spawn(worker, args=(world, *args), nprocs=world, join=False)
    deadline = time.monotonic() + seconds
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "a process hung"
    except mp.ProcessExitedException as error:
        pytest.fail(f"a process died: {error}")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A run of 8 logged steps with no checkpoint before its end: a stop's save is the first.
EIGHT_STEPS = ["--arch", "vit_test", "--patch-size", "8", "--image-size", "32", "--local-size", "16",
               "--num-local-crops", "1", "--num-queries", "2", "--out-dim", "64", "--batch-size", "8",
               "--max-steps", "8", "--checkpoint-every", "100", "--num-workers", "0", "--log-every", "1",
               "--device", "cpu"]


def sigterm_in_the_data_wait_worker(rank, world, argv, port, results):
    """cli_worker, with SIGTERM to rank 1 as it waits for its fourth batch, which then never
    comes: the signal ended its loader's workers too (SLURM signals every process)."""
    import builtins
    import signal

    import adclr.train

    class Batches:
        def __init__(self, loader):
            self.batches, self.served = builtins.iter(loader), 0

        def __next__(self):
            self.served += 1
            if rank == 1 and self.served == 4:
                os.kill(os.getpid(), signal.SIGTERM)
                raise RuntimeError("DataLoader worker (pid 1234) exited unexpectedly")
            return next(self.batches)

    adclr.train.iter = Batches
    cli_worker(rank, world, argv, port, results)


def test_sigterm_while_a_process_waits_for_data_saves_the_finished_steps(tmp_path):
    """The batch that cannot come counts as that process's stop: every process saves step 3
    and exits 143, none runs a fourth step without the others."""
    port, out = free_port(), tmp_path / "run"
    argv = ["train", "--out", str(out), *EIGHT_STEPS]
    spawn_within(240, sigterm_in_the_data_wait_worker, 2, argv, port, str(tmp_path))
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["143", "143"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3


def data_error_worker(rank, world, argv, port, results, failing):
    """cli_worker, with the loader of rank `failing` raising for its fourth batch (a worker's
    error: no signal)."""
    import builtins

    import adclr.train

    class Batches:
        def __init__(self, loader):
            self.batches, self.served = builtins.iter(loader), 0

        def __next__(self):
            self.served += 1
            if rank == failing and self.served == 4:
                raise RuntimeError("Caught OSError in DataLoader worker process 0")
            return next(self.batches)

    adclr.train.iter = Batches
    cli_worker(rank, world, argv, port, results)


@pytest.mark.parametrize("failing", [0, 1])
def test_a_data_error_on_one_process_saves_on_every_process_then_stops_them(failing, tmp_path):
    """It used to end that process alone, the others waiting in the next all-reduce until
    torchrun ended them, and the steps since the last checkpoint (all 3 here) were lost."""
    port, out = free_port(), tmp_path / "run"
    argv = ["train", "--out", str(out), *EIGHT_STEPS]
    spawn_within(240, data_error_worker, 2, argv, port, str(tmp_path), failing)
    codes = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert codes[failing] == "RuntimeError: Caught OSError in DataLoader worker process 0"
    assert codes[1 - failing] == ("1" if failing == 0 else
                                  "error: another process could not get its batch (its error is in its output); "
                                  "the run stopped on every process")
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 3 and len(checkpoint["rng"]) == 2
    err = (tmp_path / "rank0.err").read_text()
    assert f"data error: saved step 3 to {out / 'checkpoint.pt'}; rerun the same command to resume" in err


def sigterm_worker(rank, world, argv, port, results, every_process):
    """cli_worker, with SIGTERM sent inside the third step to rank 1 alone (a container
    runtime stopping one process), or twice to every process (SLURM signals them all, and
    torchrun passes its own on)."""
    import signal

    import adclr.train

    real_step = adclr.train.train_step

    def step_with_a_sigterm(trainer, batch, step):
        if step == 2 and (rank == 1 or every_process):
            for _ in range(2 if every_process else 1):
                os.kill(os.getpid(), signal.SIGTERM)
        return real_step(trainer, batch, step)

    adclr.train.train_step = step_with_a_sigterm
    cli_worker(rank, world, argv, port, results)


@pytest.mark.parametrize("every_process", [False, True])
def test_sigterm_under_torchrun_saves_the_finished_step_on_every_process(every_process, tmp_path):
    """SIGTERM to one process of a DDP run, inside its third step: every process finishes
    that step, its checkpoint is written, and each exits 143. It used to kill that process mid-step
    (the others then hung in the next all-reduce until torchrun ended them), keeping only
    the last checkpoint: here none at all."""
    port, out = free_port(), tmp_path / "run"
    argv = ["train", "--out", str(out), *EIGHT_STEPS]
    spawn_within(240, sigterm_worker, 2, argv, port, str(tmp_path), every_process)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["143", "143"]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 3 and len(checkpoint["rng"]) == 2
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
    err = (tmp_path / "rank0.err").read_text()
    assert f"terminated: saved step 3 to {out / 'checkpoint.pt'}; rerun the same command to resume" in err


def test_unreadable_files_are_counted_over_every_process(tmp_path):
    """metrics.jsonl, the progress line and the checkpoint count the unreadable files every
    process passed over, as one process running the same samples does; they counted rank 0's."""
    from PIL import Image

    from adclr.cli import main

    data = tmp_path / "data"
    for i in range(16):
        (data / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        path = data / "ab"[i % 2] / f"{i}.png"
        if i % 4 == 0:
            path.write_bytes(b"not an image")
        else:
            Image.new("RGB", (40, 30), (10 * i, 100 * (i % 2), 50)).save(path)
    argv = ["train", "--data", str(data), "--arch", "vit_test", "--patch-size", "8", "--image-size", "32",
            "--local-size", "16", "--num-local-crops", "1", "--num-queries", "2", "--out-dim", "64",
            "--batch-size", "8", "--max-steps", "4", "--num-workers", "0", "--log-every", "1", "--device", "cpu"]
    main(argv + ["--out", str(tmp_path / "one")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn(cli_worker, args=(2, argv + ["--out", str(tmp_path / "two")], port, str(tmp_path)), nprocs=2, join=True)
    counts = {}
    for run in ("one", "two"):
        with open(tmp_path / run / "metrics.jsonl") as f:
            logged = [json.loads(line)["skipped_images"] for line in f]
        saved = torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["skipped_images"]
        counts[run] = (logged[-1], saved)
    assert counts["one"][0] > 0 and counts["two"] == counts["one"]
