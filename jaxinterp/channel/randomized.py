"""Read channels by a randomised eigensolver on the matrix-free read operator (spec
section 3, "Large d").

In the support coordinates of ``Sigma_b = E diag(s^2) E^T`` the read operator is
``A~ = diag(s) E^T M_b E diag(s)``; ``M_b W = E_x sum_i g_i (g_i^T W)`` with the
pulled-back probes ``g_i = J_b^T s_i`` (random-probe or exact VJPs, the same probes on
every pass: keys are ``fold_in(key, chunk)``), so ``M_b`` is never formed. The range
finder (Halko, Martinsson, Tropp) draws ``p = rank + oversample`` Gaussian vectors, runs
``n_iter`` power iterations with re-orthonormalisation, and diagonalises the projected
``Q^T A~ Q``: ``2 + n_iter`` passes over the data, for every reader at once.

References:
    Halko, Martinsson, Tropp (2011), "Finding structure with randomness" (SIAM Review
    53:217); specs/channel-graph.md section 3.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_in, check_positive
from .._types import Key
from ..lib.stats import chunked_sum, einsum64, sign_fix
from .adapters import as_float
from .model import ChannelModel, to_float64, trace
from .stats import METRICS, ChannelStats, reader_pullbacks
from .subspaces import ChannelSet, nested_orth, support_sqrt

__all__ = ["SOLVERS", "randomized_eigh", "randomized_read_channels", "sensitivity_matmat"]

SOLVERS = ("dense", "randomized")


def randomized_eigh(matmat, d: int, rank: int, *, oversample: int = 10, n_iter: int = 2,
                    key: Key) -> tuple[np.ndarray, np.ndarray]:
    """Leading eigenpairs of a symmetric PSD operator given by ``matmat: (d, p) -> (d, p)``.

    Returns:
        ``(values (r,), vectors (d, r))`` with ``r = min(rank, d)``, descending.
    """
    p = min(d, rank + oversample)
    y = matmat(np.asarray(jax.random.normal(key, (d, p)), np.float64))
    for _ in range(n_iter):
        y = matmat(np.linalg.qr(y)[0])
    q = np.linalg.qr(y)[0]
    b = q.T @ matmat(q)
    vals, u = np.linalg.eigh((b + b.T) / 2)
    order = np.argsort(-vals, kind="stable")[: min(rank, d)]
    return np.maximum(vals[order], 0.0), q @ u[:, order]


@eqx.filter_jit
def _matmat_sums(model, xs, ws, key, metric, exact, n_probes, chunk):
    def per_chunk(chunk_x, mask, idx):
        ks = jax.random.split(jax.random.fold_in(key, idx), mask.shape[0])

        def one(x, k):
            _, _, scale, jts = reader_pullbacks(model, x, k, metric, exact, n_probes)
            return tuple(scale * einsum64("ips,ipq->sq", jt, einsum64("ipt,tq->ipq", jt, w))
                         for jt, w in zip(jts, ws, strict=True))

        per = jax.vmap(one)(chunk_x, ks)
        return jax.tree_util.tree_map(lambda a: jnp.tensordot(mask, a, axes=1), per)

    return chunked_sum(per_chunk, xs, chunk_size=chunk)


def sensitivity_matmat(model: ChannelModel, xs: Any, ws: list[Any], *, metric: str = "relevance",
                       probes: str = "exact", n_probes: int = 32, chunk_size: int = 128,
                       key: Key) -> list[np.ndarray]:
    """``M_k W_k`` for every reader ``k = 1..n+1`` in one pass (``ws[k-1]: (d_in, p)``),
    averaged over examples and positions; ``M`` is never materialised."""
    check_in("sensitivity_matmat", "metric", metric, METRICS)
    with jax.enable_x64(True):
        m64, xs = to_float64(model), as_float(xs)
        ws = tuple(jnp.asarray(w, jnp.float64) for w in ws)
        out = _matmat_sums(m64, xs, ws, key, metric, probes == "exact", int(n_probes),
                           int(chunk_size))
        x0 = jax.tree_util.tree_map(lambda a: a[0], xs)
        p_reads = [r.shape[0] for r in jax.eval_shape(lambda: trace(m64, x0)).reads]
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    return [np.asarray(o, np.float64) / (n * p) for o, p in zip(out, p_reads, strict=True)]


def randomized_read_channels(model: ChannelModel, xs: Any, stats: ChannelStats,
                             cs: ChannelSet, *, rank: int = 16, oversample: int = 10,
                             n_iter: int = 2, metric: str = "relevance", probes: str = "exact",
                             n_probes: int = 32, chunk_size: int = 128,
                             key: Key) -> ChannelSet:
    """``cs`` with every reader's read channels replaced by the randomised solver's
    leading ``rank`` eigenpairs (``stats`` supplies ``Sigma_b`` and ``r_bar_b``)."""
    check_positive("randomized_read_channels", "rank", rank, integer=True)
    readers = range(1, len(cs.nodes))
    sup = [support_sqrt(stats.read_cov[k]) for k in readers]
    p = [min(e.shape[1], rank + oversample) for e, _ in sup]
    rng = [np.asarray(jax.random.normal(jax.random.fold_in(key, k), (e.shape[1], pk)))
           for k, (e, _), pk in zip(readers, sup, p, strict=True)]

    def apply(vs):  # A~ V for every reader, one data pass
        ws = [e @ (s[:, None] * v) for (e, s), v in zip(sup, vs, strict=True)]
        mw = sensitivity_matmat(model, xs, ws, metric=metric, probes=probes,
                                n_probes=n_probes, chunk_size=chunk_size,
                                key=jax.random.fold_in(key, 10_000))
        return [s[:, None] * (e.T @ m) for (e, s), m in zip(sup, mw, strict=True)]

    ys = apply(rng)
    for _ in range(n_iter):
        ys = apply([np.linalg.qr(y)[0] for y in ys])
    qs = [np.linalg.qr(y)[0] for y in ys]
    aq = apply(qs)
    nodes = list(cs.nodes)
    for k, q, a, (e, s) in zip(readers, qs, aq, sup, strict=True):
        b = q.T @ a
        vals, u = np.linalg.eigh((b + b.T) / 2)
        order = np.argsort(-vals, kind="stable")[: min(rank, q.shape[1])]
        qt = sign_fix(q @ u[:, order])
        rho = e @ (qt / s[:, None])
        nodes[k] = nodes[k]._replace(read_lambdas=np.maximum(vals[order], 0.0),
                                     read_covectors=rho, V=nested_orth(rho))
    return cs._replace(nodes=tuple(nodes))

