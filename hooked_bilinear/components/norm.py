"""RMSNorm and LayerNorm with TransformerLens's hook points.

`hook_scale` is the divisor (`sqrt(mean(x^2) + eps)` for RMS, the standard deviation for LN), so
`ActivationCache.apply_ln_to_stack` can divide any slice of the residual stream by it.
`hook_normalized` is `x / scale` (LN: centred first) BEFORE the gain and LN bias, exactly as in
TransformerLens, so an SAE or probe trained on a TransformerLens model's `ln2.hook_normalized` reads
the same thing here. The layer after the norm reads `hook_normalized * w (+ b)`; after
`fold_layer_norm()` the gains are ones and the two agree.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ..config import HookedBilinearConfig


class Norm(nn.Module):
    """RMSNorm (`kind="RMS"`) or LayerNorm (`kind="LN"`), with or without learned gain."""

    def __init__(self, cfg: HookedBilinearConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.eps = cfg.eps
        self.w = nn.Parameter(torch.ones(cfg.d_model, dtype=cfg.dtype)) if cfg.norm_weights else None
        self.b = nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype)) if cfg.norm_weights and kind == "LN" else None
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Tensor) -> Tensor:
        """x: [batch, pos, d_model] (or [batch, pos, head, d_model] for per-head inputs) -> same shape."""
        dtype = x.dtype
        x = x.float()  # statistics in float32 even under bf16, as Hugging Face Llama does
        if self.kind == "LN":
            x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        x = self.hook_normalized(x / scale).to(dtype)
        if self.w is not None:
            x = x * self.w
        if self.b is not None:
            x = x + self.b
        return x


def make_norm(cfg: HookedBilinearConfig) -> nn.Module:
    """The configured norm, or an identity with the same hook points when there is none."""
    if cfg.normalization_type is None:
        return NoNorm()
    return Norm(cfg, cfg.normalization_type)


class NoNorm(nn.Module):
    """Identity that still exposes `hook_normalized`, so hook names do not depend on the config."""

    def __init__(self):
        super().__init__()
        self.hook_normalized = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        return self.hook_normalized(x)
