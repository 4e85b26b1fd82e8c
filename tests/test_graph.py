"""The shared graph layer: construction checks, pruning, restriction, merging, networkx
and JSON export, Newman modularity, community detection and the plot."""

import json

import equinox as eqx
import jax
import networkx as nx
import numpy as np
import pytest

from jaxinterp import graph
from jaxinterp.graph import Graph, NodeLayer


def layer(name, m, constant=True, seed=0):
    imp = np.random.default_rng(seed).uniform(1, 2, m)
    return NodeLayer(
        name=name,
        importance=imp,
        index=tuple(range(m)),
        basis=np.eye(m + 1)[:, :m],
        basis_pinv=np.eye(m + 1)[:m],
        constant_index=0 if constant else None,
    )


def two_blocks(weights=(1.0, 1.0)):
    """Three layers: a constant node 0, then nodes {1, 2} (block A) and {3, 4} (block B);
    the output has nodes {0, 1} (A) and {2, 3} (B) and no constant."""
    la, lb, lc = layer("in", 5), layer("mid", 5, seed=1), layer("out", 4, False, seed=2)
    e0 = np.zeros((5, 5))
    e0[0, 0] = 9.0  # constant -> constant
    e0[1:3, 1:3] = weights[0]
    e0[3:5, 3:5] = weights[1]
    e0[1:, 0] = 5.0  # out of the constant node: free, excluded from clustering
    e1 = np.zeros((4, 5))
    e1[0:2, 1:3] = weights[0]
    e1[2:4, 3:5] = weights[1]
    e1[:, 0] = 5.0
    return Graph(layers=(la, lb, lc), edges=(e0, e1))


def test_graph_is_an_immutable_pytree_with_ids():
    g = two_blocks()
    assert g.names == ("in", "mid", "out")
    assert g.node_ids[:2] == ("in/0", "in/1") and len(g.node_ids) == 14
    assert g.locate("mid/3") == (1, 3)
    assert graph.parse_node_id(".layers[0].weight/12") == (".layers[0].weight", 12)
    leaves = jax.tree_util.tree_leaves(g)
    assert len(leaves) == 3 * 3 + 2  # importance, basis, pinv per layer; two edge arrays
    with pytest.raises(AttributeError):
        g.edges = ()  # type: ignore[misc]
    doubled = jax.tree_util.tree_map(lambda x: 2 * x, g)
    np.testing.assert_array_equal(doubled.edges[0], 2 * g.edges[0])


def test_graph_construction_errors():
    la, lb = layer("a", 3), layer("b", 2)
    with pytest.raises(
        ValueError,
        match=r"Graph: expected edges\[0\] of shape \(m_out, m_in\) "
        r"= \(2, 3\) \(b <- a\), got \(3, 2\)",
    ):
        Graph(layers=(la, lb), edges=(np.zeros((3, 2)),))
    with pytest.raises(
        ValueError,
        match=r"Graph: expected edges len\(layers\) - 1 = 1 "
        r"matrices, got 0",
    ):
        Graph(layers=(la, lb), edges=())
    with pytest.raises(
        ValueError,
        match=r"NodeLayer: expected importance of shape \(m,\) = "
        r"\(2,\) like index, got \(3,\)",
    ):
        NodeLayer(name="x", importance=np.ones(3), index=(0, 1))
    with pytest.raises(
        ValueError,
        match=r"parse_node_id: expected nid an id "
        r"'<layer>/<index>', got 'mid'",
    ):
        graph.parse_node_id("mid")
    with pytest.raises(ValueError, match=r"Graph.layer: expected name one of in, mid, out"):
        two_blocks().layer("nope")


def test_prune_by_threshold_and_top_k_keeps_constant_edges():
    g = two_blocks(weights=(1.0, 3.0))
    th = graph.prune(g, threshold=2.0)
    assert th.edges[0][1, 1] == 0.0 and th.edges[0][3, 3] == 3.0
    assert th.edges[0][2, 0] == 5.0  # out of the constant node: kept (free)
    top = graph.prune(g, top_k=[2, 4])
    for e, e_full, k in zip(top.edges, g.edges, (2, 4), strict=True):
        assert np.count_nonzero(e[:, 1:]) == k
        np.testing.assert_array_equal(e[:, 0], e_full[:, 0])
    assert np.all(top.edges[1][2:4, 3:5] == 3.0)  # the largest survive
    strict = graph.prune(g, threshold=6.0, keep_constant=False)
    assert np.count_nonzero(strict.edges[0]) == 1  # only the 9.0 constant->constant edge
    with pytest.raises(ValueError, match=r"prune: expected threshold or top_k at least one"):
        graph.prune(g)
    with pytest.raises(
        ValueError,
        match=r"prune: expected top_k a scalar or one value per "
        r"layer pair \(2\), got 3",
    ):
        graph.prune(g, top_k=[1, 2, 3])


