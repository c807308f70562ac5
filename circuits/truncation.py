"""Truncation, effective rank, and the exactness check of the quadratic-form readout."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .eigen import Eigen
from .interaction import _check_u, as_weights, augment_input, bilinear_mlp_forward

__all__ = ["effective_rank", "truncated_readout", "check_quadratic_form"]


def effective_rank(values: Tensor) -> Tensor:
    """(sum |lambda| / sqrt(sum lambda^2))^2 over the last dim; values [..., m] -> [...].

    Equals r for r equal-magnitude eigenvalues, 1 for a single one; 0 for an all-zero Q.
    """
    l1 = values.abs().sum(-1)
    l2 = values.pow(2).sum(-1).sqrt()
    return torch.where(l2 > 0, (l1 / l2.clamp_min(torch.finfo(values.dtype).tiny)) ** 2,
                       torch.zeros_like(l1))


def truncated_readout(eig: Eigen, X: Tensor, k: Optional[int] = None) -> Tensor:
    """sum_{i<k} lambda_i (v_i . x)^2 for rows of X [..., d] -> [...] (single-direction eig).

    If ``eig`` is augmented (biases) and X has d_model columns, the constant 1 is appended.
    k defaults to all pairs held by ``eig``.
    """
    if eig.values.ndim != 1:
        raise ValueError("truncated_readout needs a single-direction Eigen; index it first (eig[i])")
    d = eig.vectors.shape[0]
    if eig.augmented and X.shape[-1] == d - 1:
        X = augment_input(X)
    if X.shape[-1] != d:
        raise ValueError(f"X has last dimension {X.shape[-1]} but the eigenvectors have size {d}")
    e = eig if k is None else eig.top(k)
    proj = X.to(e.vectors.dtype) @ e.vectors                # [..., k]
    return (proj.pow(2) * e.values).sum(-1)


def check_quadratic_form(W_gate, W_in, W_out, u, X: Tensor, eig: Eigen, b_gate=None, b_in=None,
                         b_out=None, k: Optional[int] = None) -> float:
    """max_x |sum_{i<k} lambda_i (v_i . x)^2 - u . mlp(x)| over rows of X [n, d_model].

    With all eigenpairs this is the exactness check (float round-off only); with k < d it is
    the error of the rank-k truncation.
    """
    w = as_weights(W_gate, W_in, W_out, b_gate, b_in, b_out)
    u = _check_u(w, u)
    if u.ndim != 1:
        raise ValueError(f"check_quadratic_form takes one direction u [d_model], got {tuple(u.shape)}")
    if X.ndim != 2 or X.shape[1] != w.d_model:
        raise ValueError(f"X must be [n, d_model] = [n, {w.d_model}], got {tuple(X.shape)}")
    dt = eig.values.dtype
    ref = bilinear_mlp_forward(*(None if t is None else t.to(dt)
                                 for t in (W_gate, W_in, W_out)), X.to(dt),
                               *(None if t is None else t.to(dt) for t in (b_gate, b_in, b_out))) @ u.to(dt)
    got = truncated_readout(eig, X.to(dt), k)
    return float((got - ref).abs().max())
