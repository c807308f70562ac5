"""Eigendecomposition of interaction matrices: u . mlp(x) = sum_i lambda_i (v_i . x)^2.

Two routes, both exact up to float tolerance:
  * dense:   form Q(u) (one matmul, O(d_mlp d^2)) and call ``torch.linalg.eigh``;
  * lanczos: matrix-free batched Lanczos (``circuits.lanczos``), O(d_mlp d) per step,
             only the top-k pairs; wins when d_model is large and k small.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .interaction import _check_u, _matvec_rows, as_weights, interaction_matrix_from_weights
from .lanczos import batched_lanczos

__all__ = ["Eigen", "eigendecompose_from_weights", "sort_by_magnitude"]

# Dense costs O(d_mlp d^2 + d^3) regardless of k; the matrix-free route O(steps d_mlp d).
# Measured (2-core CPU): for ONE direction dense wins even at d = 2048 (2.4 s vs 12 s; the
# matrix-free route is GEMV-bound), so "auto" keeps dense up to d = 4096;
# see benchmarks/bench_circuits.py for the measured crossover on a given machine.
DENSE_MAX_D = 4096


@dataclass
class Eigen:
    """Eigenpairs of Q(u), sorted by |lambda| descending.

    values [k] (or [n, k]), vectors [d, k] (or [n, d, k]) with eigenvectors as columns.
    d = d_model, or d_model + 1 when ``augmented`` (biases: last coordinate is the constant 1).
    Eigenvector signs are arbitrary.
    """

    values: Tensor
    vectors: Tensor
    augmented: bool = False

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def __getitem__(self, i) -> "Eigen":
        """Select a direction from a batched result (values [n, k] -> [k])."""
        return Eigen(self.values[i], self.vectors[i], self.augmented)

    def top(self, k: int) -> "Eigen":
        """The k largest-|lambda| pairs."""
        return Eigen(self.values[..., :k], self.vectors[..., :k], self.augmented)


def sort_by_magnitude(values: Tensor, vectors: Optional[Tensor] = None, k: Optional[int] = None):
    """Sort eigenpairs (values [..., m], vectors [..., d, m]) by |lambda| descending, keep k."""
    idx = values.abs().argsort(dim=-1, descending=True)
    if k is not None:
        idx = idx[..., :k]
    vals = values.gather(-1, idx)
    if vectors is None:
        return vals
    vecs = vectors.gather(-1, idx.unsqueeze(-2).expand(*vectors.shape[:-1], idx.shape[-1]))
    return vals, vecs


def eigendecompose_from_weights(W_gate, W_in, W_out, u, b_gate=None, b_in=None, b_out=None, *,
                                k: Optional[int] = None, method: str = "auto",
                                double: bool = False, tol: Optional[float] = None,
                                max_steps: Optional[int] = None, seed: int = 0) -> Eigen:
    """Eigenpairs of Q(u), sorted by |lambda| descending (all d of them if k is None).

    u: [d_model] -> Eigen(values [k], vectors [d, k]); u: [n, d_model] -> batched [n, k], [n, d, k].
    method: "dense" (form Q, eigh), "lanczos" (matrix-free, needs k), or "auto"
    (dense when k is None, d <= DENSE_MAX_D, or k > d / 8).
    double: do the dense eigh / Lanczos bookkeeping in float64 (results are float64).
    tol: Lanczos stops when every residual bound is <= tol * |lambda_i| (default 1e-5 in
    float32, 1e-10 in float64); otherwise it runs max_steps (default ~12 k + 100) steps.
    """
    w = as_weights(W_gate, W_in, W_out, b_gate, b_in, b_out)
    u = _check_u(w, u)
    d = w.d
    if k is not None and not (1 <= k <= d):
        raise ValueError(f"k must be between 1 and d = {d}, got {k}")
    if method == "auto":
        method = "dense" if (k is None or d <= DENSE_MAX_D or k > d // 8) else "lanczos"
    if method == "dense":
        Q = interaction_matrix_from_weights(W_gate, W_in, W_out, u, b_gate, b_in, b_out)
        if double:
            Q = Q.double()
        vals, vecs = torch.linalg.eigh(Q)
        vals, vecs = sort_by_magnitude(vals, vecs, k)
        return Eigen(vals, vecs, w.augmented)
    if method != "lanczos":
        raise ValueError(f"method must be 'auto', 'dense' or 'lanczos', got {method!r}")
    if k is None:
        raise ValueError("method='lanczos' needs k (number of eigenpairs)")
    if double:
        w = as_weights(*(None if t is None else t.double()
                         for t in (W_gate, W_in, W_out, b_gate, b_in, b_out)))
        u = u.double()
    if tol is None:
        tol = 1e-10 if w.A.dtype == torch.float64 else 1e-5
    single = u.ndim == 1
    U = u[None] if single else u
    c, const = w.coefficients(U), w.constant(U)
    # Exact-precision eigenvectors need a larger Krylov space than eigenvalues to 1%:
    # default to the whole space for small d, ~12 k + 100 otherwise.
    steps = max_steps if max_steps is not None else min(d, max(12 * k + 100, 4 * int(d ** 0.5)))
    vals, vecs, _ = batched_lanczos(
        lambda X: _matvec_rows(w, c, const, X[:, None, :], batched=True)[:, 0],
        U.shape[0], d, k, max_steps=steps, tol=tol, return_vectors=True, dtype=w.A.dtype,
        generator=torch.Generator().manual_seed(seed))
    vals = vals.to(w.A.dtype) if not double else vals
    vecs = vecs.to(vals.dtype)
    if single:
        vals, vecs = vals[0], vecs[0]
    return Eigen(vals, vecs, w.augmented)
