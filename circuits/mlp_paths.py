"""The paths that feed a bilinear MLP of a model, and its readout split into path pairs.

Everything lives in the MLP's input space (`mlp_weights`: the normalized residual, norm gains folded
into the MLP). Two views of the same expansion `u . mlp(x) = sum_{p,q} x_p^T Q(u) x_q`:

* **data view** (`mlp_path_terms`): for a cached forward pass the components come from the cache
  (token embedding, every head of the layers up to this MLP, every earlier MLP, the biases) and the
  pair terms sum exactly to the model's own `u . hook_mlp_out`;
* **weight view** (`token_paths`, `rank_path_pairs`): each path is a map from a token to a vector
  in the MLP's input -- the token's own embedding at this position (``direct``), a head attending to
  that token (``L1H0``: its normalized embedding through `diag(ln1 gain) W_V W_O`), two heads in a
  row (``L0H1>L1H0``, V-composition), or an earlier MLP reading the token at its position
  (``MLP0``) -- and the pair table of paths p, q is `T[s, t] = R_p[s]^T Q(u) R_q[t]`: "the MLP writes
  u when token s arrives through p while token t arrives through q". All tokens are normalized
  embeddings taken one at a time with attention 1, the same positive scale for every path, so entries
  of all tables are comparable with each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .attention import ov_matrices
from .eigen import Eigen
from .mlp import check_direction, check_layer, eigendecompose, interaction_matrix, mlp_weights
from .paths import pair_terms, top_pair_entries
from .readout import live_token_ids, normalized_embeddings, token_label

# --- the weight view ---------------------------------------------------------------------------


@dataclass
class TokenPath:
    """One way a token reaches a reading point. R: [n_tokens, d_model], row i = token `token_ids[i]`."""

    name: str  # "direct", "L1H0", "L0H1>L1H0", "MLP0"
    kind: str  # "direct" | "head" | "heads" | "mlp"
    heads: tuple[tuple[int, int], ...] = ()
    mlp_layer: Optional[int] = None
    R: Tensor = field(default=None, repr=False)


def writers_before(model: Any, layer: int, stage: str) -> tuple[list[int], list[int]]:
    """(attention layers, MLP layers) that write before the reading point: the input of the MLP of
    `layer` (stage "mlp"), the input of its attention ("attn"), or the final residual (layer =
    n_layers)."""
    if stage not in ("attn", "mlp"):
        raise ValueError(f"stage must be 'attn' or 'mlp', got {stage!r}")
    n = model.cfg.n_layers
    if not 0 <= layer <= n:
        raise ValueError(f"layer must be in [0, {n}] (n_layers = the final residual), got {layer}")
    attn = list(range(layer + 1 if stage == "mlp" and layer < n else layer))
    return attn, list(range(layer))


@torch.no_grad()
def token_paths(model: Any, layer: int, stage: str = "mlp", token_ids: Optional[Tensor] = None,
                composition: bool = True, mlps: bool = True) -> list[TokenPath]:
    """The token paths into a reading point (see `writers_before`), each with R [n_tokens, d_model].

    token_ids: which tokens to take (default: the live tokens, `live_token_ids`). composition: add
    two-head chains (the second head reads what the first wrote). mlps: add each earlier MLP reading
    the token at its own position."""
    token_ids = live_token_ids(model) if token_ids is None else token_ids
    X = normalized_embeddings(model)[token_ids]  # [n, d_model]
    attn_layers, mlp_layers = writers_before(model, layer, stage)
    paths = [TokenPath("direct", "direct", R=X)]
    ov = {l: ov_matrices(model, l).to(X.dtype) for l in attn_layers}
    heads = [(l, h) for l in attn_layers for h in range(model.cfg.n_heads)]
    for l, h in heads:
        paths.append(TokenPath(f"L{l}H{h}", "head", ((l, h),), R=X @ ov[l][h]))
    if composition:
        for l1, h1 in heads:
            for l2, h2 in heads:
                if l1 < l2:
                    paths.append(TokenPath(f"L{l1}H{h1}>L{l2}H{h2}", "heads", ((l1, h1), (l2, h2)),
                                           R=X @ ov[l1][h1] @ ov[l2][h2]))
    if mlps:
        for l in mlp_layers:
            w = mlp_weights(model, l)
            paths.append(TokenPath(f"MLP{l}", "mlp", mlp_layer=l, R=w.forward(X.to(w.W_gate.dtype)).to(X.dtype)))
    return paths


@dataclass
class PathPair:
    """One pair of paths into an MLP and its strongest token pairs.

    score: the largest |contribution| of one token pair, `multiplicity * T[s, t]` (a cross term
    counts twice); tokens: [(token via p, token via q, contribution)] by |contribution|."""

    p: str
    q: str
    score: float
    tokens: list[tuple[str, str, float]]
    token_ids: list[tuple[int, int]]

    @property
    def name(self) -> str:
        return self.p if self.p == self.q else f"{self.p} x {self.q}"


def _path_strength(R: Tensor, eig: Eigen) -> Tensor:
    """Largest self readout of any token through a path: max_s |sum_i lambda_i (v_i . R[s])^2|."""
    proj = R @ eig.vectors[: R.shape[1]].to(R.dtype)
    return (proj.pow(2) * eig.values.to(R.dtype)).sum(-1).abs().max()


@torch.no_grad()
def rank_path_pairs(model: Any, layer: int, u: Tensor, paths: Optional[Sequence[TokenPath]] = None,
                    token_ids: Optional[Tensor] = None, max_paths: int = 12, n_pairs: int = 8,
                    n_tokens: int = 5, sign: int = 0, eig: Optional[Eigen] = None) -> list[PathPair]:
    """The path pairs of the MLP of `layer` that write most along u, from the weights alone.

    u [d_model]: the output direction. paths: default `token_paths(model, layer)`. The `max_paths`
    paths with the largest reach (largest |R_p[s]^T Q R_p[s] | plus cross-reach, see below) are
    paired with each other; each pair is scored by its largest single token-pair entry
    `multiplicity * R_p[s]^T Q(u) R_q[t]` (multiplicity 2 for a cross term). sign: +1 ranks by the
    largest positive entries (what pushes u up), -1 by the most negative, 0 by magnitude.
    Returns the `n_pairs` best pairs, best first, each with its `n_tokens` best token pairs.
    Q(u) goes through its full eigendecomposition up to d_model = 1024 and its top 64 eigenpairs
    above (`eig` to pass your own)."""
    layer = check_layer(model, layer)
    u = check_direction(model, u)
    ids = live_token_ids(model) if token_ids is None else token_ids
    paths = list(token_paths(model, layer, token_ids=ids) if paths is None else paths)
    if eig is None:
        d = model.cfg.d_model
        eig = eigendecompose(model, layer, u, k=None if d <= 1024 else 64)
    # The bias coordinate (augmented Q) is not a token path: tokens live in the first d_model coordinates.
    d_model = model.cfg.d_model
    eig_t = Eigen(eig.values, eig.vectors[:d_model], False)
    V = eig_t.vectors.to(paths[0].R.dtype)
    # Reach of a path: the norm of its tokens' coordinates in Q's eigenbasis weighted by sqrt|lambda|
    # bounds every entry it can take part in (Cauchy-Schwarz), self or cross.
    weight = eig_t.values.abs().sqrt().to(V.dtype)
    reach = torch.stack([((p.R @ V) * weight).norm(dim=-1).max() for p in paths])
    keep = reach.argsort(descending=True)[:max_paths].tolist()
    out: list[PathPair] = []
    for a, i in enumerate(keep):
        for j in keep[a:]:
            p, q = paths[i], paths[j]
            same = i == j
            top = top_pair_entries(p.R, q.R, eig=eig_t, k=n_tokens, same=same, sign=sign,
                                   multiplicity=1.0 if same else 2.0)
            if same:  # s != t through one path is a cross term of two tokens: it counts twice
                top.values = torch.where(top.rows == top.cols, top.values, 2 * top.values)
            pairs = [(int(ids[s]), int(ids[t])) for s, t in zip(top.rows.tolist(), top.cols.tolist())]
            tokens = [(token_label(model, s), token_label(model, t), float(v)) for (s, t), v in zip(pairs, top.values)]
            key = top.values if sign > 0 else (-top.values if sign < 0 else top.values.abs())
            score = float(key.max()) if len(key) else 0.0
            out.append(PathPair(p.name, q.name, score, tokens, pairs))
    out.sort(key=lambda pp: -pp.score)
    return out[:n_pairs]


# --- the data view -----------------------------------------------------------------------------


@dataclass
class PathTerms:
    """The data view: terms [..., n, n] with terms[..., p, q] = x_p^T Q(u) x_q; labels [n]
    (TransformerLens's `get_full_resid_decomposition` labels, plus "mlp_bias" for the constant 1 of
    a biased MLP); `readout` [...] = u . hook_mlp_out from the model's own forward pass."""

    terms: Tensor
    labels: list[str]
    readout: Tensor

    @property
    def total(self) -> Tensor:
        return self.terms.sum((-1, -2))

    def pair(self, p: str, q: str) -> Tensor:
        """The whole contribution of the pair {p, q} (both orders): [...]."""
        i, j = self.labels.index(p), self.labels.index(q)
        return self.terms[..., i, j] if i == j else self.terms[..., i, j] + self.terms[..., j, i]


