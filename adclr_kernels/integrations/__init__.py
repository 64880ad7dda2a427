"""Run the op inside other codebases' ViTs: timm, DINO, DINOv2, Hugging Face transformers.

One file per codebase (`timm.py`, `dino.py`, `dinov2.py`, `transformers.py`), each with
the same two, separate, things:

- `swap_attention(model)`: the attention runs on the op, and nothing else a caller can
  observe changes. Every attention module keeps its identity, parameters, buffers and
  hooks (so state dicts, optimizers and `register_forward_hook` handles stay valid);
  only its class becomes a subclass of its own class whose `forward` calls the op
  (`isinstance` checks still hold). The model is checked first, exactly (the class of
  the model, of every block and of every attention module, their forward signatures,
  every parameter and buffer); anything else is refused with one `UnsupportedModel`
  message naming the block and the reason, before anything is changed.
- `query_tokens(model, queries, ...)`: a context manager inside which the model's own
  methods (`forward`, `forward_features`, `forward_intermediates`, ...) carry ADCLR query
  tokens beside the image tokens, with every `query_sees_*` option of the op. Whatever
  those methods return is what they return without query tokens (unidirectional
  attention: query tokens never change the image tokens); the query tokens' outputs are
  collected on the object the context yields.

What the adapters share is in `common.py`.
"""

from ..varlen import VarlenLayout
from .common import QueryLayout, QueryTokens, UnsupportedModel

__all__ = ["UnsupportedModel", "QueryLayout", "QueryTokens", "VarlenLayout"]
