"""Checkpoints: a corrupt one is refused with its one-line reason by every command that
reads it, and a run resumes only with its own settings."""

import dataclasses
import io
import os

import pytest
import torch
from trainer_testing import TINY, run

import adclr.checkpoint
from adclr.checkpoint import load_checkpoint
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
    elif kind == "weights of the wrong type":
        state["teacher"] = list(state["teacher"].values())
        reason = "is not an adclr checkpoint ('teacher' is not a dict of tensors)"
    elif kind == "config of the wrong type":
        state["config"]["arch"] = "resnet50"
        reason = "is not an adclr checkpoint ('config' is not an adclr train config)"
    elif kind == "scaler of the wrong type":
        state["scaler"] = {"scale": "big"}
        reason = "is not an adclr checkpoint ('scaler' is not a gradient scaler state dict)"
    elif kind == "NaN weights":
        state["teacher"]["backbone.blocks.0.attn.qkv.weight"][0, 0] = float("nan")
        reason = ("holds non-finite values (NaN or inf) in teacher['backbone.blocks.0.attn.qkv.weight']: the run "
                  "it comes from diverged before it was written")
    elif kind == "wrong shapes":
        state["student"]["backbone.pos_embed"] = state["student"]["backbone.pos_embed"][:, :5]
        state["teacher"]["backbone.pos_embed"] = state["teacher"]["backbone.pos_embed"][:, :5]
        reason = "does not fit the model of its own config (Error(s) in loading state_dict for "
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue(), reason


CORRUPTIONS = ["empty", "truncated", "random bytes", "text", "disallowed global", "not a dict", "missing keys",
               "step of the wrong type", "weights of the wrong type", "config of the wrong type",
               "scaler of the wrong type", "NaN weights",
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
