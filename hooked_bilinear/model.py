"""HookedBilinearTransformer: a decoder-only transformer with gated (by default bilinear) MLPs and
TransformerLens's classic hooked-model API.

    tokens [batch, pos]
      -> embed (+ pos_embed)                     hook_embed, hook_pos_embed
      -> blocks[l]: resid + attn(ln1(resid))      blocks.{l}.hook_resid_pre ... hook_resid_mid
                    resid + mlp(ln2(resid))       ... blocks.{l}.hook_resid_post
      -> ln_final -> unembed                      ln_final.hook_normalized, unembed.hook_out
      -> logits [batch, pos, d_vocab]

Hooks, caching and the `hooks()` context come from TransformerLens's `HookedRootModule`; this class
adds the model itself, clear errors for bad input, and `ActivationCache` results.
"""

from __future__ import annotations

import difflib
from collections import namedtuple
from contextlib import contextmanager
from typing import Any, Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

from .activation_cache import make_activation_cache
from .components import Embed, PosEmbed, TransformerBlock, Unembed, make_norm
from .config import HookedBilinearConfig
from .positions import layer_cache, positions_and_masks
from .processing import ProcessingMixin
from .tl_api import TransformerLensAPIMixin
from .tokens import TokenizerMixin
from .weights import WeightViewsMixin

TextOrTokens = Union[str, Sequence[str], Tensor]
Output = namedtuple("Output", ["logits", "loss"])  # return_type="both", as in TransformerLens


