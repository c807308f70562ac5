"""SAE features through a bilinear MLP: exactness, feature x feature interactions, and the paper's metric.

Output features (`circuits.sae.output_features`) are output directions u_j; input features
(`circuits.sae.input_basis`) are rows D of a basis of the space Q acts on. For one output u the
MLP's readout at an input reconstructed as `x = (f D + b) / s` (s = 1, or the norm's per-position
scale for an SAE on `resid_mid`) is, with `M = D Q_xx D^T` (Q_xx: Q(u) without the bias row/column,
q: its bias column, Q_11: its constant):

    u . mlp(x) = (f M f^T + 2 f . D Q_xx b + b Q_xx b) / s^2 + 2 (f . D q + b . q) / s + Q_11

`M[i, i]` is feature i's self-interaction, `2 M[i, j]` (i < j) the cross-interaction of the pair.
The paper's metric (Pearce et al., ICLR'25, section 5): for each output feature, the correlation over
corpus positions between the MLP part of its pre-activation and its top-k eigencomponent
approximation `sum_{i<k} lambda_i (v_i . x)^2`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .interaction import augment_input, bilinear_mlp_forward, interaction_matrix_from_weights
from .mlp import eigendecompose, mlp_input, mlp_weights
from .sae import InputBasis, OutputFeatures, SAEWeights

__all__ = ["SAEExactness", "InputInteractions", "TopInteractions", "EigenCorrelation",
           "sae_activations", "check_output_features", "check_input_features", "feature_interactions",
           "top_interactions", "top_interactions_on_corpus", "eigen_correlation", "top_activating_tokens", "typical_activations"]


# --- activations -----------------------------------------------------------------------------------

@torch.no_grad()
def sae_activations(model: Any, tokens: Tensor, layer: int, hooks: Sequence[str] = ()) -> dict[str, Tensor]:
    """One forward pass over `tokens` [batch, pos]: the MLP input x of `layer` [P, d_model] (its space:
    `circuits.mlp_input`), its `hook_mlp_out`, `ln2.hook_scale` (ones without a norm) and any extra
    `hooks`, each flattened over positions to [P, ...]."""
    # hook_mlp_in only fires with model.set_use_hook_mlp_in(True); it equals hook_resid_mid.
    alias = {n: n.replace(".hook_mlp_in", ".hook_resid_mid") for n in hooks}
    names = {f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.ln2.hook_scale", f"blocks.{layer}.hook_mlp_out",
             *alias.values()}
    names = [n for n in names if n in model.hook_dict]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    d = model.cfg.d_model
    out = {n: cache[n].reshape(-1, cache[n].shape[-1]) for n in names}
    out.update({n: out[a] for n, a in alias.items()})
    out["x"] = mlp_input(model, cache, layer).reshape(-1, d)
    out.setdefault(f"blocks.{layer}.ln2.hook_scale", out["x"].new_ones(out["x"].shape[0], 1))
    return out


def _own_pre_activation(sae_object: Any, weights: SAEWeights, a: Tensor) -> Tensor:
    """The SAE's own pre-activation: SAELens's `hook_sae_acts_pre` when we have the object."""
    if sae_object is not None and hasattr(sae_object, "run_with_cache"):
        with torch.no_grad():
            _, cache = sae_object.run_with_cache(a.to(sae_object.W_enc.dtype), names_filter=["hook_sae_acts_pre"])
        return cache["hook_sae_acts_pre"]
    return weights.pre_activation(a)


@dataclass
class SAEExactness:
    max_abs_error: float  # largest |prediction from Q - the SAE's own value| over positions and features
    max_abs_value: float  # the scale of the values, to read the error against
    n_positions: int
    n_features: int


@torch.no_grad()
def check_output_features(model: Any, out: OutputFeatures, tokens: Tensor, sae_object: Any = None,
                          chunk: int = 32) -> SAEExactness:
    """Compare `x'^T Q(u_j) x' + bias_j (+ u_j . rest)`, with Q formed from the weights, against the
    SAE's own pre-activation on the cached hook it reads (SAELens's `hook_sae_acts_pre` when
    `sae_object` is a SAELens SAE), for every position of `tokens` and every feature of `out`."""
    acts = sae_activations(model, tokens, out.layer, [out.hook_name])
    x = acts["x"].double()
    w = mlp_weights(model, out.layer)
    if w.b_gate is not None or w.b_in is not None or w.b_out is not None:
        x = augment_input(x)
    truth = _own_pre_activation(sae_object, out.sae, acts[out.hook_name])[:, out.indices].double()
    rest = 0.0 if out.rest_hook is None else acts[out.rest_hook].double() @ out.directions.double().T
    weights = [None if t is None else t.double() for t in (w.W_gate, w.W_in, w.W_out, w.b_gate, w.b_in, w.b_out)]
    err = 0.0
    for s in range(0, out.directions.shape[0], chunk):
        Q = interaction_matrix_from_weights(*weights[:3], out.directions[s:s + chunk].double(), *weights[3:])
        # one [P, d] product per feature: a [P, n, d] intermediate would not fit at ts-medium size
        pred = torch.stack([((x @ Qn) * x).sum(-1) for Qn in Q], -1) + out.bias[s:s + chunk].double()
        pred = pred + (rest[:, s:s + chunk] if out.rest_hook is not None else 0.0)
        err = max(err, float((pred - truth[:, s:s + chunk]).abs().max()))
    return SAEExactness(err, float(truth.abs().max()), x.shape[0], out.directions.shape[0])


# --- input features --------------------------------------------------------------------------------

@dataclass
class InputInteractions:
    """The readout of one output direction u in an input basis (formula in the module docstring).

    matrix [n, n] = D Q_xx D^T (feature x feature; cross terms count twice in the readout);
    offset_linear [n] = 2 D Q_xx b; offset_constant = b Q_xx b; bias_linear [n] = 2 D q;
    bias_offset = 2 b . q; constant = Q_11 (the last three are zero for an MLP without biases)."""

    matrix: Tensor
    offset_linear: Tensor
    offset_constant: Tensor
    bias_linear: Tensor
    bias_offset: Tensor
    constant: Tensor

    def readout(self, f: Tensor, scale: Optional[Tensor] = None) -> Tensor:
        """u . mlp(x) at x = (f D + b) / scale; f [P, n], scale [P] or [P, 1] (default 1) -> [P]."""
        f = f.to(self.matrix.dtype)
        s = torch.ones(f.shape[0], dtype=f.dtype) if scale is None else scale.reshape(-1).to(f.dtype)
        quad = ((f @ self.matrix) * f).sum(-1) + f @ self.offset_linear + self.offset_constant
        lin = f @ self.bias_linear + self.bias_offset
        return quad / s**2 + lin / s + self.constant


def _q_blocks(model: Any, layer: int, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Q(u) of the MLP of `layer` split into (Q_xx [d, d], q [d], Q_11 []) (zeros without biases)."""
    w = mlp_weights(model, layer)
    cast = lambda t: None if t is None else t.to(u.dtype)  # float64 u: exactness checks
    Q = interaction_matrix_from_weights(cast(w.W_gate), cast(w.W_in), cast(w.W_out), u,
                                        **{k: cast(t) for k, t in w.biases.items()})
    d = model.cfg.d_model
    if Q.shape[-1] == d:
        return Q, Q.new_zeros(d), Q.new_zeros(())
    return Q[:d, :d], Q[:d, d], Q[d, d]


