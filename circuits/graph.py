"""The circuit graph that `circuits.find.find_circuit` returns: components and how much each feeds another.

Nodes are components of the model, each tied to one residual-stream direction:

* ``target``       the direction being explained (a logit, a logit difference, a head's read-in, a vector);
* ``mlp_feature``  an eigenvector v_i of an MLP's interaction matrix Q(u) for its parent's direction u
                   (``eigenvalue`` = lambda_i: the MLP writes ``lambda_i (v_i . x)^2`` along u);
* ``head_ov``      an attention head's OV path into its parent's direction (the head writes
                   ``x . (W_V W_O u)`` for each attended position's normalized residual x);
* ``embed``        the direct path: token embeddings read straight along the parent's direction.

An edge ``source -> target`` says the source component writes into the target's input direction;
``weight`` is its weight-derived contribution (see `circuits.find`: the largest contribution of one
live token through one path with attention 1, so weights of all kinds are comparable), ``share`` its
fraction of all candidate contributions into that target. A node's ``importance`` is the sum over
its edges of (reader's importance x share); 1 for the target. A component reached from two readers
is one node with two edges, so the graph is a DAG, not a tree.

Everything is plain data (floats, strings, token lists), so it round-trips through JSON exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

KINDS = ("target", "mlp_feature", "head_ov", "embed")
Tokens = list[tuple[str, float]]


@dataclass
class CircuitNode:
    """One component. ``layer`` is the model layer (for ``target``: where its direction is read,
    n_layers meaning the final residual); ``head``/``index`` identify a head or an eigenvector."""

    id: str
    kind: str
    layer: Optional[int] = None
    head: Optional[int] = None
    index: Optional[int] = None  # eigenvector index (by |lambda|, 0 = largest)
    eigenvalue: Optional[float] = None
    score: float = 0.0  # contribution to the parent's direction (the incoming edge's weight)
    importance: float = 1.0
    label: str = ""
    tokens_positive: Tokens = field(default_factory=list)  # token readout, highest scores first
    tokens_negative: Tokens = field(default_factory=list)  # lowest scores first
    readout: str = ""  # what the token lists read: "direct", "ov L0H2", "unembed", ...
    ov_head: Optional[str] = None  # mlp_feature only: the head with the strongest OV readout
    ov_tokens_positive: Tokens = field(default_factory=list)
    ov_tokens_negative: Tokens = field(default_factory=list)
    # mlp_feature only: best path pairs (path p, token via p, path q, token via q, contribution)
    path_pairs: list = field(default_factory=list)
    qk: str = ""  # head_ov only: where the head attends (offset, preferred key tokens), from its QK weights

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"node kind must be one of {KINDS}, got {self.kind!r}")
        self.tokens_positive = [(str(t), float(s)) for t, s in self.tokens_positive]
        self.tokens_negative = [(str(t), float(s)) for t, s in self.tokens_negative]
        self.ov_tokens_positive = [(str(t), float(s)) for t, s in self.ov_tokens_positive]
        self.ov_tokens_negative = [(str(t), float(s)) for t, s in self.ov_tokens_negative]
        self.path_pairs = [(str(p), str(s), str(q), str(t), float(v)) for p, s, q, t, v in self.path_pairs]

    def top_token_strings(self, n: int = 5, ov: bool = False) -> list[str]:
        return [t for t, _ in (self.ov_tokens_positive if ov else self.tokens_positive)[:n]]


@dataclass
class CircuitEdge:
    """``source`` writes into ``target``'s input direction with weight ``weight`` (>= 0)."""

    source: str
    target: str
    weight: float
    share: float


