"""SPD losses: faithfulness, importance minimality (with the frequency term and
p-annealing), stochastic / layerwise / subset-routed / PGD / hidden-activation
reconstruction, the output divergences, mask and route sampling, the faithfulness
warm-up, and :func:`spd_loss` that combines them (``specs/spd.md`` sections 3 and 9).

References:
    Bushnaq, Braun, Sharkey 2025, "Stochastic Parameter Decomposition" (arXiv 2506.20790).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ... import tree
from ..._checks import check_in, check_nonnegative, check_positive, fail
from ..._types import Array, Key, PyTree
from ...rng import hash_uniform
from ..apd import Sites, _output_grads
from ..weights import TRANSPOSED, forward_sites, returns_unbatched
from .core import (
    SPDComponents,
    SPDWeight,
    causal_importances,
    first_masked_site,
    inner_acts,
    spd_forward_sites,
)

EPS = 1e-12
DIVERGENCES = ("mse", "kl")
PGD_INITS = ("random", "ones", "zeros")
# Loss ids: each reconstruction loss draws its masks from ``fold_in(key, loss_id)``.
STOCHASTIC, LAYERWISE, SUBSET, PGD = 0, 1, 2, 3
DELTA_KEYS = 1000  # the delta mask of site i uses fold_in(loss_key, DELTA_KEYS + i)
ROUTE_KEY = 2000  # subset routes use fold_in(loss_key, ROUTE_KEY)


def faithfulness_warmup(params: PyTree, comps: SPDComponents, sites: Sites, steps: int, *,
                        lr: float = 0.01, weight_decay: float = 0.1) -> SPDComponents:
    """``steps`` updates of V and U on the faithfulness loss alone with a throwaway AdamW
    (lr 0.01, weight decay 0.1; the ``main`` recipe's warm-up after ``init="normal"``), in
    one jit-compiled ``lax.scan``. The CI functions are returned unchanged.

    Raises:
        ValueError: if ``steps`` is not a non-negative integer.
    """
    check_nonnegative("faithfulness_warmup", "steps", steps, integer=True)
    if steps == 0:
        return comps
    opt = optax.adamw(lr, weight_decay=weight_decay)

    def loss(vu, p):
        return faithfulness_loss(p, SPDComponents(vu[0], vu[1], {}), sites)

    @jax.jit
    def run(vu, p):
        def body(carry, _):
            vu, state = carry
            updates, state = opt.update(jax.grad(loss)(vu, p), state, vu)
            return (optax.apply_updates(vu, updates), state), None

        (vu, _), _ = jax.lax.scan(body, (vu, opt.init(vu)), None, length=int(steps))
        return vu

    V, U = run((comps.V, comps.U), jax.lax.stop_gradient(params))
    return SPDComponents(V, U, comps.ci)


class PGDConfig(NamedTuple):
    """Settings of the PGD (adversarial) masks (``main`` recipe).

    Attributes:
        steps: signed-gradient ascent steps on the sources.
        step_size: ascent step size.
        init: initial sources: ``"random"`` (``U(0, 1)``), ``"ones"`` or ``"zeros"``.
        shared: one source vector per site shared across the batch (and positions); else
            one per example (and position).
    """

    steps: int = 1
    step_size: float = 0.1
    init: str = "random"
    shared: bool = False


class SPDLossConfig(NamedTuple):
    """Static loss settings (built by :meth:`jaxinterp.decomposition.SPDConfig.loss_config`;
    the defaults of the later fields keep the paper recipe).

    Attributes:
        c_faith, c_stoch, c_layerwise, c_imp: paper-recipe coefficients (None: term off).
        p: importance-minimality exponent (unless :func:`spd_loss` gets ``p``).
        gated: clamped CI with the sign-gated leaky backward pass.
        delta: every masked site adds ``m_delta (a @ (W - V U))``, ``m_delta ~ U(0, 1)``
            per example (and position) and site.
        beta: frequency term of the importance loss (0: the paper's formula).
        divergence: output divergence D, ``"mse"`` or ``"kl"``.
        c_subset: subset-routing reconstruction (None: off).
        c_hidden_recon: hidden-activation reconstruction (None: off).
        c_pgd: PGD reconstruction (None: off), with the settings ``pgd``.
    """

    c_faith: float | None
    c_stoch: float | None
    c_layerwise: float | None
    c_imp: float | None
    p: float
    gated: bool
    delta: bool = False
    beta: float = 0.0
    divergence: str = "mse"
    c_subset: float | None = None
    c_hidden_recon: float | None = None
    c_pgd: float | None = None
    pgd: PGDConfig = PGDConfig()


def check_pgd_config(fn: str, pgd: PGDConfig) -> None:
    """Raise a ``ValueError`` for bad PGD settings."""
    check_nonnegative(fn, "pgd.steps", pgd.steps, integer=True)
    check_positive(fn, "pgd.step_size", pgd.step_size)
    check_in(fn, "pgd.init", pgd.init, PGD_INITS)


def check_loss_config(fn: str, cfg: SPDLossConfig) -> None:
    """Raise a ``ValueError`` for bad loss settings (trace time)."""
    check_in(fn, "cfg.divergence", cfg.divergence, DIVERGENCES)
    check_nonnegative(fn, "cfg.beta", cfg.beta)
    if cfg.c_pgd is not None:
        check_pgd_config(fn, cfg.pgd)


def faithfulness_loss(params: PyTree, comps: SPDComponents, sites: Sites) -> Array:
    """``sum_sites ||W_l - V_l U_l||^2 / sum_sites numel(W_l)`` (tied weights twice)."""
    total = 0.0
    for path in sites.paths:
        resid = tree.get(params, path) - comps.V[path] @ comps.U[path]
        total = total + sites.count(path) * jnp.sum(resid**2)
    return total / sites.n_params


def importance_minimality(g_up: dict[str, Array], p: float | Array,
                          beta: float = 0.0) -> Array:
    """Importance minimality for ``g+: (batch, [P,] C)`` per site.

    With ``S_lc = sum_{b[,p]} (g+ + eps)^p`` and ``mu_lc = S_lc / (B P)``:
    ``sum_l sum_c mu_lc (1 + beta log2(1 + S_lc))``; ``beta = 0`` is the paper's
    ``mean_{batch[,pos]} sum_sites sum_c (g+ + eps)^p``. ``p`` may be traced (annealing).
    """
    total = 0.0
    for v in g_up.values():
        powered = (v + EPS) ** p
        if beta == 0:
            total = total + jnp.mean(jnp.sum(powered, axis=-1))
            continue
        c = v.shape[-1]
        s_lc = jnp.sum(powered.reshape(-1, c), axis=0)
        total = total + jnp.sum(s_lc / (powered.size // c) * (1.0 + beta * jnp.log2(1.0 + s_lc)))
    return total


def annealed_p(step: int | Array, total_steps: int, p0: float,
               p_anneal: tuple[float, float, float] | None) -> float | Array:
    """The importance exponent at update ``step``: ``p0`` until the fraction ``start`` of
    ``total_steps``, then linear to ``p_final`` at ``end``, then ``p_final``.

    Args:
        p_anneal: ``(p_final, start, end)`` or None (``p0`` throughout).
    """
    if p_anneal is None:
        return p0
    p_final, start, end = p_anneal
    frac = jnp.asarray(step) / total_steps
    if end > start:
        t = jnp.clip((frac - start) / (end - start), 0.0, 1.0)
    else:
        t = (frac >= start).astype(frac.dtype)
    return p0 + (p_final - p0) * t


def divergence(y: Array, y_target: Array, kind: str = "mse") -> Array:
    """Output divergence D: ``"mse"``, ``mean (y - y*)^2`` over every axis, or ``"kl"``,
    ``KL(softmax(y*) || softmax(y))`` over the last axis averaged over the others."""
    if kind == "mse":
        return jnp.mean((y - y_target) ** 2)
    if kind == "kl":
        log_t = jax.nn.log_softmax(y_target, axis=-1)
        kl = jnp.sum(jnp.exp(log_t) * (log_t - jax.nn.log_softmax(y, axis=-1)), axis=-1)
        return jnp.mean(kl)
    raise fail("divergence", "kind", "one of " + ", ".join(map(repr, DIVERGENCES)), repr(kind))


def stochastic_masks(g: dict[str, Array], key: Key) -> dict[str, Array]:
    """``g + (1 - g) r`` with fresh ``r ~ U(0, 1)`` per site (``fold_in`` of the site index;
    :func:`jaxinterp.rng.hash_uniform`, the cheap counter hash: masks are most of the
    random numbers a step draws)."""
    return {s: v + (1.0 - v) * hash_uniform(jax.random.fold_in(key, i), v.shape, v.dtype)
            for i, (s, v) in enumerate(g.items())}


def delta_masks(g: dict[str, Array], key: Key) -> dict[str, Array]:
    """``m_delta ~ U(0, 1)`` of the delta component: shape ``g[site].shape[:-1]`` (one per
    example and position) per site, from ``fold_in(key, DELTA_KEYS + site index)``."""
    return {s: jax.random.uniform(jax.random.fold_in(key, DELTA_KEYS + i), v.shape[:-1], v.dtype)
            for i, (s, v) in enumerate(g.items())}


def subset_routes(names: Sequence[str], shape: tuple[int, ...], key: Key) -> dict[str, Array]:
    """Subset routing: for every entry of ``shape`` (examples, [positions]) draw
    ``k ~ U{1..L}`` and route a uniform random k-subset of the ``L`` sites.

    Returns:
        ``{site: bool array of shape}``.
    """
    n = len(names)
    k_key, u_key = jax.random.split(key)
    k = jax.random.randint(k_key, shape, 1, n + 1)
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(u_key, (*shape, n)), axis=-1), axis=-1)
    routed = rank < k[..., None]
    return {s: routed[..., i] for i, s in enumerate(names)}


def _route_shape(g: dict[str, Array]) -> tuple[int, ...]:
    """``(batch, [P,])`` when every site shares its position axes, else ``(batch,)``."""
    leads = {v.shape[:-1] for v in g.values()}
    return leads.pop() if len(leads) == 1 else next(iter(g.values())).shape[:1]


def _batched_forward(apply: Callable, params: PyTree, sites: Sites, comps: SPDComponents,
                     x: Array, masks: dict[str, Array], dmasks: dict[str, Array] | None = None,
                     routes: dict[str, Array] | None = None,
                     target: tuple[dict[str, Array], dict[str, Array]] | None = None,
                     held: dict[str, tuple[None, Array]] | None = None):
    """``(y, cache)`` of the masked pass over the batch (``x``, masks and routes have a
    leading batch axis).

    Args:
        target: the target's ``(inner activations, site outputs)`` over the batch; the
            first masked site reuses them (:func:`first_masked_site`).
        held: ``{site: (None, out)}``: unmasked sites whose output is ``out`` over the
            batch, whatever their input.
    """
    reuse = dict(held or {})
    lead = first_masked_site(sites, masks)
    if target is not None and lead is not None:
        reuse[lead] = (target[0][lead], target[1][lead])
    reuse = reuse or None

    def one(xx, mk, d, r, re):
        return spd_forward_sites(apply, params, sites, comps, xx, mk, r, d, re)

    return jax.vmap(one)(x, masks, dmasks, routes, reuse)


def _output_jacobian(apply: Callable, params: PyTree, sites: Sites, site: str, x: Any,
                     delta: Array, others: dict[str, Array] | None = None) -> Array:
    """``(d_y, *out_site)``: the gradient of every output element with respect to
    ``site``'s output of ONE example ``x`` (the target's weights held constant), at the
    additive ``delta`` and the fixed deltas ``others`` at other sites; one VJP per output
    element, as APD's output gradients."""
    frozen = jax.lax.stop_gradient(params)

    def y(dd):
        return forward_sites(apply, frozen, x, sites.paths, deltas={**(others or {}), **dd})[0]

    return _output_grads(y, {site: delta})[site]


def affine_output_sites(apply: Callable, params: PyTree, sites: Sites, x: Any
                        ) -> frozenset[str]:
    """The sites whose output enters the model output through ONE fixed linear map:
    ``y = F(x, other sites' outputs) + out_s J_s`` with ``J_s`` the same for every
    example, every value of ``out_s`` and every output of the other sites (resid-mlp's
    last ``mlp_out``, read by the frozen unembedding).

    Decided at trace time from the structure of the computation, not from values: the
    Jacobian with respect to a delta added to the site's output, with the examples ``x:
    (batch, ...)``, that delta AND deltas at every other site's output batched, can be
    returned unbatched by ``vmap`` (``out_axes=None``). A ReLU, softmax or product with
    anything example-dependent between the site and the output makes it depend on them.
    """
    spec = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), x)
    b = jax.tree_util.tree_leaves(spec)[0].shape[0]

    def dspec(s):
        dtype = jnp.result_type(tree.get(params, s.removesuffix(TRANSPOSED)))
        return jax.ShapeDtypeStruct((b, *sites.shapes[s][1]), dtype)

    out = set()
    for s in sites.names:
        others = {o: dspec(o) for o in sites.names if o != s}
        if returns_unbatched(lambda xx, d, od, s=s: _output_jacobian(apply, params, sites, s,
                                                                      xx, d, od),
                             spec, dspec(s), others):
            out.add(s)
    return frozenset(out)


