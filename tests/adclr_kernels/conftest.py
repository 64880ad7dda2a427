import pytest

from adclr_kernels import attention_triton, dino_loss_triton

_EMPTY_BHLD = attention_triton._empty_bhld
_EMPTY_ROWS = attention_triton._empty_rows
_EMPTY_TOKENS = attention_triton._empty_tokens
_EMPTY_QKV = attention_triton._empty_qkv
_EMPTY_SCRATCH = attention_triton._empty_scratch
_EMPTY = dino_loss_triton._empty


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the Triton launchers allocate starts as NaN, so an element the
    kernel forgets to write fails the test instead of passing by luck."""
    monkeypatch.setattr(attention_triton, "_empty_bhld",
                        lambda *a: _EMPTY_BHLD(*a).fill_(float("nan")))
    monkeypatch.setattr(attention_triton, "_empty_tokens",
                        lambda *a: _EMPTY_TOKENS(*a).fill_(float("nan")))
    monkeypatch.setattr(attention_triton, "_empty_rows",
                        lambda *a: _EMPTY_ROWS(*a).fill_(float("nan")))
    monkeypatch.setattr(attention_triton, "_empty_qkv",
                        lambda *a: _EMPTY_QKV(*a).fill_(float("nan")))
    monkeypatch.setattr(attention_triton, "_empty_scratch",
                        lambda *a: _EMPTY_SCRATCH(*a).fill_(float("nan")))
    monkeypatch.setattr(dino_loss_triton, "_empty",
                        lambda *a, **k: _EMPTY(*a, **k).fill_(float("nan")))
