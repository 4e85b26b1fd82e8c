"""LIB node layers and sections: cutting models, folded biases, collecting activations
without touching the model, statistics, PCA and quadrature rules."""

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp import lib
from jaxinterp.lib import quadrature as quad
from jaxinterp.lib import sections as sec
from jaxinterp.lib import stats
from jaxinterp.models.block_mlp import BlockMLP
from jaxinterp.models.digits import DigitsMLP
from jaxinterp.models.modadd import tokens_of

FIXTURE = Path(ji.__file__).parent / "fixtures" / "modadd-seed0"


def small_mlp(key, widths=(6, 5, 5, 3)):
    return DigitsMLP(widths, key=key)


@pytest.mark.parametrize("kind", ["block", "digits"])
def test_mlp_sections_reproduce_model_and_cache(getkey, kind):
    model = BlockMLP(key=getkey()) if kind == "block" else small_mlp(getkey())
    d_in = model.layers[0].weight.shape[0]
    xs = jax.random.normal(getkey(), (7, d_in))
    s = lib.mlp_sections(model)
    assert s.names == (*(f".layers[{i}].weight" for i in range(len(model.layers))), "output")
    acts = lib.collect_activations(s, xs)
    np.testing.assert_allclose(acts[-1][:, 0], jax.vmap(model)(xs), rtol=1e-6, atol=1e-6)
    cache = sec.cached_inputs(model, xs, s.names[:-1])
    for name, a in zip(s.names[:-1], acts[:-1], strict=False):
        np.testing.assert_array_equal(a[:, 0, -1], 1.0)  # the folded constant
        np.testing.assert_allclose(a[:, 0, :-1], cache[name], rtol=1e-6, atol=1e-6)


