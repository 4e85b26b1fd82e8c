"""L3D evaluation (``specs/l3d.md`` section 6): held-out reconstruction, activation
frequencies, feature assignment against the toys' ground truth, interventions with output
and sample selectivity, and the impact score as a JVP.

References:
    Chrisman, Bushnaq, Sharkey 2025, "Identifying Sparsely Active Circuits Through Local
    Loss Landscape Decomposition" (arXiv 2504.00194).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import fail
from .._types import Array, Float
from .l3d.gradients import divergence_cotangent

__all__ = ["intervention_effects", "output_selectivity", "sample_selectivity", "impact",
           "tms_assignment", "effective_map_assignment", "effect_assignment", "pearson"]


def intervention_effects(f: Callable[[dict[str, Array], Any], Array], w: dict[str, Array],
                         v: Mapping[str, Array], x: Array, deltas: Array
                         ) -> Float[Array, "n_delta n_v batch n_out"]:
    """``|Δy(x; k, δ)| = |f(W0 + δ v_k, x) - f(W0, x)|`` for every step size, subnetwork
    and sample (one vmapped program).

    Args:
        f: ``f(w, x)`` for one example.
        w: trained tensors ``{name: array}``.
        v: directions ``{name: (n_v, *shape)}`` (the decoder's, possibly with some
            tensors zeroed for the hidden-only variant).
        x: ``(batch, ...)`` inputs.
        deltas: ``(n_delta,)`` step sizes.
    """
    if set(v) != set(w):
        raise fail("intervention_effects", "v", f"directions for {sorted(w)}", sorted(v))
    y0 = jax.vmap(lambda xx: f(w, xx))(x)

    def one(delta, vk):
        wk = {n: w[n] + delta * vk[n] for n in w}
        return jnp.abs(jax.vmap(lambda xx: f(wk, xx))(x) - y0)

    over_k = jax.vmap(one, in_axes=(None, 0))
    return jax.jit(jax.vmap(over_k, in_axes=(0, None)))(deltas, dict(v))


def output_selectivity(effects: Float[Array, "... batch n_out"], target: np.ndarray
                       ) -> np.ndarray:
    """``mean_x |Δy_o*| / mean_x mean_{o != o*} |Δy_o|`` with ``o* = target[k]``, for
    effects of shape ``(..., n_v, batch, n_out)``."""
    e = np.asarray(effects).mean(axis=-2)  # (..., n_v, n_out)
    n_out = e.shape[-1]
    onehot = np.eye(n_out, dtype=bool)[np.asarray(target)]  # (n_v, n_out)
    on = np.where(onehot, e, 0.0).sum(-1)
    off = np.where(onehot, 0.0, e).sum(-1) / max(n_out - 1, 1)
    return on / np.maximum(off, 1e-30)


def sample_selectivity(effects: Float[Array, "... batch n_out"], target: np.ndarray,
                       x: np.ndarray) -> np.ndarray:
    """``mean_{x: x_j* != 0} |Δy_o*| / mean_{x: x_j* = 0} |Δy_o*|`` with ``j* = o* =
    target[k]`` (inputs and outputs indexed alike, as in TMS and x-squared)."""
    e = np.asarray(effects)
    t = np.asarray(target)
    x = np.asarray(x)
    out = np.zeros(e.shape[:-2])
    for k, j in enumerate(t):  # n_v host-side reductions of tiny arrays, not a hot path
        col = e[..., k, :, j]
        active = x[:, j] != 0
        num = col[..., active].mean(-1) if active.any() else np.nan
        den = col[..., ~active].mean(-1) if (~active).any() else np.nan
        out[..., k] = num / np.maximum(den, 1e-30)
    return out


def impact(f: Callable[[dict[str, Array], Any], Array], w: dict[str, Array],
           v_enc: Mapping[str, Array], x: Array, y_refs: Array, *, divergence: str = "mse"
           ) -> Float[Array, "batch n_v"]:
    """``I(x, k) = |mean_j <v^enc_k, grad_W D(f(x), y_ref_j)>|`` as ONE JVP per (sample,
    subnetwork): ``<v, grad D_j> = <J v, dD_j/dy>``, so the mean over references is the
    JVP against the mean cotangent (the reference averages the signed value, then takes
    the absolute value; matched here).

    Args:
        f, w: the target as ``f(w, x)`` and its trained tensors.
        v_enc: ``{name: (n_v, *shape)}`` encoder directions.
        x: ``(batch, ...)`` samples.
        y_refs: ``(n_ref, *out_shape)`` reference outputs.
    """

    def one(xx):
        y = jax.lax.stop_gradient(f(w, xx))
        cot = jnp.mean(jax.vmap(lambda yr: divergence_cotangent(y, yr, divergence))(y_refs),
                       axis=0)

        def along(vk):
            _, jv = jax.jvp(lambda ww: f(ww, xx), (w,), (vk,))
            return jnp.sum(jv * cot)

        return jnp.abs(jax.vmap(along)(dict(v_enc)))

    return jax.jit(jax.vmap(one))(x)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a) - np.mean(a), np.ravel(b) - np.mean(b)
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / den) if den > 0 else float("nan")


def _abs_cos(a: np.ndarray, b: np.ndarray) -> float:
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return abs(float(np.ravel(a) @ np.ravel(b))) / den if den > 0 else 0.0


def tms_assignment(v_in: np.ndarray, W_enc: np.ndarray, live: np.ndarray) -> dict[str, Any]:
    """TMS: ``j*(k) = argmax_j ||v_k^{W_in}[j, :]||`` and ``align_k = |cos(v_k^{W_in}[j*],
    W_enc[j*])|``; a feature is matched when a live subnetwork assigned to it has
    ``align >= 0.9``; ``match_cosines`` is the best alignment per feature (0 if none)."""
    j = np.argmax(np.linalg.norm(v_in, axis=-1), axis=-1)  # (n_v,)
    align = np.array([_abs_cos(v_in[k, j[k]], W_enc[j[k]]) for k in range(len(j))])
    return _coverage(j, align, live, W_enc.shape[0], {"align": align.tolist()})


def effective_map_assignment(v_in: np.ndarray, v_out: np.ndarray, A: np.ndarray,
                             live: np.ndarray, group: int = 1) -> dict[str, Any]:
    """TMCS and high-rank: ``Â_k = v_k^{W_in} @ v_k^{W_out}`` (sign-invariant),
    ``j*(k) = argmax_j sum_o |Â_k[j, o]|`` or, with ``group > 1``, the group maximising
    the summed rows. Match cosine: ``|cos|`` between the assigned rows of ``Â_k`` and of
    ``A``. Coefficient recovery: each assigned row rescaled to the norm of ``A``'s row;
    Pearson r per subnetwork and pooled over all live subnetworks' rows."""
    ahat = np.einsum("kfh,kho->kfo", v_in, v_out)
    n_feat = A.shape[0]
    mass = np.abs(ahat).sum(-1).reshape(ahat.shape[0], n_feat // group, group).sum(-1)
    j = np.argmax(mass, axis=-1)
    cos, r, pooled_hat, pooled_true = [], [], [], []
    for k, g in enumerate(j):
        rows = slice(g * group, (g + 1) * group)
        h, a = ahat[k, rows], A[rows]
        cos.append(_abs_cos(h, a))
        scaled = h * (np.linalg.norm(a) / max(np.linalg.norm(h), 1e-30))
        r.append(pearson(scaled, a))
        if live[k]:
            pooled_hat.append(scaled.ravel())
            pooled_true.append(a.ravel())
    extra = {"pearson_r": r, "pooled_r": (pearson(np.concatenate(pooled_hat),
                                                  np.concatenate(pooled_true))
                                          if pooled_hat else float("nan"))}
    return _coverage(j, np.asarray(cos), live, n_feat // group, extra)


def effect_assignment(effects: np.ndarray, live: np.ndarray) -> dict[str, Any]:
    """x-squared: ``j*(k) = argmax_o mean_x |Δy_o|`` at one step size (``effects`` of shape
    ``(n_v, batch, n_out)``); the match cosine is ``cos(mean_x |Δy|, e_j*)``, the share of
    the effect profile on its top output."""
    prof = np.asarray(effects).mean(axis=1)  # (n_v, n_out)
    j = np.argmax(prof, axis=-1)
    cos = prof[np.arange(len(j)), j] / np.maximum(np.linalg.norm(prof, axis=-1), 1e-30)
    return _coverage(j, cos, live, prof.shape[-1], {})


def _coverage(j: np.ndarray, cos: np.ndarray, live: np.ndarray, n_truth: int,
              extra: dict[str, Any]) -> dict[str, Any]:
    live = np.asarray(live, bool)
    best = np.zeros(n_truth)
    for k in np.flatnonzero(live):
        best[j[k]] = max(best[j[k]], cos[k])
    coverage = len(set(j[live].tolist()))
    return {"assignment": j.tolist(), "assignment_cosine": np.asarray(cos).tolist(),
            "coverage": coverage, "duplicates": int(live.sum()) - coverage,
            "match_cosines": best.tolist(), "n_matched": int((best >= 0.9).sum()), **extra}
