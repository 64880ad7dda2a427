"""bench.static's copy of the kernels' range arithmetic against the kernels' own.

The static model counts each program's loop trips with plain-Python mirrors of the
`@triton.jit` range helpers in adclr_kernels/attention_triton.py. Here a probe kernel runs
those helpers (in Triton's interpreter on CPU) over a grid of layouts, block sizes and
masks, and every result must equal the mirror's.
"""

import itertools

import pytest
import torch
import triton
import triton.language as tl

from adclr_kernels.attention_triton import (PREFIX_BLOCK, _dkdv_passes, _dkdv_row_range, _first_columns,
                                            _key_ranges, _onepass_passes)
from adclr_kernels.mask import QueryMask
from bench import static as S

OUTPUTS = 16  # lo1, hi1, lo2, hi2, p_hi (row block m0); lo, hi, a0, a1, b0, b1, r0 (key block m0);
# q_hi, raw_hi (the one-pass backward's key block m0, under the default rule); n_left, t0 (the
# columns the forward's first tile, first columns wide, holds past the prefix, and where its
# key steps start)


@triton.jit
def _ranges_probe(CASES, OUT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEES_PREFIX: tl.constexpr,
                  SEES_QUERIES: tl.constexpr, FIRST: tl.constexpr):
    case = CASES + 5 * tl.program_id(0)
    m0 = tl.load(case)
    seq_len = tl.load(case + 1)
    key_len = tl.load(case + 2)
    visible = tl.load(case + 3)
    num_prefix = tl.load(case + 4)
    lo1, hi1, lo2, hi2, p_hi = _key_ranges(m0, seq_len, key_len, visible, num_prefix, BLOCK_M,
                                           SEES_PREFIX, SEES_QUERIES)
    lo, hi = _dkdv_row_range(m0, seq_len, visible, num_prefix, BLOCK_N, SEES_PREFIX, SEES_QUERIES)
    a0, a1, b0, b1, r0 = _dkdv_passes(m0, lo, hi, visible, num_prefix, BLOCK_N, SEES_PREFIX,
                                      SEES_QUERIES)
    out = OUT + OUTPUTS * tl.program_id(0)
    tl.store(out, lo1)
    tl.store(out + 1, hi1)
    tl.store(out + 2, lo2)
    tl.store(out + 3, hi2)
    tl.store(out + 4, p_hi)
    tl.store(out + 5, lo)
    tl.store(out + 6, hi)
    tl.store(out + 7, a0)
    tl.store(out + 8, a1)
    tl.store(out + 9, b0)
    tl.store(out + 10, b1)
    tl.store(out + 11, r0)
    q_hi, raw_hi = _onepass_passes(m0, seq_len, visible, num_prefix, BLOCK_N)
    tl.store(out + 12, q_hi)
    tl.store(out + 13, raw_hi)
    n_left, t0 = _first_columns(lo1, hi1, p_hi, BLOCK_N, FIRST)
    tl.store(out + 14, n_left)
    tl.store(out + 15, t0)


def _cases(block):
    """(m0, seq_len, key_len, visible, num_prefix): block starts from 0 to one block past
    the end, over layouts with and without prefix, raw and query tokens, prefixes wider
    than a block, and k/v that hold only the visible tokens."""
    for seq_len, num_queries, num_prefix in [(1, 0, 1), (5, 5, 0), (7, 3, 0), (40, 10, 1), (50, 0, 4),
                                             (97, 10, 70), (130, 33, 5), (207, 10, 1), (75, 40, 35)]:
        visible = seq_len - num_queries
        for key_len in {seq_len, visible}:
            for m0 in range(0, seq_len + block + 1, block):
                yield m0, seq_len, key_len, visible, num_prefix


def _mirror(case, block_m, block_n, mask, first):
    m0, seq_len, key_len, visible, num_prefix = case
    lo1, hi1, lo2, hi2, p_hi = S._key_ranges(m0, seq_len, key_len, visible, num_prefix, block_m, mask)
    lo, hi = S._dkdv_row_range(m0, seq_len, visible, num_prefix, block_n, mask)
    return [lo1, hi1, lo2, hi2, p_hi, lo, hi, *S._dkdv_passes(m0, lo, hi, visible, num_prefix, block_n, mask),
            *S._onepass_passes(m0, seq_len, visible, num_prefix, block_n),
            *S._first_columns(lo1, hi1, p_hi, block_n, first)]


MASKS = [QueryMask(*flags) for flags in itertools.product((False, True), repeat=3) if flags[1] or not flags[2]]


@pytest.mark.parametrize("block_m,block_n,first", [(16, 32, 16), (32, 16, 16), (64, 64, 32), (128, 32, 16)])
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "psq=" + "".join("01"[x] for x in (
    m.sees_prefix, m.sees_self, m.sees_queries)))
def test_mirror_equals_the_kernels_range_arithmetic(block_m, block_n, first, mask):
    # Positions on both block grids: m0 is a row block's start and a key block's.
    cases = sorted(set(_cases(block_m)) | set(_cases(block_n)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    table = torch.tensor(cases, dtype=torch.int32, device=device)
    out = torch.full((len(cases), OUTPUTS), -1, dtype=torch.int32, device=device)
    _ranges_probe[(len(cases),)](table, out, BLOCK_M=block_m, BLOCK_N=block_n, SEES_PREFIX=mask.sees_prefix,
                                 SEES_QUERIES=mask.sees_queries, FIRST=first)
    for case, got in zip(cases, out.tolist()):
        assert got == _mirror(case, block_m, block_n, mask, first), f"{case} (m0, seq, keys, visible, prefix)"


def test_mirror_walks_the_prefix_in_the_kernels_groups():
    assert S.PREFIX_BLOCK == getattr(PREFIX_BLOCK, "value", PREFIX_BLOCK)
