"""Shared helpers of the benchmark scripts."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def matmul_flops(n: int = 1024, reps: int = 10) -> float:
    """Dense float32 matmul FLOP/s this machine reaches now (for context next to timings)."""
    a = jnp.ones((n, n))
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        f(a).block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t)
