"""Per-block read and write channels from the float64 statistics (spec section 3).

Read channels (readers): the non-zero spectrum ``lambda`` of the spec's
``A_b = Sigma_b^{1/2} M_b Sigma_b^{1/2}`` is that of ``M_b^{1/2} Sigma_b M_b^{1/2}``;
diagonalising the latter on the support of ``M_b`` (eigenvalues above ``1e-12`` times the
largest) with eigenvectors ``q_i`` gives

    rho_i = M_b^{1/2} q_i / sqrt(lambda_i),   z_i(x) = rho_i^T (r_b(x) - r_bar_b),

unit-variance read coefficients whose covectors lie in the row space of the block's
Jacobians. Write channels (writers and ``unembed``, whose write is ``y``): the spectrum
``mu`` of ``B_b = K_bar^{1/2} Sigma^o K_bar^{1/2}`` from ``Sigma^{o 1/2} K_bar
Sigma^{o 1/2}`` on the support of ``Sigma^o``,

    omega_j = Sigma^{o 1/2} q_j / sqrt(mu_j),   c_j(x) = sqrt(mu_j) q_j^T (Sigma^{o 1/2})^+
    (o_b(x) - o_bar_b),

so ``o_b - o_bar_b = sum_j c_j omega_j`` exactly, ``Var(c_j) = mu_j`` and
``omega^T K_bar omega = I``. Where ``Sigma`` and ``M`` (``Sigma^o`` and ``K_bar``) are
full rank these are the spec's channels up to scale; where one is singular (a linear
toy whose stream lies on a low-dimensional subspace) the covectors stay in what the block
reads and the write vectors in what it writes, instead of in the span of the other
operator. Ranks: the smallest
``r`` whose eigenvalues hold a fraction ``eta`` of the total; also the numerical rank
(eigenvalues above ``1e-10`` of the largest), the participation ratio and the largest
log-gap. ``V_b``/``U_b`` are nested orthonormal bases of the leading covectors/vectors
(QR in order, so ``V[:, :r]`` spans ``rho_1..rho_r``).

References:
    specs/channel-graph.md section 3 (project method); Bushnaq et al. (2024), "The Local
    Interaction Basis" (arXiv 2405.10928), the whitened Jacobian Gram this restricts to
    one block.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .._checks import check_in, fail
from ..lib.stats import host_blas, sign_fix
from .stats import ChannelStats

__all__ = [
    "ChannelSet",
    "NodeChannels",
    "channels_from_stats",
    "eigen_channels",
    "nested_orth",
    "rank_report",
    "support_sqrt",
]

SUPPORT_RTOL = 1e-12
NUMERICAL_RTOL = 1e-10


class NodeChannels(NamedTuple):
    """The channels of one node (numpy float64; read fields ``None`` for ``embed``).

    Attributes:
        name: node name.
        read_lambdas: ``lambda (m_in,)`` descending.
        read_covectors: ``rho (d_in, m_in)``.
        read_mean: ``r_bar (d_in,)``.
        V: ``(d_in, m_in)`` nested orthonormal basis of the covectors.
        write_mus: ``mu (m_out,)`` descending.
        write_vectors: ``omega (d_out, m_out)``.
        write_readout: ``(d_out, m_out)`` duals: ``c = (o - o_bar) @ readout``.
        write_mean: ``o_bar (d_out,)``.
        U: ``(d_out, m_out)`` nested orthonormal basis of the write vectors.
    """

    name: str
    read_lambdas: Any
    read_covectors: Any
    read_mean: Any
    V: Any
    write_mus: Any
    write_vectors: Any
    write_readout: Any
    write_mean: Any
    U: Any


NODE_RANKS = ("numerical", "eta")


class ChannelSet(NamedTuple):
    """Channels of every node ``0..n+1``, the rank threshold ``eta`` and which write
    channels become graph nodes (``node_rank``: ``numerical`` or ``eta``)."""

    nodes: tuple[NodeChannels, ...]
    eta: float
    node_rank: str = "numerical"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.nodes)

    def rank_in(self, k: int) -> int:
        return eta_rank(self.nodes[k].read_lambdas, self.eta)

    def rank_out(self, k: int) -> int:
        return eta_rank(self.nodes[k].write_mus, self.eta)

    def graph_rank(self, k: int) -> int:
        """Write channels of node ``k`` that are graph nodes (``node_rank``)."""
        if self.node_rank == "eta":
            return self.rank_out(k)
        return numerical_rank(self.nodes[k].write_mus)


def support_sqrt(s: np.ndarray, rtol: float = SUPPORT_RTOL) -> tuple[np.ndarray, np.ndarray]:
    """``(E, sqrt_lam)``: orthonormal eigenvectors of the PSD ``s`` with eigenvalues above
    ``rtol`` times the largest, and their square roots (``s^{1/2} = E diag E^T``)."""
    lam, e = np.linalg.eigh((s + s.T) / 2)
    top = float(lam.max(initial=0.0))
    keep = lam > rtol * top if top > 0 else np.zeros_like(lam, bool)
    return e[:, keep], np.sqrt(lam[keep])


def eigen_channels(
    outer: np.ndarray, inner: np.ndarray, *, rtol: float = SUPPORT_RTOL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigenpairs of ``outer^{1/2} inner outer^{1/2}`` on the support of ``outer``.

    Returns:
        ``(values (m,), vectors (d, m), duals (d, m))``: descending eigenvalues ``v``,
        ``outer^{1/2} q / sqrt(v)`` and ``(outer^{1/2})^+ q sqrt(v)`` (unscaled where
        ``v = 0``), so ``vectors^T inner vectors = I`` on the non-zero eigenvalues and
        ``vectors @ duals^T`` is the projector onto the support of ``outer``
        (``m`` = support dimension).
    """
    e, sq = support_sqrt(outer, rtol)
    d = outer.shape[0]
    if e.shape[1] == 0:
        return np.zeros(0), np.zeros((d, 0)), np.zeros((d, 0))
    a = sq[:, None] * (e.T @ inner @ e) * sq[None, :]
    vals, q = np.linalg.eigh((a + a.T) / 2)
    order = np.argsort(-vals, kind="stable")
    vals, q = np.maximum(vals[order], 0.0), sign_fix(q[:, order])
    top = float(vals.max(initial=0.0))
    scale = np.where(vals > SUPPORT_RTOL * top, np.sqrt(np.maximum(vals, 1e-300)), 1.0)
    return vals, e @ (q * sq[:, None]) / scale[None, :], e @ (q / sq[:, None]) * scale[None, :]


