"""L3D subnetworks: an untied Tucker encoder and decoder per decomposed tensor, BatchTopK
coefficients, the pooled fraction-of-unexplained-variance loss and the post-step decoder
normalisation (``specs/l3d.md`` sections 3 and 4).

For a batch of per-sample gradients ``g_b`` (a dict over tensors ``t``):

    c[b, k] = sum_t <v^enc_{k,t}, g_{b,t}>            (coefficients)
    m       = BatchTopK(|c|)                          (stop-gradient mask)
    ĝ_{b,t} = sum_k m[b,k] c[b,k] v^dec_{k,t}         (reconstruction)
    L       = sum_b sum_t ||g - ĝ||^2 / sum_b sum_t ||g||^2

References:
    Chrisman, Bushnaq, Sharkey 2025, "Identifying Sparsely Active Circuits Through Local
    Loss Landscape Decomposition" (arXiv 2504.00194).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp

from ... import tree
from ..._checks import check_in, check_positive, fail
from ..._types import Array, Float, Key
from .gradients import Ghost, Grads, gradient_sq_norms
from .tucker import Tucker, gram, init_tucker, inner_dense, inner_ghost, materialize, rescale
from .tucker import sq_norms as tucker_sq_norms

__all__ = ["Subnetworks", "LOSSES", "resolve_ranks", "init_subnetworks", "coefficients",
           "topk_count", "batch_topk_mask", "reconstruct", "l3d_loss", "decoder_norms",
           "normalize_decoder", "directions"]

LOSSES = ("fvu", "ratio")


class Subnetworks(eqx.Module):
    """``n_v`` subnetworks: encoder and decoder directions per decomposed tensor.

    Attributes:
        enc: ``{name: Tucker}`` encoder (never normalised; it absorbs scale).
        dec: ``{name: Tucker}`` decoder (unit global norm per subnetwork after each step).
    """

    enc: dict[str, Tucker]
    dec: dict[str, Tucker]

    def __check_init__(self):
        if set(self.enc) != set(self.dec):
            raise fail("Subnetworks", "enc", f"the decoder's tensors {sorted(self.dec)}",
                       sorted(self.enc))

    @property
    def n_v(self) -> int:
        return next(iter(self.dec.values())).n_v


def resolve_ranks(fn: str, ranks: int | Mapping[str, int | Sequence[int]],
                  shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Tucker ranks per tensor: one int for every mode of every tensor, or
    ``{name_or_glob: int | per-mode tuple}`` where every tensor matches exactly one rule
    (an int applies to every mode). Ranks are clipped to the mode sizes."""
    out = {}
    for name, shape in shapes.items():
        if isinstance(ranks, int):
            r: int | Sequence[int] = ranks
        else:
            rules = [k for k in ranks
                     if k == name or (any(c in k for c in "*?")
                                      and tree._glob_regex(k).fullmatch(name))]
            if len(rules) != 1:
                raise fail(fn, "ranks", f"exactly one rule matching {name!r}",
                           rules or "no rule", f"Rules: {sorted(ranks)}.")
            r = ranks[rules[0]]
        rr = (r,) * len(shape) if isinstance(r, int) else tuple(r)
        if len(rr) != len(shape):
            raise fail(fn, "ranks", f"{len(shape)} ranks for {name!r} of shape {shape}", rr)
        for v in rr:
            check_positive(fn, "ranks", v, integer=True)
        out[name] = tuple(min(v, d) for v, d in zip(rr, shape, strict=True))
    return out


def directions(dec: Mapping[str, Tucker]) -> dict[str, Array]:
    """The dense directions ``{name: (n_v, *shape)}``."""
    return {n: materialize(t) for n, t in dec.items()}


def decoder_norms(dec: Mapping[str, Tucker], *, quirk: bool = False) -> Float[Array, " n_v"]:
    """``s_k = sqrt(sum_t ||v_{k,t}||_F^2)``; with ``quirk`` the reference code's
    ``sqrt(sum_t ||v_{k,t}||_F)``."""
    sq = [tucker_sq_norms(t) for t in dec.values()]
    if quirk:
        return jnp.sqrt(sum(jnp.sqrt(s) for s in sq))
    return jnp.sqrt(sum(sq))


def normalize_decoder(sub: Subnetworks, *, quirk: bool = False) -> Subnetworks:
    """Rescale every decoder subnetwork to unit global norm (spec section 4): each tensor's
    core and factors are divided by ``s_k ** (1 / (N_t + 1))``."""
    s = decoder_norms(sub.dec, quirk=quirk)
    s = jnp.where(s > 0, s, 1.0)
    return Subnetworks(sub.enc, {n: rescale(t, s) for n, t in sub.dec.items()})


def init_subnetworks(shapes: Mapping[str, tuple[int, ...]], ranks: Mapping[str, tuple[int, ...]],
                     n_v: int, *, quirk: bool = False, key: Key) -> Subnetworks:
    """Decoder entries ~ ``N(0, 1) / n_v``, normalised; the encoder an exact copy."""
    check_positive("init_subnetworks", "n_v", n_v, integer=True)
    keys = jax.random.split(key, len(shapes))
    dec = {n: init_tucker(shape, ranks[n], n_v, key=k)
           for (n, shape), k in zip(shapes.items(), keys, strict=True)}
    dec = normalize_decoder(Subnetworks(dec, dec), quirk=quirk).dec
    return Subnetworks(dict(dec), dict(dec))


def _check_grads(fn: str, tuckers: Mapping[str, Tucker], grads: Grads) -> None:
    if set(tuckers) != set(grads):
        raise fail(fn, "grads", f"one entry per decomposed tensor {sorted(tuckers)}",
                   sorted(grads))


