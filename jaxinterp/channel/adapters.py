"""Cutting zoo targets into channel blocks (spec section 1).

| target | mode | blocks |
|---|---|---|
| ``planted-channels`` | residual | A1, B1, A2, B2 |
| ``block-mlp`` | sequential | each linear layer with its activation |
| ``tms-*`` | sequential | encoder ``x -> h``, decoder ``h -> x_hat`` |
| ``resid-mlp-*`` | residual | each layer's MLP (``embed = W_E``, ``unembed = W_E^T``) |
| ``induction`` | residual | each attention head ``L{layer}H{head}`` (``unembed``: last position) |

Attention heads are linearised ``full`` (the Jacobian includes the QK path) or with a
``frozen_pattern``: the pattern is computed from ``stop_gradient`` of the stream, so the
head's value is unchanged and every JVP/VJP holds the pattern at its value at the point
of linearisation (the head is linear in the stream through OV). ``qk`` is the
complement (values from ``stop_gradient``: derivatives move the pattern only), so edges
measure what a writer does through the head's QK read; ``full = frozen_pattern + qk``
for every JVP. Values (and so compression, ablation and usage) are the same in all three.

Every block is a :class:`Part`: a static function of (parameters, stream) together with
its parameters, so it is a pytree and a pure function of ONE example's stream.

References:
    specs/channel-graph.md section 1 (project method).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .._checks import check_in, fail
from .._types import Array
from .model import ChannelModel

__all__ = ["ATTENTION", "Part", "attention_model", "channel_model_for", "head_name"]

ATTENTION = ("full", "frozen_pattern", "qk")


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


def block_mlp_model(model: Any) -> ChannelModel:
    n = len(model.layers)
    act = _dense_relu if model.activation == "relu" else _dense_linear
    blocks = tuple(
        Part((lay.weight, lay.bias), act if i < n - 1 else _dense_linear)
        for i, lay in enumerate(model.layers)
    )
    return ChannelModel(
        embed=Part(None, _embed_row), blocks=blocks, unembed=Part(None, _ident),
        names=tuple(f".layers[{i}]" for i in range(n)), depths=tuple(range(n)),
        mode="sequential", output="regression")


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
def _resid_embed(w: Any, x: Array) -> Array:
    return _row(x @ w)


def _resid_unembed(w: Any, r: Array) -> Array:
    return r @ w.T


def _resid_mlp(p: Any, r: Array) -> Array:
    return jax.nn.relu(r @ p[0]) @ p[1]


def resid_mlp_model(model: Any) -> ChannelModel:
    n = len(model.layers)
    return ChannelModel(
        embed=Part(model.W_E, _resid_embed),
        blocks=tuple(Part((lay.mlp_in, lay.mlp_out), _resid_mlp) for lay in model.layers),
        unembed=Part(model.W_E, _resid_unembed),
        names=tuple(f".layers[{i}]" for i in range(n)), depths=tuple(range(n)),
        mode="residual", output="regression")


# --- attention-only transformers (induction) ------------------------------------------
def _token_embed(w: Any, tokens: Array) -> Array:
    return w[tokens]


def _last_unembed(w: Any, r: Array) -> Array:
    return r[-1:] @ w


def _head_full(p: Any, r: Array) -> Array:
    from ..models.induction import head_forward

    return head_forward(*p, r)["out"]


def _head_frozen(p: Any, r: Array) -> Array:
    from ..models.induction import head_forward

    return head_forward(*p, r, frozen_pattern=True)["out"]


def _head_qk(p: Any, r: Array) -> Array:
    from ..models.induction import head_forward

    return head_forward(*p, r, frozen_values=True)["out"]


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
    fn = {"full": _head_full, "frozen_pattern": _head_frozen, "qk": _head_qk}[attention]
    blocks, names, depths = [], [], []
    for i, at in enumerate(model.layers):
        for h in range(at.W_Q.shape[0]):
            blocks.append(Part((at.W_Q[h], at.W_K[h], at.W_V[h], at.W_O[h], pos), fn))
            names.append(head_name(i, h))
            depths.append(i)
    return ChannelModel(embed=Part(model.W_E, _token_embed), blocks=tuple(blocks),
                        unembed=Part(model.W_U, _last_unembed), names=tuple(names),
                        depths=tuple(depths), mode="residual", output="softmax")


# --- dispatch -------------------------------------------------------------------------
def channel_model_for(name: str, model: Any, *, attention: str = "full") -> ChannelModel:
    """The :class:`ChannelModel` of a zoo target (call inside an x64 context for a
    float64 model).

    Args:
        name: the registered target name.
        model: its model.
        attention: ``full``, ``frozen_pattern`` (OV only) or ``qk`` (pattern only)
            linearisation of attention heads.

    Raises:
        ValueError: for a target without a channel cut, or an unknown ``attention``.
    """
    check_in("channel_model_for", "attention", attention, ATTENTION)
    if name == "planted-channels":
        return planted_model(model)
    if name == "block-mlp":
        return block_mlp_model(model)
    if name.startswith("tms-") and not name.endswith("-id"):
        return tms_model(model)
    if name.startswith("resid-mlp-"):
        return resid_mlp_model(model)
    if name == "induction":
        return attention_model(model, attention)
    raise fail("channel_model_for", "name", "a target with a channel cut (planted-channels, "
               "block-mlp, tms-5-2, tms-40-10, resid-mlp-*, induction)", repr(name))


def as_float(xs: Any) -> Any:
    """Float inputs as float64 (inside an x64 context); integer inputs unchanged."""
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype,
                                                                jnp.floating)
        else jnp.asarray(a), xs)
