"""``jaxinterp run channel-graph TARGET``: cut a target into blocks, find their read and
write channels, edges, modules and circuits, and write a run directory:

* ``config.json``, ``metrics.json`` (keys ``ranks``, ``compression_curve``, ``edges``,
  ``components``, ``channel_components``, ``modularity_q``, ``communities``,
  ``circuits``, ``circuit_coverage``, ``data_clusters``, ``non_additivity``,
  ``planted_recovery`` where ground truth exists, ``target_checks`` for ``resid-mlp-*``
  and ``modadd`` (see :mod:`.targets`), ``seconds``, ``cached_stages``), ``graph.json``
  (the pruned channel graph), ``channels.npz`` (per node: ``lambda``, ``rho``, ``mu``, ``omega``,
  ``readout``; ``stream_basis`` for ``resid-mlp-*`` in ``span`` coordinates);
* figures ``block_graph.png``, ``compression.png``, ``usage.png``, ``spectra.png``;
* ``cache/``: each expensive stage's output with its fingerprint (:mod:`.cache`). A rerun
  into the same directory reuses the stages whose code, target, data and options are
  unchanged (``metrics.json["cached_stages"]`` names them) and resumes the edge sums
  from their last saved block; ``--cache false`` turns it off.

``--refine N`` adds the optional joint (HOOI) refinement of every block's read and write
subspaces at its ``eta`` ranks, ``N`` alternations (:mod:`.refine`); its compression test
is ``compression_curve["refined"]`` (``all``: every block at once; per block its
``delta``, ranks and captured Jacobian energy before and after).

Targets: ``planted-channels`` and ``block-mlp`` (hand-built; their config fields, e.g.
``--gated true --kappa 0.3 --activation tanh``, are accepted as overrides) and
``tms-5-2``, ``induction``, ``resid-mlp-1`` and ``resid-mlp-2`` (trained, cached under
``runs/targets``; ``--attention frozen_pattern`` linearises heads with their patterns
held; ``--stream full`` analyses a residual MLP in its 1000 stream coordinates) and
``modadd`` (the shipped fixture ``jaxinterp/fixtures/modadd-seed0`` for seed 0, or
``--target DIR``; analysed on its training split). Hand-built toys use product
design data and ``prune = roundoff`` (see ``experiments/channel_graph.md`` for why the
rotation null is not used there). For ``induction``, ``planted_recovery`` holds the
checks of :func:`~.induction.induction_recovery` (head roles, edges into the induction
head, in-context loss recovered by circuits).

References:
    specs/channel-graph.md (project method).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .. import io
from .._checks import fail
from ..methods import Method, register_method
from ..models import base
from ..rng import Stream, seed_key, stream_key
from . import figures
from .adapters import channel_model_for, resid_stream_basis
from .assemble import save_json
from .cache import StageCache
from .pipeline import ChannelAnalysis, ChannelGraphConfig, channel_graph
from .recovery import channel_labels, planted_recovery
from .subspaces import rank_report
from .targets import circuit_coverage, modadd_checks, resid_mlp_checks

__all__ = ["PRESETS", "ChannelRun", "channel_graph_config", "run_channel_graph", "target_data"]

HAND_BUILT = ("planted-channels", "block-mlp")
PRESETS: dict[str, dict[str, Any]] = {
    "planted-channels": {"prune": "roundoff"},
    "block-mlp": {"prune": "roundoff"},
    "tms-5-2": {"n_data": 10_000},
    # 130 softmax outputs and a (64, 16) stream per example: random relevance probes and
    # a smaller null keep a run to minutes on a CPU
    "induction": {"n_data": 1000, "probes": "random", "n_probes": 32, "n_null": 8,
                  "chunk_size": 64},
    # d_resid = 1000: stream coordinates on the 150-d span of the writes (exact) and exact
    # probes; fewer samples and null draws than the spec's 1e5 / 20 so that a run takes
    # minutes on 2 CPU cores (`--n-data 100000 --n-null 20`: 20-30 min, the same verdicts;
    # experiments/channel_graph.md, T4-T6)
    "resid-mlp-1": {"n_data": 5000, "n_null": 4, "chunk_size": 64},
    "resid-mlp-2": {"n_data": 5000, "n_null": 4, "chunk_size": 64},
    # the first 1 000 pairs of the training split, exact softmax probes over the 114 logits
    "modadd": {"n_data": 1000, "n_null": 4, "chunk_size": 32},
}
FIXTURES = {"modadd": Path(__file__).resolve().parents[1] / "fixtures" / "modadd-seed0"}


def channel_graph_config(target: str, **overrides: Any) -> ChannelGraphConfig:
    """The preset of ``target`` with ``overrides``."""
    from ..decomposition.runs import preset_config

    return preset_config(ChannelGraphConfig, PRESETS, "channel_graph_config", target, overrides)


class ChannelRun(NamedTuple):
    metrics: dict[str, Any]
    analysis: ChannelAnalysis
    plots: list[str]
    run_dir: Path | None


def target_data(name: str, model: Any, tcfg: Any, seed: int, n: int | None = None) -> Any:
    """The analysis inputs of a target: product designs for the hand-built toys (cross-
    module covariances vanish exactly), the training split of the target's own seed for
    ``modadd`` (``[a, b, =]`` tokens), fresh samples otherwise."""
    target = base.get_target(name)
    if name == "modadd":
        from ..models.modadd import tokens_of

        data = base.make_seed_data(target, tcfg, int(getattr(tcfg, "seed", seed)))
        return tokens_of(jnp.asarray(data["train_pairs"][:n]), model.p)
    if name in HAND_BUILT:
        x = np.asarray(base.make_seed_data(target, tcfg, seed)["x"])
        if name == "block-mlp":  # every pairing of sqrt(N) block-0 with block-1 draws
            k, half = int(np.sqrt(x.shape[0])), x.shape[1] // 2
            x = np.concatenate([np.repeat(x[:k, :half], k, 0), np.tile(x[:k, half:], (k, 1))], 1)
        return jnp.asarray(x)
    key = stream_key(seed_key(seed), Stream.EVAL)
    cfg = dataclasses.replace(tcfg, batch_size=n or 10_000)
    batch = target.sample(cfg, None, key, jnp.asarray(0))
    return batch[0] if isinstance(batch, tuple) else batch


def _edges_report(res: ChannelAnalysis, names: tuple[str, ...]) -> list[dict[str, Any]]:
    out = []
    cg = res.graph
    for i, ((a, b), w) in enumerate(res.causal.w.items()):
        e4 = res.causal.channel[(a, b)]
        g = res.geometric[(a, b)]
        out.append({
            "writer": names[a], "reader": names[b],
            "overlap": g["overlap"], "overlap_z": g["overlap_z"], "cosines": g["cosines"],
            "share": res.share[(a, b)], "driven_variance": w, "signed": res.causal.signed[(a, b)],
            "ablation": res.causal.ablation[(a, b)],
            "null_driven_variance_q": cg.block_thresholds[i],
            "channel_max": float(np.max(e4, initial=0.0)), "channel_sum": float(np.sum(e4)),
            "channel_threshold": cg.thresholds[i],
            "kept": cg.block_weights[i] > 0,
            "channel_kept": int((np.asarray(cg.edges[i]) > 0).sum()),
        })
    return out


def run_channel_graph(model: Any, target_name: str, tcfg: Any, cfg: ChannelGraphConfig, *,
                      seed: int = 0, xs: Any = None, out: str | Path | None = None,
                      progress: bool = True) -> ChannelRun:
    """Run the channel graph on a target and (with ``out``) write its run directory.

    Args:
        model: the target's model; target_name: its registered name; tcfg: its config.
        cfg: :class:`~.pipeline.ChannelGraphConfig`.
        seed: the target seed (data and keys).
        xs: analysis inputs (default: :func:`target_data`).
        out: run directory (``None``: nothing written).
        progress: progress bar.

    Returns:
        :class:`ChannelRun`.
    """
    with jax.enable_x64(True):
        cm = channel_model_for(target_name, model, attention=cfg.attention, stream=cfg.stream)
    if xs is None:
        xs = target_data(target_name, model, tcfg, seed, cfg.n_data)
    bar = tqdm(total=5, desc="channel-graph", disable=not progress)
    key = stream_key(seed_key(seed), Stream.MASK)
    cache = None
    if out is not None and cfg.cache:
        with jax.enable_x64(True):
            cache = StageCache(Path(out) / "cache", cm, xs, key)
    res = channel_graph(cm, xs, cfg, progress=bar, cache=cache, key=key)
    with jax.enable_x64(True):  # the planted geometry in float64
        labels = channel_labels(target_name, model, res)
    if labels is not None:  # rerun the cheap host-side modules with the planted labels
        from .modules import channel_modules

        res = res._replace(modules=channel_modules(res.graph, resolutions=cfg.resolutions,
                                                   n_null=cfg.n_null_graphs, labels=labels,
                                                   transform=cfg.transform))
    bar.close()
    names = cm.node_names
    t0 = time.perf_counter()
    used_xs = jax.tree_util.tree_map(lambda a: a[: cfg.n_data], xs) if cfg.n_data else xs
    metrics = {
        "target": target_name, "seed": seed, "mode": cm.mode,
        "n_examples": int(jax.tree_util.tree_leaves(used_xs)[0].shape[0]),
        "ranks": rank_report(res.channels),
        "compression_curve": res.compression,
        "edges": _edges_report(res, names),
        "non_additivity": {names[b]: v for b, v in res.causal.non_additivity.items()},
        "components": res.components,
        "channel_components": res.channel_components,
        "modularity_q": {k: v["modularity_q"] for k, v in res.modules.items()},
        "communities": res.modules,
        "circuits": [{"members": c["members"], "support": c["support"], **chk}
                     for c, chk in zip(res.circuits, res.circuit_checks, strict=True)],
        "data_clusters": None if res.clusters is None else {
            "k": res.clusters["k"], "silhouette": res.clusters["silhouette"]},
        "circuit_coverage": circuit_coverage(res, names),
        "seconds": res.seconds,
        "cached_stages": [] if cache is None else cache.loaded,
    }
    if res.direction is not None:
        metrics["direction_edges"] = {
            "rule": cfg.direction_rule,
            **{f"{names[a]}->{names[b]}": e.tolist() for (a, b), e in res.direction.items()},
        }
    with jax.enable_x64(True):
        metrics["planted_recovery"] = planted_recovery(target_name, model, res, used_xs, names)
        metrics["target_checks"] = None
        if target_name.startswith("resid-mlp-"):
            metrics["target_checks"] = resid_mlp_checks(model, res, used_xs, names)
        elif target_name == "modadd":
            metrics["target_checks"] = modadd_checks(model, cm, res, names,
                                                     transform=cfg.transform)
    metrics["seconds"] = {**res.seconds, "checks": time.perf_counter() - t0}
    plots: list[str] = []
    run_dir = None if out is None else Path(out)
    if run_dir is not None:
        plots = _write(run_dir, cfg, tcfg, metrics, res, target_name, model)
    return ChannelRun(metrics, res, plots, run_dir)


def _write(run_dir: Path, cfg: ChannelGraphConfig, tcfg: Any, metrics: dict[str, Any],
           res: ChannelAnalysis, target: str, model: Any) -> list[str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    io.write_json(run_dir / "config.json", {"method": "channel-graph", "target": target,
                                            "config": dataclasses.asdict(cfg),
                                            "target_config": dataclasses.asdict(tcfg)})
    io.write_json(run_dir / "metrics.json", metrics)
    save_json(run_dir / "graph.json", res.graph)
    arrays = {}
    for c in res.channels.nodes:
        for field, key in (("read_lambdas", "lambda"), ("read_covectors", "rho"),
                           ("write_mus", "mu"), ("write_vectors", "omega"),
                           ("write_readout", "readout")):
            v = getattr(c, field)
            if v is not None:
                arrays[f"{c.name}/{key}"] = np.asarray(v)
    if target.startswith("resid-mlp-") and cfg.stream != "full":
        # vectors above are in the coordinates r Q; r = (r Q) Q^T maps them back
        arrays["stream_basis"] = resid_stream_basis(model)
    np.savez(run_dir / "channels.npz", **arrays)
    if not cfg.plots:
        return []
    title = f"{target} seed {metrics['seed']}"
    out = [
        figures.plot_block_graph(res.graph, run_dir / "block_graph.png", components=res.components,
                                 title=f"{title}: block graph (E3, pruned)"),
        figures.plot_compression(res.compression, run_dir / "compression.png",
                                 title=f"{title}: compression"),
        figures.plot_spectra(metrics["ranks"], run_dir / "spectra.png", title=title),
    ]
    if res.usage is not None:
        out.append(figures.plot_usage(res.usage, res.graph.node_ids, run_dir / "usage.png",
                                      title=f"{title}: usage matrix"))
    return [str(p) for p in out]


def load_target_for(name: str, seed: int, target_dir: str | None, progress: bool,
                    target_overrides: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """``(model, config)`` of a target: hand-built ones are built from their config
    (with ``target_overrides``), trained ones loaded or trained (cached)."""
    from ..decomposition.runs import load_or_train_target

    target = base.get_target(name)
    if name in HAND_BUILT and target_dir is None:
        tcfg = target.config(seed=seed, **(target_overrides or {}))
        model = target.init(tcfg, stream_key(seed_key(seed), Stream.INIT))
        return model, tcfg
    if target_overrides:
        raise fail("channel-graph", "overrides", "fields of ChannelGraphConfig for a trained "
                   "target", sorted(target_overrides))
    if target_dir is None and seed == 0 and name in FIXTURES:
        model, tcfg, _ = base.load_target(FIXTURES[name])
        return model, tcfg
    if target_dir is None and seed != 0:
        r = base.train_target(name, target.config(seed=seed),
                              out=Path("runs") / "targets" / f"{name}-seed{seed}",
                              progress=progress)
        return r.model, r.config
    model, tcfg, _ = load_or_train_target(name, target_dir, progress=progress)
    return model, tcfg


def _cli_run(target_name: str, *, seeds: list[int], steps: int | None, out: str | None,
             target_dir: str | None, overrides: dict[str, Any], progress: bool) -> dict:
    from ..decomposition.runs import coerce_overrides

    if steps is not None:
        raise fail("channel-graph", "--steps", "not given (the channel graph has no training "
                   "steps)", steps)
    fields = {f.name for f in dataclasses.fields(ChannelGraphConfig)}
    own = {k: v for k, v in overrides.items() if k in fields}
    rest = {k: v for k, v in overrides.items() if k not in fields}
    cfg = channel_graph_config(target_name, **coerce_overrides(
        own, ChannelGraphConfig, "channel-graph", ("n_data", "refine"),
        ("direction_rule", "stream")))
    summary: dict[str, Any] = {}
    for seed in seeds:
        model, tcfg = load_target_for(target_name, seed, target_dir, progress, rest)
        run_out = (out if out and len(seeds) == 1
                   else (f"{out}/seed{seed}" if out else
                         f"runs/channel-graph-{target_name}-seed{seed}"))
        res = run_channel_graph(model, target_name, tcfg, cfg, seed=seed, out=run_out,
                                progress=progress)
        print(f"\nrun directory: {run_out}  (config.json, metrics.json, graph.json, "
              "channels.npz)")
        if res.plots:
            print("plots: " + ", ".join(res.plots))
        m = res.metrics
        tag = f"seed{seed}/" if len(seeds) > 1 else ""
        summary[f"{tag}Q(gamma=1)"] = m["modularity_q"].get("gamma=1", 0.0)
        summary[f"{tag}components"] = len(m["components"])
        summary[f"{tag}compression all (eta ranks)"] = m["compression_curve"]["all_eta"]
        summary[f"{tag}compression ratio"] = m["compression_curve"]["compression_ratio"]
        if "refined" in m["compression_curve"]:
            summary[f"{tag}compression all (refined, eta ranks)"] = \
                m["compression_curve"]["refined"]["all"]
        pr = m["planted_recovery"]
        if pr is not None and "roles" in pr:
            top = pr["top_edge_is_prev_token"]
            summary[f"{tag}prev-token head top (E3)"] = top["driven_variance"]
            summary[f"{tag}prev-token head top (E4)"] = top["channel_max"]
            summary[f"{tag}loss full"] = pr["losses"]["full"]
            summary[f"{tag}loss heads ablated"] = pr["losses"]["base"]
            for k, v in pr["recovery"].items():
                summary[f"{tag}recovery {k}"] = v
        elif pr is not None:
            if pr.get("ari") is not None:
                summary[f"{tag}ARI"] = pr["ari"]
            if "max_angle" in pr:
                summary[f"{tag}max principal angle"] = pr["max_angle"]
            if "cross_mass" in pr:
                summary[f"{tag}cross-module E4 mass"] = pr["cross_mass"]
        tc = m["target_checks"]
        if tc is not None and "ranks" in tc:
            for blk, r in tc["ranks"].items():
                summary[f"{tag}{blk} read/write eta ranks (bound {tc['rank_bound']})"] = (
                    f"{r['read_eta']}/{r['write_eta']}")
            summary[f"{tag}MLP write channels in one circuit (min fraction)"] = (
                tc["min_fraction"] if tc["one_circuit"] else 0.0)
            for blk, v in tc.get("cross_layer", {}).items():
                summary[f"{tag}w(previous MLP -> {blk}) / w(embed -> {blk})"] = (
                    v["driven_variance"]["ratio"])
        elif tc is not None:
            summary[f"{tag}same-frequency edge fraction"] = (
                tc["same_frequency_edge_fraction"]["raw"])
            summary[f"{tag}key frequencies"] = tc["key_frequencies"]
            for g, v in tc["communities"].items():
                summary[f"{tag}non-singleton communities ({g})"] = v["n_nonsingleton"]
                summary[f"{tag}community frequency purity ({g})"] = v["mean_purity"]
    return summary


register_method(Method(
    name="channel-graph",
    description="Blocks as channels on the residual stream: subspaces, edges, modules, "
                "circuits (project method)",
    targets=tuple(PRESETS),
    run=_cli_run,
))
