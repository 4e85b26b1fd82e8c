"""Node layers and sections: a model cut at chosen activations, with folded biases.

A *node layer* ``l`` is the activation passed from section ``l - 1`` to section ``l``, of
shape ``(P_l, d_l)`` for one example. Every node layer but the last (the output) carries
a trailing constant coordinate ``c`` equal to 1 on the data, so ``d_l = width_l + 1``.
A *section* ``S_l`` maps node layer ``l`` to node layer ``l + 1`` and multiplies every
bias it adds by ``c`` ("folded bias"): scaling a whole node layer by ``alpha`` then
scales the biases too, so integrated gradients run along a path from a true zero and
centring is a linear map.

Sections here are pure functions of ``(h, c)`` with ``h: (P_in, width_in)`` and ``c:
(P_in,)`` returning ``(h_out: (P_out, width_out), c_out: (P_out,))``; the folding is
functional (no weight matrix is rebuilt). :class:`Sectioned` holds the part before the
first node layer (``pre``, run but not analysed), the sections and the node-layer
names, and exposes each section as a function of the folded activation
(:meth:`Sectioned.section_fn`). Nothing here mutates the model: activations are
collected by running the sections (:func:`collect_activations`), or, for the toy models,
read from their ``forward_with_cache`` (:func:`cached_inputs`).

LIB differentiates ``S_l(y) C_{l+1}`` once per example and direction, so sections may
say more about that function than ``__call__`` does (all optional, all exact):
``features`` evaluates it with ``C_{l+1}`` contracted into the last weight matrix;
``hidden_layer_factors`` describes a one-hidden-layer section (:class:`HiddenLayerFactors`)
and ``structured_jacobian`` a Jacobian made of a few fixed matrices plus a low-rank part
(:class:`StructuredJacobian`).

References:
    Bushnaq et al. (2024), "The Local Interaction Basis: Identifying
    Computationally-Relevant and Sparsely Interacting Features in Neural Networks"
    (arXiv 2405.10928), node layers, sections and folded biases.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from .. import tree
from .._checks import check_in, check_positive, fail
from .._types import Array, Float, PyTree

__all__ = [
    "ACTIVATIONS",
    "AbstractSection",
    "DenseSection",
    "FoldedSection",
    "FunctionSection",
    "HiddenLayerFactors",
    "PositionwiseSection",
    "Sectioned",
    "StructuredJacobian",
    "cached_inputs",
    "collect_activations",
    "fold_readout",
]

# Activations with act(1) = 1, so the constant coordinate is copied through (root = 1).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "identity": lambda x: x,
}


class HiddenLayerFactors(NamedTuple):
    """A section in a next-layer basis that is one hidden layer at every position:
    ``F(y)_s = y_s E + act(y_s A) B`` for each folded input row ``y_s: (d_in,)``, so its
    Jacobian is ``E + A diag(act'(y_s A)) B``.

    Attributes:
        E: the linear part (skip connection, folded biases), ``(d_in, m)``.
        A: into the hidden layer, biases as the last row, ``(d_in, n_hidden)``.
        B: out of it, basis applied, ``(n_hidden, m)``.
        activation: a name in :data:`ACTIVATIONS`.
    """

    E: Array
    A: Array
    B: Array
    activation: str


class StructuredJacobian(NamedTuple):
    """The Jacobian of a section-level function of ONE example ``y: (P, d) -> (P', m)``
    as a few example-independent matrices plus a low-rank part:

        d F / d y[s, :] = sum_r coef[s, r] K[r] + sum_q g[s, q] (outer) u[q]    (d, P' m),

    with the output flattened. Attention, for instance: ``K`` are the per-head value
    paths ``W_V W_O C`` (coefficients: the attention pattern), ``g (x) u`` the query/key
    paths. LIB's Gram and edges then cost ``O(R + Q)`` per output entry instead of a
    dense Jacobian (:mod:`.dense`).

    Attributes:
        coef: ``(P, R)``.
        K: ``(R, d, P' m)``, the same for every example.
        g: ``(P, Q, d)``.
        u: ``(Q, P' m)``.
    """

    coef: Array
    K: Array
    g: Array
    u: Array


class AbstractSection(eqx.Module):
    """One section ``S_l``: node layer ``l`` (unfolded) to node layer ``l + 1``.

    ``__call__(h, c)`` takes ONE example: ``h: (P_in, width_in)`` and the constant
    coordinate ``c: (P_in,)`` (1 on the data), and returns ``(h_out: (P_out, width_out),
    c_out: (P_out,))``. Every bias the section adds must be multiplied by ``c`` (at the
    position it is added to), and ``c_out = act(root * c)`` with ``act(root) = 1``.
    """

    @abc.abstractmethod
    def __call__(
        self, h: Float[Array, "P_in w_in"], c: Float[Array, " P_in"]
    ) -> tuple[Float[Array, "P_out w_out"], Float[Array, " P_out"]]:
        raise NotImplementedError

    def features(
        self, h: Float[Array, "P_in w_in"], c: Float[Array, " P_in"], C: Array, *, last: bool
    ) -> Float[Array, "P_out m"]:
        """The folded output in a basis of the next node layer, ``S(h, c) @ C``, for ONE
        example (``last``: the output layer, which has no constant coordinate).

        Override to contract ``C`` into the section's final linear map (``W_out @ C``):
        the result is the same function, but its Jacobians along example-independent
        tangents skip one product per example (LIB's Grams and edges, :mod:`.dense`).
        """
        h_out, c_out = self(h, c)
        if not last:
            h_out = jnp.concatenate([h_out, c_out[:, None].astype(h_out.dtype)], axis=1)
        return h_out @ C

    def hidden_layer_factors(
        self, C: Array, *, last: bool, dtype: Any
    ) -> HiddenLayerFactors | None:
        """``features(., ., C)`` as :class:`HiddenLayerFactors` in ``dtype``, if the section
        is one position-wise hidden layer (then LIB's Gram ``M`` needs only the hidden
        layer's second moment, not per-example Jacobians); ``None`` otherwise."""
        return None

    def structured_jacobian(
        self, h: Float[Array, "P_in w_in"], c: Float[Array, " P_in"], C: Array, *, last: bool
    ) -> StructuredJacobian | None:
        """The Jacobian of ``features(h, c, C)`` with respect to the folded input ``[h, c]``
        at ONE example, as a :class:`StructuredJacobian`, if the section knows one;
        ``None`` (the default) otherwise."""
        return None


class DenseSection(AbstractSection):
    """A stack of position-wise dense layers ``h <- act_k(h @ W_k + c * b_k)``.

    Attributes:
        weights: ``W_k`` of shape ``(d_in, d_out)`` (row-vector convention).
        biases: ``b_k`` of shape ``(d_out,)``.
        activations: names in :data:`ACTIVATIONS`, one per layer.
    """

    weights: tuple[Array, ...]
    biases: tuple[Array, ...]
    activations: tuple[str, ...] = eqx.field(static=True)

    def __check_init__(self):
        fn = "DenseSection"
        if not (len(self.weights) == len(self.biases) == len(self.activations) >= 1):
            raise fail(
                fn,
                "weights, biases, activations",
                "of one common length >= 1",
                (len(self.weights), len(self.biases), len(self.activations)),
            )
        for k, (w, b, a) in enumerate(
            zip(self.weights, self.biases, self.activations, strict=True)
        ):
            check_in(fn, f"activations[{k}]", a, tuple(ACTIVATIONS))
            if jnp.ndim(w) != 2 or jnp.shape(b) != (jnp.shape(w)[1],):
                raise fail(
                    fn,
                    f"weights[{k}], biases[{k}]",
                    "of shapes (d_in, d_out), (d_out,)",
                    (jnp.shape(w), jnp.shape(b)),
                )
            if k and jnp.shape(self.weights[k - 1])[1] != jnp.shape(w)[0]:
                raise fail(
                    fn,
                    f"weights[{k}]",
                    f"with d_in = {jnp.shape(self.weights[k - 1])[1]}",
                    jnp.shape(w),
                )

    def __call__(self, h, c):
        for w, b, a in zip(self.weights, self.biases, self.activations, strict=True):
            h = ACTIVATIONS[a](h @ w + c[:, None] * b[None, :])
        return h, c

    def hidden_layer_factors(self, C, *, last, dtype):
        if len(self.weights) != 1:
            return None
        w, b = jnp.asarray(self.weights[0], dtype), jnp.asarray(self.biases[0], dtype)
        d_in, d = w.shape
        C = jnp.asarray(C, dtype)
        e = jnp.zeros((d_in + 1, C.shape[1]), dtype)
        if not last:  # the constant coordinate is copied
            e = e.at[-1].set(C[d])
        a = jnp.concatenate([w, b[None]], axis=0)
        return HiddenLayerFactors(E=e, A=a, B=C[:d], activation=self.activations[0])

    def features(self, h, c, C, *, last):
        if self.activations[-1] != "identity":
            return super().features(h, c, C, last=last)
        for w, b, a in zip(self.weights[:-1], self.biases[:-1], self.activations[:-1], strict=True):
            h = ACTIVATIONS[a](h @ w + c[:, None] * b[None, :])
        w, b = self.weights[-1], self.biases[-1]
        d = w.shape[1]
        wc, bc = fold_readout(w, b, C[:d], h.dtype)  # (w_in, m), (m,)
        out = h @ wc + c[:, None] * bc[None, :]
        return out if last else out + c[:, None] * jnp.asarray(C[d], h.dtype)[None, :]


class FunctionSection(AbstractSection):
    """Any section written as ``fn(params, h, c) -> (h_out, c_out)`` (see
    :class:`AbstractSection` for the contract; ``fn`` is static, ``params`` a pytree)."""

    fn: Callable[[PyTree, Array, Array], tuple[Array, Array]] = eqx.field(static=True)
    params: PyTree

    def __call__(self, h, c):
        return self.fn(self.params, h, c)


class PositionwiseSection(AbstractSection):
    """A per-position function ``apply(params, h_p) -> h_p'`` whose biases are selected
    by keypath and scaled by that position's ``c_p`` (generic bias folding: the function
    itself need not know about ``c``).

    Attributes:
        apply: ``apply(params, h_p: (width_in,)) -> (width_out,)``, static.
        params: its parameters.
        bias: a :mod:`jaxinterp.tree` selector of the bias leaves of ``params``.
        activation: the activation the constant coordinate passes through (``c_out =
            act(c)``; ``"identity"`` for residual blocks).
    """

    apply: Callable[[PyTree, Array], Array] = eqx.field(static=True)
    params: PyTree
    bias: Any = eqx.field(static=True)
    activation: str = eqx.field(static=True, default="identity")

    def __check_init__(self):
        check_in("PositionwiseSection", "activation", self.activation, tuple(ACTIVATIONS))
        tree.where(self.params, self.bias)  # raises if the selector matches nothing

    def __call__(self, h, c):
        def one(h_p: Array, c_p: Array) -> Array:
            params = tree.apply(self.params, self.bias, lambda b: c_p * b)
            return self.apply(params, h_p)

        return jax.vmap(one)(h, c), ACTIVATIONS[self.activation](c)


class FoldedSection(eqx.Module):
    """A section as a function of the folded node layer: ``f: (P_l, d_l) -> f_next``
    (the constant coordinate is split off, passed as ``c`` and appended again, except
    into the output layer). A callable pytree, so jitted callers cache on its structure.

    Attributes:
        section: the :class:`AbstractSection`.
        last: whether it maps into the output layer (no constant coordinate).
    """

    section: AbstractSection
    last: bool = eqx.field(static=True)

    def __call__(self, f: Float[Array, "P_l d_l"]) -> Array:
        h, c = self.section(f[:, :-1], f[:, -1])
        return h if self.last else jnp.concatenate([h, c[:, None].astype(h.dtype)], axis=1)

    def features(self, f: Float[Array, "P_l d_l"], C: Array) -> Array:
        """``self(f) @ C`` (see :meth:`AbstractSection.features`)."""
        return self.section.features(f[:, :-1], f[:, -1], C, last=self.last)

    def hidden_layer_factors(self, C: Array, dtype: Any) -> HiddenLayerFactors | None:
        """See :meth:`AbstractSection.hidden_layer_factors`."""
        return self.section.hidden_layer_factors(C, last=self.last, dtype=dtype)

    def structured_jacobian(
        self, f: Float[Array, "P_l d_l"], C: Array
    ) -> StructuredJacobian | None:
        """See :meth:`AbstractSection.structured_jacobian` (``f`` folded)."""
        return self.section.structured_jacobian(f[:, :-1], f[:, -1], C, last=self.last)


class Sectioned(eqx.Module):
    """A model cut into sections at named node layers.

    ``x -> pre -> [node layer 0] -S_0-> [node layer 1] -S_1-> ... -> [node layer L]``.
    Node layers ``0..L-1`` carry the trailing constant coordinate; node layer ``L`` (the
    output) does not.

    Attributes:
        pre: ``x -> h_0: (P_0, width_0)`` for ONE example (run but not analysed).
        sections: ``S_0 .. S_{L-1}``, :class:`AbstractSection` instances.
        names: ``L + 1`` node-layer names (keypaths where they exist), output last.
    """

    pre: Callable[[Any], Array]
    sections: tuple[AbstractSection, ...]
    names: tuple[str, ...] = eqx.field(static=True)

    def __check_init__(self):
        fn = "Sectioned"
        if not self.sections:
            raise fail(fn, "sections", "at least one section", "none")
        for k, s in enumerate(self.sections):
            if not isinstance(s, AbstractSection):
                raise fail(
                    fn,
                    f"sections[{k}]",
                    "an AbstractSection",
                    type(s).__name__,
                    "Wrap a function with FunctionSection(fn, params).",
                )
        if len(self.names) != len(self.sections) + 1:
            raise fail(
                fn,
                "names",
                f"of length len(sections) + 1 = {len(self.sections) + 1}",
                len(self.names),
            )
        if len(set(self.names)) != len(self.names):
            raise fail(fn, "names", "unique node-layer names", self.names)

    @property
    def n_layers(self) -> int:
        """Number of node layers, ``L + 1``."""
        return len(self.names)

    def index(self, name: str) -> int:
        """Position of the node layer called ``name``."""
        if name not in self.names:
            raise fail("Sectioned.index", "name", "one of " + ", ".join(self.names), repr(name))
        return self.names.index(name)

    def has_constant(self, layer: int) -> bool:
        """Whether node layer ``layer`` carries the constant coordinate (all but the last)."""
        return layer < self.n_layers - 1

    def input_layer(self, x: Any) -> Float[Array, "P_0 d_0"]:
        """Node layer 0 of ONE example, with the constant coordinate appended."""
        h = self.pre(x)
        if jnp.ndim(h) != 2:
            raise fail(
                "Sectioned.input_layer",
                "pre(x)",
                "of shape (P_0, width_0)",
                jnp.shape(h),
                "Return a positions axis (use h[None] for an MLP).",
            )
        return jnp.concatenate([h, jnp.ones((h.shape[0], 1), h.dtype)], axis=1)

    def section_fn(self, layer: int) -> FoldedSection:
        """``S_layer`` as a function of the folded node layer ``f: (P_l, d_l)``."""
        if not 0 <= layer < len(self.sections):
            raise fail("Sectioned.section_fn", "layer", f"in [0, {len(self.sections)})", layer)
        return FoldedSection(self.sections[layer], last=layer == len(self.sections) - 1)

    def forward_from(self, layer: int, f: Array, *, to: int | None = None) -> Array:
        """Node layer ``to`` (default: the output) from node layer ``layer``, ONE example."""
        to = self.n_layers - 1 if to is None else to
        if not 0 <= layer <= to < self.n_layers:
            raise fail(
                "Sectioned.forward_from",
                "layer, to",
                f"with 0 <= layer <= to < {self.n_layers}",
                (layer, to),
            )
        for k in range(layer, to):
            f = self.section_fn(k)(f)
        return f

    def node_layers(self, x: Any) -> list[Array]:
        """Every node layer of ONE example, ``[(P_l, d_l)]``, output last."""
        f = self.input_layer(x)
        out = [f]
        for k in range(len(self.sections)):
            f = self.section_fn(k)(f)
            out.append(f)
        return out

    def __call__(self, x: Any) -> Array:
        """The output node layer of ONE example."""
        return self.node_layers(x)[-1]

    def shapes(self, x: Any) -> list[tuple[int, ...]]:
        """``(P_l, d_l)`` of every node layer, from a shape-only trace on ONE example."""
        return [tuple(s.shape) for s in jax.eval_shape(self.node_layers, x)]


def fold_readout(w: Array, b: Array, C: Array, dtype: Any) -> tuple[Array, Array]:
    """``(w @ C, b @ C)`` in ``dtype``: a final linear map ``h w + c b`` followed by the
    basis ``C`` as one map (weights cast first, so float64 callers lose nothing)."""
    C = jnp.asarray(C, dtype)
    return jnp.asarray(w, dtype) @ C, jnp.asarray(b, dtype) @ C


def _check_batch(fn: str, xs: Any) -> int:
    leaves = jax.tree_util.tree_leaves(xs)
    if not leaves or any(jnp.ndim(a) == 0 for a in leaves):
        raise fail(
            fn,
            "xs",
            "a batch with a leading axis",
            jax.tree_util.tree_map(jnp.shape, xs),
            "Add xs[None] for one example.",
        )
    sizes = {jnp.shape(a)[0] for a in leaves}
    if len(sizes) != 1:
        raise fail(fn, "xs", "leaves sharing one leading batch axis", sorted(sizes))
    return sizes.pop()


def collect_activations(
    sectioned: Sectioned,
    xs: Any,
    *,
    dtype: Any = None,
    chunk_size: int | None = None,
) -> tuple[Array, ...]:
    """Every node layer over a batch, by running the sections (the model is not touched).

    Args:
        sectioned: the cut model.
        xs: inputs with a leading ``batch`` axis.
        dtype: cast node layer 0 to this dtype before running (e.g. ``jnp.float64`` inside
            an x64 context, so every later node layer is float64); ``None``: as is.
        chunk_size: examples per vmapped chunk (``lax.map``); ``None``: all at once.

    Returns:
        One array ``(batch, P_l, d_l)`` per node layer, output last.

    Raises:
        ValueError: if ``xs`` has no batch axis or ``chunk_size <= 0``.
    """
    name = "collect_activations"
    _check_batch(name, xs)
    if chunk_size is not None:
        check_positive(name, "chunk_size", chunk_size, integer=True)

    def one(x: Any) -> tuple[Array, ...]:
        f = sectioned.input_layer(x)
        if dtype is not None:
            f = f.astype(dtype)
        out = [f]
        for k in range(len(sectioned.sections)):
            f = sectioned.section_fn(k)(f)
            out.append(f)
        return tuple(out)

    if chunk_size is None:
        return jax.vmap(one)(xs)
    return jax.lax.map(one, xs, batch_size=int(chunk_size))


def cached_inputs(model: Any, xs: Any, names: Sequence[str]) -> dict[str, Array]:
    """Inputs of the weights at keypaths ``names``, read from ``model.forward_with_cache``.

    The toy models record, per weight keypath, the (input, pre-bias output) of its
    matrix product; the input of a layer's weight is the node layer "input of that
    layer". Nothing is wrapped or mutated.

    Args:
        model: a model with ``forward_with_cache(x) -> (y, {keypath: (input, output)})``.
        xs: inputs, ``(batch, *in)``.
        names: weight keypaths, e.g. ``[".layers[0].weight"]``.

    Returns:
        ``{name: (batch, *input_shape)}``.

    Raises:
        ValueError: if the model has no ``forward_with_cache`` or a name is not cached.
    """
    fn = "cached_inputs"
    if not callable(getattr(model, "forward_with_cache", None)):
        raise fail(fn, "model", "a model with forward_with_cache", type(model).__name__)
    _check_batch(fn, xs)
    x0 = jax.tree_util.tree_map(lambda a: a[0], xs)
    avail = jax.eval_shape(lambda x: model.forward_with_cache(x)[1], x0)
    for n in names:
        if n not in avail:
            raise fail(fn, "names", "cached weight keypaths (" + ", ".join(avail) + ")", repr(n))
    return jax.vmap(lambda x: {n: model.forward_with_cache(x)[1][n][0] for n in names})(xs)
