"""Weight-only circuit finding: walk backward from a target direction through the layers.

A *reader* is a unit direction d read from the residual stream at some point (the final residual,
the input of a head, the input of an MLP). Every component that writes into the residual stream
before that point contributes to `d . x`. We score each one by the largest contribution it makes
from **one real token through one path with attention 1** (real: a live token, one that occurs in
the training text -- see `circuits.readout.live_token_mask`; tokens as their normalized embeddings,
so every score is on the same scale and scores of different kinds are comparable):

* the direct path (the token at the reading position): ``max_s |e_s . d|``;
* head h of layer l (its OV path, the head attending to token s): ``max_s |e_s diag(g) W_V W_O d|``;
  the head's QK side (which offsets and key tokens it prefers, `circuits.attention`) is attached;
* an MLP of layer l writes ``sum_i lambda_i (v_i . x)^2`` along d (eigenpairs of Q(d)):
  eigenvector i scores ``|lambda_i| max_{p, s} (v_i . R_p[s])^2`` over the token paths p into the
  MLP (direct, each head up to layer l: `circuits.mlp_paths.token_paths`), and carries its best
  *path pairs*: ``2 lambda_i (v_i . R_p[s]) (v_i . R_q[t])``, "the feature fires when token s via p
  meets token t via q" (the rank-1 part of the MLP's path-pair expansion that this feature holds).

A node's *share* is its score over the sum of all scored candidates for the same reader; its
*importance* is the sum over the readers it writes into of (reader importance x share). The walk is
best-first by importance, keeps the top `k_features` eigenvectors per MLP and `k_heads` heads per
attention layer for each reader, drops anything below `threshold`, and stops at `max_nodes`. A
component reached from two readers (a head, the embeddings) is one node with two outgoing edges; an
eigenvector belongs to its reader's interaction matrix, so it is a node of its own. Inputs of every
reader are normalized residuals: results hold up to each norm's positive per-position scale.
Positional embeddings (if learned) are not traced.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .attention import qk_preferences
from .directions import head_directions, logit_diff_direction, unembed_direction
from .graph import CircuitEdge, CircuitGraph, CircuitNode
from .layer import check_bilinear, check_layer, eigendecompose
from .mlp_paths import token_paths
from .readout import Live, TopTokens, live_token_ids, normalized_embeddings, token_label, top_tokens

TokenLike = Union[int, str]
Target = Union[TokenLike, tuple, list, Tensor]


# --- targets ----------------------------------------------------------------------------------

def _token_id(model: Any, token: Any) -> int:
    if isinstance(token, bool) or not isinstance(token, (int, str)):
        raise ValueError(f"a token must be a string or an int id, got {token!r}")
    if isinstance(token, int):
        if not 0 <= token < model.cfg.d_vocab:
            raise ValueError(f"token id {token} is outside the vocabulary [0, {model.cfg.d_vocab})")
        return token
    tid = model.to_single_token(token)  # ValueError when it is several tokens or no tokenizer
    tok = model.tokenizer
    unk = getattr(tok, "unk_token_id", None)
    if unk is not None and tid == unk and token.strip() != getattr(tok, "unk_token", None):
        raise ValueError(f"{token!r} is not in the tokenizer's vocabulary (it encodes to the unknown token)")
    return tid


def _token_ids(model: Any, tokens: Any) -> list[int]:
    items = [tokens] if isinstance(tokens, (int, str)) else list(tokens)
    if not items:
        raise ValueError("an empty token set cannot be a target")
    return [_token_id(model, t) for t in items]


def _describe(model: Any, ids: list[int]) -> str:
    labels = [repr(model.to_string([t])) if model.tokenizer is not None else str(t) for t in ids]
    return labels[0] if len(labels) == 1 else "{" + ", ".join(labels) + "}"


@torch.no_grad()
def target_direction(model: Any, target: Target, read_at: Optional[int] = None) -> tuple[Tensor, int, str]:
    """Resolve a target to (direction [d_model], layer whose input residual reads it, description).

    target: a token (str or id) -> its unembedding; a pair ``(a, b)`` of tokens or token sets ->
    the logit difference a - b; ``(layer, head, "q"|"k"|"v")`` -> the head's read-in direction that
    its query/key/value is most sensitive to (top right singular vector of `head_directions`, times
    its singular value), or ``(layer, head, kind, i)`` -> read-in row i; a tensor [d_model] -> that
    vector, read at the residual entering layer `read_at` (default n_layers: the final residual).
    Layer n_layers means the final residual (read through ln_final)."""
    n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
    if isinstance(target, (int, str)) and not isinstance(target, bool):
        ids = _token_ids(model, target)
        return unembed_direction(model, ids), n_layers, f"logit of {_describe(model, ids)}"
    if isinstance(target, (tuple, list)) and len(target) in (3, 4) and isinstance(target[2], str):
        layer, head, kind = target[:3]
        if not isinstance(layer, int) or not isinstance(head, int):
            raise ValueError(f"a head target is (layer, head, 'q'|'k'|'v'[, index]) with int layer and head, got {target!r}")
        layer = check_layer(model, layer)
        rows = head_directions(model, layer, head, kind)  # [d_head, d_model]
        if len(target) == 4:
            i = target[3]
            if not isinstance(i, int) or not 0 <= i < rows.shape[0]:
                raise ValueError(f"read-in index {i!r} is out of range: the head has d_head={rows.shape[0]}")
            return rows[i], layer, f"L{layer}H{head} {kind}[{i}]"
        _, S, Vh = torch.linalg.svd(rows.float(), full_matrices=False)
        return (S[0] * Vh[0]).to(rows.dtype), layer, f"L{layer}H{head} {kind} (top read-in direction)"
    if isinstance(target, (tuple, list)) and len(target) == 2:
        a, b = _token_ids(model, target[0]), _token_ids(model, target[1])
        return logit_diff_direction(model, a, b), n_layers, f"logit {_describe(model, a)} - {_describe(model, b)}"
    if isinstance(target, Tensor) or hasattr(target, "__array__"):
        v = torch.as_tensor(target)
        if v.shape != (d_model,):
            raise ValueError(f"a vector target must have shape ({d_model},) (d_model), got {tuple(v.shape)}")
        if not v.dtype.is_floating_point or not torch.isfinite(v).all() or float(v.norm()) == 0:
            raise ValueError("a vector target must be a finite, non-zero float vector")
        at = n_layers if read_at is None else read_at
        if not isinstance(at, int) or not 0 <= at <= n_layers:
            raise ValueError(f"read_at must be a layer in [0, {n_layers}] (n_layers = final residual), got {read_at!r}")
        where = "final residual" if at == n_layers else f"residual entering layer {at}"
        return v.to(model.W_E.dtype), at, f"vector read at the {where}"
    raise ValueError(
        f"cannot use {target!r} as a target: give a token (str or int), a pair (a, b) for a logit difference, "
        f"(layer, head, 'q'|'k'|'v') for a head's read-in, or a vector of shape ({d_model},)"
    )


# --- scoring ----------------------------------------------------------------------------------

@dataclass
class _Candidate:
    kind: str  # "mlp_feature" | "head_ov" | "embed"
    layer: Optional[int]
    head: Optional[int]
    index: Optional[int]
    eigenvalue: Optional[float]
    score: float
    direction: Tensor  # unit [d_model]: what this component reads (embed: the parent direction)
    reads_at: tuple[int, int]  # (layer, 0 = before attention, 1 = before the MLP)


def _ov_vectors(model: Any, layer: int, d: Tensor) -> Tensor:
    """w_h = diag(ln1 gain) W_V^h W_O^h d for every head of `layer`: [n_heads, d_model]."""
    attn = model.blocks[layer].attn
    W_V = attn.W_V.detach()  # [n_heads, d_model, d_head]
    W_O = attn.W_O.detach() * model.cfg.attn_out_scale  # [n_heads, d_head, d_model]
    w = torch.einsum("hdk,hkm,m->hd", W_V, W_O, d.to(W_V.dtype))
    gain = getattr(model.blocks[layer].ln1, "w", None)
    return w * gain.detach() if gain is not None else w


def _candidates(model: Any, d: Tensor, at: tuple[int, int], layers: Sequence[int], X: Tensor,
                k_features: int, k_heads: int, include_direct: bool, paths_of: Any) -> tuple[list[_Candidate], float]:
    """Scored writers into reader direction d (unit [d_model]) read at `at`; also the total score.
    X: live tokens' normalized embeddings [n_live, d_model]; paths_of(l): token paths into MLP l."""
    d_model = model.cfg.d_model
    out, total = [], 0.0
    for l in layers:
        if l < at[0]:  # MLP l writes before both reading points of layers > l
            k = min(k_features, d_model)
            eig = eigendecompose(model, l, d, k=k)
            for i in range(eig.k):
                v = eig.vectors[:d_model, i].to(d.dtype)
                v = v / v.norm().clamp_min(1e-12)
                s = X @ v  # canonical sign: the strongest direct token reads positive
                v = v * (1.0 if float(s[s.abs().argmax()]) >= 0 else -1.0)
                reach = max(float((p.R.to(v.dtype) @ v).abs().max()) for p in paths_of(l))
                score = abs(float(eig.values[i])) * reach ** 2
                total += score
                out.append(_Candidate("mlp_feature", l, None, i, float(eig.values[i]), score, v, (l, 1)))
        if l < at[0] or (l == at[0] and at[1] == 1):  # heads of layer l write before l's MLP
            w = _ov_vectors(model, l, d)
            scores = (X @ w.T).abs().amax(0)  # [n_heads]: best real token through each head
            total += float(scores.sum())
            norms = w.norm(dim=-1)
            for h in scores.argsort(descending=True)[:k_heads].tolist():
                out.append(_Candidate("head_ov", l, h, None, None, float(scores[h]),
                                      w[h] / norms[h].clamp_min(1e-12), (l, 0)))
    if include_direct:
        score = float((X @ d).abs().max())
        total += score
        out.append(_Candidate("embed", None, None, None, None, score, d, (-1, 0)))
    return out, total


