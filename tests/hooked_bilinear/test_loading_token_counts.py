"""`model.token_counts` travels with the checkpoint (token_counts.json), checked against d_vocab."""

import json

import pytest
import torch

from hooked_bilinear import HookedBilinearTransformer

from ..conftest import tiny_config


def _model():
    return HookedBilinearTransformer(tiny_config(d_vocab=48))


@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_round_trip(fmt, tmp_path):
    model = _model()
    counts = torch.randint(0, 1000, (48,), generator=torch.Generator().manual_seed(0))
    counts[7] = 0  # a token that never occurs
    model.token_counts = counts
    model.save_pretrained(tmp_path / "ckpt", format=fmt)
    assert json.loads((tmp_path / "ckpt" / "token_counts.json").read_text()) == counts.tolist()
    again = HookedBilinearTransformer.from_pretrained(tmp_path / "ckpt")
    assert again.token_counts.dtype == torch.long and torch.equal(again.token_counts, counts)
    assert "token_counts" not in dict(again.named_buffers()) and "token_counts" not in again.state_dict()


def test_absent_counts_load_as_none_and_a_resave_removes_stale_ones(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "ckpt")
    assert HookedBilinearTransformer.from_pretrained(tmp_path / "ckpt").token_counts is None
    model.token_counts = torch.ones(48, dtype=torch.long)
    model.save_pretrained(tmp_path / "ckpt")
    model.token_counts = None
    model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "token_counts.json").exists()


def test_wrong_length_is_a_clear_error_on_save_and_on_load(tmp_path):
    model = _model()
    model.token_counts = torch.ones(47, dtype=torch.long)
    with pytest.raises(ValueError, match=r"shape \[47\] but the model's vocabulary has d_vocab=48"):
        model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()  # nothing half-written
    model.token_counts = None
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "token_counts.json").write_text(json.dumps([1] * 50))
    with pytest.raises(ValueError, match=r"token_counts\.json has shape \[50\].*d_vocab=48"):
        HookedBilinearTransformer.from_pretrained(tmp_path / "ckpt")
