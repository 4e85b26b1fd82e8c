"""Cutting zoo targets into channel blocks (spec section 1).

| target | mode | blocks |
|---|---|---|
| ``planted-channels`` | residual | A1, B1, A2, B2 |
| ``block-mlp`` | sequential | each linear layer with its activation |
| ``tms-*`` | sequential | encoder ``x -> h``, decoder ``h -> x_hat`` |
| ``resid-mlp-*`` | residual | each layer's MLP (``embed = W_E``, ``unembed = W_E^T``) |
| ``induction`` | residual | each attention head ``L{layer}H{head}`` (``unembed``: last position) |
| ``modadd`` | residual | heads ``L0H{h}`` (depth 0) and the MLP ``.blocks[0].mlp`` (depth 1) |

Residual MLPs are cut in coordinates of the span of their writes by default (exact; see
:func:`resid_mlp_model`). Attention heads are linearised ``full`` (the Jacobian includes
the QK path) or with a ``frozen_pattern``: the pattern is computed from ``stop_gradient``
of the stream, so the head's value is unchanged and every JVP/VJP holds the pattern at
its value at the point of linearisation (the head is linear in the stream through OV). ``qk`` is the
complement (values from ``stop_gradient``: derivatives move the pattern only), so edges
measure what a writer does through the head's QK read; ``full = frozen_pattern + qk``
for every JVP. ``qk`` splits further into ``q`` (only the queries move: Q-composition)
and ``k`` (only the keys move: K-composition), ``qk = q + k``. Values (and so
compression, ablation and usage) are the same in all five.

Every block is a :class:`Part`: a static function of (parameters, stream) together with
its parameters, so it is a pytree and a pure function of ONE example's stream.

References:
    specs/channel-graph.md section 1 (project method).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_in, fail
from .._types import Array
from .model import ChannelModel

__all__ = ["ATTENTION", "STREAMS", "Part", "attention_model", "channel_model_for", "head_name",
           "modadd_model", "resid_mlp_model", "resid_stream_basis"]

ATTENTION = ("full", "frozen_pattern", "qk", "q", "k")
# which of a head's reads move under each linearisation: head_forward's frozen flags
_FROZEN = {"full": {}, "frozen_pattern": {"frozen_pattern": True},
           "qk": {"frozen_values": True},
           "q": {"frozen_values": True, "frozen_keys": True},
           "k": {"frozen_values": True, "frozen_queries": True}}


class Part(eqx.Module):
    """``fn(params, r)``: a block (or embed/unembed) as a pytree with a static function."""

    params: Any
    fn: Callable[[Any, Array], Array] = eqx.field(static=True)

    def __call__(self, r: Any) -> Array:
        return self.fn(self.params, r)


def _row(x: Array) -> Array:
    return x[None, :]


def _ident(_: Any, r: Array) -> Array:
    return r


# --- planted-channels -----------------------------------------------------------------
def _planted_embed(m: Any, x: Array) -> Array:
    return _row(m.embed(x))


def _planted_unembed(m: Any, r: Array) -> Array:
    return m.unembed(r)


def _pb(name: str) -> Callable[[Any, Array], Array]:
    def f(m: Any, r: Array) -> Array:
        return m.block_fn(name, r)

    f.__name__ = f"planted_{name}"
    return f


_PLANTED_FNS = {n: _pb(n) for n in ("A1", "B1", "A2", "B2")}


def planted_model(model: Any) -> ChannelModel:
    from ..models.planted import BLOCKS

    m = model.to_float64() if jax.config.jax_enable_x64 else model
    return ChannelModel(
        embed=Part(m, _planted_embed),
        blocks=tuple(Part(m, _PLANTED_FNS[n]) for n in BLOCKS),
        unembed=Part(m, _planted_unembed),
        names=BLOCKS,
        depths=(0, 1, 2, 3),
        mode="residual",
        output="regression",
    )


# --- sequential MLPs ------------------------------------------------------------------
def _embed_row(_: Any, x: Array) -> Array:
    return _row(x)


def _dense_relu(p: Any, r: Array) -> Array:
    return jax.nn.relu(r @ p[0] + p[1][None, :])


def _dense_linear(p: Any, r: Array) -> Array:
    return r @ p[0] + p[1][None, :]


def block_mlp_model(model: Any, output: str = "regression") -> ChannelModel:
    """Each dense layer of an MLP (``.layers[i].weight, .bias``; ``block-mlp``,
    ``digits-mlp``) as a sequential block; ReLU after every layer but the last unless
    ``model.activation`` says ``identity``."""
    n = len(model.layers)
    act = _dense_relu if getattr(model, "activation", "relu") == "relu" else _dense_linear
    blocks = tuple(
        Part((lay.weight, lay.bias), act if i < n - 1 else _dense_linear)
        for i, lay in enumerate(model.layers)
    )
    return ChannelModel(
        embed=Part(None, _embed_row), blocks=blocks, unembed=Part(None, _ident),
        names=tuple(f".layers[{i}]" for i in range(n)), depths=tuple(range(n)),
        mode="sequential", output=output)


def _tms_encode(w: Any, r: Array) -> Array:
    return r @ w


def _tms_decode(p: Any, r: Array) -> Array:
    return jax.nn.relu(r @ p[0].T + p[1][None, :])


def tms_model(model: Any) -> ChannelModel:
    w = model.W_enc
    return ChannelModel(
        embed=Part(None, _embed_row),
        blocks=(Part(w, _tms_encode), Part((w, model.b), _tms_decode)),
        unembed=Part(None, _ident), names=("encoder", "decoder"), depths=(0, 1),
        mode="sequential", output="regression")


# --- residual MLPs --------------------------------------------------------------------
STREAMS = ("span", "full")


def resid_stream_basis(model: Any) -> np.ndarray:
    """``Q: (d_resid, k)``, float64 orthonormal columns spanning every write to the
    stream of a residual MLP: the rows of ``W_E`` and of each layer's ``mlp_out``
    (singular values above ``1e-10`` of the largest), so ``r = (r Q) Q^T`` for every
    stream state."""
    ws = [np.asarray(model.W_E, np.float64)]
    ws += [np.asarray(lay.mlp_out, np.float64) for lay in model.layers]
    u, s, _ = np.linalg.svd(np.concatenate(ws, axis=0).T, full_matrices=False)
    return u[:, s > 1e-10 * s.max(initial=0.0)]


def _resid_embed(w: Any, x: Array) -> Array:
    return _row(x @ w)


def _resid_unembed(w: Any, r: Array) -> Array:
    return r @ w.T


def _resid_mlp(p: Any, r: Array) -> Array:
    return jax.nn.relu(r @ p[0]) @ p[1]


def resid_mlp_model(model: Any, stream: str = "span") -> ChannelModel:
    """Each layer's MLP as a block of a :class:`~jaxinterp.models.resid_mlp.ResidMLP`
    (every layer at its own depth, so layer ``l`` reads ``embed`` and the MLPs before it).

    Args:
        model: the residual MLP.
        stream: coordinates of the stream. ``full``: the ``d_resid`` coordinates.
            ``span`` (default): ``r Q`` with ``Q`` = :func:`resid_stream_basis` (``k = F +
            n_neurons`` columns, 150 instead of 1000 for the zoo targets). The stream never
            leaves ``span Q``, so the cut computes the same function (``W_E -> W_E Q``,
            ``mlp_in -> Q^T mlp_in``, ``mlp_out -> mlp_out Q``) and every spectrum, E3/E4
            edge, activity and compression ``Delta D`` is that of the ``full`` cut; channel
            vectors map back by ``Q``. What changes: E1's random-subspace null (``max(r_a,
            r_b) / k``) and the stream rotation null (rotations within ``span Q``), and
            the cost (the float64 ``(d, d)`` statistics shrink by ``(1000 / 150)^2``).

    Raises:
        ValueError: for an unknown ``stream``.
    """
    check_in("resid_mlp_model", "stream", stream, STREAMS)
    n = len(model.layers)
    dtype = jnp.float64 if jax.config.jax_enable_x64 else model.W_E.dtype
    if stream == "full":
        w_e = model.W_E
        mlps = [(lay.mlp_in, lay.mlp_out) for lay in model.layers]
    else:
        q = resid_stream_basis(model)
        w_e = jnp.asarray(np.asarray(model.W_E, np.float64) @ q, dtype)
        mlps = [(jnp.asarray(q.T @ np.asarray(lay.mlp_in, np.float64), dtype),
                 jnp.asarray(np.asarray(lay.mlp_out, np.float64) @ q, dtype))
                for lay in model.layers]
    return ChannelModel(
        embed=Part(w_e, _resid_embed),
        blocks=tuple(Part(p, _resid_mlp) for p in mlps),
        unembed=Part(w_e, _resid_unembed),
        names=tuple(f".layers[{i}]" for i in range(n)), depths=tuple(range(n)),
        mode="residual", output="regression")


# --- attention-only transformers (induction) ------------------------------------------
def _token_embed(w: Any, tokens: Array) -> Array:
    return w[tokens]


def _last_unembed(w: Any, r: Array) -> Array:
    return r[-1:] @ w


def _head(p: Any, r: Array, attention: str) -> Array:
    from ..models.induction import head_forward

    return head_forward(*p, r, **_FROZEN[attention])["out"]


# one stable function object per linearisation (block functions are static pytree fields)
_HEADS = {a: functools.partial(_head, attention=a) for a in ATTENTION}


def head_name(layer: int, head: int) -> str:
    """Block name of a head: ``L{layer}H{head}``."""
    return f"L{layer}H{head}"


def attention_model(model: Any, attention: str = "full") -> ChannelModel:
    """Heads as blocks of an :class:`~jaxinterp.models.induction.InductionTransformer`:
    each head is ``(W_Q[h], W_K[h], W_V[h], W_O[h], positions)``, a function of the
    stream ``(P, d_model) -> (P, d_model)``; heads of one layer read the same stream
    (equal depth). ``unembed`` reads the last position only (the trained prediction), so
    the output is ``(1, vocab)`` logits (``softmax``)."""
    check_in("attention_model", "attention", attention, ATTENTION)
    dtype = jnp.float64 if jax.config.jax_enable_x64 else model.W_E.dtype
    from ..models.induction import sinusoidal_positions

    pos = sinusoidal_positions(model.n_ctx, model.W_E.shape[1], dtype)
    fn = _HEADS[attention]
    blocks, names, depths = [], [], []
    for i, at in enumerate(model.layers):
        for h in range(at.W_Q.shape[0]):
            blocks.append(Part((at.W_Q[h], at.W_K[h], at.W_V[h], at.W_O[h], pos), fn))
            names.append(head_name(i, h))
            depths.append(i)
    return ChannelModel(embed=Part(model.W_E, _token_embed), blocks=tuple(blocks),
                        unembed=Part(model.W_U, _last_unembed), names=tuple(names),
                        depths=tuple(depths), mode="residual", output="softmax")


# --- one-layer transformer with biases (modadd) -------------------------------------
def _modadd_head(p: Any, r: Array, attention: str) -> Array:
    """:func:`~jaxinterp.models.induction.head_forward` with the head's biases; positions
    are part of ``embed``'s write here, so none are added to Q and K."""
    from ..models.induction import head_forward

    w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o = p
    out = head_forward(w_q, w_k, w_v, w_o, 0.0, r, bias=(b_q, b_k, b_v),
                       **_FROZEN[attention])["out"]
    return out + b_o[None, :]