def _feature_path_pairs(model: Any, v: Tensor, eigenvalue: float, paths: Sequence[Any], ids: Tensor,
                        n: int = 3) -> list[tuple[str, str, str, str, float]]:
    """The best path pairs of one MLP feature: lambda (v . R_p[s]) (v . R_q[t]) times 2 for a cross
    term, over pairs of token paths p, q and live tokens s, t; [(p, token s, q, token t, value)]."""
    reads = [(p.name, p.R.to(v.dtype) @ v) for p in paths]  # [n_live] each
    found = []
    for a, (p, rp) in enumerate(reads):
        for q, rq in reads[a:]:
            # lambda rp[s] rq[t] is largest at the extremes of rp and rq with the sign of lambda
            for sp, sq in ((1, 1), (-1, -1), (1, -1), (-1, 1)):
                s, t = int((sp * rp).argmax()), int((sq * rq).argmax())
                if p == q and s == t:
                    value = eigenvalue * float(rp[s]) ** 2
                else:
                    value = (1.0 if p == q and s == t else 2.0) * eigenvalue * float(rp[s]) * float(rq[t])
                found.append((p, token_label(model, int(ids[s])), q, token_label(model, int(ids[t])), value))
    found = sorted(set(found), key=lambda f: -abs(f[4]))
    return found[:n]


