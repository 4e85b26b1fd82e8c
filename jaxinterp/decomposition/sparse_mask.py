"""A masked low-rank matmul that, vmapped over a batch, only computes the active
(example, component) pairs.

``masked_lowrank_matmul(a, mask, A, B, max_active=K)`` is, for ONE example,

    out = sum_c mask[c] * (a @ A[c]) @ B[c]        a: (..., d_in), mask: (C,)

(``A: (C, d_in, m)``, ``B: (C, m, d_out)``), exactly what
:class:`~jaxinterp.decomposition.weights.LowRankWeight` computes. Under ``jax.vmap`` over
examples (``a`` and ``mask`` batched, the factors shared) a dense evaluation costs
``batch * C`` rank-``m`` products although a top-k mask keeps only a few of them (APD's
batch top-k keeps ``K = floor(k * batch)`` of ``batch * C``; 327 of 33 280 for
resid-mlp-1). Here a custom batching rule gathers the ``K`` non-zero pairs of the batch
mask and computes ``K`` products, in the forward and in the backward pass (a custom
VJP whose backward pass has its own sparse batching rule; the factor gradients are
scatter-added over the pairs).

``max_active`` must bound the number of non-zero mask entries in the vmapped batch
(pairs beyond it would be dropped); APD's top-k modes know it exactly. Without vmap, or
when the factors themselves are batched, the dense formula is used. Outer vmaps (over
seeds) batch the rule like any other JAX code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .._types import Array
from .weights import lowrank_matmul

__all__ = ["masked_lowrank_matmul"]


def _dense_bwd(a: Array, mask: Array, A: Array, B: Array, g: Array  # noqa: N803
               ) -> tuple[Array, Array, Array]:
    gb = jnp.einsum("...o,cmo,c->...cm", g, B, mask)
    inner = jnp.einsum("...i,cim->...cm", a, A)
    da = jnp.einsum("...cm,cim->...i", gb, A)
    lead = "".join(chr(ord("p") + i) for i in range(a.ndim - 1))
    dA = jnp.einsum(f"{lead}i,{lead}cm->cim", a, gb)  # noqa: N806
    dB = jnp.einsum(f"{lead}cm,{lead}o,c->cmo", inner, g, mask)  # noqa: N806
    return da, dA, dB


def _pairs(mask: Array, k: int) -> tuple[Array, Array, Array]:
    """Example index, component index and weight of the (at most ``k``) non-zero entries of
    a ``(batch, C)`` mask; unused slots get weight 0."""
    flat = mask.reshape(-1)
    (idx,) = jnp.nonzero(flat, size=k, fill_value=0)
    valid = jnp.arange(k) < jnp.count_nonzero(flat)
    return idx // mask.shape[1], idx % mask.shape[1], jnp.where(valid, flat[idx], 0.0)


def _expand(w: Array, ndim: int) -> Array:
    return w.reshape(w.shape + (1,) * (ndim - 1))


@functools.cache
def _ops(k: int):
    """The forward and backward custom-vmap functions for a pair budget ``k``."""

    @jax.custom_batching.custom_vmap
    def fwd(a, mask, A, B):  # noqa: N803
        return lowrank_matmul(a, mask, A, B)

    @fwd.def_vmap
    def fwd_rule(axis_size, in_batched, a, mask, A, B):  # noqa: N803
        a_b, m_b, A_b, B_b = in_batched
        if A_b or B_b or not m_b:
            a = a if a_b else jnp.broadcast_to(a, (axis_size, *a.shape))
            mask = mask if m_b else jnp.broadcast_to(mask, (axis_size, *mask.shape))
            return jax.vmap(lowrank_matmul, in_axes=(0, 0, 0 if A_b else None, 0 if B_b else None)
                            )(a, mask, A, B), True
        n, c, w = _pairs(mask, k)
        an = a[n] if a_b else jnp.broadcast_to(a, (k, *a.shape))
        inner = jnp.einsum("k...i,kim->k...m", an, A[c])
        out_k = jnp.einsum("k...m,kmo->k...o", inner, B[c]) * _expand(w, inner.ndim)
        out = jnp.zeros((axis_size, *out_k.shape[1:]), out_k.dtype).at[n].add(out_k)
        return out, True

    @jax.custom_batching.custom_vmap
    def bwd(a, mask, A, B, g):  # noqa: N803
        return _dense_bwd(a, mask, A, B, g)

    @bwd.def_vmap
    def bwd_rule(axis_size, in_batched, a, mask, A, B, g):  # noqa: N803
        a_b, m_b, A_b, B_b, g_b = in_batched
        if A_b or B_b or not m_b:
            bcast = [x if xb else jnp.broadcast_to(x, (axis_size, *x.shape))
                     for x, xb in ((a, a_b), (mask, m_b), (g, g_b))]
            out = jax.vmap(_dense_bwd, in_axes=(0, 0, 0 if A_b else None, 0 if B_b else None,
                                                0))(bcast[0], bcast[1], A, B, bcast[2])
            return out, (True, True, True)
        n, c, w = _pairs(mask, k)
        an = a[n] if a_b else jnp.broadcast_to(a, (k, *a.shape))
        gn = g[n] if g_b else jnp.broadcast_to(g, (k, *g.shape))
        Ak, Bk = A[c], B[c]  # noqa: N806
        gb = jnp.einsum("k...o,kmo->k...m", gn, Bk) * _expand(w, gn.ndim)
        inner = jnp.einsum("k...i,kim->k...m", an, Ak)
        da_k = jnp.einsum("k...m,kim->k...i", gb, Ak)
        lead = "".join(chr(ord("p") + i) for i in range(an.ndim - 2))
        dA_k = jnp.einsum(f"k{lead}i,k{lead}m->kim", an, gb)  # noqa: N806
        dB_k = jnp.einsum(f"k{lead}m,k{lead}o->kmo", inner * _expand(w, inner.ndim), gn)  # noqa: N806
        a_shape = a.shape[1:] if a_b else a.shape
        da = jnp.zeros((axis_size, *a_shape), da_k.dtype).at[n].add(da_k)
        dA = jnp.zeros_like(A).at[c].add(dA_k)  # noqa: N806
        dB = jnp.zeros_like(B).at[c].add(dB_k)  # noqa: N806
        # the factor gradients are already summed over the batch: unbatched outputs
        return (da, dA, dB), (True, False, False)

    @jax.custom_vjp
    def op(a, mask, A, B):  # noqa: N803
        return fwd(a, mask, A, B)

    def op_fwd(a, mask, A, B):  # noqa: N803
        return fwd(a, mask, A, B), (a, mask, A, B)

    def op_bwd(res, g):
        a, mask, A, B = res  # noqa: N806
        da, dA, dB = bwd(a, mask, A, B, g)  # noqa: N806
        return da, jnp.zeros_like(mask), dA, dB

    op.defvjp(op_fwd, op_bwd)
    return op


def masked_lowrank_matmul(a: Array, mask: Array, A: Array, B: Array, *,  # noqa: N803
                          max_active: int) -> Array:
    """``sum_c mask[c] (a @ A[c]) @ B[c]`` for one example, sparse over the active pairs
    when vmapped (see the module docstring). The mask gets no gradient (APD's top-k masks
    are constants)."""
    return _ops(int(max_active))(a, mask, A, B)
