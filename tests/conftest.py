import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """Fresh, deterministic keys: ``getkey()`` returns a new key on every call."""
    counter = iter(range(10**9))
    base = jax.random.key(1234)
    return lambda: jax.random.fold_in(base, next(counter))
