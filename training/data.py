"""Text datasets for training: one loader for every source, and packing into fixed-length rows.

``load_text_dataset(source, split)`` takes, through the single ``datasets`` code path:

* ``None`` - the built-in story corpus (``training.stories``), generated once into a cache dir;
* a local file or glob, by extension: ``.txt`` (one document per line), ``.json``/``.jsonl``,
  ``.parquet``, ``.csv`` - or a ``{split: path}`` mapping of such files;
* a directory written by ``save_to_disk`` (a ``Dataset`` or ``DatasetDict``), or a directory of data
  files whose names give the splits (``train.jsonl``, ``validation.jsonl``, ...);
* otherwise a Hugging Face hub name such as ``roneneldan/TinyStories`` (needs the network).

Local paths are checked before anything is loaded, so a missing file fails at once with a
``FileNotFoundError`` naming it. ``streaming=True`` gives an ``IterableDataset`` for corpora too big
to convert to Arrow first.

``pack_dataset(dataset, tokenizer, n_ctx)`` tokenizes and concatenates the documents, each followed
by the end-of-text token, and cuts the stream into rows of exactly ``n_ctx`` tokens (column
``input_ids``). Nothing is dropped except the final partial row (and documents that tokenize to
nothing). For a ``Dataset`` both steps are ``Dataset.map(batched=True, num_proc=...)`` calls with
fingerprints derived from the data's fingerprint, the tokenizer's definition and ``n_ctx``, so a
second call loads the Arrow cache files instead of recomputing. For an ``IterableDataset`` the same
function packs lazily with a generator, and yields the same rows.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator, Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import Dataset, DatasetDict, IterableDataset

from training import stories
from training.run_config import unknown_source_message
from training.tokenizer import tokenizer_fingerprint

# File extension -> `datasets` packaged builder.
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
EXPECTED = (
    "a data file (.txt, .json, .jsonl, .parquet, .csv), a glob of such files, a directory written "
    "by save_to_disk or holding such files, or a hub dataset name"
)
# Bump when packing semantics change, so old cache files are not reused.
PACKING_VERSION = "1"


def default_cache_dir() -> Path:
    """Root of this library's caches: ``$HOOKED_BILINEAR_CACHE`` or ``~/.cache/hooked_bilinear``."""
    return Path(os.environ.get("HOOKED_BILINEAR_CACHE", "~/.cache/hooked_bilinear")).expanduser()


def builtin_corpus(
    cache_dir: str | Path | None = None, n_train: int = 20_000, n_valid: int = 1_000, seed: int = 0
) -> Path:
    """Directory holding the built-in story corpus (``train.jsonl``, ``validation.jsonl``).

    Generated on first use; the directory name encodes generator version, seed and sizes, so
    a different request never reuses a stale corpus.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = root / f"stories-v{stories.GENERATOR_VERSION}-seed{seed}-{n_train}-{n_valid}"
    if not (out / "validation.jsonl").exists():
        # Write to a temporary sibling and rename, so an interrupted run leaves no half corpus.
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        stories.write_corpus(tmp, n_train, n_valid, seed)
        try:
            tmp.rename(out)
        except OSError:  # another process won the race; its corpus is identical
            pass
    return out


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def _looks_local(source: str) -> bool:
    # Hub names are "name" or "org/name"; anything path-like or with a data extension is local.
    if source.startswith((".", "/", "~")) or any(c in source for c in "*?["):
        return True
    if Path(source).suffix.lower() in BUILDERS:
        return True
    first = Path(source).parts[0] if Path(source).parts else ""
    return "/" in source and Path(first).is_dir()


def _local_files(source: str) -> list[str]:
    """Expand a local file or glob; raise FileNotFoundError when it matches nothing."""
    path = os.path.expanduser(source)
    files = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
    files = [f for f in files if os.path.exists(f)]
    if not files:
        raise FileNotFoundError(f"no data at {source!r}: expected {EXPECTED}")
    return files


def _builder_for(files: list[str]) -> str:
    exts = {Path(f).suffix.lower() for f in files}
    if len(exts) != 1 or (ext := exts.pop()) not in BUILDERS:
        raise ValueError(f"cannot tell the format of {files[:3]}: expected one of {sorted(BUILDERS)}")
    return BUILDERS[ext]


def _resolve(source: str | Path | Mapping[str, Any] | None, split: str, cache_dir) -> tuple[str, Any]:
    """Classify ``source`` as ("disk", path) | ("files", (builder, data_files)) | ("dir", path) |
    ("hub", name); all local existence checks happen here, before any loading."""
    if source is None:
        corpus = builtin_corpus(cache_dir)
        data_files = {s: str(corpus / f"{s}.jsonl") for s in ("train", "validation")}
        return "files", ("json", data_files)
    if isinstance(source, Mapping):
        data_files = {name: _local_files(str(p)) for name, p in source.items()}
        return "files", (_builder_for(list(chain.from_iterable(data_files.values()))), data_files)
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return ("disk", path) if _is_saved_dataset(path) else ("dir", path)
    if isinstance(source, Path) or _looks_local(text):
        files = _local_files(text)
        # A single file (or glob) is whatever split was asked for.
        return "files", (_builder_for(files), {split: files})
    problem = unknown_source_message("dataset", text)
    if problem is not None:  # refused here: load_dataset would try the hub (with retries) first
        raise FileNotFoundError(problem)
    return "hub", text


def load_text_dataset(
    source: str | Path | Mapping[str, Any] | None = None,
    split: str = "train",
    *,
    streaming: bool = False,
    text_column: str = "text",
    cache_dir: str | Path | None = None,
    **load_kwargs: Any,
) -> Dataset | IterableDataset:
    """Load one split of a text dataset from any supported ``source`` (see the module docstring).

    ``load_kwargs`` go to ``datasets.load_dataset`` (e.g. ``name=`` for a hub config).
    ``cache_dir`` is where the built-in corpus is generated (default ``default_cache_dir()``).
    Raises ``FileNotFoundError`` for missing local data and ``ValueError`` for a missing text
    column or split.
    """
    kind, spec = _resolve(source, split, cache_dir)
    if kind == "disk":
        loaded = datasets.load_from_disk(str(spec))
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise ValueError(f"split {split!r} not in {str(spec)!r}; it has {list(loaded)}")
            loaded = loaded[split]
        ds = loaded.to_iterable_dataset() if streaming else loaded
    elif kind == "files":
        builder, data_files = spec
        if split not in data_files:
            raise ValueError(f"split {split!r} not among the given files' splits {list(data_files)}")
        ds = datasets.load_dataset(
            builder, data_files=data_files, split=split, streaming=streaming, **load_kwargs
        )
    else:  # "dir" (data files named by split) and "hub" both go through load_dataset's resolution
        ds = datasets.load_dataset(str(spec), split=split, streaming=streaming, **load_kwargs)
    columns = ds.column_names  # None for some streaming sources (features unknown until read)
    if columns is not None and text_column not in columns:
        raise ValueError(f"text column {text_column!r} not in {columns}; pass text_column=")
    return ds


# --- packing -----------------------------------------------------------------------------------


def _hash(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _tokenize_docs(texts: list[str], tokenizer, eos: int) -> list[list[int]]:
    """Token ids of each non-empty document, followed by the end-of-text token."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [doc + [eos] for doc in ids if doc]


