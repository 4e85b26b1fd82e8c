"""The channel graph's checks on the trained targets without planted modules (spec
section 8, T4-T6), written to ``metrics.json`` by :mod:`.run`.

* :func:`circuit_coverage` (every target): per node, how its graph-node write channels
  spread over the co-usage circuits of section 5; the largest share in one circuit is
  the T4/T5 test "the MLP write channels form one co-used circuit".
* :func:`resid_mlp_checks` (``resid-mlp-*``, T4 and T5): each MLP's read/write ranks
  against the exact bound ``d_mlp`` (its Jacobian is ``W_in D(x) W_out``), the edges
  between ``embed``, the MLPs and ``unembed``, ``w(MLP_1 -> MLP_2)`` against
  ``w(embed -> MLP_2)``, whether all MLPs' channels sit in one circuit, and whether that
  circuit is used exactly when some feature is active.
* :func:`modadd_checks` (``modadd``, T6): Fourier labels of every channel node from its
  write coefficient tabulated over all ``p^2`` inputs (LIB's
  :func:`~jaxinterp.lib.fourier.fourier_labels`), the same-frequency share of the edge
  weight (:func:`~jaxinterp.lib.fourier.same_frequency_fraction`), and the number and
  frequency purity of the channel-level communities against the key frequencies of the
  embedding.

References:
    specs/channel-graph.md section 8 (project method); Braun et al. (2025), "Interpretability
    in Parameter Space" (arXiv 2501.14926), the residual-MLP toys; Nanda et al. (2023),
    "Progress measures for grokking via mechanistic interpretability" (arXiv 2301.05217).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_positive, fail
from ..graph import parse_node_id
from ..lib.fourier import fourier_labels, same_frequency_fraction
from .adapters import as_float
from .assemble import to_networkx
from .model import ChannelModel, to_float64, trace
from .pipeline import ChannelAnalysis
from .subspaces import numerical_rank

__all__ = ["channel_coefficients", "circuit_coverage", "modadd_checks", "resid_mlp_checks"]


def circuit_coverage(res: ChannelAnalysis, names: Sequence[str]) -> dict[str, Any]:
    """Per node ``name``: ``n_channels`` (graph nodes), ``largest_circuit`` (index into
    ``res.circuits`` holding most of them, ``None`` if none), ``fraction`` of its graph
    nodes in that circuit, and ``fraction_eta`` of its ``eta``-rank channels (the leading
    ones) in it."""
    out = {}
    for k, name in enumerate(names):
        m = res.channels.graph_rank(k)
        eta = min(res.channels.rank_out(k), m)
        counts = [[i for la, i in map(parse_node_id, c["members"]) if la == name]
                  for c in res.circuits]
        sizes = [len(c) for c in counts]
        best = int(np.argmax(sizes)) if sizes and max(sizes) > 0 else None
        idx = counts[best] if best is not None else []
        out[name] = {"n_channels": m, "n_eta": eta, "largest_circuit": best,
                     "fraction": len(idx) / m if m else 0.0,
                     "fraction_eta": sum(j < eta for j in idx) / eta if eta else 0.0}
    return out


def _edge(res: ChannelAnalysis, names: Sequence[str], a: int, b: int) -> dict[str, Any]:
    e4 = res.causal.channel[(a, b)]
    i = res.graph.pairs.index((names[a], names[b]))
    return {"driven_variance": res.causal.w[(a, b)], "ablation": res.causal.ablation[(a, b)],
            "signed": res.causal.signed[(a, b)], "channel_sum": float(np.sum(e4)),
            "kept": res.graph.block_weights[i] > 0,
            "channel_kept": int((np.asarray(res.graph.edges[i]) > 0).sum())}


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 else None


def resid_mlp_checks(model: Any, res: ChannelAnalysis, xs: Any,
                     names: Sequence[str]) -> dict[str, Any]:
    """T4 (one layer) / T5 (several layers) checks of a ``resid-mlp-*`` run.

    Returns:
        ``{"rank_bound", "ranks" (per MLP: read/write eta and numerical ranks,
        ``within_bound``), "edges" (every admissible pair), "expected_edges_kept"
        (``embed -> MLP_l``, ``MLP_l -> unembed``, ``embed -> unembed``), "coverage"
        (per MLP, see :func:`circuit_coverage`), "one_circuit" (every MLP's largest
        circuit is the same one), "min_fraction", "circuit_support", "circuit_usage"
        (precision/recall of "some channel of that circuit is used" against "some feature
        is active"), "cross_layer"`` (several layers: ``w(MLP_{l-1} -> MLP_l)`` against
        ``w(embed -> MLP_l)`` for E3, its finite version and the E4 sum).
    """
    n = len(names) - 2
    bound = int(model.d_mlp)
    ranks = {}
    for k in range(1, n + 1):
        r = {"read_eta": res.channels.rank_in(k), "write_eta": res.channels.rank_out(k),
             "read_numerical": numerical_rank(res.channels.nodes[k].read_lambdas),
             "write_numerical": numerical_rank(res.channels.nodes[k].write_mus)}
        r["within_bound"] = max(r.values()) <= bound
        ranks[names[k]] = r
    edges = {f"{names[a]}->{names[b]}": _edge(res, names, a, b) for (a, b) in res.causal.w}
    expect = [f"embed->{names[k]}" for k in range(1, n + 1)]
    expect += [f"{names[k]}->unembed" for k in range(1, n + 1)] + ["embed->unembed"]
    cov = circuit_coverage(res, names)
    mlp_cov = {names[k]: cov[names[k]] for k in range(1, n + 1)}
    best = {v["largest_circuit"] for v in mlp_cov.values()}
    one = len(best) == 1 and None not in best
    out: dict[str, Any] = {
        "rank_bound": bound, "ranks": ranks, "edges": edges,
        "expected_edges_kept": {e: edges[e]["kept"] for e in expect},
        "coverage": mlp_cov, "one_circuit": one,
        "min_fraction": min(v["fraction"] for v in mlp_cov.values()),
        "min_fraction_eta": min(v["fraction_eta"] for v in mlp_cov.values()),
    }
    if one and res.usage is not None:
        c = res.circuits[best.pop()]
        cols = np.isin(np.asarray(res.graph.node_ids), c["members"])
        used = np.asarray(res.usage)[:, cols].any(axis=1)
        active = np.any(np.asarray(xs) != 0, axis=1)
        tp = float((used & active).sum())
        out["circuit_support"] = c["support"]
        out["circuit_usage"] = {"precision": tp / max(float(used.sum()), 1.0),
                                "recall": tp / max(float(active.sum()), 1.0),
                                "fraction_active": float(active.mean())}
    if n > 1:
        out["cross_layer"] = {}
        for k in range(2, n + 1):
            prev, emb = edges[f"{names[k - 1]}->{names[k]}"], edges[f"embed->{names[k]}"]
            out["cross_layer"][names[k]] = {
                m: {"previous_mlp": prev[m], "embed": emb[m], "ratio": _ratio(prev[m], emb[m])}
                for m in ("driven_variance", "ablation", "channel_sum")}
    return out


@eqx.filter_jit
def _coefficients(model: ChannelModel, readouts: Any, means: Any, xs: Any, batch: int) -> Any:
    def one(x: Any) -> tuple[Any, ...]:
        tr = trace(model, x)
        outs = (*tr.writes, tr.y)
        return tuple((o - m[None, :]) @ r for o, m, r in zip(outs, means, readouts, strict=True))

    return jax.lax.map(one, xs, batch_size=batch)


def channel_coefficients(model: ChannelModel, res: ChannelAnalysis, xs: Any, *,
                         batch_size: int = 512) -> list[np.ndarray]:
    """Write coefficients ``c = (o - o_bar) @ readout`` of every graph node: per node
    layer ``(N, P, m)`` (float64; ``unembed``: of ``y``)."""
    check_positive("channel_coefficients", "batch_size", batch_size, integer=True)
    layers = res.graph.layers
    with jax.enable_x64(True):
        readouts = tuple(jnp.asarray(np.asarray(la.basis_pinv).T) for la in layers)
        means = tuple(jnp.asarray(c.write_mean) for c in res.channels.nodes)
        out = _coefficients(to_float64(model), readouts, means, as_float(xs), int(batch_size))
    return [np.asarray(o, np.float64) for o in out]


def modadd_checks(model: Any, cm: ChannelModel, res: ChannelAnalysis, names: Sequence[str], *,
                  transform: str = "log_eps") -> dict[str, Any]:
    """T6 checks of a ``modadd`` run (``cm``: the cut the run used).

    Returns:
        ``{"key_frequencies" (of the embedding), "n_key_frequencies", "nodes" (per node
        layer: ``frequencies``, ``purity``), "same_frequency_edge_fraction" (``raw``: pruned
        E4 weight joining equal non-zero frequencies over all pruned E4 weight, pooled over
        block pairs; ``raw_eta``: the same among the ``eta``-rank channels; ``per_pair``;
        ``clustering``: the same on the undirected
        ``transform`` weights Louvain clusters), "communities" (per resolution:
        ``n_nonsingleton`` and per non-singleton community its ``size``,
        ``dominant_frequency`` (most common non-zero label), ``purity`` (its share of the
        members) and ``layers``; ``mean_purity`` weighted by size; ``n_in_range`` whether
        the count is within 3-6 and ``matches_key_count``)}``.
    """
    from ..models.modadd import all_tokens, key_frequencies

    if len(names) != len(res.graph.layers):
        raise fail("modadd_checks", "names", f"{len(res.graph.layers)} node names", len(names))
    p = int(model.p)
    coeffs = channel_coefficients(cm, res, all_tokens(p))
    freq: dict[str, int] = {}
    nodes = {}
    for la, c in zip(res.graph.layers, coeffs, strict=True):
        if c.shape[-1] == 0:
            nodes[la.name] = {"frequencies": [], "purity": []}
            continue
        lab = fourier_labels(c.reshape(p, p, *c.shape[1:]))
        nodes[la.name] = {"frequencies": lab.frequency.tolist(), "purity": lab.purity.tolist()}
        freq.update({nid: int(f) for nid, f in zip(la.ids, lab.frequency, strict=True)})
    eta = {la.name: min(res.channels.rank_out(k), la.size)
           for k, la in enumerate(res.graph.layers)}
    per_pair: dict[str, float] = {}
    sums = np.zeros((2, 2))  # rows: all graph nodes / eta-rank nodes; columns: same, total
    for (a, b), e in zip(res.graph.pairs, res.graph.edges, strict=True):
        e = np.abs(np.asarray(e, np.float64))
        for row, (n_in, n_out) in enumerate(((e.shape[1], e.shape[0]), (eta[a], eta[b]))):
            sub = e[:n_out, :n_in]
            if sub.size == 0 or sub.sum() == 0:
                continue
            f = same_frequency_fraction(e, np.asarray(nodes[a]["frequencies"][:n_in]),
                                        np.asarray(nodes[b]["frequencies"][:n_out]),
                                        np.arange(n_in), np.arange(n_out))
            if row == 0:
                per_pair[f"{a}->{b}"] = f
            sums[row] += (f * sub.sum(), sub.sum())
    g = to_networkx(res.graph, transform=transform)
    cl_same = sum(d["weight"] for u, v, d in g.edges(data=True) if freq[u] == freq[v] > 0)
    cl_total = g.size(weight="weight")
    keys = [int(k) for k in key_frequencies(model)]
    comms = {}
    for gamma, rep in res.modules.items():
        groups = [m for m in rep.get("members", []) if len(m) > 1]
        items = []
        for m in groups:
            counts = Counter(freq[u] for u in m if freq[u] > 0)
            dom, cnt = counts.most_common(1)[0] if counts else (0, 0)
            items.append({"size": len(m), "dominant_frequency": int(dom),
                          "purity": cnt / len(m),
                          "layers": sorted({parse_node_id(u)[0] for u in m})})
        sizes = np.asarray([i["size"] for i in items], np.float64)
        n_ns = len(items)
        comms[gamma] = {
            "n_nonsingleton": n_ns, "n_in_range": 3 <= n_ns <= 6,
            "matches_key_count": n_ns == len(keys),
            "mean_purity": (float(np.dot(sizes, [i["purity"] for i in items]) / sizes.sum())
                            if n_ns else None),
            "dominant_frequencies": sorted({i["dominant_frequency"] for i in items}),
            "communities": items,
        }
    return {
        "key_frequencies": keys, "n_key_frequencies": len(keys), "nodes": nodes,
        "same_frequency_edge_fraction": {
            "raw": float(sums[0, 0] / sums[0, 1]) if sums[0, 1] > 0 else 0.0,
            "raw_eta": float(sums[1, 0] / sums[1, 1]) if sums[1, 1] > 0 else 0.0,
            "per_pair": per_pair,
            "clustering": float(cl_same / cl_total) if cl_total > 0 else 0.0},
        "communities": comms,
    }
