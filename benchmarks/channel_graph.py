"""Channel-graph reproductions of spec section 8 with per-stage wall times: T1 (the
planted-channel network) over seeds and variants, T2 (``block-mlp``) and the induction
transformer (the three attention linearisations). Prints one line per run with the checked
quantities; the numbers of experiments/channel_graph.md come from here.

    python benchmarks/channel_graph.py [--seeds 0-4] [--t1] [--t2] [--n-side 100]
    python benchmarks/channel_graph.py --induction [--target-dir RUN] [--n-data 2000]

``--induction`` uses the cached target ``runs/targets/induction-seed0`` (trained on the
default recipe if missing) or ``--target-dir``.

The first run of each shape includes compilation (a few seconds).
"""

from __future__ import annotations

import argparse
import json
import time

from jaxinterp.channel.run import channel_graph_config, load_target_for, run_channel_graph
from jaxinterp.cli import UserError, parse_seeds

T1_VARIANTS = {
    "identity": {},
    "tanh": {"activation": "tanh"},
    "gated": {"gated": True},
    "tanh-gated": {"activation": "tanh", "gated": True},
    "unequal": {"out_rank": 2},
    "tanh-kappa0.1": {"activation": "tanh", "kappa": 0.1},
    "tanh-kappa0.3": {"activation": "tanh", "kappa": 0.3},
    "tanh-kappa1": {"activation": "tanh", "kappa": 1.0},
}


def _line(tag: str, m: dict) -> dict:
    pr = m["planted_recovery"]
    c1, c5 = m["communities"]["gamma=1"], m["communities"]["gamma=0.5"]
    out = {
        "run": tag,
        "read_ranks": {k: v["read"]["numerical_rank"] for k, v in m["ranks"].items()
                       if "read" in v},
        "write_ranks": {k: v["write"]["numerical_rank"] for k, v in m["ranks"].items()},
        "eta_ranks": m["compression_curve"]["eta_ranks"],
        "Q1": round(c1["modularity_q"], 4), "n_comm1": c1["n_communities"],
        "ARI1": round(c1.get("ari", float("nan")), 4),
        "Q05": round(c5["modularity_q"], 4), "n_comm05": c5["n_communities"],
        "ARI05": round(c5.get("ari", float("nan")), 4),
        "planted_Q1": round(c1.get("planted_q", float("nan")), 4),
        "planted_Q05": round(c5.get("planted_q", float("nan")), 4),
        "null_z1": c1.get("null_z"),
        "components": m["components"], "n_channel_components": len(m["channel_components"]),
        "compress_all_numerical": m["compression_curve"]["all_numerical"],
        "min_drop_weakest": pr["min_drop_weakest"],
        "usage_precision": pr["usage"]["min_precision"],
        "usage_recall": pr["usage"]["min_recall"],
        "usage_modules": {k: {kk: (round(vv, 4) if isinstance(vv, float) else vv)
                              for kk, vv in v.items()}
                          for k, v in pr["usage"].items() if k in ("module0", "module1")},
        "circuits_pure": pr["usage"]["circuits_pure"],
        "circuit_ratios": [c["ratio"] for c in m["circuits"]],
        "seconds": {k: round(v, 1) for k, v in m["seconds"].items()},
    }
    if "max_angle" in pr:
        out.update({"max_angle": pr["max_angle"], "components_ok": pr["components_ok"],
                    **{f"{e}_off_rel": pr[e]["max_off_planted_relative"]
                       for e in ("E1", "E3", "E4")}})
    if "cross_mass" in pr:
        out["cross_mass"] = pr["cross_mass"]
    return out


def _run(target: str, seed: int, **overrides) -> dict:
    t = time.perf_counter()
    model, tcfg = load_target_for(target, seed, None, False, overrides)
    cfg = channel_graph_config(target, plots=False, n_null_graphs=5)
    m = run_channel_graph(model, target, tcfg, cfg, seed=seed, progress=False).metrics
    m["seconds"]["total"] = time.perf_counter() - t
    return m


def _induction(target_dir: str | None, n_data: int | None, attention: str) -> dict:
    from jaxinterp.decomposition.runs import load_or_train_target

    t = time.perf_counter()
    model, tcfg, _ = load_or_train_target("induction", target_dir, progress=False)
    over = {"plots": False, "attention": attention}
    if n_data:
        over["n_data"] = n_data
    cfg = channel_graph_config("induction", **over)
    m = run_channel_graph(model, "induction", tcfg, cfg, seed=0, progress=False).metrics
    pr = m["planted_recovery"]
    return {
        "run": f"induction {attention}", "n_examples": m["n_examples"],
        "ranks": {k: [v.get("read", {}).get("eta_rank"), v["write"]["eta_rank"]]
                  for k, v in m["ranks"].items()},
        "roles": {k: pr["roles"][k] for k in ("prev_token_head", "induction_head")},
        "scores": {k: pr["roles"][k] for k in ("prev_token_score", "prev_token_at_m_score",
                                               "induction_score")},
        "edges_into_induction": pr["edges_into_induction"],
        "top_edge_is_prev_token": pr["top_edge_is_prev_token"],
        "losses": {k: v for k, v in pr["losses"].items() if not k.startswith("write_rank_")},
        "recovery": pr["recovery"], "necessity": pr["necessity"],
        "recovery_by_write_rank": pr["recovery_by_write_rank"],
        "eta_ranks": pr["eta_ranks"], "co_usage": pr["co_usage"],
        "Q1": m["modularity_q"].get("gamma=1"), "components": m["components"],
        "seconds": {k: round(v, 1) for k, v in m["seconds"].items()},
        "total_s": round(time.perf_counter() - t, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0-4", help="A-B or one seed N")
    ap.add_argument("--t1", action="store_true")
    ap.add_argument("--t2", action="store_true")
    ap.add_argument("--variants", default=",".join(T1_VARIANTS))
    ap.add_argument("--n-side", type=int, default=100)
    ap.add_argument("--induction", action="store_true")
    ap.add_argument("--target-dir", default=None)
    ap.add_argument("--n-data", type=int, default=None)
    args = ap.parse_args()
    try:
        seeds = parse_seeds(args.seeds)
    except UserError as e:
        ap.error(str(e))
    if args.induction:
        for attention in ("full", "frozen_pattern", "qk"):
            print(json.dumps(_induction(args.target_dir, args.n_data, attention), default=str),
                  flush=True)
        if not (args.t1 or args.t2):
            return
    both = not (args.t1 or args.t2)
    if args.t1 or both:
        for v in args.variants.split(","):
            for seed in seeds:
                m = _run("planted-channels", seed, n_side=args.n_side, **T1_VARIANTS[v])
                print(json.dumps(_line(f"T1 {v} seed{seed}", m), default=str), flush=True)
    if args.t2 or both:
        for v, ov in (("relu", {}), ("relu-gated", {"gated": True})):
            for seed in seeds:
                m = _run("block-mlp", seed, **ov)
                print(json.dumps(_line(f"T2 {v} seed{seed}", m), default=str), flush=True)


if __name__ == "__main__":
    main()
