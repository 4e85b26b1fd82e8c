"""Plumbing shared by the decomposition methods' runs: presets with overrides, CLI value
coercion, the trained-target cache, the fit-then-evaluate driver of every method, and the
``jaxinterp run METHOD TARGET`` runner."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .._checks import fail
from ..models import base


def batch_inputs(batch: Any) -> jax.Array:
    """The inputs of a sampled batch (a target's sampler returns ``x`` or ``(x, ...)``)."""
    return batch[0] if isinstance(batch, tuple) else batch


def preset_config(cls: type, presets: dict[str, dict[str, Any]], fn: str, target: str,
                  overrides: dict[str, Any]) -> Any:
    """``cls(**presets[target], **overrides)`` with clear errors for unknown names."""
    if target not in presets:
        raise fail(fn, "target", f"one of {sorted(presets)}", repr(target))
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise fail(fn, "overrides", f"fields of {cls.__name__}", bad)
    return cls(**{**presets[target], **overrides})


def coerce_overrides(overrides: dict[str, Any], cls: type, method: str,
                     int_fields: tuple[str, ...] = (),
                     str_fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """CLI strings to the types of the fields of the config dataclass ``cls`` (fields whose
    default is None are floats, or tuples of floats when comma-separated, unless listed in
    ``int_fields`` or ``str_fields``)."""
    types = {f.name: f.default for f in dataclasses.fields(cls)}
    out = {}
    for k, v in overrides.items():
        if k not in types:
            raise fail(method, f"--{k.replace('_', '-')}", f"a field of {cls.__name__}",
                       "an unknown option", f"Known: {', '.join(sorted(types))}.")
        d = types[k]
        if not isinstance(v, str):
            out[k] = v
        elif v.lower() in ("none", "null"):
            out[k] = None
        elif k in str_fields:
            out[k] = v
        elif isinstance(d, bool):
            out[k] = v.lower() in ("1", "true", "yes")
        elif k in int_fields or (isinstance(d, int) and not isinstance(d, bool)):
            out[k] = int(v)
        elif isinstance(d, tuple):
            out[k] = tuple(type(d[0])(s) if d else s for s in v.split(",") if s)
        elif isinstance(d, float) or d is None:
            out[k] = tuple(float(s) for s in v.split(",") if s) if "," in v else float(v)
        else:
            out[k] = v
    return out


def load_or_train_target(name: str, target_dir: str | Path | None, *, progress: bool = True
                         ) -> tuple[Any, Any, base.ToyTarget]:
    """The trained target from ``target_dir``, or from the cache ``runs/targets/NAME-seed0``
    (trained on its default recipe, seed 0, if missing)."""
    if target_dir is not None:
        model, tcfg, target = base.load_target(target_dir)
        if target.name != name:
            raise fail("load_or_train_target", "target_dir", f"a run of {name!r}",
                       f"a run of {target.name!r}")
        return model, tcfg, target
    cache = Path("runs") / "targets" / f"{name}-seed0"
    if (cache / base.MODEL_FILE).exists():
        return base.load_target(cache)
    r = base.train_target(name, out=cache, progress=progress)
    return r.model, r.config, base.get_target(name)


class RunSettings(NamedTuple):
    """Per-run hyperparameters of a vmapped fit (:func:`run_settings`)."""

    fit_hyper: dict[str, jax.Array] | None  # for ``fit(hyper=)``; lr as ``lr_scale``
    configs: list[Any]  # each run's config (its evaluation uses it)
    header: dict[str, list[float]]  # for the checkpoint header (a resume must match)


def run_settings(fn: str, cfg: Any, n_runs: int, hyper: dict[str, Any] | None,
                 sweepable: tuple[str, ...]) -> RunSettings:
    """Check per-run values of the config fields ``hyper`` names and turn them into the
    traced hyperparameters of one vmapped fit.

    Only fields in ``sweepable`` may vary between the runs of one fit: loss coefficients
    that are on (a coefficient of None turns its term off, which changes the program), the
    exponents the loss computes with, and ``lr`` (as a factor on the updates over
    ``cfg.lr``). Everything else is structure and takes one value per fit.

    Raises:
        ValueError: an unknown or non-sweepable field, a list of the wrong length, a
            coefficient that is off in ``cfg``, or a non-positive learning rate.
    """
    if not hyper:
        return RunSettings(None, [cfg] * n_runs, {})
    fields = {f.name for f in dataclasses.fields(cfg)}
    fit_hyper, header = {}, {}
    for name, values in hyper.items():
        if name not in fields:
            raise fail(fn, "hyper", f"fields of {type(cfg).__name__}", repr(name))
        if name not in sweepable:
            raise fail(fn, "hyper", f"fields that may vary within one vmapped fit "
                       f"{list(sweepable)}", repr(name),
                       "Other fields change the program: run their values one after another.")
        vals = [float(v) for v in values]
        if len(vals) != n_runs:
            raise fail(fn, f"hyper[{name!r}]", f"{n_runs} values (one per run)", len(vals))
        if name.startswith("c_") and getattr(cfg, name) is None:
            raise fail(fn, f"hyper[{name!r}]", f"a term that is on ({name} not None in the "
                       "config)", None, f"Set --{name.replace('_', '-')} in the base config.")
        if name == "lr":
            if min(vals) <= 0:
                raise fail(fn, "hyper['lr']", "positive learning rates", min(vals))
            fit_hyper["lr_scale"] = jnp.asarray([v / cfg.lr for v in vals], jnp.float32)
        else:
            fit_hyper[name] = jnp.asarray(vals, jnp.float32)
        header[name] = vals
    configs = [dataclasses.replace(cfg, **{k: v[i] for k, v in header.items()})
               for i in range(n_runs)]
    return RunSettings(fit_hyper, configs, header)


def with_hyper(base: Any, hyper: dict[str, Any] | None, skip: tuple[str, ...] = ("lr_scale",)
               ) -> Any:
    """The NamedTuple ``base`` (a loss config) with the traced values of ``hyper`` for the
    fields it has (``lr_scale`` is the fit's)."""
    if not hyper:
        return base
    return base._replace(**{k: v for k, v in hyper.items()
                            if k not in skip and k in base._fields})


class SeedsFit(NamedTuple):
    """A vmapped decomposition fit and every seed's evaluation (:func:`fit_seeds`)."""

    result: Any  # FitResult: trained pytree with a leading seeds axis, history
    seed_metrics: list[dict[str, Any]]
    wall_time_s: float
    run_dir: Path | None
    header: dict[str, Any]


def fit_seeds(method: str, target_name: str, cfg: Any, seeds: list[int], keys: jax.Array,
              init: Any, frozen: Any, optimizer: Any, loss_fn: Callable, sample_fn: Callable,
              evaluate: Callable[[Any, dict[str, Any], int], dict[str, Any]], *, steps: int,
              out: str | Path | None, progress: bool, resume: bool,
              header_extra: dict[str, Any] | None = None,
              settings: RunSettings | None = None, **fit_kwargs: Any) -> SeedsFit:
    """The run every decomposition method shares: write ``out/config.json``, fit all
    ``seeds`` in one vmapped :func:`~jaxinterp.train.fit` (checkpointing into ``out``,
    resuming from it), then evaluate each seed.

    Args:
        method, target_name: names for the header and the progress bar.
        cfg: the method's config dataclass (``steps_per_call``, ``checkpoint_every``; the
            ``seed_batch`` field if it has one).
        keys: ``(seeds,)`` run keys; ``init``: trainable pytree with a leading seeds axis.
        evaluate: ``(trained pytree of one seed, its history {name: (n_logged,)}, index)
            -> metrics``; the seed is added as ``"seed"``.
        steps: total number of updates.
        header_extra: more header entries (beside method, target, config, seeds).
        settings: per-run hyperparameters (:func:`run_settings`): traced into the fit and
            recorded in the header as ``hyper`` (a resume must match them).
        fit_kwargs: passed on to :func:`~jaxinterp.train.fit` (``data``, ``project``, ...).
    """
    from ..train import fit
    from ..train.fit import open_run_dir, steps_extendable

    run_dir = Path(out) if out is not None else None
    header = {"method": method, "target": target_name, "config": dataclasses.asdict(cfg),
              "seeds": list(seeds), **(header_extra or {})}
    if settings is not None and settings.header:
        header["hyper"] = settings.header
        fit_kwargs["hyper"] = settings.fit_hyper
    extendable = steps_extendable(cfg)
    open_run_dir(run_dir, header, steps, resume=resume, extendable=extendable)
    t0 = time.perf_counter()
    result = fit(loss_fn, init, frozen, optimizer, sample_fn, steps=steps, key=keys,
                 seeds=True, frozen_axis=None,
                 steps_per_call=min(cfg.steps_per_call, max(steps, 1)),
                 seed_batch=getattr(cfg, "seed_batch", None), checkpoint_dir=run_dir,
                 compute_dtype=getattr(cfg, "compute_dtype", "float32"),
                 checkpoint_every=cfg.checkpoint_every, resume=resume, header=header,
                 extendable=extendable, progress=progress,
                 desc=f"{method} {target_name}", **fit_kwargs)
    wall = time.perf_counter() - t0
    seed_metrics = []
    for i, s in enumerate(seeds):
        one = jax.tree_util.tree_map(lambda v, i=i: v[i], result.params)
        hist = {k: v[:, i] for k, v in result.history.items() if k != "step"}
        seed_metrics.append({"seed": s, **evaluate(one, hist, i)})
    return SeedsFit(result, seed_metrics, wall, run_dir, header)


def final_losses(hist: dict[str, Any], skip: tuple[str, ...] = (),
                 rename: dict[str, str] | None = None) -> dict[str, float]:
    """The last logged value of every history entry, as ``loss/NAME`` (or ``rename[NAME]``),
    leaving out ``skip`` and entries never logged."""
    rename = rename or {}
    return {rename.get(k, f"loss/{k}"): float(v[-1]) for k, v in hist.items()
            if k not in skip and len(v)}


def summary_head(seed_metrics: list[dict[str, Any]], result: Any, wall: float,
                 drop: Callable[[str, Any], bool]) -> dict[str, Any]:
    """The top of every method's metrics.json: the first seed's scalar entries (those
    ``drop`` keeps), the seeds, updates, wall time and time per update."""
    out = {k: v for k, v in seed_metrics[0].items() if not drop(k, v)}
    out.update({"seeds": [m["seed"] for m in seed_metrics], "steps": int(result.step),
                "wall_time_s": wall, "time_per_step_ms": 1e3 * result.time_per_step})
    return out


def probe_sites(t: Any, target: base.ToyTarget, data_cfg: Any, paths: tuple[str, ...]) -> Any:
    """The decomposed sites of ``paths`` in the target ``t`` (``apply``, ``params``), probed
    on one example sampled with ``data_cfg``."""
    from .apd import make_sites

    x0 = batch_inputs(target.sample(data_cfg, None, jax.random.key(0), jnp.asarray(0)))[0]
    return make_sites(t.apply, t.params, x0, paths)


class SavedRun(NamedTuple):
    """What every finished ``jaxinterp run METHOD`` directory holds, reloaded by
    :func:`read_saved_run` (the method's loader adds its components)."""

    file: Path  # components.eqx
    header: dict[str, Any]
    config: Any
    seeds: list[int]
    model: Any
    target: base.ToyTarget
    target_config: Any


def read_saved_run(fn: str, run_dir: str | Path, method: str, config_cls: type,
                   target_dir: str | Path | None) -> SavedRun:
    """The header of ``run_dir/components.eqx`` (config, seeds) and the target it was
    trained on (``target_dir``, or the cached ``runs/targets/NAME-seed0``).

    Raises:
        ValueError: naming ``fn``'s ``run_dir`` if it holds no finished ``method`` run.
    """
    from .. import io

    file = Path(run_dir) / "components.eqx"
    if not file.is_file():
        raise fail(fn, "run_dir", f"a finished {method.upper()} run (components.eqx)",
                   str(run_dir))
    header = io.read_header(file)
    if header.get("method") != method:
        raise fail(fn, "run_dir", f"an {method.upper()} run", header.get("method"))
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in header["config"].items()}
    model, target_cfg, target = load_or_train_target(header["target"], target_dir,
                                                     progress=False)
    seeds = [int(s) for s in header["seeds"]]
    return SavedRun(file, header, config_cls(**raw), seeds, model, target, target_cfg)


def saved_components(run: SavedRun, paths: tuple[str, ...],
                     init: Callable[[Any, Any, jax.Array], Any]) -> tuple[Any, Any]:
    """The decomposed sites of a reloaded run's target and its trained components (leading
    seeds axis), read from ``components.eqx`` into the shapes ``init(params, sites, key)``
    gives one seed (only traced, never run)."""
    import equinox as eqx

    from .. import io
    from ..rng import seed_key
    from ..target import from_equinox

    t = from_equinox(run.model)
    sites = probe_sites(t, run.target, dataclasses.replace(run.target_config, batch_size=1),
                        paths)
    like = eqx.filter_eval_shape(jax.vmap(lambda k: init(t.params, sites, k)),
                                 jnp.stack([seed_key(s) for s in run.seeds]))
    comps, _ = io.load_tree(run.file, like)
    return sites, comps


def cli_runner(method: str, make_config: Callable[..., Any], cls: type,
               int_fields: tuple[str, ...], train: Callable[..., Any],
               summary: Callable[[Any], dict[str, Any]] | None = None,
               options: tuple[str, ...] = ()) -> Callable[..., dict]:
    """The ``run`` callable of a :class:`jaxinterp.methods.Method`: build the config from
    the preset and CLI overrides, load or train the target, decompose all seeds in one
    vmapped run, write ``runs/METHOD-TARGET-seedN`` (or ``--out``) and return the metrics
    to print (``summary(result)``, default ``result.metrics``). ``options`` are CLI
    options that are not config fields but keyword arguments of ``make_config`` (strings;
    e.g. SPD's ``--recipe main``)."""

    def run(target_name: str, *, seeds: list[int], steps: int | None, out: str | None,
            target_dir: str | None, overrides: dict[str, Any], progress: bool) -> dict:
        if steps is not None:
            overrides = {**overrides, "steps": steps}
        extra = {k: v for k, v in overrides.items() if k in options}
        overrides = {k: v for k, v in overrides.items() if k not in options}
        cfg = make_config(target_name, **extra,
                          **coerce_overrides(overrides, cls, method, int_fields))
        model, tcfg, target = load_or_train_target(target_name, target_dir, progress=progress)
        tag = f"seed{seeds[0]}" if len(seeds) == 1 else f"seeds{seeds[0]}-{seeds[-1]}"
        out = out or f"runs/{method}-{target_name}-{tag}"
        res = train(model, target, tcfg, cfg, seeds, out=out, progress=progress)
        files = sorted(p.name for p in Path(out).glob("*.eqx") if p.name != "checkpoint.eqx")
        print(f"\nrun directory: {out}  ({', '.join(['config.json', 'metrics.json', *files])})")
        if res.plots:
            print("plots: " + ", ".join(res.plots))
        return summary(res) if summary else res.metrics

    return run


def sweep_runner(method: str, make_config: Callable[..., Any], cls: type,
                 int_fields: tuple[str, ...], train: Callable[..., Any],
                 sweepable: tuple[str, ...] | Callable[[Any], tuple[str, ...]],
                 options: tuple[str, ...] = ()) -> Callable[..., dict]:
    """The ``sweep`` callable of a :class:`jaxinterp.methods.Method`
    (:func:`jaxinterp.decomposition.sweep.run_sweep` with the method's pieces)."""

    def sweep(target_name: str, **kwargs: Any) -> dict:
        from .sweep import run_sweep

        return run_sweep(method, target_name, make_config=make_config, cls=cls,
                         int_fields=int_fields, train=train, sweepable=sweepable,
                         options=options, **kwargs)

    return sweep
