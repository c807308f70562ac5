"""The `hooked-bilinear` dispatcher: lives in hooked_bilinear, imports subcommands lazily, and sends a
run folder given where a model folder is expected back with the folder to use."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_importing_the_dispatcher_does_not_import_training_or_circuits():
    code = ("import sys, hooked_bilinear, hooked_bilinear.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('training', 'circuits')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_training_cli_is_an_alias():
    from hooked_bilinear import cli
    from training import cli as alias

    assert alias.main is cli.main


def test_circuits_on_a_run_folder_names_final(tmp_path, capsys):
    from hooked_bilinear.cli import main

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    (run / "run_config.yaml").write_text("model: {}\n")
    assert main(["circuits", str(run), "--target", " kicked"]) == 2
    err = capsys.readouterr().err
    assert "training run folder" in err and str(run / "final") in err and "Traceback" not in err


def test_unfinished_run_folder_names_its_newest_checkpoint(tmp_path):
    from hooked_bilinear.cli import run_folder_message

    run = tmp_path / "run"
    for step in ("step-00000010", "step-00000020"):
        (run / "checkpoints" / step).mkdir(parents=True)
    (run / "run_config.yaml").write_text("model: {}\n")
    message = run_folder_message(run)
    assert "step-00000020" in message and "--resume" in message
    assert run_folder_message(tmp_path) is None  # an ordinary folder is not a run folder


def test_gpu_launch_on_a_machine_without_gpus_is_refused_with_the_command_to_use(monkeypatch, capsys, tmp_path):
    """What `accelerate launch --config_file configs/accelerate/multi_gpu_ddp.yaml ...` sets in each process."""
    import torch

    from training.train import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    config = str(REPO / "configs" / "tinystories-tiny.yaml")
    assert main(["--config", config, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "8-process data-parallel accelerate launch for GPUs" in err and "no GPU" in err
    assert "`hooked-bilinear train <the same arguments>`" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("RANK", "3")  # the other processes stay silent: one message, not eight
    assert main(["--config", config, "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ""


def test_demo_does_not_replace_an_earlier_run_unasked(tmp_path, capsys):
    from training.demo import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run_config.yaml").write_text("model: {}\n")
    assert main(["--out", str(tmp_path)]) == 2
    assert "hooked-bilinear demo --overwrite" in capsys.readouterr().err
    assert [p.name for p in tmp_path.rglob("*")] == ["run", "run_config.yaml"]


def test_demo_reuses_its_own_finished_run(tmp_path):
    from training.demo import _same_finished_run
    from training.run_config import load_run_config
    from training.run_folder import write_config
    from training.demo import CONFIG

    run = tmp_path / "run"
    overrides = [f"run.out_dir={run}"]
    run.mkdir()
    write_config(run, "run_config.yaml", load_run_config(CONFIG, overrides).to_dict())
    assert not _same_finished_run(run, overrides)  # not finished: no final/
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    assert _same_finished_run(run, overrides)
    assert not _same_finished_run(run, overrides + ["train.max_steps=7"])  # another config
