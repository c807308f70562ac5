import json
import os

import pytest
import torch

from hooked_bilinear import HookedBilinearTransformer
from hooked_bilinear.loading import CheckpointError, detect_format, native

from ..conftest import tiny_config
from .conftest_loading import assert_same_weights, randomize, random_tokens

ROUND_TRIP_CONFIGS = {
    "bilinear_gqa": dict(n_key_value_heads=2),
    "swiglu": dict(act_fn="silu"),
    "tied": dict(tie_embeddings=True, attn_out_scale=0.5),
    "ln_biases_standard_pos": dict(normalization_type="LN", positional_embedding_type="standard",
                                   attn_bias=True, mlp_bias=True, unembed_bias=True),
    "weightless_bf16": dict(norm_weights=False, dtype=torch.bfloat16, gate_beta=0.3, act_fn="silu"),
}


def _model(**overrides) -> HookedBilinearTransformer:
    model = HookedBilinearTransformer(tiny_config(**overrides)).eval()
    randomize(model, std=0.2)  # biases and gains random too, so a dropped one shows
    return model


@pytest.mark.parametrize("overrides", ROUND_TRIP_CONFIGS.values(), ids=ROUND_TRIP_CONFIGS.keys())
def test_round_trip_is_exact(overrides, tmp_path):
    model = _model(**overrides)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["format"] == "hooked-bilinear"
    assert detect_format(tmp_path / "ckpt") == "native"
    again = HookedBilinearTransformer.from_pretrained(str(tmp_path / "ckpt"))
    assert again.cfg == model.cfg and not again.training
    assert_same_weights(model, again)
    tokens = random_tokens(model.cfg.d_vocab)
    assert torch.equal(model(tokens), again(tokens))


def test_tokenizer_is_saved_and_dtype_can_change(word_tokenizer, tmp_path):
    model = HookedBilinearTransformer(tiny_config(d_vocab=len(word_tokenizer)), tokenizer=word_tokenizer)
    model.save_pretrained(tmp_path / "ckpt")
    again = HookedBilinearTransformer.from_pretrained(tmp_path / "ckpt", dtype="float64")
    assert again.cfg.dtype == torch.float64 and again.W_E.dtype == torch.float64
    assert torch.equal(again.to_tokens("once upon a time"), model.to_tokens("once upon a time"))
    assert HookedBilinearTransformer.from_pretrained(tmp_path / "ckpt", tokenizer=False).tokenizer is None


def test_resave_replaces_checkpoint_files_and_keeps_other_files(word_tokenizer, tmp_path):
    with_tok = HookedBilinearTransformer(tiny_config(d_vocab=len(word_tokenizer)), tokenizer=word_tokenizer)
    with_tok.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    plain = _model(d_vocab=len(word_tokenizer), act_fn="relu")
    plain.save_pretrained(tmp_path / "ckpt")
    again = HookedBilinearTransformer.from_pretrained(tmp_path / "ckpt")
    assert again.tokenizer is None and again.cfg.act_fn == "relu"  # stale tokenizer files were removed
    assert_same_weights(plain, again)
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def _failing_save_file(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\x00" * 100)  # a partial file, then the "crash"
    raise OSError("disk full (simulated)")


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    old, new = _model(seed=1), _model(seed=2, act_fn="silu")
    randomize(new, seed=5)
    old.save_pretrained(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    monkeypatch.setattr(native, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary folder left behind
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert_same_weights(old, HookedBilinearTransformer.from_pretrained(tmp_path / "ckpt"))


def test_interrupted_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "save_file", _failing_save_file)
    with pytest.raises(OSError):
        _model().save_pretrained(tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []


# --- bad input ----------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_unknown_format(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden": 3, "layers": 2}))
    with pytest.raises(CheckpointError, match=r"unknown checkpoint format .*config\.json.*expected one of.*found keys \['hidden', 'layers'\]"):
        HookedBilinearTransformer.from_pretrained(tmp_path)


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HookedBilinearTransformer.from_pretrained(tmp_path)


def test_missing_weights_file(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights file in .*model\.safetensors"):
        HookedBilinearTransformer.from_pretrained(saved)


def test_truncated_weights_file(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt.*re-download"):
        HookedBilinearTransformer.from_pretrained(saved)


def test_shapes_that_do_not_match_the_config(saved):
    raw = json.loads((saved / "config.json").read_text())
    raw["d_mlp"] = 96
    (saved / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.W_gate: expected \[32, 96\], found \[32, 64\]") as info:
        HookedBilinearTransformer.from_pretrained(saved)
    for name in ("blocks.1.mlp.W_in", "blocks.1.mlp.W_out"):
        assert name in str(info.value)


def test_missing_and_unexpected_tensors(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(saved / "model.safetensors"))
    tensors["blocks.0.mlp.W_extra"] = tensors.pop("blocks.0.mlp.W_in")
    save_file(tensors, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors: blocks\.0\.mlp\.W_in(.|\n)*unexpected tensors: blocks\.0\.mlp\.W_extra"):
        HookedBilinearTransformer.from_pretrained(saved)


def test_name_that_is_neither_folder_nor_on_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="'someone/no-such-model' is neither a local folder nor reachable on the Hugging Face hub"):
        HookedBilinearTransformer.from_pretrained("someone/no-such-model")


def test_bad_save_format(tmp_path):
    with pytest.raises(ValueError, match="format must be"):
        _model().save_pretrained(tmp_path / "x", format="onnx")


def test_large_models_are_saved_in_shards_and_load_back(tmp_path):
    from hooked_bilinear.loading import save_pretrained

    model = _model(n_key_value_heads=2)
    save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert_same_weights(model, HookedBilinearTransformer.from_pretrained(tmp_path / "ckpt"))
    model.save_pretrained(tmp_path / "ckpt")  # small again: one file, the stale shards removed
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
