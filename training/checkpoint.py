"""Atomic training checkpoints through accelerate's ``save_state`` / ``load_state``.

Layout of a run directory::

    RUN/checkpoints/step-00000300/   model, optimizer, scheduler, RNG of every process, and every
                                     object registered with ``accelerator.register_for_checkpointing``
                                     (the trainer state: step, tokens seen, data position, extras
                                     such as a gate beta), plus ``trainer_state.json`` for humans
    RUN/checkpoints/.tmp-step-.../   a checkpoint being written; never read, removed on the next save

A checkpoint is written into the temporary folder and renamed into place with ``os.replace`` only
when every process has finished writing, so a run killed mid-save leaves the previous checkpoint
intact and ``latest_checkpoint`` never returns a half-written one. Only the newest ``keep_last``
are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

PATTERN = re.compile(r"^step-(\d{8})$")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """Where checkpoint ``step`` of a run lives (complete or not)."""
    return checkpoints_dir(run_dir) / f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    accelerator: Any, run_dir: str | Path, step: int, keep_last: int = 2, info: Optional[dict] = None
) -> Path:
    """Save the accelerator's full state as checkpoint ``step``; every process must call this.

    ``info`` (JSON-able) is written to ``trainer_state.json`` for people and tools; the state that
    resuming uses travels through accelerate's registered objects.
    """
    root = checkpoints_dir(run_dir)
    final = checkpoint_path(run_dir, step)
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    tmp.mkdir(parents=True, exist_ok=True)  # all ranks write their RNG files here
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if info is not None:
            (tmp / "trainer_state.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        if final.exists():  # the same step saved again (e.g. after resuming from it)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(run_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def _prune(run_dir: str | Path, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(accelerator: Any, path: str | Path) -> None:
    """Restore model, optimizer, scheduler, RNG and registered objects from ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    accelerator.load_state(str(path))
