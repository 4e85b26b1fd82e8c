"""Matplotlib figures shared by the run directories (Agg backend, PNG files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def loss_curves(history: dict[str, np.ndarray], path: str | Path, *, title: str = "",
                logy: bool = True, terms: list[str] | None = None) -> Path | None:
    """Every loss term of ``history`` (``{"step": (n,), term: (n,)}``) against the step."""
    if "step" not in history or len(history["step"]) == 0:
        return None
    steps = history["step"]
    terms = terms or [k for k in history if k != "step" and not k.startswith("eval/")]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in terms:
        v = np.asarray(history[k], dtype=float)
        if v.ndim != 1 or len(v) != len(steps):
            continue
        if len(v) > 2000:  # thin very long curves for a readable plot
            idx = np.linspace(0, len(v) - 1, 2000).astype(int)
            ax.plot(steps[idx], v[idx], label=k, lw=1)
        else:
            ax.plot(steps, v, label=k, lw=1)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save(fig, path)


def matrix(m: np.ndarray, path: str | Path, *, title: str = "", xlabel: str = "",
           ylabel: str = "", symmetric: bool = True) -> Path:
    """A heatmap with a diverging colormap centred at zero."""
    m = np.asarray(m, dtype=float)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    vmax = float(np.abs(m).max()) or 1.0
    im = ax.imshow(m, cmap="RdBu_r" if symmetric else "viridis",
                   vmin=-vmax if symmetric else None, vmax=vmax if symmetric else None)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return save(fig, path)


def curves(x: np.ndarray, ys: dict[str, np.ndarray], path: str | Path, *, title: str = "",
           xlabel: str = "step", ylabel: str = "", logy: bool = False) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, y in ys.items():
        ax.plot(x, y, label=k, lw=1.2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save(fig, path)
