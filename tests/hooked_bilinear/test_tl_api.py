"""TransformerLens's everyday API on this model: tokenizer methods, optional hooks, loss, weight
processing, attn_only models and TransformerLens's own KV cache (both transformer-lens versions)."""

import pytest
import torch

from hooked_bilinear import HookedBilinearTransformer

from ..conftest import tiny_config, tiny_model_with_norm_and_bias_noise

try:  # the class lives in the same module on 3.9 and 4.x
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
except ImportError:  # pragma: no cover
    TransformerLensKeyValueCache = None


def tokens_for(model, batch=2, n_pos=7, seed=0):
    return torch.randint(0, model.cfg.d_vocab, (batch, n_pos), generator=torch.Generator().manual_seed(seed))


def test_tokenizer_methods(tiny_model_with_tokenizer):
    model = tiny_model_with_tokenizer
    text = "once upon a time there was a girl"
    tokens = model.to_tokens(text, move_to_device=False)
    assert tokens.device.type == "cpu" and tokens[0, 0] == model.tokenizer.bos_token_id
    assert model.to_tokens(text, prepend_bos=False).shape[1] == tokens.shape[1] - 1
    long = " ".join(["the"] * 40)
    assert model.to_tokens(long).shape[1] == model.cfg.n_ctx  # truncated by default, as in TransformerLens
    assert model.to_tokens(long, truncate=False).shape[1] == 41
    lists = model.to_str_tokens(["once upon", "a time there"], prepend_bos=False)
    assert lists == [["once", "upon"], ["a", "time", "there"]]
    assert model.to_str_tokens(tokens)[1:3] == ["once", "upon"]
    assert model.to_single_str_token(model.to_single_token("girl")) == "girl"
    with pytest.raises(ValueError):
        model.to_single_str_token("girl")
    assert model.get_token_position("a", text) == 3  # BOS once upon a
    assert model.get_token_position("a", tokens, mode="last") == 7
    with pytest.raises(AssertionError, match="does not occur"):
        model.get_token_position("cake", text)
    padded = model.to_tokens(["once", "once upon a"], padding_side="left")
    assert padded[0, 0] == model.tokenizer.pad_token_id and padded.shape == (2, 4)


def test_set_tokenizer_and_padding_side(word_tokenizer):
    model = HookedBilinearTransformer(tiny_config(d_vocab=len(word_tokenizer)))
    model.set_tokenizer(word_tokenizer, default_padding_side="left")
    assert model.tokenizer.padding_side == "left"
    with pytest.raises(ValueError, match="default_padding_side"):
        model.set_tokenizer(word_tokenizer, default_padding_side="middle")


def test_input_to_embed_loss_and_return_none(tiny_model):
    model = tiny_model
    tokens = tokens_for(model)
    residual, toks, shortformer, mask = model.input_to_embed(tokens)
    torch.testing.assert_close(residual, model.run_with_cache(tokens)[1]["hook_embed"])
    assert torch.equal(toks, tokens) and shortformer is None and mask is None
    fired = []
    out = model.run_with_hooks(tokens, return_type=None,
                               fwd_hooks=[("ln_final.hook_normalized", lambda x, hook: fired.append(hook.name))])
    assert out is None and fired == ["ln_final.hook_normalized"]
    logits, loss = model(tokens, return_type="both")
    torch.testing.assert_close(loss, model.loss_fn(logits, tokens))
    mask = torch.ones_like(tokens)
    mask[0, 4:] = 0
    per_token = model.loss_fn(logits, tokens, mask, per_token=True)
    assert per_token.shape == (2, 6)
    assert torch.all(per_token[0, 3:] == 0) and torch.all(per_token[0, :3] > 0) and torch.all(per_token[1] > 0)


def test_counts_labels_and_composition_scores(tiny_model):
    model = tiny_model
    assert model.n_params_total == sum(p.numel() for p in model.parameters())
    assert model.cfg.d_vocab_out == model.cfg.d_vocab
    assert model.all_head_labels()[:3] == ["L0H0", "L0H1", "L0H2"]
    scores = model.all_composition_scores("Q")
    assert scores.shape == (2, 4, 2, 4)
    assert torch.all(scores[1, :, 0] == 0) and torch.all(scores[0, :, 0] == 0) and torch.all(scores[0, :, 1] > 0)
    with pytest.raises(ValueError, match="mode"):
        model.all_composition_scores("X")
    torch.testing.assert_close(model.blocks[1].attn.QK.AB, model.QK[1].AB)
    torch.testing.assert_close(model.blocks[1].attn.OV.AB, model.OV[1].AB)


