"""SPD runs: the paper's presets, vmapped multi-seed training, evaluation (MMCS/ML2R,
IdentityCIError, CI-L0, reconstruction under each masking mode), plots and the
``jaxinterp run spd TARGET`` registration.

References:
    Bushnaq, Braun, Sharkey 2025, "Stochastic Parameter Decomposition" (arXiv 2506.20790).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import io, plots, tree
from .._checks import check_positive, fail
from ..methods import Method, register_method
from ..models import base
from ..rng import Stream, seed_key, stream_key
from ..target import from_equinox
from ..train import fit, make_optimizer
from . import apd, spd
from .apd_run import TMS_ID_PATHS, TMS_PATHS, resid_paths
from .runs import batch_inputs, cli_runner, preset_config
from .spd_metrics import (
    dense_ci_error,
    identity_ci_error,
    n_non_negligible,
    permute_columns_for_heatmap,
    spd_mmcs_ml2r,
)
from .weights import TRANSPOSED, forward_sites


@dataclasses.dataclass(frozen=True, kw_only=True)
class SPDConfig:
    """SPD hyperparameters (``specs/spd.md`` section 4); defaults are the TMS 5-2 preset.

    Attributes:
        paths: keypaths of the decomposed weight matrices.
        C: subcomponents per matrix; ci_hidden: CI MLP width H.
        c_faith, c_stoch, c_layerwise, c_imp: loss coefficients (None: off); p: the
            importance-minimality exponent.
        gated: use the later code's clamped CI with the sign-gated leaky backward pass.
        batch_size, steps, lr, schedule, warmup_frac: Adam (no weight decay) settings.
        steps_per_call, eval_size, checkpoint_every: run mechanics.
        success_mmcs, success_ml2r: a TMS seed succeeds with MMCS >= success_mmcs, ML2R
            within the band and IdentityCIError 0 on every site.
    """

    paths: tuple[str, ...] = TMS_PATHS
    C: int = 20
    ci_hidden: int = 16
    c_faith: float | None = 1.0
    c_stoch: float | None = 1.0
    c_layerwise: float | None = 1.0
    c_imp: float | None = 3e-3
    p: float = 1.0
    gated: bool = False
    batch_size: int = 4096
    steps: int = 40_000
    lr: float = 1e-3
    schedule: str = "quarter_cosine"
    warmup_frac: float = 0.0
    steps_per_call: int = 200
    eval_size: int = 10_000
    checkpoint_every: int = 5000
    success_mmcs: float = 0.999
    success_ml2r: tuple[float, float] = (0.97, 1.03)

    def __post_init__(self):
        for name in ("C", "ci_hidden", "batch_size", "steps_per_call", "eval_size"):
            check_positive("SPDConfig", name, getattr(self, name), integer=True)
        check_positive("SPDConfig", "lr", self.lr)
        check_positive("SPDConfig", "p", self.p)
        if self.steps < 0:
            raise fail("SPDConfig", "steps", ">= 0", self.steps)
        if not self.paths:
            raise fail("SPDConfig", "paths", "at least one weight path", self.paths)

    def loss_config(self) -> spd.SPDLossConfig:
        return spd.SPDLossConfig(self.c_faith, self.c_stoch, self.c_layerwise, self.c_imp,
                                 self.p, self.gated)


_TMS40 = dict(C=200, c_imp=1e-4, p=2.0, success_ml2r=(0.98, 1.05))
_RESID = dict(c_imp=1e-5, p=2.0, batch_size=2048, schedule="constant")
PRESETS: dict[str, dict[str, Any]] = {
    "tms-5-2": {},
    "tms-40-10": _TMS40,
    "tms-5-2-id": dict(paths=TMS_ID_PATHS),
    "tms-40-10-id": {**_TMS40, "paths": TMS_ID_PATHS, "success_ml2r": (1.0, 1.06)},
    "resid-mlp-1": {**_RESID, "paths": resid_paths(1), "C": 100, "steps": 30_000, "lr": 2e-3},
    "resid-mlp-2": {**_RESID, "paths": resid_paths(2), "C": 400, "steps": 50_000,
                    "c_imp": 2e-5},
    "resid-mlp-3": {**_RESID, "paths": resid_paths(3), "C": 500, "ci_hidden": 128,
                    "steps": 100_000, "c_imp": 5e-6},
}


def spd_config(target: str, **overrides: Any) -> SPDConfig:
    """The paper preset for ``target`` with ``overrides`` applied."""
    return preset_config(SPDConfig, PRESETS, "spd_config", target, overrides)


@dataclasses.dataclass
class SPDResult:
    """Trained subcomponents (leading ``seeds`` axis) and per-seed metrics."""

    components: spd.SPDComponents
    config: SPDConfig
    seeds: list[int]
    metrics: dict[str, Any]
    seed_metrics: list[dict[str, Any]]
    history: dict[str, np.ndarray]
    plots: list[str] = dataclasses.field(default_factory=list)


def train_spd(model: Any, target: base.ToyTarget, target_cfg: Any, cfg: SPDConfig,
              seeds: list[int], *, out: str | Path | None = None, progress: bool = True,
              resume: bool = True) -> SPDResult:
    """Decompose ``model`` with SPD, all ``seeds`` in one vmapped run, then evaluate each.

    Args:
        model: the trained target (equinox module, one example per call).
        target, target_cfg: its toy target and config (data sampler).
        cfg: SPD settings.
        seeds: SPD seeds (init, data and masks); vmapped.
        out: run directory, or None.
    """
    if not seeds:
        raise fail("train_spd", "seeds", "at least one seed", seeds)
    t = from_equinox(model)
    apply, params = t.apply, t.params
    dcfg = dataclasses.replace(target_cfg, batch_size=cfg.batch_size)
    x0 = batch_inputs(target.sample(dcfg, None, jax.random.key(0), jnp.asarray(0)))[0]
    sites = apd.make_sites(apply, params, x0, cfg.paths)
    keys = jnp.stack([seed_key(s) for s in seeds])
    comps = jax.vmap(lambda k: spd.init_spd(params, sites, cfg.C, cfg.ci_hidden,
                                            key=stream_key(k, Stream.INIT)))(keys)
    opt = make_optimizer("adam", cfg.lr, cfg.steps, schedule=cfg.schedule,
                         warmup_frac=cfg.warmup_frac)
    lcfg = cfg.loss_config()

    def loss_fn(c, p, batch):
        x, mask_key = batch
        return spd.spd_loss(c, p, x, mask_key, apply=apply, sites=sites, cfg=lcfg)

    def sample_fn(_, k, step):
        return batch_inputs(target.sample(dcfg, None, k, step)), stream_key(k, Stream.MASK)

    run_dir = Path(out) if out is not None else None
    header = {"method": "spd", "target": target.name, "config": dataclasses.asdict(cfg),
              "seeds": list(seeds)}
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        io.write_json(run_dir / "config.json", header)
    t0 = time.perf_counter()
    result = fit(loss_fn, comps, params, opt, sample_fn, steps=cfg.steps, key=keys,
                 seeds=True, frozen_axis=None,
                 steps_per_call=min(cfg.steps_per_call, max(cfg.steps, 1)),
                 checkpoint_dir=run_dir, checkpoint_every=cfg.checkpoint_every,
                 resume=resume, header=header, progress=progress, desc=f"spd {target.name}")
    wall = time.perf_counter() - t0
    comps = result.params
    seed_metrics = []
    for i, s in enumerate(seeds):
        ci_ = jax.tree_util.tree_map(lambda v: v[i], comps)
        mi = evaluate_spd(ci_, model, apply, params, sites, target, target_cfg, cfg,
                          key=stream_key(seed_key(s), Stream.EVAL))
        final = {f"loss/{k}": float(v[-1, i]) for k, v in result.history.items()
                 if k not in ("step", "ci_l0") and len(v)}
        seed_metrics.append({"seed": s, **mi, **final})
    metrics = _summarise(seed_metrics, cfg, result, wall)
    res = SPDResult(comps, cfg, list(seeds), metrics, seed_metrics, result.history)
    if run_dir is not None:
        io.save_tree(run_dir / "components.eqx", comps, header)
        io.write_json(run_dir / "metrics.json", metrics)
        res.plots = [str(p) for p in plot_spd(res, sites, run_dir) if p is not None]
    return res


def _patterns(sites: apd.Sites, params: Any) -> dict[str, tuple[str, int]]:
    """IdentityCIError pattern per site: ("identity", 0) or ("dense", k) (spec section 5)."""
    out = {}
    for s in sites.names:
        path = s.removesuffix(TRANSPOSED)
        if path.endswith("hidden[0]"):
            out[s] = ("dense", tree.get(params, path).shape[0])
        elif path.endswith("mlp_out"):
            out[s] = ("dense", tree.get(params, path).shape[0])
        else:
            out[s] = ("identity", 0)
    return out


def one_hot_importances(comps: spd.SPDComponents, apply: Any, params: Any, sites: apd.Sites,
                        n_features: int, *, gated: bool, value: float = 0.75
                        ) -> dict[str, np.ndarray]:
    """``{site: (n_features, C)}`` importances of ``value * e_i``, clipped to [0, 1]."""
    xs = value * jnp.eye(n_features)

    def one(x):
        _, cache = forward_sites(apply, params, x, sites.paths)
        g, _ = spd.causal_importances(comps, {s: a for s, (a, _) in cache.items()},
                                      gated=gated)
        return g

    g = eqx.filter_jit(jax.vmap(one))(xs)
    return {s: np.clip(np.asarray(v), 0.0, 1.0) for s, v in g.items()}


def evaluate_spd(comps: spd.SPDComponents, model: Any, apply: Any, params: Any,
                 sites: apd.Sites, target: Any, target_cfg: Any, cfg: SPDConfig, *,
                 key: Any) -> dict[str, Any]:
    """Every SPD metric of one seed (spec section 5)."""
    n_feat = target_cfg.n_features
    G = one_hot_importances(comps, apply, params, sites, n_feat, gated=cfg.gated)
    pats = _patterns(sites, params)
    errs, errs02 = {}, {}
    for s, (kind, k) in pats.items():
        if kind == "identity":
            errs[s], errs02[s] = identity_ci_error(G[s], 0.1), identity_ci_error(G[s], 0.2)
        else:
            errs[s], errs02[s] = dense_ci_error(G[s], k, 0.1), dense_ci_error(G[s], k, 0.2)
    b = min(cfg.batch_size, 2048)
    n_chunks = max(1, cfg.eval_size // b)
    dcfg = dataclasses.replace(target_cfg, batch_size=b)

    def chunk(i):
        k = jax.random.fold_in(key, i)
        x = batch_inputs(target.sample(dcfg, None, k, i))
        y_t, cache = jax.vmap(lambda xx: forward_sites(apply, params, xx, sites.paths))(x)
        g, _ = jax.vmap(lambda c: spd.causal_importances(
            comps, {s: a for s, (a, _) in c.items()}, gated=cfg.gated))(cache)
        masks = spd.stochastic_masks(g, jax.random.fold_in(k, 1))
        ones = {s: jnp.ones_like(v) for s, v in g.items()}

        def recon(mk):
            y = jax.vmap(lambda xx, m: spd.spd_forward(apply, params, sites, comps, xx, m))(x, mk)
            return jnp.mean((y - y_t) ** 2)

        l0 = {s: jnp.mean(jnp.sum(v > 0.1, axis=-1)) for s, v in g.items()}
        l0_8 = {s: jnp.mean(jnp.sum(v > 0.8, axis=-1)) for s, v in g.items()}
        return {"unmasked": recon(ones), "ci_masked": recon(g), "stochastic": recon(masks),
                "l0": l0, "l0_8": l0_8}

    out = jax.device_get(eqx.filter_jit(lambda: jax.lax.map(chunk, jnp.arange(n_chunks)))())
    m: dict[str, Any] = {
        "identity_ci_error": {**errs, "total": int(sum(errs.values()))},
        "identity_ci_error_tol0.2": {**errs02, "total": int(sum(errs02.values()))},
        "ci_l0": {s: float(np.mean(v)) for s, v in out["l0"].items()},
        "ci_l0_tau0.8": {s: float(np.mean(v)) for s, v in out["l0_8"].items()},
        "unmasked_recon_mse": float(np.mean(out["unmasked"])),
        "ci_masked_recon_mse": float(np.mean(out["ci_masked"])),
        "stochastic_recon_mse": float(np.mean(out["stochastic"])),
        "n_non_negligible": {p: n_non_negligible(np.asarray(comps.V[p]), np.asarray(comps.U[p]))
                             for p in sites.paths},
        "one_hot_ci": {s: v.tolist() for s, v in G.items()},
    }
    m["ci_l0"]["total"] = float(sum(m["ci_l0"].values()))
    if target.name.startswith("tms"):
        m.update(spd_mmcs_ml2r(np.asarray(model.W_enc), np.asarray(comps.V[".W_enc"]),
                               np.asarray(comps.U[".W_enc"])))
    return m


def _summarise(seed_metrics: list[dict], cfg: SPDConfig, result: Any, wall: float) -> dict:
    first = seed_metrics[0]
    out = {k: v for k, v in first.items() if k != "one_hot_ci"}
    out.update({"seeds": [m["seed"] for m in seed_metrics], "steps": int(result.step),
                "wall_time_s": wall,
                "time_per_step_ms": 1e3 * result.wall_time / max(result.step, 1)})
    lo, hi = cfg.success_ml2r
    ok = []
    for m in seed_metrics:
        good = m["identity_ci_error"]["total"] == 0
        if "mmcs" in m:
            good = good and m["mmcs"] >= cfg.success_mmcs and lo <= m["ml2r"] <= hi
        ok.append(bool(good))
    out["success_rate"] = float(np.mean(ok))
    out["seed_success"] = ok
    out["per_seed"] = [{k: v for k, v in m.items() if k != "one_hot_ci"} for m in seed_metrics]
    return out


def plot_spd(res: SPDResult, sites: apd.Sites, run_dir: Path) -> list[Path]:
    """Loss curves, CI-L0 during training, and the paper's CI figure per site (importances
    of one-hot inputs, columns permuted by iterative argmax) for the first seed."""
    run_dir = Path(run_dir)
    hist = {k: (v[:, 0] if v.ndim == 2 else v) for k, v in res.history.items()}
    out = [plots.loss_curves({k: v for k, v in hist.items() if k != "ci_l0"},
                             run_dir / "loss.png", title=f"SPD C={res.config.C}")]
    if "ci_l0" in hist and len(hist["ci_l0"]):
        out.append(plots.curves(hist["step"], {"CI-L0 (all sites)": hist["ci_l0"]},
                                run_dir / "ci_l0.png", ylabel="CI-L0"))
    G = res.seed_metrics[0]["one_hot_ci"]
    for s in sites.names:
        g = np.asarray(G[s])
        order = permute_columns_for_heatmap(g)
        live = [c for c in order if g[:, c].max() > 0.01] or list(order[:1])
        name = s.strip(".").replace("[", "").replace("]", "").replace(".", "_").replace(":", "_")
        out.append(plots.matrix(g[:, live], run_dir / f"ci_{name}.png", symmetric=False,
                                title=f"CI of one-hot inputs at {s} ({len(live)} live)",
                                xlabel="subcomponent (permuted)", ylabel="input feature"))
    return out


def _cli_summary(res: SPDResult) -> dict[str, Any]:
    flat = {k: v for k, v in res.metrics.items() if not isinstance(v, dict | list)}
    flat["identity_ci_error"] = res.metrics["identity_ci_error"]["total"]
    flat["ci_l0_total"] = res.metrics["ci_l0"]["total"]
    return flat


register_method(Method(
    name="spd",
    description="Stochastic Parameter Decomposition (Bushnaq, Braun, Sharkey 2025)",
    targets=tuple(PRESETS),
    run=cli_runner("spd", spd_config, SPDConfig, ("C", "ci_hidden", "steps", "batch_size"),
                   train_spd, _cli_summary),
))
