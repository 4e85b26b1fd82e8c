"""The gradient Grams ``M'`` (and ``Lambda'``) that LIB diagonalises, in float64.

For a node layer ``y: (P, d)`` and next-layer features ``F(y): (P', m')``:

* ``jacobian``: ``M'_jk = (1/(N P)) sum_{b,t,i,s} J[b,t,i,s,j] J[b,t,i,s,k]`` with
  ``J = dF/dy``.

  - Exact (the default), with ``directions = U`` accumulating ``U M' U^T`` directly (LIB
    passes ``R^+`` and gets the whitened ``M``), by the first of:

    1. a section that is one position-wise hidden layer
       (:class:`~.sections.HiddenLayerFactors`, e.g. the MLPs): ``M'`` from the first and
       second moments of the hidden layer's slopes (:func:`hidden_layer_gram`), with no
       per-example Jacobian;
    2. with few positions (``P <= DENSE_MAX_POSITIONS``), a section with a
       :class:`~.sections.StructuredJacobian` (e.g. attention): ``M'`` from ``R x R`` and
       low-rank sums over the data;
    3. with few positions, each example's Jacobian along the directions, built densely
       by forward mode (:mod:`.dense`; the directions are example-independent tangents,
       so the section's first linear map is applied once), and one matrix product over
       ``(examples x positions x outputs)`` rows per chunk, added to a float64
       accumulator inside ``lax.scan``. A linear section's Jacobian is found to be
       example-independent and costs one evaluation.
  - Stochastic sources, or many positions: ``jax.vjp`` runs the batched forward pass
    once per chunk and the pullback is vmapped over chunks of cotangents (one-hot, or
    random signs); each chunk's ``sum g^T g`` is added inside ``lax.scan``.
* ``(1-0)*alpha`` and ``(1-alpha)^2``: one integrated gradient ``g: (P, d)`` per example,
  ``M' = E[g^T g]`` and ``Lambda'_jk = E[g_j f_k]``, with the quadrature points vmapped.

References:
    Bushnaq et al. (2024), "The Local Interaction Basis" (arXiv 2405.10928), the
    Jacobian Gram ``M'``, integrated-gradient variants and stochastic sources.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_positive, fail
from .._types import Array, Key
from .dense import (
    DENSE_MAX_POSITIONS,
    dense_chunk,
    directional_jacobian,
    example_independent,
    structured_jacobians,
)
from .quadrature import Quadrature
from .sections import ACTIVATIONS, HiddenLayerFactors
from .stats import chunked_sum, einsum64

__all__ = ["IG_FORMULAS", "hidden_layer_gram", "ig_grams", "jacobian_gram"]

IG_FORMULAS = ("(1-0)*alpha", "(1-alpha)^2")


def _rademacher(key: Key, shape: tuple[int, ...]) -> Array:
    return jax.random.rademacher(key, shape, dtype=jnp.float64)


def jacobian_gram(
    F: Callable[[Array], Array],
    ys: Array,
    *,
    chunk_size: int = 256,
    cotangent_chunk_size: int = 32,
    sources: tuple[int | None, int | None] | None = None,
    directions: Array | np.ndarray | None = None,
    key: Key | None = None,
) -> np.ndarray:
    """``M' = E[J^T J]`` over examples and input positions (float64, numpy result).

    x64 is enabled locally and ``ys`` is cast to float64.

    Args:
        F: next-layer features of ONE example, ``(P, d) -> (P', m')``.
        ys: node-layer activations, ``(N, P, d)``.
        chunk_size: examples per chunk (an upper bound: the exact dense path uses
            smaller chunks when one example's Jacobian is large).
        cotangent_chunk_size: cotangents pulled back together (vmapped) on the VJP path
            (stochastic sources, or more than ``DENSE_MAX_POSITIONS`` positions).
        sources: ``(r_p, r_h)``: replace one-hot cotangents over output positions
            and/or output directions by ``r`` random-sign vectors (``None``: exact),
            drawn per example and chunk; ``M'`` is divided by the number of draws.
        directions: ``U: (k, d)``; return ``U M' U^T`` (``None``: the identity).
        key: required with stochastic sources.

    Returns:
        ``M'`` of shape ``(d, d)``, or ``U M' U^T`` of shape ``(k, k)``.

    Raises:
        ValueError: if ``F`` does not map ``(P, d)`` to a rank-2 array, chunk sizes are
            not positive, ``sources`` is malformed, or a stochastic run has no ``key``.
    """
    fn = "jacobian_gram"
    check_positive(fn, "chunk_size", chunk_size, integer=True)
    check_positive(fn, "cotangent_chunk_size", cotangent_chunk_size, integer=True)
    n, p, d = ys.shape
    out = jax.eval_shape(F, jax.ShapeDtypeStruct((p, d), ys.dtype))
    if len(out.shape) != 2:
        raise fail(fn, "F(y)", "of shape (P', m')", out.shape)
    r_p, r_h = sources if sources is not None else (None, None)
    for name, r in (("sources[0]", r_p), ("sources[1]", r_h)):
        if r is not None:
            check_positive(fn, name, r, integer=True)
    if (r_p or r_h) and key is None:
        raise fail(fn, "key", "a PRNG key for stochastic sources", None)
    if directions is not None and (np.ndim(directions) != 2 or np.shape(directions)[1] != d):
        raise fail(fn, "directions", f"of shape (k, d={d})", np.shape(directions))
    scale = float((r_p or 1) * (r_h or 1))
    with jax.enable_x64(True):
        ys = jnp.asarray(ys, jnp.float64)
        u = jnp.eye(d) if directions is None else jnp.asarray(directions, jnp.float64)
        factors = None if r_p or r_h else _hidden_layer_factors(F)
        if factors is not None:
            return hidden_layer_gram(factors, ys, u, chunk_size=chunk_size)
        if r_p or r_h or p > DENSE_MAX_POSITIONS:
            total = _jacobian_gram_sum(
                F, ys, key, int(chunk_size), int(cotangent_chunk_size), r_p, r_h
            )
            total = np.asarray(total, np.float64)
            if directions is not None:
                uu = np.asarray(directions, np.float64)
                total = uu @ total @ uu.T
        else:
            entries = p * u.shape[0] * out.shape[0] * out.shape[1]
            total = _dense_gram(F, ys, u, dense_chunk(chunk_size, entries, n))
            total = np.asarray(total, np.float64)
    m = total / (n * p * scale)
    return (m + m.T) / 2


def _hidden_layer_factors(F: Callable[[Array], Array]) -> HiddenLayerFactors | None:
    """``F.hidden_layer_factors(float64)`` if ``F`` has it (``NextFeatures`` does)."""
    method = getattr(F, "hidden_layer_factors", None)
    return None if method is None else method(jnp.float64)


@eqx.filter_jit
def _dense_gram(F: Callable[[Array], Array], ys: Array, u: Array, chunk_size: int) -> Array:
    """``sum_{b,s} (U J_bs)(U J_bs)^T``, ``(k, k)``, from dense forward-mode Jacobians."""
    k = u.shape[0]
    if structured_jacobians(F, ys[:1]) is not None:
        return _structured_gram(F, ys, u, chunk_size)
    if example_independent(F, ys[:1], u):  # e.g. a linear section: evaluate it once
        jac, _ = directional_jacobian(F, ys[:1], u)
        flat = jnp.moveaxis(jac, 1, 0).reshape(k, -1)
        return ys.shape[0] * einsum64("ar,cr->ac", flat, flat)

    def per_chunk(y: Array, mask: Array, idx: Array) -> Array:
        jac, _ = directional_jacobian(F, y, u)  # (b, P, k, P', m')
        flat = jnp.moveaxis(jac * mask[:, None, None, None, None], 2, 0).reshape(k, -1)
        return einsum64("ar,cr->ac", flat, flat)

    return chunked_sum(per_chunk, ys, chunk_size=chunk_size)


def _structured_gram(F: Callable[[Array], Array], ys: Array, u: Array, chunk_size: int) -> Array:
    """``sum_{b,s} (U J_bs)(U J_bs)^T`` for ``J_bs = sum_r c_bsr K_r + sum_q g_bsq u_bq^T``
    (:class:`~.sections.StructuredJacobian`): with ``K^U_r = U K_r`` and ``g^U = U g``,

        sum_{r,t} (sum c_r c_t) K^U_r K^U_t^T + sum_r K^U_r T_r + (.)^T + sum g^U (u^T u) g^U^T,
        T_r = sum_{b,s,q} c_bsr u_bq g^U_bsq^T,

    so the data enter through ``R x R``, ``R x X x k`` and ``k x k`` sums, never through a
    per-example ``k x X`` Jacobian."""

    def per_chunk(y: Array, mask: Array, idx: Array) -> tuple[Array, Array, Array]:
        sj = structured_jacobians(F, y)
        assert sj is not None
        coef = sj.coef * mask[:, None, None]
        g = einsum64("bsqi,ki->bsqk", sj.g, u)
        cc = einsum64("bsr,bst->rt", coef, sj.coef)
        t = einsum64("bqx,brqk->rxk", sj.u, einsum64("bsr,bsqk->brqk", coef, g))
        gram_u = einsum64("bqx,bpx->bqp", sj.u, sj.u)
        gg = einsum64("bsqk,bqp,bspj->kj", g * mask[:, None, None, None], gram_u, g)
        return cc, t, gg

    cc, t, gg = chunked_sum(per_chunk, ys, chunk_size=chunk_size)
    sj = structured_jacobians(F, ys[:1])
    assert sj is not None
    k_u = einsum64("ki,rix->rkx", u, sj.K)
    cross = einsum64("rkx,rxj->kj", k_u, t)
    return einsum64("rt,rkx,tjx->kj", cc, k_u, k_u) + cross + cross.T + gg


@eqx.filter_jit
def _jacobian_gram_sum(
    F: Callable[[Array], Array],
    ys: Array,
    key: Key | None,
    chunk_size: int,
    cotangent_chunk_size: int,
    r_p: int | None,
    r_h: int | None,
) -> Array:
    """``sum J^T J`` over examples, output entries (or sources) and input positions."""
    d = ys.shape[-1]
    p_out, m_out = jax.eval_shape(F, ys[0]).shape
    n_pos, n_hid = (r_p or p_out), (r_h or m_out)
    n_cot = n_pos * n_hid
    cc = min(cotangent_chunk_size, n_cot)
    n_cc = -(-n_cot // cc)

    def per_chunk(y: Array, mask: Array, idx: Array) -> Array:
        b = y.shape[0]
        _, pull = jax.vjp(jax.vmap(F), y)
        keys = jax.random.split(jax.random.fold_in(key, idx)) if key is not None else None
        pos = (
            _rademacher(keys[0], (r_p, b, p_out))
            if r_p and keys is not None
            else jnp.eye(p_out)[:, None, :]
        )  # (n_pos, b or 1, P')
        hid = (
            _rademacher(keys[1], (r_h, b, m_out))
            if r_h and keys is not None
            else jnp.eye(m_out)[:, None, :]
        )  # (n_hid, b or 1, m')

        def body(acc: Array, k: Array) -> tuple[Array, None]:
            flat = k * cc + jnp.arange(cc)
            valid = (flat < n_cot).astype(jnp.float64)
            flat = jnp.minimum(flat, n_cot - 1)
            u = pos[flat // n_hid][..., :, None] * hid[flat % n_hid][..., None, :]
            u = jnp.broadcast_to(u, (cc, b, p_out, m_out)) * valid[:, None, None, None]
            g = jax.vmap(lambda uu: pull(uu)[0])(u) * mask[None, :, None, None]
            return acc + einsum64("cbsj,cbsk->jk", g, g), None

        acc, _ = jax.lax.scan(body, jnp.zeros((d, d), jnp.float64), jnp.arange(n_cc))
        return acc

    return chunked_sum(per_chunk, ys, chunk_size=chunk_size)


def hidden_layer_gram(
    factors: HiddenLayerFactors, ys: Array, directions: Array | np.ndarray, *, chunk_size: int = 256
) -> np.ndarray:
    """``U M' U^T`` of :func:`jacobian_gram` for a section that is one position-wise hidden
    layer (float64, numpy result), without per-example Jacobians.

    With ``J_bs = E + A diag(g_bs) B`` (``g = act'(y_bs A)``), ``K = U E`` and ``L = U A``:

        sum_{b,s} U J_bs J_bs^T U^T = n K K^T + L diag(sigma) B K^T + (.)^T
                                      + L ((B B^T) * D) L^T,

    with ``n = N P``, ``sigma = sum g_bs`` and ``D = sum g_bs g_bs^T``: the data enter only
    through the hidden layer's first and second moments of ``g``.

    Args:
        factors: the section's :class:`~.sections.HiddenLayerFactors` (``F = S C``).
        ys: node-layer activations, ``(N, P, d)``.
        directions: ``U: (k, d)``.
        chunk_size: examples per chunk of the moment accumulation.

    Returns:
        ``U M' U^T``, ``(k, k)``.
    """
    check_positive("hidden_layer_gram", "chunk_size", chunk_size, integer=True)
    n, p, _ = ys.shape
    with jax.enable_x64(True):
        total = _hidden_layer_gram(
            factors,
            jnp.asarray(ys, jnp.float64),
            jnp.asarray(directions, jnp.float64),
            min(int(chunk_size), n),
        )
        m = np.asarray(total, np.float64) / (n * p)
    return (m + m.T) / 2


@eqx.filter_jit
def _hidden_layer_gram(fac: HiddenLayerFactors, ys: Array, u: Array, chunk_size: int) -> Array:
    d = ys.shape[-1]
    slope = jax.vmap(jax.grad(ACTIVATIONS[fac.activation]))  # act', JAX's convention at kinks

    def per_chunk(y: Array, mask: Array, idx: Array) -> tuple[Array, Array]:
        pre = y.reshape(-1, d) @ fac.A
        g = slope(pre.ravel()).reshape(pre.shape) * jnp.repeat(mask, y.shape[1])[:, None]
        return g.sum(0), einsum64("rh,rg->hg", g, g)

    sigma, second = chunked_sum(per_chunk, ys, chunk_size=chunk_size)
    k, a = u @ fac.E, u @ fac.A  # (k, m), (k, n_hidden)
    cross = einsum64("kh,h,hm,jm->kj", a, sigma, fac.B, k)
    inner = einsum64("hm,gm->hg", fac.B, fac.B) * second
    n_rows = ys.shape[0] * ys.shape[1]
    return n_rows * einsum64("km,jm->kj", k, k) + cross + cross.T + a @ inner @ a.T


def ig_grams(
    F: Callable[[Array], Array],
    ys: Array,
    quad: Quadrature,
    formula: str,
    *,
    chunk_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """``M' = E[g^T g]`` and ``Lambda' = E[g^T f]`` for an integrated gradient ``g``.

    * ``(1-0)*alpha``: ``g = sum_q w_q d/dy <F(y), F(f)>`` at ``y = alpha_q f`` (the
      second factor held constant);
    * ``(1-alpha)^2``: ``g = -sum_q w_q d/dy ||F(f) - F(y)||^2`` at ``y = alpha_q f``.

    x64 is enabled locally and ``ys`` is cast to float64.

    Args:
        F: next-layer features of ONE example, ``(P, d) -> (P', m')``.
        ys: activations ``f``, ``(N, P, d)``.
        quad: the quadrature rule.
        formula: one of :data:`IG_FORMULAS`.
        chunk_size: examples per chunk.

    Returns:
        ``(M', Lambda')``, each ``(d, d)`` numpy float64 (``Lambda'[j, k] = E[g_j f_k]``).

    Raises:
        ValueError: on an unknown formula, or ``(1-alpha)^2`` with the gradient rule
            (its gradient vanishes at ``alpha = 1``).
    """
    fn = "ig_grams"
    if formula not in IG_FORMULAS:
        raise fail(fn, "formula", "one of " + ", ".join(map(repr, IG_FORMULAS)), repr(formula))
    if formula == "(1-alpha)^2" and quad.is_gradient:
        raise fail(
            fn,
            "rule",
            "an integrating rule (trapezoidal or gauss_legendre) for '(1-alpha)^2'",
            "the gradient rule",
            "Its gradient is 0 at alpha = 1.",
        )
    check_positive(fn, "chunk_size", chunk_size, integer=True)
    n, p, d = ys.shape
    with jax.enable_x64(True):
        alphas = jnp.asarray(quad.alphas, jnp.float64)
        weights = jnp.asarray(quad.weights, jnp.float64)
        ys = jnp.asarray(ys, jnp.float64)
        m, lam = _ig_sums(F, ys, alphas, weights, formula, int(chunk_size))
        m, lam = np.asarray(m, np.float64) / (n * p), np.asarray(lam, np.float64) / (n * p)
    return (m + m.T) / 2, lam


@eqx.filter_jit
def _ig_sums(
    F: Callable[[Array], Array],
    ys: Array,
    alphas: Array,
    weights: Array,
    formula: str,
    chunk_size: int,
) -> tuple[Array, Array]:
    """``(sum g^T g, sum g^T f)`` over examples and input positions."""
    batched = jax.vmap(F)

    def per_chunk(y: Array, mask: Array, idx: Array) -> tuple[Array, Array]:
        target = jax.lax.stop_gradient(batched(y))

        def objective(yy: Array) -> Array:
            fy = batched(yy)
            if formula == "(1-0)*alpha":
                return jnp.sum(fy * target)
            return -jnp.sum((target - fy) ** 2)

        grads = jax.vmap(lambda a: jax.grad(objective)(a * y))(alphas)  # (Q, b, P, d)
        g = jnp.tensordot(weights, grads, axes=1) * mask[:, None, None]
        return einsum64("bsj,bsk->jk", g, g), einsum64("bsj,bsk->jk", g, y * mask[:, None, None])

    return chunked_sum(per_chunk, ys, chunk_size=chunk_size)