def _folding_is_cheaper(sites: Sites, comps: SPDComponents, site: str, b: int) -> bool:
    """Folded at ``site``, a pass costs ``(C + d_in) d_out P d_y`` multiply-adds once
    (``U J`` and ``W J``) plus ``(C + d_in) P d_y`` per example (``P`` the site's positions,
    ``d_y`` the output's size); run through the model it costs at least the site's masked
    product, ``P C d_out`` per example."""
    d_in, (*pos, d_out) = sites.shapes[site][0][-1], sites.shapes[site][1]
    P = math.prod(pos)  # noqa: N806
    C = comps.site_factors(site)[0].shape[1]  # noqa: N806
    d_y = math.prod(sites.out_shape)
    return (C + d_in) * d_out * P * d_y + b * P * (C + d_in) * d_y < b * P * C * d_out


def _folded_output(params: PyTree, comps: SPDComponents, site: str, G: Array,  # noqa: N803
                   y_base: Array, a: Array, h: Array, mask: Array, dmask: Array | None,
                   a_base: Array | None = None) -> Array:
    """The output of a masked pass at a site of :func:`affine_output_sites` (``y = F + out
    J``), from ``y_base``, the output with the site's output replaced by ``a_base @ W``
    (zero when ``a_base`` is None): ``y = y_base + (out - a_base W) J`` with ``out = (h (mask
    - m_delta)) U + m_delta (a W)`` (``m_delta = 0`` without the delta channel), contracted
    as ``h (U J)`` and ``a (W J)``: nothing after the site runs.

    Args:
        G: the site's readout Jacobian ``(d_y, *out_site)``, the same for every example.
        a, h: the site's input in this pass, ``(batch, ..., d_in)``, and ``a @ V``.
        a_base: the site's input in the pass that gave ``y_base`` (the target's, for
            ``y_base = y*``).
    """
    _, U = comps.site_factors(site)  # noqa: N806
    UG = jnp.einsum("co,y...o->y...c", U, G)  # noqa: N806
    d = jnp.zeros(mask.shape[:-1], mask.dtype) if dmask is None else dmask
    b = h.shape[0]
    coef = (h * (mask - d[..., None])).reshape(b, -1)
    diff = coef @ UG.reshape(UG.shape[0], -1).T
    if dmask is not None or a_base is not None:
        W = tree.get(params, site.removesuffix(TRANSPOSED))  # noqa: N806
        if site.endswith(TRANSPOSED):
            W = W.T  # noqa: N806
        WG = jnp.einsum("io,y...o->y...i", jax.lax.stop_gradient(W), G)  # noqa: N806
        rest = d[..., None] * a - (0.0 if a_base is None else a_base)
        diff = diff + rest.reshape(b, -1) @ WG.reshape(WG.shape[0], -1).T
    return y_base + diff.reshape(y_base.shape)


