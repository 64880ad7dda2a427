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


# The start of WITHOUT_TRITON: no triton at all, as on macOS or Windows, where PyPI has
# none; or one older than the kernels' floor (the installed one, its version changed).
NO_TRITON = '''
import importlib.abc, sys

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTriton())
PROBLEM, IMPORTS_TRITON = "needs the triton package, which is not installed here", False
'''
OLD_TRITON = '''
import sys
import triton

triton.__version__ = "3.5.1"
PROBLEM, IMPORTS_TRITON = "needs triton 3.6 or later, and 3.5.1 is installed here", True
'''

WITHOUT_TRITON = '''
import torch
import adclr.cli, adclr.train
from adclr_kernels import crop_resize, pack_images, unidirectional_attention, unidirectional_attention_varlen
from adclr_kernels.dino_loss import dino_head_loss, dino_pairing

q = torch.randn(2, 3, 12, 16, requires_grad=True)
out = unidirectional_attention(q, q, q, num_queries=2, num_prefix=1)
out.sum().backward()
packed = torch.randn(20, 3, 16)
cu = torch.tensor([0, 8, 20], dtype=torch.int32)
assert unidirectional_attention_varlen(packed, packed, packed, cu, 2, max_seqlen=12).shape == packed.shape
feats = torch.randn(4, 8, requires_grad=True)
loss, _ = dino_head_loss(feats, torch.randn(4, 8), torch.randn(32, 8), torch.zeros(32), dino_pairing(2),
                         student_temp=0.1, teacher_temp=0.04)
loss.backward()
image = torch.randint(0, 256, (3, 9, 11), dtype=torch.uint8)
assert crop_resize([image], torch.tensor([[(0.0, 0.0, 11.0, 9.0)]]), 4).shape == (1, 1, 3, 4, 4)
for call in (lambda: unidirectional_attention(q, q, q, num_queries=2, backend="triton"),
             lambda: crop_resize([image], torch.tensor([[(0.0, 0.0, 11.0, 9.0)]]), 4, backend="triton")):
    try:
        call()
        raise AssertionError("backend='triton' ran without triton")
    except RuntimeError as error:
        assert PROBLEM in str(error), error
assert "adclr_kernels.attention_triton" not in sys.modules and "adclr_kernels.crops_triton" not in sys.modules
assert IMPORTS_TRITON or not any(name == "triton" or name.startswith("triton.") for name in sys.modules)
print("ok")
'''


@pytest.mark.parametrize("triton", ["missing", "older than 3.6"])
def test_everything_but_the_triton_backend_runs_without_triton(triton, tmp_path):
    """PyPI has Triton for Linux only: on macOS and Windows the package imports, its
    PyTorch backends and the trainer run, "auto" never picks Triton, and
    backend="triton" says why it cannot. So with an older Triton (torch before 2.10
    pins one), whose compiler fails on the kernels or lacks what they use."""
    import os
    import subprocess
    import sys

    script = tmp_path / "without_triton.py"
    script.write_text((NO_TRITON if triton == "missing" else OLD_TRITON) + WITHOUT_TRITON)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
