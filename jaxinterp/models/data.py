"""Pure data samplers for the toy models (specs/toy-models.md §1). Every sampler is a pure
function of a key and static sizes; nothing here has data-dependent shapes."""

from __future__ import annotations

import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp

from .._checks import check_in, check_positive, check_probability, fail
from .._types import Array, Float, Key


def sparse_uniform(
    key: Key,
    batch: int,
    n_features: int,
    p: float,
    lo: float = 0.0,
    hi: float = 1.0,
    zeros: Literal["allow", "reject"] = "allow",
    *,
    group: int = 1,
) -> Float[Array, "batch n_features"]:
    """Sparse features: each active independently with probability ``p``, value ~ U[lo, hi].

    Args:
        key: PRNG key.
        batch: rows B.
        n_features: features F.
        p: activation probability.
        lo, hi: value range of an active feature.
        zeros: ``"allow"`` keeps all-zero rows; ``"reject"`` redraws them (L3D generator).
            Rejection draws ``n = (B + 6 sqrt(B) + 10) / q`` candidate rows, where ``q`` is
            the probability that a row is non-zero (at least 2B), and keeps the first B
            non-zero ones with a stable sort: fewer than B survivors is a >6-sigma event,
            guarded by an ``eqx.error_if``. Shapes never depend on the data.
        group: features per group sharing one activity flag (``grouped`` generator).

    Returns:
        ``(batch, n_features)`` float32 array.
    """
    fn = "sparse_uniform"
    check_positive(fn, "batch", batch, integer=True)
    check_positive(fn, "n_features", n_features, integer=True)
    check_probability(fn, "p", p)
    check_in(fn, "zeros", zeros, ("allow", "reject"))
    check_positive(fn, "group", group, integer=True)
    if n_features % group:
        raise fail(fn, "group", f"to divide n_features={n_features}", group)
    if zeros == "allow":
        rows = batch
    else:
        q = 1.0 - (1.0 - p) ** (n_features // group)
        if q <= 0.0:
            raise fail(fn, "p", "> 0 when zeros='reject'", p)
        rows = max(2 * batch, math.ceil((batch + 6 * math.sqrt(batch) + 10) / q))
    k_act, k_val = jax.random.split(key)
    active = jax.random.bernoulli(k_act, p, (rows, n_features // group))
    active = jnp.repeat(active, group, axis=1)
    values = jax.random.uniform(k_val, (rows, n_features), minval=lo, maxval=hi)
    x = jnp.where(active, values, 0.0)
    if zeros == "allow":
        return x
    nonzero = jnp.any(active, axis=1)
    order = jnp.argsort(~nonzero, stable=True)
    x = eqx.error_if(
        x[order[:batch]],
        jnp.sum(nonzero) < batch,
        "sparse_uniform: fewer than `batch` non-zero rows among 2*batch draws; raise p.",
    )
    return x


def signed(key: Key, x: Array) -> Array:
    """Multiply every entry by an independent random sign."""
    return x * jnp.where(jax.random.bernoulli(key, 0.5, x.shape), 1.0, -1.0)


def exactly_k(
    key: Key, batch: int, n_features: int, k: int, lo: float = 0.0, hi: float = 1.0
) -> Float[Array, "batch n_features"]:
    """Exactly ``k`` distinct active features per row, values ~ U[lo, hi]."""
    fn = "exactly_k"
    check_positive(fn, "batch", batch, integer=True)
    if not 0 <= k <= n_features:
        raise fail(fn, "k", f"in [0, n_features={n_features}]", k)
    k_perm, k_val = jax.random.split(key)
    scores = jax.random.uniform(k_perm, (batch, n_features))
    rank = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
    values = jax.random.uniform(k_val, (batch, n_features), minval=lo, maxval=hi)
    return jnp.where(rank < k, values, 0.0)


def one_hot(n_features: int, value: float = 1.0) -> Float[Array, "n_features n_features"]:
    """Row i is ``value * e_i``."""
    return value * jnp.eye(n_features)


def epoch_batch(key: Key, step: Array, n: int, batch: int) -> Array:
    """Indices of the ``step``-th minibatch of a dataset of ``n`` rows, reshuffled every
    epoch (``floor(n / batch)`` minibatches; the remainder is dropped as a torch
    ``DataLoader(drop_last=True)`` would). Pure in (key, step): resumable exactly."""
    per_epoch = max(n // batch, 1)
    epoch, i = step // per_epoch, step % per_epoch
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), n)
    return jax.lax.dynamic_slice_in_dim(perm, i * batch, batch)


def epoch_batch_pointwise(key: Key, step: Array, n: int, batch: int) -> Array:
    """Like :func:`epoch_batch` (every row once per epoch, remainder dropped), but the
    epoch's shuffle is a keyed Feistel permutation evaluated at the ``batch`` positions
    needed (:func:`jaxinterp.rng.permutation_indices`): O(batch) per step instead of
    sorting ``n`` rows, which dominates small models' steps, most of all with vmapped
    seeds. A different (equally uniform) order than :func:`epoch_batch` for the same key."""
    from ..rng import permutation_indices

    per_epoch = max(n // batch, 1)
    epoch, i = step // per_epoch, step % per_epoch
    pos = i * batch + jnp.arange(batch)
    return permutation_indices(jax.random.fold_in(key, epoch), pos, n)
