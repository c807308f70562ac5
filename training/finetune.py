"""``hooked-bilinear finetune``: turn a Llama-architecture SwiGLU model into an exactly bilinear one.

    hooked-bilinear finetune --config configs/tinyllama-bilinear.yaml [section.key=value ...] [--out DIR] [--overwrite]
    hooked-bilinear finetune --resume --out DIR [train.max_tokens=N ...]
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m hooked_bilinear.cli finetune --config ...

The run folder is guarded as for ``hooked-bilinear train`` (``training.run_folder``), and Ctrl-C or
SIGTERM stops at the next step with a checkpoint (``training.interrupt``).

Steps (DESIGN.md section 6, the TinyLlama recipe of the original work):

1. validate the config, then check the source checkpoint (``model.checkpoint``: a local folder or a hub
   id) *before any work*: it must be a Hugging Face Llama checkpoint (or this project's format) with a
   SiLU gate - anything else is refused with a message saying what was found;
2. load it as a ``HookedBilinearTransformer`` with ``act_fn="silu"`` and ``gate_beta=1.0`` and
   check its logits against the ``transformers`` model (``model.verify``; the max difference is
   logged and must be below ``model.verify_atol``);
3. train with ``training.loop.Trainer`` while ``training.beta_schedule.BetaSchedule`` anneals beta
   from 1 to 0 over ``beta.anneal_tokens`` (default 30% of the budget), then keeps beta = 0;
   ``beta.schedule: fixed`` keeps it constant instead (the baseline run);
4. at the end, gather the full state dict (``accelerator.get_state_dict``: under FSDP this assembles
   the shards), and on the main process: if beta == 0, fold the gate's 1/2 into ``W_gate``
   (``fold_zero_beta_gate``: act_fn "linear", logits unchanged - the max difference is logged), save
   RUN/final (this project's format) and RUN/final-hf (``LlamaForCausalLM``, ``hidden_act="linear"``,
   reloaded with ``transformers`` and compared). If beta != 0 the model is saved unfolded and the
   summary says so.

RUN/metrics.jsonl has loss, lr, tokens/s and beta per logged step; RUN/summary.json the numbers above.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from training.beta_schedule import BetaSchedule
from training.interrupt import TrainingInterrupted, report_stop
from training.run_config import RunConfigError
from training.run_folder import prepare_run_folder, resolve_resume

from training.finetune_config import (  # noqa: F401  (re-exported: the CLI's configuration API)
    CONFIG_NAME,
    DTYPES,
    SECTIONS,
    FinetuneConfig,
    SourceConfig,
    build_finetune_config,
    load_finetune_config,
    validate_finetune,
)


# --- the source model ---------------------------------------------------------------------------


class SourceModelError(ValueError):
    """The checkpoint cannot be finetuned into a bilinear model (wrong architecture or activation)."""


def check_source(checkpoint: str) -> tuple[Path, str]:
    """(local folder, format) of a finetunable checkpoint; raises ``SourceModelError`` otherwise.

    Reads only config.json (downloading the checkpoint when a hub id is given), so a wrong model is
    refused before any data or weights are touched."""
    from hooked_bilinear.loading import CheckpointError, detect_format, resolve_checkpoint

    try:
        directory = resolve_checkpoint(checkpoint)
        fmt = detect_format(directory)
    except (FileNotFoundError, NotADirectoryError, CheckpointError) as err:
        raise SourceModelError(f"cannot finetune {checkpoint!r}: {err}") from None
    raw = json.loads((directory / "config.json").read_text())
    if fmt == "llama":
        act = raw.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise SourceModelError(
                f"cannot finetune {checkpoint!r}: its MLP activation is hidden_act={act!r}; the beta-gate anneal "
                "starts from a SwiGLU model (hidden_act 'silu')" + (" - this one is already bilinear" if act == "linear" else ""))
        return directory, fmt
    if fmt == "native" and raw.get("act_fn") == "silu":
        return directory, fmt
    what = f"this project's format with act_fn={raw.get('act_fn')!r}" if fmt == "native" else f"format {fmt!r}"
    raise SourceModelError(
        f"cannot finetune {checkpoint!r}: it is {what} (model_type {raw.get('model_type')!r}, architectures "
        f"{raw.get('architectures')}). Finetuning needs a Llama-architecture SwiGLU checkpoint "
        "(LlamaForCausalLM, hidden_act 'silu'), e.g. TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T")


def load_source(directory: Path, tokenizer: Any = True) -> Any:
    """The checkpoint as a float32 ``HookedBilinearTransformer`` with the gate x*sigmoid(beta x) at beta = 1."""
    import torch

    from hooked_bilinear import HookedBilinearTransformer

    model = HookedBilinearTransformer.from_pretrained(str(directory), dtype=torch.float32, tokenizer=tokenizer)
    model.set_gate_beta(1.0)
    return model


def hf_logits(directory: str | Path, tokens: Any) -> Any:
    """float32 logits of ``transformers``' own model for the checkpoint in ``directory`` (CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(input_ids=tokens).logits
    del hf
    return out


