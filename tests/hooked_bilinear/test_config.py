import json

import pytest
import torch

from hooked_bilinear import HookedBilinearConfig
from transformer_lens.config import TransformerLensConfig

from ..conftest import tiny_config


def test_defaults_are_bilinear_rms_rotary():
    cfg = tiny_config()
    assert isinstance(cfg, TransformerLensConfig)
    assert cfg.act_fn == "linear" and cfg.is_bilinear and cfg.gated_mlp
    assert cfg.normalization_type == "RMS" and cfg.positional_embedding_type == "rotary"
    assert cfg.n_heads == 4 and cfg.n_key_value_heads == 4 and cfg.rotary_dim == 8


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"act_fn": "silu", "gate_beta": 0.25, "n_key_value_heads": 2, "dtype": torch.bfloat16},
        {"normalization_type": "LN", "positional_embedding_type": "standard", "attn_bias": True, "mlp_bias": True},
        {"normalization_type": None, "tie_embeddings": True, "attn_out_scale": 0.5, "init_scheme": "scaled_normal"},
    ],
)
def test_json_round_trip_is_exact(overrides, tmp_path):
    cfg = tiny_config(**overrides)
    again = HookedBilinearConfig.from_json(cfg.to_json())
    assert again == cfg and again.dtype == cfg.dtype
    cfg.to_json(tmp_path / "config.json")
    assert HookedBilinearConfig.from_json(tmp_path / "config.json") == cfg
    assert json.loads(cfg.to_json())["dtype"] == str(cfg.dtype).removeprefix("torch.")


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"d_head": 7}, "d_model"),
        ({"n_key_value_heads": 3}, "n_key_value_heads"),
        ({"d_mlp": 0}, "d_mlp"),
        ({"d_vocab": -1}, "d_vocab"),
        ({"n_layers": 0}, "n_layers"),
        ({"act_fn": "swish"}, "act_fn"),
        ({"gate_beta": 0.5}, "gate_beta"),
        ({"normalization_type": "LayerNorm"}, "normalization_type"),
        ({"positional_embedding_type": "alibi"}, "positional_embedding_type"),
        ({"dtype": "int8"}, "dtype"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_unknown_json_field_is_an_error():
    data = tiny_config().to_dict()
    data["d_modle"] = 3
    with pytest.raises(ValueError, match="d_modle"):
        HookedBilinearConfig.from_dict(data)
