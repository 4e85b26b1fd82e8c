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
    rounding), and much faster on CPU: this MLP is the largest cost of an SPD step on the
    toys. The hidden tensor is laid out ``(C, n, H)`` so every contraction is a batched dot
    with a leading batch axis; ``erf`` replaces ``jax.nn.gelu``'s ``erfc`` (4x cheaper on
    CPU), and GELU and GELU' share one ``erf`` and one ``exp``.

    **Rows of ``h`` that are all zero are not run through the MLP**: their output is the
    one vector ``z(0)`` and their gradients follow from sums of ``dz`` (``dw_in`` gets
    nothing from them, ``db_in`` and ``dw_out`` get ``sum dz`` times ``w_out GELU'(b_in)``
    and ``GELU(b_in)``, ``dh = dz * sum_k w_out w_in GELU'(b_in)``). Sparse-feature toys
    have many such rows (an example with no active feature: 77 % of tms-5-2's, 13 % of
    tms-40-10's, 37 % of resid-mlp-1's). The other rows are moved to the front (a stable
    compaction, no sort) and run in chunks of :func:`_chunk_rows` rows by a
    ``lax.while_loop`` that stops after the last chunk holding one; the backward pass
    recomputes GELU and GELU' per chunk. Under ``vmap`` (seeds) the loop runs as many
    chunks as the densest member needs. Inputs of at most one chunk of rows are computed
    whole, with GELU and GELU' kept for the backward pass.
    """
    return _scalar_mlps_fwd(h, w_in, b_in, w_out, b_out)[0]


# At most this many entries in one (C, n, H) hidden chunk (4 MB: 2^21 was 13 % slower at
# resid-mlp-2's C = 400, H = 16 and 19 % at resid-mlp-3's C = 500, H = 128; the TMS and
# resid-mlp-1 sizes get 256 rows either way) ...
_CHUNK_FLOATS = 1 << 20
_CHUNK_ROWS = 256  # ... and rows (measured best at tms-5-2, tms-40-10, resid-mlp-1)


def _chunk_rows(C: int, H: int) -> int:
    """Rows per chunk: a power of two, at most :data:`_CHUNK_ROWS`, within
    :data:`_CHUNK_FLOATS` hidden entries where possible (at least 8 rows)."""
    fit = max(1, _CHUNK_FLOATS // (C * H))
    return max(min(8, _CHUNK_ROWS), min(_CHUNK_ROWS, 1 << (fit.bit_length() - 1)))


def _hidden(hc: Array, w_in: Array, b_in: Array) -> tuple[Array, Array]:
    """GELU and GELU' ``(C, n, H)`` of the pre-activations of rows ``hc: (C, n)``."""
    return _gelu_parts(hc[..., None] * w_in[:, None, :] + b_in[:, None, :])


def _mlp_grads(hc, dc, gelu, dgelu, w_in, w_out):
    """``(dh, d_w_in, d_b_in, d_w_out)`` of rows ``hc, dc: (C, n)`` with their GELU and
    GELU' ``(C, n, H)``."""
    dpre = dc[..., None] * w_out[:, None, :] * dgelu
    return (jnp.einsum("cnk,ck->cn", dpre, w_in), jnp.einsum("cn,cnk->ck", hc, dpre),
            jnp.sum(dpre, axis=1), jnp.einsum("cn,cnk->ck", dc, gelu))


def _to_chunks(a: Array, order: Array, m: int, n: int) -> Array:
    """Rows ``a: (N, C)`` taken in ``order`` as ``(m, C, n)`` chunks (zero-padded)."""
    N, C = a.shape
    return jnp.pad(a[order].T, ((0, 0), (0, m * n - N))).reshape(C, m, n).transpose(1, 0, 2)


def _from_chunks(a: Array, pos: Array) -> Array:
    """Inverse of :func:`_to_chunks`: ``(m, C, n) -> (N, C)``, row ``r`` from ``pos[r]``."""
    m, C, n = a.shape
    return a.transpose(1, 0, 2).reshape(C, m * n).T[pos]


def _scalar_mlps_fwd(h, w_in, b_in, w_out, b_out):
    C, H = w_in.shape
    hf = h.reshape(-1, C)
    N, n = hf.shape[0], _chunk_rows(C, H)
    if N <= n:  # one chunk: computed whole, GELU and GELU' kept
        g, dg = _hidden(hf.T, w_in, b_in)
        z = jnp.einsum("cnk,ck->cn", g, w_out).T + b_out[None, :]
        return z.reshape(h.shape), (h, w_in, b_in, w_out, (g, dg))
    live = jnp.any(hf != 0, axis=1)
    n_live = jnp.sum(live, dtype=jnp.int32)
    # stable compaction: live rows first, then the zero rows, each in their own order
    pos = jnp.where(live, jnp.cumsum(live, dtype=jnp.int32) - 1,
                    n_live + jnp.cumsum(~live, dtype=jnp.int32) - 1)
    order = jnp.zeros(N, jnp.int32).at[pos].set(jnp.arange(N, dtype=jnp.int32))
    m = -(-N // n)
    n_run = -(-n_live // n)  # chunks holding a live row
    hs = _to_chunks(hf, order, m, n)
    z0 = jnp.einsum("ck,ck->c", _gelu_parts(b_in)[0], w_out)

    def body(carry):
        i, zs = carry
        zi = jnp.einsum("cnk,ck->cn", _hidden(hs[i], w_in, b_in)[0], w_out)
        return i + 1, jax.lax.dynamic_update_index_in_dim(zs, zi, i, 0)

    zs = jnp.broadcast_to(z0[None, :, None], (m, C, n))
    _, zs = jax.lax.while_loop(lambda c: c[0] < n_run, body, (jnp.int32(0), zs))
    z = _from_chunks(zs, pos) + b_out[None, :]
    return z.reshape(h.shape), (h, w_in, b_in, w_out, (hs, order, pos, n_run))


def _scalar_mlps_bwd(res, dz):
    h, w_in, b_in, w_out, saved = res
    C, H = w_in.shape
    dzf = dz.reshape(-1, C)
    d_bout = jnp.sum(dzf, axis=0)
    if len(saved) == 2:  # computed whole
        dh, d_win, d_bin, d_wout = _mlp_grads(h.reshape(-1, C).T, dzf.T, *saved, w_in, w_out)
        return dh.T.reshape(h.shape), d_win, d_bin, d_wout, d_bout
    hs, order, pos, n_run = saved
    m, _, n = hs.shape
    ds = _to_chunks(dzf, order, m, n)
    # the chunks the loop skips hold only zero rows: pre-activation b_in
    g0, dg0 = _gelu_parts(b_in)
    skipped = jnp.sum(jnp.where(jnp.arange(m)[:, None, None] >= n_run, ds, 0.0), axis=(0, 2))
    acc = (jnp.zeros_like(w_in), skipped[:, None] * w_out * dg0, skipped[:, None] * g0)
    dhs = ds * jnp.einsum("ck,ck,ck->c", w_out, dg0, w_in)[None, :, None]

    def body(carry):
        i, acc, dhs = carry
        dh, *grads = _mlp_grads(hs[i], ds[i], *_hidden(hs[i], w_in, b_in), w_in, w_out)
        acc = tuple(a + g for a, g in zip(acc, grads, strict=True))
        return i + 1, acc, jax.lax.dynamic_update_index_in_dim(dhs, dh, i, 0)

    _, (d_win, d_bin, d_wout), dhs = jax.lax.while_loop(
        lambda c: c[0] < n_run, body, (jnp.int32(0), acc, dhs))
    return _from_chunks(dhs, pos).reshape(h.shape), d_win, d_bin, d_wout, d_bout


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


