"""``jaxinterp run lib TARGET [--basis lib|pca|neuron]``: build bases and interaction
graphs of a trained target, score node and edge ablations, and write a run directory.

The run directory gets ``config.json``, ``metrics.json``, ``bases.npz`` (per basis and
layer: ``C``, ``C_pinv``, ``lambdas``; per pair: ``edges``), ``graph_<basis>.json`` and
the figures ``lambdas.png``, ``node_ablation.png``, ``edge_mass.png`` and
``graph_<basis>.png``. ``metrics.json`` keys (each ``{basis: ...}``): ``lambdas``,
``n_relevant_directions``, ``node_ablation``, ``edges_required``, ``edge_mass_n90``,
``edge_mass_n99``, ``modularity_q``, ``communities`` (non-singleton members too; Louvain
on ``log_eps`` weights with the bisect thresholds), ``build_seconds``; for ``modadd``
also ``fourier_frequencies`` and ``same_frequency_edge_fraction``.

Data (LIB spec section 8): the basis is built on the training split (modadd, digits-mlp)
or all data (block-mlp); ablations are scored on the test split (accuracy) or, for
block-mlp, on the same data as ``r2`` against the unablated output. For block-mlp the
default data is a product design (every pairing of 100 block-0 draws with 100 block-1
draws, 10 000 rows), so cross-block covariances vanish exactly.

References:
    Bushnaq et al. (2024), "The Local Interaction Basis: Identifying
    Computationally-Relevant and Sparsely Interacting Features in Neural Networks"
    (arXiv 2405.10928).
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

from .. import graph, io
from .._checks import check_in, check_nonnegative, check_positive, fail
from ..methods import Method, register_method
from ..models import base
from . import ablation as abl
from . import figures
from .adapters import sections_for
from .basis import BASES, interaction_basis
from .edges import EDGE_KINDS, assemble_graph, interaction_edges
from .fourier import fourier_labels, same_frequency_fraction
from .sections import collect_activations

__all__ = ["LIBConfig", "LIBRun", "lib_config", "relevant_directions", "run_lib"]

KEYS = {"lib": "jacobian"}
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "modadd-seed0"
PRESETS: dict[str, dict[str, Any]] = {
    "modadd": {"baselines": ("pca",)},
    "digits-mlp": {"baselines": ("pca",)},
    "block-mlp": {"baselines": ("pca", "neuron")},
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LIBConfig:
    """Options of a LIB run (LIB spec sections 3-8).

    Attributes:
        basis: the main basis (``lib`` = ``jacobian``, an IG variant, ``pca``, ``neuron``).
        baselines: bases compared against it.
        edges, rule, n_intervals: edge kind and quadrature (``squared`` / ``gradient``).
        center, tau, tau_relative: statistics and truncation.
        n_basis, n_eval: use only the first examples of the basis / evaluation data.
        product_design: block-mlp data as a product of per-block draws.
        delta_nodes, delta_edges: tolerated score drops (minimal directions, bisect).
        max_gap_index: largest ``n`` searched for the Lambda cliff.
        resolutions: Louvain resolutions reported.
        n_null: null graphs for the null z-score of ``Q`` at each resolution (0: skipped).
        null_mode: ``edges`` (the spec's null: weights permuted among the existing edges of
            each layer pair, topology kept) or ``pairs`` (weights placed on random node
            pairs of the layer pair); see :func:`jaxinterp.graph.community.null_modularity`.
        target_n: also report the best partition with exactly this many non-singleton
            communities (resolution searched, channel-graph spec section 6); ``None``: off.
        bisect: run the edge bisection.
        chunk_size: examples per chunk of the float64 accumulations.
        plots: write figures.
    """

    basis: str = "lib"
    baselines: tuple[str, ...] = ("pca",)
    edges: str = "squared"
    rule: str = "gradient"
    n_intervals: int = 0
    center: bool = True
    tau: float = 1e-15
    tau_relative: float | None = None
    n_basis: int | None = None
    n_eval: int | None = None
    product_design: bool = True
    delta_nodes: float = 0.01
    delta_edges: float = 0.001
    max_gap_index: int = 40
    resolutions: tuple[float, ...] = (1.0, 0.5)
    n_null: int = 20
    null_mode: str = "edges"
    target_n: int | None = None
    bisect: bool = True
    chunk_size: int = 256
    plots: bool = True

    def __post_init__(self):
        fn = "LIBConfig"
        allowed = (*KEYS, *BASES)
        check_in(fn, "basis", self.basis, allowed)
        for b in self.baselines:
            check_in(fn, "baselines", b, allowed)
        check_in(fn, "edges", self.edges, EDGE_KINDS)
        check_nonnegative(fn, "delta_nodes", self.delta_nodes)
        check_nonnegative(fn, "delta_edges", self.delta_edges)
        check_positive(fn, "max_gap_index", self.max_gap_index, integer=True)
        check_positive(fn, "chunk_size", self.chunk_size, integer=True)
        check_nonnegative(fn, "n_null", self.n_null)
        check_in(fn, "null_mode", self.null_mode, graph.community.NULL_MODES)
        for name in ("n_basis", "n_eval", "target_n"):
            if getattr(self, name) is not None:
                check_positive(fn, name, getattr(self, name), integer=True)

    @property
    def bases(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.basis, *self.baselines)))


def lib_config(target: str, **overrides: Any) -> LIBConfig:
    """The preset of ``target`` with ``overrides``."""
    from ..decomposition.runs import preset_config

    return preset_config(LIBConfig, PRESETS, "lib_config", target, overrides)


def relevant_directions(lambdas: Any, *, constant: bool, max_n: int = 40) -> dict[str, Any]:
    """The Lambda cliff: ``n_rel`` maximises ``log L_n - log L_{n+1}`` over the sorted
    non-constant ``L`` (``n <= max_n``); also the gap ratio and ``n_rel + 1`` (with the
    constant, comparable with ablation counts)."""
    lam = np.sort(np.asarray(lambdas, np.float64)[1 if constant else 0 :])[::-1]
    lam = lam[lam > 0]
    if lam.size < 2:
        return {"n_rel": int(lam.size), "gap_ratio": None, "n_with_constant": int(lam.size)}
    k = min(max_n, lam.size - 1)
    gaps = np.log(lam[:k]) - np.log(lam[1 : k + 1])
    n = int(np.argmax(gaps)) + 1
    return {
        "n_rel": n,
        "gap_ratio": float(lam[n - 1] / lam[n]),
        "n_with_constant": n + int(constant),
    }


class LIBRun(NamedTuple):
    """What :func:`run_lib` returns: ``metrics``, per-basis ``bases``, ``edges`` and
    ``graphs``, written ``plots`` and the ``run_dir``."""

    metrics: dict[str, Any]
    bases: dict[str, Any]
    edges: dict[str, tuple[np.ndarray, ...]]
    graphs: dict[str, graph.Graph]
    plots: list[str]
    run_dir: Path | None


def _data(name: str, model: Any, tcfg: Any, seed: int, cfg: LIBConfig) -> dict[str, Any]:
    target = base.get_target(name)
    data = base.make_seed_data(target, tcfg, seed)
    if name == "modadd":
        from ..models.modadd import tokens_of

        basis_x = tokens_of(jnp.asarray(data["train_pairs"]), model.p)
        eval_x = tokens_of(jnp.asarray(data["test_pairs"]), model.p)
        labels = np.asarray(data["test_labels"])
    elif name == "digits-mlp":
        basis_x, eval_x = jnp.asarray(data["x_train"]), jnp.asarray(data["x_test"])
        labels = np.asarray(data["y_test"])
    elif name == "block-mlp":
        x = np.asarray(data["x"])
        if cfg.product_design:
            n, half = int(np.sqrt(x.shape[0])), x.shape[1] // 2
            x = np.concatenate([np.repeat(x[:n, :half], n, 0), np.tile(x[:n, half:], (n, 1))], 1)
        basis_x = eval_x = jnp.asarray(x)
        labels = None
    else:
        raise fail("run_lib", "target", "one of " + ", ".join(PRESETS), repr(name))
    basis_x = basis_x[: cfg.n_basis]
    eval_x = eval_x[: cfg.n_eval]
    labels = None if labels is None else labels[: cfg.n_eval]
    return {"basis_x": basis_x, "eval_x": eval_x, "labels": labels}


def _fourier(model: Any, sectioned: Any, ib: Any, n_rel: dict[str, int]) -> dict[str, Any]:
    from ..models.modadd import all_tokens

    p = model.p
    acts = collect_activations(sectioned, all_tokens(p), chunk_size=4096)
    out = {}
    for li, b in enumerate(ib.layers[:-1]):
        start = int(b.constant)  # rank the non-constant directions by Lambda
        order = np.argsort(-b.lambdas[start:], kind="stable")[:50] + start
        f = np.asarray(acts[li], np.float64)
        if f.shape[1] > 1:
            f = f[:, :2]  # resid_pre: the operand positions (the '=' position is constant)
        lab = fourier_labels((f @ b.C[:, order]).reshape(p, p, f.shape[1], -1))
        k = n_rel.get(b.name, 10)
        out[b.name] = {
            "directions": order.tolist(),
            "frequencies": lab.frequency.tolist(),
            "purity": lab.purity.tolist(),
            "relevant_frequencies": sorted(set(lab.frequency[:k].tolist()) - {0}),
            "mean_purity_relevant": float(np.mean(lab.purity[:k])),
        }
    return out


def run_lib(
    model: Any,
    target_name: str,
    tcfg: Any,
    cfg: LIBConfig,
    *,
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
) -> LIBRun:
    """Bases, edges, ablations, graphs and communities for every basis of ``cfg``.

    Args:
        model: the trained target model.
        target_name: ``modadd``, ``digits-mlp`` or ``block-mlp``.
        tcfg: its training config (gives the data split).
        cfg: :class:`LIBConfig`.
        seed: the target's seed (its data split).
        out: run directory (``None``: nothing written).
        progress: progress bar on stderr.

    Returns:
        :class:`LIBRun`.
    """
    s = sections_for(model)
    d = _data(target_name, model, tcfg, seed, cfg)
    with jax.enable_x64(True):
        acts = tuple(
            np.asarray(a)
            for a in collect_activations(s, d["basis_x"], dtype=jnp.float64, chunk_size=4096)
        )
    eval_acts = collect_activations(s, d["eval_x"], chunk_size=4096)
    out_ref = jnp.asarray(eval_acts[-1])
    if d["labels"] is None:
        score, score_name = abl.r2_score(out_ref), "r2"
    else:
        score, score_name = abl.accuracy_score(d["labels"]), "accuracy"
    base_score = float(score(out_ref))
    names = s.names
    pairs = [f"{a}->{b}" for a, b in zip(names[:-1], names[1:], strict=True)]
    m: dict[str, Any] = {
        k: {}
        for k in (
            "lambdas",
            "n_relevant_directions",
            "node_ablation",
            "edges_required",
            "edge_bisect",
            "edge_mass_n90",
            "edge_mass_n99",
            "modularity_q",
            "communities",
            "build_seconds",
        )
    }
    bases, all_edges, graphs = {}, {}, {}
    steps = tqdm(total=len(cfg.bases) * (3 + len(pairs)), disable=not progress, desc="lib")
    for key in cfg.bases:
        t0 = time.perf_counter()
        ib = interaction_basis(
            s,
            d["basis_x"],
            basis=KEYS.get(key, key),
            rule=cfg.rule,
            n_intervals=cfg.n_intervals,
            center=cfg.center,
            tau=cfg.tau,
            tau_relative=cfg.tau_relative,
            chunk_size=cfg.chunk_size,
            acts=acts,
        )
        t1 = time.perf_counter()
        steps.update()
        edges = interaction_edges(
            s,
            ib,
            d["basis_x"],
            kind=cfg.edges,
            rule=cfg.rule,
            n_intervals=cfg.n_intervals,
            acts=acts,
            key=jax.random.key(seed),
        )
        t2 = time.perf_counter()
        steps.update()
        bases[key], all_edges[key] = ib, edges
        m["build_seconds"][key] = {"basis": t1 - t0, "edges": t2 - t1}
        layers = ib.layers[:-1]
        m["lambdas"][key] = {b.name: b.lambdas.tolist() for b in ib.layers}
        m["n_relevant_directions"][key] = {
            b.name: relevant_directions(b.lambdas, constant=b.constant, max_n=cfg.max_gap_index)
            for b in layers
        }
        m["node_ablation"][key] = {}
        for li, b in enumerate(layers):
            curve = abl.node_ablation(s, ib, d["eval_x"], score, layer=li, acts=eval_acts)
            m["node_ablation"][key][b.name] = {
                "counts": curve.counts.tolist(),
                "scores": curve.scores.tolist(),
                "minimal_directions": abl.minimal_count(curve, base_score, cfg.delta_nodes),
            }
        steps.update()
        eps = []
        for li, pair in enumerate(pairs):
            n90, n99 = abl.edge_mass_counts(edges[li], constant=ib.layers[li].constant)
            m["edge_mass_n90"].setdefault(key, {})[pair] = n90
            m["edge_mass_n99"].setdefault(key, {})[pair] = n99
            if cfg.bisect:
                res = abl.bisect_edges(
                    s,
                    ib,
                    edges,
                    d["eval_x"],
                    score,
                    layer=li,
                    delta=cfg.delta_edges,
                    base=base_score,
                    acts=eval_acts,
                )
                m["edge_bisect"].setdefault(key, {})[pair] = res._asdict()
                m["edges_required"].setdefault(key, {})[pair] = res.k
                eps.append(res.eps)
            steps.update()
        g = assemble_graph(ib, edges)
        graphs[key] = g
        m["modularity_q"][key], m["communities"][key] = {}, {}
        eps_arg = eps if eps and all(e is not None and e > 0 for e in eps) else None
        ug = graph.undirected(g, eps=eps_arg)
        for gamma in cfg.resolutions:
            c = graph.detect_communities(ug, resolution=gamma)
            m["modularity_q"][key][f"gamma={gamma:g}"] = c.modularity
            m["communities"][key][f"gamma={gamma:g}"] = _community_report(
                c, ug, cfg.n_null, cfg.null_mode
            )
        if cfg.target_n is not None:
            c = graph.community.target_n_communities(ug, cfg.target_n, seeds=(0, 1, 2))
            m["communities"][key][f"n={cfg.target_n}"] = (
                None if c is None else {"resolution": c.resolution, **_community_report(c, ug, 0)}
            )
    steps.close()
    if target_name == "modadd":
        from ..models.modadd import key_frequencies

        ff: dict[str, Any] = {"key_frequencies_embedding": list(key_frequencies(model))}
        m["fourier_frequencies"] = ff
        m["same_frequency_edge_fraction"] = {}
        # every basis is labelled over the main basis' relevant count, so purities compare
        # like with like (a baseline's own spectrum may have its largest gap after 2)
        main = m["n_relevant_directions"][cfg.bases[0]]
        n_rel = {n: v["n_rel"] for n, v in main.items()}
        for key, ib in bases.items():
            fl = _fourier(model, s, ib, n_rel)
            ff[key] = fl
            a, b = fl[names[0]], fl[names[1]]
            m["same_frequency_edge_fraction"][key] = {
                pairs[0]: same_frequency_fraction(
                    all_edges[key][0],
                    np.asarray(a["frequencies"]),
                    np.asarray(b["frequencies"]),
                    np.asarray(a["directions"]),
                    np.asarray(b["directions"]),
                )
            }
    metrics = {
        "target": target_name,
        "seed": seed,
        "basis": cfg.basis,
        "bases": list(cfg.bases),
        "score": score_name,
        "base_score": base_score,
        "n_basis_examples": int(d["basis_x"].shape[0]),
        "n_eval_examples": int(d["eval_x"].shape[0]),
        **m,
    }
    written: list[str] = []
    run_dir = None if out is None else Path(out)
    if run_dir is not None:
        written = _write(run_dir, cfg, metrics, bases, all_edges, graphs, pairs, target_name)
    return LIBRun(metrics, bases, all_edges, graphs, written, run_dir)


def _write(
    run_dir: Path,
    cfg: LIBConfig,
    metrics: dict[str, Any],
    bases: dict[str, Any],
    edges: dict[str, Any],
    graphs: dict[str, graph.Graph],
    pairs: list[str],
    target_name: str,
) -> list[str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    io.write_json(
        run_dir / "config.json",
        {"method": "lib", "target": target_name, "config": dataclasses.asdict(cfg)},
    )
    io.write_json(run_dir / "metrics.json", metrics)
    arrays = {}
    for key, ib in bases.items():
        for b in ib.layers:
            for field in ("C", "C_pinv", "lambdas"):
                arrays[f"{key}/{b.name}/{field}"] = getattr(b, field)
        for pair, e in zip(pairs, edges[key], strict=True):
            arrays[f"{key}/{pair}/edges"] = e
    np.savez(run_dir / "bases.npz", **arrays)
    for key, g in graphs.items():
        graph.save_json(run_dir / f"graph_{key}.json", g)
    if not cfg.plots:
        return []
    title = f"{target_name} seed {metrics['seed']}"
    out = [
        figures.plot_lambdas(
            {
                k: {n: v for n, v in per.items() if n != "output"}
                for k, per in metrics["lambdas"].items()
            },
            run_dir / "lambdas.png",
            title=title,
        ),
        figures.plot_node_ablation(
            metrics["node_ablation"],
            run_dir / "node_ablation.png",
            base=metrics["base_score"],
            delta=cfg.delta_nodes,
            score_name=metrics["score"],
            title=title,
        ),
        figures.plot_edge_mass(
            {k: dict(zip(pairs, e, strict=True)) for k, e in edges.items()},
            run_dir / "edge_mass.png",
            title=title,
        ),
    ]
    for key, g in graphs.items():
        comms = metrics["communities"][key][f"gamma={cfg.resolutions[0]:g}"]["members"]
        out.append(
            graph.plot_graph(
                g,
                run_dir / f"graph_{key}.png",
                communities=comms,
                title=f"{title}: {key} interaction graph",
                max_nodes=30,
            )
        )
    return [str(p) for p in out]


def _community_report(
    c: graph.Communities, ug: Any, n_null: int, null_mode: str = "edges"
) -> dict[str, Any]:
    rep: dict[str, Any] = {
        "modularity_q": c.modularity,
        "n_nonsingleton": c.n_nonsingleton,
        "sizes": c.sizes,
        "spans": c.spans,
        "inside_fraction": c.inside_fraction,
        "n_isolated": c.n_isolated,
        "members": [sorted(x) for x in c.communities if len(x) > 1],
    }
    if n_null and ug.size(weight="weight") > 0:
        rep.update(
            graph.community.null_report(
                ug, c.modularity, resolution=c.resolution, n_graphs=n_null, mode=null_mode
            )
        )
    return rep


def _load(name: str, seed: int, target_dir: str | None, progress: bool) -> tuple[Any, Any]:
    from ..decomposition.runs import load_or_train_target

    if target_dir is None and name == "modadd" and seed == 0:
        model, tcfg, _ = base.load_target(FIXTURE)
        return model, tcfg
    if target_dir is None and seed != 0:
        target = base.get_target(name)
        r = base.train_target(
            name,
            target.config(seed=seed),
            out=Path("runs") / "targets" / f"{name}-seed{seed}",
            progress=progress,
        )
        return r.model, r.config
    model, tcfg, _ = load_or_train_target(name, target_dir, progress=progress)
    return model, tcfg


def _cli_run(
    target_name: str,
    *,
    seeds: list[int],
    steps: int | None,
    out: str | None,
    target_dir: str | None,
    overrides: dict[str, Any],
    progress: bool,
) -> dict:
    from ..decomposition.runs import coerce_overrides

    if steps is not None:
        raise fail("lib", "--steps", "not given (LIB has no training steps)", steps)
    cfg = lib_config(
        target_name,
        **coerce_overrides(overrides, LIBConfig, "lib", ("n_basis", "n_eval", "target_n")),
    )
    summary: dict[str, Any] = {}
    for seed in seeds:
        model, tcfg = _load(target_name, seed, target_dir, progress)
        if target_dir is not None:  # the split is the loaded target's, whatever --seed says
            tseed = int(getattr(tcfg, "seed", seed))
            if seed not in (0, tseed):
                raise fail(
                    "lib",
                    "--seed",
                    f"{tseed} (the seed of the target in {target_dir}) or omitted",
                    seed,
                )
            seed = tseed
        run_out = (
            out
            if out and len(seeds) == 1
            else (f"{out}/seed{seed}" if out else f"runs/lib-{target_name}-seed{seed}")
        )
        res = run_lib(model, target_name, tcfg, cfg, seed=seed, out=run_out, progress=progress)
        print(f"\nrun directory: {run_out}  (config.json, metrics.json, bases.npz, graph_*.json)")
        if res.plots:
            print("plots: " + ", ".join(res.plots))
        mt = res.metrics
        tag = f"seed{seed}/" if len(seeds) > 1 else ""
        summary[f"{tag}base_{mt['score']}"] = mt["base_score"]
        for key in cfg.bases:
            for layer, v in mt["node_ablation"][key].items():
                if v["minimal_directions"] is not None:
                    summary[f"{tag}{key} min directions {layer}"] = v["minimal_directions"]
            for pair, k in mt["edges_required"].get(key, {}).items():
                if k is not None:
                    summary[f"{tag}{key} edges {pair}"] = k
            summary[f"{tag}{key} Q(gamma=1)"] = mt["modularity_q"][key].get("gamma=1", 0.0)
    return summary


register_method(
    Method(
        name="lib",
        description="Local Interaction Basis and its interaction graph (Bushnaq et al. 2024)",
        targets=tuple(PRESETS),
        run=_cli_run,
    )
)
