"""APD evaluation (``specs/apd.md`` section 8): MMCS / ML2R against the TMS features, the
one-hot attribution matrix, component activation frequencies and L0, top-k fidelity next
to the target's own loss, and for residual MLPs the features carried per component
(neuron contributions) and the scrubbed / anti-scrubbed losses.

References:
    Braun et al. 2025, "Interpretability in Parameter Space: Minimizing Mechanistic
    Description Length with Attribution-based Parameter Decomposition" (arXiv 2501.14926).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import tree
from .._types import Array, Key
from . import apd
from .weights import forward_sites

__all__ = ["mmcs_ml2r", "evaluate_apd", "neuron_contributions", "one_hot_attributions"]


CLEAN_COS = 0.99  # a feature's best component "carries" it above this cosine


def mmcs_ml2r(w: Array, p: Array) -> dict[str, Any]:
    """Mean max cosine similarity and mean L2 ratio of the best-matching component rows,
    and where the failures are: ``n_features_own`` (best component unshared with cosine
    >= 0.99, with their ``ml2r_own``), ``n_features_shared`` (best component is also
    another feature's best) and ``n_features_poor`` (unshared, cosine below 0.99).

    Args:
        w: target rows ``(n_features, d)`` (TMS: ``W_enc``).
        p: component rows ``(C, n_features, d)``.
    """
    w, p = np.asarray(w, np.float64), np.asarray(p, np.float64)
    wn = np.linalg.norm(w, axis=-1)  # (F,)
    pn = np.linalg.norm(p, axis=-1)  # (C, F)
    cos = np.einsum("cfd,fd->cf", p, w) / (pn * wn[None] + 1e-12)
    best = np.argmax(cos, axis=0)
    f = np.arange(w.shape[0])
    best_cos = cos[best, f]
    ratio = pn[best, f] / wn
    shared = np.bincount(best, minlength=p.shape[0])[best] > 1
    own = ~shared & (best_cos >= CLEAN_COS)
    return {"mmcs": float(best_cos.mean()), "mmcs_std": float(best_cos.std()),
            "ml2r": float(ratio.mean()), "ml2r_std": float(ratio.std()),
            "n_features_own": int(own.sum()), "n_features_shared": int(shared.sum()),
            "n_features_poor": int((~shared & ~own).sum()),
            "ml2r_own": float(ratio[own].mean()) if own.any() else None}


def one_hot_attributions(comps: apd.APDComponents, apply: Any, params: Any,
                         sites: apd.Sites, n_features: int, kind: str) -> np.ndarray:
    """Attributions ``(n_features, C)`` of the one-hot inputs ``e_i``."""
    eye = jnp.eye(n_features)
    attr = jax.vmap(lambda x: apd.attributions(apply, params, sites, comps, x, kind=kind)[0])(eye)
    return np.asarray(attr)


def is_permutation_pattern(attr: np.ndarray, ratio: float = 10.0) -> bool:
    """Distinct row argmaxes and, in every row, the top entry >= ``ratio`` x the second."""
    top2 = np.sort(attr, axis=1)[:, -2:]
    distinct = len(set(np.argmax(attr, axis=1).tolist())) == attr.shape[0]
    return bool(distinct and np.all(top2[:, 1] >= ratio * np.maximum(top2[:, 0], 1e-30)))


def neuron_contributions(W_E: Array, w_in: Array, w_out: Array) -> Array:
    """``NC(i)[n] = (W_E[i] @ W_in)[n] * (W_out[n] . W_E[i])``: shape ``(..., F, d_mlp)``
    for ``w_in: (..., d_resid, d_mlp)`` and ``w_out: (..., d_mlp, d_resid)``."""
    read = jnp.einsum("fr,...rn->...fn", W_E, w_in)
    write = jnp.einsum("...nr,fr->...fn", w_out, W_E)
    return read * write


def _resid_metrics(comps: apd.APDComponents, model: Any, cutoff: float = 0.04) -> dict:
    n_layers = len(model.layers)
    W_E = model.W_E
    nc_t = jnp.concatenate([neuron_contributions(W_E, tree.get(model, f".layers[{i}].mlp_in"),
                                                 tree.get(model, f".layers[{i}].mlp_out"))
                            for i in range(n_layers)], axis=-1)  # (F, N)
    nc_c = jnp.concatenate([neuron_contributions(W_E, comps.matrices(f".layers[{i}].mlp_in"),
                                                 comps.matrices(f".layers[{i}].mlp_out"))
                            for i in range(n_layers)], axis=-1)  # (C, F, N)
    peak = np.asarray(jnp.max(nc_c, axis=-1))  # (C, F)
    carried = peak > cutoff
    per_comp = carried.sum(axis=1)
    best = np.argmax(peak, axis=0)
    nc_best = np.asarray(nc_c)[best, np.arange(nc_c.shape[1])]
    r = float(np.corrcoef(np.asarray(nc_t).ravel(), nc_best.ravel())[0, 1])
    return {"features_carried": int(carried.any(axis=0).sum()),
            "n_features": int(carried.shape[1]),
            "components_dead": int((per_comp == 0).sum()),
            "components_mono": int((per_comp == 1).sum()),
            "components_duo": int((per_comp == 2).sum()),
            "components_poly": int((per_comp >= 3).sum()),
            "neuron_contribution_pearson_r": r}


def _topk_mask(cfg: Any, attr: Array, x: Array) -> Array:
    if cfg.topk is None:
        return (attr > 0).astype(attr.dtype)
    if cfg.distil_from_target:
        attr = attr.at[:, -1].set(-jnp.inf)
    if cfg.topk_mode == "sample":
        mask = apd.sample_topk_mask(attr, int(cfg.topk))
    else:
        mask = apd.batch_topk_mask(attr, cfg.topk)
    if cfg.distil_from_target:
        mask = mask.at[:, -1].set(1.0)
    return mask


def evaluate_apd(comps: apd.APDComponents, model: Any, apply: Any, params: Any,
                 sites: apd.Sites, target: Any, target_cfg: Any, cfg: Any, *,
                 key: Key) -> dict[str, Any]:
    """Every APD metric of one seed's components on ``cfg.eval_size`` fresh samples,
    evaluated in training-sized batches (so batch top-k keeps its trained meaning)."""
    b = cfg.batch_size
    n_chunks = max(1, cfg.eval_size // b)
    dcfg = dataclasses.replace(target_cfg, batch_size=b)
    kind = cfg.attribution

    def chunk(i):
        k = jax.random.fold_in(key, i)
        batch = target.sample(dcfg, None, k, i)
        x = batch[0] if isinstance(batch, tuple) else batch
        attr, y_t, _ = jax.vmap(lambda xx: apd.attributions(apply, params, sites, comps, xx,
                                                            kind=kind))(x)
        mask = _topk_mask(cfg, attr, x)

        def fwd(xx, s):
            w = {p: comps.weight(p, s) for p in sites.paths}
            return forward_sites(apply, params, xx, sites.paths, weights=w)[0]

        y_m = jax.vmap(fwd)(x, mask)
        tgt_loss, _ = target.loss(target_cfg, model, batch)
        return {"topk_sq": jnp.mean((y_m - y_t) ** 2), "target_loss": tgt_loss,
                "freq": jnp.mean(mask > 0, axis=0),
                "n_active": jnp.mean(jnp.sum(mask > 0, axis=-1).astype(jnp.float32))}

    out = eqx.filter_jit(lambda: jax.lax.map(chunk, jnp.arange(n_chunks)))()
    freq = np.asarray(out["freq"]).mean(0)
    m: dict[str, Any] = {
        "topk_recon_mse": float(np.mean(out["topk_sq"])),
        "target_mse": float(np.mean(out["target_loss"])),
        "mean_active_components": float(np.mean(out["n_active"])),
        "n_live_components": int((freq > 0).sum()),
        "n_dead_components": int((freq == 0).sum()),
        "activation_frequency": freq.tolist(),
    }
    if target.name.startswith("tms"):
        f = target_cfg.n_features
        m.update(mmcs_ml2r(model.W_enc, comps.matrices(".W_enc")))
        oh = one_hot_attributions(comps, apply, params, sites, f, kind)
        m["one_hot_attributions"] = oh.tolist()
        m["one_hot_permutation"] = is_permutation_pattern(oh)
    if target.name.startswith("resid"):
        m.update(_resid_metrics(comps, model))
        m.update(scrub_losses(comps, model, apply, params, sites, target, target_cfg, cfg,
                              live=freq > 0, key=jax.random.fold_in(key, 10_000)))
    return m


def scrub_masks(x: Array, key: Key, c_star: Array, live: Array, n_ablate: int
                ) -> tuple[Array, Array, Array]:
    """Keep-masks ``(C,)`` of one example ``x: (F,)`` (1 keeps a component, 0 ablates it).

    ``K(x)`` is ``{c_star[i] : x_i != 0}``. Scrubbed: ablate ``n_ablate`` uniformly random
    members of ``live - K(x)`` (all of them if fewer). Anti-scrubbed: ablate ``K(x)`` and
    random members of ``live - K(x)``, ``n_ablate`` in total (at least ``K(x)``). K-only:
    keep ``K(x)`` alone.
    """
    C = live.shape[0]
    in_k = jnp.zeros(C, bool).at[c_star].max(x != 0)
    u = jax.random.uniform(key, (C,))
    prio_s = jnp.where(live & ~in_k, u, jnp.inf)
    prio_a = jnp.where(in_k, -1.0, prio_s)

    def keep(prio):
        rank = jnp.argsort(jnp.argsort(prio))
        return jnp.where(((rank < n_ablate) & jnp.isfinite(prio)) | (prio < 0), 0.0, 1.0)

    return keep(prio_s), keep(prio_a), in_k.astype(x.dtype)


def scrub_losses(comps: apd.APDComponents, model: Any, apply: Any, params: Any,
                 sites: apd.Sites, target: Any, target_cfg: Any, cfg: Any, *,
                 live: np.ndarray, key: Key, n: int = 10_000) -> dict[str, float]:
    """Scrubbed / anti-scrubbed MSE to the target on samples with >= 1 active feature
    (:func:`scrub_masks`; ``K(x)`` from the argmax components of the one-hot inputs of x's
    active features, ``L`` the live components, ``floor(|L|/2)`` ablated), and two
    diagnostics on the same samples: ``k_only_mse`` (only ``K(x)`` kept) and
    ``all_components_mse`` (every component kept).
    """
    n_feat = target_cfg.n_features
    c_star = jnp.argmax(jnp.asarray(one_hot_attributions(
        comps, apply, params, sites, n_feat, cfg.attribution)), axis=1)  # (F,)
    live_j = jnp.asarray(live)
    n_ablate = int(live.sum()) // 2
    b = cfg.batch_size
    dcfg = dataclasses.replace(target_cfg, batch_size=b)

    def chunk(i):
        k = jax.random.fold_in(key, i)
        batch = target.sample(dcfg, None, k, i)
        x = batch[0] if isinstance(batch, tuple) else batch
        ks = jax.random.split(jax.random.fold_in(k, 1), x.shape[0])
        masks = jax.vmap(lambda xx, kk: scrub_masks(xx, kk, c_star, live_j, n_ablate))(x, ks)
        masks = (*masks, jnp.ones_like(masks[0]))
        y_t = jax.vmap(lambda xx: apply(params, xx))(x)

        def fwd(xx, s):
            w = {p: comps.weight(p, s) for p in sites.paths}
            return forward_sites(apply, params, xx, sites.paths, weights=w)[0]

        w = (jnp.sum(x != 0, axis=-1) > 0).astype(x.dtype)
        errs = [jnp.sum(w * jnp.mean((jax.vmap(fwd)(x, m) - y_t) ** 2, axis=-1))
                for m in masks]
        return (*errs, jnp.sum(w))

    *errs, cnt = eqx.filter_jit(lambda: jax.lax.map(chunk, jnp.arange(max(1, n // b))))()
    total = float(np.sum(cnt))
    names = ("scrubbed_mse", "anti_scrubbed_mse", "k_only_mse", "all_components_mse")
    return {k: float(np.sum(e)) / total for k, e in zip(names, errs, strict=True)}
