"""LIB edges (float64, forward mode) against dense Jacobians, the linear-section and
completeness identities, and the block-MLP ground truth (no cross-block edges, two
communities)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import graph, lib
from jaxinterp.models.block_mlp import BlockMLP
from jaxinterp.models.digits import DigitsMLP


def product_design(key, n, width=8):
    """Every pair (block-0 draw, block-1 draw): the empirical distribution is exactly a
    product, so cross-block covariances vanish to round-off at every layer."""
    k0, k1 = jax.random.split(key)
    half = width // 2
    a, b = jax.random.normal(k0, (n, half)), jax.random.normal(k1, (n, half))
    return jnp.concatenate([jnp.repeat(a, n, 0), jnp.tile(b, (n, 1))], axis=1)


@pytest.fixture(scope="module")
def mlp():
    """The model and data of test_lib_basis (same shapes: compiled code is reused)."""
    model = DigitsMLP((6, 5, 5, 3), key=jax.random.key(3))
    xs = jax.random.normal(jax.random.key(4), (160, 6)) + 0.3
    s = lib.mlp_sections(model)
    ib = lib.interaction_basis(s, xs, chunk_size=64, cotangent_chunk_size=2)
    return s, xs, ib, lib.interaction_edges(s, ib, xs)


def test_squared_edges_match_dense_jacobian(mlp):
    s, xs, ib, squared = mlp
    edges = lib.interaction_edges(s, ib, xs, chunk_size=48, tangent_chunk_size=2)
    with jax.enable_x64(True):
        acts = lib.collect_activations(s, xs, dtype=jnp.float64)
        for layer, e in enumerate(edges):
            xh = acts[layer] @ jnp.asarray(ib[layer].C)
            jac = jax.vmap(jax.jacrev(lib.edges.module_hat(s, ib, layer)))(xh)
            a = jnp.einsum("btisj,bsj->btij", jac, xh)  # sum over input positions first
            dense = np.asarray(jnp.einsum("btij->ij", a**2)) / xh.shape[0]
            assert e.shape == (ib[layer + 1].size, ib[layer].size)
            np.testing.assert_allclose(e, dense, rtol=1e-10, atol=1e-13 * dense.max())
            np.testing.assert_allclose(squared[layer], e, rtol=1e-12, atol=1e-14 * e.max())
            assert np.all(e >= 0)


def test_stochastic_edges_with_one_output_position_equal_squared(mlp, getkey):
    """Spec 6.9."""
    s, xs, ib, sq = mlp
    st = lib.interaction_edges(s, ib, xs, kind="stochastic", n_sources=1, key=getkey())
    for a, b in zip(sq, st, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14 * a.max())


def test_functional_edges_are_complete_for_the_one_minus_alpha_squared_basis(mlp):
    """Spec 6.7: sum_i E_ij = Lambda_j when basis and edges share the rule. Lambda is
    |diag(V^T R^+ Lambda' R V)| and a direction's signed attribution can be negative,
    so the identity holds for |sum_i E_ij|."""
    s, xs, _, _ = mlp
    rule, n = "gauss_legendre", 3
    ib = lib.interaction_basis(s, xs, basis="(1-alpha)^2", rule=rule, n_intervals=n)
    edges = lib.interaction_edges(s, ib, xs, kind="functional", rule=rule, n_intervals=n)
    for layer, e in enumerate(edges):
        lam = ib[layer].lambdas
        np.testing.assert_allclose(np.abs(e.sum(0)), lam, rtol=1e-8, atol=1e-10 * lam.max())
    assert any(np.any(e < 0) for e in edges)  # functional edges can be negative


def test_linear_sections_give_diagonal_edges_summing_to_lambda(getkey):
    """Spec 6.4 on block-mlp with identity activation: J_hat is a signed permutation, so
    off-diagonal edges are round-off and sum_i E_ij = Lambda_j (squared edges into a
    linear layer sum to Lambda)."""
    model = BlockMLP(activation="identity", bias=0.5, key=getkey())
    xs = product_design(getkey(), 24) * jnp.linspace(0.5, 2.0, 8)[None, :]
    s = lib.mlp_sections(model)
    ib = lib.interaction_basis(s, xs)
    edges = lib.interaction_edges(s, ib, xs)
    for layer, e in enumerate(edges[:-1]):  # the output layer is not rotated
        assert e.shape[0] == e.shape[1]
        off = e - np.diag(np.diag(e))
        assert np.abs(off).max() <= 1e-10 * e.max()
        np.testing.assert_allclose(e.sum(0), ib[layer].lambdas, rtol=1e-8)
    np.testing.assert_allclose(edges[-1].sum(0), ib[-2].lambdas, rtol=1e-8)


@pytest.fixture(scope="module")
def block():
    model = BlockMLP(key=jax.random.key(7))
    xs = product_design(jax.random.key(8), 24)
    s = lib.mlp_sections(model)
    ib = lib.interaction_basis(s, xs)
    edges = lib.interaction_edges(s, ib, xs)
    return model, ib, edges


def block_of(b, j):
    """0 / 1: the block a direction lives in; -1: the constant direction."""
    if b.constant and j == 0:
        return -1
    return int(np.linalg.norm(b.C[4:8, j]) > np.linalg.norm(b.C[:4, j]))


def test_block_mlp_has_no_cross_block_directions_or_edges(block):
    _, ib, edges = block
    for b in ib.layers[:-1]:
        c = b.C[:8, 1:]
        off = np.minimum(np.linalg.norm(c[:4], axis=0), np.linalg.norm(c[4:], axis=0))
        assert off.max() <= 1e-10 * np.abs(c).max()
    cross = total = 0.0
    for layer, e in enumerate(edges):
        bi = np.asarray([block_of(ib[layer + 1], i) for i in range(e.shape[0])])
        bj = np.asarray([block_of(ib[layer], j) for j in range(e.shape[1])])
        mask = (bi[:, None] != bj[None, :]) & (bi[:, None] >= 0) & (bj[None, :] >= 0)
        cross, total = cross + e[mask].sum(), total + e.sum()
    assert cross <= 1e-12 * total


def test_block_mlp_communities_are_the_blocks(block, tmp_path):
    _, ib, edges = block
    g = lib.assemble_graph(ib, edges)
    found = graph.detect_communities(g, resolution=0.5)
    u = graph.undirected(g)
    truth = [set(), set()]  # directions with Lambda ~ 0 have no edges: singletons
    for b in ib.layers:
        for j in range(b.size):
            nid = graph.node_id(b.name, j)
            if block_of(b, j) >= 0 and u.degree(nid) > 0:
                truth[block_of(b, j)].add(nid)
    modules = [set(c) for c in found.communities if len(c) > 1]
    assert found.n_nonsingleton == 2 and found.n_isolated == len(u) - len(truth[0] | truth[1])
    assert sorted(modules, key=min) == sorted(truth, key=min)
    assert found.spans[:2] == [6, 6]
    assert found.inside_fraction == pytest.approx(1.0, abs=1e-12)
    f = u.subgraph(truth[0]).size(weight="weight") / u.size(weight="weight")
    q1 = graph.modularity(u, found.communities)  # two disconnected modules: Q = 2 f (1 - f)
    assert q1 == pytest.approx(2 * f * (1 - f), abs=1e-12) and q1 >= 0.45
    assert graph.plot_graph(g, tmp_path / "g.png", communities=found.communities).exists()


def test_edge_errors(mlp, getkey):
    s, xs, ib, _ = mlp
    with pytest.raises(
        ValueError,
        match=r"interaction_edges: expected kind one of "
        r"'squared', 'stochastic', 'functional', got 'abs'",
    ):
        lib.interaction_edges(s, ib, xs, kind="abs")
    with pytest.raises(ValueError, match=r"layer_edges: expected key a PRNG key"):
        lib.interaction_edges(s, ib, xs, kind="stochastic")
    other = lib.mlp_sections(DigitsMLP((6, 5, 3), key=getkey()))
    with pytest.raises(
        ValueError,
        match=r"interaction_edges: expected ib bases of the node "
        r"layers",
    ):
        lib.interaction_edges(other, ib, xs)
    with pytest.raises(ValueError, match=r"assemble_graph: expected edges 3 matrices, got 1"):
        lib.assemble_graph(ib, [np.zeros((1, 1))])
