"""Batched Jacobian transforms: stacked JVPs/VJPs, a lazy Jacobian operator, per-example
Jacobians with respect to inputs, parameters and activations, and float64 Jacobian Grams.

Everything here differentiates with ``jax.linearize`` / ``jax.vjp`` ONCE and then maps
the resulting linear function over a stack of tangents or cotangents with ``jax.vmap``
(all at once) or ``jax.lax.map(..., batch_size=chunk_size)`` (bounded memory). There is
no Python loop over outputs, tangents or examples, so the traced program has a size
independent of the number of directions.

Forward mode costs one JVP per input dimension and reverse mode one VJP per output
dimension; ``mode="auto"`` picks the smaller side.

Shapes use the glossary of :mod:`jaxinterp._types`: ``batch`` examples, ``n_tangents``
tangents pushed forward together, ``n_cotangents`` cotangents pulled back together.
``*in`` / ``*out`` are the shape of one example's input / output.

References:
    Griewank & Walther (2008), "Evaluating Derivatives: Principles and Techniques of
    Algorithmic Differentiation", 2nd ed. (forward vs reverse mode, Jacobian
    accumulation); Bradbury et al. (2018), "JAX: composable transformations of
    Python+NumPy programs" (``linearize``/``vjp``/``vmap``); Bushnaq et al. (2024),
    "The Local Interaction Basis: Identifying Computationally-Relevant and Sparsely
    Interacting Features in Neural Networks" (Jacobian Grams ``E[J^T J]``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from . import tree
from ._checks import check_in, check_positive, check_same_structure, fail
from ._types import Array, Float, PyTree
from .interventions import perturb_at

__all__ = [
    "GramResult",
    "JacobianOperator",
    "activation_jacobian",
    "gram",
    "input_jacobian",
    "jacobian_gram",
    "jvps",
    "linearize",
    "param_jacobian",
    "vjps",
]

MODES = ("auto", "fwd", "rev")


# --- shared checks and maps --------------------------------------------------------


def _check_chunk(fn: str, chunk_size: int | None) -> int | None:
    if chunk_size is None:
        return None
    check_positive(fn, "chunk_size", chunk_size, integer=True)
    return int(chunk_size)


def _map(f: Callable[[Any], Any], xs: PyTree, chunk_size: int | None) -> Any:
    """``f`` over the leading axis of ``xs``: one vmap, or ``lax.map`` in chunks."""
    if chunk_size is None:
        return jax.vmap(f)(xs)
    return jax.lax.map(f, xs, batch_size=chunk_size)


def _leading(fn: str, arg: str, xs: PyTree, hint: str = "") -> int:
    """The leading-axis size shared by every leaf of ``xs``."""
    named = tree.leaves_with_names(xs)
    if not named:
        raise fail(fn, arg, "at least one array leaf", xs, hint)
    shapes = {name or "<root>": jnp.shape(leaf) for name, leaf in named}
    if any(len(s) == 0 for s in shapes.values()):
        got = ", ".join(f"{k}: {v}" for k, v in shapes.items())
        raise fail(fn, arg, "a leading axis on every leaf", f"shapes {got}", hint)
    sizes = {s[0] for s in shapes.values()}
    if len(sizes) != 1:
        got = ", ".join(f"{k}: {v[0]}" for k, v in shapes.items())
        raise fail(fn, arg, "leaves sharing one leading axis", f"leading sizes {got}", hint)
    return sizes.pop()


def _check_stack(fn: str, arg: str, ref: PyTree, stack: PyTree, n: int, ref_name: str) -> None:
    """Each leaf of ``stack`` is ``(n, *ref_leaf.shape)`` with ``ref_leaf.dtype``."""
    for (name, r), s in zip(
        tree.leaves_with_names(ref), jax.tree_util.tree_leaves(stack), strict=True
    ):
        want = (n, *jnp.shape(r))
        if tuple(jnp.shape(s)) != want:
            raise fail(fn, f"{arg}{name}", f"of shape {want} = (n, *{ref_name}{name}.shape)",
                       tuple(jnp.shape(s)))
        if jnp.result_type(s) != jnp.result_type(r):
            raise fail(fn, f"{arg}{name}", f"of dtype {jnp.result_type(r)} like {ref_name}",
                       jnp.result_type(s), "Cast with .astype().")


def _check_inexact(fn: str, arg: str, x: PyTree, hint: str = "") -> None:
    for name, leaf in tree.leaves_with_names(x):
        if not eqx.is_inexact_array(leaf):
            got = getattr(leaf, "dtype", type(leaf).__name__)
            raise fail(fn, f"{arg}{name}", "a floating-point array", got, hint)


def _use_fwd(mode: str, d_in: int, d_out: int) -> bool:
    return mode == "fwd" or (mode == "auto" and d_in <= d_out)


def _probe_example(fn: str, f: Callable[[Any], Any], xs: PyTree) -> jax.ShapeDtypeStruct:
    """Shape of ``f(xs[0])``, checking that ``xs`` has a batch axis and ``f`` one array out."""
    _leading(fn, "xs", xs, "xs holds a batch: (batch, *in); add xs[None] for one example.")
    x0 = jax.tree_util.tree_map(lambda a: a[0], xs)
    try:
        out = jax.eval_shape(f, x0)
    except (TypeError, ValueError) as e:
        shapes = jax.tree_util.tree_map(jnp.shape, xs)
        raise fail(fn, "xs", "a leading batch axis so that xs[0] is one example", shapes,
                   f"Calling the model on xs[0] failed: {e}") from e
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise fail(fn, "the model output", "one array per example",
                   jax.tree_util.tree_structure(out))
    return out


def _dense_jacobian(f: Callable[[Array], Array], x: Array, out_shape: tuple, fwd: bool) -> Array:
    """Dense ``(*out, *in)`` Jacobian of ``f`` at ``x``: vmapped JVPs or VJPs on a basis."""
    d_in, d_out = math.prod(x.shape), math.prod(out_shape)
    if fwd:
        _, f_jvp = jax.linearize(f, x)
        basis = jnp.eye(d_in, dtype=x.dtype).reshape(d_in, *x.shape)
        cols = jax.vmap(f_jvp)(basis).reshape(d_in, d_out)
        return cols.T.reshape(*out_shape, *x.shape)
    out, f_vjp = jax.vjp(f, x)
    basis = jnp.eye(d_out, dtype=out.dtype).reshape(d_out, *out_shape)
    rows = jax.vmap(lambda u: f_vjp(u)[0])(basis)
    return rows.reshape(*out_shape, *x.shape)


# --- stacked JVPs / VJPs -----------------------------------------------------------


def jvps(
    fn: Callable[[PyTree], PyTree],
    primal: PyTree,
    tangents: PyTree,
    *,
    chunk_size: int | None = None,
) -> tuple[PyTree, PyTree]:
    """Push a stack of tangents forward through ``fn`` at ``primal``.

    ``fn`` is linearized once; the linear map is vmapped over the ``n_tangents`` axis.

    Args:
        fn: function of one pytree argument.
        primal: the point (pytree of floating arrays).
        tangents: pytree matching ``primal`` whose leaves are ``(n_tangents, *leaf.shape)``.
        chunk_size: tangents per vmapped chunk (``lax.map``); ``None``: all at once.

    Returns:
        ``(fn(primal), tangents_out)`` where ``tangents_out`` matches ``fn``'s output with
        leaves ``(n_tangents, *out_leaf.shape)``.

    Raises:
        ValueError: on a tree-structure, shape, leading-axis or dtype mismatch between
            ``tangents`` and ``primal``, or ``chunk_size <= 0``.
    """
    name = "jvps"
    chunk_size = _check_chunk(name, chunk_size)
    _check_inexact(name, "primal", primal)
    check_same_structure(name, "primal", primal, "tangents", tangents)
    n = _leading(name, "tangents", tangents, "Stack tangents along a leading n_tangents axis.")
    _check_stack(name, "tangents", primal, tangents, n, "primal")
    out, f_jvp = jax.linearize(fn, primal)
    return out, _map(f_jvp, tangents, chunk_size)


def vjps(
    fn: Callable[[PyTree], PyTree],
    primal: PyTree,
    cotangents: PyTree,
    *,
    chunk_size: int | None = None,
) -> PyTree:
    """Pull a stack of cotangents back through ``fn`` at ``primal``.

    ``jax.vjp`` runs the forward pass once; the pullback is mapped over the
    ``n_cotangents`` axis with ``lax.map(..., batch_size=chunk_size)``.

    Args:
        fn: function of one pytree argument.
        primal: the point (pytree of floating arrays).
        cotangents: pytree matching ``fn(primal)`` with leaves
            ``(n_cotangents, *out_leaf.shape)``.
        chunk_size: cotangents per vmapped chunk; ``None``: all at once (one vmap).

    Returns:
        Input cotangents: a pytree matching ``primal`` with leaves
        ``(n_cotangents, *leaf.shape)``.

    Raises:
        ValueError: on a tree-structure, shape, leading-axis or dtype mismatch between
            ``cotangents`` and ``fn(primal)``, or ``chunk_size <= 0``.
    """
    name = "vjps"
    chunk_size = _check_chunk(name, chunk_size)
    _check_inexact(name, "primal", primal)
    out, f_vjp = jax.vjp(fn, primal)
    check_same_structure(name, "fn(primal)", out, "cotangents", cotangents)
    n = _leading(name, "cotangents", cotangents,
                 "Stack cotangents along a leading n_cotangents axis.")
    _check_stack(name, "cotangents", out, cotangents, n, "fn(primal)")
    return _map(lambda u: f_vjp(u)[0], cotangents, chunk_size)


# --- lazy Jacobian operator --------------------------------------------------------


class JacobianOperator(eqx.Module):
    """The Jacobian of ``fn: (*in) -> (*out)`` at a primal, as a lazy linear operator.

    Built by :func:`linearize`, which runs the forward pass once and keeps the
    linearization; products never form the dense matrix. VJPs transpose the stored
    linear map (no second forward pass).

    Attributes:
        primal: the point, shape ``in_shape``.
        out: ``fn(primal)``, shape ``out_shape``.
        jvp_fn: the linearized map ``v -> J v`` (a ``jax.tree_util.Partial``).
        chunk_size: products per vmapped chunk in ``mm``/``rmm``/``materialize``.
    """

    primal: Array
    out: Array
    jvp_fn: Callable[[Array], Array]
    chunk_size: int | None = eqx.field(static=True, default=None)

    @property
    def in_structure(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.primal.shape, self.primal.dtype)

    @property
    def out_structure(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.out.shape, self.out.dtype)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.primal.shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.out.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense Jacobian, ``(*out_shape, *in_shape)``."""
        return (*self.out_shape, *self.in_shape)

    def _check(self, fn: str, arg: str, v: Any, core: tuple[int, ...], stacked: bool) -> int:
        shape = tuple(jnp.shape(v))
        if stacked:
            ok = len(shape) == len(core) + 1 and shape[1:] == core
            want = f"of shape (n, *{core})"
        else:
            ok, want = shape == core, f"of shape {core}"
        if not ok:
            raise fail(f"JacobianOperator.{fn}", arg, want, shape)
        return shape[0] if stacked else 1

    def _rmv(self, u: Array) -> Array:
        transpose = jax.linear_transpose(self.jvp_fn, self.in_structure)
        return transpose(u)[0]

    def mv(self, v: Array) -> Array:
        """``J v`` for ``v`` of shape ``in_shape`` (cast to the primal dtype) -> ``out_shape``."""
        self._check("mv", "v", v, self.in_shape, stacked=False)
        return self.jvp_fn(jnp.asarray(v, self.primal.dtype))

    def rmv(self, u: Array) -> Array:
        """``J^T u`` for ``u`` of shape ``out_shape`` (cast to the output dtype) -> ``in_shape``."""
        self._check("rmv", "u", u, self.out_shape, stacked=False)
        return self._rmv(jnp.asarray(u, self.out.dtype))

    def mm(self, vs: Array) -> Array:
        """``J v`` for each ``v`` in ``vs``: ``(n_tangents, *in) -> (n_tangents, *out)``."""
        self._check("mm", "vs", vs, self.in_shape, stacked=True)
        return _map(self.jvp_fn, jnp.asarray(vs, self.primal.dtype), self.chunk_size)

    def rmm(self, us: Array) -> Array:
        """``J^T u`` for each ``u`` in ``us``: ``(n_cotangents, *out) -> (n_cotangents, *in)``."""
        self._check("rmm", "us", us, self.out_shape, stacked=True)
        return _map(self._rmv, jnp.asarray(us, self.out.dtype), self.chunk_size)

    def materialize(self, mode: str = "auto") -> Array:
        """The dense Jacobian, shape ``(*out_shape, *in_shape)``.

        Args:
            mode: ``"fwd"`` (one JVP per input entry), ``"rev"`` (one VJP per output
                entry) or ``"auto"`` (the smaller of the two).
        """
        check_in("JacobianOperator.materialize", "mode", mode, MODES)
        d_in, d_out = math.prod(self.in_shape), math.prod(self.out_shape)
        if _use_fwd(mode, d_in, d_out):
            basis = jnp.eye(d_in, dtype=self.primal.dtype).reshape(d_in, *self.in_shape)
            return self.mm(basis).reshape(d_in, d_out).T.reshape(self.shape)
        basis = jnp.eye(d_out, dtype=self.out.dtype).reshape(d_out, *self.out_shape)
        return self.rmm(basis).reshape(self.shape)


