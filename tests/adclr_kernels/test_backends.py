"""Backend names and the one resolver both op families use."""

import pytest
import torch

from adclr_kernels import BACKENDS
from adclr_kernels.backends import DINO_LOSS_BACKENDS, resolve
from kernel_testing import DEVICE

FAMILIES = {"attention": dict(known=BACKENDS, fallback="sdpa", dim_name="head_dim"),
            "dino_loss": dict(known=DINO_LOSS_BACKENDS, fallback="torch", dim_name="dim")}


def test_every_documented_backend_is_known():
    assert set(BACKENDS) == {"auto", "triton", "reference", "sdpa", "flex", "xformers"}
    assert set(DINO_LOSS_BACKENDS) == {"auto", "triton", "torch"}


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES)
def test_auto_picks_triton_only_for_cuda_inputs_it_takes(family):
    x = torch.zeros(2, 64, device=DEVICE)
    assert resolve("auto", x, **family) == ("triton" if DEVICE == "cuda" else family["fallback"])
    assert resolve("auto", x.double(), **family) == family["fallback"]
    assert resolve("auto", torch.zeros(2, 512, device=DEVICE), **family) == family["fallback"]
    assert resolve(family["fallback"], x, **family) == family["fallback"]


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES)
def test_refusals_say_why(family):
    x = torch.zeros(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton'"):
        resolve("cudnn", x, **family)
    with pytest.raises(TypeError, match="backend='triton' takes float16, bfloat16 or float32"):
        resolve("triton", x.double(), **family)
    with pytest.raises(ValueError, match=f"supports {family['dim_name']} up to 256, got 512"):
        resolve("triton", torch.zeros(2, 512, device=DEVICE), **family)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32, got torch.float64"):
        resolve("triton", x, dtype=torch.float64, **family)  # the autocast dtype, not x's
