"""Bases of the node layers: neuron, PCA and the Local Interaction Basis (LIB).

LIB is built backward from the output. At node layer ``l`` (from ``L - 1`` down to 0):

1. centre and PCA-whiten the activations: ``R = Y U D^-1/2``, ``R^+ = D^1/2 U^T Y^-1``;
2. compute ``M'``, the Gram of the Jacobian of the next layer's LIB features
   ``F(y) = S_l(y) C_{l+1}`` (or of an integrated gradient, for the IG variants);
3. ``M = R^+ M' R^+^T``; with the constant direction (index 0) held fixed,
   ``M[1:, 1:] = V_sub diag(lambda) V_sub^T``; ``Lambda_0 = M[0, 0]``;
4. keep ``Lambda > tau``: ``C = R V diag(sqrt(Lambda))``, ``C^+ = diag(1/sqrt(Lambda)) V^T R^+``.

Then ``f_hat = f C`` has ``E[f_hat^T f_hat] = diag(Lambda)`` and ``C^+ C = I``. The output
layer is not rotated (``C_L = I``) unless ``rotate_final`` (uncentred PCA there).

``M`` is accumulated directly along the rows of ``R^+`` (:func:`~.grams.jacobian_gram`
with ``directions``), by the cheapest exact route the section offers (hidden-layer
moments, a structured Jacobian, or dense forward-mode Jacobians). The host-side linear
algebra (Grams, ``eigh``) runs on one BLAS thread for layers up to 1024 wide
(:func:`~.stats.host_blas`).

References:
    Bushnaq et al. (2024), "The Local Interaction Basis: Identifying
    Computationally-Relevant and Sparsely Interacting Features in Neural Networks"
    (arXiv 2405.10928); Bushnaq et al. (2024), "Using Degeneracy in the Loss Landscape
    for Mechanistic Interpretability" (arXiv 2405.10927), the interaction basis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_finite_host, check_in, check_positive, fail
from .._types import Array, Key
from .grams import IG_FORMULAS, ig_grams, jacobian_gram
from .quadrature import Quadrature, quadrature
from .sections import (
    FoldedSection,
    HiddenLayerFactors,
    Sectioned,
    StructuredJacobian,
    collect_activations,
)
from .stats import PCA, host_blas, layer_stats, pca, sign_fix

__all__ = [
    "BASES",
    "InteractionBasis",
    "LayerBasis",
    "NextFeatures",
    "interaction_basis",
    "next_features",
]

BASES = ("jacobian", *IG_FORMULAS, "pca", "neuron")
ALIASES = {"lib": "jacobian"}


class LayerBasis(eqx.Module):
    """The basis of one node layer (numpy float64 arrays).

    Attributes:
        name: node-layer name.
        C: basis, ``(d, m)``: ``f_hat = f C``.
        C_pinv: ``(m, d)`` with ``C^+ C = I_m``; ``f ~ f_hat C^+``.
        lambdas: importance ``Lambda_j = E[f_hat_j^2]``, ``(m,)``.
        W: PCA basis ``(d, k)`` (``C`` itself for the output and neuron bases).
        W_pinv: ``(k, d)``.
        V: the rotation ``(k, m)`` in whitened coordinates (LIB only, else ``None``).
        mean: ``E[f]``, ``(d,)``.
        constant: whether direction 0 is the constant direction.
    """

    name: str = eqx.field(static=True)
    C: np.ndarray
    C_pinv: np.ndarray
    lambdas: np.ndarray
    W: np.ndarray
    W_pinv: np.ndarray
    V: np.ndarray | None
    mean: np.ndarray
    constant: bool = eqx.field(static=True)

    @property
    def size(self) -> int:
        """Number of directions ``m``."""
        return int(self.C.shape[1])


class InteractionBasis(eqx.Module):
    """One :class:`LayerBasis` per node layer, output last.

    Attributes:
        layers: the layer bases.
        basis: the kind (one of :data:`BASES`).
    """

    layers: tuple[LayerBasis, ...]
    basis: str = eqx.field(static=True)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.layers)

    def __getitem__(self, key: int | str) -> LayerBasis:
        if isinstance(key, str):
            if key not in self.names:
                raise fail("InteractionBasis", "key", "one of " + ", ".join(self.names), repr(key))
            key = self.names.index(key)
        return self.layers[key]


class NextFeatures(eqx.Module):
    """``F(y) = S_k(...S_l(y)) C_next`` for ONE example ``y: (P_l, d_l)`` (a callable
    pytree: jitted Gram accumulations cache on its structure).

    Attributes:
        steps: the folded sections applied in order.
        C_next: basis of the layer reached, ``(d, m)``.
    """

    steps: tuple[FoldedSection, ...]
    C_next: Any

    def __call__(self, y: Array) -> Array:
        for step in self.steps[:-1]:
            y = step(y)
        return self.steps[-1].features(y, self.C_next)

    def structured_jacobian(self, y: Array) -> StructuredJacobian | None:
        """``d F / d y`` as a :class:`~.sections.StructuredJacobian` (one section only)."""
        if len(self.steps) != 1:
            return None
        return self.steps[0].structured_jacobian(y, self.C_next)

    def hidden_layer_factors(self, dtype: Any) -> HiddenLayerFactors | None:
        """``F`` as :class:`~.sections.HiddenLayerFactors` (one section only)."""
        if len(self.steps) != 1:
            return None
        return self.steps[0].hidden_layer_factors(self.C_next, dtype)


def next_features(
    sectioned: Sectioned, layer: int, C_next: Any, *, naive: bool = False
) -> NextFeatures:
    """``F(y) = S_layer(y) C_next``; with ``naive``, ``F(y) = S_{L-1}(...S_layer(y))
    C_next`` (``C_next`` is then the output basis)."""
    stop = sectioned.n_layers - 1 if naive else layer + 1
    steps = tuple(sectioned.section_fn(k) for k in range(layer, stop))
    return NextFeatures(steps=steps, C_next=C_next)


def _output_basis(name: str, acts: np.ndarray, rotate: bool, tau: float) -> LayerBasis:
    st = layer_stats(acts, center=False, has_constant=False)
    if rotate:
        p = pca(st, tau=tau)
        c, c_pinv, lam = p.U, p.U.T, p.D
    else:
        c = c_pinv = np.eye(acts.shape[-1])
        lam = np.diag(st.gram).copy()
    return LayerBasis(
        name=name,
        C=c,
        C_pinv=c_pinv,
        lambdas=lam,
        W=c,
        W_pinv=c_pinv,
        V=None,
        mean=st.mean,
        constant=False,
    )


def _neuron_basis(name: str, acts: np.ndarray) -> LayerBasis:
    st = layer_stats(acts, center=False)
    d = acts.shape[-1]
    c = np.eye(d)[:, np.r_[d - 1, 0 : d - 1]]  # constant coordinate first
    lam = np.diag(c.T @ st.gram @ c).copy()
    return LayerBasis(
        name=name,
        C=c,
        C_pinv=c.T,
        lambdas=lam,
        W=c,
        W_pinv=c.T,
        V=None,
        mean=st.mean,
        constant=True,
    )


def _rotate(
    p: PCA, m: np.ndarray, lam_dash: np.ndarray | None, tau: float, tau_relative: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """``V`` and ``Lambda`` from the whitened ``M = R^+ M' R^+^T`` (and ``Lambda'`` for
    the IG variants)."""
    r, r_pinv = p.R, p.R_pinv
    m = (m + m.T) / 2
    k = m.shape[0]
    start = 1 if p.constant else 0
    lam_sub, v_sub = np.linalg.eigh(m[start:, start:])
    order = np.argsort(-lam_sub, kind="stable")
    v = np.eye(k)
    v[start:, start:] = sign_fix(v_sub[:, order])
    lam = np.concatenate([m[:start, :start].diagonal(), lam_sub[order]])
    if lam_dash is not None:
        lam = np.abs(np.diag(v.T @ r_pinv @ lam_dash @ r @ v))
        order = start + np.argsort(-lam[start:], kind="stable")
        v = np.concatenate([v[:, :start], v[:, order]], axis=1)
        lam = np.concatenate([lam[:start], lam[order]])
    keep = lam > tau
    if tau_relative is not None:
        keep &= lam > tau_relative * lam.max()
    return v[:, keep], lam[keep], keep, bool(p.constant and keep[0])


def interaction_basis(
    sectioned: Sectioned,
    xs: Any,
    *,
    basis: str = "jacobian",
    rule: str | Quadrature = "gradient",
    n_intervals: int = 0,
    center: bool = True,
    tau: float = 1e-15,
    tau_relative: float | None = None,
    rotate_final: bool = False,
    naive_gradient_flow: bool = False,
    sources: tuple[int | None, int | None] | None = None,
    chunk_size: int = 256,
    cotangent_chunk_size: int = 32,
    acts: Sequence[Any] | None = None,
    key: Key | None = None,
) -> InteractionBasis:
    """Bases of every node layer: LIB (``jacobian`` and the IG variants), PCA or neuron.

    Runs in float64 (x64 is enabled locally). LIB bases are built backward from the
    output; PCA and neuron bases layer by layer.

    Args:
        sectioned: the cut model.
        xs: the basis dataset, inputs with a leading ``batch`` axis.
        basis: one of :data:`BASES` (``"lib"`` is an alias of ``"jacobian"``).
        rule: quadrature for the IG variants (``gradient``, ``trapezoidal``,
            ``gauss_legendre`` or a :class:`Quadrature`); ignored by ``jacobian``.
        n_intervals: intervals of the quadrature rule.
        center: centre the activations (the constant direction becomes index 0).
        tau: keep directions with eigenvalue / Lambda ``> tau`` (absolute).
        tau_relative: also keep only ``> tau_relative * max``.
        rotate_final: use the (uncentred) PCA basis at the output instead of ``I``.
        naive_gradient_flow: Jacobians to the output instead of the next node layer.
        sources: stochastic sources ``(r_positions, r_hidden)`` for ``M'`` (``None``
            entries are exact); needs ``key``.
        chunk_size: examples per chunk of the Gram accumulations (an upper bound: the
            exact dense path sizes its chunks for the cache, :func:`~.grams.jacobian_gram`).
        cotangent_chunk_size: cotangents per vmapped pullback (stochastic sources and
            layers with many positions; the exact path needs none).
        acts: node-layer activations from :func:`collect_activations` (float64), to
            skip recomputing them.
        key: PRNG key (stochastic sources only), keyword-last.

    Returns:
        :class:`InteractionBasis`.

    Raises:
        ValueError: on unknown options, bad combinations (``(1-alpha)^2`` with the
            gradient rule, stochastic sources without a key) or bad activations.
        FloatingPointError: on non-finite activations or Jacobian Grams.
    """
    fn = "interaction_basis"
    basis = ALIASES.get(basis, basis)
    check_in(fn, "basis", basis, BASES)
    quad = quadrature(rule, n_intervals)
    check_positive(fn, "chunk_size", chunk_size, integer=True)
    if sources is not None and (not isinstance(sources, tuple) or len(sources) != 2):
        raise fail(fn, "sources", "a pair (r_positions, r_hidden)", sources)
    if basis == "(1-alpha)^2" and quad.is_gradient:
        raise fail(
            fn,
            "rule",
            "'trapezoidal' or 'gauss_legendre' for '(1-alpha)^2'",
            repr(rule),
            "Its gradient vanishes at alpha = 1.",
        )
    with jax.enable_x64(True):
        if acts is None:
            acts = collect_activations(sectioned, xs, dtype=jnp.float64)
        if len(acts) != sectioned.n_layers:
            raise fail(fn, "acts", f"{sectioned.n_layers} node layers", len(acts))
        layers: list[LayerBasis] = [None] * sectioned.n_layers  # type: ignore[list-item]
        with host_blas(max(np.shape(a)[-1] for a in acts)):
            names, last = sectioned.names, sectioned.n_layers - 1
            layers[last] = _output_basis(names[last], np.asarray(acts[last]), rotate_final, tau)
            for li in reversed(range(last)):
                f = np.asarray(acts[li], np.float64)
                if basis == "neuron":
                    layers[li] = _neuron_basis(names[li], f)
                    continue
                st = layer_stats(f, center=center)
                p = pca(st, tau=tau, tau_relative=tau_relative)
                if basis == "pca":
                    layers[li] = LayerBasis(
                        name=names[li],
                        C=p.W,
                        C_pinv=p.W_pinv,
                        lambdas=p.D,
                        W=p.W,
                        W_pinv=p.W_pinv,
                        V=None,
                        mean=st.mean,
                        constant=p.constant,
                    )
                    continue
                c_next = layers[last if naive_gradient_flow else li + 1].C
                F = next_features(sectioned, li, c_next, naive=naive_gradient_flow)
                ys = jnp.asarray(f)
                if basis == "jacobian":  # M = R^+ M' R^+^T, accumulated directly
                    m = jacobian_gram(
                        F,
                        ys,
                        chunk_size=chunk_size,
                        cotangent_chunk_size=cotangent_chunk_size,
                        sources=sources,
                        directions=p.R_pinv,
                        key=key,
                    )
                    lam_dash = None
                else:
                    m_dash, lam_dash = ig_grams(F, ys, quad, basis, chunk_size=chunk_size)
                    m = p.R_pinv @ m_dash @ p.R_pinv.T
                check_finite_host(fn, f"M' at node layer {names[li]!r}", m)
                v, lam, _, constant = _rotate(p, m, lam_dash, tau, tau_relative)
                root = np.sqrt(lam)
                layers[li] = LayerBasis(
                    name=names[li],
                    C=p.R @ v * root[None, :],
                    C_pinv=(v.T @ p.R_pinv) / root[:, None],
                    lambdas=lam,
                    W=p.W,
                    W_pinv=p.W_pinv,
                    V=v,
                    mean=st.mean,
                    constant=constant,
                )
    return InteractionBasis(layers=tuple(layers), basis=basis)