def _only_through(apply: Callable, params: PyTree, sites: Sites, site: str, x: Any) -> bool:
    """Whether every other site's output reaches the model output only through ``site``:
    with ``site``'s output held fixed, the output of an example ``x`` does not depend on
    deltas added at the other sites' outputs (trace time: ``vmap`` over the deltas can
    return it unbatched)."""
    path = site.removesuffix(TRANSPOSED)
    W = tree.get(params, path)  # noqa: N806
    out = jnp.zeros(sites.shapes[site][1], jnp.result_type(W))
    # an unmasked SPDWeight returns its target output, when given, whatever its input
    held_out = (None, out) if site.endswith(TRANSPOSED) else (out, None)
    none = jnp.zeros((W.shape[0], 1), out.dtype), jnp.zeros((1, W.shape[1]), out.dtype)
    held = SPDWeight(*none, W, None, None, None, None, target_out=held_out[0],
                     target_out_T=held_out[1])
    x0 = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(v.shape[1:], v.dtype), x)
    dspec = {s: jax.ShapeDtypeStruct((2, *sites.shapes[s][1]), out.dtype)
             for s in sites.names if s != site}

    def f(xx, deltas):
        return forward_sites(apply, params, xx, sites.paths, weights={path: held},
                             deltas=deltas)[0]

    return returns_unbatched(f, x0, dspec, in_axes=(None, 0))