def coefficients(tuckers: Mapping[str, Tucker], grads: Grads) -> Float[Array, "batch n_v"]:
    """``c[b, k] = sum_t <v_{k,t}, g_{b,t}>`` (dense tensors contracted mode by mode, ghost
    matrices through their inputs and deltas)."""
    _check_grads("coefficients", tuckers, grads)
    total = 0.0
    for n, t in tuckers.items():
        g = grads[n]
        total = total + (inner_ghost(t, g.p, g.q) if isinstance(g, Ghost) else inner_dense(t, g))
    return total


def topk_count(k: float, group: int, n_v: int) -> int:
    """``floor(k * group * n_v) + 1`` entries kept per group (capped at ``group * n_v``)."""
    return min(int(math.floor(k * group * n_v)) + 1, group * n_v)


def batch_topk_mask(c: Float[Array, "batch n_v"], k: float, *, group: int | None = None,
                    k_active: Array | None = None) -> Float[Array, "batch n_v"]:
    """BatchTopK: within each group of ``group`` samples (default the batch), keep the
    entries with ``|c| >= tau``, ``tau`` the value at 0-based position ``floor(k G n_v)`` of
    the group's ``|c|`` sorted in descending order. ``floor(k G n_v) + 1`` entries are kept on
    tie-free input; ties at ``tau`` are all kept. The mask is under stop-gradient.

    Args:
        c: coefficients.
        k: fraction kept (static).
        group: samples per top-k group (the reference's data-parallel shard size).
        k_active: optional traced fraction <= ``k`` used instead (warm starts), evaluated
            within the same static top-k width.
    """
    b, n_v = c.shape
    g = b if group is None else group
    if b % g:
        raise fail("batch_topk_mask", "group", f"to divide the batch {b}", g)
    if not 0.0 < k <= 1.0:
        raise fail("batch_topk_mask", "k", "in (0, 1]", k)
    kk = topk_count(k, g, n_v)
    a = jax.lax.stop_gradient(jnp.abs(c)).reshape(b // g, g * n_v)
    top = jax.lax.top_k(a, kk)[0]  # (groups, kk), descending
    if k_active is None:
        tau = top[:, -1]
    else:
        idx = jnp.minimum(jnp.floor(k_active * g * n_v).astype(jnp.int32), kk - 1)
        tau = top[:, idx]
    m = (a >= tau[:, None]).astype(c.dtype)
    return m.reshape(b, n_v)


def reconstruct(dec: Mapping[str, Tucker], a: Float[Array, "batch n_v"]) -> dict[str, Array]:
    """``ĝ_t = sum_k a[b, k] v_{k,t}``, dense ``{name: (batch, *shape)}``."""
    return {n: jnp.tensordot(a, v, axes=1) for n, v in directions(dec).items()}


def l3d_loss(sub: Subnetworks, grads: Grads, k: float, *, group: int | None = None,
             k_active: Array | None = None, loss: str = "fvu"
             ) -> tuple[Array, dict[str, Array]]:
    """The L3D loss of one batch and its aux terms.

    With every gradient dense the residual is formed directly; with any :class:`Ghost`
    entry it is expanded, ``||g||^2 - 2 a.<g, v^dec> + a^T Gram(V^dec) a`` with
    ``a = m c``, so no per-sample matrix is formed.

    Args:
        sub: subnetworks.
        grads: per-sample gradients (dense arrays and/or :class:`Ghost`).
        k, group, k_active: BatchTopK settings (:func:`batch_topk_mask`).
        loss: ``"fvu"`` (squared, batch-pooled; default and what the reference trains) or
            ``"ratio"`` (the paper's per-sample ``||g - ĝ|| / ||g||``, averaged over the
            samples with ``g != 0``).

    Returns:
        ``(loss, {"fvu", "active": (n_v,) fraction of samples keeping each subnetwork,
        "l0": mean kept per sample})``.
    """
    check_in("l3d_loss", "loss", loss, LOSSES)
    _check_grads("l3d_loss", sub.dec, grads)
    c = coefficients(sub.enc, grads)
    m = batch_topk_mask(c, k, group=group, k_active=k_active)
    a = m * c
    gg = gradient_sq_norms(grads)
    if any(isinstance(g, Ghost) for g in grads.values()):
        dots = coefficients(sub.dec, grads)
        G = sum(gram(t) for t in sub.dec.values())
        err = gg - 2.0 * jnp.sum(a * dots, axis=1) + jnp.einsum("bk,kl,bl->b", a, G, a)
        err = jnp.maximum(err, 0.0)
    else:
        rec = reconstruct(sub.dec, a)
        err = sum(jnp.sum((grads[n] - rec[n]).reshape(a.shape[0], -1) ** 2, axis=1)
                  for n in grads)
    tiny = jnp.finfo(gg.dtype).tiny
    fvu = jnp.sum(err) / jnp.maximum(jnp.sum(gg), tiny)
    if loss == "fvu":
        value = fvu
    else:
        nz = gg > 0
        # Floor the residual so that sqrt has a finite gradient at an exact fit.
        ratio = jnp.sqrt(jnp.maximum(err, 1e-30)) / jnp.sqrt(jnp.where(nz, gg, 1.0))
        value = jnp.sum(jnp.where(nz, ratio, 0.0)) / jnp.maximum(jnp.sum(nz), 1)
    return value, {"fvu": fvu, "active": jnp.mean(m, axis=0), "l0": jnp.mean(jnp.sum(m, 1))}
