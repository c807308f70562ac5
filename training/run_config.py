"""The run configuration: YAML file + ``section.key=value`` overrides -> a validated ``RunConfig``.

    run = load_run_config("configs/tinystories-tiny.yaml", ["model.n_layers=4", "train.lr=3e-4"])

A run has four sections, each a dataclass: ``model`` (fields of ``HookedBilinearConfig``; ``d_vocab``
comes from the tokenizer), ``data`` (where text and tokenizer come from), ``train`` (``TrainConfig``:
everything the loop in ``training.loop`` reads, reused by finetuning) and ``run`` (output dir,
samples). Every problem a run could only discover later - an unknown key, a value of the wrong type
or range, a missing data file or tokenizer folder, a batch that does not split into micro-batches -
raises ``RunConfigError`` naming the key, before any corpus, tokenizer or model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class RunConfigError(ValueError):
    """A bad run configuration; the message names the offending key."""


@dataclass
class DataConfig:
    """Where the text and the tokenizer come from."""

    dataset: Optional[Any] = None  # None: built-in story corpus; path, glob, {split: path} or hub name
    dataset_config: Optional[str] = None  # hub config name (load_dataset's `name=`)
    train_split: str = "train"
    eval_split: str = "validation"
    text_column: str = "text"
    streaming: bool = False  # stream the training split (hub-scale corpora)
    tokenizer: Optional[str] = None  # None: train a BPE tokenizer on the training text
    vocab_size: int = 4096  # for a trained tokenizer
    lowercase: bool = True
    tokenizer_train_docs: int = 100_000  # documents used to train the tokenizer
    n_train_stories: int = 20_000  # built-in corpus size
    n_valid_stories: int = 1_000
    corpus_seed: int = 0
    num_proc: Optional[int] = None  # processes for tokenizing / packing
    eval_sequences: int = 256  # cap on validation rows evaluated each time


@dataclass
class TrainConfig:
    """Everything the training loop reads (``training.loop.Trainer``); finetuning reuses it.

    Batch sizes count sequences: ``batch_size`` per optimizer step over all processes,
    ``micro_batch_size`` per forward pass per process; gradient accumulation makes up the rest.
    Length is ``max_steps`` or, when set, ``max_tokens`` (converted to steps).
    """

    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine" | "linear" | "constant" (after warmup)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    batch_size: int = 32
    micro_batch_size: int = 32
    max_steps: int = 1000
    max_tokens: Optional[int] = None
    mixed_precision: str = "auto"  # "auto" (bf16 on a bf16 GPU, else no) | "no" | "bf16" | "fp16"
    input_noise: float = 0.0  # std of noise on hook_embed, relative to its RMS
    latent_noise: float = 0.0  # std of noise on each block's residual input, relative to its RMS
    gradient_checkpointing: bool = False  # recompute each block in backward (saves memory)
    eval_every: int = 100  # steps; 0: only at the end
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0: no intermediate checkpoints
    keep_last: int = 2
    seed: int = 0
    progress_bar: bool = True

    def total_steps(self, tokens_per_step: int) -> int:
        """Optimizer steps in the run: ``max_steps`` or ``ceil(max_tokens / tokens_per_step)``."""
        if self.max_tokens is None:
            return self.max_steps
        return -(-self.max_tokens // tokens_per_step)


@dataclass
class OutputConfig:
    """Where results go and what is produced at the end."""

    out_dir: str = "runs/tinystories-tiny"
    n_samples: int = 4
    sample_tokens: int = 48
    sample_prompts: list = field(default_factory=lambda: ["Once upon a time", "One day,", "Lily was", "Tom found a"])


@dataclass
class RunConfig:
    model: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return {"model": dict(self.model), **{s: dataclasses.asdict(getattr(self, s)) for s in ("data", "train", "run")}}


SECTIONS = {"data": DataConfig, "train": TrainConfig, "run": OutputConfig}


# --- parsing ------------------------------------------------------------------------------------


def _unknown(key: str, known: list[str]) -> RunConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return RunConfigError(f"unknown config key {key!r}{hint}")


def _model_fields() -> dict[str, Any]:
    from hooked_bilinear import HookedBilinearConfig

    return {f.name: f.type for f in dataclasses.fields(HookedBilinearConfig) if f.init}


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Coerce ``value`` to the field's annotated type where lossless (int -> float), else raise."""
    # Annotations are strings under `from __future__ import annotations`: evaluate them.
    ann = annotation if not isinstance(annotation, str) else eval(annotation, {**typing.__dict__, **vars(types)})  # noqa: S307
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        ann = inner[0] if len(inner) == 1 else Any
        origin = typing.get_origin(ann)
    if ann is Any:
        return value
    if ann is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if ann is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise RunConfigError(f"{key} must be a number, got {value!r}") from None
    expected = origin or ann
    if expected is bool and not isinstance(value, bool):
        raise RunConfigError(f"{key} must be true or false, got {value!r}")
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise RunConfigError(f"{key} must be an integer, got {value!r}")
    if isinstance(expected, type) and not isinstance(value, expected):
        raise RunConfigError(f"{key} must be of type {expected.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _apply(raw: dict, overrides: list[str]) -> dict:
    """Merge ``section.key=value`` overrides (values parsed as YAML) into the nested dict ``raw``."""
    for item in overrides:
        if "=" not in item:
            raise RunConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.lr=3e-4)")
        key, text = item.split("=", 1)
        if "." not in key:
            raise RunConfigError(f"override key {key!r} needs a section: one of model, {', '.join(SECTIONS)}")
        section, name = key.split(".", 1)
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError as err:
            raise RunConfigError(f"cannot parse the value of {key}: {text!r} ({err})") from None
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise RunConfigError(f"config section {section!r} must be a mapping")
        raw[section][name] = value
    return raw


