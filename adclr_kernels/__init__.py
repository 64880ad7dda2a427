"""Fused ADCLR unidirectional attention, the fused DINO head + loss, and multi-crop
cutting: Triton kernels with PyTorch implementations beside them."""

from . import nn
from .attention import (unidirectional_attention, unidirectional_attention_qkvpacked,
                        unidirectional_attention_varlen, unidirectional_attention_varlen_qkvpacked)
from .backends import BACKENDS
from .crops import PackedImages, crop_resize, pack_images
from .mask import visibility_mask
from .varlen import VarlenLayout

__all__ = ["BACKENDS", "PackedImages", "VarlenLayout", "crop_resize", "pack_images",
           "unidirectional_attention",
           "unidirectional_attention_qkvpacked", "unidirectional_attention_varlen",
           "unidirectional_attention_varlen_qkvpacked", "visibility_mask"]
__version__ = "0.1.0"
