"""Loading errors that say what is wrong and what to load instead (no hub noise for local paths)."""

import json

import pytest

from hooked_bilinear import HookedBilinearTransformer

from ..conftest import tiny_config


def _no_hub(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a local path must not be looked up on the hub")

    monkeypatch.setattr("huggingface_hub.snapshot_download", refuse)


def _run_folder(root, final: bool, steps=(), step_has_config: bool = False):
    run = root / "runs" / "demo" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run_config.yaml").write_text("model: {}\n")
    for step in steps:
        ckpt = run / "checkpoints" / f"step-{step:08d}"
        ckpt.mkdir()
        (ckpt / "model.safetensors").write_bytes(b"")
        if step_has_config:
            (ckpt / "config.json").write_text("{}")
    if final:
        HookedBilinearTransformer(tiny_config()).save_pretrained(run / "final")
    return run


def test_run_folder_names_its_final_model(tmp_path, monkeypatch):
    _no_hub(monkeypatch)
    run = _run_folder(tmp_path, final=True, steps=[100, 300])
    with pytest.raises(IsADirectoryError, match=r"is a training run folder.*from_pretrained\('.*run/final'\)"):
        HookedBilinearTransformer.from_pretrained(str(run))
    HookedBilinearTransformer.from_pretrained(str(run / "final"))  # and that one loads


def test_unfinished_run_names_its_newest_checkpoint(tmp_path, monkeypatch):
    _no_hub(monkeypatch)
    run = _run_folder(tmp_path, final=False, steps=[300, 1200, 900])
    with pytest.raises(IsADirectoryError, match=r"no final/ model yet.*step-00001200.*training state.*resume"):
        HookedBilinearTransformer.from_pretrained(run)
    run2 = _run_folder(tmp_path / "b", final=False, steps=[5], step_has_config=True)
    with pytest.raises(IsADirectoryError, match=r"from_pretrained\('.*step-00000005'\)"):
        HookedBilinearTransformer.from_pretrained(run2)


@pytest.mark.parametrize("name", ["runs/demo/run", "./runs/x", "~/surely-not-here-xyz/model", "{tmp}/not/here"])
def test_missing_local_path_says_so_without_the_hub(name, tmp_path, monkeypatch):
    _no_hub(monkeypatch)
    monkeypatch.chdir(tmp_path)
    name = name.format(tmp=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no such folder: .*check the path") as info:
        HookedBilinearTransformer.from_pretrained(name)
    assert "HFValidationError" not in str(info.value) and "Repo id" not in str(info.value)


def test_two_part_name_under_an_existing_local_folder_is_local(tmp_path, monkeypatch):
    _no_hub(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match=r"runs has no 'demo'"):
        HookedBilinearTransformer.from_pretrained("runs/demo")


def test_folder_with_config_is_never_taken_for_a_run(tmp_path):
    model = HookedBilinearTransformer(tiny_config())
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "checkpoints").mkdir()  # a stray folder of the same name
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["format"] == "hooked-bilinear"
    HookedBilinearTransformer.from_pretrained(tmp_path / "ckpt")
