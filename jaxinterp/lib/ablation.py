"""Node and edge ablations in a basis, and the bisection for the edges a model needs.

* **Node ablation** at node layer ``l``: keep the first ``n`` directions (the constant
  counts), ``f <- f C[:, :n] C^+[:n, :]``, run the rest of the model and score it. Kept
  counts: every ``n`` from 0 to 20, then ``ceil(20 * 1.05^k)`` up to ``m``
  (:func:`kept_counts`). The ``n`` are ``lax.map``-ped in one jitted call.
* **Edge ablation** of the pair ``l -> l+1``: keep the top-``K`` edges of ``E^l`` (edges
  out of the constant node are free: always kept, never counted); output node ``i`` is
  recomputed from ``x_hat * mask_i``. Output nodes sharing a mask are computed together:
  one pass per distinct mask, accumulated in a ``lax.scan`` (the number of masks is
  padded to a power of two so that few shapes compile).
* **Bisect**: the smallest ``K`` with ``score(K) >= base - delta``, assuming
  monotonicity.

Scores are "higher is better" functions of the output node layer ``(N, P_L, d_L)``:
:func:`accuracy_score` or :func:`r2_score`. Ablation forward passes run in ``dtype``
(default float32; the bases were built in float64).

References:
    Bushnaq et al. (2024), "The Local Interaction Basis" (arXiv 2405.10928), node- and
    edge-ablation protocols.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_nonnegative, check_positive, fail
from .._types import Array
from .basis import InteractionBasis
from .sections import FoldedSection, Sectioned, collect_activations

__all__ = [
    "AblationCurve",
    "EdgeBisect",
    "accuracy_score",
    "bisect_edges",
    "edge_ablation_score",
    "edge_mass_counts",
    "kept_counts",
    "minimal_count",
    "node_ablation",
    "r2_score",
]

Score = Callable[[Array], Array]


def accuracy_score(labels: Any, *, position: int = -1) -> Score:
    """``mean(argmax(out[:, position]) == labels)`` for outputs ``(N, P_L, n_classes)``."""
    labels = jnp.asarray(labels)
    return lambda out: jnp.mean(jnp.argmax(out[:, position], axis=-1) == labels)


def r2_score(reference: Any) -> Score:
    """``1 - E[(out - ref)^2] / Var(ref)``: 1 for the unablated model (no labels needed)."""
    ref = jnp.asarray(reference)
    var = jnp.mean((ref - ref.mean(0, keepdims=True)) ** 2)
    return lambda out: 1.0 - jnp.mean((out - ref) ** 2) / var


def kept_counts(m: int, *, dense_up_to: int = 20, growth: float = 1.05) -> list[int]:
    """``0..min(dense_up_to, m)``, then ``ceil(dense_up_to * growth^k)`` up to ``m`` (and
    ``m`` itself)."""
    check_nonnegative("kept_counts", "m", m, integer=True)
    out = list(range(min(dense_up_to, m) + 1))
    k = 1
    while out[-1] < m:
        out.append(min(m, max(out[-1] + 1, math.ceil(dense_up_to * growth**k))))
        k += 1
    return out


class AblationCurve(NamedTuple):
    """Scores of a node ablation: ``counts (n,)`` kept directions, ``scores (n,)``."""

    counts: np.ndarray
    scores: np.ndarray


def minimal_count(curve: AblationCurve, base: float, delta: float) -> int | None:
    """The smallest kept count with ``score >= base - delta`` (``None``: never)."""
    ok = np.nonzero(np.asarray(curve.scores) >= base - delta)[0]
    return int(curve.counts[ok[0]]) if ok.size else None


class _Tail(eqx.Module):
    steps: tuple[FoldedSection, ...]

    def __call__(self, f: Array) -> Array:
        for step in self.steps:
            f = step(f)
        return f


def _tail(sectioned: Sectioned, layer: int) -> _Tail:
    return _Tail(tuple(sectioned.section_fn(k) for k in range(layer, sectioned.n_layers - 1)))


def _layer_acts(
    sectioned: Sectioned, xs: Any, layer: int, acts: Sequence[Array] | None, dtype: Any
) -> Array:
    if acts is None:
        acts = collect_activations(sectioned, xs)
    return jnp.asarray(np.asarray(acts[layer]), dtype)


def node_ablation(
    sectioned: Sectioned,
    ib: InteractionBasis,
    xs: Any,
    score: Score,
    *,
    layer: int,
    counts: Sequence[int] | None = None,
    acts: Sequence[Array] | None = None,
    dtype: Any = jnp.float32,
) -> AblationCurve:
    """Score the model with only the first ``n`` directions of node layer ``layer``.

    Args:
        sectioned: the cut model.
        ib: the basis (use a PCA :class:`InteractionBasis` for the PCA baseline).
        xs: evaluation inputs (batch first).
        score: higher-is-better function of the outputs ``(N, P_L, d_L)``.
        layer: a node layer with a basis (not the output).
        counts: kept counts; default :func:`kept_counts` of the layer's size.
        acts: activations of ``xs`` (from :func:`collect_activations`), to reuse.
        dtype: dtype of the ablated forward passes.

    Returns:
        :class:`AblationCurve`.

    Raises:
        ValueError: on a bad layer or counts outside ``[0, m]``.
    """
    fn = "node_ablation"
    if not 0 <= layer < sectioned.n_layers - 1:
        raise fail(fn, "layer", f"a node layer in [0, {sectioned.n_layers - 1})", layer)
    b = ib.layers[layer]
    counts = kept_counts(b.size) if counts is None else [int(c) for c in counts]
    if any(not 0 <= c <= b.size for c in counts):
        raise fail(fn, "counts", f"kept counts in [0, m={b.size}]", counts)
    f = _layer_acts(sectioned, xs, layer, acts, dtype)
    c, c_pinv = jnp.asarray(b.C, dtype), jnp.asarray(b.C_pinv, dtype)
    tail = _tail(sectioned, layer)

    @jax.jit
    def run(f: Array, n: Array) -> Array:
        def one(k: Array) -> Array:
            keep = (jnp.arange(b.size) < k).astype(dtype)
            return score(jax.vmap(tail)(((f @ c) * keep[None, None, :]) @ c_pinv))

        return jax.lax.map(one, n)

    scores = run(f, jnp.asarray(counts))
    return AblationCurve(np.asarray(counts), np.asarray(scores, np.float64))


def _edge_masks(e: np.ndarray, free: np.ndarray, k: int) -> np.ndarray:
    """``(m', m)`` bool: the top-``k`` non-free edges by value, plus every free edge."""
    vals = np.where(free[None, :], -np.inf, np.asarray(e, np.float64)).ravel()
    order = np.argsort(-vals, kind="stable")[:k]
    mask = np.zeros(vals.size, bool)
    mask[order] = True
    return mask.reshape(e.shape) | free[None, :]


def edge_ablation_score(
    sectioned: Sectioned,
    ib: InteractionBasis,
    edges: Sequence[Any],
    xs: Any,
    score: Score,
    *,
    layer: int,
    k: int,
    acts: Sequence[Array] | None = None,
    dtype: Any = jnp.float32,
) -> float:
    """Score with only the top-``k`` non-constant edges of the pair ``layer -> layer+1``.

    Raises:
        ValueError: on a bad layer or ``k`` outside ``[0, number of non-constant edges]``.
    """
    fn = "edge_ablation_score"
    if not 0 <= layer < sectioned.n_layers - 1:
        raise fail(fn, "layer", f"a layer pair in [0, {sectioned.n_layers - 1})", layer)
    e = np.asarray(edges[layer])
    free = np.zeros(e.shape[1], bool)
    free[0] = ib.layers[layer].constant
    n_edges = int(e.size - free.sum() * e.shape[0])
    if not 0 <= k <= n_edges:
        raise fail(fn, "k", f"in [0, {n_edges}] (non-constant edges)", k)
    masks, inverse = np.unique(_edge_masks(e, free, k), axis=0, return_inverse=True)
    n_pad = 1 << (len(masks) - 1).bit_length()
    sel = np.zeros((n_pad, e.shape[0]))
    sel[inverse.ravel(), np.arange(e.shape[0])] = 1.0
    masks = np.concatenate([masks, np.zeros((n_pad - len(masks), e.shape[1]), bool)])
    f = _layer_acts(sectioned, xs, layer, acts, dtype)
    b, nxt = ib.layers[layer], ib.layers[layer + 1]
    return float(
        _edge_run(
            sectioned.section_fn(layer),
            _tail(sectioned, layer + 1),
            f,
            jnp.asarray(b.C, dtype),
            jnp.asarray(b.C_pinv, dtype),
            jnp.asarray(nxt.C, dtype),
            jnp.asarray(nxt.C_pinv, dtype),
            jnp.asarray(masks, dtype),
            jnp.asarray(sel, dtype),
            score,
        )
    )


@eqx.filter_jit
def _edge_run(
    step: FoldedSection,
    tail: _Tail,
    f: Array,
    c: Array,
    c_pinv: Array,
    c_next: Array,
    c_next_pinv: Array,
    masks: Array,
    sel: Array,
    score: Score,
) -> Array:
    xh = f @ c

    def body(acc: Array, inp: tuple[Array, Array]) -> tuple[Array, None]:
        mask, s = inp
        out = jax.vmap(step)((xh * mask[None, None, :]) @ c_pinv) @ c_next
        return acc + out * s[None, None, :], None

    p_out = jax.eval_shape(jax.vmap(step), f).shape[1]
    init = jnp.zeros((f.shape[0], p_out, c_next.shape[1]), f.dtype)
    fh_next, _ = jax.lax.scan(body, init, (masks, sel))
    return score(jax.vmap(tail)(fh_next @ c_next_pinv))


class EdgeBisect(NamedTuple):
    """Result of :func:`bisect_edges`.

    Attributes:
        k: edges required (``None`` if even all edges miss the threshold).
        n_edges: non-constant edges of the pair.
        score_at_k: score with ``k`` edges; ``score_below``: with ``k - 1`` (or ``None``).
        eps: the smallest kept non-constant edge at ``k`` (the pair's pruning threshold).
        base: the reference score.
    """

    k: int | None
    n_edges: int
    score_at_k: float | None
    score_below: float | None
    eps: float | None
    base: float


def bisect_edges(
    sectioned: Sectioned,
    ib: InteractionBasis,
    edges: Sequence[Any],
    xs: Any,
    score: Score,
    *,
    layer: int,
    delta: float = 0.001,
    base: float | None = None,
    acts: Sequence[Array] | None = None,
    dtype: Any = jnp.float32,
) -> EdgeBisect:
    """The smallest ``K`` with ``score(K) >= base - delta`` (``base``: all edges kept).

    Raises:
        ValueError: on a negative ``delta`` or a bad layer.
    """
    check_nonnegative("bisect_edges", "delta", delta)
    if acts is None:
        acts = collect_activations(sectioned, xs)
    e = np.asarray(edges[layer])
    n_edges = int(e.size - (e.shape[0] if ib.layers[layer].constant else 0))

    def at(k: int) -> float:
        return edge_ablation_score(
            sectioned, ib, edges, xs, score, layer=layer, k=k, acts=acts, dtype=dtype
        )

    full = at(n_edges)
    base = full if base is None else float(base)
    if full < base - delta:
        return EdgeBisect(None, n_edges, None, None, None, base)
    lo, hi, cache = 0, n_edges, {n_edges: full}
    while lo < hi:
        mid = (lo + hi) // 2
        if mid not in cache:
            cache[mid] = at(mid)
        if cache[mid] >= base - delta:
            hi = mid
        else:
            lo = mid + 1
    below = (cache[lo - 1] if lo - 1 in cache else at(lo - 1)) if lo > 0 else None
    vals = np.sort(np.asarray(e[:, 1:] if ib.layers[layer].constant else e).ravel())[::-1]
    eps = float(vals[lo - 1]) if lo > 0 else None
    score_at = cache[lo] if lo in cache else at(lo)
    return EdgeBisect(lo, n_edges, score_at, below, eps, base)


def edge_mass_counts(
    e: Any, *, constant: bool, fractions: Sequence[float] = (0.9, 0.99)
) -> list[int]:
    """Numbers of the largest non-constant edges holding each fraction of their mass."""
    check_positive("edge_mass_counts", "len(fractions)", len(fractions), integer=True)
    a = np.asarray(e, np.float64)
    vals = np.sort(np.abs(a[:, 1:] if constant else a).ravel())[::-1]
    cum = np.cumsum(vals)
    total = cum[-1] if cum.size else 0.0
    return [
        int(np.searchsorted(cum, fr * total - 1e-12 * total) + 1) if total > 0 else 0
        for fr in fractions
    ]
