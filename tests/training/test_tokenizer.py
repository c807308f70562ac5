import pytest
from transformers import PreTrainedTokenizerBase

from training.stories import FEELINGS, OBJECT_VERBS
from training.tokenizer import END_OF_TEXT, load_tokenizer, tokenizer_fingerprint, train_tokenizer

ODD = "Hello  World!\n\tLily was not happy.  Ünïcode 😀 trailing space "


def test_trained_tokenizer_basics(tokenizer, story_texts):
    assert isinstance(tokenizer, PreTrainedTokenizerBase)
    assert len(tokenizer) <= 1024
    eot = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == eot
    # encode adds nothing: packing decides where end-of-text tokens go
    assert eot not in tokenizer.encode(story_texts[0])


def test_round_trip(tokenizer, story_texts):
    for text in story_texts[:50] + [ODD, "", " leading space", "x" * 300]:
        assert tokenizer.decode(tokenizer.encode(text)) == text.lower()
    # the end-of-text marker in text is the special token, and decodes back
    ids = tokenizer.encode(f"a{END_OF_TEXT}b")
    assert tokenizer.eos_token_id in ids and tokenizer.decode(ids) == f"a{END_OF_TEXT}b"


def test_case_kept_without_lowercase(story_texts):
    tok = train_tokenizer(story_texts[:50], vocab_size=512, lowercase=False)
    assert tok.decode(tok.encode(ODD)) == ODD
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(train_tokenizer(story_texts[:50], 512))


def test_rule_words_are_single_tokens(tokenizer):
    # Circuit analysis reads features in token space: each trigger/follow-up word is one token.
    words = ["not", *FEELINGS, *OBJECT_VERBS, *OBJECT_VERBS.values()]
    words += [w for f in FEELINGS.values() for w in f.positive + f.negative]
    for w in words:
        assert len(tokenizer.encode(" " + w)) == 1, w


def test_save_and_load(tokenizer, tokenizer_dir, tmp_path, story_texts):
    assert (tokenizer_dir / "tokenizer.json").exists()
    again = load_tokenizer(str(tokenizer_dir))
    assert again.encode(story_texts[1]) == tokenizer.encode(story_texts[1])
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tokenizer)
    again.save_pretrained(tmp_path / "model")  # next to a model's files
    third = load_tokenizer(tmp_path / "model")
    assert third.decode(third.encode(ODD)) == ODD.lower()
    assert third.pad_token_id == third.eos_token_id


def test_missing_tokenizer_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(missing)