def build_run_config(raw: dict) -> RunConfig:
    """Nested dict -> ``RunConfig``; raises ``RunConfigError`` on unknown keys or wrong types."""
    unknown_sections = sorted(set(raw) - {"model", *SECTIONS})
    if unknown_sections:
        raise _unknown(unknown_sections[0], ["model", *SECTIONS])
    model_fields = _model_fields()
    model = {}
    for name, value in (raw.get("model") or {}).items():
        if name not in model_fields:
            raise _unknown(f"model.{name}", list(model_fields))
        if name == "d_vocab":
            raise RunConfigError("model.d_vocab is set from the tokenizer; set data.vocab_size instead")
        model[name] = value
    sections = {section: cls(**section_values(section, cls, raw.get(section))) for section, cls in SECTIONS.items()}
    return RunConfig(model=model, **sections)


def section_values(section: str, cls: type, raw_section: Optional[dict]) -> dict:
    """The keys of one config section, each checked against the dataclass field of that name."""
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    values = {}
    for name, value in (raw_section or {}).items():
        if name not in fields:
            raise _unknown(f"{section}.{name}", list(fields))
        values[name] = _check_type(f"{section}.{name}", value, fields[name])
    return values


def read_config(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """The YAML mapping at ``path`` (None: empty) with ``section.key=value`` overrides applied."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RunConfigError(f"config file {str(path)!r} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise RunConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return _apply(raw, list(overrides))


def load_run_config(path: str | Path | None, overrides: list[str] = (), num_processes: int = 1) -> RunConfig:
    """Read the YAML at ``path`` (None: defaults), apply overrides, validate everything."""
    run = build_run_config(read_config(path, overrides))
    validate(run, num_processes)
    return run


# --- validation ---------------------------------------------------------------------------------


def _positive(key: str, value: Any, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise RunConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate_train(t: TrainConfig, num_processes: int = 1, prefix: str = "train") -> None:
    """Range checks of a ``TrainConfig`` (shared with finetuning)."""
    for name in ("lr", "batch_size", "micro_batch_size", "max_steps", "max_tokens", "log_every", "keep_last"):
        _positive(f"{prefix}.{name}", getattr(t, name))
    for name in ("warmup_steps", "weight_decay", "grad_clip", "input_noise", "latent_noise", "eval_every",
                 "checkpoint_every", "adam_eps"):
        _positive(f"{prefix}.{name}", getattr(t, name), allow_zero=True)
    if not 0 <= t.min_lr_ratio <= 1:
        raise RunConfigError(f"{prefix}.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(t, name) < 1:
            raise RunConfigError(f"{prefix}.{name} must be in [0, 1), got {getattr(t, name)}")
    if t.schedule not in ("cosine", "linear", "constant"):
        raise RunConfigError(f"{prefix}.schedule must be cosine, linear or constant, got {t.schedule!r}")
    if t.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise RunConfigError(f"{prefix}.mixed_precision must be auto, no, bf16 or fp16, got {t.mixed_precision!r}")
    per_step = t.micro_batch_size * num_processes
    if t.batch_size % per_step:
        raise RunConfigError(
            f"{prefix}.batch_size ({t.batch_size}) must be a multiple of {prefix}.micro_batch_size "
            f"({t.micro_batch_size}) x processes ({num_processes}) = {per_step}"
        )


def _looks_local(source: str) -> bool:
    # Same rule as training.data: explicit paths, globs and data-file extensions are local.
    if source.startswith((".", "/", "~")) or any(c in source for c in "*?[") or os.sep in source and Path(source.split(os.sep)[0]).is_dir():
        return True
    return Path(source).suffix.lower() in (".txt", ".json", ".jsonl", ".parquet", ".csv")


# Hub dataset ids are "owner/name"; anything else that is not an existing path cannot be loaded.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def unknown_source_message(key: str, source: str) -> Optional[str]:
    """Why ``source`` is neither an existing path nor a plausible hub dataset id, or None if it may be one."""
    if os.path.exists(os.path.expanduser(source)) or HUB_ID.match(source):
        return None
    return (f"{key}: {source!r} is not an existing file or folder, nor a hub dataset id of the form owner/name "
            "(e.g. roneneldan/TinyStories); give the path of your data (.txt, .json, .jsonl, .parquet, .csv "
            "files, a glob of them, or a folder)")


def _check_exists(key: str, source: str) -> None:
    path = os.path.expanduser(source)
    found = glob.glob(path) if any(c in path for c in "*?[") else ([path] if os.path.exists(path) else [])
    if not found:
        raise RunConfigError(f"{key}: no such file or directory {source!r}")


def validate_data(d: DataConfig) -> None:
    """Local data files and tokenizer folders must exist; sizes must be positive."""
    for name in ("vocab_size", "tokenizer_train_docs", "n_train_stories", "n_valid_stories", "eval_sequences", "num_proc"):
        _positive(f"data.{name}", getattr(d, name))
    if d.vocab_size < 260:
        raise RunConfigError(f"data.vocab_size must be >= 260 (256 bytes + specials), got {d.vocab_size}")
    if isinstance(d.dataset, dict):
        for split, path in d.dataset.items():
            _check_exists(f"data.dataset.{split}", str(path))
    elif isinstance(d.dataset, str):
        if _looks_local(d.dataset):
            _check_exists("data.dataset", d.dataset)
        elif (problem := unknown_source_message("data.dataset", d.dataset)) is not None:
            raise RunConfigError(problem)
    elif d.dataset is not None:
        raise RunConfigError(f"data.dataset must be a path, a hub name or a {{split: path}} mapping, got {d.dataset!r}")
    if d.tokenizer is not None and str(d.tokenizer).startswith((".", "/", "~")):
        _check_exists("data.tokenizer", str(d.tokenizer))


def validate(run: RunConfig, num_processes: int = 1) -> None:
    """All checks that can run before any work: train ranges, data paths, the model config itself."""
    validate_train(run.train, num_processes)
    validate_data(run.data)
    from hooked_bilinear import HookedBilinearConfig

    try:  # d_vocab is only known once the tokenizer exists; any positive value checks the rest
        HookedBilinearConfig(**{**run.model, "d_vocab": run.data.vocab_size})
    except (TypeError, ValueError) as err:
        raise RunConfigError(f"invalid model config: {err}") from None
    for name in ("n_samples", "sample_tokens"):
        _positive(f"run.{name}", getattr(run.run, name), allow_zero=True)
