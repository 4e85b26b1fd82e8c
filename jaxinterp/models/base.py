"""The toy-model zoo's shared machinery: training presets, the registry, and
``train_target`` (vmapped over seeds, gate-checked, written to a run directory).

A target is described by a :class:`ToyTarget`: a config dataclass, an initialiser, a pure
sampler, a loss, an evaluation with the quality gate of ``specs/toy-models.md``, and
plots. Adding a target is one subclass plus :func:`register`; the CLI, training loop,
checkpointing and run directories come for free.
"""

from __future__ import annotations

import dataclasses
import time
import types
import typing
from pathlib import Path
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import io
from .._checks import check_in, check_nonnegative, check_positive, fail
from ..rng import Stream, seed_key, stream_key
from ..train import fit, make_optimizer
from ..train.fit import open_run_dir, steps_extendable
from ..train.optim import OPTIMIZERS
from ..train.schedules import SCHEDULES
from ..tree import where

MODEL_FILE = "model.eqx"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Fields every training preset shares. Subclasses add model/data fields and override
    defaults with the recipe of ``specs/toy-models.md``.

    Attributes:
        seed: first seed; seeds ``seed .. seed + n_seeds - 1`` train in one vmapped run.
        n_seeds: candidate seeds trained together; the first that passes the gate is kept.
        steps: optimizer updates.
        batch_size: examples per update.
        optimizer, lr, weight_decay, b1, b2: optax optimizer settings.
        schedule, warmup_frac, warmup_steps: learning-rate schedule (specs/README.md §4).
        steps_per_call: updates fused into one jit call.
        eval_every: evaluation period in updates during training (0: at the end only).
        checkpoint_every: checkpoint period in updates (0: at the end only).
    """

    seed: int = 0
    n_seeds: int = 1
    steps: int = 1000
    batch_size: int = 1024
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    schedule: str = "constant"
    warmup_frac: float = 0.0
    warmup_steps: int = 0
    steps_per_call: int = 200
    eval_every: int = 0
    checkpoint_every: int = 0

    def __post_init__(self):
        fn = type(self).__name__
        check_nonnegative(fn, "seed", self.seed, integer=True)
        check_positive(fn, "n_seeds", self.n_seeds, integer=True)
        check_nonnegative(fn, "steps", self.steps, integer=True)
        check_positive(fn, "batch_size", self.batch_size, integer=True)
        check_in(fn, "optimizer", self.optimizer, OPTIMIZERS)
        check_nonnegative(fn, "lr", self.lr)
        check_nonnegative(fn, "weight_decay", self.weight_decay)
        check_in(fn, "schedule", self.schedule, SCHEDULES)
        if not 0.0 <= self.warmup_frac < 1.0:
            raise fail(fn, "warmup_frac", "in [0, 1)", self.warmup_frac)
        check_nonnegative(fn, "warmup_steps", self.warmup_steps, integer=True)
        check_positive(fn, "steps_per_call", self.steps_per_call, integer=True)
        check_nonnegative(fn, "eval_every", self.eval_every, integer=True)
        check_nonnegative(fn, "checkpoint_every", self.checkpoint_every, integer=True)


def config_fields(cls: type) -> dict[str, type]:
    """``{field: python type}`` of a config dataclass (resolving string annotations)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(cls: type, name: str, value: Any) -> Any:
    """Convert a CLI/JSON value to the type of config field ``name``."""
    fields = config_fields(cls)
    if name not in fields:
        raise fail(cls.__name__, "a config field", "one of " + ", ".join(fields), repr(name))
    typ = fields[name]
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        if value in (None, "None", "none", "null"):
            return None
        typ = args[0]
    if typing.get_origin(typ) is tuple:
        parts = value.split(",") if isinstance(value, str) else list(value)
        return tuple(coerce_scalar(typing.get_args(typ)[0], name, p) for p in parts)
    return coerce_scalar(typ, name, value)


