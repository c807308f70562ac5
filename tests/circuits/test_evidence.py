"""The virtual context behind token evidence reproduces the model's own forward pass where it should."""

import pytest
import torch

from circuits.directions import logit_diff_direction
from circuits.evidence import token_evidence
from circuits.token_view import token_view
from circuits.virtual_context import virtual_readout
from hooked_bilinear import HookedBilinearTransformer

from ..conftest import tiny_config


@pytest.mark.parametrize("overrides", [dict(n_key_value_heads=2), dict(normalization_type="LN", attn_bias=True, mlp_bias=True)])
def test_virtual_context_is_the_model_on_two_tokens(overrides):
    """offsets=(1,), no competitors: key b then the query is the sequence [b, q]; no key is [q]."""
    model = HookedBilinearTransformer(tiny_config(seed=7, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".w", ".b")) or ".b_" in name:
                p.add_(torch.randn_like(p) * 0.2)
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