def linearize(
    fn: Callable[[Array], Array], primal: Array, *, chunk_size: int | None = None
) -> JacobianOperator:
    """The lazy Jacobian of ``fn`` at ``primal`` (forward pass run once, here).

    Args:
        fn: array -> array function of ONE argument (close over the rest).
        primal: floating array, shape ``(*in)``.
        chunk_size: products per vmapped chunk in the operator's batched methods.

    Returns:
        A :class:`JacobianOperator` with ``shape == (*out, *in)``.

    Raises:
        ValueError: if ``primal`` is not a floating array, ``fn`` does not return one
            array, or ``chunk_size <= 0``.
    """
    name = "linearize"
    chunk_size = _check_chunk(name, chunk_size)
    if not eqx.is_inexact_array(primal):
        raise fail(name, "primal", "a floating-point array",
                   getattr(primal, "dtype", type(primal).__name__),
                   "For pytree inputs use jvps/vjps.")
    out, f_jvp = jax.linearize(fn, primal)
    if not eqx.is_array(out):
        raise fail(name, "fn(primal)", "one array", jax.tree_util.tree_structure(out),
                   "For pytree outputs use jvps/vjps.")
    return JacobianOperator(primal=primal, out=out, jvp_fn=f_jvp, chunk_size=chunk_size)


