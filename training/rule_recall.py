"""Does a model trained on the built-in corpus know its planted rules, and do its weights say so?

For each planted rule of `training.stories` this module measures two things:

* **behaviour**: on held-out stories, at every position where the rule decides the next word, the
  share of positions where the model's top prediction is what the rule allows;
* **recall from the weights alone**: whether the weight-only circuit of the rule's logit difference
  (`circuits.evidence.token_evidence`: which context tokens push it, and which pairs interact in an
  MLP) names the rule's trigger:

  ==============  =========================================  ============================================
  rule            target (logit difference)                  named when
  ==============  =========================================  ============================================
  object_verb     the object's verb - the other verbs        the object is the top evidence token
  negation        the feeling's negated - plain follow-ups,   of the pairs (' not', each feeling word), the
                  against the other feelings' (a double       feeling's own has the largest interaction
                  difference: what needs both words)          (`circuits.virtual_context.expected_interaction`,
                                                              exact through every layer); the details also
                                                              count ' not' as the top evidence token for the
                                                              plain difference and the top first-order pair
  pronoun         ' she' - ' he'                              a name's evidence, minus the mean over all
                                                              names, has its gender's sign
  conjunction     ' swim' - ' walk' and ' walk' - ' swim',    the temp word the rule pairs with the time
                  asked after the time word (the query)      word for that answer has more evidence than
                                                             the other temp word (which one wins flips
                                                             with the query: the interaction); the
                                                             details also count top-token hits and give
                                                             the size of the flip (the four cases are two
                                                             sign tests: chance passes 1 model in 4)
  name_recall     the name - the other names, after "."       the name itself (an earlier mention) is the
                                                              top evidence token: copying
  ==============  =========================================  ============================================

Recall is the share of a rule's cases (objects, feelings, names, pairs) named correctly.

For name_recall the details also report the classic induction check (a layer-0 previous-token head
found from its positional habit on random live-token sequences, the later head with the largest
K-composition with it, and the share of names its OV copies). In this corpus a later mention of a
name follows "Then," / "." / "and", never the token that followed the name before, so the
[A][B] ... [A] -> [B] pattern an induction head completes does not occur; the models copy instead,
which is what the recall itself measures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from training.stories import (CONJUNCTION_ANSWERS, FEELINGS, NAME_GENDER, OBJECT_VERBS, generate_stories,
                              split_sentences)

RULES = ("object_verb", "negation", "pronoun", "conjunction", "name_recall")


@dataclass
class RuleResult:
    rule: str
    behaviour: float  # share of rule positions predicted correctly (top-1)
    n_positions: int
    recall: float  # share of the rule's cases the weights name
    n_cases: int
    details: list[str] = field(default_factory=list)  # one line per case: what the weights named
    cases: list["Case"] = field(default_factory=list)  # object_verb, name_recall: each case, what the weights named
    misses_data_agrees: int = 0  # of the misses, how many real sentences side with the weights (`check_cases`)
    misses_trigger_unused: int = 0  # of the misses, how many the trigger does not drive either (`check_cases`)
    driven: Optional[int] = None  # cases whose trigger moves the target >= 1 logit in real sentences (`check_cases`)
    driven_hits: Optional[int] = None  # of those, how many the weights name

    @property
    def learned(self) -> bool:
        return self.behaviour >= 0.95

    @property
    def misses(self) -> list["Case"]:
        return [c for c in self.cases if not c.hit]


@dataclass
class Case:
    """One case of a rule with a single trigger token (object_verb, name_recall): for the target
    (tokens a - tokens b), the trigger the rule plants and the top evidence token the weights named
    (token labels)."""

    rule: str
    case: str  # the object or name, as the corpus writes it
    target: tuple[list[str], list[str]]
    trigger: str
    named: str

    @property
    def hit(self) -> bool:
        return self.named == self.trigger


# --- behaviour on held-out stories --------------------------------------------------------------


def _rule_prefixes(story: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """(rule, text before the decided word, allowed words) for every decided position in a story."""
    out = []
    sents = split_sentences(story)
    names_seen: set[str] = set()
    for i, sent in enumerate(sents):
        prefix = " ".join(sents[:i])
        words = sent.split()
        nxt = sents[i + 1].split() if i + 1 < len(sents) else []
        before = " ".join(sents[: i + 1])
        if (m := re.match(r"^([A-Z][a-z]+) was (not )?(\w+)\.$", sent)) and m.group(3) in FEELINGS and len(nxt) > 1:
            f = FEELINGS[m.group(3)]
            out.append(("negation", f"{before} {nxt[0]}", f.negative if m.group(2) else f.positive))
            out.append(("pronoun", before, (NAME_GENDER[m.group(1)].capitalize(),)))
        if (m := re.match(r"^([A-Z][a-z]+) found a (\w+) (\w+)\.$", sent)) and len(nxt) > 1:
            if m.group(3) in OBJECT_VERBS:  # an unbound object decides no verb
                out.append(("object_verb", f"{before} {nxt[0]}", (OBJECT_VERBS[m.group(3)],)))
            out.append(("pronoun", before, (NAME_GENDER[m.group(1)].capitalize(),)))
        if m := re.match(r"^(.* took a (hot|cold) (morning|night)) \w+", sent):
            out.append(("conjunction", f"{prefix} {m.group(1)}".strip(), (CONJUNCTION_ANSWERS[m.group(2), m.group(3)],)))
        for j, w in enumerate(words):
            name = w.strip(".,!?")
            if name in NAME_GENDER and name in names_seen and not (j and words[j - 1] == "named"):
                head = " ".join(words[:j])
                out.append(("name_recall", f"{prefix} {head}".strip(), tuple(sorted(names_seen))))
        names_seen |= set(re.findall(r"named ([A-Z][a-z]+)", sent))
    return out


@torch.no_grad()
def behaviour(model: Any, n_stories: int = 100, seed: int = 10_000, lowercase: bool = True,
              batch_size: int = 32) -> dict[str, tuple[float, int]]:
    """Top-1 accuracy at every rule position of `n_stories` held-out stories (a seed the training
    corpus does not use): {rule: (accuracy, positions)}."""
    tok = model.tokenizer
    cases = [c for story in generate_stories(n_stories, seed) for c in _rule_prefixes(story)]
    norm = (lambda s: s.lower()) if lowercase else (lambda s: s)
    hits: dict[str, list[int]] = {r: [0, 0] for r in RULES}
    n_ctx = model.cfg.n_ctx
    for start in range(0, len(cases), batch_size):
        batch = cases[start:start + batch_size]
        seqs = [tok(norm(prefix))["input_ids"][-n_ctx:] for _, prefix, _ in batch]
        width = max(len(s) for s in seqs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        tokens = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        top = model(tokens.to(model.W_E.device), attention_mask=mask.to(model.W_E.device))[:, -1].argmax(-1).tolist()
        for (rule, _, allowed), pred in zip(batch, top):
            ok = any(tok(" " + norm(w))["input_ids"][0] == pred for w in allowed)
            hits[rule][0] += ok
            hits[rule][1] += 1
    return {r: (h / n if n else float("nan"), n) for r, (h, n) in hits.items()}


# --- recall from the weights ---------------------------------------------------------------------


def _tok(model: Any, word: str, lowercase: bool) -> str:
    """The label of a word's (first) token, as circuits report it."""
    ids = model.tokenizer(" " + (word.lower() if lowercase else word))["input_ids"]
    return model.to_string([ids[0]])


