"""Truncated MLPs: keep only each output direction's top-k eigencomponents, and measure the cost.

For an orthonormal set of output directions U [n, d_model] (default: all d_model HOSVD directions
of the layer, which span the residual space), the MLP's output component along each u_j is
replaced by its rank-k readout `sum_{i<k} lambda_i (v_i . x)^2`; the component orthogonal to U (if
any) is kept. With every eigenpair this reproduces the model exactly; `truncation_sweep` reports
the loss, agreement with the original predictions and the readout correlation as k grows.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .eigen import Eigen, effective_rank
from .mlp import check_direction, check_layer, eigendecompose, hosvd, mlp_input


def orthonormal_output_basis(model: Any, layer: int) -> Tensor:
    """The layer's HOSVD output directions [d_model, d_model], most important first."""
    return hosvd(model, layer).directions


def _batched_readout(eig: Eigen, x: Tensor, k: int) -> Tensor:
    """x [p, d_model] -> [p, n]: sum_{i<k} lambda_i (v_i . x)^2 for every direction."""
    vectors, values = eig.vectors[..., :k], eig.values[..., :k]  # [n, d, k], [n, k]
    if eig.augmented:
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    proj = torch.einsum("pd,ndk->pnk", x.to(vectors.dtype), vectors)
    return (proj.pow(2) * values).sum(-1)


@contextmanager
def truncated_mlps(model: Any, spec: dict[int, tuple[Tensor, Eigen, int]]):
    """Context in which the MLP of each layer in `spec` ({layer: (U [n, d_model], eig of U, k)})
    keeps only k eigencomponents per direction. Hooks are removed on exit, even on error."""
    stash: dict[str, Tensor] = {}

    def remember(tensor: Tensor, hook: Any) -> None:
        stash[hook.name] = tensor

    def replace(layer: int):
        U, eig, k = spec[layer]

        def hook(mlp_out: Tensor, hook: Any) -> Tensor:
            x = mlp_input(model, stash, layer).reshape(-1, model.cfg.d_model)
            readout = _batched_readout(eig, x, k).to(mlp_out.dtype).reshape(*mlp_out.shape[:-1], -1)
            U_ = U.to(mlp_out.dtype)
            return mlp_out - (mlp_out @ U_.T) @ U_ + readout @ U_

        return hook

    hooks = []
    for layer in spec:
        hooks.append((f"blocks.{layer}.hook_resid_mid", remember))
        if f"blocks.{layer}.ln2.hook_scale" in model.hook_dict:
            hooks.append((f"blocks.{layer}.ln2.hook_scale", remember))
        hooks.append((f"blocks.{layer}.hook_mlp_out", replace(layer)))
    with model.hooks(fwd_hooks=hooks):
        yield model


@dataclass
class TruncationResult:
    k: int
    loss: float  # next-token loss of the truncated model
    original_loss: float
    top1_agreement: float  # fraction of positions whose argmax prediction is unchanged
    kl: float  # mean KL(original || truncated) over positions
    readout_correlation: float  # Pearson r between truncated and true readouts, pooled over layers
    mean_effective_rank: float  # of the full spectra, averaged over directions and layers


@torch.no_grad()
def truncation_sweep(
    model: Any,
    tokens: Tensor,
    ks: Sequence[int] = (1, 2, 4, 8, 16),
    layers: Optional[Iterable[int]] = None,
    directions: Optional[dict[int, Tensor]] = None,
    progress: bool = True,
) -> list[TruncationResult]:
    """Loss and agreement of the model with its MLPs truncated to k eigencomponents, for each k.

    directions: {layer: U [n, d_model] orthonormal rows}; default: every layer's full HOSVD basis."""
    layers = list(range(model.cfg.n_layers)) if layers is None else [check_layer(model, l) for l in layers]
    k_max = max(ks)
    bases, eigs, ranks = {}, {}, []
    for layer in tqdm(layers, desc="eigendecomposing", disable=not progress):
        U = orthonormal_output_basis(model, layer) if directions is None or layer not in directions else check_direction(model, directions[layer])
        full = eigendecompose(model, layer, U)  # every eigenpair: needed for the effective rank
        bases[layer], eigs[layer] = U, full.top(min(k_max, full.k))
        ranks.append(effective_rank(full.values).mean())
    names = [n for l in layers for n in (f"blocks.{l}.hook_resid_mid", f"blocks.{l}.ln2.hook_scale", f"blocks.{l}.hook_mlp_out") if n in model.hook_dict]
    logits, cache = model.run_with_cache(tokens, names_filter=names)
    original_loss = float(model.loss_from_logits(logits, tokens))
    log_p = logits.float().log_softmax(-1)
    # The MLP inputs and true readouts do not depend on k: compute them once.
    inputs = {l: mlp_input(model, cache, l).reshape(-1, model.cfg.d_model) for l in layers}
    truth = torch.cat([
        (cache[f"blocks.{l}.hook_mlp_out"].reshape(-1, model.cfg.d_model) @ bases[l].T.to(inputs[l].dtype)).flatten().float()
        for l in layers
    ])
    results = []
    for k in tqdm(ks, desc="truncating", disable=not progress):
        spec = {l: (bases[l], eigs[l], k) for l in layers}
        with truncated_mlps(model, spec):
            t_logits = model(tokens)
        log_q = t_logits.float().log_softmax(-1)
        approx = torch.cat([_batched_readout(eigs[l], inputs[l], k).flatten().float() for l in layers])
        corr = torch.corrcoef(torch.stack([truth, approx]))[0, 1]
        results.append(TruncationResult(
            k=k,
            loss=float(model.loss_from_logits(t_logits, tokens)),
            original_loss=original_loss,
            top1_agreement=float((t_logits.argmax(-1) == logits.argmax(-1)).float().mean()),
            kl=float((log_p.exp() * (log_p - log_q)).sum(-1).mean()),
            readout_correlation=float(corr),
            mean_effective_rank=float(torch.stack(ranks).mean()),
        ))
    return results