def test_restrict_keeps_ids_and_slices_edges():
    g = two_blocks(weights=(1.0, 3.0))
    sub = graph.restrict(g, ["in/3", "in/4", "mid/0", "mid/4", "out/3"])
    assert sub.layer("in").ids == ("in/3", "in/4")
    assert sub.layer("mid").constant_index == 0 and sub.layer("in").constant_index is None
    np.testing.assert_array_equal(sub.edges[0], np.asarray(g.edges[0])[np.ix_([0, 4], [3, 4])])
    np.testing.assert_array_equal(sub.layer("mid").basis, np.asarray(g.layers[1].basis)[:, [0, 4]])
    same = graph.restrict(g, {"in": [3, 4], "mid": [0, 4], "out": [3]})
    jax.tree_util.tree_map(np.testing.assert_array_equal, sub, same)
    with pytest.raises(
        ValueError,
        match=r"restrict: expected nodes indices of layer 'out' "
        r"among \(0, 1, 2, 3\), got \[7\]",
    ):
        graph.restrict(g, ["out/7"])


def test_merge_rebuilds_the_chain():
    g = two_blocks()
    first = Graph(layers=g.layers[:2], edges=g.edges[:1])
    second = Graph(layers=g.layers[1:], edges=g.edges[1:])
    merged = graph.merge(first, second)
    assert eqx.tree_equal(merged, g, typematch=False) is not False
    jax.tree_util.tree_map(np.testing.assert_array_equal, merged, g)
    other = Graph(layers=(layer("in", 5), layer("x", 2)), edges=(np.ones((2, 5)),))
    with pytest.raises(
        ValueError,
        match=r"merge: expected first, second graphs whose layers "
        r"form one chain",
    ):
        graph.merge(g, other)
    bad = Graph(
        layers=(layer("mid", 5, seed=9), layer("out", 4, False, seed=2)), edges=(g.edges[1],)
    )
    with pytest.raises(ValueError, match=r"merge: expected layer 'mid' the same nodes"):
        graph.merge(first, bad)


def test_networkx_and_json_export_round_trip(tmp_path):
    g = two_blocks()
    d = graph.to_networkx(g)
    assert isinstance(d, nx.DiGraph) and d.number_of_nodes() == 14
    assert d.edges["in/1", "mid/2"]["weight"] == 1.0
    assert d.nodes["mid/0"]["constant"] and d.nodes["out/1"]["layer_index"] == 2
    assert d.number_of_edges() == sum(int(np.count_nonzero(e)) for e in g.edges)
    plain = graph.to_networkx(g, include_constant=False)
    assert "in/0" not in plain and plain.number_of_edges() == 16
    text = json.dumps(graph.to_json(g, include_basis=True))
    back = graph.from_json(json.loads(text))
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, g)
    assert back.layers[2].constant_index is None
    path = graph.save_json(tmp_path / "graph.json", g)
    lite = graph.load_json(path)
    assert lite.layers[0].basis is None and lite.node_ids == g.node_ids
    with pytest.raises(
        ValueError,
        match=r"from_json: expected data a dict with format "
        r"'jaxinterp.graph', got None",
    ):
        graph.from_json({"layers": []})


@pytest.mark.parametrize("w,expected", [((1.0, 1.0), 0.5), ((1.0, 3.0), 2 * 0.25 * 0.75)])
def test_modularity_of_two_disconnected_modules(w, expected):
    """Q = 2 f (1 - f) for two disconnected modules holding degree fractions f, 1 - f."""
    g = two_blocks(weights=w)
    u = graph.undirected(g, transform="raw")
    assert set(u.nodes) == set(g.node_ids) - {"in/0", "mid/0"}  # constants excluded
    blocks = [
        {"in/1", "in/2", "mid/1", "mid/2", "out/0", "out/1"},
        {"in/3", "in/4", "mid/3", "mid/4", "out/2", "out/3"},
    ]
    assert graph.modularity(u, blocks) == pytest.approx(expected, abs=1e-12)
    found = graph.detect_communities(g, transform="raw")
    assert sorted(map(set, found.communities), key=min) == blocks
    assert found.modularity == pytest.approx(expected, abs=1e-12)
    assert found.n_nonsingleton == 2 and found.spans == [3, 3] and found.n_isolated == 0
    assert found.inside_fraction == pytest.approx(1.0)