def _pgd_masks(g: dict[str, Array], sources: dict[str, Array], delta: bool
               ) -> tuple[dict[str, Array], dict[str, Array] | None]:
    """Masks ``g + (1 - g) s[..., :C]``; the delta channel ``s[..., C]`` is used raw."""
    masks = {s: v + (1.0 - v) * sources[s][..., : v.shape[-1]] for s, v in g.items()}
    if not delta:
        return masks, None
    return masks, {s: jnp.broadcast_to(sources[s][..., v.shape[-1]], v.shape[:-1])
                   for s, v in g.items()}


def _pgd_sources(g: dict[str, Array], pgd: PGDConfig, delta: bool, key: Key) -> dict[str, Array]:
    out = {}
    for i, (s, v) in enumerate(g.items()):
        lead = (1,) * (v.ndim - 1) if pgd.shared else v.shape[:-1]
        shape = (*lead, v.shape[-1] + int(delta))
        if pgd.init == "random":
            out[s] = jax.random.uniform(jax.random.fold_in(key, i), shape, v.dtype)
        else:
            out[s] = jnp.full(shape, 1.0 if pgd.init == "ones" else 0.0, v.dtype)
    return out


def _check_sources(fn: str, g: dict[str, Array], sources: dict[str, Array], delta: bool) -> None:
    if set(sources) != set(g):
        raise fail(fn, "sources", f"one array per site {sorted(g)}", sorted(sources))
    for s, v in g.items():
        want = v.shape[-1] + int(delta)
        got = tuple(jnp.shape(sources[s]))
        ok = (len(got) == v.ndim and got[-1] == want
              and all(a in (1, b) for a, b in zip(got[:-1], v.shape[:-1], strict=True)))
        if not ok:
            lead = ", ".join(f"{b} or 1" for b in v.shape[:-1])
            chan = f"C + 1 = {want}" if delta else f"C = {want}"
            raise fail(fn, f"sources[{s!r}]", f"of shape ({lead}, {chan})", got,
                       "With delta=True the last channel is the delta component's mask.")


