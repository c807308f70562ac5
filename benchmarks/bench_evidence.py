"""What weight-only token evidence costs at a realistic size, and what each part of the method adds.

`circuits.evidence.token_evidence` runs the virtual context for every live token at 16 placements
(and per head, for the top tokens' carriers). Each head's output is averaged over the typical
competitors it may see (`circuits.competitors`): one draw is a closed form, 15 independent draws
(the default) a quadrature per row and head over every (free offset, token) pair of the window. By
default keys and competitors are read through their context embeddings (`circuits.context_view`,
built once per model and reusable across targets). Rows, side by side on the same random model:

  one-token view, 1 draw      keys read alone, one competitor (the cheapest reading)
  one-token view, 15 draws    keys read alone, the default competitors
  context view, 15 draws      the default: building the context view, then token_evidence with it

A second table times building the views alone (--views-only skips the first): the one-token view
without and with the pair chain that places tokens (`circuits.pair_chain`, the default), and the
context view on top of it.

    python benchmarks/bench_evidence.py                 # 6 layers, d_model 512, 500 live tokens
    python benchmarks/bench_evidence.py --live 200 --layers 2
    python benchmarks/bench_evidence.py --views-only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchstats import default_out  # noqa: E402
from circuits.context_view import context_view  # noqa: E402
from circuits.evidence import token_evidence  # noqa: E402
from circuits.token_view import token_view  # noqa: E402
from hooked_bilinear import HookedBilinearConfig, HookedBilinearTransformer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--live", type=int, default=500, help="live tokens (the rest of the 4096 never occur)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=default_out("bench_evidence"), help="markdown table (default: untracked)")
    p.add_argument("--views-only", action="store_true", help="time building the views, not token_evidence")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    cfg = HookedBilinearConfig(d_model=args.d_model, d_head=64, n_layers=args.layers, n_ctx=256, d_vocab=4096,
                               d_mlp=4 * args.d_model, seed=0)
    model = HookedBilinearTransformer(cfg).eval()
    counts = torch.zeros(cfg.d_vocab, dtype=torch.long)
    counts[:args.live] = torch.randint(1, 100, (args.live,), generator=torch.Generator().manual_seed(0))
    model.token_counts = counts
    view = token_view(model)
    header = [f"`python benchmarks/bench_evidence.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
              f"{args.layers} layers, d_model {args.d_model}, {args.live} live tokens, {args.threads} threads", ""]
    lines = header + _view_table(model, view) + [""]
    if args.views_only:
        return _write(args.out, lines)
    rows = []

    def timed(label, make_view, competitors):
        start = time.perf_counter()
        used = make_view()
        built = time.perf_counter() - start
        token_evidence(model, (5, [6, 7]), view=used, competitors=competitors, n_pairs=5)
        rows.append((label, built, time.perf_counter() - start))
        print(f"{label}: {rows[-1][2]:.1f} s (view {built:.1f} s)", flush=True)

    timed("one-token view, 1 draw", lambda: view, 1.0)
    timed("one-token view, 15 draws", lambda: view, 15.0)
    timed("context view, 15 draws (the default)", lambda: context_view(model, view=view, competitors=15.0), 15.0)
    lines += ["token_evidence:", "", "| reading | seconds (of which building the view) | ratio to the first row |", "|---|---|---|"]
    lines += [f"| {label} | {sec:.1f} ({built:.1f}) | {sec / rows[0][2]:.2f} |" for label, built, sec in rows]
    return _write(args.out, lines)


def _view_table(model, view) -> list[str]:
    """Seconds to build each view, side by side."""
    rows = []
    for label, build in (("one-token view, no pair chain", lambda: token_view(model, pair_branching=0)),
                         ("one-token view with the pair chain (the default)", lambda: token_view(model)),
                         ("context view, on a given one-token view", lambda: context_view(model, view=view))):
        start = time.perf_counter()
        build()
        rows.append((label, time.perf_counter() - start))
        print(f"{label}: {rows[-1][1]:.1f} s", flush=True)
    return (["Building the views:", "", "| view | seconds | ratio to the first row |", "|---|---|---|"]
            + [f"| {label} | {sec:.1f} | {sec / rows[0][1]:.2f} |" for label, sec in rows])


def _write(out: str, lines: list[str]) -> int:
    text = "\n".join(lines) + "\n"
    print(text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
