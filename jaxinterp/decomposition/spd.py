"""Stochastic Parameter Decomposition (SPD), paper recipe, as a pure transform over any
target whose decomposed weights are used as ``a @ W`` / ``a @ W.T``.

Every decomposed matrix ``W_l: (d_in, d_out)`` is ``V_l @ U_l`` with ``V_l: (d_in, C)``
and ``U_l: (C, d_out)``: C rank-1 subcomponents. Every *site* (a use of a matrix; TMS's
tied decoder is the site ``.W_enc:T`` with ``V = U_enc^T``, ``U = V_enc^T``) has its own
causal-importance (CI) function: a scalar MLP per subcomponent applied to the inner
activation ``h = a @ V``. Masks ``g + (1 - g) r`` with ``r ~ U(0, 1)`` multiply the inner
activations; the masked model must reproduce the target with every site masked
(stochastic loss) and with one site masked at a time (layerwise loss, one vmap over the
one-hot route vectors). ``sum |g+|^p`` pushes importances to zero.

Shapes: ``C`` subcomponents per matrix, ``H`` CI hidden width, ``batch`` examples,
``sites`` decomposed weight uses.

References:
    Bushnaq, Braun, Sharkey 2025, "Stochastic Parameter Decomposition" (arXiv 2506.20790).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from .. import tree
from .._checks import check_positive, fail
from .._types import Array, Key, PyTree
from .apd import Sites
from .weights import TRANSPOSED, forward_sites

__all__ = [
    "CIParams",
    "SPDComponents",
    "SPDWeight",
    "lower_leaky_hard_sigmoid",
    "upper_leaky_hard_sigmoid",
    "gated_lower_leaky_hard_sigmoid",
    "init_spd",
    "causal_importances",
    "spd_forward",
    "spd_loss",
]

LEAK = 0.01
EPS = 1e-12


def lower_leaky_hard_sigmoid(z: Array) -> Array:
    """``0.01 z`` for ``z <= 0``, ``z`` on ``[0, 1]``, 1 above (paper form; autodiff)."""
    return jnp.where(z <= 0, LEAK * z, jnp.minimum(z, 1.0))


def upper_leaky_hard_sigmoid(z: Array) -> Array:
    """0 for ``z <= 0``, ``z`` on ``[0, 1]``, ``1 + 0.01 (z - 1)`` above."""
    return jnp.where(z <= 1, jnp.maximum(z, 0.0), 1.0 + LEAK * (z - 1.0))


@jax.custom_vjp
def gated_lower_leaky_hard_sigmoid(z: Array) -> Array:
    """The later code's form: forward ``clip(z, 0, 1)``; backward passes the gradient on
    ``(0, 1]``, ``0.01 x`` it on ``z <= 0`` only where it is negative (so descent can raise
    a dead importance but never lower it), 0 above 1."""
    return jnp.clip(z, 0.0, 1.0)


def _gated_fwd(z):
    return jnp.clip(z, 0.0, 1.0), z


def _gated_bwd(z, g):
    inside = (z > 0) & (z <= 1)
    leak = (z <= 0) & (g < 0)
    return (jnp.where(inside, g, jnp.where(leak, LEAK * g, 0.0)),)


gated_lower_leaky_hard_sigmoid.defvjp(_gated_fwd, _gated_bwd)


class CIParams(eqx.Module):
    """Per-subcomponent scalar MLPs ``z_c = w_out[c] . GELU(w_in[c] h_c + b_in[c]) + b_out[c]``.

    Attributes:
        w_in, b_in, w_out: ``(C, H)``.
        b_out: ``(C,)``.
    """

    w_in: Array
    b_in: Array
    w_out: Array
    b_out: Array

    def __call__(self, h: Array) -> Array:
        """``h: (..., C)`` inner activations -> pre-activations ``z: (..., C)``."""
        hid = jax.nn.gelu(h[..., None] * self.w_in + self.b_in, approximate=False)
        return jnp.sum(hid * self.w_out, axis=-1) + self.b_out


class SPDComponents(eqx.Module):
    """``V: {path: (d_in, C)}``, ``U: {path: (C, d_out)}``, ``ci: {site: CIParams}``."""

    V: dict[str, Array]
    U: dict[str, Array]
    ci: dict[str, CIParams]

    def __check_init__(self):
        if set(self.V) != set(self.U):
            raise fail("SPDComponents", "U", f"the paths of V {sorted(self.V)}", sorted(self.U))

    def site_factors(self, site: str) -> tuple[Array, Array]:
        """``(V, U)`` as used at ``site``: a transposed site uses ``(U^T, V^T)``."""
        path = site.removesuffix(TRANSPOSED)
        V, U = self.V[path], self.U[path]
        return (U.T, V.T) if site.endswith(TRANSPOSED) else (V, U)


class SPDWeight(eqx.Module):
    """A decomposed weight at its (up to two) sites: ``a @ w`` is
    ``where(route, ((a @ V) * mask) @ U, a @ W)`` and ``w.T`` swaps to the transposed
    site's mask and route. ``mask: ([P,] C)``; ``route``: scalar bool."""

    V: Array
    U: Array
    W: Array
    mask: Array | None
    mask_T: Array | None
    route: Array | None
    route_T: Array | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W.shape)

    @property
    def T(self) -> SPDWeight:  # noqa: N802
        return SPDWeight(self.U.T, self.V.T, self.W.T, self.mask_T, self.mask, self.route_T,
                         self.route)

    def __rmatmul__(self, a: Array) -> Array:
        if self.mask is None:
            return a @ self.W
        masked = ((a @ self.V) * self.mask) @ self.U
        if self.route is None:
            return masked
        return jnp.where(self.route, masked, a @ self.W)


