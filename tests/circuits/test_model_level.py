"""Model-level circuits: exactness on the model's own activations for every kind of output direction."""

import pytest
import torch

from circuits.directions import head_directions, logit_diff_direction, mlp_feature_directions, unembed_direction, user_direction
from circuits.mlp import check_exactness, eigendecompose, interaction_matrix, mlp_weights
from circuits.readout import normalized_embeddings, direct_token_scores, direct_token_table, ov_token_scores, top_tokens
from circuits.truncation import truncation_sweep
from hooked_bilinear import HookedBilinearTransformer

from ..conftest import tiny_config, tiny_model_with_norm_and_bias_noise


@pytest.fixture(scope="module", params=["rms-gqa", "ln-biases"])
def model(request):
    overrides = {"n_key_value_heads": 2} if request.param == "rms-gqa" else {"normalization_type": "LN", "mlp_bias": True, "attn_bias": True}
    return tiny_model_with_norm_and_bias_noise(seed=11, **overrides)  # so folding gains and biases matters


TOKENS = torch.randint(0, 48, (3, 10), generator=torch.Generator().manual_seed(2))


def directions(model):
    yield "unembed", 1, unembed_direction(model, 5)
    yield "logit diff", 1, logit_diff_direction(model, [5, 6], 7)
    yield "head query", 0, head_directions(model, 1, 2, "q")[3]
    yield "head key", 0, head_directions(model, 1, 0, "k")[1]
    yield "head value", 0, head_directions(model, 1, 3, "v")[0]
    yield "later MLP eigenvector", 0, mlp_feature_directions(model, 1, unembed_direction(model, 5), k=2)[0][0]
    yield "user vector", 1, user_direction(model, torch.randn(32, generator=torch.Generator().manual_seed(0)))


def test_eigendecomposition_is_exact_on_cached_activations(model):
    for name, layer, u in directions(model):
        report = check_exactness(model, layer, u, TOKENS)
        assert report.n_positions == 30
        assert report.max_abs_error < 1e-4 * max(1.0, report.max_abs_readout), name


def test_interaction_matrix_is_symmetric_and_linear_in_u(model):
    u, v = unembed_direction(model, 1), unembed_direction(model, 2)
    Q = interaction_matrix(model, 1, torch.stack([u, v, u + 2 * v]))
    torch.testing.assert_close(Q, Q.transpose(-1, -2))
    torch.testing.assert_close(Q[2], Q[0] + 2 * Q[1], atol=1e-5, rtol=1e-5)


def test_top_k_is_the_head_of_the_full_spectrum(model):
    u = unembed_direction(model, 9)
    full, top = eigendecompose(model, 1, u), eigendecompose(model, 1, u, k=4, method="lanczos")
    torch.testing.assert_close(top.values, full.values[:4], atol=1e-4, rtol=1e-4)
    assert torch.all(full.values.abs()[:-1] >= full.values.abs()[1:])


def test_token_readouts(model):
    vecs, _ = mlp_feature_directions(model, 1, unembed_direction(model, 5), k=3)
    scores = direct_token_scores(model, vecs)
    assert scores.shape == (3, 48)
    torch.testing.assert_close(scores[0], normalized_embeddings(model) @ vecs[0])
    assert ov_token_scores(model, vecs[0], before_layer=1).shape == (1, 4, 48)
    top = top_tokens(model, scores[0], k=5)
    assert len(top.positive) == 5 and top.positive[0][1] == pytest.approx(float(scores[0].max()), rel=1e-5)
    table = direct_token_table(model, 1, out_tokens=[1, 2], in_tokens=[3, 4, 5])
    assert table.shape == (2, 3)


def test_truncation_with_every_component_is_the_model(model):
    results = truncation_sweep(model, TOKENS, ks=(1, 33), progress=False)
    assert results[-1].kl < 1e-5 and results[-1].top1_agreement == 1.0
    assert results[-1].readout_correlation > 0.9999
    assert results[0].readout_correlation < results[-1].readout_correlation
    assert 1.0 <= results[0].mean_effective_rank <= 33


def test_bad_input_is_a_clear_error(model):
    with pytest.raises(ValueError, match="out of range"):
        interaction_matrix(model, 2, unembed_direction(model, 1))
    with pytest.raises(ValueError, match="d_model=32"):
        interaction_matrix(model, 0, torch.ones(31))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        unembed_direction(model, 48)
    with pytest.raises(ValueError, match="head 4 is out of range"):
        head_directions(model, 1, 4)


def test_non_bilinear_models_are_refused():
    swiglu = HookedBilinearTransformer(tiny_config(act_fn="silu", gate_beta=0.0))
    with pytest.raises(ValueError, match="fold_zero_beta_gate"):
        mlp_weights(swiglu, 0)
