"""Bridges from the channel graph to parameter-space decompositions (``specs/
channel-graph.md`` section 7, "L3D / SPD").

For a linear use ``h = a @ W`` of a weight, the per-example weight gradient is
``a^T delta`` with ``delta = dL/dh``, so the Gauss-Newton (K-FAC) curvature of ``W`` is
approximately ``A (x) G`` with ``A = E[a a^T]`` and ``G = E[delta delta^T]`` (``delta``
pulled back from output probes ``eps`` with ``E[eps eps^T] = I``: the regression Fisher).
A rank-1 piece ``v u`` of ``W`` (an SPD subcomponent, an L3D subnetwork) should then lie
mostly in ``span(A) (x) span(G)``. Two input spans are reported:

* ``kfac``: the top eigenvectors of ``A`` (the span of the inputs the layer sees);
* ``read``: the top eigenvectors of the layer's read sensitivity ``M = W G W^T``, the
  channel graph's read operator of this one layer (``E[J^T S J]`` with ``J = W^T`` and
  ``S = G``: the directions of ``a`` that change the output).

Both use ``span(G)`` on the output side and keep the smallest number of eigenvectors
holding the fraction ``eta`` of the trace. The captured fraction of ``v u`` is
``|P_in v|^2 |P_out u|^2 / (|v|^2 |u|^2)``; the total over components weights each by
``|v|^2 |u|^2``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree
from .._checks import check_positive, fail
from .._types import Array, PyTree
from ..decomposition.weights import TRANSPOSED, forward_sites, probe_sites
from ..lib.stats import chunked_sum, einsum64
from .adapters import as_float
from .model import to_float64
from .subspaces import eta_rank

__all__ = ["bridge_report", "captured_fraction", "layer_kfac", "lib_bridge", "top_span"]


def _flat_gram(a: Array) -> Array:
    """``sum_rows a_r a_r^T`` over every leading axis of ``a: (..., d)``."""
    a = a.reshape(-1, a.shape[-1])
    return einsum64("ri,rj->ij", a, a)


def layer_kfac(apply: Callable[[PyTree, Any], Any], params: PyTree, xs: Any,
               paths: Sequence[str], *, chunk_size: int = 256
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{site: (A, G)}`` in float64: ``A = E[a a^T]`` of the site input and ``G =
    E[delta delta^T]`` of the output gradient, ``delta = (dy/dh)^T eps`` over the exact
    probes ``eps = e_k`` (every output coordinate), averaged over examples and summed
    over positions.

    One VJP per example, vmapped over the probes and over a chunk of examples; chunks
    are summed under ``lax.scan``.

    Args:
        apply: ``apply(params, x)`` of ONE example.
        params: the target's parameters.
        xs: inputs with a leading batch axis.
        paths: keystr paths of the weights (a tied weight gives ``path`` and ``path:T``).
        chunk_size: examples per chunk.

    Raises:
        ValueError: for a bad ``chunk_size`` or a path the model never uses as ``a @ W``.
    """
    check_positive("layer_kfac", "chunk_size", chunk_size, integer=True)
    paths = tuple(paths)
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]

    with jax.enable_x64(True):
        params64, xs64 = to_float64(params), as_float(xs)
        x0 = jax.tree_util.tree_map(lambda v: v[0], xs64)
        shapes = probe_sites(apply, params64, x0, paths)  # no FLOPs

        def one(x):
            zeros = {s: jnp.zeros(h.shape, h.dtype) for s, (_, h) in shapes.items()}
            y, vjp_fn, cache = jax.vjp(
                lambda d: forward_sites(apply, params64, x, paths, deltas=d), zeros,
                has_aux=True)
            probes = jnp.eye(y.size, dtype=y.dtype).reshape(y.size, *y.shape)
            deltas = jax.vmap(lambda e: vjp_fn(e)[0])(probes)
            return ({s: _flat_gram(a) for s, (a, _) in cache.items()},
                    {s: _flat_gram(d) for s, d in deltas.items()})

        def per_chunk(chunk, mask, _):
            a, g = jax.vmap(one)(chunk)
            return jax.tree_util.tree_map(lambda v: jnp.tensordot(mask, v, axes=1), (a, g))

        a_sum, g_sum = jax.jit(lambda z: chunked_sum(per_chunk, z, chunk_size=chunk_size))(
            xs64)
        return {s: (np.asarray(a_sum[s]) / n, np.asarray(g_sum[s]) / n) for s in a_sum}


def top_span(mat: Any, eta: float) -> np.ndarray:
    """Orthonormal ``(d, r)`` eigenvectors of the PSD ``mat`` holding the fraction ``eta``
    of its trace (:func:`~jaxinterp.channel.subspaces.eta_rank`), largest first.

    Raises:
        ValueError: if ``eta`` is not in ``(0, 1]``.
    """
    if not 0.0 < eta <= 1.0:
        raise fail("top_span", "eta", "in (0, 1]", eta)
    m = np.asarray(mat, np.float64)
    lam, vec = np.linalg.eigh(0.5 * (m + m.T))
    lam, vec = np.clip(lam[::-1], 0.0, None), vec[:, ::-1]
    return vec[:, : eta_rank(lam, eta)]


