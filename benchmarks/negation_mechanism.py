"""How a trained model realises the negation rule, measured on real sentences (the ground truth the
weight-only negation recall of `bench_rules.py` is judged against).

For each feeling f and target u_f = mean logit of f's negated follow-ups - mean of its plain ones, on
"... named <name>. <name> was [not] <g>. <pronoun>" for every feeling g:

* **effect of ' not'**: u_f with "not" minus u_f without, in g's sentence. The rule needs the pair
  (' not', f) when the effect is larger for g = f than for the other feelings (the diagonal);
  an additive model gives the same effect in every row.
* **carried where**: how much of the effect in f's own sentence is lost when the query cannot attend
  to ' not' (every layer), and when the positions between ' not' and the query cannot: which
  positions bring ' not' in. (What is left after a knock-out includes the one-token shift of every
  later position that "not" causes, so the two losses need not add up to the effect.)
* **interaction of (' not', g)** for the double difference D_f = u_f - mean over the other feelings
  of u_g (what needs both words: ' not' alone moves every feeling's follow-ups, a feeling alone both
  of its sets), in "... was not <g>. <pronoun>": D_f with both tokens, minus with ' not' hidden,
  minus with g hidden, plus with both hidden (hidden: no position may attend to it, in any layer).
  The weight-only negation recall asks the same question of the weights (`bench_rules.py`).

    python benchmarks/negation_mechanism.py /tmp/bench_rules/L2-s1/final [more model folders]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAMES = (("tom", "he"), ("lily", "she"), ("max", "he"), ("mia", "she"))


def target_value(model, logits, feeling: str) -> float:
    from training.stories import FEELINGS

    ids = lambda words: [model.to_single_token(" " + w) for w in words]
    f = FEELINGS[feeling]
    return float(logits[ids(f.negative)].mean() - logits[ids(f.positive)].mean())


@torch.no_grad()
def not_effect(model, target: str, context: str, name: str, pronoun: str, knockout: str = "none") -> float:
    """u_target with ' not' minus without, in `context`'s sentence; knockout "query" or "between"
    zeroes the attention to ' not' from the query or from the positions between them."""
    values = []
    for negated in (True, False):
        text = f"once upon a time, there was a little girl named {name}. {name} was {'not ' if negated else ''}{context}. {pronoun}"
        tokens = model.to_tokens(text, prepend_bos=False)
        strs = model.to_str_tokens(tokens[0])
        hooks = []
        if negated and knockout != "none":
            at, q = strs.index(" not"), len(strs) - 1
            rows = [q] if knockout == "query" else list(range(at + 1, q))

            def hook(pattern, hook, rows=rows, at=at):
                pattern[:, :, rows, at] = 0.0
                return pattern
            hooks = [(lambda n: n.endswith("hook_pattern"), hook)]
        values.append(target_value(model, model.run_with_hooks(tokens, fwd_hooks=hooks)[0, -1], target))
    return values[0] - values[1]


def double_difference(model, feeling: str):
    """D_f = u_f - mean of u_g over the other feelings, as a vector over the vocabulary."""
    from training.rule_recall import vocab_difference
    from training.stories import FEELINGS

    u = lambda name: vocab_difference(model, [" " + w for w in FEELINGS[name].negative],
                                      [" " + w for w in FEELINGS[name].positive])
    others = [g for g in FEELINGS if g != feeling]
    return u(feeling) - sum(u(g) for g in others) / len(others)


def pair_interaction(model, target: str, context: str, name: str, pronoun: str) -> float:
    """Interaction of ' not' and the feeling word `context` on D_target, in "... was not <context>."."""
    text = f"once upon a time, there was a little girl named {name}. {name} was not {context}. {pronoun}"
    tokens = model.to_tokens(text, prepend_bos=False)
    strs = model.to_str_tokens(tokens[0])
    at_not, at_g = strs.index(" not"), strs.index(" " + context)
    from training.rule_recall import hidden_readout

    vec = double_difference(model, target)
    f = lambda hidden: hidden_readout(model, tokens, hidden, vec)
    return f([]) - f([at_not]) - f([at_g]) + f([at_not, at_g])


def main(argv=None) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hooked_bilinear import HookedBilinearTransformer
    from training.stories import FEELINGS

    folders = (argv if argv is not None else sys.argv[1:])
    if not folders:
        print(__doc__)
        return 2
    for folder in folders:
        model = HookedBilinearTransformer.from_pretrained(folder).eval()
        print(f"\n{folder}\n")
        print("| target | " + " | ".join(f"in '{g}'" for g in FEELINGS) + " | own - best other | "
              "lost, query blind to ' not' | lost, between blind to ' not' |")
        print("|---" * (len(FEELINGS) + 4) + "|")
        for f in FEELINGS:
            mean = lambda g, k="none": sum(not_effect(model, f, g, n, p, k) for n, p in NAMES) / len(NAMES)
            row = {g: mean(g) for g in FEELINGS}
            other = max(v for g, v in row.items() if g != f)
            cells = " | ".join(f"{row[g]:+.2f}" for g in FEELINGS)
            print(f"| u_{f} | {cells} | {row[f] - other:+.2f} | {row[f] - mean(f, 'query'):+.2f} | {row[f] - mean(f, 'between'):+.2f} |")
        print("\n| target | " + " | ".join(f"(' not', '{g}')" for g in FEELINGS) + " | own pair largest |")
        print("|---" * (len(FEELINGS) + 2) + "|")
        for f in FEELINGS:
            row = {g: sum(pair_interaction(model, f, g, n, p) for n, p in NAMES) / len(NAMES) for g in FEELINGS}
            cells = " | ".join(f"{row[g]:+.2f}" for g in FEELINGS)
            print(f"| D_{f} | {cells} | {'yes' if max(row, key=row.get) == f else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
