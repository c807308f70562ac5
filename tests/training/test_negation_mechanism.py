"""benchmarks/negation_mechanism.py: its knock-outs block exactly the attention they name."""

import pytest

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def mechanism():
    return load_benchmark("negation_mechanism")


def test_knockouts_in_a_one_layer_model(mechanism, tokenizer):
    from hooked_bilinear import HookedBilinearConfig, HookedBilinearTransformer

    cfg = HookedBilinearConfig(d_model=32, d_head=8, n_heads=4, n_layers=1, n_ctx=64, d_vocab=len(tokenizer),
                               d_mlp=64, seed=0)
    model = HookedBilinearTransformer(cfg, tokenizer=tokenizer).eval()
    effect = lambda knockout: mechanism.not_effect(model, "happy", "happy", "tom", "he", knockout)
    # With one layer, positions between ' not' and the query cannot reach the query: no change.
    assert effect("between") == pytest.approx(effect("none"), abs=1e-5)
    # The query's own attention to ' not' is a path: blocking it changes the effect.
    assert abs(effect("query") - effect("none")) > 1e-4