def _pgd_loss(comps: SPDComponents, params: PyTree, x: Array, y_t: Array, g: dict[str, Array],
              sources: dict[str, Array], *, apply: Callable, sites: Sites, pgd: PGDConfig,
              delta: bool, kind: str,
              target: tuple[dict[str, Array], dict[str, Array]] | None = None
              ) -> tuple[Array, dict[str, Array]]:
    """D at the sources after ``pgd.steps`` steps ``s <- clip(s + step sign(dD/ds), 0, 1)``
    (a ``fori_loop`` on constant components), and the final sources. The final sources
    are a leaf: the loss differentiates through the masks' ``g`` only. ``target``: the
    target's inner activations and site outputs (see :func:`_batched_forward`)."""
    def objective(c, p, gg, tg, s):
        masks, dmasks = _pgd_masks(gg, s, delta)
        y = _batched_forward(apply, p, sites, c, x, masks, dmasks, target=tg)[0]
        return divergence(y, y_t, kind)

    frozen = jax.lax.stop_gradient((comps, params, g, target))

    def ascend(_, s):
        grad = jax.grad(objective, argnums=4)(*frozen, s)
        return jax.tree.map(lambda si, gi: jnp.clip(si + pgd.step_size * jnp.sign(gi), 0.0, 1.0),
                            s, grad)

    s = jax.lax.stop_gradient(jax.lax.fori_loop(0, pgd.steps, ascend, sources))
    return objective(comps, params, g, target, s), s


