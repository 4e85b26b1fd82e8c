"""Stage cache of the channel-graph pipeline (spec section 9, "Caching").

Each expensive stage (statistics, compression, refinement, edges, usage, direction
edges) is a pure function of the cut model, the data, the key, the code and a few options,
so its output can be kept and reused: change the clustering options and only the host-side
module detection runs again; interrupt a long run and the completed stages come back. The
edge sums, the one stage that takes hours at the spec's data sizes, also keep their
running sums after every block of examples (:class:`PartialSums`), so a run resumes
inside the stage.

Every entry is stored with a *fingerprint*: a SHA-256 over the jaxinterp source files,
the model's arrays and structure, the data, the key and the stage's options (chained
through the stages it depends on). An entry whose fingerprint differs is recomputed and
overwritten, never reused. Entries are pickles of the stages' values (host numpy
arrays, dicts, named tuples; dict order is kept), written atomically.

References:
    specs/channel-graph.md section 9 (project method).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import io

__all__ = ["PartialSums", "StageCache", "code_fingerprint", "tree_fingerprint"]

T = TypeVar("T")


def _sources_hash() -> str:
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


# taken when the package is imported, i.e. of the code this process runs (an edit made
# while a long run is going does not relabel that run's cache)
_CODE = _sources_hash()


def code_fingerprint() -> str:
    """SHA-256 over the package's Python sources as they were when this process imported
    the channel package (any code change invalidates a cache)."""
    return _CODE


def tree_fingerprint(tree: Any) -> str:
    """SHA-256 over a pytree's array leaves (dtype, shape, bytes; typed PRNG keys by their
    key data) and the repr of its non-array leaves."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if eqx.is_array(leaf) or isinstance(leaf, np.generic):
            a = np.ascontiguousarray(np.asarray(leaf))
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(repr(leaf).encode())
    return h.hexdigest()


def _model_fingerprint(model: Any) -> str:
    """Arrays, plus what identifies the cut (class names and static fields)."""
    meta = [type(model).__name__]
    for f in ("names", "depths", "mode", "output"):
        meta.append(repr(getattr(model, f, None)))
    for part in (getattr(model, "embed", None), *getattr(model, "blocks", ()),
                 getattr(model, "unembed", None)):
        meta.append(type(part).__qualname__)
    return hashlib.sha256(("|".join(meta) + tree_fingerprint(eqx.filter(model, eqx.is_array)))
                          .encode()).hexdigest()


class PartialSums:
    """Running sums of a blocked pass over the data, saved after every block.

    ``load()`` returns ``(examples_done, sums)`` from an earlier, interrupted pass with
    the same fingerprint (or ``None``); ``save`` replaces the file atomically; ``clear``
    removes it once the stage's output is stored.
    """

    def __init__(self, path: Path, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint

    def load(self) -> tuple[int, Any] | None:
        if not self.path.exists():
            return None
        entry = io.read_pickle(self.path)
        if entry.get("fingerprint") != self.fingerprint:
            return None
        return int(entry["done"]), entry["sums"]

    def save(self, done: int, sums: Any) -> None:
        io.write_pickle(self.path, {"fingerprint": self.fingerprint, "done": int(done),
                                    "sums": sums})

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class StageCache:
    """Stage outputs under ``directory``, keyed by fingerprints chained from ``base``.

    Args:
        directory: where the entries live (created on the first save).
        model, xs, key: the pipeline's inputs; with the code they make the base
            fingerprint.

    Attributes:
        loaded: names of the stages that came from the cache in this run.
    """

    def __init__(self, directory: str | Path, model: Any, xs: Any, key: Any):
        self.directory = Path(directory)
        self.base = hashlib.sha256("|".join((
            code_fingerprint(), _model_fingerprint(model), tree_fingerprint(xs),
            tree_fingerprint(key))).encode()).hexdigest()
        self.loaded: list[str] = []

    def fingerprint(self, parent: str, **options: Any) -> str:
        """The fingerprint of a stage computed from ``parent``'s output with ``options``."""
        text = json.dumps(io.to_jsonable(options), sort_keys=True)
        return hashlib.sha256(f"{parent}|{text}".encode()).hexdigest()

    def partial(self, stage: str, fingerprint: str) -> PartialSums:
        return PartialSums(self.directory / f"{stage}.partial.pkl", fingerprint)

    def run(self, stage: str, fingerprint: str, compute: Callable[[], T]) -> T:
        """``compute()``'s value for ``stage``: the stored one if its fingerprint matches,
        otherwise computed, stored and returned."""
        path = self.directory / f"{stage}.pkl"
        if path.exists():
            entry = io.read_pickle(path)
            if entry.get("fingerprint") == fingerprint:
                self.loaded.append(stage)
                return entry["value"]
        value = compute()
        io.write_pickle(path, {"fingerprint": fingerprint, "value": value})
        return value