def max_diff(a: Any, b: Any) -> float:
    return (a.float() - b.float()).abs().max().item()


# --- the run ------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hooked-bilinear finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"finetune config YAML (with --resume: optional; default RUN/{CONFIG_NAME})")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. beta.schedule=cosine train.lr=2e-4")
    parser.add_argument("--out", help="run directory (overrides run.out_dir)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="delete the run already in --out and start over")
    return parser.parse_intermixed_args(argv)


def resolve_config(args: argparse.Namespace, num_processes: int) -> tuple[FinetuneConfig, Path, dict]:
    """The validated config, the run directory and (on --resume) the accepted changes to the saved
    config (``training.run_folder.resolve_resume``: contradicting settings are refused)."""
    return resolve_resume(args, num_processes, command="finetune", config_name=CONFIG_NAME,
                          load=load_finetune_config, build=build_finetune_config, validate=validate_finetune)


def get_data(ft: FinetuneConfig, tokenizer: Any, seq_len: int, accelerator: Any) -> tuple[Any, Any]:
    """Packed training and validation rows. When the dataset has one split only (eval_split ==
    train_split, e.g. a FineWeb sample), the first ``data.eval_sequences`` rows are held out of training."""
    from datasets import IterableDataset

    from training.train import get_datasets, text_source

    run = dataclasses.replace(ft, model={"n_ctx": seq_len})  # get_datasets reads run.model["n_ctx"]
    source = text_source(run) if accelerator.is_main_process else None  # builds the built-in corpus once
    accelerator.wait_for_everyone()
    source = source if source is not None else text_source(run)
    train, valid = get_datasets(run, source, tokenizer, accelerator)
    if ft.data.eval_split == ft.data.train_split:
        n = ft.data.eval_sequences
        train = train.skip(n) if isinstance(train, IterableDataset) else train.select(range(min(n, len(train)), len(train)))
    return train, valid


def _verify_tokens(trainer: Any, tokenizer: Any, n: int, vocab: int) -> Any:
    """A couple of validation rows, cut to ``n`` positions (CPU), for the logit checks."""
    import torch

    if trainer.eval_tokens is not None and len(trainer.eval_tokens):
        return trainer.eval_tokens[:2, :n].cpu()
    return torch.arange(n).remainder(vocab)[None]


def run_finetune(ft: FinetuneConfig, run_dir: Path, resume: bool = False, callbacks: list = (),
                 overwrite: bool = False, changes: Optional[dict] = None) -> dict:
    """Everything after config validation; returns the summary (also in RUN/summary.json).

    Under a multi-process launch the process group is destroyed when the run ends (finished or
    stopped): one run per launched process.
    """
    import torch
    from accelerate.utils import set_seed

    from hooked_bilinear import HookedBilinearTransformer
    from training.accel import process_group_ended
    from training.loop import Trainer, make_accelerator

    start = time.perf_counter()
    directory, fmt = check_source(ft.model.checkpoint)  # every process: a clear error before any work
    accelerator = make_accelerator(ft.train)
    with process_group_ended(accelerator):
        log = print if accelerator.is_main_process else (lambda *a, **k: None)
        set_seed(ft.train.seed, device_specific=True)
        prepare_run_folder(run_dir, accelerator, command="finetune", config_name=CONFIG_NAME, config=ft.to_dict(),
                           resume=resume, overwrite=overwrite, changes=changes or {})

        tokenizer_arg = ft.data.tokenizer if ft.data.tokenizer is not None else True
        model = load_source(directory, tokenizer=tokenizer_arg)
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise SourceModelError(f"{ft.model.checkpoint!r} has no tokenizer files; "
                                   "name one with data.tokenizer=...")
        if len(tokenizer) > model.cfg.d_vocab:
            raise SourceModelError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                                   f"{model.cfg.d_vocab}")
        seq_len = ft.model.seq_len or model.cfg.n_ctx
        if seq_len > model.cfg.n_ctx:
            raise RunConfigError(f"model.seq_len ({seq_len}) exceeds the model's context ({model.cfg.n_ctx})")
        n_params = sum(p.numel() for p in model.parameters())
        log(f"source {ft.model.checkpoint} ({fmt}): {n_params / 1e6:.1f}M parameters, {model.cfg.n_layers} layers, "
            f"d_model {model.cfg.d_model}, {model.cfg.n_heads} heads / {model.cfg.n_key_value_heads} kv heads, "
            f"d_mlp {model.cfg.d_mlp}, vocab {model.cfg.d_vocab}; {accelerator.num_processes} process(es), "
            f"mixed precision {accelerator.mixed_precision}")
        train_rows, valid_rows = get_data(ft, tokenizer, seq_len, accelerator)

        summary: dict = {"source": ft.model.checkpoint, "n_params": n_params, "seq_len": seq_len}
        cfg_saved = copy.deepcopy(model.cfg)  # for rebuilding the trained model from its (gathered) state dict
        cfg_saved.dtype = torch.float32
        if ft.model.dtype != "float32":
            model.to(getattr(torch, ft.model.dtype))
            model.cfg.dtype = getattr(torch, ft.model.dtype)
        schedule = BetaSchedule(ft.beta)
        trainer = Trainer(model, ft.train, train_rows, valid_rows, run_dir=run_dir, accelerator=accelerator,
                          callbacks=[schedule, *callbacks], eval_rows=ft.data.eval_sequences, seq_len=seq_len)
        check_tokens = _verify_tokens(trainer, tokenizer, min(ft.model.verify_tokens, seq_len), model.cfg.d_vocab)

        if ft.model.verify and fmt == "llama" and not resume and accelerator.is_main_process:
            # The converted model at beta = 1 computes the source model's logits (float32, CPU).
            ours = load_source(directory, tokenizer=False)
            with torch.no_grad():
                diff = max_diff(ours(check_tokens), hf_logits(directory, check_tokens))
            del ours
            summary["conversion_max_abs_diff"] = diff
            log(f"conversion check: max |logits(ours, beta=1) - logits(transformers)| = {diff:.3g} "
                f"over {check_tokens.numel()} positions")
            if diff > ft.model.verify_atol:
                raise SourceModelError(f"the converted model's logits differ from transformers' by {diff:.3g} "
                                       f"(> model.verify_atol={ft.model.verify_atol}); refusing to train")
        accelerator.wait_for_everyone()

        log(f"{trainer.total_steps} steps of {trainer.tokens_per_step:,} tokens "
            f"({trainer.total_steps * trainer.tokens_per_step:,} tokens), "
            f"gradient accumulation {trainer.grad_accum}, "
            f"gradient checkpointing {ft.train.gradient_checkpointing}")
        if not resume:
            trainer.raw_model.set_gate_beta(float(ft.beta.start))
            summary["eval_loss_start"] = trainer.evaluate()
            log(f"validation loss before finetuning (beta={ft.beta.start}): {summary['eval_loss_start']}")
        state = trainer.train(resume=resume)
        final_beta = trainer.raw_model.cfg.gate_beta
        summary.update(final_eval_loss=trainer.evaluate(), final_beta=final_beta, steps=state.step,
                       tokens_seen=state.tokens_seen, anneal_tokens=schedule.anneal_tokens,
                       beta_schedule=ft.beta.schedule)

        # Full (unsharded) weights on the main process: under FSDP every process must take part.
        state_dict = accelerator.get_state_dict(trainer.model)
        if accelerator.is_main_process:
            cfg = copy.deepcopy(cfg_saved)
            cfg.gate_beta, cfg.device = final_beta, None
            final = HookedBilinearTransformer(cfg, tokenizer=tokenizer)
            final.load_state_dict({k: v.detach().cpu() for k, v in state_dict.items()}, strict=True)
            final.eval()
            summary.update(_finish(final, run_dir, check_tokens, log, ft))
            summary["wall_s"] = time.perf_counter() - start
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            log(f"done in {summary['wall_s']:.0f} s: final validation loss {summary['final_eval_loss']}, "
                f"beta {final_beta}; model in {run_dir / 'final'}")
        accelerator.wait_for_everyone()
        return summary


