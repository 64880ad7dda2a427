"""bench.static's schedule: how programs share an SM's issue slots and tensor cores."""

import pytest

from bench import static as S


@pytest.mark.parametrize("occ", [1, 3, 16])
def test_a_launch_smaller_than_the_machine_spreads_over_the_sms(occ):
    # One program per SM runs at an SM's whole issue rate, whatever more would fit.
    gpu, warps = S.H100, 4
    costs = [(1e6, 0.0)] * gpu.sms
    alone = 1e6 / (gpu.clock_hz * S.achieved_ipc(gpu, warps))
    assert S.schedule(costs, occ, gpu, gpu.mma_flops["bf16"], warps) == pytest.approx(alone)


def test_a_full_launch_shares_each_sm_among_the_programs_that_fit():
    gpu, warps, occ = S.H100, 4, 3
    costs = [(1e6, 0.0)] * (2 * gpu.sms * occ)
    per_program = 1e6 * occ / (gpu.clock_hz * S.achieved_ipc(gpu, occ * warps))
    assert S.schedule(costs, occ, gpu, gpu.mma_flops["bf16"], warps) == pytest.approx(
        2 * per_program)
