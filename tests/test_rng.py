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
