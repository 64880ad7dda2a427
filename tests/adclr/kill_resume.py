"""kill -9 an `adclr train` run again and again, resume it each time, and compare bit for bit.

    python tests/adclr/kill_resume.py                # 6 kills, 3 of them during checkpoint writes
    python tests/adclr/kill_resume.py --kills 10 --seed 1

Runs a small CPU training once uninterrupted, then the same command in another folder,
killed with SIGKILL and started again until it finishes. Half of the kills wait for
the run's partial `checkpoint.pt.PID.tmp` to appear and strike while it is being written; the others strike
a random moment after a random number of logged steps. The finished run must equal the
uninterrupted one exactly: every tensor of the student, the teacher, the optimizer
state and the loss centres, the step, and the metrics.jsonl records (each step once,
the same losses). Prints what it did and exits 1 on any difference.

Not part of the test suite: it takes one to two minutes on 2 cores (the README quotes
its result). The head is wide (out_dim 16384) so that a checkpoint is ~70 MB and its
write lasts long enough to be hit.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

COMMAND = [sys.executable, "-m", "adclr.cli", "train", "--arch", "vit_test", "--patch-size", "8",
           "--image-size", "32", "--local-size", "16", "--num-local-crops", "2", "--num-queries", "3",
           "--out-dim", "16384", "--head-hidden-dim", "128", "--head-bottleneck-dim", "256",
           "--batch-size", "8", "--max-steps", "60", "--checkpoint-every", "3", "--log-every", "1",
           "--num-workers", "0", "--device", "cpu", "--warmup-epochs", "0.002",
           "--warmup-teacher-temp-epochs", "0.004", "--freeze-last-layer-epochs", "0.001"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def metrics(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line for line in f if line.endswith("\n")]


def run_killed(out, during_write, rng):
    """Start the run; SIGKILL it (during a checkpoint write, or at a random point). True if it finished."""
    process = subprocess.Popen(COMMAND + ["--out", out], env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    tmp = os.path.join(out, f"checkpoint.pt.{process.pid}.tmp")  # the writer's partial file
    before, wait_for = len(metrics(out)), rng.randint(1, 6)
    while process.poll() is None:
        # After a first new record: a .tmp seen before it could be one a killed run left.
        if during_write and len(metrics(out)) > before and os.path.exists(tmp):
            break
        if not during_write and len(metrics(out)) >= before + wait_for:
            time.sleep(rng.uniform(0, 0.3))
            break
        time.sleep(0.001)
    if process.poll() is not None:
        return process.returncode == 0, False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return False, os.path.exists(tmp)  # the .tmp outlived the process: it died inside the write


def same(a, b, where=""):
    """Where two checkpoint parts differ, recursively, bit for bit (an empty list if nowhere)."""
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b) else [where]
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [where]
        return [d for k in a for d in same(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [where]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same(x, y, f"{where}/{i}")]
    return [] if a == b else [where]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = tempfile.mkdtemp(prefix="adclr-kill-")
    reference, killed = os.path.join(root, "reference"), os.path.join(root, "killed")

    start = time.perf_counter()
    subprocess.run(COMMAND + ["--out", reference], env=ENV, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    print(f"uninterrupted run: {time.perf_counter() - start:.0f} s", flush=True)

    kills = during_writes = 0
    finished = False
    while not finished:
        if kills < args.kills:
            during_write = kills % 2 == 1
            finished, hit_write = run_killed(killed, during_write, rng)
            if not finished:
                kills += 1
                during_writes += hit_write
                step = torch.load(os.path.join(killed, "checkpoint.pt"), weights_only=True)["step"] \
                    if os.path.exists(os.path.join(killed, "checkpoint.pt")) else 0
                print(f"kill {kills}: {'during a checkpoint write' if hit_write else 'between writes'}, "
                      f"checkpoint at step {step}, {len(metrics(killed))} records logged", flush=True)
        else:
            finished = subprocess.run(COMMAND + ["--out", killed], env=ENV, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL).returncode == 0
            if not finished:
                sys.exit("the resumed run failed")

    a = torch.load(os.path.join(reference, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(killed, "checkpoint.pt"), weights_only=True)
    differences = [d for key in ("student", "teacher", "optimizer", "loss", "step")
                   for d in same(a[key], b[key], key)]
    records_a = [json.loads(line) for line in metrics(reference)]
    records_b = [json.loads(line) for line in metrics(killed)]
    steps_b = [r["step"] for r in records_b]
    if steps_b != [r["step"] for r in records_a]:
        differences.append(f"metrics.jsonl steps {steps_b}")
    elif [r["loss"] for r in records_a] != [r["loss"] for r in records_b]:
        differences.append("metrics.jsonl losses")
    leftovers = [name for name in os.listdir(killed) if name.endswith(".tmp")]
    print(f"{kills} kills ({during_writes} during checkpoint writes); final step {b['step']}; "
          f"{len(records_b)} records, each step once; leftover .tmp files: {leftovers or 'none'}")
    if differences or leftovers:
        print("DIFFERENT from the uninterrupted run: " + ", ".join(differences[:10]) + f"; both runs are in {root}")
        sys.exit(1)
    shutil.rmtree(root)
    print(f"bit-identical to the uninterrupted run (student, teacher, optimizer, centres, metrics); "
          f"{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
