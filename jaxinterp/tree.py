"""Keypath addressing for any pytree (equinox modules, Flax param dicts, plain containers).

The canonical name of a part of a model is its ``jax.tree_util.keystr``, e.g.
``.layers[0].mlp_in`` or ``['params']['Dense_0']['kernel']``. These names identify graph
nodes, checkpoint entries and metrics everywhere in jaxinterp.

Selectors accepted by :func:`where`, :func:`select` and :func:`apply`:

* a path string, in keystr form (``.layers[0].mlp_in``) or dotted form
  (``layers.0.mlp_in``, ``params.Dense_0.kernel``). It selects the leaf at that path, or
  every leaf below it when it names a subtree;
* a glob containing ``*`` or ``?`` (``.layers[*].mlp_in``), matched against canonical names;
* a predicate ``fn(name: str, leaf) -> bool``;
* a sequence of the above (their union).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax

from ._checks import fail

Selector = str | Callable[[str, Any], bool] | Sequence[Any]
_TOKEN = re.compile(r"\[\s*'([^']*)'\s*\]|\[\s*\"([^\"]*)\"\s*\]|\[\s*(-?\d+)\s*\]|([^.\[\]]+)")


def parse_path(path: str) -> tuple[str | int, ...]:
    """Split a keystr or dotted path into tokens; integer tokens are sequence indices."""
    if not isinstance(path, str):
        raise fail("parse_path", "path", "a string", type(path).__name__)
    tokens: list[str | int] = []
    pos = 0
    for m in _TOKEN.finditer(path):
        gap = path[pos : m.start()].strip(".")
        if gap:
            raise fail("parse_path", "path", "a keypath like '.layers[0].w_in'", repr(path))
        pos = m.end()
        q1, q2, idx, name = m.groups()
        if idx is not None:
            tokens.append(int(idx))
        elif q1 is not None or q2 is not None:
            tokens.append(q1 if q1 is not None else q2)  # type: ignore[arg-type]
        elif name.lstrip("-").isdigit():
            tokens.append(int(name))
        else:
            tokens.append(name)
    if path[pos:].strip("."):
        raise fail("parse_path", "path", "a keypath like '.layers[0].w_in'", repr(path))
    return tuple(tokens)


def _key_token(k: Any) -> str | int:
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.DictKey):
        return k.key if isinstance(k.key, int | str) else str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return k.idx
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return k.key
    return str(k)


def keystr(path: Sequence[Any]) -> str:
    """Canonical name of a ``tree_flatten_with_path`` path."""
    return jax.tree_util.keystr(tuple(path))


def leaves_with_names(tree: Any,
                      is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    """``[(name, leaf), ...]`` in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(keystr(p), leaf) for p, leaf in flat]


def names(tree: Any) -> list[str]:
    """Canonical names of all leaves."""
    return [n for n, _ in leaves_with_names(tree)]


def get(tree: Any, path: str) -> Any:
    """The subtree or leaf of ``tree`` at ``path``.

    Raises:
        ValueError: if the path does not exist, listing the names that do.
    """
    node = tree
    for tok in parse_path(path):
        try:
            if isinstance(node, Mapping):
                node = node[tok]
            elif isinstance(tok, int) and isinstance(node, Sequence) and not isinstance(node, str):
                node = node[tok]
            elif isinstance(tok, str):
                node = getattr(node, tok)
            else:
                raise KeyError(tok)
        except (KeyError, IndexError, AttributeError, TypeError):
            avail = ", ".join(names(tree)[:20])
            raise fail("tree.get", "path", "to name a part of the tree", repr(path),
                       f"Available leaves include: {avail}") from None
    return node


def replace(tree: Any, path: str, value: Any) -> Any:
    """A copy of ``tree`` with the node at ``path`` replaced by ``value`` (immutably)."""
    get(tree, path)  # validate with a clear error first
    return eqx.tree_at(lambda t: get(t, path), tree, value, is_leaf=lambda x: x is None)


def _glob_regex(glob: str) -> re.Pattern[str]:
    """``*`` matches any run of characters, ``?`` one; brackets and dots are literal."""
    parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob]
    return re.compile("".join(parts))


def _matcher(selector: Selector) -> Callable[[str, tuple, Any], bool]:
    if callable(selector):
        return lambda name, toks, leaf: bool(selector(name, leaf))
    if isinstance(selector, str):
        if any(c in selector for c in "*?"):
            pattern = _glob_regex(selector)
            return lambda name, toks, leaf: pattern.fullmatch(name) is not None
        want = parse_path(selector)
        return lambda name, toks, leaf: toks[: len(want)] == want
    if isinstance(selector, Sequence):
        subs = [_matcher(s) for s in selector]
        return lambda name, toks, leaf: any(m(name, toks, leaf) for m in subs)
    raise fail("tree.where", "selector", "a path string, glob, predicate or sequence of them",
               type(selector).__name__)


def where(tree: Any, selector: Selector, *, allow_empty: bool = False) -> Any:
    """A pytree of bools with ``tree``'s structure, True at the selected leaves.

    Raises:
        ValueError: if nothing matches (unless ``allow_empty``), listing available names.
    """
    match = _matcher(selector)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    mask = [bool(match(keystr(p), tuple(_key_token(k) for k in p), leaf)) for p, leaf in flat]
    if not allow_empty and not any(mask):
        avail = ", ".join(keystr(p) for p, _ in flat[:30])
        raise fail("tree.where", "selector", "to match at least one leaf", repr(selector),
                   f"Available leaves: {avail}")
    return jax.tree_util.tree_unflatten(treedef, mask)


def select(tree: Any, selector: Selector, *, allow_empty: bool = False) -> dict[str, Any]:
    """``{name: leaf}`` for the selected leaves, in flattening order."""
    mask = jax.tree_util.tree_leaves(where(tree, selector, allow_empty=allow_empty))
    return {n: leaf for (n, leaf), m in zip(leaves_with_names(tree), mask, strict=True) if m}


def apply(tree: Any, selector: Selector, fn: Callable[[Any], Any]) -> Any:
    """A copy of ``tree`` with ``fn`` applied to every selected leaf."""
    mask = where(tree, selector)
    return jax.tree_util.tree_map(lambda m, x: fn(x) if m else x, mask, tree)


def partition(tree: Any, selector: Selector) -> tuple[Any, Any]:
    """``eqx.partition`` by selector: (selected, rest), recombine with ``eqx.combine``."""
    return eqx.partition(tree, where(tree, selector))
