"""What the adapters share: the layout the swapped modules read, the calls to the op,
the checks behind their refusals, and the machinery that carries query tokens through a
model's blocks (`adclr_kernels.integrations` describes the adapters)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect

import torch
import torch.utils.checkpoint
from torch import nn

from ..attention import (unidirectional_attention, unidirectional_attention_qkvpacked,
                         unidirectional_attention_varlen, unidirectional_attention_varlen_qkvpacked)
from ..mask import QueryMask


class UnsupportedModel(TypeError):
    """The model, or a part of it, is not one the adapter runs exactly. Raised before the
    model is changed in any way; the message names the part and the reason."""


@dataclasses.dataclass(frozen=True)
class QueryLayout:
    """The token layout a swapped attention module runs while query tokens are carried:
    [num_prefix prefix | image tokens | num_queries query tokens] per sequence
    (num_queries: one count per crop group for DINOv2's list input), and what the query
    tokens see."""
    num_queries: int | tuple
    num_prefix: int
    mask: QueryMask = QueryMask()


class OpAttention:
    """Mixin of every swapped attention class (put first in the bases)."""
    adclr_backend = "auto"      # the op's backend; set per module by swap_attention(backend=)
    adclr_layout = None         # a QueryLayout while query_tokens runs this module's block


def attend(module, q, k, v, scale):
    """The op on (B, H, L, D) q, k, v under the module's layout; returns (B, L, H, D)."""
    layout = module.adclr_layout
    # Under CUDA autocast a norm or a rotation may hand back fp32 while v is bf16.
    q, k = q.to(v.dtype), k.to(v.dtype)
    if layout is None:
        out = unidirectional_attention(q, k, v, 0, 0, scale=scale, backend=module.adclr_backend)
    else:
        out = unidirectional_attention(q, k, v, layout.num_queries, layout.num_prefix, scale=scale,
                                       backend=module.adclr_backend, **layout.mask.options())
    return out.transpose(1, 2)


def attend_packed(module, qkv, scale, cls_probs=False):
    """The op on one qkv projection output (B, L, 3, H, D); returns (B, L, H, D). The
    kernel reads q, k, v through its strides and writes one gradient for it: no copies.
    cls_probs: return (that, the CLS row's attention probabilities (B, H, 1, L)), the
    op's own prefix-row output."""
    layout = module.adclr_layout
    extra = dict(return_prefix_probs=True) if cls_probs else {}
    if layout is None:
        # Without query tokens the prefix count changes no output, only which rows'
        # probabilities come back.
        return unidirectional_attention_qkvpacked(qkv, 0, int(cls_probs), scale=scale,
                                                  backend=module.adclr_backend, **extra)
    out = unidirectional_attention_qkvpacked(qkv, layout.num_queries, layout.num_prefix, scale=scale,
                                             backend=module.adclr_backend, **extra, **layout.mask.options())
    return (out[0], out[1][:, :, :1]) if cls_probs else out


def attend_varlen(module, qkv, varlen, scale):
    """The varlen op on packed sequences: qkv (T, 3, H, D) or (q, k, v) each (T, H, D),
    `varlen` a VarlenLayout (it holds the query count of every sequence)."""
    layout = module.adclr_layout
    num_prefix, options = (0, {}) if layout is None else (layout.num_prefix, layout.mask.options())
    if isinstance(qkv, torch.Tensor):
        return unidirectional_attention_varlen_qkvpacked(qkv, varlen, None, num_prefix, scale=scale,
                                                         backend=module.adclr_backend, **options)
    q, k, v = qkv
    return unidirectional_attention_varlen(q.to(v.dtype), k.to(v.dtype), v, varlen, None, num_prefix,
                                           scale=scale, backend=module.adclr_backend, **options)


def attention_weights(module, q, k, scale):
    """Softmax probabilities (B, H, L, L) under the module's layout, in q's dtype: the
    reference path, for APIs that return attention maps (computed only when asked)."""
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale
    layout = getattr(module, "adclr_layout", None)  # a module the registry runs unswapped has none
    if layout is not None:
        seq = q.shape[-2]
        allowed = layout.mask.matrix(seq, seq, layout.num_queries, layout.num_prefix, q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1).to(q.dtype)


# ---------------------------------------------------------------------------------- checks

def forward_parameters(cls):
    """Names of cls.forward's parameters after self, to compare with what an adapter expects."""
    return tuple(inspect.signature(cls.forward).parameters)[1:]


def check_signature(name, module, expected):
    got = forward_parameters(type(module))
    if got != tuple(expected):
        raise UnsupportedModel(f"{name} ({type(module).__name__}): forward takes ({', '.join(got)}), "
                               f"the adapter knows ({', '.join(expected)}); another version of its code?")


def check_children(name, module, allowed, required=()):
    """Every submodule, parameter and buffer of `module` itself is one the adapter knows
    (so none is left out of the swapped forward)."""
    own = set(module._modules) | set(module._parameters) | set(module._buffers)
    own = {n for n in own if getattr(module, n, None) is not None}
    unknown, missing = sorted(own - set(allowed)), sorted(set(required) - own)
    if unknown:
        raise UnsupportedModel(f"{name} ({type(module).__name__}) has {', '.join(unknown)}, which the "
                               "adapter's forward would not use")
    if missing:
        raise UnsupportedModel(f"{name} ({type(module).__name__}) has no {', '.join(missing)}")


def check_no_attention_dropout(name, module, p):
    if p:
        raise UnsupportedModel(f"{name} ({type(module).__name__}): attention dropout p={p}; the fused "
                               "kernel never materialises the probabilities, so it has none (build the "
                               "model with attention dropout 0)")


def state_shapes(model):
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def swap_classes(model, plan):
    """Apply a checked plan [(module, new class)], then check that the state dict has the
    same keys, shapes and dtypes (so checkpoints load both ways); if not, put every class
    back and raise. A real check, not an `assert`: `python -O` must not skip it."""
    before = state_shapes(model)
    originals = [(module, type(module)) for module, _ in plan]
    for module, cls in plan:
        module.__class__ = cls
    after = state_shapes(model)
    if after != before:
        for module, cls in originals:
            module.__class__ = cls
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        raise RuntimeError(f"swap_attention would change the state dict at {', '.join(changed[:3])} "
                           f"({len(changed)} entries); the model is left as it was (a bug in adclr_kernels, "
                           "please report it)")
    return model


@functools.lru_cache(maxsize=None)
def subclass(base, mixin, name):
    """`mixin` over `base`: the swapped class of a class the adapter cannot import (DINO's,
    DINOv2's). Made once per class, so every swapped module of a model shares it."""
    return type(name, (mixin, base), {"__module__": mixin.__module__, "__qualname__": name,
                                      "__reduce_ex__": _reduce_swapped})


def _reduce_swapped(module, protocol):
    # No module defines the made class by name, so pickle (torch.save of a whole model,
    # deepcopy) cannot find it: it is recorded as its base and mixin, and made again on
    # load, in any process that can import those two.
    mixin, base = type(module).__bases__
    return _swapped_module, (base, mixin, type(module).__name__), module.__getstate__()


def _swapped_module(base, mixin, name):
    cls = subclass(base, mixin, name)
    return cls.__new__(cls)


def refuse_token_mixers(name, block):
    """Query tokens leave the image tokens exactly unchanged only if nothing but attention
    mixes tokens inside a block: a batch or group norm, or a convolution, would."""
    mixers = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
              nn.modules.conv._ConvNd)
    for sub_name, sub in block.named_modules():
        if isinstance(sub, mixers):
            raise UnsupportedModel(f"{name}.{sub_name} ({type(sub).__name__}) mixes tokens outside the "
                                   "attention, so query tokens would change the image tokens")


