"""Time per SPD training step (importances, stochastic and layerwise masked passes,
losses, Adam; one seed, jit-compiled, several steps per call via lax.scan) on the paper
presets, next to the matmul FLOP/s this machine reaches in the same run. Numbers only.

    python benchmarks/spd_step.py [--steps 10] [--presets tms-5-2,tms-40-10,resid-mlp-1]
                                  [--recipe paper|main] [--seeds 1,4] [--seed-batch N]
                                  [--against CHECKOUT]

``--seeds`` times the same step vmapped over that many seeds (as ``--seeds A-B`` of
``jaxinterp run spd`` does), printing the time per step and per seed-step for each count.
``--against CHECKOUT`` times this package side by side with another checkout's (e.g.
``git worktree add ../before HEAD~1``), alternating their compiled chunks six times, and
prints min and median ms per step of each: the way to measure a change on a machine
whose speed drifts.

For orientation (issue 4): the PyTorch reference (float32) takes about 38 ms (tms-5-2),
0.70 s (tms-40-10) and 0.21 s (resid-mlp-1) per step on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from types import ModuleType

import jax
import jax.numpy as jnp
from _common import matmul_flops

import jaxinterp


def load_other_copy(root: str, name: str = "jaxinterp_other") -> ModuleType:
    """The ``jaxinterp`` package of another checkout (``root/jaxinterp``, e.g. a ``git
    worktree`` of an older commit), imported next to this one under ``name``."""
    spec = importlib.util.spec_from_file_location(
        name, f"{root}/jaxinterp/__init__.py", submodule_search_locations=[f"{root}/jaxinterp"])
    if spec is None or spec.loader is None:
        raise SystemExit(f"--against: no jaxinterp package under {root!r}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def make_timer(ji: ModuleType, name: str, steps: int, recipe: str = "paper", n_seeds: int = 1,
               seed_batch: int | None = None) -> Callable[[], float]:
    """A compiled, warmed-up call of ``steps`` SPD steps of ``name`` (``n_seeds`` vmapped)
    with package ``ji``; calling it returns seconds per (all-seeds) step."""
    dec = importlib.import_module(ji.__name__ + ".decomposition")
    fit = importlib.import_module(ji.__name__ + ".train.fit")
    make_optimizer = importlib.import_module(ji.__name__ + ".train").make_optimizer
    target = ji.get_target(name)
    tcfg = target.config()
    model = target.init(tcfg, jax.random.key(0))
    cfg = dec.spd_config(name, recipe=recipe)
    t = ji.target.from_equinox(model)
    dcfg = dataclasses.replace(tcfg, batch_size=cfg.batch_size)
    x0 = target.sample(dcfg, None, jax.random.key(0), jnp.asarray(0))[0]
    sites = dec.apd.make_sites(t.apply, t.params, x0, cfg.paths)
    keys = jax.random.split(jax.random.key(1), n_seeds)
    comps = jax.vmap(lambda k: dec.spd.init_spd(t.params, sites, cfg.C, cfg.ci_hidden,
                                                init=cfg.init, ci_fn=cfg.ci_fn, key=k))(keys)
    opt = make_optimizer("adam", cfg.lr, cfg.steps, schedule=cfg.schedule)
    lcfg = cfg.loss_config()
    chunk = fit._make_chunk(
        lambda c, p, b: dec.spd.spd_loss(c, p, b[0], b[1], apply=t.apply, sites=sites,
                                         cfg=lcfg),
        lambda d, k, s: (target.sample(dcfg, None, k, s), jax.random.fold_in(k, 3)),
        opt, True, None, frozen_axis=None, seed_batch=seed_batch)
    state = fit.TrainState(comps, jax.vmap(opt.init)(comps), jnp.zeros(n_seeds, jnp.int32))
    run_keys = jax.random.split(jax.random.key(2), n_seeds)
    warm, _ = chunk(state, t.params, None, run_keys, steps)  # compile + warm-up
    jax.block_until_ready(warm)

    def timed() -> float:
        t0 = time.perf_counter()
        out, _ = chunk(warm, t.params, None, run_keys, steps)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / steps

    return timed


def bench(name: str, steps: int, recipe: str = "paper", n_seeds: int = 1,
          seed_batch: int | None = None) -> float:
    """Seconds per (all-seeds) step of ``name``'s SPD step, ``n_seeds`` vmapped."""
    return make_timer(jaxinterp, name, steps, recipe, n_seeds, seed_batch)()


def side_by_side(other: ModuleType, names: list[str], steps: int, recipe: str, n_seeds: int,
                 rounds: int = 6) -> None:
    """Print min / median ms per step of this package and ``other``, their compiled chunks
    alternated ``rounds`` times (the machine's drift hits both alike)."""
    print(f"{'preset':<14}{'seeds':>6}{'this min':>10}{'median':>8}{'other min':>11}"
          f"{'median':>8}{'other/this':>12}")
    for name in names:
        fa = make_timer(jaxinterp, name, steps, recipe, n_seeds)
        fb = make_timer(other, name, steps, recipe, n_seeds)
        a, b = [], []
        for _ in range(rounds):
            a.append(1e3 * fa())
            b.append(1e3 * fb())
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"{name:<14}{n_seeds:>6}{min(a):>10.2f}{ma:>8.2f}{min(b):>11.2f}{mb:>8.2f}"
              f"{mb / ma:>12.2f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--presets", default="tms-5-2,tms-40-10,resid-mlp-1")
    p.add_argument("--recipe", default="paper", choices=("paper", "main"))
    p.add_argument("--seeds", default="1", help="comma-separated seed counts to vmap")
    p.add_argument("--seed-batch", type=int, default=None,
                   help="vmap this many seeds at a time (default: all)")
    p.add_argument("--against", metavar="CHECKOUT", default=None,
                   help="time side by side with the package of another checkout")
    args = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind}   matmul: {matmul_flops() / 1e9:.0f} GFLOP/s"
          f"   recipe: {args.recipe}")
    names = args.presets.split(",")
    if args.against:
        other = load_other_copy(args.against)
        for n in (int(v) for v in args.seeds.split(",")):
            side_by_side(other, names, args.steps, args.recipe, n)
        return
    print(f"{'preset':<14}{'C':>5}{'batch':>7}{'seeds':>6}{'ms/step':>10}{'steps/s':>9}"
          f"{'ms/seed-step':>14}")
    for name in names:
        cfg = jaxinterp.decomposition.spd_config(name, recipe=args.recipe)
        for n in (int(v) for v in args.seeds.split(",")):
            dt = bench(name, args.steps, args.recipe, n, args.seed_batch)
            print(f"{name:<14}{cfg.C:>5}{cfg.batch_size:>7}{n:>6}{1e3 * dt:>10.1f}"
                  f"{1 / dt:>9.1f}{1e3 * dt / n:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
