"""Tucker-factored parameter directions with the subnetwork axis first.

A decomposed tensor ``t`` of shape ``(d_1, ..., d_N)`` with Tucker ranks ``(r_1, ..., r_N)``
holds, for each of ``n_v`` subnetworks ``k``, the direction

    v[k, i_1..i_N] = sum_a core[k, a_1..a_N] prod_n factor_n[k, a_n, i_n].

Every contraction here goes mode by mode through einsum, so ``v`` is only formed by
:func:`materialize` (plots, interventions, tests). A matrix with ranks ``(1, 1)`` is
``g u w^T``; a vector with rank ``(r,)`` spans any vector already at ``r = 1``.

References:
    Chrisman, Bushnaq, Sharkey 2025, "Identifying Sparsely Active Circuits Through Local
    Loss Landscape Decomposition" (arXiv 2504.00194), section 3 of ``specs/l3d.md``.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp

from ..._checks import check_positive, fail
from ..._types import Array, Float, Key

__all__ = ["Tucker", "init_tucker", "materialize", "inner_dense", "inner_ghost", "gram",
           "sq_norms", "rescale"]

_RANK = string.ascii_lowercase[:12]  # a..l: rank letters
_RANK2 = "mnopqrstuvwx"  # second set of rank letters (gram)
_DIM = string.ascii_uppercase[:12]  # A..L: tensor-dimension letters


class Tucker(eqx.Module):
    """``n_v`` Tucker-factored directions of one tensor.

    Attributes:
        core: ``(n_v, r_1, ..., r_N)``.
        factors: ``N`` arrays ``(n_v, r_n, d_n)``.
    """

    core: Float[Array, "n_v ..."]
    factors: tuple[Float[Array, "n_v r d"], ...]

    def __check_init__(self):
        n = len(self.factors)
        if self.core.ndim != n + 1:
            raise fail("Tucker", "core", f"rank {n + 1} (n_v plus one axis per factor)",
                       self.core.shape)
        for i, f in enumerate(self.factors):
            want = (self.core.shape[0], self.core.shape[i + 1])
            if f.ndim != 3 or f.shape[:2] != want:
                raise fail("Tucker", f"factors[{i}]",
                           f"shape (n_v={self.core.shape[0]}, r={self.core.shape[i + 1]}, d)",
                           f.shape)

    @property
    def n_v(self) -> int:
        return self.core.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The decomposed tensor's shape ``(d_1, ..., d_N)``."""
        return tuple(f.shape[2] for f in self.factors)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(self.core.shape[1:])


def _check_order(fn: str, n: int) -> None:
    if n < 1 or n > len(_RANK):
        raise fail(fn, "tensor", f"between 1 and {len(_RANK)} axes", f"{n} axes",
                   "Scalars cannot be Tucker-factored; leave them out of the selection.")


def init_tucker(shape: Sequence[int], ranks: Sequence[int], n_v: int, *, key: Key) -> Tucker:
    """Core and factor entries ~ ``N(0, 1) / n_v`` (spec section 3, before normalising).

    Raises:
        ValueError: if ``ranks`` does not have one positive entry per axis of ``shape``.
    """
    fn = "init_tucker"
    _check_order(fn, len(shape))
    if len(ranks) != len(shape):
        raise fail(fn, "ranks", f"one rank per axis of shape {tuple(shape)}", tuple(ranks))
    check_positive(fn, "n_v", n_v, integer=True)
    for r in ranks:
        check_positive(fn, "ranks", r, integer=True)
    keys = jax.random.split(key, len(shape) + 1)
    core = jax.random.normal(keys[0], (n_v, *ranks)) / n_v
    factors = tuple(jax.random.normal(k, (n_v, r, d)) / n_v
                    for k, r, d in zip(keys[1:], ranks, shape, strict=True))
    return Tucker(core, factors)


def _core_sub(n: int) -> str:
    return "z" + _RANK[:n]


