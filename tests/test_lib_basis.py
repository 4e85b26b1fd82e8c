"""LIB bases (float64): the identities of the LIB spec section 6 on small random models,
against dense Jacobians computed independently with ``jax.jacrev``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import lib
from jaxinterp.lib import grams
from jaxinterp.lib import sections as sec
from jaxinterp.models.digits import DigitsMLP

N = 160


@pytest.fixture(scope="module")
def mlp():
    """A random 6-5-5-3 ReLU MLP with biases, its sections, data and float64 activations."""
    model = DigitsMLP((6, 5, 5, 3), key=jax.random.key(3))
    xs = jax.random.normal(jax.random.key(4), (N, 6)) + 0.3
    s = lib.mlp_sections(model)
    with jax.enable_x64(True):
        acts = lib.collect_activations(s, xs, dtype=jnp.float64)
    return s, xs, tuple(np.asarray(a) for a in acts)


@pytest.fixture(scope="module")
def lib_basis(mlp):
    s, xs, acts = mlp
    return lib.interaction_basis(s, xs, acts=acts, chunk_size=64, cotangent_chunk_size=2)


def moment(f, c):
    fh = f.reshape(-1, f.shape[-1]) @ c
    return fh.T @ fh / fh.shape[0]


def dense_hat_jacobian_gram(s, ib, acts, layer):
    """E[J_hat^T J_hat] with J_hat = dF/df_hat, F = S_l(f_hat C^+) C_{l+1}, via jacrev."""
    with jax.enable_x64(True):
        c_pinv, c_next = jnp.asarray(ib[layer].C_pinv), jnp.asarray(ib[layer + 1].C)
        F = lambda xh: s.section_fn(layer)(xh @ c_pinv) @ c_next
        xh = jnp.asarray(acts[layer] @ ib[layer].C)
        jac = jax.vmap(jax.jacrev(F))(xh)  # (N, P', m', P, m)
        return np.asarray(jnp.einsum("btisj,btisk->jk", jac, jac)) / (N * xh.shape[1])


@pytest.mark.parametrize(
    "basis,rule,n",
    [
        ("jacobian", "gradient", 0),
        ("pca", "gradient", 0),
        ("(1-0)*alpha", "gauss_legendre", 3),
        ("(1-alpha)^2", "trapezoidal", 4),
    ],
)
def test_bases_diagonalise_the_activation_moment(mlp, basis, rule, n):
    """Spec 6.1: E[f_hat^T f_hat] = diag(Lambda) (raw moment), and C^+ C = I."""
    s, xs, acts = mlp
    ib = lib.interaction_basis(s, xs, basis=basis, rule=rule, n_intervals=n, acts=acts)
    for layer in range(len(acts) - 1):
        b = ib[layer]
        m = moment(acts[layer], b.C)
        np.testing.assert_allclose(m, np.diag(b.lambdas), rtol=0, atol=1e-12 * b.lambdas.max())
        np.testing.assert_allclose(b.C_pinv @ b.C, np.eye(b.size), atol=1e-10)
        assert b.constant and np.all(b.lambdas > 0)


def test_lib_whitens_the_jacobian(mlp, lib_basis):
    """Spec 6.2: E[J_hat^T J_hat] = I on the non-constant directions (the constant row
    of M is not rotated, so only its diagonal entry is 1)."""
    s, _, acts = mlp
    for layer in range(len(acts) - 1):
        g = dense_hat_jacobian_gram(s, lib_basis, acts, layer)
        np.testing.assert_allclose(g[1:, 1:], np.eye(g.shape[0] - 1), atol=1e-10)
        np.testing.assert_allclose(np.diag(g), 1.0, atol=1e-10)


def test_jacobian_gram_matches_dense_einsum_and_stochastic_positions(mlp, lib_basis, getkey):
    s, _, acts = mlp
    with jax.enable_x64(True):
        F = lib.basis.next_features(s, 0, lib_basis[1].C)
        ys = jnp.asarray(acts[0])
        jac = jax.vmap(jax.jacrev(F))(ys)
        dense = np.asarray(jnp.einsum("btisj,btisk->jk", jac, jac)) / N
        m = grams.jacobian_gram(F, ys, chunk_size=50, cotangent_chunk_size=3)
        # one output position: a random sign over positions changes nothing (r_p = 1)
        sto = grams.jacobian_gram(F, ys, chunk_size=50, sources=(1, None), key=getkey())
        hid = grams.jacobian_gram(F, ys, chunk_size=50, sources=(None, 400), key=getkey())
    np.testing.assert_allclose(m, dense, rtol=1e-12, atol=1e-12 * np.abs(dense).max())
    np.testing.assert_allclose(sto, dense, rtol=1e-12, atol=1e-12 * np.abs(dense).max())
    # stochastic hidden sources are unbiased: 400 draws land within a few percent
    assert np.abs(hid - dense).max() < 0.1 * np.abs(dense).max()
    assert np.abs(hid - dense).max() > 1e-8 * np.abs(dense).max()  # and are random


def reparametrised(s, layer, a_h, shift):
    """Node layer ``layer`` becomes h A + c shift, compensated in the next section."""

    def before(p, h, c):
        h2, c2 = p[0](h, c)
        return h2 @ p[1] + c2[:, None] * p[2][None, :], c2

    def after(p, h, c):
        return p[0]((h - c[:, None] * p[2][None, :]) @ jnp.linalg.inv(p[1]), c)

    sections = list(s.sections)
    sections[layer - 1] = sec.FunctionSection(before, (s.sections[layer - 1], a_h, shift))
    sections[layer] = sec.FunctionSection(after, (s.sections[layer], a_h, shift))
    return sec.Sectioned(pre=s.pre, sections=tuple(sections), names=s.names)


def test_lambda_is_invariant_under_compensated_reparametrisation(mlp, lib_basis):
    """Spec 6.3: Lambda does not depend on the basis of a hidden layer; PCA's does."""
    s, xs, _ = mlp
    rng = np.random.default_rng(1)
    a_h = np.eye(5) + 0.6 * rng.normal(size=(5, 5))
    s2 = reparametrised(s, 1, a_h, rng.normal(size=5))
    ib2 = lib.interaction_basis(s2, xs, chunk_size=64)
    for b1, b2 in zip(lib_basis.layers, ib2.layers, strict=True):
        np.testing.assert_allclose(b2.lambdas, b1.lambdas, rtol=1e-8)
    with jax.enable_x64(True):
        f1 = lib.collect_activations(s, xs, dtype=jnp.float64)[1]
        f2 = lib.collect_activations(s2, xs, dtype=jnp.float64)[1]
    fh1 = np.asarray(f1)[:, 0] @ lib_basis[1].C
    fh2 = np.asarray(f2)[:, 0] @ ib2[1].C
    np.testing.assert_allclose(np.abs(fh2), np.abs(fh1), rtol=1e-7, atol=1e-7)  # up to sign
    p1 = lib.interaction_basis(s, xs, basis="pca")
    p2 = lib.interaction_basis(s2, xs, basis="pca")
    assert not np.allclose(p1[1].lambdas, p2[1].lambdas, rtol=1e-3)


