"""Which context tokens make the model predict a target, from the weights alone.

The question a circuit must answer for a logit (difference) target u is "which earlier token, when
it is in the context, pushes u?". We answer it with a weight-only stand-in for a context:

* the **query**: the token after which the target is predicted (the live token whose one-token
  next-token distribution puts the most mass on the target's tokens, or one you name);
* each head of each layer attends from the query to a key token b with an **expected attention**
  `p_h(b) = E[e^{s(b)} / (e^{s(b)} + S)]`: the share b gets against `c` typical competitors drawn
  independently by their frequency in the training text (`competitors`, by default one at each of
  the other 15 positions of the 16-token window, `CONTEXT_WINDOW`; S is their summed e^s), averaged
  over the draws (`circuits.competitors`) -- not the share against the mean competitor, which lets
  a token that takes all attention when present but is rarely present (a frequent name, for a head
  that reads names) dim every key in every context -- with `s` the head's QK logit between the
  query's and the key's context embeddings (`circuits.context_view`: each token with the typical
  text before it, not alone at the start of a sequence), averaged over the offsets in
  `offsets` (rotary models: the token sits at each in turn, and the competitors at the window's
  other offsets, each scored at its own: a head that reads one distance meets there only the key);
* what the head then writes is the key's context embedding, normalized, through `diag(g) W_V W_O`.

A token's **evidence** is what its presence adds to u at the query: the model at the query's
position in a virtual context of the query, the token and typical filler (one competitor in five
drawn from the token's usual company, `TokenView.company`: ' flower' comes after "found a red";
the positions between the token and the query filled with the text the model's own chain puts
between them, `TokenView.placed_draw`: ' jack' five tokens before '.' comes with "found a red
ball"), minus the same context without the token (`circuits.virtual_context`: every layer, every
chain -- a layer-0 head feeding MLP 0 feeding MLP 1 -- computed from the weights), averaged over the
token sitting 1, 2, ..., 16 tokens before the query (`offsets`), each placement weighted by how
likely the model's own view of text puts the token there *where the target is decided*: before the
query followed by the target's tokens (`TokenView.offset_presence` with `then`, from the model after
two tokens, `circuits.pair_chain`: an object sits two tokens before the pronoun that follows its
sentence, while ' toys', after which "." is followed by "one day", does not; the '.' before ' she'
ends "lily was happy.", four tokens after the name, while the average '.' may end a sentence with
no name at all). One position at a time, seen by every head from there, as in a real
context: heads read at preferred distances and what a token does can depend on where it sits (a
name one token before a "." can say the next name is someone else), and letting each head see the
token at its own best offset at once mixed placements no context holds. It is split
into first-order **routes**: straight into the final residual through each head (the OV path), and
through each MLP where the token meets the query's own residual and itself
(`2 x_b^T Q x_q + x_b^T Q x_b`); "chains and norms" holds the rest (effects that pass through more
than one layer, and the norms' rescaling). Which head *carries* a token is measured the same exact
way: the evidence lost when that head cannot attend to it. Two tokens together also
**interact** inside a bilinear MLP: `2 x_s^T Q(u) x_t` for tokens brought by two routes -- a head
(`L1H2`), or a head and then an earlier MLP that turned the token into a feature at the query
(`L0H1>MLP0`: MLP 0's output with the token minus without) -- ranked over every pair of routes and
tokens without forming the token x token table (`circuits.paths`): the way a rule that needs *both*
words (a negation, an exclusive or) shows up. Units: logit difference.

A virtual context can hold any token, including ones the model never sees before the query (' mom'
right before ' night'); their evidence is what the model *would* do, not a circuit it uses. So every
token also gets a **plausibility** from the model's own view of text
(`TokenView.context_presence`: the chance it sits at one of `offsets` before the query followed by
the target, under the same chain), squashed to `c / (c + 1/n)` for n live tokens: near 1 for any token
more likely there than a random live token, near 0 for tokens that cannot be there. Tokens are
ranked by evidence x plausibility and pairs by interaction x both plausibilities ("what they
plausibly contribute"); the raw values stay in `total` and `PairEvidence.value`
(`context_prior=False` ranks by the raw values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .directions import logit_diff_direction, unembed_direction
from .attention import ov_matrices
from .competitors import CONTEXT_WINDOW, TYPICAL_COMPETITORS, expected_share, free_offsets
from .interaction import augment_input
from .mlp import check_bilinear, interaction_matrix, mlp_weights
from .paths import top_pair_entries
from .readout import Live, token_label
from .context_view import context_view
from .token_view import TokenView
from .virtual_context import expected_readout, norm_scale

DEFAULT_OFFSETS = tuple(range(1, 9))  # key_attention's best-offset search
TokenSet = Union[int, str, Sequence[Union[int, str]]]


@dataclass
class PairEvidence:
    """Two context tokens interacting inside the MLP of `layer`: `value` is what the pair adds to the
    target beyond what each adds alone (`2 x_s^T Q x_t`), with each token's route (the head that
    brings it, or "L0H1>MLP0": a head and then an earlier MLP)."""

    value: float
    token_s: str
    route_s: str
    token_t: str
    route_t: str
    layer: int
    score: float = float("nan")  # value x both tokens' plausibility: what pairs are ranked by

    @property
    def tokens(self) -> frozenset:
        return frozenset((self.token_s, self.token_t))


@dataclass
class TokenEvidence:
    """Per live token (`ids` [n]): `total` [n] evidence, split over `routes` (name -> [n]);
    `attention` ("L{l}H{h}" -> [n]) the expected attention from the query; `pairs` the strongest
    pair interactions, largest first."""

    target: str
    query: str
    query_id: int
    ids: Tensor
    labels: list[str]
    total: Tensor
    routes: dict[str, Tensor] = field(default_factory=dict)
    attention: dict[str, Tensor] = field(default_factory=dict)
    pairs: list[PairEvidence] = field(default_factory=list)
    carriers: dict[str, Tensor] = field(default_factory=dict)  # head -> [n]: evidence lost when it cannot see the token (NaN: not measured)
    plausibility: Optional[Tensor] = None  # [n], in (0, 1]

    def carrier(self, token: str) -> tuple[str, float]:
        """The head that carries most of a token's evidence (all its routes and chains), and how
        much of it is lost when that head cannot attend to the token."""
        i = self.labels.index(token)
        if not self.carriers or torch.isnan(next(iter(self.carriers.values()))[i]):
            raise ValueError(f"no carriers were measured for {token!r}: token_evidence measures them for its "
                             f"top tokens only (raise n_carriers)")
        name = max(self.carriers, key=lambda h: float(self.carriers[h][i]) * (1 if self.total[i] >= 0 else -1))
        return name, float(self.carriers[name][i])

    def top_tokens(self, k: int = 10, sign: int = 1, plausible: bool = True) -> list[tuple[str, float]]:
        """The k tokens with the largest (sign=+1) or most negative (sign=-1) evidence, ranked by
        evidence x plausibility (plausible=False: by evidence alone); returns raw evidence."""
        values = self.total * (1 if sign >= 0 else -1)
        if plausible and self.plausibility is not None:
            values = values * self.plausibility
        top = values.topk(min(k, values.numel()))
        return [(self.labels[int(i)], float(self.total[int(i)])) for i in top.indices]

    def _plausibility(self, token: str) -> float:
        return 1.0 if self.plausibility is None else float(self.plausibility[self.labels.index(token)])

    def breakdown(self, token: str, k: int = 3) -> list[tuple[str, float]]:
        """The k routes that carry most of one token's evidence."""
        i = self.labels.index(token)
        parts = sorted(((name, float(v[i])) for name, v in self.routes.items()), key=lambda r: -abs(r[1]))
        return parts[:k]

    def to_markdown(self, n: int = 8) -> str:
        """Tables of the top tokens (with their main routes) and the top pairs."""
        lines = [f"Query (the token the prediction follows): `{self.query!r}`.", "",
                 "Plausibility: how likely the token is among the tokens before the query, in the model's own "
                 "view of text (1: as likely as a random token or more; tokens are ranked by "
                 "evidence x plausibility).", "",
                 "| token | evidence | plausibility | carried by (evidence lost without it) | main first-order routes |",
                 "|---|---|---|---|---|"]
        for tok, value in self.top_tokens(n):
            routes = ", ".join(f"{name} {v:+.2f}" for name, v in self.breakdown(tok))
            try:
                head, lost = self.carrier(tok)
                carried = f"{head} ({lost:+.2f})"
            except ValueError:
                carried = "(not measured)"
            lines.append(f"| `{tok!r}` | {value:+.3f} | {self._plausibility(tok):.2f} | {carried} | {routes} |")
        if self.pairs:
            lines += ["", "| pair | interaction | x plausibilities (ranked by) | inside |", "|---|---|---|---|"]
            for p in self.pairs[:n]:
                lines.append(f"| `{p.token_s!r}` via {p.route_s} x `{p.token_t!r}` via {p.route_t} | "
                             f"{p.value:+.3f} | {p.score:+.3f} | MLP{p.layer} |")
        return "\n".join(lines)