def pgd_recon(comps: SPDComponents, params: PyTree, x: Array, *, apply: Callable,
              sites: Sites, pgd: PGDConfig | None = None, delta: bool = False,
              gated: bool = False, divergence: str = "mse", key: Key,
              sources: dict[str, Array] | None = None) -> tuple[Array, dict[str, Array]]:
    """PGD reconstruction on a batch ``x: (batch, *in)``: the divergence from the target
    at adversarial mask sources, every site masked with ``g + (1 - g) s``.

    Args:
        pgd: steps, step size, init and sharing of the sources (default ``PGDConfig()``).
        delta: whether the sources have the delta component's channel (``C + 1``).
        divergence: ``"mse"`` or ``"kl"``.
        key: draws the ``"random"`` initial sources.
        sources: explicit initial sources ``{site: (batch or 1, [P or 1,] C [+ 1])}``
            (overrides ``pgd.init``).

    Returns:
        ``(loss, final sources)``.

    Raises:
        ValueError: bad PGD settings or sources of the wrong shape.
    """
    fn = "pgd_recon"
    pgd = PGDConfig() if pgd is None else pgd
    check_pgd_config(fn, pgd)
    check_in(fn, "divergence", divergence, DIVERGENCES)
    y_t, cache = jax.vmap(lambda xx: forward_sites(apply, params, xx, sites.paths))(x)
    inputs = {s: a for s, (a, _) in cache.items()}
    inner = inner_acts(comps, inputs)
    g, _ = causal_importances(comps, inputs, gated=gated, inner=inner)
    if sources is None:
        sources = _pgd_sources(g, pgd, delta, key)
    else:
        _check_sources(fn, g, sources, delta)
    return _pgd_loss(comps, params, x, y_t, g, sources, apply=apply, sites=sites, pgd=pgd,
                     delta=delta, kind=divergence,
                     target=(inner, {s: h for s, (_, h) in cache.items()}))