@torch.no_grad()
def mlp_path_terms(model: Any, cache: Any, layer: int, u: Tensor) -> PathTerms:
    """Split `u . hook_mlp_out` of the MLP of `layer` into path-pair terms on a cached forward pass.

    cache: an ActivationCache holding resid_mid, ln2.hook_scale, hook_mlp_out of this layer and
    what `get_full_resid_decomposition` needs (run_with_cache with no names filter is simplest).
    The components are the embedding, every head of layers <= layer, every earlier MLP, and the
    summed biases; each is mapped into the MLP's input space the way the norm maps their sum (LN
    centres, the per-position scale divides), so they add up to the MLP's actual input."""
    layer = check_layer(model, layer)
    u = check_direction(model, u)
    if u.ndim != 1:
        raise ValueError("mlp_path_terms takes one direction u [d_model]")
    parts, labels = cache.get_full_resid_decomposition(layer=layer, mlp_input=True, expand_neurons=False,
                                                       return_labels=True)  # [n, batch, pos, d_model]
    kind = model.cfg.normalization_type
    if kind == "LN":
        parts = parts - parts.mean(-1, keepdim=True)
    if kind is not None:
        parts = parts / cache[f"blocks.{layer}.ln2.hook_scale"][None]
    Q = interaction_matrix(model, layer, u).to(torch.float64)
    if Q.shape[-1] == model.cfg.d_model + 1:  # biased MLP: the constant 1 is one more path
        parts = torch.cat([parts, parts.new_zeros(*parts.shape[:-1], 1)], -1)
        one = parts.new_zeros(1, *parts.shape[1:])
        one[..., -1] = 1.0
        parts, labels = torch.cat([parts, one]), [*labels, "mlp_bias"]
    terms = pair_terms(parts.to(torch.float64), Q)
    readout = cache[f"blocks.{layer}.hook_mlp_out"].to(torch.float64) @ u.to(torch.float64)
    return PathTerms(terms, list(labels), readout)


