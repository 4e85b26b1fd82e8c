"""The gradient Grams ``M'`` (and ``Lambda'``) that LIB diagonalises, in float64.

For a node layer ``y: (P, d)`` and next-layer features ``F(y): (P', m')``:

* ``jacobian``: ``M'_jk = (1/(N P)) sum_{b,t,i,s} J[b,t,i,s,j] J[b,t,i,s,k]`` with
  ``J = dF/dy``. Per data chunk, ``jax.vjp`` runs the batched forward pass once and the
  pullback is vmapped over chunks of cotangents (one-hot, or random signs for
  *stochastic sources*); each chunk's ``sum g^T g`` is added to a float64 accumulator
  inside ``lax.scan``. (``lax.map(..., batch_size=)`` would stack one ``(d, d)`` matrix
  per cotangent before summing; the scan keeps one accumulator.)
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
from .quadrature import Quadrature
from .stats import chunked_sum, einsum64

__all__ = ["IG_FORMULAS", "ig_grams", "jacobian_gram"]

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
    key: Key | None = None,
) -> np.ndarray:
    """``M' = E[J^T J]`` over examples and input positions (float64, numpy result).

    x64 is enabled locally and ``ys`` is cast to float64.

    Args:
        F: next-layer features of ONE example, ``(P, d) -> (P', m')``.
        ys: node-layer activations, ``(N, P, d)``.
        chunk_size: examples per chunk (one batched forward + pullback each).
        cotangent_chunk_size: cotangents pulled back together (vmapped).
        sources: ``(r_p, r_h)``: replace one-hot cotangents over output positions
            and/or output directions by ``r`` random-sign vectors (``None``: exact),
            drawn per example and chunk; ``M'`` is divided by the number of draws.
        key: required with stochastic sources.

    Returns:
        ``M'``, shape ``(d, d)``.

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
    scale = float((r_p or 1) * (r_h or 1))
    with jax.enable_x64(True):
        ys = jnp.asarray(ys, jnp.float64)
        total = _jacobian_gram_sum(F, ys, key, int(chunk_size), int(cotangent_chunk_size), r_p, r_h)
        total = np.asarray(total, np.float64)
    m = total / (n * p * scale)
    return (m + m.T) / 2


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
