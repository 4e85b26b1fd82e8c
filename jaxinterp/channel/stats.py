"""Float64 statistics of every block over the data (channel-graph spec section 2).

Summed over examples and positions, in one chunked pass:

* read side (readers ``1..n+1``): the mean ``r_bar_b`` and covariance ``Sigma_b`` of the
  stream each node reads, and the read sensitivity ``M_b = E[J_b^T S_b J_b]``;
* write side (nodes ``0..n+1``; node ``n+1`` "writes" ``y``): the mean ``o_bar_b``, the
  covariance ``Sigma^o_b`` and the relevance metric ``K_bar_b = E[Phi_b^T F_y Phi_b]``.

``S_b`` is ``relevance`` (``K_b(x)``), ``iso`` (``I``) or ``fixed`` (a given ``Phi_b
Phi_b^T`` per node, e.g. the next layer's LIB metric ``C C^T``: spec section 7's LIB
bridge; :func:`channel_stats` only). Cotangent probes ``s`` with
``E[s s^T] = S`` are pulled back by VJPs, vmapped over probes:

* ``relevance``: ``s = Phi_b^T eps`` with ``E[eps eps^T] = F_y``, for every block at once
  from ONE VJP of the output with respect to additive write perturbations. ``exact``
  probes factor ``F_y`` (one-hot outputs for regression; ``sqrt(p_v) (e_v - p)`` per
  position for softmax); ``random`` probes are ``N(0, I)`` (regression) or
  ``e_y - p`` with ``y ~ Cat(p)`` (softmax), ``n_probes`` per example;
* ``iso``: one-hot cotangents over the block's output (exact), ``K_bar = I``;
* ``fixed``: the columns of ``Phi_b`` at every position of the block's output,
  ``K_bar = Phi_b Phi_b^T``.

References:
    specs/channel-graph.md section 2 (project method); Martens & Grosse (2015),
    "Optimizing Neural Networks with Kronecker-factored Approximate Curvature" (the
    output-sampled Fisher probes).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_in, check_positive, fail
from .._types import Array, Key
from ..lib.stats import chunked_sum, einsum64
from .adapters import as_float
from .model import ChannelModel, to_float64, trace, write_shapes

__all__ = ["METRICS", "PROBES", "STATS_METRICS", "ChannelStats", "channel_stats",
           "reader_pullbacks", "relevance_probes"]

METRICS = ("relevance", "iso")
STATS_METRICS = (*METRICS, "fixed")  # ``fixed`` needs explicit factors: channel_stats only
PROBES = ("exact", "random")


class ChannelStats(NamedTuple):
    """Per-node statistics (numpy float64); index = node (``None`` where undefined).

    Attributes:
        read_mean, read_cov: ``r_bar_b (d_in,)``, ``Sigma_b (d_in, d_in)``; index 0 None.
        sensitivity: ``M_b (d_in, d_in)``; index 0 None.
        write_mean, write_cov: ``o_bar_b (d_out,)``, ``Sigma^o_b``; index ``n+1``: ``y``.
        relevance: ``K_bar_b (d_out, d_out)``.
        metric: ``relevance`` or ``iso``.
        count: examples.
    """

    read_mean: tuple[Any, ...]
    read_cov: tuple[Any, ...]
    sensitivity: tuple[Any, ...]
    write_mean: tuple[Any, ...]
    write_cov: tuple[Any, ...]
    relevance: tuple[Any, ...]
    metric: str
    count: int


def relevance_probes(
    output: str, y: Array, *, exact: bool = True, n_probes: int = 32, key: Key | None = None
) -> Array:
    """Output probes ``eps`` with ``E[eps eps^T] = F_y`` (sum over probes if ``exact``).

    Args:
        output: ``regression`` (``F_y = I``) or ``softmax`` (``diag p - p p^T`` per
            position, ``p = softmax(y)``).
        y: ``(P_y, k)`` outputs of one example.
        exact: the exact factorisation (``P_y k`` probes) instead of random ones.
        n_probes: random probes.
        key: PRNG key (random probes).

    Returns:
        ``(n, P_y, k)``.
    """
    p_y, k = y.shape
    if exact:
        if output == "regression":
            return jnp.eye(p_y * k, dtype=y.dtype).reshape(p_y * k, p_y, k)
        p = jax.nn.softmax(y, axis=-1)
        e = jnp.sqrt(p)[:, :, None] * (jnp.eye(k, dtype=y.dtype)[None] - p[:, None, :])
        eps = jnp.einsum("ts,tvw->tvsw", jnp.eye(p_y, dtype=y.dtype), e)
        return eps.reshape(p_y * k, p_y, k)
    if key is None:
        raise fail("relevance_probes", "key", "a PRNG key for random probes", None)
    if output == "regression":
        return jax.random.normal(key, (n_probes, p_y, k), y.dtype)
    p = jax.nn.softmax(y, axis=-1)
    logits = jnp.broadcast_to(jnp.log(p)[None], (n_probes, p_y, k))
    draws = jax.random.categorical(key, logits, axis=-1)
    return jax.nn.one_hot(draws, k, dtype=y.dtype) - p[None]


def zero_deltas(model: ChannelModel, x: Any) -> tuple[Array, ...]:
    return tuple(jnp.zeros(s, jnp.float64) for s in write_shapes(model, x))


def pullbacks(model: ChannelModel, x: Any, eps: Array) -> tuple[Any, tuple[Array, ...]]:
    """The trace of ``x`` and ``Phi_b^T eps_i`` for every node ``b``: a tuple of
    ``(n_probes, P, d_out_b)`` arrays (ONE VJP of ``y`` w.r.t. the writes, vmapped)."""

    def f(deltas):
        tr = trace(model, x, deltas=deltas)
        return tr.y, tr

    _, vjp_fn, tr = jax.vjp(f, zero_deltas(model, x), has_aux=True)
    return tr, jax.vmap(lambda e: vjp_fn(e)[0])(eps)


def _gram(a: Array) -> Array:
    """``sum_{i,s} a_is a_is^T`` for ``a: (n, P, d)``."""
    return einsum64("ips,ipt->st", a, a)


def probe_cotangents(model: ChannelModel, x: Any, key: Key, metric: str, exact: bool,
                     n_probes: int) -> tuple[Any, Any, float]:
    """One example's trace, its write cotangents ``Phi_b^T eps`` from the output probes of
    ``metric`` (``None`` for ``iso``) and the probe normalisation (1 for exact probes,
    ``1 / n_probes`` for random ones)."""
    if metric == "relevance":
        y = trace(model, x).y
        eps = relevance_probes(model.output, y, exact=exact, n_probes=n_probes, key=key)
        tr, cots = pullbacks(model, x, eps)
        return tr, cots, 1.0 if exact else 1.0 / n_probes
    return trace(model, x), None, 1.0


def _factor_probes(phi: Array, shape: tuple[int, ...]) -> Array:
    """Cotangents ``(P r, P, d)``: column ``j`` of ``phi: (d, r)`` at position ``p``."""
    p, d = shape
    eye = jnp.eye(p, dtype=phi.dtype)
    return jnp.einsum("pq,dj->pjqd", eye, phi).reshape(p * phi.shape[1], p, d)


def reader_pullbacks(model: ChannelModel, x: Any, key: Key, metric: str, exact: bool,
                     n_probes: int, factors: tuple[Any, ...] | None = None
                     ) -> tuple[Any, Any, float, list[Array]]:
    """One example's trace, write cotangents ``Phi_b^T eps`` (``None`` for ``iso`` and
    ``fixed``), the probe normalisation, and per reader ``k = 1..n+1`` the pulled-back
    probes ``J_k^T s_i``, ``(n_probes_k, P, d_in)`` (vmapped VJPs). ``factors[k]``
    (``fixed``; ``None`` entries: identity) replaces the one-hot cotangents of ``iso``."""
    tr, cots, scale = probe_cotangents(model, x, key, metric, exact, n_probes)
    jts = []
    for k in range(1, model.n_blocks + 2):
        o, vjp_h = jax.vjp(model.node_fn(k), tr.reads[k - 1])
        if cots is not None:
            s = cots[k]
        elif factors is not None and factors[k] is not None:
            s = _factor_probes(factors[k], o.shape)
        else:
            s = jnp.eye(o.size, dtype=o.dtype).reshape(o.size, *o.shape)
        jts.append(jax.vmap(lambda c, v=vjp_h: v(c)[0])(s))
    return tr, cots, scale, jts


def _example(model: ChannelModel, x: Any, key: Key, metric: str, exact: bool,
             n_probes: int, factors: tuple[Any, ...] | None) -> dict[str, Any]:
    tr, cots, scale, jts = reader_pullbacks(model, x, key, metric, exact, n_probes, factors)
    outs = (*tr.writes, tr.y)
    return {
        "write_sum": tuple(jnp.sum(o, axis=0) for o in outs),
        "write_sq": tuple(einsum64("ps,pt->st", o, o) for o in outs),
        "read_sum": tuple(jnp.sum(r, axis=0) for r in tr.reads),
        "read_sq": tuple(einsum64("ps,pt->st", r, r) for r in tr.reads),
        "relevance": tuple(scale * _gram(c) for c in cots) if cots is not None else (),
        "sensitivity": tuple(scale * _gram(jt) for jt in jts),
    }


@eqx.filter_jit
def _stats_sums(model, xs, key, metric, exact, n_probes, chunk_size, factors):
    def per_chunk(chunk, mask, idx):
        ks = jax.random.split(jax.random.fold_in(key, idx), mask.shape[0])
        per = jax.vmap(lambda x, k: _example(model, x, k, metric, exact, n_probes, factors))(
            chunk, ks)
        return jax.tree_util.tree_map(lambda a: jnp.tensordot(mask, a, axes=1), per)

    return chunked_sum(per_chunk, xs, chunk_size=chunk_size)


def _check_factors(fn: str, model: ChannelModel, xs: Any, metric: str,
                   factors: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    if metric != "fixed":
        if factors is not None:
            raise fail(fn, "factors", "None unless metric='fixed'", f"{len(factors)} factors")
        return None
    n = model.n_blocks + 2
    if factors is None or len(factors) != n:
        raise fail(fn, "factors", f"one entry per node (n_blocks + 2 = {n}) for 'fixed'",
                   None if factors is None else len(factors))
    x0 = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[0], xs)
    dims = [shape[-1] for shape in write_shapes(model, x0)]
    for k, (f, d) in enumerate(zip(factors, dims, strict=True)):
        if f is not None and (np.ndim(f) != 2 or np.shape(f)[0] != d):
            raise fail(fn, f"factors[{k}]", f"(d_out = {d}, r)", np.shape(f))
    return tuple(None if f is None else np.asarray(f, np.float64) for f in factors)


def channel_stats(
    model: ChannelModel,
    xs: Any,
    *,
    metric: str = "relevance",
    probes: str = "exact",
    n_probes: int = 32,
    chunk_size: int = 256,
    factors: tuple[Any, ...] | None = None,
    key: Key | None = None,
) -> ChannelStats:
    """Means, covariances, read sensitivities and relevance metrics of every node.

    x64 is enabled locally; the model's arrays are cast to float64.

    Args:
        model: the cut model.
        xs: inputs with a leading ``batch`` axis (a pytree).
        metric: ``relevance`` (default), ``iso`` or ``fixed``.
        probes: ``exact`` or ``random`` output probes (``relevance`` only).
        n_probes: random probes per example.
        chunk_size: examples per chunk.
        factors: ``fixed`` only: one entry per node ``0..n+1``, ``Phi_k: (d_out_k, r_k)``
            with ``S_k = Phi_k Phi_k^T`` on node ``k``'s output (``None``: identity).
        key: PRNG key (random probes); probes of chunk ``c`` example ``i`` come from
            ``fold_in(key, c)`` split per example.

    Returns:
        :class:`ChannelStats`.

    Raises:
        ValueError: on unknown options, random probes without a key, or ``factors``
            missing, misplaced or of the wrong shape.
    """
    fn = "channel_stats"
    check_in(fn, "metric", metric, STATS_METRICS)
    factors = _check_factors(fn, model, xs, metric, factors)
    check_in(fn, "probes", probes, PROBES)
    check_positive(fn, "n_probes", n_probes, integer=True)
    check_positive(fn, "chunk_size", chunk_size, integer=True)
    if probes == "random" and key is None:
        raise fail(fn, "key", "a PRNG key for random probes", None)
    key = jax.random.key(0) if key is None else key
    with jax.enable_x64(True):
        m64, xs = to_float64(model), as_float(xs)
        n = jax.tree_util.tree_leaves(xs)[0].shape[0]
        f64 = None if factors is None else tuple(
            None if f is None else jnp.asarray(f) for f in factors)
        sums = _stats_sums(m64, xs, key, metric, probes == "exact", int(n_probes),
                           int(chunk_size), f64)
        sums = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), sums)
        x0 = jax.tree_util.tree_map(lambda a: a[0], xs)
        tr = jax.eval_shape(lambda: trace(m64, x0))
    p_writes = [w.shape[0] for w in (*tr.writes, tr.y)]
    p_reads = [r.shape[0] for r in tr.reads]

    def moments(s, sq, rows):
        mean = s / rows
        cov = sq / rows - np.outer(mean, mean)
        return mean, (cov + cov.T) / 2

    w = [moments(s, q, n * p) for s, q, p in zip(sums["write_sum"], sums["write_sq"], p_writes,
                                                 strict=True)]
    r = [moments(s, q, n * p) for s, q, p in zip(sums["read_sum"], sums["read_sq"], p_reads,
                                                 strict=True)]
    if metric == "relevance":
        rel = tuple(k / (n * p) for k, p in zip(sums["relevance"], p_writes, strict=True))
    elif metric == "fixed":
        rel = tuple(np.eye(m.shape[0]) if f is None else f @ f.T
                    for (m, _), f in zip(w, factors, strict=True))
    else:
        rel = tuple(np.eye(m.shape[0]) for m, _ in w)
    sens = [m / (n * p) for m, p in zip(sums["sensitivity"], p_reads, strict=True)]
    return ChannelStats(
        read_mean=(None, *(m for m, _ in r)),
        read_cov=(None, *(c for _, c in r)),
        sensitivity=(None, *((s + s.T) / 2 for s in sens)),
        write_mean=tuple(m for m, _ in w),
        write_cov=tuple(c for _, c in w),
        relevance=tuple((k + k.T) / 2 for k in rel),
        metric=metric,
        count=int(n),
    )
