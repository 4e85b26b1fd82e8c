"""SPD core: the rank-1 subcomponents, the causal-importance functions and the masked
forward pass.

Every decomposed matrix ``W_l: (d_in, d_out)`` is ``V_l @ U_l`` with ``V_l: (d_in, C)`` and
``U_l: (C, d_out)``. A *site* is a use of a matrix (TMS's tied decoder is the site
``.W_enc:T`` with ``V = U_enc^T``, ``U = V_enc^T``); each site has its own CI function.
:class:`SPDWeight` stands in for the weight leaf so the target's own ``apply`` runs the
masked model.

References:
    Bushnaq, Braun, Sharkey 2025, "Stochastic Parameter Decomposition" (arXiv 2506.20790).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ... import tree
from ..._checks import check_in, check_positive, fail
from ..._types import Array, Key, PyTree
from ..apd import Sites
from ..weights import TRANSPOSED, forward_sites, one_hot_rows

LEAK = 0.01
CI_FNS = ("mlp", "vector_mlp", "shared_mlp")
INITS = ("projection", "normal")


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


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_parts(pre: Array) -> tuple[Array, Array]:
    """Exact (erf) GELU and its derivative ``Phi(x) + x phi(x)``, sharing one ``erf``."""
    cdf = 0.5 * (1.0 + jax.lax.erf(pre * _SQRT_HALF))
    return pre * cdf, cdf + pre * _INV_SQRT_2PI * jnp.exp(-0.5 * pre * pre)


@jax.custom_vjp
def scalar_mlps(h: Array, w_in: Array, b_in: Array, w_out: Array, b_out: Array) -> Array:
    """C independent scalar MLPs ``z_c = sum_k w_out[c,k] GELU(w_in[c,k] h_c + b_in[c,k]) +
    b_out[c]`` (exact erf GELU) for ``h: (..., C)``, weights ``(C, H)``, ``b_out: (C,)``.

    Same values and gradients as autodiff of ``jax.nn.gelu(approximate=False)`` (to float
    rounding), 1.3x (tms-5-2) to 2.4x (tms-40-10) faster on CPU: this MLP is the largest
    cost of an SPD step on the toys. The hidden tensor is laid out ``(C, n, H)`` so every
    contraction is a batched dot with a leading batch axis, and processed in chunks of
    ``n`` rows that stay in cache (:data:`_CHUNK_FLOATS`); ``erf`` replaces
    ``jax.nn.gelu``'s ``erfc`` (4x cheaper on CPU); the hand-written backward pass
    recomputes the pre-activations once per chunk and takes GELU and GELU' from one
    ``erf`` and one ``exp``, accumulating the parameter gradients in a ``lax.scan``. A
    small hidden tensor (at most :data:`_STORE_FLOATS` entries, e.g. tms-5-2's 1.3M) is
    instead computed whole and its GELU and GELU' are kept for the backward pass: 1.8 vs
    2.9 ms per site there, while at resid-mlp-1's 3.3M the chunks win (5.3 vs 6-10 ms).
    """
    return _scalar_mlps_fwd(h, w_in, b_in, w_out, b_out)[0]


_CHUNK_FLOATS = 1 << 20  # entries of one (C, n, H) hidden chunk (4 MiB in float32)
_STORE_FLOATS = 1 << 21  # up to this many hidden entries: one piece, GELU and GELU' kept


def _chunked(h: Array, C: int, H: int) -> tuple[Array, int]:
    """``h: (..., C)`` as ``(k, C, n)`` chunks of rows (zero-padded), and the row count."""
    hT = h.reshape(-1, C).T
    N = hT.shape[1]
    k = max(1, math.ceil(N * C * H / _CHUNK_FLOATS))
    n = math.ceil(N / k)
    return jnp.pad(hT, ((0, 0), (0, k * n - N))).reshape(C, k, n).transpose(1, 0, 2), N


def _unchunked(a: Array, N: int, shape: tuple[int, ...]) -> Array:
    """Inverse of :func:`_chunked`: ``(k, C, n) -> shape``."""
    k, C, n = a.shape
    return a.transpose(1, 0, 2).reshape(C, k * n)[:, :N].T.reshape(shape)


def _hidden(hc: Array, w_in: Array, b_in: Array) -> tuple[Array, Array]:
    """GELU and GELU' ``(C, n, H)`` of the pre-activations of rows ``hc: (C, n)``."""
    return _gelu_parts(hc[..., None] * w_in[:, None, :] + b_in[:, None, :])


def _scalar_mlps_fwd(h, w_in, b_in, w_out, b_out):
    C, H = w_in.shape
    bias = b_out.reshape((1,) * (h.ndim - 1) + (C,))
    if h.size * H <= _STORE_FLOATS:
        hT = h.reshape(-1, C).T
        g, dg = _hidden(hT, w_in, b_in)
        z = jnp.einsum("cnk,ck->cn", g, w_out).T.reshape(h.shape)
        return z + bias, (h, w_in, b_in, w_out, (g, dg))
    chunks, N = _chunked(h, C, H)

    def one(hc):  # (C, n) -> (C, n)
        return jnp.einsum("cnk,ck->cn", _hidden(hc, w_in, b_in)[0], w_out)

    return _unchunked(jax.lax.map(one, chunks), N, h.shape) + bias, (h, w_in, b_in, w_out, None)


def _mlp_grads(hc, dc, gelu, dgelu, w_in, w_out):
    """``(dh, d_w_in, d_b_in, d_w_out)`` of rows ``hc, dc: (C, n)`` with their GELU and
    GELU' ``(C, n, H)``."""
    dpre = dc[..., None] * w_out[:, None, :] * dgelu
    return (jnp.einsum("cnk,ck->cn", dpre, w_in), jnp.einsum("cn,cnk->ck", hc, dpre),
            jnp.sum(dpre, axis=1), jnp.einsum("cn,cnk->ck", dc, gelu))


def _scalar_mlps_bwd(res, dz):
    h, w_in, b_in, w_out, stored = res
    C, H = w_in.shape
    d_bout = jnp.sum(dz.reshape(-1, C), axis=0)
    if stored is not None:
        dh, d_win, d_bin, d_wout = _mlp_grads(h.reshape(-1, C).T, dz.reshape(-1, C).T,
                                              *stored, w_in, w_out)
        return dh.T.reshape(h.shape), d_win, d_bin, d_wout, d_bout
    h_chunks, N = _chunked(h, C, H)
    dz_chunks, _ = _chunked(dz, C, H)

    def step(acc, xs):
        hc, dc = xs
        gelu, dgelu = _hidden(hc, w_in, b_in)
        dh, *grads = _mlp_grads(hc, dc, gelu, dgelu, w_in, w_out)
        return tuple(a + g for a, g in zip(acc, grads, strict=True)), dh

    zero = jnp.zeros_like(w_in)
    (d_win, d_bin, d_wout), dh = jax.lax.scan(step, (zero, zero, zero), (h_chunks, dz_chunks))
    return _unchunked(dh, N, h.shape), d_win, d_bin, d_wout, d_bout


scalar_mlps.defvjp(_scalar_mlps_fwd, _scalar_mlps_bwd)


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
        return scalar_mlps(h, self.w_in, self.b_in, self.w_out, self.b_out)


def _lead(x: Array, n: int) -> Array:
    """``x`` with ``n`` leading unit axes (explicit broadcasting under rank promotion "raise")."""
    return x.reshape((1,) * n + x.shape)


class VectorCIParams(eqx.Module):
    """``ci_fn="vector_mlp"``: a separate ``a -> H -> 1`` MLP per subcomponent on the site
    INPUT, ``z_c = w_out[c] . GELU(a @ w_in[c] + b_in[c]) + b_out[c]``.

    Attributes:
        w_in: ``(C, d_in, H)``.
        b_in, w_out: ``(C, H)``.
        b_out: ``(C,)``.
    """

    w_in: Array
    b_in: Array
    w_out: Array
    b_out: Array

    def __call__(self, a: Array) -> Array:
        """``a: (..., d_in)`` site inputs -> pre-activations ``z: (..., C)``."""
        n = a.ndim - 1
        pre = jnp.einsum("...i,cih->...ch", a, self.w_in) + _lead(self.b_in, n)
        hid = jax.nn.gelu(pre, approximate=False)
        return jnp.sum(hid * _lead(self.w_out, n), axis=-1) + _lead(self.b_out, n)


class SharedCIParams(eqx.Module):
    """``ci_fn="shared_mlp"``: one ``a -> H -> C`` MLP per site on the site INPUT,
    ``z = GELU(a @ w_in + b_in) @ w_out + b_out``.

    Attributes:
        w_in: ``(d_in, H)``; b_in: ``(H,)``; w_out: ``(H, C)``; b_out: ``(C,)``.
    """

    w_in: Array
    b_in: Array
    w_out: Array
    b_out: Array

    def __call__(self, a: Array) -> Array:
        """``a: (..., d_in)`` site inputs -> pre-activations ``z: (..., C)``."""
        n = a.ndim - 1
        hid = jax.nn.gelu(a @ self.w_in + _lead(self.b_in, n), approximate=False)
        return hid @ self.w_out + _lead(self.b_out, n)


CIFunction = CIParams | VectorCIParams | SharedCIParams


def _ci_logits(ci: CIFunction, a: Array, h: Array | None) -> Array:
    """Pre-activations ``z: (..., C)``: the scalar MLPs read ``h = a @ V`` (NOT detached),
    the vector / shared MLPs read the site input ``a: (..., d_in)``."""
    return ci(h) if isinstance(ci, CIParams) else ci(a)


class SPDComponents(eqx.Module):
    """``V: {path: (d_in, C)}``, ``U: {path: (C, d_out)}``, ``ci: {site: CI function}``
    (:class:`CIParams`, :class:`VectorCIParams` or :class:`SharedCIParams`)."""

    V: dict[str, Array]
    U: dict[str, Array]
    ci: dict[str, CIFunction]

    def __check_init__(self):
        if set(self.V) != set(self.U):
            raise fail("SPDComponents", "U", f"the paths of V {sorted(self.V)}", sorted(self.U))

    def site_factors(self, site: str) -> tuple[Array, Array]:
        """``(V, U)`` as used at ``site``: a transposed site uses ``(U^T, V^T)``."""
        path = site.removesuffix(TRANSPOSED)
        V, U = self.V[path], self.U[path]
        return (U.T, V.T) if site.endswith(TRANSPOSED) else (V, U)


class SPDWeight(eqx.Module):
    """A decomposed weight at its (up to two) sites.

    ``a @ w`` is ``where(route, ((a @ V) * mask) @ U + m_delta (a @ Delta), a @ W)`` with
    ``Delta = W - V @ U`` (the delta term only when ``delta_mask`` is set); ``w.T`` swaps to
    the transposed site's mask, delta mask and route; ``w[idx]`` is ``one_hot(idx) @ w``
    (an embedding lookup).

    When the site's input is known to be the target's (``inner`` given: the first masked
    site of a pass, whose input no masked site can have changed), the pass reuses the
    target's ``h = a @ V`` and ``a @ W``: ``((h * (mask - m_delta)) @ U + m_delta (a @ W)``,
    one ``(C, d_out)`` product per example and no ``(d_in, C)`` one. The gradient of ``V``
    then flows through the shared ``h``, so every pass adds to ONE ``a^T dh`` product.

    Attributes:
        V, U, W: ``(d_in, C)``, ``(C, d_out)`` and the frozen ``(d_in, d_out)`` target.
        mask, mask_T: ``([P,] C)`` masks of the site and of its transposed use (None: the
            target weight is used).
        route, route_T: scalar or ``([P,])`` bool; where False, the target weight.
        delta_mask, delta_mask_T: ``([P,])`` multipliers of the delta component (None: no
            delta component).
        inner, inner_T: ``([P,] C)`` the target's ``a @ V`` at the site, or None (computed
            from ``a``).
        target_out, target_out_T: ``([P,] d_out)`` the target's ``a @ W`` at the site, used
            in place of ``a @ W`` (an unmasked site returns it whatever its input), or None.
    """

    V: Array
    U: Array
    W: Array
    mask: Array | None
    mask_T: Array | None
    route: Array | None
    route_T: Array | None
    delta_mask: Array | None = None
    delta_mask_T: Array | None = None
    inner: Array | None = None
    inner_T: Array | None = None
    target_out: Array | None = None
    target_out_T: Array | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W.shape)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> Any:
        return self.W.dtype

    @property
    def T(self) -> SPDWeight:  # noqa: N802
        return SPDWeight(self.U.T, self.V.T, self.W.T, self.mask_T, self.mask, self.route_T,
                         self.route, self.delta_mask_T, self.delta_mask, self.inner_T,
                         self.inner, self.target_out_T, self.target_out)

    def __rmatmul__(self, a: Array) -> Array:
        if self.mask is None:
            return a @ self.W if self.target_out is None else self.target_out
        if self.inner is None:
            h, full = a @ self.V, None
        else:
            h, full = self.inner, self.target_out
        if self.delta_mask is None:
            masked = (h * self.mask) @ self.U
        elif full is None:
            masked = ((h * self.mask) @ self.U
                      + self.delta_mask[..., None] * (a @ (self.W - self.V @ self.U)))
        else:  # a @ Delta = a @ W - h @ U, folded into the one product with U
            d = self.delta_mask[..., None]
            masked = (h * (self.mask - d)) @ self.U + d * full
        if self.route is None:
            return masked
        route = self.route if jnp.ndim(self.route) == 0 else self.route[..., None]
        return jnp.where(route, masked, a @ self.W if full is None else full)

    def __getitem__(self, idx: Any) -> Array:
        """Embedding lookup ``W[idx]``, decomposed as ``one_hot(idx) @ W``."""
        return self.__rmatmul__(one_hot_rows("SPDWeight", idx, self.W.shape[0], self.W.dtype))


