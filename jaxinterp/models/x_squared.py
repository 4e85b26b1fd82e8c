"""``x-squared``: a deep ELU network trained to map ``x_i -> x_i**2`` on signed sparse
inputs (a complex loss landscape for L3D).

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

from .. import plots
from .._checks import check_in, check_positive, check_shape
from .._types import Array, Key
from .base import register
from .data import signed, sparse_uniform
from .fixed_data import FixedDataConfig, FixedDataTarget
from .layers import Dense

Cache = dict[str, tuple[Array, Array]]
ACTIVATIONS = {"elu": jax.nn.elu, "gelu": jax.nn.gelu}


class DeepMLP(eqx.Module):
    """An MLP whose activation follows EVERY layer, the output included. One example per
    call; layers are ``.layers[i].weight`` / ``.layers[i].bias``."""

    layers: tuple[Dense, ...]
    activation: str = eqx.field(static=True)

    def __init__(self, widths: tuple[int, ...], activation: str = "elu", *, key: Key):
        check_in("DeepMLP", "activation", activation, tuple(ACTIVATIONS))
        if len(widths) < 2:
            raise ValueError(f"DeepMLP: expected widths of length >= 2, got {widths}.")
        for w in widths:
            check_positive("DeepMLP", "widths", w, integer=True)
        keys = jax.random.split(key, len(widths) - 1)
        layers = []
        for k, d_in, d_out in zip(keys, widths[:-1], widths[1:], strict=True):
            kw, kb = jax.random.split(k)
            w = jax.random.normal(kw, (d_in, d_out)) * (2.0 / d_in) ** 0.5
            layers.append(Dense(w, jax.random.uniform(kb, (d_out,), minval=0.01, maxval=1.0)))
        self.layers = tuple(layers)
        self.activation = activation

    def forward_with_cache(self, x: Array) -> tuple[Array, Cache]:
        check_shape("DeepMLP", "x", x, (self.layers[0].weight.shape[0],),
                    "The model takes one example; vmap over the batch.")
        act = ACTIVATIONS[self.activation]
        cache: Cache = {}
        for i, layer in enumerate(self.layers):
            pre = x @ layer.weight
            cache[f".layers[{i}].weight"] = (x, pre)
            x = act(pre + layer.bias)
        return x, cache

    def __call__(self, x: Array) -> Array:
        return self.forward_with_cache(x)[0]

    def ground_truth(self) -> dict[str, Any]:
        """Feature i's computation ``x_i -> x_i**2`` is subnetwork i."""
        return {"n_subnetworks": self.layers[0].weight.shape[0], "label_fn": "x**2"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class XSquaredConfig(FixedDataConfig):
    widths: tuple[int, ...] = (5, 10, 10, 10, 10, 5)
    activation: str = "elu"
    gate_mse: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        check_in("XSquaredConfig", "activation", self.activation, tuple(ACTIVATIONS))
        if self.widths[0] != self.widths[-1]:
            raise ValueError(f"XSquaredConfig: expected widths[0] == widths[-1] (x -> x**2), "
                             f"got {self.widths}.")


class XSquaredTarget(FixedDataTarget):
    config_cls = XSquaredConfig

    def init(self, cfg: XSquaredConfig, key: Key) -> DeepMLP:
        return DeepMLP(tuple(cfg.widths), cfg.activation, key=key)

    def draw(self, cfg: XSquaredConfig, key: Key, n: int) -> Array:
        k1, k2 = jax.random.split(key)
        return signed(k2, sparse_uniform(k1, n, cfg.widths[0], cfg.p, 0.0, 1.0, "reject"))

    def labels(self, cfg: XSquaredConfig, model: DeepMLP, x: Array) -> Array:
        return x**2

    def evaluate(self, cfg: XSquaredConfig, model: DeepMLP, data: Any, key: Key):
        mse = float(self.mse(cfg, model, data["x_eval"]))
        var = float(jnp.mean(jnp.var(data["x_eval"] ** 2, axis=0)))
        ok = mse <= cfg.gate_mse
        return {"final_loss": float(self.mse(cfg, model, data["x_train"])), "eval_mse": mse,
                "label_variance": var,
                "gate": {"passed": bool(ok),
                         "checks": {"mse": {"value": mse, "max": cfg.gate_mse, "ok": bool(ok)}}}}

    def plot(self, cfg: XSquaredConfig, model: DeepMLP, data: Any, result: Any, run_dir: Path):
        xs = jnp.linspace(-1, 1, 81)
        f = cfg.widths[0]
        resp = jax.vmap(jax.vmap(model))(xs[:, None, None] * jnp.eye(f)[None])
        ys = {f"out_{i}(x_{i})": resp[:, i, i] for i in range(f)}
        ys["x^2"] = xs**2
        out = [plots.loss_curves(result.history, run_dir / "loss.png", title=self.name),
               plots.curves(xs, ys, run_dir / "response.png", xlabel="x_i (others 0)",
                            title=f"{self.name}: per-feature response")]
        return [p for p in out if p is not None]


register(XSquaredTarget("x-squared", "Deep ELU MLP 5-10-10-10-10-5 computing x_i -> x_i^2"))
