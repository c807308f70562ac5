"""The virtual context behind token evidence reproduces the model's own forward pass where it should."""

import pytest
import torch

from circuits.competitors import CONTEXT_WINDOW
from circuits.directions import logit_diff_direction
from circuits.evidence import token_evidence
from circuits.token_view import token_view
from circuits.virtual_context import expected_interaction, expected_readout, virtual_readout
from hooked_bilinear import HookedBilinearTransformer

from ..conftest import tiny_config, tiny_model_with_norm_and_bias_noise


@pytest.mark.parametrize("overrides", [dict(n_key_value_heads=2), dict(normalization_type="LN", attn_bias=True, mlp_bias=True)])
def test_virtual_context_is_the_model_on_two_tokens(overrides):
    """offsets=(1,), no competitors: key b then the query is the sequence [b, q]; no key is [q]."""
    model = tiny_model_with_norm_and_bias_noise(seed=7, **overrides)
    view = token_view(model, live="all")
    u = logit_diff_direction(model, 5, [6, 7])
    q = 11
    keys = torch.tensor([[-1], [3], [30]])
    got = virtual_readout(model, view, q, keys, u, competitors=0.0, offsets=(1,))
    for value, b in zip(got, [None, 3, 30]):
        seq = torch.tensor([[q]] if b is None else [[b, q]])
        _, cache = model.run_with_cache(seq)
        truth = cache["ln_final.hook_normalized"][0, -1] @ u
        assert float(value) == pytest.approx(float(truth), rel=1e-4, abs=1e-5)


def test_evidence_routes_add_up_and_pairs_are_bilinear_terms(tiny_model):
    counts = torch.zeros(48, dtype=torch.long)
    counts[2:40] = 1
    tiny_model.token_counts = counts
    try:
        e = token_evidence(tiny_model, (5, [6, 7]), n_pairs=4)
    finally:
        del tiny_model.token_counts
    assert e.ids.tolist() == list(range(2, 40)) and e.total.shape == (38,)
    # the routes include their remainder ("chains and norms"), so they add up to the total by
    # construction; test_evidence_total_is_the_model_on_two_tokens checks the total itself
    assert torch.allclose(torch.stack(list(e.routes.values())).sum(0), e.total, atol=1e-5)
    assert "chains and norms" in e.routes and any(k.startswith("MLP1 query x") for k in e.routes)
    assert set(e.carriers) == {f"L{l}H{h}" for l in range(2) for h in range(4)}
    head, lost = e.carrier(e.top_tokens(1)[0][0])
    assert head in e.carriers and lost == float(e.carriers[head][e.labels.index(e.top_tokens(1)[0][0])])
    few = token_evidence(tiny_model, (5, [6, 7]), live="all", n_pairs=0, n_carriers=2)
    measured = ~torch.isnan(few.carriers["L0H0"])
    assert int(measured.sum()) == 4  # the top 2 of each sign
    i = int(measured.nonzero()[0, 0])
    full = token_evidence(tiny_model, (5, [6, 7]), live="all", n_pairs=0)
    assert float(few.carriers["L1H2"][i]) == pytest.approx(float(full.carriers["L1H2"][i]), abs=1e-5)
    with pytest.raises(ValueError, match="n_carriers"):
        few.carrier(few.labels[int((~measured).nonzero()[0, 0])])
    assert "(not measured)" in few.to_markdown(n=10)
    assert len(e.pairs) == 4 and e.pairs[0].value >= e.pairs[-1].value
    assert all(p.token_s != p.token_t and 2 <= int(p.token_s) < 40 for p in e.pairs)
    assert "| pair | interaction |" in e.to_markdown()


def test_evidence_total_is_the_model_on_two_tokens(tiny_model):
    """With offsets=(1,) and no competitors, a token's evidence is exactly what it changes in the
    model's own readout: the model on [b, query] minus the model on [query]."""
    e = token_evidence(tiny_model, (5, [6, 7]), query=11, live="all", competitors=0.0, offsets=(1,), n_pairs=0)
    u = logit_diff_direction(tiny_model, 5, [6, 7])
    _, alone = tiny_model.run_with_cache(torch.tensor([[11]]))
    base = alone["ln_final.hook_normalized"][0, -1] @ u
    for b in (3, 20, 40):
        _, cache = tiny_model.run_with_cache(torch.tensor([[b, 11]]))
        truth = cache["ln_final.hook_normalized"][0, -1] @ u - base
        assert float(e.total[e.ids.tolist().index(b)]) == pytest.approx(float(truth), rel=1e-4, abs=1e-5)



