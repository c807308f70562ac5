"""Training and loading tokenizers.

``train_tokenizer`` trains a byte-level BPE tokenizer with the ``tokenizers`` library, like the
4096-token lowercase tokenizer the original TinyStories models used, and wraps it as a
``transformers.PreTrainedTokenizerFast`` so it saves next to a model with ``save_pretrained`` and
loads back with ``AutoTokenizer``. Byte-level BPE maps every string to tokens and back exactly
(spaces, newlines and unseen characters included), so ``decode(encode(text)) == text`` (after
lowercasing when ``lowercase=True``).

One special token, ``<|endoftext|>``, serves as BOS, EOS and padding (GPT-2 convention); packing
(``training.data``) puts it between documents.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"


def _batches(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    # The trainer takes an iterator of batches: fewer Python->Rust crossings than one per text.
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    *,
    lowercase: bool = True,
    min_frequency: int = 2,
    model_max_length: int | None = None,
    save_dir: str | Path | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer of at most ``vocab_size`` tokens on ``texts``.

    ``texts`` is any iterable of strings (a list, a generator over a dataset's "text" column).
    The vocabulary is smaller than ``vocab_size`` when the corpus has fewer distinct merges.
    With ``save_dir`` the tokenizer is also written there with ``save_pretrained``.
    """
    tok = Tokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    # add_prefix_space=False: a leading space would not survive decode, breaking round-trips.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],  # id 0
        # All 256 bytes from the start, so no text is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_batches(texts), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=None,
        # transformers' default clean-up removes spaces before punctuation: not a round-trip.
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length or int(1e30),
    )
    if save_dir is not None:
        wrapped.save_pretrained(str(save_dir))
    return wrapped


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer by hub name or local directory (``AutoTokenizer``), ready for packing.

    Tokenizers without a pad token get their EOS token as padding.
    """
    path = Path(name_or_path).expanduser()
    # Hub names look like "org/name"; only explicit paths are treated as local.
    looks_local = str(name_or_path).startswith((".", "/", "~"))
    if looks_local and not path.exists():
        raise FileNotFoundError(
            f"tokenizer path {str(path)!r} does not exist; expected a directory written by "
            "save_pretrained (tokenizer.json, tokenizer_config.json) or a hub tokenizer name"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path) if path.exists() else str(name_or_path))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A stable hash of a tokenizer's full definition (vocab, merges, normalizer, specials).

    Used as a cache key: two tokenizers with the same fingerprint tokenize identically.
    """
    import hashlib

    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizers: fall back to the vocabulary and specials
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.eos_token, tokenizer.bos_token, tokenizer.padding_side)).encode())
    return h.hexdigest()[:16]
