"""Residual MLPs: the toy model of compressed computation (``resid-mlp-1``) and of
cross-layer distributed representations (``resid-mlp-2``, ``resid-mlp-3``).

``r0 = x @ W_E``; per layer ``r += ReLU(r @ mlp_in) @ mlp_out``; ``y = r @ W_E.T``. The
embedding is frozen, unit-norm per row, drawn from its own seed, and the unembedding reads
the same array transposed. Labels are ``x + ReLU(x)``.

References:
    Braun, Bushnaq, Heimersheim, Mendel, Sharkey 2025, "Interpretability in Parameter
    Space: Minimizing Mechanistic Description Length with Attribution-based Parameter
    Decomposition" (arXiv 2501.14926), §compressed computation / cross-layer.
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
from .._checks import check_positive, check_probability, check_shape
from .._types import Array, Float, Key
from ..rng import Stream, seed_key, stream_key
from .base import ToyTarget, TrainConfig, register
from .data import exactly_k, sparse_uniform

Cache = dict[str, tuple[Array, Array]]


class ResidLayer(eqx.Module):
    """One residual MLP layer: ``r + ReLU(r @ mlp_in) @ mlp_out`` (no biases)."""

    mlp_in: Float[Array, "d_resid d_mlp"]
    mlp_out: Float[Array, "d_mlp d_resid"]

    def __init__(self, d_resid: int, d_mlp: int, *, key: Key):
        k1, k2 = jax.random.split(key)
        bound = (6.0 / (d_resid * d_mlp)) ** 0.5  # reference's fan rule on a 3-D parameter
        self.mlp_in = jax.random.uniform(k1, (d_resid, d_mlp), minval=-bound, maxval=bound)
        self.mlp_out = jax.random.uniform(k2, (d_mlp, d_resid), minval=-bound, maxval=bound)


class ResidMLP(eqx.Module):
    """Residual MLP. Call on ONE example ``(n_features,)``; vmap for batches.

    Attributes:
        W_E: ``(n_features, d_resid)`` frozen embedding; the unembedding is ``W_E.T``.
        layers: residual MLP layers (``.layers[l].mlp_in``, ``.layers[l].mlp_out``).
    """

    W_E: Float[Array, "n_features d_resid"]
    layers: tuple[ResidLayer, ...]
    n_features: int = eqx.field(static=True)
    d_resid: int = eqx.field(static=True)
    d_mlp: int = eqx.field(static=True)

    def __init__(self, n_features: int, d_resid: int, n_layers: int, d_mlp: int, *,
                 key: Key, embed_key: Key):
        for name, v in [("n_features", n_features), ("d_resid", d_resid),
                        ("n_layers", n_layers), ("d_mlp", d_mlp)]:
            check_positive("ResidMLP", name, v, integer=True)
        w = jax.random.normal(embed_key, (n_features, d_resid))
        self.W_E = w / jnp.linalg.norm(w, axis=1, keepdims=True)
        keys = jax.random.split(key, n_layers)
        self.layers = tuple(ResidLayer(d_resid, d_mlp, key=k) for k in keys)
        self.n_features, self.d_resid, self.d_mlp = n_features, d_resid, d_mlp

    def forward_with_cache(self, x: Float[Array, " n_features"]) -> tuple[Array, Cache]:
        """Output and per weight use its (input, output): ``.W_E``, ``.layers[l].mlp_in``,
        ``.layers[l].mlp_out`` and ``.W_E:T`` (the unembedding)."""
        check_shape("ResidMLP", "x", x, (f"n_features={self.n_features}",),
                    "The model takes one example; vmap over the batch.")
        cache: Cache = {}
        r = x @ self.W_E
        cache[".W_E"] = (x, r)
        for i, layer in enumerate(self.layers):
            pre = r @ layer.mlp_in
            cache[f".layers[{i}].mlp_in"] = (r, pre)
            h = jax.nn.relu(pre)
            out = h @ layer.mlp_out
            cache[f".layers[{i}].mlp_out"] = (h, out)
            r = r + out
        y = r @ self.W_E.T
        cache[".W_E:T"] = (r, y)
        return y, cache

    def __call__(self, x: Float[Array, " n_features"]) -> Float[Array, " n_features"]:
        return self.forward_with_cache(x)[0]

    @property
    def n_neurons(self) -> int:
        return self.d_mlp * len(self.layers)

    def ground_truth(self) -> dict[str, Any]:
        """One rank-1 ``mlp_in`` mechanism per feature (spread over neurons and, in the
        cross-layer variants, over layers); ``mlp_out`` is one dense mechanism of rank
        ``n_neurons``. Labels are ``x + ReLU(x)``."""
        return {"label_fn": "x + relu(x)", "n_features": self.n_features,
                "n_neurons": self.n_neurons}


def labels(x: Array) -> Array:
    return x + jax.nn.relu(x)


def monosemantic_mse(x: Array, n_neurons: int) -> Array:
    """MSE of the monosemantic baseline: exact labels on the first ``n_neurons`` features,
    identity on the rest (computed exactly, not trained)."""
    err = jnp.where(jnp.arange(x.shape[-1]) < n_neurons, 0.0, jax.nn.relu(x))
    return jnp.mean(err**2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResidMLPConfig(TrainConfig):
    """Residual-MLP recipe: AdamW wd 0.01, lr 3e-3, quarter-cosine, batch 2048, 10k steps."""

    n_features: int = 100
    d_resid: int = 1000
    n_layers: int = 1
    d_mlp: int = 50
    p: float = 0.01
    embed_seed: int = 0
    steps: int = 10_000
    batch_size: int = 2048
    lr: float = 3e-3
    weight_decay: float = 0.01
    schedule: str = "quarter_cosine"
    eval_size: int = 100_000
    gate_ratio: float = 0.85

    def __post_init__(self):
        super().__post_init__()
        for name in ("n_features", "d_resid", "n_layers", "d_mlp"):
            check_positive("ResidMLPConfig", name, getattr(self, name), integer=True)
        check_probability("ResidMLPConfig", "p", self.p)


class ResidMLPTarget(ToyTarget):
    config_cls = ResidMLPConfig
    frozen = (".W_E",)

    def __init__(self, name: str, description: str, **defaults: Any):
        self.name, self.description, self.defaults = name, description, defaults

    def config(self, **overrides: Any) -> ResidMLPConfig:
        return super().config(**{**self.defaults, **overrides})  # type: ignore[return-value]

    def init(self, cfg: ResidMLPConfig, key: Key) -> ResidMLP:
        embed_key = stream_key(seed_key(cfg.embed_seed), Stream.EMBED)
        return ResidMLP(cfg.n_features, cfg.d_resid, cfg.n_layers, cfg.d_mlp, key=key,
                        embed_key=embed_key)

    def sample(self, cfg: ResidMLPConfig, data: Any, key: Key, step: Array) -> Array:
        return sparse_uniform(key, cfg.batch_size, cfg.n_features, cfg.p, -1.0, 1.0, "allow")

    def loss(self, cfg: ResidMLPConfig, model: ResidMLP, x: Array):
        return jnp.mean((jax.vmap(model)(x) - labels(x)) ** 2), {}

    def evaluate(self, cfg: ResidMLPConfig, model: ResidMLP, data: Any, key: Key):
        chunk = min(5000, cfg.eval_size)

        @eqx.filter_jit
        def mse_terms(m, x):
            y = jax.lax.map(jax.vmap(m), x.reshape(-1, chunk, x.shape[-1]))
            y = y.reshape(x.shape)
            lab = labels(x)
            return (jnp.mean((y - lab) ** 2), monosemantic_mse(x, m.n_neurons),
                    jnp.mean((x - lab) ** 2))

        n = -(-cfg.eval_size // chunk) * chunk
        k1, k2 = jax.random.split(key)
        x1 = sparse_uniform(k1, n, cfg.n_features, cfg.p, -1.0, 1.0, "reject")
        mse, mono, ident = (float(v) for v in mse_terms(model, x1))
        n_small = min(n, 20_000)
        per_k = {}
        for k in (1, 2, 3):
            xk = exactly_k(jax.random.fold_in(k2, k), n_small, cfg.n_features, k, -1.0, 1.0)
            m, b, _ = mse_terms(model, xk)
            per_k[str(k)] = {"mse": float(m), "monosemantic": float(b)}
        j = min(42, cfg.n_features - 1)
        resp = np.asarray(model(jnp.eye(cfg.n_features)[j]))
        x_all = sparse_uniform(jax.random.fold_in(k2, 7), n_small, cfg.n_features, cfg.p,
                               -1.0, 1.0, "allow")
        train_mse = float(mse_terms(model, x_all)[0])
        ok = mse <= cfg.gate_ratio * mono
        return {
            "final_loss": train_mse,
            "mse_at_least_one_active": mse,
            "monosemantic_baseline_mse": mono,
            "identity_baseline_mse": ident,
            "mse_exactly_k_active": per_k,
            "one_hot_feature": j,
            "one_hot_response": float(resp[j]),
            "one_hot_max_other": float(np.abs(np.delete(resp, j)).max()),
            "gate": {"passed": bool(ok), "checks": {"mse_vs_monosemantic": {
                "value": mse, "max": cfg.gate_ratio * mono, "ok": bool(ok)}}},
        }

    def plot(self, cfg: ResidMLPConfig, model: ResidMLP, data: Any, result: Any, run_dir: Path):
        out = [plots.loss_curves(result.history, run_dir / "loss.png", title=self.name)]
        out.append(feature_response(model, run_dir / "feature_response.png", self.name))
        return [p for p in out if p is not None]


def feature_response(model: ResidMLP, path: Path, name: str) -> Path:
    """Left: output_i against x_i (all other features 0) for every feature, with the label
    function. Right: each feature's output at x_i = 1 (label 2) and the largest off-target
    output."""
    f = model.n_features
    xs = jnp.linspace(-1.0, 1.0, 41)
    eye = jnp.eye(f)
    inputs = xs[:, None, None] * eye[None]  # (41, F, F): row i sweeps feature i
    out = jax.vmap(jax.vmap(model))(inputs)  # (41, F, F)
    diag = np.asarray(jnp.diagonal(out, axis1=1, axis2=2))  # (41, F)
    at1 = np.asarray(jax.vmap(model)(eye))
    fig, (a, b) = plots.plt.subplots(1, 2, figsize=(11, 4))
    a.plot(np.asarray(xs), diag, color="C0", alpha=0.25, lw=0.8)
    a.plot(np.asarray(xs), np.asarray(labels(xs)), "k--", lw=2, label="label x + ReLU(x)")
    a.plot(np.asarray(xs), np.asarray(xs), ":", color="gray", label="x")
    a.set_xlabel("x_i (all other features 0)")
    a.set_ylabel("output_i")
    a.legend()
    a.set_title(f"{name}: per-feature response")
    b.bar(np.arange(f), np.diag(at1), label="output_i at x_i = 1")
    off = np.abs(at1 - np.diag(np.diag(at1))).max(1)
    b.plot(np.arange(f), off, "r.", label="max |other output|")
    b.axhline(2.0, color="k", ls="--", label="label 2")
    b.set_xlabel("feature i")
    b.legend(fontsize=8)
    return plots.save(fig, path)


register(ResidMLPTarget("resid-mlp-1", "Residual MLP, 100 features, 1 layer x 50 neurons "
                        "(compressed computation)"))
register(ResidMLPTarget("resid-mlp-2", "Residual MLP, 100 features, 2 layers x 25 neurons "
                        "(cross-layer)", n_layers=2, d_mlp=25))
register(ResidMLPTarget("resid-mlp-3", "Residual MLP, 102 features, 3 layers x 17 neurons "
                        "(cross-layer)", n_features=102, n_layers=3, d_mlp=17))
