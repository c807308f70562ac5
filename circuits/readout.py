"""Reading features back into tokens.

A feature is a vector v in the space an MLP reads (the normalized residual). Tokens reach it by
the direct path (the token's embedding `W_E[t]`) and through earlier heads' OV circuits (a head that
attends to token t writes `norm(W_E[t]) W_V W_O`: a "virtual token"). Scores are dot products with v,
so a token with a large positive (negative) score pushes the feature's input up (down).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .mlp import check_layer, mlp_weights


Live = Union[None, str, Tensor]


def live_token_mask(model: Any, live: Live = None) -> Tensor:
    """Which tokens a readout may name: bool [d_vocab].

    Tokens that never occur in the training text keep their random initial embeddings, and a norm
    inflates those to RMS 1, so they would fill every top-token list. live: None uses the model's
    `token_counts` (how often each token occurs in its tokenizer's training text, saved with models
    this project trains) and keeps the tokens seen at least once, or every token when the model has
    no counts; "all" keeps every token; a bool mask [d_vocab] is used as is; an integer tensor
    [d_vocab] is taken as counts."""
    d_vocab = model.cfg.d_vocab
    if isinstance(live, str):
        if live != "all":
            raise ValueError(f"live must be None, 'all', a bool mask or token counts [d_vocab], got {live!r}")
        return torch.ones(d_vocab, dtype=torch.bool)
    if live is None:
        live = getattr(model, "token_counts", None)
        if live is None:
            return torch.ones(d_vocab, dtype=torch.bool)
    live = torch.as_tensor(live).detach().cpu()
    if live.shape != (d_vocab,):
        raise ValueError(f"token counts / live mask must have shape [d_vocab] = [{d_vocab}], got {tuple(live.shape)}")
    mask = live if live.dtype == torch.bool else live > 0
    if not bool(mask.any()):
        raise ValueError("no live token: the counts are all zero (pass live='all' to use every token)")
    return mask


def live_token_ids(model: Any, live: Live = None) -> Tensor:
    """Ids of the live tokens (see `live_token_mask`): [n_live] int64."""
    return live_token_mask(model, live).nonzero().flatten()


def normalized_embeddings(model: Any) -> Tensor:
    """Each token's embedding as a norm would see it alone at position 0 (gain not applied): [d_vocab, d_model]."""
    W_E = model.W_E.detach()
    if model.cfg.normalization_type == "LN":
        W_E = W_E - W_E.mean(-1, keepdim=True)
    if model.cfg.normalization_type is None:
        return W_E
    return W_E / (W_E.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()


@torch.no_grad()
def direct_token_scores(model: Any, v: Tensor) -> Tensor:
    """v: [d_model] or [k, d_model] -> scores [d_vocab] or [k, d_vocab]: each token's normalized
    embedding (what the norm before the reader makes of it) dotted with v."""
    return v.to(model.W_E.dtype) @ normalized_embeddings(model).T


@torch.no_grad()
def ov_token_scores(model: Any, v: Tensor, before_layer: int) -> Tensor:
    """Virtual-token scores through every head of the layers before `before_layer`:
    v [d_model] -> [before_layer, n_heads, d_vocab]."""
    if not 0 <= before_layer <= model.cfg.n_layers:
        raise ValueError(f"before_layer must be in [0, {model.cfg.n_layers}], got {before_layer}")
    X = normalized_embeddings(model)
    out = []
    for layer in range(before_layer):
        block = model.blocks[layer]
        gain = getattr(block.ln1, "w", None)
        Xg = X * gain if gain is not None else X
        W_V = block.attn.W_V.detach()  # [n_heads, d_model, d_head]
        W_O = model.W_O[layer].detach()  # [n_heads, d_head, d_model], output scale included
        ov_v = torch.einsum("hdk,hkm,m->hd", W_V, W_O, v.to(X.dtype))  # W_V W_O v, per head: [n_heads, d_model]
        out.append(ov_v @ Xg.T)
    return torch.stack(out) if out else X.new_zeros(0, model.cfg.n_heads, model.cfg.d_vocab)


@dataclass
class TopTokens:
    positive: list[tuple[str, float]] = field(default_factory=list)
    negative: list[tuple[str, float]] = field(default_factory=list)

    def __str__(self) -> str:
        fmt = lambda pairs: ", ".join(f"{t!r} {s:+.2f}" for t, s in pairs)
        return f"+ {fmt(self.positive)}\n- {fmt(self.negative)}"


def token_label(model: Any, token: int) -> str:
    return model.to_string([token]) if model.tokenizer is not None else str(token)


def top_tokens(model: Any, scores: Tensor, k: int = 10, live: Live = None) -> TopTokens:
    """The k highest and k lowest scoring live tokens (`live_token_mask`) of scores [d_vocab]."""
    if scores.ndim != 1 or scores.shape[0] != model.cfg.d_vocab:
        raise ValueError(f"scores must be [d_vocab={model.cfg.d_vocab}], got {tuple(scores.shape)}")
    mask = live_token_mask(model, live).to(scores.device)
    k = min(k, int(mask.sum()))
    inf = torch.tensor(float("inf"), dtype=scores.dtype, device=scores.device)
    hi, lo = scores.where(mask, -inf).topk(k), (-scores).where(mask, -inf).topk(k)
    return TopTokens(
        positive=[(token_label(model, int(i)), float(s)) for s, i in zip(hi.values, hi.indices)],
        negative=[(token_label(model, int(i)), -float(s)) for s, i in zip(lo.values, lo.indices)],
    )


@torch.no_grad()
def direct_token_table(
    model: Any, layer: int, out_tokens: Sequence[int], in_tokens: Optional[Sequence[int]] = None
) -> Tensor:
    """The MLP's direct token-to-token table D[t_out, t_in] = u_out . mlp(x_in): [n_out, n_in].

    x_in is token t_in's normalized embedding (the MLP's input when that token's embedding is all
    the residual holds); u_out is t_out's logit direction through the final norm's gain. in_tokens
    defaults to every token id (index the result with `live_token_ids` to leave out dead ones)."""
    from .directions import unembed_direction

    layer = check_layer(model, layer)
    w = mlp_weights(model, layer)
    X = normalized_embeddings(model)
    if in_tokens is not None:
        X = X[torch.as_tensor(list(in_tokens), dtype=torch.long)]
    U = torch.stack([unembed_direction(model, int(t)) for t in out_tokens])  # [n_out, d_model]
    return U @ w.forward(X).T
