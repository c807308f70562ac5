"""`hooked-bilinear train`: config errors before any work, and an end-to-end run to a loadable model."""

import json
from pathlib import Path

import pytest
import torch

from training.run_config import RunConfigError, load_run_config
from training.train import main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tinystories-tiny.yaml")



def test_shipped_configs_validate():
    tiny = load_run_config(TINY)
    assert tiny.model["n_layers"] == 2 and tiny.data.dataset is None
    medium = load_run_config(REPO / "configs" / "tinystories-medium.yaml", num_processes=8)
    assert (medium.model["n_layers"], medium.model["d_model"], medium.model["d_mlp"], medium.model["n_ctx"]) == (6, 512, 2048, 256)
    assert medium.train.batch_size == 512 and medium.data.vocab_size == 4096 and medium.train.lr == 1e-3


def test_overrides_are_typed():
    run = load_run_config(TINY, ["model.n_layers=4", "train.lr=3e-4", "train.max_tokens=1000000", "data.lowercase=false"])
    assert run.model["n_layers"] == 4 and run.train.lr == 3e-4 and run.train.max_tokens == 10**6
    assert run.data.lowercase is False
    assert load_run_config(TINY, ["train.lr=1"]).train.lr == 1.0  # int -> float is lossless


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.learning_rate=1e-3", "train.learning_rate"),  # unknown key (with a suggestion)
        ("model.n_layer=3", "model.n_layer"),
        ("optim.lr=1", "optim"),  # unknown section
        ("train.lr=fast", "train.lr"),  # wrong type
        ("train.max_steps=2.5", "train.max_steps"),
        ("train.lr=-1", "train.lr"),  # out of range
        ("train.schedule=exponential", "train.schedule"),
        ("train.batch_size=10", "train.batch_size"),  # not a multiple of micro_batch_size
        ("data.dataset=/no/such/stories.jsonl", "data.dataset"),  # missing data file
        ("data.tokenizer=./no/such/tokenizer", "data.tokenizer"),
        ("model.d_head=33", "model"),  # the model config itself
        ("model.d_vocab=10", "model.d_vocab"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(RunConfigError, match=key.replace(".", r"\.")):
        load_run_config(TINY, [override])


def test_cli_reports_errors_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--config", TINY, "--out", str(out), "data.dataset=/no/such/file.jsonl"]) == 2
    assert "data.dataset" in capsys.readouterr().err and not out.exists()
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["--config", TINY, "not-an-override"]) == 2


def test_cli_end_to_end_produces_a_loadable_model(tmp_path):
    out = tmp_path / "run"
    overrides = ["data.n_train_stories=300", "data.n_valid_stories=20", "data.vocab_size=300", "model.n_layers=1",
                 "model.d_model=32", "model.d_head=16", "model.d_mlp=64", "model.n_ctx=32", "train.batch_size=8",
                 "train.micro_batch_size=4", "train.max_steps=4", "train.eval_every=2", "train.checkpoint_every=2",
                 "train.progress_bar=false", "run.n_samples=2", "run.sample_tokens=5"]
    assert main(["--config", TINY, "--out", str(out), *overrides]) == 0
    for name in ("run_config.yaml", "metrics.jsonl", "samples.txt", "summary.json", "tokenizer/tokenizer.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["unigram_entropy"] > 0 and summary["final_eval_loss"] > 0
    assert len((out / "samples.txt").read_text().split("\n\n")) == 2

    from hooked_bilinear import HookedBilinearTransformer

    model = HookedBilinearTransformer.from_pretrained(str(out / "final"))
    assert model.cfg.n_layers == 1 and model.cfg.d_vocab == 300 and model.tokenizer is not None
    # The saved model computes the validation loss the run reported (same rows, same weights).
    rows = torch.tensor([r["input_ids"] for r in _validation_rows(out)])
    with torch.no_grad():
        loss = model(rows, return_type="loss").item()
    assert loss == pytest.approx(summary["final_eval_loss"], rel=1e-5)


def _validation_rows(out: Path) -> list:
    from training.data import load_packed_dataset
    from training.run_config import load_run_config
    from training.tokenizer import load_tokenizer
    from training.train import text_source

    run = load_run_config(out / "run_config.yaml")
    packed = load_packed_dataset(text_source(run), load_tokenizer(out / "tokenizer"), run.model["n_ctx"], "validation")
    return list(packed.select(range(min(run.data.eval_sequences, len(packed)))))


def test_trained_model_carries_the_training_texts_token_counts(tmp_path):
    """``model.token_counts``: how often each id occurs in the packed training text; unseen ids count 0."""
    from datasets import Dataset

    from training.data import token_counts
    from training.run_config import load_run_config
    from training.tokenizer import load_tokenizer
    from training.train import run_training

    out = tmp_path / "run"
    overrides = ["data.n_train_stories=200", "data.n_valid_stories=10", "data.vocab_size=400", "model.n_layers=1",
                 "model.d_model=32", "model.d_head=16", "model.d_mlp=64", "model.n_ctx=32", "train.batch_size=4",
                 "train.micro_batch_size=4", "train.max_steps=1", "train.eval_every=0", "train.progress_bar=false",
                 "run.n_samples=0"]
    captured = {}

    class Grab:
        def on_train_end(self, trainer):
            captured["counts"] = trainer.raw_model.token_counts
            captured["rows"] = trainer.train_data

    run = load_run_config(TINY, overrides + [f"run.out_dir={out}"])
    run_training(run, out, callbacks=[Grab()])
    counts, rows = captured["counts"], captured["rows"]
    assert isinstance(counts, torch.Tensor) and counts.dtype == torch.long and counts.shape == (400,)
    assert not isinstance(counts, torch.nn.Parameter)
    ids = torch.tensor(rows["input_ids"]).flatten()
    assert int(counts.sum()) == ids.numel() and torch.equal(counts, torch.bincount(ids, minlength=400))
    # The built-in corpus never writes an upper-case letter and the tokenizer lowercases: "Q" is absent.
    q = load_tokenizer(out / "tokenizer").convert_tokens_to_ids("Q")
    assert q is not None and q not in ids.tolist() and counts[q] == 0
    assert token_counts(Dataset.from_dict({"input_ids": [[1, 1, 2]]}), 4).tolist() == [0, 2, 1, 0]
