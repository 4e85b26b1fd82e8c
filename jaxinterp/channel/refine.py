"""Optional joint refinement of each block's read and write subspaces (spec section 3,
"Large d"): HOOI on the block's Jacobian stack.

The read channels (``A_b``) and write channels (``B_b``) of :mod:`.subspaces` are found
separately, one from the Jacobian's row space and one from the output covariance. The
joint refinement instead asks for the pair of subspaces through which the block's
linearisation passes the most: with read covectors ``rho (d_in, r_in)``, ``rho^T Sigma_b
rho = I``, and write vectors ``omega (d_out, r_out)``, ``omega^T K_bar_b omega = I``, it
maximises the captured energy

    sum_x || (K_bar omega)^T J_b(x) (Sigma rho) ||_F^2

(in whitened coordinates ``Q = Sigma^{1/2} rho``, ``W = K_bar^{1/2} omega`` this is
``sum_x ||W^T K_bar^{1/2} J_b Sigma^{1/2} Q||^2``: a Tucker-2 decomposition of the stack
``x -> J~_b(x)`` with the example mode kept whole; with a position axis the same channels
act at every position). Higher-order orthogonal iteration alternates

    read:  G_in  = sum_x J^T (K_bar omega)(K_bar omega)^T J   (VJPs),  channels of (G_in, Sigma)
    write: G_out = sum_x J (Sigma rho)(Sigma rho)^T J^T       (JVPs),  channels of (G_out, K_bar)

from the HOSVD start on the cheaper mode (the other mode whole), and the captured energy
never decreases. "Channels of (G, S)" are :func:`~.subspaces.eigen_channels` of ``G``
and ``S``, the same construction (and the same support convention) as the separate
channels: the spectrum is that of ``S^{1/2} G S^{1/2}``, the vectors lie in the support
of ``G``, i.e. the covectors in what the block reads and the write vectors in what it
writes from the kept reads. Both products are streamed over the data in float64, one
vmapped VJP or JVP per basis column and position.

The result is a :class:`~.subspaces.ChannelSet` whose blocks carry the refined channels
(the ``r_in`` / ``r_out`` kept, with their captured energies as ``lambda`` / ``mu``), so
the compression test of :mod:`.compression` runs on it unchanged. The reduced channel
map is ``J^_b(x) = (K_bar omega)^T J_b(x) (Sigma rho)``, whose squared norm summed over
the data is the captured energy.

References:
    specs/channel-graph.md section 3 (project method); De Lathauwer, De Moor, Vandewalle
    (2000), "On the best rank-1 and rank-(R1, R2, ..., RN) approximation of higher-order
    tensors" (HOOI).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_nonnegative, check_positive, fail
from .._types import Array
from ..lib.stats import chunked_sum, einsum64, host_blas
from .adapters import as_float
from .compression import compression_delta
from .model import ChannelModel, to_float64, trace
from .stats import ChannelStats
from .subspaces import ChannelSet, NodeChannels, eigen_channels, nested_orth, support_sqrt

__all__ = ["Refinement", "reduced_map", "refine_channels", "refined_compression"]

# Floats held per chunk by the vmapped VJP/JVP pass (tangents x outputs x examples).
_CHUNK_FLOATS = 1 << 22


class Refinement(NamedTuple):
    """Jointly refined channels.

    Attributes:
        channels: a :class:`~.subspaces.ChannelSet` whose blocks ``1..n`` hold the
            refined channels (``read_lambdas`` / ``write_mus``: the captured energy per
            example of each kept read / write channel, from the last update of that
            mode); ``embed`` and ``unembed`` are the input's.
        ranks: ``(r_in, r_out)`` per block.
        total: per block, ``sum_x ||K_bar^{1/2} J_b(x) Sigma^{1/2}||_F^2 / n``.
        captured: per block, the captured fraction of ``total``: the start's first mode
            (the other mode whole), then after every mode update (non-decreasing from
            the second entry on).
        n_iter: the alternations asked for.
    """

    channels: ChannelSet
    ranks: tuple[tuple[int, int], ...]
    total: tuple[float, ...]
    captured: tuple[list[float], ...]
    n_iter: int


def _probes(basis: Array, shape: tuple[int, ...]) -> Array:
    """``(P m, P, d)``: column ``j`` of ``basis: (d, m)`` at position ``p``."""
    p, d = shape
    eye = jnp.eye(p, dtype=basis.dtype)
    return jnp.einsum("pq,dj->pjqd", eye, basis).reshape(p * basis.shape[1], p, d)


@eqx.filter_jit
def _gram_pass(model: ChannelModel, xs: Any, k: int, basis: Array, side: str,
               chunk_size: int) -> Array:
    """``sum_x sum_probes`` Gram of ``J^T c`` (``side="in"``: cotangents ``c`` are the
    columns of ``basis (d_out, m)`` at every output position; the Gram is over ``d_in``,
    summed over input positions) or of ``J t`` (``"out"``: tangents from ``basis (d_in,
    m)``; Gram over ``d_out``)."""
    f = model.node_fn(k)

    def one(x: Any) -> Array:
        r = trace(model, x).reads[k - 1]
        if side == "in":
            o, vjp = jax.vjp(f, r)
            g = jax.vmap(lambda c: vjp(c)[0])(_probes(basis, o.shape))
        else:
            g = jax.vmap(lambda t: jax.jvp(f, (r,), (t,))[1])(_probes(basis, r.shape))
        return einsum64("ips,ipt->st", g, g)

    def per_chunk(chunk: Any, mask: Array, idx: Array) -> Array:
        return jnp.tensordot(mask, jax.vmap(one)(chunk), axes=1)

    return chunked_sum(per_chunk, xs, chunk_size=chunk_size)


def _check_ranks(fn: str, ranks: Sequence[tuple[int, int]] | None, n: int) -> None:
    if ranks is None:
        return
    if len(ranks) != n:
        raise fail(fn, "ranks", f"one (r_in, r_out) per block ({n})", len(ranks))
    for b, rk in enumerate(ranks):
        if len(rk) != 2:
            raise fail(fn, f"ranks[{b}]", "a pair (r_in, r_out)", rk)
        for side, v in zip(("r_in", "r_out"), rk, strict=True):
            check_positive(fn, f"ranks[{b}].{side}", v, integer=True)


def refine_channels(
    model: ChannelModel,
    xs: Any,
    stats: ChannelStats,
    cs: ChannelSet,
    *,
    ranks: Sequence[tuple[int, int]] | None = None,
    n_iter: int = 10,
    tol: float = 1e-10,
    chunk_size: int = 128,
) -> Refinement:
    """HOOI on every block's whitened Jacobian stack (module docstring).

    Args:
        model: the cut model.
        xs: inputs with a leading ``batch`` axis (the data of ``stats``).
        stats: :func:`~.stats.channel_stats` of the same model and data (``Sigma_b``,
            ``K_bar_b``, means).
        cs: its channels; the default ranks are the blocks' ``eta`` ranks.
        ranks: ``(r_in, r_out)`` per block ``1..n`` (clipped to the supports of
            ``Sigma_b`` and ``K_bar_b``).
        n_iter: alternations after the start (each updates both modes). The start is
            the HOSVD basis of the cheaper mode (the other mode kept whole) and the other
            mode's best response to it.
        tol: stop when an alternation raises the captured fraction by less than this.
        chunk_size: at most this many examples per vmapped chunk (fewer when the probes
            of one example are many).

    Returns:
        :class:`Refinement`.

    Raises:
        ValueError: on bad ``ranks``, ``n_iter``, ``tol`` or ``chunk_size``.
    """
    fn = "refine_channels"
    n = model.n_blocks
    _check_ranks(fn, ranks, n)
    check_nonnegative(fn, "n_iter", n_iter, integer=True)
    check_nonnegative(fn, "tol", tol)
    check_positive(fn, "chunk_size", chunk_size, integer=True)
    if len(cs.nodes) != n + 2:
        raise fail(fn, "cs", f"channels of n_blocks + 2 = {n + 2} nodes", len(cs.nodes))
    nodes, all_ranks, totals, fractions = [cs.nodes[0]], [], [], []
    with jax.enable_x64(True):
        m64, xs64 = to_float64(model), as_float(xs)
        count = jax.tree_util.tree_leaves(xs64)[0].shape[0]
        x0 = jax.tree_util.tree_map(lambda a: a[0], xs64)
        tr = jax.eval_shape(lambda: trace(m64, x0))
        for k in range(1, n + 1):
            sig, kbar = stats.read_cov[k], stats.relevance[k]
            e_in, s_in = support_sqrt(sig)
            e_out, s_out = support_sqrt(kbar)
            p_in, d_in = tr.reads[k - 1].shape
            p_out, d_out = tr.writes[k].shape
            k_in, k_out = e_in.shape[1], e_out.shape[1]
            want = ranks[k - 1] if ranks is not None else (cs.rank_in(k), cs.rank_out(k))
            r_in, r_out = min(max(want[0], 1), k_in), min(max(want[1], 1), k_out)

            def gram(basis: np.ndarray, side: str, *, k=k, p_in=p_in, p_out=p_out,
                     d_in=d_in, d_out=d_out) -> np.ndarray:
                width = (p_out if side == "in" else p_in) * basis.shape[1]
                size = width * max(p_in * d_in, p_out * d_out)
                chunk = max(1, min(int(chunk_size), _CHUNK_FLOATS // max(size, 1)))
                g = _gram_pass(m64, xs64, k, jnp.asarray(basis), side, chunk)
                return np.asarray(g, np.float64) / count

            def reads(g_in: np.ndarray, *, sig=sig, r_in=r_in) -> tuple[np.ndarray, ...]:
                lam, rho, _ = eigen_channels(g_in, sig)
                return lam[:r_in], rho[:, :r_in]

            def writes(g_out: np.ndarray, *, kbar=kbar, r_out=r_out) -> tuple[np.ndarray, ...]:
                mu, om, ro = eigen_channels(g_out, kbar)
                return mu[:r_out], om[:, :r_out], ro[:, :r_out]

            if min(r_in, r_out) <= 0:
                lam, rho = np.zeros(0), np.zeros((d_in, 0))
                mu, omega, readout = np.zeros(0), np.zeros((d_out, 0)), np.zeros((d_out, 0))
                total, captured = 0.0, []
            else:
                with host_blas(max(d_in, d_out)):
                    # Start: the HOSVD basis of the cheaper mode (all of the other mode
                    # kept: Sigma^{1/2} or K_bar^{1/2} on its support), then the other
                    # mode's best response to it.
                    # total: all of the whitened Jacobian energy, tr(G S) of the full Gram
                    if p_in * k_in <= p_out * k_out:
                        g = gram(e_in * s_in, "out")
                        total = float(np.sum(g * kbar))
                        mu, omega, readout = writes(g)
                        lam, rho = reads(gram(kbar @ omega, "in"))
                        order, first = ("w", "r"), mu
                    else:
                        g = gram(e_out * s_out, "in")
                        total = float(np.sum(g * sig))
                        lam, rho = reads(g)
                        mu, omega, readout = writes(gram(sig @ rho, "out"))
                        order, first = ("r", "w"), lam

                    def frac(v: np.ndarray, total=total) -> float:
                        return float(v.sum()) / total if total > 0 else 0.0

                    captured = [frac(first), frac(lam if order[0] == "w" else mu)]
                    for _ in range(n_iter):
                        before = captured[-1]
                        for side in order:
                            if side == "w":
                                mu, omega, readout = writes(gram(sig @ rho, "out"))
                                captured.append(frac(mu))
                            else:
                                lam, rho = reads(gram(kbar @ omega, "in"))
                                captured.append(frac(lam))
                        if captured[-1] - before < tol:
                            break
            nodes.append(NodeChannels(
                name=model.node_names[k], read_lambdas=lam, read_covectors=rho,
                read_mean=stats.read_mean[k], V=nested_orth(rho), write_mus=mu,
                write_vectors=omega, write_readout=readout, write_mean=stats.write_mean[k],
                U=nested_orth(omega)))
            all_ranks.append((int(lam.shape[0]), int(mu.shape[0])))
            totals.append(total)
            fractions.append(captured)
    nodes.append(cs.nodes[-1])
    refined = ChannelSet(tuple(nodes), cs.eta, cs.node_rank)
    return Refinement(refined, tuple(all_ranks), tuple(totals), tuple(fractions), int(n_iter))


def reduced_map(model: ChannelModel, ref: Refinement, stats: ChannelStats, k: int,
                x: Any) -> Array:
    """The reduced channel map of block ``k`` (``1..n``) at ONE input ``x``,
    ``(K_bar omega_j)^T J(x)[p_out, :, p_in, :] (Sigma rho_i)``, shape ``(P_out, r_out,
    P_in, r_in)`` (call inside an x64 context for float64)."""
    node = ref.channels.nodes[k]
    r = trace(model, x).reads[k - 1]
    tangents = jnp.asarray(stats.read_cov[k] @ node.read_covectors, r.dtype)
    cots = jnp.asarray(stats.relevance[k] @ node.write_vectors, r.dtype)
    f = model.node_fn(k)
    p_in, r_in = r.shape[0], tangents.shape[1]
    jt = jax.vmap(lambda t: jax.jvp(f, (r,), (t,))[1])(_probes(tangents, r.shape))
    c = jnp.einsum("npd,dj->npj", jt, cots)  # (P_in r_in, P_out, r_out)
    return c.reshape(p_in, r_in, *c.shape[1:]).transpose(2, 3, 0, 1)


def refined_compression(model: ChannelModel, ref: Refinement, xs: Any, *,
                        chunk_size: int = 512) -> dict[str, Any]:
    """The compression test (:func:`~.compression.compression_delta`, same projectors)
    with the refined channels at their ranks: every block at once (``all``) and each
    block alone (``blocks``: ``delta``, ``ranks``, the captured fraction at the start
    with both modes truncated and at the end, and the mode updates after the start)."""
    n = len(ref.ranks)
    full: list[tuple[int | None, int | None]] = list(ref.ranks)
    configs = [full]
    for i in range(n):
        cfg: list[tuple[int | None, int | None]] = [(None, None)] * n
        cfg[i] = full[i]
        configs.append(cfg)
    vals = compression_delta(model, ref.channels, xs, configs, chunk_size=chunk_size)
    names = ref.channels.names[1:-1]
    return {
        "all": float(vals[0]),
        "blocks": {name: {"delta": float(v), "ranks": list(rk),
                          "captured_start": c[1] if c else 0.0,
                          "captured": c[-1] if c else 0.0,
                          "updates": max(len(c) - 2, 0)}
                   for name, v, rk, c in zip(names, vals[1:], ref.ranks, ref.captured,
                                             strict=True)},
        "n_iter": ref.n_iter,
    }
