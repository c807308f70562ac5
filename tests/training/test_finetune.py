"""`hooked-bilinear finetune`: SwiGLU Llama -> exactly bilinear, on a tiny random TinyLlama-shaped model.

The source is a `transformers.LlamaForCausalLM` with TinyLlama's structure (grouped-query attention,
untied embeddings, rope theta 10000, SiLU), random weights, saved with `save_pretrained` together with
a small tokenizer; the data are the built-in story corpus. Everything is offline and on the CPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.beta_schedule import BetaConfig, beta_at
from training.finetune import SourceModelError, check_source, load_finetune_config, load_source, main, run_finetune
from training.run_config import RunConfigError

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "finetune-tiny.yaml")



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is fastest, and avoids OpenMP spin contention on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer):
    """A random LlamaForCausalLM shaped like TinyLlama (GQA 4:2, untied, theta 1e4, silu) + tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, hidden_act="silu",
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=0.2,  # large enough that the gate's nonlinearity matters
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def overrides(checkpoint, out, **extra):
    base = {"model.checkpoint": str(checkpoint), "run.out_dir": str(out), "data.n_train_stories": 300,
            "data.n_valid_stories": 20, "train.max_steps": 10, "train.checkpoint_every": 0, "train.eval_every": 0,
            "train.log_every": 1, "run.n_samples": 0}
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def tokens(n=24, batch=2, vocab=500):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(1))


# --- the beta schedule --------------------------------------------------------------------------


def test_linear_beta_schedule_values():
    cfg = BetaConfig()  # linear 1 -> 0 over 30% of the budget
    budget = 1000
    anneal = cfg.resolve_anneal_tokens(budget)
    assert anneal == 300
    assert [beta_at(t, cfg, anneal) for t in (0, 150, 300, 500)] == [1.0, 0.5, 0.0, 0.0]
    assert beta_at(75, cfg, anneal) == pytest.approx(0.75) and beta_at(10**9, cfg, anneal) == 0.0
    assert BetaConfig(anneal_tokens=120).resolve_anneal_tokens(400) == 120


def test_other_beta_schedules_and_fixed():
    cos, step = BetaConfig(schedule="cosine"), BetaConfig(schedule="step", n_steps=4)
    assert beta_at(0, cos, 300) == 1.0 and beta_at(150, cos, 300) == pytest.approx(0.5) and beta_at(300, cos, 300) == 0.0
    assert beta_at(50, cos, 300) > 0.75  # cosine starts slowly
    assert [beta_at(t, step, 300) for t in (0, 74, 75, 150, 299, 300)] == [1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    for start in (1.0, 0.5):
        fixed = BetaConfig(schedule="fixed", start=start)
        assert {beta_at(t, fixed, 300) for t in (0, 150, 300, 10**6)} == {start}
    for bad in (dict(schedule="exp"), dict(start=-1.0), dict(anneal_fraction=0.0), dict(anneal_tokens=0)):
        with pytest.raises(ValueError):
            BetaConfig(**bad).validate()


def test_config_validation_names_the_key(tiny_llama, tmp_path):
    ft = load_finetune_config(TINY, overrides(tiny_llama, tmp_path / "run"))
    assert ft.beta.schedule == "linear" and ft.beta.anneal_fraction == 0.3 and ft.model.checkpoint == str(tiny_llama)
    shipped = load_finetune_config(REPO / "configs" / "tinyllama-bilinear.yaml", num_processes=8)
    assert shipped.train.max_tokens == 400_000_000 and shipped.beta.anneal_tokens == 120_000_000
    assert shipped.train.gradient_checkpointing and shipped.train.mixed_precision == "bf16"
    for override, key in [("beta.schedule=exp", "beta.schedule"), ("beta.start=-1", "beta.start"),
                          ("model.dtype=int8", "model.dtype"), ("beta.anneal_tokenz=3", "beta.anneal_tokenz"),
                          ("train.batch_size=7", "train.batch_size"), ("model.seq_len=0", "model.seq_len")]:
        with pytest.raises(RunConfigError, match=key.replace(".", r"\.")):
            load_finetune_config(TINY, overrides(tiny_llama, tmp_path) + [override])


# --- conversion and refusal ---------------------------------------------------------------------


def test_beta_one_logits_equal_the_hf_model(tiny_llama):
    from transformers import LlamaForCausalLM

    ours = load_source(tiny_llama)
    assert ours.cfg.act_fn == "silu" and ours.cfg.gate_beta == 1.0 and ours.cfg.n_key_value_heads == 2
    assert not ours.cfg.tie_embeddings and ours.cfg.rotary_base == 10000.0 and ours.tokenizer is not None
    hf = LlamaForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    x = tokens()
    with torch.no_grad():
        ref, got = hf(input_ids=x).logits, ours(x)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        ours.set_gate_beta(0.0)  # the gate matters: beta = 0 is a different function
        assert (ours(x) - ref).abs().max() > 1e-2


def test_non_llama_checkpoints_are_refused_before_any_work(tmp_path, capsys, tiny_llama):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32)).save_pretrained(str(gpt2))
    out = tmp_path / "run"
    assert main(["--config", TINY, *overrides(gpt2, out)]) == 2
    err = capsys.readouterr().err
    assert "Llama" in err and "gpt2" in err.lower() and not out.exists()
    with pytest.raises(SourceModelError, match="Llama"):
        check_source(str(gpt2))

    linear = tmp_path / "linear"  # already bilinear: nothing to anneal
    linear.mkdir()
    raw = json.loads((tiny_llama / "config.json").read_text())
    (linear / "config.json").write_text(json.dumps({**raw, "hidden_act": "linear"}))
    with pytest.raises(SourceModelError, match="already bilinear"):
        check_source(str(linear))
    assert main(["--config", TINY, *overrides(tmp_path / "no-such-folder", out)]) == 2
    assert "no-such-folder" in capsys.readouterr().err and not out.exists()


