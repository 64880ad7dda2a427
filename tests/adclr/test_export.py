"""`adclr export`: the backbone's weights and what a loader needs to build it (the file
writes themselves and the refusals are in test_checkpoint.py and test_cli.py)."""

import pytest
import torch
from safetensors import safe_open

from adclr.checkpoint import load_checkpoint
from adclr.cli import main


@pytest.mark.parametrize("weights", [None, "student"])
def test_export_writes_the_chosen_backbone_under_its_own_names_with_its_shape(weights, tiny_checkpoint, tmp_path):
    out = str(tmp_path / "backbone.safetensors")
    main(["export", "--checkpoint", tiny_checkpoint, "--out", out, *(["--weights", weights] if weights else [])])
    state = load_checkpoint(tiny_checkpoint)
    backbone = {k[len("backbone."):]: v for k, v in state[weights or "teacher"].items() if k.startswith("backbone.")}
    with safe_open(out, "pt") as f:
        assert f.metadata() == {"arch": "vit_test", "patch_size": "8", "image_size": "32"}
        assert set(f.keys()) == set(backbone)
        assert all(torch.equal(f.get_tensor(k), v) for k, v in backbone.items())
