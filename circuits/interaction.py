"""Interaction matrices Q(u) of a bilinear MLP, built from its weights.

Conventions (TransformerLens shapes, one layer):
    W_gate, W_in : [d_model, d_mlp]
    W_out        : [d_mlp, d_model]
    b_gate, b_in : [d_mlp]      (optional)
    b_out        : [d_model]    (optional)
    mlp(x) = ((x @ W_gate + b_gate) * (x @ W_in + b_in)) @ W_out + b_out

For an output direction u, ``u . mlp(x) = x^T Q(u) x`` with
``Q(u) = sym(W_gate diag(W_out u) W_in^T)``. When any bias is given the input is
augmented with a constant 1 (``x' = [x, 1]``, ``W' = [W; b]``), so Q is
(d_model+1) x (d_model+1): linear terms sit in the last row/column and the
constant (including ``b_out . u``) in ``Q[-1, -1]``.

Nothing here ever forms the third-order tensor (d_mlp * d_model^2 numbers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "BilinearWeights",
    "as_weights",
    "bilinear_mlp_forward",
    "augment_input",
    "interaction_matrix_from_weights",
    "interaction_matvec",
]


@dataclass(frozen=True)
class BilinearWeights:
    """Validated (and, with biases, augmented) weights of one bilinear MLP.

    A = W_gate' [d, d_mlp], B = W_in' [d, d_mlp], W_out [d_mlp, d_model],
    where d = d_model (+1 when ``augmented``). ``b_out`` is kept separately
    because it only contributes the constant ``b_out . u``.
    """

    A: Tensor
    B: Tensor
    W_out: Tensor
    b_out: Optional[Tensor]
    augmented: bool

    @property
    def d_model(self) -> int:
        return self.W_out.shape[1]

    @property
    def d_mlp(self) -> int:
        return self.W_out.shape[0]

    @property
    def d(self) -> int:
        """Size of Q: d_model, or d_model + 1 with the bias augmentation."""
        return self.A.shape[0]

    def coefficients(self, U: Tensor) -> Tensor:
        """c = W_out u for u [..., d_model] -> [..., d_mlp]: the diagonal of the middle factor."""
        return U @ self.W_out.T

    def constant(self, U: Tensor) -> Optional[Tensor]:
        """b_out . u for u [..., d_model] -> [...], or None without b_out."""
        return None if self.b_out is None else U @ self.b_out


def _check_vec(name: str, t: Optional[Tensor], size: int, what: str) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 1 or t.shape[0] != size:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but must be [{what}] = [{size}]")


def as_weights(W_gate, W_in, W_out, b_gate=None, b_in=None, b_out=None) -> BilinearWeights:
    """Validate shapes and return :class:`BilinearWeights` (augmented if any bias is given).

    Missing biases are treated as zero once any bias is present. All tensors are
    cast to a common floating dtype (float32 unless a float64 tensor is given).
    """
    for name, t in (("W_gate", W_gate), ("W_in", W_in), ("W_out", W_out)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    d_model, d_mlp = W_gate.shape
    if W_in.shape != W_gate.shape:
        raise ValueError(
            f"W_in has shape {tuple(W_in.shape)} but W_gate has shape {tuple(W_gate.shape)}; "
            "both must be [d_model, d_mlp]")
    if W_out.shape != (d_mlp, d_model):
        raise ValueError(
            f"W_out has shape {tuple(W_out.shape)} but must be [d_mlp, d_model] = [{d_mlp}, {d_model}] "
            "(TransformerLens convention; did you pass W_out transposed?)")
    _check_vec("b_gate", b_gate, d_mlp, "d_mlp")
    _check_vec("b_in", b_in, d_mlp, "d_mlp")
    _check_vec("b_out", b_out, d_model, "d_model")

    tensors = [t for t in (W_gate, W_in, W_out, b_gate, b_in, b_out) if t is not None]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    W_gate, W_in, W_out = (t.to(dtype) for t in (W_gate, W_in, W_out))
    augmented = any(b is not None for b in (b_gate, b_in, b_out))
    if augmented:
        zeros = W_gate.new_zeros(d_mlp)
        # x' = [x, 1]: the bias becomes the last row of the input weights.
        A = torch.cat([W_gate, (zeros if b_gate is None else b_gate.to(dtype))[None]], 0)
        B = torch.cat([W_in, (zeros if b_in is None else b_in.to(dtype))[None]], 0)
    else:
        A, B = W_gate, W_in
    return BilinearWeights(A, B, W_out, None if b_out is None else b_out.to(dtype), augmented)


def _check_u(w: BilinearWeights, u: Tensor) -> Tensor:
    if not isinstance(u, Tensor):
        raise TypeError(f"u must be a torch.Tensor, got {type(u).__name__}")
    if u.ndim not in (1, 2):
        raise ValueError(f"u must be [d_model] or [n, d_model], got shape {tuple(u.shape)}")
    if u.shape[-1] != w.d_model:
        raise ValueError(f"u has size {u.shape[-1]} but d_model is {w.d_model}")
    return u.to(w.A.dtype)


def bilinear_mlp_forward(W_gate, W_in, W_out, x, b_gate=None, b_in=None, b_out=None) -> Tensor:
    """Reference forward pass: x [..., d_model] -> mlp(x) [..., d_model]."""
    g = x @ W_gate + (0 if b_gate is None else b_gate)
    h = x @ W_in + (0 if b_in is None else b_in)
    return (g * h) @ W_out + (0 if b_out is None else b_out)


def augment_input(x: Tensor) -> Tensor:
    """x [..., d_model] -> [x, 1] [..., d_model + 1] (the space of the augmented Q)."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


