import pytest
import torch

from circuits import (check_quadratic_form, effective_rank, eigendecompose_from_weights,
                      interaction_matrix_from_weights, topk_eigenvalues_many, truncated_readout)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_eigen_readout_exact(bias, dtype, tol, make_layer):
    W = make_layer(bias=bias, dtype=dtype, seed=6)
    g = torch.Generator().manual_seed(7)
    u = torch.randn(12, generator=g, dtype=dtype)
    X = torch.randn(40, 12, generator=g, dtype=dtype)
    eig = eigendecompose_from_weights(u=u, **W)
    assert eig.values.shape == (13 if bias else 12,)
    assert torch.all(eig.values.abs()[:-1] >= eig.values.abs()[1:])
    scale = float(eig.values.abs().max() * X.pow(2).sum(-1).max())
    assert check_quadratic_form(u=u, X=X, eig=eig, **W) < tol * scale
    # Truncation to all pairs is exact; to fewer it is not, and its error is what's reported.
    assert check_quadratic_form(u=u, X=X, eig=eig, k=3, **W) > tol * scale
    torch.testing.assert_close(truncated_readout(eig, X), truncated_readout(eig, X, k=eig.k))


def test_lanczos_topk_matches_dense(make_layer):
    W = make_layer(d_model=40, d_mlp=90, seed=8)
    U = torch.randn(3, 40, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    dense = eigendecompose_from_weights(u=U, k=6, method="dense", **W)
    lan = eigendecompose_from_weights(u=U, k=6, method="lanczos", **W)
    torch.testing.assert_close(lan.values, dense.values, rtol=1e-8, atol=1e-10)
    # Eigenvectors agree up to sign.
    overlap = torch.einsum("ndk,ndk->nk", lan.vectors, dense.vectors).abs()
    torch.testing.assert_close(overlap, torch.ones_like(overlap), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_topk_many_matches_dense(bias, make_layer):
    W = make_layer(d_model=48, d_mlp=100, bias=bias, dtype=torch.float32, seed=10)
    U = torch.randn(10, 48, generator=torch.Generator().manual_seed(11))
    vals = topk_eigenvalues_many(U=U, k=8, chunk=4, **W)
    Q = interaction_matrix_from_weights(u=U, **W).double()
    ev = torch.linalg.eigvalsh(Q)
    ref = ev.gather(1, ev.abs().argsort(1, descending=True)[:, :8])
    assert vals.shape == (10, 8)
    torch.testing.assert_close(vals, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("cos", [0.0, 0.6])
def test_planted_and_feature(cos):
    # Output o fires iff features a AND b are present: one hidden unit gating a with b.
    d_model, o = 8, 5
    a = torch.zeros(d_model, dtype=torch.float64)
    b = torch.zeros(d_model, dtype=torch.float64)
    a[0], b[0], b[1] = 2.0, 3.0 * cos, 3.0 * (1 - cos ** 2) ** 0.5   # |a| = 2, |b| = 3
    W_gate = torch.zeros(d_model, 3, dtype=torch.float64)
    W_in = torch.zeros(d_model, 3, dtype=torch.float64)
    W_out = torch.zeros(3, d_model, dtype=torch.float64)
    W_gate[:, 0], W_in[:, 0], W_out[0, o] = a, b, 1.0
    # Distractor units write to other outputs only.
    W_gate[2, 1], W_in[3, 1], W_out[1, 0] = 1.0, 1.0, 1.0
    W_gate[4, 2], W_in[4, 2], W_out[2, 1] = 1.0, 1.0, 1.0
    e_o = torch.zeros(d_model, dtype=torch.float64)
    e_o[o] = 1
    eig = eigendecompose_from_weights(W_gate, W_in, W_out, e_o, k=2)
    na, nb = a.norm(), b.norm()
    # sym(a b^T): lambda_+- = (a.b +- |a||b|) / 2 with eigenvectors a/|a| +- b/|b|.
    exp_vals = torch.stack([(a @ b + na * nb) / 2, (a @ b - na * nb) / 2])
    exp_vecs = torch.stack([a / na + b / nb, a / na - b / nb], 1)
    exp_vecs = exp_vecs / exp_vecs.norm(dim=0)
    # Compare in value order (at cos = 0 the two have equal |lambda| = |a||b|/2 = 3).
    got_order, exp_order = eig.values.argsort(), exp_vals.argsort()
    torch.testing.assert_close(eig.values[got_order], exp_vals[exp_order])
    overlap = (eig.vectors[:, got_order].T @ exp_vecs[:, exp_order]).diagonal().abs()
    torch.testing.assert_close(overlap, torch.ones(2, dtype=torch.float64))
    # Matrix-free route on an exactly rank-2 Q (Krylov breakdown after 2 steps) agrees.
    lan = eigendecompose_from_weights(W_gate, W_in, W_out, e_o, k=2, method="lanczos")
    torch.testing.assert_close(lan.values.sort().values, exp_vals.sort().values)
    # Rank 2 exactly: everything else is zero, effective rank between 1 and 2.
    full = eigendecompose_from_weights(W_gate, W_in, W_out, e_o)
    assert full.values[2:].abs().max() < 1e-12
    assert 1.0 < float(effective_rank(full.values)) <= 2.0 + 1e-12


def test_effective_rank_values():
    assert float(effective_rank(torch.tensor([1.0, -1.0, 1.0, 0.0]))) == pytest.approx(3.0)
    assert float(effective_rank(torch.tensor([5.0, 0.0]))) == pytest.approx(1.0)
    assert float(effective_rank(torch.zeros(3))) == 0.0
    assert effective_rank(torch.ones(4, 6)).shape == (4,)


def test_eigen_bad_inputs(layer):
    with pytest.raises(ValueError, match="k must be between 1 and d = 12"):
        eigendecompose_from_weights(u=torch.zeros(12), k=40, **layer)
    with pytest.raises(ValueError, match="method must be"):
        eigendecompose_from_weights(u=torch.zeros(12), k=2, method="magic", **layer)
    with pytest.raises(ValueError, match="u has size 3 but d_model is 12"):
        topk_eigenvalues_many(U=torch.zeros(4, 3), **layer)
