"""Joint refinement (HOOI) of read and write subspaces: the streamed VJP/JVP iteration
against a dense numpy HOOI on per-example Jacobians, exactness on low-rank linear blocks
(captured fraction 1, compression loss 0), the reduced channel map, and input errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import subspace_angles

from jaxinterp.channel.compression import compression_delta
from jaxinterp.channel.model import ChannelModel, trace
from jaxinterp.channel.refine import reduced_map, refine_channels, refined_compression
from jaxinterp.channel.stats import channel_stats
from jaxinterp.channel.subspaces import channels_from_stats, support_sqrt


class Mix(eqx.Module):
    """``tanh(A r W)`` (or linear): mixes positions and features."""

    a: jax.Array
    w: jax.Array
    linear: bool = eqx.field(static=True, default=False)

    def __call__(self, r):
        h = self.a @ r @ self.w
        return h if self.linear else jnp.tanh(h)


class Proj(eqx.Module):
    w: jax.Array

    def __call__(self, r):
        return r @ self.w


def _embed(x):
    return x


def _model(key, *, p=3, d=6, linear=False, rank=None):
    ks = jax.random.split(key, 6)
    blocks = []
    for i in range(2):
        w = jax.random.normal(ks[i], (d, d)) / np.sqrt(d)
        if rank is not None:
            w = w @ jnp.diag(jnp.arange(d) < rank).astype(w.dtype) @ jax.random.normal(
                ks[i + 2], (d, d)) / np.sqrt(d)
        a = jnp.eye(p) + 0.3 * jax.random.normal(ks[i + 4], (p, p))
        blocks.append(Mix(a, w, linear))
    un = Proj(jax.random.normal(jax.random.fold_in(key, 9), (d, 4)) / np.sqrt(d))
    return ChannelModel(_embed, tuple(blocks), un, names=("b1", "b2"), depths=(1, 2))


@pytest.fixture(scope="module")
def setup():
    with jax.enable_x64(True):
        cm = jax.tree_util.tree_map(
            lambda a: jnp.asarray(a, jnp.float64) if eqx.is_inexact_array(a) else a,
            _model(jax.random.key(0)))
        xs = jax.random.normal(jax.random.key(1), (60, 3, 6), jnp.float64)
        st = channel_stats(cm, xs)
    return cm, xs, st, channels_from_stats(st, cm.node_names)


def _dense_hooi(cm, xs, st, k, r_in, r_out, n_iter):
    """The same iteration on dense per-example Jacobians (numpy)."""
    e_in, s_in = support_sqrt(st.read_cov[k])
    e_out, s_out = support_sqrt(st.relevance[k])
    with jax.enable_x64(True):
        jt = []
        for x in xs:
            r = trace(cm, x).reads[k - 1]
            j = np.asarray(jax.jacfwd(cm.node_fn(k))(r))  # (P, d_out, P, d_in)
            jt.append(np.einsum("ok,poqi,il->pkql", e_out * s_out, j, e_in * s_in))
    jt = np.stack(jt)  # (n, P, k_out, P, k_in)

    def top(g, r):
        vals, vecs = np.linalg.eigh(g)
        return vals[::-1][:r], vecs[:, ::-1][:, :r]

    total = float(np.sum(jt**2)) / len(xs)
    g_in = np.einsum("npkqi,npkqj->ij", jt, jt) / len(xs)
    g_out = np.einsum("npkqi,nplqi->kl", jt, jt) / len(xs)
    out_first = jt.shape[2] * jt.shape[1] >= jt.shape[4] * jt.shape[3]  # P k_in <= P k_out
    fr = []
    if out_first:
        mu, w = top(g_out, r_out)
        fr.append(mu.sum() / total)
    else:
        lam, q = top(g_in, r_in)
        fr.append(lam.sum() / total)
    seq = ["q"] + ["w", "q"] * n_iter if out_first else ["w"] + ["q", "w"] * n_iter
    for side in seq:
        if side == "q":
            a = np.einsum("npkqi,kl->nplqi", jt, w @ w.T)
            lam, q = top(np.einsum("npkqi,npkqj->ij", a, jt) / len(xs), r_in)
            fr.append(lam.sum() / total)
        else:
            a = np.einsum("npkqi,ij->npkqj", jt, q @ q.T)
            mu, w = top(np.einsum("npkqi,nplqi->kl", a, jt) / len(xs), r_out)
            fr.append(mu.sum() / total)
    return total, np.array(fr), e_in @ q, e_out @ w


def test_refinement_matches_dense_hooi(setup):
    cm, xs, st, cs = setup
    ref = refine_channels(cm, xs, st, cs, ranks=[(2, 3), (3, 2)], n_iter=3, tol=0.0)
    assert ref.ranks == ((2, 3), (3, 2))
    for k, (ri, ro) in ((1, (2, 3)), (2, (3, 2))):
        node = ref.channels.nodes[k]
        total, fr, q_span, w_span = _dense_hooi(cm, xs, st, k, ri, ro, 3)
        np.testing.assert_allclose(ref.total[k - 1], total, rtol=1e-10)
        np.testing.assert_allclose(ref.captured[k - 1], fr, rtol=1e-9, atol=1e-12)
        assert np.all(np.diff(ref.captured[k - 1][1:]) >= -1e-12)  # HOOI never loses energy
        assert ref.captured[k - 1][-1] > ref.captured[k - 1][1]  # and gains some here
        sig, kbar = st.read_cov[k], st.relevance[k]
        e_in, s_in = support_sqrt(sig)
        e_out, s_out = support_sqrt(kbar)
        rho, om = node.read_covectors, node.write_vectors
        # whitened: Q = Sigma^{1/2} rho, W = K_bar^{1/2} omega span the dense HOOI's bases
        q = (e_in * s_in) @ (e_in.T @ rho)
        w = (e_out * s_out) @ (e_out.T @ om)
        assert np.max(subspace_angles(q, q_span)) < 1e-6
        assert np.max(subspace_angles(w, w_span)) < 1e-6
        np.testing.assert_allclose(rho.T @ sig @ rho, np.eye(ri), atol=1e-9)
        np.testing.assert_allclose(om.T @ kbar @ om, np.eye(ro), atol=1e-9)
        np.testing.assert_allclose(node.write_readout.T @ om, np.eye(ro), atol=1e-9)
        # the mode updated last carries the final captured energy
        last = [node.read_lambdas.sum(), node.write_mus.sum()]
        assert np.isclose(last, fr[-1] * ref.total[k - 1], rtol=1e-9).any()


def test_low_rank_linear_blocks_are_captured_exactly():
    with jax.enable_x64(True):
        cm = jax.tree_util.tree_map(
            lambda a: jnp.asarray(a, jnp.float64) if eqx.is_inexact_array(a) else a,
            _model(jax.random.key(2), p=1, linear=True, rank=2))
        xs = jax.random.normal(jax.random.key(3), (80, 1, 6), jnp.float64)
        st = channel_stats(cm, xs)
        cs = channels_from_stats(st, cm.node_names)
        ref = refine_channels(cm, xs, st, cs, ranks=[(2, 2), (2, 2)], n_iter=2)
        for c in ref.captured:
            assert c[-1] == pytest.approx(1.0, abs=1e-10)
        comp = refined_compression(cm, ref, xs)
        assert abs(comp["all"]) < 1e-18
        assert all(abs(v["delta"]) < 1e-18 for v in comp["blocks"].values())
        # one rank fewer loses output (the check can fail)
        short = refine_channels(cm, xs, st, cs, ranks=[(1, 1), (2, 2)], n_iter=2)
        assert refined_compression(cm, short, xs)["all"] > 1e-4
        # the separate (spec) channels at the same ranks are also exact for linear blocks
        assert abs(compression_delta(cm, cs, xs, [[(2, 2), (2, 2)]])[0]) < 1e-18
        # reduced map = (K_bar omega)^T J (Sigma rho); its energy is the captured one
        node = ref.channels.nodes[1]
        j = np.asarray(jax.jacfwd(cm.node_fn(1))(trace(cm, xs[0]).reads[0]))[0, :, 0, :]
        red = np.asarray(reduced_map(cm, ref, st, 1, xs[0]))
        want = (st.relevance[1] @ node.write_vectors).T @ j @ (st.read_cov[1] @ node.read_covectors)
        np.testing.assert_allclose(red[0, :, 0, :], want, atol=1e-12)
        energy = np.mean([np.sum(np.asarray(reduced_map(cm, ref, st, 1, x)) ** 2) for x in xs])
        np.testing.assert_allclose(energy, ref.captured[0][-1] * ref.total[0], rtol=1e-9)


def test_refinement_beats_separate_channels_on_compression(setup):
    """On this nonlinear fixture the jointly refined channels lose less output than the
    spec's separate read / write channels at the same ranks, and more iterations never
    lose captured energy."""
    cm, xs, st, cs = setup
    for r in (1, 2, 3):
        ranks = [(r, r), (r, r)]
        ref0 = refine_channels(cm, xs, st, cs, ranks=ranks, n_iter=0)
        ref = refine_channels(cm, xs, st, cs, ranks=ranks, n_iter=5)
        comp = refined_compression(cm, ref, xs)
        assert 0 < comp["all"] < compression_delta(cm, cs, xs, [ranks])[0]
        for c0, c in zip(ref0.captured, ref.captured, strict=True):
            assert c[-1] >= c0[-1] - 1e-12
        assert all(v["ranks"] == [r, r] for v in comp["blocks"].values())


@pytest.mark.parametrize("kwargs, match", [
    (dict(ranks=[(1, 1)]), "one \\(r_in, r_out\\) per block"),
    (dict(ranks=[(0, 1), (1, 1)]), "ranks\\[0\\].r_in"),
    (dict(n_iter=-1), "n_iter"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_refine_errors(setup, kwargs, match):
    cm, xs, st, cs = setup
    with pytest.raises(ValueError, match=match):
        refine_channels(cm, xs, st, cs, **kwargs)


def test_pipeline_reports_the_refinement(setup, getkey):
    from jaxinterp.channel.pipeline import ChannelGraphConfig, channel_graph

    cm, xs, _, _ = setup
    cfg = ChannelGraphConfig(refine=2, n_null=2, n_null_graphs=0, usage=False,
                             prune="roundoff", plots=False)
    res = channel_graph(cm, xs, cfg, key=getkey())
    rep = res.compression["refined"]
    assert set(rep["blocks"]) == {"b1", "b2"} and rep["n_iter"] == 2
    for k, name in enumerate(cm.names, start=1):
        e = rep["blocks"][name]
        assert e["ranks"] == [res.channels.rank_in(k), res.channels.rank_out(k)]
        assert list(res.refinement.ranks[k - 1]) == e["ranks"]
        assert e["captured"] >= e["captured_start"] - 1e-12
