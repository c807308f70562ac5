import random
import re
from pathlib import Path

import pytest

from training import stories
from training.stories import (
    FEELINGS,
    NAME_GENDER,
    OBJECT_VERBS,
    PLANTED_RULES,
    UNBOUND_OBJECTS,
    UNBOUND_VERBS,
    check_stories,
    check_story,
    generate_stories,
    split_sentences,
    write_corpus,
)


@pytest.fixture(scope="module")
def many():
    return generate_stories(2000, seed=123)


def test_deterministic_for_a_seed():
    state = random.getstate()
    assert generate_stories(50, seed=7) == generate_stories(50, seed=7)
    assert generate_stories(50, seed=7) != generate_stories(50, seed=8)
    assert random.getstate() == state  # a private RNG: global state untouched
    assert len(set(generate_stories(200, seed=1))) == 200  # varied, not one template


def test_looks_like_tinystories(many):
    assert all(s.startswith("Once upon a time, there was a little ") for s in many)
    words = {w.strip(".,!?").lower() for s in many for w in s.split()}
    assert len(words) < 400  # small vocabulary: a tiny model can learn it quickly


def test_all_rules_hold_everywhere(many):
    totals = check_stories(many)
    assert set(totals) == set(PLANTED_RULES) == {"negation", "object_verb", "name_recall", "pronoun", "conjunction"}
    for name, (n, bad) in totals.items():
        assert n > 1000, name
        assert bad == 0, name


def test_conjunction_rule_is_an_exclusive_or(many):
    # Independent of check_story: the answer after "took a <temp> <time>" is fixed by the pair,
    # while each word alone leaves both answers equally likely.
    from training.stories import CONJUNCTION_ANSWERS

    seen = {}
    for s in many:
        for m in re.finditer(r"took a (hot|cold) (morning|night) (\w+)", s):
            temp, time, answer = m.groups()
            assert answer == CONJUNCTION_ANSWERS[temp, time], m.group(0)
            seen.setdefault(temp, []).append(answer)
            seen.setdefault(time, []).append(answer)
    for word in ("hot", "cold", "morning", "night"):
        share = seen[word].count("swim") / len(seen[word])
        assert 0.4 < share < 0.6, (word, share)  # one word alone: a coin flip


def test_negation_rule_by_regex(many):
    # Independent of check_story: every "was [not] <feeling>." is followed by the right word.
    seen = {}
    for s in many:
        for m in re.finditer(r"([A-Z]\w+) was (not )?(\w+)\. (He|She) (\w+)", s):
            name, neg, feeling, pronoun, word = m.groups()
            if feeling not in FEELINGS:
                continue
            allowed = FEELINGS[feeling].negative if neg else FEELINGS[feeling].positive
            assert word in allowed, m.group(0)
            assert pronoun.lower() == NAME_GENDER[name]
            seen[(feeling, bool(neg))] = seen.get((feeling, bool(neg)), 0) + 1
    assert len(seen) == 2 * len(FEELINGS) and min(seen.values()) > 100
    # Negation is a fair coin, so "not" is the only cue.
    for f in FEELINGS:
        assert 0.4 < seen[(f, True)] / (seen[(f, True)] + seen[(f, False)]) < 0.6
    # Follow-up sets are disjoint, so the trigger fixes the set.
    sets = [set(f.positive) for f in FEELINGS.values()] + [set(f.negative) for f in FEELINGS.values()]
    assert sum(map(len, sets)) == len(set().union(*sets))


def test_object_verb_rule_by_regex(many):
    counts = dict.fromkeys(OBJECT_VERBS, 0)
    after_unbound = dict.fromkeys(UNBOUND_VERBS, 0)
    for s in many:
        for m in re.finditer(r"found a (\w+) (\w+)\. (He|She) (\w+) it", s):
            if m.group(2) in UNBOUND_OBJECTS:
                after_unbound[m.group(4)] += 1
            else:
                assert m.group(4) == OBJECT_VERBS[m.group(2)], m.group(0)
                counts[m.group(2)] += 1
        # each verb only ever appears right after its object's sentence
        for verb in (*OBJECT_VERBS.values(), *UNBOUND_VERBS):
            assert s.count(f" {verb} ") == len(re.findall(rf"found a \w+ \w+\. (He|She) {verb} it", s))
    assert min(counts.values()) > 100
    assert len(set(OBJECT_VERBS.values())) == len(OBJECT_VERBS)
    # No verb can be said by default after "found a ...": each unbound verb follows that sentence more
    # often than any one rule verb does, so a model that skips reading one object gets it wrong.
    assert min(after_unbound.values()) > 1.2 * max(counts.values())
    assert not set(UNBOUND_OBJECTS) & set(OBJECT_VERBS) and not set(UNBOUND_VERBS) & set(OBJECT_VERBS.values())


def test_name_recall_rule(many):
    for s in many:
        sents = split_sentences(s)
        hero = re.search(r"named (\w+)\.$", sents[0]).group(1)
        friend = re.search(r"named (\w+)", s[len(sents[0]) :]).group(1)
        assert sents[-1] == f"From that day on, {hero} and {friend} were best friends."
        assert s.count(hero) >= 4 and hero != friend
        # no name mentioned before it is introduced
        assert s.index(friend) == s.index(f"named {friend}") + len("named ")


def test_check_story_catches_violations(many):
    story = next(s for s in many if " was happy. " in s and "found a " in s)
    assert all(bad == 0 for _, bad in check_story(story).values())
    m = re.search(r"was happy\. (He|She) (\w+)", story)
    broken = story.replace(m.group(0), f"was happy. {m.group(1)} cried")
    assert check_story(broken)["negation"][1] >= 1
    obj, verb = re.search(r"found a \w+ (\w+)\. \w+ (\w+)", story).groups()
    other = next(v for o, v in OBJECT_VERBS.items() if o != obj)
    assert check_story(story.replace(f" {verb} it", f" {other} it"))["object_verb"][1] >= 1
    assert check_story(story.replace(f" {verb} it", f" {UNBOUND_VERBS[0]} it"))["object_verb"][1] >= 1
    unbound = next(s for s in many if re.search(rf"found a \w+ {UNBOUND_OBJECTS[0]}\.", s))
    assert all(bad == 0 for _, bad in check_story(unbound).values())
    bound_verb = re.sub(rf"({UNBOUND_OBJECTS[0]}\. \w+) \w+", r"\1 kicked", unbound)
    assert check_story(bound_verb)["object_verb"][1] >= 1
    swapped = story.replace(" He ", " She ") if " He " in story else story.replace(" She ", " He ")
    assert check_story(swapped)["pronoun"][1] >= 1


def test_write_corpus(tmp_path):
    import datasets

    paths = write_corpus(tmp_path / "c", n_train=30, n_valid=5, seed=3)
    assert set(paths) == {"train", "validation", "dataset", "readme"}
    dd = datasets.load_from_disk(str(paths["dataset"]))
    assert dd["train"]["text"] == generate_stories(35, seed=3)[:30]
    assert len(dd["validation"]) == 5
    assert len(paths["train"].read_text().splitlines()) == 30
    readme = paths["readme"].read_text()
    assert all(name in readme for name in PLANTED_RULES)
    assert stories.CORPUS_DESCRIPTION in readme


def test_import_training_is_light():
    import subprocess
    import sys

    heavy = "{'datasets', 'torch', 'transformers'}"
    code = f"import sys, training, training.stories; assert not {heavy} & set(sys.modules)"
    root = Path(stories.__file__).parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(root))
