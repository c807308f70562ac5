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
        x_rot, x_pass = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        rotated_half = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
        x_rot = x_rot * cos + rotated_half * sin
        return torch.cat([x_rot, x_pass], dim=-1) if x_pass.shape[-1] else x_rot
