"""Figures of a channel-graph run: the block graph, compression curves, the usage
matrix and the channel spectra (PNG, Agg backend).

References:
    specs/channel-graph.md sections 3-5 (project method).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.patches import FancyArrowPatch

from .. import plots
from .assemble import ChannelGraph

__all__ = ["plot_block_graph", "plot_compression", "plot_spectra", "plot_usage"]

FLOOR = 1e-32


def plot_block_graph(cg: ChannelGraph, path: str | Path, *, title: str = "",
                     components: list[list[str]] | None = None) -> Path:
    """Blocks left to right in depth order; an arc per kept E3 edge, width ~ weight."""
    names = cg.names
    colour = {n: f"C{i % 10}" for i, c in enumerate(components or []) for n in c}
    fig, ax = plots.plt.subplots(figsize=(max(4.0, 1.3 * len(names)), 3.2))
    xs = {n: i for i, n in enumerate(names)}
    top = max(cg.block_weights, default=0.0) or 1.0
    for (a, b), w in zip(cg.pairs, cg.block_weights, strict=True):
        if w <= 0:
            continue
        span = xs[b] - xs[a]
        ax.add_patch(FancyArrowPatch((xs[a], 0), (xs[b], 0), arrowstyle="-|>",
                                     mutation_scale=8, lw=0.5 + 4 * w / top,
                                     connectionstyle=f"arc3,rad={-0.25 - 0.05 * span}",
                                     color=(0.1, 0.2, 0.6, 0.3 + 0.6 * w / top)))
    for n, i in xs.items():
        ax.scatter([i], [0], s=300, c=colour.get(n, "0.7"), edgecolors="k", zorder=3)
        ax.text(i, -0.12, n, ha="center", va="top", fontsize=8)
    ax.set_xlim(-0.7, len(names) - 0.3)
    ax.set_ylim(-0.4, 0.25 + 0.1 * len(names))
    ax.axis("off")
    ax.set_title(title or "block graph (E3, pruned)", fontsize=10)
    return plots.save(fig, path)


def plot_compression(comp: dict[str, Any], path: str | Path, *, title: str = "") -> Path:
    """``Delta D`` against the rank kept, per block (both / read only / write only)."""
    blocks = comp["blocks"]
    fig, axes = plots.plt.subplots(1, 3, figsize=(11, 3.2), sharey=True)
    for ax, kind in zip(axes, ("both", "read", "write"), strict=True):
        for i, (name, v) in enumerate(blocks.items()):
            ax.semilogy(v["ranks"], np.maximum(np.asarray(v[kind]), FLOOR), "o-", ms=3,
                        color=f"C{i % 10}", label=name)
        ax.set_xlabel("rank kept")
        ax.set_title(f"{kind}", fontsize=9)
    axes[0].set_ylabel("Delta D")
    axes[-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title or f"compression (all at eta ranks: {comp['all_eta']:.3g})", fontsize=10)
    return plots.save(fig, path)


def plot_usage(usage: np.ndarray, ids: tuple[str, ...], path: str | Path, *,
               max_rows: int = 300, title: str = "") -> Path:
    """The usage matrix (examples x channel nodes), rows sorted by usage pattern."""
    u = np.asarray(usage, bool)[:max_rows]
    order = np.lexsort(u.T[::-1])
    fig, ax = plots.plt.subplots(figsize=(max(4.0, 0.22 * len(ids)), 4.0))
    ax.imshow(u[order], aspect="auto", cmap="Greys", interpolation="nearest")
    ax.set_xticks(range(len(ids)))
    ax.set_xticklabels(ids, rotation=90, fontsize=6)
    ax.set_ylabel("example")
    ax.set_title(title or "usage matrix", fontsize=10)
    return plots.save(fig, path)


def plot_spectra(ranks: dict[str, Any], path: str | Path, *, title: str = "") -> Path:
    """Read (lambda) and write (mu) spectra of every node."""
    fig, axes = plots.plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, side in zip(axes, ("read", "write"), strict=True):
        for i, (name, v) in enumerate(ranks.items()):
            if side in v:
                ev = np.asarray(v[side]["eigenvalues"])
                ax.semilogy(np.arange(1, ev.size + 1), np.maximum(ev, FLOOR), "o-", ms=3,
                            color=f"C{i % 10}", label=name)
        ax.set_title(f"{side} spectrum", fontsize=9)
        ax.set_xlabel("channel")
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return plots.save(fig, path)