def test_centred_lib_constant_direction_and_mean_ablation(mlp, lib_basis):
    """Spec 6.5: f_hat_0 constant, C^+[0] ~ mu, other rows of C^+ have no constant part,
    E[f_hat_j] = 0 for j >= 1."""
    _, _, acts = mlp
    for layer in range(len(acts) - 1):
        b = lib_basis[layer]
        fh = acts[layer][:, 0] @ b.C
        np.testing.assert_allclose(fh[:, 0], np.sqrt(b.lambdas[0]), rtol=1e-12)
        np.testing.assert_allclose(b.C_pinv[0] * np.sqrt(b.lambdas[0]), b.mean, rtol=1e-10)
        np.testing.assert_allclose(b.C_pinv[1:, -1], 0.0, atol=1e-12)
        np.testing.assert_allclose(fh[:, 1:].mean(0), 0.0, atol=1e-10 * np.abs(fh).max())


def test_rotating_the_final_layer_leaves_earlier_layers(mlp, lib_basis):
    """Spec 6.6 (up to sign: the final PCA rotation is orthogonal)."""
    s, xs, acts = mlp
    rot = lib.interaction_basis(s, xs, acts=acts, rotate_final=True)
    out = rot[-1]
    np.testing.assert_allclose(out.C.T @ out.C, np.eye(out.size), atol=1e-12)
    for b1, b2 in zip(lib_basis.layers[:-1], rot.layers[:-1], strict=True):
        np.testing.assert_allclose(b2.lambdas, b1.lambdas, rtol=1e-9)
        np.testing.assert_allclose(np.abs(b2.C), np.abs(b1.C), rtol=1e-7, atol=1e-9)


