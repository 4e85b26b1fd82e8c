"""Small building blocks shared by the MLP toys."""

from __future__ import annotations

import equinox as eqx

from .._types import Array, Float


class Dense(eqx.Module):
    """``x @ weight + bias`` with ``weight: (d_in, d_out)`` (row-vector convention)."""

    weight: Float[Array, "d_in d_out"]
    bias: Float[Array, " d_out"]

    def __call__(self, x: Float[Array, " d_in"]) -> Float[Array, " d_out"]:
        return x @ self.weight + self.bias
