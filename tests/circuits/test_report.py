"""The `hooked-bilinear circuits` report, end to end on a tiny saved model with a word tokenizer."""

import json

import pytest

from circuits.graph import CircuitGraph
from circuits.report import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model_with_tokenizer):
    path = tmp_path_factory.mktemp("model")
    tiny_model_with_tokenizer.save_pretrained(str(path))
    return path


def test_report_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(model_dir), "--target", " happy", "--target-b", "sad", "--k", "3", "--n-samples", "2",
                 "--sample-len", "12", "--max-nodes", "12", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed
    text = (out / "report.md").read_text()
    for heading in ("Eigenvalue spectra", "Higher-order SVD", "Truncation sweep", "Circuit graph"):
        assert f"## {heading}" in text
    assert "sampled from the model" in text and "logit 'happy' - 'sad'" in text
    for name in ("spectrum_L0.png", "spectrum_L1.png", "hosvd.png", "circuit.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and f"]({name})" in text
    graph = CircuitGraph.from_json(out / "circuit.json")
    graph.validate()
    assert len(graph.nodes) <= 12 and json.loads((out / "circuit.json").read_text())["meta"]["source"] == str(model_dir)
    assert text.count("| 2 | ") >= 2  # three features per layer in the top-feature tables


def test_report_through_the_cli_with_random_samples(model_dir, tmp_path, capsys):
    from training.cli import main as cli

    out = tmp_path / "r2"
    assert cli(["circuits", str(model_dir), "--target", "ball", "--layers", "1", "--samples", "random",
                "--n-samples", "2", "--sample-len", "8", "--out", str(out), "--quiet"]) == 0
    text = (out / "report.md").read_text()
    assert "uniformly random tokens" in text and "### MLP 1" in text and "### MLP 0" not in text
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--target", "zebra"], "not in the tokenizer"),
    (["--target", "happy", "--layers", "7"], "out of range"),
])
def test_report_bad_input_exits_with_a_message(model_dir, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main([str(model_dir), *args, "--out", str(tmp_path / "x"), "--quiet"])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_report_leads_with_the_evidence_and_shows_no_dead_token(tiny_model_with_tokenizer, tmp_path):
    """With token counts, the report's first section is what the weights say, and no table names a
    token that never occurs in the training text."""
    import torch

    from circuits.report import write_report

    model = tiny_model_with_tokenizer
    tok = model.tokenizer
    dead = {"zebra"} | {w for w in ("park", "house", "friend", "went", "to", "with") if w in tok.get_vocab()}
    counts = torch.ones(model.cfg.d_vocab, dtype=torch.long)
    for w in dead & set(tok.get_vocab()):
        counts[tok.get_vocab()[w]] = 0
    model.token_counts = counts
    try:
        path = write_report(model, (" happy", ["sad", "cried"]), tmp_path / "r", n_samples=0, progress=False, max_nodes=10)
    finally:
        del model.token_counts
    text = path.read_text()
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections[0] == "## What the weights say" and "drives the target most" in text
    for w in dead:
        assert f"'{w}'" not in text and f"' {w}'" not in text, w


def test_report_with_an_sae_section(model_dir, tmp_path):
    import torch

    from circuits.report import write_report
    from circuits.sae import load_sae
    from hooked_bilinear import HookedBilinearTransformer

    model = HookedBilinearTransformer.from_pretrained(str(model_dir))
    g = torch.Generator().manual_seed(0)
    d, n = model.cfg.d_model, 64
    sae = load_sae((torch.randn(d, n, generator=g) / d ** 0.5, torch.zeros(n), torch.randn(n, d, generator=g) / n ** 0.5,
                    torch.zeros(d)), hook_name="blocks.1.hook_mlp_out")
    path = write_report(model, " happy", tmp_path / "s", n_samples=2, sample_len=8, progress=False, max_nodes=6,
                        sae_out=sae)
    assert "## SAE features" in path.read_text()
