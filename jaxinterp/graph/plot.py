"""A layered matplotlib drawing of an interaction graph.

Node layers are columns (input left, output right); within a column nodes are ordered
by importance, top first. Node area grows with importance (square root, normalised per
layer); edge width and opacity grow with weight (normalised per layer pair). Nodes can be
coloured by community.

References:
    Bushnaq et al. (2024), "The Local Interaction Basis" (arXiv 2405.10928), the
    interaction-graph figures.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from matplotlib.collections import LineCollection

from .. import plots
from .._checks import check_positive
from .graph import Graph

__all__ = ["plot_graph"]


def plot_graph(
    graph: Graph,
    path: str | Path,
    *,
    title: str = "",
    max_nodes: int | None = 40,
    include_constant: bool = False,
    communities: Iterable[Iterable[str]] | None = None,
    min_fraction: float = 1e-3,
) -> Path:
    """Draw ``graph`` and save it as a PNG.

    Args:
        graph: the graph.
        path: output file.
        title: figure title.
        max_nodes: draw only the most important nodes of each layer (``None``: all).
        include_constant: draw constant nodes and their edges.
        communities: node-id sets to colour (others grey).
        min_fraction: skip edges below this fraction of their pair's largest edge.

    Returns:
        The written path.

    Raises:
        ValueError: if ``max_nodes`` is not positive.
    """
    if max_nodes is not None:
        check_positive("plot_graph", "max_nodes", max_nodes, integer=True)
    colour = {}
    for k, c in enumerate(communities or []):
        for nid in c:
            colour[nid] = f"C{k % 10}"
    pos: list[dict[int, float]] = []  # per layer: node position in layer -> y
    n_layers = len(graph.layers)
    fig, ax = plots.plt.subplots(figsize=(max(4.0, 2.2 * n_layers), 6.0))
    for li, la in enumerate(graph.layers):
        imp = np.abs(np.asarray(la.importance, np.float64))
        cand = [k for k in range(la.size) if include_constant or not la.constant_mask[k]]
        cand = sorted(cand, key=lambda k: -imp[k])[: max_nodes or None]
        ys = np.linspace(1.0, 0.0, len(cand)) if len(cand) > 1 else np.full(len(cand), 0.5)
        pos.append(dict(zip(cand, ys, strict=True)))
        top = imp[cand].max() if cand else 1.0
        sizes = 400.0 * np.sqrt(imp[cand] / top) if top > 0 else np.full(len(cand), 20.0)
        colours = [colour.get(la.ids[k], "0.55") for k in cand]
        ax.scatter(
            np.full(len(cand), li),
            ys,
            s=np.maximum(sizes, 4.0),
            c=colours,
            zorder=3,
            edgecolors="k",
            linewidths=0.3,
        )
        ax.text(li, 1.06, la.name, ha="center", fontsize=8)
    for li, e in enumerate(graph.edges):
        a = np.abs(np.asarray(e, np.float64))
        src, dst = pos[li], pos[li + 1]
        sub = [(i, j) for i in dst for j in src]
        vals = np.asarray([a[i, j] for i, j in sub])
        top = vals.max() if vals.size else 0.0
        if top <= 0:
            continue
        segs, widths, alphas = [], [], []
        for (i, j), v in zip(sub, vals, strict=True):
            if v < min_fraction * top:
                continue
            segs.append([(li, src[j]), (li + 1, dst[i])])
            widths.append(0.2 + 4.0 * v / top)
            alphas.append(0.15 + 0.75 * v / top)
        colours = [(0.1, 0.2, 0.6, al) for al in alphas]
        ax.add_collection(LineCollection(segs, linewidths=widths, colors=colours, zorder=2))
    ax.set_xlim(-0.5, n_layers - 0.5)
    ax.set_ylim(-0.08, 1.12)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    return plots.save(fig, path)