def test_optional_hooks_need_their_switch():
    model = HookedBilinearTransformer(tiny_config(positional_embedding_type="standard", use_hook_tokens=True))
    tokens = tokens_for(model)
    with pytest.raises(AssertionError, match="set_use_attn_result"):
        model.add_hook("blocks.0.attn.hook_result", lambda x, hook: x)
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    logits, cache = model.run_with_cache(tokens)
    assert torch.equal(cache["hook_tokens"], tokens)
    assert cache["blocks.0.attn.hook_result"].shape == (2, 7, 4, 32)
    assert cache["blocks.1.hook_q_input"].shape == (2, 7, 4, 32)
    torch.testing.assert_close(cache["blocks.1.hook_mlp_in"], cache["blocks.1.hook_resid_mid"])
    torch.testing.assert_close(cache["blocks.0.attn.hook_result"].sum(2), cache["blocks.0.hook_attn_out"])
    # patching one head's query input changes only what flows through that head
    patched = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_q_input", lambda x, hook: x.index_fill(2, torch.tensor([0]), 0.0))])
    assert (patched - logits).abs().max() > 1e-5
    assert model.W_E_pos.shape == (48 + 24, 32)


def test_ungrouped_query_attention_gives_per_head_keys(tiny_model):
    model = HookedBilinearTransformer(tiny_config(n_key_value_heads=2))
    tokens = tokens_for(model)
    logits, grouped = model.run_with_cache(tokens)
    model.set_ungroup_grouped_query_attention(True)
    logits2, ungrouped = model.run_with_cache(tokens)
    assert grouped["blocks.0.attn.hook_k"].shape[2] == 2 and ungrouped["blocks.0.attn.hook_k"].shape[2] == 4
    torch.testing.assert_close(logits, logits2)
    with pytest.raises(ValueError, match="grouped-query"):
        model.set_use_attn_in(True)


def test_attn_only_model():
    model = HookedBilinearTransformer(tiny_config(attn_only=True))
    logits, cache = model.run_with_cache(tokens_for(model))
    assert not any("mlp" in name or "ln2" in name or "resid_mid" in name for name in cache.keys())
    parts = cache.decompose_resid()
    torch.testing.assert_close(parts.sum(0), cache["blocks.1.hook_resid_post"])
    with pytest.raises(ValueError, match="attn_only"):
        model.set_use_hook_mlp_in(True)


@pytest.mark.skipif(TransformerLensKeyValueCache is None, reason="no TransformerLensKeyValueCache")
@pytest.mark.parametrize("positional", ["rotary", "standard"])
def test_transformer_lens_kv_cache_object(positional):
    model = HookedBilinearTransformer(tiny_config(n_key_value_heads=2, positional_embedding_type=positional))
    tokens = tokens_for(model, n_pos=9)
    full = model(tokens)
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, "cpu", batch_size=2)
    first = model(tokens[:, :6], past_kv_cache=cache)
    second = model(tokens[:, 6:8], past_kv_cache=cache)
    third = model(tokens[:, 8:], past_kv_cache=cache)
    torch.testing.assert_close(torch.cat([first, second, third], dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.entries[0].past_keys.shape == (2, 9, 2, 8)


def test_weight_processing_keeps_predictions():
    model = tiny_model_with_norm_and_bias_noise(normalization_type="LN", positional_embedding_type="standard",
                                                attn_bias=True, mlp_bias=True, attn_out_scale=0.5)
    tokens = tokens_for(model)
    before = model(tokens).log_softmax(-1)
    model.process_weights_(refactor_factored_attn_matrices=True)
    torch.testing.assert_close(model(tokens).log_softmax(-1), before, atol=1e-4, rtol=1e-4)
    assert model.cfg.attn_out_scale == 1.0
    torch.testing.assert_close(model.W_U.mean(-1), torch.zeros(32), atol=1e-6, rtol=0)  # centred unembedding
    torch.testing.assert_close(model.W_E.mean(-1), torch.zeros(48), atol=1e-6, rtol=0)  # centred writes
    assert torch.all(model.blocks[0].attn._b_V == 0)  # value biases folded into b_O


def test_processing_refuses_what_the_norm_does_not_allow():
    model = HookedBilinearTransformer(tiny_config())  # RMSNorm, rotary, grouped-query
    with pytest.raises(ValueError, match="LayerNorm"):
        model.center_writing_weights()
    with pytest.raises(ValueError, match="rotary"):
        model.refactor_factored_attn_matrices()
    tokens = tokens_for(model)
    before = model(tokens).log_softmax(-1)
    with pytest.warns(UserWarning, match="center_writing_weights skipped"):
        model.process_weights_()
    torch.testing.assert_close(model(tokens).log_softmax(-1), before, atol=1e-4, rtol=1e-4)


def test_from_pretrained_processing_flags(tmp_path):
    model = HookedBilinearTransformer(tiny_config(attn_out_scale=0.5))
    model.save_pretrained(tmp_path / "m")
    raw = HookedBilinearTransformer.from_pretrained(tmp_path / "m")
    assert raw.cfg.attn_out_scale == 0.5  # loads exactly as saved by default
    plain = HookedBilinearTransformer.from_pretrained_no_processing(tmp_path / "m")
    torch.testing.assert_close(plain.W_U, raw.W_U)
    processed = HookedBilinearTransformer.from_pretrained(tmp_path / "m", fold_ln=True, center_unembed=True)
    assert processed.cfg.attn_out_scale == 1.0
    tokens = tokens_for(model)
    torch.testing.assert_close(processed(tokens).log_softmax(-1), raw(tokens).log_softmax(-1), atol=1e-4, rtol=1e-4)