def nested_orth(vectors: np.ndarray) -> np.ndarray:
    """Orthonormal columns with ``Q[:, :r]`` spanning ``vectors[:, :r]`` for every ``r``."""
    if vectors.shape[1] == 0:
        return vectors
    q, r = np.linalg.qr(vectors)
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]


def channels_from_stats(stats: ChannelStats, names: tuple[str, ...], *,
                        eta: float = 0.99, node_rank: str = "numerical") -> ChannelSet:
    """Read and write channels of every node from :func:`~.stats.channel_stats`.

    Args:
        stats: the statistics.
        names: node names ``0..n+1``.
        eta: explained fraction that sets the ranks.
        node_rank: graph nodes are the ``numerical``-rank or the ``eta``-rank channels.

    Returns:
        :class:`ChannelSet`.

    Raises:
        ValueError: if ``eta`` is not in ``(0, 1]`` or ``names`` has the wrong length.
    """
    if not 0.0 < eta <= 1.0:
        raise fail("channels_from_stats", "eta", "in (0, 1]", eta)
    check_in("channels_from_stats", "node_rank", node_rank, NODE_RANKS)
    if len(names) != len(stats.write_mean):
        raise fail("channels_from_stats", "names", f"{len(stats.write_mean)} node names",
                   len(names))
    nodes = []
    width = max(np.shape(m)[0] for m in stats.write_mean)
    with host_blas(width):
        for k, name in enumerate(names):
            if stats.read_cov[k] is None:
                lam = rho = v = None
            else:
                lam, rho, _ = eigen_channels(stats.sensitivity[k], stats.read_cov[k])
                v = nested_orth(rho)
            mu, omega, readout = eigen_channels(stats.write_cov[k], stats.relevance[k])
            u = nested_orth(omega)
            nodes.append(NodeChannels(
                name=name, read_lambdas=lam, read_covectors=rho, read_mean=stats.read_mean[k],
                V=v, write_mus=mu, write_vectors=omega, write_readout=readout,
                write_mean=stats.write_mean[k], U=u))
    return ChannelSet(tuple(nodes), float(eta), node_rank)


def numerical_rank(values: Any) -> int:
    """Eigenvalues above ``1e-10`` times the largest."""
    if values is None:
        return 0
    v = np.asarray(values, np.float64)
    top = float(v.max(initial=0.0))
    return int((v > NUMERICAL_RTOL * top).sum()) if top > 0 else 0


def eta_rank(values: Any, eta: float) -> int:
    """The smallest ``r`` with ``sum_{i<=r} v_i >= eta sum_i v_i`` (0 for no mass)."""
    if values is None:
        return 0
    v = np.asarray(values, np.float64)
    total = v.sum()
    if total <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(v), eta * total * (1 - 1e-12)) + 1)


def _spectrum(values: Any, eta: float) -> dict[str, Any]:
    v = np.asarray(values, np.float64)
    top = float(v.max(initial=0.0))
    pos = v[v > NUMERICAL_RTOL * top] if top > 0 else v[:0]
    gaps = np.log(pos[:-1]) - np.log(pos[1:]) if pos.size > 1 else np.zeros(0)
    return {
        "eta_rank": eta_rank(v, eta),
        "numerical_rank": int(pos.size),
        "participation_ratio": float(v.sum() ** 2 / (v**2).sum()) if top > 0 else 0.0,
        "largest_log_gap_after": int(np.argmax(gaps)) + 1 if gaps.size else int(pos.size),
        "eigenvalues": v.tolist(),
    }


def rank_report(channels: ChannelSet) -> dict[str, dict[str, Any]]:
    """Per node: ``read`` and ``write`` spectra (``eta_rank``, ``numerical_rank``,
    ``participation_ratio``, ``largest_log_gap_after``, ``eigenvalues``)."""
    out: dict[str, dict[str, Any]] = {}
    for c in channels.nodes:
        entry = {}
        if c.read_lambdas is not None:
            entry["read"] = _spectrum(c.read_lambdas, channels.eta)
        if c.write_mus is not None:
            entry["write"] = _spectrum(c.write_mus, channels.eta)
        out[c.name] = entry
    return out
