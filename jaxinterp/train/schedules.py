"""Learning-rate schedules shared by every method (specs/README.md §4).

All are optax-compatible ``schedule(step) -> lr`` functions of the update index ``s``
(starting at 0) over ``total_steps`` updates, with an optional linear warm-up of
``W = floor(warmup_frac * total_steps)`` updates that starts at exactly 0.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from .._checks import check_in, check_nonnegative, check_positive, fail

SCHEDULES = ("constant", "linear", "quarter_cosine", "half_cosine", "exponential", "step")
# schedules whose learning rate at update s does not depend on total_steps
TOTAL_FREE = ("constant", "exponential", "step")


def depends_on_total(name: str, warmup_frac: float = 0.0, warmup_steps: int | None = None
                     ) -> bool:
    """Whether the learning rate at some update depends on ``total_steps``: a cosine or
    linear decay, or a warm-up given as a fraction. A run whose schedule does not can be
    extended (resumed with more steps) without changing the updates it has done."""
    return name not in TOTAL_FREE or (not warmup_steps and warmup_frac > 0)


def make_schedule(
    name: str,
    lr: float,
    total_steps: int,
    *,
    warmup_frac: float = 0.0,
    warmup_steps: int | None = None,
    final_frac: float = 0.0,
    halflife: float | None = None,
    gamma: float = 0.1,
    every: int = 1,
    steps_per_epoch: int = 1,
) -> optax.Schedule:
    """Build a named schedule.

    Args:
        name: one of ``constant``, ``linear``, ``quarter_cosine``, ``half_cosine``,
            ``exponential``, ``step``.
        lr: peak learning rate ``lr0``.
        total_steps: number of updates ``S``.
        warmup_frac: warm-up fraction; ``W = floor(warmup_frac * S)``.
        warmup_steps: explicit ``W`` (overrides ``warmup_frac``).
        final_frac: ``f`` of ``half_cosine``.
        halflife: half-life in updates of ``exponential``.
        gamma, every, steps_per_epoch: ``step`` schedule, ``lr0 * gamma**floor(epoch/every)``.

    Returns:
        ``schedule(step) -> lr``.
    """
    fn = "make_schedule"
    check_in(fn, "name", name, SCHEDULES)
    check_nonnegative(fn, "lr", lr)
    check_positive(fn, "total_steps", total_steps, integer=True)
    if not 0.0 <= warmup_frac < 1.0:
        raise fail(fn, "warmup_frac", "in [0, 1)", warmup_frac)
    w = int(math.floor(warmup_frac * total_steps)) if warmup_steps is None else int(warmup_steps)
    if not 0 <= w < total_steps:
        raise fail(fn, "warmup_steps", f"in [0, total_steps={total_steps})", w)
    s_rest = total_steps - w
    if name == "exponential" and (halflife is None or halflife <= 0):
        raise fail(fn, "halflife", "a positive number for the exponential schedule", halflife)

    def after(sp):
        sp = sp.astype(jnp.float32)
        if name == "constant":
            return jnp.full_like(sp, lr)
        if name == "linear":
            return lr * (1.0 - sp / s_rest)
        if name == "quarter_cosine":
            if s_rest == 1:
                return jnp.full_like(sp, lr)
            return lr * jnp.cos(0.5 * jnp.pi * sp / (s_rest - 1))
        if name == "half_cosine":
            if s_rest == 1:
                return jnp.full_like(sp, lr)
            c = (1.0 + jnp.cos(jnp.pi * sp / (s_rest - 1))) / 2.0
            return lr * (final_frac + (1.0 - final_frac) * c)
        if name == "exponential":
            return lr * 0.5 ** (sp / halflife)
        epoch = jnp.floor(sp / steps_per_epoch)
        return lr * gamma ** jnp.floor(epoch / every)

    def schedule(step):
        s = jnp.asarray(step)
        main = after(jnp.maximum(s - w, 0))
        if w == 0:
            return main
        return jnp.where(s < w, lr * s.astype(jnp.float32) / w, main)

    return schedule
