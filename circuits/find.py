"""Weight-only circuit finding: walk backward from a target direction through the layers.

A *reader* is a unit direction d read from the residual stream at some point (the final residual,
the input of a head, the input of an MLP). Every component that writes into the residual stream
before that point contributes to `d . x`. Each one is scored by the largest contribution **one
context token** makes through it, in residual units, with tokens as the model sees them:

* tokens are live (they occur in the training text; `circuits.readout.live_token_mask`) and read
  through their *effective embeddings* (the residual the model builds for the token alone,
  `circuits.token_view`), because a head of layer 1 reads a position that layer 0 has rewritten;
* for a logit target the walk knows the *query* -- the token the prediction follows -- and a head
  counts a key token with its *expected attention* from the query (`circuits.evidence.key_attention`):
  ``max_s p(s) |ln1(E_s) diag(g) W_V W_O d|``. Away from the query (a head's own input) every key
  counts with attention 1;
* the direct path is the query's own embedding ``|W_E[query] . d|`` (without a query: the best token);
* an MLP of layer l writes ``sum_i lambda_i (v_i . x)^2`` along d (eigenpairs of Q(d)); eigenvector i
  scores ``|lambda_i| max_(route, s) (v_i . x_route[s])^2`` over the routes into the MLP (the query's
  own residual and each head of layers <= l bringing a key token, divided by the MLP's input scale)
  and carries its best *path pairs* ``2 lambda_i (v_i . x_p[s]) (v_i . x_q[t])``: "the feature fires
  when token s via p meets token t via q" (the rank-1 part of the MLP's path-pair expansion that
  this feature holds, `circuits.mlp_paths`).

So scores of every kind are in the same units and comparable within a reader. A node's *share* is
its score over the sum of all scored candidates for the same reader; its *importance* is the sum
over the readers it writes into of (reader importance x share). The walk is best-first by
importance, keeps the top `k_features` eigenvectors per MLP and `k_heads` heads per attention layer
for each reader, drops anything below `threshold`, and stops at `max_nodes`. A component reached
from two readers (a head, the embeddings) is one node with two outgoing edges; an eigenvector
belongs to its reader's interaction matrix, so it is a node of its own. Results hold up to each
norm's positive per-position scale. Positional embeddings (if learned) are not traced.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .attention import ov_matrices, qk_preferences
from .directions import head_directions, logit_diff_direction, unembed_direction
from .graph import CircuitEdge, CircuitGraph, CircuitNode
from .mlp import check_bilinear, check_layer, eigendecompose
from .competitors import TYPICAL_COMPETITORS
from .evidence import key_attention
from .readout import Live, TopTokens, live_token_ids, normalized_embeddings, token_label, top_tokens
from .token_view import TokenView, token_view

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
    at_query: bool = False  # read at the position being explained (True) or at an attended key


@dataclass
class _Route:
    name: str  # "query" (the token itself) or "L{l}H{h}" (a head bringing a key token)
    R: Tensor  # [n_live, d_model]: what each live token adds to the MLP input through this route


class _Context:
    """What the walk knows about tokens: effective embeddings (`circuits.token_view`) and, for a
    logit target, the query token and each head's expected attention from it (`circuits.evidence`)."""

    def __init__(self, model: Any, view: TokenView, query: Optional[int], competitors: float):
        self.model, self.view, self.query, self.competitors = model, view, query, competitors
        self._attention: dict[tuple[int, int], Tensor] = {}
        self._routes: dict[tuple[int, bool], list[_Route]] = {}
        self.embed = model.W_E.detach()[view.ids]  # raw embeddings: the direct path

    def attention(self, layer: int, head: int, at_query: bool) -> Tensor:
        """[n_live]: expected attention from the query, or 1 when the reader is not at the query."""
        if not at_query or self.query is None:
            return torch.ones(self.view.ids.numel(), dtype=self.view.resid[0].dtype, device=self.view.ids.device)
        if (layer, head) not in self._attention:
            self._attention[layer, head] = key_attention(self.model, self.view, layer, head, self.query,
                                                         competitors=self.competitors).to(self.view.resid[0].dtype)
        return self._attention[layer, head]

    def routes(self, layer: int, at_query: bool) -> list[_Route]:
        """Routes into the MLP of `layer`, divided by the MLP's input scale (the query's ln2 scale, or
        each token's own / the median one away from the query)."""
        key = (layer, at_query and self.query is not None)
        if key not in self._routes:
            view, q = self.view, self.query
            scale = view.ln2_scale[layer]
            if key[1]:
                s = scale[q]
                routes = [_Route("query", view.resid[layer][q:q + 1].expand(view.ids.numel(), -1) / s
                                 * (torch.arange(view.ids.numel(), device=s.device) == q)[:, None])]
            else:
                s = scale.median()
                routes = [_Route("direct", view.resid[layer] / scale[:, None])]
            for l in range(layer + 1):
                ov = ov_matrices(self.model, l).to(view.resid[0].dtype)
                X = view.normalized(l)
                for h in range(self.model.cfg.n_heads):
                    p = self.attention(l, h, key[1])
                    routes.append(_Route(f"L{l}H{h}", p[:, None] * (X @ ov[h]) / s))
            self._routes[key] = routes
        return self._routes[key]


