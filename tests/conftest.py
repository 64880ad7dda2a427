"""Shared test set-up.

Without a GPU the Triton kernels run in Triton's interpreter, which must be switched
on before Triton decorates any kernel, so before adclr_kernels is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
