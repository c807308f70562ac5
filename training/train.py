"""``hooked-bilinear train``: pretrain a bilinear language model from a YAML run config.

    hooked-bilinear train --config configs/tinystories-tiny.yaml [section.key=value ...] [--out DIR] [--overwrite]
    hooked-bilinear train --resume --out DIR [train.max_steps=N ...]         (continue a run)
    accelerate launch --num_processes N -m hooked_bilinear.cli train --config ...      (data-parallel)

A folder that holds a run is never overwritten silently: a new run there needs --overwrite, and
--resume continues the run as its saved RUN/run_config.yaml says (``training.run_folder``). Ctrl-C or
SIGTERM stops at the next step with a checkpoint (``training.interrupt``); exit code 130 / 143.

Steps: validate the config (all errors before any work) -> built-in corpus if no dataset is named ->
tokenizer (trained on the training text and saved in RUN/tokenizer if none is named) -> packed
train/validation rows -> model -> ``training.loop.Trainer`` -> RUN/final (``save_pretrained``, with
the tokenizer), RUN/samples.txt, RUN/summary.json. RUN/metrics.jsonl has the per-step metrics.
The unigram entropy of the validation tokens is logged as the baseline a model must beat.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from training.accel import LaunchError
from training.interrupt import TrainingInterrupted, report_stop
from training.run_config import RunConfig, RunConfigError, build_run_config, load_run_config, validate
from training.run_folder import RunFolderError, checkpoint_step, prepare_run_folder, resolve_resume

RUN_CONFIG_NAME = "run_config.yaml"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hooked-bilinear train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML (with --resume: optional; default RUN/run_config.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.n_layers=4 train.lr=3e-4")
    parser.add_argument("--out", help="run directory (overrides run.out_dir)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="delete the run already in --out and start over")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after --out


def _model_defaults() -> dict:
    from hooked_bilinear import HookedBilinearConfig

    return {f.name: f.default for f in dataclasses.fields(HookedBilinearConfig)
            if f.init and f.default is not dataclasses.MISSING}


def _complete(run: RunConfig) -> dict:
    """The run's config with every model default filled in, for comparing a resume with the saved run."""
    full = run.to_dict()
    full["model"] = {k: v for k, v in {**_model_defaults(), **full["model"]}.items() if k != "d_vocab"}
    return full


def resolve_config(args: argparse.Namespace, num_processes: int) -> tuple[RunConfig, Path, dict]:
    """The validated run config, the run directory and (on --resume) the accepted changes to the
    saved config (``training.run_folder.resolve_resume``)."""
    return resolve_resume(args, num_processes, command="train", config_name=RUN_CONFIG_NAME, load=load_run_config,
                          build=build_run_config, validate=validate, comparable=_complete)


# --- data and tokenizer -------------------------------------------------------------------------


def text_source(run: RunConfig) -> Any:
    """The dataset source: the built-in corpus's split files when none is named (named files load
    through ``datasets``' json builder directly, without reading the folder's README as a dataset card)."""
    if run.data.dataset is not None:
        return run.data.dataset
    from training.data import builtin_corpus

    d = run.data
    corpus = builtin_corpus(n_train=d.n_train_stories, n_valid=d.n_valid_stories, seed=d.corpus_seed)
    return {split: str(corpus / f"{split}.jsonl") for split in ("train", "validation")}


def _load_kwargs(run: RunConfig) -> dict:
    return {"name": run.data.dataset_config} if run.data.dataset_config else {}


def get_tokenizer(run: RunConfig, source: Any, run_dir: Path, accelerator: Any) -> Any:
    """The named tokenizer, or one trained on the training text and saved in RUN/tokenizer."""
    from training.tokenizer import load_tokenizer, train_tokenizer

    if run.data.tokenizer is not None:
        return load_tokenizer(run.data.tokenizer)
    tok_dir = run_dir / "tokenizer"
    if accelerator.is_main_process and not (tok_dir / "tokenizer.json").exists():
        from itertools import islice

        from training.data import load_text_dataset

        d = run.data
        texts = load_text_dataset(source, d.train_split, streaming=True, text_column=d.text_column, **_load_kwargs(run))
        docs = (row[d.text_column] for row in islice(iter(texts), d.tokenizer_train_docs))
        train_tokenizer(docs, vocab_size=d.vocab_size, lowercase=d.lowercase, save_dir=tok_dir)
    accelerator.wait_for_everyone()
    return load_tokenizer(tok_dir.resolve())


def get_datasets(run: RunConfig, source: Any, tokenizer: Any, accelerator: Any) -> tuple[Any, Any]:
    """Packed training and validation rows (the main process packs first; others hit its cache)."""
    from training.data import load_packed_dataset

    d, n_ctx = run.data, run.model.get("n_ctx")
    common = dict(text_column=d.text_column, num_proc=d.num_proc, **_load_kwargs(run))
    with accelerator.main_process_first():
        train = load_packed_dataset(source, tokenizer, n_ctx, d.train_split, streaming=d.streaming, **common)
        valid = load_packed_dataset(source, tokenizer, n_ctx, d.eval_split, streaming=d.streaming, **common)
    return train, valid


def unigram_entropy(rows: list[list[int]]) -> float:
    """Entropy (nats) of the predicted tokens' own frequencies: the loss of the best unigram model."""
    counts = Counter(t for row in rows for t in row[1:])
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) if total else float("nan")


# --- the run ------------------------------------------------------------------------------------


