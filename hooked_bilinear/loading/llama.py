"""Hugging Face Llama-architecture checkpoints (`LlamaForCausalLM`, e.g. TinyLlama) <-> this model.

A Llama MLP is `down(act(gate(x)) * up(x))`, our `act(x W_gate) * (x W_in) @ W_out`: SwiGLU for
hidden_act="silu", bilinear for hidden_act="linear" (transformers' ACT2FN["linear"] is the
identity). HF stores `nn.Linear` weights as [out, in] with heads flattened; we store [in, out] with
heads split, so every tensor is one einops rearrangement away -- a view, never a copy: loading
assigns memory-mapped checkpoint tensors as our parameters (see `materialize`), and `to_hf()`
builds the HF model around views of ours. HF weights are read straight from the safetensors files,
never by instantiating the HF model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import einops
import torch
from torch import Tensor

from ..config import HookedBilinearConfig, parse_dtype
from .checks import CheckpointError, check_source_tensors, pick_tokenizer, read_weights
from .materialize import empty_model, fill_model

_HF_ACT_TO_OURS = {"silu": "silu", "swish": "silu", "linear": "linear", "relu": "relu", "gelu": "gelu"}
# Buffers some older checkpoints stored; they are recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def is_llama_config(raw: dict) -> bool:
    return raw.get("model_type") == "llama" or "LlamaForCausalLM" in (raw.get("architectures") or [])


def _rope_theta(hf_config: Any) -> float:
    """The rotary base, refusing any scaled rope (which this model does not implement).

    transformers 5 keeps it in `rope_parameters`; 4.x in `rope_theta` with `rope_scaling`."""
    params = getattr(hf_config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_theta" not in params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        raise NotImplementedError(
            f"rope scaling type {rope_type!r} ({params}) is not supported: this model implements plain "
            "rotary embeddings only (rope_type 'default')"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported")
    return float(params["rope_theta"])


def config_from_hf_llama(hf_config: Any, dtype: Any = None, device: Optional[str] = None,
                         model_name: Optional[str] = None) -> HookedBilinearConfig:
    """`transformers.LlamaConfig` -> `HookedBilinearConfig` (RMS norm with gains, rotary, no pos embed)."""
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in _HF_ACT_TO_OURS:
        raise NotImplementedError(f"hidden_act {act!r} is not supported; supported: {sorted(_HF_ACT_TO_OURS)}")
    n_heads = hf_config.num_attention_heads
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    if dtype is None:  # keep the checkpoint's dtype, as transformers does
        stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        try:
            dtype = parse_dtype(stored) if stored is not None else torch.float32
        except ValueError:
            dtype = torch.float32
    try:
        return HookedBilinearConfig(
            d_model=hf_config.hidden_size, d_head=d_head, n_layers=hf_config.num_hidden_layers, n_heads=n_heads,
            n_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or n_heads,
            d_mlp=hf_config.intermediate_size, d_vocab=hf_config.vocab_size,
            n_ctx=hf_config.max_position_embeddings, act_fn=_HF_ACT_TO_OURS[act],
            normalization_type="RMS", norm_weights=True, eps=hf_config.rms_norm_eps,
            positional_embedding_type="rotary", rotary_base=_rope_theta(hf_config),
            attn_bias=bool(getattr(hf_config, "attention_bias", False)),
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            initializer_range=getattr(hf_config, "initializer_range", 0.02),
            dtype=parse_dtype(dtype), device=None if device is None else str(device),
            model_name=model_name or getattr(hf_config, "name_or_path", None) or "llama",
        )
    except ValueError as error:
        raise CheckpointError(f"this Llama config does not fit HookedBilinearConfig: {error}") from error


def _mapping(cfg: HookedBilinearConfig) -> list[tuple[str, str, Optional[str], dict, tuple[int, ...]]]:
    """(our name, HF name, einops pattern "hf -> ours" or None, axis sizes, HF shape) per tensor."""
    d, h, kv, k, m, v = cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    rows = [("embed.W_E", "model.embed_tokens.weight", None, {}, (v, d)),
            ("ln_final.w", "model.norm.weight", None, {}, (d,))]
    if not cfg.tie_embeddings:
        rows.append(("unembed.W_U", "lm_head.weight", "v d -> d v", {}, (v, d)))
    for l in range(cfg.n_layers):
        ours, hf = f"blocks.{l}.", f"model.layers.{l}."
        rows += [
            (ours + "ln1.w", hf + "input_layernorm.weight", None, {}, (d,)),
            (ours + "ln2.w", hf + "post_attention_layernorm.weight", None, {}, (d,)),
            (ours + "attn.W_Q", hf + "self_attn.q_proj.weight", "(h k) d -> h d k", {"h": h}, (h * k, d)),
            (ours + "attn._W_K", hf + "self_attn.k_proj.weight", "(h k) d -> h d k", {"h": kv}, (kv * k, d)),
            (ours + "attn._W_V", hf + "self_attn.v_proj.weight", "(h k) d -> h d k", {"h": kv}, (kv * k, d)),
            (ours + "attn.W_O", hf + "self_attn.o_proj.weight", "d (h k) -> h k d", {"h": h}, (d, h * k)),
            (ours + "mlp.W_gate", hf + "mlp.gate_proj.weight", "m d -> d m", {}, (m, d)),
            (ours + "mlp.W_in", hf + "mlp.up_proj.weight", "m d -> d m", {}, (m, d)),
            (ours + "mlp.W_out", hf + "mlp.down_proj.weight", "d m -> m d", {}, (d, m)),
        ]
        if cfg.attn_bias:
            rows += [
                (ours + "attn.b_Q", hf + "self_attn.q_proj.bias", "(h k) -> h k", {"h": h}, (h * k,)),
                (ours + "attn._b_K", hf + "self_attn.k_proj.bias", "(h k) -> h k", {"h": kv}, (kv * k,)),
                (ours + "attn._b_V", hf + "self_attn.v_proj.bias", "(h k) -> h k", {"h": kv}, (kv * k,)),
                (ours + "attn.b_O", hf + "self_attn.o_proj.bias", None, {}, (d,)),
            ]
        if cfg.mlp_bias:
            rows += [
                (ours + "mlp.b_gate", hf + "mlp.gate_proj.bias", None, {}, (m,)),
                (ours + "mlp.b_in", hf + "mlp.up_proj.bias", None, {}, (m,)),
                (ours + "mlp.b_out", hf + "mlp.down_proj.bias", None, {}, (d,)),
            ]
    return rows


def _reverse(pattern: str) -> str:
    left, right = pattern.split("->")
    return f"{right.strip()} -> {left.strip()}"


def state_dict_from_hf_llama(hf_state_dict: dict[str, Tensor], cfg: HookedBilinearConfig,
                             source: str = "the Llama state dict") -> dict[str, Tensor]:
    """HF Llama names and [out, in] layouts -> our names and layouts (shapes checked first).

    The results are views of the inputs (transposed/reshaped), not copies."""
    sd = dict(hf_state_dict)
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # HF's state_dict() lists the tied matrix under both names
    if not any(name.startswith("model.") for name in sd):  # saved from a bare LlamaModel
        sd = {f"model.{name}": t for name, t in sd.items()}
    rows = _mapping(cfg)
    check_source_tensors({hf: shape for _, hf, _, _, shape in rows}, sd, source, ignore=_IGNORED_SUFFIXES)
    return {ours: sd[hf] if pattern is None else einops.rearrange(sd[hf], pattern, **axes)
            for ours, hf, pattern, axes, _ in rows}


def from_hf_llama(hf_model_or_state_dict: Any, hf_config: Any = None, *, device: Optional[str] = None,
                  dtype: Any = None, tokenizer: Any = None, model_name: Optional[str] = None) -> Any:
    """A `HookedBilinearTransformer` from a `LlamaForCausalLM`, or from its state dict plus its
    `LlamaConfig` (or config dict). dtype None keeps the checkpoint's dtype.

    Where dtype and device match, the result shares memory with the HF weights (no copy); clone
    one of them if both must change independently."""
    if isinstance(hf_model_or_state_dict, dict):
        if hf_config is None:
            raise ValueError("from_hf_llama with a state dict needs its config: from_hf_llama(state_dict, llama_config)")
        state_dict = hf_model_or_state_dict
    else:
        hf_config = hf_config or hf_model_or_state_dict.config
        state_dict = hf_model_or_state_dict.state_dict()
    if isinstance(hf_config, dict):
        from transformers import LlamaConfig

        hf_config = LlamaConfig(**hf_config)
    cfg = config_from_hf_llama(hf_config, dtype=dtype, device=device, model_name=model_name)
    with torch.no_grad():
        ours = state_dict_from_hf_llama({k: v.detach() for k, v in state_dict.items()}, cfg)
    return fill_model(empty_model(cfg, tokenizer=tokenizer), ours, "the converted Llama weights")


def load_hf_llama(directory: str | Path, device: Optional[str] = None, dtype: Any = None,
                  tokenizer: Any = True, model_name: Optional[str] = None) -> Any:
    """Read a Hugging Face Llama checkpoint folder (config.json + safetensors, single or sharded).

    No weight is allocated twice: see `materialize` for what loading costs."""
    from transformers import LlamaConfig

    directory = Path(directory)
    hf_config = LlamaConfig.from_pretrained(str(directory))  # also upgrades older config.json layouts
    cfg = config_from_hf_llama(hf_config, dtype=dtype, device=device, model_name=model_name or str(directory))
    model = empty_model(cfg, tokenizer=pick_tokenizer(tokenizer, directory))
    # One expression: the converted dict is referenced by fill_model alone, which frees as it goes.
    return fill_model(model, state_dict_from_hf_llama(read_weights(directory, device=cfg.device), cfg,
                                                      source=str(directory)), str(directory))


# --- ours -> Hugging Face ---------------------------------------------------------------------


def llama_misfits(cfg: HookedBilinearConfig) -> list[str]:
    """What keeps this config from being a LlamaForCausalLM (empty when it fits)."""
    problems = []
    if cfg.normalization_type != "RMS":
        problems.append(f"normalization_type={cfg.normalization_type!r} (Llama uses RMSNorm)")
    if cfg.positional_embedding_type != "rotary":
        problems.append(f"positional_embedding_type={cfg.positional_embedding_type!r} (Llama uses rotary)")
    elif cfg.rotary_dim != cfg.d_head:
        problems.append(f"rotary_dim={cfg.rotary_dim} < d_head={cfg.d_head} (Llama rotates every feature)")
    if cfg.unembed_bias:
        problems.append("unembed_bias=True (Llama's lm_head has no bias)")
    if cfg.gate_beta not in (None, 0.0, 1.0):
        problems.append(f"gate_beta={cfg.gate_beta} (the gate x*sigmoid(beta*x) is a Llama activation only at "
                        "beta 1 (silu) or 0 (linear); finish annealing or call set_gate_beta)")
    return problems


def hf_llama_config(model: Any) -> Any:
    """The `transformers.LlamaConfig` describing `model` (which must fit Llama)."""
    import transformers
    from transformers import LlamaConfig

    cfg = model.cfg
    problems = llama_misfits(cfg)
    if problems:
        raise ValueError("this model does not fit the Llama architecture: " + "; ".join(problems))
    act = {None: cfg.act_fn, 1.0: "silu", 0.0: "linear"}[cfg.gate_beta]
    tok = model.tokenizer
    kwargs = dict(
        hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_key_value_heads, head_dim=cfg.d_head, intermediate_size=cfg.d_mlp,
        vocab_size=cfg.d_vocab, max_position_embeddings=cfg.n_ctx, rms_norm_eps=cfg.eps, hidden_act=act,
        attention_bias=cfg.attn_bias, mlp_bias=cfg.mlp_bias, tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.initializer_range,
        bos_token_id=getattr(tok, "bos_token_id", None), eos_token_id=getattr(tok, "eos_token_id", None),
        pad_token_id=getattr(tok, "pad_token_id", None),
    )
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": float(cfg.rotary_base)}
    else:
        kwargs["rope_theta"] = float(cfg.rotary_base)
    return LlamaConfig(**kwargs)


@torch.no_grad()
def hf_llama_state_dict(model: Any) -> dict[str, Tensor]:
    """Our weights under HF Llama names and layouts, as views of our parameters (no copy).
    Weightless norms become unit gains, the attention-output scale is folded into o_proj and a gate
    at beta 0 (x/2) into gate_proj: only those tensors are new."""
    cfg = model.cfg
    ours = dict(model.state_dict())
    for name in ["ln_final.w"] + [f"blocks.{l}.ln{i}.w" for l in range(cfg.n_layers) for i in (1, 2)]:
        if name not in ours:  # one tensor each: savers refuse (or drop) tensors that share memory
            ours[name] = torch.ones(cfg.d_model, dtype=cfg.dtype, device=model.W_E.device)
    if cfg.tie_embeddings:
        ours.pop("unembed.W_U", None)
    for l in range(cfg.n_layers):
        p = f"blocks.{l}."
        if cfg.attn_out_scale != 1.0:
            for name in ("attn.W_O", "attn.b_O"):
                if p + name in ours:
                    ours[p + name] = ours[p + name] * cfg.attn_out_scale
        if cfg.gate_beta == 0.0:
            for name in ("mlp.W_gate", "mlp.b_gate"):
                if p + name in ours:
                    ours[p + name] = ours[p + name] * 0.5
    out = {hf: ours[name] if pattern is None else einops.rearrange(ours[name], _reverse(pattern), **axes)
           for name, hf, pattern, axes, _ in _mapping(cfg)}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def to_hf_llama(model: Any) -> Any:
    """A `transformers.LlamaForCausalLM` (eval mode, same dtype and device) computing the same logits.

    hidden_act is "linear" for a bilinear model. Raises ValueError naming what does not fit Llama.
    The HF model is built empty (meta device) around views of this model's parameters, so it
    shares their memory: an in-place change to one shows in the other (deep-copy for independence)."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    hf_config = hf_llama_config(model)
    hf_config.dtype = model.cfg.dtype
    state_dict = hf_llama_state_dict(model)
    with init_empty_weights(include_buffers=False):  # no random init of a second model
        hf_model = LlamaForCausalLM(hf_config)
    missing, unexpected = hf_model.load_state_dict(state_dict, strict=False, assign=True)
    tied = model.cfg.tie_embeddings
    missing = [n for n in missing if not n.endswith(_IGNORED_SUFFIXES) and not (tied and n == "lm_head.weight")]
    if missing or unexpected:  # would mean this module's mapping is out of date with transformers
        raise RuntimeError(f"Llama conversion left tensors unmatched: missing {missing}, unexpected {unexpected}")
    if tied:
        hf_model.tie_weights()
    hf_model.to(model.W_E.device)  # buffers (rotary frequencies); parameters are already there
    left = [name for name, p in hf_model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"Llama conversion left parameters unloaded: {left}")
    return hf_model.eval()


def save_hf_llama(model: Any, directory: str | Path, max_shard_size: int | str = "1GB") -> None:
    """Write `model` as a Hugging Face Llama checkpoint (+ tokenizer), atomically. The HF model
    shares our parameters (see `to_hf_llama`); transformers copies one shard at a time."""
    from .native import write_checkpoint_atomically
    from .token_counts import token_counts_of, write_token_counts

    counts = token_counts_of(model)
    hf_model = to_hf_llama(model)

    def write(tmp: Path) -> None:
        hf_model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
        write_token_counts(counts, tmp)  # Hugging Face tools ignore it; from_pretrained reads it

    write_checkpoint_atomically(directory, write)