def captured_fraction(V: Any, U: Any, p_in: Any, p_out: Any) -> dict[str, Any]:  # noqa: N803
    """Norm fraction of each rank-1 piece ``V[:, c] U[c]`` inside ``span(p_in) (x)
    span(p_out)``.

    Args:
        V: ``(d_in, C)``; U: ``(C, d_out)``.
        p_in: ``(d_in, r_in)`` and p_out: ``(d_out, r_out)`` orthonormal columns.

    Returns:
        ``per_component`` (``(C,)``; NaN for a zero piece), ``norms`` (``|v| |u|``) and
        ``total`` (the squared-norm-weighted mean).

    Raises:
        ValueError: on mismatched shapes.
    """
    V, U = np.asarray(V, np.float64), np.asarray(U, np.float64)  # noqa: N806
    p_in, p_out = np.asarray(p_in, np.float64), np.asarray(p_out, np.float64)
    if V.ndim != 2 or U.ndim != 2 or V.shape[1] != U.shape[0]:
        raise fail("captured_fraction", "V, U", "(d_in, C) and (C, d_out)",
                   f"{V.shape} and {U.shape}")
    if p_in.shape[0] != V.shape[0] or p_out.shape[0] != U.shape[1]:
        raise fail("captured_fraction", "p_in, p_out", f"({V.shape[0]}, r) and "
                   f"({U.shape[1]}, r)", f"{p_in.shape} and {p_out.shape}")
    nv, nu = np.sum(V**2, axis=0), np.sum(U**2, axis=1)
    kept = np.sum((p_in.T @ V) ** 2, axis=0) * np.sum((U @ p_out) ** 2, axis=1)
    w = nv * nu
    with np.errstate(invalid="ignore", divide="ignore"):
        per = np.where(w > 0, kept / w, np.nan)
    total = float(kept.sum() / w.sum()) if w.sum() > 0 else float("nan")
    return {"per_component": per, "norms": np.sqrt(w), "total": total}


def _weight(params: PyTree, site: str) -> np.ndarray:
    w = np.asarray(tree.get(params, site.removesuffix(TRANSPOSED)), np.float64)
    return w.T if site.endswith(TRANSPOSED) else w


def bridge_report(apply: Callable[[PyTree, Any], Any], params: PyTree, xs: Any,
                  factors: Mapping[str, tuple[Any, Any]], *, eta: float = 0.99,
                  min_norm: float = 0.1, chunk_size: int = 256,
                  stats: Mapping[str, tuple[Any, Any]] | None = None) -> dict[str, Any]:
    """Captured fractions of rank-1 decompositions per site (module docstring).

    Args:
        apply, params, xs: the target and the data for ``A`` and ``G``.
        factors: ``{site: (V (d_in, C), U (C, d_out))}`` as used at the site (a
            transposed site: ``(U^T, V^T)`` of its path).
        eta: trace fraction kept in every span.
        min_norm: pieces with ``|v| |u| < min_norm * max`` are left out of
            ``live_min`` / ``live_mean`` (they carry no weight).
        chunk_size: examples per chunk of :func:`layer_kfac`.
        stats: ``{path: (A, G)}`` from an earlier :func:`layer_kfac` on the same data, to
            report several ``eta`` without recomputing them (``xs`` is then unused).

    Returns:
        Per site: span ranks, the weight's own captured fraction and, for ``kfac`` and
        ``read`` input spans, ``total``, ``live_min``, ``live_mean`` and
        ``per_component``.
    """
    check_positive("bridge_report", "eta", eta)
    paths = sorted({s.removesuffix(TRANSPOSED) for s in factors})
    if stats is None:
        stats = layer_kfac(apply, params, xs, paths, chunk_size=chunk_size)
    missing = sorted(set(factors) - set(stats))
    if missing:
        raise fail("bridge_report", "factors", f"sites among {sorted(stats)}", missing)
    out: dict[str, Any] = {}
    for site, (V, U) in factors.items():  # noqa: N806
        a, g = stats[site]
        w = _weight(params, site)
        p_out = top_span(g, eta)
        spans = {"kfac": top_span(a, eta), "read": top_span(w @ g @ w.T, eta)}
        rep: dict[str, Any] = {"rank_out": int(p_out.shape[1])}
        for name, p_in in spans.items():
            cf = captured_fraction(V, U, p_in, p_out)
            live = cf["norms"] >= min_norm * np.nanmax(cf["norms"])
            rep[name] = {"rank_in": int(p_in.shape[1]), "total": cf["total"],
                         "live_min": float(np.min(cf["per_component"][live])),
                         "live_mean": float(np.mean(cf["per_component"][live])),
                         "n_live": int(live.sum()),
                         "weight": float(np.sum((p_in.T @ w @ p_out) ** 2) / np.sum(w**2)),
                         "per_component": cf["per_component"]}
        out[site] = rep
    return out


