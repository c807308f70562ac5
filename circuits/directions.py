"""Output directions worth asking an MLP about, each a vector in the residual stream [d_model].

An MLP of layer l writes into the residual stream; a later reader sees that write through its own
norm (a positive per-position scale, and a gain that we fold in here). So each direction below is
what the reader dots with the *normalized* residual: read-outs are exact up to that positive scale.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence, Union

import torch
from torch import Tensor

from .mlp import check_layer, eigendecompose

TokenLike = Union[int, str]


def _token_ids(model: Any, tokens: Union[TokenLike, Sequence[TokenLike], Tensor]) -> list[int]:
    if isinstance(tokens, (int, str)):
        tokens = [tokens]
    ids = [model.to_single_token(t) if isinstance(t, str) else int(t) for t in tokens]
    for t in ids:
        if not 0 <= t < model.cfg.d_vocab:
            raise ValueError(f"token id {t} is outside the vocabulary [0, {model.cfg.d_vocab})")
    return ids


def _gain(norm: Any) -> Union[Tensor, float]:
    w = getattr(norm, "w", None)
    return 1.0 if w is None else w.detach()


@torch.no_grad()
def unembed_direction(model: Any, tokens: Union[TokenLike, Sequence[TokenLike]]) -> Tensor:
    """A token's logit direction `W_U[:, t]` times the final norm's gain: [d_model]
    (the mean over tokens when several are given)."""
    ids = _token_ids(model, tokens)
    gain = _gain(model.ln_final)
    columns = model.W_U.detach()[:, ids]  # [d_model, n_tokens]
    return (columns * (gain[:, None] if isinstance(gain, Tensor) else gain)).mean(-1)


@torch.no_grad()
def logit_diff_direction(
    model: Any, tokens_a: Union[TokenLike, Sequence[TokenLike]], tokens_b: Union[TokenLike, Sequence[TokenLike]]
) -> Tensor:
    """Direction of `mean logit(a) - mean logit(b)` over two tokens or token sets: [d_model]."""
    return unembed_direction(model, tokens_a) - unembed_direction(model, tokens_b)


@torch.no_grad()
def head_directions(model: Any, layer: int, head: int, kind: Literal["q", "k", "v"] = "q") -> Tensor:
    """The read-in directions of one attention head: the columns of its W_Q, W_K or W_V times
    ln1's gain, as rows [d_head, d_model]. An earlier MLP's write `o` changes this head's query
    (key, value) by `o . direction / scale`, one number per d_head coordinate."""
    layer = check_layer(model, layer)
    if not 0 <= head < model.cfg.n_heads:
        raise ValueError(f"head {head} is out of range: layer {layer} has {model.cfg.n_heads} heads")
    if kind not in ("q", "k", "v"):
        raise ValueError(f"kind must be 'q', 'k' or 'v', got {kind!r}")
    attn = model.blocks[layer].attn
    W = {"q": attn.W_Q, "k": attn.W_K, "v": attn.W_V}[kind][head].detach()  # [d_model, d_head]
    gain = _gain(model.blocks[layer].ln1)
    return (W * (gain[:, None] if isinstance(gain, Tensor) else gain)).T


@torch.no_grad()
def mlp_feature_directions(model: Any, layer: int, u: Tensor, k: int = 4) -> tuple[Tensor, Tensor]:
    """The top-k eigenvectors of a (later) MLP's Q(u), as directions an earlier MLP can write to:
    (vectors [k, d_model], eigenvalues [k]). This chains the analysis layer to layer."""
    eig = eigendecompose(model, layer, u, k=k)
    vectors = eig.vectors[: model.cfg.d_model].T  # drop the bias coordinate, if any
    return vectors.to(model.W_E.dtype), eig.values


def user_direction(model: Any, vector: Tensor, normalize: bool = True) -> Tensor:
    """Any vector [d_model] or block of vectors [n, d_model] (SAE encoder rows, probes), each
    optionally unit-normalized."""
    vector = torch.as_tensor(vector, dtype=model.W_E.dtype, device=model.W_E.device)
    if vector.ndim not in (1, 2) or vector.shape[-1] != model.cfg.d_model:
        raise ValueError(f"a direction must have shape ({model.cfg.d_model},) or (n, {model.cfg.d_model}), "
                         f"got {tuple(vector.shape)}")
    return vector / vector.norm(dim=-1, keepdim=True).clamp_min(1e-30) if normalize else vector
