"""`adclr export`: a run's backbone as a safetensors file, under timm's ViT names.

The file holds the backbone's tensors only (no head, no optimizer) and, as metadata, the
arch, patch size and image size a loader needs to build the model for them.
"""

from __future__ import annotations

import os

from .checkpoint import not_a_file, write_atomically
from .features import backbone_or_exit


def export(checkpoint, out, weights="teacher"):
    """Write the backbone's weights (timm ViT names) as a safetensors file.

    A link is written through to the file it points to, an existing file keeps its
    permissions; a folder or a device is refused, never replaced.
    """
    from safetensors.torch import save

    folder = os.path.dirname(os.path.realpath(out))
    kind = not_a_file(out)
    if kind:
        raise SystemExit(f"error: --out {out} is {kind}; give a file name such as backbone.safetensors")
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist; make it first"
        raise SystemExit(f"error: --out {out}: {folder} {what}")
    if os.path.exists(out) and os.path.exists(checkpoint) and os.path.samefile(out, checkpoint):
        # Written over, the run's checkpoint would be gone: the export holds the backbone only.
        raise SystemExit(f"error: --out {out} is the checkpoint being exported; give another file name "
                         "such as backbone.safetensors")
    backbone, cfg = backbone_or_exit(checkpoint, weights)
    metadata = {key: str(cfg[key]) for key in ("arch", "patch_size", "image_size")}
    data = save({k: v.contiguous() for k, v in backbone.state_dict().items()}, metadata=metadata)
    # save_file would write a 0600 file of its own and rename it over `out`, a link or a device too.
    write_atomically(out, lambda f: f.write(data))
