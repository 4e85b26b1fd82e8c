"""Community detection on an interaction graph and Newman modularity ``Q``.

The graph is made undirected with non-negative weights ``w_uv = t(E_{u->v}) +
t(E_{v->u})``; constant nodes are excluded. Transforms ``t``:

* ``log_eps`` (default): ``max(0, log10(E / eps_pair))``, ``eps_pair`` the pruning
  threshold of the layer pair (default: its smallest non-constant edge above round-off,
  ``1e-12`` times the pair's largest);
* ``sqrt``: ``sqrt(E)``; ``abs``: ``E / sum(E)`` per layer pair; ``raw``: ``|E|``.

Communities come from ``networkx.community.louvain_communities`` over several seeds,
keeping the partition with the highest ``Q``, where

    Q = (1/2m) sum_uv [A_uv - gamma k_u k_v / 2m] delta(c_u, c_v)
      = sum_c [L_c / m - gamma (d_c / 2m)^2].

Also: the null z-score of ``Q`` (Louvain on graphs whose edge weights are redistributed
within each layer pair, see :func:`null_modularity`; Guimera et al. 2004 show that the
maximised ``Q`` of a structureless graph is well above 0, so ``Q`` alone says little), and
the target-n mode that searches the resolution for exactly ``n`` non-singleton communities.

Everything here runs on the host (never jitted).

References:
    Newman (2006), "Modularity and community structure in networks" (PNAS 103:8577);
    Blondel et al. (2008), "Fast unfolding of communities in large networks" (Louvain);
    Bushnaq et al. (2024), "The Local Interaction Basis" (arXiv 2405.10928); Guimera,
    Sales-Pardo, Amaral (2004), "Modularity from fluctuations in random graphs".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import networkx as nx
import numpy as np

from .._checks import check_in, check_positive, fail
from .graph import Graph, parse_node_id

__all__ = [
    "TRANSFORMS",
    "Communities",
    "detect_communities",
    "modularity",
    "null_modularity",
    "null_report",
    "null_z",
    "target_n_communities",
    "undirected",
]

TRANSFORMS = ("log_eps", "sqrt", "abs", "raw")
NULL_MODES = ("edges", "pairs")
ROUNDOFF = 1e-12


def _transform(e: np.ndarray, free: np.ndarray, transform: str, eps: float | None) -> np.ndarray:
    a = np.where(free, 0.0, np.abs(np.asarray(e, np.float64)))
    if transform == "raw":
        return a
    if transform == "sqrt":
        return np.sqrt(a)
    if transform == "abs":
        total = a.sum()
        return a / total if total > 0 else a
    if eps is None:  # the smallest edge above round-off (1e-12 of the pair's largest)
        positive = a[a > ROUNDOFF * a.max(initial=0.0)]
        eps = float(positive.min()) if positive.size else 1.0
    with np.errstate(divide="ignore"):
        return np.maximum(0.0, np.log10(np.where(a > 0, a, 1.0) / eps)) * (a > 0)


def undirected(
    graph: Graph, *, transform: str = "log_eps", eps: float | Sequence[float] | None = None
) -> nx.Graph:
    """The weighted undirected networkx graph clustered by :func:`detect_communities`.

    Args:
        graph: the interaction graph.
        transform: one of :data:`TRANSFORMS`.
        eps: ``log_eps`` threshold, scalar or one per layer pair; default: the smallest
            non-constant edge of each pair above ``1e-12`` times its largest.

    Returns:
        ``nx.Graph`` over the non-constant nodes (attribute ``layer_index``), edges with
        positive weight only.

    Raises:
        ValueError: on an unknown transform or a wrong number of ``eps`` values.
    """
    fn = "undirected"
    check_in(fn, "transform", transform, TRANSFORMS)
    n = len(graph.edges)
    epss = list(eps) if isinstance(eps, Sequence) else [eps] * n
    if len(epss) != n:
        raise fail(fn, "eps", f"a scalar or one value per layer pair ({n})", len(epss))
    g = nx.Graph()
    for li, la in enumerate(graph.layers):
        for nid, c in zip(la.ids, la.constant_mask, strict=True):
            if not c:
                g.add_node(nid, layer_index=li)
    for li, e in enumerate(graph.edges):
        src, dst = graph.layers[li], graph.layers[li + 1]
        free = src.constant_mask[None, :] | dst.constant_mask[:, None]
        w = _transform(e, free, transform, epss[li])
        for i, j in zip(*np.nonzero(w > 0), strict=True):
            u, v = src.ids[j], dst.ids[i]
            prev = g.get_edge_data(u, v, {"weight": 0.0})["weight"]
            g.add_edge(u, v, weight=prev + float(w[i, j]))
    return g


def modularity(
    g: nx.Graph, communities: Iterable[Iterable[str]], *, resolution: float = 1.0
) -> float:
    """Newman modularity ``Q`` of a partition of ``g`` (weights ``weight``)."""
    parts = [set(c) for c in communities]
    if g.size(weight="weight") == 0:
        return 0.0
    return float(nx.community.modularity(g, parts, weight="weight", resolution=resolution))


class Communities(NamedTuple):
    """A partition of the non-constant nodes and its report.

    Attributes:
        communities: node-id sets, largest first.
        modularity: ``Q`` at ``resolution``.
        resolution: ``gamma``.
        sizes: size of each community.
        n_nonsingleton: communities with more than one node.
        spans: node layers each community covers.
        inside_fraction: ``sum_c L_c / m``, the edge weight inside communities.
        n_isolated: nodes without any edge.
    """

    communities: list[frozenset[str]]
    modularity: float
    resolution: float
    sizes: list[int]
    n_nonsingleton: int
    spans: list[int]
    inside_fraction: float
    n_isolated: int


def detect_communities(
    graph: Graph | nx.Graph,
    *,
    resolution: float = 1.0,
    seeds: Sequence[int] = tuple(range(10)),
    transform: str = "log_eps",
    eps: float | Sequence[float] | None = None,
) -> Communities:
    """Louvain communities of the non-constant nodes, best ``Q`` over ``seeds``.

    Args:
        graph: a :class:`Graph` (made undirected by :func:`undirected`) or an undirected
            weighted ``nx.Graph``.
        resolution: ``gamma``.
        seeds: Louvain seeds tried.
        transform, eps: see :func:`undirected`.

    Returns:
        :class:`Communities`.

    Raises:
        ValueError: on ``resolution <= 0`` or no seeds.
    """
    fn = "detect_communities"
    check_positive(fn, "resolution", resolution)
    if not len(seeds):
        raise fail(fn, "seeds", "at least one seed", seeds)
    g = graph if isinstance(graph, nx.Graph) else undirected(graph, transform=transform, eps=eps)
    best, best_q = None, -np.inf
    for s in seeds:
        parts = nx.community.louvain_communities(
            g, weight="weight", resolution=resolution, threshold=1e-7, seed=int(s)
        )
        q = modularity(g, parts, resolution=resolution)
        if q > best_q + 1e-12:
            best, best_q = parts, q
    parts = sorted((frozenset(c) for c in best or []), key=lambda c: (-len(c), sorted(c)))
    total = g.size(weight="weight")
    inside = sum(g.subgraph(c).size(weight="weight") for c in parts)

    def span(c: frozenset[str]) -> int:
        return len({g.nodes[u].get("layer_index", parse_node_id(u)[0]) for u in c})

    return Communities(
        communities=parts,
        modularity=float(best_q),
        resolution=float(resolution),
        sizes=[len(c) for c in parts],
        n_nonsingleton=sum(len(c) > 1 for c in parts),
        spans=[span(c) for c in parts],
        inside_fraction=float(inside / total) if total else 0.0,
        n_isolated=sum(1 for u in g.nodes if g.degree(u) == 0),
    )


def _layer_key(g: nx.Graph, u: str) -> object:
    return g.nodes[u].get("layer_index", parse_node_id(u)[0])


def null_modularity(
    g: nx.Graph,
    *,
    resolution: float = 1.0,
    n_graphs: int = 20,
    seeds: Sequence[int] = (0, 1, 2),
    seed: int = 0,
    mode: str = "edges",
) -> dict[str, Any]:
    """The modularity of null graphs with the same layout.

    Each null graph keeps the nodes of ``g``; for every pair of node layers (node attribute
    ``layer_index``, else the layer of the node id) it redistributes that pair's edge
    weights, and its ``Q`` is the best Louvain ``Q`` over ``seeds``:

    * ``mode="edges"`` (the spec's null): the weights are permuted among the existing
      edges of the pair, so the topology is kept and only the arrangement of the weights
      is tested;
    * ``mode="pairs"``: the weights are placed on node pairs drawn uniformly without
      replacement among all node pairs of the two layers, destroying the topology too.
      On a sparse (pruned) graph this null is a sparse random graph, whose maximised ``Q``
      is high.

    The two agree when every node pair of each layer pair carries an edge.

    Args:
        g: the undirected weighted graph (as from :func:`undirected`).
        resolution: ``gamma``.
        n_graphs: null graphs drawn.
        seeds: Louvain seeds per null graph.
        seed: seed of the permutations.
        mode: ``edges`` or ``pairs``.

    Returns:
        ``{"mean", "std", "values"}`` (``values``: the ``n_graphs`` null ``Q``).

    Raises:
        ValueError: on ``n_graphs < 1``.
    """
    check_positive("null_modularity", "n_graphs", n_graphs, integer=True)
    check_in("null_modularity", "mode", mode, NULL_MODES)
    rng = np.random.default_rng(seed)
    members: dict[object, list[str]] = {}
    for u in g.nodes:
        members.setdefault(_layer_key(g, u), []).append(u)
    groups: dict[tuple[object, object], list[tuple[str, str, float]]] = {}
    for u, v, w in g.edges(data="weight"):
        a, b = sorted((_layer_key(g, u), _layer_key(g, v)), key=repr)
        groups.setdefault((a, b), []).append((u, v, float(w)))
    qs = []
    for _ in range(n_graphs):
        h = nx.Graph()
        h.add_nodes_from(g.nodes(data=True))
        for (a, b), es in groups.items():
            ws = rng.permutation([w for _, _, w in es])
            if mode == "edges":
                for (x, y, _), w in zip(es, ws, strict=True):
                    h.add_edge(x, y, weight=float(w))
                continue
            xs, ys = members[a], members[b]
            if a == b:
                ii, jj = np.triu_indices(len(xs), k=1)
            else:
                ii, jj = np.divmod(np.arange(len(xs) * len(ys)), len(ys))
            pick = rng.choice(ii.size, size=len(ws), replace=False)
            for w, k in zip(ws, pick, strict=True):
                x, y = xs[int(ii[k])], (xs if a == b else ys)[int(jj[k])]
                h.add_edge(x, y, weight=float(w))
        qs.append(detect_communities(h, resolution=resolution, seeds=seeds).modularity)
    return {"mean": float(np.mean(qs)), "std": float(np.std(qs)), "values": qs}


def null_z(q: float, null: dict[str, Any]) -> float | None:
    """``(Q - mean Q_null) / std Q_null`` (``None`` when the null has no spread)."""
    return (q - null["mean"]) / null["std"] if null["std"] > 0 else None


def null_report(
    g: nx.Graph, q: float, *, resolution: float, n_graphs: int, mode: str = "edges"
) -> dict[str, Any]:
    """``{"null_mean", "null_std", "null_z"}`` of ``Q = q`` against :func:`null_modularity`."""
    null = null_modularity(g, resolution=resolution, n_graphs=n_graphs, mode=mode)
    return {"null_mean": null["mean"], "null_std": null["std"], "null_z": null_z(q, null)}


def target_n_communities(
    g: nx.Graph,
    n: int,
    *,
    gamma0: float = 1.0,
    n_gammas: int = 10,
    max_draws: int = 200,
    seeds: Sequence[int] = tuple(range(10)),
    seed: int = 0,
) -> Communities | None:
    """Communities with exactly ``n`` non-singleton communities (LIB's plotting mode).

    Draws ``gamma ~ LogNormal(log gamma0, 1)`` until ``n_gammas`` of them give exactly
    ``n`` non-singleton communities (at most ``max_draws`` draws) and keeps the partition
    with the highest ``Q`` (each at its own ``gamma``).

    Args:
        g: the undirected weighted graph.
        n: non-singleton communities wanted.
        gamma0: median of the resolution draws.
        n_gammas: accepted resolutions to collect.
        max_draws: draws before giving up.
        seeds: Louvain seeds per resolution.
        seed: seed of the resolution draws.

    Returns:
        The best :class:`Communities`, or ``None`` when no draw gave ``n`` communities.

    Raises:
        ValueError: on non-positive ``n``, ``gamma0``, ``n_gammas`` or ``max_draws``.
    """
    fn = "target_n_communities"
    check_positive(fn, "n", n, integer=True)
    check_positive(fn, "gamma0", gamma0)
    check_positive(fn, "n_gammas", n_gammas, integer=True)
    check_positive(fn, "max_draws", max_draws, integer=True)
    rng = np.random.default_rng(seed)
    best: Communities | None = None
    found = 0
    for _ in range(max_draws):
        gamma = float(np.exp(rng.normal(np.log(gamma0), 1.0)))
        c = detect_communities(g, resolution=gamma, seeds=seeds)
        if c.n_nonsingleton != n:
            continue
        found += 1
        if best is None or c.modularity > best.modularity:
            best = c
        if found == n_gammas:
            break
    return best
