"""Figures of an APD run (first seed): loss curves, activation frequencies, every live
component's weights per decomposed matrix, and for TMS the component-vs-feature picture
and the one-hot attribution matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import plots
from .apd import Sites

MAX_PANELS = 24


def plot_apd(res: Any, sites: Sites, run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    m0 = res.seed_metrics[0]
    hist = {k: (v[:, 0] if v.ndim == 2 else v) for k, v in res.history.items()}
    out = [plots.loss_curves(hist, run_dir / "loss.png", title=f"APD {res.config.C} comps")]
    freq = np.asarray(m0["activation_frequency"])
    fig, ax = plots.plt.subplots(figsize=(7, 3))
    order = np.argsort(-freq)
    ax.bar(np.arange(len(freq)), freq[order])
    ax.set_yscale("log")
    ax.set_xlabel("component (sorted)")
    ax.set_ylabel("activation frequency")
    ax.set_title(f"live {m0['n_live_components']} / {len(freq)}")
    out.append(plots.save(fig, run_dir / "activation_frequency.png"))
    comps = _first(res.components)
    live = [c for c in order if freq[c] > 0][:MAX_PANELS]
    for path in sites.paths:
        mats = np.asarray(comps.matrices(path))[live]
        if len(mats) == 0:
            continue
        cols = min(6, len(mats))
        rows = -(-len(mats) // cols)
        fig, axes = plots.plt.subplots(rows, cols, figsize=(2 * cols, 2 * rows), squeeze=False)
        lim = float(np.abs(mats).max()) or 1.0
        for ax, c, mat in zip(axes.ravel(), live, mats, strict=False):
            ax.imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto",
                      interpolation="nearest")
            ax.set_title(f"c{c} f={freq[c]:.3f}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in axes.ravel()[len(mats):]:
            ax.axis("off")
        fig.suptitle(f"components at {path} (d_in x d_out), most active first")
        name = path.strip(".").replace("[", "").replace("]", "").replace(".", "_")
        out.append(plots.save(fig, run_dir / f"components_{name}.png"))
    if "mmcs" in m0:
        p = np.asarray(comps.matrices(".W_enc"))  # (C, F, d_h)
        norms = np.linalg.norm(p, axis=-1)
        out.append(plots.matrix(norms, run_dir / "component_feature_norms.png",
                                title=f"|P_c W_enc[j]|  MMCS {m0['mmcs']:.4f}  ML2R "
                                      f"{m0['ml2r']:.3f}", xlabel="feature j",
                                ylabel="component c", symmetric=False))
        oh = np.asarray(m0["one_hot_attributions"])
        out.append(plots.matrix(oh / (oh.max(axis=1, keepdims=True) + 1e-30),
                                run_dir / "one_hot_attributions.png",
                                title="one-hot attributions (row-normalised)",
                                xlabel="component", ylabel="feature", symmetric=False))
    return out


def _first(t: Any) -> Any:
    import jax

    return jax.tree_util.tree_map(lambda v: v[0], t)