# --- per-example Jacobians ---------------------------------------------------------


def _check_xs(fn: str, xs: Any) -> None:
    if not eqx.is_array(xs):
        raise fail(fn, "xs", "an array of shape (batch, *in)", type(xs).__name__)
    _check_inexact(fn, "xs", xs, "Token ids have no input Jacobian; differentiate an "
                   "embedding with activation_jacobian instead.")


def input_jacobian(
    apply: Callable[[PyTree, Array], Array],
    params: PyTree,
    xs: Float[Array, "batch ..."],
    *,
    mode: str = "auto",
    chunk_size: int | None = None,
) -> Array:
    """Per-example Jacobians ``d apply(params, x) / d x`` over a batch.

    Args:
        apply: ``apply(params, x) -> y`` for ONE example (see :class:`jaxinterp.target.Target`).
        params: its parameters (held fixed).
        xs: floating inputs, shape ``(batch, *in)``.
        mode: ``"fwd"``, ``"rev"`` or ``"auto"`` (fewer products of the two).
        chunk_size: examples per vmapped chunk (``lax.map``); ``None``: all at once.

    Returns:
        Shape ``(batch, *out, *in)``.

    Raises:
        ValueError: if ``xs`` has no batch axis or is not floating, ``mode`` is unknown,
            or ``chunk_size <= 0``.
    """
    name = "input_jacobian"
    check_in(name, "mode", mode, MODES)
    chunk_size = _check_chunk(name, chunk_size)
    _check_xs(name, xs)
    out = _probe_example(name, lambda x: apply(params, x), xs)
    fwd = _use_fwd(mode, math.prod(xs.shape[1:]), math.prod(out.shape))

    def one(x: Array) -> Array:
        return _dense_jacobian(lambda x_: apply(params, x_), x, out.shape, fwd)

    return _map(one, xs, chunk_size)


