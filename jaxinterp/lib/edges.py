"""Interaction edges between adjacent node layers, in forward mode and float64.

With ``module_hat_l(x_hat) = S_l(x_hat C_l^+) C_{l+1}`` (LIB coordinates to LIB
coordinates), the attribution of input node ``j`` to output node ``i`` is

    A[b, t, i, j] = sum_q w_q sum_s d module_hat_{t,i}(y) / d y_{s,j} |_{y = alpha_q x_hat[b]}
                    * x_hat[b, s, j],

which is exactly ONE JVP of ``module_hat`` with the tangent ``T_j = x_hat * e_j`` (column
``j`` of ``x_hat``, zero elsewhere). Two evaluations, both summed over data chunks in
float64:

* dense (few input positions, ``P_l <= DENSE_MAX_POSITIONS``; the default for MLPs and
  mod-add): the full per-example Jacobian ``d module_hat / d x_hat`` by forward mode along
  the one-hot tangents ``e_{s,j}``, which do not depend on the example, so ``C_l^+``
  and the section's first linear map are applied to them once (:mod:`.dense`), and
  ``C_{l+1}`` is contracted into its last one (:meth:`~.sections.AbstractSection.features`);
  then ``A = sum_s x_hat[b, s, j] J[b, s, j, ...]``. A linear section's Jacobian does not
  depend on the example and is evaluated once. A section with a
  :class:`~.sections.StructuredJacobian` (attention) skips the dense Jacobian:
  ``A = sum_r (sum_s x_hat coef_r) K_r + sum_q (sum_s x_hat g_q) u_q``;
* columns (many positions): the ``m_l`` tangents ``T_j`` vmapped in chunks
  (``lax.map(..., batch_size=)``), one JVP each per example.

Edge matrices are ``E^l: (m_{l+1}, m_l)``, output node first, normalised by the input
positions ``P_l``:

* ``squared``: ``E_ij = (1/(N P_l)) sum_{b,t} A[b,t,i,j]^2`` (>= 0);
* ``stochastic``: ``(1/(N P_l r)) sum_{b,draws} (sum_t phi_t A[b,t,i,j])^2`` with random
  signs ``phi`` over output positions (unbiased for ``squared``; equal to it when the
  output has one position);
* ``functional``: ``E_ij = (1/(N P_l)) sum_{b,q} w_q 2 sum_t (F_ti(x_hat) - F_ti(alpha_q
  x_hat)) * JVP_q[b,t,i,j]``, the attribution of ``||F(x_hat) - F(y)||^2``; may be negative,
  and ``sum_i E_ij = Lambda_j`` for the ``(1-alpha)^2`` basis with the same rule.

References:
    Bushnaq et al. (2024), "The Local Interaction Basis" (arXiv 2405.10928), squared
    and functional edges; the forward-mode evaluation is this library's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_in, check_positive, fail
from .._types import Array, Key
from ..graph import Graph, NodeLayer
from .basis import InteractionBasis
from .dense import (
    DENSE_MAX_POSITIONS,
    dense_chunk,
    directional_jacobian,
    structured_jacobians,
)
from .quadrature import Quadrature, quadrature
from .sections import FoldedSection, Sectioned, StructuredJacobian, collect_activations
from .stats import chunked_sum, host_blas

__all__ = [
    "EDGE_KINDS",
    "ModuleHat",
    "assemble_graph",
    "interaction_edges",
    "layer_edges",
    "module_hat",
]

EDGE_KINDS = ("squared", "stochastic", "functional")


class ModuleHat(eqx.Module):
    """``x_hat: (P_l, m_l) -> S_l(x_hat C_l^+) C_{l+1}: (P_{l+1}, m_{l+1})`` for ONE
    example (a callable pytree).

    Attributes:
        step: the folded section ``S_l``.
        C_pinv: ``C_l^+``, ``(m_l, d_l)``.
        C_next: ``C_{l+1}``, ``(d_{l+1}, m_{l+1})``.
    """

    step: FoldedSection
    C_pinv: Any
    C_next: Any

    def __call__(self, xh: Array) -> Array:
        return self.step.features(xh @ self.C_pinv, self.C_next)

    def structured_jacobian(self, xh: Array) -> StructuredJacobian | None:
        """``d module_hat / d x_hat`` as a :class:`~.sections.StructuredJacobian`: the
        section's, with ``C^+`` applied on the input side."""
        sj = self.step.structured_jacobian(xh @ self.C_pinv, self.C_next)
        if sj is None:
            return None
        c_pinv = jnp.asarray(self.C_pinv, xh.dtype)
        return sj._replace(
            K=jnp.einsum("ji,rix->rjx", c_pinv, sj.K), g=jnp.einsum("ji,sqi->sqj", c_pinv, sj.g)
        )


