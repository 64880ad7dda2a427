"""What a row cannot see cannot reach it (docs/operator.md, "The mask").

The property: a non-finite value (NaN, +inf, -inf) put into any q, k or v position
leaves every output and gradient that does not depend on it bitwise as it was. What may
depend on it:

- a value in q[t] reaches row t: its output and dq[t], and through row t's probabilities
  dk and dv of the columns row t sees;
- a value in k[t] or v[t] reaches the rows that see column t (their outputs and dq), and
  dk, dv of every column those rows see (column t among them).

Everything else (other rows, columns no affected row sees, a column nobody sees) must not
move by a bit, and dk, dv of a column nobody sees are 0. Each call holds five sequences,
each with its own poisoned position: a prefix token, a raw token, the last raw token,
the first and the last query token; which of q, k, v and which value (NaN, +inf, -inf)
rotate with the call, so that every backend meets each value in each tensor at each
position (9 consecutive calls cover the 9 pairs). The layouts put raw and query rows into
one row block, prefix columns into one key tile with raw ones, spread the keys over
several tiles, and pack sequences of three layouts into one varlen batch (one tile
table). k and v always hold the query tokens, also where no option reads them.

The Triton interpreter runs each program in Python, so the kernels take every option in
both geometries (batched, packed), alternating between the q, k, v and the packed-qkv
forms, which differ only outside the kernels; the PyTorch backends take every form.
"""

import pytest
import torch

from adclr_kernels import (VarlenLayout, unidirectional_attention, unidirectional_attention_qkvpacked,
                           unidirectional_attention_varlen, unidirectional_attention_varlen_qkvpacked)
from kernel_testing import DEVICE, ON_CUDA, OPTION_SETS, backend_param, mask_of, option_id, options

NUM_PREFIX = 2
if ON_CUDA:  # the GPU tiles: ViT-S/16's 207 tokens, 128-row blocks mixing raw and query rows
    BATCHED = [(194, 11)] * 5
    VARLEN = [(194, 11), (34, 1), (9, 2), (40, 6), (194, 11)]
else:        # the interpreter's 32-row tiles: one block, or two (L = 48, V = 42)
    BATCHED = [(22, 5)] * 5
    VARLEN = [(40, 6), (22, 5), (9, 2), (40, 6), (22, 5)]  # one tile table
HEADS = 1
VALUES = (float("nan"), float("inf"), float("-inf"))
ROLES = ("prefix", "raw", "last raw", "first query", "last query")  # one sequence each
FORMS = ("batched", "qkvpacked", "varlen", "varlen_qkvpacked")


