"""Typical competitors for attention: `c` context tokens drawn independently by training frequency.

A weight-only context has no real tokens besides the query and the keys we place, so every head also
sees `c` *typical competitors*: tokens drawn independently, token j with probability p_j. What a head
writes is averaged over those draws. With unnormalized attention weights w (e^score) the quantities
are expectations of 1 / (A + S), where A is the mass of the query and the placed keys and
S = w_{j_1} + ... + w_{j_c} the competitors' mass:

    E[1 / (A + S)] = int_0^inf e^{-tA} phi(t)^c dt,    phi(t) = sum_j p_j e^{-t w_j}

(the Laplace transform of a sum of independent draws is the product of theirs). One quadrature in t
per (row, head) replaces an expectation over n^c contexts.

Why not the share against the *mean* competitor, A + c E[w]: a token that takes all attention when it
is present but is rarely present (a frequent name, for a head that reads names) inflates E[w] and
dims every key in every context, while in real text it is usually absent.

**Company.** A token does not come alone: ' flower' sits after "found a red", a name after "named".
So each competitor is, with probability `COMPANY_SHARE`, drawn from the placed token's own company
(the tokens that usually sit 1-3 before it, in the model's one-token view of text:
`TokenView.company`) and otherwise by training frequency (`company_draw`). The draw probabilities are
then per row (p [B, n]), and a token's evidence compares the context with it to the same context
(its company included) without it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# How many: the evidence window holds 16 positions before the query (`circuits.evidence`), one of
# them the placed key, so a head there sees 15 other tokens besides the query.
TYPICAL_COMPETITORS = 15.0
COMPANY_SHARE = 3 / 15  # on average 3 of the 15: the three positions right before the placed token
NODES = 24  # trapezoid nodes in log t: the integrands are smooth there (checked against enumeration in tests)


def _nodes(A: Tensor, mean_w: Tensor, c: float, nodes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Log-spaced nodes t [nodes, *A] covering where e^{-tA} phi(t)^c lives: from well below
    1 / (A + c E[w]) (phi ~ 1 there) to a few e-folds past 1 / A; trapezoid weights dt [nodes, *A]
    (in t, for integrands in t); and t_lo [*A], the first node (below it we integrate exactly with
    phi = 1)."""
    lo = -torch.log(A + c * mean_w) - 5.0
    hi = -torch.log(A) + 4.0
    frac = torch.linspace(0.0, 1.0, nodes, dtype=A.dtype, device=A.device).view(-1, *([1] * A.ndim))
    tau = lo + (hi - lo) * frac  # [nodes, *A]
    trap = torch.ones(nodes, dtype=A.dtype, device=A.device)
    trap[[0, -1]] = 0.5
    dtau = (hi - lo) / (nodes - 1)
    t = tau.exp()
    return t, t * dtau * trap.view(-1, *([1] * A.ndim)), lo.exp()


def _tail(t_lo: Tensor, mass: Tensor) -> Tensor:
    """int_0^{t_lo} e^{-t mass} dt: the part of the integral below the first node, where phi ~ 1."""
    return -torch.expm1(-t_lo * mass) / mass


def _expect(x: Tensor, p: Tensor) -> Tensor:
    """sum_j p_j x[b, j] for draw probabilities shared by every row (p [n]) or per row (p [B, n])."""
    return x @ p if p.ndim == 1 else torch.bmm(x[:, None, :], p[:, :, None])[:, 0, 0]


def company_draw(frequency: Tensor, company: Optional[Tensor], share: float = COMPANY_SHARE) -> Tensor:
    """Per-row draw probabilities [m, n]: training `frequency` [n], mixed with each row's company
    [m, n] (`TokenView.company`) at `share`; without company, frequency alone [n]."""
    if company is None or share == 0:
        return frequency
    return (1 - share) * frequency[None] + share * company


def draw_expectations(A: Tensor, w: Tensor, p: Tensor, c: float, nodes: int = NODES,
                      each: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """For known mass A [B], competitor weights w [B, n] and draw probabilities p [n] or [B, n] (each
    row summing to 1), with S the sum of `c` independent draws (c >= 1):

    * inv [B] = E[1 / (A + S)]: the share of the known tokens is their weight times this;
    * each [B, n] = E[1 / (A + w_j + S')], S' over c - 1 draws: a competitor j, once drawn, gets the
      share w_j times this (so the competitors' expected output is c sum_j p_j w_j each_j v_j);
      None with each=False."""
    if c < 1:
        raise ValueError(f"competitors must be 0 or at least 1 (independent draws), got {c}")
    A = A.clamp_min(1e-30)  # a key whose weight underflows still has a finite window
    if c == 1:  # one draw: exact, no quadrature
        alone = 1.0 / (A[:, None] + w)
        return _expect(alone, p), (alone if each else None)
    mean_w = _expect(w, p)  # [B]
    t, dt, t_lo = _nodes(A, mean_w, c, nodes)
    inv = _tail(t_lo, A)
    out = _tail(t_lo[:, None], A[:, None] + w) if each else None
    e = torch.empty_like(w)  # reused: these [B, n] passes are the cost of every virtual readout
    for k in range(nodes):
        torch.mul(w, -t[k, :, None], out=e)
        e.exp_()
        phi = _expect(e, p).clamp_min(1e-30)  # [B]
        base = dt[k] * torch.exp(-t[k] * A)  # [B]
        inv = inv + base * phi ** c
        if out is not None:
            out.addcmul_(e, (base * phi ** (c - 1))[:, None])
    return inv, out


def expected_share(weight: Tensor, frequency: Tensor, competitors: float, draw: Optional[Tensor] = None) -> Tensor:
    """The attention share of each key b against `competitors` typical keys drawn independently,
    averaged over the draws: `E[w_b / (w_b + S)]` for weights w [..., n] (exp of the scores; each
    row is one query, its keys and competitors alike): [..., n]. The draws follow `frequency` [n],
    or per key b `draw[b]` [n, n] (`company_draw`: the key's company mixed in)."""
    if competitors == 0:
        return torch.ones_like(weight)
    w = weight.reshape(-1, weight.shape[-1])
    out = torch.empty_like(w)
    step = max(1, 2 ** 22 // max(w.shape[-1], 1))
    for r in range(w.shape[0]):
        for s in range(0, w.shape[-1], step):
            b = w[r, s:s + step]  # the keys, each its own "known mass"
            p = frequency.to(w) if draw is None else draw[s:s + step].to(w)
            inv, _ = draw_expectations(b, w[r].expand(b.numel(), -1), p, competitors, each=False)
            out[r, s:s + step] = b * inv
    return out.reshape(weight.shape)
