"""Resolve a name to a local checkpoint folder: the folder itself, or a Hugging Face hub download.

Names that can only be local paths (absolute, starting with "." or "~", more than one "/", or
under a folder that exists here) never go to the hub, so a typo gives "no such folder" instead of
the hub's validation error; a training run's folder is recognised and its model folder named.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

# Only what a checkpoint needs: config, weights (single or sharded), tokenizer. Skips optimizer
# states, training logs and other formats' weights that some repositories also hold.
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "chat_template.*",
]


RUN_MARKERS = ("run_config.yaml", "final", "checkpoints")
_STEP = re.compile(r"^step-(\d+)$")


def _newest_checkpoint(run: Path) -> Optional[Path]:
    steps = [p for p in (run / "checkpoints").glob("step-*") if p.is_dir() and _STEP.match(p.name)]
    return max(steps, key=lambda p: int(_STEP.match(p.name).group(1))) if steps else None


def check_not_a_run_folder(path: Path) -> None:
    """Raise IsADirectoryError naming what to load when `path` is a training run's folder
    (run_config.yaml, final/, checkpoints/step-*) rather than a checkpoint (config.json)."""
    if (path / "config.json").is_file() or not any((path / m).exists() for m in RUN_MARKERS):
        return
    final = path / "final"
    if (final / "config.json").is_file():
        raise IsADirectoryError(f"{path} is a training run folder, not a checkpoint: load its final model "
                                f"with from_pretrained({str(final)!r})")
    newest = _newest_checkpoint(path)
    if newest is not None and (newest / "config.json").is_file():
        raise IsADirectoryError(f"{path} is a training run folder with no final/ model yet: load its newest "
                                f"checkpoint with from_pretrained({str(newest)!r})")
    hint = (f"its newest checkpoint, {newest}, is a training state (optimizer and all), not a model: resume "
            "the run to finish it" if newest is not None else "it holds no checkpoint either")
    raise IsADirectoryError(f"{path} is a training run folder with no final/ model yet (the run has not "
                            f"finished); {hint}; the finished model will be in {final}")


def _can_only_be_local(name: str) -> bool:
    """True when `name` cannot be a hub repository id ("name" or "owner/name")."""
    if os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1:
        return True
    first = name.split("/", 1)[0]
    if "/" in name and Path(first).is_dir():  # e.g. "runs/demo" with a local runs/ folder
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def resolve_checkpoint(name_or_dir: str | Path) -> Path:
    """A local folder as is; otherwise `snapshot_download(name)` into the hub cache.

    Raises FileNotFoundError when the name is neither a local folder nor reachable on the hub
    (offline, no such repository, no access), or is a path that does not exist; IsADirectoryError
    for a training run's folder (naming the folder to load instead)."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        check_not_a_run_folder(path)
        return path
    if path.exists():
        raise NotADirectoryError(f"{str(name_or_dir)!r} is a file; pass the checkpoint's folder (holding config.json)")
    if isinstance(name_or_dir, Path) or _can_only_be_local(str(name_or_dir)):
        absolute = path.absolute()
        existing = next(p for p in absolute.parents if p.is_dir())
        first_missing = absolute.relative_to(existing).parts[0]
        present = sorted(p.name for p in existing.iterdir() if not p.name.startswith("."))
        raise FileNotFoundError(
            f"no such folder: {absolute} ({existing} has no {first_missing!r}; it holds {present[:8]}"
            f"{' ...' if len(present) > 8 else ''}); check the path (a local path is never looked up on the hub)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_dir), allow_patterns=ALLOW_PATTERNS))
    except Exception as error:  # offline, RepositoryNotFound, HFValidationError, HTTP errors, ...
        raise FileNotFoundError(
            f"{str(name_or_dir)!r} is neither a local folder nor reachable on the Hugging Face hub "
            f"({type(error).__name__}: {error}). Check the path, or the repository id and your network; "
            "with HF_HUB_OFFLINE=1 only repositories already in the local cache can be loaded."
        ) from error
