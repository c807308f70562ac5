"""Autoregressive generation with a KV cache, with TransformerLens's `generate` / `generate_stream`
arguments and defaults (TransformerLens 3.9 `HookedTransformer.generate`):

    model.generate(input="", max_new_tokens=10, stop_at_eos=True, eos_token_id=None, do_sample=True,
                   top_k=None, top_p=None, temperature=1.0, freq_penalty=0.0, use_past_kv_cache=True,
                   prepend_bos=None, padding_side=None, return_type="input", verbose=True)

* input: a string, a list of strings (left-padded, so every row continues from its own last
  token, as TransformerLens forces), or token ids [batch, pos] (taken as unpadded).
* Sampling: temperature 0 or do_sample=False is greedy; otherwise logits / temperature, minus
  freq_penalty x (how often each token occurs so far, padding not counted), then top_k (which
  wins over top_p, as in TransformerLens) or top_p (smallest set whose mass reaches top_p).
* Rows that emit an end token (eos_token_id: an int or a list; default the tokenizer's) are padded
  with it from then on; generation ends when every row has. With no end token known (no tokenizer
  and no eos_token_id) generation runs for max_new_tokens (TransformerLens raises instead).
* return_type "input": strings for text input, tokens for tokens; "str" decodes (special tokens
  skipped; a batch of one gives one string, as in TransformerLens); "tokens": ids [batch, pos + new].
* Extra (not in TransformerLens): `seed` makes sampling reproducible.
"""

from __future__ import annotations

from typing import Any, Iterator, Literal, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .kv_cache import KVCache

EosIds = Optional[Union[int, Sequence[int]]]


