"""The run folder's guard: a run is never silently overwritten, and a resume continues the saved run.

    contents = run_contents(RUN)                    # the run files a folder already holds
    check_fresh(RUN, overwrite, command)            # refuse training into a run without --overwrite
    changes = resume_changes(saved, requested)      # refuses unsafe differences, lists them

Every check here runs before anything is written, so a refused command changes nothing in the folder.
``--resume`` reads the run's saved config; a requested setting that contradicts it (the model, the
data, the tokenizer, the optimisation) is refused with the list of differences, because the
checkpoint and the tokenizer were made under the saved one. Only settings that do not change what
the saved steps computed are accepted (``SAFE_ON_RESUME``): the run length and how often it logs,
evaluates and checkpoints. Accepted changes are written back into the saved config (so the next
resume continues with them) and recorded in ``RUN/resumes.jsonl``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from training.run_config import RunConfigError

# What training writes into a run folder (train and finetune); --overwrite removes exactly these.
RUN_FILES = ("run_config.yaml", "finetune_config.yaml", "checkpoints", "final", "final-hf", "tokenizer",
             "metrics.jsonl", "summary.json", "samples.txt", "resumes.jsonl")

# Settings a resumed run may change: how long it runs and what it reports, never what it computed.
SAFE_ON_RESUME = frozenset({
    "train.max_steps", "train.max_tokens", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.keep_last", "train.progress_bar", "data.num_proc", "run.out_dir", "run.n_samples",
    "run.sample_tokens", "run.sample_prompts",
})


class RunFolderError(RunConfigError):
    """Training into this folder would overwrite or mix runs; the message says what to do instead."""


def run_contents(run_dir: str | Path) -> list[str]:
    """Names of the run files (``RUN_FILES``) present in ``run_dir``."""
    run_dir = Path(run_dir)
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def check_fresh(run_dir: str | Path, overwrite: bool, command: str) -> None:
    """A new run may go into ``run_dir`` only if it holds no run, or ``overwrite`` says replace it."""
    found = run_contents(run_dir)
    if found and not overwrite:
        raise RunFolderError(
            f"{run_dir} already holds a run ({', '.join(found)}). Continue it with "
            f"`hooked-bilinear {command} --resume --out {run_dir}`, or start over with --overwrite "
            f"(deletes {', '.join(found)}), or choose another --out"
        )


def clear_run(run_dir: str | Path) -> list[str]:
    """Delete the run files of ``run_dir`` (``--overwrite``); other files are left alone."""
    run_dir = Path(run_dir)
    removed = run_contents(run_dir)
    for name in removed:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return removed


def prepare_run_folder(run_dir: Path, accelerator: Any, *, command: str, config_name: str, config: dict,
                       resume: bool, overwrite: bool, changes: dict) -> None:
    """Check the folder on every process, then (main process) clear it, or record the resume.

    All checks finish on every process before anything is written (a barrier separates them), so a
    refused run changes nothing and no process sees another's first writes."""
    if resume:
        step = checkpoint_step(require_checkpoint(run_dir, command))
    else:
        check_fresh(run_dir, overwrite, command)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if overwrite:
            removed = clear_run(run_dir)
            if removed:
                print(f"--overwrite: removed {', '.join(removed)} from {run_dir}")
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume or changes:
            write_config(run_dir, config_name, config)
        if resume:
            if changes:
                print("resume: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
            record_resume(run_dir, step, changes)
    accelerator.wait_for_everyone()


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (one level of sections)."""
    out = {}
    for section, values in config.items():
        for key, value in (values or {}).items():
            out[f"{prefix}{section}.{key}"] = value
    return out


def _same(a: Any, b: Any) -> bool:
    # YAML round trips turn tuples into lists: compare the YAML forms (repr for non-YAML defaults).
    try:
        return yaml.safe_dump(a) == yaml.safe_dump(b)
    except yaml.YAMLError:
        return repr(a) == repr(b)


def resume_changes(saved: dict, requested: dict, safe: frozenset = SAFE_ON_RESUME) -> dict:
    """The requested changes to a saved run config, ``{"section.key": [saved, requested]}``.

    ``saved`` and ``requested`` are complete configs (defaults filled in, so a key left out on one side
    compares by its default); raises ``RunFolderError`` listing every difference outside ``safe``.
    ``run.out_dir`` is never reported: a moved folder is not a change of the run.
    """
    old, new = flatten(saved), flatten(requested)
    changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if not _same(old.get(k), new.get(k))}
    refused = {k: v for k, v in changed.items() if k not in safe}
    if refused:
        lines = "; ".join(f"{k}: saved {a!r}, requested {b!r}" for k, (a, b) in refused.items())
        allowed = ", ".join(sorted(safe - {"run.out_dir"}))
        raise RunFolderError(
            f"--resume continues the run as it was configured, and these settings differ from its saved config: "
            f"{lines}. Resume without them (the saved config is used when --config is left out); only {allowed} "
            "may change on resume. To train with the new settings, start a new run (another --out, or --overwrite)"
        )
    changed.pop("run.out_dir", None)
    return changed


def apply_changes(config: dict, changes: dict) -> dict:
    """A copy of ``config`` with ``{"section.key": [old, new]}`` changes applied."""
    out = {section: dict(values or {}) for section, values in config.items()}
    for key, (_, new) in changes.items():
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = new
    return out


def saved_config(run_dir: str | Path, name: str, command: str) -> dict:
    """The config a run saved when it started (``RUN/<name>``); raises ``RunFolderError`` if none."""
    path = Path(run_dir) / name
    if not path.is_file():
        has = run_contents(run_dir)
        raise RunFolderError(
            f"nothing to resume in {run_dir}: it has no {name}"
            + (f" (it holds {', '.join(has)})" if has else "")
            + f". Start a run there with `hooked-bilinear {command} --config FILE --out {run_dir}`"
        )
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise RunFolderError(f"{path} is not a run config (expected a mapping of sections)")
    return raw


def resolve_resume(args: Any, num_processes: int, *, command: str, config_name: str, load: Any, build: Any,
                   validate: Any, comparable: Any = None) -> tuple[Any, Path, dict]:
    """The validated config, the run directory and (on --resume) the accepted changes to the saved
    config, shared by ``train`` and ``finetune``. load(path, overrides, num_processes) reads and
    validates a new run's config; build(dict) makes a config object; validate(config, num_processes)
    checks it; comparable(config) -> dict is what a resume is compared on (default: ``to_dict()``).
    Only reads files; raises RunConfigError (RunFolderError for run-folder problems)."""
    from training.run_config import read_config

    comparable = comparable or (lambda config: config.to_dict())
    overrides = list(args.overrides) + ([f"run.out_dir={args.out}"] if args.out else [])
    if not args.resume:
        if args.config is None:
            raise RunConfigError("--config is required (or --resume --out RUN to continue a run)")
        config = load(args.config, overrides, num_processes=num_processes)
        return config, Path(config.run.out_dir), {}
    if args.out is None and args.config is None:
        raise RunConfigError("--resume needs the run folder: --resume --out RUN")
    run_dir = Path(args.out) if args.out else Path(build(read_config(args.config, overrides)).run.out_dir)
    saved = build(saved_config(run_dir, config_name, command))
    requested = build(read_config(args.config or run_dir / config_name, overrides))
    requested.run.out_dir = str(run_dir)
    changes = resume_changes(comparable(saved), comparable(requested))
    config = build(apply_changes(saved.to_dict(), {**changes, "run.out_dir": [None, str(run_dir)]}))
    validate(config, num_processes)
    require_checkpoint(run_dir, command)
    return config, run_dir, changes


def require_checkpoint(run_dir: str | Path, command: str) -> Path:
    """The newest checkpoint, or ``RunFolderError`` saying there is none to resume from."""
    from training.checkpoint import latest_checkpoint

    found = latest_checkpoint(run_dir)
    if found is None and (Path(run_dir) / "final").is_dir():
        raise RunFolderError(
            f"--resume: the run in {run_dir} finished (its model is in {Path(run_dir) / 'final'}) and kept no "
            "checkpoint (train.checkpoint_every was 0), so it cannot be continued; to train longer, start a new "
            "run with train.checkpoint_every > 0"
        )
    if found is None:
        raise RunFolderError(
            f"--resume: {run_dir} has no checkpoint to resume from (the run wrote none: train.checkpoint_every "
            f"is 0 and it was not interrupted by a signal, or it stopped before its first checkpoint). "
            f"Start it over with `hooked-bilinear {command} --overwrite --out {run_dir}` (with its --config)"
        )
    return found


def checkpoint_step(path: Path) -> Optional[int]:
    """The optimizer step a checkpoint holds (from its ``trainer_state.json``), or None."""
    try:
        return int(json.loads((path / "trainer_state.json").read_text())["state"]["step"])
    except (OSError, KeyError, ValueError):
        return None


def write_config(run_dir: str | Path, name: str, config: dict) -> None:
    """Write ``RUN/<name>`` atomically (a crash never leaves a half-written record of the run)."""
    path = Path(run_dir) / name
    tmp = path.with_name(f".{name}.tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, path)


def record_resume(run_dir: str | Path, step: int, changes: dict) -> None:
    """Append one line to ``RUN/resumes.jsonl``: when, from which step, which settings changed."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from_step": step, "changed": changes}
    with open(Path(run_dir) / "resumes.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop lines of a metrics JSONL file logged after ``step`` (they are about to be replayed)."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
    if len(keep) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


def _step_of(line: str) -> Optional[int]:
    # A line cut short by a crash is not valid JSON: it is dropped with the replayed steps.
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return None