# ------------------------------------------------------------------- carrying query tokens

class QueryTokens:
    """What a `query_tokens` context collects.

    outputs: the query tokens' output of every block that ran in the latest pass
        through the model (a call that runs the first block starts a new pass), in
        order, before any final norm: (B, Q, D) each (a list of those, one per crop
        group, for DINOv2's list input).
    query: the last of those through the model's final norm, as the model's features
        are for image tokens (computed on each access, in the caller's grad mode).
    passes: how many passes carry the query tokens (None: every one); the later ones
        run the model as it is outside the context.
    """

    def __init__(self, tokens, layout, final_norm, passes=None):
        self.layout = layout
        self.inputs = tokens
        self.tokens = tokens
        self.outputs = []
        self.passes = passes
        self.passes_started = 0
        self.carrying = True
        self.entry_layout = None  # (shape, strides) of the first block's input in this pass
        self._final_norm = final_norm

    @property
    def query(self):
        if not self.outputs:
            raise RuntimeError("no block has run inside the query_tokens context yet")
        last = self.outputs[-1]
        if isinstance(last, list):
            return [None if t is None else self._final_norm(t) for t in last]
        return self._final_norm(last)

    def start_pass(self):
        if self.passes is not None:
            # Counted no further than one past the limit: torch.compile guards on the count,
            # so a count that kept growing would recompile the model at every call.
            self.passes_started = min(self.passes_started + 1, self.passes + 1)
            self.carrying = self.passes_started <= self.passes
        if self.carrying:
            self.tokens, self.outputs = self.inputs, []


