"""Time per SPD training step (importances, stochastic and layerwise masked passes,
losses, Adam; one seed, jit-compiled, several steps per call via lax.scan) on the paper
presets, next to the matmul FLOP/s this machine reaches in the same run. Numbers only.

    python benchmarks/spd_step.py [--steps 10] [--presets tms-5-2,tms-40-10,resid-mlp-1]
                                  [--recipe paper|main] [--seeds 1,4] [--seed-batch N]

``--seeds`` times the same step vmapped over that many seeds (as ``--seeds A-B`` of
``jaxinterp run spd`` does), printing the time per step and per seed-step for each count.

For orientation (issue 4): the PyTorch reference (float32) takes about 38 ms (tms-5-2),
0.70 s (tms-40-10) and 0.21 s (resid-mlp-1) per step on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
from _common import matmul_flops

import jaxinterp as ji
from jaxinterp.decomposition import apd, spd, spd_config
from jaxinterp.train import make_optimizer
from jaxinterp.train.fit import TrainState, _make_chunk


def bench(name: str, steps: int, recipe: str = "paper", n_seeds: int = 1,
          seed_batch: int | None = None) -> float:
    """Seconds per (all-seeds) step of ``name``'s SPD step, ``n_seeds`` vmapped."""
    target = ji.get_target(name)
    tcfg = target.config()
    model = target.init(tcfg, jax.random.key(0))
    cfg = spd_config(name, recipe=recipe)
    t = ji.target.from_equinox(model)
    dcfg = dataclasses.replace(tcfg, batch_size=cfg.batch_size)
    x0 = target.sample(dcfg, None, jax.random.key(0), jnp.asarray(0))[0]
    sites = apd.make_sites(t.apply, t.params, x0, cfg.paths)
    keys = jax.random.split(jax.random.key(1), n_seeds)
    comps = jax.vmap(lambda k: spd.init_spd(t.params, sites, cfg.C, cfg.ci_hidden,
                                            init=cfg.init, ci_fn=cfg.ci_fn, key=k))(keys)
    opt = make_optimizer("adam", cfg.lr, cfg.steps, schedule=cfg.schedule)
    lcfg = cfg.loss_config()
    chunk = _make_chunk(
        lambda c, p, b: spd.spd_loss(c, p, b[0], b[1], apply=t.apply, sites=sites, cfg=lcfg),
        lambda d, k, s: (target.sample(dcfg, None, k, s), jax.random.fold_in(k, 3)),
        opt, True, None, frozen_axis=None, seed_batch=seed_batch)
    state = TrainState(comps, jax.vmap(opt.init)(comps), jnp.zeros(n_seeds, jnp.int32))
    run_keys = jax.random.split(jax.random.key(2), n_seeds)
    out, _ = chunk(state, t.params, None, run_keys, steps)  # compile + warm-up
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    out, _ = chunk(out, t.params, None, run_keys, steps)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--presets", default="tms-5-2,tms-40-10,resid-mlp-1")
    p.add_argument("--recipe", default="paper", choices=("paper", "main"))
    p.add_argument("--seeds", default="1", help="comma-separated seed counts to vmap")
    p.add_argument("--seed-batch", type=int, default=None,
                   help="vmap this many seeds at a time (default: all)")
    args = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind}   matmul: {matmul_flops() / 1e9:.0f} GFLOP/s"
          f"   recipe: {args.recipe}")
    print(f"{'preset':<14}{'C':>5}{'batch':>7}{'seeds':>6}{'ms/step':>10}{'steps/s':>9}"
          f"{'ms/seed-step':>14}")
    for name in args.presets.split(","):
        cfg = spd_config(name, recipe=args.recipe)
        for n in (int(v) for v in args.seeds.split(",")):
            dt = bench(name, args.steps, args.recipe, n, args.seed_batch)
            print(f"{name:<14}{cfg.C:>5}{cfg.batch_size:>7}{n:>6}{1e3 * dt:>10.1f}"
                  f"{1 / dt:>9.1f}{1e3 * dt / n:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