def spd_forward_sites(apply: Callable, params: PyTree, sites: Sites, comps: SPDComponents,
                      x: Any, masks: dict[str, Array], routes: dict[str, Array] | None = None,
                      delta_masks: dict[str, Array] | None = None,
                      reuse: dict[str, tuple[Array, Array]] | None = None
                      ) -> tuple[Any, dict[str, tuple[Array, Array]]]:
    """:func:`spd_forward` and the per-site ``(input, output)`` cache of the masked pass.

    Args:
        reuse: ``{site: (h, out)}``, the target's inner activations ``a @ V`` and output
            ``a @ W`` at sites whose input in this pass is the target's (see
            :func:`first_masked_site`); the pass uses them instead of recomputing.
    """
    reuse = reuse or {}
    weights = {}
    for path in sites.paths:
        W = tree.get(params, path)
        pt = path + TRANSPOSED
        m, mt = masks.get(path), masks.get(pt)
        r = rt = d = dt = None
        if routes is not None:
            r, rt = routes.get(path), routes.get(pt)
        if delta_masks is not None:
            d, dt = delta_masks.get(path), delta_masks.get(pt)
        h, out = reuse.get(path, (None, None))
        h_t, out_t = reuse.get(pt, (None, None))
        weights[path] = SPDWeight(comps.V[path], comps.U[path], W, m, mt, r, rt, d, dt,
                                  h, h_t, out, out_t)
    return forward_sites(apply, params, x, sites.paths, weights=weights)