_MODADD_HEADS = {a: functools.partial(_modadd_head, attention=a) for a in ATTENTION}


def _modadd_embed(p: Any, tokens: Array) -> Array:
    return p[0][tokens] + p[1][: tokens.shape[0]]


def _modadd_mlp(p: Any, r: Array) -> Array:
    return jax.nn.relu(r @ p[0] + p[1][None, :]) @ p[2] + p[3][None, :]


def _modadd_unembed(p: Any, r: Array) -> Array:
    return r[-1:] @ p[0] + p[1][None, :]


def modadd_model(model: Any, attention: str = "full") -> ChannelModel:
    """A one-layer :class:`~jaxinterp.models.modadd.ModAddTransformer` cut into its heads
    ``L0H{h}`` (depth 0: ``W_Q[h], W_K[h], W_V[h], W_O[h]``, the head's ``b_Q, b_K, b_V``
    and ``b_O / n_heads``) and its MLP ``.blocks[0].mlp`` (depth 1: ``W_in, b_in, W_out,
    b_out``). ``embed`` writes ``W_E[tokens] + W_pos``; ``unembed`` reads the last
    position (``(1, vocab)`` logits with ``b_U``, ``softmax``). Heads run the induction
    cut's :func:`~jaxinterp.models.induction.head_forward` with biases and without
    positions, with the same ``attention`` options.

    Raises:
        ValueError: for a model that is not a one-layer ``ModAddTransformer``, or an
            unknown ``attention``.
    """
    from ..models.modadd import ModAddTransformer

    check_in("modadd_model", "attention", attention, ATTENTION)
    if not isinstance(model, ModAddTransformer) or len(model.blocks) != 1:
        got = (f"{len(model.blocks)} blocks" if isinstance(model, ModAddTransformer)
               else type(model).__name__)
        raise fail("modadd_model", "model", "a one-layer ModAddTransformer (the modadd "
                   "channel cut)", got)
    at, mlp = model.blocks[0].attn, model.blocks[0].mlp
    n_heads = at.W_Q.shape[0]
    fn = _MODADD_HEADS[attention]
    heads = tuple(Part((at.W_Q[h], at.W_K[h], at.W_V[h], at.W_O[h], at.b_Q[h], at.b_K[h],
                        at.b_V[h], at.b_O / n_heads), fn) for h in range(n_heads))
    return ChannelModel(
        embed=Part((model.embed.W_E, model.pos_embed.W_pos), _modadd_embed),
        blocks=(*heads, Part((mlp.W_in, mlp.b_in, mlp.W_out, mlp.b_out), _modadd_mlp)),
        unembed=Part((model.W_U, model.b_U), _modadd_unembed),
        names=(*(head_name(0, h) for h in range(n_heads)), ".blocks[0].mlp"),
        depths=(0,) * n_heads + (1,), mode="residual", output="softmax")


