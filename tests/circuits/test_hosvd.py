import pytest
import torch

from circuits import (hosvd_from_weights, interaction_gram, interaction_matrix_from_weights,
                      output_gram, singular_interaction_matrix)


def _explicit(W, U):
    """Flattened (n, d^2) tensor built directly, and its SVD."""
    F = interaction_matrix_from_weights(u=U, **W).flatten(1)
    return F, torch.linalg.svd(F, full_matrices=False)


@pytest.mark.parametrize("bias", [False, True])
def test_gram_route_equals_explicit(bias, make_layer):
    W = make_layer(d_model=7, d_mlp=11, bias=bias, seed=12)
    eye = torch.eye(7, dtype=torch.float64)
    F, (L, S, _) = _explicit(W, eye)
    torch.testing.assert_close(output_gram(**W), F @ F.T)
    h = hosvd_from_weights(**W)
    torch.testing.assert_close(h.singular_values, S)
    # Singular vectors agree up to sign (singular values are distinct for random weights).
    torch.testing.assert_close((h.output_vectors.T @ L).diagonal().abs(), torch.ones(7, dtype=torch.float64))
    # Input-side matrix of singular vector r is the r-th right singular vector reshaped.
    for r in range(3):
        R = singular_interaction_matrix(index=r, hosvd=h, **W)
        torch.testing.assert_close(R.flatten().abs(), _explicit(W, eye)[1][2][r].abs())


@pytest.mark.parametrize("n", [4, 20])
def test_gram_route_with_directions(n, make_layer):
    W = make_layer(d_model=7, d_mlp=11, seed=13)
    U = torch.randn(n, 7, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    _, (L, S, Vh) = _explicit(W, U)
    h = hosvd_from_weights(U=U, **W)
    r = min(n, 7)
    torch.testing.assert_close(h.singular_values[:r], S[:r])
    torch.testing.assert_close((h.output_vectors[:, :r].T @ L[:, :r]).diagonal().abs(),
                               torch.ones(r, dtype=torch.float64))
    R0 = singular_interaction_matrix(index=0, hosvd=h, **W).flatten()
    torch.testing.assert_close(R0.abs(), Vh[0].abs())


def test_interaction_gram_definition(make_layer):
    W = make_layer(d_model=5, d_mlp=6, seed=15)
    A, B = W["W_gate"], W["W_in"]
    G = interaction_gram(A, B)
    sym = lambda h: 0.5 * (torch.outer(A[:, h], B[:, h]) + torch.outer(B[:, h], A[:, h]))
    ref = torch.stack([torch.stack([(sym(h) * sym(k)).sum() for k in range(6)]) for h in range(6)])
    torch.testing.assert_close(G, ref)
    with pytest.raises(ValueError, match="must both be"):
        interaction_gram(A, B[:, :3])
