"""Lean ViT + ADCLR self-supervised pretraining (model, data, loss, trainer, evaluation).

`adclr.train.train(cfg)` runs a whole job with the settings of an `adclr.config.Config`;
the command line is `adclr train|eval|compare|show|export` (adclr/cli.py).
"""

from .config import Config
from .model import ADCLRModel, DINOHead, VisionTransformer, build_backbone
from .train import build, train_step

__all__ = ["ADCLRModel", "Config", "DINOHead", "VisionTransformer", "build", "build_backbone",
           "train_step"]
