"""Time of a full LIB build on modular addition (the shipped grokked model, its training
split of 3830 pairs): float64 statistics + the LIB basis of every node layer, then the
exact squared edges between adjacent layers. The first call includes compilation; the
later (warm) calls are the numbers to compare, with a per-layer split of the last one
(``M``: the Gram the basis diagonalises, ``E``: the layer pair's edges). Numbers only.

    python benchmarks/lib_build.py [--basis lib] [--chunk-size 256] [--repeats 3]

For orientation (issue 5): the PyTorch reference takes about 24 s on 2 CPU cores (12 s in
the bases, 11 s in the edges).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _common import matmul_flops

import jaxinterp as ji
from jaxinterp.lib import basis as lib_basis
from jaxinterp.lib import collect_activations, interaction_basis, interaction_edges, sections_for
from jaxinterp.lib import edges as lib_edges
from jaxinterp.lib.run import KEYS, _data, lib_config

FIXTURE = Path(ji.__file__).parent / "fixtures" / "modadd-seed0"


def timed(module: Any, name: str, log: list[float]) -> None:
    """Wrap ``module.name`` so that every call appends its duration to ``log`` (the
    per-layer stages return numpy arrays, so they have finished when they return)."""
    fn: Callable[..., Any] = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        log.append(time.perf_counter() - t)
        return out

    setattr(module, name, wrapper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--basis", default="lib")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model, tcfg, _ = ji.load_target(FIXTURE)
    cfg = lib_config("modadd", chunk_size=args.chunk_size)
    s = sections_for(model)
    x = _data("modadd", model, tcfg, 0, cfg)["basis_x"]
    basis = str(KEYS.get(args.basis, args.basis))
    grams_log: list[float] = []  # one entry per layer, output side first
    edges_log: list[float] = []  # one entry per layer pair, input side first
    for name in ("jacobian_gram", "ig_grams"):
        timed(lib_basis, name, grams_log)
    timed(lib_edges, "layer_edges", edges_log)
    print(f"device: {jax.devices()[0].device_kind}   matmul: {matmul_flops() / 1e9:.0f} GFLOP/s")
    print(f"modadd: {x.shape[0]} examples, node layers {list(s.names)}")
    print(f"{'call':<6}{'acts s':>9}{'basis s':>9}{'edges s':>9}{'total s':>9}")
    for r in range(args.repeats):
        grams_log.clear()
        edges_log.clear()
        t0 = time.perf_counter()
        with jax.enable_x64(True):
            acts = tuple(
                np.asarray(a) for a in collect_activations(s, x, dtype=jnp.float64, chunk_size=4096)
            )
        t1 = time.perf_counter()
        ib = interaction_basis(s, x, basis=basis, chunk_size=cfg.chunk_size, acts=acts)
        t2 = time.perf_counter()
        edges = interaction_edges(s, ib, x, kind="squared", acts=acts, key=jax.random.key(0))
        jax.block_until_ready(jax.tree_util.tree_leaves(edges))
        t3 = time.perf_counter()
        label = "cold" if r == 0 else "warm"
        print(f"{label:<6}{t1 - t0:>9.2f}{t2 - t1:>9.2f}{t3 - t2:>9.2f}{t3 - t0:>9.2f}", flush=True)
    gram_s = dict(zip(reversed(s.names[:-1]), grams_log, strict=False))
    print("last call per layer, seconds (M: Gram of the basis, E: edges to the next layer)")
    for name, e_s in zip(s.names[:-1], edges_log, strict=False):
        m_s = f"{gram_s[name]:.2f}" if name in gram_s else "-"
        print(f"  {name:<12} M {m_s:>6}   E {e_s:.2f}")


if __name__ == "__main__":
    main()
