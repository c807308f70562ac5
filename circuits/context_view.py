"""The model reading each token in its typical context: context embeddings, from the weights alone.

`circuits.token_view` gives each token's *effective embedding*: the residual the model builds for the
token alone, at the start of a sequence. A later head rarely reads a token there. It reads the token
somewhere in running text, where earlier heads have already mixed in what came before it, and in a
trained model that changes what the token looks like to it:

* L1H3 of a 2-layer model reads the object two tokens before a pronoun. Alone, ' and' gives it a QK
  logit of 12.4 at that offset, more than ' book' (5.8); in running text ' and' gives it 2.2-4.0,
  because its residual there carries the words before it.
* In a 3-layer model, ' ball' and ' kite' alone are read almost alike by the head that carries the
  object to ' she' (4.76 and 4.82 towards ' kicked'); in context they are not (7.56 and 4.77), as in
  the real model.

The *context embedding* of token b at layer l is the residual entering layer l at b's position when
the window before b holds typical text: `competitors` tokens drawn independently over (offset,
token) pairs of the window, token j at offset o with the probability that the model's own one-token
view of text puts j there (`TokenView._before`: its next-token chain, by Bayes). Each head's output
is averaged over those draws exactly as in the virtual context (`circuits.competitors`), and the
tokens before b are themselves seen through their context embeddings of the same layer (every
token's row is computed at once, layer by layer). So no corpus enters: only the weights and, for the
frequency the chain starts from, the token counts saved with the model.

With one competitor, a one-offset window and a chain that puts token a right before b for certain,
the context embedding of b entering layer 1 is exactly the model's residual at b in [a, b] (tested).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .competitors import CONTEXT_WINDOW, TYPICAL_COMPETITORS, drawn_output
from .readout import Live
from .token_view import TokenView, token_view
from .virtual_context import _norm, _rotate, norm_scale


@torch.no_grad()
def context_view(model: Any, view: Optional[TokenView] = None, live: Live = None,
                 competitors: float = TYPICAL_COMPETITORS, window: Sequence[int] = CONTEXT_WINDOW,
                 before: Optional[Tensor] = None, chunk: int = 64) -> TokenView:
    """Every live token's residual in its typical context (see the module docstring), as a
    `TokenView` whose `resid`, `ln1_scale` and `ln2_scale` are the context embeddings' (its ids,
    next-token log-probabilities and frequencies are those of the one-token `view`, built here when
    not given).

    before: [len(window), n, n], P(token j sits window[i] before token b) in row [i, j, b]
    (default: `view._before`, the model's one-token chain); competitors: how many of those tokens
    each head meets (0: the token alone, which gives back the one-token view)."""
    view = token_view(model, live) if view is None else view
    if competitors == 0:
        return view
    cfg = model.cfg
    window = [o for o in window if 0 < o < cfg.n_ctx]
    if not window:
        raise ValueError(f"the context window {tuple(window)} has no offset below n_ctx={cfg.n_ctx}")
    n, O = view.ids.numel(), len(window)
    dtype = view.resid[0].dtype
    if before is None:
        before = view._before(torch.arange(n, device=view.ids.device), window)
    if before.shape != (O, n, n):
        raise ValueError(f"before must be [len(window), n_live, n_live] = [{O}, {n}, {n}], got {tuple(before.shape)}")
    # Row b draws an (offset, token) pair: an offset of the window uniformly, then token j by before.
    p_draw = (before.to(dtype).permute(2, 0, 1) / O).reshape(n, O * n)
    x = model.W_E.detach()[view.ids].to(dtype)  # [n, d_model]
    resid, ln1, ln2 = [x], [], []
    scale = cfg.d_head ** -0.5
    for l in range(cfg.n_layers):
        block = model.blocks[l]
        ln1.append(norm_scale(model, x))
        xn = _norm(model, block.ln1, x)
        q = torch.einsum("nd,hdk->nhk", xn, model.W_Q[l].detach()) + model.b_Q[l].detach()  # [n, H, dh]
        k = torch.einsum("nd,hdk->nhk", xn, model.W_K[l].detach()) + model.b_K[l].detach()
        v = torch.einsum("nd,hdk->nhk", xn, model.W_V[l].detach()) + model.b_V[l].detach()
        s_self = (q * k).sum(-1) * scale  # [n, H]: only relative offsets matter (rotary)
        q_at = torch.stack([_rotate(model, l, q, o) for o in window])  # [O, n, H, dh]: o after a key at 0
        z = torch.empty_like(q)
        for s in range(0, n, chunk):
            rows = slice(s, min(s + chunk, n))
            by_offset = torch.einsum("omhk,jhk->mhoj", q_at[:, rows], k) * scale  # [m, H, O, n]
            shift = torch.maximum(by_offset.amax((-2, -1)), s_self[rows])  # [m, H]
            m, H = shift.shape
            w_pool = (by_offset - shift[..., None, None]).exp().reshape(m, H, O * n)
            w_self = (s_self[rows] - shift).exp()  # [m, H]
            z[rows] = drawn_output(w_self[..., None] * v[rows], w_self, w_pool, p_draw[rows], v, competitors)
        x = x + torch.einsum("nhk,hkd->nd", z, model.W_O[l].detach()) + model.b_O[l].detach()
        ln2.append(norm_scale(model, x))
        x = x + block.mlp(_norm(model, block.ln2, x)[:, None])[:, 0]
        resid.append(x)
    return TokenView(ids=view.ids, resid=resid, ln1_scale=ln1, ln2_scale=ln2, log_probs=view.log_probs,
                     frequency=view.frequency, pairs=view.pairs)
