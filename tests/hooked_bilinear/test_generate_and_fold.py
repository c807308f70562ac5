"""Generation with the KV cache, and folding the norms into the weights."""

import pytest
import torch

from hooked_bilinear import HookedBilinearTransformer, KVCache

from ..conftest import tiny_config


def test_kv_cache_logits_equal_full_forward(tiny_model):
    tokens = torch.randint(0, 48, (2, 10))
    cache = KVCache.empty(2)
    first = tiny_model(tokens[:, :6], past_kv_cache=cache)
    rest = [tiny_model(tokens[:, i:i + 1], past_kv_cache=cache) for i in range(6, 10)]
    full = tiny_model(tokens)
    torch.testing.assert_close(torch.cat([first] + rest, dim=1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generation_with_and_without_cache_agree(tiny_model):
    prompt = torch.randint(0, 48, (2, 5))
    with_cache = tiny_model.generate(prompt, max_new_tokens=8)
    without = tiny_model.generate(prompt, max_new_tokens=8, use_past_kv_cache=False)
    assert with_cache.shape == (2, 13)
    assert torch.equal(with_cache, without)
    # greedy: each new token is the argmax of the full forward on the prefix
    for t in range(5, 13):
        assert torch.equal(tiny_model(with_cache[:, :t])[:, -1].argmax(-1), with_cache[:, t])


def test_sampling_is_seeded_and_respects_top_k(tiny_model):
    prompt = torch.randint(0, 48, (3, 4))
    a = tiny_model.generate(prompt, max_new_tokens=6, do_sample=True, temperature=1.5, seed=1)
    b = tiny_model.generate(prompt, max_new_tokens=6, do_sample=True, temperature=1.5, seed=1)
    assert torch.equal(a, b)
    top1 = tiny_model.generate(prompt, max_new_tokens=6, do_sample=True, top_k=1, seed=2)
    assert torch.equal(top1, tiny_model.generate(prompt, max_new_tokens=6))
    tiny_p = tiny_model.generate(prompt, max_new_tokens=6, do_sample=True, top_p=1e-6, seed=3)
    assert torch.equal(tiny_p, tiny_model.generate(prompt, max_new_tokens=6))
    with pytest.raises(ValueError, match="top_p"):
        tiny_model.generate(prompt, max_new_tokens=2, do_sample=True, top_p=1.5)


def test_generation_stops_at_eos(tiny_model):
    prompt = torch.randint(0, 48, (1, 4))
    free = tiny_model.generate(prompt, max_new_tokens=6)
    eos = int(free[0, 5])  # make the second generated token the end of sequence
    stopped = tiny_model.generate(prompt, max_new_tokens=6, eos_token_id=eos)
    assert stopped.shape[1] <= 6 and int(stopped[0, -1]) == eos


def test_text_generation_with_left_padding(tiny_model_with_tokenizer):
    model = tiny_model_with_tokenizer
    out = model.generate(["once upon a time", "tom"], max_new_tokens=4)
    assert isinstance(out, list) and len(out) == 2 and out[0].startswith("<|endoftext|> once upon a time")
    batch = model.generate(["once upon a time", "tom"], max_new_tokens=4, stop_at_eos=False, return_type="tokens")
    alone = model.generate("tom", max_new_tokens=4, stop_at_eos=False, return_type="tokens")
    assert torch.equal(batch[1, -4:], alone[0, -4:])


def test_generation_past_context_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="n_ctx"):
        tiny_model.generate(torch.randint(0, 48, (1, 20)), max_new_tokens=10)


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
