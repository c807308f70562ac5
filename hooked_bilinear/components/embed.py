"""Token embedding, learned positional embedding and unembedding."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ..config import HookedBilinearConfig


class Embed(nn.Module):
    def __init__(self, cfg: HookedBilinearConfig):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model, dtype=cfg.dtype))

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: [batch, pos] -> [batch, pos, d_model]."""
        return self.W_E[tokens]


class PosEmbed(nn.Module):
    def __init__(self, cfg: HookedBilinearConfig):
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model, dtype=cfg.dtype))

    def forward(self, positions: Tensor) -> Tensor:
        """positions: [batch, pos] -> [batch, pos, d_model]."""
        return self.W_pos[positions]


class Unembed(nn.Module):
    """Reads logits off the final residual. With `tied_to`, reads with that embedding's `W_E^T`
    (no second matrix, nothing saved twice)."""

    def __init__(self, cfg: HookedBilinearConfig, tied_to: Embed | None = None):
        super().__init__()
        if tied_to is None:
            self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab, dtype=cfg.dtype))
        self._tied_to = [tied_to] if tied_to is not None else None  # a list: not registered twice
        if cfg.unembed_bias:
            self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab, dtype=cfg.dtype))
        else:
            # TransformerLens always has a b_U; a zero buffer keeps code that reads it working without
            # adding a tensor to checkpoints (not persistent) or a term to the forward pass.
            self.register_buffer("b_U", torch.zeros(cfg.d_vocab, dtype=cfg.dtype), persistent=False)
        self.hook_in = HookPoint()  # [batch, pos, d_model]
        self.hook_out = HookPoint()  # [batch, pos, d_vocab]

    def __getattr__(self, name: str):
        # Tied: `W_U` is not a parameter of its own but a view of the embedding, W_E^T [d_model, d_vocab].
        if name == "W_U" and self.__dict__.get("_tied_to"):
            return self._tied_to[0].W_E.T
        return super().__getattr__(name)

    def forward(self, x: Tensor) -> Tensor:
        """x: [batch, pos, d_model] -> logits [batch, pos, d_vocab]."""
        logits = self.hook_in(x) @ self.W_U
        return self.hook_out(logits + self.b_U if isinstance(self.b_U, nn.Parameter) else logits)
