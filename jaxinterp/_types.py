"""jaxtyping aliases and the axis glossary used in every shape annotation.

Axis names (see ``specs/README.md`` §3):

=============  ==============================================================
``batch``      samples in a step or an evaluation batch (B)
``positions``  sequence positions (P); absent for MLP toys
``n_features`` sparse input features of a toy (F)
``d_in``       input width of one weight matrix (row-vector convention)
``d_out``      output width of one weight matrix
``d_hidden``   TMS bottleneck width
``d_resid``    residual-stream width (= ``d_model``)
``d_mlp``      MLP neurons per layer
``C``          components / subcomponents
``n_tangents`` tangent directions pushed forward together (vmapped JVPs)
``n_cotangents`` cotangent directions pulled back together (vmapped VJPs)
``seeds``      leading axis of vmapped independent runs
``vocab``      token vocabulary
=============  ==============================================================

Everything is row-vector: a linear layer computes ``y = x @ W + b`` with ``W`` stored as
``(d_in, d_out)``.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import jax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

PyTreeT: TypeAlias = PyTree[Any]
Key: TypeAlias = PRNGKeyArray
Scalar: TypeAlias = Float[Array, ""]
Apply: TypeAlias = Any  # Callable[[PyTree, Array], Array]; jaxtyping cannot express it

__all__ = ["Array", "Float", "Int", "Key", "PyTree", "PyTreeT", "Scalar", "Apply", "jax"]