def test_context_presence_follows_the_models_own_chain():
    """A model that always writes 0 -> 1 -> 2 -> 0: before a 2 comes a 1 (offset 1) and a 0 (offset 2)."""
    from circuits.token_view import TokenView

    cycle = torch.full((3, 3), -1e4)
    cycle[0, 1] = cycle[1, 2] = cycle[2, 0] = 0.0
    view = TokenView(ids=torch.arange(3), resid=[], ln1_scale=[], ln2_scale=[], log_probs=cycle.log_softmax(-1),
                     frequency=torch.full((3,), 1 / 3))
    assert torch.allclose(view.context_presence(2, [1]), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    assert torch.allclose(view.context_presence(2, [1, 2]), torch.tensor([1.0, 1.0, 0.0]), atol=1e-6)
    assert torch.allclose(view.context_presence(2, [3]), torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)


def test_the_bridge_is_the_text_between_a_token_and_the_query():
    """A model that writes 0 -> 1 -> 2 -> 3 -> 0 and 4 -> 2: three before a 3, a 0 comes with a 1 and
    a 2 between it and the query; two before it, a 4 (or a 1) comes with a 2; a 4 cannot sit three
    before a 3, and keeps its usual draw."""
    from circuits.token_view import TokenView

    logits = torch.full((5, 5), -1e4)
    logits[0, 1] = logits[1, 2] = logits[2, 3] = logits[3, 0] = logits[4, 2] = 0.0
    view = TokenView(ids=torch.arange(5), resid=[], ln1_scale=[], ln2_scale=[], log_probs=logits.log_softmax(-1),
                     frequency=torch.full((5,), 0.2))
    bridge = view.bridge(3, [1, 2, 3])
    assert torch.allclose(bridge[0], torch.zeros(5, 5))  # offset 1: nothing between
    assert torch.allclose(bridge[1, 4], torch.tensor([0.0, 0, 1, 0, 0]), atol=1e-6)
    assert torch.allclose(bridge[2, 0], torch.tensor([0.0, 0.5, 0.5, 0, 0]), atol=1e-6)
    assert torch.allclose(bridge[2, 4], torch.zeros(5))  # unreachable there
    draw = view.placed_draw(3, [1, 3], window=range(1, 17))
    usual = view.each_token_draw()
    assert torch.allclose(draw[0], usual)
    assert torch.allclose(draw[1, 0], (1 - 2 / 15) * usual[0] + 2 / 15 * bridge[2, 0], atol=1e-6)
    assert torch.allclose(draw[1, 4], usual[4]) and torch.allclose(draw.sum(-1), usual.sum(-1).expand(2, -1), atol=1e-5)


def test_plausibility_ranks_tokens_and_pairs_but_keeps_raw_values(tiny_model):
    plain = token_evidence(tiny_model, (5, [6, 7]), query=11, live="all", n_pairs=3, context_prior=False)
    ranked = token_evidence(tiny_model, (5, [6, 7]), query=11, live="all", n_pairs=3)
    assert torch.equal(plain.plausibility, torch.ones_like(plain.plausibility))
    assert torch.allclose(plain.total, ranked.total)  # the prior ranks; it does not change evidence
    p = ranked.plausibility
    assert float(p.min()) > 0 and float(p.max()) < 1
    best = int((ranked.total * p).argmax())
    assert ranked.top_tokens(1)[0][0] == ranked.labels[best]
    assert ranked.top_tokens(1, plausible=False)[0][0] == plain.top_tokens(1)[0][0]
    for pair in ranked.pairs:
        s, t = ranked.labels.index(pair.token_s), ranked.labels.index(pair.token_t)
        assert pair.score == pytest.approx(pair.value * float(p[s] * p[t]), rel=1e-4)
    assert [q.score for q in ranked.pairs] == sorted((q.score for q in ranked.pairs), reverse=True)


@pytest.mark.parametrize("overrides", [dict(n_key_value_heads=2), dict(normalization_type="LN", attn_bias=True, mlp_bias=True)])
def test_pinned_key_offsets_are_the_model_on_three_tokens(overrides):
    """One layer (keys are raw embeddings), no competitors: b two back and c one back is [b, c, q],
    whichever slot holds which."""
    model = HookedBilinearTransformer(tiny_config(seed=3, n_layers=1, **overrides)).eval()
    view = token_view(model, live="all")
    u = logit_diff_direction(model, 5, [6, 7])
    q, b, c = 11, 3, 30
    _, cache = model.run_with_cache(torch.tensor([[b, c, q]]))
    truth = float(cache["ln_final.hook_normalized"][0, -1] @ u)
    got = virtual_readout(model, view, q, torch.tensor([[b, c]]), u, competitors=0.0, key_offsets=(2, 1))
    swapped = virtual_readout(model, view, q, torch.tensor([[c, b]]), u, competitors=0.0, key_offsets=(1, 2))
    assert float(got[0]) == pytest.approx(truth, rel=1e-4, abs=1e-5)
    assert float(swapped[0]) == pytest.approx(truth, rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="key offsets"):
        virtual_readout(model, view, q, torch.tensor([[b, c]]), u, key_offsets=(1,))
    with pytest.raises(ValueError, match="row_offsets"):
        virtual_readout(model, view, q, torch.tensor([[b, c]]), u, row_offsets=torch.tensor([1, 2]))


def test_evidence_averages_over_placements_where_the_token_may_sit(tiny_model):
    """A token's evidence averages its effect over the offsets it may sit at, one at a time, each
    weighted by how likely the model's own view of text puts it there, and each against the same
    context (its company among the competitors) without it."""
    u = logit_diff_direction(tiny_model, 5, [6, 7])
    view = token_view(tiny_model, live="all")
    e = token_evidence(tiny_model, (5, [6, 7]), query=11, view=view, offsets=(1, 3), n_pairs=0)
    n = view.ids.numel()
    draw = view.competitor_draw(torch.arange(n))
    placed = view.placed_draw(view.index(11), (1, 3), CONTEXT_WINDOW)  # [2, n, n]: the text between comes along
    keys = torch.arange(n)[:, None]
    empty = torch.full((n, 1), -1)
    each = [virtual_readout(tiny_model, view, 11, keys, u, key_offsets=(o,), draw=placed[i])
            - virtual_readout(tiny_model, view, 11, empty, u, key_offsets=(o,), draw=placed[i]) for i, o in enumerate((1, 3))]
    # Placed where the target is decided: the query followed by the target's tokens.
    then = torch.isin(view.ids, torch.tensor([5, 6, 7])).float()
    where = view.offset_presence(view.index(11), [1, 3], then)
    where = where / where.sum(0, keepdim=True)
    assert torch.allclose(e.total, where[0] * each[0] + where[1] * each[1], atol=1e-5)
    assert not torch.allclose(where[0], where[1])  # the weights differ: not a plain mean
    anywhere = view.offset_presence(view.index(11), [1, 3])
    assert not torch.allclose(where, anywhere / anywhere.sum(0, keepdim=True), atol=1e-4)
    assert torch.allclose(placed[0], draw)  # nothing between a token and the query right after it
    assert not torch.allclose(placed[1], draw, atol=1e-4)
    assert torch.allclose(expected_readout(tiny_model, view, 11, keys, u, offsets=(1, 3), weights=torch.tensor([1.0, 0.0]),
                                           draw=draw),
                          virtual_readout(tiny_model, view, 11, keys, u, key_offsets=(1,), draw=draw), atol=1e-6)
    # A row's company is the company of the tokens it places; a row with none draws by frequency.
    both = view.competitor_draw(torch.tensor([[2, 3], [-1, -1]]))
    assert torch.allclose(both[0], 0.8 * view.frequency + 0.2 * (view.company()[2] + view.company()[3]) / 2)
    assert torch.allclose(both[1], view.frequency) and torch.allclose(view.company().sum(-1), torch.ones(n))
    one_token = token_view(tiny_model, live="all", pair_branching=0)  # company comes from the one-token chain
    assert torch.allclose(view.company()[4], one_token.offset_presence(4, [1, 2, 3]).mean(0), atol=1e-6)


def test_expected_interaction_does_not_depend_on_the_order_of_a_pair(tiny_model):
    view = token_view(tiny_model, live="all")
    u = logit_diff_direction(tiny_model, 5, [6, 7])
    forward = expected_interaction(tiny_model, view, 11, torch.tensor([[3, 20], [8, 9]]), u, offsets=(1, 2, 5))
    backward = expected_interaction(tiny_model, view, 11, torch.tensor([[20, 3], [9, 8]]), u, offsets=(1, 2, 5))
    assert torch.allclose(forward, backward, atol=1e-5) and float(forward.abs().max()) > 1e-4
    with pytest.raises(ValueError, match="two offsets"):
        expected_interaction(tiny_model, view, 11, torch.tensor([[3, 20]]), u, offsets=(1,))


@pytest.mark.parametrize("n_layers", [1, 2])
def test_a_typical_competitor_is_a_token_drawn_by_frequency(n_layers):
    """With all the training frequency on one token j, the typical competitor *is* j, and it sits
    where no key slot does: an empty slot two back in a window of offsets 1-2 puts the one competitor
    one back, the sequence [j, q], through every layer."""
    model = HookedBilinearTransformer(tiny_config(seed=5, n_layers=n_layers)).eval()
    view = token_view(model, live="all")
    u = logit_diff_direction(model, 5, [6, 7])
    q, j, b = 11, 20, 3
    view.frequency = torch.zeros_like(view.frequency)
    view.frequency[view.index(j)] = 1.0
    _, cache = model.run_with_cache(torch.tensor([[j, q]]))
    truth = float(cache["ln_final.hook_normalized"][0, -1] @ u)
    got = virtual_readout(model, view, q, torch.tensor([[-1]]), u, competitors=1.0, key_offsets=(2,), window=(1, 2))
    assert float(got[0]) == pytest.approx(truth, rel=1e-4, abs=1e-5)
    if n_layers == 1:  # keys are raw embeddings: a key two back and the competitor one back is [b, j, q]
        _, cache = model.run_with_cache(torch.tensor([[b, j, q]]))
        truth = float(cache["ln_final.hook_normalized"][0, -1] @ u)
        got = virtual_readout(model, view, q, torch.tensor([[b]]), u, competitors=1.0, key_offsets=(2,), window=(1, 2))
        assert float(got[0]) == pytest.approx(truth, rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="nowhere to sit"):
        virtual_readout(model, view, q, torch.tensor([[b]]), u, competitors=1.0, key_offsets=(1,), window=(1,))
