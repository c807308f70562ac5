"""Model-level entry points: one bilinear MLP of a `HookedBilinearTransformer`, as plain matrices.

The MLP of layer l reads `ln2(resid_mid)`. We fold the norm's gain (and LN bias) into `W_gate` and
`W_in`, so every result here lives in the space of the **normalized residual** `x = resid_mid / scale`
(`scale = blocks.{l}.ln2.hook_scale`; for LN, `resid_mid` is centred first). In the unnormalized
residual the MLP's output is `1 / scale^2` times the same quadratic form. Nothing here modifies the
model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .eigen import Eigen, eigendecompose_from_weights, truncated_readout
from .interaction import bilinear_mlp_forward, interaction_matrix_from_weights


@dataclass
class MLPWeights:
    """One bilinear MLP with the norm folded in: `mlp(x) = ((x W_gate + b_gate) * (x W_in + b_in)) W_out + b_out`."""

    layer: int
    W_gate: Tensor  # [d_model, d_mlp]
    W_in: Tensor  # [d_model, d_mlp]
    W_out: Tensor  # [d_mlp, d_model]
    b_gate: Optional[Tensor] = None  # [d_mlp]
    b_in: Optional[Tensor] = None  # [d_mlp]
    b_out: Optional[Tensor] = None  # [d_model]
    input_space: str = ""

    @property
    def biases(self) -> dict[str, Optional[Tensor]]:
        return {"b_gate": self.b_gate, "b_in": self.b_in, "b_out": self.b_out}

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., d_model] normalized residual -> the MLP's output [..., d_model]."""
        return bilinear_mlp_forward(self.W_gate, self.W_in, self.W_out, x, **self.biases)


