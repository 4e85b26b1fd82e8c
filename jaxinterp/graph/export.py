"""Exporting a :class:`~jaxinterp.graph.graph.Graph`: networkx graphs and JSON.

JSON layout (``to_json``)::

    {"format": "jaxinterp.graph", "version": 1,
     "layers": [{"name", "index", "importance", "constant_index",
                 "basis" (optional, (d, m)), "basis_pinv" (optional, (m, d))}, ...],
     "edges": [[[...m_in...] x m_out], ...]}

References:
    Hagberg, Schult, Swart (2008), "Exploring network structure, dynamics, and function
    using NetworkX" (SciPy 2008).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from .. import io
from .._checks import fail
from .graph import Graph, NodeLayer

__all__ = ["from_json", "load_json", "save_json", "to_json", "to_networkx"]

FORMAT = "jaxinterp.graph"


def to_networkx(
    graph: Graph, *, include_constant: bool = True, min_weight: float = 0.0
) -> nx.DiGraph:
    """A directed networkx graph of ``graph``: edges point from input to output node.

    Node attributes: ``layer`` (name), ``layer_index``, ``index`` (original index),
    ``importance``, ``constant``. Edge attribute: ``weight``.

    Args:
        graph: the graph.
        include_constant: keep constant nodes and their edges.
        min_weight: keep edges with ``|weight| > min_weight`` only.
    """
    g = nx.DiGraph()
    for li, la in enumerate(graph.layers):
        imp = np.asarray(la.importance, np.float64)
        for k, (nid, idx) in enumerate(zip(la.ids, la.index, strict=True)):
            const = idx == la.constant_index
            if const and not include_constant:
                continue
            g.add_node(
                nid,
                layer=la.name,
                layer_index=li,
                index=idx,
                importance=float(imp[k]),
                constant=const,
            )
    for src, dst, w in graph.edge_list(include_constant=include_constant, min_weight=min_weight):
        g.add_edge(src, dst, weight=w)
    return g


def _array(x: Any) -> Any:
    return None if x is None else np.asarray(x, np.float64).tolist()


def to_json(graph: Graph, *, include_basis: bool = False) -> dict[str, Any]:
    """A JSON-ready dict of ``graph`` (bases only with ``include_basis``)."""
    layers = []
    for la in graph.layers:
        entry = {
            "name": la.name,
            "index": list(la.index),
            "importance": _array(la.importance),
            "constant_index": la.constant_index,
        }
        if include_basis:
            entry["basis"] = _array(la.basis)
            entry["basis_pinv"] = _array(la.basis_pinv)
        layers.append(entry)
    return {
        "format": FORMAT,
        "version": 1,
        "layers": layers,
        "edges": [_array(e) for e in graph.edges],
    }


def from_json(data: dict[str, Any]) -> Graph:
    """The :class:`Graph` of a :func:`to_json` dict (arrays as numpy float64).

    Raises:
        ValueError: if ``data`` is not a graph dict.
    """
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise fail(
            "from_json",
            "data",
            f"a dict with format {FORMAT!r}",
            data.get("format") if isinstance(data, dict) else type(data).__name__,
        )

    def arr(x: Any, ncols: int | None = None) -> Any:
        if x is None:
            return None
        a = np.asarray(x, np.float64)
        return a.reshape(-1, ncols) if ncols is not None and a.size == 0 else a

    layers = tuple(
        NodeLayer(
            name=e["name"],
            importance=np.asarray(e["importance"], np.float64),
            index=tuple(int(i) for i in e["index"]),
            basis=arr(e.get("basis")),
            basis_pinv=arr(e.get("basis_pinv")),
            constant_index=e["constant_index"],
        )
        for e in data["layers"]
    )
    edges = tuple(
        arr(e, layers[li].size).reshape(layers[li + 1].size, layers[li].size)
        for li, e in enumerate(data["edges"])
    )
    return Graph(layers=layers, edges=edges)


def save_json(path: str | Path, graph: Graph, *, include_basis: bool = False) -> Path:
    """Write :func:`to_json` to ``path`` (atomically)."""
    return io.write_json(path, to_json(graph, include_basis=include_basis))


def load_json(path: str | Path) -> Graph:
    """Read a graph written by :func:`save_json`."""
    return from_json(io.read_json(path))
