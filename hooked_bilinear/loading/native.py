"""This project's own checkpoint format: `config.json` (the config's fields plus a format marker),
`model.safetensors` (the model's state dict under its own names) and the tokenizer's files.

Saves are atomic: everything is written into a temporary folder next to the target and moved into
place only once complete, so an interrupted save leaves either the old checkpoint or the new one.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from safetensors.torch import save_file

from ..config import HookedBilinearConfig, parse_dtype
from .checks import pick_tokenizer, read_weights
from .materialize import empty_model, fill_model
from .token_counts import FILE_NAME as TOKEN_COUNTS_NAME
from .token_counts import token_counts_of, write_token_counts

FORMAT_MARKER = "hooked-bilinear"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# Files a checkpoint consists of (any format this package writes). When a save replaces an older
# checkpoint, such files that the new save did not write are removed (e.g. shards of a larger
# model, or tokenizer files when the new model has none); anything else in the folder is kept.
_CHECKPOINT_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "chat_template.*", TOKEN_COUNTS_NAME,
)


def write_checkpoint_atomically(directory: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on an empty temporary folder in `directory`'s parent, then move the result
    into `directory`. A new folder appears in one rename; into an existing folder each file is
    replaced in one rename (config.json last). On any error the target is left untouched and the
    temporary folder is removed."""
    directory = Path(directory).expanduser().absolute()
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"cannot save a checkpoint to {directory}: it is a file")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint should not be
        if not directory.exists():
            os.replace(tmp, directory)
            return
        written = {p.name for p in tmp.iterdir()}
        for name in sorted(written, key=lambda n: n == CONFIG_NAME):
            os.replace(tmp / name, directory / name)
        for old in directory.iterdir():
            stale = old.name not in written and any(fnmatch.fnmatch(old.name, p) for p in _CHECKPOINT_FILES)
            if stale and old.is_file():
                old.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


MAX_SHARD_BYTES = 1 << 30  # larger models are written in shards of about this size


def _shard_names(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped, in order, into shards of at most `max_bytes` (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def save_native(model: Any, directory: str | Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write `config.json`, the weights, the tokenizer and `model.token_counts` (those two if
    present) to `directory`, atomically. Weights go to `model.safetensors`, or above
    `max_shard_bytes` to `model-0000i-of-0000n.safetensors` shards plus their index; only one
    shard's tensors are ever copied (to the CPU, made contiguous) at a time."""
    config = model.cfg.to_dict()
    config["device"] = None  # a checkpoint should load anywhere; the loader's `device=` decides
    config = {"format": FORMAT_MARKER, "format_version": FORMAT_VERSION, **config}
    counts = token_counts_of(model)  # checked before anything is written
    state = model.state_dict()
    shards = _shard_names({n: t.numel() * t.element_size() for n, t in state.items()}, max_shard_bytes)
    files = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    def write(tmp: Path) -> None:
        for names, file in zip(shards, files):
            # safetensors wants contiguous CPU tensors that share no memory: copies, one shard at a time.
            tensors = {name: state[name].detach().to("cpu").contiguous() for name in names}
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            del tensors
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": {name: file for names, file in zip(shards, files) for name in names}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
        write_token_counts(counts, tmp)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))

    write_checkpoint_atomically(directory, write)


def is_native_config(raw: dict) -> bool:
    return raw.get("format") == FORMAT_MARKER


def load_native(
    directory: str | Path, device: Optional[str] = None, dtype: Any = None, tokenizer: Any = True
) -> Any:
    """Read a folder written by `save_native` into a `HookedBilinearTransformer` (eval mode).

    dtype None keeps the saved dtype; device None means the CPU. No weight is allocated twice: on
    the CPU in the saved dtype the parameters are memory-mapped views of the file."""
    directory = Path(directory)
    raw = json.loads((directory / CONFIG_NAME).read_text())
    raw.pop("format", None)
    version = raw.pop("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise ValueError(f"{directory / CONFIG_NAME} has format_version {version}; this library reads up to "
                         f"{FORMAT_VERSION}: upgrade hooked-bilinear")
    raw["device"] = None if device is None else str(device)
    if dtype is not None:
        raw["dtype"] = str(parse_dtype(dtype)).removeprefix("torch.")
    cfg = HookedBilinearConfig.from_dict(raw)
    state_dict = read_weights(directory, device=cfg.device)
    tok = pick_tokenizer(tokenizer, directory, cfg.tokenizer_name)
    return fill_model(empty_model(cfg, tokenizer=tok), state_dict, str(directory / WEIGHTS_NAME))