@torch.no_grad()
def feature_interactions(model: Any, basis: InputBasis, u: Tensor) -> InputInteractions:
    """The n x n interaction matrix `D Q(u) D^T` of one output direction u [d_model] in an input
    basis, with the offset and bias terms that make its readout exact (see `InputInteractions`).
    Space: SAE feature activations f of `basis`; with `basis.per_position_scale` the quadratic part
    is divided by ln2.hook_scale^2 at each position."""
    u = torch.as_tensor(u).to(basis.decoder.dtype)
    if u.shape != (model.cfg.d_model,):
        raise ValueError(f"feature_interactions takes one direction u [d_model={model.cfg.d_model}], got "
                         f"{tuple(u.shape)}; for many outputs use top_interactions")
    Q, q, c = _q_blocks(model, basis.layer, u)
    D, b = basis.decoder, basis.offset
    DQ = D @ Q
    return InputInteractions(DQ @ D.T, 2 * DQ @ b, b @ Q @ b, 2 * D @ q, 2 * b @ q, c)


@torch.no_grad()
def check_input_features(model: Any, basis: InputBasis, u: Tensor, tokens: Tensor,
                         sae_object: Any = None) -> SAEExactness:
    """Exactness of the input side: encode the input SAE's hook on `tokens` (with the SAE itself when
    `sae_object` is given), reconstruct x_hat in x-space, and compare `InputInteractions.readout(f)`
    with `u . mlp(x_hat)` computed by the MLP's own forward pass."""
    acts = sae_activations(model, tokens, basis.layer, [basis.hook_name])
    a = acts[basis.hook_name]
    if sae_object is not None and hasattr(sae_object, "encode"):
        f = sae_object.encode(a.to(sae_object.W_enc.dtype)).double()
    else:
        f = basis.sae.encode(a).double()
    f = f[:, basis.indices]
    scale = acts[f"blocks.{basis.layer}.ln2.hook_scale"].reshape(-1).double()
    scale = scale if basis.per_position_scale else torch.ones_like(scale)
    x_hat = (f @ basis.decoder.double() + basis.offset.double()) / scale[:, None]
    w = mlp_weights(model, basis.layer)
    dbl = lambda t: None if t is None else t.double()
    u = torch.as_tensor(u).double()
    truth = bilinear_mlp_forward(*(dbl(t) for t in (w.W_gate, w.W_in, w.W_out)), x_hat,
                                 *(dbl(t) for t in (w.b_gate, w.b_in, w.b_out))) @ u
    inter = feature_interactions(model, replace(basis, decoder=basis.decoder.double(),
                                                offset=basis.offset.double()), u)
    got = inter.readout(f, scale)
    return SAEExactness(float((got - truth).abs().max()), float(truth.abs().max()), f.shape[0], 1)


