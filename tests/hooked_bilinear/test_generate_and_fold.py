"""Folding the norms into the weights (generation is tested in test_generate.py)."""

import pytest
import torch

from hooked_bilinear import HookedBilinearTransformer

from ..conftest import tiny_config


@pytest.mark.parametrize(
    "overrides",
    [
        {"n_key_value_heads": 2, "attn_out_scale": 0.3},
        {"normalization_type": "LN", "positional_embedding_type": "standard"},
        {"tie_embeddings": True},
    ],
)
def test_fold_layer_norm_keeps_logits(overrides):
    model = HookedBilinearTransformer(tiny_config(seed=4, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w") or name.endswith(".b"):
                p.add_(torch.randn_like(p) * 0.3)
    tokens = torch.randint(0, 48, (2, 7))
    before = model(tokens)
    model.fold_layer_norm()
    torch.testing.assert_close(model(tokens), before, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        if name.endswith(".w"):
            assert torch.all(p == 1), name
    assert model.cfg.attn_out_scale == 1.0
    # the MLP now reads the plain normalized residual: hook_pre == (x / scale) @ W_gate
    _, cache = model.run_with_cache(tokens)
    x = cache["blocks.1.hook_resid_mid"]
    if model.cfg.normalization_type == "LN":
        x = x - x.mean(-1, keepdim=True)
    pre = (x / cache["blocks.1.ln2.hook_scale"]) @ model.W_gate[1] + model.b_gate[1]
    torch.testing.assert_close(cache["blocks.1.mlp.hook_pre"], pre, atol=1e-5, rtol=1e-5)


def test_zero_beta_gate_folds_into_an_exactly_bilinear_model():
    model = HookedBilinearTransformer(tiny_config(seed=8, act_fn="silu", gate_beta=1.0, mlp_bias=True))
    tokens = torch.randint(0, 48, (2, 7))
    with pytest.raises(ValueError, match="beta = 0"):
        model.fold_zero_beta_gate()
    model.set_gate_beta(0.0)
    before = model(tokens)
    model.fold_zero_beta_gate()
    assert model.cfg.act_fn == "linear" and model.cfg.gate_beta is None
    torch.testing.assert_close(model(tokens), before, atol=1e-6, rtol=1e-5)
