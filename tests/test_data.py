import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp.models import data


def test_sparse_uniform_allow_statistics(getkey):
    x = np.asarray(data.sparse_uniform(getkey(), 20000, 10, 0.2, 0.0, 1.0, "allow"))
    assert x.shape == (20000, 10)
    assert abs((x > 0).mean() - 0.2) < 0.01
    assert x.min() >= 0 and x.max() <= 1
    assert (~x.any(1)).mean() == pytest.approx(0.8**10, abs=0.01)


@pytest.mark.parametrize("p,f", [(0.05, 5), (0.05, 10), (0.01, 100)])
def test_sparse_uniform_reject_has_no_zero_rows(getkey, p, f):
    x = np.asarray(data.sparse_uniform(getkey(), 4096, f, p, -1.0, 1.0, "reject"))
    assert x.shape == (4096, f) and x.any(1).all()


def test_grouped_shares_activity_within_groups(getkey):
    x = np.asarray(data.sparse_uniform(getkey(), 1000, 30, 0.3, 0.0, 1.0, "allow", group=5))
    act = (x > 0).reshape(1000, 6, 5)
    assert (act.all(-1) == act.any(-1)).all()


def test_exactly_k_and_one_hot_and_signed(getkey):
    x = np.asarray(data.exactly_k(getkey(), 500, 12, 3, 0.1, 1.0))
    assert ((x != 0).sum(1) == 3).all()
    assert np.allclose(data.one_hot(4, 0.75), 0.75 * np.eye(4))
    s = np.asarray(data.signed(getkey(), jnp.ones((1000, 3))))
    assert set(np.unique(s)) == {-1.0, 1.0} and abs(s.mean()) < 0.1


@pytest.mark.parametrize("fn", ["epoch_batch", "epoch_batch_pointwise"])
def test_epoch_batch_visits_each_row_once_per_epoch(getkey, fn):
    key, sample = getkey(), getattr(data, fn)
    idx = np.concatenate([np.asarray(sample(key, jnp.asarray(s), 53, 10))
                          for s in range(5)])  # 53 rows: the remainder of 3 is dropped
    assert len(set(idx.tolist())) == 50 and idx.max() < 53
    nxt = np.asarray(sample(key, jnp.asarray(5), 53, 10))
    assert not np.array_equal(nxt, idx[:10])  # reshuffled next epoch


def test_samplers_are_pure(getkey):
    k = getkey()
    a = data.sparse_uniform(k, 64, 5, 0.3)
    b = jax.jit(lambda k: data.sparse_uniform(k, 64, 5, 0.3))(k)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch=0, n_features=5, p=0.1), "batch"),
    (dict(batch=4, n_features=5, p=1.5), "probability"),
    (dict(batch=4, n_features=5, p=0.1, zeros="drop"), "zeros"),
    (dict(batch=4, n_features=5, p=0.1, group=2), "group"),
])
def test_sparse_uniform_errors(getkey, kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.sparse_uniform(getkey(), **kwargs)
