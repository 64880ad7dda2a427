"""QueryMask: the mask rule in PyTorch, its options as one value, and what it implies."""

import dataclasses
import re

import pytest
import torch

from adclr_kernels import visibility_mask
from adclr_kernels.mask import QueryMask
from kernel_testing import OPTION_SETS, option_id, options


def test_mask_rule_by_hand():
    # P=1, N=2, Q=2 with query_sees_prefix: rows 0-2 see 0-2; rows 3-4 see 0-2.
    m = visibility_mask(5, 5, 2, 1, query_sees_prefix=True)
    assert m.tolist() == [[1, 1, 1, 0, 0]] * 5
    # Default: queries skip the prefix; with self: the diagonal is added.
    m = visibility_mask(5, 5, 2, 1, query_sees_self=True).int().tolist()
    assert m[3] == [0, 1, 1, 1, 0] and m[4] == [0, 1, 1, 0, 1] and m[0] == [1, 1, 1, 0, 0]
    m = visibility_mask(5, 5, 2, 1, query_sees_queries=True).int().tolist()
    assert m[3] == [0, 1, 1, 1, 1]


def test_sees_queries_implies_sees_self():
    assert QueryMask(sees_queries=True).sees_self
    assert QueryMask(False, False, True) == QueryMask(False, True, True)
    assert hash(QueryMask(True, False, True)) == hash(QueryMask(True, True, True))
    with pytest.raises(dataclasses.FrozenInstanceError):
        QueryMask().sees_self = True


@pytest.mark.parametrize("field", ["sees_prefix", "sees_self", "sees_queries"])
def test_options_are_bools_and_errors_name_the_public_argument(field):
    import numpy as np

    with pytest.raises(TypeError, match=f"query_{field} must be a Python bool, got int 1"):
        QueryMask(**{field: 1})
    # numpy's bool is not Python's, though both are named bool.
    with pytest.raises(TypeError, match=rf"query_{field} must be a Python bool, got numpy\.bool_? (np\.)?True"):
        QueryMask(**{field: np.bool_(True)})


@pytest.mark.parametrize("opt_set", OPTION_SETS, ids=option_id)
def test_public_options_and_visibility_mask_say_the_same(opt_set):
    mask = QueryMask(*opt_set)
    assert mask.options() == options(opt_set) | dict(query_sees_self=opt_set[1] or opt_set[2])
    assert torch.equal(visibility_mask(9, 9, 3, 2, **options(opt_set)), mask.matrix(9, 9, 3, 2))


@pytest.mark.parametrize("opt_set", OPTION_SETS, ids=option_id)
@pytest.mark.parametrize("num_prefix,num_raw,num_queries", [
    (0, 0, 3), (2, 0, 3), (1, 4, 3), (0, 4, 0), (2, 0, 0)])
def test_what_it_implies_agrees_with_its_matrix(opt_set, num_prefix, num_raw, num_queries):
    mask = QueryMask(*opt_set)
    seq = num_prefix + num_raw + num_queries
    m = mask.matrix(seq, seq, num_queries, num_prefix)
    empty_query_row = bool((~m[seq - num_queries:].any(1)).any())
    assert mask.sees_nothing(num_queries, num_raw, num_prefix) == empty_query_row
    assert mask.needs_query_keys(num_queries) == bool(m[:, seq - num_queries:].any())


@pytest.mark.parametrize("args,message", [
    ((6, 6, 10, 1), "num_prefix + num_queries must be at most seq_len = 6, got 1 + 10"),
    ((4, 4, 0, 9), "num_prefix + num_queries must be at most seq_len = 4, got 9 + 0"),
    ((6, 6, -1, 1), "num_queries must be an int >= 0, got -1"),
    ((6, 5.0, 2, 1), "key_len must be an int >= 0, got 5.0"),
    ((6, 3, 2, 1), "key_len must be 6 or 4 here, got 3"),
])
def test_visibility_mask_refuses_what_no_call_could_be(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        visibility_mask(*args)


def test_visibility_mask_needs_the_query_keys_when_an_option_reads_them():
    with pytest.raises(ValueError, match=re.escape("key_len must be 6 here, got 4")):
        visibility_mask(6, 4, 2, 1, query_sees_self=True)
