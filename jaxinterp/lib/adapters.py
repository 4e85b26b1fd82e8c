"""Cutting the toy targets into sections: MLPs (``block-mlp``, ``digits-mlp`` and any
module with ``.layers[i].weight / .bias``) and the modular-addition transformer.

Node-layer names are keypaths where one exists: the input of an MLP layer is named by
its weight, ``.layers[i].weight`` (the key of ``forward_with_cache``); the output is
``output``. The transformer's node layers are ``resid_pre`` (embeddings, 3 positions),
``resid_mid`` (after attention, last position only), ``resid_post`` (after the MLP) and
``output`` (logits), as in the LIB spec.

References:
    Bushnaq et al. (2024), "The Local Interaction Basis" (arXiv 2405.10928), node
    layers of the MLP and modular-addition experiments; Nanda et al. (2023), "Progress
    measures for grokking via mechanistic interpretability" (arXiv 2301.05217).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .._checks import fail
from .._types import Array
from ..models.modadd import Attention, ModAddTransformer
from .sections import ACTIVATIONS, AbstractSection, DenseSection, Sectioned

__all__ = [
    "ModAddAttentionSection",
    "ResidualMLPSection",
    "mlp_sections",
    "modadd_sections",
    "sections_for",
]

OUTPUT = "output"


class _Rows(eqx.Module):
    """``pre`` of an MLP: ``x -> x[None]`` through the layers before the first node layer."""

    section: DenseSection | None

    def __call__(self, x: Array) -> Array:
        h = x[None, :]
        if self.section is None:
            return h
        return self.section(h, jnp.ones((1,), h.dtype))[0]


def mlp_sections(model: Any, node_layers: Sequence[str] | None = None) -> Sectioned:
    """An MLP cut at the inputs of chosen layers.

    The model must have ``.layers[i].weight: (d_in, d_out)`` and ``.bias: (d_out,)``, an
    activation after every layer but the last (``model.activation`` if it exists, else
    ReLU), and take one example ``(d_in,)``.

    Args:
        model: e.g. :class:`~jaxinterp.models.block_mlp.BlockMLP` or
            :class:`~jaxinterp.models.digits.DigitsMLP`.
        node_layers: weight keypaths ``.layers[i].weight`` whose inputs are node layers,
            in forward order; default: every layer. ``output`` is always appended.

    Returns:
        A :class:`Sectioned` with ``P = 1`` everywhere.

    Raises:
        ValueError: on a model without ``.layers`` of dense layers, an unknown
            activation, or node-layer names that are unknown or out of order.
    """
    fn = "mlp_sections"
    layers = getattr(model, "layers", None)
    if not layers or not all(hasattr(la, "weight") and hasattr(la, "bias") for la in layers):
        raise fail(fn, "model", "a module with .layers[i].weight and .bias", type(model).__name__)
    act = getattr(model, "activation", "relu")
    if act not in ACTIVATIONS:
        raise fail(fn, "model.activation", "one of " + ", ".join(ACTIVATIONS), repr(act))
    n = len(layers)
    avail = [f".layers[{i}].weight" for i in range(n)]
    names = list(avail if node_layers is None else node_layers)
    idx = []
    for name in names:
        if name not in avail:
            raise fail(fn, "node_layers", "weight keypaths among " + ", ".join(avail), repr(name))
        idx.append(avail.index(name))
    if not idx or idx != sorted(set(idx)):
        raise fail(fn, "node_layers", "at least one name, in forward order, no repeats", names)
    acts = tuple(act if i < n - 1 else "identity" for i in range(n))

    def dense(a: int, b: int) -> DenseSection:
        return DenseSection(
            tuple(la.weight for la in layers[a:b]), tuple(la.bias for la in layers[a:b]), acts[a:b]
        )

    pre = _Rows(dense(0, idx[0]) if idx[0] else None)
    bounds = [*idx, n]
    sections = tuple(dense(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    return Sectioned(pre=pre, sections=sections, names=(*names, OUTPUT))


class _Embed(eqx.Module):
    """Token and positional embeddings: ``tokens (3,) -> resid (3, d_model)``."""

    W_E: Array
    W_pos: Array

    def __call__(self, tokens: Array) -> Array:
        one_hot = jax.nn.one_hot(tokens, self.W_E.shape[0], dtype=self.W_E.dtype)
        return one_hot @ self.W_E + self.W_pos


class ModAddAttentionSection(AbstractSection):
    """``resid_pre (3, d) -> resid_mid (1, d)``: causal attention read at the last
    position, plus the residual. ``b_Q``, ``b_K``, ``b_V`` are scaled by the constant
    coordinate of the position they are added at, ``b_O`` by the last position's; the
    output's constant coordinate is the last position's."""

    attn: Attention

    def __call__(self, h, c):
        at = self.attn
        cc = c[:, None, None]
        q = jnp.einsum("d,hde->he", h[-1], at.W_Q) + c[-1] * at.b_Q
        k = jnp.einsum("pd,hde->phe", h, at.W_K) + cc * at.b_K[None]
        v = jnp.einsum("pd,hde->phe", h, at.W_V) + cc * at.b_V[None]
        scores = jnp.einsum("he,khe->hk", q, k) / at.W_Q.shape[-1] ** 0.5
        pattern = jax.nn.softmax(scores, axis=-1)  # the last query sees every position
        z = jnp.einsum("hk,khe->he", pattern, v)
        out = jnp.einsum("he,hed->d", z, at.W_O) + c[-1] * at.b_O
        return (h[-1] + out)[None, :], c[-1:]


class ResidualMLPSection(AbstractSection):
    """``resid_mid -> resid_post``: ``h + ReLU(h W_in + c b_in) W_out + c b_out``."""

    W_in: Array
    b_in: Array
    W_out: Array
    b_out: Array

    def __call__(self, h, c):
        cc = c[:, None]
        post = jax.nn.relu(h @ self.W_in + cc * self.b_in[None])
        return h + post @ self.W_out + cc * self.b_out[None], c


def modadd_sections(model: ModAddTransformer) -> Sectioned:
    """The one-layer modular-addition transformer cut at ``resid_pre``, ``resid_mid``,
    ``resid_post`` and ``output`` (the last position's logits, ``(1, vocab)``).

    Raises:
        ValueError: if ``model`` is not a one-layer :class:`ModAddTransformer`.
    """
    if not isinstance(model, ModAddTransformer) or len(model.blocks) != 1:
        raise fail(
            "modadd_sections", "model", "a one-layer ModAddTransformer", type(model).__name__
        )
    block = model.blocks[0]
    mlp = block.mlp
    sections = (
        ModAddAttentionSection(block.attn),
        ResidualMLPSection(mlp.W_in, mlp.b_in, mlp.W_out, mlp.b_out),
        DenseSection((model.W_U,), (model.b_U,), ("identity",)),
    )
    return Sectioned(
        pre=_Embed(model.embed.W_E, model.pos_embed.W_pos),
        sections=sections,
        names=("resid_pre", "resid_mid", "resid_post", OUTPUT),
    )


def sections_for(model: Any, node_layers: Sequence[str] | None = None) -> Sectioned:
    """The default cut of a toy target (:func:`modadd_sections` or :func:`mlp_sections`).

    Raises:
        ValueError: for a model with no default cut (build a :class:`Sectioned` yourself).
    """
    if isinstance(model, ModAddTransformer):
        if node_layers is not None:
            raise fail(
                "sections_for", "node_layers", "None for the modadd transformer", node_layers
            )
        return modadd_sections(model)
    if getattr(model, "layers", None):
        return mlp_sections(model, node_layers)
    raise fail(
        "sections_for",
        "model",
        "a ModAddTransformer or an MLP with .layers",
        type(model).__name__,
        "Build a Sectioned(pre, sections, names) yourself.",
    )
