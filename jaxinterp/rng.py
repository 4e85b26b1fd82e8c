"""Counter-based, device-count-invariant randomness.

Every random draw is ``fold_in(fold_in(fold_in(root, seed), step), stream)`` (specs §5.1):
it depends only on the seed, the update index and a fixed integer per purpose, never on
how many devices run the computation or on how many keys were split before it.
"""

from __future__ import annotations

import enum

import jax

from ._types import Key


class Stream(enum.IntEnum):
    """Fixed stream ids, one per purpose. Never renumber: results depend on them."""

    INIT = 0
    DATA = 1
    EVAL = 2
    MASK = 3
    REFERENCE = 4
    PGD = 5
    SPLIT = 6
    EMBED = 7
    SHUFFLE = 8
    LABELS = 9


def seed_key(seed: int | jax.Array) -> Key:
    """The root key of run ``seed``: ``fold_in(key(0), seed)``."""
    return jax.random.fold_in(jax.random.key(0), seed)


def stream_key(key: Key, stream: int) -> Key:
    """A key for one purpose, independent of the step (init, fixed datasets, eval)."""
    return jax.random.fold_in(key, int(stream) + 1_000_000)


def step_key(key: Key, step: int | jax.Array, stream: int) -> Key:
    """The key of ``stream`` at update ``step``: ``fold_in(fold_in(key, step), stream)``."""
    return jax.random.fold_in(jax.random.fold_in(key, step), int(stream))
