"""APD runs: the paper's presets, vmapped multi-seed training, evaluation, plots, and the
``jaxinterp run apd TARGET`` registration.

References:
    Braun et al. 2025, "Interpretability in Parameter Space: Minimizing Mechanistic
    Description Length with Attribution-based Parameter Decomposition" (arXiv 2501.14926).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import io, tree
from .._checks import check_in, check_positive, fail
from ..methods import Method, register_method
from ..models import base
from ..rng import Stream, seed_key, stream_key
from ..target import from_equinox
from ..train import make_optimizer
from ..train.fit import COMPUTE_DTYPES
from . import apd
from .apd_metrics import evaluate_apd
from .runs import (
    batch_inputs,
    cli_runner,
    final_losses,
    fit_seeds,
    preset_config,
    probe_sites,
    read_saved_run,
    run_settings,
    saved_components,
    summary_head,
    sweep_runner,
    with_hyper,
)

TMS_PATHS = (".W_enc",)
TMS_ID_PATHS = (".W_enc", ".hidden[0]")


def resid_paths(n_layers: int) -> tuple[str, ...]:
    return tuple(f".layers[{i}].{w}" for i in range(n_layers) for w in ("mlp_in", "mlp_out"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class APDConfig:
    """APD hyperparameters (``specs/apd.md`` section 7); defaults are the TMS 5-2 preset.

    Attributes:
        paths: keypaths of the decomposed weight matrices.
        C, m: number of components and inner rank (``m=None``: min(d_in, d_out) over the
            decomposed matrices).
        batch_size, steps, lr, schedule, warmup_frac: Adam (no weight decay) settings.
        topk: batch top-k fraction (``topk_mode="batch"``) or per-sample integer k
            (``"sample"``); None selects the L_p variant.
        exact_topk, distil_from_target: the spec's top-k options.
        c_faith, c_topk, c_act, c_schatten, c_lp, c_out: loss coefficients (None: off).
        schatten_p, lp_p: the Schatten and L_p exponents.
        attribution: one of :data:`jaxinterp.decomposition.apd.ATTRIBUTIONS`.
        act_sites, act_relu: activation-reconstruction sites (empty: all) and whether a
            ReLU is applied to both sides first.
        unit_norm: unit-norm A columns with projected gradients.
        init_gain, init_fan_instances: the reference's init fan rule.
        attr_chunk: examples per ``lax.map`` chunk of the attribution pass (0: one vmap
            over the batch); chunking is faster on CPU for large sites.
        attr_mode: gradient attributions by one JVP per component (``"fwd"``), one VJP
            per output (``"rev"``), or the fewer products (``"auto"``); the same values
            either way, only the cost differs (tms-40-10: fwd 17.4 vs rev 22.4 ms a step).
        sparse_topk: the top-k masked forward computes only the active (example,
            component) pairs (True), the dense masked sum (False), or decides (None: sparse
            when at most an eighth of the ``batch x C`` mask entries can be active). Same
            values either way (tested); a speed setting.
        steps_per_call, eval_size, checkpoint_every: run mechanics.
        compute_dtype: ``"float32"`` (default), or ``"bfloat16"`` / ``"float16"`` for mixed
            precision (the loss on cast copies; parameters, optimizer state, loss terms and
            ``jnp`` reductions stay float32; :func:`jaxinterp.train.fit.mixed_precision`).
        seed_batch: seeds vmapped together (None: all; see :func:`~jaxinterp.train.fit`);
            1 runs the seeds in turn, which is faster per seed on a CPU.
        success_mmcs, success_ml2r: a TMS seed succeeds when MMCS >= success_mmcs and
            ML2R lies in the closed interval success_ml2r.
    """

    paths: tuple[str, ...] = TMS_PATHS
    C: int = 5
    m: int | None = 3
    batch_size: int = 2048
    steps: int = 20_000
    lr: float = 3e-2
    schedule: str = "constant"
    warmup_frac: float = 0.05
    topk: float | None = 0.211
    topk_mode: str = "batch"
    exact_topk: bool = False
    distil_from_target: bool = False
    c_faith: float | None = 1.0
    c_topk: float | None = 1.0
    c_act: float | None = None
    c_schatten: float | None = 0.7
    c_lp: float | None = None
    c_out: float | None = None
    schatten_p: float = 1.0
    lp_p: float = 1.0
    attribution: str = "gradient_apd"
    act_sites: tuple[str, ...] = ()
    act_relu: bool = False
    unit_norm: bool = False
    init_gain: float = 1.0
    init_fan_instances: int = 12
    attr_chunk: int = 0
    attr_mode: str = "auto"
    sparse_topk: bool | None = None
    steps_per_call: int = 200
    seed_batch: int | None = None
    eval_size: int = 10_000
    checkpoint_every: int = 2000
    compute_dtype: str = "float32"
    success_mmcs: float = 0.998
    success_ml2r: tuple[float, float] = (0.89, 1.02)

    def __post_init__(self):
        check_in("APDConfig", "compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        for name in ("C", "batch_size", "steps_per_call", "eval_size"):
            check_positive("APDConfig", name, getattr(self, name), integer=True)
        if self.steps < 0:
            raise fail("APDConfig", "steps", ">= 0", self.steps)
        if self.m is not None:
            check_positive("APDConfig", "m", self.m, integer=True)
        if self.seed_batch is not None:
            check_positive("APDConfig", "seed_batch", self.seed_batch, integer=True)
        check_positive("APDConfig", "lr", self.lr)
        check_in("APDConfig", "attribution", self.attribution, apd.ATTRIBUTIONS)
        check_in("APDConfig", "attr_mode", self.attr_mode, apd.ATTR_MODES)
        check_in("APDConfig", "topk_mode", self.topk_mode, ("batch", "sample"))
        if self.topk is not None:
            check_positive("APDConfig", "topk", self.topk)
            if self.topk_mode == "batch" and int(self.topk * self.batch_size) < 1:
                raise fail("APDConfig", "topk", "k with floor(k * batch_size) >= 1",
                           f"k={self.topk}, batch_size={self.batch_size}")
        if not self.paths:
            raise fail("APDConfig", "paths", "at least one weight path", self.paths)

    def loss_config(self) -> apd.APDLossConfig:
        return apd.APDLossConfig(
            topk=self.topk, topk_mode=self.topk_mode, exact_topk=self.exact_topk,
            distil_from_target=self.distil_from_target, c_faith=self.c_faith,
            c_topk=self.c_topk, c_act=self.c_act, c_schatten=self.c_schatten,
            c_lp=self.c_lp, c_out=self.c_out, schatten_p=self.schatten_p, lp_p=self.lp_p,
            attribution=self.attribution, act_sites=tuple(self.act_sites),
            act_relu=self.act_relu, attr_chunk=self.attr_chunk, sparse_topk=self.sparse_topk,
            attr_mode=self.attr_mode)


# config fields a sweep may vary within one vmapped fit (jaxinterp sweep)
SWEEPABLE = ("c_faith", "c_topk", "c_act", "c_schatten", "c_lp", "c_out", "lr")


def sweepable(cfg: APDConfig) -> tuple[str, ...]:
    """:data:`SWEEPABLE` less ``lr`` under ``unit_norm`` (its projection is not linear
    in the learning rate)."""
    return tuple(f for f in SWEEPABLE if not (cfg.unit_norm and f == "lr"))


_RESID_SITES = lambda n: tuple(f".layers[{i}].mlp_in" for i in range(n))  # noqa: E731

PRESETS: dict[str, dict[str, Any]] = {
    "tms-5-2": {},
    "tms-40-10": dict(C=50, m=11, lr=1e-3, schedule="quarter_cosine", topk=1.0, c_topk=10.0,
                      c_schatten=20.0, schatten_p=0.9, attribution="gradient",
                      init_fan_instances=3, success_mmcs=0.996, success_ml2r=(0.93, 1.02),
                      attr_mode="fwd"),
    "resid-mlp-1": dict(paths=resid_paths(1), C=130, m=50, batch_size=256, steps=40_000,
                        lr=1e-3, schedule="quarter_cosine", warmup_frac=0.01, topk=1.28,
                        c_topk=1.0, c_act=1.0, c_schatten=10.0, schatten_p=0.9,
                        attribution="gradient", act_sites=_RESID_SITES(1), act_relu=True,
                        unit_norm=True, init_gain=2.0, init_fan_instances=1),
    "resid-mlp-2": dict(paths=resid_paths(2), C=200, m=25, batch_size=256, steps=10_000,
                        lr=1e-3, schedule="quarter_cosine", warmup_frac=0.01, topk=1.28,
                        c_topk=2.0, c_act=1.0, c_schatten=7.0, schatten_p=0.9,
                        attribution="gradient", act_sites=_RESID_SITES(2), act_relu=True,
                        init_gain=2.0, init_fan_instances=1),
}
# APD is reported to fail on the identity variants (paper, SPD paper): run with the
# plain TMS presets, only to document it.
PRESETS["tms-5-2-id"] = {**PRESETS["tms-5-2"], "paths": TMS_ID_PATHS}
PRESETS["tms-40-10-id"] = {**PRESETS["tms-40-10"], "paths": TMS_ID_PATHS}


def apd_config(target: str, **overrides: Any) -> APDConfig:
    """The paper preset for ``target`` with ``overrides`` applied."""
    return preset_config(APDConfig, PRESETS, "apd_config", target, overrides)


@dataclasses.dataclass
class APDResult:
    """Trained components (leading ``seeds`` axis), the target, and per-seed metrics."""

    components: apd.APDComponents
    config: APDConfig
    seeds: list[int]
    metrics: dict[str, Any]
    seed_metrics: list[dict[str, Any]]
    history: dict[str, np.ndarray]
    model: Any
    target_cfg: Any
    plots: list[str] = dataclasses.field(default_factory=list)


def _index(t: Any, i: int) -> Any:
    return jax.tree_util.tree_map(lambda v: v[i], t)


def _rank(params: Any, cfg: APDConfig) -> int:
    """The inner rank m (``cfg.m``, or the smallest side of the decomposed weights)."""
    return cfg.m or min(min(tree.get(params, p).shape) for p in cfg.paths)


def _init(params: Any, cfg: APDConfig, m: int, key: Any) -> apd.APDComponents:
    """One seed's initial components under ``cfg`` (also the loader's template)."""
    comps = apd.init_components(params, cfg.paths, cfg.C, m, gain=cfg.init_gain,
                                fan_instances=cfg.init_fan_instances,
                                key=stream_key(key, Stream.INIT))
    return apd.normalize_columns(comps) if cfg.unit_norm else comps


class APDRun(NamedTuple):
    """A finished APD run reloaded by :func:`load_apd_run`."""

    components: apd.APDComponents  # leading seeds axis
    config: APDConfig
    seeds: list[int]
    metrics: dict[str, Any]
    model: Any
    target: base.ToyTarget
    target_config: Any
    sites: apd.Sites


def load_apd_run(run_dir: str | Path, *, target_dir: str | Path | None = None) -> APDRun:
    """The trained components of a ``jaxinterp run apd`` run directory, with its config,
    seeds, metrics, target and sites.

    Args:
        run_dir: the run's ``--out`` directory (``components.eqx`` and its header).
        target_dir: the target's run directory (None: the cached ``runs/targets/NAME-seed0``
            that ``run apd`` uses without ``--target``).

    Raises:
        ValueError: if the directory holds no finished APD run or the target differs.
    """
    run = read_saved_run("load_apd_run", run_dir, "apd", APDConfig, target_dir)
    cfg, seeds, m = run.config, run.seeds, run.header.get("m")
    sites, comps = saved_components(
        run, cfg.paths, lambda params, _, k: _init(params, cfg, int(m or _rank(params, cfg)), k))
    metrics_file = Path(run_dir) / "metrics.json"
    metrics = io.read_json(metrics_file) if metrics_file.is_file() else {}
    return APDRun(comps, cfg, seeds, metrics, run.model, run.target, run.target_config, sites)


def train_apd(model: Any, target: base.ToyTarget, target_cfg: Any, cfg: APDConfig,
              seeds: list[int], *, out: str | Path | None = None, progress: bool = True,
              resume: bool = True, hyper: dict[str, list[float]] | None = None) -> APDResult:
    """Decompose ``model`` (one trained toy target) with APD, all ``seeds`` in one vmapped
    run, then evaluate every seed.

    Args:
        model: the trained target (an equinox module; one example per call).
        target, target_cfg: its :class:`~jaxinterp.models.base.ToyTarget` and config
            (for the data sampler and the target's own loss).
        cfg: APD settings.
        seeds: APD seeds (init and data); vmapped.
        out: run directory (config.json, metrics.json, components.eqx, plots), or None.
        progress, resume: progress bar; resume from ``out/checkpoint.eqx``.
        hyper: per-run values ``{field: [one per run]}`` of fields in :data:`SWEEPABLE`
            (loss coefficients that are on; ``lr`` unless ``unit_norm``, whose projection
            is not linear in it), vmapped with the seeds (a seed may repeat).
    """
    if not seeds:
        raise fail("train_apd", "seeds", "at least one seed", seeds)
    t = from_equinox(model)
    apply, params = t.apply, t.params
    for path in cfg.paths:
        try:
            tree.get(params, path)
        except ValueError as e:
            raise fail("train_apd", "paths", "weight paths of the target",
                       repr(path), str(e)) from None
    dcfg = dataclasses.replace(target_cfg, batch_size=cfg.batch_size)
    sites = probe_sites(t, target, dcfg, cfg.paths)
    m = _rank(params, cfg)
    keys = jnp.stack([seed_key(s) for s in seeds])
    comps = jax.vmap(lambda k: _init(params, cfg, m, k))(keys)
    opt = make_optimizer("adam", cfg.lr, cfg.steps, schedule=cfg.schedule,
                         warmup_frac=cfg.warmup_frac)
    if cfg.unit_norm:
        opt = optax.chain(apd.unit_norm_columns(), opt, apd.renormalize_columns())
    lcfg = cfg.loss_config()
    settings = run_settings("train_apd", cfg, len(seeds), hyper, sweepable(cfg))

    def loss_fn(c, p, batch, h=None):
        return apd.apd_loss(c, p, batch_inputs(batch), apply=apply, sites=sites,
                            cfg=with_hyper(lcfg, h))

    def sample_fn(_, k, step):
        return target.sample(dcfg, None, k, step)

    def evaluate(c, hist, i):
        return {**evaluate_apd(c, model, apply, params, sites, target, target_cfg,
                               settings.configs[i], key=stream_key(keys[i], Stream.EVAL)),
                **final_losses(hist, rename={"n_active": "train_mean_active"})}

    run = fit_seeds("apd", target.name, cfg, seeds, keys, comps, params, opt, loss_fn,
                    sample_fn, evaluate, steps=cfg.steps, out=out, progress=progress,
                    resume=resume, settings=settings)
    result, seed_metrics, wall, run_dir, header = run
    comps = result.params
    metrics = _summarise(seed_metrics, cfg, result, wall)
    res = APDResult(comps, cfg, list(seeds), metrics, seed_metrics, result.history, model,
                    target_cfg)
    if run_dir is not None:
        io.save_tree(run_dir / "components.eqx", comps, {**header, "m": m})
        io.write_json(run_dir / "metrics.json", metrics)
        from .apd_plots import plot_apd

        res.plots = [str(p) for p in plot_apd(res, sites, run_dir) if p is not None]
    return res


def _summarise(seed_metrics: list[dict], cfg: APDConfig, result: Any, wall: float) -> dict:
    out = summary_head(seed_metrics, result, wall, lambda _, v: isinstance(v, list | dict))
    first = seed_metrics[0]
    if "mmcs" in first:
        lo, hi = cfg.success_ml2r
        ok = [m["mmcs"] >= cfg.success_mmcs and lo <= m["ml2r"] <= hi for m in seed_metrics]
        out["success_rate"] = float(np.mean(ok))
        out["seed_success"] = ok
    out["per_seed"] = seed_metrics
    return out


_INT_FIELDS = ("m", "C", "steps", "batch_size", "attr_chunk", "seed_batch")


register_method(Method(
    name="apd",
    description="Attribution-based Parameter Decomposition (Braun et al. 2025)",
    targets=tuple(PRESETS),
    run=cli_runner("apd", apd_config, APDConfig, _INT_FIELDS, train_apd),
    sweep=sweep_runner("apd", apd_config, APDConfig, _INT_FIELDS, train_apd, sweepable),
))
