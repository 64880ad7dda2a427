import os

import pytest
from trainer_testing import TINY

from adclr.cli import main
from adclr.config import Config


@pytest.fixture(autouse=True)
def small_demo_knn(monkeypatch):
    """The k-NN line that ends a run on the built-in data on the CPU, on 100 images per split:
    a second instead of several for every such run here."""
    import adclr.eval_knn

    monkeypatch.setattr(adclr.eval_knn, "DEMO_IMAGES", 100)


@pytest.fixture
def tiny_config(tmp_path):
    """A Config small enough for a CPU test: 2-block dim-64 ViT, 32 px crops, patch 8."""
    def make(**overrides):
        settings = dict(out=str(tmp_path / "run"), data="builtin", arch="vit_test", patch_size=8,
                        image_size=32, local_size=16, num_local_crops=2, num_queries=3, out_dim=256,
                        batch_size=8, epochs=1, max_steps=4, warmup_epochs=0.01,
                        warmup_teacher_temp_epochs=0.01, freeze_last_layer_epochs=0.0,
                        num_workers=0, log_every=1, checkpoint_every=2, device="cpu")
        settings.update(overrides)
        return Config(**settings)
    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """checkpoint.pt of a real 2-step run of a 2-block ViT (32 px, patch 8) on the built-in
    scenes, with its metrics.jsonl beside it. Read-only: copy it before changing it."""
    from adclr.train import train

    out = tmp_path_factory.mktemp("tiny") / "run"
    train(Config(out=str(out), data="builtin:scenes", arch="vit_test", patch_size=8, image_size=32,
                 local_size=16, num_local_crops=1, num_queries=2, out_dim=64, head_hidden_dim=32,
                 head_bottleneck_dim=16, batch_size=4, max_steps=2, warmup_epochs=0,
                 warmup_teacher_temp_epochs=0, freeze_last_layer_epochs=0, num_workers=0, log_every=1,
                 device="cpu"))
    return str(out / "checkpoint.pt")


@pytest.fixture(scope="session")
def checkpoint_bytes(tmp_path_factory):
    """The bytes of the checkpoint.pt of a real one-step TINY run. Write them to a file of
    your own before changing them."""
    out = str(tmp_path_factory.mktemp("good") / "run")
    main(["train", *TINY, "--out", out])
    with open(os.path.join(out, "checkpoint.pt"), "rb") as f:
        return f.read()
