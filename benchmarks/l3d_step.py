"""Time per L3D training step (reference draw, per-sample divergence gradients, encoder,
BatchTopK, decoder, pooled FVU, Adam, decoder normalisation; jit-compiled, many steps per
call via lax.scan) on the toy presets, one seed and ``--seeds`` vmapped seeds, for the
materialised and the ghost (inputs x deltas) gradient paths. Numbers, never asserted.

    python benchmarks/l3d_step.py [--steps 300] [--seeds 8] [--presets tms-5-2,tmcs]

Targets are freshly initialised (timing does not depend on training).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from _common import matmul_flops

import jaxinterp as ji
from jaxinterp import tree
from jaxinterp.decomposition import l3d, l3d_config
from jaxinterp.decomposition.l3d_run import decomposition_data, l3d_target, make_loss_fn
from jaxinterp.models.data import epoch_batch_pointwise
from jaxinterp.train import make_optimizer
from jaxinterp.train.fit import TrainState, _make_chunk


def bench(name: str, steps: int, n_seeds: int, gradients: str) -> float:
    target = ji.get_target(name)
    tcfg = target.config()
    model = target.init(tcfg, jax.random.key(0))
    cfg = l3d_config(name, gradients=gradients)
    apply, params, names = l3d_target(model, name)
    w = {n: tree.get(params, n) for n in names}
    shapes = {n: v.shape for n, v in w.items()}
    ranks = l3d.resolve_ranks("bench", cfg.ranks, shapes)
    x = decomposition_data(target, tcfg, jax.random.key(1), cfg.n_data)
    keys = jax.random.split(jax.random.key(2), n_seeds)
    sub = jax.vmap(lambda k: l3d.init_subnetworks(shapes, ranks, cfg.n_v, key=k))(keys)
    opt = make_optimizer("adam", cfg.lr, 10_000)

    def sample(d, k, s):
        idx = epoch_batch_pointwise(jax.random.key(3), s, cfg.n_data, cfg.batch_size)
        return d[idx], l3d.reference_indices(k, cfg.batch_size, cfg.topk_group), s

    chunk = _make_chunk(make_loss_fn(cfg, apply, params, names), sample, opt, True, None,
                        None, l3d.normalize_decoder)
    state = TrainState(sub, jax.vmap(opt.init)(sub), jnp.zeros((n_seeds,), jnp.int32))
    out, _ = chunk(state, w, x, keys, steps)  # compile + warm-up
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    out, _ = chunk(out, w, x, keys, steps)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--presets", default="tms-5-2,tmcs,high-rank,x-squared")
    args = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind}   matmul: {matmul_flops() / 1e9:.0f} GFLOP/s")
    print(f"{'preset':<11}{'grads':>7}{'batch':>7}{'ms/step 1 seed':>16}"
          f"{f'ms/step {args.seeds} seeds':>18}{'seed x':>8}")
    for name in args.presets.split(","):
        for grads in ("dense", "ghost"):
            one = bench(name, args.steps, 1, grads)
            many = bench(name, args.steps, args.seeds, grads)
            bs = l3d_config(name).batch_size
            print(f"{name:<11}{grads:>7}{bs:>7}{1e3 * one:>16.3f}{1e3 * many:>18.3f}"
                  f"{many / one:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