def _split_site(site: str) -> tuple[str, bool]:
    return site.removesuffix(TRANSPOSED), site.endswith(TRANSPOSED)


def spd_forward(apply: Callable, params: PyTree, sites: Sites, comps: SPDComponents, x: Any,
                masks: dict[str, Array], routes: dict[str, Array] | None = None) -> Any:
    """Output of ONE example with every site in ``masks`` masked (and, when ``routes`` is
    given, only where its route flag is set; elsewhere the frozen target weight)."""
    weights = {}
    for path in sites.paths:
        W = tree.get(params, path)
        m, mt = masks.get(path), masks.get(path + TRANSPOSED)
        r = rt = None
        if routes is not None:
            r, rt = routes.get(path), routes.get(path + TRANSPOSED)
        weights[path] = SPDWeight(comps.V[path], comps.U[path], W, m, mt, r, rt)
    return forward_sites(apply, params, x, sites.paths, weights=weights)[0]


def init_spd(params: PyTree, sites: Sites, C: int | dict[str, int], hidden: int, *,
             key: Key) -> SPDComponents:
    """Projection init: unit-norm V columns and U rows, then ``U[c] *= V[:, c]^T W U[c]^T``
    (each subcomponent starts as its projection onto W). CI MLPs: ``w_in ~ N(0, 2)``,
    ``w_out ~ N(0, 1/H)``, biases 0.

    Args:
        C: subcomponents per matrix, one int or ``{path: C}``.
        hidden: CI MLP width H.
    """
    check_positive("init_spd", "hidden", hidden, integer=True)
    V, U, ci = {}, {}, {}
    for i, path in enumerate(sites.paths):
        c = C[path] if isinstance(C, dict) else C
        check_positive("init_spd", "C", c, integer=True)
        W = tree.get(params, path)
        kv, ku = jax.random.split(jax.random.fold_in(key, i))
        v = jax.random.normal(kv, (W.shape[0], c))
        v = v / jnp.linalg.norm(v, axis=0, keepdims=True)
        u = jax.random.normal(ku, (c, W.shape[1]))
        u = u / jnp.linalg.norm(u, axis=1, keepdims=True)
        kappa = jnp.einsum("ic,io,co->c", v, W, u)
        V[path], U[path] = v, u * kappa[:, None]
    for j, site in enumerate(sites.names):
        c = V[_split_site(site)[0]].shape[1]
        k1, k2 = jax.random.split(jax.random.fold_in(key, 1000 + j))
        ci[site] = CIParams(math.sqrt(2.0) * jax.random.normal(k1, (c, hidden)),
                            jnp.zeros((c, hidden)),
                            jax.random.normal(k2, (c, hidden)) / math.sqrt(hidden),
                            jnp.zeros((c,)))
    return SPDComponents(V, U, ci)


