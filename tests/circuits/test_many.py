"""Fast paths for many directions / one large direction: agreement with dense eigvalsh/eigh."""
import pytest
import torch

import circuits.eigen as eigen_mod
from circuits import eigendecompose_from_weights, interaction_matrix_from_weights, topk_eigenvalues_many
from circuits.lanczos import batched_lanczos_values, block_lanczos
from .conftest import make_layer


def _dense_topk(W, U, k):
    ev = torch.linalg.eigvalsh(interaction_matrix_from_weights(u=U, **W).double())
    return ev.gather(-1, ev.abs().argsort(-1, descending=True)[..., :k])


def _rel(got, ref):
    return float(((got.abs() - ref.abs()).abs() / ref.abs()).max())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("stall_tol", [None, 1e-4])
def test_many_fp32_matches_dense(bias, stall_tol):
    W = make_layer(d_model=64, d_mlp=160, bias=bias, dtype=torch.float32, seed=20)
    U = torch.randn(12, 64, generator=torch.Generator().manual_seed(21))
    vals = topk_eigenvalues_many(U=U, k=8, chunk=5, stall_tol=stall_tol, steps=64, **W)
    ref = _dense_topk(W, U, 8)
    assert vals.shape == (12, 8)
    torch.testing.assert_close(vals, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("bias", [False, True])
def test_many_bf16_within_one_percent(bias):
    # bf16 weight GEMMs + bf16 Krylov basis: the documented accuracy is ~1e-3 relative.
    W = make_layer(d_model=96, d_mlp=256, bias=bias, dtype=torch.float32, seed=22)
    U = torch.randn(20, 96, generator=torch.Generator().manual_seed(23))
    vals = topk_eigenvalues_many(U=U, k=16, chunk=8, compute_dtype=torch.bfloat16, stall_tol=None,
                                 steps=96, **W)
    assert _rel(vals, _dense_topk(W, U, 16)) < 1e-2


def test_lanczos_values_drops_converged_directions():
    # Operators 0..3 have rank <= 2 (their Krylov space closes after 2 steps), 4..5 are full rank:
    # the low-rank ones must finish early, the values of all must match dense.
    d = 40
    g = torch.Generator().manual_seed(24)
    Qs = []
    for i in range(6):
        if i < 4:
            X = torch.randn(d, 2, generator=g, dtype=torch.float64)
            Qs.append(X @ torch.diag(torch.tensor([3.0, -1.0], dtype=torch.float64)) @ X.T)
        else:
            M = torch.randn(d, d, generator=g, dtype=torch.float64)
            Qs.append(M + M.T)
    Qs = torch.stack(Qs).float()
    seen = []

    def mv(X, rows):
        seen.append(rows.numel())
        return torch.bmm(Qs[rows], X.float()[:, :, None])[:, :, 0]

    vals, used = batched_lanczos_values(mv, 6, d, 2, max_steps=d, min_steps=4, rtol=1e-6,
                                        check_every=4, generator=torch.Generator().manual_seed(0))
    ref = torch.linalg.eigvalsh(Qs.double())
    ref = ref.gather(1, ref.abs().argsort(1, descending=True)[:, :2])
    torch.testing.assert_close(vals, ref, rtol=1e-4, atol=1e-4)
    assert (used[:4] < used[4:].min()).all()
    assert 2 in seen  # the batch shrank to the two full-rank operators


def test_lanczos_values_fewer_steps_than_k():
    W = make_layer(d_model=16, d_mlp=30, dtype=torch.float32, seed=25)
    U = torch.randn(3, 16, generator=torch.Generator().manual_seed(26))
    vals = topk_eigenvalues_many(U=U, k=8, steps=4, stall_tol=None, **W)
    assert vals.shape == (3, 8) and torch.isfinite(vals).all()
    assert (vals[:, 4:] == 0).all()


@pytest.mark.parametrize("bias", [False, True])
def test_block_method_matches_dense(bias):
    W = make_layer(d_model=160, d_mlp=400, bias=bias, dtype=torch.float32, seed=27)
    U = torch.randn(2, 160, generator=torch.Generator().manual_seed(28))
    dense = eigendecompose_from_weights(u=U, k=8, method="dense", double=True, **W)
    blk = eigendecompose_from_weights(u=U, k=8, method="block", **W)
    assert blk.values.shape == (2, 8) and blk.vectors.shape == (2, dense.vectors.shape[1], 8)
    assert _rel(blk.values.double(), dense.values) < 1e-3
    Q = interaction_matrix_from_weights(u=U, **W)
    resid = (Q @ blk.vectors - blk.vectors * blk.values[:, None, :]).norm(dim=1)
    assert float(resid.max()) < 2e-2 * float(dense.values.abs().max())
    # Single direction: same shapes as the dense route.
    one = eigendecompose_from_weights(u=U[0], k=8, method="block", **W)
    assert one.values.shape == (8,) and one.vectors.shape == dense.vectors.shape[1:]


def test_block_method_float64_full_space_is_exact():
    # float64 weights: no bf16 anywhere; 8 blocks of 16 span the whole 128-dim space.
    W = make_layer(d_model=128, d_mlp=300, seed=29)
    u = torch.randn(128, generator=torch.Generator().manual_seed(30), dtype=torch.float64)
    dense = eigendecompose_from_weights(u=u, k=6, method="dense", **W)
    blk = eigendecompose_from_weights(u=u, k=6, method="block", max_steps=8, **W)
    torch.testing.assert_close(blk.values, dense.values, rtol=1e-8, atol=1e-10)
    overlap = (blk.vectors * dense.vectors).sum(0).abs()
    torch.testing.assert_close(overlap, torch.ones_like(overlap), rtol=0, atol=1e-6)


def test_auto_picks_block_above_dense_max(monkeypatch):
    W = make_layer(d_model=140, d_mlp=300, dtype=torch.float32, seed=31)
    u = torch.randn(140, generator=torch.Generator().manual_seed(32))
    called = []
    orig = eigen_mod._block_eigen
    monkeypatch.setattr(eigen_mod, "_block_eigen", lambda *a, **k: called.append(1) or orig(*a, **k))
    monkeypatch.setattr(eigen_mod, "DENSE_MAX_D", 64)
    eigendecompose_from_weights(u=u, k=4, **W)
    assert called
    eigendecompose_from_weights(u=u, **W)          # k=None: always dense
    assert len(called) == 1


def test_block_lanczos_low_rank_operator():
    # Rank-3 operator: the block Krylov space closes at once; dead directions are replaced.
    d = 50
    X = torch.randn(d, 3, generator=torch.Generator().manual_seed(33), dtype=torch.float64)
    Q = X @ torch.diag(torch.tensor([5.0, -2.0, 1.0], dtype=torch.float64)) @ X.T
    th, V = block_lanczos(lambda Y: Y @ Q, d, 3, block=4, steps=3, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(0))
    ref = torch.linalg.eigvalsh(Q)
    ref = ref[ref.abs().argsort(descending=True)[:3]]
    torch.testing.assert_close(th, ref, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(Q @ V, V * th, rtol=0, atol=1e-8)
