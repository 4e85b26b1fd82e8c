"""Compression faithfulness (spec section 3): replace block ``b`` by

    h~_b(r) = o_bar_b + P_U [h_b(r_bar_b + P_V (r - r_bar_b)) - o_bar_b]

with ``P_V`` the orthogonal projector onto the leading ``r_in`` read covectors and
``P_U`` the channel projector ``o - o_bar -> sum_{j <= r_out} c_j omega_j`` (the spec
says orthogonal; the channel projector is exact whenever the dropped channels carry no
relevant variance, also when ``K_bar`` is singular and the write vectors are not
orthogonal; both agree when they are), and report the divergence of the compressed model's
output from the clean one, ``Delta D = E_x D(y~(x), y(x))`` (``1/2 ||.||^2`` for
regression, ``KL(p || p~)`` for softmax), per block against the ranks kept and with all
blocks compressed at once. ``embed`` and ``unembed`` are boundary nodes and are never
compressed. Configurations are stacked projector pytrees evaluated with
``lax.map(..., batch_size=)`` over configurations inside a chunked scan over data.

References:
    specs/channel-graph.md section 3, "Compression test" (project method).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_positive, fail
from .._types import Array
from ..lib.stats import chunked_sum
from .adapters import as_float
from .model import ChannelModel, divergence, to_float64, trace
from .subspaces import NUMERICAL_RTOL, ChannelSet

__all__ = ["compressed_trace", "compression_curves", "compression_delta", "projectors"]

Ranks = Sequence[tuple[int | None, int | None]]


def compressed_trace(model: ChannelModel, x: Any, proj: Any) -> Any:
    """:func:`~.model.trace` with blocks ``1..n`` compressed.

    ``proj = (read_means, read_P, write_means, write_P)``, tuples over blocks ``1..n``
    of ``(d,)`` means and ``(d, d)`` projectors (identity: no compression)."""
    rm, rp, wm, wp = proj
    n = model.n_blocks

    def read_edit(k: int, r: Array) -> Array:
        if k > n:
            return r
        return rm[k - 1][None, :] + (r - rm[k - 1][None, :]) @ rp[k - 1]

    def write_edit(k: int, o: Array) -> Array:
        if k == 0 or k > n:
            return o
        return wm[k - 1][None, :] + (o - wm[k - 1][None, :]) @ wp[k - 1]

    return trace(model, x, read_edit=read_edit, write_edit=write_edit)


def _projector(basis: Any, r: int | None, d: int, dual: Any = None) -> np.ndarray:
    """``(d, d)`` right-multiplied projector: orthogonal onto ``basis[:, :r]``, or with
    ``dual`` the channel projector ``dual[:, :r] basis[:, :r]^T`` (keeps channels
    ``1..r`` and drops the others, along the channel vectors)."""
    if r is None or basis is None:
        return np.eye(d)
    r = min(r, basis.shape[1])
    b = basis[:, :r]
    return b @ b.T if dual is None else dual[:, :r] @ b.T


def projectors(cs: ChannelSet, ranks: Ranks) -> tuple[Any, ...]:
    """The projector pytree of one configuration: ``ranks[b] = (r_in, r_out)`` for blocks
    ``1..n`` (``None``: not compressed). A rank at or above the support dimension keeps
    the whole support (the projector onto it)."""
    nodes = cs.nodes[1:-1]
    if len(ranks) != len(nodes):
        raise fail("projectors", "ranks", f"one (r_in, r_out) per block ({len(nodes)})",
                   len(ranks))
    rm, rp, wm, wp = [], [], [], []
    for c, (ri, ro) in zip(nodes, ranks, strict=True):
        d_in, d_out = c.read_mean.shape[0], c.write_mean.shape[0]
        rm.append(np.asarray(c.read_mean))
        rp.append(_projector(c.V, ri, d_in))
        wm.append(np.asarray(c.write_mean))
        wp.append(_projector(c.write_vectors, ro, d_out, c.write_readout))
    return tuple(rm), tuple(rp), tuple(wm), tuple(wp)


@eqx.filter_jit
def _deltas(model: ChannelModel, xs: Any, stack: Any, chunk_size: int, batch: int) -> Array:
    def per_chunk(x: Any, mask: Array, idx: Array) -> Array:
        y0 = jax.vmap(lambda e: trace(model, e).y)(x)

        def one(proj: Any) -> Array:
            yc = jax.vmap(lambda e: compressed_trace(model, e, proj).y)(x)
            d = jax.vmap(lambda a, b: divergence(model.output, a, b[None]))(yc, y0)
            return jnp.dot(mask, d)

        return jax.lax.map(one, stack, batch_size=batch)

    return chunked_sum(per_chunk, xs, chunk_size=chunk_size)


def compression_delta(
    model: ChannelModel,
    cs: ChannelSet,
    xs: Any,
    configs: Sequence[Ranks],
    *,
    chunk_size: int = 512,
    config_batch: int = 16,
) -> np.ndarray:
    """``Delta D`` of each configuration (x64 enabled locally).

    Args:
        model: the cut model.
        cs: its channels.
        xs: inputs with a leading ``batch`` axis.
        configs: per configuration, ``(r_in, r_out)`` per block (``None``: keep).
        chunk_size: examples per chunk; config_batch: configurations per vmapped batch.

    Returns:
        ``(n_configs,)`` numpy float64.
    """
    check_positive("compression_delta", "chunk_size", chunk_size, integer=True)
    check_positive("compression_delta", "config_batch", config_batch, integer=True)
    if not len(configs):
        return np.zeros(0)
    with jax.enable_x64(True):
        stack = [projectors(cs, c) for c in configs]
        stack = jax.tree_util.tree_map(lambda *a: jnp.asarray(np.stack(a)), *stack)
        xs = as_float(xs)
        n = jax.tree_util.tree_leaves(xs)[0].shape[0]
        out = _deltas(to_float64(model), xs, stack, int(chunk_size), int(config_batch))
        return np.asarray(out, np.float64) / n


def _max_rank(values: Any) -> int:
    v = np.asarray(values, np.float64)
    top = float(v.max(initial=0.0))
    return int((v > NUMERICAL_RTOL * top).sum()) if top > 0 else 0


def compression_curves(
    model: ChannelModel,
    cs: ChannelSet,
    xs: Any,
    *,
    chunk_size: int = 512,
    config_batch: int = 16,
) -> dict[str, Any]:
    """Per block, ``Delta D`` against the ranks kept, and everything compressed at once.

    For block ``b`` and ``r = 0..R_b`` (``R_b`` = the larger numerical rank of its read
    and write spectra): ``both`` (``r_in = r_out = r``), ``read`` (``r_in = r``, writes
    kept) and ``write``. ``all``: every block at its ``eta`` ranks, at its numerical ranks,
    and each block's weakest numerical read / write channel dropped (others kept).

    Returns:
        ``{"blocks": {name: {"ranks", "both", "read", "write", "numerical_rank_in",
        "numerical_rank_out"}}, "all_eta": float, "all_numerical": float,
        "drop_weakest_read": {name: float}, "drop_weakest_write": {name: float},
        "compression_ratio": float}``.
    """
    nodes = cs.nodes[1:-1]
    n = len(nodes)
    keep: list[tuple[int | None, int | None]] = [(None, None)] * n
    configs, tags = [], []
    num_in = [_max_rank(c.read_lambdas) for c in nodes]
    num_out = [_max_rank(c.write_mus) for c in nodes]
    for b, c in enumerate(nodes):
        for r in range(max(num_in[b], num_out[b]) + 1):
            for kind, rk in (("both", (r, r)), ("read", (r, None)), ("write", (None, r))):
                cfg = list(keep)
                cfg[b] = rk
                configs.append(cfg)
                tags.append((c.name, kind, r))
    eta_ranks = [(cs.rank_in(b + 1), cs.rank_out(b + 1)) for b in range(n)]
    configs.append(eta_ranks)
    tags.append(("all", "eta", None))
    configs.append(list(zip(num_in, num_out, strict=True)))
    tags.append(("all", "numerical", None))
    for b, c in enumerate(nodes):
        for kind, rk in (("read", (max(num_in[b] - 1, 0), None)),
                         ("write", (None, max(num_out[b] - 1, 0)))):
            cfg = list(keep)
            cfg[b] = rk
            configs.append(cfg)
            tags.append((c.name, f"drop_{kind}", None))
    vals = compression_delta(model, cs, xs, configs, chunk_size=chunk_size,
                             config_batch=config_batch)
    out: dict[str, Any] = {"blocks": {}, "drop_weakest_read": {}, "drop_weakest_write": {}}
    for b, c in enumerate(nodes):
        out["blocks"][c.name] = {"ranks": [], "both": [], "read": [], "write": [],
                                 "numerical_rank_in": num_in[b],
                                 "numerical_rank_out": num_out[b]}
    for (name, kind, r), v in zip(tags, vals, strict=True):
        if name == "all":
            out[f"all_{kind}"] = float(v)
        elif kind.startswith("drop_"):
            out[f"drop_weakest_{kind[5:]}"][name] = float(v)
        else:
            entry = out["blocks"][name]
            if kind == "both":
                entry["ranks"].append(r)
            entry[kind].append(float(v))
    dims = sum(c.read_mean.shape[0] + c.write_mean.shape[0] for c in nodes)
    out["compression_ratio"] = float(sum(a + b for a, b in eta_ranks) / dims)
    out["eta_ranks"] = {c.name: list(r) for c, r in zip(nodes, eta_ranks, strict=True)}
    return out
