"""A run folder is never overwritten or mixed: --resume / --overwrite, refused resumes change nothing."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from training.run_folder import resume_changes, truncate_metrics
from training.train import main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tinystories-tiny.yaml")
SMALL = ["data.n_train_stories=300", "data.n_valid_stories=20", "data.vocab_size=300", "model.n_layers=1",
         "model.d_model=32", "model.d_head=16", "model.d_mlp=64", "model.n_ctx=32", "train.batch_size=8",
         "train.micro_batch_size=4", "train.max_steps=4", "train.eval_every=2", "train.checkpoint_every=2",
         "train.log_every=1", "train.progress_bar=false", "run.n_samples=1", "run.sample_tokens=4"]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its content hash (what "nothing changed" is checked against)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, _hermetic_caches):
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["--config", TINY, "--out", str(out), *SMALL]) == 0
    return out


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_into_a_run_needs_resume_or_overwrite(run, capsys):
    before = snapshot(run)
    assert main(["--config", TINY, "--out", str(run), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert snapshot(run) == before


def test_overwrite_starts_over(run):
    stale = run / "checkpoints" / "step-00000004"
    assert stale.is_dir()
    (run / "notes.txt").write_text("mine")  # not a run file: left alone
    assert main(["--config", TINY, "--out", str(run), "--overwrite", *SMALL, "train.checkpoint_every=0",
                 "train.max_steps=3"]) == 0
    assert not (run / "checkpoints").exists()  # the old run's checkpoints cannot mix into a later resume
    assert steps(run) == [1, 2, 3] and json.loads((run / "summary.json").read_text())["steps"] == 3
    assert yaml.safe_load((run / "run_config.yaml").read_text())["train"]["max_steps"] == 3
    assert (run / "notes.txt").read_text() == "mine"


def test_resume_refuses_a_different_architecture_and_changes_nothing(run, capsys):
    # The README's sequence: a run made with an override, resumed with the config file alone.
    before = snapshot(run)
    assert main(["--config", TINY, "--out", str(run), "--resume", *SMALL[:3], "model.n_layers=2"]) == 2
    err = capsys.readouterr().err
    assert "model.n_layers: saved 1, requested 2" in err and "model.d_model" in err and "Traceback" not in err
    assert snapshot(run) == before
    assert main(["--resume", "--out", str(run), "data.vocab_size=512", "train.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "data.vocab_size: saved 300, requested 512" in err and "train.lr" in err
    assert snapshot(run) == before


def test_resume_with_a_longer_run_continues_and_records_the_change(run):
    assert main(["--resume", "--out", str(run), "train.max_steps=6", "train.log_every=2"]) == 0
    saved = yaml.safe_load((run / "run_config.yaml").read_text())
    assert saved["train"]["max_steps"] == 6 and saved["train"]["log_every"] == 2 and saved["model"]["n_layers"] == 1
    record = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert record[-1]["from_step"] == 4
    assert record[-1]["changed"] == {"train.log_every": [1, 2], "train.max_steps": [4, 6]}
    assert steps(run) == [1, 2, 3, 4, 6] and json.loads((run / "summary.json").read_text())["steps"] == 6


def test_resume_of_a_finished_run_has_nothing_to_do(run, capsys):
    before = snapshot(run)
    assert main(["--resume", "--out", str(run)]) == 0
    assert "already finished at step 4" in capsys.readouterr().out
    assert snapshot(run) == before


def test_resume_without_a_checkpoint_says_so(run, tmp_path, capsys):
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    assert main(["--resume", "--out", str(run)]) == 2  # finished, but kept no checkpoint
    assert "finished" in (err := capsys.readouterr().err) and "kept no checkpoint" in err
    assert snapshot(run) == before
    shutil.rmtree(run / "final")  # an unfinished run that never wrote a checkpoint
    before = snapshot(run)
    assert main(["--resume", "--out", str(run)]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert snapshot(run) == before
    assert main(["--resume", "--out", str(tmp_path / "empty")]) == 2
    assert "nothing to resume" in capsys.readouterr().err and not (tmp_path / "empty").exists()


def test_resume_and_overwrite_exclude_each_other(run):
    with pytest.raises(SystemExit):
        main(["--resume", "--overwrite", "--out", str(run)])


def test_resume_changes_lists_every_unsafe_difference():
    saved = {"model": {"n_layers": 2}, "train": {"lr": 1e-3, "max_steps": 10}, "run": {"out_dir": "a"}}
    assert resume_changes(saved, {**saved, "train": {"lr": 1e-3, "max_steps": 20}, "run": {"out_dir": "b"}}) == {
        "train.max_steps": [10, 20]}  # a moved folder is not a change
    with pytest.raises(ValueError, match=r"model\.n_layers: saved 2, requested 3.*train\.lr"):
        resume_changes(saved, {**saved, "model": {"n_layers": 3}, "train": {"lr": 1.0, "max_steps": 10}})


def test_truncate_metrics_drops_replayed_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4, 5)) + '{"step": 6, "lo')
    truncate_metrics(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_implausible_dataset_is_refused_before_any_download(tmp_path, capsys):
    assert main(["--config", TINY, "--out", str(tmp_path / "r"), "data.dataset=my_stories"]) == 2
    err = capsys.readouterr().err
    assert "'my_stories' is not an existing file or folder" in err and "owner/name" in err
    assert not (tmp_path / "r").exists()
