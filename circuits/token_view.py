"""The model reading one token at a time: effective embeddings, from the weights alone.

A head of layer l > 0 does not read a token's raw embedding: it reads the residual stream at the
token's position, which earlier layers have already rewritten. The *effective embedding* of token t
at layer l is the residual entering layer l when the model reads t alone (the one-token sequence
[t]): the raw embedding plus what every earlier layer adds to it. It is a function of the weights
(no corpus) and a much closer stand-in for the residual a later head reads at t's position than
the raw embedding.

`TokenView` holds, for every live token: the effective embeddings of every layer, the norms'
scales there, the next-token log-probabilities after the token alone (which token a prediction is
made *after*), and the token's frequency in the training text (what a "typical" context holds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .competitors import COMPANY_SHARE, company_draw
from .pair_chain import PAIR_BRANCHING, PairChain, pair_chain
from .readout import Live, live_token_ids, live_token_mask


@dataclass
class TokenView:
    """Everything `circuits.evidence` needs about single tokens, for the live tokens `ids` [n].

    resid[l]: [n, d_model], the residual entering layer l (l = n_layers: the final residual);
    ln1_scale[l], ln2_scale[l]: [n], the norms' divisors at layer l (ones without a norm);
    log_probs: [n, d_vocab], next-token log-probabilities after the token alone;
    frequency: [n], each token's share of the training text (uniform without counts);
    pairs: the model after two tokens (`circuits.pair_chain`), for placements; None: one token."""

    ids: Tensor
    resid: list[Tensor]
    ln1_scale: list[Tensor]
    ln2_scale: list[Tensor]
    log_probs: Tensor
    frequency: Tensor
    pairs: Optional[PairChain] = None

    def index(self, token_id: int) -> int:
        """Position of a token id in `ids` (ValueError for a dead token)."""
        hits = (self.ids == int(token_id)).nonzero()
        if hits.numel() == 0:
            raise ValueError(f"token {token_id} is not live (it never occurs in the training text); pass live='all' to use it")
        return int(hits[0, 0])

    def offset_presence(self, query_index: int, offsets: Sequence[int], then: Optional[Tensor] = None) -> Tensor:
        """P(token s sits exactly `offsets[i]` positions before the query), in the model's own view of
        text: [len(offsets), n]; each row sums to 1 over the live tokens.

        With `pairs`, from the model after two tokens (`PairChain.offset_presence`). Without, the
        model after one token is a Markov chain over the live tokens (M[s, t]: the probability of t
        right after s alone, renormalized over live tokens; start: the training frequency), and by
        Bayes P(token s at offset k before q) = p(s) M^k[s, q] / sum_s' p(s') M^k[s', q].
        then: [n], the tokens that follow the query at the positions explained (the pair chain
        conditions on them; the one-token chain cannot, P(then | q) being one number)."""
        if self.pairs is not None:
            return self.pairs.offset_presence(query_index, offsets, then)
        return self._before(torch.tensor([query_index], device=self.ids.device), offsets)[..., 0]

    def company(self, span: int = 3) -> Tensor:
        """The company each live token keeps: row b is P(token j sits 1..span positions before b),
        the offsets equally weighted, under the one-token chain for every b at once (the pair chain
        for every b at once would be n^3 numbers): [n, n], rows summing to 1. Cached on the view
        (n^2 numbers; n^3 work to build)."""
        cache = self.__dict__.setdefault("_company", {})
        if span not in cache:
            every = torch.arange(self.ids.numel(), device=self.ids.device)
            cache[span] = self._before(every, range(1, span + 1)).mean(0).T.contiguous()  # [b, s]
        return cache[span]

    def _before(self, targets: Tensor, offsets: Sequence[int]) -> Tensor:
        """`offset_presence` under the one-token chain, for several target tokens at once:
        [len(offsets), n, len(targets)] (the context view draws every token's company from it)."""
        M = self.step()
        p = self.frequency.float()[:, None]
        reach = M[:, targets]  # M^k[:, targets], k = 1
        rows = {}
        for k in range(1, max(offsets) + 1):
            if k > 1:
                reach = M @ reach
            if k in offsets:
                at_k = p * reach
                rows[k] = at_k / at_k.sum(0, keepdim=True).clamp_min(1e-30)
        return torch.stack([rows[k] for k in offsets])

    def step(self) -> Tensor:
        """The one-token chain: P(t right after s alone), renormalized over the live tokens: [n, n]."""
        M = self.log_probs[:, self.ids].float().exp()
        return M / M.sum(-1, keepdim=True).clamp_min(1e-30)

    def each_token_draw(self) -> Tensor:
        """`competitor_draw` for rows that each place one live token, row b for token b: [n, n].
        Cached on the view (every head's expected attention uses it)."""
        if "_each_draw" not in self.__dict__:
            self.__dict__["_each_draw"] = self.competitor_draw(torch.arange(self.ids.numel(), device=self.ids.device))
        return self.__dict__["_each_draw"]

    def competitor_draw(self, tokens: Tensor, share: float = COMPANY_SHARE) -> Tensor:
        """Draw probabilities of the typical competitors [m, n] for rows that place `tokens` ([m], or
        [m, k] with -1 for an empty slot): training frequency, mixed at `share` with the company of
        the row's tokens (`company`, averaged over them; frequency alone for a row with none)."""
        tokens = tokens[:, None] if tokens.ndim == 1 else tokens
        C = self.company().to(self.frequency.dtype)
        present = (tokens >= 0).to(C.dtype)  # [m, k]
        mixed = torch.einsum("mk,mkn->mn", present, C[tokens.clamp_min(0)])
        count = present.sum(-1, keepdim=True)
        company = torch.where(count > 0, mixed / count.clamp_min(1), self.frequency[None])
        return company_draw(self.frequency, company, share)

    def bridge(self, query_index: int, offsets: Sequence[int]) -> Tensor:
        """The text between a token and the query: row s of block i is P(token t sits at a given
        position between s and the query | s sits `offsets[i]` before it), averaged over the
        offsets[i] - 1 positions between, under the one-token chain (P(t at j | s at k, q at 0) =
        M^{k-j}[s, t] M^j[t, q] / M^k[s, q]): [len(offsets), n, n] (zero rows at offset 1, or
        where the chain cannot put s there). Cached on the view."""
        cache = self.__dict__.setdefault("_bridge", {})
        key = (query_index, tuple(offsets))
        if key not in cache:
            M = self.step().double()  # powers up to 16 steps underflow in float32
            n = M.shape[0]
            powers = [torch.eye(n, dtype=M.dtype, device=M.device)]
            for _ in range(max(offsets)):
                powers.append(powers[-1] @ M)
            blocks = []
            for k in offsets:
                between = torch.zeros(n, n, dtype=M.dtype, device=M.device)
                for j in range(1, k):
                    between += powers[k - j] * powers[j][:, query_index][None, :]
                reach = powers[k][:, query_index][:, None]
                blocks.append(torch.where(reach > 1e-300, between / (max(k - 1, 1) * reach.clamp_min(1e-300)), 0.0))
            cache[key] = torch.stack(blocks).to(self.frequency.dtype)
        return cache[key]

    def placed_draw(self, query_index: int, offsets: Sequence[int], window: Sequence[int]) -> Tensor:
        """`each_token_draw` for each token placed at each offset before the query: [len(offsets), n, n].
        The competitors at the window's positions between the token and the query come from the
        text between them (`bridge`): ' jack' five tokens before '.' comes with "found a red ball",
        not with whatever is frequent."""
        between = torch.tensor([sum(1 for o in window if 0 < o < k) / max(len(window) - 1, 1) for k in offsets],
                               dtype=self.frequency.dtype, device=self.ids.device)[:, None, None]
        bridge = self.bridge(query_index, offsets)
        # A token the chain cannot put there has no bridge: its draw stays `each_token_draw`.
        share = between * (bridge.sum(-1, keepdim=True) > 0)
        return (1 - share) * self.each_token_draw()[None] + share * bridge

    def context_presence(self, query_index: int, offsets: Sequence[int], then: Optional[Tensor] = None) -> Tensor:
        """Probability that each live token sits at one of `offsets` positions before the query
        (`offset_presence`, the offsets combined as independent chances 1 - prod_k (1 - P_k); then:
        the query followed by those tokens): [n].
        A weights-only prior on which tokens can be in the query's context at all: ' cold' can
        precede ' night', ' mom' cannot."""
        return 1 - (1 - self.offset_presence(query_index, offsets, then)).prod(0)

    def normalized(self, layer: int) -> Tensor:
        """What ln1 of `layer` makes of each token's effective embedding, before its gain: [n, d_model]."""
        return self.resid[layer] / self.ln1_scale[layer][:, None]


@torch.no_grad()
def token_view(model: Any, live: Live = None, batch_size: int = 4096, pair_branching: int = PAIR_BRANCHING) -> TokenView:
    """Run the model on every live token alone (one forward pass per `batch_size` tokens), and on
    the likely pairs of them for placements (`circuits.pair_chain`; pair_branching=0: none, the
    one-token chain places tokens)."""
    ids = live_token_ids(model, live).to(model.W_E.device)
    n_layers = model.cfg.n_layers
    names = [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]
    names += [f"blocks.{l}.{ln}.hook_scale" for l in range(n_layers) for ln in ("ln1", "ln2")]
    names = [n for n in names if n in model.hook_dict]
    parts: dict[str, list[Tensor]] = {}
    log_probs = []
    for start in range(0, ids.numel(), batch_size):
        chunk = ids[start:start + batch_size, None]
        logits, cache = model.run_with_cache(chunk, names_filter=names)
        log_probs.append(logits[:, 0].float().log_softmax(-1))
        for name in names:
            parts.setdefault(name, []).append(cache[name][:, 0])
    cat = {name: torch.cat(values) for name, values in parts.items()}
    ones = torch.ones(ids.numel(), dtype=model.W_E.dtype, device=ids.device)
    scale = lambda l, ln: cat[f"blocks.{l}.{ln}.hook_scale"][:, 0] if f"blocks.{l}.{ln}.hook_scale" in cat else ones
    counts = getattr(model, "token_counts", None)
    if counts is not None and live_token_mask(model, live)[torch.as_tensor(counts).cpu() > 0].any():
        freq = torch.as_tensor(counts, dtype=torch.float32).to(ids.device)[ids]
        freq = freq / freq.sum() if float(freq.sum()) > 0 else torch.full_like(freq, 1.0 / ids.numel())
    else:
        freq = torch.full((ids.numel(),), 1.0 / ids.numel(), device=ids.device)
    view = TokenView(
        ids=ids,
        resid=[cat[f"blocks.{l}.hook_resid_pre"] for l in range(n_layers)] + [cat[f"blocks.{n_layers - 1}.hook_resid_post"]],
        ln1_scale=[scale(l, "ln1") for l in range(n_layers)],
        ln2_scale=[scale(l, "ln2") for l in range(n_layers)],
        log_probs=torch.cat(log_probs),
        frequency=freq,
    )
    if pair_branching > 0 and model.cfg.n_ctx >= 2:
        view.pairs = pair_chain(model, ids, view.step(), freq, pair_branching, batch_size)
    return view