def module_hat(sectioned: Sectioned, ib: InteractionBasis, layer: int) -> ModuleHat:
    """The section ``layer`` in LIB coordinates (see :class:`ModuleHat`)."""
    return ModuleHat(
        step=sectioned.section_fn(layer),
        C_pinv=ib.layers[layer].C_pinv,
        C_next=ib.layers[layer + 1].C,
    )


def layer_edges(
    mhat: Callable[[Array], Array],
    xh: Array,
    *,
    kind: str = "squared",
    quad: Quadrature | None = None,
    n_sources: int = 1,
    chunk_size: int = 64,
    tangent_chunk_size: int | None = None,
    key: Key | None = None,
) -> np.ndarray:
    """Edges of one layer pair from LIB-coordinate activations (x64 enabled locally).

    Args:
        mhat: ``module_hat`` of ONE example, ``(P, m) -> (P', m')``.
        xh: ``x_hat``, ``(N, P, m)`` (cast to float64).
        kind: one of :data:`EDGE_KINDS`.
        quad: quadrature rule (default: gradient).
        n_sources: random-sign draws per example (``stochastic``).
        chunk_size: examples per chunk (an upper bound: the dense path uses smaller
            chunks when one example's Jacobian is large).
        tangent_chunk_size: tangents per vmapped JVP batch (``P m`` of them on the dense
            path, ``m`` on the column path); ``None``: all at once.
        key: PRNG key (``stochastic`` only).

    Returns:
        ``E: (m', m)`` numpy float64.

    Raises:
        ValueError: on an unknown kind, non-positive sizes, or ``stochastic`` without a key.
    """
    fn = "layer_edges"
    check_in(fn, "kind", kind, EDGE_KINDS)
    check_positive(fn, "chunk_size", chunk_size, integer=True)
    check_positive(fn, "n_sources", n_sources, integer=True)
    if kind == "stochastic" and key is None:
        raise fail(fn, "key", "a PRNG key for stochastic edges", None)
    quad = quad if quad is not None else quadrature("gradient")
    n, p, m = xh.shape
    tc = p * m if tangent_chunk_size is None else int(tangent_chunk_size)
    check_positive(fn, "tangent_chunk_size", tc, integer=True)
    with jax.enable_x64(True):
        xh = jnp.asarray(xh, jnp.float64)
        alphas = jnp.asarray(quad.alphas, jnp.float64)
        weights = jnp.asarray(quad.weights, jnp.float64)
        if p <= DENSE_MAX_POSITIONS:
            p_out, m_out = jax.eval_shape(mhat, jax.ShapeDtypeStruct((p, m), xh.dtype)).shape
            entries = len(quad.alphas) * p * m * p_out * m_out
            chunk = dense_chunk(chunk_size, entries, n)
            total = _dense_edge_sums(
                mhat, xh, alphas, weights, kind, int(n_sources), chunk, min(tc, p * m), key
            )
        else:
            total = _edge_sums(
                mhat, xh, alphas, weights, kind, int(n_sources), int(chunk_size), min(tc, m), key
            )
        return np.asarray(total, np.float64) / (n * p)


