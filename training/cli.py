"""The `hooked-bilinear` command: one entry point, one subcommand per job.

    hooked-bilinear demo                      build, train (when possible) and inspect a small model
    hooked-bilinear train --config FILE ...   pretrain (training.train)
    hooked-bilinear finetune --config FILE    SwiGLU -> bilinear finetuning (training.finetune)
    hooked-bilinear circuits MODEL_DIR ...    weight-based circuit report (circuits.report)

Subcommands import their modules only when chosen, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("training.demo", "build a small bilinear model and print a residual-stream decomposition"),
    "train": ("training.train", "pretrain a bilinear language model"),
    "finetune": ("training.finetune", "finetune a Llama-architecture SwiGLU model into a bilinear one"),
    "circuits": ("circuits.report", "write a weight-based circuit report for a saved model"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="hooked-bilinear", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in SUBCOMMANDS.items()))
    args, rest = parser.parse_known_args(argv[:1])
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