def _token_ids(model: Any, tokens: TokenSet) -> list[int]:
    items = [tokens] if isinstance(tokens, (int, str)) else list(tokens)
    ids = [model.to_single_token(t) if isinstance(t, str) else int(t) for t in items]
    for t in ids:
        if not 0 <= t < model.cfg.d_vocab:
            raise ValueError(f"token id {t} is outside the vocabulary [0, {model.cfg.d_vocab})")
    return ids


@torch.no_grad()
def key_attention(model: Any, view: TokenView, layer: int, head: int, query_index: int,
                  offsets: Sequence[int] = DEFAULT_OFFSETS, competitors: float = TYPICAL_COMPETITORS,
                  average: bool = False, company: bool = True, window: Sequence[int] = CONTEXT_WINDOW) -> Tensor:
    """Expected attention of head `layer`.`head` from the query (`view.ids[query_index]`) to every
    live key token, against `competitors` typical tokens drawn by frequency at the other offsets of
    `window` (see the module docstring): [n]. The key sits at its best offset in `offsets` (rotary
    models), or with average=True at each offset in turn (the mean attention over them). company:
    each key brings its usual company into the draws (`circuits.competitors`)."""
    gain = getattr(model.blocks[layer].ln1, "w", None)
    X = view.normalized(layer)
    X = X * gain.detach() if gain is not None else X
    q = X[query_index:query_index + 1] @ model.W_Q[layer, head].detach()  # [1, d_head]
    k = X @ model.W_K[layer, head].detach()  # [n, d_head]
    offsets = [o for o in offsets if 0 <= o < model.cfg.n_ctx] or [0]
    window = [o for o in window if 0 < o < model.cfg.n_ctx] or [1]
    rotary = model.cfg.positional_embedding_type == "rotary"
    # Without rotary the scores do not depend on the offset: one position stands for all.
    positions = sorted(set(offsets) | set(window)) if rotary else [0]
    if rotary:
        rot = model.blocks[layer].attn.rotary
        k = rot(k[None, :, None], torch.zeros((1, k.shape[0]), dtype=torch.long, device=k.device))[0, :, 0]
        logits = torch.stack([
            (rot(q[None, :, None], torch.full((1, 1), o, dtype=torch.long, device=q.device))[0, :, 0] @ k.T)[0]
            for o in positions])  # [P, n]
    else:
        logits = q @ k.T  # [1, n]
    logits = logits.float() / model.cfg.d_head ** 0.5
    weight = (logits - logits.amax()).exp()  # [P, n]: one query, so one shift for every key and offset
    n, dev = weight.shape[1], weight.device
    at = {o: i for i, o in enumerate(positions)}
    pool = weight[[at[o] for o in window] if rotary else [0]]  # [O, n]
    tokens = view.each_token_draw().float() if company else view.frequency.float()
    if not rotary:
        place = torch.zeros(n, 1, dtype=torch.long, device=dev)
    elif average:
        place = torch.tensor([at[o] for o in offsets], device=dev).expand(n, -1)  # [n, len(offsets)]
    else:
        slot = torch.tensor([at[o] for o in offsets], device=dev)
        place = slot[weight[slot].argmax(0)][:, None]  # [n, 1]: each key's best offset
    keys = torch.arange(n, device=dev)
    shares = []
    for j in range(place.shape[1]):
        free = (free_offsets(window, torch.tensor(positions, device=dev)[place[:, j:j + 1]]) if rotary
                else torch.ones(n, 1, dtype=torch.bool, device=dev))
        shares.append(expected_share(weight[place[:, j], keys], pool, free, tokens, competitors))
    return torch.stack(shares).mean(0)


