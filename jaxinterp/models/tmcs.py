"""Toy model of circuit superposition (``tmcs``) and its grouped, high-rank variant
(``high-rank``): ``y = ReLU((x @ W_in) @ W_out + b)`` trained to ``x @ A``.

References:
    Chrisman, Bushnaq, Sharkey 2025, "Identifying Sparsely Active Circuits Through Local
    Loss Landscape Decomposition" (arXiv 2504.00194).
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
from .._checks import check_positive, check_shape, fail
from .._types import Array, Float, Key
from .base import register
from .data import sparse_uniform
from .fixed_data import FixedDataConfig, FixedDataTarget

Cache = dict[str, tuple[Array, Array]]


class TMCS(eqx.Module):
    """Linear bottleneck with a ReLU output. Call on ONE example ``(n_features,)``.

    Attributes:
        W_in: ``(n_features, d_hidden)``; W_out: ``(d_hidden, n_out)``; b: ``(n_out,)``.
        A: ``(n_features, n_out)`` frozen label map, drawn once per seed (``y* = x @ A``).
    """

    W_in: Float[Array, "n_features d_hidden"]
    W_out: Float[Array, "d_hidden n_out"]
    b: Float[Array, " n_out"]
    A: Float[Array, "n_features n_out"]
    group: int = eqx.field(static=True)

    def __init__(self, n_features: int, d_hidden: int, n_out: int, *, group: int = 1,
                 a_max: float = 3.0, key: Key):
        for name, v in [("n_features", n_features), ("d_hidden", d_hidden), ("n_out", n_out),
                        ("group", group)]:
            check_positive("TMCS", name, v, integer=True)
        k1, k2, k3 = jax.random.split(key, 3)
        self.W_in = jax.random.normal(k1, (n_features, d_hidden))
        self.W_out = jax.random.normal(k2, (d_hidden, n_out))
        self.b = jnp.zeros((n_out,))
        self.A = jax.random.uniform(k3, (n_features, n_out), minval=0.0, maxval=a_max)
        self.group = group

    def forward_with_cache(self, x: Float[Array, " n_features"]) -> tuple[Array, Cache]:
        check_shape("TMCS", "x", x, (self.W_in.shape[0],),
                    "The model takes one example; vmap over the batch.")
        h = x @ self.W_in
        pre = h @ self.W_out
        return jax.nn.relu(pre + self.b), {".W_in": (x, h), ".W_out": (h, pre)}

    def __call__(self, x: Float[Array, " n_features"]) -> Float[Array, " n_out"]:
        return self.forward_with_cache(x)[0]

    def ground_truth(self) -> dict[str, Any]:
        """Subnetwork g is the path of input group g (one feature in ``tmcs``), with
        effective map ``A[group g, :]``; all subnetworks share ``W_out``."""
        f = self.W_in.shape[0]
        groups = np.arange(f).reshape(-1, self.group)
        return {"groups": groups, "effective_maps": self.A.reshape(-1, self.group,
                                                                    self.A.shape[1])}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TMCSConfig(FixedDataConfig):
    n_features: int = 10
    d_hidden: int = 5
    group: int = 1
    gate_fvu: float = 0.08

    def __post_init__(self):
        super().__post_init__()
        check_positive("TMCSConfig", "d_hidden", self.d_hidden, integer=True)
        check_positive("TMCSConfig", "group", self.group, integer=True)
        if self.n_features % self.group:
            raise fail("TMCSConfig", "group", f"to divide n_features={self.n_features}",
                       self.group)


class TMCSTarget(FixedDataTarget):
    config_cls = TMCSConfig
    frozen = (".A",)

    def init(self, cfg: TMCSConfig, key: Key) -> TMCS:
        return TMCS(cfg.n_features, cfg.d_hidden, cfg.n_features, group=cfg.group, key=key)

    def draw(self, cfg: TMCSConfig, key: Key, n: int) -> Array:
        return sparse_uniform(key, n, cfg.n_features, cfg.p, 0.0, 1.0, "reject",
                              group=cfg.group)

    def labels(self, cfg: TMCSConfig, model: TMCS, x: Array) -> Array:
        return x @ model.A

    def evaluate(self, cfg: TMCSConfig, model: TMCS, data: Any, key: Key) -> dict[str, Any]:
        x = data["x_eval"]
        y_star = self.labels(cfg, model, x)
        mse = float(self.mse(cfg, model, x))
        fvu = mse / float(jnp.mean(jnp.var(y_star, axis=0)))
        train = float(self.mse(cfg, model, data["x_train"]))
        ok = fvu <= cfg.gate_fvu
        return {"final_loss": train, "eval_mse": mse, "fvu": fvu,
                "gate": {"passed": bool(ok),
                         "checks": {"fvu": {"value": fvu, "max": cfg.gate_fvu, "ok": bool(ok)}}}}

    def plot(self, cfg: TMCSConfig, model: TMCS, data: Any, result: Any, run_dir: Path):
        eff = np.asarray(model.W_in @ model.W_out)
        out = [plots.loss_curves(result.history, run_dir / "loss.png", title=self.name),
               plots.matrix(np.concatenate([np.asarray(model.A), eff], axis=1),
                            run_dir / "label_map_vs_W_in_W_out.png",
                            title=f"{self.name}: A (left) vs W_in W_out (right)",
                            xlabel="output", ylabel="input feature")]
        return [p for p in out if p is not None]


register(TMCSTarget("tmcs", "Toy model of circuit superposition: 10 -> 5 -> ReLU(10), y* = x A"))
register(TMCSTarget("high-rank", "Grouped TMCS: 30 -> 10 -> ReLU(30), groups of 5 (rank-5 "
                    "subnetworks)", n_features=30, d_hidden=10, group=5, gate_fvu=0.06))
