"""ActivationCache's helpers give exact answers on this model."""

import pytest
import torch

from hooked_bilinear import HookedBilinearTransformer

from ..conftest import tiny_config

ATOL = dict(atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module", params=["rms", "ln-biases-standard-pos"])
def model_and_cache(request):
    if request.param == "rms":
        model = HookedBilinearTransformer(tiny_config(n_key_value_heads=2, seed=5))
    else:
        model = HookedBilinearTransformer(tiny_config(
            normalization_type="LN", positional_embedding_type="standard", attn_bias=True, mlp_bias=True,
            unembed_bias=True, seed=6))
        with torch.no_grad():  # non-trivial biases and gains
            for name, p in model.named_parameters():
                if name.rsplit(".", 1)[-1] in ("b", "w", "b_O", "b_out", "b_in", "b_gate", "b_Q", "_b_K", "_b_V", "b_U"):
                    p.add_(torch.randn_like(p) * 0.1)
    tokens = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(0))
    logits, cache = model.run_with_cache(tokens)
    return model, tokens, logits, cache


def test_accumulated_resid_is_the_residual_stream(model_and_cache):
    model, _, _, cache = model_and_cache
    acc, labels = cache.accumulated_resid(return_labels=True, incl_mid=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]
    torch.testing.assert_close(acc[-1], cache["blocks.1.hook_resid_post"])
    torch.testing.assert_close(acc[1], cache["blocks.0.hook_resid_mid"])


def test_decompose_resid_sums_to_each_residual(model_and_cache):
    model, _, _, cache = model_and_cache
    for layer, key in [(1, "blocks.1.hook_resid_pre"), (None, "blocks.1.hook_resid_post")]:
        parts = cache.decompose_resid(layer=layer)
        torch.testing.assert_close(parts.sum(0), cache[key], **ATOL)


def test_full_decomposition_sums_to_final_residual(model_and_cache):
    model, _, _, cache = model_and_cache
    full, labels = cache.get_full_resid_decomposition(expand_neurons=True, return_labels=True)
    assert len(labels) == full.shape[0] == 2 * 4 + 2 * 64 + 1 + (1 if model.pos_embed is not None else 0) + 1
    torch.testing.assert_close(full.sum(0), cache["blocks.1.hook_resid_post"], **ATOL)
    mlp_input = cache.get_full_resid_decomposition(layer=1, mlp_input=True, expand_neurons=True)
    torch.testing.assert_close(mlp_input.sum(0), cache["blocks.1.hook_resid_mid"], **ATOL)


def test_stack_head_and_neuron_results(model_and_cache):
    model, _, _, cache = model_and_cache
    heads = cache.stack_head_results(layer=2)  # [2*4, batch, pos, d_model]
    b_O = model.b_O
    for layer in range(2):
        torch.testing.assert_close(heads[4 * layer: 4 * layer + 4].sum(0) + b_O[layer], cache[f"blocks.{layer}.hook_attn_out"], **ATOL)
    neurons = cache.stack_neuron_results(layer=2)  # [2*64, batch, pos, d_model]
    for layer in range(2):
        torch.testing.assert_close(
            neurons[64 * layer: 64 * layer + 64].sum(0) + model.b_out[layer], cache[f"blocks.{layer}.hook_mlp_out"], **ATOL)


def test_apply_ln_to_stack_and_logit_attrs_reproduce_logits(model_and_cache):
    model, tokens, logits, cache = model_and_cache
    full = cache.get_full_resid_decomposition(expand_neurons=False)
    target = tokens[:, -1]
    attrs = cache.logit_attrs(full[:, :, -1], tokens=target, pos_slice=-1)  # [components, batch]
    # logit = normalized residual . direction + (LN bias . W_U + b_U): constants the attribution leaves out
    const = model.b_U[target]
    if getattr(model.ln_final, "b", None) is not None:
        const = const + model.ln_final.b @ model.W_U[:, target]
    expected = logits[torch.arange(2), -1, target] - const
    torch.testing.assert_close(attrs.sum(0), expected, **ATOL)
    # apply_ln_to_stack at the final layer divides by the cached scale (and centres for LN): its sum
    # is hook_normalized, which (as in TransformerLens) is taken before the gain and bias
    scaled = cache.apply_ln_to_stack(full, layer=-1)
    normalized = cache["ln_final.hook_normalized"]
    torch.testing.assert_close(scaled.sum(0), normalized, **ATOL)
    w = getattr(model.ln_final, "w", None)
    b = getattr(model.ln_final, "b", None)
    if w is not None:  # and what the unembedding reads is that times the gain (plus the bias)
        unembed_in = cache["unembed.hook_in"]
        torch.testing.assert_close(normalized * w + (b if b is not None else 0), unembed_in, **ATOL)


def test_cache_options(tiny_model):
    tokens = torch.randint(0, 48, (1, 6))
    _, cache = tiny_model.run_with_cache(tokens, remove_batch_dim=True, names_filter=lambda n: n.endswith("resid_post"))
    assert set(cache.keys()) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    assert cache["blocks.0.hook_resid_post"].shape == (6, 32)
    _, sliced = tiny_model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post", pos_slice=-1)
    torch.testing.assert_close(sliced["blocks.0.hook_resid_post"].reshape(32), cache["blocks.0.hook_resid_post"][-1])
    loss, grads = tiny_model.run_with_cache(tokens, return_type="loss", incl_bwd=True, names_filter="blocks.0.hook_mlp_out")
    assert "blocks.0.hook_mlp_out_grad" in grads.keys()
    tiny_model.zero_grad(set_to_none=True)