def gender_sides(values: dict[str, float]) -> tuple[list[str], float]:
    """Names whose evidence for ' she' - ' he' lies on their gender's side of the mean name, and that
    mean. Centred because a common "a name is in the context" effect says nothing about gender (and
    depends on the virtual context's filler); the rule predicts that girls' names push ' she' more
    than names in general. The corpus has as many girls' names as boys'."""
    centre = sum(values.values()) / max(len(values), 1)
    return [n for n, v in values.items() if (v > centre) == (NAME_GENDER[n] == "she")], centre


def weight_recall(model: Any, lowercase: bool = True, competitors: Optional[float] = None) -> dict[str, RuleResult]:
    """Recall of every rule from the weights alone (see the module docstring); behaviour is left
    NaN here (fill it from `behaviour`)."""
    from circuits.competitors import TYPICAL_COMPETITORS
    from circuits.directions import logit_diff_direction
    from circuits.evidence import token_evidence
    from circuits.context_view import context_view
    from circuits.virtual_context import expected_interaction, virtual_readout

    competitors = TYPICAL_COMPETITORS if competitors is None else competitors
    view = context_view(model, competitors=competitors)
    w = lambda word: _tok(model, word, lowercase)
    out: dict[str, RuleResult] = {}
    nan = float("nan")

    verbs = {o: w(v) for o, v in OBJECT_VERBS.items()}
    details, hits, cases = [], 0, []
    for obj, verb in verbs.items():
        e = token_evidence(model, (verb, [v for v in verbs.values() if v != verb]), view=view, competitors=competitors,
                           n_carriers=0)
        top = e.top_tokens(3)
        hits += top[0][0] == w(obj)
        cases.append(Case("object_verb", obj, ([verb], [v for v in verbs.values() if v != verb]), w(obj), top[0][0]))
        details.append(f"{verb!r}: query {e.query!r}, top evidence {[t for t, _ in top]} (want {w(obj)!r})")
    out["object_verb"] = RuleResult("object_verb", nan, 0, hits / len(verbs), len(verbs), details, cases)

    details, hits, top_hits, pair_hits = [], 0, 0, 0
    feelings = list(FEELINGS)
    not_index = view.index(model.to_single_token(w("not")))
    pairs = torch.tensor([[not_index, view.index(model.to_single_token(w(g)))] for g in feelings], device=view.ids.device)
    for name, f in FEELINGS.items():
        e = token_evidence(model, ([w(x) for x in f.negative], [w(x) for x in f.positive]), view=view,
                           competitors=competitors, n_carriers=0)
        # What needs both words: this feeling's negated-minus-plain follow-ups against the other
        # feelings' (' not' alone moves every feeling's follow-ups; the feeling alone moves both of
        # its sets). Named when ' not' meets this feeling more strongly than any other feeling.
        others = [g for g in feelings if g != name]
        a = [w(x) for x in f.negative] * 2 + [w(x) for g in others for x in FEELINGS[g].positive]
        b = [w(x) for x in f.positive] * 2 + [w(x) for g in others for x in FEELINGS[g].negative]
        u = logit_diff_direction(model, [model.to_single_token(x) for x in a], [model.to_single_token(x) for x in b])
        inter = expected_interaction(model, view, view.index(e.query_id), pairs, u.to(view.resid[0].dtype), competitors,
                                     draw=view.competitor_draw(pairs))
        hits += int(inter.argmax()) == feelings.index(name)
        top_hits += e.top_tokens(1)[0][0] == w("not")
        best = e.pairs[0] if e.pairs else None
        pair_hits += best is not None and best.tokens == frozenset((w("not"), w(name)))
        got = "none" if best is None else f"{best.token_s!r} via {best.route_s} x {best.token_t!r} via {best.route_t} in MLP{best.layer}"
        details.append(f"not {name}: interaction of ' not' with {dict(zip(feelings, [round(v, 2) for v in inter.tolist()]))} "
                       f"(want {name!r} highest); top evidence {[t for t, _ in e.top_tokens(3)]}; top first-order pair {got}")
    details.append(f"' not' is the top evidence token in {top_hits}/{len(FEELINGS)}; the top first-order pair is "
                   f"(' not', the feeling) in {pair_hits}/{len(FEELINGS)}")
    out["negation"] = RuleResult("negation", nan, 0, hits / len(FEELINGS), len(FEELINGS), details)

    e = token_evidence(model, (w("she"), w("he")), view=view, competitors=competitors, n_carriers=0)
    values = {name: float(e.total[e.labels.index(w(name))]) for name in NAME_GENDER if w(name) in e.labels}
    right, centre = gender_sides(values)
    out["pronoun"] = RuleResult("pronoun", nan, 0, len(right) / len(NAME_GENDER), len(NAME_GENDER),
                                [f"query {e.query!r}; mean name evidence {centre:+.2f}; wrong side: "
                                 f"{sorted(set(NAME_GENDER) - set(right))}; uncentred sign right for "
                                 f"{sum((v > 0) == (NAME_GENDER[n] == 'she') for n, v in values.items())}/{len(NAME_GENDER)}"])

    details, hits, top_hits, gaps = [], 0, 0, {}
    answers = sorted(set(CONJUNCTION_ANSWERS.values()))
    temps = sorted({t for t, _ in CONJUNCTION_ANSWERS})
    for (temp, time), answer in sorted(CONJUNCTION_ANSWERS.items()):
        other = [a for a in answers if a != answer]
        e = token_evidence(model, (w(answer), [w(o) for o in other]), query=w(time), view=view,
                           competitors=competitors, n_pairs=0, n_carriers=0)
        top = e.top_tokens(3)
        # Compared within the slot (hot vs cold), like pronoun's centring: adding any token to the
        # virtual context shifts the readout, and a model may encode only the cells that flip the
        # default answer (cold after 'morning' -> walk, nothing special for swim).
        evidence = {t: float(e.total[e.labels.index(w(t))]) for t in temps}
        hits += evidence[temp] == max(evidence.values())
        gaps[time, answer] = evidence[temps[0]] - evidence[temps[1]]
        top_hits += top[0][0] == w(temp)
        details.append(f"{answer!r} after {time!r}: evidence {({t: round(v, 2) for t, v in evidence.items()})} "
                       f"(want {temp!r} highest); top evidence {[t for t, _ in top]}")
    details.append(f"top evidence token is the rule's temp word in {top_hits}/{len(CONJUNCTION_ANSWERS)}")
    # The four cases are two sign tests (a target and its negation share a query), so a model that has
    # learned nothing passes by chance 1 time in 4; the size of the flip is what tells them apart.
    times = sorted({t for _, t in CONJUNCTION_ANSWERS})
    flip = abs(gaps[times[0], answers[0]] - gaps[times[1], answers[0]])
    details.append(f"{temps[0]!r} - {temps[1]!r} evidence for {answers[0]!r} - {answers[1]!r}: {gaps[times[0], answers[0]]:+.2f} "
                   f"after {times[0]!r}, {gaps[times[1], answers[0]]:+.2f} after {times[1]!r} (they differ by {flip:.2f} logits)")
    out["conjunction"] = RuleResult("conjunction", nan, 0, hits / len(CONJUNCTION_ANSWERS), len(CONJUNCTION_ANSWERS), details)

    names = [w(n) for n in NAME_GENDER]
    induction = _induction_recall(model, view, names)
    details, hits, cases = [], 0, []
    # Copying, asked where a sentence starts ("." is the query: most later mentions open a sentence;
    # the default query would be "named", after which the name is new and cannot be copied).
    period = model.to_string([model.tokenizer(".")["input_ids"][0]])
    by_distance: dict[int, list[float]] = {o: [] for o in (1, 2, 4, 8, 12, 16)}
    # A name in the context pushes that name over the other names *of its gender*: which gender comes
    # next is the pronoun rule's business (' her' rightly pushes every girl's name), copying decides
    # among the names a pronoun cannot tell apart.
    for corpus_name, name in zip(NAME_GENDER, names):
        others = [x for c, x in zip(NAME_GENDER, names) if x != name and NAME_GENDER[c] == NAME_GENDER[corpus_name]]
        e = token_evidence(model, (name, others), query=period, view=view, competitors=competitors, n_pairs=0,
                           n_carriers=0)
        top = e.top_tokens(1)[0][0]
        hits += top == name
        cases.append(Case("name_recall", corpus_name, ([name], others), name, top))
        if top != name:
            details.append(f"{name!r}: top evidence {top!r} (query {e.query!r})")
        # Its evidence for itself at single distances (the evidence above is the mean over 1-16).
        if name in e.labels:
            u = logit_diff_direction(model, [model.to_single_token(name)], [model.to_single_token(x) for x in others])
            keys = torch.tensor([[-1], [e.labels.index(name)]], device=view.ids.device)
            for o in by_distance:
                r = virtual_readout(model, view, view.index(e.query_id), keys, u.to(view.resid[0].dtype), competitors, (o,),
                                    draw=view.competitor_draw(keys[1:]).expand(2, -1))
                by_distance[o].append(float(r[1] - r[0]))
    distance_line = ("a name's own evidence by how far back it sits (mean over the live names): "
                     + ", ".join(f"{o}: {sum(v) / max(len(v), 1):+.2f}" for o, v in by_distance.items()))
    out["name_recall"] = RuleResult("name_recall", nan, 0, hits / len(names), len(names),
                                    [f"copying: {hits}/{len(names)} names are their own top evidence"] + details
                                    + [distance_line, f"induction check: {induction.details[0]}"], cases)
    return out