def coerce_scalar(typ: type, name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return typ(value) if typ in (int, float, bool, str) else value
    try:
        if typ is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(float(value)) if float(value).is_integer() else int(value)
        return typ(value)
    except ValueError:
        raise fail("config", name, f"a value of type {typ.__name__}", repr(value)) from None


class ToyTarget:
    """A registered toy model with its training recipe and quality gate.

    Subclasses set ``name``, ``description``, ``config_cls`` and implement
    :meth:`init`, :meth:`sample`, :meth:`loss` and :meth:`evaluate`.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    config_cls: ClassVar[type[TrainConfig]] = TrainConfig
    classification: ClassVar[bool] = False
    frozen: ClassVar[tuple[str, ...]] = ()
    """Keypaths of arrays that are part of the model but never trained."""

    # --- configuration -------------------------------------------------------------
    def config(self, **overrides: Any) -> TrainConfig:
        """The default recipe with ``overrides`` applied (values coerced to field types)."""
        vals = {k: coerce(self.config_cls, k, v) for k, v in overrides.items()}
        return self.config_cls(**vals)

    # --- model and data ------------------------------------------------------------
    def init(self, cfg: Any, key: jax.Array) -> eqx.Module:
        raise NotImplementedError

    def make_data(self, cfg: Any, key: jax.Array) -> Any:
        """Fixed dataset for this seed (None: fresh batches every step)."""
        return None

    def sample(self, cfg: Any, data: Any, key: jax.Array, step: jax.Array) -> Any:
        raise NotImplementedError

    def loss(self, cfg: Any, model: Any, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise NotImplementedError

    def trainable(self, model: Any) -> Any:
        """Mask of trained leaves: inexact arrays not listed in ``frozen``."""
        mask = jax.tree_util.tree_map(eqx.is_inexact_array, model)
        for path in self.frozen:
            frozen = where(model, path)
            mask = jax.tree_util.tree_map(lambda m, f: m and not f, mask, frozen)
        return mask

    # --- evaluation ----------------------------------------------------------------
    def train_metrics(self, cfg: Any, model: Any, data: Any, key: jax.Array) -> dict[str, Any]:
        """Cheap jittable metrics logged during training (default: none)."""
        return {}

    def should_stop(self, cfg: Any, evals: dict[str, np.ndarray]) -> bool:
        """Early stop from the training-time metrics (default: never)."""
        return False

    def evaluate(self, cfg: Any, model: Any, data: Any, key: jax.Array) -> dict[str, Any]:
        """Metrics of one trained model, including ``final_loss`` and ``gate`` (a dict
        with ``passed`` and the individual checks)."""
        raise NotImplementedError

    def plot(self, cfg: Any, model: Any, data: Any, result: TrainedTarget,
             run_dir: Path) -> list[Path]:
        return []

    def ground_truth(self, model: Any) -> dict[str, Any]:
        return model.ground_truth() if hasattr(model, "ground_truth") else {}


TARGETS: dict[str, ToyTarget] = {}


def register(target: ToyTarget) -> ToyTarget:
    if target.name in TARGETS:
        raise ValueError(f"register: target {target.name!r} is already registered")
    TARGETS[target.name] = target
    return target


def get_target(name: str) -> ToyTarget:
    if name not in TARGETS:
        raise fail("get_target", "name", "one of " + ", ".join(sorted(TARGETS)), repr(name))
    return TARGETS[name]


@dataclasses.dataclass(frozen=True)
class TrainedTarget:
    """A trained target and its report.

    Attributes:
        model: the kept seed's model (one example per call).
        config: the config it was trained with.
        seed: the kept seed.
        metrics: its evaluation (``final_loss``, ``gate``, ...).
        seed_metrics: the evaluation of every candidate seed.
        history: per-step loss terms of the kept seed.
        evals: training-time metrics of the kept seed.
        run_dir: where it was written (None if not written).
    """

    model: Any
    config: Any
    target: str
    seed: int
    metrics: dict
    seed_metrics: list
    history: dict
    evals: dict
    run_dir: Path | None


def _index(tree: Any, i: int) -> Any:
    return jax.tree_util.tree_map(lambda x: x[i] if eqx.is_array(x) else x, tree)


def init_models(target: ToyTarget, cfg: Any, seeds: list[int]) -> tuple[Any, Any, jax.Array]:
    """Stacked models and fixed datasets for ``seeds`` (leading ``seeds`` axis)."""
    keys = jnp.stack([seed_key(s) for s in seeds])
    models = eqx.filter_vmap(lambda k: target.init(cfg, stream_key(k, Stream.INIT)))(keys)
    datas = [target.make_data(cfg, stream_key(k, Stream.SPLIT)) for k in keys]
    data = None if datas[0] is None else jax.tree_util.tree_map(lambda *xs: np.stack(xs), *datas)
    return models, data, keys


def train_target(
    target: ToyTarget | str,
    cfg: Any | None = None,
    *,
    out: str | Path | None = None,
    progress: bool = True,
    resume: bool = True,
    plots: bool = True,
) -> TrainedTarget:
    """Train ``target`` with ``cfg`` over ``cfg.n_seeds`` vmapped seeds and keep the first
    seed that passes the quality gate (seed ``cfg.seed`` if none does).

    Args:
        target: a :class:`ToyTarget` or its registered name.
        cfg: its config (default recipe if None).
        out: run directory; gets ``config.json``, ``metrics.json``, ``model.eqx`` (the
            kept model, header = target, config and gate report), ``history.npz``, the
            resumable ``checkpoint.eqx`` and plots.
        progress: tqdm progress bar.
        resume: continue from ``out/checkpoint.eqx`` when present.
        plots: write PNG plots to ``out``.

    Returns:
        A :class:`TrainedTarget`.
    """
    target = get_target(target) if isinstance(target, str) else target
    cfg = target.config() if cfg is None else cfg
    seeds = [cfg.seed + i for i in range(cfg.n_seeds)]
    run_dir = Path(out) if out is not None else None
    header = {"target": target.name, "config": dataclasses.asdict(cfg), "seeds": seeds}
    extendable = steps_extendable(cfg)
    open_run_dir(run_dir, header, cfg.steps, resume=resume, extendable=extendable)
    models, data, keys = init_models(target, cfg, seeds)
    mask = target.trainable(_index(models, 0))
    params, frozen = eqx.partition(models, mask)
    t0 = time.perf_counter()
    history: dict[str, np.ndarray] = {}
    evals: dict[str, np.ndarray] = {}
    if cfg.steps > 0:
        data_axis = None if data is None else 0

        def loss_fn(p, f, batch):
            return target.loss(cfg, eqx.combine(p, f), batch)

        def sample_fn(d, k, step):
            return target.sample(cfg, d, k, step)

        @eqx.filter_jit
        def train_metrics(p, f, d):
            fn = lambda p1, f1, d1, k1: target.train_metrics(
                cfg, eqx.combine(p1, f1), d1, stream_key(k1, Stream.EVAL))
            return jax.vmap(fn, in_axes=(0, 0, data_axis, 0))(p, f, d, keys)

        has_metrics = bool(jax.eval_shape(
            lambda: target.train_metrics(cfg, _index(models, 0),
                                         None if data is None else _index(data, 0),
                                         stream_key(keys[0], Stream.EVAL))))
        opt = make_optimizer(cfg.optimizer, cfg.lr, cfg.steps, weight_decay=cfg.weight_decay,
                             b1=cfg.b1, b2=cfg.b2, schedule=cfg.schedule,
                             warmup_frac=cfg.warmup_frac,
                             warmup_steps=cfg.warmup_steps or None)
        result = fit(
            loss_fn, params, frozen, opt, sample_fn,
            steps=cfg.steps, key=keys, data=data, seeds=True, data_axis=data_axis,
            steps_per_call=cfg.steps_per_call,
            eval_fn=(lambda p, f, s: train_metrics(p, f, data)) if has_metrics else None,
            eval_every=cfg.eval_every or None,
            stop_fn=lambda ev: target.should_stop(cfg, ev),
            checkpoint_dir=run_dir, checkpoint_every=cfg.checkpoint_every or None,
            resume=resume, header=header, extendable=extendable,
            progress=progress, desc=f"train {target.name}",
        )
        params, history, evals = result.params, result.history, result.evals
    wall = time.perf_counter() - t0
    models = eqx.combine(params, frozen)
    seed_metrics = []
    for i, s in enumerate(seeds):
        m = target.evaluate(cfg, _index(models, i), None if data is None else _index(data, i),
                            stream_key(keys[i], Stream.EVAL))
        seed_metrics.append({"seed": s, **m})
    passing = [i for i, m in enumerate(seed_metrics) if m["gate"]["passed"]]
    keep = passing[0] if passing else 0
    metrics = {
        **seed_metrics[keep],
        "steps": int(history["step"][-1]) if "step" in history else 0,
        "wall_time_s": wall,
        "n_seeds_passing": len(passing),
    }
    hist = {k: (v[:, keep] if v.ndim == 2 else v) for k, v in history.items()}
    ev = {k: (v[:, keep] if v.ndim == 2 else v) for k, v in evals.items()}
    model = _index(models, keep)
    kept_data = None if data is None else _index(data, keep)
    trained = TrainedTarget(model=model, config=cfg, target=target.name, seed=seeds[keep],
                            metrics=metrics, seed_metrics=seed_metrics, history=hist, evals=ev,
                            run_dir=run_dir)
    if run_dir is not None:
        io.save_tree(run_dir / MODEL_FILE, model,
                     {**header, "seed": seeds[keep], "gate": metrics["gate"]})
        io.write_json(run_dir / "metrics.json", metrics)
        io.save_history(run_dir / "history.npz",
                        {**hist, **{f"eval/{k}": v for k, v in ev.items()}})
        if plots:
            target.plot(cfg, model, kept_data, trained, run_dir)
    return trained


def load_target(run_dir: str | Path) -> tuple[Any, Any, ToyTarget]:
    """Load ``(model, config, target)`` from a run directory written by
    :func:`train_target` (or a ``model.eqx`` file)."""
    path = Path(run_dir)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise fail("load_target", "run_dir", f"a run directory containing {MODEL_FILE}",
                   str(path))
    header = io.read_header(file)
    target = get_target(header["target"])
    cfg = target.config(**{k: v for k, v in header["config"].items()})
    like = eqx.filter_eval_shape(target.init, cfg, jax.random.key(0))
    model, _ = io.load_tree(file, like)
    return model, cfg, target


def make_seed_data(target: ToyTarget, cfg: Any, seed: int) -> Any:
    """The fixed dataset of ``seed`` (as used in training), or None."""
    return target.make_data(cfg, stream_key(seed_key(seed), Stream.SPLIT))