@dataclass
class TopInteractions:
    """The largest interactions of one output feature in an input basis.

    values [k] (self: M[i, i]; cross: 2 M[i, j], i < j), pairs [k, 2] SAE feature ids (i == j for
    self-interactions), zscores [k]: (value - mean) / std over all n (n + 1) / 2 distinct entries
    (the paper's outlier view: how far each stands out), mean, std, n_entries."""

    output: int
    values: Tensor
    pairs: Tensor
    zscores: Tensor
    mean: float
    std: float
    n_entries: int

    def outliers(self, z: float = 5.0) -> list[tuple[int, int, float, float]]:
        """(i, j, value, zscore) of the top entries more than z standard deviations from the mean."""
        return [(int(p[0]), int(p[1]), float(v), float(s))
                for p, v, s in zip(self.pairs, self.values, self.zscores) if abs(float(s)) > z]


@torch.no_grad()
def top_interactions(model: Any, basis: InputBasis, out: OutputFeatures, k: int = 10, sign: str = "abs",
                     block: int = 512, feature_scale: Optional[Tensor] = None) -> list[TopInteractions]:
    """For each output feature of `out`, its top-k self- and cross-interactions among the input
    features of `basis` (ranked by |value|, or largest "positive" / most "negative"), with the
    distribution statistics of all entries. Memory: one [n, d_model] product D Q(u) and one
    [block, n] slice of `D Q(u) D^T` at a time, never n^2 x n_outputs.

    feature_scale [n] (optional): a typical activation of each input feature (e.g.
    `typical_activations`); values are then `s_i s_j M[i, j]`, the contribution of the pair when
    both fire at that strength, so rarely-strong features do not crowd the list."""
    if sign not in ("abs", "positive", "negative"):
        raise ValueError(f"sign must be 'abs', 'positive' or 'negative', got {sign!r}")
    if out.layer != basis.layer:
        raise ValueError(f"the output SAE explains the MLP of layer {out.layer} but the input SAE reads layer "
                         f"{basis.layer}'s input; use SAEs of the same layer")
    D = basis.decoder
    if feature_scale is not None:
        feature_scale = torch.as_tensor(feature_scale).to(D.dtype)
        if feature_scale.shape != (D.shape[0],):
            raise ValueError(f"feature_scale must be [n={D.shape[0]}] (one per basis feature), "
                             f"got {tuple(feature_scale.shape)}")
        D = D * feature_scale[:, None]
    n = D.shape[0]
    rows = torch.arange(n)
    results = []
    for j in range(out.directions.shape[0]):
        Q, _, _ = _q_blocks(model, basis.layer, out.directions[j])
        DQ = D @ Q
        best_v, best_i = D.new_empty(0), torch.empty(0, dtype=torch.long)
        total, total_sq, count = 0.0, 0.0, 0
        for s in range(0, n, block):
            M = DQ[s:s + block] @ D.T  # [b, n]
            r = rows[s:s + block, None]
            upper = rows[None, :] >= r
            vals = torch.where(rows[None, :] > r, 2 * M, M)  # a cross term appears twice in f M f^T
            v = vals[upper]
            total, total_sq, count = total + float(v.sum()), total_sq + float((v.double() ** 2).sum()), count + v.numel()
            key = {"abs": vals.abs(), "positive": vals, "negative": -vals}[sign].masked_fill(~upper, -float("inf"))
            top = key.flatten().topk(min(k, key.numel()))
            flat = top.indices + s * n
            best_v = torch.cat([best_v, vals.flatten()[top.indices]])
            best_i = torch.cat([best_i, flat])
            keep = {"abs": best_v.abs(), "positive": best_v, "negative": -best_v}[sign].topk(min(k, best_v.numel()))
            best_v, best_i = best_v[keep.indices], best_i[keep.indices]
        mean = total / count
        std = max(total_sq / count - mean**2, 0.0) ** 0.5
        pairs = torch.stack([basis.indices[best_i // n], basis.indices[best_i % n]], -1)
        z = (best_v - mean) / (std if std > 0 else 1.0)
        results.append(TopInteractions(int(out.indices[j]), best_v, pairs, z, mean, std, count))
    return results


@torch.no_grad()
def top_interactions_on_corpus(model: Any, basis: InputBasis, out: OutputFeatures, tokens: Tensor, k: int = 10,
                               sign: str = "abs") -> list[TopInteractions]:
    """Like `top_interactions`, but each entry weighted by how the input features co-fire where the
    output feature fires: value = mean over those positions of `f_i f_j M[i, j]` (cross terms twice),
    so the values sum to the mean quadratic part of the readout there and name the interactions that
    actually build the output on this corpus. Memory: one n x n matrix at a time (one output).
    Outputs that never fire on `tokens` get empty results (values of size 0)."""
    if out.layer != basis.layer:
        raise ValueError(f"the output SAE explains the MLP of layer {out.layer} but the input SAE reads layer "
                         f"{basis.layer}'s input; use SAEs of the same layer")
    acts = sae_activations(model, tokens, basis.layer, [basis.hook_name, out.hook_name])
    f_in = basis.sae.encode(acts[basis.hook_name])[:, basis.indices].to(basis.decoder.dtype)
    fires = out.sae.encode(acts[out.hook_name])[:, out.indices] > 0
    n = basis.decoder.shape[0]
    iu = torch.triu_indices(n, n)
    results = []
    for j in range(out.directions.shape[0]):
        F = f_in[fires[:, j]]
        if F.shape[0] == 0:
            empty = basis.decoder.new_zeros(0)
            results.append(TopInteractions(int(out.indices[j]), empty, torch.zeros(0, 2, dtype=torch.long),
                                           empty, 0.0, 0.0, 0))
            continue
        M = feature_interactions(model, basis, out.directions[j]).matrix
        W = (F.T @ F) / F.shape[0] * M
        vals = torch.where(iu[0] == iu[1], W[iu[0], iu[1]], 2 * W[iu[0], iu[1]])
        key = {"abs": vals.abs(), "positive": vals, "negative": -vals}[sign]
        top = key.topk(min(k, key.numel())).indices
        mean, std = float(vals.mean()), float(vals.std(unbiased=False))
        z = (vals[top] - mean) / (std if std > 0 else 1.0)
        pairs = torch.stack([basis.indices[iu[0, top]], basis.indices[iu[1, top]]], -1)
        results.append(TopInteractions(int(out.indices[j]), vals[top], pairs, z, mean, std, vals.numel()))
    return results


# --- the paper's metric ----------------------------------------------------------------------------

@dataclass
class EigenCorrelation:
    """Per output feature and k: Pearson correlation over corpus positions between the MLP part of
    the feature's pre-activation (u . hook_mlp_out) and its top-k eigencomponent approximation.

    ks [m]; correlation [n, m] (nan where a feature's activation is constant on the corpus);
    indices [n] SAE feature ids; alive [n]: the feature fired (SAE activation > 0) somewhere."""

    ks: tuple[int, ...]
    correlation: Tensor
    indices: Tensor
    alive: Tensor
    n_positions: int

    def _col(self, k: int) -> Tensor:
        if k not in self.ks:
            raise ValueError(f"k={k} was not measured; ks={self.ks}")
        c = self.correlation[:, self.ks.index(k)]
        return c[self.alive & ~c.isnan()]

    def fraction_above(self, threshold: float = 0.75, k: int = 2) -> float:
        """Fraction of the live features whose correlation at k exceeds threshold (paper: 0.75, k=2)."""
        c = self._col(k)
        return float((c > threshold).float().mean()) if c.numel() else float("nan")

    def median(self, k: int = 2) -> float:
        c = self._col(k)
        return float(c.median()) if c.numel() else float("nan")


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Column-wise correlation of a, b [P, n] -> [n]."""
    a, b = a - a.mean(0), b - b.mean(0)
    den = (a.pow(2).sum(0) * b.pow(2).sum(0)).sqrt()
    return torch.where(den > 0, (a * b).sum(0) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


@torch.no_grad()
def eigen_correlation(model: Any, out: OutputFeatures, tokens: Tensor, ks: Sequence[int] = (1, 2, 4),
                      active_only: bool = False, chunk: int = 64) -> EigenCorrelation:
    """The paper's low-rank metric for every output feature of `out` on the corpus `tokens`.

    truth: `u_j . hook_mlp_out` (the MLP part of the pre-activation, biases of the SAE excluded);
    approximation: `sum_{i<k} lambda_i (v_i . x')^2` with the top-k eigenpairs (by |lambda|) of
    Q(u_j) over x' = the MLP input (`circuits.mlp_input`, augmented with 1 when the MLP has biases).
    active_only: correlate only over positions where the feature fires (needs 3 or more)."""
    ks = tuple(sorted({int(k) for k in ks}))
    acts = sae_activations(model, tokens, out.layer, [out.hook_name])
    x = acts["x"]
    w = mlp_weights(model, out.layer)
    if w.b_gate is not None or w.b_in is not None or w.b_out is not None:
        x = augment_input(x)
    fired = out.sae.encode(acts[out.hook_name])[:, out.indices] > 0  # [P, n]
    mlp_out = acts[f"blocks.{out.layer}.hook_mlp_out"]
    corr = torch.full((out.directions.shape[0], len(ks)), float("nan"))
    for s in range(0, out.directions.shape[0], chunk):
        U = out.directions[s:s + chunk]
        truth = (mlp_out @ U.T).double()  # [P, n]
        eig = eigendecompose(model, out.layer, U, k=min(max(ks), x.shape[-1]))
        proj = torch.einsum("pd,ndk->pnk", x.to(eig.vectors.dtype), eig.vectors).double()
        contrib = proj.pow(2) * eig.values.double()[None]  # [P, n, k]
        for ik, k in enumerate(ks):
            approx = contrib[..., :k].sum(-1)
            if not active_only:
                corr[s:s + chunk, ik] = _pearson(truth, approx).float()
                continue
            for jj in range(U.shape[0]):
                m = fired[:, s + jj]
                if int(m.sum()) >= 3:
                    corr[s + jj, ik] = float(_pearson(truth[m, jj:jj + 1], approx[m, jj:jj + 1])[0])
    return EigenCorrelation(ks, corr, out.indices, fired.any(0), x.shape[0])


# --- labels ----------------------------------------------------------------------------------------

@torch.no_grad()
def typical_activations(model: Any, basis: InputBasis, tokens: Tensor) -> Tensor:
    """Each basis feature's mean activation where it fires on `tokens` (0 where it never does): [n].
    In SAE activation units, for `top_interactions(feature_scale=...)`."""
    a = sae_activations(model, tokens, basis.layer, [basis.hook_name])[basis.hook_name]
    f = basis.sae.encode(a)[:, basis.indices]
    fired = (f > 0).sum(0)
    return torch.where(fired > 0, f.sum(0) / fired.clamp_min(1), torch.zeros_like(f[0])).to(basis.decoder.dtype)


@torch.no_grad()
def top_activating_tokens(model: Any, sae: SAEWeights, tokens: Tensor, features: Sequence[int], k: int = 5,
                          context: int = 3) -> dict[int, list[tuple[str, float]]]:
    """For each SAE feature, the k corpus positions where it fires hardest: (the last `context + 1`
    tokens up to that position as a string, activation). Data-based labels for reports."""
    _, cache = model.run_with_cache(tokens, names_filter=[sae.hook_name])
    a = cache[sae.hook_name]
    B, T = a.shape[:2]
    f = sae.encode(a.reshape(B * T, -1))
    out: dict[int, list[tuple[str, float]]] = {}
    for i in features:
        top = f[:, int(i)].topk(min(k, B * T))
        items = []
        for v, p in zip(top.values.tolist(), top.indices.tolist()):
            if v <= 0:
                break
            b, t = divmod(p, T)
            window = tokens[b, max(0, t - context): t + 1].tolist()
            items.append((model.to_string(window) if model.tokenizer is not None else str(window), v))
        out[int(i)] = items
    return out
