"""The key/value cache that makes generation cost one position per step.

Each layer's keys and values live in a buffer with spare room (capacity doubles when full), and a
step writes its new position into place: appending by concatenation would copy the whole cache at
every step, which at long contexts costs more than the step's own arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .components.attention import LayerKVCache


@dataclass
class GrowingLayerKVCache(LayerKVCache):
    """`LayerKVCache` whose `k`, `v` ([batch, seen, n_key_value_heads, d_head]) are views of
    buffers with room to grow; `extend` writes new positions in place (amortised O(new))."""

    k_buffer: Optional[Tensor] = None
    v_buffer: Optional[Tensor] = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Writing in place would invalidate earlier steps' graphs: concatenate instead.
            self.k_buffer = self.v_buffer = None
            return super().extend(k, v)
        seen = 0 if self.k is None else self.k.shape[1]
        needed = seen + k.shape[1]
        if self.k_buffer is None or needed > self.k_buffer.shape[1] or self.k_buffer.dtype != k.dtype:
            capacity = max(needed, 2 * (self.k_buffer.shape[1] if self.k_buffer is not None else 0), 16)
            new_k = k.new_empty(k.shape[0], capacity, *k.shape[2:])
            new_v = v.new_empty(v.shape[0], capacity, *v.shape[2:])
            if seen:
                new_k[:, :seen], new_v[:, :seen] = self.k, self.v
            self.k_buffer, self.v_buffer = new_k, new_v
        self.k_buffer[:, seen:needed] = k
        self.v_buffer[:, seen:needed] = v
        self.k, self.v = self.k_buffer[:, :needed], self.v_buffer[:, :needed]
        return self.k, self.v


@dataclass
class KVCache:
    """Per-layer keys/values plus the padding mask of every position seen so far."""

    layers: list[LayerKVCache]
    length: int = 0
    key_mask: Optional[Tensor] = None  # [batch, length] bool; None while nothing was padding

    @classmethod
    def empty(cls, n_layers: int) -> "KVCache":
        return cls(layers=[GrowingLayerKVCache() for _ in range(n_layers)])

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
