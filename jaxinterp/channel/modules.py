"""Connected modules and modularity of a channel graph (spec section 6): Louvain
communities at several resolutions (best ``Q`` over seeds, via the shared
:func:`~jaxinterp.graph.detect_communities`), the null z-score over graphs whose edge
weights are placed on random node pairs of each block pair (the shared
:func:`~jaxinterp.graph.community.null_modularity`, ``mode="pairs"``), and the adjusted
Rand index against planted module labels.

References:
    Newman (2006), "Modularity and community structure in networks" (PNAS 103:8577);
    Blondel et al. (2008), "Fast unfolding of communities in large networks"; Guimera,
    Sales-Pardo, Amaral (2004), "Modularity from fluctuations in random graphs" (the null
    z-score); Hubert & Arabie (1985), "Comparing partitions" (ARI).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
from sklearn.metrics import adjusted_rand_score

from .. import graph as G
from .._checks import fail
from .assemble import ChannelGraph, to_networkx

__all__ = ["channel_modules", "partition_ari", "planted_modularity"]


def _report(c: G.Communities) -> dict[str, Any]:
    return {
        "modularity_q": c.modularity,
        "n_communities": len(c.communities),
        "n_nonsingleton": c.n_nonsingleton,
        "sizes": c.sizes,
        "spans": c.spans,
        "inside_fraction": c.inside_fraction,
        "n_isolated": c.n_isolated,
        "members": [sorted(m) for m in c.communities],
    }


def partition_ari(communities: Sequence[Sequence[str]], labels: Mapping[str, int]) -> float:
    """ARI of the partition against planted labels, over the labelled nodes."""
    comm = {u: i for i, c in enumerate(communities) for u in c}
    nodes = sorted(u for u in labels if u in comm)
    if not nodes:
        raise fail("partition_ari", "labels", "labels of nodes in the partition", "none")
    return float(adjusted_rand_score([labels[u] for u in nodes], [comm[u] for u in nodes]))


def planted_modularity(g: nx.Graph, labels: Mapping[str, int], *,
                       resolution: float = 1.0) -> float:
    """``Q`` of the planted partition of ``g`` (one community per label, unlabelled nodes
    as singletons): if the best ``Q`` found exceeds it, the planted modules are not the
    modularity maximum at this resolution (no search could return them)."""
    groups: dict[Any, set[str]] = {}
    for u in g.nodes:
        groups.setdefault(labels.get(u, ("single", u)), set()).add(u)
    return G.modularity(g, list(groups.values()), resolution=resolution)


def channel_modules(
    cg: ChannelGraph,
    *,
    resolutions: Sequence[float] = (1.0, 0.5),
    seeds: Sequence[int] = tuple(range(10)),
    n_null: int = 20,
    labels: Mapping[str, int] | None = None,
    transform: str = "log_eps",
) -> dict[str, Any]:
    """Communities, modularity, null z-score and (with ``labels``) ARI per resolution
    (``transform``: edge weights, see :func:`~jaxinterp.graph.undirected`).

    Returns:
        ``{"gamma=<g>": {"modularity_q", "n_communities", "n_nonsingleton", "sizes",
        "spans", "inside_fraction", "n_isolated", "members", "null_mean", "null_std",
        "null_z", "ari"?, "planted_q"?}}`` (``planted_q``: ``Q`` of the planted
        partition, with ``labels``).
    """
    g = to_networkx(cg, transform=transform)
    out: dict[str, Any] = {}
    for gamma in resolutions:
        if g.size(weight="weight") == 0:
            out[f"gamma={gamma:g}"] = {"modularity_q": 0.0, "n_communities": g.number_of_nodes(),
                                       "n_nonsingleton": 0, "members": []}
            continue
        c = G.detect_communities(g, resolution=gamma, seeds=seeds)
        rep = _report(c)
        if n_null:
            rep.update(G.community.null_report(g, c.modularity, resolution=gamma,
                                               n_graphs=n_null, mode="pairs"))
        if labels is not None:
            rep["ari"] = partition_ari(c.communities, labels)
            rep["planted_q"] = planted_modularity(g, labels, resolution=gamma)
        out[f"gamma={gamma:g}"] = rep
    return out