def param_jacobian(
    apply: Callable[[PyTree, Array], Array],
    params: PyTree,
    xs: Array,
    *,
    select: tree.Selector | None = None,
    mode: str = "auto",
    chunk_size: int | None = None,
) -> dict[str, Array]:
    """Per-example Jacobians of ``apply(params, x)`` with respect to selected parameters.

    Args:
        apply: ``apply(params, x) -> y`` for ONE example.
        params: parameter pytree.
        xs: inputs, shape ``(batch, *in)`` (any dtype: token ids are fine here).
        select: a :mod:`jaxinterp.tree` selector (path, glob, predicate or list) of the
            leaves to differentiate; default: every floating array leaf.
        mode: ``"rev"`` (one VJP per output entry), ``"fwd"`` (one JVP per selected
            parameter entry) or ``"auto"``.
        chunk_size: examples per vmapped chunk; ``None``: all at once.

    Returns:
        ``{name: (batch, *out, *leaf_shape)}`` keyed by keypath, in flattening order.

    Raises:
        ValueError: if the selector matches nothing or a non-floating leaf, ``xs`` has no
            batch axis, ``mode`` is unknown, or ``chunk_size <= 0``.
    """
    name = "param_jacobian"
    check_in(name, "mode", mode, MODES)
    chunk_size = _check_chunk(name, chunk_size)
    if select is None:
        select = lambda _, leaf: eqx.is_inexact_array(leaf)
    chosen = tree.select(params, select)
    for key, leaf in chosen.items():
        if not eqx.is_inexact_array(leaf):
            raise fail(name, "select", "to pick floating-point array leaves only",
                       f"{key} ({getattr(leaf, 'dtype', type(leaf).__name__)})")
    diff, static = eqx.partition(params, tree.where(params, select))
    out = _probe_example(name, lambda x: apply(params, x), xs)
    n_params = sum(leaf.size for leaf in chosen.values())
    d_out = math.prod(out.shape)
    fwd = _use_fwd(mode, n_params, d_out)

    def one(x: Array) -> list[Array]:
        f = lambda d: apply(eqx.combine(d, static), x)
        if fwd:
            flat, unravel = ravel_pytree(diff)
            _, f_jvp = jax.linearize(lambda v: f(unravel(v)), flat)
            basis = jnp.eye(flat.size, dtype=flat.dtype)
            rows = jax.vmap(f_jvp)(basis).reshape(flat.size, d_out).T  # (d_out, n_params)
            grads = jax.vmap(unravel)(rows)
        else:
            _, f_vjp = jax.vjp(f, diff)
            basis = jnp.eye(d_out, dtype=out.dtype).reshape(d_out, *out.shape)
            grads = jax.vmap(lambda u: f_vjp(u)[0])(basis)
        leaves = jax.tree_util.tree_leaves(grads)
        return [g.reshape(*out.shape, *g.shape[1:]) for g in leaves]

    return dict(zip(chosen, _map(one, xs, chunk_size), strict=True))