class HookedBilinearTransformer(
    WeightViewsMixin, TokenizerMixin, TransformerLensAPIMixin, ProcessingMixin, HookedRootModule
):
    """A hooked transformer whose MLPs are `act(x W_gate) * (x W_in)` then `W_out`.

    >>> cfg = HookedBilinearConfig(d_model=64, d_head=16, n_layers=2, n_ctx=32, d_vocab=100)
    >>> model = HookedBilinearTransformer(cfg)
    >>> logits, cache = model.run_with_cache(torch.randint(0, 100, (1, 8)))
    """

    def __init__(self, cfg: HookedBilinearConfig | dict, tokenizer: Any = None):
        super().__init__()
        self.cfg = HookedBilinearConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
        cfg = self.cfg
        self.tokenizer = tokenizer

        if cfg.use_hook_tokens:
            self.hook_tokens = HookPoint()  # [batch, pos] token ids
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        if cfg.positional_embedding_type == "standard":
            self.pos_embed = PosEmbed(cfg)
            self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
        else:
            self.pos_embed = None
        self.blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.ln_final = make_norm(cfg)
        self.unembed = Unembed(cfg, tied_to=self.embed if cfg.tie_embeddings else None)

        self.init_weights()
        self.setup()
        self.to(cfg.device)

    # --- construction -----------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) matrices, zero biases, unit gains. "scaled_normal" also
        shrinks the matrices that write to the residual stream by 1/sqrt(2 n_layers) (GPT-2 style)."""
        cfg = self.cfg
        generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        out_scale = (2 * cfg.n_layers) ** -0.5 if cfg.init_scheme == "scaled_normal" else 1.0
        for name, param in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "w":
                param.fill_(1.0)
            elif leaf.startswith("b") or leaf.startswith("_b"):
                param.zero_()
            else:
                std = cfg.initializer_range * (out_scale if leaf in ("W_O", "W_out") else 1.0)
                values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
                param.copy_(values)

    # --- forward ----------------------------------------------------------------------------

    def forward(
        self,
        input: TextOrTokens,
        return_type: Optional[Literal["logits", "loss", "both"]] = "logits",
        loss_per_token: bool = False,
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[Literal["left", "right"]] = None,
        start_at_layer: Optional[int] = None,
        tokens: Optional[Tensor] = None,
        shortformer_pos_embed: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        stop_at_layer: Optional[int] = None,
        past_kv_cache: Any = None,
    ) -> Any:
        """Run the model (TransformerLens's arguments, in its order).

        input: token ids [batch, pos], a string or list of strings (needs a tokenizer), or, with
            `start_at_layer`, the residual stream [batch, pos, d_model] entering that layer (pass
            `tokens` as well for a loss).
        attention_mask: [batch, pos], 1 for real tokens and 0 for padding (left or right).
            Positions count real tokens only, so a left-padded sequence gives the same logits as
            the unpadded one.
        stop_at_layer: return the residual stream entering this layer instead of logits.
        past_kv_cache: this library's `KVCache` or TransformerLens's `TransformerLensKeyValueCache`.
        Returns logits [batch, pos, d_vocab], the loss (a scalar, or [batch, pos - 1] with
        `loss_per_token`, zero where the target is padding), both as (logits, loss), or None (the
        final norm still runs, so its hooks fire, as in TransformerLens).
        """
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        if shortformer_pos_embed is not None:
            raise ValueError("shortformer positional embeddings are not supported: this model adds positions to the residual")
        n_layers = self.cfg.n_layers
        start = 0 if start_at_layer is None else start_at_layer + (n_layers if start_at_layer < 0 else 0)
        stop = n_layers if stop_at_layer is None else stop_at_layer + (n_layers if stop_at_layer < 0 else 0)
        if not 0 <= start <= stop <= n_layers:
            raise ValueError(f"need 0 <= start_at_layer ({start}) <= stop_at_layer ({stop}) <= n_layers ({n_layers})")

        if start_at_layer is None:
            residual, tokens, attention_mask, where = self._embed(
                input, prepend_bos, padding_side, attention_mask, past_kv_cache
            )
        else:
            residual = input
            where = positions_and_masks(self, residual.shape[0], residual.shape[1], attention_mask, past_kv_cache)
        positions, key_mask, key_positions = where
        for layer in range(start, stop):
            cache_entry = layer_cache(past_kv_cache, layer)
            residual = self.blocks[layer](residual, positions, key_mask, cache_entry, key_positions)
        if stop_at_layer is not None:
            return residual
        normalized = self.ln_final(residual)
        if return_type is None:
            return None
        logits = self.unembed(normalized)
        if return_type == "logits":
            return logits
        if tokens is None:
            raise ValueError("a loss needs the token ids: pass tokens=... together with start_at_layer")
        loss = self.loss_fn(logits, tokens, attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else Output(logits, loss)

    def input_to_embed(
        self,
        input: TextOrTokens,
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[Literal["left", "right"]] = None,
        attention_mask: Optional[Tensor] = None,
        past_kv_cache: Any = None,
    ) -> tuple[Tensor, Tensor, None, Optional[Tensor]]:
        """TransformerLens's first step: (residual [batch, pos, d_model], tokens [batch, pos],
        shortformer_pos_embed (always None here), attention_mask [batch, pos] or None)."""
        residual, tokens, attention_mask, _ = self._embed(input, prepend_bos, padding_side, attention_mask, past_kv_cache)
        return residual, tokens, None, attention_mask

    def _embed(self, input, prepend_bos, padding_side, attention_mask, past_kv_cache):
        """Tokenize if needed, embed, add positions: (residual, tokens, attention_mask, (positions,
        key_mask, key_positions))."""
        if not isinstance(input, Tensor):
            tokens, text_mask = self.to_tokens_and_mask(input, prepend_bos=prepend_bos, padding_side=padding_side)
            attention_mask = text_mask if attention_mask is None else attention_mask
        else:
            tokens = input
        tokens = self._check_tokens(tokens)
        where = positions_and_masks(self, tokens.shape[0], tokens.shape[1], attention_mask, past_kv_cache)
        if self.cfg.use_hook_tokens:
            tokens = self.hook_tokens(tokens)
        residual = self.hook_embed(self.embed(tokens))
        if self.pos_embed is not None:
            positions, key_mask, _ = where
            # key_mask covers cached and new positions; padding gets a zero embedding, as in TransformerLens
            past = 0 if key_mask is None else key_mask.shape[1] - positions.shape[1]
            pos_embed = self.pos_embed(tokens, past, attention_mask=key_mask, positions=positions)
            residual = residual + self.hook_pos_embed(pos_embed)
        return residual, tokens, attention_mask, where

    @staticmethod
    def loss_from_logits(
        logits: Tensor, tokens: Tensor, attention_mask: Optional[Tensor] = None, per_token: bool = False
    ) -> Tensor:
        """Next-token cross-entropy; see `loss_fn` (the same, callable without a model)."""
        return TransformerLensAPIMixin.loss_fn(None, logits, tokens, attention_mask, per_token)

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(
                f"tokens must be integer ids, got dtype {tokens.dtype}; to feed a residual stream use start_at_layer"
            )
        if tokens.numel():
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.cfg.d_vocab:
                bad = low if low < 0 else high
                raise ValueError(
                    f"token id {bad} is outside the vocabulary [0, {self.cfg.d_vocab}); "
                    f"check the tokenizer matches the model (d_vocab={self.cfg.d_vocab})"
                )
        if tokens.shape[1] > self.cfg.n_ctx:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds n_ctx={self.cfg.n_ctx}; "
                f"truncate it (e.g. tokens[:, -{self.cfg.n_ctx}:])"
            )
        return tokens.to(self.W_E.device)

    # --- hooks and caching --------------------------------------------------------------------

    def _check_hook_name(self, name: Any) -> None:
        if isinstance(name, str) and name not in self.hook_dict:
            close = difflib.get_close_matches(name, list(self.hook_dict), n=5, cutoff=0.6)
            hint = f"; closest valid names: {close}" if close else "; see model.hook_dict for all names"
            raise ValueError(f"unknown hook name {name!r}{hint}")

    @contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True, clear_contexts: bool = False):
        """Temporary hooks, removed on exit even when the forward pass raises."""
        for name, _ in list(fwd_hooks) + list(bwd_hooks):
            self._check_hook_name(name)
        with HookedRootModule.hooks(self, list(fwd_hooks), list(bwd_hooks), reset_hooks_end, clear_contexts) as model:
            yield model

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:
        self._check_hook_name(name)
        super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def run_with_cache(
        self, *model_args: Any, return_cache_object: bool = True, remove_batch_dim: bool = False, **kwargs: Any
    ) -> tuple[Any, ActivationCache | dict]:
        """Run and cache activations: returns (output, ActivationCache).

        Takes TransformerLens's arguments: names_filter (a name, a list, or a predicate), device,
        remove_batch_dim, incl_bwd, pos_slice, plus anything `forward` takes."""
        names_filter = kwargs.get("names_filter")
        if isinstance(names_filter, (str, list)):  # a predicate cannot name a missing hook
            for name in [names_filter] if isinstance(names_filter, str) else names_filter:
                self._check_hook_name(name)
        out, cache_dict = super().run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        if not return_cache_object:
            return out, cache_dict
        return out, make_activation_cache(cache_dict, self, has_batch_dim=not remove_batch_dim)

    # --- other entry points (each lives in its own module) -------------------------------------

    def generate(self, input: TextOrTokens = "", max_new_tokens: int = 10, **kwargs: Any) -> Any:
        """Continue text or tokens with a KV cache: TransformerLens's arguments and defaults; see
        `hooked_bilinear.generate.generate`."""
        from .generate import generate

        return generate(self, input, max_new_tokens=max_new_tokens, **kwargs)

    def generate_stream(self, input: TextOrTokens = "", max_new_tokens: int = 10, **kwargs: Any) -> Any:
        """A generator yielding tokens as they are produced; see `hooked_bilinear.generate.generate_stream`."""
        from .generate import generate_stream

        return generate_stream(self, input, max_new_tokens=max_new_tokens, **kwargs)

    def fold_layer_norm(self, fold_attn_out_scale: bool = True) -> "HookedBilinearTransformer":
        """Fold norm gains (and LN biases, and the attention-output scale) into the weights that
        read them; logits are unchanged. See `hooked_bilinear.folding`."""
        from .folding import fold_layer_norm

        fold_layer_norm(self, fold_attn_out_scale=fold_attn_out_scale)
        return self

    def fold_zero_beta_gate(self) -> "HookedBilinearTransformer":
        """Turn a gate annealed to beta = 0 (x / 2) into an exactly bilinear MLP; logits unchanged."""
        from .folding import fold_zero_beta_gate

        fold_zero_beta_gate(self)
        return self

    def set_gate_beta(self, beta: Optional[float]) -> None:
        """Change the gate `x * sigmoid(beta x)` in every MLP (None: back to `cfg.act_fn`)."""
        if beta is not None and self.cfg.act_fn != "silu":
            raise ValueError(f"gate_beta needs act_fn='silu', this model has act_fn={self.cfg.act_fn!r}")
        self.cfg.gate_beta = None if beta is None else float(beta)

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str,
        device: Optional[str] = None,
        dtype: Any = None,
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        center_unembed: bool = False,
        refactor_factored_attn_matrices: bool = False,
        fold_value_biases: bool = False,
        default_prepend_bos: Optional[bool] = None,
        default_padding_side: Optional[Literal["left", "right"]] = None,
        move_to_device: bool = True,
        n_devices: int = 1,
        **kwargs: Any,
    ) -> "HookedBilinearTransformer":
        """Load this project's format, a Hugging Face Llama checkpoint, or a published bilinear
        checkpoint (tdooms/ts-*), from a local folder or a hub id; see `hooked_bilinear.loading`.

        Takes TransformerLens's processing flags, but every one defaults to False (TransformerLens
        folds and centres by default): checkpoints load exactly as saved, so training can resume
        from them. Pass fold_ln=True etc., or call `process_weights_()`, for TransformerLens's
        processed weights. Any processing also folds the attention-output scale into W_O."""
        from .loading import load_pretrained

        if n_devices != 1:
            raise ValueError(f"n_devices={n_devices}: one model on several devices is not supported; use device=")
        model = load_pretrained(name_or_dir, device=device if move_to_device else "cpu", dtype=dtype, **kwargs)
        if default_prepend_bos is not None:
            model.cfg.default_prepend_bos = default_prepend_bos
        if default_padding_side is not None and model.tokenizer is not None:
            model.tokenizer.padding_side = default_padding_side
        if fold_ln or center_writing_weights or center_unembed or refactor_factored_attn_matrices or fold_value_biases:
            model.process_weights_(
                fold_ln=fold_ln,
                center_writing_weights=center_writing_weights,
                center_unembed=center_unembed,
                refactor_factored_attn_matrices=refactor_factored_attn_matrices,
                fold_value_biases=fold_value_biases,
            )
        return model

    @classmethod
    def from_pretrained_no_processing(cls, name_or_dir: str, **kwargs: Any) -> "HookedBilinearTransformer":
        """`from_pretrained` with every processing step off (here the same as its defaults)."""
        for flag in ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
                     "refactor_factored_attn_matrices"):
            kwargs.setdefault(flag, False)
        return cls.from_pretrained(name_or_dir, **kwargs)

    def save_pretrained(self, directory: str, format: Literal["native", "hf"] = "native") -> None:
        """Write `config.json` + `model.safetensors` (+ tokenizer); format="hf" writes a Llama checkpoint."""
        from .loading import save_pretrained

        save_pretrained(self, directory, format=format)

    def to_hf(self) -> Any:
        """A `transformers.LlamaForCausalLM` with the same weights (hidden_act="linear" if bilinear)."""
        from .loading.llama import to_hf_llama

        return to_hf_llama(self)
