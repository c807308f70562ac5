"""`model.token_counts`: how often each token occurs in the tokenizer's training text.

A plain attribute, not a parameter or buffer (it is data about the corpus, not part of the
function the model computes): a `torch.LongTensor [d_vocab]`, or None. `circuits` uses it to leave
out tokens that never occur in training, whose untrained embeddings normalisation inflates.
Checkpoints carry it as `token_counts.json` (a JSON list of d_vocab integers) next to the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

FILE_NAME = "token_counts.json"


def check_token_counts(counts: Any, d_vocab: int, source: str = "model.token_counts") -> Tensor:
    """`counts` as a LongTensor [d_vocab]; ValueError naming the problem otherwise."""
    counts = torch.as_tensor(counts)
    if counts.ndim != 1 or counts.shape[0] != d_vocab:
        raise ValueError(f"{source} has shape {list(counts.shape)} but the model's vocabulary has d_vocab={d_vocab} "
                         "tokens: it must hold one count per token (recount with the model's own tokenizer)")
    if counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise ValueError(f"{source} must hold integer counts, got dtype {counts.dtype}")
    if counts.numel() and int(counts.min()) < 0:
        raise ValueError(f"{source} holds a negative count ({int(counts.min())})")
    return counts.to(device="cpu", dtype=torch.long)


def token_counts_of(model: Any) -> Optional[Tensor]:
    """The model's counts (checked against its d_vocab), or None when it has none."""
    counts = getattr(model, "token_counts", None)
    return None if counts is None else check_token_counts(counts, model.cfg.d_vocab)


def write_token_counts(counts: Optional[Tensor], directory: Path) -> None:
    if counts is not None:
        (Path(directory) / FILE_NAME).write_text(json.dumps(counts.tolist()))


def read_token_counts(directory: Path, d_vocab: int) -> Optional[Tensor]:
    """The counts saved in `directory`, or None when it has none."""
    path = Path(directory) / FILE_NAME
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); delete it or save the model again") from error
    if not isinstance(raw, list):
        raise ValueError(f"{path} must hold a JSON list of {d_vocab} integer counts, found {type(raw).__name__}")
    return check_token_counts(raw, d_vocab, source=str(path))
