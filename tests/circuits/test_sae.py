"""SAE features through a bilinear MLP: loading, mapping into Q's space, exactness, interactions, metric.

Every check compares against an independent computation: the SAE's own pre-activation on the
activations the model really produced, the MLP's own forward pass, or brute force over a dense matrix.
"""

import json

import pytest
import torch

from circuits.sae import input_basis, load_sae, load_scope_sae, output_features, scope_hook_name
from circuits.sae_features import (check_input_features, check_output_features, eigen_correlation,
                                   feature_interactions, top_interactions, top_interactions_on_corpus)
from hooked_bilinear import HookedBilinearConfig, HookedBilinearTransformer

D_MODEL, D_SAE, LAYER = 16, 40, 1


def make_model(norm: str, bias: bool) -> HookedBilinearTransformer:
    cfg = HookedBilinearConfig(d_model=D_MODEL, d_head=4, n_layers=2, n_ctx=12, d_vocab=30, d_mlp=24, seed=0,
                               normalization_type=norm, mlp_bias=bias, attn_bias=bias, initializer_range=0.3)
    model = HookedBilinearTransformer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # gains, norm biases and MLP biases away from their init, so the mapping matters
        for name, p in model.named_parameters():
            if name.endswith((".w", ".b")) and "ln" in name or "b_" in name.split(".")[-1]:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def random_sae(seed: int = 0, d_in: int = D_MODEL, d_sae: int = D_SAE):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return r(d_in, d_sae) / d_in**0.5, 0.1 * r(d_sae), r(d_sae, d_in) / d_in**0.5, 0.2 * r(d_in)


MODELS = [("RMS", False), ("LN", True), ("RMS", True), (None, True)]
TOKENS = torch.randint(0, 30, (3, 12), generator=torch.Generator().manual_seed(2))


@pytest.fixture(params=MODELS, ids=lambda p: f"{p[0]}-bias{p[1]}", scope="module")
def model(request):
    return make_model(*request.param)


@pytest.mark.parametrize("hook,layer", [("blocks.1.hook_mlp_out", 1), ("blocks.1.hook_resid_post", 1),
                                        ("blocks.1.hook_resid_pre", 0)])
def test_output_features_reproduce_the_sae_pre_activation(model, hook, layer):
    out = output_features(model, random_sae(), hook_name=hook)
    assert out.layer == layer and out.directions.shape == (D_SAE, D_MODEL)
    assert "Q(u_j) acts on" in out.space
    rep = check_output_features(model, out, TOKENS)
    assert rep.n_positions == TOKENS.numel() and rep.n_features == D_SAE
    assert rep.max_abs_error < 1e-4 * max(1.0, rep.max_abs_value), rep


@pytest.mark.parametrize("hook", [f"blocks.{LAYER}.ln2.hook_normalized", f"blocks.{LAYER}.hook_resid_mid"])
def test_input_interactions_reproduce_the_mlp_readout(model, hook):
    basis = input_basis(model, random_sae(1), hook_name=hook)
    assert basis.per_position_scale == (hook.endswith("resid_mid") and model.cfg.normalization_type is not None)
    u = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(3))
    rep = check_input_features(model, basis, u, TOKENS)
    assert rep.max_abs_error < 1e-9 * max(1.0, rep.max_abs_value), rep


@pytest.mark.parametrize("point", ["hook_normalized", "gained", "resid_mid"])
def test_input_basis_maps_the_hook_onto_x(model, point):
    """An SAE whose decoder is the identity reconstructs its hook a exactly; mapped into Q's space
    (times the norm scale for resid_mid) it must give back x = mlp_input, the space Q acts on."""
    from dataclasses import replace

    from circuits.mlp import mlp_input

    d = D_MODEL
    _, cache = model.run_with_cache(TOKENS)
    x = mlp_input(model, cache, LAYER).reshape(-1, d)
    hook = {"hook_normalized": "ln2.hook_normalized", "gained": "ln2.hook_normalized",
            "resid_mid": "hook_resid_mid"}[point]
    sae = load_sae((torch.eye(d), torch.zeros(d), torch.eye(d), torch.zeros(d)), hook_name=f"blocks.{LAYER}.{hook}")
    norm = model.blocks[LAYER].ln2
    if point == "gained":  # the authors' mlp_in: the norm's output after its gain (and LN bias)
        sae = replace(sae, reads_gained_norm_output=True)
        a = x * (norm.w if getattr(norm, "w", None) is not None else 1) + (norm.b if getattr(norm, "b", None) is not None else 0)
    else:
        a = cache[f"blocks.{LAYER}.{hook}"].reshape(-1, d)
    basis = input_basis(model, sae)
    scale = cache[f"blocks.{LAYER}.ln2.hook_scale"].reshape(-1, 1) if basis.per_position_scale else 1.0
    torch.testing.assert_close((a @ basis.decoder + basis.offset) / scale, x, atol=1e-5, rtol=1e-5)


