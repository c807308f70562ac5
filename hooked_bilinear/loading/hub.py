"""Resolve a name to a local checkpoint folder: the folder itself, or a Hugging Face hub download."""

from __future__ import annotations

from pathlib import Path

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


def resolve_checkpoint(name_or_dir: str | Path) -> Path:
    """A local folder as is; otherwise `snapshot_download(name)` into the hub cache.

    Raises FileNotFoundError when the name is neither a local folder nor reachable on the hub
    (offline, no such repository, not a valid repository id, no access)."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{str(name_or_dir)!r} is a file; pass the checkpoint's folder (holding config.json)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_dir), allow_patterns=ALLOW_PATTERNS))
    except Exception as error:  # offline, RepositoryNotFound, HFValidationError, HTTP errors, ...
        raise FileNotFoundError(
            f"{str(name_or_dir)!r} is neither a local folder nor reachable on the Hugging Face hub "
            f"({type(error).__name__}: {error}). Check the path, or the repository id and your network; "
            "with HF_HUB_OFFLINE=1 only repositories already in the local cache can be loaded."
        ) from error
