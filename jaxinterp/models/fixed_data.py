"""Shared recipe of the L3D toys: a fixed training set of ``n_train`` rows visited in
reshuffled minibatches for ``epochs`` epochs, plus a separate evaluation set of the same
kind (specs/toy-models.md §4)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from .._checks import check_positive, check_probability
from .._types import Array, Key
from .base import ToyTarget, TrainConfig
from .data import epoch_batch


@dataclasses.dataclass(frozen=True, kw_only=True)
class FixedDataConfig(TrainConfig):
    """AdamW lr 1e-3, wd 1e-3, constant; batch 128 over a fixed 10k set; 1000 epochs
    (78 updates per epoch, 78 000 updates)."""

    n_train: int = 10_000
    n_eval: int = 10_000
    p: float = 0.05
    batch_size: int = 128
    steps: int = 78_000
    lr: float = 1e-3
    weight_decay: float = 1e-3
    steps_per_call: int = 1000

    def __post_init__(self):
        super().__post_init__()
        check_positive(type(self).__name__, "n_train", self.n_train, integer=True)
        check_positive(type(self).__name__, "n_eval", self.n_eval, integer=True)
        check_probability(type(self).__name__, "p", self.p)

    @property
    def steps_per_epoch(self) -> int:
        return max(self.n_train // self.batch_size, 1)


class FixedDataTarget(ToyTarget):
    """Subclasses implement :meth:`draw` (inputs) and :meth:`labels` (from the model)."""

    config_cls = FixedDataConfig

    def __init__(self, name: str, description: str, **defaults: Any):
        self.name, self.description, self.defaults = name, description, defaults

    def config(self, **overrides: Any):
        return super().config(**{**self.defaults, **overrides})

    def draw(self, cfg: Any, key: Key, n: int) -> Array:
        raise NotImplementedError

    def labels(self, cfg: Any, model: Any, x: Array) -> Array:
        raise NotImplementedError

    def make_data(self, cfg: Any, key: Key) -> dict[str, Array]:
        k_train, k_eval, k_shuffle = jax.random.split(key, 3)
        return {"x_train": self.draw(cfg, k_train, cfg.n_train),
                "x_eval": self.draw(cfg, k_eval, cfg.n_eval),
                "shuffle_key": jax.random.key_data(k_shuffle)}

    def sample(self, cfg: Any, data: dict[str, Array], key: Key, step: Array) -> Array:
        # Epoch e's order comes from the dataset's own shuffle key folded with e, so every
        # row is visited once per epoch (the per-step ``key`` is not needed here).
        idx = epoch_batch(jax.random.wrap_key_data(data["shuffle_key"]), step,
                          cfg.n_train, cfg.batch_size)
        return data["x_train"][idx]

    def mse(self, cfg: Any, model: Any, x: Array) -> Array:
        return jnp.mean((jax.vmap(model)(x) - self.labels(cfg, model, x)) ** 2)

    def loss(self, cfg: Any, model: Any, x: Array):
        return self.mse(cfg, model, x), {}