# --- the walk -----------------------------------------------------------------------------------

def _tokens(model: Any, scores: Tensor, n: int, live: Live = None) -> dict[str, Any]:
    t = top_tokens(model, scores.to(torch.float32), k=n, live=live)
    return {"tokens_positive": t.positive, "tokens_negative": t.negative}


@torch.no_grad()
def feature_tokens(model: Any, layer: int, v: Tensor, n_tokens: int = 8,
                   X: Optional[Tensor] = None, live: Live = None) -> tuple[TopTokens, str, TopTokens]:
    """Read an input feature v [d_model] of the MLP of `layer` in token space: the direct path
    (normalized embeddings . v) and the single head of layers <= `layer` whose OV path ("virtual
    tokens", `diag(g) W_V W_O v`) reaches it most strongly over live tokens (`live`, see
    `circuits.readout.live_token_mask`). Returns (direct, "L{l}H{h}", ov)."""
    layer = check_layer(model, layer)
    X = normalized_embeddings(model) if X is None else X  # [d_vocab, d_model]
    v = v[: model.cfg.d_model].to(X.dtype)
    direct = top_tokens(model, (X @ v).float(), k=n_tokens, live=live)
    ov = torch.stack([_ov_vectors(model, l, v) @ X.T for l in range(layer + 1)])  # [layer+1, n_heads, d_vocab]
    ids = live_token_ids(model, live).to(ov.device)
    l, h = divmod(int(ov[..., ids].abs().amax(-1).flatten().argmax()), ov.shape[1])
    return direct, f"L{l}H{h}", top_tokens(model, ov[l, h].float(), k=n_tokens, live=live)


