"""find_circuit on a tiny random model: a consistent graph, JSON round trip, table, drawing, clear errors."""

import pytest
import torch

from circuits.find import find_circuit, target_direction
from circuits.graph import CircuitGraph
from circuits.directions import head_directions, unembed_direction

from ..conftest import tiny_config


@pytest.fixture(scope="module")
def graph():
    from hooked_bilinear import HookedBilinearTransformer

    model = HookedBilinearTransformer(tiny_config(n_key_value_heads=2, seed=3)).eval()
    return model, find_circuit(model, 5, k_features=3, k_heads=2, max_nodes=20)


def test_graph_is_consistent(graph):
    model, g = graph
    g.validate()
    assert g.nodes[0].kind == "target" and g.nodes[0].layer == model.cfg.n_layers
    assert 1 < len(g.nodes) <= 20 and len(g.edges) >= len(g.nodes) - 1
    ids = [n.id for n in g.nodes]
    assert len(set(ids)) == len(ids)  # a component reached twice is one node
    kinds = {n.kind for n in g.nodes}
    assert "mlp_feature" in kinds and "head_ov" in kinds
    incoming = {}
    for e in g.edges:
        src, dst = g.node(e.source), g.node(e.target)
        assert e.weight > 0 and 0 < e.share <= 1
        incoming[e.source] = incoming.get(e.source, 0.0) + dst.importance * e.share
        # writers sit before their readers in the residual stream
        if src.kind == "mlp_feature":
            assert src.layer < dst.layer
            assert src.ov_head and len(src.tokens_positive) == 8 and src.path_pairs
        if src.kind == "head_ov":
            assert src.layer <= dst.layer if dst.kind == "mlp_feature" else src.layer < dst.layer
            # where the head looks: from the query (logit targets) or, without one, by offset and key
            assert src.qk.startswith(f"from '{g.meta['query']}' attends to") if g.meta["query"] else \
                src.qk.startswith(f"L{src.layer}H{src.head} attends to offset")
    for n in g.nodes[1:]:  # importance: the sum over its readers of (reader importance x share)
        assert n.importance == pytest.approx(incoming[n.id], rel=1e-6)
        assert n.importance >= g.meta["threshold"]
    # the target's own unembedding readout puts its token near the top
    assert "5" in [t for t, _ in g.nodes[0].tokens_positive[:3]]


def test_scores_are_contributions_of_real_tokens(graph):
    """Read at the query: a head scores max_s p(s) |ln1(E_s) W_OV d| (expected attention p from the
    query, effective embeddings E); the direct path |W_E[query] . d|; a feature |lambda| times its
    largest squared read, at least the query's own."""
    from circuits.evidence import key_attention
    from circuits.find import _ov_vectors
    from circuits.mlp import eigendecompose
    from circuits.token_view import token_view

    model, g = graph
    u = unembed_direction(model, 5)
    d = u / u.norm()
    view = token_view(model)
    q = [str(int(t)) for t in view.ids].index(g.meta["query"])  # no tokenizer: labels are ids
    checked = set()
    for e in g.edges:
        node = g.node(e.source)
        if e.target != "target":
            continue
        if node.kind == "head_ov":
            p = key_attention(model, view, node.layer, node.head, q)
            reads = view.normalized(node.layer) @ _ov_vectors(model, node.layer, d)[node.head]
            assert e.weight == pytest.approx(float((p * reads).abs().max()), rel=1e-4)
            checked.add("head")
        if node.kind == "embed":
            assert e.weight == pytest.approx(abs(float(model.W_E.detach()[view.ids[q]] @ d)), rel=1e-4)
            checked.add("embed")
        if node.kind == "mlp_feature":
            eig = eigendecompose(model, node.layer, d, k=node.index + 1)
            assert node.eigenvalue == pytest.approx(float(eig.values[node.index]), rel=1e-5)
            v = eig.vectors[:, node.index]
            x_q = view.resid[node.layer][q] / view.ln2_scale[node.layer][q]
            assert e.weight >= abs(node.eigenvalue) * float(x_q @ v) ** 2 * (1 - 1e-5)
            checked.add("mlp")
    assert {"head", "mlp"} <= checked


def test_dead_tokens_never_appear():
    from hooked_bilinear import HookedBilinearTransformer

    model = HookedBilinearTransformer(tiny_config(seed=3)).eval()
    counts = torch.zeros(48, dtype=torch.long)
    counts[10:30] = 3
    model.token_counts = counts
    g = find_circuit(model, 12, max_nodes=16, n_tokens=6)
    named = {t for n in g.nodes for t, _ in n.tokens_positive + n.tokens_negative + n.ov_tokens_positive + n.ov_tokens_negative}
    named |= {x for n in g.nodes for p, s, q, t, v in n.path_pairs for x in (s, t)}
    assert named and all(10 <= int(t) < 30 for t in named), named
    everything = find_circuit(model, 12, max_nodes=16, n_tokens=6, live="all")
    assert any(not 10 <= int(t) < 30 for n in everything.nodes for t, _ in n.tokens_positive)


