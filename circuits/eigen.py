"""Eigendecomposition of interaction matrices: u . mlp(x) = sum_i lambda_i (v_i . x)^2.

For one direction, three routes (`eigendecompose_from_weights`); for many directions at once
(a whole vocabulary), batched Lanczos (`topk_eigenvalues_many`); and what keeping only the top k
eigenpairs does (`truncated_readout`, `effective_rank`, `check_quadratic_form`).

Three routes:
  * dense:   form Q(u) (one matmul, O(d_mlp d^2)) and call ``torch.linalg.eigh``; exact.
  * block:   matrix-free block Lanczos (``circuits.lanczos.block_lanczos``): blocks of 16
             vectors, so each step is a GEMM against the weights (bfloat16 for float32
             weights), then a float32 Rayleigh-Ritz refinement with the exact operator.
             Top-k only; measured at TinyLlama size (d 2048, d_mlp 5632, k 16): ~0.3 s vs
             ~1.3-5 s dense, eigenvalues within ~1e-5 relative, residuals ||Q v - lambda v||
             ~2e-3 ||Q||. The default for large d.
  * lanczos: matrix-free single-vector batched Lanczos (``circuits.lanczos``), float32/64
             throughout, exact to tolerance but GEMV-bound (slow for one direction).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .interaction import _check_u, _matvec_rows, as_weights, augment_input, bilinear_mlp_forward, interaction_matrix_from_weights
from .lanczos import batched_lanczos, batched_lanczos_values, block_lanczos

__all__ = ["Eigen", "eigendecompose_from_weights", "sort_by_magnitude", "topk_eigenvalues_many",
           "default_krylov_steps", "effective_rank", "truncated_readout", "check_quadratic_form"]

# Dense costs O(d_mlp d^2 + d^3) regardless of k; the matrix-free routes O(steps d_mlp d).
# Measured (2-core CPU, benchmarks/bench_circuits.py): single-vector Lanczos is GEMV-bound and
# loses to dense for one direction even at d = 2048 (12 s vs 2.4 s); block Lanczos (GEMMs)
# wins there (~0.3 s). At d = 512 dense takes ~0.1 s, so "auto" uses dense below
# DENSE_MAX_D and block Lanczos above it (when k <= d / 8).
DENSE_MAX_D = 1024
BLOCK_SIZE = 16


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
    method: "dense" (form Q, eigh), "block" (matrix-free block Lanczos with bf16 GEMMs and a
    float32 Rayleigh-Ritz refinement; needs k), "lanczos" (matrix-free single-vector Lanczos,
    needs k), or "auto" (dense when k is None, d <= DENSE_MAX_D, or k > d / 8; else block).
    "block" is approximate: eigenvalues ~1e-5 relative, eigenvector residuals ~1e-3 ||Q||
    (bf16 Krylov basis); with ``double=True`` or float64 weights it runs in float64.
    double: do the dense eigh / Lanczos bookkeeping in float64 (results are float64).
    tol: Lanczos stops when every residual bound is <= tol * |lambda_i| (default 1e-5 in
    float32, 1e-10 in float64); otherwise it runs max_steps (default ~12 k + 100) steps.
    For "block", max_steps counts block steps of 16 vectors (default ceil(min(d, 24 k) / 16));
    tol is not used.
    """
    w = as_weights(W_gate, W_in, W_out, b_gate, b_in, b_out)
    u = _check_u(w, u)
    d = w.d
    if k is not None and not (1 <= k <= d):
        raise ValueError(f"k must be between 1 and d = {d}, got {k}")
    if method == "auto":
        method = "dense" if (k is None or d <= DENSE_MAX_D or k > d // 8) else "block"
    if method == "dense":
        Q = interaction_matrix_from_weights(W_gate, W_in, W_out, u, b_gate, b_in, b_out)
        if double:
            Q = Q.double()
        vals, vecs = torch.linalg.eigh(Q)
        vals, vecs = sort_by_magnitude(vals, vecs, k)
        return Eigen(vals, vecs, w.augmented)
    if method not in ("lanczos", "block"):
        raise ValueError(f"method must be 'auto', 'dense', 'block' or 'lanczos', got {method!r}")
    if k is None:
        raise ValueError(f"method={method!r} needs k (number of eigenpairs)")
    if method == "block":
        return _block_eigen(w, u, k, double, max_steps, seed)
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


def _block_eigen(w, u: Tensor, k: int, double: bool, max_steps: Optional[int], seed: int) -> Eigen:
    """Top-k eigenpairs by matrix-free block Lanczos + exact Rayleigh-Ritz refinement."""
    work = torch.float64 if (double or w.A.dtype == torch.float64) else torch.float32
    cdt = torch.bfloat16 if work == torch.float32 else work   # dtype of the Krylov GEMMs
    d, m = w.d, w.d_mlp
    A, B = w.A.to(work), w.B.to(work)
    # One [d, 2m] copy of the weights in the GEMM dtype (slice assignment converts in place:
    # ~4x cheaper than cat + cast + transpose). x Wc = [A^T x, B^T x]; swapping the halves
    # and scaling by c / 2 gives Zs with Zs Wc^T = Q x (a transposed view, no copy).
    Wc = torch.empty(d, 2 * m, dtype=cdt)
    Wc[:, :m] = A
    Wc[:, m:] = B
    single = u.ndim == 1
    U = (u[None] if single else u).to(work)
    C = U @ w.W_out.to(work).T
    const = None if w.b_out is None else U @ w.b_out.to(work)
    block = min(BLOCK_SIZE, d)
    steps = max_steps if max_steps is not None else -(-min(d, 24 * k) // block)
    p = min(d, 2 * k)                               # refinement subspace
    gen = torch.Generator().manual_seed(seed)
    vals_out, vecs_out = [], []
    for i in range(U.shape[0]):
        ch = 0.5 * C[i]
        kc = None if const is None else const[i]

        def op_fast(X: Tensor) -> Tensor:
            Z = X.to(cdt) @ Wc
            Zs = torch.empty_like(Z)
            torch.mul(Z[:, m:], ch, out=Zs[:, :m])
            torch.mul(Z[:, :m], ch, out=Zs[:, m:])
            Y = (Zs @ Wc.T).to(work)
            if kc is not None:
                Y[:, -1] += kc * X[:, -1].to(work)
            return Y

        def op_exact(X: Tensor) -> Tensor:
            Y = ((X @ B) * ch) @ A.T + ((X @ A) * ch) @ B.T
            if kc is not None:
                Y[:, -1] += kc * X[:, -1]
            return Y

        th, V = block_lanczos(op_fast, d, p, block=block, steps=steps,
                              dtype=work, generator=gen)
        # Rayleigh-Ritz with the exact (working-precision) operator on the top-p Ritz vectors:
        # eigenvalue errors become second order in the bf16 error of the basis.
        Vq = torch.linalg.qr(V).Q                   # [d, p]
        H = (Vq.T @ op_exact(Vq.T).T).double()
        theta, S = torch.linalg.eigh(0.5 * (H + H.T))
        idx = theta.abs().argsort(descending=True)[:k]
        vals_out.append(theta[idx])
        vecs_out.append(Vq @ S[:, idx].to(work))
    vals = torch.stack(vals_out)
    vals = vals if double else vals.to(w.A.dtype)
    vecs = torch.stack(vecs_out).to(vals.dtype)
    if single:
        vals, vecs = vals[0], vecs[0]
    return Eigen(vals, vecs, w.augmented)


# --- many directions at once ---------------------------------------------------------------
# Top-k eigenvalues of Q(u) for many output directions at once (e.g. the whole vocabulary).
#
# Route: batched matrix-free Lanczos. For a chunk of directions the Krylov vectors of all
# of them are multiplied by the weights together, so every step is two GEMMs
# [chunk, d] x [d, 2 d_mlp] against the shared weights (the weights are read once per step
# for the whole chunk) instead of 2 * chunk GEMVs. Nothing of size d x d per direction is
# ever formed: memory in flight is chunk * (steps * d + 4 d_mlp) floats plus the weights.
# With bf16 GEMMs (``compute_dtype=torch.bfloat16``) the GEMMs are ~80% of the run time
# (measured at TinyLlama size): the full reorthogonalization is two batched GEMMs per step
# on a bf16 basis kept in contiguous 32-step segments.
#
# Accuracy is controlled by the Krylov depth: extremal eigenvalues of these matrices
# converge in ~ a few * d^(1/3) * 10 steps (measured on random weights, top-16: d=512
# reaches ~2e-3 max relative error at 96 steps, d=2048 ~1e-3 at 128-152 steps; real weights
# with decaying spectra converge faster). ``stall_tol`` lets a direction stop early once its
# Ritz values stop moving, within the cap.

def default_krylov_steps(d: int, k: int) -> int:
    """Krylov depth used by default: 12 * d^(1/3) (96 at d=512, 152 at d=2048), >= 3k, <= d."""
    return min(d, max(3 * k, int(round(12 * d ** (1 / 3)))))


def topk_eigenvalues_many(W_gate, W_in, W_out, U: Tensor, k: int = 16, b_gate=None, b_in=None,
                          b_out=None, *, steps: Optional[int] = None, stall_tol: Optional[float] = 1e-4,
                          chunk: int = 256, compute_dtype: Optional[torch.dtype] = None,
                          basis_dtype: Optional[torch.dtype] = None, check_every: int = 16,
                          seed: int = 0, progress: bool = False) -> Tensor:
    """Top-k eigenvalues (by |lambda|, descending) of Q(u) for every row u of U.

    U: [n, d_model] -> values [n, k] (float64). Matrix-free batched Lanczos, ``chunk``
    directions at a time (``circuits.lanczos.batched_lanczos_values``).

    Depth: at most ``steps`` Krylov steps (default ``default_krylov_steps``: the depth that
    reaches ~1e-3 relative on random layers, whose flat spectra are the slow case). With
    ``stall_tol`` a direction may finish earlier -- from ``steps // 2`` on, once none of its
    top-k Ritz values moved by more than ``stall_tol`` (relative) over ``check_every``
    steps -- and is then dropped from the batch (helps real weights with decaying spectra).
    Caveat, measured: a Ritz value can sit still while an eigenvalue not yet found by the
    Krylov space is missing, so a loose ``stall_tol`` (1e-3) can stop with a rank-wise error
    of ~1e-2; the cap ``steps`` is what guarantees accuracy on hard (flat) spectra.
    ``stall_tol=None`` runs exactly ``steps`` steps (fastest on random weights).

    compute_dtype: dtype of the two weight GEMMs per step (default: the weights' dtype).
    ``torch.bfloat16`` is 2-3x faster on CPUs with bf16 units (AVX512-BF16/AMX) and bounds
    the accuracy at ~1e-3 relative (the operator itself is rounded); the Lanczos
    coefficients stay float32/float64. basis_dtype: storage of the Krylov basis (default:
    bfloat16 when compute_dtype is bfloat16, else the weights' dtype).
    """
    w = as_weights(W_gate, W_in, W_out, b_gate, b_in, b_out)
    U = _check_u(w, U)
    if U.ndim == 1:
        U = U[None]
    d, m = w.d, w.d_mlp
    if not 1 <= k <= d:
        raise ValueError(f"k must be between 1 and d = {d}, got {k}")
    base = default_krylov_steps(d, k)
    if steps is None:
        steps = base
    steps = max(1, min(int(steps), d))
    work = w.A.dtype
    cdt = work if compute_dtype is None else compute_dtype
    bdt = basis_dtype if basis_dtype is not None else (cdt if cdt == torch.bfloat16 else work)
    # One [d, 2m] copy of the weights in the GEMM dtype: x Wc = [A^T x, B^T x]; with the
    # halves swapped and scaled by c / 2, Zs Wc^T = Q x (Wc^T is a view; no second copy).
    Wc = torch.empty(d, 2 * m, dtype=cdt)
    Wc[:, :m] = w.A
    Wc[:, m:] = w.B
    C = w.coefficients(U)                                    # [n, m]
    const = w.constant(U)
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(U.shape[0], k, dtype=torch.float64)
    starts = range(0, U.shape[0], chunk)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="top-k eigenvalues", unit="chunk")
    for s in starts:
        # Q x = 1/2 (A (c * B^T x) + B (c * A^T x)). The scaling is done in the working dtype
        # (rounding c to bf16 as well doubles the error) and written straight into the GEMM dtype.
        ch = 0.5 * C[s:s + chunk]                               # [b, m]
        kc = None if const is None else const[s:s + chunk]

        def matvec(X: Tensor, rows: Tensor) -> Tensor:
            Z = X.to(cdt) @ Wc                                # [r, 2m] = [A^T x, B^T x]
            cr = ch if rows.shape[0] == ch.shape[0] else ch[rows]
            Zs = torch.empty_like(Z)
            torch.mul(Z[:, m:], cr, out=Zs[:, :m])            # c B^T x / 2
            torch.mul(Z[:, :m], cr, out=Zs[:, m:])            # c A^T x / 2
            Y = (Zs @ Wc.T).to(work)
            if kc is not None:
                Y[:, -1] += kc[rows].to(work) * X[:, -1].to(work)
            return Y

        nb = ch.shape[0]
        if stall_tol is None:
            vals, _ = batched_lanczos_values(matvec, nb, d, k, max_steps=steps, min_steps=steps,
                                             rtol=0.0, basis_dtype=bdt, generator=gen)
        else:
            vals, _ = batched_lanczos_values(matvec, nb, d, k, max_steps=steps,
                                             min_steps=min(steps, max(2 * k, base // 2)),
                                             rtol=stall_tol, check_every=check_every,
                                             basis_dtype=bdt, generator=gen)
        out[s:s + chunk] = vals
    return out


# --- truncation: keeping the top-k eigenpairs ----------------------------------------------

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