def _node(model: Any, c: _Candidate, node_id: str, parent_dir: Tensor, importance: float, X: Tensor,
          n_tokens: int, live: Live, ids: Tensor, paths_of: Any) -> CircuitNode:
    fields: dict[str, Any] = {}
    if c.kind == "mlp_feature":
        label = f"MLP{c.layer} eigenvector {c.index} (lambda={c.eigenvalue:+.3g})"
        direct, head, ov = feature_tokens(model, c.layer, c.direction, n_tokens, X, live)
        fields.update(tokens_positive=direct.positive, tokens_negative=direct.negative, readout="direct",
                      ov_head=head, ov_tokens_positive=ov.positive, ov_tokens_negative=ov.negative,
                      path_pairs=_feature_path_pairs(model, c.direction, c.eigenvalue, paths_of(c.layer), ids))
    elif c.kind == "head_ov":
        label = f"L{c.layer}H{c.head} OV"
        qk = qk_preferences(model, c.layer, c.head, live=live, n=n_tokens)
        fields.update(_tokens(model, X @ (c.direction * c.score), n_tokens, live), readout="virtual tokens",
                      qk=qk.summary(n=4))
    else:
        label = "token embeddings (direct path)"
        fields.update(_tokens(model, X @ parent_dir, n_tokens, live), readout="direct")
    return CircuitNode(id=node_id, kind=c.kind, layer=c.layer, head=c.head, index=c.index, eigenvalue=c.eigenvalue,
                       score=c.score, importance=importance, label=label, **fields)


