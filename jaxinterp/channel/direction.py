"""Direction-level edges between the write channels of consecutive nodes of a sequential
channel model, computed by the interaction-basis edge code (:func:`jaxinterp.lib.edges.
layer_edges`): squared, stochastic or functional edges with any of LIB's quadrature rules.

Node ``a``'s write in channel coordinates is ``c_a = (o_a - o_bar_a) @ readout_a`` and
``o_a = o_bar_a + c_a @ omega_aᵀ`` on the support of its write covariance (every write
channel of numerical rank is kept). The section between consecutive nodes is then

    c_a  ->  (f_b(o_bar_a + c_a omega_aᵀ) - o_bar_b) @ readout_b,

a function of one example's coefficients, which is what LIB's edge code takes. With the
gradient rule and squared edges this is the channel-level edge E4 of the channel-graph spec
(section 4) averaged over positions instead of summed (``E4 / P``); the other rules and
kinds are LIB's. (One caveat: where a reader's pre-activation is exactly at a ReLU kink,
e.g. a unit whose inputs are all dead and whose bias is 0, the round-off of the
reconstruction picks a side of the kink and the gradient-rule edge can differ from E4.)

Residual models are not supported: there a reader's input is the sum of many writers, so
the map from one writer's coefficients to the reader's also depends on the other writers.

References:
    specs/channel-graph.md section 4 (E4, "direction-level edges reusing the interaction-
    basis edge code"); Bushnaq et al. (2024), "The Local Interaction Basis"
    (arXiv 2405.10928), for the squared gradient x activation edges.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_in, check_positive, fail
from .._types import Array, Key
from ..lib.edges import EDGE_KINDS, layer_edges
from ..lib.quadrature import quadrature
from .adapters import as_float
from .model import ChannelModel, to_float64, trace
from .subspaces import ChannelSet

__all__ = ["ChannelHat", "direction_edges"]


class ChannelHat(eqx.Module):
    """``c_a: (P, m_a) -> (f_b(o_bar_a + c_a omega_aᵀ) - o_bar_b) @ readout_b: (P, m_b)``
    for ONE example (a callable pytree).

    Attributes:
        f: reader node ``b``'s function of its read stream.
        omega: writer's channel vectors ``(d_a, m_a)``.
        mean_in: writer's mean write ``(d_a,)``.
        readout: reader's channel duals ``(d_b, m_b)``.
        mean_out: reader's mean write ``(d_b,)``.
    """

    f: Callable[[Array], Array]
    omega: Array
    mean_in: Array
    readout: Array
    mean_out: Array

    def __call__(self, c: Array) -> Array:
        o = self.mean_in[None, :] + c @ self.omega.T
        return (self.f(o) - self.mean_out[None, :]) @ self.readout


def direction_edges(
    model: ChannelModel,
    cs: ChannelSet,
    xs: Any,
    *,
    kind: str = "squared",
    rule: str = "gradient",
    n_intervals: int = 0,
    n_sources: int = 1,
    chunk_size: int = 64,
    key: Key | None = None,
) -> dict[tuple[int, int], np.ndarray]:
    """LIB edges between the graph-node write channels of nodes ``b - 1`` and ``b``.

    Args:
        model: a ``sequential`` :class:`~.model.ChannelModel`.
        cs: its channels (:func:`~.subspaces.channels_from_stats`); the graph-node channels
            of each node (``cs.graph_rank``) are used.
        xs: inputs with a leading ``batch`` axis.
        kind: ``squared``, ``stochastic`` or ``functional`` (LIB spec section 5).
        rule, n_intervals: LIB quadrature (``gradient``, ``trapezoidal``, ``gauss_legendre``).
        n_sources: random-sign draws per example (``stochastic``).
        chunk_size: examples per chunk.
        key: PRNG key (``stochastic`` only), keyword-last.

    Returns:
        ``{(b - 1, b): E (m_b, m_{b-1})}`` numpy float64, for every reader node ``b``.

    Raises:
        ValueError: for a residual model, channels of another model, or bad options.
    """
    fn = "direction_edges"
    if model.mode != "sequential":
        raise fail(fn, "model", "a sequential ChannelModel (in residual mode a reader's "
                   "input mixes several writers)", f"mode {model.mode!r}")
    n_nodes = model.n_blocks + 2
    if len(cs.nodes) != n_nodes:
        raise fail(fn, "cs", f"channels of {n_nodes} nodes (this model)", len(cs.nodes))
    check_in(fn, "kind", kind, EDGE_KINDS)
    check_positive(fn, "chunk_size", chunk_size, integer=True)
    quad = quadrature(rule, n_intervals)
    out: dict[tuple[int, int], np.ndarray] = {}
    with jax.enable_x64(True):
        m64 = to_float64(model)
        xs = as_float(xs)
        writes = jax.jit(jax.vmap(lambda x: trace(m64, x).writes))(xs)
        for b in range(1, n_nodes):
            a = b - 1
            na, nb = cs.nodes[a], cs.nodes[b]
            ra, rb = cs.graph_rank(a), cs.graph_rank(b)
            if ra == 0 or rb == 0:
                out[(a, b)] = np.zeros((rb, ra))
                continue
            w = jnp.asarray(writes[a], jnp.float64)  # (N, P, d_a)
            mean = jnp.asarray(na.write_mean)[None, None, :]
            xh = (w - mean) @ jnp.asarray(na.write_readout[:, :ra])
            hat = ChannelHat(
                f=m64.node_fn(b),
                omega=jnp.asarray(na.write_vectors[:, :ra]),
                mean_in=jnp.asarray(na.write_mean),
                readout=jnp.asarray(nb.write_readout[:, :rb]),
                mean_out=jnp.asarray(nb.write_mean),
            )
            k = None if key is None else jax.random.fold_in(key, b)
            out[(a, b)] = layer_edges(hat, xh, kind=kind, quad=quad, n_sources=n_sources,
                                      chunk_size=chunk_size, key=k)
    return out