def build_model(run: RunConfig, tokenizer: Any) -> Any:
    from hooked_bilinear import HookedBilinearConfig, HookedBilinearTransformer

    model_cfg = dict(run.model)
    model_cfg.setdefault("seed", run.train.seed)  # identical initial weights on every process
    cfg = HookedBilinearConfig(**model_cfg, d_vocab=len(tokenizer))
    return HookedBilinearTransformer(cfg, tokenizer=tokenizer)


def write_samples(model: Any, run: RunConfig, path: Path) -> list[str]:
    """Sampled continuations of the configured prompts, printed and written to ``path``."""
    prompts = list(run.run.sample_prompts)[: run.run.n_samples]
    model.eval()
    samples = [
        model.generate(p, max_new_tokens=run.run.sample_tokens, do_sample=True, temperature=0.7,
                       seed=run.train.seed + i, prepend_bos=True)
        for i, p in enumerate(prompts)
    ]
    path.write_text("\n\n".join(f"[{i}] {s}" for i, s in enumerate(samples)) + "\n")
    return samples


def run_training(run: RunConfig, run_dir: Path, resume: bool = False, callbacks: list = (),
                 overwrite: bool = False, changes: Optional[dict] = None) -> dict:
    """Everything after config validation; returns the summary (also in RUN/summary.json).

    Raises ``RunFolderError`` (before writing anything) when ``run_dir`` holds a run and neither
    ``resume`` nor ``overwrite`` is set, and ``TrainingInterrupted`` when a signal stopped training.
    Under a multi-process launch the process group is destroyed when the run ends (finished or
    stopped): one run per launched process.
    """
    from accelerate.utils import set_seed

    from training.data import token_counts
    from training.accel import process_group_ended
    from training.loop import Trainer, make_accelerator

    start = time.perf_counter()
    accelerator = make_accelerator(run.train)
    with process_group_ended(accelerator):
        log = print if accelerator.is_main_process else (lambda *a, **k: None)
        set_seed(run.train.seed, device_specific=True)  # per-process noise; init uses the model seed
        prepare_run_folder(run_dir, accelerator, command="train", config_name=RUN_CONFIG_NAME, config=run.to_dict(),
                           resume=resume, overwrite=overwrite, changes=changes or {})
        source = text_source(run) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        source = source if source is not None else text_source(run)  # the corpus exists now
        tokenizer = get_tokenizer(run, source, run_dir, accelerator)
        train_rows, valid_rows = get_datasets(run, source, tokenizer, accelerator)
        model = build_model(run, tokenizer)
        # How often each token occurs in the training text: saved with the model (save_pretrained writes
        # it), so weight-based readouts can leave out tokens the model never saw (DESIGN.md section 5).
        model.token_counts = token_counts(train_rows, model.cfg.d_vocab, max_rows=run.data.tokenizer_train_docs)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model: {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}, "
            f"{accelerator.num_processes} process(es), mixed precision {accelerator.mixed_precision}")

        trainer = Trainer(model, run.train, train_rows, valid_rows, run_dir=run_dir, accelerator=accelerator,
                          callbacks=callbacks, eval_rows=run.data.eval_sequences)
        eval_rows = trainer.eval_tokens.tolist() if trainer.eval_tokens is not None else []
        baseline = unigram_entropy(eval_rows)
        log(f"validation unigram entropy (baseline loss): {baseline:.4f} nats; "
            f"{trainer.total_steps} steps of {trainer.tokens_per_step:,} tokens")
        state = trainer.train(resume=resume)
        final_loss = trainer.evaluate()

        summary = {"final_eval_loss": final_loss, "unigram_entropy": baseline, "steps": state.step,
                   "tokens_seen": state.tokens_seen, "n_params": n_params, "wall_s": time.perf_counter() - start}
        if accelerator.is_main_process:
            raw = trainer.raw_model
            raw.save_pretrained(str(run_dir / "final"))
            for i, sample in enumerate(write_samples(raw, run, run_dir / "samples.txt")):
                log(f"sample {i}: {sample}")
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            log(f"final validation loss {final_loss:.4f} vs unigram baseline {baseline:.4f}; "
                f"model in {run_dir / 'final'}; {summary['wall_s']:.0f} s")
        accelerator.wait_for_everyone()
        return summary


def finished_message(run: RunConfig, run_dir: Path) -> Optional[str]:
    """Why a --resume has nothing to do (the newest checkpoint is the end of a finished run), or None."""
    from hooked_bilinear import HookedBilinearConfig

    from training.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_dir)
    step = checkpoint_step(latest) if latest is not None else None
    n_ctx = HookedBilinearConfig(**{**run.model, "d_vocab": run.data.vocab_size}).n_ctx
    total = run.train.total_steps(run.train.batch_size * n_ctx)
    if step is None or step < total or not (run_dir / "final" / "config.json").is_file():
        return None
    return (f"{run_dir} is already finished at step {step} of {total} (model in {run_dir / 'final'}); "
            f"nothing to do. To train it longer: hooked-bilinear train --resume --out {run_dir} train.max_steps=N")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from training.loop import distributed_state

    run_dir = None  # named in the message of a run stopped by a signal
    try:
        state = distributed_state()
        run, run_dir, changes = resolve_config(args, state.num_processes)
        if args.resume and (done := finished_message(run, run_dir)):
            print(done)
            return 0
        run_training(run, run_dir, resume=args.resume, overwrite=args.overwrite, changes=changes)
    except RunConfigError as err:  # includes run-folder and launch problems; nothing was written
        if int(os.environ.get("RANK", "0")) == 0:
            kind = "" if isinstance(err, (RunFolderError, LaunchError)) else "config error: "
            print(f"hooked-bilinear train: {kind}{err}", file=sys.stderr)
        return 2
    except (TrainingInterrupted, KeyboardInterrupt) as stop:
        return report_stop("train", stop, run_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