def _with_queries(x, tokens):
    if isinstance(x, list) != isinstance(tokens, list):
        raise ValueError("a list input (crop groups) takes a list of query tokens, one entry or None per "
                         "group; a tensor input takes one (batch, Q, ...) tensor: got a "
                         f"{type(tokens).__name__} of query tokens for a {type(x).__name__} input")
    if isinstance(x, list) and len(tokens) != len(x):
        raise ValueError(f"{len(tokens)} entries of query tokens for {len(x)} crop groups: give one per "
                         "group, None for a group without query tokens")
    for xi, t in zip(x, tokens) if isinstance(x, list) else [(x, tokens)]:
        if t is not None and t.shape[0] != xi.shape[0]:
            raise ValueError(f"query tokens are for a batch of {t.shape[0]}, the images are a batch "
                             f"of {xi.shape[0]} (a model called once per crop resolution, as DINO's "
                             "MultiCropWrapper calls it, carries them in its first call with passes=1)")
    if isinstance(x, list):
        return [xi if t is None else torch.cat([xi, t.to(xi.dtype)], 1) for xi, t in zip(x, tokens)]
    return torch.cat([x, tokens.to(x.dtype)], 1)


def _split_queries(out, x, tokens):
    if isinstance(out, list):
        pairs = [(o[:, :xi.shape[1]], None if t is None else o[:, xi.shape[1]:])
                 for o, xi, t in zip(out, x, tokens)]
        return [a for a, _ in pairs], [b for _, b in pairs]
    return out[:, :x.shape[1]], out[:, x.shape[1]:]


def _layout(x):
    """(shape, strides) of a tensor whose elements fill its memory in some order of its
    dimensions (contiguous, or a transposed view of a contiguous tensor); else None."""
    if isinstance(x, list):
        return [_layout(t) for t in x]
    expected = 1
    for size, stride in sorted((d for d in zip(x.shape, x.stride()) if d[0] != 1), key=lambda d: d[1]):
        if stride != expected:
            return None
        expected *= size
    return tuple(x.shape), x.stride()


def _laid_out_as(image, layout):
    """The last block's image tokens in the memory layout the first block's input had,
    which the tokens keep through the blocks without query tokens (timm's, for one, are a
    transposed view of the patch embedding's output): a reduction over them (average
    pooling) then adds in the same order, and gives the same bits."""
    if isinstance(image, list):
        return [_laid_out_as(a, b) for a, b in zip(image, layout or [None] * len(image))]
    if layout is None or tuple(image.shape) != layout[0] or image.stride() == layout[1]:
        return image
    return torch.empty_strided(*layout, dtype=image.dtype, device=image.device).copy_(image)


def _run_block(block, attention_modules, layout, checkpoint_attrs, x, *args, **kwargs):
    """The block's own forward with the query layout set on its attention modules (and its
    own gradient checkpointing off: `_carry` checkpoints this call instead), for the call
    only: a recomputation in backward runs this same function with the same layout."""
    saved = [(m, m.__dict__.get("adclr_layout")) for m in attention_modules]
    flags = [(block, a, block.__dict__.get(a)) for a in checkpoint_attrs if a in block.__dict__]
    try:
        for m in attention_modules:
            m.adclr_layout = layout
        for obj, attr, _ in flags:
            setattr(obj, attr, False)
        return type(block).forward(block, x, *args, **kwargs)
    finally:
        for m, value in saved:
            if value is None:
                m.__dict__.pop("adclr_layout", None)
            else:
                m.adclr_layout = value
        for obj, attr, value in flags:
            setattr(obj, attr, value)


def _carry(block, first, last, attention_modules, state, checkpointing, checkpoint_attrs, passthrough, x,
           *args, **kwargs):
    """A block's forward while query tokens are carried: the tokens join the block's input,
    leave its output, and wait for the next block. The caller sees the image tokens only.
    The first block starts a new pass (a second model call in the same context)."""
    if first:
        state.start_pass()
        state.entry_layout = _layout(x)
    if not state.carrying:  # past the passes asked for: the block as it runs outside the context
        attention_modules, layout, full = (), None, x
    else:
        layout, full = state.layout, _with_queries(x, state.tokens)
        if passthrough(args, kwargs):  # a call that returns something else (attention maps): as it is
            return _run_block(block, attention_modules, layout, checkpoint_attrs, full, *args, **kwargs)
    if checkpointing() and torch.is_grad_enabled():
        out = torch.utils.checkpoint.checkpoint(
            _run_block, block, attention_modules, layout, checkpoint_attrs, full, *args,
            use_reentrant=False, **kwargs)
    else:
        out = _run_block(block, attention_modules, layout, checkpoint_attrs, full, *args, **kwargs)
    if not state.carrying:
        return out
    image, queries = _split_queries(out, x, state.tokens)
    state.tokens = queries
    state.outputs.append(queries)
    return _laid_out_as(image, state.entry_layout) if last else image


