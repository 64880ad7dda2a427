"""Lean ViT + ADCLR self-supervised pretraining (model, data, loss, trainer, evaluation).

`adclr.train` is the trainer module (its `train(cfg)` runs a whole job); the command
line is `adclr train|eval|export` (adclr/cli.py).
"""

from .model import ADCLRModel, DINOHead, VisionTransformer, build_backbone
from .train import Config, build, train_step

__all__ = ["ADCLRModel", "Config", "DINOHead", "VisionTransformer", "build", "build_backbone",
           "train_step"]
