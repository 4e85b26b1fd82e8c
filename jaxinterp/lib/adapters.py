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
from .sections import (
    ACTIVATIONS,
    AbstractSection,
    DenseSection,
    HiddenLayerFactors,
    Sectioned,
    StructuredJacobian,
    fold_readout,
)

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

    def features(self, h, c, C, *, last):
        """``[h_last + sum_k pattern_k v_k W_O + c b_O, c] @ C`` with ``W_V W_O C`` per head
        contracted first: a tangent of ``h`` then reaches the output through one
        example-independent product and the attention pattern (no ``W_O`` per example)."""
        at, dt = self.attn, h.dtype
        d = at.W_O.shape[-1]
        cc = c[:, None, None]
        q = jnp.einsum("d,hde->he", h[-1], at.W_Q) + c[-1] * at.b_Q
        k = jnp.einsum("pd,hde->phe", h, at.W_K) + cc * at.b_K[None]
        pattern = jax.nn.softmax(jnp.einsum("he,khe->hk", q, k) / at.W_Q.shape[-1] ** 0.5, axis=-1)
        c_out = jnp.asarray(C[:d], dt)
        w_o = jnp.einsum("hed,dm->hem", jnp.asarray(at.W_O, dt), c_out)  # (H, e, m)
        vc = jnp.einsum("hde,hem->hdm", jnp.asarray(at.W_V, dt), w_o)
        bvc = jnp.einsum("he,hem->hm", jnp.asarray(at.b_V, dt), w_o)
        hv = jnp.einsum("pd,hdm->phm", h, vc) + c[:, None, None] * bvc[None]  # (P, H, m)
        out = h[-1] @ c_out + jnp.einsum("hp,phm->m", pattern, hv)
        out = out + c[-1] * (jnp.asarray(at.b_O, dt) @ c_out)
        if not last:
            out = out + c[-1] * jnp.asarray(C[d], dt)
        return out[None, :]

    def structured_jacobian(self, h, c, C, *, last):
        """``d features / d y_s = sum_h pattern[h, s] K_h + [s = last] K_const + sum_{h,p}
        g[s, (h, p)] u_(h, p)`` for the folded input rows ``y_s = [h_s, c_s]``:

        * value paths ``K_h = V_h W_O^h C`` (``V_h = [W_V^h; b_V^h]``);
        * residual and biases ``K_const = [C; b_O C + C_c]``;
        * the scores ``sigma_hp = q_h . k_hp / sqrt(e)`` move the output by
          ``sum_p d sigma_hp u_hp`` with ``u_hp = pattern_hp (v_hp - z_h) W_O^h C``
          (softmax), and ``d sigma_hp = dy_last . g_q + dy_p . g_k`` with
          ``g_q = Q_h k_hp / sqrt(e)``, ``g_k = K_h q_h / sqrt(e)``.
        """
        at, dt = self.attn, h.dtype
        d, e = at.W_O.shape[-1], at.W_Q.shape[-1]
        p_in = h.shape[0]
        c_out = jnp.asarray(C[:d], dt)

        def folded(w: Array, b: Array) -> Array:  # (H, d + 1, e): bias as the last row
            return jnp.concatenate([jnp.asarray(w, dt), jnp.asarray(b, dt)[:, None, :]], axis=1)

        wq, wk, wv = folded(at.W_Q, at.b_Q), folded(at.W_K, at.b_K), folded(at.W_V, at.b_V)
        y = jnp.concatenate([h, c[:, None].astype(dt)], axis=1)  # (P, d + 1)
        q = jnp.einsum("i,hie->he", y[-1], wq)
        k = jnp.einsum("pi,hie->phe", y, wk)
        v = jnp.einsum("pi,hie->phe", y, wv)
        pattern = jax.nn.softmax(jnp.einsum("he,phe->hp", q, k) / e**0.5, axis=-1)  # (H, P)
        z = jnp.einsum("hp,phe->he", pattern, v)
        w_oc = jnp.einsum("hed,dm->hem", jnp.asarray(at.W_O, dt), c_out)  # (H, e, m)
        k_heads = jnp.einsum("hie,hem->him", wv, w_oc)  # (H, d + 1, m)
        b_o = jnp.asarray(at.b_O, dt) @ c_out
        k_const = jnp.concatenate([c_out, (b_o if last else b_o + C[d])[None]], axis=0)
        is_last = (jnp.arange(p_in) == p_in - 1).astype(dt)
        coef = jnp.concatenate([pattern.T, is_last[:, None]], axis=1)  # (P, H + 1)
        u = jnp.einsum("hp,phe,hem->hpm", pattern, v - z[None], w_oc)  # (H, P, m)
        g_q = jnp.einsum("hie,phe->hpi", wq, k) / e**0.5  # query path, at the last position
        g_k = jnp.einsum("hie,he->hi", wk, q) / e**0.5  # key path, at position p
        g = is_last[:, None, None, None] * g_q[None] + (
            jnp.eye(p_in, dtype=dt)[:, None, :, None] * g_k[None, :, None, :]
        )  # (P_in, H, P, d + 1)
        n_heads = pattern.shape[0]
        return StructuredJacobian(
            coef=coef,
            K=jnp.concatenate([k_heads, k_const[None]], axis=0),
            g=g.reshape(p_in, n_heads * p_in, d + 1),
            u=u.reshape(n_heads * p_in, -1),
        )


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

    def hidden_layer_factors(self, C, *, last, dtype):
        d = self.W_out.shape[1]
        C = jnp.asarray(C, dtype)
        b_out = jnp.asarray(self.b_out, dtype) @ C[:d]
        e = jnp.concatenate([C[:d], (b_out if last else b_out + C[d])[None]], axis=0)
        a = jnp.concatenate([jnp.asarray(self.W_in, dtype), jnp.asarray(self.b_in, dtype)[None]])
        return HiddenLayerFactors(
            E=e, A=a, B=jnp.asarray(self.W_out, dtype) @ C[:d], activation="relu"
        )

    def features(self, h, c, C, *, last):
        """``[h + ReLU(.) W_out + c b_out, c] @ C`` with ``W_out C`` contracted first."""
        d = self.W_out.shape[1]
        cc = c[:, None]
        post = jax.nn.relu(h @ self.W_in + cc * self.b_in[None])
        wc, bc = fold_readout(self.W_out, self.b_out, C[:d], h.dtype)
        out = h @ jnp.asarray(C[:d], h.dtype) + post @ wc + cc * bc[None]
        return out if last else out + cc * jnp.asarray(C[d], h.dtype)[None]


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
