"""Path expansion of a bilinear MLP: exact on cached activations (data view), and a weight-view
token-pair entry equal to the model's own MLP output when attention is one-hot on the tokens."""

import pytest
import torch

from circuits.directions import logit_diff_direction, unembed_direction
from circuits.mlp_paths import mlp_path_terms, rank_path_pairs, token_paths
from circuits.paths import pair_terms, top_pair_entries
from circuits.eigen import eigendecompose_from_weights
from circuits.mlp import mlp_weights
from circuits.readout import live_token_ids, live_token_mask, normalized_embeddings, top_tokens
from hooked_bilinear import HookedBilinearTransformer

from ..conftest import tiny_config, tiny_model_with_norm_and_bias_noise

VARIANTS = {
    "rms-gqa": dict(n_key_value_heads=2),
    "rms-biases": dict(mlp_bias=True, attn_bias=True),
    "ln-biases": dict(normalization_type="LN", mlp_bias=True, attn_bias=True),
}


def perturbed(**overrides):
    return tiny_model_with_norm_and_bias_noise(seed=5, **overrides)


@pytest.mark.parametrize("variant", VARIANTS)
def test_path_pair_terms_sum_to_the_mlp_readout(variant):
    model = perturbed(**VARIANTS[variant])
    tokens = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(1))
    _, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        u = logit_diff_direction(model, 3, [4, 5])
        terms = mlp_path_terms(model, cache, layer, u)
        n_heads = model.cfg.n_heads * (layer + 1)
        assert terms.terms.shape == (2, 9, len(terms.labels), len(terms.labels))
        assert terms.labels[:n_heads] == [f"L{l}H{h}" for l in range(layer + 1) for h in range(model.cfg.n_heads)]
        assert "embed" in terms.labels and ("mlp_bias" in terms.labels) == model.cfg.mlp_bias
        err = (terms.total - terms.readout).abs().max()
        assert err <= 1e-4 * terms.readout.abs().max(), (variant, layer, float(err))
        # terms are symmetric and a pair's contribution counts both orders
        assert torch.allclose(terms.terms, terms.terms.transpose(-1, -2), atol=1e-9)
        i, j = terms.labels.index("embed"), terms.labels.index("L0H1")
        assert torch.allclose(terms.pair("embed", "L0H1"), 2 * terms.terms[..., i, j])


def test_pair_terms_is_the_expanded_square():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    Q = (A + A.T) / 2
    parts = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    x = parts.sum(0)
    assert torch.allclose(pair_terms(parts, Q).sum((-1, -2)), torch.einsum("bi,ij,bj->b", x, Q, x))


@pytest.mark.parametrize("use_eig", [False, True])
def test_top_pair_entries_match_the_full_table(use_eig):
    g = torch.Generator().manual_seed(3)
    A = torch.randn(8, 8, generator=g, dtype=torch.float64)
    Q = (A + A.T) / 2
    Rp, Rq = torch.randn(50, 8, generator=g, dtype=torch.float64), torch.randn(40, 8, generator=g, dtype=torch.float64)
    full = Rp @ Q @ Rq.T
    vals, vecs = torch.linalg.eigh(Q)
    kwargs = dict(eig=type("E", (), {"values": vals, "vectors": vecs})()) if use_eig else dict(Q=Q)
    for sign, key in ((1, full), (-1, -full), (0, full.abs())):
        top = top_pair_entries(Rp, Rq, k=5, sign=sign, chunk=7, **kwargs)
        expect = key.flatten().topk(5)
        assert torch.allclose(top.values, full.flatten()[expect.indices])
        assert torch.equal(top.rows * 40 + top.cols, expect.indices)
    same = top_pair_entries(Rp, Rp, Q=Q, k=6, same=True, chunk=9)
    assert bool((same.rows <= same.cols).all())  # each unordered pair once


def test_weight_view_entry_equals_the_mlp_output_under_one_hot_attention():
    """Layer 0, tokens [s, t]: every head attends only to position 0 (token s) from position 1.
    Then MLP 0's input at position 1 is (e_t + sum_h ln1(e_s) W_OV^h) / scale, and u . mlp_out
    there must equal the sum of the weight-view pair entries of those paths over scale^2."""
    model = perturbed()
    s, t = 7, 11
    u = unembed_direction(model, 3)

    def one_hot(pattern, hook):
        pattern = torch.zeros_like(pattern)
        pattern[..., 0] = 1.0  # every query reads position 0
        return pattern

    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", one_hot)]):
        _, cache = model.run_with_cache(torch.tensor([[s, t]]))
    truth = cache["blocks.0.hook_mlp_out"][0, 1] @ u
    scale = cache["blocks.0.ln2.hook_scale"][0, 1, 0]

    ids = torch.tensor([s, t])
    paths = {p.name: p for p in token_paths(model, 0, token_ids=ids, composition=False, mlps=False)}
    e_t = model.W_E[t].detach()
    rms_t = (e_t.pow(2).mean() + model.cfg.eps).sqrt()
    rows = [paths["direct"].R[1] * rms_t] + [paths[f"L0H{h}"].R[0] for h in range(model.cfg.n_heads)]
    w = mlp_weights(model, 0)
    eig = eigendecompose_from_weights(w.W_gate, w.W_in, w.W_out, u)
    total = 0.0
    for a in rows:  # sum over ordered pairs of single-entry tables
        for b in rows:
            total += float(top_pair_entries(a[None], b[None], eig=eig, k=1).values[0])
    assert total / float(scale) ** 2 == pytest.approx(float(truth), rel=1e-4, abs=1e-6)


def test_live_tokens_leave_out_dead_tokens():
    model = HookedBilinearTransformer(tiny_config(seed=2)).eval()
    counts = torch.zeros(48, dtype=torch.long)
    counts[[1, 4, 9, 30]] = 5
    model.token_counts = counts
    assert live_token_ids(model).tolist() == [1, 4, 9, 30]
    assert live_token_mask(model, "all").all()
    mask = torch.zeros(48, dtype=torch.bool)
    mask[[2, 3]] = True
    assert live_token_ids(model, mask).tolist() == [2, 3]
    scores = torch.arange(48.0)
    top = top_tokens(model, scores, k=3)
    assert [t for t, _ in top.positive] == ["30", "9", "4"] and [t for t, _ in top.negative] == ["1", "4", "9"]
    assert [t for t, _ in top_tokens(model, scores, k=2, live="all").positive] == ["47", "46"]
    with pytest.raises(ValueError, match="d_vocab"):
        live_token_mask(model, torch.ones(5))
    with pytest.raises(ValueError, match="all zero"):
        live_token_mask(model, torch.zeros(48, dtype=torch.long))
    del model.token_counts
    assert live_token_mask(model).all()  # no counts: every token


def test_rank_path_pairs_uses_live_tokens_only():
    model = perturbed()
    counts = torch.zeros(48, dtype=torch.long)
    counts[:20] = 1
    model.token_counts = counts
    pairs = rank_path_pairs(model, 1, unembed_direction(model, 3), n_pairs=5, sign=1)
    assert len(pairs) == 5 and pairs[0].score >= pairs[-1].score > 0
    assert all(a < 20 and b < 20 for pp in pairs for a, b in pp.token_ids)
    # the score is the best token pair's signed contribution
    assert all(pp.score == pytest.approx(max(v for _, _, v in pp.tokens)) for pp in pairs)
