"""The `hooked-bilinear` command: one entry point, one subcommand per job.

    hooked-bilinear demo                      build, train (when possible) and inspect a small model
    hooked-bilinear train --config FILE ...   pretrain (training.train)
    hooked-bilinear finetune --config FILE    SwiGLU -> bilinear finetuning (training.finetune)
    hooked-bilinear circuits MODEL_DIR ...    weight-based circuit report (circuits.report)

The dispatcher lives here, in the package every other one depends on, and names its subcommands by
module path: a subcommand's module (and with it ``training`` or ``circuits``) is imported only when
chosen, so ``import hooked_bilinear`` never imports ``training`` and ``--help`` is instant.
``python -m training.cli`` is an alias (the accelerate launch lines use it).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Optional

SUBCOMMANDS = {
    "demo": ("training.demo", "train a tiny bilinear model on the built-in corpus and inspect it"),
    "train": ("training.train", "pretrain a bilinear language model"),
    "finetune": ("training.finetune", "finetune a Llama-architecture SwiGLU model into a bilinear one"),
    "circuits": ("circuits.report", "write a weight-based circuit report for a saved model"),
}

# Files a training run folder holds at its top level; a model folder holds config.json instead.
RUN_FOLDER_MARKERS = ("run_config.yaml", "finetune_config.yaml", "checkpoints", "metrics.jsonl")


def run_folder_message(path: str | Path) -> Optional[str]:
    """A message naming the model folder to use when ``path`` is a training run folder, else None.

    A run folder (``runs/demo/run``) holds the trained model in ``final/`` and resumable checkpoints
    in ``checkpoints/step-*``; tools that load a model need one of those, not the run folder.
    """
    path = Path(path).expanduser()
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    if not any((path / marker).exists() for marker in RUN_FOLDER_MARKERS):
        return None
    if (path / "final" / "config.json").is_file():
        hint = f"its trained model is {path / 'final'}"
    else:
        steps = sorted((path / "checkpoints").glob("step-*")) if (path / "checkpoints").is_dir() else []
        hint = (f"it has no final/ model yet (unfinished run); its newest checkpoint is {steps[-1]}, "
                f"finish it with `hooked-bilinear train --resume --out {path}`" if steps else
                "it has neither a final/ model nor a checkpoint")
    return f"{path} is a training run folder, not a model folder: {hint}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="hooked-bilinear", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(SUBCOMMANDS),
                        help="; ".join(f"{k}: {v[1]}" for k, v in SUBCOMMANDS.items()))
    args = parser.parse_args(argv[:1])
    rest = argv[1:]
    if args.command == "circuits" and rest and not rest[0].startswith("-"):
        message = run_folder_message(rest[0])
        if message:
            print(f"hooked-bilinear circuits: {message}", file=sys.stderr)
            return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
