"""bench.timing's device time per call: the profiler's device rows, never a host row again."""

from types import SimpleNamespace

import torch
from torch.autograd import DeviceType

from bench import timing


def test_device_total_counts_device_rows_only():
    rows = [SimpleNamespace(key="aten::mm", device_type=DeviceType.CPU, device_time_total=40.0),  # its kernel, again
            SimpleNamespace(key="_unidirectional_fwd_kernel", device_type=DeviceType.CUDA, device_time_total=30.0),
            SimpleNamespace(key="Memcpy DtoD", device_type=DeviceType.CUDA, device_time_total=10.0)]
    assert timing.device_total_us(rows) == 40.0


def test_a_real_profile_of_host_work_has_no_device_time():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(64, 64) @ torch.ones(64, 64)
    averages = prof.key_averages()
    assert any(a.key == "aten::mm" for a in averages)  # the rows carry the attributes read
    assert timing.device_total_us(averages) == 0


def test_off_cuda_there_is_no_device_time():
    if timing.ON_CUDA:
        assert timing.device_seconds_per_call(lambda: torch.ones(8, device="cuda") * 2, calls=2) > 0
    else:
        assert timing.device_seconds_per_call(lambda: None) is None