def sample_logits(logits: Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  temperature: float = 1.0, freq_penalty: float = 0.0, counts: Optional[Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """logits [batch, d_vocab] -> sampled token ids [batch] (TransformerLens's `sample_logits`).

    counts: [batch, d_vocab] occurrences of each token so far (for freq_penalty)."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if freq_penalty > 0:
        if counts is None:
            raise ValueError("freq_penalty needs the token counts so far")
        logits = logits - freq_penalty * counts
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Keep tokens until the mass reaches top_p, including the one that crosses it.
        drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
        drop_sorted[..., 1:] = cumulative[..., :-1] > top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _prepare(model: Any, input: Any, prepend_bos: Optional[bool], padding_side: Optional[str]
             ) -> tuple[Tensor, Optional[Tensor], str]:
    """(tokens [batch, pos], attention mask [batch, pos] or None, input kind "str" | "tokens")."""
    if isinstance(input, Tensor):
        if input.is_floating_point():
            raise ValueError("generate takes text or token ids; embeddings [batch, pos, d_model] are not supported")
        tokens = input[None] if input.ndim == 1 else input
        return tokens.to(model.W_E.device), None, "tokens"
    if isinstance(input, str) or (isinstance(input, (list, tuple)) and all(isinstance(s, str) for s in input)):
        batched = not isinstance(input, str) and len(input) > 1
        side = "left" if batched else padding_side  # a batch must end flush right (TransformerLens does the same)
        tokens, mask = model.to_tokens_and_mask(input, prepend_bos=prepend_bos, padding_side=side)
        return tokens, mask, "str"
    raise TypeError(f"input must be a string, a list of strings or token ids [batch, pos]; got {type(input).__name__}")


def _stop_tokens(model: Any, stop_at_eos: bool, eos_token_id: EosIds) -> tuple[Optional[Tensor], Optional[int]]:
    """(the end tokens [n] or None, the token that pads finished rows)."""
    if not stop_at_eos:
        return None, None
    tokenizer_eos = getattr(model.tokenizer, "eos_token_id", None) if model.tokenizer is not None else None
    if eos_token_id is None:
        eos_token_id = tokenizer_eos
    if eos_token_id is None:
        return None, None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad = eos_token_id if isinstance(eos_token_id, int) else (tokenizer_eos if tokenizer_eos is not None else ids[0])
    return torch.tensor(ids, device=model.W_E.device), pad


@torch.inference_mode()
def _steps(model: Any, tokens: Tensor, mask: Optional[Tensor], max_new_tokens: int, stop_at_eos: bool,
           eos_token_id: EosIds, do_sample: bool, top_k: Optional[int], top_p: Optional[float], temperature: float,
           freq_penalty: float, use_past_kv_cache: bool, verbose: bool, seed: Optional[int]) -> Iterator[Tensor]:
    """Yield each step's new tokens [batch] until max_new_tokens or every row has ended."""
    stop_ids, pad_id = _stop_tokens(model, stop_at_eos, eos_token_id)
    batch, device = tokens.shape[0], tokens.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    counts = None
    if do_sample and freq_penalty > 0:
        counts = torch.zeros(batch, model.cfg.d_vocab, device=device)
        counts.scatter_add_(1, tokens, (mask if mask is not None else torch.ones_like(tokens)).float())
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    cache = KVCache.empty(model.cfg.n_layers) if use_past_kv_cache else None
    was_training = model.training
    model.eval()
    try:
        step_input, step_mask, seen = tokens, mask, tokens
        for _ in tqdm(range(max_new_tokens), disable=not verbose, desc="generating"):
            logits = model(step_input, attention_mask=step_mask, past_kv_cache=cache)[:, -1]
            if do_sample:
                new = sample_logits(logits, top_k, top_p, temperature, freq_penalty, counts, generator)
            else:
                new = logits.argmax(-1)
            if stop_ids is not None:
                new = torch.where(finished, torch.full_like(new, pad_id), new)
                finished |= torch.isin(new, stop_ids)
            if counts is not None:
                counts.scatter_add_(1, new[:, None], torch.ones(batch, 1, device=device))
            yield new
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if cache is not None:  # the cache holds every earlier position: feed only the new one
                step_input, step_mask = new[:, None], (None if mask is None else mask[:, -1:])
            else:
                seen = torch.cat([seen, new[:, None]], dim=1)
                step_input, step_mask = seen, mask
            if stop_ids is not None and bool(finished.all()):
                break
    finally:
        model.train(was_training)


def _decode(model: Any, tokens: Tensor) -> Union[str, list[str]]:
    texts = [model.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in tokens]
    return texts[0] if len(texts) == 1 else texts


def generate(
    model: Any,
    input: Any = "",
    max_new_tokens: int = 10,
    stop_at_eos: bool = True,
    eos_token_id: EosIds = None,
    do_sample: bool = True,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    use_past_kv_cache: bool = True,
    prepend_bos: Optional[bool] = None,
    padding_side: Optional[Literal["left", "right"]] = None,
    return_type: Optional[Literal["input", "str", "tokens"]] = "input",
    verbose: bool = True,
    seed: Optional[int] = None,
) -> Union[Tensor, str, list[str]]:
    """Continue `input` by up to `max_new_tokens` tokens; see the module docstring.

    Returns token ids [batch, pos + new] or text, per `return_type`."""
    if return_type not in ("input", "str", "tokens"):
        raise ValueError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}")
    tokens, mask, kind = _prepare(model, input, prepend_bos, padding_side)
    new = list(_steps(model, tokens, mask, max_new_tokens, stop_at_eos, eos_token_id, do_sample, top_k, top_p,
                      temperature, freq_penalty, use_past_kv_cache, verbose, seed))
    out = torch.cat([tokens, torch.stack(new, dim=1)], dim=1) if new else tokens
    if return_type == "str" or (return_type == "input" and kind == "str"):
        return _decode(model, out)
    return out


def generate_stream(
    model: Any,
    input: Any = "",
    max_new_tokens: int = 10,
    max_tokens_per_yield: int = 25,
    stop_at_eos: bool = True,
    eos_token_id: EosIds = None,
    do_sample: bool = True,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    use_past_kv_cache: bool = True,
    prepend_bos: Optional[bool] = None,
    padding_side: Optional[Literal["left", "right"]] = None,
    return_type: Optional[Literal["input", "str", "tokens"]] = "input",
    verbose: bool = True,
    seed: Optional[int] = None,
) -> Iterator[Union[Tensor, str, list[str]]]:
    """Like `generate`, but yields while generating (TransformerLens's `generate_stream`): the
    first chunk is the prompt plus the first new tokens, later chunks only new tokens
    [batch, <= max_tokens_per_yield], flushed every `max_tokens_per_yield` tokens and at the end.
    With return_type "str" (or "input" for text) each chunk is decoded text instead."""
    if max_tokens_per_yield < 1:
        raise ValueError(f"max_tokens_per_yield must be at least 1, got {max_tokens_per_yield}")
    if return_type not in ("input", "str", "tokens"):
        raise ValueError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}")
    tokens, mask, kind = _prepare(model, input, prepend_bos, padding_side)
    as_text = return_type == "str" or (return_type == "input" and kind == "str")
    pending: list[Tensor] = []
    prefix: Optional[Tensor] = tokens
    for new in _steps(model, tokens, mask, max_new_tokens, stop_at_eos, eos_token_id, do_sample, top_k, top_p,
                      temperature, freq_penalty, use_past_kv_cache, verbose, seed):
        pending.append(new[:, None])
        if len(pending) + (prefix.shape[1] if prefix is not None else 0) >= max_tokens_per_yield:
            chunk = torch.cat(([prefix] if prefix is not None else []) + pending, dim=1)
            prefix, pending = None, []
            yield _decode(model, chunk) if as_text else chunk
    if pending or prefix is not None:
        chunk = torch.cat(([prefix] if prefix is not None else []) + pending, dim=1)
        yield _decode(model, chunk) if as_text else chunk
