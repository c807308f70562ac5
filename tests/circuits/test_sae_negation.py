"""End to end at tiny size (the README's "SAE features" example in miniature): train a 1-layer bilinear
model on the story corpus's negation rule ("was <feeling> . she <positive word>", "was not <feeling> .
she <negative word>"), train SAEs with SAELens on the MLP's output and input, and find the rule
between SAE features from the weights: an output feature that fires on negated follow-ups, whose top
input-feature interactions pair a ' not' feature with a feeling-word feature."""

import re

import pytest
import torch

pytest.importorskip("sae_lens")

from circuits.sae import input_basis, output_features  # noqa: E402
from circuits.sae_features import (check_output_features, eigen_correlation, top_activating_tokens,  # noqa: E402
                                   top_interactions)
from circuits.sae_training import train_sae  # noqa: E402
from hooked_bilinear import HookedBilinearConfig, HookedBilinearTransformer  # noqa: E402

from ..conftest import make_word_tokenizer

FEELINGS = {"happy": (("smiled", "laughed"), ("cried", "frowned")),
            "tired": (("yawned", "slept"), ("jumped", "danced")),
            "scared": (("hid", "shook"), ("waved", "clapped"))}
FILLERS = "the a and then it day park big red sun tree ball".split()
VOCAB = ["<|endoftext|>", "[UNK]", "was", "not", ".", "she", *FEELINGS,
         *(w for pos, neg in FEELINGS.values() for w in (*pos, *neg)), *FILLERS]
T = 16


def word_tokenizer():
    return make_word_tokenizer(VOCAB)


def batch(g: torch.Generator, b: int) -> torch.Tensor:
    """Rows of fillers with one episode "was [not] <feeling> . she <follow-up>" at a random place."""
    rows = []
    for _ in range(b):
        words = [FILLERS[int(i)] for i in torch.randint(0, len(FILLERS), (T,), generator=g)]
        feeling = list(FEELINGS)[int(torch.randint(0, 3, (), generator=g))]
        negated = bool(torch.rand((), generator=g) < 0.5)
        follow = FEELINGS[feeling][1 if negated else 0][int(torch.randint(0, 2, (), generator=g))]
        episode = ["was", *(["not"] if negated else []), feeling, ".", "she", follow]
        start = int(torch.randint(0, T - len(episode) + 1, (), generator=g))
        words[start:start + len(episode)] = episode
        rows.append([VOCAB.index(w) for w in words])
    return torch.tensor(rows)


def train_model(steps: int = 300) -> HookedBilinearTransformer:
    torch.manual_seed(0)
    cfg = HookedBilinearConfig(d_model=32, d_head=8, n_heads=4, n_layers=1, n_ctx=T, d_vocab=len(VOCAB), d_mlp=64,
                               seed=0, initializer_range=0.1)
    model = HookedBilinearTransformer(cfg, tokenizer=word_tokenizer())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = model(batch(g, 64), return_type="loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def train_saes(model: HookedBilinearTransformer, training_tokens: int = 40_000):
    corpus = batch(torch.Generator().manual_seed(1), 256)
    kw = dict(k=4, training_tokens=training_tokens, batch_tokens=512)
    return train_sae(model, "blocks.0.hook_mlp_out", corpus, **kw), train_sae(model, "blocks.0.ln2.hook_normalized", corpus, **kw)


@pytest.fixture(scope="module")
def trained():
    # Tiny matrices: a second thread only adds contention on a busy machine (minutes instead of seconds).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = train_model()
        return (model, *train_saes(model), batch(torch.Generator().manual_seed(2), 128))
    finally:
        torch.set_num_threads(n)


def test_negation_circuit_between_sae_features(trained):
    model, out_sae, in_sae, tokens = trained
    out = output_features(model, out_sae)
    rep = check_output_features(model, out, tokens, sae_object=out_sae)
    assert rep.max_abs_error < 1e-4 * max(1.0, rep.max_abs_value)

    # the output feature that fires most selectively where a negated follow-up comes next
    neg = [VOCAB.index(w) for _, n in FEELINGS.values() for w in n]
    nxt = torch.zeros_like(tokens, dtype=torch.bool)
    nxt[:, :-1] = torch.isin(tokens[:, 1:], torch.tensor(neg))
    _, cache = model.run_with_cache(tokens)
    f = out.sae.encode(cache["blocks.0.hook_mlp_out"]).reshape(-1, out.sae.d_sae)
    m = nxt.reshape(-1)
    feature = int((f[m].mean(0) - f[~m].mean(0)).argmax())
    assert f[m, feature].mean() > 3 * f[~m, feature].mean()

    basis = input_basis(model, in_sae)
    top = top_interactions(model, basis, output_features(model, out_sae, features=[feature]), k=5,
                           sign="positive")[0]
    assert top.zscores[0] > 3  # it stands out from the bulk of interactions
    ids = sorted({int(i) for i in top.pairs.flatten()})
    labels = top_activating_tokens(model, basis.sae, tokens, ids, k=3, context=3)
    words = {w for i in ids for ctx, _ in labels[i] for w in re.findall(r"\w+", ctx)}
    assert "not" in words and words & set(FEELINGS), labels

    corr = eigen_correlation(model, out, tokens, ks=(2,))
    assert corr.fraction_above(0.75, k=2) > 0.3
