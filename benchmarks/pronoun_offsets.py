"""Where a name's weight-only evidence for ' she' - ' he' comes from, offset by offset, next to what
real sentences say (the ground truth the pronoun recall of `bench_rules.py` is judged against).

For each model and each of the corpus's names:

* **data**: how much ' she' - ' he' after "... <Name> was happy." drops when every occurrence of the
  name is hidden from attention (`training.rule_recall.hiding_effects`), mean over up to 8 held-out
  positions of the pronoun rule; centred over the names, as the weights' reading is. Also where the
  name's last mention sits before the query in those positions.
* **weights**: the name's evidence at the query '.' (`circuits.evidence.token_evidence`, the default
  context view), with the benchmark's placements over offsets 1-16 and at one offset at a time, and
  the weight the placements give each offset (`TokenView.offset_presence`, summed over the names).

A name is on the wrong side when its centred value has the other gender's sign. The table shows, per
offset, which names the weights put on the wrong side at that offset alone.

    python benchmarks/pronoun_offsets.py /tmp/bench_rules_fresh_v5/L3-s5/final [more model folders] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from benchstats import write  # noqa: E402

OFFSETS = list(range(1, 17))


def wrong_side(values: dict[str, float]) -> list[str]:
    from training.rule_recall import NAME_GENDER, gender_sides

    right, _ = gender_sides(values)
    return sorted(set(values) - set(right), key=lambda n: list(NAME_GENDER).index(n))


def name_offset(model, text: str, name: str) -> int:
    """How many tokens before the position after `text` the name's last mention sits (1: the last token)."""
    strs = model.to_str_tokens(model.to_tokens(text, prepend_bos=False)[0])
    return len(strs) - max(i for i, s in enumerate(strs) if s == " " + name.lower())


def data_effects(model, n_stories: int = 200, per_name: int = 8) -> tuple[dict[str, float], Counter]:
    """Per name: mean drop of ' she' - ' he' when the name is hidden; and the offsets of its last mention."""
    from training.rule_recall import NAME_GENDER, _rule_prefixes, hiding_effects, vocab_difference
    from training.stories import generate_stories

    vec = vocab_difference(model, [" she"], [" he"])
    effects: dict[str, list[float]] = {}
    offsets: Counter = Counter()
    for story in generate_stories(n_stories, seed=10_000):
        for rule, prefix, _ in _rule_prefixes(story):
            last = prefix.rsplit(". ", 1)[-1]  # the sentence before the pronoun: "<Name> was ..." / "<Name> found ..."
            name = last.split()[0]
            if rule != "pronoun" or name not in NAME_GENDER or len(effects.get(name, [])) >= per_name:
                continue
            text = prefix.lower()
            effects.setdefault(name, []).append(hiding_effects(model, text, [" " + name.lower()], vec)[0])
            offsets[name_offset(model, text, name)] += 1
    return {n: sum(v) / len(v) for n, v in effects.items()}, offsets


def weight_evidence(model, view, offsets) -> dict[str, float]:
    from circuits.evidence import token_evidence
    from training.rule_recall import NAME_GENDER

    e = token_evidence(model, (" she", " he"), query=".", view=view, offsets=offsets, n_pairs=0, n_carriers=0)
    return {n: float(e.total[e.labels.index(" " + n.lower())]) for n in NAME_GENDER}


def report(path: str, offsets: list[int] = OFFSETS, n_stories: int = 200) -> str:
    """Markdown: the data's and the weights' centred sides per name, and the per-offset table."""
    from circuits.context_view import context_view
    from hooked_bilinear import HookedBilinearTransformer
    from training.rule_recall import NAME_GENDER

    model = HookedBilinearTransformer.from_pretrained(path)
    model.eval()
    view = context_view(model)
    names = [view.index(model.to_single_token(" " + n.lower())) for n in NAME_GENDER]
    then = torch.isin(view.ids, torch.tensor([model.to_single_token(" she"), model.to_single_token(" he")])).float()
    placement = view.offset_presence(view.index(model.to_single_token(".")), offsets, then)[:, names].sum(-1)
    placement = placement / placement.sum()
    data, where = data_effects(model, n_stories=n_stories)
    default = weight_evidence(model, view, offsets)
    lines = [f"## {path}", "",
             f"- data (hiding the name, {sum(where.values())} held-out positions): centre "
             f"{sum(data.values()) / len(data):+.2f}; wrong side {wrong_side(data)}",
             f"- weights, the benchmark's placements (offsets {offsets[0]}-{offsets[-1]}): centre {sum(default.values()) / len(default):+.2f}; "
             f"wrong side {wrong_side(default)}", "",
             "| offset | placement weight (names) | real positions | weights' centre | wrong side at this offset alone |",
             "|---:|---:|---:|---:|---|"]
    for k, o in enumerate(offsets):
        at = weight_evidence(model, view, [o])
        lines.append(f"| {o} | {float(placement[k]):.3f} | {where[o] / max(sum(where.values()), 1):.3f} | "
                     f"{sum(at.values()) / len(at):+.2f} | {', '.join(wrong_side(at)) or '-'} |")
    lines += ["", "| name | gender | data (centred) | weights (centred) |", "|---|---|---:|---:|"]
    dc, wc = sum(data.values()) / len(data), sum(default.values()) / len(default)
    for n in sorted(NAME_GENDER, key=lambda n: default[n]):
        lines.append(f"| {n} | {NAME_GENDER[n]} | {data.get(n, float('nan')) - dc:+.2f} | {default[n] - wc:+.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model folders (e.g. a bench_rules run's L3-s5/final)")
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    text = "\n".join(report(p) for p in args.models)
    print(text)
    if args.out:
        write(args.out, f"`python benchmarks/pronoun_offsets.py {' '.join(args.models)}`\n\n" + text)


if __name__ == "__main__":
    main()
