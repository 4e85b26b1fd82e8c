"""L3D runs: the paper's toy presets, vmapped multi-seed training over a fixed dataset,
evaluation against the toys' ground truth, plots and ``jaxinterp run l3d TARGET``.

``metrics.json`` keys: ``reconstruction_error`` (final-epoch FVU with top-k),
``heldout_fvu``, ``n_matched``, ``match_cosines``, ``coverage``, ``frac_dead``,
``p_act``, ``success_rate`` (multi-seed) and ``per_seed`` with everything per seed
(feature assignment, Pearson r for TMCS, output and sample selectivity for TMS and
x-squared, the impact precision). Plots: ``loss.png``, ``activation_frequency.png``,
``subnetworks.png`` (decoder directions per tensor), ``selectivity.png`` (the
intervention-selectivity matrix).

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

from .. import io, plots, tree
from .._checks import check_in, check_positive, fail
from .._types import Array, Key
from ..methods import Method, register_method
from ..models import base
from ..models.data import epoch_batch_pointwise, sparse_uniform
from ..rng import Stream, seed_key, stream_key
from ..target import from_equinox
from ..train import make_optimizer
from ..train.fit import COMPUTE_DTYPES
from . import l3d
from .l3d_metrics import (
    effect_assignment,
    effective_map_assignment,
    impact,
    intervention_effects,
    output_selectivity,
    sample_selectivity,
    tms_assignment,
)
from .runs import (
    cli_runner,
    fit_seeds,
    preset_config,
    run_settings,
    summary_head,
    sweep_runner,
)

__all__ = ["L3DConfig", "L3DResult", "UntiedTMS", "l3d_config", "l3d_target", "train_l3d"]

GRADIENTS = ("dense", "ghost")


@dataclasses.dataclass(frozen=True, kw_only=True)
class L3DConfig:
    """L3D hyperparameters (``specs/l3d.md`` sections 4 and 5); defaults are the TMS 5-2
    preset.

    Attributes:
        paths: keypaths of the decomposed tensors (empty: the target's default, every
            trained tensor; TMS is decomposed untied as ``.W_in``, ``.W_out``, ``.b``).
        n_v: number of subnetworks.
        ranks: Tucker ranks: one int for every mode, or ``{path_or_glob: int | tuple}``.
        k: BatchTopK fraction; ``floor(k G n_v) + 1`` coefficients kept per group.
        warm_start_epochs: epochs at ``k = 0.999`` before ``k``.
        topk_group: samples per top-k group and reference pool (the reference's
            data-parallel shard); None: the whole batch.
        n_data, n_eval: fixed decomposition / held-out samples (zeros rejected).
        batch_size, epochs: minibatches over the fixed data (remainder dropped).
        steps: total updates (None: ``epochs * floor(n_data / batch_size)``).
        lr, lr_gamma, lr_every_epochs: Adam (no weight decay) with the step schedule.
        divergence: ``"mse"`` (regression) or ``"kl"``.
        loss: ``"fvu"`` (squared, pooled) or ``"ratio"`` (the paper's per-sample ratio).
        norm_quirk: the reference's decoder norm ``sqrt(sum_t ||v_t||_F)``.
        gradients: ``"dense"`` (materialised per-sample gradients) or ``"ghost"`` (matrices
            as inputs x deltas; identical loss, lean memory).
        deltas: intervention step sizes (None: the target's grid).
        n_ref_impact: references averaged in the impact score.
        steps_per_call, checkpoint_every: run mechanics.
        compute_dtype: ``"float32"`` (default), or ``"bfloat16"`` / ``"float16"`` for mixed
            precision (the loss on cast copies; parameters, optimizer state, loss terms and
            ``jnp`` reductions stay float32; :func:`jaxinterp.train.fit.mixed_precision`).
        success_fvu: a seed's FVU bound for success (target-specific rules in
            :func:`seed_success`).
    """

    paths: tuple[str, ...] = ()
    n_v: int = 5
    ranks: int | dict[str, Any] = 1
    k: float = 0.1
    warm_start_epochs: int = 0
    topk_group: int | None = None
    n_data: int = 1000
    n_eval: int = 1000
    batch_size: int = 32
    epochs: int = 1000
    steps: int | None = None
    lr: float = 0.01
    lr_gamma: float = 0.8
    lr_every_epochs: int = 100
    divergence: str = "mse"
    loss: str = "fvu"
    norm_quirk: bool = False
    gradients: str = "dense"
    deltas: tuple[float, ...] | None = None
    n_ref_impact: int = 10
    steps_per_call: int = 500
    checkpoint_every: int = 5000
    compute_dtype: str = "float32"
    success_fvu: float = 0.22

    def __post_init__(self):
        fn = "L3DConfig"
        check_in(fn, "compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        for name in ("n_v", "n_data", "n_eval", "batch_size", "epochs", "lr_every_epochs",
                     "n_ref_impact", "steps_per_call"):
            check_positive(fn, name, getattr(self, name), integer=True)
        check_positive(fn, "lr", self.lr)
        if not 0.0 < self.k <= 1.0:
            raise fail(fn, "k", "in (0, 1]", self.k)
        if self.warm_start_epochs < 0:
            raise fail(fn, "warm_start_epochs", ">= 0", self.warm_start_epochs)
        if self.steps is not None and self.steps < 1:
            raise fail(fn, "steps", ">= 1 or None", self.steps)
        if self.batch_size > self.n_data:
            raise fail(fn, "batch_size", f"<= n_data={self.n_data}", self.batch_size)
        if self.topk_group is not None and self.batch_size % self.topk_group:
            raise fail(fn, "topk_group", f"a divisor of batch_size={self.batch_size}",
                       self.topk_group)
        check_in(fn, "divergence", self.divergence, l3d.DIVERGENCES)
        check_in(fn, "loss", self.loss, l3d.LOSSES)
        check_in(fn, "gradients", self.gradients, GRADIENTS)
        object.__setattr__(self, "paths", (self.paths,) if isinstance(self.paths, str)
                           else tuple(self.paths or ()))

    @property
    def steps_per_epoch(self) -> int:
        return self.n_data // self.batch_size

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else self.epochs * self.steps_per_epoch


_SHARDED = dict(batch_size=128, topk_group=32)
PRESETS: dict[str, dict[str, Any]] = {
    "tms-5-2": {},
    "tmcs": dict(n_v=10, warm_start_epochs=1),
    # The single-run script's high-rank setting (n_v = 8, ranks 2); the paper's figure
    # used n_v = 10 and ranks 3 (--n-v 10 --ranks 3).
    "high-rank": dict(n_v=8, ranks=2, **_SHARDED),
    "x-squared": dict(n_v=5, ranks={"*.weight": 2, "*.bias": 1}, warm_start_epochs=10,
                      success_fvu=0.40, **_SHARDED),
}
# config fields a sweep may vary within one vmapped fit (jaxinterp sweep); k is a static
# top-k width
SWEEPABLE = ("lr",)
_INT_FIELDS = ("n_v", "steps", "batch_size", "epochs", "topk_group", "warm_start_epochs",
               "n_data", "n_eval")
TMS_GRID = tuple(float(d) for d in np.round(np.linspace(-3.0, 3.0, 31), 6))
SQUARE_GRID = (-1.0, -0.5, -0.3, -0.1, 0.1, 0.3, 0.5, 1.0)


def l3d_config(target: str, **overrides: Any) -> L3DConfig:
    """The paper preset for ``target`` with ``overrides`` applied."""
    return preset_config(L3DConfig, PRESETS, "l3d_config", target, overrides)


class UntiedTMS(eqx.Module):
    """TMS with the decoder as its own matrix: ``ReLU(x @ W_in @ W_out + b)`` (L3D
    decomposes TMS untied, 25 parameters for 5-2; ``specs/l3d.md`` pitfall 8). One
    example per call."""

    W_in: Array
    W_out: Array
    b: Array

    def __call__(self, x: Array) -> Array:
        return jax.nn.relu(x @ self.W_in @ self.W_out + self.b)


def l3d_target(model: Any, target_name: str, paths: tuple[str, ...] | None = None
               ) -> tuple[Any, Any, tuple[str, ...]]:
    """``(apply, params, decomposed paths)`` of a trained toy for L3D.

    TMS targets become :class:`UntiedTMS` (``W_out = W_enc^T``); for other equinox
    targets the default paths are every floating leaf except the frozen ones.
    """
    if target_name.startswith("tms"):
        if model.hidden:
            raise fail("l3d_target", "model", "a TMS without the hidden identity",
                       target_name, "L3D's TMS preset decomposes W_in, W_out and b only.")
        model = UntiedTMS(model.W_enc, model.W_enc.T, model.b)
        default: tuple[str, ...] = (".W_in", ".W_out", ".b")
    else:
        frozen = getattr(base.get_target(target_name), "frozen", ()) if (
            target_name in base.TARGETS) else ()
        default = tuple(n for n, leaf in tree.leaves_with_names(model)
                        if eqx.is_inexact_array(leaf)
                        and not any(n.startswith(f) for f in frozen))
    t = from_equinox(model)
    names = tuple(paths) if paths else default
    for n in names:
        tree.get(t.params, n)  # clear error for unknown paths
    return t.apply, t.params, names


def decomposition_data(target: base.ToyTarget, target_cfg: Any, key: Key, n: int) -> Array:
    """``n`` samples of the target's input distribution with all-zero rows rejected."""
    if hasattr(target, "draw"):
        return target.draw(target_cfg, key, n)
    if hasattr(target_cfg, "n_features") and hasattr(target_cfg, "p"):
        return sparse_uniform(key, n, target_cfg.n_features, target_cfg.p, 0.0, 1.0, "reject")
    raise fail("decomposition_data", "target", "a toy with a sparse input distribution",
               target.name)


@dataclasses.dataclass
class L3DResult:
    """Trained subnetworks (leading ``seeds`` axis) and per-seed metrics."""

    subnetworks: l3d.Subnetworks
    config: L3DConfig
    seeds: list[int]
    metrics: dict[str, Any]
    seed_metrics: list[dict[str, Any]]
    history: dict[str, np.ndarray]
    plots: list[str] = dataclasses.field(default_factory=list)


def _grads_fn(cfg: L3DConfig, apply: Any, params: Any, names: tuple[str, ...]):
    f = l3d.decomposed_fn(apply, params, names)
    if cfg.gradients == "dense":
        return lambda w, x, ref: l3d.sample_gradients(f, w, x, ref, divergence=cfg.divergence)
    ghost = None

    def grads(w, x, ref):
        nonlocal ghost
        if ghost is None:
            ghost = tuple(n for n in names if jnp.ndim(w[n]) == 2)
        return l3d.ghost_gradients(apply, params, w, x, ref, ghost=ghost,
                                   divergence=cfg.divergence)

    return grads


def make_loss_fn(cfg: L3DConfig, apply: Any, params: Any, names: tuple[str, ...]):
    """``loss_fn(sub, w, (x, ref, step)) -> (loss, aux)`` of the fit loop."""
    grads_fn = _grads_fn(cfg, apply, params, names)
    spe = cfg.steps_per_epoch
    warm = cfg.warm_start_epochs > 0
    k_static = max(cfg.k, 0.999) if warm else cfg.k

    def loss_fn(sub, w, batch, h=None):  # h: a sweep's lr (applied by the fit loop)
        x, ref, step = batch
        grads = grads_fn(w, x, ref)
        k_active = jnp.where(step // spe < cfg.warm_start_epochs, 0.999, cfg.k) if warm else None
        return l3d.l3d_loss(sub, grads, k_static, group=cfg.topk_group, k_active=k_active,
                            loss=cfg.loss)

    return loss_fn


def train_l3d(model: Any, target: base.ToyTarget, target_cfg: Any, cfg: L3DConfig,
              seeds: list[int], *, out: str | Path | None = None, progress: bool = True,
              resume: bool = True, hyper: dict[str, list[float]] | None = None) -> L3DResult:
    """Decompose ``model`` with L3D, all ``seeds`` in one vmapped run, then evaluate each.

    Every seed draws its own decomposition data, initialisation, shuffles and references
    from ``seed_key(seed)``. ``hyper``: per-run values of :data:`SWEEPABLE` fields (the
    learning rate), vmapped with the seeds (a seed may repeat).
    """
    if not seeds:
        raise fail("train_l3d", "seeds", "at least one seed", seeds)
    apply, params, names = l3d_target(model, target.name, cfg.paths or None)
    w = {n: jnp.asarray(tree.get(params, n)) for n in names}
    shapes = {n: tuple(v.shape) for n, v in w.items()}
    ranks = l3d.resolve_ranks("L3DConfig", cfg.ranks, shapes)
    keys = jnp.stack([seed_key(s) for s in seeds])

    def seed_data(k):
        return {"x": decomposition_data(target, target_cfg, stream_key(k, Stream.DATA),
                                        cfg.n_data),
                "shuffle": jax.random.key_data(stream_key(k, Stream.SHUFFLE))}

    data = jax.vmap(seed_data)(keys)
    sub0 = jax.vmap(lambda k: l3d.init_subnetworks(shapes, ranks, cfg.n_v, quirk=cfg.norm_quirk,
                                                   key=stream_key(k, Stream.INIT)))(keys)
    steps, spe = cfg.total_steps, cfg.steps_per_epoch
    opt = make_optimizer("adam", cfg.lr, steps, schedule="step", gamma=cfg.lr_gamma,
                         every=cfg.lr_every_epochs, steps_per_epoch=spe)
    loss_fn = make_loss_fn(cfg, apply, params, names)
    settings = run_settings("train_l3d", cfg, len(seeds), hyper, SWEEPABLE)

    def sample_fn(d, key, step):
        idx = epoch_batch_pointwise(jax.random.wrap_key_data(d["shuffle"]), step,
                                    cfg.n_data, cfg.batch_size)
        ref = l3d.reference_indices(jax.random.fold_in(key, Stream.REFERENCE), cfg.batch_size,
                                    cfg.topk_group)
        return d["x"][idx], ref, step

    def evaluate(sub_i, hist, i):
        return evaluate_l3d(sub_i, hist, model, apply, params, names, target, target_cfg,
                            settings.configs[i], key=stream_key(keys[i], Stream.EVAL))

    run = fit_seeds("l3d", target.name, cfg, seeds, keys, sub0, w, opt, loss_fn, sample_fn,
                    evaluate, steps=steps, out=out, progress=progress, resume=resume,
                    header_extra={"paths": list(names)}, settings=settings, data=data,
                    data_axis=0,
                    project=lambda s: l3d.normalize_decoder(s, quirk=cfg.norm_quirk))
    result, seed_metrics, wall, run_dir, header = run
    sub = result.params
    metrics = _summarise(seed_metrics, result, wall)
    res = L3DResult(sub, cfg, list(seeds), metrics, seed_metrics, result.history)
    if run_dir is not None:
        io.save_tree(run_dir / "subnetworks.eqx", sub, header)
        io.write_json(run_dir / "metrics.json", metrics)
        res.plots = [str(p) for p in plot_l3d(res, names, run_dir, target.name) if p is not None]
    return res


def heldout_fvu(sub: l3d.Subnetworks, w: dict[str, Array], x: Array, cfg: L3DConfig,
                apply: Any, params: Any, names: tuple[str, ...], *, key: Key) -> float:
    """The training loss (top-k at ``k``) on ``x`` in batches of ``batch_size`` with fresh
    references, averaged over the batches (spec section 6)."""
    grads_fn = _grads_fn(cfg, apply, params, names)
    nb = x.shape[0] // cfg.batch_size
    xb = x[: nb * cfg.batch_size].reshape(nb, cfg.batch_size, *x.shape[1:])

    def one(args):
        i, xx = args
        ref = l3d.reference_indices(jax.random.fold_in(key, i), cfg.batch_size, cfg.topk_group)
        return l3d.l3d_loss(sub, grads_fn(w, xx, ref), cfg.k, group=cfg.topk_group)[1]["fvu"]

    return float(jnp.mean(jax.jit(lambda: jax.lax.map(one, (jnp.arange(nb), xb)))()))


def evaluate_l3d(sub: l3d.Subnetworks, hist: dict[str, np.ndarray], model: Any, apply: Any,
                 params: Any, names: tuple[str, ...], target: base.ToyTarget, target_cfg: Any,
                 cfg: L3DConfig, *, key: Key) -> dict[str, Any]:
    """Every L3D metric of one seed (spec section 6)."""
    spe = cfg.steps_per_epoch
    w = {n: jnp.asarray(tree.get(params, n)) for n in names}
    f = l3d.decomposed_fn(apply, params, names)
    k_data, k_ref, k_imp = jax.random.split(key, 3)
    x = decomposition_data(target, target_cfg, k_data, cfg.n_eval)
    p_act = np.asarray(hist["active"][-spe:]).mean(axis=0)
    live = p_act > 0
    dec = {n: np.asarray(v) for n, v in l3d.directions(sub.dec).items()}
    enc = l3d.directions(sub.enc)
    m: dict[str, Any] = {
        "reconstruction_error": float(np.mean(hist["fvu"][-spe:])),
        "heldout_fvu": heldout_fvu(sub, w, x, cfg, apply, params, names, key=k_ref),
        "p_act": p_act.tolist(), "n_live": int(live.sum()),
        "frac_dead": float(np.mean(~live)),
    }
    name = target.name
    deltas = np.asarray(cfg.deltas or (TMS_GRID if name.startswith("tms") else SQUARE_GRID))
    effects = np.asarray(intervention_effects(f, w, dec, x, jnp.asarray(deltas)))
    if name.startswith("tms"):
        m.update(tms_assignment(dec[".W_in"], np.asarray(model.W_enc), live))
    elif name in ("tmcs", "high-rank"):
        group = model.group
        m.update(effective_map_assignment(dec[".W_in"], dec[".W_out"], np.asarray(model.A),
                                          live, group))
    else:
        at = int(np.argmin(np.abs(deltas - 0.3)))
        m.update(effect_assignment(effects[at], live))
    if name.startswith("tms") or name == "x-squared":
        j = np.asarray(m["assignment"])
        osel = output_selectivity(effects, j)  # (n_delta, n_v)
        ssel = sample_selectivity(effects, j, np.asarray(x))
        m["deltas"] = deltas.tolist()
        m["output_selectivity"] = osel.tolist()
        m["sample_selectivity"] = ssel.tolist()
        # At δ = ±0.3, sign-invariantly (a subnetwork's sign is arbitrary): |Δy| pooled
        # over both signs (headline), and the worse / better of the two signs.
        at = [int(np.argmin(np.abs(deltas - d))) for d in (-0.3, 0.3)]
        pooled = output_selectivity(effects[at].mean(axis=0), j)
        m["output_selectivity_pm0.3"] = _live_median(pooled, live)
        m["output_selectivity_pm0.3_worse_sign"] = _live_median(osel[at].min(0), live)
        m["output_selectivity_pm0.3_better_sign"] = _live_median(osel[at].max(0), live)
        m["sample_selectivity_pm0.3"] = _live_median(
            sample_selectivity(effects[at].mean(axis=0), j, np.asarray(x)), live)
        if name == "x-squared":
            hidden = {n: (np.zeros_like(v) if _outer_layer(n, names) else v)
                      for n, v in dec.items()}
            eff_h = np.asarray(intervention_effects(f, w, hidden, x, jnp.asarray(deltas)))
            m["hidden_only_output_selectivity_pm0.3"] = _live_median(
                output_selectivity(eff_h[at].mean(axis=0), j), live)
        # Impact: do a subnetwork's top-10 samples by I(x, k) use its feature?
        y_all = jax.vmap(lambda xx: f(w, xx))(x)
        refs = y_all[jax.random.randint(k_imp, (cfg.n_ref_impact,), 0, x.shape[0])]
        imp = np.asarray(impact(f, w, enc, x, refs, divergence=cfg.divergence))
        top = np.argsort(-imp, axis=0)[:10]  # (10, n_v)
        xs = np.asarray(x)
        prec = [float(np.mean(xs[top[:, k], j[k]] != 0)) for k in range(len(j))]
        m["impact_precision_top10"] = prec
    m["effects_mean"] = effects.mean(axis=2).tolist()  # (n_delta, n_v, n_out)
    m["success"] = seed_success(name, m, cfg, model)
    return m


def _outer_layer(name: str, names: tuple[str, ...]) -> bool:
    layers = sorted({n.split("]")[0] for n in names})
    return name.split("]")[0] in (layers[0], layers[-1])


def _live_median(v: np.ndarray, live: np.ndarray) -> float:
    v = np.asarray(v)[np.asarray(live, bool)]
    return float(np.median(v)) if v.size else float("nan")


def seed_success(name: str, m: dict[str, Any], cfg: L3DConfig, model: Any) -> bool:
    """The required checks of ``specs/l3d.md`` section 7 that one seed can meet."""
    fvu_ok = m["reconstruction_error"] <= cfg.success_fvu
    live = np.asarray(m["p_act"]) > 0
    if name.startswith("tms"):
        n = model.W_enc.shape[0]
        align = np.asarray(m["assignment_cosine"])[live]
        p = np.asarray(m["p_act"])[live]
        return bool(fvu_ok and m["coverage"] == n and live.sum() == n and align.min() >= 0.99
                    and p.min() >= 0.05 and p.max() <= 0.2)
    if name == "tmcs":
        return bool(fvu_ok and m["coverage"] == model.A.shape[0] and m["pooled_r"] >= 0.85)
    if name == "high-rank":
        n_groups = model.A.shape[0] // model.group
        return bool(m["coverage"] == n_groups and m["n_live"] == n_groups)
    if name == "x-squared":
        return bool(fvu_ok and m["coverage"] >= 4 and m["output_selectivity_pm0.3"] >= 5.0)
    return bool(fvu_ok)


def _summarise(seed_metrics: list[dict], result: Any, wall: float) -> dict[str, Any]:
    keep = ("reconstruction_error", "heldout_fvu", "n_matched", "match_cosines", "coverage",
            "frac_dead", "p_act", "n_live", "pooled_r", "output_selectivity_pm0.3",
            "output_selectivity_pm0.3_worse_sign", "output_selectivity_pm0.3_better_sign",
            "sample_selectivity_pm0.3", "hidden_only_output_selectivity_pm0.3")
    out = summary_head(seed_metrics, result, wall, lambda k, _: k not in keep)
    ok = [bool(m["success"]) for m in seed_metrics]
    out.update({"success_rate": float(np.mean(ok)), "seed_success": ok})
    if "coverage" in seed_metrics[0]:
        out["coverage_per_seed"] = [m["coverage"] for m in seed_metrics]
    out["fvu_per_seed"] = [m["reconstruction_error"] for m in seed_metrics]
    out["per_seed"] = [{k: v for k, v in m.items() if k != "effects_mean"}
                       for m in seed_metrics]
    return out


def plot_l3d(res: L3DResult, names: tuple[str, ...], run_dir: Path, target_name: str
             ) -> list[Path | None]:
    """Loss curves, activation frequencies, decoder directions and the intervention
    selectivity matrix, for the first seed."""
    run_dir = Path(run_dir)
    hist = {k: v[:, 0] for k, v in res.history.items() if k in ("loss", "fvu")}
    hist["step"] = res.history["step"]
    m0 = res.seed_metrics[0]
    out: list[Path | None] = [plots.loss_curves(hist, run_dir / "loss.png",
                                                title=f"L3D {target_name} (seed {res.seeds[0]})")]
    fig, ax = plots.plt.subplots(figsize=(6, 3))
    ax.bar(np.arange(len(m0["p_act"])), m0["p_act"], color="0.3")
    ax.set_xlabel("subnetwork")
    ax.set_ylabel("P_act (final epoch)")
    ax.set_title(f"activation frequency ({m0['n_live']} live)")
    out.append(plots.save(fig, run_dir / "activation_frequency.png"))
    sub0 = jax.tree_util.tree_map(lambda v: v[0], res.subnetworks)
    out.append(plot_subnetworks(sub0, names, run_dir / "subnetworks.png",
                                assignment=m0.get("assignment")))
    eff = np.asarray(m0["effects_mean"])  # (n_delta, n_v, n_out)
    deltas = np.asarray(m0.get("deltas") or res.config.deltas or SQUARE_GRID)
    if len(deltas) == eff.shape[0]:
        at = int(np.argmin(np.abs(deltas - 0.3)))
    else:
        at = eff.shape[0] - 1
    sel = eff[at] / np.maximum(eff[at].max(axis=1, keepdims=True), 1e-30)
    out.append(plots.matrix(sel, run_dir / "selectivity.png", symmetric=False,
                            title=f"mean |Δy| under δ={deltas[at]:+.2g} (row-normalised)",
                            xlabel="output", ylabel="subnetwork"))
    return out


def plot_subnetworks(sub: l3d.Subnetworks, names: tuple[str, ...], path: str | Path, *,
                     assignment: list[int] | None = None) -> Path:
    """Decoder direction of every subnetwork (rows) per decomposed tensor (columns), each
    tensor on its own symmetric colour scale; vectors drawn as one row."""
    dirs = {n: np.asarray(v) for n, v in l3d.directions(sub.dec).items()}
    n_v = sub.n_v
    fig, axes = plots.plt.subplots(n_v, len(names), squeeze=False,
                                   figsize=(1.8 * len(names) + 0.5, 1.3 * n_v + 0.6))
    for j, n in enumerate(names):
        v = dirs[n].reshape(n_v, dirs[n].shape[1], -1) if dirs[n].ndim > 2 else dirs[n][:, None]
        vmax = float(np.abs(v).max()) or 1.0
        for k in range(n_v):
            ax = axes[k, j]
            ax.imshow(v[k], cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto",
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_title(n, fontsize=8)
            if j == 0:
                lab = f"k={k}" + (f" (j*={assignment[k]})" if assignment else "")
                ax.set_ylabel(lab, fontsize=7)
    fig.suptitle("L3D decoder directions", fontsize=9)
    fig.tight_layout()
    return plots.save(fig, path)


def _cli_summary(res: L3DResult) -> dict[str, Any]:
    return {k: v for k, v in res.metrics.items() if not isinstance(v, dict | list)}


register_method(Method(
    name="l3d",
    description="Local Loss Landscape Decomposition (Chrisman, Bushnaq, Sharkey 2025)",
    targets=tuple(PRESETS),
    run=cli_runner("l3d", l3d_config, L3DConfig, _INT_FIELDS, train_l3d, _cli_summary),
    sweep=sweep_runner("l3d", l3d_config, L3DConfig, _INT_FIELDS, train_l3d, SWEEPABLE),
))
