"""Saving and loading: one file = a JSON header line + ``eqx.tree_serialise_leaves`` bytes.

Run directories hold ``config.json``, ``metrics.json``, ``history.npz``, checkpoints and
PNG plots. Everything written here is atomic (write to a temporary file, then rename), so
an interrupted run never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

from ._checks import fail


def to_jsonable(obj: Any) -> Any:
    """Convert numpy/jax scalars and arrays, dataclasses and tuples to JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, jax.Array | np.ndarray | np.generic):
        arr = np.asarray(obj)
        return to_jsonable(arr.item() if arr.ndim == 0 else arr.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=False)
    _atomic_write(path, lambda f: f.write(text.encode() + b"\n"))
    return path


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise fail("read_json", "path", "an existing JSON file", str(path))
    return json.loads(path.read_text())


def save_tree(path: str | Path, tree: Any, header: dict[str, Any] | None = None) -> Path:
    """Write ``tree`` (any pytree of arrays) with a JSON ``header`` to ``path``."""
    path = Path(path)
    line = json.dumps(to_jsonable(header or {})).encode()

    def write(f):
        f.write(line + b"\n")
        eqx.tree_serialise_leaves(f, tree)

    _atomic_write(path, write)
    return path


def read_header(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise fail("read_header", "path", "an existing checkpoint file", str(path))
    with open(path, "rb") as f:
        return json.loads(f.readline())


def load_tree(path: str | Path, like: Any) -> tuple[Any, dict[str, Any]]:
    """Read a pytree saved by :func:`save_tree`; ``like`` gives its structure and dtypes
    (e.g. ``eqx.filter_eval_shape`` of the initialiser)."""
    path = Path(path)
    if not path.is_file():
        raise fail("load_tree", "path", "an existing checkpoint file", str(path))
    with open(path, "rb") as f:
        header = json.loads(f.readline())
        try:
            tree = eqx.tree_deserialise_leaves(f, like)
        except Exception as e:  # shape/structure mismatch: say which file and why
            raise ValueError(
                f"load_tree: expected {path} to hold a pytree like the given one, got an "
                f"incompatible file ({type(e).__name__}: {e}). Was it written with another config?"
            ) from None
    return tree, header


def save_history(path: str | Path, history: dict[str, np.ndarray]) -> Path:
    path = Path(path)
    arrays = {k: np.asarray(v) for k, v in history.items()}
    _atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def load_history(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(Path(path)) as z:
        return {k: z[k] for k in z.files}


def write_pickle(path: str | Path, obj: Any) -> Path:
    """Pickle ``obj`` (host values: numpy arrays, tuples, dicts) to ``path`` atomically.
    Only for the project's own caches, read back by :func:`read_pickle`."""
    path = Path(path)
    _atomic_write(path, lambda f: pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def read_pickle(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise fail("read_pickle", "path", "an existing cache file", str(path))
    with open(path, "rb") as f:
        return pickle.load(f)
