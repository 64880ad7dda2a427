"""`adclr export`: a run's backbone as a safetensors file, under timm's ViT names.

The file holds the backbone's tensors only (no head, no optimizer) and, as metadata, the
arch, patch size and image size a loader needs to build the model for them.
"""

from __future__ import annotations

import os

from .features import backbone_or_exit


def export(checkpoint, out, weights="teacher"):
    """Write the backbone's weights (timm ViT names) as a safetensors file."""
    from safetensors.torch import save_file

    from safetensors import SafetensorError

    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise SystemExit(f"error: --out {out} is a folder; give a file name such as backbone.safetensors")
    if not os.path.isdir(folder):
        raise SystemExit(f"error: --out {out}: {folder} is not a folder")
    backbone, cfg = backbone_or_exit(checkpoint, weights)
    metadata = {key: str(cfg[key]) for key in ("arch", "patch_size", "image_size")}
    try:
        save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, out, metadata=metadata)
    except (OSError, SafetensorError) as error:  # no permission, disk full
        raise SystemExit(f"error: cannot write --out {out} ({error})") from None
