"""The model's view of text two tokens at a time: where a token sits before a query, from the weights.

`circuits.evidence` weighs each placement of a context token (1, 2, ... 16 tokens before the query)
by how likely the model's own view of text puts the token there. The one-token chain of
`TokenView` (the model after one token alone, as a Markov chain) forgets everything but the last
token, and that misplaces tokens whose sentence ends the same way as others: it believes
"toys . he" is as likely as "flower . he", because after "." alone ' he' is likely, while the model
itself, after "toys .", expects "one day" (a 3-layer model put ' toys' two tokens before ' he' with
the weight of a real object and named it for ' smelled').

The *pair chain* is the model after two tokens: `P(c | a, b)`, the next-token distribution of the
model run on [a, b], renormalized over the live tokens. Run on all n^2 pairs and kept whole it is
an n^3 table, so it is kept sparse with one parameter, `branching` (k):

* pairs: for each a, the k tokens b most likely right after a (the one-token chain's top k);
* continuations: for each such pair, the k most likely next tokens c, with their probabilities;
  the rest of the mass (`leftover`) backs off to the one-token chain's `P(c | b)`;
* any other pair (a, b) backs off to `P(c | b)` entirely.

So branching=0 is exactly the one-token chain and branching >= n the full second-order chain
(both tested), and its cost is n k model inputs of two tokens and n k^2 numbers.

Placements (`PairChain.offset_presence`): the probability that q comes exactly j tokens after b
given the last two tokens (a, b) is r_j[a, b], with r_0[a, b] = [b == q] and
r_j[a, b] = sum_c P(c | a, b) r_{j-1}[b, c]; then P(s sits k before q) is proportional to
p(s) sum_b P(b | s) r_{k-1}[s, b] (the first step has only s to go on), p the training frequency.

A query is followed by many things, and the placements of a rule are those of the query *followed
by the rule's words*: the '.' before "she" ends "lily was happy." (the name 4 tokens back), while
the average '.' also ends "the birds sang in the trees." (the last name further back). With
`then` (the tokens that follow), r_0[a, q] = P(then | a, q) instead of 1: the pair (a, q) weighed
by how likely it is followed by them. The one-token chain cannot condition so (P(then | q) is the
same for every placement).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

PAIR_BRANCHING = 32  # pairs kept per first token, and continuations kept per pair


@dataclass
class PairChain:
    """The sparse pair chain over n live tokens (indices into the view's `ids`, see the module
    docstring).

    step: [n, n], the one-token chain P(b | a); frequency: [n], where a chain starts;
    second: [n, k], the tokens b whose pair (a, b) was run; next: [n, k, k], the kept continuations
    c of each pair, with probabilities `p_next` [n, k, k]; leftover: [n, k], the mass not kept."""

    step: Tensor
    frequency: Tensor
    second: Tensor
    next: Tensor
    p_next: Tensor
    leftover: Tensor

    def offset_presence(self, query_index: int, offsets: Sequence[int], then: Optional[Tensor] = None) -> Tensor:
        """P(token s sits exactly `offsets[i]` positions before the query): [len(offsets), n], rows
        summing to 1 over the live tokens. then: [n], indicator (or weights) of the tokens that follow
        the query at the positions being explained; the placements are then those of a query followed
        by them (module docstring)."""
        n, k = self.second.shape
        M = self.step
        rows = torch.arange(n, device=M.device)
        r = torch.zeros(n, n, dtype=M.dtype, device=M.device)
        r[:, query_index] = 1.0 if then is None else self.next_mass(query_index, then)  # r_0[a, b] = [b == q] P(then | a, q)
        out = {}
        for j in range(1, max(offsets) + 1):
            backoff = (M * r).sum(-1)  # [b]: sum_c P(c | b) r_{j-1}[b, c], the one-token step from b
            if j in offsets:
                at = self.frequency * backoff  # p(s) sum_b P(b | s) r_{j-1}[s, b]
                out[j] = at / at.sum().clamp_min(1e-30)
            if j == max(offsets):
                break
            kept = (self.p_next * r[self.second[..., None], self.next]).sum(-1)  # [n, k]
            r_next = backoff[None, :].expand(n, n).clone()
            r_next[rows[:, None], self.second] = kept + self.leftover * backoff[self.second]
            r = r_next
        return torch.stack([out[j] for j in offsets])

    def next_mass(self, query_index: int, then: Tensor) -> Tensor:
        """P(the token after the query is in `then` | the token before the query is a), for every a:
        [n]. From the pair (a, q) where it was run, its leftover backing off to P(then | q)."""
        then = then.to(self.step.dtype)
        alone = (self.step[query_index] * then).sum()
        out = torch.full((self.second.shape[0],), float(alone), dtype=self.step.dtype, device=self.step.device)
        a, slot = (self.second == query_index).nonzero(as_tuple=True)
        kept = (self.p_next[a, slot] * then[self.next[a, slot]]).sum(-1)
        out[a] = kept + self.leftover[a, slot] * alone
        return out


@torch.no_grad()
def pair_chain(model: Any, ids: Tensor, step: Tensor, frequency: Tensor, branching: int = PAIR_BRANCHING,
               batch_size: int = 4096) -> PairChain:
    """Run the model on the likely pairs of live tokens `ids` [n] (`step` [n, n]: the one-token
    chain, P(b | a) over the live tokens; `frequency` [n]) and keep the pair chain sparse."""
    n = ids.numel()
    k = max(0, min(int(branching), n))
    second = step.topk(k, dim=-1).indices  # [n, k]
    firsts = torch.arange(n, device=ids.device)[:, None].expand(n, k)
    pairs = torch.stack([ids[firsts], ids[second]], -1).reshape(-1, 2)  # [n k, 2]
    kept_p, kept_i = [], []
    for start in range(0, pairs.shape[0], batch_size):
        logits = model(pairs[start:start + batch_size])[:, -1].float()
        p = logits.log_softmax(-1)[:, ids].exp()
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        top = p.topk(k, dim=-1)
        kept_p.append(top.values)
        kept_i.append(top.indices)
    p_next = torch.cat(kept_p).view(n, k, k) if k else torch.zeros(n, 0, 0, device=ids.device)
    nxt = torch.cat(kept_i).view(n, k, k) if k else torch.zeros(n, 0, 0, dtype=torch.long, device=ids.device)
    leftover = (1 - p_next.sum(-1)).clamp_min(0)
    return PairChain(step=step.float(), frequency=frequency.float(), second=second, next=nxt, p_next=p_next,
                     leftover=leftover)