def test_neuron_basis_and_naive_gradient_flow(mlp, lib_basis):
    s, xs, acts = mlp
    nb = lib.interaction_basis(s, xs, basis="neuron", acts=acts)
    f0 = acts[0][:, 0]
    np.testing.assert_array_equal(nb[0].C[:, 0], np.eye(7)[-1])  # the constant first
    np.testing.assert_allclose(nb[0].lambdas, (f0**2).mean(0)[np.r_[6, 0:6]], rtol=1e-12)
    naive = lib.interaction_basis(s, xs, acts=acts, naive_gradient_flow=True)
    np.testing.assert_allclose(naive[-2].lambdas, lib_basis[-2].lambdas, rtol=1e-10)
    assert not np.allclose(naive[0].lambdas[:3], lib_basis[0].lambdas[:3], rtol=1e-3)


@pytest.mark.parametrize("basis", ["(1-0)*alpha", "(1-alpha)^2"])
def test_ig_bases_of_a_linear_model_do_not_depend_on_the_rule(getkey, basis):
    """Spec 6.7: a linear module's IG bases are the same for any symmetric rule."""
    from jaxinterp.models.block_mlp import BlockMLP

    model = BlockMLP(activation="identity", bias=0.3, key=getkey())
    xs = jax.random.normal(getkey(), (80, 8))
    s = lib.mlp_sections(model, [".layers[3].weight", ".layers[4].weight"])
    a = lib.interaction_basis(s, xs, basis=basis, rule="trapezoidal", n_intervals=2)
    b = lib.interaction_basis(s, xs, basis=basis, rule="gauss_legendre", n_intervals=5)
    for la, lb in zip(a.layers, b.layers, strict=True):
        np.testing.assert_allclose(la.lambdas, lb.lambdas, rtol=1e-9, atol=1e-12 * la.lambdas.max())


def test_basis_errors(mlp, getkey):
    s, xs, acts = mlp
    with pytest.raises(
        ValueError,
        match=r"interaction_basis: expected basis one of "
        r"'jacobian', .*got 'ica'",
    ):
        lib.interaction_basis(s, xs, basis="ica")
    with pytest.raises(
        ValueError,
        match=r"interaction_basis: expected rule 'trapezoidal' "
        r"or 'gauss_legendre' for '\(1-alpha\)\^2', got "
        r"'gradient'",
    ):
        lib.interaction_basis(s, xs, basis="(1-alpha)^2")
    with pytest.raises(ValueError, match=r"jacobian_gram: expected key a PRNG key"):
        lib.interaction_basis(s, xs, acts=acts, sources=(None, 2))
    with pytest.raises(ValueError, match=r"interaction_basis: expected sources a pair"):
        lib.interaction_basis(s, xs, sources=3)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=r"interaction_basis: expected acts 4 node layers, "
        r"got 2",
    ):
        lib.interaction_basis(s, xs, acts=acts[:2])
    with pytest.raises(ValueError, match=r"expected chunk_size a positive integer, got 0"):
        lib.interaction_basis(s, xs, chunk_size=0)
