"""Where each position is: absolute positions, the key padding mask and, for TransformerLens's
KV cache (which keeps keys unrotated), every key's position. Shared by the embedding (learned
positions) and attention (rotary positions, masking).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor


def is_transformer_lens_cache(cache: Any) -> bool:
    """TransformerLens's `TransformerLensKeyValueCache` (duck-typed: the class moved between versions)."""
    return cache is not None and hasattr(cache, "entries") and hasattr(cache, "append_attention_mask")


def layer_cache(cache: Any, layer: int) -> Any:
    if cache is None:
        return None
    return cache.entries[layer] if is_transformer_lens_cache(cache) else cache.layers[layer]


def positions_and_masks(
    model: Any, batch: int, n_pos: int, attention_mask: Optional[Tensor], cache: Any
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Absolute positions [batch, pos], the key mask [batch, key_pos] (None: no padding) and,
    for TransformerLens's cache (which keeps keys unrotated), every key's position."""
    device = model.W_E.device
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        if attention_mask.shape != (batch, n_pos) and cache is None:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, n_pos)}")
    key_positions = None
    if is_transformer_lens_cache(cache):
        past = cache.entries[0].past_keys.shape[1] if cache.entries else 0
        new = torch.ones(batch, n_pos, dtype=torch.long, device=device) if attention_mask is None else attention_mask
        full = cache.append_attention_mask(new.long()).to(device)
        key_mask = None if bool(full.all()) else full.bool()
        key_positions = (full.long().cumsum(-1) - 1).clamp(min=0)
        positions = key_positions[:, -n_pos:]
    elif cache is not None:
        past = cache.length
        key_mask = cache.extend_mask(attention_mask, batch, n_pos, device)
        if key_mask is None:
            positions = torch.arange(cache.length, cache.length + n_pos, device=device).expand(batch, -1)
        else:
            positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n_pos:]
        cache.length += n_pos
    elif attention_mask is not None:
        past = 0
        key_mask = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        past = 0
        key_mask = None
        positions = torch.arange(n_pos, device=device).expand(batch, -1)
    # The bound needs no device sync; only a sequence that might be too long pays for the exact max.
    bound = past + n_pos - 1
    if bound >= model.cfg.n_ctx and positions.numel() and int(positions.max()) >= model.cfg.n_ctx:
        raise ValueError(
            f"sequence reaches position {int(positions.max())} but the model's context is n_ctx={model.cfg.n_ctx}; "
            f"truncate the input (e.g. tokens[:, -{model.cfg.n_ctx}:]) or generate fewer tokens"
        )
    return positions, key_mask, key_positions

