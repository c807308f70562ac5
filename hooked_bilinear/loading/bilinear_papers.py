"""Bilinear checkpoints of the original papers (DESIGN.md section 6), from three generations of the
authors' code, told apart by their config keys and tensor names:

* "official" (`tdooms/ts-medium`, `ts-large`, `fw-small`, `fw-medium`; keys `n_layer, d_model,
  d_hidden, n_head, n_ctx, n_vocab, bilinear, gate, bias, normalization, tokenizer`, maybe
  `scale_attn`): weightless RMSNorm (eps 1e-8), fused qkv (rows ordered (3, n_head, d_head)), rotary
  base 10000 in the half-rotation layout, attention output times 1/sqrt(2 n_layer) unless
  `scale_attn` is false, MLP `w` (left = gate rows, then right rows) and `p`, untied `lm_head`.
  `gate` names the left factor's activation (None: bilinear). `bias=True` (the research code) puts
  a bias on qkv, `w` and `p` but none on the attention output `o`.
* "2024" (the 2024 paper's `tdooms/TinyStories-1-*`; keys `n_vocab, n_head, n_layer, n_ctx,
  d_model, d_hidden, bilinear, gate, normalization, noise, modifier`): `gate` is a bool (True: ReLU
  on the left factor), the MLP output is named `o`, RMSNorms have gains (`n1.norm.weight`, ...),
  eps 1e-8, and attention output is not scaled. `noise` only acted in training.
* `bilinear=False` (a plain, ungated MLP) and the research code's `attention2` are refused: every
  MLP in this library is gated and every attention is softmax attention.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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
# Tokenizer names in the authors' configs -> (hub repository, pad token); their code loads every
# one with that pad token and padding_side="right".
TOKENIZERS = {
    "ts-4096": ("tdooms/ts-tokenizer-4096", "[EOS]"),
    "ss-4096": ("tdooms/ss-tokenizer-4096", "[EOS]"),
    "mistral": ("mistral-community/Mixtral-8x22B-v0.1", "</s>"),
    "gpt2": ("openai-community/gpt2", "<|endoftext|>"),
}
# Rotary frequencies the original stored as a buffer; recomputed from the config here.
_IGNORED_SUFFIXES = ("rotary.inv_freq",)
RMS_EPS = 1e-8
ROTARY_BASE = 10000.0


@dataclass(frozen=True)
class Layout:
    """Which tensors a papers checkpoint has (the names differ between code generations)."""

    mlp_out: str  # "p" (official, research) or "o" (2024)
    norm_gains: bool  # n1.norm.weight, n2.norm.weight, n_f.norm.weight (2024 with normalization)
    qkv_bias: bool
    o_bias: bool  # only hand-edited checkpoints; the authors' code never has one
    mlp_bias: bool
    lm_head_bias: bool
    tokenizer: Optional[str]  # hub repository
    pad_token: Optional[str]
    padding_side: Optional[str]


def is_papers_config(raw: dict) -> bool:
    return all(key in raw for key in _REQUIRED)


def _is_2024(raw: dict, weights: dict[str, Tensor]) -> bool:
    return ("transformer.h.0.mlp.o.weight" in weights or "modifier" in raw or "noise" in raw
            or isinstance(raw.get("gate"), bool))


def layout_of(raw: dict, weights: dict[str, Tensor]) -> Layout:
    is_2024 = _is_2024(raw, weights)
    named = raw.get("tokenizer")
    if named in TOKENIZERS:
        tokenizer, pad, side = *TOKENIZERS[named], "right"
    elif named is not None:
        tokenizer, pad, side = named, None, None
    elif is_2024 and raw.get("n_vocab"):  # the 2024 code: its own vocabulary's tokenizer, pad [EOS]
        tokenizer, pad, side = f"tdooms/TinyStories-{raw['n_vocab']}", "[EOS]", None
    else:
        tokenizer, pad, side = None, None, None
    return Layout(
        mlp_out="o" if is_2024 else "p",
        norm_gains="transformer.n_f.norm.weight" in weights,
        qkv_bias="transformer.h.0.attn.qkv.bias" in weights,
        o_bias="transformer.h.0.attn.o.bias" in weights,
        mlp_bias=f"transformer.h.0.mlp.{'o' if is_2024 else 'p'}.bias" in weights or "transformer.h.0.mlp.w.bias" in weights,
        lm_head_bias="lm_head.bias" in weights,
        tokenizer=tokenizer, pad_token=pad, padding_side=side,
    )


def _gate(raw: dict) -> str:
    gate = raw.get("gate")
    if isinstance(gate, bool):  # the 2024 code: True puts a ReLU on the left factor
        return "relu" if gate else "linear"
    if gate not in _GATES:
        raise CheckpointError(f"gate {gate!r} is not supported; supported: {sorted(map(str, _GATES))} "
                              "(or true/false in the 2024 code)")
    return _GATES[gate]


def config_from_papers(raw: dict, weights: dict[str, Tensor], dtype: Any = None, device: Optional[str] = None,
                       model_name: str = "bilinear-papers") -> HookedBilinearConfig:
    """The original config.json (plus the weights, for the vocabulary size and which optional
    tensors exist) -> `HookedBilinearConfig`. dtype None: float32."""
    if "mlp" in raw and "bilinear" not in raw:
        raise CheckpointError("this is the early tdooms/TinyStories-* layout (config key 'mlp'), which is not "
                              "supported; the 2024 paper's models (keys 'bilinear', 'gate') and ts-*/fw-* are")
    if not raw.get("bilinear", True):
        raise CheckpointError("bilinear=false: this checkpoint has a plain, ungated MLP; every MLP in this library "
                              "is gated (bilinear or GLU)")
    if raw.get("attention2"):
        raise CheckpointError("attention2=true: this checkpoint uses the research code's bilinear attention "
                              "(two query/key pairs, no softmax), which this library does not implement")
    norm = raw.get("normalization", True)
    if norm not in (True, False, None, "rms"):
        raise CheckpointError(f"normalization {norm!r} is not supported (RMSNorm or none)")
    is_2024 = _is_2024(raw, weights)
    layout = layout_of(raw, weights)
    n_layers, d_model, n_heads = int(raw["n_layer"]), int(raw["d_model"]), int(raw["n_head"])
    if d_model % n_heads:
        raise CheckpointError(f"d_model ({d_model}) is not divisible by n_head ({n_heads})")
    wte = weights.get("transformer.wte.weight")
    n_vocab = raw.get("n_vocab") or (wte.shape[0] if wte is not None else None)
    if n_vocab is None:
        raise CheckpointError("config.json has no n_vocab and the weights have no transformer.wte.weight")
    # The 2024 code never scaled attention output; the later code does unless scale_attn is false.
    scaled = False if is_2024 else raw.get("scale_attn", True)
    return HookedBilinearConfig(
        d_model=d_model, d_head=d_model // n_heads, n_layers=n_layers, n_heads=n_heads,
        d_mlp=int(raw["d_hidden"]), d_vocab=int(n_vocab), n_ctx=int(raw.get("n_ctx", 256)),
        act_fn=_gate(raw), normalization_type="RMS" if norm else None,
        norm_weights=bool(norm) and layout.norm_gains, eps=RMS_EPS,
        positional_embedding_type="rotary", rotary_base=ROTARY_BASE,
        # A qkv bias without an o bias (the research code's bias=True) loads as a zero b_O.
        attn_bias=layout.qkv_bias or layout.o_bias, mlp_bias=layout.mlp_bias,
        unembed_bias=layout.lm_head_bias, tie_embeddings=False,
        attn_out_scale=(2 * n_layers) ** -0.5 if scaled else 1.0,
        dtype=parse_dtype(dtype) if dtype is not None else torch.float32,
        device=None if device is None else str(device), model_name=model_name, tokenizer_name=layout.tokenizer,
    )


def _source_shapes(cfg: HookedBilinearConfig, layout: Layout) -> dict[str, tuple[int, ...]]:
    d, m, v = cfg.d_model, cfg.d_mlp, cfg.d_vocab
    shapes = {"transformer.wte.weight": (v, d), "lm_head.weight": (v, d)}
    if layout.lm_head_bias:
        shapes["lm_head.bias"] = (v,)
    if cfg.norm_weights:
        shapes["transformer.n_f.norm.weight"] = (d,)
    for l in range(cfg.n_layers):
        p, out = f"transformer.h.{l}.", f"transformer.h.{l}.mlp.{layout.mlp_out}"
        shapes.update({p + "attn.qkv.weight": (3 * d, d), p + "attn.o.weight": (d, d),
                       p + "mlp.w.weight": (2 * m, d), out + ".weight": (d, m)})
        if cfg.norm_weights:
            shapes.update({p + "n1.norm.weight": (d,), p + "n2.norm.weight": (d,)})
        if layout.qkv_bias:
            shapes[p + "attn.qkv.bias"] = (3 * d,)
        if layout.o_bias:
            shapes[p + "attn.o.bias"] = (d,)
        if layout.mlp_bias:
            shapes.update({p + "mlp.w.bias": (2 * m,), out + ".bias": (d,)})
    return shapes


def state_dict_from_papers(weights: dict[str, Tensor], cfg: HookedBilinearConfig, layout: Layout,
                           source: str = "the checkpoint") -> dict[str, Tensor]:
    """Original names and [out, in] layouts -> our state dict (shapes checked first). The results
    are views of the checkpoint's tensors, not copies."""
    check_source_tensors(_source_shapes(cfg, layout), weights, source, ignore=_IGNORED_SUFFIXES)
    h, d = cfg.n_heads, cfg.d_model
    out = {"embed.W_E": weights["transformer.wte.weight"], "unembed.W_U": weights["lm_head.weight"].T}
    if layout.lm_head_bias:
        out["unembed.b_U"] = weights["lm_head.bias"]
    if cfg.norm_weights:
        out["ln_final.w"] = weights["transformer.n_f.norm.weight"]
    for l in range(cfg.n_layers):
        src, dst, mlp_out = f"transformer.h.{l}.", f"blocks.{l}.", f"transformer.h.{l}.mlp.{layout.mlp_out}"
        q, k, v = einops.rearrange(weights[src + "attn.qkv.weight"], "(n h k) d -> n h d k", n=3, h=h)
        out.update({dst + "attn.W_Q": q, dst + "attn._W_K": k, dst + "attn._W_V": v,
                    dst + "attn.W_O": einops.rearrange(weights[src + "attn.o.weight"], "d (h k) -> h k d", h=h)})
        if cfg.norm_weights:
            out.update({dst + "ln1.w": weights[src + "n1.norm.weight"], dst + "ln2.w": weights[src + "n2.norm.weight"]})
        if cfg.attn_bias:
            qkv_bias = weights.get(src + "attn.qkv.bias")
            if qkv_bias is None:
                qkv_bias = weights[src + "attn.o.bias"].new_zeros(3 * d)
            bq, bk, bv = einops.rearrange(qkv_bias, "(n h k) -> n h k", n=3, h=h)
            o_bias = weights.get(src + "attn.o.bias")
            out.update({dst + "attn.b_Q": bq, dst + "attn._b_K": bk, dst + "attn._b_V": bv,
                        dst + "attn.b_O": o_bias if o_bias is not None else qkv_bias.new_zeros(d)})
        left, right = weights[src + "mlp.w.weight"].chunk(2, dim=0)  # [d_hidden, d_model] each
        out.update({dst + "mlp.W_gate": left.T, dst + "mlp.W_in": right.T,
                    dst + "mlp.W_out": weights[mlp_out + ".weight"].T})
        if cfg.mlp_bias:
            b_left, b_right = weights[src + "mlp.w.bias"].chunk(2, dim=0)
            out.update({dst + "mlp.b_gate": b_left, dst + "mlp.b_in": b_right,
                        dst + "mlp.b_out": weights[mlp_out + ".bias"]})
    return out


def load_papers(directory: str | Path, device: Optional[str] = None, dtype: Any = None, tokenizer: Any = True,
                model_name: Optional[str] = None) -> Any:
    """Read a papers-format folder (config.json + model.safetensors or pytorch_model.bin).

    The tokenizer comes from the folder if it has one, else from the repository the config names;
    either way with the pad token and padding side the authors' code sets. If it cannot be loaded
    (e.g. offline) a warning is given and the model has none."""
    directory = Path(directory)
    raw = json.loads((directory / "config.json").read_text())
    weights = read_weights(directory, device=device)
    layout = layout_of(raw, weights)
    cfg = config_from_papers(raw, weights, dtype=dtype, device=device, model_name=model_name or str(directory))
    settings = {k: v for k, v in (("pad_token", layout.pad_token), ("padding_side", layout.padding_side)) if v}
    model = empty_model(cfg, tokenizer=pick_tokenizer(tokenizer, directory, cfg.tokenizer_name, **settings))
    ours = state_dict_from_papers(weights, cfg, layout, source=str(directory))
    del weights  # fill_model frees each source tensor once its parameter is made
    return fill_model(model, ours, str(directory))