class _ShapeProbe:
    """Stand-in for a submodule that records its output shapes (used under eval_shape)."""

    def __init__(self, inner: Callable[..., Array], sink: list):
        self.inner, self.sink = inner, sink

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Array:
        out = self.inner(x, *args, **kwargs)
        self.sink.append(jax.ShapeDtypeStruct(jnp.shape(out), jnp.result_type(out)))
        return out


def activation_jacobian(
    model: Callable[[Array], Array],
    path: str,
    xs: Array,
    *,
    d_act: int | tuple[int, ...] | None = None,
    mode: str = "auto",
    chunk_size: int | None = None,
) -> Array:
    """Per-example Jacobians of an equinox model's output with respect to an activation.

    The submodule at ``path`` is wrapped (:func:`jaxinterp.interventions.perturb_at`) so
    that it returns ``inner(x) + delta``; the Jacobian with respect to ``delta`` at
    ``delta = 0`` is the Jacobian with respect to that submodule's output. A submodule
    called several times in one forward pass gets the same ``delta`` each time.

    Args:
        model: equinox model, called on ONE example.
        path: keypath of a callable submodule, e.g. ``".layers[0]"``.
        xs: inputs, shape ``(batch, *in)``.
        d_act: expected shape of the activation of one example (an int means
            ``(d_act,)``), checked against a shape-only trace; ``None``: inferred.
        mode: ``"fwd"``, ``"rev"`` or ``"auto"``.
        chunk_size: examples per vmapped chunk; ``None``: all at once.

    Returns:
        Shape ``(batch, *out, *act)``, e.g. ``(batch, d_out, d_act)``.

    Raises:
        ValueError: if ``path`` is not a callable submodule, ``d_act`` does not match the
            activation, ``xs`` has no batch axis, ``mode`` is unknown or ``chunk_size <= 0``.
    """
    name = "activation_jacobian"
    check_in(name, "mode", mode, MODES)
    chunk_size = _check_chunk(name, chunk_size)
    node = tree.get(model, path)
    if not callable(node):
        raise fail(name, "path", "to name a callable submodule",
                   f"{path!r} -> {type(node).__name__}")
    _probe_example(name, model, xs)
    x0 = jax.tree_util.tree_map(lambda a: a[0], xs)
    sink: list[jax.ShapeDtypeStruct] = []
    jax.eval_shape(tree.replace(model, path, _ShapeProbe(node, sink)), x0)
    acts = {(s.shape, s.dtype) for s in sink}
    if len(acts) != 1:
        raise fail(name, "path", "to name a submodule called with one output shape",
                   f"{path!r} with output shapes {[s.shape for s in sink]}")
    act_shape, act_dtype = acts.pop()
    if d_act is not None:
        want = (d_act,) if isinstance(d_act, int) else tuple(d_act)
        if want != tuple(act_shape):
            raise fail(name, "d_act", f"to match the activation at {path!r} of shape "
                       f"{tuple(act_shape)}", want, "Leave d_act=None to infer it.")
    zeros = jnp.zeros(act_shape, act_dtype)
    out = jax.eval_shape(lambda x: perturb_at(model, path, zeros)(x), x0)
    fwd = _use_fwd(mode, math.prod(act_shape), math.prod(out.shape))

    def one(x: Array) -> Array:
        return _dense_jacobian(lambda d: perturb_at(model, path, d)(x), zeros, out.shape, fwd)

    return _map(one, xs, chunk_size)


