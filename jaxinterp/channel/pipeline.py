"""The channel-graph pipeline as one pure function of (cut model, data, options, key):
statistics -> channels -> compression -> edges -> pruned graph -> modules -> usage and
circuits. Each stage is also a public function of its own module.

References:
    specs/channel-graph.md sections 2-6 (project method).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

import jax
import networkx as nx
import numpy as np

from .._checks import check_in, check_nonnegative, check_positive, fail
from .._types import Key
from ..lib.quadrature import RULES
from .adapters import ATTENTION, STREAMS
from .assemble import PRUNE, ChannelGraph, assemble, block_components, to_networkx
from .cache import StageCache
from .compression import compression_curves
from .direction import direction_edges
from .edges import NULL_SPACES, CausalEdges, causal_edges, geometric_edges, variance_share
from .model import ChannelModel
from .modules import channel_modules
from .randomized import SOLVERS, randomized_read_channels
from .refine import Refinement, refine_channels, refined_compression
from .stats import METRICS, PROBES, ChannelStats, channel_stats
from .subspaces import NODE_RANKS, ChannelSet, channels_from_stats
from .usage import (
    ablation_check,
    activity,
    co_usage_circuits,
    data_clusters,
    usage_matrix,
)

__all__ = ["ChannelAnalysis", "ChannelGraphConfig", "channel_components", "channel_graph"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChannelGraphConfig:
    """Options of a channel-graph run (spec section 10 defaults).

    Attributes:
        metric: read-sensitivity metric ``relevance`` or ``iso``.
        probes, n_probes: ``exact`` or ``random`` output probes, and how many.
        solver: ``dense`` read operators, or ``randomized`` (range finder on the
            matrix-free ``Sigma^{1/2} M Sigma^{1/2}`` with ``rank + 10`` probes).
        rank: the randomized solver's rank.
        eta: explained fraction that sets the ranks.
        node_rank: graph nodes are the ``numerical``-rank (default) or ``eta``-rank write
            channels.
        attention: ``full``, ``frozen_pattern``, ``qk``, ``q`` or ``k`` (attention
            targets; see :mod:`.adapters`).
        stream: ``resid-mlp-*`` stream coordinates, ``span`` (exact, the default) or
            ``full`` (see :func:`~.adapters.resid_mlp_model`); ``None`` for other
            targets.
        n_data: use only the first ``n_data`` examples.
        n_ref: references of ``D = ref``.
        n_null, null_space: rotation-null draws and their space.
        prune, quantile, rtol: pruning (see :func:`~.assemble.assemble`).
        resolutions: Louvain resolutions; n_null_graphs: null graphs for the z-score.
        transform: edge-weight transform for clustering (``log_eps``, ``sqrt``, ``abs``).
        usage, usage_frac: run section 5, and the activity fraction of the usage sets.
        direction_rule, direction_intervals: also compute direction-level edges with the
            LIB edge code and this quadrature rule (``gradient``, ``trapezoidal``,
            ``gauss_legendre``; sequential models only, see :mod:`.direction`); ``None``:
            off.
        refine: HOOI alternations of the optional joint refinement of every block's read
            and write subspaces at its ``eta`` ranks (:mod:`.refine`; its compression
            test goes to ``compression["refined"]``); ``None``: off.
        chunk_size: examples per chunk of the float64 passes.
        plots: write figures.
        cache: with a run directory, keep each expensive stage's output under its
            ``cache/`` and reuse it on a rerun with the same code, target, data and the
            stage's options (the edge sums resume from their last block of 4 096
            examples); see :mod:`.cache`.
    """

    metric: str = "relevance"
    probes: str = "exact"
    n_probes: int = 32
    solver: str = "dense"
    rank: int = 16
    eta: float = 0.99
    node_rank: str = "numerical"
    attention: str = "full"
    stream: str | None = None
    n_data: int | None = None
    n_ref: int = 4
    n_null: int = 20
    null_space: str = "stream"
    prune: str = "null"
    quantile: float = 0.99
    rtol: float = 1e-9
    resolutions: tuple[float, ...] = (1.0, 0.5)
    n_null_graphs: int = 20
    transform: str = "log_eps"
    usage: bool = True
    usage_frac: float = 0.9
    direction_rule: str | None = None
    direction_intervals: int = 0
    refine: int | None = None
    chunk_size: int = 128
    plots: bool = True
    cache: bool = True

    def __post_init__(self):
        fn = "ChannelGraphConfig"
        check_in(fn, "metric", self.metric, METRICS)
        check_in(fn, "probes", self.probes, PROBES)
        check_in(fn, "solver", self.solver, SOLVERS)
        check_in(fn, "attention", self.attention, ATTENTION)
        if self.stream is not None:
            check_in(fn, "stream", self.stream, STREAMS)
        check_in(fn, "node_rank", self.node_rank, NODE_RANKS)
        check_in(fn, "null_space", self.null_space, NULL_SPACES)
        check_in(fn, "prune", self.prune, PRUNE)
        check_in(fn, "transform", self.transform, ("log_eps", "sqrt", "abs", "raw"))
        for name in ("n_probes", "rank", "n_ref", "n_null", "chunk_size"):
            check_positive(fn, name, getattr(self, name), integer=True)
        check_nonnegative(fn, "n_null_graphs", self.n_null_graphs, integer=True)
        check_nonnegative(fn, "direction_intervals", self.direction_intervals, integer=True)
        if self.direction_rule is not None:
            check_in(fn, "direction_rule", self.direction_rule, RULES)
        if self.n_data is not None:
            check_positive(fn, "n_data", self.n_data, integer=True)
        if self.refine is not None:
            check_nonnegative(fn, "refine", self.refine, integer=True)
        if not 0.0 < self.eta <= 1.0:
            raise fail(fn, "eta", "in (0, 1]", self.eta)
        if not 0.0 < self.usage_frac <= 1.0:
            raise fail(fn, "usage_frac", "in (0, 1]", self.usage_frac)


class ChannelAnalysis(NamedTuple):
    """Everything :func:`channel_graph` computes (host numpy / python values)."""

    stats: ChannelStats
    channels: ChannelSet
    compression: dict[str, Any]
    geometric: dict[tuple[int, int], dict]
    share: dict[tuple[int, int], float]
    causal: CausalEdges
    graph: ChannelGraph
    components: list[list[str]]
    channel_components: list[list[str]]
    modules: dict[str, Any]
    activity: np.ndarray | None
    usage: np.ndarray | None
    circuits: list[dict[str, Any]]
    circuit_checks: list[dict[str, Any]]
    clusters: dict[str, Any] | None
    seconds: dict[str, float]
    direction: dict[tuple[int, int], np.ndarray] | None = None
    refinement: Refinement | None = None


def channel_components(cg: ChannelGraph) -> list[list[str]]:
    """Connected components of the pruned channel-level graph (boundary channels kept),
    largest first."""
    g = to_networkx(cg, transform="raw")
    return sorted((sorted(c) for c in nx.connected_components(g)),
                  key=lambda c: (-len(c), c[0]))


def channel_graph(
    model: ChannelModel,
    xs: Any,
    cfg: ChannelGraphConfig,
    *,
    labels: dict[str, int] | None = None,
    progress: Any = None,
    cache: StageCache | None = None,
    key: Key,
) -> ChannelAnalysis:
    """Run every stage of the channel graph on ``model`` and data ``xs``.

    Args:
        model: the cut model.
        xs: inputs with a leading ``batch`` axis.
        cfg: :class:`ChannelGraphConfig`.
        labels: planted module label per channel-node id (ARI), or ``None``.
        progress: an object with ``update()`` (a tqdm bar) or ``None``.
        cache: keep each expensive stage's output there and reuse it when the code, model,
            data, key and the stage's options are the same; the edge sums also resume
            from their last block (:class:`~.cache.StageCache`). ``None``: no cache.
        key: PRNG key; stages use ``fold_in(key, stage)``.

    Returns:
        :class:`ChannelAnalysis`.
    """
    if cfg.direction_rule is not None and model.mode != "sequential":
        raise fail("channel_graph", "cfg.direction_rule", "None for a residual model "
                   "(direction-level edges need a sequential one)", cfg.direction_rule)
    tick = (lambda: progress.update()) if progress is not None else (lambda: None)
    sec: dict[str, float] = {}
    t = time.perf_counter()
    if cfg.n_data is not None:
        xs = jax.tree_util.tree_map(lambda a: a[: cfg.n_data], xs)

    def stage(name: str, fp: str, compute):
        return compute() if cache is None else cache.run(name, fp, compute)

    def fingerprint(parent: str, name: str, *fields: str) -> str:
        if cache is None:
            return ""
        return cache.fingerprint(parent, stage=name, **{f: getattr(cfg, f) for f in fields})

    def channels():
        stats = channel_stats(model, xs, metric=cfg.metric, probes=cfg.probes,
                              n_probes=cfg.n_probes, chunk_size=cfg.chunk_size,
                              key=jax.random.fold_in(key, 0))
        cs = channels_from_stats(stats, model.node_names, eta=cfg.eta, node_rank=cfg.node_rank)
        if cfg.solver == "randomized":
            cs = randomized_read_channels(model, xs, stats, cs, rank=cfg.rank,
                                          metric=cfg.metric, probes=cfg.probes,
                                          n_probes=cfg.n_probes, chunk_size=cfg.chunk_size,
                                          key=jax.random.fold_in(key, 5))
        return stats, cs

    fp_ch = fingerprint(cache.base if cache is not None else "", "channels", "n_data", "metric",
                        "probes", "n_probes", "chunk_size", "eta", "node_rank", "solver",
                        *(("rank",) if cfg.solver == "randomized" else ()))
    stats, cs = stage("channels", fp_ch, channels)
    sec["channels"] = time.perf_counter() - t
    tick()
    t = time.perf_counter()
    comp = stage("compression", fingerprint(fp_ch, "compression", "chunk_size"),
                 lambda: compression_curves(model, cs, xs, chunk_size=4 * cfg.chunk_size))
    sec["compression"] = time.perf_counter() - t
    refinement = None
    if (n_iter := cfg.refine) is not None:
        t = time.perf_counter()

        def refine():
            ref = refine_channels(model, xs, stats, cs, n_iter=n_iter,
                                  chunk_size=cfg.chunk_size)
            return ref, refined_compression(model, ref, xs, chunk_size=4 * cfg.chunk_size)

        refinement, comp_refined = stage(
            "refine", fingerprint(fp_ch, "refine", "refine", "chunk_size"), refine)
        comp = {**comp, "refined": comp_refined}
        sec["refine"] = time.perf_counter() - t
    tick()
    t = time.perf_counter()
    geo, share = geometric_edges(model, cs), variance_share(model, cs)
    fp_edges = fingerprint(fp_ch, "edges", "metric", "probes", "n_probes", "n_ref", "n_null",
                           "null_space", "chunk_size")
    partial = None if cache is None else cache.partial("edges", fp_edges)
    ce = stage("edges", fp_edges, lambda: causal_edges(
        model, cs, xs, metric=cfg.metric, probes=cfg.probes, n_probes=cfg.n_probes,
        n_ref=cfg.n_ref, n_null=cfg.n_null, null_space=cfg.null_space,
        chunk_size=cfg.chunk_size, partial=partial,
        progress=progress is not None and not getattr(progress, "disable", False),
        key=jax.random.fold_in(key, 1)))
    if partial is not None:  # the stage's output is stored: its running sums are done
        partial.clear()
    cg = assemble(model, cs, ce, prune=cfg.prune, quantile=cfg.quantile, rtol=cfg.rtol)
    sec["edges"] = time.perf_counter() - t
    tick()
    t = time.perf_counter()
    mods = channel_modules(cg, resolutions=cfg.resolutions, n_null=cfg.n_null_graphs,
                           labels=labels, transform=cfg.transform)
    comps, ccomps = block_components(cg), channel_components(cg)
    sec["modules"] = time.perf_counter() - t
    tick()
    act = use = clusters = None
    circuits: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    if cfg.usage:
        t = time.perf_counter()

        def usage():
            means = [c.write_mean for c in cs.nodes]
            act = activity(model, cg, xs, means, n_ref=cfg.n_ref,
                           key=jax.random.fold_in(key, 2))
            use = usage_matrix(act, cfg.usage_frac)
            circuits = co_usage_circuits(cg, use)
            checks = ablation_check(model, cg, xs, means, circuits,
                                    key=jax.random.fold_in(key, 3))
            return act, use, circuits, checks, data_clusters(act)

        act, use, circuits, checks, clusters = stage(
            "usage", fingerprint(fp_edges, "usage", "prune", "quantile", "rtol", "n_ref",
                                 "usage_frac"), usage)
        sec["usage"] = time.perf_counter() - t
    tick()
    direction = None
    if (rule := cfg.direction_rule) is not None:
        t = time.perf_counter()
        direction = stage(
            "direction", fingerprint(fp_ch, "direction", "direction_rule",
                                     "direction_intervals", "chunk_size"),
            lambda: direction_edges(model, cs, xs, rule=rule,
                                    n_intervals=cfg.direction_intervals,
                                    chunk_size=cfg.chunk_size))
        sec["direction_edges"] = time.perf_counter() - t
    return ChannelAnalysis(stats, cs, comp, geo, share, ce, cg, comps, ccomps, mods, act, use,
                           circuits, checks, clusters, sec, direction, refinement)
