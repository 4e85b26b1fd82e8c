"""Digits MLP (``digits-mlp``): a 64 -> 64 -> 64 -> 10 ReLU classifier on scikit-learn's
8x8 digits, the in-environment stand-in for the LIB paper's MNIST and CIFAR-10 MLPs.

Pixels are divided by 16; the stratified 75/25 split (``random_state=0``) is the same
for every seed (1347 training and 450 test images). The seed covers the initialisation
and the minibatch order.

References:
    Bushnaq et al. 2024, "The Local Interaction Basis: Identifying Computationally-Relevant
    and Sparsely Interacting Features in Neural Networks" (arXiv 2405.10928); data: Alpaydin
    & Kaynak 1998, UCI optical recognition of handwritten digits (``load_digits``).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import plots
from .._checks import check_positive, check_shape, fail
from .._types import Array, Float, Int, Key
from ..rng import Stream
from .base import ToyTarget, TrainConfig, register
from .data import epoch_batch

Cache = dict[str, tuple[Array, Array]]


class Linear(eqx.Module):
    """``x @ weight + bias`` with ``weight: (d_in, d_out)``; init ``U(±1/sqrt(d_in))`` for
    both (the framework-default Linear)."""

    weight: Float[Array, "d_in d_out"]
    bias: Float[Array, " d_out"]

    def __init__(self, d_in: int, d_out: int, *, key: Key):
        check_positive("Linear", "d_in", d_in, integer=True)
        check_positive("Linear", "d_out", d_out, integer=True)
        kw, kb = jax.random.split(key)
        bound = 1.0 / d_in**0.5
        self.weight = jax.random.uniform(kw, (d_in, d_out), minval=-bound, maxval=bound)
        self.bias = jax.random.uniform(kb, (d_out,), minval=-bound, maxval=bound)


class DigitsMLP(eqx.Module):
    """ReLU MLP classifier. Call on ONE example ``(d_in,)``; vmap for batches.

    Attributes:
        layers: ``.layers[l]`` (``.weight (d_in, d_out)``, ``.bias (d_out,)``); ReLU after
            every layer but the last, which returns logits.
    """

    layers: tuple[Linear, ...]

    def __init__(self, widths: tuple[int, ...] = (64, 64, 64, 10), *, key: Key):
        if len(widths) < 2:
            raise fail("DigitsMLP", "widths", "at least (d_in, d_out)", widths)
        keys = jax.random.split(key, len(widths) - 1)
        self.layers = tuple(Linear(a, b, key=k) for a, b, k in zip(widths[:-1], widths[1:], keys,
                                                                    strict=True))

    @property
    def d_in(self) -> int:
        return self.layers[0].weight.shape[0]

    def forward_with_cache(self, x: Float[Array, " d_in"]) -> tuple[Array, Cache]:
        """Logits ``(n_classes,)`` and, per weight matrix ``.layers[l].weight``, its input
        and pre-bias output."""
        check_shape("DigitsMLP", "x", x, (f"d_in={self.d_in}",),
                    "The model takes one example; vmap over the batch.")
        cache: Cache = {}
        h = x
        for i, layer in enumerate(self.layers):
            out = h @ layer.weight
            cache[f".layers[{i}].weight"] = (h, out)
            h = out + layer.bias
            if i < len(self.layers) - 1:
                h = jax.nn.relu(h)
        return h, cache

    def __call__(self, x: Float[Array, " d_in"]) -> Float[Array, " n_classes"]:
        return self.forward_with_cache(x)[0]


@functools.lru_cache(maxsize=4)
def digits_split(test_size: float = 0.25, split_seed: int = 0) -> dict[str, np.ndarray]:
    """scikit-learn digits, pixels / 16, stratified ``train_test_split`` (fixed, no key).

    Returns:
        ``{"x_train": (1347, 64), "y_train": (1347,), "x_test": (450, 64), "y_test":
        (450,)}`` for the defaults (float32 / int32). Treat as read-only (cached).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    x = (np.asarray(ds.data, np.float64) / 16.0).astype(np.float32)
    y = np.asarray(ds.target, np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, stratify=y,
                                              random_state=split_seed)
    out = {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}
    for v in out.values():
        v.setflags(write=False)
    return out


