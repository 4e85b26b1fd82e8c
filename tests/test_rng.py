import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxinterp.rng import hash_uniform, seed_key


def test_hash_uniform_is_deterministic_in_range_and_shaped():
    k = seed_key(3)
    a = hash_uniform(k, (7, 5, 3))
    b = jax.jit(lambda kk: hash_uniform(kk, (7, 5, 3)))(k)
    assert a.shape == (7, 5, 3) and a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(a.min()) >= 0.0 and float(a.max()) < 1.0


def test_hash_uniform_matches_uniform_statistics():
    u = np.asarray(hash_uniform(seed_key(0), (200_000,)), np.float64)
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / u.size)
    assert abs(u.var() - 1 / 12) < 1e-3
    # neighbouring draws and draws 2^k apart are uncorrelated
    for lag in (1, 2, 64, 4096):
        assert abs(np.corrcoef(u[:-lag], u[lag:])[0, 1]) < 0.01


@pytest.mark.parametrize("keys", [(0, 1), (5, 6)])
def test_hash_uniform_streams_of_different_keys_are_independent(keys):
    a, b = (np.asarray(hash_uniform(jax.random.fold_in(seed_key(0), k), (100_000,)))
            for k in keys)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.015
    assert stats.ks_2samp(a, b).pvalue > 1e-3


def test_hash_uniform_vmaps_over_keys_like_a_loop():
    ks = jax.vmap(lambda i: jax.random.fold_in(seed_key(1), i))(jnp.arange(4))
    batched = jax.vmap(lambda k: hash_uniform(k, (9,)))(ks)
    for i in range(4):
        np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(hash_uniform(ks[i], (9,))))


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 1025])
def test_permutation_indices_is_a_permutation(n):
    from jaxinterp.rng import permutation_indices

    p = np.asarray(permutation_indices(jax.random.key(0), jnp.arange(n), n))
    assert sorted(p.tolist()) == list(range(n))
    q = np.asarray(permutation_indices(jax.random.key(1), jnp.arange(n), n))
    assert n < 7 or (p != q).any()
    with pytest.raises(ValueError, match="n >= 1"):
        permutation_indices(jax.random.key(0), jnp.arange(1), 0)


def test_permutation_indices_is_uniform_over_keys():
    """Where element 0 lands is uniform (chi-square), and two entries are correlated as
    in a uniform random permutation (-1/(n-1))."""
    from jaxinterp.rng import permutation_indices

    n, draws = 10, 20_000
    perms = jax.vmap(lambda s: permutation_indices(jax.random.fold_in(jax.random.key(3), s),
                                                   jnp.arange(n), n))(jnp.arange(draws))
    perms = np.asarray(perms)
    pos0 = np.argmax(perms == 0, axis=1)
    assert stats.chisquare(np.bincount(pos0, minlength=n)).pvalue > 1e-3
    r = np.corrcoef(perms[:, 0], perms[:, 1])[0, 1]
    assert abs(r + 1 / (n - 1)) < 0.03