def first_masked_site(sites: Sites, masked: Any) -> str | None:
    """The first site of ``masked`` in use order, or None. Its input in a pass that masks
    only ``masked`` is the target's: an input is computed before the weight that reads
    it, so no masked site's output can reach it."""
    return next((s for s in sites.names if s in masked), None)


def spd_forward(apply: Callable, params: PyTree, sites: Sites, comps: SPDComponents, x: Any,
                masks: dict[str, Array], routes: dict[str, Array] | None = None,
                delta_masks: dict[str, Array] | None = None) -> Any:
    """Output of ONE example with every site in ``masks`` masked (and, when ``routes`` is
    given, only where its route flag is set; elsewhere the frozen target weight).

    Args:
        masks: ``{site: ([P,] C)}``.
        routes: ``{site: bool}``, scalar or ``([P,])``.
        delta_masks: ``{site: ([P,])}`` multipliers of the delta component ``W - V U`` of
            every masked site (None: no delta component).
    """
    return spd_forward_sites(apply, params, sites, comps, x, masks, routes, delta_masks)[0]


def resolve_C(fn: str, C: int | Mapping[str, int], paths: Sequence[str]) -> dict[str, int]:  # noqa: N802, N803
    """``{path: C}`` from one int or from ``{rule: C}``. A rule is an exact keypath or a
    glob where ``*`` matches any run of characters and ``?`` one character (brackets and
    dots are literal, as in :mod:`jaxinterp.tree`: ``.layers[*].mlp_in``).

    Raises:
        ValueError: if a C is not a positive integer, or a path matches no rule or several.
    """
    if not isinstance(C, Mapping):
        check_positive(fn, "C", C, integer=True)
        return {p: int(C) for p in paths}

    def matches(rule: str, path: str) -> bool:
        if any(ch in rule for ch in "*?"):
            return tree._glob_regex(rule).fullmatch(path) is not None
        return tree.parse_path(rule) == tree.parse_path(path)

    out = {}
    for path in paths:
        hits = [rule for rule in C if matches(rule, path)]
        if len(hits) != 1:
            raise fail(fn, "C", f"to have exactly one rule matching the path {path!r}",
                       f"{len(hits)} matching rules {hits} among {list(C)}")
        check_positive(fn, f"C[{hits[0]!r}]", C[hits[0]], integer=True)
        out[path] = int(C[hits[0]])
    return out


