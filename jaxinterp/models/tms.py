"""Toy models of superposition (``tms-5-2``, ``tms-40-10`` and the ``-id`` variants).

``h = x @ W_enc`` (optionally ``@ I`` through a frozen hidden identity), then
``x̂ = ReLU(h @ W_enc.T + b)``: the decoder reads the *same* array transposed.

References:
    Elhage et al. 2022, "Toy Models of Superposition" (arXiv 2209.10652); the identity
    variant and recipe from Bushnaq, Braun, Sharkey 2025, "Stochastic Parameter
    Decomposition" (arXiv 2506.20790).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import plots
from .._checks import check_positive, check_probability, check_shape, fail
from .._types import Array, Float, Key
from .base import ToyTarget, TrainConfig, register
from .data import sparse_uniform

Cache = dict[str, tuple[Array, Array]]


class TMS(eqx.Module):
    """Tied-weight TMS autoencoder. Call on ONE example ``(n_features,)``; vmap for batches.

    Attributes:
        W_enc: ``(n_features, d_hidden)``; row j is feature j's embedding.
        b: ``(n_features,)`` output bias.
        hidden: ``()`` or ``(I_{d_hidden},)``: the frozen hidden identity (``.hidden[0]``).
    """

    W_enc: Float[Array, "n_features d_hidden"]
    b: Float[Array, " n_features"]
    hidden: tuple[Float[Array, "d_hidden d_hidden"], ...]
    n_features: int = eqx.field(static=True)
    d_hidden: int = eqx.field(static=True)

    def __init__(self, n_features: int, d_hidden: int, *, identity: bool = False, key: Key):
        check_positive("TMS", "n_features", n_features, integer=True)
        check_positive("TMS", "d_hidden", d_hidden, integer=True)
        std = (2.0 / (n_features + d_hidden)) ** 0.5  # Xavier normal
        self.W_enc = std * jax.random.normal(key, (n_features, d_hidden))
        self.b = jnp.zeros((n_features,))
        self.hidden = (jnp.eye(d_hidden),) if identity else ()
        self.n_features, self.d_hidden = n_features, d_hidden

    def forward_with_cache(self, x: Float[Array, " n_features"]) -> tuple[Array, Cache]:
        """Output and, per weight use, its (input, pre-bias output): ``.W_enc`` (encoder),
        ``.hidden[0]`` (identity variant) and ``.W_enc:T`` (the tied decoder)."""
        check_shape("TMS", "x", x, (f"n_features={self.n_features}",),
                    "The model takes one example; vmap over the batch.")
        cache: Cache = {}
        h = x @ self.W_enc
        cache[".W_enc"] = (x, h)
        for i, w in enumerate(self.hidden):
            h_new = h @ w
            cache[f".hidden[{i}]"] = (h, h_new)
            h = h_new
        pre = h @ self.W_enc.T
        cache[".W_enc:T"] = (h, pre)
        return jax.nn.relu(pre + self.b), cache

    def __call__(self, x: Float[Array, " n_features"]) -> Float[Array, " n_features"]:
        return self.forward_with_cache(x)[0]

    def ground_truth(self) -> dict[str, Any]:
        """Mechanism j is the rank-1 ``e_j ⊗ W_enc[j]`` (and its transpose in the decoder);
        the hidden identity is one rank-``d_hidden`` mechanism."""
        f = self.n_features
        mech = jnp.eye(f)[:, :, None] * self.W_enc[None, :, :]  # (F, F, d_hidden)
        return {"feature_directions": self.W_enc, "W_enc_mechanisms": mech,
                "n_mechanisms": f + len(self.hidden)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TMSConfig(TrainConfig):
    """TMS recipe (SPD paper): AdamW wd 0.01, constant lr 5e-3, 10k steps."""

    n_features: int = 5
    d_hidden: int = 2
    identity: bool = False
    p: float = 0.05
    steps: int = 10_000
    batch_size: int = 1024
    lr: float = 5e-3
    weight_decay: float = 0.01
    n_seeds: int = 4
    eval_size: int = 100_000
    gate_mse: float = 1.9e-3
    gate_min_norm: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        check_positive("TMSConfig", "n_features", self.n_features, integer=True)
        check_positive("TMSConfig", "d_hidden", self.d_hidden, integer=True)
        check_probability("TMSConfig", "p", self.p)
        if self.d_hidden > self.n_features:
            raise fail("TMSConfig", "d_hidden", f"<= n_features={self.n_features}",
                       self.d_hidden)


class TMSTarget(ToyTarget):
    config_cls = TMSConfig

    def __init__(self, name: str, description: str, **defaults: Any):
        self.name = name
        self.description = description
        self.defaults = defaults
        self.frozen = (".hidden",) if defaults.get("identity") else ()

    def config(self, **overrides: Any) -> TMSConfig:
        return super().config(**{**self.defaults, **overrides})  # type: ignore[return-value]

    def init(self, cfg: TMSConfig, key: Key) -> TMS:
        return TMS(cfg.n_features, cfg.d_hidden, identity=cfg.identity, key=key)

    def sample(self, cfg: TMSConfig, data: Any, key: Key, step: Array) -> Array:
        return sparse_uniform(key, cfg.batch_size, cfg.n_features, cfg.p, 0.0, 1.0, "allow")

    def loss(self, cfg: TMSConfig, model: TMS, x: Array):
        mse = jnp.mean((jax.vmap(model)(x) - x) ** 2)
        return mse, {}

    def evaluate(self, cfg: TMSConfig, model: TMS, data: Any, key: Key) -> dict[str, Any]:
        x = sparse_uniform(key, cfg.eval_size, cfg.n_features, cfg.p, 0.0, 1.0, "allow")
        mse = float(eqx.filter_jit(lambda m, x: jnp.mean((jax.vmap(m)(x) - x) ** 2))(model, x))
        norms = np.linalg.norm(np.asarray(model.W_enc), axis=1)
        checks = {
            "mse": {"value": mse, "max": cfg.gate_mse, "ok": mse <= cfg.gate_mse},
            "min_row_norm": {"value": float(norms.min()), "min": cfg.gate_min_norm,
                             "ok": bool(norms.min() > cfg.gate_min_norm)},
        }
        return {
            "final_loss": mse,
            "mse": mse,
            "row_norms": norms,
            "mean_row_norm": float(norms.mean()),
            "mean_bias": float(np.mean(np.asarray(model.b))),
            "n_features_represented": int((norms > cfg.gate_min_norm).sum()),
            "gate": {"passed": all(c["ok"] for c in checks.values()), "checks": checks},
        }

    def plot(self, cfg: TMSConfig, model: TMS, data: Any, result: Any, run_dir: Path):
        w = np.asarray(model.W_enc)
        out = [plots.matrix(w @ w.T, run_dir / "WtW.png",
                            title=f"{self.name}: W^T W (paper notation) = W_enc W_enc^T",
                            xlabel="feature", ylabel="feature")]
        out.append(_feature_geometry(w, run_dir / "feature_geometry.png", self.name))
        out.append(plots.loss_curves(result.history, run_dir / "loss.png", title=self.name))
        return [p for p in out if p is not None]


def _feature_geometry(w: np.ndarray, path: Path, name: str) -> Path:
    """d_hidden = 2: feature embeddings as arrows in the plane; otherwise Elhage-style bars
    of each feature's norm coloured by how much it shares its dimensions."""
    fig, ax = plots.plt.subplots(figsize=(4.5, 4.5) if w.shape[1] == 2 else (8, 3.5))
    if w.shape[1] == 2:
        lim = 1.15 * float(np.abs(w).max())
        for j, (a, b) in enumerate(w):
            ax.annotate("", xy=(a, b), xytext=(0, 0),
                        arrowprops=dict(arrowstyle="->", color=f"C{j % 10}", lw=2))
            ax.text(1.08 * a, 1.08 * b, str(j), ha="center", va="center")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
        ax.set_title(f"{name}: columns of W (rows of W_enc)")
    else:
        norms = np.linalg.norm(w, axis=1)
        unit = w / np.maximum(norms[:, None], 1e-12)
        interference = ((unit @ w.T) ** 2).sum(1) - norms**2
        order = np.argsort(-norms)
        share = interference[order] / (norms[order] ** 2 + 1e-12)
        colors = plots.plt.cm.viridis(np.clip(share, 0, 1))
        ax.bar(np.arange(len(norms)), norms[order], color=colors)
        ax.set_xlabel("feature (sorted by norm)")
        ax.set_ylabel("||W_j||")
        ax.set_title(f"{name}: feature norms (colour = superposition)")
    return plots.save(fig, path)


register(TMSTarget("tms-5-2", "TMS 5 features -> 2 hidden, tied weights (p=0.05)"))
register(TMSTarget("tms-5-2-id", "TMS 5-2 with a frozen hidden identity matrix", identity=True))
register(TMSTarget("tms-40-10", "TMS 40 features -> 10 hidden, tied weights", n_features=40,
                   d_hidden=10, batch_size=8192, gate_mse=4.1e-3))
register(TMSTarget("tms-40-10-id", "TMS 40-10 with a frozen hidden identity matrix",
                   n_features=40, d_hidden=10, batch_size=8192, gate_mse=4.1e-3,
                   identity=True))