def _finish(model: Any, run_dir: Path, tokens: Any, log: Any, ft: FinetuneConfig) -> dict:
    """Fold (if beta == 0), save RUN/final and RUN/final-hf, check both; returns summary entries."""
    import torch

    out: dict = {}
    with torch.no_grad():
        before = model(tokens)
    if model.cfg.gate_beta == 0.0:
        model.fold_zero_beta_gate()
        with torch.no_grad():
            out["fold_max_abs_diff"] = max_diff(model(tokens), before)
        out["folded"] = True
        log(f"folded the beta=0 gate into W_gate: act_fn {model.cfg.act_fn!r}; max |logits after - before| = "
            f"{out['fold_max_abs_diff']:.3g}")
    else:
        out["folded"] = False
        log(f"beta = {model.cfg.gate_beta} at the end (schedule {ft.beta.schedule!r}): not folding; the model "
            "keeps its x*sigmoid(beta x) gate and is NOT bilinear")
    model.save_pretrained(str(run_dir / "final"))
    from hooked_bilinear.loading.llama import llama_misfits

    if not llama_misfits(model.cfg):
        model.save_pretrained(str(run_dir / "final-hf"), format="hf")
        if ft.model.verify:
            out["hf_export_max_abs_diff"] = max_diff(hf_logits(run_dir / "final-hf", tokens), before)
            log(f"Hugging Face export in {run_dir / 'final-hf'}: max |logits - logits(beta=0 model)| = "
                f"{out['hf_export_max_abs_diff']:.3g}")
    else:
        log(f"no Hugging Face export: {'; '.join(llama_misfits(model.cfg))}")
    prompts = list(ft.run.sample_prompts)[: ft.run.n_samples]
    if prompts and ft.run.sample_tokens:
        samples = [model.generate(p, max_new_tokens=ft.run.sample_tokens, do_sample=True, temperature=0.7,
                                  seed=ft.train.seed + i, prepend_bos=True) for i, p in enumerate(prompts)]
        (run_dir / "samples.txt").write_text("\n\n".join(f"[{i}] {s}" for i, s in enumerate(samples)) + "\n")
        for i, s in enumerate(samples):
            log(f"sample {i}: {s}")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from training.loop import distributed_state

    run_dir = None  # named in the message of a run stopped by a signal
    try:
        state = distributed_state()
        ft, run_dir, changes = resolve_config(args, state.num_processes)
        check_source(ft.model.checkpoint)
        run_finetune(ft, run_dir, resume=args.resume, overwrite=args.overwrite, changes=changes)
    except (RunConfigError, SourceModelError) as err:
        if int(os.environ.get("RANK", "0")) == 0:
            kind = "config error: " if type(err) is RunConfigError else ""
            print(f"hooked-bilinear finetune: {kind}{err}", file=sys.stderr)
        return 2
    except (TrainingInterrupted, KeyboardInterrupt) as stop:
        return report_stop("finetune", stop, run_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
