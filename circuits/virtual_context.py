"""The model at one position in a *virtual context*: the query token, a few key tokens, and typical
filler -- every layer computed from the weights, with no corpus.

`circuits.evidence` splits a token's effect into first-order routes (a head straight into the logits,
a head meeting the query inside one MLP). Real models also chain: a layer-0 head brings a token,
MLP 0 turns it into a feature, MLP 1 reads that feature. `virtual_readout` follows every chain at
once by running the query's position layer by layer:

* the query's residual starts as its embedding; each layer adds attention, then the MLP (the
  model's own norms and MLPs, on the simulated residual);
* head h of layer l attends from the query (its current simulated residual, so a token that an
  earlier layer brought changes where later heads look: Q-composition) to itself (offset 0), to each
  key token (at the best offset in `offsets`), and to `competitors` typical tokens drawn
  independently by training frequency, each at a position of the 16-token window that no key holds;
  the head's output is averaged over the draws (`circuits.competitors`; each head draws on its own),
  so a rarely present token that takes all attention when there dims the keys only in the contexts
  that hold it, and a token a head wants only at one distance competes only from there;
* a key token (and a competitor) is seen through the view it is given: its effective embedding
  (`circuits.token_view`), what the model builds for the token alone -- exactly what the model holds
  at that position when the key is the first token of the sequence -- or its context embedding
  (`circuits.context_view`, what `circuits.evidence` uses): the token with typical text before it.

So with `offsets=(1,)`, `competitors=0` and one key b, the result is exactly the model's own readout
on the sequence [b, query] (tested); with no key it is the model on [query] alone. A token's total
evidence is `virtual_readout(with b) - virtual_readout(without)`, and the interaction of two tokens
`f(s, t) - f(s) - f(t) + f()`.

`key_offsets` pins each key slot to one offset instead (so two keys can sit at two places, as in a
real context); `expected_readout` averages a key's readout over the offsets it may sit at, and
`expected_interaction` a pair's interaction over every placement of the two.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .competitors import CONTEXT_WINDOW, TYPICAL_COMPETITORS, drawn_output, free_offsets, pool_draw
from .token_view import TokenView


def _norm(model: Any, module: Any, x: Tensor) -> Tensor:
    """A norm module applied to rows [m, d_model] (its hooks see [m, 1, d_model])."""
    return module(x[:, None])[:, 0]


def _rotate(model: Any, layer: int, t: Tensor, position: Union[int, Tensor]) -> Tensor:
    """Rotary rotation of per-head vectors t [m, H, d_head] to `position` (an int, or [m] per row;
    identity without rotary)."""
    if model.cfg.positional_embedding_type != "rotary":
        return t
    rotary = model.blocks[layer].attn.rotary
    if isinstance(position, Tensor):
        positions = position.to(device=t.device, dtype=torch.long)[:, None]
    else:
        positions = torch.full((t.shape[0], 1), position, dtype=torch.long, device=t.device)
    return rotary(t[:, None], positions)[:, 0]


@torch.no_grad()
def virtual_readout(model: Any, view: TokenView, query: int, keys: Tensor, u: Tensor,
                    competitors: float = TYPICAL_COMPETITORS, offsets: Sequence[int] = tuple(range(1, 9)), chunk: int = 2048,
                    blocked: Optional[tuple[int, int]] = None, key_offsets: Union[Sequence[int], Tensor, None] = None,
                    row_offsets: Optional[Tensor] = None, draw: Optional[Tensor] = None,
                    window: Sequence[int] = CONTEXT_WINDOW) -> Tensor:
    """`u . ln_final(resid)` at the query, for each row of virtual key tokens: [m].

    query: index into `view.ids`; keys: [m, k] indices into `view.ids` (-1: no token in that slot);
    u: [d_model] (a direction that includes the final norm's gain, e.g. `unembed_direction`);
    blocked: (layer, head) that may not attend to the key tokens (what that head carries);
    key_offsets: [k] (or [m, k] per row), slot j sits exactly key_offsets[j] before the query
    (instead of every key at its best offset in `offsets`); row_offsets: [m], every key of row i sits row_offsets[i] before
    the query (many single-offset readouts in one pass). The typical competitors sit at the offsets
    of `window` that the row's slots leave free, an empty slot included (so a row with a key and the
    same row without it differ only by the key); with keys at their best offsets, anywhere in the
    window. draw: [m, n], the competitors' token probabilities per row
    (`circuits.competitors.company_draw`; default: training frequency for every row)."""
    if keys.ndim != 2:
        raise ValueError(f"keys must be [m, k] indices into the live tokens (-1 for none), got {tuple(keys.shape)}")
    m = keys.shape[0]
    if key_offsets is not None:
        at = torch.as_tensor(key_offsets if isinstance(key_offsets, Tensor) else list(key_offsets), device=keys.device)
        if at.shape[-1] != keys.shape[1] or (at.ndim == 2 and at.shape[0] != m) or at.ndim > 2:
            raise ValueError(f"key offsets of shape {tuple(at.shape)} for {keys.shape[1]} key slots in {m} rows "
                             f"(give [k], or [m, k] per row)")
        at = at.expand(m, -1)
    elif row_offsets is not None:
        if row_offsets.shape != (m,):
            raise ValueError(f"row_offsets must be [m] = [{m}] and cannot go with key_offsets")
        at = row_offsets.to(keys.device)[:, None].expand(m, keys.shape[1])
    else:
        at = None  # each key at its best offset in `offsets`
    if draw is not None and draw.shape != (m, view.ids.numel()):
        raise ValueError(f"draw must be [m, n_live] = [{m}, {view.ids.numel()}], got {tuple(draw.shape)}")
    window = [o for o in window if 0 < o < model.cfg.n_ctx] or [1]
    best = [o for o in offsets if 0 < o < model.cfg.n_ctx] or [1]
    placed = sorted(set(at.unique().tolist())) if at is not None else best
    # Every row scores every live token at every offset ([offsets, rows, heads, n_live] logits) and
    # draws competitors over (offset, token) pairs: keep that under ~2^25 numbers. The cost grows as
    # n_live^2, so whole-vocabulary evidence is meant for small vocabularies (the built-in corpus);
    # for a 32k vocabulary pass a live mask of a few thousand.
    per_row = max(1, (len(window) + len(placed)) * model.cfg.n_heads * view.ids.numel())
    chunk = max(1, min(chunk, 2 ** 25 // per_row))
    out = [_virtual_chunk(model, view, query, keys[s:s + chunk], u, competitors, best, window, blocked,
                          None if at is None else at[s:s + chunk], None if draw is None else draw[s:s + chunk])
           for s in range(0, m, chunk)]
    return torch.cat(out) if out else u.new_zeros(0)


def _virtual_chunk(model: Any, view: TokenView, query: int, keys: Tensor, u: Tensor, competitors: float,
                   best: Sequence[int], window: Sequence[int], blocked: Optional[tuple[int, int]],
                   at: Optional[Tensor], draw: Optional[Tensor]) -> Tensor:
    cfg = model.cfg
    m, n_keys = keys.shape
    dtype = view.resid[0].dtype
    present = keys >= 0  # [m, k]
    safe = keys.clamp_min(0)
    rows = torch.arange(m, device=keys.device)
    # The offsets any head scores: the window (competitors) and where the keys may sit. Without
    # rotary the scores do not depend on the offset, and one position stands for all.
    rotary = cfg.positional_embedding_type == "rotary"
    positions = sorted(set(window) | set(best if at is None else at.unique().tolist())) if rotary else [0]
    where = {o: i for i, o in enumerate(positions)} if rotary else {o: 0 for o in set(window) | set(best)}
    win = torch.tensor([where[o] for o in window] if rotary else [0], device=keys.device)
    if competitors:
        free = free_offsets(window, at) if rotary and at is not None else torch.ones(m, win.numel(), dtype=torch.bool, device=keys.device)
        p_draw = pool_draw(free, view.frequency.to(dtype) if draw is None else draw.to(dtype))  # [m, O * n]
    x = model.W_E.detach()[view.ids[query]].to(dtype).expand(m, -1).clone()  # [m, d_model]
    for l in range(cfg.n_layers):
        block = model.blocks[l]
        W_Q, W_K, W_V = model.W_Q[l].detach(), model.W_K[l].detach(), model.W_V[l].detach()  # [H, d, dh]
        b_Q, b_K, b_V = model.b_Q[l].detach(), model.b_K[l].detach(), model.b_V[l].detach()  # [H, dh]
        W_O, b_O = model.W_O[l].detach(), model.b_O[l].detach()  # [H, dh, d], [d]
        scale = cfg.d_head ** -0.5
        # The query's own query/key/value, from its simulated residual (only relative offsets matter:
        # a key o before the query is a query rotated by o against a key at 0).
        xq = _norm(model, block.ln1, x)
        q = torch.einsum("md,hdk->mhk", xq, W_Q) + b_Q
        k_self = torch.einsum("md,hdk->mhk", xq, W_K) + b_K
        v_self = torch.einsum("md,hdk->mhk", xq, W_V) + b_V
        s_self = (q * k_self).sum(-1) * scale  # [m, H]
        # Every live token as a key (as the view sees it) at every offset.
        xk = _norm(model, block.ln1, view.resid[l].to(dtype))
        k_all = torch.einsum("nd,hdk->nhk", xk, W_K) + b_K  # [n, H, dh]
        v_all = torch.einsum("nd,hdk->nhk", xk, W_V) + b_V
        k_rot = _rotate(model, l, k_all, 0)
        by_offset = torch.stack([torch.einsum("mhk,nhk->mhn", _rotate(model, l, q, o), k_rot)
                                 for o in positions]) * scale  # [P, m, H, n]
        H, n = by_offset.shape[2], by_offset.shape[3]
        if at is None:  # every key at its best offset
            best_logits = by_offset[[where[o] for o in best]].amax(0)  # [m, H, n]
            s_keys = best_logits.gather(-1, safe[:, None, :].expand(m, H, n_keys))  # [m, H, k]
        else:  # slot j of row i at at[i, j]
            lookup = torch.zeros(max(max(positions), int(at.max())) + 1, dtype=torch.long, device=keys.device)
            if rotary:
                lookup[torch.tensor(positions, device=keys.device)] = torch.arange(len(positions), device=keys.device)
            slot = lookup[at]  # [m, k]: index into positions (all 0 without rotary)
            s_keys = torch.stack([by_offset[slot[:, j], rows, :, safe[:, j]] for j in range(n_keys)], -1)  # [m, H, k]
        shift = torch.maximum(by_offset.amax((0, -1)), s_self)  # [m, H]
        w_keys = (s_keys - shift[..., None]).exp() * present[:, None, :]
        if blocked is not None and blocked[0] == l:
            w_keys[:, blocked[1]] = 0.0
        w_self = (s_self - shift).exp()
        v_keys = v_all[safe]  # [m, k, H, dh]
        known = w_self[..., None] * v_self + torch.einsum("mhk,mkhd->mhd", w_keys, v_keys)  # [m, H, dh]
        known_mass = w_self + w_keys.sum(-1)  # [m, H]
        if competitors == 0:
            z = known / known_mass[..., None]
        else:
            # `competitors` typical tokens drawn independently over (free offset, token) pairs, the
            # head's output averaged over the draws (`circuits.competitors`).
            O = win.numel()
            w_pool = (by_offset[win] - shift[None, ..., None]).exp()  # [O, m, H, n]
            w_pool = w_pool.permute(1, 2, 0, 3).reshape(m, H, O * n)  # the heads of a row share its draw
            z = drawn_output(known, known_mass, w_pool, p_draw, v_all, competitors)
        x = x + torch.einsum("mhd,hdo->mo", z, W_O) + b_O
        x = x + block.mlp(_norm(model, block.ln2, x)[:, None])[:, 0]
    return _normalized(model, x) @ u.to(dtype)


@torch.no_grad()
def expected_readout(model: Any, view: TokenView, query: int, keys: Tensor, u: Tensor,
                     competitors: float = TYPICAL_COMPETITORS, offsets: Sequence[int] = CONTEXT_WINDOW,
                     blocked: Optional[tuple[int, int]] = None, weights: Optional[Tensor] = None,
                     draw: Optional[Tensor] = None, window: Sequence[int] = CONTEXT_WINDOW) -> Tensor:
    """`virtual_readout` with the keys at one offset at a time, averaged over `offsets` (uniformly,
    or by `weights`: [len(offsets)], or [len(offsets), m] per row): [m]. draw: [m, n] competitors'
    draw probabilities per row, or [len(offsets), m, n] per offset and row (`TokenView.placed_draw`).

    A real context holds a token at one position, seen by every head from there; `virtual_readout`
    with several offsets lets each head see a key at its own best offset at once, which overstates
    heads that read a fixed distance (two heads reading the same token at different distances can
    do opposite things with it)."""
    offsets = [o for o in offsets if 0 < o < model.cfg.n_ctx] or [1]
    if weights is None:
        weights = torch.full((len(offsets),), 1.0 / len(offsets))
    if len(weights) != len(offsets):
        raise ValueError(f"{len(weights)} weights for {len(offsets)} offsets")
    m = keys.shape[0]
    rows = keys.repeat(len(offsets), 1)  # offset-major: rows [o * m + i]
    at = torch.tensor(offsets, device=keys.device).repeat_interleave(m)
    if draw is not None and draw.ndim == 3:
        if draw.shape[0] != len(offsets):
            raise ValueError(f"a draw for {draw.shape[0]} offsets, with {len(offsets)} offsets")
        draw = draw.reshape(-1, draw.shape[-1])  # offset-major, as the rows
    elif draw is not None:
        draw = draw.repeat(len(offsets), 1)
    f = virtual_readout(model, view, query, rows, u, competitors, blocked=blocked, row_offsets=at,
                        draw=draw, window=window)
    weights = weights.to(f) if weights.ndim == 2 else weights.to(f)[:, None]
    return (weights * f.view(len(offsets), m)).sum(0)


@torch.no_grad()
def expected_interaction(model: Any, view: TokenView, query: int, pairs: Tensor, u: Tensor,
                         competitors: float = TYPICAL_COMPETITORS, offsets: Sequence[int] = CONTEXT_WINDOW,
                         draw: Optional[Tensor] = None, window: Sequence[int] = CONTEXT_WINDOW) -> Tensor:
    """What two context tokens do together beyond what each does alone, `f(s, t) - f(s) - f(t) + f()`,
    averaged over every placement of the two at distinct offsets in `offsets`: [P] for
    pairs [P, 2] (indices into `view.ids`). Exact through every layer, norm and chain of the virtual
    context, unlike the first-order pair terms of `circuits.evidence` (one MLP, attention fixed).
    draw: [P, n], each pair's competitors' draw probabilities (the same for its four terms)."""
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be [P, 2] indices into the live tokens, got {tuple(pairs.shape)}")
    offsets = [o for o in offsets if 0 < o < model.cfg.n_ctx]
    if len(offsets) < 2:
        raise ValueError("two tokens need at least two offsets in the context window")
    P = pairs.shape[0]
    gap = torch.full_like(pairs[:, :1], -1)
    rows = torch.cat([pairs, torch.cat([pairs[:, :1], gap], 1), torch.cat([gap, pairs[:, 1:]], 1),
                      torch.cat([gap, gap], 1)])  # both, s, t, none
    placements = [(o_s, o_t) for o_s in offsets for o_t in offsets if o_s != o_t]
    # Every placement in one pass; the same context for all four rows of a placement: only which
    # tokens are present changes.
    at = torch.tensor(placements, device=pairs.device).repeat_interleave(4 * P, 0)  # [placements * 4P, 2]
    f = virtual_readout(model, view, query, rows.repeat(len(placements), 1), u, competitors, key_offsets=at,
                        draw=None if draw is None else draw.repeat(4 * len(placements), 1), window=window)
    f = f.view(len(placements), 4, P)
    return (f[:, 0] - f[:, 1] - f[:, 2] + f[:, 3]).mean(0)


def norm_scale(model: Any, x: Tensor) -> Tensor:
    """The divisor the model's norms apply to residuals x [..., d_model] (`hook_scale`): [...]
    (ones without a norm)."""
    kind = model.cfg.normalization_type
    if kind is None:
        return torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)
    if kind == "LN":
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1) + model.cfg.eps).sqrt()


def _normalized(model: Any, x: Tensor) -> Tensor:
    """The final norm without its gain (u from `unembed_direction` carries the gain):
    `ln_final.hook_normalized`."""
    centred = x - x.mean(-1, keepdim=True) if model.cfg.normalization_type == "LN" else x
    return centred / norm_scale(model, x)[..., None]
