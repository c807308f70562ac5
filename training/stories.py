"""A built-in, deterministic generator of TinyStories-like children's stories.

The corpus exists so that the whole pipeline (tokenizer -> packing -> training -> weight-based
circuit analysis) runs offline in minutes on a CPU, and so that the analysis has *known answers*:
a few regularities are planted in the text, strictly (they hold in 100% of the stories), and are
exposed as data (``PLANTED_RULES`` and the tables below) so tests and ``circuits`` can check that a
trained model learned them and that its weights show them.

A story looks like::

    Once upon a time, there was a little girl named Lily. She lived in a small house near the park.
    One day, Lily went to the beach with her mom. There, Lily found a red ball. She kicked it all day.
    Then, Lily met a dog named Max. Lily was not happy. She cried for a long time. ...
    From that day on, Lily and Max were best friends.

Planted rules (each one is a ``PlantedRule`` in ``PLANTED_RULES``; ``check_story`` verifies all):

* ``negation`` - negation flips the feeling's follow-up. A sentence ``"<Name> was <feeling>."`` is
  always followed by ``"<Pronoun> <word> ..."`` with ``word`` in ``FEELINGS[feeling].positive``;
  ``"<Name> was not <feeling>."`` is always followed by a word in ``FEELINGS[feeling].negative``.
  Whether ``not`` appears is a coin flip independent of everything before it, so only the token
  ``not`` tells the two cases apart. Follow-up words occur nowhere else and the sets are disjoint.
* ``object_verb`` - an object determines its verb. ``"<Name> found a <adj> <object>."`` is always
  followed by ``"<Pronoun> <OBJECT_VERBS[object]> it ..."``; each verb belongs to exactly one
  object and occurs nowhere else, so the verb is predictable only from the object token, which
  sits a few tokens back (behind the adjective, the period and the pronoun). The same sentence
  also comes with objects that have no verb of their own (``UNBOUND_OBJECTS``, followed by a coin
  flip between ``UNBOUND_VERBS``; version 5). Without them a model could say one verb by default
  after "found a ..." and let the other nine objects override it: in version 4 a model did so
  for 1 of 10 objects in about half the runs (behaviour 1.00 without reading that object; see
  docs/rule-recall.md). With them, the default would lose to the unbound verbs, so a verb is
  said reliably only by reading its object.
* ``name_recall`` - names recur (induction). Every name in a story is first introduced right after
  ``"named"``; names are drawn at random per story, so every later mention can only be predicted by
  copying from the introduction. The last sentence is always
  ``"From that day on, <hero> and <friend> were best friends."``.
* ``pronoun`` - a name fixes its pronoun. Every follow-up sentence of the two rules above starts
  with ``He``/``She`` matching ``NAME_GENDER`` of the name that opened the previous sentence.
* ``conjunction`` - an answer fixed by two words together. ``"<Hero> took a <temp> <time> <answer>
  ..."`` (temp in ``hot``/``cold``, time in ``morning``/``night``, each a fair coin) with answer
  ``swim`` when (hot, morning) or (cold, night) and ``walk`` otherwise (``CONJUNCTION_ANSWERS``):
  an exclusive or, so neither word alone says anything about the answer and only their
  interaction does (object_verb and negation can be solved additively). The answer comes right
  after the two words: with a sentence between them and the answer (version 2: "It was a hot
  morning. Tom swam") or one token ("took a hot morning to swim"), a 2-layer CPU model stayed at
  chance (behaviour 0.50-0.58 at 600-5000 steps; 0.48 at 2000 for the one-token variant, an
  experiment not kept in the repository).

Vocabulary is a few hundred words, so a model with a 4096-token (or smaller) tokenizer and a
couple of layers learns the corpus quickly.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

# Bump when the grammar changes, so on-disk caches keyed by it are rebuilt.
GENERATOR_VERSION = "5"

GIRL_NAMES = ("Lily", "Mia", "Sue", "Anna", "Amy", "Lucy", "Emma", "Sara", "Zoe", "Kim", "Ella", "Rose")
BOY_NAMES = ("Tom", "Ben", "Max", "Sam", "Tim", "Jack", "Leo", "Bob", "Jake", "Dan", "Finn", "Joe")
NAME_GENDER: dict[str, str] = {**{n: "she" for n in GIRL_NAMES}, **{n: "he" for n in BOY_NAMES}}
NAMES = GIRL_NAMES + BOY_NAMES

# What the friend is; the hero is always a little girl/boy matching the name's gender.
FRIEND_KINDS = ("dog", "cat", "bird", "bunny", "bear", "frog", "duck", "fox")
PLACES = ("park", "beach", "forest", "garden", "farm", "lake", "hill", "town", "zoo", "river")
HOMES = ("small house", "big house", "little town", "blue house", "quiet village")
RELATIVES = ("mom", "dad", "grandma", "grandpa", "sister", "brother")
ADJECTIVES = ("red", "blue", "green", "yellow", "big", "small", "shiny", "soft", "old", "new", "pretty")

# Rule ``object_verb``: one verb per object, never reused.
OBJECT_VERBS: dict[str, str] = {
    "ball": "kicked",
    "book": "read",
    "cake": "ate",
    "kite": "flew",
    "drum": "banged",
    "doll": "hugged",
    "boat": "sailed",
    "flower": "smelled",
    "car": "pushed",
    "hat": "wore",
}
# Objects that share the rule's sentence but not its rule: their verb is a coin flip between
# UNBOUND_VERBS (which occur nowhere else), so "found a <adj> <object>. He" names no verb by itself.
UNBOUND_OBJECTS = ("stick", "shell", "rock", "box", "cup", "leaf")
UNBOUND_VERBS = ("kept", "carried")
OBJECT_TAILS = ("all day", "with a big smile", "again and again", "for a long time", "in the sun")


@dataclass(frozen=True)
class Feeling:
    """Follow-up words of one feeling: after ``was <word>`` and after ``was not <word>``."""

    word: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]


# Rule ``negation``: disjoint follow-up sets, so the trigger (feeling, negated) fixes the set.
FEELINGS: dict[str, Feeling] = {
    "happy": Feeling("happy", positive=("smiled", "laughed"), negative=("cried", "frowned")),
    "scared": Feeling("scared", positive=("hid", "shook"), negative=("waved", "clapped")),
    "tired": Feeling("tired", positive=("yawned", "slept"), negative=("jumped", "danced")),
}
FOLLOWUP_TAILS = ("for a long time", "a lot", "and looked around", "very much", "again")

# Rule ``conjunction``: an exclusive or of two coin flips; the four words, "took" and the two
# answers occur nowhere else.
CONJUNCTION_ANSWERS: dict[tuple[str, str], str] = {
    ("hot", "morning"): "swim",
    ("cold", "night"): "swim",
    ("hot", "night"): "walk",
    ("cold", "morning"): "walk",
}
CONJUNCTION_TAILS = ("for a while", "with a friend", "until lunch", "all the time")

# Sentences with no trigger or follow-up words; they vary the distance between rule instances.
FILLERS = (
    "The sun was warm and the sky was blue.",
    "The birds sang in the trees.",
    "It was a nice day.",
    "The wind was soft and cool.",
    "There were many big trees.",
    "Everything was quiet.",
)


@dataclass(frozen=True)
class PlantedRule:
    """A regularity that holds in every generated story.

    ``triggers`` maps a trigger (a word, or ``"not <word>"``) to the words allowed to follow it
    where ``description`` says; an empty tuple means "copied from the context" (names).
    """

    name: str
    description: str
    triggers: dict[str, tuple[str, ...]]


PLANTED_RULES: dict[str, PlantedRule] = {
    "negation": PlantedRule(
        "negation",
        '"<Name> was [not] <feeling>." is followed by "<Pronoun> <word>", word in the set of the '
        "trigger below; the sets are disjoint and occur nowhere else.",
        {
            **{f.word: f.positive for f in FEELINGS.values()},
            **{f"not {f.word}": f.negative for f in FEELINGS.values()},
        },
    ),
    "object_verb": PlantedRule(
        "object_verb",
        '"<Name> found a <adj> <object>." is followed by "<Pronoun> <verb> it"; one verb per object '
        "(objects with no verb of their own share the sentence, followed by a coin flip between two others).",
        {obj: (verb,) for obj, verb in OBJECT_VERBS.items()},
    ),
    "name_recall": PlantedRule(
        "name_recall",
        'Every name is introduced after "named" before any other mention; the final sentence is '
        '"From that day on, <hero> and <friend> were best friends."',
        {"named": ()},
    ),
    "conjunction": PlantedRule(
        "conjunction",
        '"<Hero> took a <temp> <time>" is followed by <answer>, an exclusive or of temp and time, so '
        "only the pair predicts it.",
        {f"{temp} {time}": (answer,) for (temp, time), answer in CONJUNCTION_ANSWERS.items()},
    ),
    "pronoun": PlantedRule(
        "pronoun",
        "Follow-up sentences start with the pronoun of the name that opened the previous sentence.",
        {name: (gender,) for name, gender in NAME_GENDER.items()},
    ),
}


def _cap(word: str) -> str:
    return word[0].upper() + word[1:]


def _object_episode(rng: random.Random, name: str, obj: str) -> list[str]:
    pronoun = _cap(NAME_GENDER[name])
    verb = OBJECT_VERBS[obj] if obj in OBJECT_VERBS else rng.choice(UNBOUND_VERBS)
    return [
        f"{name} found a {rng.choice(ADJECTIVES)} {obj}.",
        f"{pronoun} {verb} it {rng.choice(OBJECT_TAILS)}.",
    ]


def _feeling_episode(rng: random.Random, name: str) -> list[str]:
    feeling = FEELINGS[rng.choice(sorted(FEELINGS))]
    negated = rng.random() < 0.5  # independent of the context: only "not" decides
    words = feeling.negative if negated else feeling.positive
    pronoun = _cap(NAME_GENDER[name])
    return [
        f"{name} was {'not ' if negated else ''}{feeling.word}.",
        f"{pronoun} {rng.choice(words)} {rng.choice(FOLLOWUP_TAILS)}.",
    ]


def _conjunction_episode(rng: random.Random, name: str) -> list[str]:
    temp, time = rng.choice(("hot", "cold")), rng.choice(("morning", "night"))
    return [f"{name} took a {temp} {time} {CONJUNCTION_ANSWERS[temp, time]} {rng.choice(CONJUNCTION_TAILS)}."]


def generate_story(rng: random.Random) -> str:
    """One story drawn from ``rng`` (a ``random.Random``); see the module docstring for its rules."""
    hero, friend = rng.sample(NAMES, 2)
    kid = "girl" if NAME_GENDER[hero] == "she" else "boy"
    he, his = NAME_GENDER[hero], "her" if NAME_GENDER[hero] == "she" else "his"
    place = rng.choice(PLACES)
    objects = rng.sample(sorted(OBJECT_VERBS), 2)

    intro = [f"Once upon a time, there was a little {kid} named {hero}."]
    intro.append(
        rng.choice(
            (
                f"{_cap(he)} lived in a {rng.choice(HOMES)} near the {rng.choice(PLACES)}.",
                f"{_cap(he)} liked to play outside every day.",
                f"{_cap(he)} had a lot of toys.",
            )
        )
    )
    intro.append(f"One day, {hero} went to the {place} with {his} {rng.choice(RELATIVES)}.")

    # The middle: episodes in a random order, with optional fillers, so each rule is seen at
    # many positions and distances.
    episodes: list[list[str]] = [
        _object_episode(rng, hero, objects[0]),
        [f"Then, {hero} met a {rng.choice(FRIEND_KINDS)} named {friend}."],
        _feeling_episode(rng, hero),
    ]
    # Episodes about the friend must come after the friend is introduced (rule name_recall).
    later: list[list[str]] = [_feeling_episode(rng, friend)]
    if rng.random() < 0.6:
        later.append(_object_episode(rng, friend, objects[1]))
    if rng.random() < 0.5:
        later.append([f"{friend} and {hero} played at the {place}."])
    # Per story 1.6 rule objects (0.16 per object) against 0.5 unbound ones (0.25 per unbound verb):
    # a default verb would be wrong more often than right.
    if rng.random() < 0.5:
        later.append(_object_episode(rng, hero, rng.choice(UNBOUND_OBJECTS)))
    if rng.random() < 0.8:
        later.append(_conjunction_episode(rng, hero))
    rng.shuffle(later)
    middle = [episodes[0], episodes[2]]
    rng.shuffle(middle)
    body = [middle[0], episodes[1], middle[1], *later]
    sentences = intro
    for episode in body:
        if rng.random() < 0.25:
            sentences.append(rng.choice(FILLERS))
        sentences.extend(episode)
    sentences.append(f"From that day on, {hero} and {friend} were best friends.")
    return " ".join(sentences)


def generate_stories(n: int, seed: int = 0) -> list[str]:
    """``n`` stories, the same for the same ``seed``."""
    rng = random.Random(seed)  # a private stream: never touches the global random state
    return [generate_story(rng) for _ in range(n)]


# --- rule checking -----------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_FEELING_RE = re.compile(r"^([A-Z][a-z]+) was (not )?(\w+)\.$")
_FOUND_RE = re.compile(r"^([A-Z][a-z]+) found a (\w+) (\w+)\.$")
_CONJ_RE = re.compile(r"^[A-Z][a-z]+ took a (hot|cold) (morning|night) (\w+) ")
_NAMED_RE = re.compile(r"named ([A-Z][a-z]+)")
_FINAL_RE = re.compile(r"^From that day on, ([A-Z][a-z]+) and ([A-Z][a-z]+) were best friends\.$")
_FOLLOWUPS = {w for f in FEELINGS.values() for w in f.positive + f.negative}
_VERBS = set(OBJECT_VERBS.values())
_UNBOUND_VERBS = set(UNBOUND_VERBS)
_CONJ_WORDS = {"took", "hot", "cold", "morning", "night", *CONJUNCTION_ANSWERS.values()}


def split_sentences(story: str) -> list[str]:
    """The sentences of a story, in order."""
    return _SENTENCE_END.split(story.strip())


def check_story(story: str) -> dict[str, tuple[int, int]]:
    """Check every planted rule on one story.

    Returns ``{rule_name: (occurrences, violations)}``; a correct story has zero violations.
    Follow-up words and verbs outside their place count as violations too, so the rules hold in
    both directions (trigger -> follow-up, follow-up -> trigger).
    """
    counts = {name: [0, 0] for name in PLANTED_RULES}
    sents = split_sentences(story)

    def expect(rule: str, ok: bool) -> None:
        counts[rule][0] += 1
        counts[rule][1] += not ok

    def follow(i: int) -> tuple[str, str]:
        words = sents[i + 1].split() if i + 1 < len(sents) else ["", ""]
        return words[0], words[1] if len(words) > 1 else ""

    for i, sent in enumerate(sents):
        if (m := _FEELING_RE.match(sent)) and m.group(3) in FEELINGS:
            name, negated, feeling = m.group(1), bool(m.group(2)), FEELINGS[m.group(3)]
            pronoun, word = follow(i)
            expect("negation", word in (feeling.negative if negated else feeling.positive))
            expect("pronoun", pronoun.lower() == NAME_GENDER.get(name))
        if m := _FOUND_RE.match(sent):
            name, obj = m.group(1), m.group(3)
            pronoun, word = follow(i)
            if obj in UNBOUND_OBJECTS:  # not a case of the rule, but it must not use a rule verb
                if word not in _UNBOUND_VERBS:
                    expect("object_verb", False)
            else:
                expect("object_verb", word == OBJECT_VERBS.get(obj))
            expect("pronoun", pronoun.lower() == NAME_GENDER.get(name))
        if m := _CONJ_RE.match(sent):
            expect("conjunction", m.group(3) == CONJUNCTION_ANSWERS[m.group(1), m.group(2)])
        # Reverse direction: a follow-up word or verb must sit right after its trigger sentence.
        words = [w.strip(".,!?") for w in sent.split()]
        prev = sents[i - 1] if i else ""
        if not _CONJ_RE.match(sent) and _CONJ_WORDS & set(words):
            expect("conjunction", False)
        for w in words:
            if w in _FOLLOWUPS and not _FEELING_RE.match(prev):
                expect("negation", False)
            if w in _VERBS and not _FOUND_RE.match(prev):
                expect("object_verb", False)
            if w in _UNBOUND_VERBS and not ((m := _FOUND_RE.match(prev)) and m.group(3) in UNBOUND_OBJECTS):
                expect("object_verb", False)

    # name_recall: each name is introduced ("named X") before any other mention of it.
    introduced: set[str] = set()
    for sent in sents:
        intro = set(_NAMED_RE.findall(sent))
        for w in (w.strip(".,!?") for w in sent.split()):
            if w in NAME_GENDER:
                expect("name_recall", w in introduced or w in intro)
        introduced |= intro
    final = _FINAL_RE.match(sents[-1])
    expect("name_recall", bool(final) and set(final.groups()) <= introduced)
    return {name: (c[0], c[1]) for name, c in counts.items()}


def check_stories(stories: list[str]) -> dict[str, tuple[int, int]]:
    """``check_story`` summed over many stories."""
    total = {name: [0, 0] for name in PLANTED_RULES}
    for story in stories:
        for name, (n, bad) in check_story(story).items():
            total[name][0] += n
            total[name][1] += bad
    return {name: (c[0], c[1]) for name, c in total.items()}


# --- writing a corpus --------------------------------------------------------------------------

CORPUS_DESCRIPTION = (
    "# Built-in stories corpus (hooked-bilinear)\n\n"
    "Synthetic TinyStories-like children's stories from `training/stories.py` "
    f"(generator version {GENERATOR_VERSION}). One story per row, column `text`.\n\n"
    "Planted rules (hold in 100% of the stories):\n\n"
    + "".join(f"* `{r.name}`: {r.description}\n" for r in PLANTED_RULES.values())
)


# The dataset card's YAML block: names the split files for `datasets.load_dataset(folder)` (without it
# `datasets` would also scan `dataset/`) and keeps huggingface_hub from warning "Repo card metadata
# block was not found" whenever the folder is loaded.
CARD_METADATA = (
    "---\nconfigs:\n- config_name: default\n  data_files:\n"
    "  - split: train\n    path: train.jsonl\n  - split: validation\n    path: validation.jsonl\n---\n"
)


def write_corpus(out_dir: str | Path, n_train: int, n_valid: int, seed: int = 0) -> dict[str, Path]:
    """Write ``n_train``/``n_valid`` stories to ``out_dir`` and return the paths written.

    Writes ``train.jsonl`` and ``validation.jsonl`` (one ``{"text": ...}`` per line), a
    ``datasets.DatasetDict`` saved with ``save_to_disk`` under ``dataset/``, and ``README.md``.
    Keys of the result: ``"train"``, ``"validation"``, ``"dataset"``, ``"readme"``.
    """
    import datasets  # heavy; only needed here

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stories = generate_stories(n_train + n_valid, seed)
    splits = {"train": stories[:n_train], "validation": stories[n_train:]}
    paths: dict[str, Path] = {}
    for split, texts in splits.items():
        path = out / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
        paths[split] = path
    dd = datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()})
    paths["dataset"] = out / "dataset"
    dd.save_to_disk(str(paths["dataset"]))
    paths["readme"] = out / "README.md"
    paths["readme"].write_text(
        CARD_METADATA + CORPUS_DESCRIPTION + f"\nseed {seed}, {n_train} train / {n_valid} validation stories.\n",
        encoding="utf-8",
    )
    return paths