@eqx.filter_jit
def _dense_edge_sums(
    mhat: Callable[[Array], Array],
    xh: Array,
    alphas: Array,
    weights: Array,
    kind: str,
    n_sources: int,
    chunk_size: int,
    tangent_chunk: int,
    key: Key | None,
) -> Array:
    """Unnormalised edges ``(m', m)`` from dense per-example Jacobians."""
    m = xh.shape[-1]
    m_out = jax.eval_shape(mhat, xh[0]).shape[-1]
    eye = jnp.eye(m, dtype=xh.dtype)
    batched = jax.vmap(mhat)

    def attributions(x: Array, alpha: Array) -> Array:
        """``A[b, t, i, j] = sum_s x[b, s, j] d mhat_{t,i} / d y_{s,j}`` at ``alpha x``."""
        sj = structured_jacobians(mhat, alpha * x)
        if sj is not None:  # sum_r (sum_s x coef) K_r + sum_q (sum_s x g_q) u_q
            a = jnp.einsum("bsj,bsr->bjr", x, sj.coef)
            a = jnp.einsum("bjr,rjx->bjx", a, sj.K)
            a = a + jnp.einsum("bjq,bqx->bjx", jnp.einsum("bsj,bsqj->bjq", x, sj.g), sj.u)
            p_out = sj.u.shape[-1] // m_out
            return jnp.moveaxis(a.reshape(x.shape[0], m, p_out, m_out), 1, -1)
        jac, per_example = directional_jacobian(mhat, alpha * x, eye, direction_chunk=tangent_chunk)
        if per_example:
            return jnp.einsum("bsj,bsjti->btij", x, jac)
        return jnp.einsum("bsj,sjti->btij", x, jac)

    def per_chunk(x: Array, mask: Array, idx: Array) -> Array:
        a_q = jax.vmap(attributions, in_axes=(None, 0))(x, alphas)  # (Q, b, P', m', m)
        if kind == "functional":
            diff = batched(x)[None] - jax.vmap(lambda a: batched(a * x))(alphas)  # (Q, b, P', m')
            per = 2.0 * jnp.einsum("q,qbti,qbtij->bij", weights, diff, a_q)
            return jnp.einsum("b,bij->ij", mask, per)
        a = jnp.tensordot(weights, a_q, axes=1)  # (b, P', m', m)
        if kind == "squared" or key is None:
            return jnp.einsum("b,btij->ij", mask, a**2)
        phi = jax.random.rademacher(
            jax.random.fold_in(key, idx), (n_sources, x.shape[0], a.shape[1]), dtype=jnp.float64
        )
        sig = jnp.einsum("rbt,btij->rbij", phi, a)
        return jnp.einsum("b,rbij->ij", mask, sig**2) / n_sources

    return chunked_sum(per_chunk, xh, chunk_size=chunk_size)


@eqx.filter_jit
def _edge_sums(
    mhat: Callable[[Array], Array],
    xh: Array,
    alphas: Array,
    weights: Array,
    kind: str,
    n_sources: int,
    chunk_size: int,
    tangent_chunk: int,
    key: Key | None,
) -> Array:
    """Unnormalised edges ``(m', m)``: data chunks scanned, tangents ``lax.map``-ped."""
    m = xh.shape[-1]
    batched = jax.vmap(mhat)

    def per_chunk(x: Array, mask: Array, idx: Array) -> Array:
        target = batched(x) if kind == "functional" else None
        phi = None
        if kind == "stochastic" and key is not None:
            p_out = jax.eval_shape(batched, x).shape[1]
            phi = jax.random.rademacher(
                jax.random.fold_in(key, idx), (n_sources, x.shape[0], p_out), dtype=jnp.float64
            )

        def column(j: Array) -> Array:  # the edges into every output node from node j
            t = x * jax.nn.one_hot(j, m, dtype=x.dtype)[None, None, :]
            prim, tang = jax.vmap(lambda a: jax.jvp(batched, (a * x,), (t,)))(alphas)
            if target is not None:
                per = 2.0 * jnp.einsum("q,qbti,qbti->bi", weights, target[None] - prim, tang)
                return jnp.einsum("b,bi->i", mask, per)
            a = jnp.tensordot(weights, tang, axes=1)  # (b, P', m')
            if phi is None:
                return jnp.einsum("b,bti->i", mask, a**2)
            s = jnp.einsum("rbt,bti->rbi", phi, a)
            return jnp.einsum("b,rbi->i", mask, s**2) / n_sources

        return jax.lax.map(column, jnp.arange(m), batch_size=tangent_chunk).T  # (m', m)

    return chunked_sum(per_chunk, xh, chunk_size=chunk_size)