def init_ci(ci_fn: str, C: int, d_in: int, hidden: int, *, key: Key) -> CIFunction:  # noqa: N803
    """A CI function with Kaiming-normal weights (ReLU gain, std ``sqrt(2 / fan_in)``, on
    the hidden layer; gain 1, std ``1 / sqrt(H)``, on the output) and zero biases. The
    scalar MLPs have fan-in 1, so ``w_in ~ N(0, 2)``: the paper's init."""
    check_in("init_ci", "ci_fn", ci_fn, CI_FNS)
    k1, k2 = jax.random.split(key)
    if ci_fn == "mlp":
        return CIParams(math.sqrt(2.0) * jax.random.normal(k1, (C, hidden)),
                        jnp.zeros((C, hidden)),
                        jax.random.normal(k2, (C, hidden)) / math.sqrt(hidden),
                        jnp.zeros((C,)))
    std_in = math.sqrt(2.0 / d_in)
    if ci_fn == "vector_mlp":
        return VectorCIParams(std_in * jax.random.normal(k1, (C, d_in, hidden)),
                              jnp.zeros((C, hidden)),
                              jax.random.normal(k2, (C, hidden)) / math.sqrt(hidden),
                              jnp.zeros((C,)))
    return SharedCIParams(std_in * jax.random.normal(k1, (d_in, hidden)), jnp.zeros((hidden,)),
                          jax.random.normal(k2, (hidden, C)) / math.sqrt(hidden),
                          jnp.zeros((C,)))


