"""The training loop: learning, exact resume, data-parallel agreement, schedule and decay groups."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from hooked_bilinear import HookedBilinearConfig, HookedBilinearTransformer
from training.data import pack_dataset
from training.loop import Trainer, lr_multiplier, make_accelerator, param_groups
from training.run_config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
N_CTX = 32



@pytest.fixture(scope="module")
def rows(story_texts, tokenizer, tmp_path_factory):
    packed = pack_dataset(Dataset.from_dict({"text": story_texts}), tokenizer, N_CTX,
                          cache_dir=tmp_path_factory.mktemp("packed"))
    return packed.select(range(40)), packed.select(range(len(packed) - 16, len(packed)))


def tiny_model(tokenizer, seed=0):
    cfg = HookedBilinearConfig(n_layers=2, d_model=32, d_head=16, d_mlp=64, n_ctx=N_CTX,
                               d_vocab=len(tokenizer), seed=seed)
    return HookedBilinearTransformer(cfg, tokenizer=tokenizer)


def train_cfg(**kw):
    base = dict(lr=1e-2, warmup_steps=2, batch_size=8, micro_batch_size=4, max_steps=6, eval_every=0,
                log_every=1, checkpoint_every=3, keep_last=2, progress_bar=False, seed=3)
    return TrainConfig(**{**base, **kw})


class BetaSchedule:
    """What finetuning does: set a scalar from tokens seen before each step, keep it in the state."""

    def __init__(self, budget):
        self.budget = budget

    def on_step_start(self, trainer):
        trainer.state.extra["beta"] = max(0.0, 1.0 - trainer.state.tokens_seen / self.budget)

    def on_step_end(self, trainer, metrics):
        if metrics:
            metrics["beta"] = trainer.state.extra["beta"]


class StopAt:
    """Simulates a crash: raise before step `step + 1` starts."""

    def __init__(self, step):
        self.step = step

    def on_step_start(self, trainer):
        if trainer.state.step == self.step:
            raise KeyboardInterrupt


def run(tokenizer, rows, run_dir, cfg, callbacks=(), resume=False):
    trainer = Trainer(tiny_model(tokenizer), cfg, rows[0], rows[1], run_dir=run_dir,
                      accelerator=make_accelerator(cfg), callbacks=callbacks)
    trainer.train(resume=resume)
    return trainer


def test_a_few_steps_reduce_the_loss(tokenizer, rows, tmp_path):
    cfg = train_cfg(max_steps=12, checkpoint_every=0, batch_size=4, micro_batch_size=4, warmup_steps=1)
    trainer = Trainer(tiny_model(tokenizer), cfg, rows[0], rows[1], run_dir=tmp_path, accelerator=make_accelerator(cfg))
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after < before - 1.0, (before, after)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 13))
    assert {"loss", "lr", "tokens_per_s", "tokens_seen"} <= set(lines[0]) and "eval_loss" in lines[-1]
    assert lines[-1]["tokens_seen"] == 12 * 4 * N_CTX


def test_interrupt_and_resume_equals_uninterrupted(tokenizer, rows, tmp_path):
    # Noise regularisers (RNG), accumulation, and an epoch boundary (40 rows = 10 micro-batches) after
    # the checkpoint at step 3: all must replay exactly.
    cfg = train_cfg(input_noise=0.1, latent_noise=0.1)
    full = run(tokenizer, rows, tmp_path / "full", cfg, callbacks=[BetaSchedule(2000)])
    with pytest.raises(KeyboardInterrupt):
        run(tokenizer, rows, tmp_path / "cut", cfg, callbacks=[BetaSchedule(2000), StopAt(4)])
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-00000003"]
    resumed = run(tokenizer, rows, tmp_path / "cut", cfg, callbacks=[BetaSchedule(2000)], resume=True)

    assert resumed.state.step == full.state.step == 6 and resumed.state.epoch == full.state.epoch == 1
    assert resumed.state.tokens_seen == full.state.tokens_seen
    assert resumed.state.extra == full.state.extra  # exact: the saved scalar round-trips
    for (name, a), (_, b) in zip(full.raw_model.named_parameters(), resumed.raw_model.named_parameters()):
        assert torch.equal(a, b), name  # bit-identical on CPU (training.accel.deterministic_kernels)
    # The crash came after steps 4's log line; the resume replayed step 4: logged once.
    logged = [json.loads(l)["step"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 7))
    # keep_last=2: both checkpoints of the resumed run remain, no temporary folders.
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]


def test_checkpoint_restores_extra_state(tokenizer, rows, tmp_path):
    cfg = train_cfg(max_steps=3)
    trainer = run(tokenizer, rows, tmp_path, cfg, callbacks=[BetaSchedule(1234.5)])
    beta = trainer.state.extra["beta"]
    fresh = Trainer(tiny_model(tokenizer, seed=9), cfg, rows[0], run_dir=tmp_path, accelerator=make_accelerator(cfg))
    assert fresh.resume() and fresh.state.extra["beta"] == beta and fresh.state.step == 3
    for a, b in zip(trainer.raw_model.parameters(), fresh.raw_model.parameters()):
        assert torch.equal(a, b)


def test_lr_schedule_warmup_then_decay():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1, schedule="cosine")
    f = lr_multiplier(cfg, 14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(14) == pytest.approx(0.1) and f(9) == pytest.approx(0.55)
    lin = lr_multiplier(TrainConfig(warmup_steps=0, min_lr_ratio=0.0, schedule="linear"), 10)
    assert lin(5) == pytest.approx(0.5)


def test_weight_decay_skips_norms_biases_embeddings(tokenizer):
    model = tiny_model(tokenizer)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "embed.W_E" in skipped and "blocks.0.ln1.w" in skipped
    assert all(n == "embed.W_E" or dict(model.named_parameters())[n].ndim == 1 for n in skipped)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} >= {"blocks.0.mlp.W_gate", "blocks.0.attn.W_Q", "unembed.W_U"}


DDP_SCRIPT = """
import hashlib, os, sys, torch
from pathlib import Path
from training.run_config import load_run_config
from training.train import run_training

