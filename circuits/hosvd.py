"""Higher-order SVD of a bilinear MLP's interaction tensor, via Gram matrices.

Flatten the symmetric tensor over a set of output directions U [n, d_model] into
F [n, d^2] (row o = vec Q(u_o)). Its SVD F = L diag(sigma) R^T gives output-side singular
vectors L (combinations of the directions) and input-side matrices R_r = Q(U^T L_r) / sigma_r
whose top eigenvectors are input features shared by many outputs.

We never form F (d_mlp * d^2 numbers would be needed to build it). Since
<sym(A D_o B^T), sym(A D_o' B^T)>_F = 1/2 sum_hh' c_oh c_o'h' [(A^TA)(B^TB) + (A^TB)(B^TA)]_hh',
the Gram over outputs is W_out^T G W_out with
    G = ((A^T A) * (B^T B) + (A^T B) * (B^T A)) / 2      (d_mlp x d_mlp, elementwise *).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .interaction import _check_u, as_weights, interaction_matrix_from_weights

__all__ = ["HOSVD", "interaction_gram", "output_gram", "hosvd_from_weights",
           "singular_interaction_matrix"]


@dataclass
class HOSVD:
    """Output-side SVD of the flattened interaction tensor.

    singular_values [r] (descending), output_vectors [n, r] (L: coefficients over the
    given directions), directions [r, d_model] (U^T L: each singular vector as one residual
    direction, so its input-side matrix is Q(directions[r]) / singular_values[r]).
    """

    singular_values: Tensor
    output_vectors: Tensor
    directions: Tensor


def interaction_gram(W_gate, W_in, b_gate=None, b_in=None) -> Tensor:
    """G [d_mlp, d_mlp] = ((A^T A) * (B^T B) + (A^T B) * (B^T A)) / 2, A=W_gate', B=W_in'.

    With biases A, B are the augmented [W; b]. G[h, h'] is the Frobenius inner product of
    the symmetric rank-2 matrices sym(a_h b_h^T) and sym(a_h' b_h'^T).
    """
    if W_gate.ndim != 2 or W_gate.shape != W_in.shape:
        raise ValueError(f"W_gate {tuple(W_gate.shape)} and W_in {tuple(W_in.shape)} must both be "
                         "[d_model, d_mlp]")
    d_model, d_mlp = W_gate.shape
    w = as_weights(W_gate, W_in, W_in.new_zeros(d_mlp, d_model), b_gate, b_in)
    return _gram_ab(w.A, w.B)


def output_gram(W_gate, W_in, W_out, b_gate=None, b_in=None, b_out=None) -> Tensor:
    """K [d_model, d_model] with K[o, o'] = <Q(e_o), Q(e_o')>_F, so <Q(u), Q(v)>_F = u^T K v."""
    w = as_weights(W_gate, W_in, W_out, b_gate, b_in, b_out)
    G = _gram_ab(w.A, w.B)
    K = w.W_out.T @ G @ w.W_out
    if w.b_out is not None:
        # Q(e_o)[-1,-1] gains b_out[o]: <T_o + b_o E, T_o' + b_o' E> adds
        # b_o t_o' + t_o b_o' + b_o b_o' with t_o = Q_no_bout(e_o)[-1,-1].
        t = w.W_out.T @ (w.A[-1] * w.B[-1])
        s = t + w.b_out
        K = K + torch.outer(s, s) - torch.outer(t, t)
    return 0.5 * (K + K.T)


def _gram_ab(A: Tensor, B: Tensor) -> Tensor:
    AB = A.T @ B
    return ((A.T @ A) * (B.T @ B) + AB * AB.T) * 0.5


def hosvd_from_weights(W_gate, W_in, W_out, U: Optional[Tensor] = None, b_gate=None, b_in=None,
                       b_out=None, *, rank: Optional[int] = None) -> HOSVD:
    """Output-side HOSVD over directions U [n, d_model] (default: identity = all of residual space).

    Cost O(d_mlp^2 d) for the Gram plus O(n d^2); never forms anything d^2 wide.
    For n <= d_model we eigendecompose U K U^T [n, n]; otherwise K^1/2 U^T U K^1/2 [d, d]
    (same nonzero spectrum) and map back with L = U K^1/2 E / sigma.
    """
    w = as_weights(W_gate, W_in, W_out, b_gate, b_in, b_out)
    K = output_gram(W_gate, W_in, W_out, b_gate, b_in, b_out).double()
    if U is None:
        ev, E = torch.linalg.eigh(K)
        sig2, L = ev.flip(-1), E.flip(-1)
        Ud = None
    else:
        U = _check_u(w, U)
        if U.ndim == 1:
            U = U[None]
        Ud = U.double()
        if U.shape[0] <= w.d_model:
            ev, E = torch.linalg.eigh(Ud @ K @ Ud.T)
            sig2, L = ev.flip(-1), E.flip(-1)
        else:
            kv, kE = torch.linalg.eigh(K)
            Kh = (kE * kv.clamp_min(0).sqrt()) @ kE.T              # K^1/2
            ev, E = torch.linalg.eigh(Kh @ (Ud.T @ Ud) @ Kh)
            sig2, E = ev.flip(-1), E.flip(-1)
            sig = sig2.clamp_min(0).sqrt()
            L = (Ud @ Kh @ E) / sig.clamp_min(torch.finfo(sig.dtype).tiny)
    sig = sig2.clamp_min(0).sqrt()
    r = sig.shape[0] if rank is None else min(rank, sig.shape[0])
    sig, L = sig[:r], L[:, :r]
    dirs = (L.T if Ud is None else L.T @ Ud).to(w.A.dtype)
    return HOSVD(sig.to(w.A.dtype), L.to(w.A.dtype), dirs)


def singular_interaction_matrix(W_gate, W_in, W_out, hosvd: HOSVD, index: int, b_gate=None,
                                b_in=None, b_out=None) -> Tensor:
    """Input-side matrix R_index [d, d] = Q(directions[index]) / sigma_index (unit Frobenius norm).

    Its top eigenvectors (``torch.linalg.eigh``) are the input features that output singular
    vector ``index`` reads.
    """
    if not 0 <= index < hosvd.singular_values.shape[0]:
        raise ValueError(f"index {index} out of range for {hosvd.singular_values.shape[0]} "
                         "singular vectors")
    Q = interaction_matrix_from_weights(W_gate, W_in, W_out, hosvd.directions[index],
                                        b_gate, b_in, b_out)
    return Q / hosvd.singular_values[index].clamp_min(torch.finfo(Q.dtype).tiny)
