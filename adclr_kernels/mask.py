"""What query tokens see: the mask rule of ADCLR's unidirectional attention.

Token layout of one sequence, with V = P + N visible ("raw") tokens:

    [ P prefix | N raw patches | Q query tokens ]
      0 .. P-1   P .. V-1        V .. L-1

For row i and key column j:
- rows i < V (prefix and raw) see columns j < V;
- query rows see the raw columns P <= j < V, plus the prefix columns with
  `sees_prefix`, plus column i with `sees_self`, plus every query column with
  `sees_queries` (which implies `sees_self`).

`QueryMask.sees` is the rule in PyTorch (the only place it is written so); the Triton
kernels state it again as the column ranges each row block walks (`attention_triton`).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class QueryMask:
    """The three options of what query rows see, as one value.

    The public functions take them as flat keywords (query_sees_prefix=...,
    query_sees_self=..., query_sees_queries=...); inside the package they travel as one
    QueryMask. sees_queries implies sees_self: QueryMask(sees_queries=True).sees_self is
    True.
    """
    sees_prefix: bool = False
    sees_self: bool = False
    sees_queries: bool = False

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, bool):
                kind = type(value)
                name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
                raise TypeError(f"query_{field.name} must be a Python bool, got {name} {value!r}")
        if self.sees_queries:
            object.__setattr__(self, "sees_self", True)

    def options(self):
        """The public keyword arguments that say the same."""
        return dict(query_sees_prefix=self.sees_prefix, query_sees_self=self.sees_self,
                    query_sees_queries=self.sees_queries)

    def needs_query_keys(self, num_queries):
        """Whether query rows read the keys of query tokens (k, v must hold them)."""
        return num_queries > 0 and self.sees_self

    def key_lengths(self, seq_len, num_queries):
        """The lengths k and v may have: seq_len, or also seq_len - num_queries (the query
        keys left out) where no query row reads them."""
        return (seq_len,) if self.needs_query_keys(num_queries) else (seq_len, seq_len - num_queries)

    def sees_nothing(self, num_queries, num_raw, num_prefix):
        """Whether query rows would attend to no column at all."""
        return (num_queries > 0 and num_raw == 0 and not (self.sees_prefix and num_prefix > 0)
                and not self.sees_self)

    def seeing_advice(self, num_prefix):
        """What a caller whose query rows see nothing (`sees_nothing`) can set."""
        if self.sees_prefix and num_prefix == 0:
            return ("query_sees_prefix adds nothing without prefix tokens (num_prefix 0); set "
                    "query_sees_self or query_sees_queries")
        return "set query_sees_prefix, query_sees_self or query_sees_queries"

    def sees(self, i, j, visible, num_prefix):
        """The rule on index tensors i (rows) and j (columns); True where i sees j."""
        query_row = i >= visible
        query_col = j >= visible
        sees_visible_col = ~query_row | (j >= num_prefix) | self.sees_prefix
        sees_query_col = query_row & (((i == j) & self.sees_self) | self.sees_queries)
        return torch.where(query_col, sees_query_col, sees_visible_col)

    def matrix(self, seq_len, key_len, num_queries, num_prefix, device=None):
        """Boolean (seq_len, key_len) matrix, True where row i may attend to column j."""
        i = torch.arange(seq_len, device=device)[:, None]
        j = torch.arange(key_len, device=device)[None, :]
        return self.sees(i, j, seq_len - num_queries, num_prefix)


_MASKS = {}


def query_mask(sees_prefix=False, sees_self=False, sees_queries=False):
    """The QueryMask of these options, built once per combination: a dataclass's checks
    cost a call of the op more host time than its kernels' arguments."""
    key = (type(sees_prefix), sees_prefix, type(sees_self), sees_self, type(sees_queries),
           sees_queries)
    mask = _MASKS.get(key)
    if mask is None:
        mask = QueryMask(sees_prefix, sees_self, sees_queries)  # raises on a non-bool
        _MASKS[key] = mask
    return mask


def visibility_mask(
    seq_len: int,
    key_len: int,
    num_queries: int,
    num_prefix: int,
    query_sees_prefix: bool = False,
    query_sees_self: bool = False,
    query_sees_queries: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean (seq_len, key_len) matrix, True where row i may attend to column j.
    key_len is seq_len, or seq_len - num_queries where no option needs the query keys."""
    for name, value in (("seq_len", seq_len), ("key_len", key_len), ("num_queries", num_queries),
                        ("num_prefix", num_prefix)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if num_prefix + num_queries > seq_len:
        raise ValueError(f"num_prefix + num_queries must be at most seq_len = {seq_len}, "
                         f"got {num_prefix} + {num_queries}")
    mask = QueryMask(query_sees_prefix, query_sees_self, query_sees_queries)
    keys = mask.key_lengths(seq_len, num_queries)
    if key_len not in keys:
        raise ValueError(f"key_len must be {' or '.join(map(str, keys))} here, got {key_len}")
    return mask.matrix(seq_len, key_len, num_queries, num_prefix, device)
