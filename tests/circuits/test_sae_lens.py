"""SAELens SAE objects and saved folders through `circuits.sae` (skipped where sae-lens is not installed:
it needs transformer-lens < 4, so the CI leg with transformer-lens 3.9 runs these)."""

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")

from circuits.sae import input_basis, load_sae, output_features  # noqa: E402
from circuits.sae_features import check_input_features, check_output_features  # noqa: E402
from circuits.sae_report import sae_report_section  # noqa: E402

from .test_sae import D_MODEL, LAYER, TOKENS, make_model  # noqa: E402

D_SAE = 40


def make_saelens(architecture: str, hook_name: str, seed: int = 0):
    """A SAELens inference SAE with random weights (and nonzero biases), recording its hook."""
    classes = {"standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
               "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 6, "rescale_acts_by_decoder_norm": True}),
               "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {})}
    cls, cfg_cls, extra = classes[architecture]
    cfg = cfg_cls(d_in=D_MODEL, d_sae=D_SAE, **extra)
    cfg.metadata.hook_name = hook_name
    sae = cls(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g) + (0.05 if p.ndim == 1 else 0))
    return sae.eval()


@pytest.fixture(params=[("RMS", False), ("LN", True)], ids=["RMS", "LN-bias"], scope="module")
def model(request):
    return make_model(*request.param)


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_saelens_output_sae_matches_its_own_pre_activation(model, architecture, tmp_path):
    sae = make_saelens(architecture, f"blocks.{LAYER}.hook_mlp_out")
    out = output_features(model, sae)
    assert out.hook_name == f"blocks.{LAYER}.hook_mlp_out" and out.sae.architecture == architecture
    rep = check_output_features(model, out, TOKENS, sae_object=sae)  # against hook_sae_acts_pre
    assert rep.max_abs_error < 1e-4 * max(1.0, rep.max_abs_value), rep
    # the same SAE through a saved folder
    sae.save_model(tmp_path)
    folder = load_sae(tmp_path)
    torch.testing.assert_close(folder.W_enc, out.sae.W_enc)
    rep = check_output_features(model, output_features(model, tmp_path), TOKENS, sae_object=sae)
    assert rep.max_abs_error < 1e-4 * max(1.0, rep.max_abs_value), rep


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_saelens_input_sae_encodes_and_decodes_like_saelens(model, architecture):
    hook = f"blocks.{LAYER}.ln2.hook_normalized"
    sae = make_saelens(architecture, hook, seed=1)
    w = load_sae(sae)
    a = torch.randn(9, D_MODEL)
    torch.testing.assert_close(w.encode(a), sae.encode(a))
    torch.testing.assert_close(w.decode(sae.encode(a)), sae.decode(sae.encode(a)), atol=1e-5, rtol=1e-5)
    basis = input_basis(model, sae)
    u = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(5))
    rep = check_input_features(model, basis, u, TOKENS, sae_object=sae)
    assert rep.max_abs_error < 1e-9 * max(1.0, rep.max_abs_value), rep


def test_report_section_with_saelens_objects(model):
    out_sae = make_saelens("topk", f"blocks.{LAYER}.hook_mlp_out")
    in_sae = make_saelens("topk", f"blocks.{LAYER}.ln2.hook_normalized", seed=1)
    md = sae_report_section(model, out_sae, TOKENS, input_sae=in_sae, n_show=1, k_interactions=3)
    assert md.startswith("## SAE features") and "| 2 |" in md and "Exactness" in md
    assert md.count("| input i |") == 2  # from the weights, and on the corpus
