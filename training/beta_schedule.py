"""The gate's beta during SwiGLU -> bilinear finetuning, as a ``training.loop.Trainer`` callback.

The MLP gate is ``x * sigmoid(beta x)``: SiLU (SwiGLU) at beta = 1, ``x / 2`` (bilinear after
folding) at beta = 0. Beta is a function of the tokens trained on so far:

    linear  (default, as in the original work)  start + (end - start) * p
    cosine                                      end + (start - end) * (1 + cos(pi p)) / 2
    step                                        start + (end - start) * floor(p * n_steps) / n_steps
    fixed                                       start for the whole run (the comparison baseline;
                                                start = 1 keeps the SwiGLU model)

with ``p = min(1, tokens_seen / anneal_tokens)``; ``anneal_tokens`` defaults to 30% of the run's
token budget (120M of 400M tokens in the original TinyLlama run). Past ``anneal_tokens`` beta is
exactly ``end`` (0.0), so the final model folds into an exactly bilinear one.

The callback sets beta before every optimizer step (``on_step_start``) and keeps it, with the token
count it was computed from, in ``trainer.state.extra`` ("beta", "beta_tokens"): checkpoints save
them, and a run resumed mid-anneal restores the exact beta (``on_train_start``). Both are logged
with every metrics line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

SCHEDULES = ("linear", "cosine", "step", "fixed")


@dataclass
class BetaConfig:
    """The ``beta`` section of a finetune config."""

    schedule: str = "linear"  # linear | cosine | step | fixed
    start: float = 1.0  # beta at the first token (and the constant of schedule "fixed")
    end: float = 0.0  # beta from anneal_tokens on
    anneal_tokens: Optional[int] = None  # tokens over which beta goes start -> end; None: anneal_fraction x budget
    anneal_fraction: float = 0.3  # of the run's token budget, when anneal_tokens is None
    n_steps: int = 4  # equal drops of schedule "step"

    def validate(self, prefix: str = "beta") -> None:
        """Raises ValueError naming the key."""
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{prefix}.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{prefix}.{name} must be a finite number >= 0, got {value!r}")
        if self.anneal_tokens is not None and self.anneal_tokens <= 0:
            raise ValueError(f"{prefix}.anneal_tokens must be > 0, got {self.anneal_tokens}")
        if not 0 < self.anneal_fraction <= 1:
            raise ValueError(f"{prefix}.anneal_fraction must be in (0, 1], got {self.anneal_fraction}")
        if self.n_steps < 1:
            raise ValueError(f"{prefix}.n_steps must be >= 1, got {self.n_steps}")

    def resolve_anneal_tokens(self, budget: int) -> int:
        """``anneal_tokens``, or ``anneal_fraction`` of ``budget`` (the run's total tokens)."""
        if self.anneal_tokens is not None:
            return int(self.anneal_tokens)
        return max(1, int(round(self.anneal_fraction * budget)))


def beta_at(tokens: int, cfg: BetaConfig, anneal_tokens: int) -> float:
    """Beta after ``tokens`` training tokens (a Python float; exactly ``cfg.end`` once annealed)."""
    start, end = float(cfg.start), float(cfg.end)
    if cfg.schedule == "fixed":
        return start
    if tokens >= anneal_tokens:
        return end
    p = max(0.0, tokens / anneal_tokens)
    if cfg.schedule == "linear":
        return start + (end - start) * p
    if cfg.schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
    if cfg.schedule == "step":
        return start + (end - start) * math.floor(p * cfg.n_steps) / cfg.n_steps
    raise ValueError(f"unknown beta schedule {cfg.schedule!r}; use one of {SCHEDULES}")


class BetaSchedule:
    """Trainer callback: beta from tokens seen, set on the model before each step, kept in the state.

    ``budget``: the run's total tokens (default: the trainer's ``total_steps x tokens_per_step``).
    """

    def __init__(self, cfg: BetaConfig, budget: Optional[int] = None):
        cfg.validate()
        self.cfg = cfg
        self.budget = budget
        self.anneal_tokens: Optional[int] = None

    @staticmethod
    def _model(trainer: Any) -> Any:
        return trainer.raw_model

    def _set(self, trainer: Any, beta: float, tokens: int) -> None:
        trainer.state.extra["beta"] = beta
        trainer.state.extra["beta_tokens"] = tokens
        self._model(trainer).set_gate_beta(beta)

    def on_train_start(self, trainer: Any) -> None:
        budget = self.budget or trainer.total_steps * trainer.tokens_per_step
        self.anneal_tokens = self.cfg.resolve_anneal_tokens(budget)
        extra = trainer.state.extra
        if "beta" in extra:  # resumed: the checkpoint's exact value
            self._set(trainer, extra["beta"], extra.get("beta_tokens", trainer.state.tokens_seen))
        else:
            self._set(trainer, beta_at(trainer.state.tokens_seen, self.cfg, self.anneal_tokens), trainer.state.tokens_seen)
        if self.cfg.schedule != "fixed" and self.anneal_tokens > budget:
            trainer.log_line(f"warning: anneal_tokens ({self.anneal_tokens:,}) > the run's budget ({budget:,}): "
                             f"beta will not reach {self.cfg.end} and the model will not be folded")
        trainer.log_line(
            f"beta schedule {self.cfg.schedule}: "
            + (f"fixed at {self.cfg.start}" if self.cfg.schedule == "fixed" else
               f"{self.cfg.start} -> {self.cfg.end} over {self.anneal_tokens:,} of {budget:,} tokens")
            + f"; beta now {extra['beta']:.6g}"
        )

    def on_step_start(self, trainer: Any) -> None:
        tokens = trainer.state.tokens_seen
        self._set(trainer, beta_at(tokens, self.cfg, self.anneal_tokens), tokens)

    def on_step_end(self, trainer: Any, metrics: dict) -> None:
        if metrics:
            metrics["beta"] = trainer.state.extra["beta"]
