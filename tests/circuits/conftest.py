import pytest
import torch


def make_layer(d_model=12, d_mlp=20, bias=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    W = dict(W_gate=r(d_model, d_mlp) / d_model ** 0.5, W_in=r(d_model, d_mlp) / d_model ** 0.5,
             W_out=r(d_mlp, d_model) / d_mlp ** 0.5)
    if bias:
        W.update(b_gate=r(d_mlp) * 0.3, b_in=r(d_mlp) * 0.3, b_out=r(d_model) * 0.3)
    return W


@pytest.fixture(name="make_layer")
def make_layer_fixture():
    """The factory itself, as a fixture (importing conftest depends on pytest's import mode)."""
    return make_layer


@pytest.fixture
def layer():
    return make_layer()


@pytest.fixture
def biased_layer():
    return make_layer(bias=True)


@pytest.fixture(autouse=True)
def _one_thread():
    # These tests use tiny matrices: thread start-up and contention cost far more than the
    # math (30x slower with 2 threads on a busy 2-core machine). Restored afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