@torch.no_grad()
def _induction_recall(model: Any, view: Any, names: Sequence[str]) -> RuleResult:
    """Previous-token head (layer-0 head giving offset 1 the largest attention share), the later
    head with the largest K-composition with it, and the share of names that head's OV copies (the
    name's own token is its top output among live tokens, through the unembedding)."""
    from circuits.attention import composition_score, offset_attention
    from circuits.attention import ov_matrices

    nan = float("nan")
    H, L = model.cfg.n_heads, model.cfg.n_layers
    if L < 2:
        return RuleResult("name_recall", nan, 0, 0.0, len(names), ["needs two layers"])
    prev = max(((0, h) for h in range(H)), key=lambda lh: float(offset_attention(model, *lh)[1]))
    share = float(offset_attention(model, *prev)[1])
    induction = max(((l, h) for l in range(1, L) for h in range(H)), key=lambda lh: composition_score(model, prev, lh, "k"))
    kcomp = composition_score(model, prev, induction, "k")
    l, h = induction
    gain = getattr(model.ln_final, "w", None)
    W_U = model.W_U.detach() * (gain.detach()[:, None] if gain is not None else 1.0)
    out = (view.normalized(l) @ ov_matrices(model, l)[h].to(view.resid[0].dtype)) @ W_U.to(view.resid[0].dtype)
    out = out[:, view.ids]  # live outputs only
    labels = [model.to_string([int(t)]) for t in view.ids]
    copied = [n for n in names if n in labels and int(out[labels.index(n)].argmax()) == labels.index(n)]
    detail = (f"previous-token head L{prev[0]}H{prev[1]} (offset-1 share {share:.2f}); induction head "
              f"L{l}H{h} (K-composition {kcomp:.3f}); copies {len(copied)}/{len(names)} names")
    recall = len(copied) / len(names) if share > 0.3 else 0.0
    return RuleResult("name_recall", nan, 0, recall, len(names), [detail])


