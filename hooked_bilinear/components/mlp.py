"""The gated MLP: bilinear when the gate is linear.

    hook_pre        = x W_gate + b_gate        [batch, pos, d_mlp]   the "left" factor
    hook_pre_linear = x W_in + b_in            [batch, pos, d_mlp]   the "right" factor
    hook_post       = act(hook_pre) * hook_pre_linear
    output          = hook_post W_out + b_out  [batch, pos, d_model]

With act_fn="linear" the output is a quadratic form of x, which is what `circuits` decomposes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ..config import HookedBilinearConfig


def gate_activation(x: Tensor, act_fn: str, beta: float | None) -> Tensor:
    """The gate's nonlinearity; `beta` (with act_fn="silu") gives x * sigmoid(beta * x)."""
    if beta is not None:
        return x * torch.sigmoid(beta * x) if beta != 1.0 else F.silu(x)
    if act_fn == "linear":
        return x
    if act_fn == "silu":
        return F.silu(x)
    if act_fn == "relu":
        return F.relu(x)
    if act_fn == "gelu":
        return F.gelu(x)
    raise ValueError(f"unknown act_fn {act_fn!r}")


class GatedMLP(nn.Module):
    def __init__(self, cfg: HookedBilinearConfig):
        super().__init__()
        self.cfg = cfg
        d_model, d_mlp, dtype = cfg.d_model, cfg.d_mlp, cfg.dtype
        self.W_gate = nn.Parameter(torch.empty(d_model, d_mlp, dtype=dtype))
        self.W_in = nn.Parameter(torch.empty(d_model, d_mlp, dtype=dtype))
        self.W_out = nn.Parameter(torch.empty(d_mlp, d_model, dtype=dtype))
        self.b_gate = nn.Parameter(torch.zeros(d_mlp, dtype=dtype)) if cfg.mlp_bias else None
        self.b_in = nn.Parameter(torch.zeros(d_mlp, dtype=dtype)) if cfg.mlp_bias else None
        self.b_out = nn.Parameter(torch.zeros(d_model, dtype=dtype)) if cfg.mlp_bias else None
        self.hook_pre = HookPoint()
        self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        """x: [batch, pos, d_model] -> [batch, pos, d_model]."""
        pre = x @ self.W_gate
        pre_linear = x @ self.W_in
        if self.b_in is not None:
            pre = pre + self.b_gate
            pre_linear = pre_linear + self.b_in
        pre = self.hook_pre(pre)
        pre_linear = self.hook_pre_linear(pre_linear)
        # The config is read at call time so that annealing gate_beta during training takes effect.
        post = self.hook_post(gate_activation(pre, self.cfg.act_fn, self.cfg.gate_beta) * pre_linear)
        out = post @ self.W_out
        return out + self.b_out if self.b_out is not None else out
