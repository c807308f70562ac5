import pytest
import torch

from circuits import (augment_input, bilinear_mlp_forward, interaction_matrix_from_weights,
                      interaction_matvec)


def _readout(W, u, X):
    return bilinear_mlp_forward(W["W_gate"], W["W_in"], W["W_out"], X, W.get("b_gate"),
                                W.get("b_in"), W.get("b_out")) @ u


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_quadratic_form_matches_forward(bias, dtype, tol, make_layer):
    W = make_layer(d_model=10, d_mlp=24, bias=bias, dtype=dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    u = torch.randn(10, generator=g, dtype=dtype)
    X = torch.randn(50, 10, generator=g, dtype=dtype)
    Q = interaction_matrix_from_weights(u=u, **W)
    assert Q.shape == ((11, 11) if bias else (10, 10))
    Xa = augment_input(X) if bias else X
    got = torch.einsum("ni,ij,nj->n", Xa, Q, Xa)
    ref = _readout(W, u, X)
    assert torch.allclose(got, ref, atol=tol * ref.abs().max(), rtol=0)


def test_symmetric_and_batched_equals_loop(biased_layer):
    W = biased_layer
    U = torch.randn(5, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    Qb = interaction_matrix_from_weights(u=U, chunk=2, **W)
    assert Qb.shape == (5, 13, 13)
    assert torch.equal(Qb, Qb.transpose(-1, -2))
    for i in range(5):
        torch.testing.assert_close(Qb[i], interaction_matrix_from_weights(u=U[i], **W))


@pytest.mark.parametrize("bias", [False, True])
def test_matvec_matches_dense(bias, make_layer):
    W = make_layer(bias=bias, seed=4)
    g = torch.Generator().manual_seed(5)
    d = 13 if bias else 12
    U = torch.randn(3, 12, generator=g, dtype=torch.float64)
    Q = interaction_matrix_from_weights(u=U, **W)
    X = torch.randn(3, 4, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(interaction_matvec(u=U, X=X, **W), X @ Q)
    torch.testing.assert_close(interaction_matvec(u=U, X=X[:, 0], **W), (X[:, :1] @ Q)[:, 0])
    torch.testing.assert_close(interaction_matvec(u=U[0], X=X[0], **W), X[0] @ Q[0])
    torch.testing.assert_close(interaction_matvec(u=U[0], X=X[0, 0], **W), Q[0] @ X[0, 0])


def test_bad_inputs_name_the_problem(layer):
    W = layer
    with pytest.raises(ValueError, match="u has size 7 but d_model is 12"):
        interaction_matrix_from_weights(u=torch.zeros(7, dtype=torch.float64), **W)
    with pytest.raises(ValueError, match="W_out has shape"):
        interaction_matrix_from_weights(W["W_gate"], W["W_in"], W["W_out"].T.contiguous(),
                                        torch.zeros(12))
    with pytest.raises(ValueError, match="W_in has shape"):
        interaction_matrix_from_weights(W["W_gate"], W["W_in"][:, :5], W["W_out"], torch.zeros(12))
    with pytest.raises(ValueError, match="b_gate has shape"):
        interaction_matrix_from_weights(u=torch.zeros(12), b_gate=torch.zeros(12), **W)
    with pytest.raises(ValueError, match="b_out has shape"):
        interaction_matrix_from_weights(u=torch.zeros(12), b_out=torch.zeros(20), **W)
    with pytest.raises(ValueError, match="W_gate must be 2-D"):
        interaction_matrix_from_weights(W["W_gate"][None], W["W_in"], W["W_out"], torch.zeros(12))
    with pytest.raises(ValueError, match="u must be"):
        interaction_matrix_from_weights(u=torch.zeros(2, 2, 12), **W)
    with pytest.raises(ValueError, match="X has last dimension 5"):
        interaction_matvec(u=torch.zeros(12), X=torch.zeros(5), **W)