@torch.no_grad()
def token_evidence(model: Any, target: Any, query: Optional[Union[int, str]] = None, live: Live = None,
                   competitors: float = TYPICAL_COMPETITORS, offsets: Sequence[int] = CONTEXT_WINDOW, n_pairs: int = 10,
                   view: Optional[TokenView] = None, context_prior: bool = True, n_carriers: int = 16,
                   placed_by_target: bool = True) -> TokenEvidence:
    """Evidence of every live context token for `target`, from the weights alone (module docstring).

    target: a token (str or id) or set of tokens -> its (mean) logit; a pair (a, b) -> the logit
    difference a - b. query: the token the prediction follows (default: the live token after which
    the target's tokens are most likely). competitors: how many typical tokens each attended token
    competes with. view: a precomputed `context_view(model, live=live, competitors=competitors)` (reuse
    it across targets; a one-token `token_view` reads keys alone). n_carriers:
    which head carries a token is measured for this many top tokens of each sign (NaN for the rest;
    0: none, which saves a virtual readout per head). placed_by_target: placements and plausibility
    are those of the query followed by the target's tokens (with the view's pair chain; False:
    of the query wherever it sits)."""
    check_bilinear(model)
    if isinstance(target, tuple) and len(target) == 2:
        a, b = _token_ids(model, target[0]), _token_ids(model, target[1])
        u, class_ids = logit_diff_direction(model, a, b), a + b
        label = f"logit {[token_label(model, t) for t in a]} - {[token_label(model, t) for t in b]}"
    else:
        a = _token_ids(model, target)
        u, class_ids, label = unembed_direction(model, a), a, f"logit {[token_label(model, t) for t in a]}"
    view = context_view(model, live=live, competitors=competitors) if view is None else view
    if query is None:
        qi = int(view.log_probs[:, class_ids].logsumexp(-1).argmax())
    else:
        qi = view.index(_token_ids(model, query)[0])
    L, H, d_model = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model
    dtype = view.resid[0].dtype
    n = view.ids.numel()
    offsets = [o for o in offsets if 0 < o < model.cfg.n_ctx] or [1]
    # Placements of the query where the target is decided: the query followed by the target's tokens.
    then = torch.isin(view.ids, torch.tensor(class_ids, device=view.ids.device)).float() if placed_by_target else None
    if context_prior:
        presence = view.context_presence(qi, offsets, then)
        plausibility = (presence / (presence + 1.0 / n)).clamp_min(1e-6).to(dtype)
    else:
        plausibility = torch.ones(n, dtype=dtype, device=view.ids.device)
    u = u.to(dtype)
    final = norm_scale(model, view.resid[L][qi])
    routes: dict[str, Tensor] = {}
    attention: dict[str, Tensor] = {}
    head_vectors: dict[tuple[int, int], Tensor] = {}  # what head (l, h) writes when it attends to each key
    for l in range(L):
        ov = ov_matrices(model, l).to(dtype)
        X = view.normalized(l)
        for h in range(H):
            p = key_attention(model, view, l, h, qi, offsets, competitors, average=True).to(dtype)
            attention[f"L{l}H{h}"] = p
            head_vectors[l, h] = p[:, None] * (X @ ov[h])  # [n, d_model], attention included
            routes[f"L{l}H{h}"] = head_vectors[l, h] @ u / final
    first_order: list[tuple] = []  # (score, s, t, MLP layer, head bringing s, head bringing t)
    for l in range(L):
        Q = interaction_matrix(model, l, u).to(dtype)  # [d, d], d = d_model (+1 with biases)
        scale = view.ln2_scale[l][qi]
        x_q = view.resid[l][qi] / scale
        biased = Q.shape[0] == d_model + 1
        if biased:
            x_q = augment_input(x_q)
        Qxq = Q @ x_q
        for (hl, h), V in head_vectors.items():
            if hl > l:
                continue
            R = V / scale  # [n, d_model]
            Rq = Q[:d_model, :d_model] @ R.T  # [d_model, n]
            routes[f"MLP{l} query x L{hl}H{h}"] = 2 * (R @ Qxq[:d_model]) / final
            routes[f"MLP{l} L{hl}H{h} x itself"] = (R * Rq.T).sum(-1) / final
        # Routes into this MLP: each head of layers <= l bringing a token, and each earlier MLP
        # turning a token brought by a head of its own layer or below into a feature (a chain).
        carried = {f"L{hl}H{h}": V / scale for (hl, h), V in head_vectors.items() if hl <= l}
        for lm in range(l):
            w_m = mlp_weights(model, lm)
            x_m = (view.resid[lm][qi] / view.ln2_scale[lm][qi]).to(w_m.W_gate.dtype)
            base = w_m.forward(x_m[None])  # [1, d_model]
            for (hl, h), V in head_vectors.items():
                if hl <= lm:
                    moved = (x_m + (V / view.ln2_scale[lm][qi]).to(x_m.dtype))
                    carried[f"L{hl}H{h}>MLP{lm}"] = ((w_m.forward(moved) - base) / scale).to(dtype)
        names = list(carried)
        Q_tok = Q[:d_model, :d_model]
        for i, a in enumerate(names):
            for b in names[i:]:
                same = a == b
                top = top_pair_entries(carried[a] * plausibility[:, None], carried[b] * plausibility[:, None], Q=Q_tok,
                                       k=n_pairs + (0 if same else 1), same=same, diagonal=False, multiplicity=2.0, sign=1)
                first_order += [(v / float(final), s, t, l, a, b) for v, s, t in
                                zip(top.values.tolist(), top.rows.tolist(), top.cols.tolist()) if s != t]
    # The whole effect of each token (every layer and chain), in the virtual context.
    # Each token in the context it keeps (its company among the competitors), against that same
    # context without it; each placement weighted by how likely the model's own view of text puts
    # the token there.
    draw = view.placed_draw(qi, offsets, CONTEXT_WINDOW).to(dtype)  # [O, n, n]
    where = view.offset_presence(qi, offsets, then).to(dtype)  # [O, n]
    where = where / where.sum(0, keepdim=True).clamp_min(1e-30)
    rows = torch.cat([torch.arange(n, device=view.ids.device), torch.full((n,), -1, device=view.ids.device)])
    alone = expected_readout(model, view, qi, rows[:, None], u, competitors, offsets, draw=torch.cat([draw, draw], 1),
                             weights=torch.cat([where, where], 1))
    empty, single = alone[n:], alone[:n] - alone[n:]
    routes["chains and norms"] = single - torch.stack(list(routes.values())).sum(0)
    total = single
    # What each head carries: the evidence lost when it cannot attend to the token. Measured for the
    # tokens a reader sees (the top of both rankings): it costs a virtual readout per head and offset.
    ranked = total * plausibility
    k = min(n_carriers, n)
    measured = torch.cat([ranked.topk(k).indices, (-ranked).topk(k).indices]).unique()
    carriers = {}
    for l in range(L if measured.numel() else 0):
        for h in range(H):
            blind = expected_readout(model, view, qi, measured[:, None], u, competitors, offsets, blocked=(l, h),
                                     draw=draw[:, measured], weights=where[:, measured])
            carriers[f"L{l}H{h}"] = torch.full_like(single, float("nan")).index_put_(
                (measured,), single[measured] - (blind - empty[measured]))
    # Interactions: the bilinear pair terms, by score (each pair once, through its best heads).
    first_order.sort(key=lambda f: -f[0])
    pairs: list[PairEvidence] = []
    seen: set = set()
    for score, s_, t_, l, r_s, r_t in first_order:
        key = (min(s_, t_), max(s_, t_))
        if key in seen:
            continue
        seen.add(key)
        value = score / float(plausibility[s_] * plausibility[t_])
        pairs.append(PairEvidence(value, token_label(model, int(view.ids[s_])), r_s,
                                  token_label(model, int(view.ids[t_])), r_t, l, score=score))
        if len(pairs) == n_pairs:
            break
    labels = [token_label(model, int(t)) for t in view.ids]
    return TokenEvidence(target=label, query=labels[qi], query_id=int(view.ids[qi]), ids=view.ids, labels=labels,
                         total=total, routes=routes, attention=attention, pairs=pairs, carriers=carriers,
                         plausibility=plausibility)