def _ov_vectors(model: Any, layer: int, d: Tensor) -> Tensor:
    """w_h = diag(ln1 gain) W_V^h W_O^h d for every head of `layer`: [n_heads, d_model]."""
    return ov_matrices(model, layer).to(d.dtype) @ d


def _candidates(model: Any, d: Tensor, at: tuple[int, int], layers: Sequence[int], ctx: _Context, at_query: bool,
                k_features: int, k_heads: int, include_direct: bool) -> tuple[list[_Candidate], float]:
    """Scored writers into reader direction d (unit [d_model]) read at `at`; also the total score.
    Scores are contributions of one live token through one route (module docstring)."""
    d_model = model.cfg.d_model
    view = ctx.view
    out, total = [], 0.0
    for l in layers:
        if l < at[0]:  # MLP l writes before both reading points of layers > l
            k = min(k_features, d_model)
            eig = eigendecompose(model, l, d, k=k)
            routes = ctx.routes(l, at_query)
            for i in range(eig.k):
                v = eig.vectors[:d_model, i].to(d.dtype)
                v = v / v.norm().clamp_min(1e-12)
                reads = torch.stack([r.R @ v for r in routes])  # [n_routes, n_live]
                # canonical sign: the strongest single read is positive
                v = v * (1.0 if float(reads.flatten()[reads.abs().argmax()]) >= 0 else -1.0)
                score = abs(float(eig.values[i])) * float(reads.abs().max()) ** 2
                total += score
                out.append(_Candidate("mlp_feature", l, None, i, float(eig.values[i]), score, v, (l, 1), at_query))
        if l < at[0] or (l == at[0] and at[1] == 1):  # heads of layer l write before l's MLP
            w = _ov_vectors(model, l, d)  # [n_heads, d_model]
            reads = view.normalized(l).to(w.dtype) @ w.T  # [n_live, n_heads]
            weights = torch.stack([ctx.attention(l, h, at_query) for h in range(model.cfg.n_heads)], -1)
            scores = (reads * weights).abs().amax(0)  # [n_heads]: best key token through each head
            total += float(scores.sum())
            norms = w.norm(dim=-1)
            for h in scores.argsort(descending=True)[:k_heads].tolist():
                out.append(_Candidate("head_ov", l, h, None, None, float(scores[h]),
                                      w[h] / norms[h].clamp_min(1e-12), (l, 0), False))
    if include_direct:
        reads = ctx.embed.to(d.dtype) @ d
        score = float(reads[ctx.query].abs()) if at_query and ctx.query is not None else float(reads.abs().max())
        total += score
        out.append(_Candidate("embed", None, None, None, None, score, d, (-1, 0), at_query))
    return out, total


