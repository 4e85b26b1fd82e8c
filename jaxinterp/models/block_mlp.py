"""``block-mlp``: a hand-built MLP whose weights are block-diagonal, so its two modules are
known exactly (no training). Used to validate LIB and the channel graph: every cross-block
quantity must vanish to round-off.

References:
    Bushnaq et al. 2024, "The Local Interaction Basis" (arXiv 2405.10928) — the modular
    toy of the reference code; specs/toy-models.md §5.
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
from .._checks import check_in, check_positive, check_shape
from .._types import Array, Key
from .base import ToyTarget, TrainConfig, register
from .layers import Dense

Cache = dict[str, tuple[Array, Array]]
ACTIVATIONS = {"relu": jax.nn.relu, "identity": lambda x: x}


def _block(key: Key, size: int, scale: float, equal_columns: bool) -> Array:
    g = jax.random.normal(key, (size, size))
    if equal_columns:
        g = jnp.repeat(g[:, :1], size, axis=1)
    return scale * g


class BlockMLP(eqx.Module):
    """MLP of block-diagonal layers; activation after every layer but the last. One example
    per call; layers are ``.layers[i].weight`` / ``.layers[i].bias``."""

    layers: tuple[Dense, ...]
    block_sizes: tuple[int, ...] = eqx.field(static=True)
    activation: str = eqx.field(static=True)

    def __init__(self, width: int = 8, n_layers: int = 5, *, scales=(2.0, 2.0),
                 activation: str = "relu", bias: float = 0.0, same_matrix_every_layer=False,
                 equal_columns: bool = False, key: Key):
        check_positive("BlockMLP", "width", width, integer=True)
        check_positive("BlockMLP", "n_layers", n_layers, integer=True)
        check_in("BlockMLP", "activation", activation, tuple(ACTIVATIONS))
        if width % 2:
            raise ValueError(f"BlockMLP: expected an even width (two blocks), got {width}.")
        half = width // 2
        layers = []
        for i in range(n_layers):
            k = key if same_matrix_every_layer else jax.random.fold_in(key, i)
            k1, k2 = jax.random.split(k)
            w = jnp.zeros((width, width))
            w = w.at[:half, :half].set(_block(k1, half, scales[0], equal_columns))
            w = w.at[half:, half:].set(_block(k2, half, scales[1], equal_columns))
            layers.append(Dense(w, jnp.full((width,), bias)))
        self.layers = tuple(layers)
        self.block_sizes = (half, half)
        self.activation = activation

    def forward_with_cache(self, x: Array) -> tuple[Array, Cache]:
        width = self.layers[0].weight.shape[0]
        check_shape("BlockMLP", "x", x, (width,),
                    "The model takes one example; vmap over the batch.")
        act = ACTIVATIONS[self.activation]
        cache: Cache = {}
        for i, layer in enumerate(self.layers):
            pre = x @ layer.weight
            cache[f".layers[{i}].weight"] = (x, pre)
            x = pre + layer.bias
            if i < len(self.layers) - 1:
                x = act(x)
        return x, cache

    def __call__(self, x: Array) -> Array:
        return self.forward_with_cache(x)[0]

    def ground_truth(self) -> dict[str, Any]:
        """Two modules: coordinates ``[0, half)`` and ``[half, width)`` at every layer."""
        half = self.block_sizes[0]
        width = 2 * half
        return {"modules": [list(range(half)), list(range(half, width))],
                "module_of_unit": np.repeat(np.arange(2), half)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockMLPConfig(TrainConfig):
    """Hand-built (``steps = 0``). ``sigmas`` are the per-block data scales; ``gated``
    multiplies each block's input by an independent Bernoulli(0.5) gate per sample."""

    steps: int = 0
    width: int = 8
    n_layers: int = 5
    scales: tuple[float, ...] = (2.0, 2.0)
    sigmas: tuple[float, ...] = (1.0, 1.0)
    activation: str = "relu"
    bias: float = 0.0
    same_matrix_every_layer: bool = False
    equal_columns: bool = False
    correlated: bool = False
    gated: bool = False
    n_data: int = 10_000

    def __post_init__(self):
        super().__post_init__()
        check_in("BlockMLPConfig", "activation", self.activation, tuple(ACTIVATIONS))
        if len(self.scales) != 2 or len(self.sigmas) != 2:
            raise ValueError("BlockMLPConfig: expected scales and sigmas of length 2, got "
                             f"{self.scales} and {self.sigmas}.")
        if self.steps:
            raise ValueError(f"BlockMLPConfig: expected steps 0 (hand-built), got {self.steps}.")


class BlockMLPTarget(ToyTarget):
    name = "block-mlp"
    description = "Hand-built 8-wide, 5-layer block-diagonal MLP with two exact modules"
    config_cls = BlockMLPConfig

    def init(self, cfg: BlockMLPConfig, key: Key) -> BlockMLP:
        return BlockMLP(cfg.width, cfg.n_layers, scales=cfg.scales, activation=cfg.activation,
                        bias=cfg.bias, same_matrix_every_layer=cfg.same_matrix_every_layer,
                        equal_columns=cfg.equal_columns, key=key)

    def make_data(self, cfg: BlockMLPConfig, key: Key) -> dict[str, Array]:
        half = cfg.width // 2
        k1, k2 = jax.random.split(key)
        z = jax.random.normal(k1, (cfg.n_data, cfg.width))
        if cfg.correlated:  # every coordinate of a block equals that block's first draw
            z = jnp.concatenate([jnp.repeat(z[:, :1], half, 1),
                                 jnp.repeat(z[:, half:half + 1], half, 1)], axis=1)
        scale = jnp.repeat(jnp.asarray(cfg.sigmas), half)
        x = z * scale[None, :]
        if cfg.gated:
            gates = jax.random.bernoulli(k2, 0.5, (cfg.n_data, 2)).astype(x.dtype)
            x = x * jnp.repeat(gates, half, axis=1)
        return {"x": x}

    def sample(self, cfg, data, key, step):  # hand-built: never trained
        raise RuntimeError("block-mlp is hand-built and has no training step")

    def evaluate(self, cfg: BlockMLPConfig, model: BlockMLP, data: Any, key: Key):
        half = cfg.width // 2
        cross = max(float(jnp.abs(layer.weight[:half, half:]).max()) +
                    float(jnp.abs(layer.weight[half:, :half]).max()) for layer in model.layers)
        ok = cross == 0.0
        return {"final_loss": None, "max_cross_block_weight": cross,
                "output_std": float(jnp.std(jax.vmap(model)(data["x"]))),
                "gate": {"passed": ok, "checks": {"cross_block_weight": {
                    "value": cross, "max": 0.0, "ok": ok}}}}

    def plot(self, cfg: BlockMLPConfig, model: BlockMLP, data: Any, result: Any, run_dir: Path):
        n = len(model.layers)
        fig, axes = plots.plt.subplots(1, n, figsize=(2.6 * n, 2.6))
        vmax = max(float(jnp.abs(lay.weight).max()) for lay in model.layers)
        for i, (ax, lay) in enumerate(zip(np.atleast_1d(axes), model.layers, strict=True)):
            ax.imshow(np.asarray(lay.weight), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            ax.set_title(f".layers[{i}].weight", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        return [plots.save(fig, run_dir / "weights.png")]


register(BlockMLPTarget())
