"""Channel graph: statistics, channels and edges against dense / finite-difference
references, the randomised solver, the graph's JSON round trip and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import subspace_angles

from jaxinterp.channel import assemble as asm
from jaxinterp.channel.adapters import channel_model_for
from jaxinterp.channel.edges import causal_edges
from jaxinterp.channel.model import ChannelModel, trace
from jaxinterp.channel.pipeline import ChannelGraphConfig
from jaxinterp.channel.randomized import randomized_read_channels
from jaxinterp.channel.stats import channel_stats
from jaxinterp.channel.subspaces import channels_from_stats
from jaxinterp.channel.usage import usage_matrix
from jaxinterp.models.block_mlp import BlockMLP
from jaxinterp.models.planted import PlantedChannels, product_design

STDS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


@pytest.fixture(scope="module")
def planted():
    m = PlantedChannels(20, 6, activation="tanh", key=jax.random.key(3))
    with jax.enable_x64(True):
        cm = channel_model_for("planted-channels", m)
        xs = product_design(jax.random.key(4), STDS, 8)
        st = channel_stats(cm, xs)
    return m, cm, xs, st


@pytest.fixture(scope="module")
def mlp():
    m = BlockMLP(8, 3, key=jax.random.key(5))
    with jax.enable_x64(True):
        cm = channel_model_for("block-mlp", m)
        xs = jax.random.normal(jax.random.key(6), (200, 8), jnp.float64)
        st = channel_stats(cm, xs)
    return m, cm, xs, st


def _dense_stats(cm: ChannelModel, xs, k: int):
    """M_k and K_bar_k from dense per-example Jacobians (regression: F_y = I)."""
    n = cm.n_blocks
    ms, ks = [], []
    for x in xs:
        tr = trace(cm, x)
        zeros = tuple(jnp.zeros_like(w) for w in (*tr.writes, tr.y))
        def y_of(dk, zeros=zeros, x=x):
            d = list(zeros)
            d[k] = dk
            return trace(cm, x, deltas=tuple(d)).y.ravel()
        phi = jax.jacfwd(y_of)(zeros[k]).reshape(tr.y.size, -1)  # (out, P*d)
        r = tr.reads[k - 1]
        j = jax.jacfwd(lambda rr: cm.node_fn(k)(rr).ravel())(r).reshape(-1, r.size)
        kk = phi.T @ phi
        ms.append(j.T @ kk @ j)
        ks.append(kk)
    del n
    return np.mean(ms, 0), np.mean(ks, 0)


def test_stats_match_dense_jacobians(planted):
    _, cm, xs, st = planted
    with jax.enable_x64(True):
        for k in (1, 3, cm.n_blocks + 1):
            m_dense, k_dense = _dense_stats(cm, xs, k)
            tol_m, tol_k = 1e-10 * np.abs(m_dense).max(), 1e-10 * np.abs(k_dense).max()
            np.testing.assert_allclose(st.sensitivity[k], m_dense, atol=tol_m)
            np.testing.assert_allclose(st.relevance[k], k_dense, atol=tol_k)
            r = np.stack([np.asarray(trace(cm, x).reads[k - 1][0]) for x in xs])
            np.testing.assert_allclose(st.read_cov[k], np.cov(r.T, bias=True), atol=1e-12)


def test_channels_match_dense_eigendecomposition(mlp):
    _, cm, xs, st = mlp
    cs = channels_from_stats(st, cm.node_names)
    for k in (1, 2):
        sig, m = st.read_cov[k], st.sensitivity[k]
        w, e = np.linalg.eigh(sig)
        half = e @ np.diag(np.sqrt(np.maximum(w, 0))) @ e.T
        lam, q = np.linalg.eigh(half @ m @ half)
        lam, q = lam[::-1], q[:, ::-1]
        c = cs.nodes[k]
        np.testing.assert_allclose(c.read_lambdas, lam, rtol=1e-8, atol=1e-10 * lam[0])
        rho_dense = np.linalg.solve(half, q)  # (Sigma^{1/2})^{-1} q, the spec's covectors
        keep = lam > 1e-6 * lam[0]
        a, b = rho_dense[:, keep], c.read_covectors[:, keep]
        cos = np.abs(np.sum(a * b, 0)) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))
        np.testing.assert_allclose(cos, 1.0, atol=1e-8)
        with jax.enable_x64(True):
            r = np.asarray(jax.vmap(lambda x, k=k: trace(cm, x).reads[k - 1][0])(xs))
        z = (r - c.read_mean) @ c.read_covectors
        np.testing.assert_allclose(np.var(z, axis=0)[keep], 1.0, atol=1e-8)


def test_write_channels_reconstruct_writes(planted):
    _, cm, xs, st = planted
    cs = channels_from_stats(st, cm.node_names)
    with jax.enable_x64(True):
        o = np.stack([np.asarray(trace(cm, x).writes[2][0]) for x in xs])
    c = cs.nodes[2]
    coef = (o - c.write_mean) @ c.write_readout
    np.testing.assert_allclose(coef @ c.write_vectors.T, o - c.write_mean, atol=1e-10)
    np.testing.assert_allclose(np.var(coef, 0), c.write_mus, atol=1e-9 * c.write_mus[0])


def test_randomized_solver_matches_dense(mlp, getkey):
    _, cm, xs, st = mlp
    cs = channels_from_stats(st, cm.node_names)
    rnd = randomized_read_channels(cm, xs, st, cs, rank=4, oversample=4, n_iter=3, key=getkey())
    for k in (1, 2, 3):
        a, b = cs.nodes[k], rnd.nodes[k]
        np.testing.assert_allclose(b.read_lambdas[:3], a.read_lambdas[:3], rtol=1e-6)
        assert subspace_angles(a.read_covectors[:, :3], b.read_covectors[:, :3]).max() < 1e-5


def test_random_probes_are_unbiased(mlp, getkey):
    _, cm, xs, st = mlp
    sr = channel_stats(cm, xs, probes="random", n_probes=64, key=getkey())
    for k in (1, 3):
        err = np.linalg.norm(sr.sensitivity[k] - st.sensitivity[k])
        rel = err / np.linalg.norm(st.sensitivity[k])
        assert rel < 0.1


def test_causal_edges_match_finite_differences(planted, getkey):
    _, cm, xs, st = planted
    cs = channels_from_stats(st, cm.node_names)
    ce = causal_edges(cm, cs, xs, metric="iso", n_null=2, key=getkey())
    a, b = 1, 3  # A1 -> A2
    eps = 1e-6
    num = den = a_num = a_den = 0.0
    e4 = np.zeros_like(ce.channel[(a, b)])
    ca, cb = cs.nodes[a], cs.nodes[b]
    ra, rb = cs.graph_rank(a), cs.graph_rank(b)
    with jax.enable_x64(True):
        f = cm.node_fn(b)
        for x in xs:
            tr = trace(cm, x)
            r = tr.reads[b - 1]
            t = tr.writes[a] - ca.write_mean[None]

            def fd(t, r=r):
                return (f(r + eps * t) - f(r - eps * t)) / (2 * eps)

            num += float(jnp.sum(fd(t) ** 2))
            den += float(jnp.sum(fd(r - cb.read_mean[None]) ** 2))
            # the ablation edge: a's write removed from b's read, and b's read at its mean
            a_num += float(jnp.sum((f(r) - f(r - t)) ** 2))
            a_den += float(jnp.sum((f(r) - f(jnp.broadcast_to(cb.read_mean, r.shape))) ** 2))
            c = np.asarray(t @ ca.write_readout[:, :ra])
            for j in range(ra):
                g = fd(c[:, j:j + 1] * ca.write_vectors[None, :, j])
                e4[:, j] += np.sum(np.asarray(g @ cb.write_readout[:, :rb]) ** 2, 0)
    np.testing.assert_allclose(ce.w[(a, b)], num / den, rtol=1e-6)
    np.testing.assert_allclose(ce.ablation[(a, b)], a_num / a_den, rtol=1e-8)
    np.testing.assert_allclose(ce.channel[(a, b)], e4 / len(xs), rtol=1e-5, atol=1e-9 * e4.max())
    assert ce.w[(1, 2)] < 1e-20 * ce.w[(a, b)]  # A1 -> B1 is not planted


def test_graph_json_roundtrip(planted, tmp_path, getkey):
    _, cm, xs, st = planted
    cs = channels_from_stats(st, cm.node_names)
    ce = causal_edges(cm, cs, xs, n_null=3, key=getkey())
    cg = asm.assemble(cm, cs, ce, prune="null")
    back = asm.load_json(asm.save_json(tmp_path / "g.json", cg))
    assert back.pairs == cg.pairs and back.names == cg.names
    for e1, e2 in zip(cg.edges, back.edges, strict=True):
        np.testing.assert_array_equal(e1, e2)
    for l1, l2 in zip(cg.layers, back.layers, strict=True):
        np.testing.assert_array_equal(l1.basis, l2.basis)
        np.testing.assert_array_equal(l1.importance, l2.importance)
    assert back.thresholds == cg.thresholds and back.block_weights == cg.block_weights
    with pytest.raises(ValueError, match="a chain of consecutive layers"):
        asm.as_graph(cg)


def test_sequential_graph_is_a_shared_graph(mlp, getkey):
    _, cm, xs, st = mlp
    cs = channels_from_stats(st, cm.node_names)
    ce = causal_edges(cm, cs, xs, n_null=2, key=getkey())
    g = asm.as_graph(asm.assemble(cm, cs, ce, prune="roundoff"))
    assert g.names == cm.node_names and len(g.edges) == cm.n_blocks + 1


def test_position_activity_without_positions_is_activity(planted, getkey):
    from jaxinterp.channel.assemble import assemble
    from jaxinterp.channel.usage import activity, position_activity

    _, cm, xs, st = planted
    cs = channels_from_stats(st, cm.node_names)
    ce = causal_edges(cm, cs, xs, n_null=2, key=getkey())
    cg = assemble(cm, cs, ce, prune="roundoff")
    means = [c.write_mean for c in cs.nodes]
    key = getkey()
    full = activity(cm, cg, xs, means, key=key)
    per, ids = position_activity(cm, cg, xs, means, key=key)
    assert per.shape == (xs.shape[0], 1, len(ids)) and ids == list(cg.node_ids[: len(ids)])
    np.testing.assert_allclose(per[:, 0], full[:, : len(ids)], rtol=1e-12, atol=1e-300)


def test_usage_matrix_smallest_covering_set():
    act = np.array([[5.0, 3.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    u = usage_matrix(act, 0.75)
    np.testing.assert_array_equal(u, [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]])


@pytest.mark.parametrize("kwargs,match", [
    ({"metric": "fisher"}, "metric"), ({"eta": 0.0}, "eta"), ({"prune": "all"}, "prune"),
    ({"n_null": 0}, "n_null"), ({"attention": "frozen"}, "attention"),
    ({"node_rank": "all"}, "node_rank"), ({"refine": -1}, "refine"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChannelGraphConfig(**kwargs)


def test_model_and_input_errors(planted):
    _, cm, xs, _ = planted
    with pytest.raises(ValueError, match="names"):
        ChannelModel(embed=cm.embed, blocks=cm.blocks, unembed=cm.unembed,
                     names=("a", "a", "b", "c"), depths=(0, 1, 2, 3))
    with pytest.raises(ValueError, match="depths"):
        ChannelModel(embed=cm.embed, blocks=cm.blocks, unembed=cm.unembed,
                     names=cm.names, depths=(0, 2, 1, 3))
    with pytest.raises(ValueError, match="key"):
        channel_stats(cm, xs, probes="random")
    with pytest.raises(ValueError, match="frac"):
        usage_matrix(np.ones((2, 2)), 0.0)
    with pytest.raises(ValueError, match="channel cut"):
        channel_model_for("modadd", None)


def test_direction_edges_reuse_lib_and_equal_e4(mlp, planted, getkey):
    """LIB's edge code on channel coordinates: the gradient-rule squared edges are E4 (one
    position here); an integrated-gradient rule gives different, finite, non-negative
    edges; residual models are refused."""
    from jaxinterp.channel.direction import direction_edges

    m = mlp[0]
    # non-zero biases: a unit whose inputs are all dead and whose bias is 0 sits exactly on
    # its ReLU kink, where the round-off of o_bar + c omega^T picks a side (module doc)
    m = jax.tree_util.tree_map(
        lambda a: a + 0.05 if hasattr(a, "ndim") and a.ndim == 1 else a, m)
    xs = mlp[2]
    with jax.enable_x64(True):
        cm = channel_model_for("block-mlp", m)
        cs = channels_from_stats(channel_stats(cm, xs), cm.node_names)
    ce = causal_edges(cm, cs, xs, n_null=2, key=getkey())
    de = direction_edges(cm, cs, xs)
    assert set(de) == set(ce.channel)
    for pair, e in de.items():
        np.testing.assert_allclose(e, ce.channel[pair], rtol=1e-9, atol=1e-12 * e.max())
    ig = direction_edges(cm, cs, xs, rule="gauss_legendre", n_intervals=4)
    e, g = ig[(1, 2)], de[(1, 2)]
    assert e.shape == g.shape and np.all(np.isfinite(e)) and np.all(e >= 0)
    assert not np.allclose(e, g, rtol=1e-3)  # ReLU blocks: the rules differ
    with pytest.raises(ValueError, match="direction_edges: expected model a sequential"):
        direction_edges(planted[1], channels_from_stats(planted[3], planted[1].node_names),
                        planted[2])
