"""Dense per-example Jacobians of a section along fixed directions, for few positions.

LIB needs, per example ``b``, the Jacobian of a section-level function ``F: (P, d) ->
(P', m')`` contracted with a fixed set of input directions: the rows of ``R^+`` for the
Gram ``M`` (:mod:`.grams`) and the identity in LIB coordinates for the edges
(:mod:`.edges`). Both are built here the same way:

* one ``jax.jvp`` of ``F`` per (position, direction) pair, vmapped over the directions
  INSIDE a vmap over the examples. The tangents do not depend on the example, so JAX
  keeps everything they touch before the first example-dependent value unbatched: the
  first linear map of ``F`` (``C^+ W_in``, ``R^+ W_Q`` ...) is applied once, not per
  example, and the rest of the pass runs as large matrix products over ``(examples x
  directions)`` rows;
* a Jacobian that does not depend on the example at all (a linear section) is found at
  trace time (``vmap(..., out_axes=None)`` traces without error) and is returned
  without a batch axis, so callers use closed forms (``M = n J J^T``) instead of
  ``n`` copies.

With ``n`` directions the per-example Jacobian has ``P n P' m'`` entries; callers bound
memory with the number of examples per chunk (:func:`dense_chunk`) and, optionally,
the number of directions pushed forward together.

A section that knows its Jacobian as a few fixed matrices plus a low-rank part
(:class:`~.sections.StructuredJacobian`, e.g. attention) skips the dense Jacobian
altogether; :func:`structured_jacobians` evaluates it over a chunk.

References:
    Bushnaq et al. (2024), "The Local Interaction Basis" (arXiv 2405.10928), the
    Jacobians behind ``M'`` and the squared edges; Griewank & Walther (2008),
    "Evaluating Derivatives", 2nd ed. (forward-mode Jacobian accumulation).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from .._types import Array, Float
from .sections import StructuredJacobian

__all__ = [
    "DENSE_MAX_POSITIONS",
    "dense_chunk",
    "directional_jacobian",
    "example_independent",
    "structured_jacobians",
]

# Above this many input positions, one JVP per (position, direction) costs P times the
# per-direction JVPs of the column paths; those are used instead.
DENSE_MAX_POSITIONS = 8

# Examples per chunk: about _CHUNK_ENTRIES Jacobian entries (8 MB of float64), at most
# _CHUNK_EXAMPLES. Measured on mod-add (16k-44k entries per example): 16-32 examples
# per chunk run 10-40 % faster than 8 (per-chunk overhead) or 48+ (cache misses).
_CHUNK_ENTRIES = 1 << 20
_CHUNK_EXAMPLES = 24


def dense_chunk(chunk_size: int, entries_per_example: int, n: int) -> int:
    """Examples per chunk of a dense-Jacobian accumulation: at most ``chunk_size`` and
    ``n``, sized for the cache (see ``_CHUNK_ENTRIES``)."""
    target = min(_CHUNK_EXAMPLES, _CHUNK_ENTRIES // max(1, entries_per_example))
    return max(1, min(int(chunk_size), n, target))


def directional_jacobian(
    F: Callable[[Array], Array],
    y: Float[Array, "batch P d"],
    directions: Float[Array, "n d"],
    *,
    direction_chunk: int | None = None,
) -> tuple[Array, bool]:
    """``J[b, s, a, t, x] = d F(y_b)[t, x] / d y[s, :] . directions[a, :]`` (traced helper).

    Args:
        F: function of ONE example, ``(P, d) -> (P', m')``.
        y: points, ``(batch, P, d)``.
        directions: input directions (rows), ``(n, d)``, the same for every example and
            position.
        direction_chunk: (position, direction) pairs pushed forward together
            (``lax.map``); ``None``: all ``P n`` at once.

    Returns:
        ``(J, batched)``: ``J`` of shape ``(batch, P, n, P', m')``, or ``(P, n, P', m')``
        and ``batched = False`` when it does not depend on the example (``F`` linear).
    """
    p, d = y.shape[1:]
    n = directions.shape[0]
    # tangent (s, a): directions[a] at position s, zero elsewhere
    tangents = jnp.einsum("st,ad->satd", jnp.eye(p, dtype=y.dtype), directions.astype(y.dtype))
    tangents = tangents.reshape(p * n, p, d)

    def one(yy: Array) -> Array:
        def push(t: Array) -> Array:
            return jax.jvp(F, (yy,), (t,))[1]

        if direction_chunk is None or direction_chunk >= p * n:
            return jax.vmap(push)(tangents)
        return jax.lax.map(push, tangents, batch_size=int(direction_chunk))

    try:
        jac = jax.vmap(one, out_axes=None)(y)  # raises when J depends on the example
        return jac.reshape(p, n, *jac.shape[1:]), False
    except ValueError:
        jac = jax.vmap(one)(y)
        return jac.reshape(y.shape[0], p, n, *jac.shape[2:]), True


def example_independent(F: Callable[[Array], Array], y: Array, directions: Array) -> bool:
    """Whether ``directional_jacobian(F, y, directions)`` is the same for every example
    (decided at trace time, nothing is evaluated)."""
    found: list[bool] = []

    def probe(yy: Array) -> Array:
        jac, batched = directional_jacobian(F, yy, directions)
        found.append(batched)
        return jac

    jax.eval_shape(probe, jax.ShapeDtypeStruct(y.shape, y.dtype))
    return not found[0]


def structured_jacobians(F: Callable[[Array], Array], y: Array) -> StructuredJacobian | None:
    """``F.structured_jacobian`` over a chunk ``y: (batch, P, d)`` (traced helper): ``coef:
    (batch, P, R)``, ``K: (R, d, X)`` (example-independent, checked by ``vmap``), ``g:
    (batch, P, Q, d)``, ``u: (batch, Q, X)``; ``None`` if ``F`` has no structured
    Jacobian (see :class:`~.sections.StructuredJacobian`)."""
    method = getattr(F, "structured_jacobian", None)
    if method is None or method(y[0]) is None:
        return None
    axes = StructuredJacobian._make((0, None, 0, 0))  # coef, K (shared), g, u
    return jax.vmap(method, out_axes=axes)(y)