# --- end to end -------------------------------------------------------------------------------


def test_finetune_folds_into_an_exactly_bilinear_model(tiny_llama, tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from hooked_bilinear import HookedBilinearTransformer

    out = tmp_path / "run"
    assert main(["--config", TINY, *overrides(tiny_llama, out, **{"train.checkpoint_every": 10})]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["conversion_max_abs_diff"] < 1e-4
    assert summary["final_beta"] == 0.0 and summary["folded"] is True and summary["fold_max_abs_diff"] < 1e-5
    assert summary["hf_export_max_abs_diff"] < 1e-4 and summary["steps"] == 10
    assert summary["final_eval_loss"] < summary["eval_loss_start"]

    # Beta per step: linear from 1 over 30% of the 10 x 8 x 32 tokens, then exactly 0.
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    betas = [l["beta"] for l in lines]
    assert betas[0] == 1.0 and betas == sorted(betas, reverse=True) and betas[3:] == [0.0] * 7
    assert betas[1] == pytest.approx(1 - 256 / 768) and all("tokens_per_s" in l for l in lines)

    # The beta = 0 model is the last checkpoint's weights with the gate x * sigmoid(0 x).
    beta0 = load_source(tiny_llama, tokenizer=False)
    beta0.load_state_dict(load_file(str(out / "checkpoints" / "step-00000010" / "model.safetensors")))
    beta0.set_gate_beta(0.0)
    final = HookedBilinearTransformer.from_pretrained(str(out / "final"))
    assert final.cfg.act_fn == "linear" and final.cfg.gate_beta is None and final.tokenizer is not None
    hf_cfg = json.loads((out / "final-hf" / "config.json").read_text())
    assert hf_cfg["hidden_act"] == "linear" and hf_cfg["architectures"] == ["LlamaForCausalLM"]
    hf = LlamaForCausalLM.from_pretrained(str(out / "final-hf"), dtype=torch.float32).eval()
    x = tokens()
    with torch.no_grad():
        ref = beta0(x)
        torch.testing.assert_close(final(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hf(input_ids=x).logits, ref, atol=1e-4, rtol=1e-4)
        assert (HookedBilinearTransformer.from_pretrained(str(tiny_llama))(x) - ref).abs().max() > 1e-3  # it trained

    # Resuming a finished run (its own saved config) restores the last checkpoint and re-exports.
    assert main(["--resume", "--out", str(out)]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["final_eval_loss"] == summary["final_eval_loss"] and again["folded"] is True


def test_fixed_beta_baseline_is_not_folded(tiny_llama, tmp_path):
    out = tmp_path / "run"
    assert main(["--config", TINY, *overrides(tiny_llama, out, **{"beta.schedule": "fixed", "train.max_steps": 2,
                                                                   "model.verify": "false"})]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_beta"] == 1.0 and summary["folded"] is False
    assert json.loads((out / "final-hf" / "config.json").read_text())["hidden_act"] == "silu"  # plain SwiGLU


class StopAt:
    def __init__(self, step):
        self.step = step

    def on_step_start(self, trainer):
        if trainer.state.step == self.step:
            raise KeyboardInterrupt


class Record:
    def __init__(self):
        self.at_start = None

    def on_train_start(self, trainer):
        self.at_start = (dict(trainer.state.extra), trainer.raw_model.cfg.gate_beta)


def test_resume_mid_anneal_equals_uninterrupted(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    extra = {"train.max_steps": 8, "train.checkpoint_every": 3, "beta.anneal_fraction": 0.75}  # anneal: 6 steps
    full_ft = load_finetune_config(TINY, overrides(tiny_llama, tmp_path / "full", **extra))
    full = run_finetune(full_ft, tmp_path / "full")
    cut_ft = load_finetune_config(TINY, overrides(tiny_llama, tmp_path / "cut", **extra))
    with pytest.raises(KeyboardInterrupt):
        run_finetune(cut_ft, tmp_path / "cut", callbacks=[StopAt(4)])
    record = Record()
    resumed = run_finetune(cut_ft, tmp_path / "cut", resume=True, callbacks=[record])

    # Restored mid-anneal, exactly the beta the uninterrupted run used for step 3.
    full_lines = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    extra_at_start, model_beta = record.at_start
    assert 0.0 < extra_at_start["beta"] < 1.0 and extra_at_start["beta"] == full_lines[2]["beta"] == model_beta
    assert resumed["final_beta"] == full["final_beta"] == 0.0 and resumed["tokens_seen"] == full["tokens_seen"]
    assert resumed["final_eval_loss"] == full["final_eval_loss"]
    cut_lines = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    by_step = {l["step"]: l["beta"] for l in cut_lines}  # step 4 was logged twice (before the cut and after)
    assert [by_step[s] for s in range(1, 9)] == [l["beta"] for l in full_lines]
    a, b = load_file(str(tmp_path / "full" / "final" / "model.safetensors")), load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


DDP_SCRIPT = """
import hashlib, os, sys, torch
from pathlib import Path
from training.finetune import load_finetune_config, run_finetune

class Checksum:
    def on_train_end(self, trainer):
        blob = b"".join(p.detach().cpu().numpy().tobytes() for p in trainer.raw_model.parameters())
        rank = trainer.accelerator.process_index
        Path(sys.argv[2], f"rank{rank}.sha256").write_text(hashlib.sha256(blob).hexdigest())
        Path(sys.argv[2], f"rank{rank}.beta").write_text(repr(trainer.raw_model.cfg.gate_beta))
        Path(sys.argv[2], f"rank{rank}.world").write_text(str(trainer.accelerator.num_processes))

ft = load_finetune_config(sys.argv[1], sys.argv[3:], num_processes=2)
run_finetune(ft, Path(ft.run.out_dir), callbacks=[Checksum()])
# the run destroys its process group: one left to interpreter shutdown can abort the process
Path(sys.argv[2], f"rank{os.environ['RANK']}.group_left").write_text(str(torch.distributed.is_initialized()))
"""


def test_two_process_finetune_leaves_identical_weights(tiny_llama, tmp_path, _hermetic_caches):
    script = tmp_path / "ddp_finetune.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_CACHE": str(_hermetic_caches / "hf_datasets"),
           "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    args = overrides(tiny_llama, tmp_path / "run", **{"train.batch_size": 8, "train.micro_batch_size": 2,
                                                      "train.max_steps": 4, "train.checkpoint_every": 2})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(script), TINY, str(tmp_path), *args]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "rank0.world").read_text() == "2"
    assert (tmp_path / "rank0.sha256").read_text() == (tmp_path / "rank1.sha256").read_text()
    assert (tmp_path / "rank0.beta").read_text() == (tmp_path / "rank1.beta").read_text() == "0.0"
    assert [(tmp_path / f"rank{r}.group_left").read_text() for r in (0, 1)] == ["False", "False"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["folded"] and summary["fold_max_abs_diff"] < 1e-5 and summary["hf_export_max_abs_diff"] < 1e-4
    betas = [json.loads(l)["beta"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert betas[0] == 1.0 and 0.0 < betas[1] < 1.0 and betas[-1] == 0.0
