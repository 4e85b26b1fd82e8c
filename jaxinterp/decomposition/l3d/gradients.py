"""Per-sample divergence gradients ``g_i = grad_W D(f(W, x_i), y_ref,i)`` at the trained
weights, materialised or in a memory-lean factored ("ghost") form.

The decomposed parameters ``W_T`` are a ``{name: array}`` dict of leaves of the target's
parameter pytree (names are keystr paths). ``f(w, x)`` is the target with those leaves
replaced by ``w``.

Divergences (spec section 2), with ``y = f(W0, x_i)`` and ``y_r = f(W0, x_{r_i})``:

* ``"mse"`` (regression): ``D_i(W) = (1/n_o) sum_o f_o(W, x_i) sg(y_o - y_r,o)``, whose
  gradient is ``(1/n_o) J_i^T (y - y_r)``, half the gradient of the MSE to ``y_r``;
* ``"kl"``: ``D_i = KL(softmax(y_r) || softmax(f(W, x_i)))`` over the last output axis
  (summed over any leading output axes), with logit gradient ``softmax(y) - softmax(y_r)``.

Both are one VJP per sample with a fixed cotangent, vmapped over the batch.

The ghost form keeps, for a matrix leaf used as ``a @ W`` (or ``a @ W.T``), the per-use
inputs ``a`` and back-propagated deltas ``d`` instead of ``G = sum_u a_u d_u^T``; every
quantity the L3D loss needs is then a contraction of those (``||G||^2 =
sum_{u,u'} (a_u.a_u')(d_u.d_u')``), so no ``(batch, d_in, d_out)`` array is formed.

References:
    Chrisman, Bushnaq, Sharkey 2025, "Identifying Sparsely Active Circuits Through Local
    Loss Landscape Decomposition" (arXiv 2504.00194).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ... import tree
from ..._checks import check_in, fail
from ..._types import Array, Float, Key, PyTree
from ..weights import TRANSPOSED, forward_sites, probe_sites

__all__ = ["DIVERGENCES", "Ghost", "reference_indices", "divergence_cotangent",
           "sample_gradients", "ghost_gradients", "gradient_sq_norms", "ghost_to_dense",
           "decomposed_fn"]

DIVERGENCES = ("mse", "kl")


class Ghost(NamedTuple):
    """A batch of matrix gradients ``G_b = sum_u p[b, u] q[b, u]^T``."""

    p: Float[Array, "batch uses d1"]
    q: Float[Array, "batch uses d2"]


Grads = dict[str, Any]  # name -> (batch, *shape) array or Ghost


def decomposed_fn(apply: Callable[[PyTree, Any], Any], params: PyTree,
                  names: Sequence[str]) -> Callable[[dict[str, Array], Any], Array]:
    """``f(w, x) = apply(params with the leaves at names replaced by w, x)``."""
    names = tuple(names)

    def f(w: dict[str, Array], x: Any) -> Array:
        p = params
        for n in names:
            p = tree.replace(p, n, w[n])
        return apply(p, x)

    return f


def reference_indices(key: Key, batch: int, group: int | None = None) -> Array:
    """``r_i ~ U{0..G-1}`` within each group of ``G = group`` consecutive samples (the
    reference's data-parallel shards; default one group = the batch). ``r_i = i`` is
    allowed and gives ``g_i = 0``, as in the reference code."""
    g = batch if group is None else group
    if batch % g:
        raise fail("reference_indices", "group", f"to divide the batch {batch}", g)
    r = jax.random.randint(key, (batch,), 0, g)
    return (jnp.arange(batch) // g) * g + r


def divergence_cotangent(y: Array, y_ref: Array, divergence: str) -> Array:
    """The gradient of the divergence with respect to the output of ONE sample (``y`` is
    treated as a constant)."""
    check_in("divergence_cotangent", "divergence", divergence, DIVERGENCES)
    if divergence == "mse":
        return (y - y_ref) / y.size
    return jax.nn.softmax(y, axis=-1) - jax.nn.softmax(y_ref, axis=-1)


def sample_gradients(f: Callable[[dict[str, Array], Any], Array], w: dict[str, Array],
                     x: Any, ref: Array, *, divergence: str = "mse") -> dict[str, Array]:
    """Materialised per-sample gradients ``{name: (batch, *shape)}``.

    Args:
        f: ``f(w, x)`` for ONE example.
        w: the decomposed tensors at their trained values.
        x: a batch of inputs (leading ``batch`` axis).
        ref: ``(batch,)`` reference index of every sample into the same batch.
        divergence: ``"mse"`` or ``"kl"``.
    """
    y = jax.vmap(lambda xx: f(w, xx))(x)
    y = jax.lax.stop_gradient(y)
    y_ref = y[ref]

    def one(xx, yi, yr):
        _, vjp = jax.vjp(lambda ww: f(ww, xx), w)
        return vjp(divergence_cotangent(yi, yr, divergence))[0]

    return jax.vmap(one)(x, y, y_ref)


def ghost_gradients(apply: Callable[[PyTree, Any], Any], params: PyTree,
                    w: dict[str, Array], x: Any, ref: Array, *, ghost: Sequence[str],
                    divergence: str = "mse") -> Grads:
    """Per-sample gradients with the matrices in ``ghost`` kept as :class:`Ghost` factors
    (inputs and deltas of each use) and every other tensor of ``w`` materialised.

    Each matrix in ``ghost`` must be used by ``apply`` only as ``a @ W`` or ``a @ W.T``
    (at most once per orientation per example; ``a`` may carry position axes).

    Raises:
        ValueError: if a ``ghost`` name is not in ``w``, not a matrix, or not used through
            ``@``.
    """
    ghost = tuple(ghost)
    missing = [n for n in ghost if n not in w]
    if missing:
        raise fail("ghost_gradients", "ghost", f"names among the decomposed tensors {sorted(w)}",
                   missing)
    dense = [n for n in w if n not in ghost]
    base = params
    for n in w:
        base = tree.replace(base, n, w[n])
    x0 = jax.tree_util.tree_map(lambda v: v[0], x)
    shapes = probe_sites(apply, base, x0, ghost)

    def run(deltas, dense_w, xx):
        p = base
        for n in dense:
            p = tree.replace(p, n, dense_w[n])
        y, cache = forward_sites(apply, p, xx, ghost, deltas=deltas)
        return y, {s: a for s, (a, _) in cache.items()}

    zeros = {s: jnp.zeros(o.shape, o.dtype) for s, (_, o) in shapes.items()}
    dense_w = {n: w[n] for n in dense}
    y = jax.lax.stop_gradient(jax.vmap(lambda xx: run(zeros, dense_w, xx)[0])(x))
    y_ref = y[ref]

    def one(xx, yi, yr):
        _, vjp, acts = jax.vjp(lambda d, dw: run(d, dw, xx), zeros, dense_w, has_aux=True)
        d_sites, d_dense = vjp(divergence_cotangent(yi, yr, divergence))
        return acts, d_sites, d_dense

    acts, deltas, d_dense = jax.vmap(one)(x, y, y_ref)
    out: Grads = dict(d_dense)
    for n in ghost:
        ps, qs = [], []
        for site, transposed in ((n, False), (n + TRANSPOSED, True)):
            if site not in acts:
                continue
            a, d = acts[site], deltas[site]
            a = a.reshape(a.shape[0], -1, a.shape[-1])
            d = d.reshape(d.shape[0], -1, d.shape[-1])
            ps.append(d if transposed else a)
            qs.append(a if transposed else d)
        out[n] = Ghost(jnp.concatenate(ps, axis=1), jnp.concatenate(qs, axis=1))
    return {n: out[n] for n in w}


def ghost_to_dense(g: Ghost) -> Float[Array, "batch d1 d2"]:
    """The materialised ``sum_u p_u q_u^T`` (tests)."""
    return jnp.einsum("bui,buj->bij", g.p, g.q)


def gradient_sq_norms(grads: Grads) -> Float[Array, " batch"]:
    """``sum_t ||g_{b,t}||^2`` per sample; a ghost matrix contributes
    ``sum_{u,u'} (p_u.p_u')(q_u.q_u')``."""
    total = 0.0
    for g in grads.values():
        if isinstance(g, Ghost):
            pp = jnp.einsum("bui,bvi->buv", g.p, g.p)
            qq = jnp.einsum("buj,bvj->buv", g.q, g.q)
            total = total + jnp.sum(pp * qq, axis=(1, 2))
        else:
            total = total + jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)
    return total