# --- float64 Gram accumulation -----------------------------------------------------


class GramResult(eqx.Module):
    """A second-moment matrix accumulated over examples.

    Attributes:
        gram: ``E[g g^T]`` (vector ``g``) or ``E[g^T g]`` (matrix ``g`` of shape
            ``(k, d)``), centred if requested; shape ``(d, d)``.
        mean: ``E[g]``, shape ``(d,)`` or ``(k, d)``.
        count: number of examples.
    """

    gram: Float[Array, "d d"]
    mean: Array
    count: int = eqx.field(static=True)


def gram(
    fn: Callable[[Any], Array],
    xs: PyTree,
    *,
    chunk_size: int,
    dtype: Any = jnp.float64,
    center: bool = False,
) -> GramResult:
    """``E_x[g(x) g(x)^T]`` for ``g = fn(x)``, accumulated over chunks in float64.

    For a vector ``g`` of shape ``(d,)`` this is the mean outer product; for a matrix
    ``g`` of shape ``(k, d)`` (e.g. a Jacobian) it is ``E[g^T g]``, the sum over the ``k``
    rows. Examples are processed ``chunk_size`` at a time (vmapped) inside ``lax.scan``;
    sums are kept in ``dtype``. x64 is enabled locally while tracing, so ``fn`` runs
    with 64-bit default dtypes for any arrays it creates; the result stays ``dtype``.

    Args:
        fn: function of ONE example returning shape ``(d,)`` or ``(k, d)``.
        xs: examples, a pytree whose leaves share a leading ``batch`` axis.
        chunk_size: examples per vmapped chunk (bounds memory).
        dtype: accumulation dtype (default float64).
        center: subtract the mean first: ``E[(g - E g)^T (g - E g)]``.

    Returns:
        :class:`GramResult` with ``gram`` of shape ``(d, d)`` and ``count = batch``.

    Raises:
        ValueError: if ``chunk_size <= 0``, ``xs`` has no batch axis, or ``fn`` does not
            return a rank-1 or rank-2 array.
    """
    name = "gram"
    check_positive(name, "chunk_size", chunk_size, integer=True)
    chunk_size = int(chunk_size)
    with jax.enable_x64(True):
        n = _leading(name, "xs", xs, "xs holds a batch: (batch, *in).")
        g_struct = _probe_example(name, fn, xs)
        if len(g_struct.shape) not in (1, 2):
            raise fail(name, "fn(x)", "of shape (d,) or (k, d)", g_struct.shape)
        d = g_struct.shape[-1]

        def stats(chunk: PyTree) -> tuple[Array, Array]:
            g = jax.vmap(fn)(chunk).astype(dtype)
            g = g.reshape(g.shape[0], -1, d)  # (chunk, k, d); k = 1 for vectors
            second = jnp.einsum("cki,ckj->ij", g, g, precision=jax.lax.Precision.HIGHEST)
            return second, g.sum(0).reshape(g_struct.shape)

        n_chunks, n_tail = divmod(n, chunk_size)
        second = jnp.zeros((d, d), dtype)
        first = jnp.zeros(g_struct.shape, dtype)
        if n_chunks:
            head = jax.tree_util.tree_map(
                lambda a: a[: n_chunks * chunk_size].reshape(n_chunks, chunk_size, *a.shape[1:]),
                xs,
            )

            def body(carry: tuple[Array, Array], chunk: PyTree) -> tuple[Any, None]:
                s2, s1 = stats(chunk)
                return (carry[0] + s2, carry[1] + s1), None

            (second, first), _ = jax.lax.scan(body, (second, first), head)
        if n_tail:
            tail = jax.tree_util.tree_map(lambda a: a[n_chunks * chunk_size :], xs)
            s2, s1 = stats(tail)
            second, first = second + s2, first + s1
        mean = first / n
        moment = second / n
        if center:
            m = mean.reshape(-1, d)
            moment = moment - jnp.einsum("ki,kj->ij", m, m, precision=jax.lax.Precision.HIGHEST)
    return GramResult(gram=moment, mean=mean, count=n)