def _tokenize_batch(batch: dict, *, tokenizer, eos: int, text_column: str) -> dict:
    docs = _tokenize_docs(batch[text_column], tokenizer, eos)
    return {"ids": docs, "length": [len(d) for d in docs]}


def _pack_batch(batch: dict, indices: list[int], *, source: Dataset, offsets: np.ndarray, n_ctx: int) -> dict:
    """Rows of the global token stream whose start falls inside this batch's documents.

    ``offsets[d]`` is where document ``d`` starts in the concatenated stream, so every batch
    knows its rows without seeing the others; the last row of a batch may run into the next
    documents, which are read from ``source``. Only a final row past the end is dropped.
    """
    i, j = indices[0], indices[-1] + 1
    n_rows = int(offsets[-1]) // n_ctx
    first = -(-int(offsets[i]) // n_ctx)  # ceil: first row starting at or after document i
    last = min(-(-int(offsets[j]) // n_ctx), n_rows)
    if first >= last:
        return {"input_ids": []}
    end = last * n_ctx
    tokens = list(chain.from_iterable(batch["ids"]))
    more = int(np.searchsorted(offsets, end, side="left"))  # documents j..more-1 reach `end`
    if more > j:
        tokens.extend(chain.from_iterable(source[j:more]["ids"]))
    start = first * n_ctx - int(offsets[i])
    return {"input_ids": [tokens[start + r * n_ctx : start + (r + 1) * n_ctx] for r in range(last - first)]}


def _stream_rows(
    source: IterableDataset, tokenizer, eos: int, text_column: str, n_ctx: int, batch_size: int
) -> Iterator[dict]:
    # Same stream as the map path: documents + EOS, cut every n_ctx tokens, remainder carried.
    buf: list[int] = []
    for batch in source.iter(batch_size=batch_size):
        for doc in _tokenize_docs(batch[text_column], tokenizer, eos):
            buf.extend(doc)
        n = len(buf) // n_ctx
        for r in range(n):
            yield {"input_ids": buf[r * n_ctx : (r + 1) * n_ctx]}
        del buf[: n * n_ctx]


def _cache_file(cache_dir: Path | None, fingerprint: str, what: str) -> str | None:
    if cache_dir is None:
        return None  # datasets' own cache next to the source's Arrow files
    cache_dir.mkdir(parents=True, exist_ok=True)
    return str(cache_dir / f"{what}-{fingerprint}.arrow")


def pack_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer,
    n_ctx: int,
    *,
    text_column: str = "text",
    num_proc: int | None = None,
    batch_size: int = 1000,
    cache_dir: str | Path | None = None,
) -> Dataset | IterableDataset:
    """Tokenize ``dataset`` and pack it into rows of exactly ``n_ctx`` tokens (column ``input_ids``).

    Each document is followed by ``tokenizer.eos_token_id``; the rows are consecutive slices of
    that stream, and only its final partial row is dropped. Works on ``Dataset`` (cached,
    parallel with ``num_proc``) and ``IterableDataset`` (lazy, same rows). Results are cached in
    ``cache_dir`` when given, else next to the dataset's own cache files (in-memory datasets
    without any: ``default_cache_dir() / "packed"``).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: packing needs it to separate documents")
    if n_ctx < 1:
        raise ValueError(f"n_ctx must be positive, got {n_ctx}")
    # Fixed-length int32 rows: half the disk of int64, and readers can rely on the shape.
    # (`datasets.List` is datasets>=4; `Sequence` is its 3.x name.)
    seq = getattr(datasets, "List", datasets.Sequence)
    features = datasets.Features({"input_ids": seq(datasets.Value("int32"), length=n_ctx)})

    if isinstance(dataset, IterableDataset):
        return IterableDataset.from_generator(
            _stream_rows,
            features=features,
            gen_kwargs=dict(
                source=dataset, tokenizer=tokenizer, eos=eos, text_column=text_column,
                n_ctx=n_ctx, batch_size=batch_size,
            ),
        )

    if text_column not in dataset.column_names:
        raise ValueError(f"text column {text_column!r} not in {dataset.column_names}")
    if len(dataset) == 0:  # `map` returns an empty input unchanged, with its old columns
        return Dataset.from_dict({"input_ids": []}, features=features)
    if cache_dir is None and not dataset.cache_files:
        cache_dir = default_cache_dir() / "packed"  # in-memory data: datasets would not cache
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    # Explicit fingerprints: the tokenizer object does not hash stably, its definition does.
    tok_fp = _hash(
        "tokenize", PACKING_VERSION, dataset._fingerprint, tokenizer_fingerprint(tokenizer), eos, text_column
    )
    tokenized = dataset.map(
        _tokenize_batch,
        fn_kwargs=dict(tokenizer=tokenizer, eos=eos, text_column=text_column),
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        new_fingerprint=tok_fp,
        cache_file_name=_cache_file(cache, tok_fp, "tokenized"),
        desc="tokenizing",
    )
    lengths = tokenized.with_format("numpy", columns=["length"])["length"]
    offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])
    pack_fp = _hash("pack", PACKING_VERSION, tok_fp, n_ctx)
    return tokenized.map(
        _pack_batch,
        fn_kwargs=dict(source=tokenized, offsets=offsets, n_ctx=n_ctx),
        with_indices=True,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=tokenized.column_names,
        features=features,
        new_fingerprint=pack_fp,
        cache_file_name=_cache_file(cache, pack_fp, "packed"),
        desc=f"packing into {n_ctx}-token rows",
    )


def load_packed_dataset(
    source: str | Path | Mapping[str, Any] | None,
    tokenizer,
    n_ctx: int,
    split: str = "train",
    *,
    streaming: bool = False,
    text_column: str = "text",
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
    **load_kwargs: Any,
) -> Dataset | IterableDataset:
    """``load_text_dataset`` then ``pack_dataset``: what a training loop needs in one call.

    ``cache_dir`` is where the built-in corpus goes; packed rows are cached next to the loaded
    dataset's own Arrow cache files (``datasets``' cache).
    """
    ds = load_text_dataset(
        source, split, streaming=streaming, text_column=text_column, cache_dir=cache_dir, **load_kwargs
    )
    return pack_dataset(ds, tokenizer, n_ctx, text_column=text_column, num_proc=num_proc)


def token_counts(rows: Dataset | IterableDataset, d_vocab: int, *, max_rows: int | None = None,
                 batch_size: int = 4096) -> "torch.Tensor":
    """How often each token id occurs in packed ``rows`` (column ``input_ids``): LongTensor [d_vocab].

    A ``Dataset`` is counted whole; an ``IterableDataset`` (a streamed, possibly hub-scale corpus) only
    over its first ``max_rows`` rows. Ids >= ``d_vocab`` raise ``ValueError``.
    """
    import torch

    counts = np.zeros(d_vocab, dtype=np.int64)
    streamed = isinstance(rows, IterableDataset)
    source = rows.take(max_rows) if streamed and max_rows is not None else rows
    for batch in source.with_format("numpy").iter(batch_size=batch_size):
        ids = np.asarray(batch["input_ids"]).ravel()
        if ids.size and ids.max() >= d_vocab:
            raise ValueError(f"token id {int(ids.max())} is outside the vocabulary of {d_vocab}")
        counts += np.bincount(ids, minlength=d_vocab)
    return torch.from_numpy(counts)
