"""SIGINT / SIGTERM: stop at the next step boundary with a checkpoint; a second signal aborts at once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.interrupt import TrainingInterrupted

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tinystories-tiny.yaml")
SMALL = ["data.n_train_stories=300", "data.n_valid_stories=20", "data.vocab_size=300", "model.n_layers=1",
         "model.d_model=32", "model.d_head=16", "model.d_mlp=64", "model.n_ctx=32", "train.batch_size=8",
         "train.micro_batch_size=4", "train.eval_every=0", "train.checkpoint_every=0", "train.log_every=1",
         "train.progress_bar=false", "run.n_samples=1", "run.sample_tokens=4"]


def steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_sigterm_checkpoints_names_the_resume_command_and_exits_143(tmp_path, _hermetic_caches):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_CACHE": str(_hermetic_caches / "hf_datasets")}
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "training.train", "--config", TINY, "--out", str(run), *SMALL,
                             "train.max_steps=100000"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not any(s >= 3 for s in steps(run)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what a scheduler sends before pre-emption
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("hooked-bilinear train: stopped by SIGTERM at step ")
    assert last.endswith(f"Resume with: hooked-bilinear train --resume --out {run}")
    checkpoints = sorted((run / "checkpoints").iterdir())  # checkpoint_every=0: only the one the signal wrote
    assert len(checkpoints) == 1 and checkpoints[0].name.startswith("step-")
    stopped = int(checkpoints[0].name.split("-")[1])
    assert stopped >= 3 and steps(run) == list(range(1, stopped + 1)) and not (run / "final").exists()

    result = subprocess.run([sys.executable, "-m", "training.train", "--resume", "--out", str(run),
                             f"train.max_steps={stopped + 2}"], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps(run) == list(range(1, stopped + 3))  # each step once
    assert json.loads((run / "summary.json").read_text())["steps"] == stopped + 2


class SignalAt:
    """Sends this process ``signum`` just before step ``step + 1`` starts, as a user or scheduler would."""

    def __init__(self, step, signum=signal.SIGINT):
        self.step, self.signum = step, signum

    def on_step_start(self, trainer):
        if trainer.state.step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigint_finishes_the_step_then_checkpoints(tmp_path, tokenizer, story_texts):
    from datasets import Dataset

    from hooked_bilinear import HookedBilinearConfig, HookedBilinearTransformer
    from training.data import pack_dataset
    from training.loop import Trainer, make_accelerator
    from training.run_config import TrainConfig

    rows = pack_dataset(Dataset.from_dict({"text": story_texts[:100]}), tokenizer, 32, cache_dir=tmp_path / "packed")
    cfg = TrainConfig(lr=1e-2, warmup_steps=1, batch_size=4, micro_batch_size=4, max_steps=10, eval_every=0,
                      log_every=1, checkpoint_every=0, progress_bar=False)
    model = HookedBilinearTransformer(HookedBilinearConfig(n_layers=1, d_model=32, d_head=16, d_mlp=64, n_ctx=32,
                                                           d_vocab=len(tokenizer)))
    trainer = Trainer(model, cfg, rows, run_dir=tmp_path / "run", accelerator=make_accelerator(cfg),
                      callbacks=[SignalAt(2)])
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.train()
    assert stop.value.step == 3 and stop.value.exit_code == 130  # the step in progress was finished
    assert stop.value.checkpoint == tmp_path / "run" / "checkpoints" / "step-00000003"
    assert (stop.value.checkpoint / "model.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is previous  # handlers restored


ABORT = """
import os, signal, sys, time
from training.interrupt import StopSignals
with StopSignals() as s:
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)   # a repeat at once (a launcher forwarding Ctrl-C): the same request
    time.sleep(0.1)
    print("still running, requested", s.requested, flush=True)
    time.sleep(1.2)
    os.kill(os.getpid(), signal.SIGINT)   # a second Ctrl-C: abort at once
    time.sleep(5)
    print("not reached", flush=True)
"""


def test_a_second_signal_aborts_at_once():
    result = subprocess.run([sys.executable, "-c", ABORT], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 130
    assert "still running, requested 2" in result.stdout and "not reached" not in result.stdout
    assert "aborting now" in result.stderr and "Traceback" not in result.stderr


DDP_SIGNAL_SCRIPT = """
import os, signal, sys, torch
from pathlib import Path
from training.interrupt import TrainingInterrupted
from training.run_config import load_run_config
from training.train import run_training

class SignalRank1:
    # Only rank 1 is signalled (as when a scheduler's SIGTERM reaches one process first).
    def on_step_start(self, trainer):
        if trainer.accelerator.process_index == 1 and trainer.state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

run = load_run_config(sys.argv[1], sys.argv[3:], num_processes=2)
try:
    run_training(run, Path(run.run.out_dir), callbacks=[SignalRank1()])
except TrainingInterrupted as stop:
    rank = os.environ["RANK"]
    Path(sys.argv[2], f"rank{rank}.stopped").write_text(f"{stop.step} {stop.exit_code} {stop.checkpoint}")
    Path(sys.argv[2], f"rank{rank}.group_left").write_text(str(torch.distributed.is_initialized()))
"""


def test_a_signal_on_one_process_stops_every_process_at_the_same_step(tmp_path, _hermetic_caches):
    script = tmp_path / "ddp_signal.py"
    script.write_text(DDP_SIGNAL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_CACHE": str(_hermetic_caches / "hf_datasets"),
           "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    run = tmp_path / "run"
    overrides = [f"run.out_dir={run}", *SMALL, "train.micro_batch_size=2", "train.max_steps=50"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(script), TINY, str(tmp_path), *overrides]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stopped = {r: (tmp_path / f"rank{r}.stopped").read_text().split() for r in (0, 1)}
    assert stopped[0] == stopped[1]  # same step, same checkpoint, on both processes
    assert [(tmp_path / f"rank{r}.group_left").read_text() for r in (0, 1)] == ["False", "False"]
    step, code, checkpoint = stopped[0]
    assert step == "3" and code == "143" and checkpoint == str(run / "checkpoints" / "step-00000003")
    assert sorted(p.name for p in Path(checkpoint).glob("random_states_*")) == ["random_states_0.pkl",
                                                                              "random_states_1.pkl"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003"]  # no temporary left


def test_ctrl_c_outside_the_training_steps_gives_one_line_not_a_traceback(monkeypatch, tmp_path, capsys):
    import training.train as train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. while the corpus is packed

    monkeypatch.setattr(train, "run_training", interrupted)
    assert train.main(["--config", TINY, "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "interrupted outside the training steps" in err and "Traceback" not in err
