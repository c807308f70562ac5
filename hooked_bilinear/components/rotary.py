"""Rotary position embeddings in the half-rotation layout (Hugging Face Llama's `rotate_half`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Rotary(nn.Module):
    """Rotates the first `rotary_dim` features of each query/key head by its absolute position."""

    def __init__(self, rotary_dim: int, n_ctx: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        freqs = torch.outer(torch.arange(n_ctx, dtype=torch.float32), inv_freq)  # [n_ctx, rotary_dim/2]
        angles = torch.cat([freqs, freqs], dim=-1)  # [n_ctx, rotary_dim]
        # Not persistent: derived from the config, so never stored in checkpoints.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.rotary_dim = rotary_dim

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: [batch, pos, head, d_head], positions: [batch, pos] -> same shape as x."""
        cos = self.cos[positions].unsqueeze(-2).to(x.dtype)  # [batch, pos, 1, rotary_dim]
        sin = self.sin[positions].unsqueeze(-2).to(x.dtype)
        if self.rotary_dim == x.shape[-1]:
            return x * cos + _rotate_half(x) * sin
        x_rot, x_pass = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat([x_rot * cos + _rotate_half(x_rot) * sin, x_pass], dim=-1)


def _rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)
