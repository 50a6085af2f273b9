"""The references against each other and against torch's SDPA where semantics agree."""
import math

import pytest
import torch
import torch.nn.functional as F

from tileattn.reference import (
    attention_ref,
    linear_attention_quadratic_ref,
    linear_attention_recurrent_ref,
    visible_mask,
)
from helpers import randn, rel_err


@pytest.mark.parametrize(
    "nq,nk,causal,gqa",
    [
        pytest.param(17, 17, False, 1, id="dense-17"),
        pytest.param(33, 33, True, 1, id="causal-33"),
        pytest.param(20, 20, True, 2, id="causal-gqa2"),
        pytest.param(5, 9, False, 4, id="nq<nk-gqa4"),
    ],
)
def test_attention_ref_matches_sdpa(nq, nk, causal, gqa):
    q = randn(2, 4, nq, 24, dtype=torch.float64)
    k = randn(2, 4 // gqa, nk, 24, dtype=torch.float64)
    v = randn(2, 4 // gqa, nk, 16, dtype=torch.float64)
    out, lse = attention_ref(q, k, v, causal=causal)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa > 1)
    assert rel_err(out, ref) < 1e-12
    s = torch.matmul(q, k.repeat_interleave(gqa, 1).transpose(-1, -2)) / math.sqrt(24)
    s = s.masked_fill(~visible_mask(nq, nk, causal=causal), float("-inf"))
    assert rel_err(lse, torch.logsumexp(s, -1)) < 1e-12


def test_attention_ref_bool_mask_matches_sdpa():
    q, k, v = (randn(2, 3, 19, 16, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 1, 19, 19) > 0.3
    mask[..., 0] = True  # SDPA gives NaN for empty rows; keep every row non-empty here
    out, _ = attention_ref(q, k, v, mask=mask)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) < 1e-12


def test_visible_mask_alignment():
    # bottom-right causal: with nq=2, nk=4 query 0 sees keys 0..2
    m = visible_mask(2, 4, causal=True)
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]
    w = visible_mask(4, 4, window=(1, 0))
    assert w.sum(-1).tolist() == [1, 2, 2, 2]
    assert torch.equal(visible_mask(6, 6, causal=True), torch.ones(6, 6, dtype=torch.bool).tril())


def test_attention_ref_masked_rows_are_zero_and_finite():
    q = randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    k = randn(1, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    v = randn(1, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    out, lse = attention_ref(q, k, v, causal=True)  # nq > nk: first 3 rows see nothing
    assert torch.all(out[:, :, :3] == 0) and torch.all(torch.isneginf(lse[:, :, :3]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, :3] == 0)


@pytest.mark.parametrize("decay", [None, "small", "large"])
@pytest.mark.parametrize("with_state", [False, True])
def test_linear_refs_agree(decay, with_state):
    b, h, n, d, dv = 2, 3, 23, 8, 12
    q, k = randn(b, h, n, d, dtype=torch.float64), randn(b, h, n, d, dtype=torch.float64)
    v = randn(b, h, n, dv, dtype=torch.float64)
    rates = None if decay is None else torch.rand(h, dtype=torch.float64) * (0.1 if decay == "small" else 5.0)
    s0 = torch.randn(b, h, d, dv, dtype=torch.float64) if with_state else None
    o1, s1 = linear_attention_quadratic_ref(q, k, v, rates, initial_state=s0)
    o2, s2 = linear_attention_recurrent_ref(q, k, v, rates, initial_state=s0)
    assert rel_err(o1, o2) < 1e-12 and rel_err(s1, s2) < 1e-12


def test_linear_ref_chunking_equals_one_call():
    b, h, n, d = 1, 2, 20, 8
    q, k, v = (randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    rates = torch.tensor([0.3, 0.01], dtype=torch.float64)
    o, s = linear_attention_quadratic_ref(q, k, v, rates)
    oa, sa = linear_attention_quadratic_ref(q[:, :, :7], k[:, :, :7], v[:, :, :7], rates)
    ob, sb = linear_attention_quadratic_ref(q[:, :, 7:], k[:, :, 7:], v[:, :, 7:], rates, initial_state=sa)
    assert rel_err(torch.cat([oa, ob], 2), o) < 1e-12 and rel_err(sb, s) < 1e-12
