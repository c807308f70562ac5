"""Training bilinear language models: data, tokenizers, pretraining and finetuning loops.

Submodules (imported on first use, so ``import training`` stays cheap):

* ``training.stories``   - built-in deterministic story corpus with planted, checkable rules
* ``training.tokenizer`` - train / load tokenizers (byte-level BPE, ``<|endoftext|>`` as BOS/EOS/pad)
* ``training.data``      - load text datasets from any source and pack them into n_ctx-token rows
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy submodule access (`training.data`) without paying for torch/datasets at import time.
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
