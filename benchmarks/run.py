"""One table for every decomposition method x target: the training step exactly as
``jaxinterp run`` builds it, timed after warm-up. Numbers are printed, never asserted.

    python benchmarks/run.py [--steps 10] [--repeats 5] [--only spd,apd]
                             [--sweep-seeds 64] [--sweep-seed-batch N] [--markdown]

Columns:
  ms/step      median over ``--repeats`` calls of ``--steps`` scanned steps (one seed)
  steps/s      1000 / (ms/step)
  samples/s    batch size x steps/s
  GFLOP/step   XLA's cost analysis of one compiled step (``compiled.cost_analysis()``)
  peak MiB     XLA's buffer sizes of the compiled call: arguments + outputs + temporaries
               (on a GPU also the device's ``peak_bytes_in_use``)
  roofline     (GFLOP/step / s per step) over the dense float32 matmul FLOP/s this machine
               reaches in the same run (1024 x 1024 matmuls): how close the step gets to
               the machine's best arithmetic rate

How it times the real step: each method's ``train_*`` function runs as the CLI would
(preset config, an untrained target of the preset's shape), with the fit loop swapped for
:func:`measure`, which compiles the same scanned chunk from the same loss, sampler,
optimizer and state, times it and stops the run before training.

The last lines time ``spd tms-5-2`` vmapped over ``--sweep-seeds`` seeds (as ``jaxinterp
sweep`` and ``--seeds A-B`` run them) against one seed: time per step of all seeds over
time per step of one (issue 8 asks for at most 16 with 64 seeds on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
from _common import matmul_flops

import jaxinterp
import jaxinterp.train as train_pkg
from jaxinterp.decomposition import apd_config, l3d_config, spd_config, train_apd, train_spd
from jaxinterp.decomposition.l3d_run import train_l3d
from jaxinterp.train.fit import _make_chunk, initial_state

CASES = {
    "apd": ("tms-5-2", "tms-40-10", "resid-mlp-1", "resid-mlp-2"),
    "spd": ("tms-5-2", "tms-40-10", "resid-mlp-1", "resid-mlp-2", "resid-mlp-3"),
    "l3d": ("tms-5-2", "tmcs", "high-rank"),
}
CONFIGS = {"apd": apd_config, "spd": spd_config, "l3d": l3d_config}
TRAIN = {"apd": train_apd, "spd": train_spd, "l3d": train_l3d}


class Measured(Exception):
    """Carries :func:`measure`'s numbers out of the method's train function."""

    def __init__(self, row: dict[str, Any]):
        super().__init__("measured")
        self.row = row


def _analysis(compiled: Any) -> tuple[float, float]:
    """(FLOPs, bytes of arguments + outputs + temporaries) of an equinox-compiled call."""
    inner = getattr(compiled, "compiled", compiled)
    cost = inner.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = inner.memory_analysis()
    size = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            if mem is not None else float("nan"))
    return float((cost or {}).get("flops", float("nan"))), float(size)


def make_measure(steps: int, repeats: int):
    """A stand-in for :func:`jaxinterp.train.fit` that times the step it would run."""

    def measure(loss_fn, params, frozen, optimizer, sample_fn, *, key,
                data=None, seeds=False, data_axis=None, frozen_axis=0, seed_batch=None,
                project=None, hyper=None, **_ignored):
        n_runs = jax.tree_util.tree_leaves(params)[0].shape[0] if seeds else None
        state = initial_state(params, optimizer, seeds)
        chunk = _make_chunk(loss_fn, sample_fn, optimizer, seeds, data_axis, frozen_axis,
                            project, seed_batch)
        # one step unscanned: XLA's cost analysis counts a loop's body once, not per trip
        flops, _ = _analysis(chunk.lower(state, frozen, data, key, 1, hyper).compile())
        compiled = chunk.lower(state, frozen, data, key, steps, hyper).compile()
        _, size = _analysis(compiled)
        out, _ = compiled(state, frozen, data, key, steps, hyper)  # warm-up
        jax.block_until_ready(out)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out, _ = compiled(out, frozen, data, key, steps, hyper)
            jax.block_until_ready(out)
            times.append((time.perf_counter() - t0) / steps)
        batch = jax.eval_shape(lambda k: sample_fn(
            jax.tree_util.tree_map(lambda v: v[0], data) if data_axis == 0 else data, k,
            jnp.asarray(0)), jax.random.key(0))
        b = jax.tree_util.tree_leaves(batch)[0].shape[0]
        raise Measured({"s_per_step": statistics.median(times), "flops": flops,
                        "bytes": size, "batch": b, "runs": n_runs or 1})

    return measure


def measure_case(method: str, target_name: str, steps: int, repeats: int, n_seeds: int = 1,
                 seed_batch: int | None = None) -> dict[str, Any]:
    """Time ``method`` on ``target_name`` (preset config; ``n_seeds`` vmapped)."""
    target = jaxinterp.get_target(target_name)
    tcfg = target.config()
    model = target.init(tcfg, jax.random.key(0))
    cfg = CONFIGS[method](target_name)
    if hasattr(cfg, "seed_batch"):
        cfg = dataclasses.replace(cfg, seed_batch=seed_batch)
    real_fit = train_pkg.fit
    train_pkg.fit = make_measure(steps, repeats)
    try:
        TRAIN[method](model, target, tcfg, cfg, list(range(n_seeds)), progress=False)
    except Measured as m:
        return m.row
    finally:
        train_pkg.fit = real_fit
    raise RuntimeError(f"{method} {target_name}: the fit loop was never reached")


def _peak_device_bytes() -> float:
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    return float(stats.get("peak_bytes_in_use", float("nan"))) if stats else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="steps per timed call")
    p.add_argument("--repeats", type=int, default=5, help="timed calls (median)")
    p.add_argument("--only", default=",".join(CASES), help="methods, comma-separated")
    p.add_argument("--targets", default=None, help="restrict to these targets")
    p.add_argument("--sweep-seeds", type=int, default=64)
    p.add_argument("--sweep-seed-batch", type=int, default=None,
                   help="vmap the sweep's seeds this many at a time (default: all)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = p.parse_args()
    peak = matmul_flops()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} x{len(jax.devices())} ({dev.platform})   "
          f"matmul: {peak / 1e9:.1f} GFLOP/s   jax {jax.__version__}   "
          f"{time.strftime('%Y-%m-%d')}")
    cols = ("method", "target", "ms/step", "steps/s", "samples/s", "GFLOP/step", "peak MiB",
            "roofline")
    if args.markdown:
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    else:
        print(f"{cols[0]:<7}{cols[1]:<13}" + "".join(f"{c:>12}" for c in cols[2:]))
    only = set(args.only.split(","))
    wanted = set(args.targets.split(",")) if args.targets else None
    for method, targets in CASES.items():
        if method not in only:
            continue
        for name in targets:
            if wanted is not None and name not in wanted:
                continue
            r = measure_case(method, name, args.steps, args.repeats)
            dt = r["s_per_step"]
            mem = max(r["bytes"], _peak_device_bytes()) if dev.platform == "gpu" else r["bytes"]
            vals = (1e3 * dt, 1 / dt, r["batch"] / dt, r["flops"] / 1e9, mem / 2**20,
                    r["flops"] / dt / peak)
            fmt = ("{:.2f}", "{:.1f}", "{:.3g}", "{:.3g}", "{:.1f}", "{:.3f}")
            cells = [f.format(v) for f, v in zip(fmt, vals, strict=True)]
            if args.markdown:
                print(f"| {method} | {name} | " + " | ".join(cells) + " |", flush=True)
            else:
                print(f"{method:<7}{name:<13}" + "".join(f"{c:>12}" for c in cells), flush=True)
    if "spd" in only:
        n = args.sweep_seeds
        one = measure_case("spd", "tms-5-2", args.steps, args.repeats)["s_per_step"]
        many = measure_case("spd", "tms-5-2", args.steps, args.repeats, n_seeds=n,
                            seed_batch=args.sweep_seed_batch)["s_per_step"]
        print(f"\nspd tms-5-2 sweep: {n} seeds vmapped {1e3 * many:.1f} ms/step, one seed "
              f"{1e3 * one:.2f} ms/step: {n} seeds take {many / one:.1f}x one seed "
              f"({n * one / many:.1f} seed-steps per single-seed step time)")


if __name__ == "__main__":
    main()