def test_top_interactions_match_brute_force(model):
    out = output_features(model, random_sae(), hook_name=f"blocks.{LAYER}.hook_mlp_out", features=[3, 7])
    basis = input_basis(model, random_sae(1), hook_name=f"blocks.{LAYER}.ln2.hook_normalized")
    for sign in ("abs", "positive", "negative"):
        tops = top_interactions(model, basis, out, k=5, sign=sign, block=7)  # several blocks
        for top, j in zip(tops, range(2)):
            M = feature_interactions(model, basis, out.directions[j]).matrix
            iu = torch.triu_indices(D_SAE, D_SAE)
            vals = torch.where(iu[0] == iu[1], M[iu[0], iu[1]], 2 * M[iu[0], iu[1]])
            key = {"abs": vals.abs(), "positive": vals, "negative": -vals}[sign]
            best = key.topk(5).indices
            torch.testing.assert_close(top.values, vals[best])
            assert top.pairs.tolist() == iu[:, best].T.tolist()
            assert top.n_entries == vals.numel()
            assert abs(top.mean - float(vals.mean())) < 1e-5 and abs(top.std - float(vals.std(unbiased=False))) < 1e-4
            assert top.output == out.indices[j]
    scale = torch.rand(D_SAE, generator=torch.Generator().manual_seed(9)) + 0.5
    top = top_interactions(model, basis, out, k=3, feature_scale=scale, block=11)[0]
    M = feature_interactions(model, basis, out.directions[0]).matrix * scale[:, None] * scale[None, :]
    i, j = top.pairs[0].tolist()
    assert abs(float(top.values[0]) - float(M[i, j] * (1 if i == j else 2))) < 1e-5


def test_top_interactions_on_corpus_sum_to_the_quadratic_readout(model):
    out = output_features(model, random_sae(), hook_name=f"blocks.{LAYER}.hook_mlp_out", features=[1, 4])
    basis = input_basis(model, random_sae(1), hook_name=f"blocks.{LAYER}.ln2.hook_normalized")
    n = D_SAE * (D_SAE + 1) // 2
    tops = top_interactions_on_corpus(model, basis, out, TOKENS, k=n)
    _, cache = model.run_with_cache(TOKENS)
    f_in = basis.sae.encode(cache[basis.hook_name].reshape(-1, D_MODEL))
    fires = out.sae.encode(cache[out.hook_name].reshape(-1, D_MODEL))[:, out.indices] > 0
    for j, top in enumerate(tops):
        F = f_in[fires[:, j]]
        if F.shape[0] == 0:
            assert top.values.numel() == 0
            continue
        M = feature_interactions(model, basis, out.directions[j]).matrix
        quad = ((F @ M) * F).sum(-1).mean()
        assert abs(float(top.values.sum()) - float(quad)) < 1e-4 * max(1.0, float(quad.abs()))


def test_feature_subsets_keep_sae_ids(model):
    basis = input_basis(model, random_sae(1), hook_name=f"blocks.{LAYER}.ln2.hook_normalized", features=[5, 2, 9])
    full = input_basis(model, random_sae(1), hook_name=f"blocks.{LAYER}.ln2.hook_normalized")
    torch.testing.assert_close(basis.decoder, full.decoder[[5, 2, 9]])
    out = output_features(model, random_sae(), hook_name=f"blocks.{LAYER}.hook_mlp_out", features=[0])
    top = top_interactions(model, basis, out, k=6)[0]
    assert set(top.pairs.flatten().tolist()) <= {5, 2, 9}


def test_eigen_correlation_is_one_with_every_eigenpair(model):
    out = output_features(model, random_sae(), hook_name=f"blocks.{LAYER}.hook_mlp_out", features=range(6))
    d = D_MODEL + (1 if model.cfg.mlp_bias else 0)
    res = eigen_correlation(model, out, TOKENS, ks=(1, 2, d))
    assert res.correlation.shape == (6, 3)
    torch.testing.assert_close(res.correlation[:, 2], torch.ones(6), atol=1e-4, rtol=0)
    # k=1 by brute force for one feature
    from circuits.mlp import eigendecompose, mlp_input
    from circuits.interaction import augment_input

    _, cache = model.run_with_cache(TOKENS)
    x = mlp_input(model, cache, LAYER).reshape(-1, D_MODEL)
    x = augment_input(x) if model.cfg.mlp_bias else x
    eig = eigendecompose(model, LAYER, out.directions[0])
    approx = eig.values[0] * (x @ eig.vectors[:, 0]) ** 2
    truth = cache[f"blocks.{LAYER}.hook_mlp_out"].reshape(-1, D_MODEL) @ out.directions[0]
    expected = torch.corrcoef(torch.stack([approx, truth]))[0, 1]
    assert abs(float(res.correlation[0, 0]) - float(expected)) < 1e-4
    assert 0 <= res.fraction_above(0.75, k=2) <= 1 and -1 <= res.median(k=2) <= 1