def jacobian_gram(
    fn: Callable[[Array], Array],
    xs: Array,
    *,
    chunk_size: int,
    mode: str = "auto",
    dtype: Any = jnp.float64,
    center: bool = False,
) -> GramResult:
    """``E_x[J(x)^T J(x)]`` for the Jacobian ``J`` of ``fn`` at each example, in float64.

    Per chunk, each example's Jacobian is built with vmapped JVPs (``d_in <= d_out``) or
    VJPs (otherwise), flattened to ``(d_out, d_in)`` and accumulated by :func:`gram`.

    Args:
        fn: function of ONE example, ``(*in) -> (*out)``.
        xs: floating inputs, shape ``(batch, *in)``.
        chunk_size: examples per vmapped chunk.
        mode: ``"fwd"``, ``"rev"`` or ``"auto"``.
        dtype: accumulation dtype (default float64).
        center: use ``J - E[J]`` instead of ``J``.

    Returns:
        :class:`GramResult` with ``gram`` of shape ``(d_in, d_in)`` (inputs flattened),
        ``mean = E[J]`` of shape ``(d_out, d_in)`` and ``count = batch``.

    Raises:
        ValueError: as :func:`gram` and :func:`input_jacobian`.
    """
    name = "jacobian_gram"
    check_in(name, "mode", mode, MODES)
    check_positive(name, "chunk_size", chunk_size, integer=True)
    _check_xs(name, xs)
    out = _probe_example(name, fn, xs)
    d_in, d_out = math.prod(xs.shape[1:]), math.prod(out.shape)
    fwd = _use_fwd(mode, d_in, d_out)

    def flat_jacobian(x: Array) -> Array:
        return _dense_jacobian(fn, x, out.shape, fwd).reshape(d_out, d_in)

    return gram(flat_jacobian, xs, chunk_size=chunk_size, dtype=dtype, center=center)
