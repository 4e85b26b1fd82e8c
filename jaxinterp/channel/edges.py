"""Edges between blocks (spec section 4), for every admissible pair ``a -> b``.

* **E1** geometric overlap ``ov = ||U_a^T V_b||_F^2 / min(r_a, r_b)`` (the singular values
  of ``U_a^T V_b`` are the cosines of the principal angles), against the random-subspace
  null ``max(r_a, r_b) / d``: ``ov_z = (ov - max/d) / (1 - max/d)``.
* **E2** linear variance share ``sum_i (lambda_i / sum lambda) sum_j (rho_i^T omega_j)^2 mu_j``.
* **E3** driven variance ``w = E ||J_b o~_a||_S^2 / E ||J_b (r_b - r_bar_b)||_S^2``, its
  signed first-order variant ``e = E |g_b^T J_b o~_a|`` and its finite (ablation)
  version, ``J_b t`` replaced by ``h_b(r_b) - h_b(r_b - t)`` (see :class:`CausalEdges`).
* **E4** channel edges ``E[(a,j) -> (b,k)] = E[(w_k^T K^{1/2} J_b omega_j c_j(x))^2]``.

E3 and E4 are forward mode: for each reader ``b`` ONE ``jvp`` of ``h_b`` at ``r_b(x)``
per tangent, vmapped over all tangents (every writer's ``o~_a``, every writer channel's
``omega_j c_j``, and the same under ``n_null`` random rotations of the writes within
the support of the reader's stream covariance, the pruning null) and over the data,
summed in float64 over chunks. ``||v||_S^2 = sum_i (s_i . v)^2`` with the relevance
probes ``s_i = Phi_b^T eps_i`` of :mod:`.stats` (``iso``: ``||v||^2``).

References:
    specs/channel-graph.md section 4 (project method); Elhage et al. (2021), "A
    Mathematical Framework for Transformer Circuits" (composition scores); Syed,
    Rager, Conmy (2023), "Attribution Patching Outperforms Automated Circuit Discovery"
    (edge attribution patching, the signed variant).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .._checks import check_in, check_positive
from .._types import Array, Key
from ..lib.stats import chunked_sum, einsum64
from .adapters import as_float
from .cache import PartialSums
from .model import ChannelModel, divergence, to_float64, trace
from .stats import METRICS, probe_cotangents, zero_deltas
from .subspaces import ChannelSet

NULL_SPACES = ("stream", "support")
# examples per jit call of resumable edge sums (their running sums are saved after each)
RESUME_BLOCK = 4096

__all__ = ["NULL_SPACES", "CausalEdges", "causal_edges", "geometric_edges", "reference_outputs",
           "variance_share"]


def pairs_of(model: ChannelModel) -> list[tuple[int, int]]:
    """Admissible ``(writer, reader)`` node pairs, reader-major."""
    return [(a, b) for b in range(1, model.n_blocks + 2) for a in model.writers_of(b)]


def geometric_edges(model: ChannelModel, cs: ChannelSet) -> dict[tuple[int, int], dict]:
    """E1 for every admissible pair: ``overlap``, ``overlap_z``, ``null`` and ``cosines``."""
    out = {}
    for a, b in pairs_of(model):
        ra, rb = cs.rank_out(a), cs.rank_in(b)
        u, v = cs.nodes[a].U[:, :ra], cs.nodes[b].V[:, :rb]
        d = u.shape[0]
        if ra == 0 or rb == 0:
            out[(a, b)] = {"overlap": 0.0, "overlap_z": 0.0, "null": 0.0, "cosines": []}
            continue
        cos = np.linalg.svd(u.T @ v, compute_uv=False)
        ov = float((cos**2).sum() / min(ra, rb))
        null = max(ra, rb) / d
        z = (ov - null) / (1 - null) if null < 1 else 0.0
        out[(a, b)] = {"overlap": ov, "overlap_z": float(z), "null": null,
                       "cosines": cos.tolist()}
    return out


def variance_share(model: ChannelModel, cs: ChannelSet) -> dict[tuple[int, int], float]:
    """E2 for every admissible pair (all channels, data-free)."""
    out = {}
    for a, b in pairs_of(model):
        lam, rho = cs.nodes[b].read_lambdas, cs.nodes[b].read_covectors
        mu, omega = cs.nodes[a].write_mus, cs.nodes[a].write_vectors
        tot = lam.sum()
        if tot <= 0 or mu.size == 0:
            out[(a, b)] = 0.0
            continue
        out[(a, b)] = float((lam / tot) @ ((rho.T @ omega) ** 2 @ mu))
    return out


def reference_outputs(model: ChannelModel, xs: Any, n_ref: int = 4, *, key: Key) -> Array:
    """``(N, n_ref, P_y, k)``: the outputs of ``n_ref`` other random examples per example
    (float64; call inside an x64 context)."""
    ys = jax.vmap(lambda x: trace(model, x).y)(xs)
    n = ys.shape[0]
    shift = jax.random.randint(key, (n, n_ref), 1, max(n, 2))
    idx = (jnp.arange(n)[:, None] + shift) % n
    return ys[idx]


def haar_rotations(basis: np.ndarray, n: int, key: Key) -> np.ndarray:
    """``(n, d, d)`` rotations: Haar-random on the span of the orthonormal ``basis (d, k)``
    (a reader's stream support), identity off it."""
    e = np.asarray(basis, np.float64)
    d, k = e.shape
    g = np.asarray(jax.random.normal(key, (n, k, k)), np.float64)
    q, r = np.linalg.qr(g)
    q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
    off = np.eye(d) - e @ e.T
    return np.einsum("ik,nkl,jl->nij", e, q, e) + off[None]


class CausalEdges(NamedTuple):
    """E3 / E4 per admissible pair ``(a, b)`` (numpy float64).

    Attributes:
        w: driven-variance share E3.
        signed: ``E |g_b^T J_b o~_a|``.
        channel: E4, ``(r_out(b), r_out(a))`` (output node first).
        null_w: ``(n_null,)`` E3 under rotated writes.
        null_channel: ``(n_null, r_out(b), r_out(a))``.
        non_additivity: per reader, ``sum_a w(a -> b) - 1``.
        ablation: the finite version of E3, ``E ||h_b(r_b) - h_b(r_b - o~_a)||_S^2 /
            E ||h_b(r_b) - h_b(r_bar_b)||_S^2`` (``a``'s write mean-ablated in ``b``'s
            read only: direct-path patching). Equal to ``w`` for a linear block; for
            attention it sees a QK path whose softmax is saturated, where the Jacobian
            (and so ``w``) is nearly zero.
    """

    w: dict[tuple[int, int], float]
    signed: dict[tuple[int, int], float]
    channel: dict[tuple[int, int], np.ndarray]
    null_w: dict[tuple[int, int], np.ndarray]
    null_channel: dict[tuple[int, int], np.ndarray]
    non_additivity: dict[int, float]
    ablation: dict[tuple[int, int], float]


def _reader_tangents(model, cs_arrays, tr, b, rots, rot_omegas):
    """Tangents for reader ``b``: writes, stream, channels, and their null rotations
    (``rot_omegas``: each writer's ``omega`` rotated by every null rotation, ``(n_null, d,
    r_a)``, so a rotated channel tangent costs ``O(d r)`` instead of ``O(d^2 r)``)."""
    ws = model.writers_of(b)
    r = tr.reads[b - 1]
    tang = [tr.writes[a] - cs_arrays["write_mean"][a][None, :] for a in ws]
    den = r - cs_arrays["read_mean"][b][None, :]
    chans, null_chans = [], []
    for a, o, ro in zip(ws, tang, rot_omegas, strict=True):
        c = o @ cs_arrays["readout"][a]  # (P, r_a)
        chans.append(jnp.einsum("pj,dj->jpd", c, cs_arrays["omega"][a]))
        null_chans.append(jnp.einsum("pj,nej->njpe", c, ro))
    base = jnp.stack(tang)  # (n_w, P, d)
    ch = jnp.concatenate(chans, axis=0)  # (n_ch, P, d)
    null_base = jnp.einsum("wpd,ned->nwpe", base, rots)
    null_ch = jnp.concatenate(null_chans, axis=1)  # (n_null, n_ch, P, d)
    return base, den[None], ch, null_base, null_ch


def _example(model, cs_arrays, rots, rot_omegas, x, y_ref, key, metric, exact, n_probes):
    n = model.n_blocks
    tr, cots, scale = probe_cotangents(model, x, key, metric, exact, n_probes)
    grads = jax.grad(lambda d: divergence(model.output, trace(model, x, deltas=d).y, y_ref))(
        zero_deltas(model, x))
    out = []
    for b in range(1, n + 2):
        base, den, ch, nb, nc = _reader_tangents(model, cs_arrays, tr, b, rots[b],
                                                 rot_omegas[b])
        n_w, n_ch, n_null = base.shape[0], ch.shape[0], rots[b].shape[0]
        f = model.node_fn(b)
        r = tr.reads[b - 1]
        jvps = jax.vmap(lambda t, f=f, r=r: jax.jvp(f, (r,), (t,))[1])  # (T, P, d_out)
        # the S-norm of the block-level tangents (writes, whole read, rotated writes) and
        # the channel readout of the channel tangents (plain and rotated), each only
        # where it is used
        js = jvps(jnp.concatenate([base, den, nb.reshape(-1, *base.shape[1:])], axis=0))
        jc = jvps(jnp.concatenate([ch, nc.reshape(-1, *base.shape[1:])], axis=0))
        if cots is None:
            snorm = jnp.sum(js**2, axis=(1, 2))
        else:
            snorm = scale * jnp.sum(einsum64("ipe,tpe->it", cots[b], js) ** 2, axis=0)
        signed = jnp.abs(einsum64("pe,tpe->t", grads[b], js[:n_w]))
        proj = jnp.sum(einsum64("tpe,ek->tpk", jc, cs_arrays["readout"][b]) ** 2, axis=1)
        # the finite (not linearised) E3: b's output change when a's write is removed from
        # b's read only, and when b's whole read is replaced by its mean
        o_b = f(r)
        abl = jnp.concatenate([o_b[None] - jax.vmap(lambda t, f=f, r=r: f(r - t))(base),
                               (o_b - f(jnp.broadcast_to(cs_arrays["read_mean"][b][None, :],
                                                         r.shape)))[None]], axis=0)
        if cots is None:
            anorm = jnp.sum(abl**2, axis=(1, 2))
        else:
            anorm = scale * jnp.sum(einsum64("ipe,tpe->it", cots[b], abl) ** 2, axis=0)
        out.append({
            "w": snorm[:n_w], "den": snorm[n_w], "signed": signed,
            "ablation": anorm[:n_w], "ablation_den": anorm[n_w],
            "channel": proj[:n_ch], "null_w": snorm[n_w + 1:].reshape(n_null, n_w),
            "null_channel": proj[n_ch:].reshape(n_null, n_ch, -1),
        })
    return out


@eqx.filter_jit
def _edge_sums(model, cs_arrays, rots, rot_omegas, xs, y_refs, key, metric, exact, n_probes,
               chunk, offset):
    def per_chunk(batch, mask, idx):
        x, yr = batch
        ks = jax.random.split(jax.random.fold_in(key, idx), mask.shape[0])
        per = jax.vmap(lambda e, r, k: _example(model, cs_arrays, rots, rot_omegas, e, r, k,
                                                metric, exact, n_probes))(x, yr, ks)
        return jax.tree_util.tree_map(lambda a: jnp.tensordot(mask, a, axes=1), per)

    return chunked_sum(per_chunk, (xs, y_refs), chunk_size=chunk, index_offset=offset)


def _blocked_edge_sums(sums_of, xs, y_refs, *, chunk: int, block_size: int,
                       partial: PartialSums | None, progress: bool):
    """The edge sums over blocks of whole chunks, added on the host (float64) and, with
    ``partial``, saved after every block and resumed from an earlier pass."""
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    block = n if block_size >= n else max(chunk, block_size // chunk * chunk)
    done, total = 0, None
    if partial is not None and (state := partial.load()) is not None:
        done, total = state
    bar = tqdm(total=n, initial=done, desc="edges", unit="ex", disable=not progress,
               leave=False)
    while done < n:
        stop = min(done + block, n)
        part = sums_of(jax.tree_util.tree_map(lambda a: a[done:stop], xs), y_refs[done:stop],
                       done // chunk)
        part = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), part)
        total = part if total is None else jax.tree_util.tree_map(np.add, total, part)
        bar.update(stop - done)
        done = stop
        if partial is not None:
            partial.save(done, total)
    bar.close()
    return total


def causal_edges(
    model: ChannelModel,
    cs: ChannelSet,
    xs: Any,
    *,
    metric: str = "relevance",
    probes: str = "exact",
    n_probes: int = 32,
    n_ref: int = 4,
    n_null: int = 20,
    null_space: str = "stream",
    chunk_size: int = 128,
    block_size: int | None = None,
    partial: PartialSums | None = None,
    progress: bool = False,
    key: Key,
) -> CausalEdges:
    """E3 (``w``, ``signed``), E4 (``channel``) and their rotation nulls for every
    admissible pair; channels are the graph-node write channels (``cs.graph_rank``).

    Args:
        model, cs: the cut model and its channels.
        xs: inputs with a leading ``batch`` axis.
        metric: ``relevance`` or ``iso`` (the S-norm of E3).
        probes, n_probes: relevance probes (see :func:`~.stats.channel_stats`).
        n_ref: reference outputs per example for ``D`` (the signed variant).
        n_null: rotation-null draws per reader.
        null_space: rotate the writes within the whole stream (``stream``, default) or
            within the support of the reader's stream covariance (``support``, the
            spec's wording; in toys whose stream has a low-dimensional support this
            null is often above genuine edges, see experiments/channel_graph.md).
        chunk_size: examples per chunk.
        block_size: examples per jit call (rounded down to whole chunks); ``None``: all
            in one call. The sums of the blocks are added in float64 on the host; the
            randomness does not depend on the blocking.
        partial: keep the running sums after every block there and resume from them
            (:class:`~.cache.PartialSums`; implies blocks of ``block_size`` or
            ``RESUME_BLOCK`` = 4 096).
        progress: a progress bar over the examples.
        key: PRNG key (probes, references, rotations), keyword-last.

    Returns:
        :class:`CausalEdges`.
    """
    fn = "causal_edges"
    check_in(fn, "metric", metric, METRICS)
    check_positive(fn, "n_null", n_null, integer=True)
    check_positive(fn, "n_ref", n_ref, integer=True)
    check_in(fn, "null_space", null_space, NULL_SPACES)
    if block_size is not None:
        check_positive(fn, "block_size", block_size, integer=True)
    nodes = cs.nodes
    n_nodes = len(nodes)
    with jax.enable_x64(True):
        m64 = to_float64(model)
        xs = as_float(xs)
        ranks = [cs.graph_rank(k) for k in range(n_nodes)]
        cs_arrays = {
            "write_mean": [jnp.asarray(c.write_mean) for c in nodes],
            "read_mean": [None if c.read_mean is None else jnp.asarray(c.read_mean)
                          for c in nodes],
            "readout": [jnp.asarray(c.write_readout[:, :r]) for c, r in zip(nodes, ranks,
                                                                            strict=True)],
            "omega": [jnp.asarray(c.write_vectors[:, :r]) for c, r in zip(nodes, ranks,
                                                                          strict=True)],
        }
        rots = [None] + [
            jnp.asarray(haar_rotations(
                c.V if null_space == "support" else np.eye(c.read_mean.shape[0]), n_null,
                jax.random.fold_in(key, 1000 + k)))
            for k, c in enumerate(nodes[1:], start=1)
        ]
        rot_omegas = [None] + [
            [einsum64("ned,dj->nej", rots[b], cs_arrays["omega"][a]) for a in model.writers_of(b)]
            for b in range(1, n_nodes)
        ]
        y_refs = reference_outputs(m64, xs, n_ref, key=jax.random.fold_in(key, 1))
        n = jax.tree_util.tree_leaves(xs)[0].shape[0]
        chunk = min(int(chunk_size), n)
        k2 = jax.random.fold_in(key, 2)

        def sums_of(x, yr, offset):
            return _edge_sums(m64, cs_arrays, rots, rot_omegas, x, yr, k2, metric,
                              probes == "exact", int(n_probes), chunk, jnp.asarray(offset))

        if block_size is None:
            block_size = n if partial is None else RESUME_BLOCK
        sums = _blocked_edge_sums(sums_of, xs, y_refs, chunk=chunk, block_size=int(block_size),
                                  partial=partial, progress=progress)
    res = CausalEdges({}, {}, {}, {}, {}, {}, {})
    for b in range(1, n_nodes):
        s = sums[b - 1]
        ws = model.writers_of(b)
        den = s["den"] if s["den"] > 0 else 1.0
        aden = s["ablation_den"] if s["ablation_den"] > 0 else 1.0
        offs = np.cumsum([0] + [ranks[a] for a in ws])
        total = 0.0
        for i, a in enumerate(ws):
            res.w[(a, b)] = float(s["w"][i] / den)
            total += res.w[(a, b)]
            res.signed[(a, b)] = float(s["signed"][i] / n)
            res.ablation[(a, b)] = float(s["ablation"][i] / aden)
            res.channel[(a, b)] = (s["channel"][offs[i]:offs[i + 1]] / n).T
            res.null_w[(a, b)] = s["null_w"][:, i] / den
            res.null_channel[(a, b)] = np.transpose(
                s["null_channel"][:, offs[i]:offs[i + 1]], (0, 2, 1)) / n
        res.non_additivity[b] = total - 1.0
    return res

