"""Typical competitors: expectations over independent draws, checked against enumerating every draw."""

import itertools

import pytest
import torch

from circuits.competitors import draw_expectations, expected_share


def _enumerate(A, w, p, c):
    """E[1 / (A + S)] and E[1 / (A + w_j + S')] by summing over all n^c (and n^(c-1)) draws."""
    inv = torch.zeros_like(A)
    each = torch.zeros(A.numel(), w.numel(), dtype=A.dtype)
    for draw in itertools.product(range(w.numel()), repeat=c):
        inv += torch.prod(p[list(draw)]) / (A + w[list(draw)].sum())
    for draw in itertools.product(range(w.numel()), repeat=c - 1):
        prob = torch.prod(p[list(draw)]) if draw else torch.tensor(1.0, dtype=A.dtype)
        each += prob / (A[:, None] + w[None] + (w[list(draw)].sum() if draw else 0.0))
    return inv, each


@pytest.mark.parametrize("c", [1, 2, 3])
@pytest.mark.parametrize("heavy", [False, True])
def test_draw_expectations_match_enumeration(c, heavy):
    g = torch.Generator().manual_seed(c + 10 * heavy)
    w = (torch.randn(6, generator=g, dtype=torch.float64) * 3).exp()
    p = torch.rand(6, generator=g, dtype=torch.float64)
    if heavy:  # a rare token that takes all attention when drawn
        w[0], p[0] = 1e4, 0.002 * p[1:].sum()
    p = p / p.sum()
    A = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    inv, each = draw_expectations(A, w.expand(3, -1), p, c)
    want_inv, want_each = _enumerate(A, w, p, c)
    assert torch.allclose(inv, want_inv, rtol=1e-3)
    assert torch.allclose(each, want_each, rtol=2e-2)


def test_a_rare_heavy_competitor_dims_a_key_only_when_drawn():
    """Against the mean competitor the first key would get 1 / (1 + 0.99 * 1 + 0.01 * 1000) = 0.08;
    averaged over the draw it gets about 0.99 * 1/2."""
    w = torch.tensor([[1.0, 1000.0, 1.0]], dtype=torch.float64)
    f = torch.tensor([0.99, 0.01, 0.0], dtype=torch.float64)
    share = expected_share(w, f, competitors=1.0)
    assert float(share[0, 0]) == pytest.approx(0.99 * 0.5 + 0.01 / 1001, rel=1e-2)
    assert torch.equal(expected_share(w, f, competitors=0.0), torch.ones_like(w))
    with pytest.raises(ValueError, match="at least 1"):
        expected_share(w, f, competitors=0.5)
