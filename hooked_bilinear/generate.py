"""Autoregressive generation with a KV cache: greedy or sampled (temperature, top-k, top-p)."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .kv_cache import KVCache


def sample_next(logits: Tensor, do_sample: bool, temperature: float, top_k: Optional[int], top_p: Optional[float],
                generator: Optional[torch.Generator] = None) -> Tensor:
    """logits [batch, d_vocab] -> next token ids [batch]."""
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens above it already hold top_p of the mass (the first always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Any,
    input: Any,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Optional[int] = None,
    stop_at_eos: bool = True,
    use_past_kv_cache: bool = True,
    seed: Optional[int] = None,
    return_type: Literal["input", "tokens", "str"] = "input",
    verbose: bool = False,
    prepend_bos: Optional[bool] = None,
) -> Any:
    """Continue `input` (text, list of texts, or token ids [batch, pos]) by `max_new_tokens`.

    Batches of text are left-padded so every row continues from its own last token. Rows that emit
    the end-of-sequence token stop (later positions are filled with it); generation ends early when
    all rows have. Returns token ids [batch, pos + new] or, for text input (return_type="input") or
    return_type="str", strings.
    """
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    text_input = not isinstance(input, Tensor)
    if text_input:
        tokens, mask = model.to_tokens_and_mask(input, prepend_bos=prepend_bos, padding_side="left")
    else:
        tokens, mask = (input[None] if input.ndim == 1 else input), None
    tokens = tokens.to(model.W_E.device)
    if eos_token_id is None and model.tokenizer is not None:
        eos_token_id = model.tokenizer.eos_token_id
    generator = torch.Generator(device=tokens.device).manual_seed(seed) if seed is not None else None

    batch = tokens.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    cache = KVCache.empty(model.cfg.n_layers) if use_past_kv_cache else None
    step_input, step_mask = tokens, mask
    for _ in tqdm(range(max_new_tokens), disable=not verbose, desc="generating"):
        logits = model(step_input, attention_mask=step_mask, past_kv_cache=cache)
        next_tokens = sample_next(logits[:, -1], do_sample, temperature, top_k, top_p, generator)
        if eos_token_id is not None and stop_at_eos:
            next_tokens = torch.where(finished, torch.full_like(next_tokens, eos_token_id), next_tokens)
            finished |= next_tokens == eos_token_id
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if cache is not None:
            step_input, step_mask = next_tokens[:, None], (None if mask is None else mask[:, -1:])
        else:
            step_input, step_mask = tokens, mask
        if bool(finished.all()):
            break
    if return_type == "str" or (return_type == "input" and text_input):
        strings = model.to_string(tokens)
        return strings[0] if isinstance(input, str) else strings
    return tokens
