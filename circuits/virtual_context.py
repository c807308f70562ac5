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
  independently by training frequency; the head's output is averaged over the draws
  (`circuits.competitors`; each head draws on its own), so a rarely present token that takes all
  attention when there dims the keys only in the contexts that hold it;
* a key token is seen through its effective embedding (`circuits.token_view`): what the model builds
  for the token alone, which is exactly what the model holds at that position when the key is the
  first token of the sequence.

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

from .competitors import TYPICAL_COMPETITORS, draw_expectations
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
                    blocked: Optional[tuple[int, int]] = None, key_offsets: Optional[Sequence[int]] = None,
                    row_offsets: Optional[Tensor] = None, draw: Optional[Tensor] = None) -> Tensor:
    """`u . ln_final(resid)` at the query, for each row of virtual key tokens: [m].

    query: index into `view.ids`; keys: [m, k] indices into `view.ids` (-1: no token in that slot);
    u: [d_model] (a direction that includes the final norm's gain, e.g. `unembed_direction`);
    blocked: (layer, head) that may not attend to the key tokens (what that head carries);
    key_offsets: [k], slot j sits exactly key_offsets[j] before the query (instead of every key at
    its best offset in `offsets`; typical competitors then sit at those offsets, equally);
    row_offsets: [m], every key (and typical competitor) of row i sits row_offsets[i] before the query
    (many single-offset readouts in one pass); draw: [m, n], the competitors' draw probabilities per
    row (`circuits.competitors.company_draw`; default: training frequency for every row)."""
    if keys.ndim != 2:
        raise ValueError(f"keys must be [m, k] indices into the live tokens (-1 for none), got {tuple(keys.shape)}")
    # Each row scores every live key at every offset ([offsets, rows, heads, n_live] logits): keep
    # that under ~2^25 numbers. The cost grows as n_live^2, so whole-vocabulary evidence is meant for
    # small vocabularies (the built-in corpus); for a 32k vocabulary pass a live mask of a few thousand.
    if key_offsets is not None:
        if len(key_offsets) != keys.shape[1]:
            raise ValueError(f"{len(key_offsets)} key offsets for {keys.shape[1]} key slots")
        offsets = sorted(set(key_offsets))
    if draw is not None and draw.shape != (keys.shape[0], view.ids.numel()):
        raise ValueError(f"draw must be [m, n_live] = [{keys.shape[0]}, {view.ids.numel()}], got {tuple(draw.shape)}")
    if row_offsets is not None:
        if key_offsets is not None or row_offsets.shape != (keys.shape[0],):
            raise ValueError(f"row_offsets must be [m] = [{keys.shape[0]}] and cannot go with key_offsets")
        offsets = [1]  # one offset per row
    per_row = max(1, len(offsets) * model.cfg.n_heads * view.ids.numel())
    chunk = max(1, min(chunk, 2 ** 25 // per_row))
    out = [_virtual_chunk(model, view, query, keys[s:s + chunk], u, competitors, offsets, blocked, key_offsets,
                          None if row_offsets is None else row_offsets[s:s + chunk],
                          None if draw is None else draw[s:s + chunk])
           for s in range(0, keys.shape[0], chunk)]
    return torch.cat(out) if out else u.new_zeros(0)


def _virtual_chunk(model: Any, view: TokenView, query: int, keys: Tensor, u: Tensor, competitors: float,
                   offsets: Sequence[int], blocked: Optional[tuple[int, int]] = None,
                   key_offsets: Optional[Sequence[int]] = None, row_offsets: Optional[Tensor] = None,
                   draw: Optional[Tensor] = None) -> Tensor:
    cfg = model.cfg
    m, n_keys = keys.shape
    dtype = view.resid[0].dtype
    offsets = [o for o in offsets if 0 < o < cfg.n_ctx] or [1]
    q_pos = max(offsets)  # the query sits after every key; only relative offsets matter (rotary)
    present = keys >= 0  # [m, k]
    safe = keys.clamp_min(0)
    x = model.W_E.detach()[view.ids[query]].to(dtype).expand(m, -1).clone()  # [m, d_model]
    freq = view.frequency.to(dtype)
    for l in range(cfg.n_layers):
        block = model.blocks[l]
        W_Q, W_K, W_V = model.W_Q[l].detach(), model.W_K[l].detach(), model.W_V[l].detach()  # [H, d, dh]
        b_Q, b_K, b_V = model.b_Q[l].detach(), model.b_K[l].detach(), model.b_V[l].detach()  # [H, dh]
        W_O, b_O = model.W_O[l].detach(), model.b_O[l].detach()  # [H, dh, d], [d]
        scale = cfg.d_head ** -0.5
        # The query's own query/key/value, from its simulated residual.
        xq = _norm(model, block.ln1, x)
        q = torch.einsum("md,hdk->mhk", xq, W_Q) + b_Q
        k_self = torch.einsum("md,hdk->mhk", xq, W_K) + b_K
        v_self = torch.einsum("md,hdk->mhk", xq, W_V) + b_V
        s_self = (_rotate(model, l, q, q_pos) * _rotate(model, l, k_self, q_pos)).sum(-1) * scale  # [m, H]
        # Every live token as a key: effective embeddings, best offset per (query row, key).
        xk = _norm(model, block.ln1, view.resid[l].to(dtype))
        k_all = torch.einsum("nd,hdk->nhk", xk, W_K) + b_K  # [n, H, dh]
        v_all = torch.einsum("nd,hdk->nhk", xk, W_V) + b_V
        k_rot = _rotate(model, l, k_all, q_pos - max(offsets))
        if row_offsets is not None:  # row i: every key at offset row_offsets[i]
            q_rows = _rotate(model, l, q, q_pos - max(offsets) + row_offsets)
            by_offset = torch.einsum("mhk,nhk->mhn", q_rows, k_rot)[None] * scale  # [1, m, H, n]
        else:
            by_offset = torch.stack([
                torch.einsum("mhk,nhk->mhn", _rotate(model, l, q, q_pos - max(offsets) + o), k_rot)
                for o in offsets]) * scale  # [O, m, H, n]
        if key_offsets is None:  # every key (and competitor) at its best offset (or its row's)
            logits = by_offset.amax(0)  # [m, H, n]
            shift = torch.maximum(logits.amax(-1), s_self)  # [m, H]
            w_all = (logits - shift[..., None]).exp()[None]  # [1, m, H, n]
            s_keys = logits.gather(-1, safe[:, None, :].expand(m, logits.shape[1], n_keys))  # [m, H, k]
        else:  # slot j at its own offset; a competitor at any of those offsets, equally likely
            shift = torch.maximum(by_offset.amax((0, -1)), s_self)
            w_all = (by_offset - shift[..., None]).exp()  # [O, m, H, n]
            slot = torch.tensor([offsets.index(o) for o in key_offsets], device=keys.device)
            rows = torch.arange(m, device=keys.device)
            s_keys = torch.stack([by_offset[slot[j], rows, :, safe[:, j]] for j in range(n_keys)], -1)  # [m, H, k]
        # The query itself and the key tokens of each row.
        w_keys = (s_keys - shift[..., None]).exp() * present[:, None, :]
        if blocked is not None and blocked[0] == l:
            w_keys[:, blocked[1]] = 0.0
        w_self = (s_self - shift).exp()
        v_keys = v_all[safe]  # [m, k, H, dh]
        known = w_self[..., None] * v_self + torch.einsum("mhk,mkhd->mhd", w_keys, v_keys)  # [m, H, dh]
        known_mass = w_self + w_keys.sum(-1)  # [m, H]
        # The competitors: `competitors` typical tokens drawn independently by training frequency
        # (and, with pinned slots, each at one of the slots' offsets), the head's output averaged
        # over the draws (`circuits.competitors`).
        if competitors == 0:
            z = known / known_mass[..., None]
        else:
            O, H, n = w_all.shape[0], w_all.shape[2], w_all.shape[3]
            w_draw = w_all.permute(1, 2, 0, 3).reshape(m * H, O * n)  # one draw: an (offset, token) pair
            if draw is None:
                p_draw = (freq / O).repeat(O)
            else:
                p_draw = (draw.to(dtype)[:, None, None, :] / O).expand(m, H, O, n).reshape(m * H, O * n)
            inv, each = draw_expectations(known_mass.reshape(-1), w_draw, p_draw, competitors)
            weight = (competitors * p_draw * w_draw * each).view(m, H, O, n)
            z = known * inv.view(m, H, 1) + torch.einsum("mhon,nhk->mhk", weight, v_all)
        x = x + torch.einsum("mhd,hdo->mo", z, W_O) + b_O
        x = x + block.mlp(_norm(model, block.ln2, x)[:, None])[:, 0]
    return _normalized(model, x) @ u.to(dtype)


@torch.no_grad()
def expected_readout(model: Any, view: TokenView, query: int, keys: Tensor, u: Tensor,
                     competitors: float = TYPICAL_COMPETITORS, offsets: Sequence[int] = tuple(range(1, 17)),
                     blocked: Optional[tuple[int, int]] = None, weights: Optional[Tensor] = None,
                     draw: Optional[Tensor] = None) -> Tensor:
    """`virtual_readout` with the keys at one offset at a time, averaged over `offsets` (uniformly,
    or by `weights`: [len(offsets)], or [len(offsets), m] per row): [m]. draw: [m, n] competitors'
    draw probabilities per row.

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
    f = virtual_readout(model, view, query, rows, u, competitors, blocked=blocked, row_offsets=at,
                        draw=None if draw is None else draw.repeat(len(offsets), 1))
    weights = weights.to(f) if weights.ndim == 2 else weights.to(f)[:, None]
    return (weights * f.view(len(offsets), m)).sum(0)


@torch.no_grad()
def expected_interaction(model: Any, view: TokenView, query: int, pairs: Tensor, u: Tensor,
                         competitors: float = TYPICAL_COMPETITORS, offsets: Sequence[int] = tuple(range(1, 17)),
                         draw: Optional[Tensor] = None) -> Tensor:
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
    draws = None if draw is None else draw.repeat(4, 1)
    total, count = torch.zeros(P, dtype=u.dtype, device=pairs.device), 0
    for o_s in offsets:
        for o_t in offsets:
            if o_s != o_t:  # the same context for all four: only which tokens are present changes
                f = virtual_readout(model, view, query, rows, u, competitors, key_offsets=(o_s, o_t), draw=draws)
                total += f[:P] - f[P:2 * P] - f[2 * P:3 * P] + f[3 * P:]
                count += 1
    return total / count


def _normalized(model: Any, x: Tensor) -> Tensor:
    """The final norm without its gain (u from `unembed_direction` carries the gain):
    `ln_final.hook_normalized`."""
    kind = model.cfg.normalization_type
    if kind is None:
        return x
    if kind == "LN":
        x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
