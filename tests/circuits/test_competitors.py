"""Typical competitors: expectations over independent draws, checked against enumerating every draw."""

import itertools

import pytest
import torch

from circuits.competitors import draw_expectations, expected_share, free_offsets, pool_draw


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
    w = torch.tensor([1.0, 1000.0, 1.0], dtype=torch.float64)
    f = torch.tensor([0.99, 0.01, 0.0], dtype=torch.float64)
    free = torch.ones(3, 1, dtype=torch.bool)
    share = expected_share(w, w[None], free, f, competitors=1.0)
    assert float(share[0]) == pytest.approx(0.99 * 0.5 + 0.01 / 1001, rel=1e-4)
    assert torch.equal(expected_share(w, w[None], free, f, competitors=0.0), torch.ones_like(w))
    with pytest.raises(ValueError, match="at least 1"):
        expected_share(w, w[None], free, f, competitors=0.5)


@pytest.mark.parametrize("per_key", [False, True])
def test_one_grid_for_every_key_agrees_with_a_quadrature_per_key(per_key):
    """expected_share (one grid in t for every key of a query) against draw_expectations (nodes per
    key) on a pool over three offsets, each key leaving its own offset free, heavy tails included."""
    g = torch.Generator().manual_seed(1)
    O, n = 3, 40
    pool = (torch.randn(O, n, generator=g, dtype=torch.float64) * 3).exp()
    pool[1, 0] = 1e5  # a token that takes everything when drawn at offset 2
    draw = torch.rand(n, n, generator=g, dtype=torch.float64) if per_key else torch.rand(n, generator=g, dtype=torch.float64)
    draw = draw / draw.sum(-1, keepdim=True)
    own = torch.randint(0, O, (n,), generator=g)
    weight = pool[own, torch.arange(n)]
    free = free_offsets((1, 2, 3), (own + 1)[:, None])
    got = expected_share(weight, pool, free, draw, competitors=15.0)
    inv, _ = draw_expectations(weight, pool.reshape(-1).expand(n, -1), pool_draw(free, draw), 15.0, nodes=200, each=False)
    assert torch.allclose(got, weight * inv, rtol=1e-4)


def test_competitors_sit_where_the_keys_do_not():
    """A draw is a free offset of the window (uniformly) and then a token: a key two back leaves
    offsets 1 and 3 of a 3-offset window, each with half the token draw."""
    taken = torch.tensor([[2], [-1]])
    free = free_offsets((1, 2, 3), taken)
    assert free.tolist() == [[True, False, True], [True, True, True]]
    draw = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    p = pool_draw(free, draw)
    assert torch.allclose(p[0], torch.tensor([0.125, 0.375, 0.0, 0.0, 0.125, 0.375]))
    assert torch.allclose(p.sum(-1), torch.ones(2))
    with pytest.raises(ValueError, match="nowhere to sit"):
        pool_draw(free_offsets((2,), taken[:1]), draw[:1])
