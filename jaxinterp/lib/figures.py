"""Figures of a LIB run: Lambda spectra, node-ablation curves and edge concentration,
one line per basis (LIB against the PCA / neuron baselines).

References:
    Bushnaq et al. (2024), "The Local Interaction Basis" (arXiv 2405.10928).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import plots

__all__ = ["plot_edge_mass", "plot_lambdas", "plot_node_ablation"]


def _grid(n: int) -> tuple[Any, np.ndarray]:
    fig, axes = plots.plt.subplots(1, n, figsize=(3.6 * n, 3.2), squeeze=False)
    return fig, axes[0]


def plot_lambdas(
    lambdas: dict[str, dict[str, list[float]]],
    path: str | Path,
    *,
    title: str = "",
    max_n: int = 60,
) -> Path:
    """Sorted non-constant Lambda (log scale) per node layer; ``{basis: {layer: Lambda}}``
    with the constant first where the basis has one."""
    layers = list(next(iter(lambdas.values())))
    fig, axes = _grid(len(layers))
    for ax, layer in zip(axes, layers, strict=True):
        for k, (basis, per) in enumerate(lambdas.items()):
            lam = np.sort(np.asarray(per[layer][1:], float))[::-1][:max_n]
            lam = lam[lam > 0]
            ax.semilogy(
                np.arange(1, lam.size + 1), lam, ".-", ms=3, lw=1, color=f"C{k}", label=basis
            )
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("direction (sorted)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Lambda (non-constant)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return plots.save(fig, path)


def plot_node_ablation(
    curves: dict[str, dict[str, dict[str, Any]]],
    path: str | Path,
    *,
    base: float,
    delta: float,
    score_name: str,
    title: str = "",
) -> Path:
    """Score against kept directions per node layer; ``{basis: {layer: {"counts",
    "scores"}}}``; the dashed line is ``base - delta``."""
    layers = list(next(iter(curves.values())))
    fig, axes = _grid(len(layers))
    for ax, layer in zip(axes, layers, strict=True):
        for k, (basis, per) in enumerate(curves.items()):
            c = per[layer]
            ax.plot(c["counts"], c["scores"], ".-", ms=3, lw=1, color=f"C{k}", label=basis)
        ax.axhline(base - delta, color="k", ls="--", lw=0.8)
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("kept directions (constant included)")
        ax.set_xscale("symlog", linthresh=20)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(score_name)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return plots.save(fig, path)


def plot_edge_mass(
    edges: dict[str, dict[str, np.ndarray]], path: str | Path, *, title: str = ""
) -> Path:
    """Cumulative fraction of the non-constant edge mass against the number of largest
    edges, per layer pair; ``{basis: {pair: sorted edge values}}``."""
    pairs = list(next(iter(edges.values())))
    fig, axes = _grid(len(pairs))
    for ax, pair in zip(axes, pairs, strict=True):
        for k, (basis, per) in enumerate(edges.items()):
            v = np.sort(np.abs(np.asarray(per[pair], float)).ravel())[::-1]
            if v.sum() > 0:
                ax.semilogx(
                    np.arange(1, v.size + 1),
                    np.cumsum(v) / v.sum(),
                    lw=1.2,
                    color=f"C{k}",
                    label=basis,
                )
        for frac in (0.9, 0.99):
            ax.axhline(frac, color="k", ls=":", lw=0.7)
        ax.set_title(pair, fontsize=8)
        ax.set_xlabel("largest edges")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of edge mass")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return plots.save(fig, path)