# --- dispatch -------------------------------------------------------------------------
def channel_model_for(name: str, model: Any, *, attention: str = "full",
                      stream: str | None = None) -> ChannelModel:
    """The :class:`ChannelModel` of a zoo target (call inside an x64 context for a
    float64 model).

    Args:
        name: the registered target name.
        model: its model.
        attention: ``full``, ``frozen_pattern`` (OV only), ``qk`` (pattern only), ``q``
            or ``k`` (pattern through the queries or the keys only) linearisation of
            attention heads.
        stream: ``span`` or ``full`` stream coordinates of ``resid-mlp-*`` (see
            :func:`resid_mlp_model`; ``None``: ``span``); other targets take ``None``.

    Raises:
        ValueError: for a target without a channel cut, an unknown ``attention``, or a
            ``stream`` for a target other than ``resid-mlp-*``.
    """
    check_in("channel_model_for", "attention", attention, ATTENTION)
    if stream is not None:
        check_in("channel_model_for", "stream", stream, STREAMS)
        if not name.startswith("resid-mlp-"):
            raise fail("channel_model_for", "stream", "None for a target other than "
                       "resid-mlp-*", repr(stream))
    if name == "planted-channels":
        return planted_model(model)
    if name == "block-mlp":
        return block_mlp_model(model)
    if name == "digits-mlp":
        return block_mlp_model(model, output="softmax")
    if name.startswith("tms-") and not name.endswith("-id"):
        return tms_model(model)
    if name.startswith("resid-mlp-"):
        return resid_mlp_model(model, stream or "span")
    if name == "induction":
        return attention_model(model, attention)
    if name == "modadd":
        return modadd_model(model, attention)
    raise fail("channel_model_for", "name", "a target with a channel cut (planted-channels, "
               "block-mlp, digits-mlp, tms-5-2, tms-40-10, resid-mlp-*, induction, modadd)",
               repr(name))


def as_float(xs: Any) -> Any:
    """Float inputs as float64 (inside an x64 context); integer inputs unchanged."""
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype,
                                                                jnp.floating)
        else jnp.asarray(a), xs)