class Checksum:
    def on_train_end(self, trainer):
        blob = b"".join(p.detach().cpu().numpy().tobytes() for p in trainer.raw_model.parameters())
        rank = trainer.accelerator.process_index
        Path(sys.argv[2], f"rank{rank}.sha256").write_text(hashlib.sha256(blob).hexdigest())
        Path(sys.argv[2], f"rank{rank}.world").write_text(str(trainer.accelerator.num_processes))

run = load_run_config(sys.argv[1], sys.argv[3:], num_processes=2)
run_training(run, Path(run.run.out_dir), callbacks=[Checksum()])
Path(sys.argv[2], f"rank{os.environ['RANK']}.group_left").write_text(str(torch.distributed.is_initialized()))
"""


def test_two_process_data_parallel_run_ends_identical_on_both_ranks(tmp_path, _hermetic_caches):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_CACHE": str(_hermetic_caches / "hf_datasets"),
           "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    overrides = [f"run.out_dir={tmp_path / 'run'}", "data.n_train_stories=200", "data.n_valid_stories=20",
                 "data.vocab_size=300", "model.n_layers=1", "model.d_model=32", "model.d_head=16", "model.d_mlp=64",
                 "model.n_ctx=32", "train.batch_size=8", "train.micro_batch_size=2", "train.max_steps=4",
                 "train.eval_every=2", "train.checkpoint_every=2", "train.warmup_steps=1", "train.progress_bar=false",
                 "train.input_noise=0.1", "run.n_samples=1", "run.sample_tokens=4"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(script), str(REPO / "configs" / "tinystories-tiny.yaml"), str(tmp_path), *overrides]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "rank0.world").read_text() == "2"
    assert (tmp_path / "rank0.sha256").read_text() == (tmp_path / "rank1.sha256").read_text()
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert [(tmp_path / f"rank{r}.group_left").read_text() for r in (0, 1)] == ["False", "False"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "step-00000004").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
