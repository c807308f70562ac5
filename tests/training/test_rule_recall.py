"""The planted-rule benchmark's bookkeeping: which positions each rule decides, and how cases count."""

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
