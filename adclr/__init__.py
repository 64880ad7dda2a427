"""Lean ViT + ADCLR self-supervised pretraining (model, data, loss, trainer, evaluation)."""

from .model import ADCLRModel, DINOHead, VisionTransformer, build_backbone
from .train import Config, build, train, train_step

__all__ = ["ADCLRModel", "Config", "DINOHead", "VisionTransformer", "build", "build_backbone",
           "train", "train_step"]
