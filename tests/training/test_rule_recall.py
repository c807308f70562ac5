"""The planted-rule benchmark's bookkeeping: which positions each rule decides, and how cases count."""

import pytest

from training.rule_recall import RULES, _rule_prefixes, behaviour, gender_sides
from training.stories import CONJUNCTION_ANSWERS, FEELINGS, NAME_GENDER, OBJECT_VERBS, generate_stories


def test_every_rule_has_positions_with_the_allowed_words():
    cases = [c for story in generate_stories(30, seed=5) for c in _rule_prefixes(story)]
    assert {rule for rule, _, _ in cases} == set(RULES)
    for rule, prefix, allowed in cases:
        last = prefix.split()[-1]
        if rule == "conjunction":  # "<Hero> took a <temp> <time>" -> the exclusive or's answer
            temp, time = prefix.split()[-2:]
            assert prefix.split()[-5] in NAME_GENDER and allowed == (CONJUNCTION_ANSWERS[temp, time],)
        elif rule == "object_verb":
            obj = prefix.split()[-2].rstrip(".")
            assert last in ("He", "She") and allowed == (OBJECT_VERBS[obj],)
        elif rule == "negation":
            feeling, negated = prefix.split()[-2].rstrip("."), prefix.split()[-3] == "not"
            f = FEELINGS[feeling]
            assert allowed == (f.negative if negated else f.positive)
        elif rule == "pronoun":
            assert prefix.endswith(".") and allowed in (("He",), ("She",))
        else:  # name_recall: only names introduced before the position
            assert allowed and all(prefix.count(f"named {n}") == 1 for n in allowed)


def test_an_unbound_object_decides_the_pronoun_but_no_verb():
    story = "Once upon a time, there was a little girl named Lily. Lily found a red rock. She kept it all day."
    rules = [(rule, allowed) for rule, _, allowed in _rule_prefixes(story)]
    assert ("pronoun", ("She",)) in rules and not [r for r, _ in rules if r == "object_verb"]


def test_gender_sides_centres_on_the_mean_name():
    # Every name pushes ' she' (a common offset), but girls more: all on their side once centred.
    values = {"Lily": 5.0, "Mia": 4.0, "Tom": 1.0, "Ben": 2.0}
    right, centre = gender_sides(values)
    assert centre == 3.0 and sorted(right) == ["Ben", "Lily", "Mia", "Tom"]
    right, _ = gender_sides({"Lily": 1.0, "Mia": 4.0, "Tom": 3.0, "Ben": 2.0})
    assert sorted(right) == ["Ben", "Mia"]


def test_behaviour_of_an_untrained_model_is_near_chance(tokenizer):
    from hooked_bilinear import HookedBilinearConfig, HookedBilinearTransformer

    cfg = HookedBilinearConfig(d_model=32, d_head=8, n_heads=4, n_layers=1, n_ctx=256, d_vocab=len(tokenizer),
                               d_mlp=64, seed=0)
    scores = behaviour(HookedBilinearTransformer(cfg, tokenizer=tokenizer).eval(), n_stories=4)
    assert set(scores) == set(RULES)
    for rule, (accuracy, positions) in scores.items():
        assert positions > 0 and 0.0 <= accuracy <= 0.5, (rule, accuracy)


def test_weight_recall_reads_every_rule_from_a_model(tokenizer):
    """Runs end to end on an untrained model (what it names is noise; the bookkeeping is checked; one
    typical competitor, the closed form, keeps it quick)."""
    import torch

    from hooked_bilinear import HookedBilinearConfig, HookedBilinearTransformer
    from training.rule_recall import weight_recall

    cfg = HookedBilinearConfig(d_model=32, d_head=16, n_heads=2, n_layers=2, n_ctx=64, d_vocab=len(tokenizer),
                               d_mlp=64, seed=0)
    model = HookedBilinearTransformer(cfg, tokenizer=tokenizer).eval()
    counts = torch.zeros(len(tokenizer), dtype=torch.long)
    for story in generate_stories(20, seed=3):
        counts += torch.bincount(torch.tensor(tokenizer(story.lower())["input_ids"]), minlength=len(tokenizer))
    model.token_counts = counts
    results = weight_recall(model, competitors=1.0)
    assert set(results) == set(RULES)
    assert results["object_verb"].n_cases == len(OBJECT_VERBS) and results["negation"].n_cases == len(FEELINGS)
    for rule, r in results.items():
        assert 0.0 <= r.recall <= 1.0 and r.details, rule
    assert "interaction of ' not' with" in results["negation"].details[0]
    assert "they differ by" in results["conjunction"].details[-1]
    assert any(d.startswith("a name's own evidence by how far back") for d in results["name_recall"].details)

    # Cases are checked on real sentences: a line per miss, the count of those the data backs, and
    # how many cases' triggers drive the target at all.
    from training.rule_recall import Case, check_cases

    verbs = [" " + v for v in OBJECT_VERBS.values()]
    target = ([" kicked"], [v for v in verbs if v != " kicked"])
    results["object_verb"].cases = [Case("object_verb", "ball", target, " ball", " found"),
                                    Case("object_verb", "ball", target, " ball", " ball")]
    assert [c.hit for c in results["object_verb"].cases] == [False, True] and len(results["object_verb"].misses) == 1
    before = len(results["object_verb"].details)
    check_cases(model, {"object_verb": results["object_verb"]}, n_stories=10, per_case=2)
    line, summary = results["object_verb"].details[before:]
    assert line.startswith("data check, ball: hiding ' ball'") and summary.startswith("data check: the trigger moves")
    import re

    trig, named = (float(x) for x in re.findall(r"moves the target ([-+][0-9.]+), hiding ' found' ([-+][0-9.]+)", line)[0])
    unused = max(trig, named) < 1.0  # untrained model: neither token may drive the target
    assert results["object_verb"].misses_trigger_unused == unused
    assert results["object_verb"].misses_data_agrees == (not unused and named > trig)
    assert line.endswith("does not read the trigger here" if unused else ("weights" if named > trig else "rule"))
    # The same trigger in the same sentences: both cases are driven, or neither; only the hit counts.
    assert results["object_verb"].driven == (0 if trig < 1.0 else 2)
    assert results["object_verb"].driven_hits == (0 if trig < 1.0 else 1)


def test_hiding_the_first_token_is_the_model_without_it():
    """No position attends to a hidden one; hiding position 0 leaves every other relative offset
    as it was, so it is exactly the model on the rest of the sequence."""
    import torch

    from hooked_bilinear import HookedBilinearConfig, HookedBilinearTransformer
    from training.rule_recall import hidden_readout

    model = HookedBilinearTransformer(HookedBilinearConfig(d_model=32, d_head=8, n_layers=2, n_ctx=16, d_vocab=40,
                                                           d_mlp=64, seed=2)).eval()
    tokens = torch.tensor([[5, 9, 12, 3, 7]])
    vec = torch.randn(40)
    with torch.no_grad():
        truth = float(model(tokens[:, 1:])[0, -1] @ vec)
    assert hidden_readout(model, tokens, [0], vec) == pytest.approx(truth, rel=1e-4, abs=1e-5)
    assert hidden_readout(model, tokens, [2], vec) != pytest.approx(float(model(tokens)[0, -1] @ vec), abs=1e-6)
