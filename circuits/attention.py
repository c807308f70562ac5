"""The QK side of attention heads, from the weights alone: where a head looks.

An OV path says what a head would move; its QK circuit says which tokens it moves. For head h of
layer l, a query token a at position i and a key token b at position i - offset score

    s(a, b, offset) = ln1(x_a) W_Q R(offset) W_K^T ln1(x_b)^T / sqrt(d_head)

with x the token's embedding (the direct path; later layers' keys also carry earlier heads' output,
which K-composition scores measure), ln1 its norm with the gain folded in, and R the rotary rotation
between the two positions (the identity for learned positional embeddings, whose own QK terms are
left out). A head that prefers some *keys* whatever the query shows it in `key_preference`; a head
that prefers an *offset* (a previous-token head) shows it in `offset_preference`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .mlp import check_layer
from .readout import Live, live_token_ids, normalized_embeddings, token_label

DEFAULT_OFFSETS = tuple(range(0, 9))


def _check_head(model: Any, layer: int, head: int) -> int:
    layer = check_layer(model, layer)
    if not isinstance(head, int) or not 0 <= head < model.cfg.n_heads:
        raise ValueError(f"head {head!r} is out of range: layer {layer} has {model.cfg.n_heads} heads")
    return layer


def ov_matrices(model: Any, layer: int) -> Tensor:
    """diag(ln1 gain) W_V^h W_O^h for every head of `layer` (output scale included): [n_heads, d_model, d_model]."""
    W_V, W_O = model.W_V[layer].detach(), model.W_O[layer].detach()  # [H, d, d_head], [H, d_head, d]
    gain = getattr(model.blocks[layer].ln1, "w", None)
    OV = W_V @ W_O
    return OV * gain.detach()[None, :, None] if gain is not None else OV


@torch.no_grad()
def qk_scores(model: Any, layer: int, head: int, offset: int = 0, query_ids: Optional[Tensor] = None,
              key_ids: Optional[Tensor] = None) -> Tensor:
    """Attention logits of the direct path: [n_query, n_key] for query tokens at position `offset`
    attending to key tokens at position 0 (rotary: only the offset matters)."""
    layer = _check_head(model, layer, head)
    if offset < 0 or offset >= model.cfg.n_ctx:
        raise ValueError(f"offset must be in [0, n_ctx = {model.cfg.n_ctx}), got {offset}")
    X = normalized_embeddings(model)
    gain = getattr(model.blocks[layer].ln1, "w", None)
    X = X * gain.detach() if gain is not None else X
    Xq = X if query_ids is None else X[query_ids]
    Xk = X if key_ids is None else X[key_ids]
    q = Xq @ model.W_Q[layer, head].detach()  # [n_q, d_head]
    k = Xk @ model.W_K[layer, head].detach()  # [n_k, d_head]
    if model.cfg.positional_embedding_type == "rotary":
        rotary = model.blocks[layer].attn.rotary
        q = rotary(q[None, :, None], torch.full((1, q.shape[0]), offset, dtype=torch.long, device=q.device))[0, :, 0]
        k = rotary(k[None, :, None], torch.zeros((1, k.shape[0]), dtype=torch.long, device=k.device))[0, :, 0]
    return q @ k.T / model.cfg.d_head ** 0.5


@dataclass
class QKPreferences:
    """What head `layer`.`head` attends to, from the weights alone.

    offsets: the offsets considered; offset_scores [n_offsets]: the mean logit over live query and
    key tokens at each offset (the head's positional habit); best_offset: where it is highest.
    keys: key tokens by how much more than average every query attends to them at `key_offset`
    (mean over live queries of the logit, minus its mean over keys); pairs: the strongest
    (query, key, offset, logit) over the live tokens, or over `query_ids` when given."""

    layer: int
    head: int
    offsets: list[int]
    offset_scores: list[float]
    best_offset: int
    key_offset: int
    keys: list[tuple[str, float]]
    pairs: list[tuple[str, str, int, float]]

    def summary(self, n: int = 4) -> str:
        keys = ", ".join(repr(t) for t, _ in self.keys[:n])
        return f"L{self.layer}H{self.head} attends to offset {self.best_offset}; prefers keys {keys}"


@torch.no_grad()
def qk_preferences(model: Any, layer: int, head: int, offsets: Sequence[int] = DEFAULT_OFFSETS,
                   query_ids: Optional[Tensor] = None, key_offset: Optional[int] = None,
                   live: Live = None, n: int = 8) -> QKPreferences:
    """Summarise a head's QK circuit over live tokens (see `QKPreferences`). key_offset: the offset
    at which key preferences are read (default: the offset whose logits vary most over keys --
    where the head discriminates between tokens rather than positions)."""
    layer = _check_head(model, layer, head)
    offsets = [o for o in offsets if 0 <= o < model.cfg.n_ctx]
    ids = live_token_ids(model, live)
    q_ids = ids if query_ids is None else torch.as_tensor(query_ids, dtype=torch.long)
    tables = torch.stack([qk_scores(model, layer, head, o, q_ids, ids) for o in offsets])  # [O, n_q, n_k]
    means = tables.mean((1, 2))
    spread = (tables.mean(1) - tables.mean((1, 2))[:, None]).std(-1)  # how much keys differ, per offset
    ko = offsets.index(key_offset) if key_offset in offsets else int(spread.argmax())
    key_score = tables[ko].mean(0) - tables[ko].mean()
    top_keys = key_score.topk(min(n, key_score.numel()))
    flat = tables.flatten().topk(min(n, tables.numel()))
    n_q, n_k = tables.shape[1:]
    pairs = []
    for value, index in zip(flat.values.tolist(), flat.indices.tolist()):
        o, rest = divmod(index, n_q * n_k)
        qi, ki = divmod(rest, n_k)
        pairs.append((token_label(model, int(q_ids[qi])), token_label(model, int(ids[ki])), offsets[o], value))
    return QKPreferences(
        layer=layer, head=head, offsets=offsets, offset_scores=means.tolist(),
        best_offset=offsets[int(means.argmax())], key_offset=offsets[ko],
        keys=[(token_label(model, int(ids[i])), float(v)) for v, i in zip(top_keys.values, top_keys.indices)],
        pairs=pairs,
    )


@torch.no_grad()
def offset_attention(model: Any, layer: int, head: int, max_offset: int = 8, live: Live = None,
                     n_sequences: int = 16, length: int = 32, seed: int = 0) -> Tensor:
    """The head's positional habit: its mean attention to each offset 0..max_offset (and the rest,
    last entry) on `n_sequences` random sequences of live tokens drawn by their training frequency
    (uniformly without counts): [max_offset + 2], summing to 1. No corpus is read; the random
    sequences only stand in for "any context". A previous-token head puts most of it on offset 1."""
    from .readout import live_token_mask

    layer = check_layer(model, layer)
    _check_head(model, layer, head)
    mask = live_token_mask(model, live)
    counts = getattr(model, "token_counts", None)
    weights = torch.as_tensor(counts, dtype=torch.float) if counts is not None and live is None else mask.float()
    weights = weights * mask
    g = torch.Generator().manual_seed(seed)
    length = min(length, model.cfg.n_ctx)
    tokens = torch.multinomial(weights, n_sequences * length, replacement=True, generator=g).reshape(n_sequences, length)
    name = f"blocks.{layer}.attn.hook_pattern"
    _, cache = model.run_with_cache(tokens.to(model.W_E.device), names_filter=[name])
    pattern = cache[name][:, head].float()  # [batch, query, key]
    q = torch.arange(max_offset, length)  # queries that can see every offset
    out = [pattern[:, q, q - o].mean() for o in range(max_offset + 1)]
    return torch.stack(out + [1 - torch.stack(out).sum()])


@torch.no_grad()
def composition_score(model: Any, writer: tuple[int, int], reader: tuple[int, int], kind: str = "k") -> float:
    """How much head `reader` = (layer, head) reads what head `writer` writes, through its queries
    ("q"), keys ("k") or values ("v"): ||W_OV^w M^r||_F / (||W_OV^w||_F ||M^r||_F) with M^r the
    reader's W_Q W_K^T (q), W_K W_Q^T (k) or W_OV (v), norm gains folded (Elhage et al. 2021)."""
    (lw, hw), (lr, hr) = writer, reader
    _check_head(model, lw, hw), _check_head(model, lr, hr)
    if lw >= lr:
        raise ValueError(f"the writer's layer ({lw}) must come before the reader's ({lr})")
    if kind not in ("q", "k", "v"):
        raise ValueError(f"kind must be 'q', 'k' or 'v', got {kind!r}")
    OV = ov_matrices(model, lw)[hw].float()
    gain = getattr(model.blocks[lr].ln1, "w", None)
    g = gain.detach().float()[:, None] if gain is not None else 1.0
    W_Q, W_K = model.W_Q[lr, hr].detach().float() * g, model.W_K[lr, hr].detach().float() * g
    M = {"q": W_Q @ W_K.T, "k": W_K @ W_Q.T, "v": ov_matrices(model, lr)[hr].float()}[kind]
    return float(torch.linalg.matrix_norm(OV @ M) / (torch.linalg.matrix_norm(OV) * torch.linalg.matrix_norm(M)))
