"""nnsight traces and edits this model as a plain torch module (README's example)."""

import pytest
import torch

nnsight = pytest.importorskip("nnsight")

from ..conftest import tiny_config  # noqa: E402
from hooked_bilinear import HookedBilinearTransformer  # noqa: E402


def test_nnsight_reads_and_edits_an_mlp():
    model = HookedBilinearTransformer(tiny_config())
    tokens = torch.randint(0, 48, (2, 6), generator=torch.Generator().manual_seed(0))
    traced = nnsight.NNsight(model)
    with traced.trace(tokens):
        mlp_in = traced.blocks[0].mlp.input.save()
        traced.blocks[0].mlp.output[:] = 0  # ablate layer 0's MLP
        later = traced.blocks[1].mlp.output.save()
        logits = traced.output.save()

    _, cache = model.run_with_cache(tokens)
    hooked = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: torch.zeros_like(x))])
    torch.testing.assert_close(logits, hooked)
    w = model.blocks[0].ln2.w
    torch.testing.assert_close(mlp_in, cache["blocks.0.ln2.hook_normalized"] * w)  # what the MLP reads
    assert later.shape == (2, 6, 32)
    assert (logits - model(tokens)).abs().max() > 1e-4  # the edit changed the output


def test_readme_nnsight_example_runs(tmp_path):
    """The README's nnsight block, after the quick start, run from a file (nnsight reads a trace's
    source back from disk, so test_readme's in-memory exec cannot run it)."""
    import re
    import runpy
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    quick_start = blocks[0]
    nnsight_block = next(b for b in blocks if "nnsight.NNsight(model)" in b)
    script = tmp_path / "readme_nnsight.py"
    script.write_text(quick_start + "\n" + nnsight_block)
    namespace = runpy.run_path(str(script))
    assert namespace["mlp_in"].shape == (1, 16, 128)
