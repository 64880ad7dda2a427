import pytest

from adclr_kernels import unidirectional

_EMPTY_BHLD = unidirectional._empty_bhld
_EMPTY_ROWS = unidirectional._empty_rows
_EMPTY_QKV = unidirectional._empty_qkv


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the Triton launchers allocate starts as NaN, so an element the
    kernel forgets to write fails the test instead of passing by luck."""
    monkeypatch.setattr(unidirectional, "_empty_bhld",
                        lambda *a: _EMPTY_BHLD(*a).fill_(float("nan")))
    monkeypatch.setattr(unidirectional, "_empty_rows",
                        lambda *a: _EMPTY_ROWS(*a).fill_(float("nan")))
    monkeypatch.setattr(unidirectional, "_empty_qkv",
                        lambda *a: _EMPTY_QKV(*a).fill_(float("nan")))
