"""benchmarks/pronoun_offsets.py: its data positions are where the name sits, its sides are the
benchmark's, and its placement column is a distribution over offsets."""

import pytest

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def offsets_script():
    return load_benchmark("pronoun_offsets")


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    from hooked_bilinear import HookedBilinearConfig, HookedBilinearTransformer

    cfg = HookedBilinearConfig(d_model=32, d_head=8, n_heads=4, n_layers=1, n_ctx=128, d_vocab=len(tokenizer),
                               d_mlp=64, seed=0)
    path = tmp_path_factory.mktemp("pronoun-model")
    HookedBilinearTransformer(cfg, tokenizer=tokenizer).save_pretrained(str(path))
    return path


def test_wrong_side_is_the_benchmarks_centred_reading(offsets_script):
    from training.rule_recall import NAME_GENDER

    values = {n: (1.0 if g == "she" else -1.0) for n, g in NAME_GENDER.items()}
    assert offsets_script.wrong_side(values) == []
    # a weak girl's name below the mean of all names is on the wrong side, though its sign is right
    values["Amy"] = 0.01
    values["Tom"] = 5.0
    assert offsets_script.wrong_side(values) == ["Amy", "Tom"]


def test_report_on_a_small_model(offsets_script, model_dir):
    from hooked_bilinear import HookedBilinearTransformer

    model = HookedBilinearTransformer.from_pretrained(str(model_dir)).eval()
    assert offsets_script.name_offset(model, "tom met sue. tom was happy.", "Tom") == len(
        model.to_str_tokens(model.to_tokens(" was happy.", prepend_bos=False)[0])) + 1
    data, where = offsets_script.data_effects(model, n_stories=40, per_name=2)
    assert 0 < len(data) <= 24 and len(data) <= sum(where.values()) <= 2 * len(data)
    text = offsets_script.report(str(model_dir), offsets=[1, 2, 3], n_stories=40)
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == [1, 2, 3]
    assert sum(float(r.split("|")[2]) for r in rows) == pytest.approx(1.0, abs=0.01)
