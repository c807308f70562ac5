"""The key/value cache that makes generation cost one position per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .components.attention import LayerKVCache


@dataclass
class KVCache:
    """Per-layer keys/values plus the padding mask of every position seen so far."""

    layers: list[LayerKVCache]
    length: int = 0
    key_mask: Optional[Tensor] = None  # [batch, length] bool; None while nothing was padding

    @classmethod
    def empty(cls, n_layers: int) -> "KVCache":
        return cls(layers=[LayerKVCache() for _ in range(n_layers)])

    def extend_mask(self, attention_mask: Optional[Tensor], batch: int, n_new: int, device) -> Optional[Tensor]:
        """Append the new positions' mask ([batch, n_new] or the full [batch, length + n_new]) and
        return the mask over all keys, or None when no position is padding."""
        if attention_mask is not None and attention_mask.shape[1] == self.length + n_new:
            attention_mask = attention_mask[:, self.length :]
        if attention_mask is None and self.key_mask is None:
            return None
        new = torch.ones(batch, n_new, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        old = self.key_mask
        if old is None:
            old = torch.ones(batch, self.length, dtype=torch.bool, device=device)
        self.key_mask = torch.cat([old, new], dim=1)
        return self.key_mask