def interaction_edges(
    sectioned: Sectioned,
    ib: InteractionBasis,
    xs: Any,
    *,
    kind: str = "squared",
    rule: str | Quadrature = "gradient",
    n_intervals: int = 0,
    n_sources: int = 1,
    chunk_size: int = 64,
    tangent_chunk_size: int | None = None,
    acts: Sequence[Any] | None = None,
    key: Key | None = None,
) -> tuple[np.ndarray, ...]:
    """Edge matrices ``E^l: (m_{l+1}, m_l)`` for every adjacent pair of node layers.

    Args:
        sectioned: the cut model.
        ib: its bases (:func:`~jaxinterp.lib.basis.interaction_basis`).
        xs: the dataset, inputs with a leading ``batch`` axis.
        kind: one of :data:`EDGE_KINDS`.
        rule, n_intervals: quadrature over ``alpha`` (default: the gradient rule).
        n_sources: random-sign draws per example for ``stochastic`` edges.
        chunk_size: examples per chunk (an upper bound, see :func:`layer_edges`).
        tangent_chunk_size: tangents per vmapped JVP batch (``None``: all at once).
        acts: float64 node-layer activations, to skip recomputing them.
        key: PRNG key (``stochastic`` only), keyword-last.

    Returns:
        A tuple of ``L`` numpy float64 arrays.

    Raises:
        ValueError: if ``ib`` does not match ``sectioned`` or on bad options.
    """
    fn = "interaction_edges"
    if ib.names != sectioned.names:
        raise fail(fn, "ib", f"bases of the node layers {sectioned.names}", ib.names)
    check_in(fn, "kind", kind, EDGE_KINDS)
    quad = quadrature(rule, n_intervals)
    out = []
    with jax.enable_x64(True):
        if acts is None:
            acts = collect_activations(sectioned, xs, dtype=jnp.float64)
        with host_blas(max(np.shape(a)[-1] for a in acts)):
            for li in range(sectioned.n_layers - 1):
                xh = jnp.asarray(np.asarray(acts[li], np.float64) @ ib.layers[li].C)
                k = None if key is None else jax.random.fold_in(key, li)
                out.append(
                    layer_edges(
                        module_hat(sectioned, ib, li),
                        xh,
                        kind=kind,
                        quad=quad,
                        n_sources=n_sources,
                        chunk_size=chunk_size,
                        tangent_chunk_size=tangent_chunk_size,
                        key=k,
                    )
                )
    return tuple(out)


def assemble_graph(ib: InteractionBasis, edges: Sequence[Any]) -> Graph:
    """The :class:`~jaxinterp.graph.Graph` of bases and edges: node ``j`` of layer ``l`` is
    direction ``j`` (importance ``Lambda_j``, basis column ``C[:, j]``).

    Raises:
        ValueError: if the edge shapes do not match the bases.
    """
    if len(edges) != len(ib.layers) - 1:
        raise fail("assemble_graph", "edges", f"{len(ib.layers) - 1} matrices", len(edges))
    layers = tuple(
        NodeLayer(
            name=b.name,
            importance=np.asarray(b.lambdas),
            index=tuple(range(b.size)),
            basis=b.C,
            basis_pinv=b.C_pinv,
            constant_index=0 if b.constant else None,
        )
        for b in ib.layers
    )
    return Graph(layers=layers, edges=tuple(np.asarray(e) for e in edges))
