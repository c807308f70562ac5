"""Published bilinear checkpoints of the original papers (Hugging Face `tdooms/ts-medium`, `ts-large`,
`fw-small`, `fw-medium`; DESIGN.md section 6).

Their architecture: token embedding, pre-norm blocks with weightless RMSNorm (eps 1e-8), fused qkv
projection (rows ordered (3, n_head, d_head)), rotary base 10000 in the half-rotation layout,
attention output times 1/sqrt(2 n_layer) (unless `scale_attn` is false), a gated MLP whose `w`
holds the left (gate) rows then the right (in) rows, projection `p`, final norm, untied `lm_head`.
In the original code the gate named by `gate` is applied inside the bilinear layer (None: identity),
so `bilinear=True, gate="relu"` is a ReGLU model; `bilinear=False` is a plain, ungated MLP, which
this library does not represent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import einops
import torch
from torch import Tensor

from ..config import HookedBilinearConfig, parse_dtype
from .checks import CheckpointError, check_source_tensors, pick_tokenizer, read_weights
from .materialize import empty_model, fill_model

PAPERS_KEYS = ("n_layer", "d_model", "d_hidden", "n_head", "n_ctx", "n_vocab", "bilinear", "gate", "bias",
               "normalization", "scale_attn")
_REQUIRED = ("n_layer", "d_model", "d_hidden", "n_head")
_GATES = {None: "linear", "none": "linear", "identity": "linear", "linear": "linear",
          "relu": "relu", "silu": "silu", "swish": "silu", "gelu": "gelu"}
# Short tokenizer names used by the original code, and the hub repositories they stand for.
_TOKENIZERS = {"ts-4096": "tdooms/ts-tokenizer-4096", "gpt2": "openai-community/gpt2",
               "mistral": "mistral-community/Mixtral-8x22B-v0.1"}
# Rotary frequencies the original stored as a buffer; recomputed from the config here.
_IGNORED_SUFFIXES = ("rotary.inv_freq",)
RMS_EPS = 1e-8
ROTARY_BASE = 10000.0


def is_papers_config(raw: dict) -> bool:
    return all(key in raw for key in _REQUIRED)


def config_from_papers(raw: dict, weights: dict[str, Tensor], dtype: Any = None, device: Optional[str] = None,
                       model_name: str = "bilinear-papers") -> HookedBilinearConfig:
    """The original config.json (plus the weights, for the vocabulary size and which biases exist)
    -> `HookedBilinearConfig`. dtype None: float32."""
    if "mlp" in raw and "bilinear" not in raw:
        raise CheckpointError("this is the older tdooms/TinyStories-* layout (config key 'mlp'), which is not "
                              "supported; the published ts-*/fw-* checkpoints are")
    if not raw.get("bilinear", True):
        raise CheckpointError("bilinear=false: this checkpoint has a plain, ungated MLP; every MLP in this library "
                              "is gated (bilinear or GLU)")
    gate = raw.get("gate")
    if gate not in _GATES:
        raise CheckpointError(f"gate {gate!r} is not supported; supported: {sorted(map(str, _GATES))}")
    norm = raw.get("normalization", True)
    if norm not in (True, False, None, "rms"):
        raise CheckpointError(f"normalization {norm!r} is not supported (weightless RMSNorm or none)")
    n_layers, d_model, n_heads = int(raw["n_layer"]), int(raw["d_model"]), int(raw["n_head"])
    if d_model % n_heads:
        raise CheckpointError(f"d_model ({d_model}) is not divisible by n_head ({n_heads})")
    wte = weights.get("transformer.wte.weight")
    n_vocab = raw.get("n_vocab") or (wte.shape[0] if wte is not None else None)
    if n_vocab is None:
        raise CheckpointError("config.json has no n_vocab and the weights have no transformer.wte.weight")
    return HookedBilinearConfig(
        d_model=d_model, d_head=d_model // n_heads, n_layers=n_layers, n_heads=n_heads,
        d_mlp=int(raw["d_hidden"]), d_vocab=int(n_vocab), n_ctx=int(raw.get("n_ctx", 256)),
        act_fn=_GATES[gate], normalization_type="RMS" if norm else None, norm_weights=False, eps=RMS_EPS,
        positional_embedding_type="rotary", rotary_base=ROTARY_BASE,
        attn_bias="transformer.h.0.attn.qkv.bias" in weights,  # the original never has them; allow both
        mlp_bias=bool(raw.get("bias", False)), unembed_bias="lm_head.bias" in weights, tie_embeddings=False,
        attn_out_scale=(2 * n_layers) ** -0.5 if raw.get("scale_attn", True) else 1.0,
        dtype=parse_dtype(dtype) if dtype is not None else torch.float32,
        device=None if device is None else str(device), model_name=model_name,
        tokenizer_name=_TOKENIZERS.get(raw.get("tokenizer"), raw.get("tokenizer")),
    )


def _source_shapes(cfg: HookedBilinearConfig) -> dict[str, tuple[int, ...]]:
    d, m, v = cfg.d_model, cfg.d_mlp, cfg.d_vocab
    shapes = {"transformer.wte.weight": (v, d), "lm_head.weight": (v, d)}
    if cfg.unembed_bias:
        shapes["lm_head.bias"] = (v,)
    for l in range(cfg.n_layers):
        p = f"transformer.h.{l}."
        shapes.update({p + "attn.qkv.weight": (3 * d, d), p + "attn.o.weight": (d, d),
                       p + "mlp.w.weight": (2 * m, d), p + "mlp.p.weight": (d, m)})
        if cfg.attn_bias:
            shapes.update({p + "attn.qkv.bias": (3 * d,), p + "attn.o.bias": (d,)})
        if cfg.mlp_bias:
            shapes.update({p + "mlp.w.bias": (2 * m,), p + "mlp.p.bias": (d,)})
    return shapes


def state_dict_from_papers(weights: dict[str, Tensor], cfg: HookedBilinearConfig,
                           source: str = "the checkpoint") -> dict[str, Tensor]:
    """Original names and [out, in] layouts -> our state dict (shapes checked first)."""
    check_source_tensors(_source_shapes(cfg), weights, source, ignore=_IGNORED_SUFFIXES)
    h = cfg.n_heads
    out = {"embed.W_E": weights["transformer.wte.weight"], "unembed.W_U": weights["lm_head.weight"].T}
    if cfg.unembed_bias:
        out["unembed.b_U"] = weights["lm_head.bias"]
    for l in range(cfg.n_layers):
        src, dst = f"transformer.h.{l}.", f"blocks.{l}."
        q, k, v = einops.rearrange(weights[src + "attn.qkv.weight"], "(n h k) d -> n h d k", n=3, h=h)
        out.update({dst + "attn.W_Q": q, dst + "attn._W_K": k, dst + "attn._W_V": v,
                    dst + "attn.W_O": einops.rearrange(weights[src + "attn.o.weight"], "d (h k) -> h k d", h=h)})
        if cfg.attn_bias:
            bq, bk, bv = einops.rearrange(weights[src + "attn.qkv.bias"], "(n h k) -> n h k", n=3, h=h)
            out.update({dst + "attn.b_Q": bq, dst + "attn._b_K": bk, dst + "attn._b_V": bv,
                        dst + "attn.b_O": weights[src + "attn.o.bias"]})
        left, right = weights[src + "mlp.w.weight"].chunk(2, dim=0)  # [d_hidden, d_model] each
        out.update({dst + "mlp.W_gate": left.T, dst + "mlp.W_in": right.T,
                    dst + "mlp.W_out": weights[src + "mlp.p.weight"].T})
        if cfg.mlp_bias:
            b_left, b_right = weights[src + "mlp.w.bias"].chunk(2, dim=0)
            out.update({dst + "mlp.b_gate": b_left, dst + "mlp.b_in": b_right,
                        dst + "mlp.b_out": weights[src + "mlp.p.bias"]})
    return out  # views of the checkpoint's tensors, no copies


def load_papers(directory: str | Path, device: Optional[str] = None, dtype: Any = None, tokenizer: Any = True,
                model_name: Optional[str] = None) -> Any:
    """Read a tdooms-format folder (config.json + model.safetensors or pytorch_model.bin).

    The tokenizer comes from the folder if it has one, else from the repository `config["tokenizer"]`
    names; if that cannot be loaded (e.g. offline) a warning is given and the model has none."""
    directory = Path(directory)
    raw = json.loads((directory / "config.json").read_text())
    weights = read_weights(directory, device=device)
    cfg = config_from_papers(raw, weights, dtype=dtype, device=device, model_name=model_name or str(directory))
    ours = state_dict_from_papers(weights, cfg, source=str(directory))
    model = empty_model(cfg, tokenizer=pick_tokenizer(tokenizer, directory, cfg.tokenizer_name))
    return fill_model(model, ours, str(directory))
