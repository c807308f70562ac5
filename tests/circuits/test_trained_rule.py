"""Proof that circuit finding names real structure: train a tiny bilinear model (seconds, CPU) on a
synthetic "object -> verb" rule (each object token is always followed by its own verb, as in the story
corpus's planted rule), then recover the rule from the weights alone.

The verb's logit direction u has MLP interaction matrix Q(u); its top positive eigenvector is the input
feature that makes the MLP push that verb. Read back through the embeddings it must name the verb's
object, for every object, while an untrained model with the same initialisation does not.
"""

import pytest
import torch

from circuits.find import find_circuit
from circuits.readout import direct_token_table
from hooked_bilinear import HookedBilinearConfig, HookedBilinearTransformer

from ..conftest import make_word_tokenizer

OBJECT_VERBS = {"ball": "kicked", "book": "read", "cake": "ate", "kite": "flew", "drum": "banged", "doll": "hugged"}
FILLERS = "the a and then she he was big red park day".split()
LINK = "it"  # in the two-step rule, "<object> it <verb>": the verb is predicted at "it"
VOCAB = ["<|endoftext|>", "[UNK]", *OBJECT_VERBS, *OBJECT_VERBS.values(), *FILLERS, LINK]


def word_tokenizer():
    return make_word_tokenizer(VOCAB)


OBJ = torch.tensor([VOCAB.index(o) for o in OBJECT_VERBS])
VERB = torch.tensor([VOCAB.index(v) for v in OBJECT_VERBS.values()])
FILL = torch.tensor([VOCAB.index(f) for f in FILLERS])


def batch(g: torch.Generator, b: int = 64, T: int = 16, gap: bool = False) -> torch.Tensor:
    """Random fillers; at about a quarter of the positions an object, always followed by its verb
    (gap: by "it" and then its verb, so only a head that looks back can tell the verb)."""
    toks = FILL[torch.randint(0, len(FILL), (b, T), generator=g)]
    is_filler = lambda col: (toks[:, col, None] == FILL).any(-1)
    width = 3 if gap else 2
    for t in range(T - width + 1):
        put = (torch.rand(b, generator=g) < 0.25) & is_filler(t) & is_filler(t + width - 1)
        if gap:
            put &= is_filler(t + 1)
        o = torch.randint(0, len(OBJ), (b,), generator=g)
        toks[put, t], toks[put, t + width - 1] = OBJ[o[put]], VERB[o[put]]
        if gap:
            toks[put, t + 1] = VOCAB.index(LINK)
    return toks


def make_model(seed: int) -> HookedBilinearTransformer:
    cfg = HookedBilinearConfig(d_model=32, d_head=8, n_heads=4, n_layers=1, n_ctx=16, d_vocab=len(VOCAB),
                               d_mlp=64, seed=seed, initializer_range=0.1)
    return HookedBilinearTransformer(cfg, tokenizer=word_tokenizer())


def train(seed: int, steps: int = 300, gap: bool = False) -> HookedBilinearTransformer:
    torch.manual_seed(seed)
    model = make_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(len(VOCAB), dtype=torch.long)  # what training records: tokens seen in the text
    for _ in range(steps):
        x = batch(g, gap=gap)
        counts += torch.bincount(x.flatten(), minlength=len(VOCAB))
        loss = model(x, return_type="loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.token_counts = counts
    return model.eval()


def rule_readout(model: HookedBilinearTransformer) -> dict[str, list[str]]:
    """For each verb, from the weights alone: the top direct-path tokens of the largest-positive-
    eigenvalue MLP feature in the circuit of the verb's logit."""
    found = {}
    for obj, verb in OBJECT_VERBS.items():
        graph = find_circuit(model, " " + verb, k_features=4)
        pushing = [n for n in graph.by_kind("mlp_feature") if n.eigenvalue > 0]
        # An untrained model's circuit may keep no pushing feature at all: then it names nothing.
        found[obj] = max(pushing, key=lambda n: n.eigenvalue).top_token_strings(3) if pushing else []
    return found


@pytest.mark.parametrize("seed", [0, 1])
def test_circuit_of_a_verb_names_its_object(seed):
    model = train(seed)
    with torch.no_grad():  # the model learned the rule (this is the only forward pass on data)
        x = batch(torch.Generator().manual_seed(1000 + seed), 128)
        pred = model(x).argmax(-1)[:, :-1]
        after_object = (x[:, :-1, None] == OBJ).any(-1)
        assert float((pred[after_object] == x[:, 1:][after_object]).float().mean()) > 0.95

    found = rule_readout(model)
    # Every verb's strongest pushing feature reads first as its own object, out of all 26 tokens.
    assert {obj: tokens[0] for obj, tokens in found.items()} == {obj: obj for obj in OBJECT_VERBS}, found

    # The MLP's direct token-to-token table agrees: the object is among the two input tokens that
    # raise its verb's logit most.
    table = direct_token_table(model, 0, VERB.tolist())  # [n_verbs, d_vocab]
    top2 = table.topk(2, dim=-1).indices
    assert all(int(o) in top2[i].tolist() for i, o in enumerate(OBJ)), top2

    # Control: the same architecture and initialisation, untrained, does not show the rule.
    control = rule_readout(make_model(seed).eval())
    assert sum(tokens[:1] == [obj] for obj, tokens in control.items()) <= 2, control


def test_token_evidence_names_the_object_a_head_brings():
    """'<object> it <verb>': the verb is predicted at 'it', so the object reaches it only through
    attention. From the weights alone, the top context token for each verb (against the others)
    must be its object, found after the query 'it'; an untrained model must not show it."""
    from circuits.evidence import token_evidence

    model = train(0, steps=400, gap=True)
    with torch.no_grad():  # the model learned the rule
        x = batch(torch.Generator().manual_seed(77), 128, gap=True)
        pred = model(x).argmax(-1)[:, :-1]
        at_link = (x[:, :-1] == VOCAB.index(LINK)) & (x[:, 1:, None] == VERB).any(-1)
        assert float((pred[at_link] == x[:, 1:][at_link]).float().mean()) > 0.95

    def named(m):
        out = {}
        for obj, verb in OBJECT_VERBS.items():
            e = token_evidence(m, (verb, [v for v in OBJECT_VERBS.values() if v != verb]))
            out[obj] = (e.query, e.top_tokens(1)[0][0])
        return out

    found = named(model)
    assert all(query == LINK for query, _ in found.values()), found
    assert {obj: top for obj, (_, top) in found.items()} == {obj: obj for obj in OBJECT_VERBS}, found
    control_model = make_model(0).eval()
    control_model.token_counts = model.token_counts
    control = named(control_model)
    assert sum(obj == top for obj, (_, top) in control.items()) <= 2, control
