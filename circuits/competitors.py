"""Typical competitors for attention: `c` context tokens drawn independently by training frequency.

A weight-only context has no real tokens besides the query and the keys we place, so every head also
sees `c` *typical competitors*: tokens drawn independently, token j with probability p_j. What a head
writes is averaged over those draws. With unnormalized attention weights w (e^score) the quantities
are expectations of 1 / (A + S), where A is the mass of the query and the placed keys and
S = w_{j_1} + ... + w_{j_c} the competitors' mass:

    E[1 / (A + S)] = int_0^inf e^{-tA} phi(t)^c dt,    phi(t) = sum_j p_j e^{-t w_j}

(the Laplace transform of a sum of independent draws is the product of theirs). One quadrature in t
per (row, head) replaces an expectation over n^c contexts.

**Where they sit.** A real context holds one token per position. So the competitors sit at the
positions of the window (`CONTEXT_WINDOW`, the 16 tokens before the query) that the placed keys do
not hold, each at a free position chosen uniformly (`pool_draw`): a draw is an (offset, token) pair.
Heads that read a fixed distance care: L1H3 of a 2-layer model that reads the object two tokens
before a pronoun gives ' book' there a QK logit of 8.9 in a real sentence and ' and' 12.4 *at that
offset*, but ' and' sits elsewhere in real text (2.2 at offset 10). With every competitor at the
key's own offset, a frequent ' and' took the object's attention in a quarter of the draws and
' book' had no evidence for ' read' (in that model hiding ' book' moves the target 9.4 logits).

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

from typing import Optional, Sequence

import torch
from torch import Tensor

CONTEXT_WINDOW = tuple(range(1, 17))  # the offsets before the query a virtual context holds
# How many: one token at each position of the window but the placed key's.
TYPICAL_COMPETITORS = float(len(CONTEXT_WINDOW) - 1)
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
    """sum_j p_j x[..., j] for draw probabilities shared by every row (p [n]) or per row (p [B, n],
    x [B, n] or [B, G, n]: G rows sharing one draw, as the heads of one context do)."""
    if p.ndim == 1:
        return x @ p
    if x.ndim == 2:
        return torch.bmm(x[:, None, :], p[:, :, None])[:, 0, 0]
    return torch.bmm(x, p[:, :, None])[..., 0]


def company_draw(frequency: Tensor, company: Optional[Tensor], share: float = COMPANY_SHARE) -> Tensor:
    """Per-row draw probabilities [m, n]: training `frequency` [n], mixed with each row's company
    [m, n] (`TokenView.company`) at `share`; without company, frequency alone [n]."""
    if company is None or share == 0:
        return frequency
    return (1 - share) * frequency[None] + share * company


def draw_expectations(A: Tensor, w: Tensor, p: Tensor, c: float, nodes: int = NODES,
                      each: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """For known mass A [B] (or [B, G]), competitor weights w [B, n] (or [B, G, n]) and draw
    probabilities p [n] or [B, n] (each row summing to 1; the G rows of a group share theirs), with S
    the sum of `c` independent draws (c >= 1):

    * inv [B] = E[1 / (A + S)]: the share of the known tokens is their weight times this;
    * each [B, n] = E[1 / (A + w_j + S')], S' over c - 1 draws: a competitor j, once drawn, gets the
      share w_j times this (so the competitors' expected output is c sum_j p_j w_j each_j v_j);
      None with each=False."""
    if c < 1:
        raise ValueError(f"competitors must be 0 or at least 1 (independent draws), got {c}")
    A = A.clamp_min(1e-30)  # a key whose weight underflows still has a finite window
    if c == 1:  # one draw: exact, no quadrature
        alone = 1.0 / (A[..., None] + w)
        return _expect(alone, p), (alone if each else None)
    mean_w = _expect(w, p)  # [B]
    t, dt, t_lo = _nodes(A, mean_w, c, nodes)
    inv = _tail(t_lo, A)
    out = _tail(t_lo[..., None], A[..., None] + w) if each else None
    e = torch.empty_like(w)  # reused: these [B, n] passes are the cost of every virtual readout
    for k in range(nodes):
        torch.mul(w, -t[k][..., None], out=e)
        e.exp_()
        phi = _expect(e, p).clamp_min(1e-30)  # [B]
        base = dt[k] * torch.exp(-t[k] * A)  # [B]
        inv = inv + base * phi ** c
        if out is not None:
            out.addcmul_(e, (base * phi ** (c - 1))[..., None])
    return inv, out


def drawn_output(known: Tensor, known_mass: Tensor, w_pool: Tensor, p: Tensor, v: Tensor, c: float) -> Tensor:
    """Heads' outputs averaged over `c` drawn competitors: known [m, H, d] is what the tokens already
    in the context write (weights times values, unnormalized) and known_mass [m, H] their summed
    weight; w_pool [m, H, O * n] the weights of the (offset, token) pool, p [m, O * n] its draw
    probabilities (`pool_draw`) and v [n, H, d] each token's values: [m, H, d]."""
    m, H = known_mass.shape
    n = v.shape[0]
    inv, each = draw_expectations(known_mass, w_pool, p, c)  # [m, H], [m, H, O * n]
    weight = (each.mul_(w_pool).mul_(p[:, None]) * c).view(m, H, -1, n).sum(2)  # [m, H, n]
    return known * inv[..., None] + torch.einsum("mhn,nhd->mhd", weight, v)


def _check_room(free: Tensor, who: str) -> None:
    if not bool(free.any(-1).all()):
        raise ValueError(f"{who} every offset of the window, so its competitors have nowhere to sit; "
                         "widen the window or pass competitors=0")


def free_offsets(window: Sequence[int], taken: Tensor) -> Tensor:
    """Which offsets of `window` each row leaves to the competitors: taken [m, k] (the offsets its
    keys sit at) -> [m, len(window)] bool."""
    win = torch.as_tensor(list(window), device=taken.device)
    return (taken[:, :, None] != win).all(1)


def pool_draw(free: Tensor, draw: Tensor) -> Tensor:
    """Draw probabilities over (offset, token) pairs, offset-major: a free offset of the window
    (free [m, O] bool), uniformly, then a token by `draw` ([n], or [m, n] per row): [m, O * n]."""
    _check_room(free, "a row's keys hold")
    where = free.to(draw.dtype)
    where = where / where.sum(-1, keepdim=True)
    tokens = draw[None] if draw.ndim == 1 else draw
    return (where[:, :, None] * tokens[:, None, :]).reshape(free.shape[0], -1)


def expected_share(weight: Tensor, pool: Tensor, free: Tensor, draw: Tensor, competitors: float,
                   step: float = 0.25) -> Tensor:
    """The attention share of each key from one query against `competitors` typical tokens drawn
    independently, averaged over the draws: `E[w_b / (w_b + S)]` for key weights w [K] (exp of the
    scores), the pool's weights at each offset of the window [O, n], the offsets each key leaves free
    [K, O] (bool) and the token draw [n] or [K, n] per key (see `pool_draw`): [K].

    Every key meets the same pool (one query), so one grid in log t (spacing `step`) serves all of
    them and e^{-t w} is computed once per node, not once per key as in `draw_expectations`."""
    if competitors == 0:
        return torch.ones_like(weight)
    if competitors < 1:
        raise ValueError(f"competitors must be 0 or at least 1 (independent draws), got {competitors}")
    _check_room(free, "a key holds")
    A = weight.clamp_min(1e-30)
    pool, draw = pool.to(A), draw.to(A)
    where = free.to(A) / free.sum(-1, keepdim=True).to(A)  # [K, O]
    if draw.ndim == 1:
        mean_w = where @ (pool @ draw)
    else:
        mean_w = ((where @ pool) * draw).sum(-1)  # [K]
    lo = float((-torch.log(A + competitors * mean_w) - 5.0).min())
    hi = float((-torch.log(A) + 4.0).max())
    G = max(2, int((hi - lo) / step) + 2)
    tau = torch.linspace(lo, hi, G, dtype=A.dtype, device=A.device)
    t = tau.exp()
    trap = torch.ones_like(t)
    trap[[0, -1]] = 0.5
    dt = t * (hi - lo) / (G - 1) * trap
    inv = _tail(t[0], A)  # below the first node phi ~ 1 for every key
    K, (O, n) = A.shape[0], pool.shape
    per = max(1, 2 ** 24 // max(K * O, n * O))  # nodes per pass
    for s in range(0, G, per):
        e = torch.exp(-t[s:s + per, None, None] * pool)  # [g, O, n]
        g = e.shape[0]
        if draw.ndim == 1:
            phi = where @ (e @ draw).T  # [K, g]
        else:
            phi = ((draw @ e.reshape(g * O, n).T).view(K, g, O) * where[:, None, :]).sum(-1)
        inv = inv + (dt[s:s + per] * torch.exp(-t[s:s + per] * A[:, None]) * phi.clamp_min(1e-30) ** competitors).sum(-1)
    return weight * inv