# --- the cases, checked on real sentences ------------------------------------------------------------


@torch.no_grad()
def hidden_readout(model: Any, tokens: Tensor, hidden: Sequence[int], vec: Tensor) -> float:
    """`logits . vec` at the last position when no position may attend to the `hidden` positions
    (in any layer; each still attends to itself, so it keeps its own residual)."""
    def hook(scores, hook):
        scores = scores.clone()
        for k in hidden:
            own = scores[..., k, k].clone()
            scores[..., :, k] = float("-inf")
            scores[..., k, k] = own
        return scores
    hooks = [(lambda n: n.endswith("hook_attn_scores"), hook)] if len(hidden) else []
    return float(model.run_with_hooks(tokens, fwd_hooks=hooks)[0, -1] @ vec.to(model.W_U.device))


def vocab_difference(model: Any, a: Sequence[str], b: Sequence[str]) -> Tensor:
    """The vocabulary vector of `mean logit(a) - mean logit(b)` (token labels): [d_vocab]."""
    vec = torch.zeros(model.cfg.d_vocab)
    vec[[model.to_single_token(t) for t in a]] += 1 / len(a)
    vec[[model.to_single_token(t) for t in b]] -= 1 / len(b)
    return vec


def hiding_effects(model: Any, text: str, labels: Sequence[str], vec: Tensor) -> list[float]:
    """For each token label, how much `logits . vec` after `text` drops when every occurrence of
    that token is hidden from attention (0 when the token is not in the context)."""
    tokens = model.to_tokens(text, prepend_bos=False)[:, -model.cfg.n_ctx:]
    strs = model.to_str_tokens(tokens[0])
    full = hidden_readout(model, tokens, [], vec)
    out = []
    for label in labels:
        where = [i for i, s in enumerate(strs) if s == label]
        out.append(full - hidden_readout(model, tokens, where, vec) if where else 0.0)
    return out