def spd_loss(comps: SPDComponents, params: PyTree, x: Array, key: Key, *, apply: Callable,
             sites: Sites, cfg: SPDLossConfig, p: float | Array | None = None
             ) -> tuple[Array, dict[str, Array]]:
    """Total SPD loss on ``x: (batch, *in)`` and every term by name.

    Masks are drawn freshly for each reconstruction loss from ``key``
    (``fold_in(key, loss_id)``, then the site index). The layerwise loss masks one site
    at a time, the other sites use the frozen target: one batched pass per site, except
    for a site whose output reaches the model output through one fixed affine map
    (:func:`affine_output_sites`, e.g. resid-mlp's last ``mlp_out``), whose pass is
    ``y* + (out - out*) J`` without running the model when that is cheaper. The
    stochastic pass folds at its last site too: from ``y*`` when every other site
    reaches the output only through it (resid-mlp-1), else (without the hidden loss,
    which needs the site's output) from the pass with that site's output held at 0
    (resid-mlp-2). (Vmapping
    one-hot route vectors instead evaluates both the masked and the target branch of every
    site for L x batch rows; measured 3x slower on resid-mlp-1 and 1.3x on tms-5-2, CPU.)
    The subset loss routes a random subset of sites per example (position); the PGD loss
    masks every site with adversarial sources; the hidden-activation loss compares every
    site's output in the stochastic pass (same masks as ``stochastic_recon``) with the
    target's. With ``cfg.delta`` each masked site adds its delta component.

    Args:
        p: the importance-minimality exponent of this step (see :func:`annealed_p`);
            default ``cfg.p``.

    Raises:
        ValueError: bad settings in ``cfg``.
    """
    check_loss_config("spd_loss", cfg)
    y_t, cache = jax.vmap(lambda xx: forward_sites(apply, params, xx, sites.paths))(x)
    inputs = {s: a for s, (a, _) in cache.items()}
    inner = inner_acts(comps, inputs)  # computed once, reused by the CI MLPs and the passes
    target = (inner, {s: h for s, (_, h) in cache.items()})
    g, g_up = causal_importances(comps, inputs, gated=cfg.gated, inner=inner)  # batched
    aux: dict[str, Array] = {}
    total = 0.0

    def dist(y):
        return divergence(y, y_t, cfg.divergence)

    def draws(loss_id):
        k = jax.random.fold_in(key, loss_id)
        return k, stochastic_masks(g, k), delta_masks(g, k) if cfg.delta else None

    if cfg.c_faith is not None:
        aux["faithfulness"] = faithfulness_loss(params, comps, sites)
        total = total + cfg.c_faith * aux["faithfulness"]
    folded: dict[str, Array] = {}  # site -> its readout Jacobian, formed once per step
    if cfg.c_stoch is not None or cfg.c_layerwise is not None:
        x0 = jax.tree_util.tree_map(lambda v: v[0], x)
        folded = {s: jax.lax.stop_gradient(_output_jacobian(
                      apply, params, sites, s, x0, jnp.zeros_like(cache[s][1][0])))
                  for s in affine_output_sites(apply, params, sites, x)
                  if _folding_is_cheaper(sites, comps, s, y_t.shape[0])}
    if cfg.c_stoch is not None or cfg.c_hidden_recon is not None:
        _, masks, dm = draws(STOCHASTIC)
        last = sites.names[-1]
        through = last in folded and _only_through(apply, params, sites, last, x)
        held = last in folded and not through and cfg.c_hidden_recon is None
        if held:  # the last site's output held at 0: y = F(x, the masked other sites)
            y, cache_m = _batched_forward(
                apply, params, sites, comps, x, {s: m for s, m in masks.items() if s != last},
                None if dm is None else {s: v for s, v in dm.items() if s != last},
                target=target, held={last: (None, jnp.zeros_like(cache[last][1]))})
        else:
            y, cache_m = _batched_forward(apply, params, sites, comps, x, masks, dm,
                                          target=target)
        if through or held:  # after the last site's input, the masked pass is dead code
            a_m = cache_m[last][0]
            y = _folded_output(params, comps, last, folded[last], y_t if through else y, a_m,
                               a_m @ comps.site_factors(last)[0], masks[last],
                               None if dm is None else dm[last],
                               inputs[last] if through else None)
        if cfg.c_stoch is not None:
            aux["stochastic_recon"] = dist(y)
            total = total + cfg.c_stoch * aux["stochastic_recon"]
        if cfg.c_hidden_recon is not None:
            aux["hidden_recon"] = jnp.mean(jnp.stack(
                [jnp.mean((cache_m[s][1] - cache[s][1]) ** 2) for s in sites.names]))
            total = total + cfg.c_hidden_recon * aux["hidden_recon"]
    if cfg.c_layerwise is not None:
        _, masks, dm = draws(LAYERWISE)

        def layerwise(s):
            if s in folded:
                return _folded_output(params, comps, s, folded[s], y_t, inputs[s], inner[s],
                                      masks[s], None if dm is None else dm[s], inputs[s])
            return _batched_forward(apply, params, sites, comps, x, {s: masks[s]},
                                    None if dm is None else {s: dm[s]}, target=target)[0]

        aux["layerwise_recon"] = jnp.mean(jnp.stack([dist(layerwise(s)) for s in sites.names]))
        total = total + cfg.c_layerwise * aux["layerwise_recon"]
    if cfg.c_subset is not None:
        k, masks, dm = draws(SUBSET)
        routes = subset_routes(sites.names, _route_shape(g), jax.random.fold_in(k, ROUTE_KEY))
        aux["subset_recon"] = dist(_batched_forward(apply, params, sites, comps, x, masks, dm,
                                                    routes, target)[0])
        total = total + cfg.c_subset * aux["subset_recon"]
    if cfg.c_pgd is not None:
        src = _pgd_sources(g, cfg.pgd, cfg.delta, jax.random.fold_in(key, PGD))
        aux["pgd_recon"], _ = _pgd_loss(comps, params, x, y_t, g, src, apply=apply,
                                        sites=sites, pgd=cfg.pgd, delta=cfg.delta,
                                        kind=cfg.divergence, target=target)
        total = total + cfg.c_pgd * aux["pgd_recon"]
    if cfg.c_imp is not None:
        aux["importance_minimality"] = importance_minimality(g_up, cfg.p if p is None else p,
                                                             cfg.beta)
        total = total + cfg.c_imp * aux["importance_minimality"]
    aux["ci_l0"] = sum(jnp.mean(jnp.sum(v > 0.1, axis=-1)) for v in g.values())
    return total, aux
