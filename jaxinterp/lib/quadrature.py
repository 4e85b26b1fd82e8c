"""Quadrature rules over ``alpha in [0, 1]`` for the integrated-gradient LIB variants.

A rule is a set of points and weights ``{(alpha_q, w_q)}``; an integral
``int_0^1 g(alpha) d alpha`` is approximated by ``sum_q w_q g(alpha_q)``.

* ``gradient``: the single point ``(1, 1)`` (no integration; the default LIB rule);
* ``trapezoidal(n)``: ``n + 1`` equally spaced points in ``[eps, 1 - eps]`` with
  ``eps = 1e-3 / (n + 1)``, weights ``1 / n`` with both endpoints halved;
* ``gauss_legendre(n)``: the ``n + 1`` Gauss-Legendre nodes mapped to ``[0, 1]``.

``n = 0`` gives the single point ``alpha = 0.5`` (weight 1) for both integrating rules.

References:
    Bushnaq et al. (2024), "The Local Interaction Basis" (arXiv 2405.10928), the
    integrated-gradient bases; Sundararajan, Taly, Yan (2017), "Axiomatic Attribution
    for Deep Networks" (arXiv 1703.01365), integrated gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._checks import check_in, check_nonnegative, fail

__all__ = ["RULES", "Quadrature", "gauss_legendre", "gradient", "quadrature", "trapezoidal"]

RULES = ("gradient", "trapezoidal", "gauss_legendre")


class Quadrature(NamedTuple):
    """Points ``alphas: (Q,)`` in ``[0, 1]`` and weights ``weights: (Q,)`` (float64)."""

    alphas: np.ndarray
    weights: np.ndarray

    @property
    def is_gradient(self) -> bool:
        """Whether this is the plain gradient rule ``{(1, 1)}``."""
        return len(self.alphas) == 1 and self.alphas[0] == 1.0 and self.weights[0] == 1.0


def gradient() -> Quadrature:
    """The gradient rule ``{(1, 1)}``."""
    return Quadrature(np.ones(1), np.ones(1))


def trapezoidal(n: int) -> Quadrature:
    """Trapezoidal rule with ``n`` intervals on ``[eps, 1 - eps]``, ``eps = 1e-3/(n+1)``.

    Raises:
        ValueError: if ``n`` is not a non-negative integer.
    """
    check_nonnegative("trapezoidal", "n", n, integer=True)
    n = int(n)
    if n == 0:
        return Quadrature(np.full(1, 0.5), np.ones(1))
    eps = 1e-3 / (n + 1)
    alphas = np.linspace(eps, 1.0 - eps, n + 1)
    weights = np.full(n + 1, 1.0 / n)
    weights[[0, -1]] /= 2.0
    return Quadrature(alphas, weights)


def gauss_legendre(n: int) -> Quadrature:
    """Gauss-Legendre rule with ``n + 1`` nodes mapped from ``[-1, 1]`` to ``[0, 1]``.

    Raises:
        ValueError: if ``n`` is not a non-negative integer.
    """
    check_nonnegative("gauss_legendre", "n", n, integer=True)
    x, w = np.polynomial.legendre.leggauss(int(n) + 1)
    return Quadrature((x + 1.0) / 2.0, w / 2.0)


def quadrature(rule: str | Quadrature, n_intervals: int = 0) -> Quadrature:
    """The rule named ``rule`` (one of :data:`RULES`) with ``n_intervals``, or ``rule``
    itself if it already is a :class:`Quadrature` (checked).

    Raises:
        ValueError: on an unknown name, or points outside ``[0, 1]``.
    """
    fn = "quadrature"
    if isinstance(rule, Quadrature):
        a, w = np.asarray(rule.alphas, np.float64), np.asarray(rule.weights, np.float64)
        if a.ndim != 1 or a.shape != w.shape or a.size == 0:
            raise fail(
                fn, "rule", "alphas and weights of one shape (Q,), Q >= 1", (a.shape, w.shape)
            )
        if np.any(a < 0) or np.any(a > 1):
            raise fail(fn, "rule.alphas", "points in [0, 1]", a)
        return Quadrature(a, w)
    check_in(fn, "rule", rule, RULES)
    if rule == "gradient":
        return gradient()
    return trapezoidal(n_intervals) if rule == "trapezoidal" else gauss_legendre(n_intervals)
