"""Optimizer factory: named optimizers with the shared schedules."""

from __future__ import annotations

import optax

from .._checks import check_in, check_nonnegative, check_positive
from .schedules import make_schedule

OPTIMIZERS = ("adamw", "adam", "sgd")


def make_optimizer(
    name: str,
    lr: float,
    total_steps: int,
    *,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    schedule: str = "constant",
    warmup_frac: float = 0.0,
    warmup_steps: int | None = None,
    grad_clip: float | None = None,
    **schedule_kwargs,
) -> optax.GradientTransformation:
    """``adamw`` (decoupled weight decay, as torch.optim.AdamW), ``adam`` or ``sgd`` with a
    named schedule from :mod:`jaxinterp.train.schedules` and optional clipping of the
    gradients' global norm to ``grad_clip`` (None: no clipping)."""
    check_in("make_optimizer", "name", name, OPTIMIZERS)
    check_nonnegative("make_optimizer", "weight_decay", weight_decay)
    if grad_clip is not None:
        check_positive("make_optimizer", "grad_clip", grad_clip)
    sched = make_schedule(schedule, lr, total_steps, warmup_frac=warmup_frac,
                          warmup_steps=warmup_steps, **schedule_kwargs)
    if name == "adamw":
        opt = optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    elif name == "adam":
        opt = optax.adam(sched, b1=b1, b2=b2, eps=eps)
    else:
        opt = optax.sgd(sched)
    if grad_clip is not None:
        opt = optax.chain(optax.clip_by_global_norm(grad_clip), opt)
    return opt
