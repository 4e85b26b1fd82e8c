"""Targets from any JAX model: a pure ``apply(params, x) -> y`` plus a params pytree.

Every transform in jaxinterp differentiates a *target*: a function of one example ``x``
whose trainable parameters are an explicit pytree. This module turns the three common
ways of writing a JAX model into that form:

* equinox: :func:`from_equinox` partitions the module into arrays and the rest;
* Flax linen: :func:`from_linen` binds the non-``params`` collections, and
  :func:`linen_activation_apply` exposes linen's ``perturb`` points as an argument so that
  Jacobians with respect to intermediate activations are ordinary Jacobians;
* Flax NNX: :func:`from_nnx` splits the module into its ``nnx.Param`` state and the rest.

A model's ``apply`` takes ONE example; callers (and :meth:`Target.batched`) vmap.

References:
    Kidger & Garcia (2021), "Equinox: neural networks in JAX via callable PyTrees and
    filtered transformations" (partition/combine); Heek et al. (2023), "Flax: A neural
    network library and ecosystem for JAX" (linen ``apply``/``perturb``, NNX split/merge).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ._checks import fail
from ._types import Array, PyTree

__all__ = [
    "Target",
    "from_equinox",
    "from_linen",
    "from_nnx",
    "linen_activation_apply",
    "linen_perturbations",
]


class Target(eqx.Module):
    """A model as a pure function of its parameters and ONE example.

    Attributes:
        apply: ``apply(params, x) -> y`` for a single example ``x`` (no batch axis).
        params: the parameter pytree that ``apply`` is differentiated with respect to.

    Example:
        >>> target = from_equinox(eqx.nn.MLP(3, 2, 8, 1, key=jax.random.key(0)))
        >>> target(jnp.ones(3)).shape
        (2,)
        >>> target.batched(jnp.ones((5, 3))).shape
        (5, 2)
    """

    apply: Callable[[PyTree, Any], Any] = eqx.field(static=True)
    params: PyTree

    def __check_init__(self):
        if not callable(self.apply):
            raise fail("Target", "apply", "a callable apply(params, x)",
                       type(self.apply).__name__)

    def __call__(self, x: Any) -> Any:
        """``apply(params, x)`` for one example ``x``."""
        return self.apply(self.params, x)

    def batched(self, xs: Any) -> Any:
        """``apply`` vmapped over the leading ``batch`` axis of ``xs``."""
        if any(jnp.ndim(leaf) == 0 for leaf in jax.tree_util.tree_leaves(xs)):
            raise fail("Target.batched", "xs", "a leading batch axis",
                       jax.tree_util.tree_map(jnp.shape, xs), "Use target(x) for one example.")
        return jax.vmap(self.apply, in_axes=(None, 0))(self.params, xs)


# --- equinox -----------------------------------------------------------------------


def _is_weight_leaf(x: Any) -> bool:
    return getattr(type(x), "is_weight_leaf", False) is True


class _EquinoxApply:
    """``apply(params, x) = eqx.combine(params, static)(x)``; hashes by identity."""

    __slots__ = ("static",)

    def __init__(self, static: Any):
        self.static = static

    def __call__(self, params: PyTree, x: Any) -> Any:
        # A weight leaf may have been replaced by a wrapper module (e.g. the weight-use
        # interception of jaxinterp.decomposition.weights): keep it whole.
        return eqx.combine(params, self.static, is_leaf=_is_weight_leaf)(x)

    def __repr__(self) -> str:
        return f"equinox_apply({type(self.static).__name__})"


def from_equinox(module: eqx.Module, filter_spec: Any = eqx.is_inexact_array) -> Target:
    """Target of an equinox module whose ``__call__`` takes one example.

    Args:
        module: a callable ``eqx.Module``.
        filter_spec: which leaves are parameters, as for ``eqx.partition`` (a predicate or
            a pytree of bools). Default: every inexact (floating) array.

    Returns:
        ``Target`` with ``params`` the selected part of ``module`` (other leaves ``None``)
        and ``apply`` recombining it with the rest, which is closed over.

    Raises:
        ValueError: if ``module`` is not a callable ``eqx.Module``.
    """
    if not isinstance(module, eqx.Module) or not callable(module):
        raise fail("from_equinox", "module", "a callable eqx.Module", type(module).__name__,
                   "Wrap plain functions with Target(apply, params) instead.")
    params, static = eqx.partition(module, filter_spec)
    return Target(apply=_EquinoxApply(static), params=params)


# --- Flax linen --------------------------------------------------------------------


def _check_linen(fn: str, module: Any, variables: Any) -> dict[str, Any]:
    import flax.linen as nn

    if not isinstance(module, nn.Module):
        raise fail(fn, "module", "a flax.linen.Module", type(module).__name__)
    if not isinstance(variables, Mapping) or "params" not in variables:
        got = list(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise fail(fn, "variables", "a mapping with a 'params' collection", got,
                   "Pass what module.init(key, x) returned.")
    return dict(variables)


def from_linen(module: Any, variables: Mapping[str, Any], *, method: Any = None) -> Target:
    """Target of a Flax linen module.

    Args:
        module: a ``flax.linen.Module``.
        variables: what ``module.init`` returned; must contain ``'params'``. The other
            collections (``batch_stats``, constants, ...) are held fixed; a
            ``'perturbations'`` collection is dropped (see :func:`linen_activation_apply`).
        method: the ``method`` passed to ``module.apply`` (default ``__call__``).

    Returns:
        ``Target`` with ``params = variables['params']`` and
        ``apply(params, x) = module.apply({'params': params, **rest}, x)``.

    Raises:
        ValueError: if ``module`` is not a linen module or ``variables`` has no params.
    """
    variables = _check_linen("from_linen", module, variables)
    rest = {k: v for k, v in variables.items() if k not in ("params", "perturbations")}

    def apply(params: PyTree, x: Any) -> Any:
        return module.apply({"params": params, **rest}, x, method=method)

    return Target(apply=apply, params=variables["params"])


def linen_activation_apply(
    module: Any,
    variables: Mapping[str, Any],
    *,
    method: Any = None,
    collection: str = "perturbations",
) -> Callable[[PyTree, Any, PyTree], Any]:
    """``apply(params, x, perturbations)`` for a linen module that calls ``self.perturb``.

    Each ``h = self.perturb(name, h)`` in the module becomes ``h + perturbations[...][name]``,
    so the Jacobian of the output with respect to ``perturbations`` at zero is the
    Jacobian with respect to the activation ``h``. Build the zero perturbations for one
    example with :func:`linen_perturbations`.

    Args:
        module: a ``flax.linen.Module``.
        variables: what ``module.init`` returned (its own ``collection`` entry, which was
            shaped by the init batch, is ignored).
        method: the ``method`` passed to ``module.apply``.
        collection: the perturbation collection name used in ``self.perturb``.

    Returns:
        ``apply(params, x, perturbations) -> y`` for one example ``x``.

    Raises:
        ValueError: if ``module`` is not a linen module or ``variables`` has no params.
    """
    variables = _check_linen("linen_activation_apply", module, variables)
    rest = {k: v for k, v in variables.items() if k not in ("params", collection)}

    def apply(params: PyTree, x: Any, perturbations: PyTree) -> Any:
        return module.apply(
            {"params": params, **rest, collection: perturbations}, x, method=method
        )

    return apply


def linen_perturbations(
    module: Any,
    variables: Mapping[str, Any],
    x: Any,
    *,
    method: Any = None,
    collection: str = "perturbations",
) -> PyTree:
    """Zero perturbations for ONE example ``x`` (shapes of the activations, no batch axis).

    Raises:
        ValueError: if the module has no ``self.perturb`` call in ``collection``.
    """
    variables = _check_linen("linen_perturbations", module, variables)
    rest = {k: v for k, v in variables.items() if k != collection}
    _, state = jax.eval_shape(
        lambda v, x: module.apply(v, x, method=method, mutable=[collection]), rest, x
    )
    if collection not in state or not jax.tree_util.tree_leaves(state[collection]):
        raise fail("linen_perturbations", "module", f"to call self.perturb(name, h) "
                   f"(collection {collection!r})", type(module).__name__)
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), state[collection])


# --- Flax NNX ----------------------------------------------------------------------


def from_nnx(module: Any) -> Target:
    """Target of a Flax NNX module whose ``__call__`` takes one example.

    Args:
        module: a ``flax.nnx.Module``.

    Returns:
        ``Target`` with ``params`` the module's ``nnx.Param`` state and
        ``apply(params, x) = nnx.merge(graphdef, params, rest)(x)``; the non-Param state
        (RNG counters, batch statistics, ...) is closed over and held fixed.

    Raises:
        ValueError: if ``module`` is not an NNX module.
    """
    from flax import nnx

    if not isinstance(module, nnx.Module):
        raise fail("from_nnx", "module", "a flax.nnx.Module", type(module).__name__)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def apply(params: PyTree, x: Any) -> Array:
        return nnx.merge(graphdef, params, rest)(x)

    return Target(apply=apply, params=params)
