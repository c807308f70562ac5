"""The model's configuration: one dataclass, validated on construction, exact through JSON.

`HookedBilinearConfig` subclasses TransformerLens's own config so that TransformerLens utilities
(ActivationCache, patching) read the fields they expect under the names they expect.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from transformer_lens.config import TransformerLensConfig

GATE_ACTIVATIONS = ("linear", "silu", "relu", "gelu")
NORMALIZATIONS = ("RMS", "LN", None)
POSITIONAL_EMBEDDINGS = ("rotary", "standard")
INIT_SCHEMES = ("normal", "scaled_normal")

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: Any) -> torch.dtype:
    """Accept a torch dtype or its name ("float32", "torch.bfloat16", "bf16")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}.get(name, name)
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass
class HookedBilinearConfig(TransformerLensConfig):
    """Architecture of a hooked transformer whose MLPs are gated, bilinear by default.

    The MLP computes `act(x W_gate + b_gate) * (x W_in + b_in)`, then `W_out`. `act_fn="linear"`
    makes it bilinear; "silu"/"relu"/"gelu" give SwiGLU/ReGLU/GeGLU. A finite `gate_beta` (only with
    act_fn="silu") makes the gate `x * sigmoid(gate_beta * x)`: SiLU at 1, `x / 2` at 0.
    """

    # Required by TransformerLensConfig: d_model, d_head, n_layers, n_ctx.
    n_heads: int = -1
    d_mlp: Optional[int] = None
    d_vocab: int = -1
    n_key_value_heads: Optional[int] = None

    act_fn: str = "linear"
    gate_beta: Optional[float] = None
    gated_mlp: bool = True

    normalization_type: Optional[str] = "RMS"
    norm_weights: bool = True  # learned gains on every norm; False gives weightless norms
    eps: float = 1e-5

    positional_embedding_type: str = "rotary"
    rotary_base: float = 10000.0
    rotary_dim: Optional[int] = None  # defaults to d_head

    attn_bias: bool = False  # biases on Q, K, V and O
    mlp_bias: bool = False  # biases on W_gate, W_in and W_out
    unembed_bias: bool = False
    tie_embeddings: bool = False
    attn_out_scale: float = 1.0  # multiplies each attention layer's output (1/sqrt(2 n_layers) in ts-*)

    # TransformerLens's optional hook points and views (toggle with model.set_use_*; all off by default,
    # as in TransformerLens, because each costs memory). use_attn_result / use_split_qkv_input /
    # attn_only come from TransformerLensConfig.
    use_attn_in: bool = False  # blocks.{l}.hook_attn_in: the residual copied per head
    use_hook_mlp_in: bool = False  # blocks.{l}.hook_mlp_in: the residual the MLP's norm reads
    use_hook_tokens: bool = False  # hook_tokens: the token ids, before the embedding
    ungroup_grouped_query_attention: bool = False  # hook_k/hook_v with n_heads heads (keys repeated)
    d_vocab_out: int = -1  # logits width; -1 means d_vocab (TransformerLens's name)

    init_scheme: str = "normal"  # "scaled_normal" shrinks output projections by 1/sqrt(2 n_layers)
    initializer_range: float = 0.02
    seed: Optional[int] = None

    dtype: torch.dtype = torch.float32
    device: Optional[str] = None
    model_name: str = "hooked-bilinear"
    tokenizer_name: Optional[str] = None

    def __post_init__(self) -> None:
        self.dtype = parse_dtype(self.dtype)
        if self.n_heads == -1 and isinstance(self.d_head, int) and self.d_head > 0:
            if self.d_model % self.d_head:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by d_head ({self.d_head}) when n_heads is not given")
            self.n_heads = self.d_model // self.d_head
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        if self.rotary_dim is None:
            self.rotary_dim = self.d_head
        if self.d_vocab_out == -1:
            self.d_vocab_out = self.d_vocab
        self._validate()
        super().__post_init__()
        # Fields TransformerLens derives from the normalization type.
        self.uses_rms_norm = self.normalization_type == "RMS"
        self.final_rms = self.normalization_type == "RMS"

    def _validate(self) -> None:
        for name in ("d_model", "d_head", "n_layers", "n_ctx", "n_heads", "d_mlp", "d_vocab", "n_key_value_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads * self.d_head != self.d_model:
            raise ValueError(
                f"d_model ({self.d_model}) must equal n_heads x d_head "
                f"({self.n_heads} x {self.d_head} = {self.n_heads * self.d_head})"
            )
        if self.n_heads % self.n_key_value_heads != 0:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be divisible by n_key_value_heads ({self.n_key_value_heads})"
            )
        if self.act_fn not in GATE_ACTIVATIONS:
            raise ValueError(f"act_fn {self.act_fn!r} is unknown; use one of {GATE_ACTIVATIONS}")
        if self.gate_beta is not None and self.act_fn != "silu":
            raise ValueError(
                f"gate_beta={self.gate_beta} needs act_fn='silu' (the gate x*sigmoid(beta*x)); got act_fn={self.act_fn!r}"
            )
        if not self.gated_mlp:
            raise ValueError("gated_mlp must be True: every MLP in this library is gated (bilinear or GLU)")
        if self.normalization_type not in NORMALIZATIONS:
            raise ValueError(f"normalization_type {self.normalization_type!r} is unknown; use one of {NORMALIZATIONS}")
        if self.positional_embedding_type not in POSITIONAL_EMBEDDINGS:
            raise ValueError(
                f"positional_embedding_type {self.positional_embedding_type!r} is unknown; use one of {POSITIONAL_EMBEDDINGS}"
            )
        if self.positional_embedding_type == "rotary" and (self.rotary_dim > self.d_head or self.rotary_dim % 2):
            raise ValueError(f"rotary_dim ({self.rotary_dim}) must be even and at most d_head ({self.d_head})")
        if self.init_scheme not in INIT_SCHEMES:
            raise ValueError(f"init_scheme {self.init_scheme!r} is unknown; use one of {INIT_SCHEMES}")
        if self.d_vocab_out != self.d_vocab and self.tie_embeddings:
            raise ValueError(
                f"d_vocab_out ({self.d_vocab_out}) differs from d_vocab ({self.d_vocab}), which tied embeddings "
                "cannot do; untie them or leave d_vocab_out at -1"
            )
        if self.eps <= 0:
            raise ValueError(f"eps must be positive, got {self.eps}")

    @property
    def n_params(self) -> int:
        """TransformerLens's count of "hidden" weights: attention (Q, K, V, O) and MLP matrices,
        without embeddings, biases or norms (scaling-laws convention)."""
        attn = self.d_model * self.d_head * (2 * self.n_heads + 2 * self.n_key_value_heads)
        mlp = 0 if self.attn_only else 3 * self.d_model * self.d_mlp
        return self.n_layers * (attn + mlp)

    @property
    def is_bilinear(self) -> bool:
        return self.act_fn == "linear"

    # --- JSON -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field, with the dtype as its name, so `json.dumps` works and nothing is lost."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        return out

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "HookedBilinearConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            raise ValueError(f"config has unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**config_dict)

    def to_json(self, path: Optional[str | Path] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "HookedBilinearConfig":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))