def cross_entropy(logits: Float[Array, "batch n_classes"], labels: Int[Array, " batch"]) -> Array:
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def accuracy(logits: Float[Array, "batch n_classes"], labels: Int[Array, " batch"]) -> Array:
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DigitsConfig(TrainConfig):
    """Adam lr 1e-3 (no weight decay), batch 64, 100 epochs of 21 minibatches (2100
    updates; the last 3 images of each reshuffled epoch are dropped).

    Attributes:
        hidden: hidden widths.
        test_size, split_seed: the fixed stratified split.
        gate_accuracy: quality gate on test accuracy.
    """

    hidden: tuple[int, ...] = (64, 64)
    test_size: float = 0.25
    split_seed: int = 0
    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 64
    steps: int = 2100
    steps_per_call: int = 21
    eval_every: int = 21
    gate_accuracy: float = 0.96

    def __post_init__(self):
        super().__post_init__()
        for h in self.hidden:
            check_positive("DigitsConfig", "hidden", h, integer=True)
        if not 0.0 < self.test_size < 1.0:
            raise fail("DigitsConfig", "test_size", "in (0, 1)", self.test_size)


class DigitsTarget(ToyTarget):
    name = "digits-mlp"
    description = "64-64-64-10 ReLU MLP on scikit-learn digits (MNIST/CIFAR stand-in)"
    config_cls = DigitsConfig
    classification = True

    def init(self, cfg: DigitsConfig, key: Key) -> DigitsMLP:
        return DigitsMLP((64, *cfg.hidden, 10), key=key)

    def make_data(self, cfg: DigitsConfig, key: Key) -> dict[str, np.ndarray]:
        """The fixed split plus this seed's minibatch-shuffle key (raw ``uint32`` data, so
        the datasets of several seeds stack)."""
        split = digits_split(cfg.test_size, cfg.split_seed)
        shuffle = np.asarray(jax.random.key_data(jax.random.fold_in(key, int(Stream.SHUFFLE))))
        return {**{k: np.array(v) for k, v in split.items()}, "shuffle_key": shuffle}

    def sample(self, cfg: DigitsConfig, data: dict[str, Array], key: Key, step: Array):
        # Epoch e is a permutation fixed by the seed (a seeded reshuffling data loader);
        # the per-step ``key`` is not used.
        n = data["x_train"].shape[0]
        idx = epoch_batch(jax.random.wrap_key_data(data["shuffle_key"]), step, n,
                          cfg.batch_size)
        return data["x_train"][idx], data["y_train"][idx]

    def loss(self, cfg: DigitsConfig, model: DigitsMLP, batch: tuple[Array, Array]):
        x, y = batch
        return cross_entropy(jax.vmap(model)(x), y), {}

    def train_metrics(self, cfg: DigitsConfig, model: DigitsMLP, data: dict[str, Array],
                      key: Key) -> dict[str, Array]:
        out = {}
        for split in ("train", "test"):
            logits = jax.vmap(model)(data[f"x_{split}"])
            out[f"{split}_loss"] = cross_entropy(logits, data[f"y_{split}"])
            out[f"{split}_accuracy"] = accuracy(logits, data[f"y_{split}"])
        return out

    def evaluate(self, cfg: DigitsConfig, model: DigitsMLP, data: dict[str, Any],
                 key: Key) -> dict[str, Any]:
        """Loss and accuracy on both splits; gate: test accuracy ``>= gate_accuracy``."""
        m = {k: float(v) for k, v in eqx.filter_jit(self.train_metrics)(
            cfg, model, {k: jnp.asarray(v) for k, v in data.items() if k != "shuffle_key"},
            key).items()}
        acc = m["test_accuracy"]
        checks = {"test_accuracy": {"value": acc, "min": cfg.gate_accuracy,
                                    "ok": bool(acc >= cfg.gate_accuracy)}}
        return {"final_loss": m["train_loss"], **m,
                "gate": {"passed": all(c["ok"] for c in checks.values()), "checks": checks}}

    def plot(self, cfg: DigitsConfig, model: DigitsMLP, data: Any, result: Any,
             run_dir: Path) -> list[Path]:
        out = [plots.loss_curves(result.history, run_dir / "loss.png", title=self.name)]
        ev = result.evals
        if len(ev.get("step", ())):
            steps = np.asarray(ev["step"])
            out.append(plots.curves(steps, {s: ev[f"{s}_accuracy"] for s in ("train", "test")},
                                    run_dir / "accuracy.png", ylabel="accuracy",
                                    title=f"{self.name}: accuracy"))
        return [p for p in out if p is not None]


register(DigitsTarget())
