import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.activations import ACT2FN

from hooked_bilinear import HookedBilinearTransformer
from hooked_bilinear.loading import CheckpointError, detect_format
from hooked_bilinear.loading.llama import from_hf_llama

from ..conftest import tiny_config
from .conftest_loading import assert_same_weights, randomize, random_tokens

VOCAB = 48


def tiny_llama(hidden_act="silu", rope_theta=10000.0, tie=False, bias=False, seed=0) -> LlamaForCausalLM:
    """TinyLlama's structure at toy size: grouped-query attention (4 heads, 2 kv heads), RMS eps 1e-5."""
    config = LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=24, rms_norm_eps=1e-5,
        rope_theta=rope_theta, hidden_act=hidden_act, tie_word_embeddings=tie,
        attention_bias=bias, mlp_bias=bias,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    randomize(model, std=0.15, seed=seed)  # gains too: HF initializes them to ones
    return model.eval()


def test_installed_transformers_has_a_linear_activation():
    x = torch.randn(5)
    assert torch.equal(ACT2FN["linear"](x), x)


@pytest.mark.parametrize(
    "hidden_act, rope_theta, tie, bias",
    [("silu", 10000.0, False, False), ("linear", 500000.0, False, False), ("silu", 500000.0, True, True)],
    ids=["swiglu", "bilinear_theta5e5", "tied_biases"],
)
def test_hf_checkpoint_logits_match_transformers(hidden_act, rope_theta, tie, bias, tmp_path):
    hf = tiny_llama(hidden_act, rope_theta, tie, bias)
    hf.save_pretrained(tmp_path / "hf")
    assert detect_format(tmp_path / "hf") == "llama"
    ours = HookedBilinearTransformer.from_pretrained(str(tmp_path / "hf"))
    cfg = ours.cfg
    assert cfg.act_fn == {"silu": "silu", "linear": "linear"}[hidden_act] and cfg.rotary_base == rope_theta
    assert (cfg.n_heads, cfg.n_key_value_heads, cfg.eps, cfg.tie_embeddings) == (4, 2, 1e-5, tie)
    tokens = random_tokens(VOCAB, n_pos=20)
    with torch.no_grad():
        expected = hf(tokens).logits
    torch.testing.assert_close(ours(tokens), expected, atol=1e-4, rtol=1e-4)
    assert expected.abs().max() > 0.1  # the comparison is not between two near-zero tensors


def test_sharded_checkpoint_and_state_dict_input(tmp_path):
    hf = tiny_llama("linear")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    from_disk = HookedBilinearTransformer.from_pretrained(tmp_path / "hf")
    from_memory = from_hf_llama(hf.state_dict(), hf.config)
    assert_same_weights(from_disk, from_memory)


def test_bilinear_model_to_hf_and_back_is_exact(tmp_path):
    model = HookedBilinearTransformer(tiny_config(n_key_value_heads=2, d_vocab=VOCAB)).eval()
    randomize(model, std=0.2)
    hf = model.to_hf()
    assert isinstance(hf, LlamaForCausalLM) and hf.config.hidden_act == "linear"
    tokens = random_tokens(VOCAB)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-4, rtol=1e-4)
    back = from_hf_llama(hf)
    assert_same_weights(model, back)
    # The same through files: save_pretrained(format="hf") is readable by transformers and by us.
    model.save_pretrained(tmp_path / "as_hf", format="hf")
    assert json.loads((tmp_path / "as_hf" / "config.json").read_text())["hidden_act"] == "linear"
    reloaded_hf = LlamaForCausalLM.from_pretrained(tmp_path / "as_hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded_hf(tokens).logits, model(tokens), atol=1e-4, rtol=1e-4)
    assert_same_weights(model, HookedBilinearTransformer.from_pretrained(tmp_path / "as_hf"))


def test_to_hf_folds_attention_scale_and_unit_gains():
    model = HookedBilinearTransformer(tiny_config(attn_out_scale=0.5, norm_weights=False, act_fn="relu",
                                                  tie_embeddings=True, d_vocab=VOCAB)).eval()
    randomize(model, std=0.2)
    hf = model.to_hf()
    tokens = random_tokens(VOCAB)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-4, rtol=1e-4)
    assert hf.config.tie_word_embeddings and hf.config.hidden_act == "relu"


def test_to_hf_refuses_what_llama_cannot_express():
    model = HookedBilinearTransformer(tiny_config(normalization_type="LN", positional_embedding_type="standard"))
    with pytest.raises(ValueError, match=r"does not fit the Llama architecture: normalization_type='LN'.*positional_embedding_type='standard'"):
        model.to_hf()
    annealing = HookedBilinearTransformer(tiny_config(act_fn="silu", gate_beta=0.5))
    with pytest.raises(ValueError, match="gate_beta=0.5"):
        annealing.to_hf()


def test_scaled_rope_is_refused(tmp_path):
    hf = tiny_llama()
    hf.save_pretrained(tmp_path / "hf")
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    scaling = {"rope_type": "linear", "factor": 2.0}
    raw["rope_parameters" if "rope_parameters" in raw else "rope_scaling"] = {**scaling, "rope_theta": 10000.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(NotImplementedError, match="rope scaling type 'linear'"):
        HookedBilinearTransformer.from_pretrained(tmp_path / "hf")


def test_llama_weights_with_wrong_shapes_are_named(tmp_path):
    hf = tiny_llama()
    hf.save_pretrained(tmp_path / "hf")
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    raw["intermediate_size"] = 80
    (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight: expected \[80, 32\], found \[64, 32\]"):
        HookedBilinearTransformer.from_pretrained(tmp_path / "hf")
