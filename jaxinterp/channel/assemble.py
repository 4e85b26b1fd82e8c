"""The channel graph: nodes are write channels, one node layer per block, and edges for
every admissible block pair (spec sections 4 and 6).

A :class:`ChannelGraph` reuses the shared :class:`~jaxinterp.graph.NodeLayer` (importance
``mu``, basis ``omega (d, m)``, ``basis_pinv`` the readout transposed, so ``c = (o -
o_bar) @ basis_pinv.T``). Unlike the shared :class:`~jaxinterp.graph.Graph`, whose edges
join adjacent layers only, residual models have skip edges (``embed -> A_2``), so edges
are kept per ordered pair; :func:`as_graph` gives the shared type when the pairs form a
chain (sequential mode). The block-level weights are E3 (``w``).

Pruning (``prune``):

* ``null``: keep an edge above the ``quantile`` of the rotation-null edges of its block
  pair (the spec);
* ``roundoff``: keep edges above ``rtol`` times the largest edge of the graph.

References:
    specs/channel-graph.md sections 4 and 6 (project method); Newman (2006),
    "Modularity and community structure in networks" (PNAS 103:8577).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import equinox as eqx
import networkx as nx
import numpy as np

from .. import graph as G
from .. import io
from .._checks import check_in, fail
from .edges import CausalEdges
from .model import ChannelModel
from .subspaces import ChannelSet

__all__ = ["PRUNE", "ChannelGraph", "as_graph", "assemble", "block_components", "from_json",
           "load_json", "save_json", "to_json", "to_networkx"]

PRUNE = ("null", "roundoff", "none")
FORMAT = "jaxinterp.channel_graph"


class ChannelGraph(eqx.Module):
    """Write-channel nodes per block and edges per admissible pair.

    Attributes:
        layers: one :class:`~jaxinterp.graph.NodeLayer` per node (``embed``, blocks,
            ``unembed``): its graph-node write channels (``ChannelSet.graph_rank``).
        pairs: ``(writer, reader)`` layer names.
        edges: E4 per pair, ``(m_reader, m_writer)``, after pruning.
        block_weights: E3 ``w`` per pair (after pruning at block level).
        thresholds: the E4 pruning threshold of each pair (``log_eps`` epsilon).
        block_thresholds: the E3 pruning threshold of each pair.
    """

    layers: tuple[G.NodeLayer, ...]
    pairs: tuple[tuple[str, str], ...] = eqx.field(static=True)
    edges: tuple[Any, ...]
    block_weights: tuple[float, ...] = eqx.field(static=True)
    thresholds: tuple[float, ...] = eqx.field(static=True)
    block_thresholds: tuple[float, ...] = eqx.field(static=True)

    def __check_init__(self):
        names = [la.name for la in self.layers]
        n = len(self.pairs)
        for field in ("edges", "block_weights", "thresholds", "block_thresholds"):
            if len(getattr(self, field)) != n:
                raise fail("ChannelGraph", field, f"one entry per pair ({n})",
                           len(getattr(self, field)))
        for (a, b), e in zip(self.pairs, self.edges, strict=True):
            if a not in names or b not in names:
                raise fail("ChannelGraph", "pairs", f"names among {names}", (a, b))
            want = (self.layer(b).size, self.layer(a).size)
            if np.shape(e) != want:
                raise fail("ChannelGraph", f"edges {a}->{b}", f"of shape {want}", np.shape(e))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(la.name for la in self.layers)

    def layer(self, name: str) -> G.NodeLayer:
        if name not in self.names:
            raise fail("ChannelGraph.layer", "name", "one of " + ", ".join(self.names),
                       repr(name))
        return self.layers[self.names.index(name)]

    def edge(self, a: str, b: str) -> np.ndarray:
        if (a, b) not in self.pairs:
            raise fail("ChannelGraph.edge", "(a, b)", "an admissible pair", (a, b))
        return np.asarray(self.edges[self.pairs.index((a, b))])

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(i for la in self.layers for i in la.ids)


def _layers(cs: ChannelSet) -> tuple[G.NodeLayer, ...]:
    out = []
    for k, c in enumerate(cs.nodes):
        r = cs.graph_rank(k)
        out.append(G.NodeLayer(name=c.name, importance=np.asarray(c.write_mus[:r]),
                               index=tuple(range(r)), basis=c.write_vectors[:, :r],
                               basis_pinv=c.write_readout[:, :r].T))
    return tuple(out)


def assemble(
    model: ChannelModel,
    cs: ChannelSet,
    ce: CausalEdges,
    *,
    prune: str = "null",
    quantile: float = 0.99,
    rtol: float = 1e-9,
) -> ChannelGraph:
    """The pruned :class:`ChannelGraph` of channels ``cs`` and edges ``ce``.

    Raises:
        ValueError: on an unknown ``prune`` or ``quantile`` outside ``(0, 1)``.
    """
    check_in("assemble", "prune", prune, PRUNE)
    if not 0.0 < quantile < 1.0:
        raise fail("assemble", "quantile", "in (0, 1)", quantile)
    names = model.node_names
    keys = list(ce.channel)
    e_max = max((float(np.max(ce.channel[p], initial=0.0)) for p in keys), default=0.0)
    w_max = max((ce.w[p] for p in keys), default=0.0)
    pairs, edges, weights, ths, bths = [], [], [], [], []
    for p in keys:
        e, w = np.asarray(ce.channel[p]), ce.w[p]
        if prune == "null":
            th = float(np.quantile(ce.null_channel[p], quantile)) if e.size else 0.0
            bth = float(np.quantile(ce.null_w[p], quantile))
        elif prune == "roundoff":
            th, bth = rtol * e_max, rtol * w_max
        else:
            th = bth = 0.0
        pairs.append((names[p[0]], names[p[1]]))
        edges.append(np.where(e > th, e, 0.0))
        weights.append(float(w) if w > bth else 0.0)
        ths.append(th)
        bths.append(bth)
    return ChannelGraph(layers=_layers(cs), pairs=tuple(pairs), edges=tuple(edges),
                        block_weights=tuple(weights), thresholds=tuple(ths),
                        block_thresholds=tuple(bths))


def block_components(cg: ChannelGraph, *, boundary: bool = False) -> list[list[str]]:
    """Connected components (union-find) of the pruned block graph, ``embed`` and
    ``unembed`` excluded unless ``boundary``; sorted by size, then name order."""
    parent = {n: n for n in cg.names if boundary or n not in ("embed", "unembed")}

    def find(u: str) -> str:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for (a, b), w in zip(cg.pairs, cg.block_weights, strict=True):
        if w > 0 and a in parent and b in parent:
            parent[find(a)] = find(b)
    comps: dict[str, list[str]] = {}
    for n in parent:
        comps.setdefault(find(n), []).append(n)
    order = {n: i for i, n in enumerate(cg.names)}
    return sorted((sorted(c, key=order.get) for c in comps.values()),
                  key=lambda c: (-len(c), order[c[0]]))


def to_networkx(cg: ChannelGraph, *, transform: str = "log_eps") -> nx.Graph:
    """The undirected weighted channel graph clustered by
    :func:`~jaxinterp.graph.detect_communities`: each pair is made undirected with the
    shared :func:`~jaxinterp.graph.undirected` (``log_eps`` with the pair's pruning
    threshold as epsilon; round-off ``1e-12`` of the pair's largest edge if 0), summed."""
    g = nx.Graph()
    for li, la in enumerate(cg.layers):
        for nid in la.ids:
            g.add_node(nid, layer_index=li)
    for (a, b), e, th in zip(cg.pairs, cg.edges, cg.thresholds, strict=True):
        pair = G.Graph(layers=(cg.layer(a), cg.layer(b)), edges=(np.asarray(e),))
        eps = th if th > 0 else None
        sub = G.undirected(pair, transform=transform, eps=eps)
        for u, v, data in sub.edges(data=True):
            prev = g.get_edge_data(u, v, {"weight": 0.0})["weight"]
            g.add_edge(u, v, weight=prev + data["weight"])
    return g


def as_graph(cg: ChannelGraph) -> G.Graph:
    """The shared :class:`~jaxinterp.graph.Graph` when the pairs form the chain of
    consecutive layers (sequential mode).

    Raises:
        ValueError: for skip edges (residual mode).
    """
    chain = list(zip(cg.names[:-1], cg.names[1:], strict=True))
    if sorted(cg.pairs) != sorted(chain):
        raise fail("as_graph", "cg", "a chain of consecutive layers (sequential mode)",
                   f"pairs {list(cg.pairs)}", "Use to_networkx for residual graphs.")
    return G.Graph(layers=cg.layers, edges=tuple(cg.edge(a, b) for a, b in chain))


def to_json(cg: ChannelGraph) -> dict[str, Any]:
    """A JSON-ready dict: the node layers in the shared graph format (with bases) and
    one entry per pair."""
    chain = G.Graph(layers=cg.layers, edges=tuple(
        np.zeros((b.size, a.size)) for a, b in zip(cg.layers[:-1], cg.layers[1:], strict=True)))
    return {
        "format": FORMAT, "version": 1,
        "nodes": G.to_json(chain, include_basis=True),
        "pairs": [{"writer": a, "reader": b, "edges": np.asarray(e, np.float64).tolist(),
                   "block_weight": w, "threshold": t, "block_threshold": bt}
                  for (a, b), e, w, t, bt in zip(cg.pairs, cg.edges, cg.block_weights,
                                                 cg.thresholds, cg.block_thresholds,
                                                 strict=True)],
    }


def from_json(data: dict[str, Any]) -> ChannelGraph:
    """The :class:`ChannelGraph` of a :func:`to_json` dict.

    Raises:
        ValueError: if ``data`` is not a channel-graph dict.
    """
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise fail("from_json", "data", f"a dict with format {FORMAT!r}",
                   data.get("format") if isinstance(data, dict) else type(data).__name__)
    layers = G.from_json(data["nodes"]).layers
    sizes = {la.name: la.size for la in layers}
    ps = data["pairs"]
    return ChannelGraph(
        layers=layers,
        pairs=tuple((p["writer"], p["reader"]) for p in ps),
        edges=tuple(np.asarray(p["edges"], np.float64).reshape(sizes[p["reader"]],
                                                                 sizes[p["writer"]])
                    for p in ps),
        block_weights=tuple(float(p["block_weight"]) for p in ps),
        thresholds=tuple(float(p["threshold"]) for p in ps),
        block_thresholds=tuple(float(p["block_threshold"]) for p in ps),
    )


def save_json(path: str | Path, cg: ChannelGraph) -> Path:
    return io.write_json(path, to_json(cg))


def load_json(path: str | Path) -> ChannelGraph:
    return from_json(io.read_json(path))
