"""Time per APD training step (attributions, top-k, masked forward, losses, Adam; one
seed, jit-compiled, several steps per call via lax.scan) on the paper presets, next to
the dense matmul FLOP/s this machine reaches in the same run. Numbers, never asserted.

    python benchmarks/apd_step.py [--steps 20] [--presets tms-40-10,resid-mlp-1]

For orientation (specs/apd.md): the PyTorch reference takes about 1.5 s (tms-40-10,
C=50, batch 2048) and 1.2 s (resid-mlp-1, C=130, batch 256) per step on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
from _common import matmul_flops

import jaxinterp as ji
from jaxinterp.decomposition import apd, apd_config
from jaxinterp.train import make_optimizer
from jaxinterp.train.fit import TrainState, _make_chunk


def bench(name: str, steps: int, attribution: str | None) -> float:
    target = ji.get_target(name)
    tcfg = target.config()
    model = target.init(tcfg, jax.random.key(0))
    cfg = apd_config(name, **({"attribution": attribution} if attribution else {}))
    t = ji.target.from_equinox(model)
    dcfg = dataclasses.replace(tcfg, batch_size=cfg.batch_size)
    x0 = target.sample(dcfg, None, jax.random.key(0), jnp.asarray(0))[0]
    sites = apd.make_sites(t.apply, t.params, x0, cfg.paths)
    comps = apd.init_components(t.params, cfg.paths, cfg.C, cfg.m, gain=cfg.init_gain,
                                fan_instances=cfg.init_fan_instances, key=jax.random.key(1))
    opt = make_optimizer("adam", cfg.lr, cfg.steps, schedule=cfg.schedule,
                         warmup_frac=cfg.warmup_frac)
    lcfg = cfg.loss_config()
    chunk = _make_chunk(
        lambda c, p, x: apd.apd_loss(c, p, x, apply=t.apply, sites=sites, cfg=lcfg),
        lambda d, k, s: target.sample(dcfg, None, k, s), opt, False, None)
    state = TrainState(comps, opt.init(comps), jnp.asarray(0, jnp.int32))
    out, _ = chunk(state, t.params, None, jax.random.key(2), steps)  # compile + warm-up
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    out, _ = chunk(out, t.params, None, jax.random.key(2), steps)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--presets", default="tms-5-2,tms-40-10,resid-mlp-1,resid-mlp-2")
    p.add_argument("--attribution", default=None, help="override every preset's attribution")
    args = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind}   matmul: {matmul_flops() / 1e9:.0f} GFLOP/s")
    print(f"{'preset':<14}{'C':>5}{'batch':>7}{'ms/step':>10}{'steps/s':>9}")
    for name in args.presets.split(","):
        cfg = apd_config(name)
        dt = bench(name, args.steps, args.attribution)
        print(f"{name:<14}{cfg.C:>5}{cfg.batch_size:>7}{1e3 * dt:>10.1f}{1 / dt:>9.1f}",
              flush=True)


if __name__ == "__main__":
    main()