def interaction_matrix_from_weights(W_gate, W_in, W_out, u, b_gate=None, b_in=None, b_out=None,
                                    chunk: int = 64) -> Tensor:
    """Symmetric interaction matrix Q(u) with ``u . mlp(x) = x^T Q(u) x``.

    u: [d_model] -> Q [d, d]; u: [n, d_model] -> Q [n, d, d], with d = d_model,
    or d_model + 1 if any bias is given (then evaluate at ``augment_input(x)``).
    Cost O(d_mlp * d^2) per direction; ``chunk`` directions are formed at a time
    so at most chunk * d * d_mlp extra floats are in flight.
    """
    w = as_weights(W_gate, W_in, W_out, b_gate, b_in, b_out)
    u = _check_u(w, u)
    single = u.ndim == 1
    U = u[None] if single else u
    C = w.coefficients(U)                         # [n, d_mlp]
    const = w.constant(U)
    out = U.new_empty(U.shape[0], w.d, w.d)
    for s in range(0, U.shape[0], chunk):
        c = C[s:s + chunk]
        # Scale the columns of W_gate by c (= diag(c)), then one matmul with W_in^T.
        M = (w.A[None] * c[:, None, :]) @ w.B.T
        Q = 0.5 * (M + M.transpose(-1, -2))      # only the symmetric part is seen by x^T Q x
        if const is not None:
            Q[:, -1, -1] += const[s:s + chunk]
        out[s:s + chunk] = Q
    return out[0] if single else out


def interaction_matvec(W_gate, W_in, W_out, u, X, b_gate=None, b_in=None, b_out=None) -> Tensor:
    """Matrix-free product with Q(u), O(d_mlp * d) per vector, Q never formed.

    Vectors are rows (Q is symmetric, so X @ Q == (Q X^T)^T).
      u [d_model]:     X [d] or [b, d]          -> same shape
      u [n, d_model]:  X [n, d] or [n, b, d]    -> same shape (one Q per row of u)
    d = d_model, or d_model + 1 with biases.
    """
    w = as_weights(W_gate, W_in, W_out, b_gate, b_in, b_out)
    u = _check_u(w, u)
    if not isinstance(X, Tensor):
        raise TypeError(f"X must be a torch.Tensor, got {type(X).__name__}")
    if X.shape[-1] != w.d:
        raise ValueError(f"X has last dimension {X.shape[-1]} but Q(u) is {w.d} x {w.d}"
                         + (" (d_model + 1 because biases were given)" if w.augmented else ""))
    c = w.coefficients(u)
    const = w.constant(u)
    X = X.to(w.A.dtype)
    if u.ndim == 2:
        if X.ndim not in (2, 3) or X.shape[0] != u.shape[0]:
            raise ValueError(f"with u of shape {tuple(u.shape)}, X must be [n, d] or [n, b, d] with "
                             f"n = {u.shape[0]}, got {tuple(X.shape)}")
        if X.ndim == 2:
            return _matvec_rows(w, c, const, X[:, None, :], batched=True)[:, 0]
        return _matvec_rows(w, c, const, X, batched=True)
    if X.ndim not in (1, 2):
        raise ValueError(f"with a single u, X must be [d] or [b, d], got {tuple(X.shape)}")
    return _matvec_rows(w, c, const, X, batched=False)


def _matvec_rows(w: BilinearWeights, c: Tensor, const, X: Tensor, batched: bool) -> Tensor:
    """Q(u) x for rows x of X. batched: c [n, d_mlp], X [n, b, d]; else c [d_mlp], X [..., d]."""
    if batched:
        c = c[:, None, :]
    # Q x = (A (c * B^T x) + B (c * A^T x)) / 2
    Y = 0.5 * (((X @ w.B) * c) @ w.A.T + ((X @ w.A) * c) @ w.B.T)
    if const is not None:
        k = const[:, None] if batched else const
        Y[..., -1] += k * X[..., -1]
    return Y
