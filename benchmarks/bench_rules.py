"""Planted-rule recall: do weight-only circuits name what a model has learned?

For 2- and 3-layer models (CPU sizes, the tiny config) and several seeds, trained on the built-in
story corpus, this script measures each planted rule's behaviour on held-out stories and whether the
weight-only circuit of the rule's logit difference names the rule's trigger
(`training.rule_recall`: object_verb, negation, pronoun, conjunction, name_recall), plus the
ICLR'25 paper's activation metric: the correlation between an output direction's true MLP readout
and its top-2 eigencomponents on held-out text (the rules' logit directions, every MLP layer).

    python benchmarks/bench_rules.py                              # 2 and 3 layers x seeds 0 1 2
    python benchmarks/bench_rules.py --layers 2 --seeds 0 --steps 300 --out /tmp/rules

Models are trained once into --out/L{layers}-s{seed} and reused on later runs (a finished run is
evaluated again, an interrupted one resumed). Results go to --out/results.json and results.md.
Target: recall >= 0.95 for every rule a model has learned (behaviour >= 0.95). Where the weights name
another token than the trigger (object_verb, name_recall), the trigger and the named token are each
hidden from attention in real held-out sentences (`training.rule_recall.check_cases`): a column
counts the misses where hiding the named token moves the target more -- the model really
works that way, and the miss is the rule's reading, not the weights' -- and those where neither
moves it by 1 logit: the model does not read the trigger for that case (it says the answer by
default), so no trigger is there to name. The last column asks the same of every case: among the
cases whose trigger moves the target by at least 1 logit in real sentences (the cases the model
reads its trigger for), how many the weights name.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "tinystories-tiny.yaml"


def train_model(run_dir: Path, layers: int, seed: int, steps: int) -> Path:
    """Train (or resume, or reuse) one model; returns its final/ folder."""
    from training.train import main as train

    final = run_dir / "final"
    if (final / "config.json").is_file():
        return final
    if (run_dir / "run_config.yaml").is_file():
        status = train(["--resume", "--out", str(run_dir)])
    else:
        status = train(["--config", str(CONFIG), f"model.n_layers={layers}", f"train.seed={seed}",
                        f"train.max_steps={steps}", "--out", str(run_dir)])
    if status:
        raise SystemExit(f"training {run_dir} failed with status {status}")
    return final


def held_out_tokens(model, n_stories: int = 32):
    from training.stories import generate_stories

    tok = model.tokenizer
    rows = [tok(s.lower())["input_ids"][: model.cfg.n_ctx] for s in generate_stories(n_stories, seed=20_000)]
    width = min(max(len(r) for r in rows), model.cfg.n_ctx)
    tokens = torch.tensor([r + [tok.pad_token_id or 0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return tokens, mask


def activation_metric(model) -> list[float]:
    """Top-2 eigencomponent correlation of every rule's logit direction at every MLP layer."""
    import circuits
    from circuits.mlp import eigen_readout_correlation
    from training.stories import CONJUNCTION_ANSWERS, FEELINGS, OBJECT_VERBS

    w = lambda word: model.to_single_token(" " + word)
    verbs = [w(v) for v in OBJECT_VERBS.values()]
    U = [circuits.logit_diff_direction(model, v, [x for x in verbs if x != v]) for v in verbs]
    U += [circuits.logit_diff_direction(model, [w(x) for x in f.negative], [w(x) for x in f.positive]) for f in FEELINGS.values()]
    U += [circuits.logit_diff_direction(model, w("she"), w("he"))]
    U += [circuits.logit_diff_direction(model, *[w(a) for a in sorted(set(CONJUNCTION_ANSWERS.values()))])]
    U = torch.stack(U)
    tokens, mask = held_out_tokens(model)
    return [float(c) for l in range(model.cfg.n_layers)
            for c in eigen_readout_correlation(model, l, U, tokens, k=2, attention_mask=mask)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600, help="training steps per model (the demo uses 250)")
    p.add_argument("--n-stories", type=int, default=100, help="held-out stories for the behaviour measurement")
    p.add_argument("--competitors", type=float, default=None,
                   help="typical competitors each head sees besides the query and the placed tokens "
                        "(default: circuits.competitors.TYPICAL_COMPETITORS, 15)")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "hooked-bilinear-bench-rules"),
                   help="models and results (default outside the repository)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from hooked_bilinear import HookedBilinearTransformer
    from training.rule_recall import RULES, evaluate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers in args.layers:
        for seed in args.seeds:
            name = f"L{layers}-s{seed}"
            start = time.time()
            final = train_model(out / name, layers, seed, args.steps)
            model = HookedBilinearTransformer.from_pretrained(str(final)).eval()
            with torch.no_grad():
                results = evaluate(model, n_stories=args.n_stories, competitors=args.competitors)
                corr = activation_metric(model)
            rows.append({"model": name, "layers": layers, "seed": seed, "seconds": round(time.time() - start, 1),
                         "rules": {r: {"behaviour": v.behaviour, "positions": v.n_positions, "recall": v.recall,
                                       "cases": v.n_cases, "details": v.details, "misses": len(v.misses),
                                       "misses_data_agrees": v.misses_data_agrees,
                                       "misses_trigger_unused": v.misses_trigger_unused,
                                       "driven": v.driven, "driven_hits": v.driven_hits} for r, v in results.items()},
                         "top2_correlation": corr})
            print(f"{name}: " + ", ".join(f"{r} {v.behaviour:.2f}/{v.recall:.2f}" for r, v in results.items()), flush=True)

    header = "| model | " + " | ".join(RULES) + " | top-2 corr. (median, > 0.75) |"
    lines = ["Each cell: behaviour (top-1 accuracy at the rule's positions, held-out stories) / recall "
             "(share of the rule's cases the weight-only circuit names); **bold** where the model learned "
             "the rule (behaviour >= 0.95).", "", header, "|---" * (len(RULES) + 2) + "|"]
    for row in rows:
        cells = []
        for r in RULES:
            v = row["rules"][r]
            cell = f"{v['behaviour']:.2f} / {v['recall']:.2f}"
            cells.append(f"**{cell}**" if v["behaviour"] >= 0.95 else cell)
        c = row["top2_correlation"]
        frac = sum(x > 0.75 for x in c) / len(c)
        lines.append(f"| {row['model']} | " + " | ".join(cells) + f" | {statistics.median(c):.2f}, {frac:.0%} |")
    lines += ["", "| rule | models that learned it | mean recall on those | target met (>= 0.95) | "
              "misses on those: real sentences side with the weights / with neither | "
              "cases whose trigger moves the target >= 1 logit in real sentences: named by the weights |",
              "|---|---|---|---|---|---|"]
    for r in RULES:
        on = [row["rules"][r] for row in rows if row["rules"][r]["behaviour"] >= 0.95]
        learned = [v["recall"] for v in on]
        mean = f"{sum(learned) / len(learned):.2f}" if learned else "n/a"
        misses = sum(v.get("misses", 0) for v in on)
        agree = sum(v.get("misses_data_agrees", 0) for v in on)
        unused = sum(v.get("misses_trigger_unused", 0) for v in on)
        single = r in ("object_verb", "name_recall")
        checked = f"{agree} / {unused} of {misses}" if single else "(read within the slot)"
        driven = [(v["driven_hits"], v["driven"]) for v in on if v.get("driven")]
        named = (f"{sum(h for h, _ in driven)} of {sum(d for _, d in driven)} (lowest model "
                 f"{min(h / d for h, d in driven):.2f})" if single and driven else "n/a")
        lines.append(f"| {r} | {len(learned)}/{len(rows)} | {mean} | "
                     f"{'yes' if learned and min(learned) >= 0.95 else ('n/a' if not learned else 'no')} | {checked} | {named} |")
    table = "\n".join(lines)
    print("\n" + table)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    (out / "results.md").write_text(f"`python benchmarks/bench_rules.py {' '.join(argv or sys.argv[1:])}`\n\n{table}\n")
    print(f"\nresults in {out / 'results.md'} and results.json; models in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
