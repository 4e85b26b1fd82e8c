"""Registry of decomposition methods reachable as ``jaxinterp run METHOD TARGET``.

A method registers a name, a one-line description, the targets it supports and a runner
``run(target_name, args) -> metrics`` that writes its run directory. The CLI supplies the
shared flags (``--seed``, ``--seeds A-B``, ``--steps``, ``--out``, ``--target DIR``) and
passes any ``--field value`` overrides through, so adding a method is one
:func:`register_method` call, not a new command.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ._checks import fail


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    description: str
    targets: tuple[str, ...]
    run: Callable[..., dict[str, Any]]
    sweep: Callable[..., dict[str, Any]] | None = None  # ``jaxinterp sweep`` (vmapped runs)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"register_method: method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        avail = ", ".join(sorted(METHODS)) or "none registered yet"
        raise fail("get_method", "method", f"one of: {avail}", repr(name))
    return METHODS[name]
