import json
import os

import datasets
import pytest

from training import data
from training.data import builtin_corpus, load_packed_dataset, load_text_dataset, pack_dataset

DOCS = [
    "Once upon a time, there was a dog.",
    "",  # empty documents tokenize to nothing and are skipped
    "Lily was not happy. She cried.",
    "Tom found a red ball. He kicked it all day. The end.",
    "A short one.",
    "The sun was warm and the sky was blue. " * 3,
]


def expected_rows(tokenizer, docs, n_ctx):
    stream = []
    for doc in docs:
        ids = tokenizer.encode(doc)
        if ids:
            stream += ids + [tokenizer.eos_token_id]
    n = len(stream) // n_ctx
    return stream, [stream[i * n_ctx : (i + 1) * n_ctx] for i in range(n)]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "docs.txt").write_text("\n".join(DOCS[:1] + DOCS[2:]) + "\n")
    with open(tmp_path / "docs.jsonl", "w") as f:
        for d in DOCS:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    datasets.Dataset.from_dict({"text": DOCS}).to_parquet(str(tmp_path / "docs.parquet"))
    return tmp_path


def test_local_files_one_code_path(files):
    non_empty = [d for d in DOCS if d]
    assert load_text_dataset(files / "docs.txt")["text"] == non_empty
    assert load_text_dataset(str(files / "docs.jsonl"))["text"] == DOCS
    assert load_text_dataset(files / "docs.parquet", split="validation")["text"] == DOCS
    both = {"train": str(files / "docs.jsonl"), "validation": str(files / "docs.jsonl")}
    assert len(load_text_dataset(both, "validation")) == len(DOCS)
    assert load_text_dataset(str(files / "*.jsonl"))["text"] == DOCS
    streamed = load_text_dataset(files / "docs.jsonl", streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    assert [r["text"] for r in streamed] == DOCS


def test_saved_and_directory_datasets(files):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:3]}),
                               "validation": datasets.Dataset.from_dict({"text": DOCS[3:]})})
    dd.save_to_disk(str(files / "saved"))
    assert load_text_dataset(files / "saved", "validation")["text"] == DOCS[3:]
    with pytest.raises(ValueError, match="test"):
        load_text_dataset(files / "saved", "test")
    (files / "split_dir").mkdir()
    for split, docs in (("train", DOCS[:3]), ("validation", DOCS[3:])):
        datasets.Dataset.from_dict({"text": docs}).to_json(str(files / "split_dir" / f"{split}.jsonl"))
    assert load_text_dataset(files / "split_dir", "validation")["text"] == DOCS[3:]
    with pytest.raises(ValueError, match="body"):
        load_text_dataset(files / "docs.jsonl", text_column="body")


def test_builtin_corpus(tmp_path):
    path = builtin_corpus(tmp_path, n_train=40, n_valid=4, seed=5)
    assert builtin_corpus(tmp_path, n_train=40, n_valid=4, seed=5) == path  # generated once
    assert len(load_text_dataset(path / "validation.jsonl")) == 4
    valid = load_text_dataset(None, "validation")  # no source: the default built-in corpus
    assert len(valid) == 1000 and valid[0]["text"].startswith("Once upon a time")


MISSING = ["missing.txt", "some/dir/missing.parquet", "./missing_dir", "nothing*.jsonl"]


@pytest.mark.parametrize("source", MISSING)
def test_missing_data_fails_first(tmp_path, monkeypatch, source):
    def no_work(*args, **kwargs):
        raise AssertionError("loading started before the path was checked")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data.datasets, "load_dataset", no_work)
    with pytest.raises(FileNotFoundError, match=source.replace("*", r"\*")) as err:
        load_text_dataset(source)
    assert "expected" in str(err.value)
    with pytest.raises(FileNotFoundError):
        load_text_dataset({"train": str(tmp_path / "gone.jsonl")})


@pytest.mark.parametrize("n_ctx", [1, 7, 16])
def test_packing_is_exact(tokenizer, tmp_path, n_ctx):
    ds = datasets.Dataset.from_dict({"text": DOCS})
    packed = pack_dataset(ds, tokenizer, n_ctx, batch_size=2, cache_dir=tmp_path)
    stream, rows = expected_rows(tokenizer, DOCS, n_ctx)
    assert packed.column_names == ["input_ids"]
    got = packed["input_ids"]
    assert all(len(r) == n_ctx for r in got)
    assert got == rows  # consecutive slices of docs joined by EOS, across batch boundaries
    n_doc_tokens = sum(len(tokenizer.encode(d)) for d in DOCS)
    n_docs = sum(1 for d in DOCS if d)
    assert len(got) * n_ctx == n_doc_tokens + n_docs - (n_doc_tokens + n_docs) % n_ctx
    eos = tokenizer.eos_token_id
    assert sum(r.count(eos) for r in got) == stream[: len(got) * n_ctx].count(eos)


