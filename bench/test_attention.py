"""The op alone: forward and forward+backward, every backend, every ADCLR shape.

Each group (mode x shape) also holds `sdpa_unmasked`, plain SDPA on the same row and
column counts with no mask: the physical yardstick of what the op would cost if the
mask were free.
"""

import pytest
import torch
import torch.nn.functional as F

from adclr_kernels import unidirectional_attention
from bench.timing import DEVICE, DTYPE
from bench.workloads import MODES, UNMASKED_SDPA, make_qkv, skip_reason


@pytest.mark.parametrize("mode", MODES)
def test_attention(measure, mode, workload, backend):
    reason = skip_reason(backend, DEVICE, mode)
    if reason:
        pytest.skip(reason)
    backward = mode == "forward+backward"
    # Forward is timed without autograd bookkeeping (inputs need no grad), as in
    # FlashAttention's benchmarks; forward+backward takes gradients w.r.t. q, k, v.
    q, k, v = make_qkv(workload, DTYPE, DEVICE, requires_grad=backward)

    if backend == UNMASKED_SDPA:
        def op():
            return F.scaled_dot_product_attention(q, k, v)
    else:
        def op():
            return unidirectional_attention(q, k, v, workload.num_queries, workload.num_prefix,
                                            backend=backend)

    if backward:
        grad_out = torch.randn(q.shape, dtype=DTYPE, device=DEVICE)

        def fn():
            # autograd.grad, not .backward(): nothing accumulates into .grad between rounds.
            return torch.autograd.grad(op(), (q, k, v), grad_out)
    else:
        fn = op

    measure(fn, mode=mode, group=f"{mode} | {workload.id}", backend=backend, workload=workload,
            flops=workload.flops(mode))