class _CarriedForward(functools.partial):
    """A block's forward inside a query_tokens context. It holds the context's state, so a
    copy would carry query tokens after the context ends: copies and pickles are refused."""

    def _refuse(self, *args):
        raise RuntimeError(f"{type(self.args[0]).__name__} carries query tokens: copy or pickle the model "
                           "outside the query_tokens context (copy.deepcopy, torch.save(model))")

    __reduce__ = __reduce_ex__ = __copy__ = __deepcopy__ = _refuse


def refuse_inside_query_tokens(model, what):
    """`what` (restore_attention) would leave the blocks carrying query tokens through
    attention that no longer masks them."""
    for name, module in model.named_modules():
        if isinstance(module.__dict__.get("forward"), _CarriedForward):
            raise RuntimeError(f"{what} inside a query_tokens context ({name or 'the model'} carries query "
                               "tokens): leave the context first")


@contextlib.contextmanager
def carry_queries(blocks, tokens, layout, final_norm, *, passes=None, checkpointing=lambda: False,
                  pause_checkpointing=(), checkpoint_attrs=(), passthrough=lambda args, kwargs: False):
    """Carry query tokens through `blocks` for the duration of the context.

    blocks: [(block, its swapped attention modules)], in the order they run.
    tokens: (B, Q, D) query tokens entering the first block (or a list, for list inputs).
    passes: how many passes through the blocks carry them (None: every one).
    checkpointing: whether the model would checkpoint its blocks now; then each block is
        checkpointed here, with its layout bound to the recomputation.
    pause_checkpointing: [(object, attribute)] flags turned off for the context, so the
        model's own checkpointing (which would recompute without the layout) stays out.
    checkpoint_attrs: per-block checkpointing flags turned off inside each block call.
    passthrough: (args, kwargs) -> True for block calls whose output is not the tokens
        (DINO's return_attention): their output is returned whole, query rows included.
    """
    for block, _ in blocks:
        if "forward" in block.__dict__:
            raise RuntimeError(f"{type(block).__name__} already carries query tokens (nested "
                               "query_tokens contexts) or has its forward replaced")
    if passes is not None and (isinstance(passes, bool) or not isinstance(passes, int) or passes < 1):
        raise ValueError(f"passes must be None (every pass) or an int >= 1, got {passes!r}")
    state = QueryTokens(tokens, layout, final_norm, passes)
    paused = [(obj, attr, getattr(obj, attr)) for obj, attr in pause_checkpointing]
    was_checkpointing = checkpointing()
    try:
        for obj, attr, _ in paused:
            setattr(obj, attr, False)
        for i, (block, attention_modules) in enumerate(blocks):
            block.forward = _CarriedForward(_carry, block, i == 0, i == len(blocks) - 1, tuple(attention_modules),
                                            state, lambda: was_checkpointing, tuple(checkpoint_attrs), passthrough)
        yield state
    finally:
        for block, _ in blocks:
            block.__dict__.pop("forward", None)
        for obj, attr, value in paused:
            setattr(obj, attr, value)


def check_queries(queries, batch, dim):
    if not isinstance(queries, torch.Tensor) or queries.dim() != 3 or queries.shape[0] != batch \
            or queries.shape[2] != dim:
        shape = tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
        raise ValueError(f"query tokens must have shape ({batch if batch else 'batch'}, Q, {dim}), got {shape}")


def embed_crops(proj, crops, patch_size):
    """Query crops (B, Q, C, p, p) through a patch embedding's convolution: (B, Q, D),
    one token each, no positional embedding (a query crop has no place in the image)."""
    p = tuple(patch_size) if isinstance(patch_size, (tuple, list)) else (patch_size, patch_size)
    if not isinstance(crops, torch.Tensor) or crops.dim() != 5 or tuple(crops.shape[3:]) != p:
        shape = tuple(crops.shape) if isinstance(crops, torch.Tensor) else type(crops).__name__
        raise ValueError(f"query crops must have shape (batch, Q, channels, {p[0]}, {p[1]}) (one patch "
                         f"each), or be embedded tokens (batch, Q, dim); got {shape}")
    channels = getattr(proj, "in_channels", crops.shape[2])
    if crops.shape[2] != channels:
        raise ValueError(f"query crops have {crops.shape[2]} channels, the patch embedding takes {channels}")
    weight = getattr(proj, "weight", None)
    if weight is not None and crops.dtype != weight.dtype and not torch.is_autocast_enabled(crops.device.type):
        raise ValueError(f"query crops are {crops.dtype}, the patch embedding's weights {weight.dtype}: pass "
                         "crops of the images' dtype")
    batch, num = crops.shape[:2]
    tokens = proj(crops.flatten(0, 1))  # (batch * Q, dim, 1, 1)
    return tokens.view(batch, num, tokens.shape[1])  # Q = 0 too, where -1 is ambiguous

