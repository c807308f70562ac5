"""Reading weight files and checking them against a model, with errors that say what to do.

Every loader goes through here, so a truncated file, a missing tensor or a wrong shape gives the
same kind of message whichever format it came from.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

# Weight files in the order they are looked for: one safetensors file, sharded safetensors, then
# PyTorch pickles (read with weights_only=True, so no code runs).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_MAX_LISTED = 25


class CheckpointError(ValueError):
    """A checkpoint that cannot be read into the model: corrupt, incomplete or for another shape."""


def _listing(items: Iterable[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def find_weights(directory: Path) -> Path:
    """The weights file (or shard index) in `directory`; FileNotFoundError naming what was looked for."""
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise FileNotFoundError(
        f"no weights file in {directory}: expected one of {list(WEIGHT_FILES)}, found {present}; "
        "the checkpoint is incomplete (re-download it or save it again)"
    )


def _read_one(path: Path, device: Optional[str | torch.device] = None) -> dict[str, Tensor]:
    """Every tensor of one file. On the CPU the tensors are memory-mapped views of the file (pages
    are read when first touched, copy-on-write), so reading costs no time and no memory; on an
    accelerator each tensor is copied straight from the file to the device, one at a time."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} is missing (named by the shard index); re-download or re-save")
    device = torch.device(device if device is not None else "cpu")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device=str(device))
        try:  # zip-format pickles (torch.save since 1.6) can be memory-mapped like safetensors
            return torch.load(str(path), map_location=device, weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(str(path), map_location=device, weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        # safetensors and torch.load both fail deep inside their parsers; name the file instead.
        raise CheckpointError(
            f"cannot read weights file {path}: it is truncated or corrupt ({error}); "
            "re-download the checkpoint or save it again"
        ) from error


def read_weights(directory: str | Path, device: Optional[str | torch.device] = None) -> dict[str, Tensor]:
    """All tensors of a checkpoint folder (single file or shards), as stored (dtype and layout).

    device None or "cpu": memory-mapped, nothing is read until used; otherwise copied to `device`
    tensor by tensor, never staged on the CPU as a whole."""
    path = find_weights(Path(directory))
    if not path.name.endswith(".index.json"):
        return _read_one(path, device)
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"shard index {path} is not valid JSON with a 'weight_map' ({error})") from error
    tensors: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(_read_one(path.parent / shard, device))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(f"shard index {path} names tensors that no shard holds: {_listing(missing)}")
    return tensors


def _shape_problems(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], ignore: tuple[str, ...] = ()
) -> list[str]:
    """Every wrongly shaped, missing and unexpected tensor name, as message lines."""
    problems = []
    wrong = [f"{n}: expected {list(s)}, found {list(found[n])}" for n, s in expected.items()
             if n in found and tuple(found[n]) != tuple(s)]
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected and not n.endswith(ignore or ("\0",))]
    if wrong:
        problems.append(f"tensors whose shapes do not match the config: {_listing(wrong)}")
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listing(unexpected)}")
    return problems


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Raise CheckpointError listing every missing, unexpected and wrongly shaped tensor.

    `source` names where the tensors came from (a file or a format) for the message."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    problems = _shape_problems(expected, {name: tuple(t.shape) for name, t in state_dict.items()})
    if problems:
        raise CheckpointError(
            f"weights from {source} do not fit the model's config:\n  " + "\n  ".join(problems)
            + "\n(the config and the weights come from different models, or the file was edited)"
        )


def tokenizer_files_present(directory: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return any((directory / n).is_file() for n in names)


def load_tokenizer(source: Optional[str | Path], warn_if_missing: bool = False, **settings: Any):
    """`transformers.AutoTokenizer` from a folder or hub id, or None (with a warning if asked).

    settings: passed to `from_pretrained`, e.g. pad_token="[EOS]", padding_side="right"."""
    if source is None:
        return None
    import warnings

    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source), **settings)
    except Exception as error:  # offline, missing repo, or files it cannot parse
        if warn_if_missing:
            warnings.warn(f"could not load tokenizer {str(source)!r} ({type(error).__name__}: {error}); "
                          "continuing without one (pass token ids, or set model.tokenizer)", stacklevel=3)
            return None
        raise


def check_source_tensors(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, Tensor],
    source: str,
    ignore: tuple[str, ...] = (),
) -> None:
    """Like `check_state_dict` but for a foreign format's names, before converting them, so a bad
    file is reported under the names it really has. Names ending in `ignore` are skipped."""
    problems = _shape_problems(expected, {name: tuple(t.shape) for name, t in found.items()}, ignore)
    if problems:
        raise CheckpointError(
            f"weights from {source} do not fit its config.json:\n  " + "\n  ".join(problems)
            + "\n(the config and the weights come from different models, or the file is damaged)"
        )


def pick_tokenizer(tokenizer, directory: Path, named: Optional[str] = None, **settings: Any):
    """Resolve the `tokenizer=` argument of the loaders.

    True: the folder's tokenizer files, else the tokenizer the config names (warning if it cannot
    be had), either with `settings` (the pad token and padding side the checkpoint's own code
    sets); False/None: none; a string: that folder or hub id, as it is; anything else: used as given."""
    if tokenizer is None or tokenizer is False:
        return None
    if isinstance(tokenizer, (str, Path)):
        return load_tokenizer(tokenizer)
    if tokenizer is not True:
        return tokenizer
    if tokenizer_files_present(directory):
        return load_tokenizer(directory, warn_if_missing=True, **settings)
    return load_tokenizer(named, warn_if_missing=True, **settings)