def causal_importances(comps: SPDComponents, inputs: dict[str, Array], *,
                       gated: bool = False) -> tuple[dict[str, Array], dict[str, Array]]:
    """``(g, g+)`` per site from the target's site inputs ``a: ([P,] d_in)`` (one example).
    The inner activation ``h = a @ V`` is NOT detached: the CI gradient trains V."""
    lower = gated_lower_leaky_hard_sigmoid if gated else lower_leaky_hard_sigmoid
    g, g_up = {}, {}
    for site, a in inputs.items():
        V, _ = comps.site_factors(site)
        z = comps.ci[site](a @ V)
        g[site], g_up[site] = lower(z), upper_leaky_hard_sigmoid(z)
    return g, g_up


class SPDLossConfig(NamedTuple):
    c_faith: float | None
    c_stoch: float | None
    c_layerwise: float | None
    c_imp: float | None
    p: float
    gated: bool


def faithfulness_loss(params: PyTree, comps: SPDComponents, sites: Sites) -> Array:
    """``sum_sites ||W_l - V_l U_l||^2 / sum_sites numel(W_l)`` (tied weights twice)."""
    total = 0.0
    for path in sites.paths:
        resid = tree.get(params, path) - comps.V[path] @ comps.U[path]
        total = total + sites.count(path) * jnp.sum(resid**2)
    return total / sites.n_params


def importance_minimality(g_up: dict[str, Array], p: float) -> Array:
    """``mean_{batch[,pos]} sum_sites sum_c (g+ + eps)^p`` for ``g+: (batch, [P,] C)``."""
    total = 0.0
    for v in g_up.values():
        total = total + jnp.mean(jnp.sum((v + EPS) ** p, axis=-1))
    return total


def stochastic_masks(g: dict[str, Array], key: Key) -> dict[str, Array]:
    """``g + (1 - g) r`` with fresh ``r ~ U(0, 1)`` per site (``fold_in`` of the site index)."""
    return {s: v + (1.0 - v) * jax.random.uniform(jax.random.fold_in(key, i), v.shape, v.dtype)
            for i, (s, v) in enumerate(g.items())}


def spd_loss(comps: SPDComponents, params: PyTree, x: Array, key: Key, *, apply: Callable,
             sites: Sites, cfg: SPDLossConfig) -> tuple[Array, dict[str, Array]]:
    """Total SPD loss (paper recipe) on ``x: (batch, *in)`` and every term by name.

    Masks are drawn freshly for each reconstruction loss from ``key``
    (``fold_in(key, loss_id)``, then the site index). The layerwise loss routes one site
    at a time: one vmap over the one-hot route vectors, other sites use the frozen target.
    """
    y_t, cache = jax.vmap(lambda xx: forward_sites(apply, params, xx, sites.paths))(x)
    inputs = {s: a for s, (a, _) in cache.items()}
    g, g_up = jax.vmap(lambda inp: causal_importances(comps, inp, gated=cfg.gated))(inputs)
    aux: dict[str, Array] = {}
    total = 0.0

    def mse(y):
        return jnp.mean((y - y_t) ** 2)

    if cfg.c_faith is not None:
        aux["faithfulness"] = faithfulness_loss(params, comps, sites)
        total = total + cfg.c_faith * aux["faithfulness"]
    if cfg.c_stoch is not None:
        masks = stochastic_masks(g, jax.random.fold_in(key, 0))
        y = jax.vmap(lambda xx, mk: spd_forward(apply, params, sites, comps, xx, mk))(x, masks)
        aux["stochastic_recon"] = mse(y)
        total = total + cfg.c_stoch * aux["stochastic_recon"]
    if cfg.c_layerwise is not None:
        masks = stochastic_masks(g, jax.random.fold_in(key, 1))
        names = sites.names
        eye = jnp.eye(len(names), dtype=bool)

        def routed(route_row):
            routes = {s: route_row[i] for i, s in enumerate(names)}
            y = jax.vmap(lambda xx, mk: spd_forward(apply, params, sites, comps, xx, mk,
                                                    routes))(x, masks)
            return mse(y)

        aux["layerwise_recon"] = jnp.mean(jax.vmap(routed)(eye))
        total = total + cfg.c_layerwise * aux["layerwise_recon"]
    if cfg.c_imp is not None:
        aux["importance_minimality"] = importance_minimality(g_up, cfg.p)
        total = total + cfg.c_imp * aux["importance_minimality"]
    aux["ci_l0"] = sum(jnp.mean(jnp.sum(v > 0.1, axis=-1)) for v in g.values())
    return total, aux
