"""Which channels the data use (spec section 5): per-example activity, the usage matrix,
circuits by co-usage clustering and by data clustering, and the causal check of a circuit
by mean-ablating channels.

* Activity of write channel ``(b, j)`` on ``x``: ``|sum_s c_j(x, s) g_b(x, s)^T omega_j|``
  (attribution patching in channel coordinates, ``g_b = dD/do_b`` with ``D = ref``).
* Usage ``U[x, node]``: the smallest set of nodes holding ``>= frac`` of ``x``'s activity.
* Co-usage circuits: Louvain on Jaccard similarities of usage columns, restricted to
  node pairs joined in the pruned graph or in the same block.
* Ablating channel ``j`` of block ``b`` replaces ``o_b`` by ``o_b - c_j(x) omega_j`` (its
  mean is kept); ``unembed`` is never ablated.

References:
    specs/channel-graph.md section 5 (project method); Nanda (2023), "Attribution
    Patching"; Syed, Rager, Conmy (2023), arXiv 2310.10348.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np

from .. import graph as G
from .._checks import check_positive, fail
from .._types import Array, Key
from .adapters import as_float
from .assemble import ChannelGraph
from .edges import reference_outputs
from .model import ChannelModel, divergence, to_float64, trace
from .stats import zero_deltas

__all__ = ["ablation_check", "activity", "co_usage_circuits", "data_clusters",
           "position_activity", "usage_matrix"]


def _arrays(cg: ChannelGraph) -> tuple[list[Array], list[Array], list[Array]]:
    means = [jnp.asarray(la.basis_pinv.T @ np.zeros(la.size)) for la in cg.layers]
    return ([jnp.asarray(la.basis) for la in cg.layers],
            [jnp.asarray(la.basis_pinv.T) for la in cg.layers], means)


@eqx.filter_jit
def _activity(model, omegas, readouts, means, xs, y_refs, batch, per_position=False):
    """Per example ``|c_j g^T omega_j|`` of the first ``len(omegas)`` nodes (writes, then
    ``y``): summed over positions inside the ``|.|``, or per position (``(P, n)``)."""
    def one(inp):
        x, yr = inp
        tr = trace(model, x)
        grads = jax.grad(lambda d: divergence(model.output, trace(model, x, deltas=d).y, yr))(
            zero_deltas(model, x))
        outs = (*tr.writes, tr.y)
        acts = []
        for k in range(len(omegas)):
            c = (outs[k] - means[k][None, :]) @ readouts[k]
            v = c * (grads[k] @ omegas[k])
            acts.append(v if per_position else jnp.sum(v, axis=0))
        return jnp.abs(jnp.concatenate(acts, axis=-1))

    return jax.lax.map(one, (xs, y_refs), batch_size=batch)


def activity(model: ChannelModel, cg: ChannelGraph, xs: Any, write_means: Sequence[Any], *,
             n_ref: int = 4, batch_size: int = 256, key: Key) -> np.ndarray:
    """``(N, n_nodes)`` activities, columns in ``cg.node_ids`` order.

    Args:
        model, cg: the cut model and its channel graph.
        xs: inputs with a leading ``batch`` axis.
        write_means: ``o_bar`` of every node (``ChannelSet.nodes[k].write_mean``).
        n_ref: references for ``D``.
        batch_size: examples per vmapped batch.
        key: PRNG key of the references.
    """
    return _run_activity("activity", model, cg, xs, write_means, len(cg.layers), n_ref,
                         batch_size, key, per_position=False)


def _run_activity(fn: str, model: ChannelModel, cg: ChannelGraph, xs: Any,
                  write_means: Sequence[Any], n_nodes: int, n_ref: int, batch_size: int,
                  key: Key, *, per_position: bool) -> np.ndarray:
    """:func:`_activity` of the first ``n_nodes`` nodes in float64 (x64 enabled locally)."""
    check_positive(fn, "batch_size", batch_size, integer=True)
    with jax.enable_x64(True):
        m64, xs = to_float64(model), as_float(xs)
        omegas, readouts, _ = _arrays(cg)
        means = [jnp.asarray(m) for m in write_means[:n_nodes]]
        y_refs = reference_outputs(m64, xs, n_ref, key=key)
        return np.asarray(_activity(m64, omegas[:n_nodes], readouts[:n_nodes], means, xs,
                                    y_refs, batch_size, per_position))


def position_activity(model: ChannelModel, cg: ChannelGraph, xs: Any,
                      write_means: Sequence[Any], *, n_ref: int = 4, batch_size: int = 64,
                      key: Key) -> tuple[np.ndarray, list[str]]:
    """Per-position activities of the writers' channels (``embed`` and the blocks; not
    ``unembed``, whose "write" is the output): ``|c_j(x, s) g_b(x, s)^T omega_j|`` without
    the sum over positions ``s`` of :func:`activity`.

    Returns:
        ``((N, P, n), ids)``: activities and the node ids of the ``n`` columns (the
        writers' part of ``cg.node_ids``, in order).
    """
    k = model.n_blocks + 1
    act = _run_activity("position_activity", model, cg, xs, write_means, k, n_ref,
                        batch_size, key, per_position=True)
    return act, [u for la in cg.layers[:k] for u in la.ids]


def usage_matrix(act: np.ndarray, frac: float = 0.9, *, rtol: float = 1e-9) -> np.ndarray:
    """``(N, n_nodes)`` bool: per row the smallest node set with ``>= frac`` of the
    activity. Activities below ``rtol`` times the largest of the whole matrix count as
    zero (round-off), so a row without real activity uses nothing."""
    if not 0.0 < frac <= 1.0:
        raise fail("usage_matrix", "frac", "in (0, 1]", frac)
    a = np.asarray(act, np.float64)
    a = np.where(a > rtol * a.max(initial=0.0), a, 0.0)
    order = np.argsort(-a, axis=1, kind="stable")
    sorted_a = np.take_along_axis(a, order, axis=1)
    total = sorted_a.sum(axis=1, keepdims=True)
    before = np.cumsum(sorted_a, axis=1) - sorted_a
    take = (before < frac * total) & (total > 0)
    out = np.zeros_like(take)
    np.put_along_axis(out, order, take, axis=1)
    return out


def co_usage_circuits(cg: ChannelGraph, usage: np.ndarray, *, resolution: float = 1.0,
                      seeds: Sequence[int] = tuple(range(10))) -> list[dict[str, Any]]:
    """Circuits: Louvain communities of the Jaccard co-usage graph (pairs joined in the
    pruned graph or in the same block), with their ``support`` (fraction of examples
    using ``>= 50%`` of the circuit's nodes). Largest first; singletons dropped."""
    ids = cg.node_ids
    if usage.shape[1] != len(ids):
        raise fail("co_usage_circuits", "usage", f"{len(ids)} columns", usage.shape[1])
    pos = {u: i for i, u in enumerate(ids)}
    layer = {u: G.parse_node_id(u)[0] for u in ids}
    joined = set()
    for (a, b), e in zip(cg.pairs, cg.edges, strict=True):
        la, lb = cg.layer(a), cg.layer(b)
        for i, j in zip(*np.nonzero(np.asarray(e) > 0), strict=True):
            joined.add(frozenset((la.ids[j], lb.ids[i])))
    u = usage.astype(np.float64)
    inter = u.T @ u
    cnt = u.sum(axis=0)
    union = cnt[:, None] + cnt[None, :] - inter
    g = nx.Graph()
    g.add_nodes_from(ids)
    for x in ids:
        for y in ids:
            if x >= y or not (layer[x] == layer[y] or frozenset((x, y)) in joined):
                continue
            i, j = pos[x], pos[y]
            jac = inter[i, j] / union[i, j] if union[i, j] > 0 else 0.0
            if jac > 0:
                g.add_edge(x, y, weight=float(jac))
    if g.size(weight="weight") == 0:
        return []
    comm = G.detect_communities(g, resolution=resolution, seeds=seeds)
    out = []
    for c in comm.communities:
        if len(c) < 2:
            continue
        cols = [pos[v] for v in sorted(c)]
        support = usage[:, cols].mean(axis=1) >= 0.5
        out.append({"members": sorted(c), "support": float(support.mean()),
                    "support_mask": support})
    return out


def data_clusters(act: np.ndarray, *, k_max: int = 6, seed: int = 0) -> dict[str, Any]:
    """k-means on the activity rows (normalised to sum 1), ``k`` by silhouette in
    ``2..k_max``: ``{"k", "silhouette", "labels", "centers"}``."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    a = np.asarray(act, np.float64)
    a = a / np.maximum(a.sum(axis=1, keepdims=True), 1e-300)
    sub = a[: min(len(a), 2000)]
    best = None
    for k in range(2, k_max + 1):
        km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(sub)
        if len(set(km.labels_)) < 2:
            continue
        s = silhouette_score(sub, km.labels_)
        if best is None or s > best[0]:
            best = (s, k, km)
    if best is None:
        return {"k": 1, "silhouette": None, "labels": np.zeros(len(a), int), "centers": None}
    s, k, km = best
    return {"k": k, "silhouette": float(s), "labels": km.predict(a),
            "centers": km.cluster_centers_}


@eqx.filter_jit
def _ablated_d(model, omegas, readouts, means, masks, xs, batch):
    n = model.n_blocks

    def one_mask(mask):
        def write_edit(k, o):
            if k > n:
                return o
            c = (o - means[k][None, :]) @ readouts[k]
            return o - ((1.0 - mask[k])[None, :] * c) @ omegas[k].T

        def one(x):
            y0 = trace(model, x).y
            y = trace(model, x, write_edit=write_edit).y
            return divergence(model.output, y, y0[None])

        return jax.lax.map(one, xs, batch_size=batch)

    return jax.vmap(one_mask)(masks)


def ablation_check(
    model: ChannelModel, cg: ChannelGraph, xs: Any, write_means: Sequence[Any],
    circuits: Sequence[dict[str, Any]], *, n_random: int = 5, batch_size: int = 256, key: Key,
) -> list[dict[str, Any]]:
    """Sufficiency (ablate everything outside the circuit) and necessity (ablate the
    circuit) on each circuit's support, against random node sets of equal size.

    Returns:
        Per circuit ``{"delta_sufficiency", "delta_necessity", "ratio",
        "random_ratio"}`` (``ratio = suff / nec``; ``None`` without support).
    """
    ids = cg.node_ids
    sizes = [la.size for la in cg.layers]
    offs = np.cumsum([0, *sizes])
    ablatable = np.ones(len(ids), bool)
    ablatable[offs[-2]:] = False  # unembed
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel()[-1])
    sets, owners = [], []
    for ci, c in enumerate(circuits):
        member = np.isin(np.asarray(ids), c["members"])
        sets += [member]
        for _ in range(n_random):
            r = np.zeros(len(ids), bool)
            pool = np.nonzero(ablatable)[0]
            r[rng.choice(pool, size=min(member[ablatable].sum(), pool.size), replace=False)] = True
            sets.append(r)
        owners.append(ci)
    masks_np = []
    for s in sets:
        masks_np.append(s | ~ablatable)  # sufficiency: keep the set (and unembed)
        masks_np.append(~(s & ablatable))  # necessity: ablate the set
    with jax.enable_x64(True):
        m64, xs_ = to_float64(model), as_float(xs)
        omegas, readouts, _ = _arrays(cg)
        means = [jnp.asarray(m) for m in write_means]
        masks = tuple(jnp.asarray(np.stack([m[offs[k]:offs[k + 1]] for m in masks_np]),
                                  jnp.float64) for k in range(len(sizes)))
        per = np.asarray(_ablated_d(m64, omegas, readouts, means, masks, xs_, batch_size))
    out = []
    stride = 2 * (1 + n_random)
    for ci, c in enumerate(circuits):
        sup = np.asarray(c["support_mask"], bool)
        if not sup.any():
            out.append({"delta_sufficiency": None, "delta_necessity": None, "ratio": None,
                        "random_ratio": None})
            continue
        d = per[ci * stride:(ci + 1) * stride, sup].mean(axis=1)
        ratio = lambda s, n: float(s / n) if n > 0 else None  # noqa: E731
        rand = [ratio(d[2 * i], d[2 * i + 1]) for i in range(1, 1 + n_random)]
        rand = [r for r in rand if r is not None]
        out.append({"delta_sufficiency": float(d[0]), "delta_necessity": float(d[1]),
                    "ratio": ratio(d[0], d[1]),
                    "random_ratio": float(np.mean(rand)) if rand else None})
    return out
