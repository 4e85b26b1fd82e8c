"""Section-level shortcuts of the LIB build (float64) against the generic paths: features
in a next-layer basis, structured attention Jacobians, hidden-layer Grams, and the
bases and edges of a small random mod-add model with and without the shortcuts."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import lib
from jaxinterp.lib import dense, grams
from jaxinterp.lib import sections as sec
from jaxinterp.models.modadd import ModAddTransformer, tokens_of


class _Plain(sec.AbstractSection):
    """A section without the shortcuts: LIB falls back to dense autodiff Jacobians."""

    section: sec.AbstractSection

    def __call__(self, h, c):
        return self.section(h, c)


def plain(s):
    return sec.Sectioned(pre=s.pre, sections=tuple(_Plain(x) for x in s.sections), names=s.names)


@pytest.fixture(scope="module")
def small():
    """A random 1-layer mod-add transformer (p = 11) with non-zero biases, every pair."""
    model = ModAddTransformer(
        p=11, d_model=12, n_heads=2, d_head=4, d_mlp=20, key=jax.random.key(0)
    )

    def paths(m):
        at, mlp = m.blocks[0].attn, m.blocks[0].mlp
        return [at.b_Q, at.b_K, at.b_V, at.b_O, mlp.b_in, mlp.b_out, m.b_U]

    keys = jax.random.split(jax.random.key(1), 7)
    new = [0.3 * jax.random.normal(k, b.shape) for k, b in zip(keys, paths(model), strict=True)]
    model = eqx.tree_at(paths, model, new)
    a, b = np.meshgrid(np.arange(11), np.arange(11), indexing="ij")
    xs = tokens_of(jnp.asarray(np.stack([a.ravel(), b.ravel()], 1)), 11)
    s = lib.modadd_sections(model)
    with jax.enable_x64(True):
        acts = tuple(np.asarray(f) for f in lib.collect_activations(s, xs, dtype=jnp.float64))
    return s, xs, acts


@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("last", [False, True])
def test_features_are_the_section_in_the_next_basis(small, layer, last):
    s, _, acts = small
    d_out = acts[layer + 1].shape[-1] - (0 if layer == 2 else 1)
    d_next = d_out if last else d_out + 1
    step = sec.FoldedSection(s.sections[layer], last=last)
    with jax.enable_x64(True):
        f = jnp.asarray(acts[layer][:5])
        C = jax.random.normal(jax.random.key(layer), (d_next, 7), jnp.float64)
        got = jax.vmap(lambda y: step.features(y, C))(f)
        want = jax.vmap(step)(f) @ C
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("last", [False, True])
def test_structured_attention_jacobian_matches_autodiff(small, last):
    s, _, acts = small
    step = sec.FoldedSection(s.sections[0], last=last)

    @jax.jit
    def both(y, C):
        sj = step.structured_jacobian(y, C)
        assert sj is not None
        got = jnp.einsum("sr,rix->six", sj.coef, sj.K) + jnp.einsum("sqi,qx->six", sj.g, sj.u)
        return got, jnp.moveaxis(jax.jacrev(lambda yy: step.features(yy, C).ravel())(y), 0, -1)

    with jax.enable_x64(True):
        C = jax.random.normal(jax.random.key(5), (12 if last else 13, 6), jnp.float64)
        got, want = jax.vmap(both, in_axes=(0, None))(jnp.asarray(acts[0][[0, 17, 120]]), C)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


def test_gram_shortcuts_match_the_dense_gram(small):
    """Hidden-layer moments (MLP, unembed) and structured Jacobians (attention) give the
    Gram of the dense forward-mode path."""
    s, _, acts = small
    rng = np.random.default_rng(0)
    for layer in range(3):
        c_next = rng.normal(size=(acts[layer + 1].shape[-1], 9))
        u = rng.normal(size=(6, acts[layer].shape[-1]))
        fast = lib.basis.next_features(s, layer, c_next)
        slow = lib.basis.next_features(plain(s), layer, c_next)
        with jax.enable_x64(True):
            shortcut = fast.hidden_layer_factors(jnp.float64) is not None or (
                dense.structured_jacobians(fast, jnp.asarray(acts[layer][:2])) is not None
            )
            assert (
                shortcut and dense.structured_jacobians(slow, jnp.asarray(acts[layer][:2])) is None
            )
        got = grams.jacobian_gram(fast, acts[layer], directions=u, chunk_size=50)
        want = grams.jacobian_gram(slow, acts[layer], directions=u, chunk_size=50)
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13 * np.abs(want).max())


@pytest.mark.parametrize(
    "basis,rule,n,kind",
    [("jacobian", "gradient", 0, "squared"), ("(1-alpha)^2", "gauss_legendre", 2, "functional")],
)
def test_shortcuts_give_the_generic_bases_and_edges(small, basis, rule, n, kind):
    s, xs, acts = small
    opts = dict(basis=basis, rule=rule, n_intervals=n, acts=acts)
    fast, slow = lib.interaction_basis(s, xs, **opts), lib.interaction_basis(plain(s), xs, **opts)
    for a, b in zip(fast.layers, slow.layers, strict=True):
        np.testing.assert_allclose(a.lambdas, b.lambdas, rtol=1e-9, atol=1e-12 * b.lambdas.max())
        big = b.lambdas > 1e-6 * b.lambdas.max()  # well-separated directions: up to sign
        np.testing.assert_allclose(np.abs(a.C[:, big]), np.abs(b.C[:, big]), atol=1e-8)
    eo = dict(kind=kind, rule=rule, n_intervals=n, acts=acts)
    e_fast = lib.interaction_edges(s, slow, xs, **eo)
    e_slow = lib.interaction_edges(plain(s), slow, xs, **eo)
    for a, b in zip(e_fast, e_slow, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * np.abs(b).max())
