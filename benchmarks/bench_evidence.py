"""What weight-only token evidence costs at a realistic size, and what the competitor draws add.

`circuits.evidence.token_evidence` runs the virtual context for every live token at 16 placements
(and per head, for the top tokens' carriers). Each head's output is averaged over the typical
competitors it may see (`circuits.competitors`): one draw is a closed form, 15 independent draws
(the default) a quadrature per row and head. This script times both side by side on the same random
model, so the ratio is what the quadrature costs.

    python benchmarks/bench_evidence.py                 # 6 layers, d_model 512, 500 live tokens
    python benchmarks/bench_evidence.py --live 200 --layers 2
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
    rows = []
    for competitors in (1.0, 15.0):
        start = time.perf_counter()
        token_evidence(model, (5, [6, 7]), view=view, competitors=competitors, n_pairs=5)
        rows.append((competitors, time.perf_counter() - start))
    lines = [f"`python benchmarks/bench_evidence.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"token_evidence, {args.layers} layers, d_model {args.d_model}, {args.live} live tokens, {args.threads} threads",
             "", "| competitors | seconds | ratio to one draw |", "|---|---|---|"]
    lines += [f"| {c:g} | {sec:.1f} | {sec / rows[0][1]:.2f} |" for c, sec in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