@dataclass
class CircuitGraph:
    """Nodes (the first is the target) and edges pointing from writers to readers."""

    target: str  # description of what was explained
    nodes: list[CircuitNode] = field(default_factory=list)
    edges: list[CircuitEdge] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    # --- access -------------------------------------------------------------------------------
    def node(self, node_id: str) -> CircuitNode:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(f"no node {node_id!r} in this circuit")

    def children(self, node_id: str) -> list[CircuitNode]:
        """Nodes writing into `node_id`, by weight (largest first)."""
        ids = [e.source for e in sorted(self.edges, key=lambda e: -e.weight) if e.target == node_id]
        return [self.node(i) for i in ids]

    def by_kind(self, kind: str) -> list[CircuitNode]:
        """Nodes of one kind, most important first."""
        return sorted((n for n in self.nodes if n.kind == kind), key=lambda n: -n.importance)

    def validate(self) -> None:
        """Raise ValueError unless ids are unique, edges join existing nodes, and every node but the
        target has exactly one incoming reader."""
        ids = [n.id for n in self.nodes]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate node ids")
        if not self.nodes or self.nodes[0].kind != "target":
            raise ValueError("the first node must be the target")
        known = set(ids)
        for e in self.edges:
            if e.source not in known or e.target not in known:
                raise ValueError(f"edge {e.source} -> {e.target} names an unknown node")
        sources = {e.source for e in self.edges}
        if sources != set(ids[1:]):
            raise ValueError("every non-target node must write into at least one reader, and the target into none")
        pairs = [(e.source, e.target) for e in self.edges]
        if len(set(pairs)) != len(pairs):
            raise ValueError("duplicate edges")

    # --- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "meta": self.meta,
                "nodes": [asdict(n) for n in self.nodes], "edges": [asdict(e) for e in self.edges]}

    def to_json(self, path: Union[str, Path, None] = None, indent: int = 1) -> str:
        """The graph as JSON text (also written to `path` when given)."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CircuitGraph":
        nodes = [CircuitNode(**n) for n in data["nodes"]]
        edges = [CircuitEdge(**e) for e in data["edges"]]
        return cls(target=data["target"], nodes=nodes, edges=edges, meta=dict(data.get("meta", {})))

    @classmethod
    def from_json(cls, text_or_path: Union[str, Path]) -> "CircuitGraph":
        """Inverse of `to_json`: JSON text, or a path to a file holding it."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))

    # --- text ---------------------------------------------------------------------------------
    def to_table(self, markdown: bool = True, n_tokens: int = 5) -> str:
        """One row per node, in walk order: id, kind, layer, head, eigenvalue, weight into its
        reader, importance, top tokens (and the best OV readout for MLP features), the best path pair
        of MLP features and where heads attend."""
        parent: dict[str, str] = {}
        for e in self.edges:
            parent[e.source] = f"{parent[e.source]}, {e.target}" if e.source in parent else e.target
        weight: dict[str, float] = {}
        for e in self.edges:
            weight[e.source] = max(e.weight, weight.get(e.source, 0.0))
        header = ["node", "kind", "layer", "head", "eigenvalue", "writes into", "weight", "importance",
                  "top tokens (+)", "top tokens (-)", "path pair / attends to"]
        rows = []
        for n in self.nodes:
            fmt = lambda ts: ", ".join(repr(t) for t, _ in ts[:n_tokens])
            pos, neg = fmt(n.tokens_positive), fmt(n.tokens_negative)
            if n.readout and n.readout != "direct":
                pos = f"[{n.readout}] {pos}" if pos else ""
            if n.ov_head and n.ov_tokens_positive:
                pos += f"; [ov {n.ov_head}] {fmt(n.ov_tokens_positive)}"
            extra = n.qk
            if n.path_pairs:
                p, s, q, t, v = n.path_pairs[0]
                extra = f"{s!r} via {p} x {t!r} via {q}: {v:+.3g}"
            rows.append([
                n.id, n.kind, "" if n.layer is None else str(n.layer), "" if n.head is None else str(n.head),
                "" if n.eigenvalue is None else f"{n.eigenvalue:+.4g}", parent.get(n.id, ""),
                f"{weight.get(n.id, n.score):.4g}", f"{n.importance:.3f}", pos, neg, extra,
            ])
        if markdown:
            esc = lambda s: s.replace("|", "\\|")
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
            return "\n".join(lines)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        return "\n".join([f"circuit for {self.target}", line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])

    def __str__(self) -> str:
        return self.to_table(markdown=False)

    # --- drawing ------------------------------------------------------------------------------
    def _positions(self) -> dict[str, tuple[float, float]]:
        """x: residual-stream depth (embed left, target right); y: spread within a depth."""
        def depth(n: CircuitNode) -> float:
            if n.kind == "embed":
                return 0.0
            if n.kind == "head_ov":
                return 2.0 * n.layer + 1.0
            if n.kind == "mlp_feature":
                return 2.0 * n.layer + 2.0
            return 2.0 * (n.layer or 0) + 3.0  # target: after everything it reads
        columns: dict[float, list[CircuitNode]] = {}
        for n in self.nodes:
            columns.setdefault(depth(n), []).append(n)
        parent = {e.source: e.target for e in self.edges}
        pos: dict[str, tuple[float, float]] = {}
        for x in sorted(columns, reverse=True):  # readers first, so writers line up next to them
            col = sorted(columns[x], key=lambda n: (-pos.get(parent.get(n.id, ""), (0, 0))[1], -n.importance))
            for i, n in enumerate(col):
                pos[n.id] = (x, (len(col) - 1) / 2.0 - i)
        return pos

    def draw(self, path: Union[str, Path], n_tokens: int = 3, title: Optional[str] = None) -> Path:
        """Draw the graph to a PNG (or any format matplotlib knows from the suffix; ``.html`` writes
        a self-contained page with the picture and the table). Edge width ~ share; returns the path."""
        path = Path(path)
        if path.suffix == ".html":
            return self._draw_html(path, n_tokens)
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        pos = self._positions()
        colors = {"target": "#d62728", "mlp_feature": "#1f77b4", "head_ov": "#2ca02c", "embed": "#7f7f7f"}
        xs = [p[0] for p in pos.values()]
        height = max(len([1 for p in pos.values() if p[0] == x]) for x in set(xs))
        fig, ax = plt.subplots(figsize=(3.2 * (len(set(xs)) + 1), 1.3 * height + 2))
        for e in self.edges:
            (x0, y0), (x1, y1) = pos[e.source], pos[e.target]
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                        arrowprops=dict(arrowstyle="-|>", lw=0.5 + 5 * e.share, color="#555555", alpha=0.7,
                                        shrinkA=18, shrinkB=18))
        for n in self.nodes:
            x, y = pos[n.id]
            text = n.id if n.eigenvalue is None else f"{n.id}\nλ={n.eigenvalue:+.3g}"
            toks = ", ".join(repr(t) for t, _ in n.tokens_positive[:n_tokens])
            if toks:
                text += f"\n{toks}"
            ax.text(x, y, text, ha="center", va="center", fontsize=7,
                    bbox=dict(boxstyle="round", fc="white", ec=colors[n.kind], lw=1.5))
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        names = {"target": "target direction", "mlp_feature": "MLP feature (eigenvector of Q)",
                 "head_ov": "attention head (OV path)", "embed": "token embeddings (direct)"}
        handles = [Patch(facecolor="white", edgecolor=colors[k], lw=1.5, label=names[k]) for k in KINDS]
        handles += [Line2D([], [], color="#555555", lw=0.5 + 5 * s, label=f"edge: share {s:g} of its reader")
                    for s in (0.1, 0.5, 1.0)]
        ax.legend(handles=handles, loc="lower left", fontsize=7, frameon=False, bbox_to_anchor=(0, -0.02))
        ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
        ax.set_ylim(-height / 2 - 0.5, height / 2 + 0.5)
        ax.axis("off")
        ax.set_title(title or f"circuit for {self.target}", fontsize=10)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def _draw_html(self, path: Path, n_tokens: int) -> Path:
        import base64
        import html
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            png = self.draw(Path(tmp) / "graph.png", n_tokens=n_tokens)
            data = base64.b64encode(png.read_bytes()).decode()
        page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(self.target)}</title>"
                f"<h1>circuit for {html.escape(self.target)}</h1><img src='data:image/png;base64,{data}'>"
                f"<pre>{html.escape(self.to_table(markdown=False))}</pre>")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page)
        return path
