"""The interaction graph: node layers and edge matrices between adjacent layers.

A :class:`Graph` is an immutable pytree. Each :class:`NodeLayer` holds, for ``m`` nodes
(directions or components), their importance, optionally the basis that produced them
(``f_hat = f @ basis``) and its pseudo-inverse, and their original indices, so node ids
``"<layer>/<index>"`` survive pruning and restriction. ``edges[l]`` has shape
``(m_{l+1}, m_l)``, output node first. Methods (LIB, channel graph, ...) assemble a graph
from their own results; everything below is method-agnostic.

References:
    Bushnaq et al. (2024), "The Local Interaction Basis" (arXiv 2405.10928), the
    interaction graph; Newman (2006), "Modularity and community structure in networks"
    (PNAS 103:8577), the graphs it is clustered as.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import equinox as eqx
import numpy as np

from .._checks import check_nonnegative, check_positive, fail

__all__ = [
    "Graph",
    "NodeLayer",
    "merge",
    "node_id",
    "parse_node_id",
    "prune",
    "restrict",
    "top_nodes",
]


def node_id(layer: str, index: int) -> str:
    """The id of node ``index`` of node layer ``layer``: ``"<layer>/<index>"``."""
    return f"{layer}/{int(index)}"


def parse_node_id(nid: str) -> tuple[str, int]:
    """``"<layer>/<index>" -> (layer, index)``.

    Raises:
        ValueError: if ``nid`` is not of that form.
    """
    layer, sep, idx = str(nid).rpartition("/")
    if not sep or not layer or not idx.isdigit():
        raise fail("parse_node_id", "nid", "an id '<layer>/<index>'", repr(nid))
    return layer, int(idx)


class NodeLayer(eqx.Module):
    """One layer of nodes.

    Attributes:
        name: node-layer name (a keypath where one exists).
        importance: ``(m,)`` node importances (e.g. LIB's Lambda).
        index: original indices of the ``m`` nodes (static), giving their ids.
        basis: ``(d, m)`` or ``None``.
        basis_pinv: ``(m, d)`` or ``None``.
        constant_index: original index of the constant node, or ``None``.
    """

    name: str = eqx.field(static=True)
    importance: Any
    index: tuple[int, ...] = eqx.field(static=True)
    basis: Any = None
    basis_pinv: Any = None
    constant_index: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        fn = "NodeLayer"
        m = len(self.index)
        if np.shape(self.importance) != (m,):
            raise fail(
                fn, "importance", f"of shape (m,) = ({m},) like index", np.shape(self.importance)
            )
        if len(set(self.index)) != m:
            raise fail(fn, "index", "unique node indices", self.index)
        if self.basis is not None and (np.ndim(self.basis) != 2 or np.shape(self.basis)[1] != m):
            raise fail(fn, "basis", f"of shape (d, m={m})", np.shape(self.basis))
        if self.basis_pinv is not None and (
            np.ndim(self.basis_pinv) != 2 or np.shape(self.basis_pinv)[0] != m
        ):
            raise fail(fn, "basis_pinv", f"of shape (m={m}, d)", np.shape(self.basis_pinv))

    @property
    def size(self) -> int:
        return len(self.index)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(node_id(self.name, i) for i in self.index)

    @property
    def constant_mask(self) -> np.ndarray:
        """``(m,)`` bool: True at the constant node."""
        return np.asarray([i == self.constant_index for i in self.index], bool)

    def select(self, positions: Sequence[int]) -> NodeLayer:
        """The nodes at ``positions`` (0-based positions in this layer, in that order)."""
        pos = np.asarray(positions, int)
        idx = tuple(self.index[k] for k in pos)
        const = self.constant_index if self.constant_index in idx else None
        return NodeLayer(
            name=self.name,
            importance=np.asarray(self.importance)[pos],
            index=idx,
            basis=None if self.basis is None else np.asarray(self.basis)[:, pos],
            basis_pinv=None if self.basis_pinv is None else np.asarray(self.basis_pinv)[pos],
            constant_index=const,
        )


class Graph(eqx.Module):
    """Node layers in forward order and the edges between adjacent ones.

    Attributes:
        layers: ``L + 1`` :class:`NodeLayer`.
        edges: ``L`` arrays, ``edges[l]: (m_{l+1}, m_l)`` (output node first).
    """

    layers: tuple[NodeLayer, ...]
    edges: tuple[Any, ...]

    def __check_init__(self):
        fn = "Graph"
        if len(self.edges) != len(self.layers) - 1:
            raise fail(
                fn, "edges", f"len(layers) - 1 = {len(self.layers) - 1} matrices", len(self.edges)
            )
        names = [la.name for la in self.layers]
        if len(set(names)) != len(names):
            raise fail(fn, "layers", "unique names", names)
        for li, e in enumerate(self.edges):
            want = (self.layers[li + 1].size, self.layers[li].size)
            if np.shape(e) != want:
                raise fail(
                    fn,
                    f"edges[{li}]",
                    f"of shape (m_out, m_in) = {want} ({names[li + 1]} <- {names[li]})",
                    np.shape(e),
                )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(la.name for la in self.layers)

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(i for la in self.layers for i in la.ids)

    def layer(self, name: str) -> NodeLayer:
        if name not in self.names:
            raise fail("Graph.layer", "name", "one of " + ", ".join(self.names), repr(name))
        return self.layers[self.names.index(name)]

    def locate(self, nid: str) -> tuple[int, int]:
        """``(layer position, node position)`` of the node with id ``nid``."""
        name, idx = parse_node_id(nid)
        la = self.layer(name)
        if idx not in la.index:
            raise fail("Graph.locate", "nid", f"a node of layer {name!r}", repr(nid))
        return self.names.index(name), la.index.index(idx)

    def edge_list(
        self, *, include_constant: bool = True, min_weight: float = 0.0
    ) -> list[tuple[str, str, float]]:
        """``[(source_id, target_id, weight)]`` for edges with ``|weight| > min_weight``."""
        out = []
        for li, e in enumerate(self.edges):
            src, dst = self.layers[li], self.layers[li + 1]
            e = np.asarray(e)
            skip_src, skip_dst = src.constant_mask, dst.constant_mask
            for i, j in zip(*np.nonzero(np.abs(e) > min_weight), strict=True):
                if not include_constant and (skip_src[j] or skip_dst[i]):
                    continue
                out.append((src.ids[j], dst.ids[i], float(e[i, j])))
        return out


def _per_pair(fn: str, arg: str, value: Any, n: int) -> list[Any]:
    vals = list(value) if isinstance(value, Sequence) else [value] * n
    if len(vals) != n:
        raise fail(fn, arg, f"a scalar or one value per layer pair ({n})", len(vals))
    return vals


def prune(
    graph: Graph,
    *,
    threshold: float | Sequence[float] | None = None,
    top_k: int | Sequence[int] | None = None,
    keep_constant: bool = True,
) -> Graph:
    """Zero the edges below ``threshold`` and/or outside the ``top_k`` largest per pair.

    Edges out of a constant node are never counted in ``top_k`` and are kept when
    ``keep_constant`` (they are "free" in LIB's edge ablation).

    Args:
        graph: the graph.
        threshold: keep edges with ``|E| >= threshold`` (scalar or one per pair).
        top_k: keep the ``k`` largest ``|E|`` of non-constant edges (scalar or per pair).
        keep_constant: never prune edges from a constant node.

    Returns:
        A graph of the same nodes with pruned edges.

    Raises:
        ValueError: if neither option is given, or on negative values.
    """
    fn = "prune"
    if threshold is None and top_k is None:
        raise fail(fn, "threshold or top_k", "at least one of them", "neither")
    n = len(graph.edges)
    ths = _per_pair(fn, "threshold", threshold, n)
    ks = _per_pair(fn, "top_k", top_k, n)
    new = []
    for li, e in enumerate(graph.edges):
        e = np.asarray(e)
        a = np.abs(e)
        free = np.broadcast_to(graph.layers[li].constant_mask[None, :], e.shape) & keep_constant
        keep = np.ones(e.shape, bool)
        if ths[li] is not None:
            check_nonnegative(fn, "threshold", ths[li])
            keep &= a >= ths[li]
        if ks[li] is not None:
            check_nonnegative(fn, "top_k", ks[li], integer=True)
            flat = np.where(free, -np.inf, a).ravel()
            order = np.argsort(-flat, kind="stable")[: int(ks[li])]
            top = np.zeros(flat.size, bool)
            top[order] = np.isfinite(flat[order])
            keep &= top.reshape(e.shape)
        new.append(np.where(keep | free, e, 0.0))
    return Graph(layers=graph.layers, edges=tuple(new))


def restrict(graph: Graph, nodes: Iterable[str] | Mapping[str, Iterable[int]]) -> Graph:
    """The subgraph on a node set (ids ``"<layer>/<index>"`` or ``{layer: indices}``).

    Node layers keep their order and their other nodes' ids; a layer with no chosen node
    keeps zero nodes.

    Raises:
        ValueError: on an unknown layer or node.
    """
    if isinstance(nodes, Mapping):
        chosen = {graph.layer(k).name: {int(i) for i in v} for k, v in nodes.items()}
    else:
        chosen: dict[str, set[int]] = {}
        for nid in nodes:
            name, idx = parse_node_id(nid)
            chosen.setdefault(graph.layer(name).name, set()).add(idx)
    layers, positions = [], []
    for la in graph.layers:
        want = chosen.get(la.name, set())
        unknown = want - set(la.index)
        if unknown:
            raise fail(
                "restrict",
                "nodes",
                f"indices of layer {la.name!r} among {la.index}",
                sorted(unknown),
            )
        pos = [k for k, i in enumerate(la.index) if i in want]
        layers.append(la.select(pos))
        positions.append(np.asarray(pos, int))
    edges = tuple(
        np.asarray(e)[np.ix_(positions[li + 1], positions[li])] for li, e in enumerate(graph.edges)
    )
    return Graph(layers=tuple(layers), edges=edges)


def _same_layer(a: NodeLayer, b: NodeLayer) -> None:
    if a.index != b.index or not np.allclose(a.importance, b.importance, rtol=1e-6, atol=0):
        raise fail(
            "merge",
            f"layer {a.name!r}",
            "the same nodes and importances in both graphs",
            f"indices {a.index} vs {b.index}",
        )


def merge(first: Graph, second: Graph) -> Graph:
    """Join two graphs along the chain of node layers.

    The node layers of the result are ``first``'s followed by ``second``'s layers that
    ``first`` lacks; shared layers must hold the same nodes. Each adjacent pair takes its
    edges from the graph that has it (both: they must agree to ``rtol=1e-6``). Use it to
    assemble a graph built layer pair by layer pair.

    Raises:
        ValueError: if shared layers differ, or the union is not a chain.
    """
    fn = "merge"
    layers = list(first.layers)
    for la in second.layers:
        if la.name in first.names:
            _same_layer(first.layer(la.name), la)
        else:
            layers.append(la)
    names = [la.name for la in layers]
    pairs = {}
    for g in (first, second):
        for li, e in enumerate(g.edges):
            key = (g.names[li], g.names[li + 1])
            e = np.asarray(e)
            if key in pairs and not np.allclose(pairs[key], e, rtol=1e-6, atol=0):
                raise fail(
                    fn, f"edges {key[0]} -> {key[1]}", "equal in both graphs", "different values"
                )
            pairs[key] = e
    edges = []
    for a, b in zip(names[:-1], names[1:], strict=True):
        if (a, b) not in pairs:
            raise fail(
                fn,
                "first, second",
                "graphs whose layers form one chain",
                f"no edges {a} -> {b} (layers {names})",
            )
        edges.append(pairs[(a, b)])
    if len(pairs) != len(edges):
        raise fail(
            fn,
            "first, second",
            "graphs whose layers form one chain",
            f"edge pairs {sorted(pairs)} for layers {names}",
        )
    return Graph(layers=tuple(layers), edges=tuple(edges))


def top_nodes(graph: Graph, k: int) -> list[str]:
    """Ids of the ``k`` most important nodes of every layer (for :func:`restrict`)."""
    check_positive("top_nodes", "k", k, integer=True)
    out = []
    for la in graph.layers:
        order = np.argsort(-np.asarray(la.importance), kind="stable")[:k]
        out += [la.ids[i] for i in order]
    return out
