"""The channel-graph spec's section-7 bridges (:mod:`jaxinterp.channel.bridges`).

* L3D / SPD: on trained SPD runs, how much of each subcomponent ``v_c u_c`` lies in
  (input span) (x) (output-gradient span) of its layer, per seed and site; writes
  ``bridge.json`` into each run directory.
* LIB (``--lib DIR``): on a trained ``digits-mlp``, the read channels with the next
  layer's LIB metric against the LIB basis (``|cos|`` and ``Lambda`` per layer).

Usage::

    python experiments/channel_bridges.py RUN_DIR [RUN_DIR ...] [--target DIR]
        [--n-data 10000] [--eta 0.99[,0.999,...]]
    python experiments/channel_bridges.py --lib runs/targets/digits-mlp-seed0

Several ``--eta`` values (comma-separated) reuse one pass of K-FAC statistics: the
captured fraction as the spans' energy cut rises (on resid-mlp-2's second layer the
cross-layer read directions carry little variance and fall outside the 0.99 cut).

e.g. after ``jaxinterp run spd tms-5-2 --seeds 8-11 --target runs/targets/tms-5-2-seed0
--out runs/spd/tms-5-2-s8-11``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxinterp import io
from jaxinterp.channel.bridges import bridge_report, layer_kfac, lib_bridge
from jaxinterp.decomposition import load_spd_run
from jaxinterp.decomposition.runs import batch_inputs
from jaxinterp.models import base
from jaxinterp.target import from_equinox


def bridge_run(run_dir: str, target_dir: str | None, n_data: int,
               etas: list[float]) -> list[dict]:
    """One row per (seed, eta); the K-FAC statistics are computed once per run."""
    run = load_spd_run(run_dir, target_dir=target_dir)
    t = from_equinox(run.model)
    dcfg = dataclasses.replace(run.target_config, batch_size=n_data)
    xs = batch_inputs(run.target.sample(dcfg, None, jax.random.key(12345), jnp.asarray(0)))
    stats = layer_kfac(t.apply, t.params, xs, run.sites.paths)
    rows = []
    for i, s in enumerate(run.seeds):
        ci = jax.tree_util.tree_map(lambda v, i=i: v[i], run.components)
        factors = {site: ci.site_factors(site) for site in run.sites.names}
        for eta in etas:
            rep = bridge_report(t.apply, t.params, xs, factors, eta=eta, stats=stats)
            rows.append({"seed": s, "eta": eta, "sites": rep})
    return rows


def _etas(text: str) -> list[float]:
    try:
        etas = [float(e) for e in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--eta: expected numbers in (0, 1] separated by "
                                         f"commas, got {text!r}") from None
    if not all(0.0 < e <= 1.0 for e in etas):
        raise argparse.ArgumentTypeError(f"--eta: expected numbers in (0, 1], got {text!r}")
    return etas


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*")
    p.add_argument("--lib", default=None, help="a trained digits-mlp run directory")
    p.add_argument("--target", default=None, help="target run directory")
    p.add_argument("--n-data", type=int, default=10_000)
    p.add_argument("--eta", type=_etas, default=[0.99],
                   help="trace fraction kept in every span; several, comma-separated")
    args = p.parse_args()
    if args.lib is not None:
        model, tcfg, target = base.load_target(args.lib)
        xs = base.make_seed_data(target, tcfg, int(getattr(tcfg, "seed", 0)))["x_train"]
        print(f"LIB bridge on {args.lib} ({len(xs)} training images)")
        print(f"{'node layer':<20}{'LIB dirs':>9}{'channels':>9}{'compared':>9}"
              f"{'1 - min |cos|':>15}{'max dLambda/Lambda':>20}")
        for name, r in lib_bridge(model, xs).items():
            print(f"{name:<20}{r['n_lib']:>9}{r['n_channel']:>9}{r['n_compared']:>9}"
                  f"{1 - r['min_abs_cos']:>15.1e}{r['max_lambda_rel_diff']:>20.2e}")
    if not args.runs:
        return
    print(f"{'run':<28}{'seed':>5}{'eta':>9}  {'site':<20}{'r_in kfac/read':>15}{'r_out':>6}"
          f"{'kfac total':>11}{'kfac min':>9}{'read total':>11}{'read min':>9}"
          f"{'W in read':>10}{'live':>5}")
    for run in args.runs:
        rows = bridge_run(run, args.target, args.n_data, args.eta)
        for r in rows:
            for site, rep in r["sites"].items():
                k, rd = rep["kfac"], rep["read"]
                print(f"{Path(run).name:<28}{r['seed']:>5}{r['eta']:>9g}  {site:<20}"
                      f"{k['rank_in']:>7}/{rd['rank_in']:<7}{rep['rank_out']:>6}"
                      f"{k['total']:>11.3f}{k['live_min']:>9.3f}{rd['total']:>11.3f}"
                      f"{rd['live_min']:>9.3f}{rd['weight']:>10.3f}{k['n_live']:>5}")
        io.write_json(Path(run) / "bridge.json",
                      {"n_data": args.n_data, "eta": args.eta, "per_seed": rows})


if __name__ == "__main__":
    main()
