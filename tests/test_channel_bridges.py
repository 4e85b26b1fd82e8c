"""The section-7 bridge: K-FAC factors against dense per-example Jacobians, captured
fractions against direct evaluation, and the spans on constructed cases."""

import jax
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.channel import bridges
from jaxinterp.models.tms import TMS


@pytest.fixture(scope="module")
def tms():
    model = TMS(5, 2, key=jax.random.key(0))
    t = ji.target.from_equinox(model)
    xs = jax.random.uniform(jax.random.key(1), (40, 5)) * (
        jax.random.uniform(jax.random.key(2), (40, 5)) < 0.3)
    return model, t, xs


def test_layer_kfac_equals_dense_jacobians(tms):
    model, t, xs = tms
    got = bridges.layer_kfac(t.apply, t.params, xs, [".W_enc"], chunk_size=16)
    assert set(got) == {".W_enc", ".W_enc:T"}
    w = np.asarray(model.W_enc, np.float64)
    b = np.asarray(model.b, np.float64)
    x = np.asarray(xs, np.float64)
    # encoder: h = x W, y = relu(h W^T + b): dy/dh = diag(relu') W
    a_enc = x.T @ x / len(x)
    g_enc = np.zeros((2, 2))
    g_dec = np.zeros((5, 5))
    for xi in x:
        pre = (xi @ w) @ w.T + b
        d = (pre > 0).astype(float)
        j = d[:, None] * w  # (5, 2): dy/dh
        g_enc += j.T @ j
        g_dec += np.diag(d)  # decoder output h' = h W^T; dy/dh' = diag(relu')
    h = x @ w
    np.testing.assert_allclose(got[".W_enc"][0], a_enc, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got[".W_enc"][1], g_enc / len(x), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got[".W_enc:T"][0], h.T @ h / len(x), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got[".W_enc:T"][1], g_dec / len(x), rtol=1e-10, atol=1e-12)


def test_captured_fraction_direct():
    rng = np.random.default_rng(0)
    V, U = rng.normal(size=(6, 4)), rng.normal(size=(4, 3))  # noqa: N806
    p_in = np.linalg.qr(rng.normal(size=(6, 2)))[0]
    p_out = np.linalg.qr(rng.normal(size=(3, 2)))[0]
    cf = bridges.captured_fraction(V, U, p_in, p_out)
    kept, tot = [], []
    for c in range(4):
        piece = np.outer(V[:, c], U[c])
        proj = p_in @ p_in.T @ piece @ p_out @ p_out.T
        kept.append(np.sum(proj**2))
        tot.append(np.sum(piece**2))
        assert cf["per_component"][c] == pytest.approx(kept[-1] / tot[-1], rel=1e-12)
    assert cf["total"] == pytest.approx(sum(kept) / sum(tot), rel=1e-12)
    # inside the span: 1; orthogonal to it: 0
    full = bridges.captured_fraction(p_in[:, :1], p_out[:, :1].T, p_in, p_out)
    assert full["total"] == pytest.approx(1.0, abs=1e-12)
    perp = np.linalg.qr(np.concatenate([p_in, rng.normal(size=(6, 1))], axis=1))[0][:, 2:]
    none = bridges.captured_fraction(perp, p_out[:, :1].T, p_in, p_out)
    assert none["total"] == pytest.approx(0.0, abs=1e-12)


def test_top_span_and_bad_input():
    m = np.diag([10.0, 5.0, 1e-6])
    assert bridges.top_span(m, 0.99).shape == (3, 2)
    assert bridges.top_span(m, 1.0).shape[1] == 3
    with pytest.raises(ValueError, match="eta"):
        bridges.top_span(m, 0.0)
    with pytest.raises(ValueError, match="V, U"):
        bridges.captured_fraction(np.ones((3, 2)), np.ones((3, 2)), np.eye(3), np.eye(2))
    with pytest.raises(ValueError, match="p_in, p_out"):
        bridges.captured_fraction(np.ones((3, 2)), np.ones((2, 4)), np.eye(2), np.eye(4))


def test_bridge_report_on_tms(tms):
    """With the weight itself as one piece: the ``read`` span holds all of it (``M = W G
    W^T`` spans W's column space); a piece along a feature the data never use is not in
    the ``kfac`` input span."""
    model, t, xs = tms
    xs = xs.at[:, 4].set(0.0)  # feature 4 never active: e_4 outside span(A)
    w = np.asarray(model.W_enc, np.float64)
    V = np.concatenate([w, np.eye(5)[:, 4:]], axis=1)  # noqa: N806  (5, 3)
    U = np.concatenate([np.eye(2), w[4:]], axis=0)  # noqa: N806  (3, 2)
    rep = bridges.bridge_report(t.apply, t.params, xs, {".W_enc": (V, U)}, eta=1.0)
    r = rep[".W_enc"]
    assert r["rank_out"] == 2 and r["read"]["rank_in"] == 2 and r["kfac"]["rank_in"] == 4
    assert r["read"]["weight"] == pytest.approx(1.0, abs=1e-10)
    assert r["kfac"]["per_component"][2] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        bridges.bridge_report(t.apply, t.params, xs, {".W_nope": (V, U)})
    # precomputed statistics give the same report; a smaller eta keeps fewer directions
    stats = bridges.layer_kfac(t.apply, t.params, xs, [".W_enc"])
    again = bridges.bridge_report(t.apply, t.params, None, {".W_enc": (V, U)}, eta=1.0,
                                  stats=stats)[".W_enc"]
    np.testing.assert_allclose(again["kfac"]["per_component"], r["kfac"]["per_component"],
                               rtol=1e-12, atol=1e-14)
    low = bridges.bridge_report(t.apply, t.params, None, {".W_enc": (V, U)}, eta=0.5,
                                stats=stats)[".W_enc"]
    assert low["kfac"]["rank_in"] < r["kfac"]["rank_in"]
    assert low["kfac"]["total"] < r["kfac"]["total"]


def test_lib_bridge_reproduces_the_lib_basis():
    """Spec section 7, LIB: with the next layer's LIB metric as S, every non-degenerate
    read channel of an MLP block is LIB's direction of that node layer (|cos| >= 0.999
    required; float64 gives round-off) with the same Lambda; a constant input coordinate
    (outside the data's support) does not disturb it."""
    from jaxinterp.models.digits import DigitsMLP

    model = DigitsMLP((6, 12, 9, 4), key=jax.random.key(3))
    xs = jax.random.normal(jax.random.key(4), (300, 6)).at[:, 5].set(0.5)
    rep = bridges.lib_bridge(model, xs, chunk_size=100)
    assert list(rep) == [".layers[0].weight", ".layers[1].weight", ".layers[2].weight"]
    for name, r in rep.items():
        assert r["n_compared"] >= 3, name
        assert r["min_abs_cos"] > 1 - 1e-9, name
        assert r["max_lambda_rel_diff"] < 1e-7, name
    assert rep[".layers[0].weight"]["n_lib"] == 5  # the constant pixel carries nothing
    with pytest.raises(ValueError, match="factors"):
        from jaxinterp.channel.adapters import block_mlp_model
        from jaxinterp.channel.stats import channel_stats

        channel_stats(block_mlp_model(model), xs, metric="fixed", factors=(None,))
    with pytest.raises(ValueError, match="factors"):
        channel_stats(block_mlp_model(model), xs, metric="iso", factors=(None,) * 5)
    with pytest.raises(ValueError, match=r"factors\[1\]"):
        channel_stats(block_mlp_model(model), xs, metric="fixed",
                      factors=(None, np.eye(3), None, None, None))
