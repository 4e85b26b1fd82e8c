"""Interventions on equinox models as wrapper modules inserted with ``eqx.tree_at``.

An intervention never registers a global hook: it returns a *copy* of the model in which
one submodule, named by its keypath (``.layers[0]``), is wrapped. Because the wrapper is
an ordinary pytree node, the intervention's own parameters (here the additive ``delta``)
can be differentiated, vmapped and jitted like any other input.

References:
    Kidger & Garcia (2021), "Equinox: neural networks in JAX via callable PyTrees and
    filtered transformations" (``eqx.tree_at`` model surgery); Meng et al. (2022),
    "Locating and Editing Factual Associations in GPT" (activation interventions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp

from . import tree
from ._checks import fail
from ._types import Array

__all__ = ["AddToOutput", "perturb_at"]


class AddToOutput(eqx.Module):
    """``inner(x) + delta``: an additive perturbation of a submodule's output.

    ``delta`` must broadcast to the output of ``inner`` for ONE example without changing
    its shape (usually it has exactly that shape, e.g. ``(d_out,)`` for a linear layer).

    Attributes:
        inner: the wrapped callable submodule (e.g. ``eqx.nn.Linear``).
        delta: the added array.
    """

    inner: Callable[..., Array]
    delta: Array

    def __check_init__(self):
        if not callable(self.inner):
            raise fail("AddToOutput", "inner", "a callable submodule", type(self.inner).__name__)

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Array:
        """``inner(x, *args, **kwargs) + delta``; extra arguments go to ``inner``."""
        out = self.inner(x, *args, **kwargs)
        out_shape, delta_shape = jnp.shape(out), jnp.shape(self.delta)
        try:
            ok = jnp.broadcast_shapes(out_shape, delta_shape) == tuple(out_shape)
        except ValueError:
            ok = False
        if not ok:
            raise fail("AddToOutput", "delta", f"of a shape broadcasting to the output shape "
                       f"{tuple(out_shape)}", tuple(delta_shape),
                       "delta perturbs ONE example; call the model per example and vmap.")
        return out + self.delta


def perturb_at(model: Any, path: str, delta: Any) -> Any:
    """A copy of ``model`` whose submodule at ``path`` returns ``inner(x) + delta``.

    Args:
        model: an equinox model (any pytree).
        path: keypath of a callable submodule, e.g. ``".layers[0]"``.
        delta: array added to that submodule's output (for one example).

    Returns:
        The model with the node at ``path`` replaced by ``AddToOutput(node, delta)``;
        ``model`` itself is unchanged.

    Raises:
        ValueError: if ``path`` names no part of ``model`` or the node is not callable.
    """
    node = tree.get(model, path)
    if not callable(node):
        raise fail("perturb_at", "path", "to name a callable submodule", f"{path!r} -> "
                   f"{type(node).__name__}", "Address the layer (e.g. '.layers[0]'), not its "
                   "weights.")
    return tree.replace(model, path, AddToOutput(node, jnp.asarray(delta)))