def check_layer(model: Any, layer: int) -> int:
    n_layers = model.cfg.n_layers
    if not isinstance(layer, int) or not -n_layers <= layer < n_layers:
        raise ValueError(f"layer {layer!r} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return layer % n_layers


def check_bilinear(model: Any) -> None:
    cfg = model.cfg
    if cfg.act_fn != "linear":
        hint = " (fold it with model.fold_zero_beta_gate())" if cfg.gate_beta == 0.0 else ""
        raise ValueError(
            f"interaction matrices are exact only for bilinear MLPs (act_fn='linear'); this model has "
            f"act_fn={cfg.act_fn!r}, gate_beta={cfg.gate_beta}{hint}"
        )


def check_direction(model: Any, u: Tensor, what: str = "u") -> Tensor:
    """u: [d_model] or [n, d_model], as a float tensor on the model's device."""
    u = torch.as_tensor(u)
    if u.ndim not in (1, 2) or u.shape[-1] != model.cfg.d_model:
        raise ValueError(
            f"{what} must be [d_model] or [n, d_model] with d_model={model.cfg.d_model}, got shape {tuple(u.shape)}"
        )
    return u.to(device=model.W_E.device, dtype=model.W_E.dtype)


@torch.no_grad()
def mlp_weights(model: Any, layer: int) -> MLPWeights:
    """The MLP of `layer` with ln2's gain and bias folded into its input weights."""
    check_bilinear(model)
    layer = check_layer(model, layer)
    block = model.blocks[layer]
    mlp, norm = block.mlp, block.ln2
    W_gate, W_in = mlp.W_gate.detach(), mlp.W_in.detach()
    b_gate = None if mlp.b_gate is None else mlp.b_gate.detach()
    b_in = None if mlp.b_in is None else mlp.b_in.detach()
    gain, bias = getattr(norm, "w", None), getattr(norm, "b", None)
    if bias is not None:
        # The norm's bias enters both factors linearly: it is a bias of each.
        b_gate = (0 if b_gate is None else b_gate) + bias @ W_gate
        b_in = (0 if b_in is None else b_in) + bias @ W_in
    if gain is not None:
        W_gate, W_in = gain[:, None] * W_gate, gain[:, None] * W_in
    kind = model.cfg.normalization_type
    space = {
        "RMS": f"normalized residual: blocks.{layer}.hook_resid_mid / blocks.{layer}.ln2.hook_scale",
        "LN": f"normalized residual: centred blocks.{layer}.hook_resid_mid / blocks.{layer}.ln2.hook_scale",
        None: f"residual: blocks.{layer}.hook_resid_mid",
    }[kind]
    b_out = None if mlp.b_out is None else mlp.b_out.detach()
    return MLPWeights(layer, W_gate, W_in, mlp.W_out.detach(), b_gate, b_in, b_out, space)


def mlp_input(model: Any, cache: Any, layer: int) -> Tensor:
    """The MLP's input in the space `mlp_weights` uses, from a cache: [batch, pos, d_model]."""
    layer = check_layer(model, layer)
    resid = cache[f"blocks.{layer}.hook_resid_mid"]
    if model.cfg.normalization_type is None:
        return resid
    if model.cfg.normalization_type == "LN":
        resid = resid - resid.mean(-1, keepdim=True)
    return resid / cache[f"blocks.{layer}.ln2.hook_scale"]


def interaction_matrix(model: Any, layer: int, u: Tensor) -> Tensor:
    """Q(u) for the MLP of `layer`: [d, d] for u [d_model], [n, d, d] for u [n, d_model].

    d = d_model, or d_model + 1 when the MLP has biases (the last row/column then hold the linear
    and constant terms of the constant-1 augmentation)."""
    w = mlp_weights(model, layer)
    return interaction_matrix_from_weights(w.W_gate, w.W_in, w.W_out, check_direction(model, u), **w.biases)


def eigendecompose(model: Any, layer: int, u: Tensor, k: Optional[int] = None, **kwargs: Any) -> Eigen:
    """Eigenpairs of Q(u), sorted by |lambda| descending: values [k], vectors [d, k] (batched for
    u [n, d_model]). `k=None` gives all of them; a small k on a large model runs matrix-free Lanczos.
    Extra keyword arguments go to `circuits.eigendecompose_from_weights` (method, double, tol)."""
    w = mlp_weights(model, layer)
    return eigendecompose_from_weights(w.W_gate, w.W_in, w.W_out, check_direction(model, u), **w.biases, k=k, **kwargs)


@dataclass
class ExactnessReport:
    max_abs_error: float  # |sum_i lambda_i (v_i . x)^2 - u . mlp_out| over every cached position
    max_abs_readout: float  # scale of u . mlp_out, to read the error against
    n_positions: int


@torch.no_grad()
def check_exactness(model: Any, layer: int, u: Tensor, tokens: Tensor, eig: Optional[Eigen] = None) -> ExactnessReport:
    """Run the model on `tokens`, and compare the eigendecomposition's readout of every MLP input
    with `u . hook_mlp_out` from the model's own forward pass."""
    layer = check_layer(model, layer)
    u = check_direction(model, u)
    if u.ndim != 1:
        raise ValueError("check_exactness takes one direction u [d_model]")
    names = [f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.ln2.hook_scale", f"blocks.{layer}.hook_mlp_out"]
    names = [n for n in names if n in model.hook_dict]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    x = mlp_input(model, cache, layer).reshape(-1, model.cfg.d_model)
    eig = eigendecompose(model, layer, u) if eig is None else eig
    readout = truncated_readout(eig, x.to(eig.vectors.dtype))
    truth = cache[f"blocks.{layer}.hook_mlp_out"].reshape(-1, model.cfg.d_model) @ u
    return ExactnessReport(
        max_abs_error=float((readout - truth.to(readout.dtype)).abs().max()),
        max_abs_readout=float(truth.abs().max()),
        n_positions=x.shape[0],
    )


def hosvd(model: Any, layer: int, U: Optional[Tensor] = None, rank: Optional[int] = None):
    """Output-side higher-order SVD of the MLP of `layer` over directions U [n, d_model]
    (default: the whole residual space; pass the unembedding directions for "all of the
    vocabulary"). Returns `circuits.HOSVD`; `directions[r]` are residual directions ordered by how
    much of the tensor they hold, and their interaction matrices give the shared input features."""
    from .hosvd import hosvd_from_weights

    w = mlp_weights(model, layer)
    U = None if U is None else check_direction(model, U, "U")
    return hosvd_from_weights(w.W_gate, w.W_in, w.W_out, U, **w.biases, rank=rank)


@torch.no_grad()
def eigen_readout_correlation(model: Any, layer: int, U: Tensor, tokens: Tensor, k: int = 2,
                              attention_mask: Optional[Tensor] = None) -> Tensor:
    """The paper's activation metric: for each output direction (rows of U [n, d_model]), the Pearson
    correlation over every position of `tokens` between the MLP's true readout `u . hook_mlp_out`
    and its top-k eigencomponent approximation `sum_{i<k} lambda_i (v_i . x)^2`: [n]. (The ICLR'25
    paper reports > 0.75 at k = 2 for most ts-medium output features.)"""
    layer = check_layer(model, layer)
    U = check_direction(model, U, "U")
    U = U[None] if U.ndim == 1 else U
    names = [f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.ln2.hook_scale", f"blocks.{layer}.hook_mlp_out"]
    _, cache = model.run_with_cache(tokens, attention_mask=attention_mask,
                                    names_filter=[n for n in names if n in model.hook_dict])
    keep = slice(None) if attention_mask is None else attention_mask.reshape(-1).bool()
    x = mlp_input(model, cache, layer).reshape(-1, model.cfg.d_model)[keep]
    out = cache[f"blocks.{layer}.hook_mlp_out"].reshape(-1, model.cfg.d_model)[keep]
    result = []
    for u in U:
        eig = eigendecompose(model, layer, u, k=min(k, model.cfg.d_model))
        approx = truncated_readout(eig, x.to(eig.vectors.dtype)).double()
        truth = (out @ u).double()
        approx, truth = approx - approx.mean(), truth - truth.mean()
        result.append(float((approx * truth).sum() / (approx.norm() * truth.norm()).clamp_min(1e-30)))
    return torch.tensor(result)