def test_packing_parallel_and_streaming_agree(tokenizer, files, story_texts, tmp_path):
    datasets.Dataset.from_dict({"text": story_texts}).to_json(str(files / "stories.jsonl"))
    one = pack_dataset(load_text_dataset(files / "stories.jsonl"), tokenizer, 64, batch_size=50,
                       cache_dir=tmp_path / "a")
    two = pack_dataset(load_text_dataset(files / "stories.jsonl"), tokenizer, 64, batch_size=50,
                       num_proc=2, cache_dir=tmp_path / "b")
    _, rows = expected_rows(tokenizer, story_texts, 64)
    assert one["input_ids"] == rows and two["input_ids"] == rows
    assert any("_of_00002" in f["filename"] for f in two.cache_files)  # really two workers
    lazy = load_text_dataset(files / "stories.jsonl", streaming=True)
    streamed = pack_dataset(lazy, tokenizer, 64, batch_size=37)
    assert isinstance(streamed, datasets.IterableDataset)
    assert [r["input_ids"] for r in streamed] == rows
    assert [r["input_ids"] for r in streamed] == rows  # re-iterable: a second epoch is the same


def test_packing_is_cached(tokenizer, tokenizer_dir, files, story_texts):
    datasets.Dataset.from_dict({"text": story_texts[:100]}).to_json(str(files / "s.jsonl"))
    first = load_packed_dataset(files / "s.jsonl", tokenizer, 32)
    cache = [f["filename"] for f in first.cache_files]
    stamps = {f: os.stat(f).st_mtime_ns for f in cache}
    # a fresh tokenizer object with the same definition, a fresh load of the same file
    from training.tokenizer import load_tokenizer

    second = load_packed_dataset(files / "s.jsonl", load_tokenizer(tokenizer_dir), 32)
    assert second._fingerprint == first._fingerprint
    assert [f["filename"] for f in second.cache_files] == cache
    assert {f: os.stat(f).st_mtime_ns for f in cache} == stamps  # loaded, not rewritten
    assert second["input_ids"] == first["input_ids"]
    other = load_packed_dataset(files / "s.jsonl", tokenizer, 16)
    assert other._fingerprint != first._fingerprint
    assert not set(f["filename"] for f in other.cache_files) & set(cache)


def test_packing_in_memory_uses_explicit_cache(tokenizer, tmp_path):
    ds = datasets.Dataset.from_dict({"text": DOCS})
    first = pack_dataset(ds, tokenizer, 8, cache_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.startswith("packed-") for n in names) and any(n.startswith("tokenized-") for n in names)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    second = pack_dataset(datasets.Dataset.from_dict({"text": DOCS}), tokenizer, 8, cache_dir=tmp_path)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    assert second["input_ids"] == first["input_ids"]


def test_packing_edge_cases(tokenizer, tmp_path, files):
    empty = pack_dataset(datasets.Dataset.from_dict({"text": []}), tokenizer, 8, cache_dir=tmp_path)
    assert len(empty) == 0 and empty.column_names == ["input_ids"]
    short = pack_dataset(datasets.Dataset.from_dict({"text": ["hi", ""]}), tokenizer, 64, cache_dir=tmp_path)
    assert len(short) == 0 and short.column_names == ["input_ids"]
    with pytest.raises(ValueError, match="n_ctx"):
        pack_dataset(datasets.Dataset.from_dict({"text": ["hi"]}), tokenizer, 0)
    # a save_to_disk directory streamed packs like the same data in memory
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(files / "saved_one"))
    lazy = load_text_dataset(files / "saved_one", streaming=True)
    streamed = pack_dataset(lazy, tokenizer, 5, batch_size=2)
    assert [r["input_ids"] for r in streamed] == expected_rows(tokenizer, DOCS, 5)[1]


def test_builtin_corpus_loads_without_repo_card_noise(tmp_path, capfd):
    """The corpus folder's README carries a dataset-card YAML block, so `datasets` reads it quietly
    (without it huggingface_hub warned "Repo card metadata block was not found" on every load)."""
    from training.data import load_text_dataset
    from training.stories import write_corpus

    write_corpus(tmp_path / "corpus", 20, 5)
    capfd.readouterr()
    train = load_text_dataset(str(tmp_path / "corpus"), "train")
    valid = load_text_dataset(str(tmp_path / "corpus"), "validation")
    assert (len(train), len(valid)) == (20, 5)  # the split files, not the save_to_disk copy beside them
    assert "Repo card metadata" not in capfd.readouterr().err


def test_a_dataset_that_is_neither_a_path_nor_a_hub_id_is_refused_before_loading():
    from training.data import load_text_dataset

    with pytest.raises(FileNotFoundError, match="not an existing file or folder, nor a hub dataset id"):
        load_text_dataset("my_stories")
