"""The Config's ranges: every numeric field has one, the range language means what it
says, and a Config built in Python is held to the same ranges as the flags."""

import dataclasses

import pytest
from trainer_testing import SCALE_FLAGS, TRAIN_RANGES, accepts, out_of_range

import adclr.train
from adclr.config import ALLOWED, Config, value_error

def test_every_numeric_field_has_a_range():
    numeric = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(Config)
               if isinstance(f.default, (int, float, tuple)) and not isinstance(f.default, bool)}
    assert numeric == {flag for flag, *_ in TRAIN_RANGES} | set(SCALE_FLAGS)
    for f in dataclasses.fields(Config):
        assert f.name in ALLOWED or isinstance(f.default, (bool, str)), f.name
        # `x: float = 30` would make the flag parse as int and reject 0.5.
        assert type(f.default).__name__ == f.type, (f.name, f.type, f.default)


@pytest.mark.parametrize("flag,spec,kind,negative", TRAIN_RANGES, ids=[r[0] for r in TRAIN_RANGES])
def test_value_error_follows_each_documented_range(flag, spec, kind, negative):
    """Around each bound of each range: accepted exactly where the range says, and the
    refusal worded as the command line words it."""
    allowed = ALLOWED[flag[2:].replace("-", "_")]
    bounds = [float(x) for x in spec.replace(">=", "").replace(">", "").strip("[]()").split(",")]
    steps = (-1, 0, 1) if kind is int else (-1, -0.5, 0, 0.5, 1)
    for value in {kind(negative), *(kind(b + d) for b in bounds for d in steps)}:
        expected = None if accepts(spec, value) else out_of_range(spec, value)
        assert value_error(value, allowed) == expected, value


@pytest.mark.parametrize("value,allowed,expected", [
    (float("nan"), "> 0", "must be a finite number, got nan"),
    (float("inf"), "[0, 1]", "must be a finite number, got inf"),
    ("fp8", ("auto", "bf16"), "invalid choice: 'fp8' (choose from auto, bf16)"),
    ("bf16", ("auto", "bf16"), None),
    ("gpu", ALLOWED["device"], "must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("cuda:1", ALLOWED["device"], None),
])
def test_value_error_on_choices_functions_and_non_finite_numbers(value, allowed, expected):
    assert value_error(value, allowed) == expected


def test_a_config_built_in_python_is_checked_too(tiny_config):
    with pytest.raises(ValueError, match=r"--batch-size: must be >= 1, got 0; --base-lr: must be > 0, got -1"):
        adclr.train.train(tiny_config(batch_size=0, base_lr=-1.0))
    with pytest.raises(ValueError, match=r"--num-queries: must be int, got '3'"):
        adclr.train.train(tiny_config(num_queries="3"))
