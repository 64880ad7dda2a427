"""The DINO head loss's PyTorch primitives (dino_loss_torch.py), the "torch" backend:
exact in float64, and the same whatever the row chunks."""

import torch

from adclr_kernels import dino_loss_torch
from adclr_kernels.dino_loss import dino_head_loss, dino_pairing
from kernel_testing import assert_loss_matches, loss_and_grads, make_loss_inputs, naive_loss


def test_torch_backend_float64_is_exact():
    inputs = make_loss_inputs(7, 4, 32, 1037, gain=True)
    pairing = [[0.0, 0.3, 0.1, 0.2], [0.25, 0.0, 0.05, 0.6]]  # any weights, not only DINO's
    ref = loss_and_grads(naive_loss, inputs, torch.float64, pairing, (0.1, 0.04))
    got = loss_and_grads(dino_head_loss, inputs, torch.float64, pairing, (0.1, 0.04), backend="torch")
    assert_loss_matches(got, ref, 1e-12)


def test_chunks_smaller_than_the_rows(monkeypatch):
    """The torch backend's row chunks: several chunks give the one-chunk result."""
    inputs = make_loss_inputs(7, 4, 16, 300)
    pairing = dino_pairing(4)
    ref = loss_and_grads(naive_loss, inputs, torch.float64, pairing, (0.1, 0.04))
    monkeypatch.setattr(dino_loss_torch, "CHUNK_ELEMENTS", 300 * 3)  # 3 rows a chunk
    got = loss_and_grads(dino_head_loss, inputs, torch.float64, pairing, (0.1, 0.04), backend="torch")
    assert_loss_matches(got, ref, 1e-12)