def test_scope_folder(tmp_path, model):
    """The authors' scope format: torch Linear weights, TopK encoder on a / normalize - b_dec."""
    from safetensors.torch import save_file

    W_enc, b_enc, W_dec, b_dec = random_sae(4)
    folder = tmp_path / f"{LAYER}-mlp-out-x4-k5"
    folder.mkdir()
    cfg = dict(point=["mlp-out", LAYER], target=None, expansion=4, k=5, d_model=D_MODEL, normalize=2.5,
               encoder_bias=True, bilinear_encoder=False, token_lookup=False)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({"w_enc.weight": W_enc.T.contiguous(), "w_enc.bias": b_enc, "w_dec.weight": W_dec.T.contiguous(),
               "b_dec": b_dec}, str(folder / "model.safetensors"))
    sae = load_sae(folder)
    assert sae.hook_name == f"blocks.{LAYER}.hook_mlp_out" and sae.architecture == "topk" and sae.k == 5
    assert load_scope_sae(tmp_path, layer=LAYER, point="mlp_out", k=5).hook_name == sae.hook_name
    a = torch.randn(7, D_MODEL)
    pre = (a / 2.5 - b_dec) @ W_enc + b_enc  # the format's encoder, written out
    torch.testing.assert_close(sae.pre_activation(a), pre)
    f = sae.encode(a)
    assert ((f != 0).sum(-1) <= 5).all()
    torch.testing.assert_close(sae.decode(f), (f @ W_dec + b_dec) * 2.5)
    rep = check_output_features(model, output_features(model, folder), TOKENS)
    assert rep.max_abs_error < 1e-4 * max(1.0, rep.max_abs_value)
    assert scope_hook_name("mlp-in", 3) == "blocks.3.ln2.hook_normalized"
    assert scope_hook_name("resid_mid", 0) == "blocks.0.hook_resid_mid"


def test_errors_name_the_problem(model):
    with pytest.raises(ValueError, match="hook_name"):
        load_sae(random_sae())
    with pytest.raises(ValueError, match="input_basis"):
        output_features(model, random_sae(), hook_name=f"blocks.{LAYER}.hook_resid_mid")
    with pytest.raises(ValueError, match="output_features"):
        input_basis(model, random_sae(), hook_name=f"blocks.{LAYER}.hook_mlp_out")
    W_enc, b_enc, W_dec, b_dec = random_sae()
    with pytest.raises(ValueError, match="W_enc"):
        load_sae((W_enc.T, b_enc, W_dec, b_dec), hook_name="blocks.0.hook_mlp_out")
    with pytest.raises(ValueError, match="d_model"):
        output_features(model, random_sae(d_in=8), hook_name=f"blocks.{LAYER}.hook_mlp_out")
    out = output_features(model, random_sae(), hook_name="blocks.0.hook_mlp_out")
    basis = input_basis(model, random_sae(), hook_name=f"blocks.{LAYER}.hook_resid_mid")
    with pytest.raises(ValueError, match="same layer"):
        top_interactions(model, basis, out)


def test_output_directions_feed_eigendecomposition_and_hosvd_in_batches(model):
    """The [n, d_model] block of encoder rows goes straight into the batched model-level API:
    each feature's eigendecomposition reproduces its pre-activation, and HOSVD ranks shared structure."""
    from circuits.interaction import augment_input
    from circuits.mlp import eigendecompose, hosvd, mlp_input

    out = output_features(model, random_sae(), hook_name=f"blocks.{LAYER}.hook_mlp_out", features=range(5))
    eig = eigendecompose(model, LAYER, out.directions)  # batched: values [5, d], vectors [5, d, d]
    assert eig.values.shape[0] == 5
    _, cache = model.run_with_cache(TOKENS)
    x = mlp_input(model, cache, LAYER).reshape(-1, D_MODEL)
    x = augment_input(x) if eig.augmented else x
    proj = torch.einsum("pd,ndk->pnk", x, eig.vectors)
    pre = (proj.pow(2) * eig.values[None]).sum(-1) + out.bias
    own = out.sae.pre_activation(cache[out.hook_name].reshape(-1, D_MODEL))[:, out.indices]
    torch.testing.assert_close(pre, own, atol=1e-4 * max(1.0, float(own.abs().max())), rtol=0)
    h = hosvd(model, LAYER, U=out.directions)
    assert h.singular_values.shape[0] == 5 and (h.singular_values[:-1] >= h.singular_values[1:]).all()
