"""The "SAE features" section of a circuit report, as markdown (`circuits/report.py` adds it).

What it shows: which space each SAE is mapped into, the exactness of `x^T Q x + bias` against the
output SAE's own pre-activation, the paper's low-rank metric (Pearce et al., ICLR'25: fraction of
output features whose top-k eigencomponent approximation correlates above 0.75 with the MLP part of
their pre-activation, and the median correlation), and for a few output features their top input
interactions from the weights and on the corpus.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .sae import input_basis, load_sae, output_features
from .sae_features import (check_output_features, eigen_correlation, sae_activations, top_activating_tokens,
                           top_interactions, top_interactions_on_corpus, typical_activations)

__all__ = ["sae_report_section"]


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", "\\n")


@torch.no_grad()
def sae_report_section(model: Any, output_sae: Any, tokens: Tensor, input_sae: Any = None,
                       features: Optional[Sequence[int]] = None, ks: Sequence[int] = (1, 2, 4),
                       threshold: float = 0.75, n_show: int = 3, k_interactions: int = 5,
                       show: Optional[Sequence[int]] = None) -> str:
    """A markdown section "SAE features" for `circuits/report.py`: the spaces, the exactness of
    `x^T Q x + bias` against the SAE's own pre-activation, the paper's metric (fraction of live
    output features whose top-k eigencomponent approximation correlates above `threshold`, and the
    median correlation, for each k), and, given an input SAE of the same layer, the top input-feature
    interactions of the output features `show` (default: the `n_show` that the metric explains best
    at k = 2; labels: the corpus contexts where each input feature fires hardest)."""
    sae_object = output_sae if hasattr(output_sae, "run_with_cache") else None
    out = output_features(model, output_sae, features=features)
    exact = check_output_features(model, out, tokens, sae_object=sae_object)
    corr = eigen_correlation(model, out, tokens, ks=ks)
    lines = [
        "## SAE features", "",
        f"Output SAE on `{out.hook_name}` ({out.sae.architecture}, d_sae {out.sae.d_sae}, {out.sae.source}): "
        f"{out.space}.", "",
        f"Exactness on {exact.n_positions} positions x {exact.n_features} features: max |x'^T Q(u) x' + bias - "
        f"pre-activation| = {exact.max_abs_error:.2e} (pre-activations up to {exact.max_abs_value:.2e}).", "",
        f"Low-rank metric (Pearce et al. 2025): correlation between each output feature's MLP part "
        f"`u . hook_mlp_out` and its top-k eigencomponent approximation over the corpus; "
        f"{int(corr.alive.sum())} of {len(corr.alive)} features fire on it.", "",
        f"| k | fraction > {threshold} | median correlation |", "|---|---|---|",
        *[f"| {k} | {corr.fraction_above(threshold, k):.3f} | {corr.median(k):.3f} |" for k in corr.ks], "",
    ]
    if input_sae is None:
        return "\n".join(lines)
    basis = input_basis(model, input_sae)
    if basis.layer != out.layer:
        raise ValueError(f"the input SAE reads layer {basis.layer} but the output SAE explains layer {out.layer}")
    # Dead input features have arbitrary decoder rows: keep the ones that fire on the corpus.
    acts = sae_activations(model, tokens, basis.layer, [basis.hook_name])[basis.hook_name]
    live = (basis.sae.encode(acts) > 0).any(0).nonzero().flatten().tolist()
    basis = input_basis(model, input_sae, features=live)
    lines += [f"Input SAE on `{basis.hook_name}` (d_sae {basis.sae.d_sae}, {len(live)} fire on the corpus): "
              f"{basis.space}.", ""]
    k2 = corr.ks.index(2) if 2 in corr.ks else 0
    c = corr.correlation[:, k2].nan_to_num(-2.0).masked_fill(~corr.alive, -2.0)
    if show is None:
        best = c.topk(min(n_show, int(corr.alive.sum()))).indices
    else:
        where = {int(i): n for n, i in enumerate(out.indices.tolist())}
        missing = [int(i) for i in show if int(i) not in where]
        if missing:
            raise ValueError(f"show= names output features {missing} that are not among features=")
        best = torch.tensor([where[int(i)] for i in show], dtype=torch.long)
    chosen = output_features(model, output_sae, features=out.indices[best].tolist())
    tops = top_interactions(model, basis, chosen, k=k_interactions,
                            feature_scale=typical_activations(model, basis, tokens))
    seen = top_interactions_on_corpus(model, basis, chosen, tokens, k=k_interactions)
    ids = sorted({int(i) for t in tops + seen for i in t.pairs.flatten()})
    labels = top_activating_tokens(model, load_sae(input_sae), tokens, ids, k=2)
    label = lambda i: _md_escape(" / ".join(ctx for ctx, _ in labels[i]) or "(never fires)")
    for t, c_t, b in zip(tops, seen, best.tolist()):
        lines += [f"Output feature {t.output} (correlation at k={corr.ks[k2]}: {float(corr.correlation[b, k2]):.3f}).", ""]
        for title, tt in (("from the weights, at typical activations", t), ("on the corpus, where it fires", c_t)):
            lines += [f"Top interactions {title} (mean {tt.mean:+.2e}, std {tt.std:.2e} over {tt.n_entries} pairs; "
                      "z: standard deviations from the mean):", "",
                      "| input i | input j | interaction | z | i fires on | j fires on |", "|---|---|---|---|---|---|"]
            lines += [f"| {i} | {j} | {v:+.3e} | {z:+.1f} | {label(i)} | {label(j)} |"
                      for (i, j), v, z in zip(tt.pairs.tolist(), tt.values.tolist(), tt.zscores.tolist())]
            lines.append("")
    return "\n".join(lines)