def lib_bridge(model: Any, xs: Any, *, output: str = "softmax", gap_rtol: float = 1e-3,
               floor_rtol: float = 1e-8, chunk_size: int = 256) -> dict[str, Any]:
    """Spec section 7, "LIB": with ``S`` replaced by the next node layer's LIB metric
    ``C_{l+1} C_{l+1}^T``, the read channels of a sequential MLP's blocks reproduce the
    LIB basis.

    The LIB basis (``jacobian``, centred, gradient rule) of every layer input of ``model``
    (:func:`~jaxinterp.lib.adapters.mlp_sections`) is built backward from the output; the
    channel statistics use ``metric="fixed"`` with block ``k``'s output metric factor the
    non-constant rows of LIB's ``C`` of node layer ``k`` (``I`` for the logits, which LIB
    does not rotate). Read channel ``i`` of block ``k`` is then compared with LIB
    direction ``i`` (after the constant one) of node layer ``k - 1``: ``|cos|`` of the
    read covector ``rho_i`` and the width part of ``C[:, i]``, both projected on the
    support of the read covariance (components along directions the data never vary in
    read nothing, and the channel code leaves them free), and ``lambda_i`` against
    ``Lambda_i``.

    Args:
        model: an MLP with ``.layers[i].weight, .bias`` (e.g. ``digits-mlp``).
        xs: inputs ``(N, d_in)``.
        output: the channel model's output kind (``softmax`` for a classifier).
        gap_rtol: a direction is compared when both neighbouring ``Lambda`` differ from
            its own by more than ``gap_rtol`` relative (eigenvectors of a degenerate
            eigenvalue are not unique).
        floor_rtol: and when ``Lambda_i > floor_rtol * Lambda_1``.
        chunk_size: examples per chunk of both builds.

    Returns:
        Per node layer: ``n_lib``, ``n_channel``, ``n_compared``, ``min_abs_cos``,
        ``max_lambda_rel_diff`` and the per-direction ``abs_cos`` and ``lambda_rel_diff``.
    """
    from ..lib.adapters import mlp_sections
    from ..lib.basis import interaction_basis
    from .adapters import block_mlp_model
    from .stats import channel_stats
    from .subspaces import channels_from_stats, support_sqrt

    check_positive("lib_bridge", "gap_rtol", gap_rtol)
    sectioned = mlp_sections(model)
    ib = interaction_basis(sectioned, xs, basis="jacobian", chunk_size=chunk_size)
    with jax.enable_x64(True):
        cm = block_mlp_model(model, output)
    n = cm.n_blocks
    widths = [np.shape(la.weight)[0] for la in model.layers]
    widths.append(np.shape(model.layers[-1].weight)[1])
    factors: list[Any] = [None] * (n + 2)
    for k in range(1, n + 1):
        factors[k] = np.asarray(ib.layers[k].C, np.float64)[: widths[k]]
    stats = channel_stats(cm, xs, metric="fixed", factors=tuple(factors), chunk_size=chunk_size)
    cs = channels_from_stats(stats, cm.node_names)
    out: dict[str, Any] = {}
    for k in range(1, n + 1):
        lb = ib.layers[k - 1]
        start = 1 if lb.constant else 0
        lam = np.asarray(lb.lambdas, np.float64)[start:]
        c_lib = np.asarray(lb.C, np.float64)[: widths[k - 1], start:]
        rho = np.asarray(cs.nodes[k].read_covectors, np.float64)
        mu = np.asarray(cs.nodes[k].read_lambdas, np.float64)
        m = min(len(lam), len(mu))
        # compare on the support of the read covariance: a covector's component along a
        # direction the data never vary in (a constant pixel, a dead unit) reads nothing
        e, _ = support_sqrt(np.asarray(stats.read_cov[k], np.float64))
        c_lib, rho = e @ (e.T @ c_lib), e @ (e.T @ rho)
        cos = np.abs(np.sum(c_lib[:, :m] * rho[:, :m], axis=0)) / (
            np.linalg.norm(c_lib[:, :m], axis=0) * np.linalg.norm(rho[:, :m], axis=0))
        rel = np.abs(mu[:m] - lam[:m]) / lam[:m]
        padded = np.concatenate([[np.inf], lam, [0.0]])
        gaps = np.minimum(padded[:-2] - padded[1:-1], padded[1:-1] - padded[2:])[:m]
        ok = (gaps > gap_rtol * lam[:m]) & (lam[:m] > floor_rtol * lam[0])
        out[lb.name] = {
            "n_lib": int(len(lam)), "n_channel": int(len(mu)), "n_compared": int(ok.sum()),
            "min_abs_cos": float(cos[ok].min()) if ok.any() else None,
            "max_lambda_rel_diff": float(rel[ok].max()) if ok.any() else None,
            "abs_cos": cos, "lambda_rel_diff": rel, "compared": ok,
        }
    return out