def init_spd(params: PyTree, sites: Sites, C: int | Mapping[str, int], hidden: int, *,  # noqa: N803
             init: str = "projection", ci_fn: str = "mlp", key: Key) -> SPDComponents:
    """Initial subcomponents and CI functions.

    ``init="projection"`` (paper): unit-norm V columns and U rows, then
    ``U[c] *= V[:, c]^T W U[c]^T`` (each subcomponent starts as its projection onto W).
    ``init="normal"`` (``main`` recipe): ``V ~ N(0, 1/d_in)``, ``U ~ N(0, 1/C)``; follow it
    with :func:`faithfulness_warmup`. CI functions: :func:`init_ci` (for the scalar MLPs
    ``w_in ~ N(0, 2)``, ``w_out ~ N(0, 1/H)``, biases 0).

    Args:
        C: subcomponents per matrix: one int or ``{rule: C}`` (see :func:`resolve_C`).
        hidden: CI MLP width H.
        init: ``"projection"`` or ``"normal"``.
        ci_fn: ``"mlp"`` (a scalar MLP per subcomponent on ``h = a V``), ``"vector_mlp"``
            (an ``a -> H -> 1`` MLP per subcomponent) or ``"shared_mlp"`` (``a -> H -> C``).

    Raises:
        ValueError: bad ``hidden``, ``C``, ``init`` or ``ci_fn``.
    """
    check_positive("init_spd", "hidden", hidden, integer=True)
    check_in("init_spd", "init", init, INITS)
    check_in("init_spd", "ci_fn", ci_fn, CI_FNS)
    cs = resolve_C("init_spd", C, sites.paths)
    V, U, ci = {}, {}, {}
    for i, path in enumerate(sites.paths):
        c = cs[path]
        W = tree.get(params, path)
        kv, ku = jax.random.split(jax.random.fold_in(key, i))
        if init == "normal":
            V[path] = jax.random.normal(kv, (W.shape[0], c)) / math.sqrt(W.shape[0])
            U[path] = jax.random.normal(ku, (c, W.shape[1])) / math.sqrt(c)
            continue
        v = jax.random.normal(kv, (W.shape[0], c))
        v = v / jnp.linalg.norm(v, axis=0, keepdims=True)
        u = jax.random.normal(ku, (c, W.shape[1]))
        u = u / jnp.linalg.norm(u, axis=1, keepdims=True)
        kappa = jnp.einsum("ic,io,co->c", v, W, u)
        V[path], U[path] = v, u * kappa[:, None]
    factors = SPDComponents(V, U, {})
    for j, site in enumerate(sites.names):
        v_site, _ = factors.site_factors(site)
        ci[site] = init_ci(ci_fn, v_site.shape[1], v_site.shape[0], hidden,
                           key=jax.random.fold_in(key, 1000 + j))
    return SPDComponents(V, U, ci)


