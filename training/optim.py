"""The optimizer and learning-rate schedule of a run (what ``training.loop.Trainer`` builds).

AdamW with weight decay on weight matrices only: norm gains, biases and the token/position embedding
tables are not decayed (decaying an embedding pulls rare tokens' rows to zero; decaying gains fights
the norm) - the GPT-2/nanoGPT/Llama custom. Schedule: linear warmup, then cosine or linear decay to
``lr x min_lr_ratio`` (or constant).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from training.run_config import TrainConfig

NO_DECAY_PARAMS = ("embed.W_E", "pos_embed.W_pos")  # embedding tables: never decayed


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decayed; 1-D params (gains, biases) and embedding tables not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or any(name.endswith(n) for n in NO_DECAY_PARAMS)
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_multiplier(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """step (0-based update index) -> lr / cfg.lr: linear warmup, then cosine/linear/constant."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        floor = cfg.min_lr_ratio
        if cfg.schedule == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: Any) -> torch.optim.Optimizer:
    """AdamW over ``param_groups`` with the config's betas, eps and decay."""
    # The fused CUDA kernel avoids the foreach path's temporary copy of the optimizer state
    # (4 GiB at 1.1B parameters), which is what makes 1 x 24 GB finetuning fit.
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
        fused=torch.device(device).type == "cuda",
    )
