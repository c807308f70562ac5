"""Session-wide test settings and tiny models, built locally (no network)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from hooked_bilinear import HookedBilinearConfig, HookedBilinearTransformer

torch.set_num_threads(min(2, os.cpu_count() or 1))

WORDS = (
    "once upon a time there was little girl boy named lily tom she he was happy sad not smiled cried "
    "ball book cake kicked read ate the in park house . , and played with her his friend went to"
).split()


def make_word_tokenizer(words):
    """A word-level Hugging Face tokenizer over `words` (ids in order; "<|endoftext|>" and "[UNK]" added
    first when missing), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "[UNK]": 1}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="[UNK]",
    )


@pytest.fixture(scope="session")
def word_tokenizer():
    """A word-level tokenizer over a few story words."""
    return make_word_tokenizer(WORDS)


def tiny_config(**overrides) -> HookedBilinearConfig:
    base = dict(d_model=32, d_head=8, n_layers=2, n_ctx=24, d_vocab=48, d_mlp=64, seed=0, initializer_range=0.2)
    base.update(overrides)
    return HookedBilinearConfig(**base)


def tiny_model_with_norm_and_bias_noise(**overrides) -> HookedBilinearTransformer:
    """A tiny model whose norm gains and biases are moved off their initial values (1 and 0), so a
    test that compares against the forward pass sees them act."""
    model = HookedBilinearTransformer(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".w", ".b")) or ".b_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="session")
def tiny_model() -> HookedBilinearTransformer:
    """A 2-layer bilinear model with grouped-query attention and rotary positions."""
    return HookedBilinearTransformer(tiny_config(n_key_value_heads=2)).eval()


@pytest.fixture(scope="session")
def tiny_model_with_tokenizer(word_tokenizer) -> HookedBilinearTransformer:
    cfg = tiny_config(d_vocab=len(word_tokenizer), seed=1)
    return HookedBilinearTransformer(cfg, tokenizer=word_tokenizer).eval()