def inner_acts(comps: SPDComponents, inputs: dict[str, Array]) -> dict[str, Array]:
    """``h = a @ V: (..., C)`` per site from the site inputs ``a: (..., d_in)``."""
    return {site: a @ comps.site_factors(site)[0] for site, a in inputs.items()}


def causal_importances(comps: SPDComponents, inputs: dict[str, Array], *,
                       gated: bool = False, inner: dict[str, Array] | None = None
                       ) -> tuple[dict[str, Array], dict[str, Array]]:
    """``(g, g+)`` per site from the target's site inputs ``a: (..., d_in)``. The scalar
    MLPs read ``h = a @ V``, NOT detached: the CI gradient trains V; the vector / shared
    MLPs read ``a``.

    Args:
        inner: the sites' ``a @ V`` when already computed (:func:`inner_acts`).
    """
    lower = gated_lower_leaky_hard_sigmoid if gated else lower_leaky_hard_sigmoid
    g, g_up = {}, {}
    for site, a in inputs.items():
        ci = comps.ci[site]
        h = None
        if isinstance(ci, CIParams):
            h = inner[site] if inner is not None else a @ comps.site_factors(site)[0]
        z = _ci_logits(ci, a, h)
        g[site], g_up[site] = lower(z), upper_leaky_hard_sigmoid(z)
    return g, g_up


