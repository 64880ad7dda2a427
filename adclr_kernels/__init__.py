"""Fused ADCLR unidirectional attention: Triton kernels and PyTorch references."""

from . import nn
from .attention import BACKENDS, unidirectional_attention, unidirectional_attention_varlen
from .reference import visibility_mask

__all__ = ["BACKENDS", "unidirectional_attention", "unidirectional_attention_varlen",
           "visibility_mask"]
__version__ = "0.1.0"
