"""Loading allocates no weight twice: no random initialisation, checkpoint tensors become the
parameters (views of the memory-mapped file when dtype and device match), conversions are views."""

from contextlib import contextmanager

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hooked_bilinear import HookedBilinearTransformer
from hooked_bilinear.loading.materialize import empty_model

from ..conftest import tiny_config
from .conftest_loading import assert_same_weights, randomize, random_tokens
from .test_loading_papers import papers_config, papers_weights, write_checkpoint


def _llama(tmp_path, dtype=torch.bfloat16):
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, intermediate_size=64, vocab_size=48, max_position_embeddings=24,
                         hidden_act="linear", tie_word_embeddings=False)
    hf = LlamaForCausalLM(config).eval()
    randomize(hf, std=0.2)
    hf.to(dtype).save_pretrained(tmp_path / "hf")
    return hf.to(dtype), tmp_path / "hf"


@contextmanager
def no_random_init():
    """Any random initialisation of real (not meta) weights inside the block fails the test."""
    real_normal = torch.nn.init.normal_

    def refuse(*args, **kwargs):
        raise AssertionError("a loader initialised weights randomly")

    def normal_on_meta_only(tensor, *args, **kwargs):  # initialising a meta tensor costs nothing
        if not tensor.is_meta:
            refuse()
        return real_normal(tensor, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "randn", refuse)
        patch.setattr(torch.nn.init, "normal_", normal_on_meta_only)
        yield


def test_empty_model_allocates_nothing_and_shares_rotary_tables():
    model = empty_model(tiny_config(n_layers=3))
    assert all(p.is_meta for p in model.parameters())
    cos = [model.blocks[i].attn.rotary.cos for i in range(3)]
    assert not cos[0].is_meta and cos[0].data_ptr() == cos[1].data_ptr() == cos[2].data_ptr()
    fresh = HookedBilinearTransformer(tiny_config(n_layers=3))
    assert torch.equal(cos[0], fresh.blocks[0].attn.rotary.cos)


def test_llama_load_makes_no_copy_on_cpu(tmp_path):
    hf, folder = _llama(tmp_path)
    with no_random_init():
        model = HookedBilinearTransformer.from_pretrained(folder, dtype="bfloat16", tokenizer=False)
    W_gate = model.blocks[0].mlp.W_gate  # [d_model, d_mlp], a transposed view of gate_proj [d_mlp, d_model]
    assert W_gate.dtype == torch.bfloat16 and W_gate.stride() == (1, 32) and not W_gate.is_contiguous()
    assert torch.equal(W_gate, hf.model.layers[0].mlp.gate_proj.weight.T)


def test_llama_load_to_another_dtype_converts_each_tensor_once(tmp_path):
    hf, folder = _llama(tmp_path)
    with no_random_init():
        model = HookedBilinearTransformer.from_pretrained(folder, dtype="float32", tokenizer=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.blocks[1].mlp.W_out, hf.model.layers[1].mlp.down_proj.weight.T.float())
    tokens = random_tokens(48)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf.float()(tokens).logits, atol=1e-4, rtol=1e-4)


def test_papers_load_keeps_fused_tensors_as_views(tmp_path):
    directory = write_checkpoint(tmp_path / "ckpt", papers_config(), papers_weights(False))
    with no_random_init():
        model = HookedBilinearTransformer.from_pretrained(directory, tokenizer=False)
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    # W_Q, W_K, W_V are slices of one qkv tensor, W_gate and W_in of one w tensor: no copies made
    assert attn.W_Q.untyped_storage().data_ptr() == attn._W_K.untyped_storage().data_ptr()
    assert mlp.W_gate.untyped_storage().data_ptr() == mlp.W_in.untyped_storage().data_ptr()


def test_native_round_trip_then_in_place_edit_keeps_checkpoint(tmp_path):
    model = HookedBilinearTransformer(tiny_config(seed=2))
    model.save_pretrained(tmp_path / "ckpt")
    with no_random_init():
        loaded = HookedBilinearTransformer.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        loaded.blocks[0].mlp.W_in.mul_(0)  # copy-on-write: the file and later loads are unaffected
    again = HookedBilinearTransformer.from_pretrained(tmp_path / "ckpt")
    assert_same_weights(model, again)


def test_to_hf_is_built_around_views():
    model = HookedBilinearTransformer(tiny_config(d_vocab=48)).eval()
    randomize(model, std=0.2)
    with no_random_init():
        hf = model.to_hf()
    gate = hf.model.layers[0].mlp.gate_proj.weight
    assert gate.data_ptr() == model.blocks[0].mlp.W_gate.data_ptr()  # the same memory, no copy
    assert not any(p.is_meta for p in hf.parameters())
    tokens = random_tokens(48)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-4, rtol=1e-4)
