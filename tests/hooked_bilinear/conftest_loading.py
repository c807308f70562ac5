"""Helpers shared by the loading tests (imported explicitly; not a pytest conftest)."""

from __future__ import annotations

import torch

from hooked_bilinear import HookedBilinearTransformer


def assert_same_weights(a: HookedBilinearTransformer, b: HookedBilinearTransformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def random_tokens(d_vocab: int, batch: int = 2, n_pos: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, d_vocab, (batch, n_pos), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize(module: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Every parameter random (norm gains and biases included), so no mapping hides behind 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * std)