def _feature_path_pairs(model: Any, v: Tensor, eigenvalue: float, routes: Sequence[_Route], ids: Tensor,
                        n: int = 3) -> list[tuple[str, str, str, str, float]]:
    """The best route pairs of one MLP feature: lambda (v . R_p[s]) (v . R_q[t]), twice for a cross
    term, over pairs of routes p, q and live tokens s, t; [(p, token s, q, token t, value)]."""
    reads = [(r.name, r.R.to(v.dtype) @ v) for r in routes]  # [n_live] each
    found = []
    for a, (p, rp) in enumerate(reads):
        for q, rq in reads[a:]:
            # lambda rp[s] rq[t] is largest at the extremes of rp and rq
            for sp, sq in ((1, 1), (-1, -1), (1, -1), (-1, 1)):
                s, t = int((sp * rp).argmax()), int((sq * rq).argmax())
                factor = 1.0 if p == q and s == t else 2.0
                value = factor * eigenvalue * float(rp[s]) * float(rq[t])
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
          n_tokens: int, live: Live, ctx: _Context) -> CircuitNode:
    fields: dict[str, Any] = {}
    view = ctx.view
    if c.kind == "mlp_feature":
        label = f"MLP{c.layer} eigenvector {c.index} (lambda={c.eigenvalue:+.3g})"
        direct, head, ov = feature_tokens(model, c.layer, c.direction, n_tokens, X, live)
        fields.update(tokens_positive=direct.positive, tokens_negative=direct.negative, readout="direct",
                      ov_head=head, ov_tokens_positive=ov.positive, ov_tokens_negative=ov.negative,
                      path_pairs=_feature_path_pairs(model, c.direction, c.eigenvalue, ctx.routes(c.layer, c.at_query), view.ids))
    elif c.kind == "head_ov":
        label = f"L{c.layer}H{c.head} OV"
        reads = view.normalized(c.layer).to(c.direction.dtype) @ (c.direction * c.score)
        p = ctx.attention(c.layer, c.head, True)
        weighted = reads * p  # p is all ones without a query
        top = weighted.topk(min(n_tokens, weighted.numel()))
        fields.update(tokens_positive=[(token_label(model, int(view.ids[i])), float(weighted[i])) for i in top.indices],
                      readout="tokens it brings" + (f" from {token_label(model, int(view.ids[ctx.query]))!r}" if ctx.query is not None else ""))
        if ctx.query is not None:
            keys = p.topk(min(4, p.numel()))
            fields["qk"] = (f"from {token_label(model, int(view.ids[ctx.query]))!r} attends to "
                            + ", ".join(f"{token_label(model, int(view.ids[i]))!r} {float(v):.2f}" for v, i in zip(keys.values, keys.indices)))
        else:
            fields["qk"] = qk_preferences(model, c.layer, c.head, live=live, n=n_tokens).summary(n=4)
    else:
        label = "token embeddings (direct path)"
        reads = ctx.embed.to(parent_dir.dtype) @ parent_dir
        if c.at_query and ctx.query is not None:
            fields.update(tokens_positive=[(token_label(model, int(view.ids[ctx.query])), float(reads[ctx.query]))],
                          readout="the query token")
        else:
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
    query: Optional[Union[int, str]] = None,
    competitors: float = TYPICAL_COMPETITORS,
    view: Optional[TokenView] = None,
) -> Union[CircuitGraph, list[CircuitGraph]]:
    """The components whose weight-derived contribution to `target` is largest, as a `CircuitGraph`.

    target: see `target_direction` (a token, a token pair for a logit difference, a head's
    (layer, head, 'q'|'k'|'v'), or a vector [d_model] read at `read_at`); a block [n, d_model]
    (e.g. an output SAE's encoder rows, `circuits.sae.output_features(...).directions`) gives a list
    of n graphs.
    layers: the layers whose MLPs and heads may appear (default all).
    k_features: eigenvectors kept per MLP per reader; k_heads: heads kept per attention layer per
    reader; threshold: least importance (fraction of the target) for a component to be kept;
    max_nodes: size cap (target included); n_tokens: top tokens stored per node.
    live: which tokens may be read (default: those the model's `token_counts` saw in training, or
    all when it has none; "all"; a bool mask or counts [d_vocab]).
    query: the token the prediction follows (default for a logit target: the live token after which
    its tokens are most likely, see `circuits.evidence`; none for other targets); competitors: how
    many typical tokens an attended token competes with (`circuits.evidence.key_attention`).
    view: the tokens as the walk reads them (default: one token at a time, `token_view(model, live)`;
    pass `circuits.context_view(model)` to read them with typical text before them, as
    `token_evidence` does by default, and reuse it across targets).
    Nothing here runs on data: the numbers come from the weights, and from the model reading tokens
    without a corpus (`circuits.token_view`, `circuits.context_view`)."""
    check_bilinear(model)
    if isinstance(target, Tensor) and target.ndim == 2:  # a block of directions (e.g. SAE encoder rows)
        return [find_circuit(model, row, layers=layers, k_features=k_features, k_heads=k_heads, threshold=threshold,
                             max_nodes=max_nodes, include_direct=include_direct, n_tokens=n_tokens, read_at=read_at,
                             live=live, query=query, competitors=competitors,
                             view=token_view(model, live, pair_branching=0) if view is None else view) for row in target]
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
    if view is None:
        view = token_view(model, live, pair_branching=0)  # the walk never places tokens: no pair chain
    elif live is not None and not torch.equal(view.ids.cpu(), live_token_ids(model, live).cpu()):
        raise ValueError("the view was built for other live tokens than `live`; build it with the same live "
                         "argument (token_view(model, live) or context_view(model, live=live)) or leave live out")
    ids = view.ids
    q = None
    if query is not None:
        q = view.index(_token_id(model, query))
    elif at_layer == n_layers and not isinstance(target, Tensor) and not hasattr(target, "__array__"):
        class_ids = _token_ids(model, target) if isinstance(target, (int, str)) else \
            _token_ids(model, target[0]) + _token_ids(model, target[1])
        q = int(view.log_probs[:, class_ids].logsumexp(-1).argmax())
    ctx = _Context(model, view, q, competitors)

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
        n_live_tokens=int(ids.numel()), query=None if q is None else token_label(model, int(ids[q])),
        score="largest contribution to the parent direction of one live token through one route, in residual units: "
              "|lambda| max_(route, s) (v . x_route[s])^2 (MLP feature), max_s p(s) |ln1(E_s) diag(g) W_V W_O d| (head; "
              "p(s) = expected attention from the query, 1 away from it), |W_E[query] . d| (embeddings); E_s = the "
              "token's effective embedding",
    ))

    counter = itertools.count()
    heap: list = []

    def push_children(node_id: str, d: Tensor, at: tuple[int, int], importance: float, at_query: bool,
                      head: bool = False) -> None:
        cands, total = _candidates(model, d, at, layers, ctx, at_query, k_features, k_heads, include_direct)
        for c in cands:
            if head and c.kind == "embed":
                continue  # counted in the shares, but its tokens are the head's own virtual tokens
            share = c.score / total if total > 0 else 0.0
            if importance * share >= threshold and share > 0:
                heapq.heappush(heap, (-importance * share, next(counter), c, node_id, d, share))

    push_children("target", d, (at_layer, 0), 1.0, at_query=q is not None)
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
        nodes[node_id] = _node(model, c, node_id, parent_dir, -neg_imp, X, n_tokens, live, ctx)
        graph.nodes.append(nodes[node_id])
        if c.kind == "mlp_feature" or (c.kind == "head_ov" and c.layer > 0):
            push_children(node_id, c.direction, c.reads_at, -neg_imp, at_query=c.at_query, head=c.kind == "head_ov")
    graph.validate()
    return graph