def test_node_layer_subset_runs_skipped_layers_in_pre_and_sections(getkey):
    model = small_mlp(getkey(), (6, 5, 4, 4, 3))
    xs = jax.random.normal(getkey(), (5, 6))
    s = lib.mlp_sections(model, [".layers[1].weight", ".layers[3].weight"])
    assert s.shapes(xs[0]) == [(1, 6), (1, 5), (1, 3)]
    acts = lib.collect_activations(s, xs, chunk_size=2)
    cache = sec.cached_inputs(model, xs, [".layers[1].weight", ".layers[3].weight"])
    # float32 by two routes (the section folds the bias into its matmul as a constant
    # coordinate), so entries near 0 need the absolute tolerance the other checks use: on
    # an AMD EPYC host one entry of 0.029 differed by 3e-8 (relative 1.03e-6)
    np.testing.assert_allclose(acts[0][:, 0, :-1], cache[".layers[1].weight"], rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(acts[1][:, 0, :-1], cache[".layers[3].weight"], rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(acts[2][:, 0], jax.vmap(model)(xs), rtol=1e-6, atol=1e-6)


def test_folded_bias_makes_sections_positively_homogeneous(getkey):
    """Biases scale with the constant coordinate: S(alpha f) = alpha S(f) for ReLU."""
    model = small_mlp(getkey())
    s = lib.mlp_sections(model)
    f = s.input_layer(jax.random.normal(getkey(), (6,)))
    for layer in range(len(s.sections)):
        fn = s.section_fn(layer)
        np.testing.assert_allclose(fn(0.3 * f), 0.3 * fn(f), rtol=1e-5, atol=1e-6)
        f = fn(f)


def test_positionwise_section_folds_biases_by_keypath(getkey):
    model = small_mlp(getkey())
    layer = model.layers[0]
    dense = sec.DenseSection((layer.weight,), (layer.bias,), ("relu",))
    pw = sec.PositionwiseSection(
        apply=lambda p, h: jax.nn.relu(h @ p.weight + p.bias),
        params=layer,
        bias=".bias",
        activation="relu",
    )
    h, c = jax.random.normal(getkey(), (3, 6)), jnp.asarray([1.0, 0.5, 0.0])
    for a, b in zip(dense(h, c), pw(h, c), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_collect_does_not_mutate_the_model(getkey):
    model = small_mlp(getkey())
    before = jax.tree_util.tree_map(np.array, eqx.filter(model, eqx.is_array))
    lib.collect_activations(lib.mlp_sections(model), jnp.ones((2, 6)))
    after = eqx.filter(model, eqx.is_array)
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)


def test_modadd_sections_match_the_fixture_model():
    model, cfg, target = ji.load_target(FIXTURE)
    pairs = jnp.asarray([[3, 5], [100, 7], [0, 112], [56, 56]])
    toks = tokens_of(pairs, cfg.p)
    s = lib.modadd_sections(model)
    assert s.names == ("resid_pre", "resid_mid", "resid_post", "output")
    acts = lib.collect_activations(s, toks)
    assert [a.shape[1:] for a in acts] == [(3, 129), (1, 129), (1, 129), (1, 114)]
    cache = sec.cached_inputs(model, toks, [".blocks[0].attn.W_Q", ".blocks[0].mlp.W_in", ".W_U"])
    np.testing.assert_allclose(acts[0][..., :-1], cache[".blocks[0].attn.W_Q"], atol=1e-6)
    np.testing.assert_allclose(
        acts[1][:, 0, :-1], cache[".blocks[0].mlp.W_in"][:, -1], rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(acts[2][:, 0, :-1], cache[".W_U"][:, -1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(acts[3][:, 0], jax.vmap(model)(toks)[:, -1], rtol=1e-4, atol=1e-3)


def test_section_errors_name_argument_expected_and_actual(getkey):
    model = small_mlp(getkey())
    with pytest.raises(
        ValueError,
        match=r"mlp_sections: expected node_layers .*got "
        r"'.layers\[9\].weight'",
    ):
        lib.mlp_sections(model, [".layers[9].weight"])
    with pytest.raises(ValueError, match=r"expected node_layers .*forward order.*got"):
        lib.mlp_sections(model, [".layers[1].weight", ".layers[0].weight"])
    with pytest.raises(
        ValueError,
        match=r"Sectioned: expected names of length "
        r"len\(sections\) \+ 1 = 2, got 3",
    ):
        sec.Sectioned(
            pre=lambda x: x[None],
            sections=(sec.DenseSection((jnp.ones((2, 2)),), (jnp.ones(2),), ("relu",)),),
            names=("a", "b", "c"),
        )
    with pytest.raises(
        ValueError,
        match=r"DenseSection: expected weights\[1\] with "
        r"d_in = 3, got \(4, 2\)",
    ):
        sec.DenseSection(
            (jnp.ones((2, 3)), jnp.ones((4, 2))), (jnp.ones(3), jnp.ones(2)), ("relu", "relu")
        )
    with pytest.raises(
        ValueError,
        match=r"expected activations\[0\] one of 'relu', "
        r"'identity', got 'gelu'",
    ):
        sec.DenseSection((jnp.ones((2, 2)),), (jnp.ones(2),), ("gelu",))
    with pytest.raises(ValueError, match=r"collect_activations: expected xs a batch"):
        lib.collect_activations(lib.mlp_sections(model), jnp.asarray(1.0))
    with pytest.raises(
        ValueError,
        match=r"cached_inputs: expected names cached weight "
        r"keypaths .*got '.nope'",
    ):
        sec.cached_inputs(model, jnp.ones((2, 6)), [".nope"])
    with pytest.raises(ValueError, match=r"sections_for: expected model a ModAddTransformer"):
        lib.sections_for(object())


# --- statistics and PCA --------------------------------------------------------------


def folded(x):
    return np.concatenate([x, np.ones((*x.shape[:-1], 1))], axis=-1)


def test_layer_stats_centring_matrix_and_pca(getkey):
    rng = np.random.default_rng(0)
    h = rng.normal(size=(300, 2, 4)) @ rng.normal(size=(4, 4)) + rng.normal(size=4)
    h[..., 3] = h[..., 0] - h[..., 1]  # rank-deficient: one null direction
    f = folded(h)
    st = stats.layer_stats(f)
    flat = f.reshape(-1, 5)
    assert st.mean[-1] == 1.0 and st.count == 600
    mu_dash = np.r_[flat[:, :4].mean(0), 0.0]
    np.testing.assert_allclose(flat @ st.centering, flat - mu_dash, atol=1e-12)
    np.testing.assert_allclose(st.centering @ st.centering_inv, np.eye(5), atol=1e-15)
    np.testing.assert_allclose(
        st.gram, (flat - mu_dash).T @ (flat - mu_dash) / 600, rtol=1e-12, atol=1e-14
    )
    p = stats.pca(st, tau=1e-10)  # the spec's absolute 1e-15 sits at round-off here
    assert p.constant and p.U.shape == (5, 4)  # the null direction is dropped
    np.testing.assert_array_equal(p.U[:, 0], np.eye(5)[-1])
    assert p.D[0] == 1.0 and np.all(np.diff(p.D[1:]) <= 0)
    np.testing.assert_allclose(p.U.T @ p.U, np.eye(4), atol=1e-12)
    big = np.argmax(np.abs(p.U), axis=0)
    assert np.all(p.U[big, np.arange(4)] > 0)  # deterministic signs
    np.testing.assert_allclose(p.W_pinv @ p.W, np.eye(4), atol=1e-12)
    white = flat @ p.R
    np.testing.assert_allclose(white.T @ white / 600, np.eye(4), atol=1e-10)
    unc = stats.pca(stats.layer_stats(f, center=False), tau_relative=1e-10)
    assert not unc.constant and unc.U.shape == (5, 4)


def test_stats_errors():
    f = folded(np.ones((4, 1, 2)))
    with pytest.raises(
        ValueError,
        match=r"layer_stats: expected acts\[..., -1\] the folded "
        r"constant 1 everywhere, got values in \[2.0, 2.0\]",
    ):
        stats.layer_stats(2 * f)
    with pytest.raises(ValueError, match=r"layer_stats: expected acts of rank 3, got shape"):
        stats.layer_stats(f[:, 0])
    with pytest.raises(ValueError, match=r"expected center False for a layer without"):
        stats.layer_stats(f, has_constant=False)
    with pytest.raises(FloatingPointError, match=r"layer_stats: acts is not finite"):
        stats.layer_stats(f * np.asarray([np.nan, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"pca: expected tau a non-negative threshold, got -1"):
        stats.pca(stats.layer_stats(f), tau=-1)


def test_quadrature_rules():
    g = quad.gradient()
    assert g.is_gradient and g.alphas.tolist() == [1.0]
    for rule in (quad.trapezoidal, quad.gauss_legendre):
        q0 = rule(0)
        assert q0.alphas.tolist() == [0.5] and q0.weights.tolist() == [1.0]
    t = quad.trapezoidal(4)
    eps = 1e-3 / 5
    np.testing.assert_allclose(t.alphas, np.linspace(eps, 1 - eps, 5))
    np.testing.assert_allclose(t.weights, [0.125, 0.25, 0.25, 0.25, 0.125])
    for n in (1, 3, 6):
        x, w = np.polynomial.legendre.leggauss(n + 1)
        gl = quad.gauss_legendre(n)
        np.testing.assert_allclose(gl.alphas, (x + 1) / 2)
        np.testing.assert_allclose(gl.weights, w / 2)
    exact = np.e - 1.0  # int_0^1 exp

    def err(q):
        return abs(np.sum(q.weights * np.exp(q.alphas)) - exact)

    trap = [err(quad.trapezoidal(n)) for n in (2, 4, 8, 16)]
    gauss = [err(quad.gauss_legendre(n)) for n in (1, 2, 3, 4)]
    assert all(a > b for a, b in zip(trap, trap[1:], strict=False))
    assert all(a > b for a, b in zip(gauss[:-1], gauss[1:-1], strict=False))
    assert gauss[3] < 1e-10 < trap[-1]
    with pytest.raises(
        ValueError,
        match=r"quadrature: expected rule one of 'gradient', "
        r"'trapezoidal', 'gauss_legendre', got 'simpson'",
    ):
        quad.quadrature("simpson")
    with pytest.raises(ValueError, match=r"gauss_legendre: expected n a non-negative integer"):
        quad.gauss_legendre(-1)