def layered(n_layers=3, width=8, modules=2, cross=0.0, seed=0):
    """A layered nx graph: ``modules`` chains of dense blocks between adjacent layers,
    plus ``cross`` weight on every cross-module pair."""
    rng = np.random.default_rng(seed)
    g = nx.Graph()
    per = width // modules
    for li in range(n_layers):
        for i in range(width):
            g.add_node(f"L{li}/{i}", layer_index=li)
    for li in range(n_layers - 1):
        for i in range(width):
            for j in range(width):
                w = 1.0 + rng.random() if i // per == j // per else cross
                if w > 0:
                    g.add_edge(f"L{li}/{i}", f"L{li + 1}/{j}", weight=w)
    return g


def test_null_modularity_keeps_layout_and_separates_structure():
    # dense topology, modular weights: both nulls see the structure
    g = layered(cross=0.05)
    q = graph.detect_communities(g).modularity
    for mode in ("edges", "pairs"):
        null = graph.community.null_modularity(g, n_graphs=10, mode=mode)
        assert len(null["values"]) == 10 and null["std"] > 0
        assert graph.community.null_z(q, null) > 5, mode
    # modular topology (two disconnected halves): the spec's null keeps it, "pairs" does not
    g = layered()
    q = graph.detect_communities(g).modularity
    assert q > 0.49
    kept = graph.community.null_modularity(g, n_graphs=5)
    assert abs(kept["mean"] - q) < 0.02
    assert graph.community.null_z(q, graph.community.null_modularity(g, mode="pairs")) > 5
    # i.i.d. weights on every pair of adjacent layers: exchangeable with its own null
    flat = layered(modules=1)
    qf = graph.detect_communities(flat, seeds=(0, 1, 2)).modularity
    assert abs(graph.community.null_z(qf, graph.community.null_modularity(flat))) < 4
    one = graph.community.null_modularity(g, n_graphs=1, seed=3)
    assert one == graph.community.null_modularity(g, n_graphs=1, seed=3)  # deterministic
    with pytest.raises(ValueError, match="null_modularity: expected n_graphs"):
        graph.community.null_modularity(g, n_graphs=0)
    with pytest.raises(ValueError, match="null_modularity: expected mode one of"):
        graph.community.null_modularity(g, mode="nodes")


def test_target_n_communities_finds_the_requested_count():
    g = layered(width=12, modules=3, cross=0.05)
    c = graph.community.target_n_communities(g, 3, n_gammas=3, seeds=(0,))
    assert c is not None and c.n_nonsingleton == 3 and sorted(c.sizes) == [12, 12, 12]
    assert graph.community.target_n_communities(g, 40, max_draws=5, seeds=(0,)) is None
    with pytest.raises(ValueError, match="target_n_communities: expected n"):
        graph.community.target_n_communities(g, 0)


def test_weight_transforms():
    g = two_blocks(weights=(1.0, 100.0))
    logw = graph.undirected(g)  # eps = smallest non-constant edge = 1
    assert logw.edges["in/3", "mid/3"]["weight"] == pytest.approx(2.0)
    assert not logw.has_edge("in/1", "mid/1")  # log10(1 / 1) = 0: a free edge
    sq = graph.undirected(g, transform="sqrt")
    assert sq.edges["in/3", "mid/3"]["weight"] == pytest.approx(10.0)
    ab = graph.undirected(g, transform="abs")
    assert ab.edges["in/1", "mid/1"]["weight"] == pytest.approx(1.0 / 404.0)
    custom = graph.undirected(g, eps=[0.1, 10.0])
    assert custom.edges["in/1", "mid/1"]["weight"] == pytest.approx(1.0)
    assert not custom.has_edge("mid/1", "out/0")
    with pytest.raises(
        ValueError,
        match=r"undirected: expected transform one of 'log_eps', "
        r"'sqrt', 'abs', 'raw', got 'log'",
    ):
        graph.undirected(g, transform="log")
    with pytest.raises(
        ValueError,
        match=r"detect_communities: expected resolution a "
        r"positive number, got 0",
    ):
        graph.detect_communities(g, resolution=0)


def test_plot_graph_writes_a_png(tmp_path):
    g = two_blocks(weights=(1.0, 3.0))
    comms = graph.detect_communities(g).communities
    path = graph.plot_graph(
        g,
        tmp_path / "graph.png",
        title="two blocks",
        communities=comms,
        max_nodes=3,
        include_constant=True,
    )
    assert path.exists() and path.stat().st_size > 1000
    with pytest.raises(ValueError, match=r"plot_graph: expected max_nodes a positive integer"):
        graph.plot_graph(g, tmp_path / "x.png", max_nodes=0)