def materialize(t: Tucker) -> Float[Array, "n_v ..."]:
    """The dense directions ``(n_v, d_1, ..., d_N)``."""
    n = len(t.factors)
    _check_order("materialize", n)
    subs = [_core_sub(n)] + [f"z{_RANK[i]}{_DIM[i]}" for i in range(n)]
    return jnp.einsum(",".join(subs) + "->z" + _DIM[:n], t.core, *t.factors)


def inner_dense(t: Tucker, g: Float[Array, "batch ..."]) -> Float[Array, "batch n_v"]:
    """``<v_k, g_b>_F`` for every sample ``b`` and subnetwork ``k``, contracting ``g`` mode
    by mode with the factors and then with the core (``v`` is never formed).

    Raises:
        ValueError: if ``g``'s trailing axes are not the tensor's shape.
    """
    n = len(t.factors)
    if g.shape[1:] != t.shape:
        raise fail("inner_dense", "g", f"shape (batch, {', '.join(map(str, t.shape))})",
                   g.shape)
    subs = ["y" + _DIM[:n], _core_sub(n)] + [f"z{_RANK[i]}{_DIM[i]}" for i in range(n)]
    return jnp.einsum(",".join(subs) + "->yz", g, t.core, *t.factors)


def inner_ghost(t: Tucker, p: Float[Array, "batch uses d1"],
                q: Float[Array, "batch uses d2"]) -> Float[Array, "batch n_v"]:
    """``<v_k, G_b>_F`` for a matrix gradient given as a sum of outer products
    ``G_b = sum_u p[b, u] q[b, u]^T`` (a linear layer's inputs and back-propagated
    deltas): ``sum_u sum_{a,c} core[k, a, c] (F1[k, a] . p_u) (F2[k, c] . q_u)``."""
    if len(t.factors) != 2:
        raise fail("inner_ghost", "t", "directions of a matrix (two factors)",
                   f"{len(t.factors)} factors")
    pa = jnp.einsum("yui,zai->yuza", p, t.factors[0])
    qc = jnp.einsum("yuj,zcj->yuzc", q, t.factors[1])
    return jnp.einsum("yuza,yuzc,zac->yz", pa, qc, t.core)


def _paired(n: int) -> tuple[str, str]:
    """Rank letters of two cores contracted against each other: a.. and m.."""
    return _RANK[:n], _RANK2[:n]


def gram(t: Tucker, s: Tucker | None = None) -> Float[Array, "n_v n_v"]:
    """``<v_k, w_l>_F`` between the directions of ``t`` and ``s`` (default ``t``), from the
    factors: per mode ``M_n[k, l, a, c] = F_n[k, a] . G_n[l, c]``, then the cores."""
    s = t if s is None else s
    if s.shape != t.shape:
        raise fail("gram", "s", f"directions of the same shape {t.shape}", s.shape)
    left, right = _paired(len(t.factors))
    mats = [jnp.einsum("yai,zci->yzac", f, h) for f, h in zip(t.factors, s.factors, strict=True)]
    subs = ["y" + left, "z" + right] + [f"yz{a}{c}" for a, c in zip(left, right, strict=True)]
    return jnp.einsum(",".join(subs) + "->yz", t.core, s.core, *mats)


def sq_norms(t: Tucker) -> Float[Array, " n_v"]:
    """``||v_k||_F^2`` for every subnetwork (the diagonal of :func:`gram`, computed
    directly)."""
    left, right = _paired(len(t.factors))
    mats = [jnp.einsum("zai,zci->zac", f, f) for f in t.factors]
    subs = ["z" + left, "z" + right] + [f"z{a}{c}" for a, c in zip(left, right, strict=True)]
    return jnp.einsum(",".join(subs) + "->z", t.core, t.core, *mats)


def rescale(t: Tucker, s: Float[Array, " n_v"]) -> Tucker:
    """Divide direction ``k`` by ``s[k]``, spreading the factor evenly: the core and each
    of the ``N`` factors are divided by ``s[k] ** (1 / (N + 1))`` (spec section 4)."""
    n = len(t.factors)
    f = s ** (1.0 / (n + 1))
    core = t.core / f.reshape((-1,) + (1,) * n)
    return Tucker(core, tuple(x / f[:, None, None] for x in t.factors))