def _cases(call):
    """(q/k/v, role, value) of each sequence of the call-th call."""
    return [(tensor, role, VALUES[(r + call // 3) % 3])
            for r, role in enumerate(ROLES) for tensor in [(r + call) % 3]]


def _param_list():
    for backend in ("triton", "reference", "sdpa", "flex", "xformers"):
        for i, opt_set in enumerate(OPTION_SETS):
            forms = FORMS[i % 2::2] if backend == "triton" else FORMS
            for form in forms:
                yield pytest.param(backend, opt_set, form, marks=backend_param(backend).marks,
                                   id=f"{backend}-{option_id(opt_set)}-{form}")


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: a second intra-op thread only waits, and on a loaded
    machine its spinning made each PyTorch call 100 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _position(role, num_raw, num_queries):
    visible = NUM_PREFIX + num_raw
    return {"prefix": 0, "raw": NUM_PREFIX + num_raw // 2, "last raw": visible - 1,
            "first query": visible, "last query": visible + num_queries - 1}[role]


def _reach(mask, num_raw, num_queries, tensor, position):
    """(rows, columns): the rows whose output and dq, and the columns whose dk and dv, a
    value at `position` of q, k or v (tensor 0, 1, 2) may change."""
    seq = NUM_PREFIX + num_raw + num_queries
    sees = mask.matrix(seq, seq, num_queries, NUM_PREFIX)
    if tensor == 0:
        rows = torch.zeros(seq, dtype=torch.bool)
        rows[position] = True
    else:
        rows = sees[:, position].clone()
    return rows, sees[rows].any(0)


def _inputs(layouts):
    """q, k, v as (tokens, heads, head_dim) slices of one packed projection, and the
    finite gradient of the output."""
    tokens = sum(NUM_PREFIX + n + q for n, q in layouts)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(tokens, 3, HEADS, 16, generator=g).to(DEVICE)
    grad_out = torch.randn(tokens, HEADS, 16, generator=g).to(DEVICE)
    return qkv, grad_out


def _poison(qkv, layouts, mask, cases):
    """A copy of qkv with one of the cases written into each sequence; the (tokens,)
    masks of what may change: rows (out) and, per q/k/v, the gradient rows (dq follows
    the rows, dk and dv the columns); the columns nobody sees; and each sequence's
    (first token, case, rows)."""
    dirty = qkv.clone()
    may_rows = torch.zeros(qkv.shape[0], dtype=torch.bool)
    may_grads = torch.zeros(3, qkv.shape[0], dtype=torch.bool)
    unseen = torch.zeros(qkv.shape[0], dtype=torch.bool)
    slices, start = [], 0
    for (num_raw, num_queries), case in zip(layouts, cases):
        seq = NUM_PREFIX + num_raw + num_queries
        tensor, role, value = case
        position = _position(role, num_raw, num_queries)
        dirty[start + position, tensor] = value
        rows, cols = _reach(mask, num_raw, num_queries, tensor, position)
        may_rows[start:start + seq] = rows
        may_grads[0, start:start + seq] = rows
        may_grads[1:, start:start + seq] = cols
        unseen[start:start + seq] = ~mask.matrix(seq, seq, num_queries, NUM_PREFIX).any(0)
        slices.append((start, case, rows))
        start += seq
    return dirty, may_rows.to(DEVICE), may_grads.to(DEVICE), unseen.to(DEVICE), slices


def _run(form, backend, qkv, grad_out, layouts, opts, grads):
    """Output (tokens, heads, dim) and, with grads, d(q, k, v) as (3, tokens, heads, dim)."""
    qkv = qkv.detach().requires_grad_(grads)
    kw = dict(backend=backend, **opts)
    if form in ("batched", "qkvpacked"):
        batch, seq = len(layouts), NUM_PREFIX + sum(layouts[0])
        packed = qkv.view(batch, seq, 3, HEADS, -1)
        if form == "batched":
            q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
            out = unidirectional_attention(q, k, v, layouts[0][1], NUM_PREFIX, **kw).transpose(1, 2)
        else:
            out = unidirectional_attention_qkvpacked(packed, layouts[0][1], NUM_PREFIX, **kw)
        out = out.reshape(qkv.shape[0], HEADS, -1)
    else:
        layout = VarlenLayout([NUM_PREFIX + n + q for n, q in layouts], [q for _, q in layouts],
                              device=DEVICE)
        if form == "varlen":
            out = unidirectional_attention_varlen(*qkv.unbind(1), layout, None, NUM_PREFIX, **kw)
        else:
            out = unidirectional_attention_varlen_qkvpacked(qkv, layout, None, NUM_PREFIX, **kw)
    if not grads:
        return out.detach(), None
    (dqkv,) = torch.autograd.grad(out, qkv, grad_out)
    return out.detach(), dqkv.transpose(0, 1)


def _leak(moved, slices, layouts, what):
    """The first sequence where `what` moved outside what may change, in words."""
    token = moved.nonzero()[0].item()
    s, (start, (tensor, role, value), _) = max((x for x in enumerate(slices) if x[1][0] <= token),
                                               key=lambda x: x[1][0])
    num_raw, num_queries = layouts[s]
    return (f"{what}[token {token - start}] of sequence {s} (P={NUM_PREFIX}, N={num_raw}, "
            f"Q={num_queries}) moved for {value} in {'qkv'[tensor]} at the {role} token, "
            "which it does not depend on")


@pytest.mark.parametrize("backend,opt_set,form", list(_param_list()))
def test_a_value_reaches_only_what_depends_on_it(backend, opt_set, form, poisoned):
    opts = options(opt_set)
    layouts = BATCHED if form in ("batched", "qkvpacked") else VARLEN
    qkv, grad_out = _inputs(layouts)
    cases = _cases(4 * OPTION_SETS.index(opt_set) + FORMS.index(form))
    dirty_qkv, may_rows, may_grads, unseen, slices = _poison(qkv, layouts, mask_of(opts), cases)
    # PyTorch has no flex backward on CPU: there the forward alone is held to the rule.
    grads = not (backend == "flex" and not ON_CUDA)
    with torch.set_grad_enabled(grads):
        clean, clean_grads = _run(form, backend, qkv, grad_out, layouts, opts, grads)
        dirty, dirty_grads = _run(form, backend, dirty_qkv, grad_out, layouts, opts, grads)

    assert torch.isfinite(clean).all() and (not grads or torch.isfinite(clean_grads).all())
    results = [("out", clean, dirty, may_rows)]
    if grads:
        results += [(f"d{'qkv'[i]}", clean_grads[i], dirty_grads[i], may_grads[i]) for i in range(3)]
        for dkv in (clean_grads[1:], dirty_grads[1:]):
            assert (dkv[:, unseen] == 0).all(), "dk, dv of a column nobody sees are not 0"
    for what, a, b, may in results:
        moved = ~(a == b).all(-1) & ~may[:, None]
        assert not moved.any(), _leak(moved.any(-1), slices, layouts, what)
    # Not vacuous: a NaN reaches the outputs of the rows that see it. The op's own
    # backends make each of them NaN; PyTorch's are held to moving them (on an AVX-512
    # CPU, torch 2.13's sdpa gives a query row holding a NaN an output of zeros).
    for start, (_, role, value), rows in slices:
        if value != value and rows.any():
            seen_by = slice(start, start + rows.numel())
            reached = dirty[seen_by][rows.to(DEVICE)]
            if backend in ("triton", "reference"):
                missed = ~reached.isnan().flatten(1).any(1)
                assert not missed.any(), (f"a NaN at the {role} token did not reach row "
                                          f"{rows.nonzero()[missed.nonzero()[0].item()].item()}, which sees it")
            else:
                before = clean[seen_by][rows.to(DEVICE)]
                assert (reached != before).any(), f"a NaN at the {role} token moved no row"
