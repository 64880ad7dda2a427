"""Fused ADCLR unidirectional attention: Triton kernels and PyTorch references."""

from . import nn
from .attention import (unidirectional_attention, unidirectional_attention_qkvpacked,
                        unidirectional_attention_varlen, unidirectional_attention_varlen_qkvpacked)
from .backends import BACKENDS
from .mask import visibility_mask
from .varlen import VarlenLayout

__all__ = ["BACKENDS", "VarlenLayout", "unidirectional_attention",
           "unidirectional_attention_qkvpacked", "unidirectional_attention_varlen",
           "unidirectional_attention_varlen_qkvpacked", "visibility_mask"]
__version__ = "0.1.0"
