"""The pair chain: placements from the model after two tokens, exact at full branching, the
one-token chain at none."""

import itertools

import pytest
import torch

from circuits.pair_chain import pair_chain
from circuits.token_view import token_view


class _PairTable(torch.nn.Module):
    """A stand-in model whose next-token logits after [a, b] are `table[a, b]`."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, tokens):
        return torch.stack([self.table[tokens[:, 0], tokens[:, 1]]] * 2, 1)


def test_pair_chain_places_by_what_came_two_tokens_back():
    """toys . -> one, flower . -> he; after "." alone, he and one are equally likely. Two tokens
    before ' he' the one-token chain sees toys and flower alike; the pair chain sees only flower."""
    toys, flower, dot, he, one = range(5)
    step = torch.full((5, 5), 1e-9)
    step[toys, dot] = step[flower, dot] = step[he, toys] = step[one, flower] = 1.0
    step[dot, he] = step[dot, one] = 0.5
    step = step / step.sum(-1, keepdim=True)
    table = step.log()[None].repeat(5, 1, 1)  # every pair backs onto its last token ...
    table[toys, dot] = torch.tensor([-30.0, -30, -30, -30, 0])  # ... except "toys ." -> one
    table[flower, dot] = torch.tensor([-30.0, -30, -30, 0, -30])  # and "flower ." -> he
    freq = torch.full((5,), 0.2)
    ids = torch.arange(5)
    pairs = pair_chain(_PairTable(table), ids, step, freq, branching=5).offset_presence(he, [2])[0]
    alone = pair_chain(_PairTable(table), ids, step, freq, branching=0).offset_presence(he, [2])[0]
    assert float(pairs[flower]) == pytest.approx(1.0, abs=1e-6) and float(pairs[toys]) < 1e-6
    assert float(alone[flower]) == pytest.approx(float(alone[toys]), rel=1e-5) and float(alone[toys]) > 0.4
    # Where a '.' is followed by ' he', the token before it is flower; any '.' as likely follows toys.
    chain = pair_chain(_PairTable(table), ids, step, freq, branching=5)
    then_he = torch.zeros(5).index_fill_(0, torch.tensor([he]), 1.0)
    anywhere = chain.offset_presence(dot, [1])[0]
    before_he = chain.offset_presence(dot, [1], then_he)[0]
    assert float(anywhere[flower]) == pytest.approx(float(anywhere[toys]), rel=1e-5)
    assert float(before_he[flower]) == pytest.approx(1.0, abs=1e-6) and float(before_he[toys]) < 1e-6


def test_full_branching_is_the_second_order_chain_summed_over_every_path(tiny_model):
    """Every path s -> x_1 -> ... -> q of the model's own chain, enumerated on six live tokens."""
    mask = torch.zeros(tiny_model.cfg.d_vocab, dtype=torch.bool)
    mask[[3, 5, 8, 13, 21, 34]] = True
    view = token_view(tiny_model, live=mask, pair_branching=6)
    ids, n = view.ids, 6
    step, freq = view.step(), view.frequency
    with torch.no_grad():
        logits = tiny_model(torch.cartesian_prod(ids, ids))[:, -1].float()
    P2 = logits.log_softmax(-1)[:, ids].exp().view(n, n, n)
    P2 = P2 / P2.sum(-1, keepdim=True)  # P(c | a, b) over the live tokens
    q = 2
    then = torch.tensor([1.0, 0, 0, 0, 1, 0])  # the query followed by ids[0] or ids[4]
    for k, followed in itertools.product((1, 2, 3), (False, True)):
        brute = torch.zeros(n, dtype=torch.float64)
        for s in range(n):
            for middle in itertools.product(range(n), repeat=k - 1):
                path = (s, *middle, q)
                p = float(freq[s] * step[s, path[1]])
                for a, b, c in zip(path, path[1:], path[2:]):
                    p *= float(P2[a, b, c])
                if followed:
                    p *= float((P2[path[-2], q] * then).sum())
                brute[s] += p
        brute /= brute.sum()
        got = view.offset_presence(q, [k], then if followed else None)[0].double()
        assert torch.allclose(got, brute, atol=1e-6), (k, followed)


def test_no_branching_is_the_one_token_chain_and_rows_are_distributions(tiny_model):
    with_pairs = token_view(tiny_model, live="all", pair_branching=8)
    alone = token_view(tiny_model, live="all", pair_branching=0)
    assert alone.pairs is None and with_pairs.pairs is not None
    offsets = [1, 2, 5]
    none = pair_chain(tiny_model, alone.ids, alone.step(), alone.frequency, branching=0)
    assert torch.allclose(none.offset_presence(4, offsets), alone.offset_presence(4, offsets), atol=1e-6)
    sparse = with_pairs.offset_presence(4, offsets)
    assert torch.allclose(sparse.sum(-1), torch.ones(3), atol=1e-5) and float(sparse.min()) >= 0
    assert torch.allclose(sparse[0], alone.offset_presence(4, [1])[0], atol=1e-6)  # one step: no pair yet
    assert not torch.allclose(sparse[1:], alone.offset_presence(4, offsets)[1:], atol=1e-4)
