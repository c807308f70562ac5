"""Path expansion of a bilinear MLP: its readout as an exact sum of pairwise path interactions.

The input of a bilinear MLP is a sum of *path contributions* x = sum_p x_p (token embeddings, each
earlier head's OV output, each earlier MLP's output, biases). Because the readout along an output
direction u is a quadratic form, it splits exactly into pairs:

    u . mlp(x) = x^T Q(u) x = sum_{p, q} x_p^T Q(u) x_q = sum_p T[p, p] + 2 sum_{p < q} T[p, q]

(Sharkey 2023: how MLPs enter the "mathematical framework for transformer circuits"). A pair term is
an *interaction*: the MLP writes u when path p's content meets path q's content. This module is the
tensor-level mathematics, with no model in sight:

* `pair_terms`        the data view: components [n_paths, ..., d] -> T [..., n_paths, n_paths];
* `top_pair_entries`  the weight view: for two paths given as per-token contributions R_p [n_s, d],
                      R_q [n_t, d], the largest entries of the token-pair table R_p Q R_q^T, found in
                      row chunks (through Q's eigenvectors when that is cheaper), so no n_s x n_t
                      table is ever held at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .eigen import Eigen

__all__ = ["pair_terms", "TopPairs", "top_pair_entries"]


def pair_terms(components: Tensor, Q: Tensor) -> Tensor:
    """T[..., p, q] = x_p^T Q x_q for components [n_paths, ..., d] and a symmetric Q [d, d].

    `T.sum((-1, -2))` is the MLP's readout of `sum_p x_p`; diagonal entries are self terms and each
    off-diagonal pair appears twice (T is symmetric), as in the expansion of a square."""
    if components.shape[-1] != Q.shape[-1]:
        raise ValueError(f"components have size {components.shape[-1]} but Q is {tuple(Q.shape)}")
    X = components.to(Q.dtype)
    QX = X @ Q  # [n, ..., d]
    return torch.einsum("p...d,q...d->...pq", X, QX)


@dataclass
class TopPairs:
    """The largest entries of a token-pair table T[s, t] = R_p[s]^T Q R_q[t] (multiplied by
    `multiplicity`): values [k] (signed, by |value| descending) with row indices s [k] and column
    indices t [k] into the token lists the paths were given for."""

    values: Tensor
    rows: Tensor
    cols: Tensor


def top_pair_entries(R_p: Tensor, R_q: Tensor, Q: Optional[Tensor] = None, eig: Optional[Eigen] = None,
                     k: int = 8, same: bool = False, multiplicity: float = 1.0, sign: int = 0,
                     chunk: int = 1024, diagonal: bool = True) -> TopPairs:
    """Top-k entries of `multiplicity * R_p Q R_q^T` without forming the [n_s, n_t] table at once.

    R_p [n_s, d], R_q [n_t, d]: each path's contribution to the MLP input, one row per token.
    Q [d, d], or `eig` (values [m], vectors [d, m]): Q through m of its eigenpairs (exact for m = d,
    the best rank-m approximation otherwise) -- the cheaper route for a large vocabulary.
    same: R_p and R_q are the same path, so (s, t) and (t, s) are one entry: only s <= t is kept
    (s < t with diagonal=False: pairs of two different tokens only).
    sign: +1 keeps the largest positive entries, -1 the most negative, 0 the largest |entries|.
    Cost O(n_s n_t m) time and O(chunk n_t) memory."""
    if (Q is None) == (eig is None):
        raise ValueError("give exactly one of Q or eig")
    if eig is not None:
        V = eig.vectors.to(R_p.dtype)
        left = (R_p @ V) * eig.values.to(R_p.dtype)  # [n_s, m]
        right = R_q @ V  # [n_t, m]
    else:
        left, right = R_p @ Q.to(R_p.dtype), R_q
    n_s, n_t = left.shape[0], right.shape[0]
    best_v = left.new_empty(0)
    best_i = torch.empty(0, dtype=torch.long, device=left.device)
    for start in range(0, n_s, chunk):
        block = multiplicity * (left[start:start + chunk] @ right.T)  # [c, n_t]
        if same:  # each unordered pair once
            rows = torch.arange(start, start + block.shape[0], device=block.device)[:, None]
            cols = torch.arange(n_t, device=block.device)[None]
            block = block.masked_fill(rows > cols if diagonal else rows >= cols, float("nan"))
        key = block if sign > 0 else (-block if sign < 0 else block.abs())
        key = torch.nan_to_num(key, nan=-float("inf"))
        top = key.flatten().topk(min(k, key.numel()))
        flat = top.indices + start * n_t
        best_v = torch.cat([best_v, block.flatten()[top.indices]])
        best_i = torch.cat([best_i, flat])
        keep_key = best_v if sign > 0 else (-best_v if sign < 0 else best_v.abs())
        order = keep_key.argsort(descending=True)[:k]
        best_v, best_i = best_v[order], best_i[order]
    return TopPairs(values=best_v, rows=best_i // n_t, cols=best_i % n_t)