def test_json_round_trip_table_and_drawing(graph, tmp_path):
    _, g = graph
    again = CircuitGraph.from_json(g.to_json(tmp_path / "c.json"))
    assert again == g
    assert CircuitGraph.from_json(tmp_path / "c.json") == g
    table = g.to_table()
    assert table.count("\n") == len(g.nodes) + 1 and "| target |" in table
    assert "target" in str(g)
    png = g.draw(tmp_path / "c.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    html = g.draw(tmp_path / "c.html").read_text()
    assert "data:image/png;base64" in html


def test_other_targets(graph):
    model, _ = graph
    g = find_circuit(model, (5, [6, 7]), layers=[0], max_nodes=10)
    assert all(n.layer in (0, None, model.cfg.n_layers) for n in g.nodes)
    head = find_circuit(model, (1, 2, "k"), max_nodes=10)
    assert head.nodes[0].layer == 1 and all(n.layer in (0, None) for n in head.nodes[1:])
    u, at, _ = target_direction(model, (1, 2, "k"))
    assert at == 1 and abs(float(u.norm()) - float(torch.linalg.matrix_norm(head_directions(model, 1, 2, "k"), 2))) < 1e-4
    assert target_direction(model, (1, 2, "q", 3))[0].equal(head_directions(model, 1, 2, "q")[3])
    vec = find_circuit(model, torch.randn(32), read_at=1, max_nodes=10)
    assert all(n.kind != "mlp_feature" or n.layer == 0 for n in vec.nodes)
    only_direct = find_circuit(model, (0, 1, "v"))  # layer 0 heads read the embeddings only
    assert [n.kind for n in only_direct.nodes] == ["target", "embed"]


@pytest.mark.parametrize("target, kwargs, message", [
    (10_000, {}, "outside the vocabulary"),
    (torch.randn(31), {}, "shape"),
    (torch.zeros(32), {}, "non-zero"),
    (torch.randn(32), {"read_at": 5}, "read_at"),
    (5, {"layers": [2]}, "out of range"),
    ((2, 0, "q"), {}, "out of range"),
    ((0, 9, "q"), {}, "head 9"),
    ((0, 0, "x"), {}, "kind"),
    ((0, 0, "q", 99), {}, "index"),
    (3.5, {}, "cannot use"),
    ("happy", {}, "tokenizer"),
    (5, {"k_features": 0}, "k_features"),
    (5, {"threshold": 1.5}, "threshold"),
])
def test_bad_targets_raise_clear_errors(graph, target, kwargs, message):
    model, _ = graph
    with pytest.raises(ValueError, match=message):
        find_circuit(model, target, **kwargs)


def test_unknown_token_with_tokenizer(tiny_model_with_tokenizer):
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        find_circuit(tiny_model_with_tokenizer, "zebra")
    with pytest.raises(ValueError, match="not one"):
        find_circuit(tiny_model_with_tokenizer, "happy sad")
    g = find_circuit(tiny_model_with_tokenizer, (" happy", "sad"), max_nodes=6)
    assert g.target == "logit 'happy' - 'sad'"


def test_a_block_of_directions_gives_one_graph_each(graph):
    """E.g. an output SAE's encoder rows: [n, d_model] -> n graphs, each equal to its row's own."""
    from circuits.directions import user_direction

    model, _ = graph
    block = user_direction(model, torch.randn(3, 32, generator=torch.Generator().manual_seed(4)))
    assert torch.allclose(block.norm(dim=-1), torch.ones(3))
    graphs = find_circuit(model, block, read_at=1, max_nodes=8)
    assert len(graphs) == 3
    assert graphs[1].to_dict() == find_circuit(model, block[1], read_at=1, max_nodes=8).to_dict()


def test_a_given_view_is_the_one_the_walk_reads(graph):
    from circuits.context_view import context_view
    from circuits.token_view import token_view

    model, g = graph
    same = find_circuit(model, 5, k_features=3, k_heads=2, max_nodes=20, view=token_view(model))
    assert [(n.id, round(n.importance, 6)) for n in same.nodes] == [(n.id, round(n.importance, 6)) for n in g.nodes]
    in_context = find_circuit(model, 5, k_features=3, k_heads=2, max_nodes=20, view=context_view(model))
    in_context.validate()
    assert [n.importance for n in in_context.nodes] != [n.importance for n in g.nodes]  # the view is used
    mask = torch.zeros(model.cfg.d_vocab, dtype=torch.bool)
    mask[:20] = True
    with pytest.raises(ValueError, match="other live tokens"):
        find_circuit(model, 5, live=mask, view=token_view(model))
