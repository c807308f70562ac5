"""Alias of ``hooked_bilinear.cli`` so ``python -m training.cli ...`` keeps working.

Older accelerate launch lines run ``-m training.cli train ...``; the
dispatcher itself lives in ``hooked_bilinear.cli`` (the package every other one may import).
"""

from __future__ import annotations

from hooked_bilinear.cli import SUBCOMMANDS, main

__all__ = ["SUBCOMMANDS", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
