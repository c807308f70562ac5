"""The demo end to end: the model it trains learns that an object decides its verb, and its weight-only
circuit report for ' kicked' (against the other verbs) leads with the object, ' ball', and the head
that carries it."""

import re

import torch

from hooked_bilinear import HookedBilinearTransformer


def test_the_demo_report_leads_with_the_rule_it_explains(tmp_path):
    from training.demo import main

    assert main(["--out", str(tmp_path)]) == 0
    model = HookedBilinearTransformer.from_pretrained(str(tmp_path / "run" / "final")).eval()
    with torch.no_grad():
        probs = model("Tom found a red ball. He")[0, -1].softmax(-1)
    assert int(probs.argmax()) == model.to_single_token(" kicked")  # the behaviour being explained

    report = (tmp_path / "circuits" / "report.md").read_text()
    lead = re.search(r"\*\*'(.+?)' drives the target most\*\* \(evidence ([+-][\d.]+) logits\)\. "
                     r"It is carried by \*\*(L\dH\d)\*\*", report)
    assert lead, report[:2000]
    token, evidence, head = lead.group(1), float(lead.group(2)), lead.group(3)
    assert token == " ball" and evidence > 1.0
    # The head that carries it comes with what it attends to from the query.
    assert re.search(r"which attends from the query ' he' to ' ball' with expected attention 0\.\d\d", report)
    assert re.search(rf"\| {head} \| head_ov \|.*from ' he' attends to ", report), head

    # No token that never occurs in the demo's training text is named anywhere in the report (the
    # report quotes tokens with repr). Dead strings that some live token also decodes to are skipped.
    counts = model.token_counts
    assert counts is not None and int((counts == 0).sum()) > 0  # the check below has something to check
    strings = [model.tokenizer.decode([i]) for i in range(model.cfg.d_vocab)]
    live = {s for s, c in zip(strings, counts.tolist()) if c > 0}
    dead = {s for s, c in zip(strings, counts.tolist()) if c == 0 and s and s not in live}
    assert dead
    named = [s for s in dead if repr(s) in report]
    assert not named, named
