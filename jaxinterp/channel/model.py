"""A network as channels on a stream: ``embed``, blocks that read the stream and write to
it, and ``unembed``; the traced forward pass and the per-datum divergence ``D``.

Nodes are numbered ``0 = embed``, ``1..n = blocks``, ``n + 1 = unembed``. Every node but
``unembed`` is a *writer* (``embed`` writes ``r_0``); every node but ``embed`` is a
*reader* (``unembed`` reads the final stream and "writes" the output ``y``).

* ``residual`` mode: the stream ``r: (P, d)`` starts at ``r_0``; blocks of equal depth
  read the same stream and their writes are added to it.
* ``sequential`` mode: block ``k`` reads block ``k - 1``'s write (widths may differ).

Every block is a pure function of ONE example's stream, ``(P, d_in) -> (P, d_out)``;
:func:`trace` runs the model with optional edits of every read and write (used for
compression and ablation) and additive write perturbations ``deltas`` (whose VJP gives
``Phi_b^T eps`` and ``g_b = dD/do_b`` for all blocks at once).

References:
    specs/channel-graph.md sections 0-1 (project method); Elhage et al. (2021), "A
    Mathematical Framework for Transformer Circuits" (the residual stream as a
    communication channel).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from .._checks import check_in, fail
from .._types import Array

__all__ = ["MODES", "OUTPUTS", "ChannelModel", "Trace", "divergence", "to_float64", "trace"]

MODES = ("residual", "sequential")
OUTPUTS = ("regression", "softmax")

Edit = Callable[[int, Array], Array]


class ChannelModel(eqx.Module):
    """A model cut into channel blocks. Call on ONE example; vmap for batches.

    Attributes:
        embed: ``x -> r_0: (P, d)``.
        blocks: block functions ``(P, d_in) -> (P, d_out)`` (equinox modules).
        unembed: ``r -> y: (P_y, k)`` (logits for ``softmax`` outputs).
        names: block names (keypaths where they exist), static.
        depths: block depths (non-decreasing; equal depth = parallel), static.
        mode: ``residual`` or ``sequential``.
        output: ``regression`` (``F_y = I``) or ``softmax`` (``F_y = diag p - p p^T``).
    """

    embed: Any
    blocks: tuple[Any, ...]
    unembed: Any
    names: tuple[str, ...] = eqx.field(static=True)
    depths: tuple[int, ...] = eqx.field(static=True)
    mode: str = eqx.field(static=True, default="residual")
    output: str = eqx.field(static=True, default="regression")

    def __check_init__(self):
        fn = "ChannelModel"
        check_in(fn, "mode", self.mode, MODES)
        check_in(fn, "output", self.output, OUTPUTS)
        n = len(self.blocks)
        if len(self.names) != n or len(self.depths) != n:
            raise fail(fn, "names and depths", f"one per block ({n})",
                       (len(self.names), len(self.depths)))
        if len(set(self.names)) != n or {"embed", "unembed"} & set(self.names):
            raise fail(fn, "names", "unique block names other than embed/unembed", self.names)
        if any(b < a for a, b in zip(self.depths, self.depths[1:], strict=False)):
            raise fail(fn, "depths", "non-decreasing", self.depths)
        if self.mode == "sequential" and len(set(self.depths)) != n:
            raise fail(fn, "depths", "distinct in sequential mode", self.depths)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def node_names(self) -> tuple[str, ...]:
        """``("embed", *names, "unembed")``."""
        return ("embed", *self.names, "unembed")

    @property
    def node_depths(self) -> tuple[float, ...]:
        return (-float("inf"), *map(float, self.depths), float("inf"))

    def node_fn(self, k: int) -> Callable[[Array], Array]:
        """The function of reader node ``k`` (``1..n + 1``)."""
        if not 1 <= k <= self.n_blocks + 1:
            raise fail("ChannelModel.node_fn", "k", f"a reader node in 1..{self.n_blocks + 1}", k)
        return self.unembed if k == self.n_blocks + 1 else self.blocks[k - 1]

    def writers_of(self, k: int) -> tuple[int, ...]:
        """The admissible writers of reader node ``k``: every node of smaller depth
        (``residual``) or node ``k - 1`` (``sequential``)."""
        if self.mode == "sequential":
            return (k - 1,)
        depth = self.node_depths[k]
        return tuple(a for a in range(k) if self.node_depths[a] < depth)

    def __call__(self, x: Any) -> Array:
        return trace(self, x).y


class Trace(NamedTuple):
    """One example's forward pass.

    Attributes:
        reads: per reader node ``1..n+1`` the stream it read (before any read edit).
        writes: per writer node ``0..n`` its write (after edits and deltas).
        y: the output ``(P_y, k)``.
    """

    reads: tuple[Array, ...]
    writes: tuple[Array, ...]
    y: Array


def _groups(depths: Sequence[int]) -> list[list[int]]:
    groups: list[list[int]] = []
    for i, dpt in enumerate(depths):
        if groups and depths[groups[-1][0]] == dpt:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def trace(
    model: ChannelModel,
    x: Any,
    *,
    deltas: Sequence[Array] | None = None,
    read_edit: Edit | None = None,
    write_edit: Edit | None = None,
) -> Trace:
    """Run ``model`` on ONE example, recording reads and writes.

    Args:
        model: the model.
        x: one input.
        deltas: ``n + 2`` arrays added to the writes of nodes ``0..n+1`` (``n + 1``: to
            ``y``), e.g. zeros to differentiate with respect to them.
        read_edit: ``(k, r) -> r'`` applied to the stream read by node ``k`` before its
            function (the recorded read is ``r``).
        write_edit: ``(k, o) -> o'`` applied to node ``k``'s write (``k = n + 1``: ``y``).

    Returns:
        :class:`Trace`.
    """
    n = model.n_blocks
    if deltas is not None and len(deltas) != n + 2:
        raise fail("trace", "deltas", f"n_blocks + 2 = {n + 2} arrays", len(deltas))

    def write(k: int, o: Array) -> Array:
        o = o if write_edit is None else write_edit(k, o)
        return o if deltas is None else o + deltas[k]

    def read(k: int, r: Array) -> Array:
        return r if read_edit is None else read_edit(k, r)

    reads: list[Array] = []
    writes = [write(0, model.embed(x))]
    stream = writes[0]
    for group in _groups(model.depths):
        outs = []
        for i in group:
            reads.append(stream)
            outs.append(write(i + 1, model.blocks[i](read(i + 1, stream))))
        writes += outs
        if model.mode == "sequential":
            stream = outs[0]
        else:
            for o in outs:
                stream = stream + o
    reads.append(stream)
    y = write(n + 1, model.unembed(read(n + 1, stream)))
    return Trace(tuple(reads), tuple(writes), y)


def write_shapes(model: ChannelModel, x: Any) -> tuple[tuple[int, ...], ...]:
    """Shapes of the writes of nodes ``0..n+1`` (``n + 1``: ``y``) for input ``x``."""
    tr = jax.eval_shape(lambda: trace(model, x))
    return tuple(w.shape for w in tr.writes) + (tr.y.shape,)


def divergence(output: str, y: Array, y_ref: Array) -> Array:
    """Per-datum divergence of ``y`` from reference outputs, averaged over references.

    Args:
        output: ``regression`` (``1/2 ||y - y_ref||^2``) or ``softmax``
            (``KL(softmax(y_ref) || softmax(y))``, summed over positions).
        y: ``(P_y, k)``.
        y_ref: ``(n_ref, P_y, k)``.

    Returns:
        A scalar.
    """
    if output == "regression":
        return 0.5 * jnp.mean(jnp.sum((y[None] - y_ref) ** 2, axis=(1, 2)))
    logp = jax.nn.log_softmax(y, axis=-1)
    logq = jax.nn.log_softmax(y_ref, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(logq) * (logq - logp[None]), axis=(1, 2)))


def to_float64(model: Any) -> Any:
    """``model`` with every floating array cast to float64 (call inside an x64 context);
    a model with a ``to_float64`` method (exact re-orthonormalisation) uses it."""
    if hasattr(model, "to_float64"):
        return model.to_float64()
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64) if eqx.is_inexact_array(a) else a, model
    )