@torch.no_grad()
def find_circuit(
    model: Any,
    target: Target,
    layers: Optional[Sequence[int]] = None,
    k_features: int = 4,
    k_heads: int = 4,
    threshold: float = 0.02,
    max_nodes: int = 32,
    include_direct: bool = True,
    n_tokens: int = 8,
    read_at: Optional[int] = None,
    live: Live = None,
) -> CircuitGraph:
    """The components whose weight-derived contribution to `target` is largest, as a `CircuitGraph`.

    target: see `target_direction` (a token, a token pair for a logit difference, a head's
    (layer, head, 'q'|'k'|'v'), or a vector [d_model] read at `read_at`).
    layers: the layers whose MLPs and heads may appear (default all).
    k_features: eigenvectors kept per MLP per reader; k_heads: heads kept per attention layer per
    reader; threshold: least importance (fraction of the target) for a component to be kept;
    max_nodes: size cap (target included); n_tokens: top tokens stored per node.
    live: which tokens may be read (default: those the model's `token_counts` saw in training, or
    all when it has none; "all"; a bool mask or counts [d_vocab]).
    Nothing here runs the model: every number comes from its weights."""
    check_bilinear(model)
    for name, value, low in (("k_features", k_features, 1), ("k_heads", k_heads, 0), ("max_nodes", max_nodes, 1), ("n_tokens", n_tokens, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
    n_layers = model.cfg.n_layers
    if isinstance(layers, int):
        layers = [layers]
    layers = sorted({check_layer(model, l) for l in (range(n_layers) if layers is None else layers)})
    direction, at_layer, description = target_direction(model, target, read_at)
    d = (direction / direction.norm().clamp_min(1e-12)).to(model.W_E.dtype)
    X = normalized_embeddings(model).to(d.dtype)  # [d_vocab, d_model]
    ids = live_token_ids(model, live).to(X.device)
    X_live = X[ids]
    path_cache: dict[int, list] = {}

    def paths_of(layer: int) -> list:
        if layer not in path_cache:
            path_cache[layer] = token_paths(model, layer, token_ids=ids, composition=False, mlps=False)
        return path_cache[layer]

    root = CircuitNode(id="target", kind="target", layer=at_layer, label=description, importance=1.0,
                       score=float(direction.norm()))
    if at_layer == n_layers:  # which logits the target direction itself moves
        gain = getattr(model.ln_final, "w", None)
        W_U = model.W_U.detach() * (gain.detach()[:, None] if gain is not None else 1.0)
        t = top_tokens(model, (d @ W_U).float(), k=n_tokens, live=live)
        root.tokens_positive, root.tokens_negative, root.readout = t.positive, t.negative, "unembed"
    graph = CircuitGraph(target=description, nodes=[root], meta=dict(
        layers=layers, k_features=k_features, k_heads=k_heads, threshold=threshold, max_nodes=max_nodes,
        read_at=at_layer, d_model=model.cfg.d_model, n_layers=n_layers, d_vocab=model.cfg.d_vocab,
        n_live_tokens=int(ids.numel()),
        score="largest contribution to the parent direction from one live token through one path with attention 1: "
              "|lambda| max_(p,s) (v . R_p[s])^2 (MLP feature), max_s |e_s diag(g) W_V W_O d| (head), "
              "max_s |e_s . d| (embeddings); e_s = normalized embedding",
    ))

    counter = itertools.count()
    heap: list = []

    def push_children(node_id: str, d: Tensor, at: tuple[int, int], importance: float, head: bool = False) -> None:
        cands, total = _candidates(model, d, at, layers, X_live, k_features, k_heads, include_direct, paths_of)
        for c in cands:
            if head and c.kind == "embed":
                continue  # counted in the shares, but its tokens are the head's own virtual tokens
            share = c.score / total if total > 0 else 0.0
            if importance * share >= threshold and share > 0:
                heapq.heappush(heap, (-importance * share, next(counter), c, node_id, d, share))

    push_children("target", d, (at_layer, 0), 1.0)
    nodes: dict[str, CircuitNode] = {}
    while heap and len(graph.nodes) < max_nodes:
        neg_imp, _, c, parent_id, parent_dir, share = heapq.heappop(heap)
        if c.kind == "mlp_feature":  # an eigenvector of its reader's Q: one node per reader
            node_id = f"L{c.layer}.mlp.f{c.index}" + ("" if parent_id == "target" else f"<{parent_id}")
        else:
            node_id = f"L{c.layer}H{c.head}" if c.kind == "head_ov" else "embed"
        graph.edges.append(CircuitEdge(source=node_id, target=parent_id, weight=c.score, share=share))
        if node_id in nodes:  # reached again: one node, one more reader
            nodes[node_id].importance += -neg_imp
            continue
        nodes[node_id] = _node(model, c, node_id, parent_dir, -neg_imp, X, n_tokens, live, ids, paths_of)
        graph.nodes.append(nodes[node_id])
        if c.kind == "mlp_feature" or (c.kind == "head_ov" and c.layer > 0):
            push_children(node_id, c.direction, c.reads_at, -neg_imp, head=c.kind == "head_ov")
    graph.validate()
    return graph
