"""Loading and saving: this project's format, Hugging Face Llama checkpoints and the published
bilinear checkpoints of the original papers. One module per format; this one picks the format.

    load_pretrained("path/or/hub-id")           -> HookedBilinearTransformer (format from config.json)
    save_pretrained(model, dir)                  -> config.json + model.safetensors (+ tokenizer)
    save_pretrained(model, dir, format="hf")     -> a LlamaForCausalLM checkpoint
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

from .bilinear_papers import PAPERS_KEYS, is_papers_config, load_papers
from .checks import CheckpointError, check_state_dict, read_weights
from .hub import resolve_checkpoint
from .llama import from_hf_llama, is_llama_config, load_hf_llama, save_hf_llama, to_hf_llama
from .native import FORMAT_MARKER, is_native_config, load_native, save_native
from .token_counts import read_token_counts

__all__ = [
    "load_pretrained", "save_pretrained", "detect_format", "CheckpointError", "check_state_dict", "read_weights",
    "resolve_checkpoint", "load_native", "save_native", "from_hf_llama", "load_hf_llama", "to_hf_llama",
    "save_hf_llama", "load_papers",
]

FORMATS = ("native", "llama", "papers")


def detect_format(directory: str | Path) -> str:
    """"native", "llama" or "papers", read from `directory/config.json`."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}: not a checkpoint folder (or an incomplete download)")
    try:
        raw = json.loads(path.read_text())
    except ValueError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); re-download or re-save the checkpoint") from error
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    if is_native_config(raw):
        return "native"
    if is_llama_config(raw):
        return "llama"
    if is_papers_config(raw):
        return "papers"
    raise CheckpointError(
        f"unknown checkpoint format in {path}: expected one of: this library's format (\"format\": "
        f"\"{FORMAT_MARKER}\"), a Hugging Face Llama checkpoint (model_type \"llama\" / LlamaForCausalLM), "
        f"or a published bilinear checkpoint (keys {list(PAPERS_KEYS)}); found keys {sorted(raw)}"
    )


def load_pretrained(name_or_dir: str | Path, device: Optional[str] = None, dtype: Any = None,
                    tokenizer: Any = True) -> Any:
    """A `HookedBilinearTransformer` (eval mode) from a local folder or a Hugging Face hub id.

    device: where to put it (None: CPU). dtype: None keeps the checkpoint's (float32 for the papers'
    format). tokenizer: True loads the checkpoint's own if it has one; False: none; a string: that
    tokenizer folder or hub id; any other object is attached as is. `model.token_counts` is read
    from the folder's token_counts.json (None when absent)."""
    directory = resolve_checkpoint(name_or_dir)
    fmt = detect_format(directory)
    kwargs = dict(device=device, dtype=dtype, tokenizer=tokenizer)
    if fmt == "native":
        model = load_native(directory, **kwargs)
    elif fmt == "llama":
        model = load_hf_llama(directory, model_name=str(name_or_dir), **kwargs)
    else:
        model = load_papers(directory, model_name=str(name_or_dir), **kwargs)
    # A plain attribute (see token_counts.py): None when the checkpoint has no token_counts.json.
    model.token_counts = read_token_counts(directory, model.cfg.d_vocab)
    return model


def save_pretrained(model: Any, directory: str | Path, format: Literal["native", "hf"] = "native",
                    **kwargs: Any) -> None:
    """Write `model` to `directory` atomically: format="native" (config.json + model.safetensors +
    tokenizer) or "hf" (a LlamaForCausalLM checkpoint any Hugging Face tool can load); both add
    token_counts.json when `model.token_counts` is set. kwargs: `max_shard_bytes` (native) or
    `max_shard_size` (hf, as transformers takes it)."""
    if format == "native":
        save_native(model, directory, **kwargs)
    elif format in ("hf", "llama"):
        save_hf_llama(model, directory, **kwargs)
    else:
        raise ValueError(f"format must be 'native' or 'hf', got {format!r}")
