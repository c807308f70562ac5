"""The ``hooked-bilinear finetune`` configuration: sections, defaults and every check made before any work.

    ft = load_finetune_config("configs/tinyllama-bilinear.yaml", ["beta.schedule=cosine", "train.lr=2e-4"])

Sections: ``model`` (``SourceConfig``: which checkpoint, dtype, sequence length, logit checks), ``beta``
(``training.beta_schedule.BetaConfig``), and ``data``, ``train``, ``run`` as for pretraining
(``training.run_config``). Unknown keys, wrong types and out-of-range values raise ``RunConfigError``
naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from training.beta_schedule import BetaConfig
from training.run_config import (
    DataConfig,
    OutputConfig,
    RunConfigError,
    TrainConfig,
    read_config,
    section_values,
    _unknown,
    validate_data,
    validate_train,
)

CONFIG_NAME = "finetune_config.yaml"
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class SourceConfig:
    """The ``model`` section: which checkpoint to convert and how."""

    checkpoint: str = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"  # local folder or hub id
    dtype: str = "float32"  # parameter dtype; float32 master weights + train.mixed_precision bf16 is the default
    seq_len: Optional[int] = None  # tokens per training row; None: the model's n_ctx (2048 for TinyLlama)
    verify: bool = True  # compare the converted model (beta 1) and the HF export with transformers
    verify_tokens: int = 64  # positions compared (a short prefix keeps the CPU check cheap at 1.1B)
    verify_atol: float = 1e-3  # max |logit difference| tolerated in float32


@dataclass
class FinetuneConfig:
    model: SourceConfig = field(default_factory=SourceConfig)
    beta: BetaConfig = field(default_factory=BetaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: OutputConfig = field(default_factory=lambda: OutputConfig(out_dir="runs/finetune", n_samples=2,
                                                                    sample_prompts=["Once upon a time", "The capital of France is"]))

    def to_dict(self) -> dict:
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}


SECTIONS = {"model": SourceConfig, "beta": BetaConfig, "data": DataConfig, "train": TrainConfig, "run": OutputConfig}


# --- configuration ------------------------------------------------------------------------------


def build_finetune_config(raw: dict) -> FinetuneConfig:
    """Nested dict -> ``FinetuneConfig``; unknown keys and wrong types raise ``RunConfigError``."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise _unknown(unknown[0], list(SECTIONS))
    default = FinetuneConfig()
    sections = {
        section: dataclasses.replace(getattr(default, section), **section_values(section, cls, raw.get(section)))
        for section, cls in SECTIONS.items()
    }
    return FinetuneConfig(**sections)


def validate_finetune(ft: FinetuneConfig, num_processes: int = 1) -> None:
    validate_train(ft.train, num_processes)
    validate_data(ft.data)
    m = ft.model
    if not m.checkpoint:
        raise RunConfigError("model.checkpoint must name a Llama checkpoint folder or hub id")
    if m.dtype not in DTYPES:
        raise RunConfigError(f"model.dtype must be one of {', '.join(DTYPES)}, got {m.dtype!r}")
    for name in ("seq_len", "verify_tokens"):
        value = getattr(m, name)
        if value is not None and value <= 0:
            raise RunConfigError(f"model.{name} must be > 0, got {value}")
    if m.verify_atol <= 0:
        raise RunConfigError(f"model.verify_atol must be > 0, got {m.verify_atol}")
    try:
        ft.beta.validate()
    except ValueError as err:
        raise RunConfigError(str(err)) from None
    b, t = ft.beta, ft.train
    if b.schedule != "fixed" and b.anneal_tokens is not None and t.max_tokens is not None and b.anneal_tokens > t.max_tokens:
        raise RunConfigError(f"beta.anneal_tokens ({b.anneal_tokens}) exceeds train.max_tokens ({t.max_tokens}): "
                             "beta would never reach beta.end")
    for name in ("n_samples", "sample_tokens"):
        if getattr(ft.run, name) < 0:
            raise RunConfigError(f"run.{name} must be >= 0")


def load_finetune_config(path: str | Path | None, overrides: list[str] = (), num_processes: int = 1) -> FinetuneConfig:
    """Read the YAML at ``path`` (None: defaults), apply ``section.key=value`` overrides, validate."""
    ft = build_finetune_config(read_config(path, overrides))
    validate_finetune(ft, num_processes)
    return ft
