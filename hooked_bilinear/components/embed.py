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

    def forward(
        self,
        tokens: Tensor | None = None,
        past_kv_pos_offset: int = 0,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """TransformerLens's signature: tokens [batch, pos] after `past_kv_pos_offset` cached ones;
        attention_mask [batch, offset + pos] (1 = real token) -> [batch, pos, d_model]. Positions
        count real tokens only, and padding gets a zero embedding, as in TransformerLens. The model
        passes the `positions` [batch, pos] it already computed."""
        if positions is None:
            n_pos = tokens.shape[-1]
            if attention_mask is None:
                positions = torch.arange(past_kv_pos_offset, past_kv_pos_offset + n_pos, device=self.W_pos.device)
                positions = positions.expand(tokens.shape[0], -1)
            else:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                positions = positions[:, past_kv_pos_offset : past_kv_pos_offset + n_pos]
        out = self.W_pos[positions]
        if attention_mask is not None:
            n_pos = positions.shape[1]
            real = attention_mask[:, past_kv_pos_offset : past_kv_pos_offset + n_pos].to(out.device)
            out = out * real[..., None].to(out.dtype)
        return out


class Unembed(nn.Module):
    """Reads logits off the final residual. With `tied_to`, reads with that embedding's `W_E^T`
    (no second matrix, nothing saved twice)."""

    def __init__(self, cfg: HookedBilinearConfig, tied_to: Embed | None = None):
        super().__init__()
        if tied_to is None:
            self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab_out, dtype=cfg.dtype))
        self._tied_to = [tied_to] if tied_to is not None else None  # a list: not registered twice
        if cfg.unembed_bias:
            self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab_out, dtype=cfg.dtype))
        else:
            # TransformerLens always has a b_U; a zero buffer keeps code that reads it working without
            # adding a tensor to checkpoints (not persistent) or a term to the forward pass.
            self.register_buffer("b_U", torch.zeros(cfg.d_vocab_out, dtype=cfg.dtype), persistent=False)
        self.hook_in = HookPoint()  # [batch, pos, d_model]
        self.hook_out = HookPoint()  # [batch, pos, d_vocab]

    def __getattr__(self, name: str):
        # Tied: `W_U` is not a parameter of its own but a view of the embedding, W_E^T [d_model, d_vocab].
        if name == "W_U" and self.__dict__.get("_tied_to"):
            return self._tied_to[0].W_E.T
        return super().__getattr__(name)

    def forward(self, x: Tensor) -> Tensor:
        """x: [batch, pos, d_model] -> logits [batch, pos, d_vocab_out]."""
        logits = self.hook_in(x) @ self.W_U
        return self.hook_out(logits + self.b_U if isinstance(self.b_U, nn.Parameter) else logits)
