"""Uniform argument checks. Every user-facing error in jaxinterp is phrased the same way:

``<fn>: expected <arg> <expected>, got <actual>. <hint>``

so that a researcher can see at once which call, which argument, and what to change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def fail(fn: str, arg: str, expected: str, actual: Any, hint: str = "") -> ValueError:
    """Build (not raise) the uniform ``ValueError``."""
    msg = f"{fn}: expected {arg} {expected}, got {actual}."
    if hint:
        msg += f" {hint}"
    return ValueError(msg)


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_shape(
    fn: str, arg: str, x: Any, expected: Sequence[int | str | None], hint: str = ""
) -> None:
    """Check that ``x`` has ``expected`` shape.

    ``expected`` entries are ints (exact), ``None`` (any size) or ``"name=5"``-style labels
    used only for the message; the literal ``...`` is not supported: use ``check_rank``.
    """
    shape = tuple(np.shape(x))
    want = []
    ok = len(shape) == len(expected)
    for i, e in enumerate(expected):
        if isinstance(e, str):
            name, _, size = e.partition("=")
            want.append(e)
            if size and ok and shape[i] != int(size):
                ok = False
        elif e is None:
            want.append("*")
        else:
            want.append(str(e))
            if ok and shape[i] != e:
                ok = False
    if not ok:
        raise fail(fn, arg, f"of shape ({', '.join(want)})", _fmt_shape(shape), hint)


def check_rank(fn: str, arg: str, x: Any, rank: int | Sequence[int], hint: str = "") -> None:
    ranks = (rank,) if isinstance(rank, int) else tuple(rank)
    nd = np.ndim(x)
    if nd not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise fail(fn, arg, f"of rank {want}", f"shape {_fmt_shape(np.shape(x))}", hint)


def check_positive(fn: str, arg: str, value: Any, *, integer: bool = False) -> None:
    bad = value is None or not np.isscalar(value) or not (value > 0)
    if integer and not bad:
        bad = int(value) != value
    if bad:
        raise fail(fn, arg, "a positive " + ("integer" if integer else "number"), value)


def check_nonnegative(fn: str, arg: str, value: Any, *, integer: bool = False) -> None:
    bad = value is None or not np.isscalar(value) or not (value >= 0)
    if integer and not bad:
        bad = int(value) != value
    if bad:
        raise fail(fn, arg, "a non-negative " + ("integer" if integer else "number"), value)


def check_probability(fn: str, arg: str, value: Any) -> None:
    if value is None or not np.isscalar(value) or not (0.0 <= float(value) <= 1.0):
        raise fail(fn, arg, "a probability in [0, 1]", value)


def check_in(fn: str, arg: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise fail(fn, arg, "one of " + ", ".join(repr(a) for a in allowed), repr(value))


def check_same_structure(fn: str, arg_a: str, a: Any, arg_b: str, b: Any) -> None:
    """Check two pytrees share a structure before any ``tree_map`` over both."""
    ta, tb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    if ta != tb:
        raise fail(fn, f"{arg_b} to have the same tree structure as {arg_a}", "", tb,
                   f"{arg_a} has structure {ta}.")


def check_finite_host(fn: str, name: str, value: Any) -> None:
    """Host-side finiteness check for already-materialised values."""
    arr = np.asarray(value)
    if not np.all(np.isfinite(arr)):
        raise FloatingPointError(f"{fn}: {name} is not finite ({arr if arr.size < 8 else '...'})")


def is_power_of_two(n: int) -> bool:
    return n > 0 and 2 ** int(math.log2(n)) == n
