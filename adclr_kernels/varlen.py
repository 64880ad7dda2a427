"""`VarlenLayout`: where packed sequences sit in a (total_tokens, heads, head_dim) batch."""

from __future__ import annotations

import itertools
import numbers

import torch


class VarlenLayout:
    """Where packed sequences sit in a (total_tokens, ...) batch, checked once on the host.

    Pass it as `cu_seqlens` to the varlen ops. Built once per batch layout (a trainer's
    crop layout is the same every step, and every layer shares it), it is never checked
    or copied to the device again, and the Triton kernels launch exactly one program per
    (sequence, row block) that has work, from tile tables built here on first use.

    Args:
        seqlens: length of every sequence, in order: ints (numpy's too), or a tensor,
            read once on the host.
        num_queries: query tokens at the end of each sequence: one int for all, or one
            per sequence.
        device: where the offsets and tile tables live.
    """

    def __init__(self, seqlens, num_queries=0, device=None):
        seqlens = _host_ints("seqlens", seqlens)
        if num_queries is None:
            raise TypeError("num_queries must be an int (0: no query tokens) or one int per "
                            "sequence, got None")
        if _is_scalar(num_queries):
            num_queries = [num_queries] * len(seqlens)
        num_queries = _host_ints("num_queries", num_queries)
        self.seqlens = [_host_int("seqlens", n, 0) for n in seqlens]
        self.queries = [_host_int("num_queries", n, 0) for n in num_queries]
        if len(self.queries) != len(self.seqlens):
            raise ValueError(f"num_queries must have one count per sequence "
                             f"({len(self.seqlens)}), got {len(self.queries)}")
        for s, (length, nq) in enumerate(zip(self.seqlens, self.queries)):
            if nq > length:
                raise ValueError(f"num_queries[{s}] must be in [0, {length}], got {nq}")
        offsets = [0, *itertools.accumulate(self.seqlens)]
        if offsets[-1] >= 2**31:
            raise ValueError(f"{offsets[-1]} tokens do not fit int32 offsets")
        self.total_tokens = offsets[-1]
        self.max_seqlen = max(self.seqlens, default=0)
        # (count, length, num_queries) of each run of consecutive sequences alike in both:
        # a multi-crop batch packed by resolution is one run per crop size.
        self.runs = tuple((len(list(alike)), length, nq) for (length, nq), alike
                          in itertools.groupby(zip(self.seqlens, self.queries)))
        self.cu_seqlens = torch.tensor(offsets, dtype=torch.int32,
                                       device=device if device is not None else "cpu")
        self.num_queries = torch.tensor(self.queries, dtype=torch.int32, device=self.device)
        self._tiles = {}
        self._checked = set()
        # What the op's checks concluded for calls on this layout (see attention.py).
        self.checked_calls = {}

    @property
    def device(self):
        # The tensors' own device: "cuda" given here reads back as "cuda:0", which is
        # what a tensor on it reports, so the device checks compare like with like.
        return self.cu_seqlens.device

    @classmethod
    def from_offsets(cls, offsets, num_queries=0, device=None):
        """The layout of cu_seqlens-style offsets (host ints, or a tensor: read once)."""
        offsets = _host_ints("cu_seqlens", offsets)
        if not offsets:
            raise ValueError("cu_seqlens must hold num_seqs + 1 offsets, starting at 0; got none")
        offsets = [_host_int("cu_seqlens", n, 0) for n in offsets]
        if offsets[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
        lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
        for s, length in enumerate(lengths):
            if length < 0:
                raise ValueError(f"cu_seqlens must be non-decreasing; sequence {s} has length {length}")
        return cls(lengths, num_queries, device)

    def tiles(self, block):
        """(tiles, 2) int32 table of every (sequence, block of `block` rows) with rows,
        longest sequences first (`longest_first`)."""
        if block not in self._tiles:
            counts = [-(-n // block) for n in self.seqlens]
            pairs = [(s, j) for s in longest_first(counts) for j in range(counts[s])]
            self._tiles[block] = torch.tensor(pairs, dtype=torch.int32,
                                              device=self.device).view(-1, 2)
        return self._tiles[block]

    def sequence_tiles(self, block):
        """(sequences, 2) int32 table of (s, 0), one whole-sequence tile for every sequence,
        in `longest_first` order of their blocks of `block` rows (sequences without rows
        last): the packed one-pass backward's programs."""
        key = ("sequences", block)
        if key not in self._tiles:
            order = longest_first([-(-n // block) for n in self.seqlens])
            self._tiles[key] = torch.tensor([(s, 0) for s in order], dtype=torch.int32,
                                            device=self.device).view(-1, 2)
        return self._tiles[key]

    def check(self, num_prefix, mask):
        """Every sequence has room for the prefix, and every query row sees something
        (mask: a `QueryMask`)."""
        # Plain values, not the QueryMask itself: under torch.compile the set's update is
        # replayed after the graph, and Dynamo cannot rebuild a frozen dataclass it made.
        key = (num_prefix, mask.sees_prefix, mask.sees_self, mask.sees_queries)
        if key in self._checked:
            return
        for s, (length, nq) in enumerate(zip(self.seqlens, self.queries)):
            if num_prefix > length - nq:
                raise ValueError(f"num_prefix ({num_prefix}) exceeds the {length - nq} visible "
                                 f"tokens of sequence {s}")
            if mask.sees_nothing(nq, length - nq - num_prefix, num_prefix):
                raise ValueError(f"query rows of sequence {s} would attend to nothing: it has no "
                                 f"raw tokens; {mask.seeing_advice(num_prefix)}")
        self._checked.add(key)

    def bounds(self):
        """(start, end) of every sequence."""
        ends = list(itertools.accumulate(self.seqlens))
        return list(zip([0] + ends[:-1], ends))

    def __repr__(self):
        return (f"VarlenLayout({len(self.seqlens)} sequences, {self.total_tokens} tokens, "
                f"max_seqlen={self.max_seqlen}, device={self.device})")


def longest_first(counts):
    """Sequence indices by row-block count, in classes of powers of two ([1], [2, 3],
    [4, 7], ...), the largest class first and each class in sequence order.

    A program's work grows with its sequence's length, and the programs go to the SMs in
    launch order: the longest first leave only short ones to fill the last wave (the
    longest-processing-time rule), where in the caller's order a long sequence last
    would run alone at the end. Classes rather than a full sort, so that one program on
    the device (`_varlen_schedule_kernel`) writes the same table in a pass per class.
    """
    return sorted(range(len(counts)), key=lambda s: -counts[s].bit_length())


def _is_scalar(value):
    """An int of Python's, numpy's or a 0-d array or tensor: one value, not a list."""
    return isinstance(value, numbers.Integral) or getattr(value, "ndim", None) == 0


def _host_ints(name, values):
    """values as a host list (a tensor or array read once), or a TypeError naming what
    was given where a sequence of ints belongs."""
    if isinstance(values, torch.Tensor) and values.dim() == 1:
        return values.tolist()
    if _is_scalar(values) or isinstance(values, (str, bytes, torch.Tensor)):
        raise TypeError(f"{name} must be a sequence of ints (one per sequence), got "
                        f"{type(values).__name__} {values!r}")
    try:
        return list(values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints (one per sequence), got "
                        f"{type(values).__name__}") from None


def _host_int(name, value, low):
    """A host int: Python's, numpy's, or a one-element integer tensor's or 0-d array's value."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    elif getattr(value, "ndim", None) == 0 and not isinstance(value, numbers.Number):
        value = value.item()  # a 0-d numpy array
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must hold ints, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must hold ints >= {low}, got {value!r}")
    return int(value)
