"""Training throughput of every toy target: steps/s and samples/s of the jit-compiled,
scanned training step (one seed), after a warm-up call. Numbers are printed, never asserted.

    python benchmarks/train_throughput.py [--steps 400] [--targets tms-5-2,resid-mlp-1]
"""

from __future__ import annotations

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
from _common import matmul_flops

import jaxinterp as ji
from jaxinterp.models.base import init_models
from jaxinterp.train import make_optimizer
from jaxinterp.train.fit import TrainState, _make_chunk


def bench(name: str, steps: int) -> tuple[float, float, int]:
    target = ji.get_target(name)
    cfg = target.config(n_seeds=1)
    if cfg.steps == 0:
        return float("nan"), float("nan"), 0
    models, data, keys = init_models(target, cfg, [cfg.seed])
    params, frozen = eqx.partition(models, target.trainable(jax.tree_util.tree_map(
        lambda x: x[0] if eqx.is_array(x) else x, models)))
    opt = make_optimizer(cfg.optimizer, cfg.lr, cfg.steps, weight_decay=cfg.weight_decay,
                         b1=cfg.b1, b2=cfg.b2, schedule=cfg.schedule)
    chunk = _make_chunk(lambda p, f, b: target.loss(cfg, eqx.combine(p, f), b),
                        lambda d, k, s: target.sample(cfg, d, k, s), opt, True,
                        None if data is None else 0)
    state = TrainState(params, jax.vmap(opt.init)(params), jnp.zeros((1,), jnp.int32))
    out, _ = chunk(state, frozen, data, keys, steps)  # compile + warm-up
    jax.block_until_ready(out)
    t = time.perf_counter()
    out, _ = chunk(out, frozen, data, keys, steps)
    jax.block_until_ready(out)
    dt = (time.perf_counter() - t) / steps
    batch = 3830 if name == "modadd" else cfg.batch_size
    return 1.0 / dt, batch / dt, batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--targets", default=",".join(sorted(ji.models.TARGETS)))
    args = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"matmul {matmul_flops() / 1e9:.0f} GFLOP/s (1024^3 float32)")
    print(f"{'target':<14} {'batch':>6} {'steps/s':>10} {'ms/step':>9} {'samples/s':>12}")
    for name in args.targets.split(","):
        sps, samples, batch = bench(name, args.steps)
        if batch == 0:
            print(f"{name:<14} {'-':>6} {'(hand-built, no training)':>33}")
            continue
        print(f"{name:<14} {batch:>6} {sps:>10.1f} {1e3 / sps:>9.3f} {samples:>12.3g}")


if __name__ == "__main__":
    main()
