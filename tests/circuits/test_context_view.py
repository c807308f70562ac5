"""Context embeddings: each token's residual with its typical predecessors, checked against the model."""

import pytest
import torch

from circuits.context_view import context_view
from circuits.token_view import token_view

from ..conftest import tiny_model_with_norm_and_bias_noise


@pytest.mark.parametrize("overrides", [dict(n_key_value_heads=2), dict(normalization_type="LN", attn_bias=True, mlp_bias=True)])
def test_a_certain_predecessor_is_the_model_on_two_tokens(overrides):
    """One competitor, a one-offset window and a chain that puts token a right before every token:
    the context embedding of b entering layer 1 is the model's residual at b in [a, b]."""
    model = tiny_model_with_norm_and_bias_noise(seed=7, **overrides)
    view = token_view(model, live="all")
    n, a = view.ids.numel(), 20
    before = torch.zeros(1, n, n)
    before[0, view.index(a)] = 1.0
    ctx = context_view(model, view, competitors=1.0, window=(1,), before=before)
    for b in (3, 30):
        _, cache = model.run_with_cache(torch.tensor([[a, b]]))
        i = view.index(b)
        assert torch.allclose(ctx.resid[1][i], cache["blocks.1.hook_resid_pre"][0, 1], rtol=1e-4, atol=1e-5)
        assert torch.allclose(ctx.resid[0][i], view.resid[0][i])  # the embedding itself
        if "blocks.0.ln1.hook_scale" in cache:
            assert float(ctx.ln1_scale[0][i]) == pytest.approx(float(cache["blocks.0.ln1.hook_scale"][0, 1, 0]), rel=1e-5)
            assert float(ctx.ln2_scale[0][i]) == pytest.approx(float(cache["blocks.0.ln2.hook_scale"][0, 1, 0]), rel=1e-5)
    # ... and not the token alone: the predecessor changed it.
    assert float((ctx.resid[1] - view.resid[1]).abs().max()) > 1e-3


def test_no_competitors_is_the_one_token_view_and_bad_chains_are_refused(tiny_model):
    view = token_view(tiny_model, live="all")
    assert context_view(tiny_model, view, competitors=0) is view
    ctx = context_view(tiny_model, view)
    assert torch.equal(ctx.ids, view.ids) and torch.equal(ctx.frequency, view.frequency)
    assert all(torch.isfinite(r).all() for r in ctx.resid) and len(ctx.resid) == len(view.resid)
    n = view.ids.numel()
    with pytest.raises(ValueError, match="before must be"):
        context_view(tiny_model, view, window=(1, 2), before=torch.full((1, n, n), 1.0 / n))