def _case_prefixes(case: Case, stories: Sequence[str]) -> list[str]:
    """Held-out texts that end where the case decides the next word."""
    if case.rule == "object_verb":
        verb = (OBJECT_VERBS[case.case],)
        return [p for s in stories for rule, p, allowed in _rule_prefixes(s) if rule == "object_verb" and allowed == verb]
    # name_recall: a later mention of the name that opens a sentence (the query is ".")
    return [s[:m.start() + 1] for s in stories if f"named {case.case}" in s
            for m in re.finditer(rf"\. {case.case}\b", s) if m.start() > s.index(f"named {case.case}")]


def check_cases(model: Any, results: dict[str, RuleResult], n_stories: int = 60, per_case: int = 8,
                lowercase: bool = True, unused_below: float = 1.0) -> None:
    """Check the weights' cases on real held-out sentences, hiding tokens from attention.

    Every case: does the trigger drive the target at all (hiding it moves the target by at least
    `unused_below` logits)? Counts `driven` and, of those, `driven_hits` (the weights name the trigger).
    Every miss: the token the weights named is hidden too. The data sides with the weights when
    hiding their token moves the target more; when neither moves it by `unused_below`, the model does
    not read the trigger for this case at all (it predicts the answer by default, and the weights
    rightly name no trigger). Adds a line per miss and a summary line to the details."""
    stories = generate_stories(n_stories, seed=10_000)
    norm = (lambda t: t.lower()) if lowercase else (lambda t: t)
    for result in results.values():
        if not result.cases:
            continue
        result.misses_data_agrees = result.misses_trigger_unused = result.driven = result.driven_hits = 0
        for case in result.cases:
            vec = vocab_difference(model, *case.target)
            texts = [norm(t) for t in _case_prefixes(case, stories)][:per_case]
            if not texts:
                result.details.append(f"data check, {case.case}: no held-out position")
                continue
            hidden = (case.trigger,) if case.hit else (case.trigger, case.named)
            effects = torch.tensor([hiding_effects(model, t, hidden, vec) for t in texts]).mean(0).tolist()
            trig = effects[0]
            result.driven += trig >= unused_below
            result.driven_hits += case.hit and trig >= unused_below
            if case.hit:
                continue
            named = effects[1]
            if max(trig, named) < unused_below:
                verdict = f"neither moves it by {unused_below:g} logit: the model does not read the trigger here"
                result.misses_trigger_unused += 1
            else:
                verdict = f"the data sides with the {'weights' if named > trig else 'rule'}"
                result.misses_data_agrees += named > trig
            result.details.append(
                f"data check, {case.case}: hiding {case.trigger!r} moves the target {trig:+.2f}, hiding {case.named!r} "
                f"{named:+.2f} (mean over {len(texts)} held-out positions): {verdict}")
        result.details.append(f"data check: the trigger moves the target by >= {unused_below:g} logit in "
                              f"{result.driven}/{len(result.cases)} cases; the weights name it in {result.driven_hits} of those")


def evaluate(model: Any, n_stories: int = 100, lowercase: bool = True, competitors: Optional[float] = None) -> dict[str, RuleResult]:
    """Behaviour and weight-only recall of every planted rule, and the weights' cases checked on
    real sentences."""
    results = weight_recall(model, lowercase=lowercase, competitors=competitors)
    for rule, (acc, n) in behaviour(model, n_stories=n_stories, lowercase=lowercase).items():
        results[rule].behaviour, results[rule].n_positions = acc, n
    check_cases(model, results, lowercase=lowercase)
    return results
