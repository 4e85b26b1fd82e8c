"""Weight-use interception: wrapper modules that stand in for weight matrices.

Parameter-space decompositions need three things from a target at every use of a
decomposed weight ``h = a @ W``: the input ``a`` and output ``h`` (a cache), an additive
perturbation point ``h + delta`` (for Jacobians with respect to weight outputs) and the
ability to swap ``W`` for a masked sum of low-rank components without materialising
per-example matrices. All three are provided by replacing the weight LEAF of the
parameter pytree with a small module that implements ``a @ W`` (``__rmatmul__``) and
``W.T``. The target's ``apply(params, x)`` is called unchanged, so this works for any
model that uses its decomposed weights as ``a @ W`` or ``a @ W.T`` (every toy in
:mod:`jaxinterp.models`, and any equinox model written that way). An embedding lookup
``W[idx]`` is the use ``one_hot(idx) @ W``: its site input is the one-hot row selector.

A weight used transposed (TMS's tied decoder) is a second *site* named ``path + ":T"``;
the decomposition is shared (``P_dec = P_enc^T``) because the same leaf is used.

Sites are named by the keystr of the weight leaf: ``".W_enc"``, ``".W_enc:T"``,
``".layers[0].mlp_in"``, matching ``forward_with_cache`` of the toy models.

References:
    Braun et al. 2025, "Interpretability in Parameter Space: Minimizing Mechanistic
    Description Length with Attribution-based Parameter Decomposition" (arXiv 2501.14926).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .. import tree
from .._checks import fail
from .._types import Array, PyTree

__all__ = [
    "LowRankWeight",
    "lowrank_matmul",
    "one_hot_rows",
    "WeightSite",
    "site_name",
    "forward_sites",
    "probe_sites",
    "replace_weights",
]

TRANSPOSED = ":T"


def site_name(path: str, transposed: bool) -> str:
    """The site name of a weight use: ``path`` or ``path + ":T"``."""
    return path + TRANSPOSED if transposed else path


def one_hot_rows(fn: str, idx: Any, n: int, dtype: Any) -> Array:
    """The rows selected by an embedding lookup ``W[idx]`` as one-hot vectors, so that
    ``W[idx] == one_hot_rows(idx) @ W`` (negative indices count from the end, as in NumPy).

    Raises:
        ValueError: if ``idx`` is not an integer index (slices, tuples, masks).
    """
    if isinstance(idx, tuple | slice) or idx is None or idx is Ellipsis:
        raise fail(fn, "index", "an integer array (an embedding lookup W[idx])", repr(idx),
                   "Decomposed weights support row lookups and `a @ W` only.")
    idx = jnp.asarray(idx)
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise fail(fn, "index", "an integer array (an embedding lookup W[idx])",
                   f"dtype {idx.dtype}", "Decomposed weights support row lookups and `a @ W` only.")
    idx = jnp.where(idx < 0, idx + n, idx)
    return jax.nn.one_hot(idx, n, dtype=dtype)


class Sink:
    """A trace-time list of ``(site, input, output)`` records (opaque to pytree code)."""

    __slots__ = ("records",)

    def __init__(self):
        self.records: list[tuple[str, Array, Array]] = []


def lowrank_matmul(a: Array, mask: Array, A: Array, B: Array) -> Array:  # noqa: N803
    """``sum_c mask[c] * (a @ A[c]) @ B[c]`` for ``a: (..., d_in)``, ``mask: (C,)``,
    ``A: (C, d_in, m)``, ``B: (C, m, d_out)``, without forming the ``d_in x d_out`` matrix."""
    inner = jnp.einsum("...i,cim->...cm", a, A)
    return jnp.einsum("...cm,c,cmo->...o", inner, mask, B)


class LowRankWeight(eqx.Module):
    """``W = sum_c mask[c] * A[c] @ B[c]`` used as ``a @ W`` without forming ``W``.

    Attributes:
        A: ``(C, d_in, m)``.
        B: ``(C, m, d_out)``.
        mask: ``(C,)`` per-component multiplier (1 for the full model, binary top-k).
        max_active: None (dense), or a bound on the non-zero mask entries over the
            vmapped batch: then ``a @ W`` under vmap computes only the active (example,
            component) pairs (:func:`~jaxinterp.decomposition.sparse_mask.masked_lowrank_matmul`;
            the mask gets no gradient).
    """

    A: Array
    B: Array
    mask: Array
    max_active: int | None = eqx.field(static=True, default=None)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.A.shape[1], self.B.shape[2])

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> Any:
        return self.A.dtype

    @property
    def T(self) -> LowRankWeight:  # noqa: N802  (mirrors ndarray.T)
        return LowRankWeight(jnp.swapaxes(self.B, 1, 2), jnp.swapaxes(self.A, 1, 2), self.mask,
                             self.max_active)

    def __rmatmul__(self, a: Array) -> Array:
        if self.max_active is not None:
            from .sparse_mask import masked_lowrank_matmul

            return masked_lowrank_matmul(a, self.mask, self.A, self.B, max_active=self.max_active)
        return lowrank_matmul(a, self.mask, self.A, self.B)

    def __getitem__(self, idx: Any) -> Array:
        """Embedding lookup ``W[idx]``, computed as ``one_hot(idx) @ W``."""
        return self.__rmatmul__(one_hot_rows("LowRankWeight", idx, self.shape[0], self.dtype))

    def materialize(self) -> Array:
        """The dense ``(d_in, d_out)`` matrix (for tests and plots)."""
        return jnp.einsum("cim,c,cmo->io", self.A, self.mask, self.B)


class WeightSite(eqx.Module):
    """A weight leaf that records and perturbs its uses.

    ``a @ site`` returns ``a @ weight + delta`` and, when ``sink`` is set, appends
    ``(name, a, output)`` to it (a trace-time cache: read it inside the same traced
    function). ``site.T`` is the transposed use, with its own ``delta_T``.

    Attributes:
        weight: a dense ``(d_in, d_out)`` array or a :class:`LowRankWeight`.
        delta: added to the output of ``a @ weight`` (or None).
        delta_T: added to the output of ``a @ weight.T`` (or None).
        name: the site name (keystr of the leaf).
        sink: a :class:`Sink` collecting ``(site, input, output)``, or None.
        transposed: whether this object is the transposed use.
    """

    is_weight_leaf: ClassVar[bool] = True  # kept whole by jaxinterp.target adapters

    weight: Any
    delta: Array | None
    delta_T: Array | None
    name: str = eqx.field(static=True)
    sink: Sink | None = eqx.field(static=True, default=None)
    transposed: bool = eqx.field(static=True, default=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def ndim(self) -> int:
        return len(self.weight.shape)

    @property
    def dtype(self) -> Any:
        return self.weight.dtype

    @property
    def T(self) -> WeightSite:  # noqa: N802
        return WeightSite(self.weight.T, self.delta_T, self.delta, self.name, self.sink,
                          not self.transposed)

    def __rmatmul__(self, a: Array) -> Array:
        out = a @ self.weight
        if self.delta is not None:
            out = out + self.delta
        if self.sink is not None:
            self.sink.records.append((site_name(self.name, self.transposed), a, out))
        return out

    def __getitem__(self, idx: Any) -> Array:
        """Embedding lookup ``W[idx]``: the use ``one_hot(idx) @ W`` (the site's input is
        the one-hot row selector)."""
        return self.__rmatmul__(one_hot_rows("WeightSite", idx, self.shape[0], self.dtype))


def replace_weights(params: PyTree, paths: Sequence[str],
                    make: Callable[[str, Array], Any]) -> PyTree:
    """``params`` with the leaf at each path replaced by ``make(path, leaf)``."""
    for path in paths:
        params = tree.replace(params, path, make(path, tree.get(params, path)))
    return params


def forward_sites(
    apply: Callable[[PyTree, Any], Any],
    params: PyTree,
    x: Any,
    paths: Sequence[str],
    *,
    weights: dict[str, Any] | None = None,
    deltas: dict[str, Array] | None = None,
) -> tuple[Any, dict[str, tuple[Array, Array]]]:
    """Run ``apply(params, x)`` for ONE example, intercepting the weights at ``paths``.

    Args:
        apply: ``apply(params, x)``.
        params: the target's parameters.
        x: one example.
        paths: keystr paths of the intercepted weight leaves.
        weights: optional replacement per path (e.g. a :class:`LowRankWeight`); default
            the leaf itself.
        deltas: optional additive perturbation per SITE name (``path`` or ``path:T``).

    Returns:
        ``(y, cache)`` with ``cache[site] = (input, output)`` in order of use.

    Raises:
        ValueError: if a site is used more than once (the cache would be ambiguous) or a
            delta names a site that is never used.
    """
    weights = weights or {}
    deltas = deltas or {}
    sink = Sink()

    def make(path: str, leaf: Array) -> WeightSite:
        return WeightSite(weights.get(path, leaf), deltas.get(path),
                          deltas.get(site_name(path, True)), path, sink)

    y = apply(replace_weights(params, paths, make), x)
    cache: dict[str, tuple[Array, Array]] = {}
    for name, a, out in sink.records:
        if name in cache:
            raise fail("forward_sites", "paths", "each weight used at most once per "
                       "orientation", f"{name!r} used twice",
                       "Decompose weights that are applied once per example.")
        cache[name] = (a, out)
    unused = set(deltas) - set(cache)
    if unused:
        raise fail("forward_sites", "deltas", f"sites among {sorted(cache)}",
                   sorted(unused))
    return y, cache


def returns_unbatched(fn: Callable, *specs: Any, in_axes: Any = 0) -> bool:
    """Whether ``jax.vmap(fn, in_axes)`` can return its output unbatched (``out_axes=None``)
    on arguments of the shapes ``specs``: the output depends on none of the mapped inputs.
    Decided at trace time (``jax.eval_shape``), from the structure of the computation."""
    try:
        jax.eval_shape(jax.vmap(fn, in_axes=in_axes, out_axes=None), *specs)
    except ValueError as e:  # batched: the output depends on a mapped input
        if "out_axes" not in str(e):
            raise
        return False
    return True


def probe_sites(apply: Callable[[PyTree, Any], Any], params: PyTree, x: Any,
                paths: Sequence[str]) -> dict[str, tuple[jax.ShapeDtypeStruct,
                                                         jax.ShapeDtypeStruct]]:
    """Shapes of ``(input, output)`` at every site for ONE example ``x`` (no FLOPs).

    Raises:
        ValueError: if a path names no leaf, a named leaf is not a matrix, or a named
            weight is never used through ``@``.
    """
    for path in paths:
        leaf = tree.get(params, path)
        if jnp.ndim(leaf) != 2:
            raise fail("probe_sites", "paths", f"matrices (rank 2); {path!r} is not",
                       jnp.shape(leaf))
    out: dict = {}

    def run(p, xx):
        _, cache = forward_sites(apply, p, xx, paths)
        out.update({k: (jax.ShapeDtypeStruct(a.shape, a.dtype),
                        jax.ShapeDtypeStruct(h.shape, h.dtype)) for k, (a, h) in cache.items()})
        return 0

    jax.eval_shape(run, params, x)
    used = {k.removesuffix(TRANSPOSED) for k in out}
    missing = [p for p in paths if p not in used]
    if missing:
        raise fail("probe_sites", "paths", "weights used as `a @ W` by apply", missing,
                   "The model never multiplied by these weights.")
    return out
