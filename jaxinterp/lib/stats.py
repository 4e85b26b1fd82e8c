"""Float64 statistics of a node layer: mean, centred Gram, centring matrix and the PCA
rotation with the constant direction first.

For activations ``f: (N, P, d)`` whose last coordinate is the folded constant (1):

* ``mu = mean over (b, s) of f``; ``mu'`` is ``mu`` with the constant entry set to 0;
* ``G = E[(f - mu')^T (f - mu')]`` (centred) or ``E[f^T f]`` (uncentred, ``mu' = 0``);
* the centring matrix ``Y = I - e_c mu'^T`` (the identity with its constant row replaced
  by ``-mu'^T`` and the diagonal entry kept at 1) gives ``f Y = f - mu'``;
  ``Y^-1 = I + e_c mu'^T``;
* ``G = U diag(D) U^T``; the constant direction ``e_c`` (eigenvalue 1) is index 0, the
  rest is sorted by ``|D|`` descending, directions with ``D <= tau`` are dropped, and
  each column's largest-magnitude entry is made positive;
* PCA basis ``W = Y U``, ``W^+ = U^T Y^-1``; whitening ``R = W D^-1/2``,
  ``R^+ = D^1/2 W^+`` so that ``E[(f R)^T (f R)] = I``.

Eigendecompositions run on the host in numpy float64; results are numpy float64 arrays
(so they stay float64 outside an x64 context).

References:
    Bushnaq et al. (2024), "The Local Interaction Basis" (arXiv 2405.10928), the PCA
    baseline and the whitening step of LIB.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from threadpoolctl import threadpool_limits

from .._checks import check_finite_host, check_positive, check_rank, fail
from .._types import Array, PyTree
from ..sharding import shard_batch

__all__ = ["PCA", "LayerStats", "chunked_sum", "host_blas", "layer_stats", "pca", "sign_fix"]

_HI = jax.lax.Precision.HIGHEST

# Widest node layer whose host linear algebra runs on one BLAS thread (see host_blas).
_SMALL_WIDTH = 1024


def host_blas(width: int) -> contextlib.AbstractContextManager[Any]:
    """Context for the host (numpy) linear algebra of node layers at most ``width`` wide.

    Up to ``_SMALL_WIDTH`` it limits BLAS/LAPACK to one thread: the Grams, ``eigh`` calls
    and basis products of such layers take milliseconds on one thread, while a
    multithreaded BLAS sharing its cores with XLA's (or another process's) threads spins
    on synchronisation, measured 100-200x slower on a loaded 2-core machine (a 129 x 129
    ``eigh`` 1 ms vs 228 ms). Wider layers keep the default threading.
    """
    if width <= _SMALL_WIDTH:
        return threadpool_limits(limits=1, user_api="blas")
    return contextlib.nullcontext()


class LayerStats(eqx.Module):
    """Moments of one node layer (numpy float64).

    Attributes:
        mean: ``mu``, shape ``(d,)``; its constant entry is 1.
        gram: ``G``, centred or not, shape ``(d, d)``.
        centered: whether ``G`` is centred.
        has_constant: whether the last coordinate is the folded constant.
        count: ``N * P`` rows averaged over.
    """

    mean: np.ndarray
    gram: np.ndarray
    centered: bool = eqx.field(static=True)
    has_constant: bool = eqx.field(static=True)
    count: int = eqx.field(static=True)

    @property
    def shift(self) -> np.ndarray:
        """``mu'``: the mean with the constant entry 0 (zeros when not centred)."""
        if not self.centered:
            return np.zeros_like(self.mean)
        out = self.mean.copy()
        out[-1] = 0.0
        return out

    @property
    def centering(self) -> np.ndarray:
        """``Y = I - e_c mu'^T`` with ``f Y = f - mu'``, shape ``(d, d)``."""
        y = np.eye(self.mean.shape[0])
        y[-1] -= self.shift
        return y

    @property
    def centering_inv(self) -> np.ndarray:
        """``Y^-1 = I + e_c mu'^T``, shape ``(d, d)``."""
        y = np.eye(self.mean.shape[0])
        y[-1] += self.shift
        return y


def layer_stats(
    acts: Array | np.ndarray, *, center: bool = True, has_constant: bool = True
) -> LayerStats:
    """Mean and (centred) Gram of a node layer, in float64.

    Args:
        acts: ``(N, P, d)`` activations (any float dtype; promoted to float64).
        center: subtract ``mu'`` (needs the constant coordinate).
        has_constant: the last coordinate is the folded constant (checked to be 1).

    Returns:
        :class:`LayerStats`.

    Raises:
        ValueError: on a rank other than 3, ``center`` without a constant coordinate, or
            a constant coordinate that is not 1.
        FloatingPointError: if ``acts`` is not finite.
    """
    fn = "layer_stats"
    check_rank(fn, "acts", acts, 3, "Node layers are (batch, positions, d).")
    if center and not has_constant:
        raise fail(
            fn,
            "center",
            "False for a layer without the constant coordinate",
            center,
            "Centring is the linear map f -> f Y and needs the constant.",
        )
    f = np.asarray(acts, np.float64).reshape(-1, acts.shape[-1])
    check_finite_host(fn, "acts", f)
    if has_constant and not np.all(f[:, -1] == 1.0):
        raise fail(
            fn,
            "acts[..., -1]",
            "the folded constant 1 everywhere",
            f"values in [{f[:, -1].min()}, {f[:, -1].max()}]",
        )
    n = f.shape[0]
    mean = f.mean(axis=0)
    if has_constant:
        mean[-1] = 1.0
    shift = mean.copy() if center else np.zeros_like(mean)
    if has_constant:
        shift[-1] = 0.0
    g = f - shift
    gram = g.T @ g / n
    return LayerStats(
        mean=mean, gram=(gram + gram.T) / 2, centered=center, has_constant=has_constant, count=n
    )


def sign_fix(u: np.ndarray) -> np.ndarray:
    """Flip columns so that each column's largest-magnitude entry is positive."""
    if u.size == 0:
        return u
    idx = np.argmax(np.abs(u), axis=0)
    signs = np.sign(u[idx, np.arange(u.shape[1])])
    return u * np.where(signs == 0, 1.0, signs)[None, :]


class PCA(eqx.Module):
    """The PCA rotation of a node layer, constant direction first (numpy float64).

    Attributes:
        U: eigenvectors of ``G``, ``(d, k)``.
        D: eigenvalues, ``(k,)`` (``D[0] = 1`` is the constant when centred).
        W: PCA basis ``Y U``, ``(d, k)``.
        W_pinv: ``U^T Y^-1``, ``(k, d)``.
        constant: whether index 0 is the constant direction.
    """

    U: np.ndarray
    D: np.ndarray
    W: np.ndarray
    W_pinv: np.ndarray
    constant: bool = eqx.field(static=True)

    @property
    def R(self) -> np.ndarray:
        """Whitening ``W D^-1/2``, ``(d, k)``."""
        return self.W / np.sqrt(self.D)[None, :]

    @property
    def R_pinv(self) -> np.ndarray:
        """``D^1/2 W^+``, ``(k, d)``."""
        return np.sqrt(self.D)[:, None] * self.W_pinv


def pca(stats: LayerStats, *, tau: float = 1e-15, tau_relative: float | None = None) -> PCA:
    """PCA of a node layer with the constant direction first and truncation at ``tau``.

    In the centred case ``G`` is block diagonal (the constant row and column are
    ``e_c``), so the eigendecomposition runs on the non-constant block and ``e_c`` is
    prepended: exactly one constant direction, by construction.

    Args:
        stats: from :func:`layer_stats`.
        tau: keep eigenvalues ``> tau`` (absolute; the spec default ``1e-15``).
        tau_relative: also require ``> tau_relative * max(D)``.

    Returns:
        :class:`PCA`.

    Raises:
        ValueError: if ``tau < 0``, or a centred Gram whose constant row is not ``e_c``.
    """
    fn = "pca"
    if not tau >= 0:
        raise fail(fn, "tau", "a non-negative threshold", tau)
    if tau_relative is not None:
        check_positive(fn, "tau_relative", tau_relative)
    g = stats.gram
    constant = stats.centered and stats.has_constant
    if constant:
        scale = max(float(np.abs(g).max()), 1.0)
        off = float(np.abs(g[-1, :-1]).max(initial=0.0))
        if off > 1e-8 * scale or abs(g[-1, -1] - 1.0) > 1e-8:
            raise fail(
                fn,
                "stats.gram",
                "a centred Gram with constant row e_c (the constant direction)",
                f"off-diagonal {off:.3g}, diagonal {g[-1, -1]}",
            )
        d_sub, u_sub = np.linalg.eigh(g[:-1, :-1])
        d_sub = np.abs(d_sub)
        order = np.argsort(-d_sub, kind="stable")
        u = np.zeros_like(g)
        u[-1, 0] = 1.0
        u[:-1, 1:] = u_sub[:, order]
        d = np.concatenate([[1.0], d_sub[order]])
    else:
        d, u = np.linalg.eigh(g)
        d = np.abs(d)
        order = np.argsort(-d, kind="stable")
        d, u = d[order], u[:, order]
    keep = d > tau
    if tau_relative is not None and d.size:
        keep &= d > tau_relative * d.max()
    if constant:
        keep[0] = True
    u, d = sign_fix(u[:, keep]), d[keep]
    w = stats.centering @ u
    w_pinv = u.T @ stats.centering_inv
    return PCA(U=u, D=d, W=w, W_pinv=w_pinv, constant=constant)


def chunked_sum(
    fn: Callable[[PyTree, Array, Array], PyTree],
    xs: PyTree,
    *,
    chunk_size: int,
    index_offset: Any = 0,
) -> PyTree:
    """``sum over chunks of fn(chunk, mask, index)``, run under ``lax.scan``.

    The batch is padded to a multiple of ``chunk_size`` by repeating the first example;
    ``mask: (chunk_size,)`` is 1 for real examples and 0 for padding, and ``fn`` must
    weight each example's contribution by it. ``index`` is the chunk number (for
    ``fold_in``), counted from ``index_offset`` (so that a pass split into blocks of whole
    chunks draws the same randomness as one pass). Call inside an x64 context for float64
    sums.

    Args:
        fn: ``fn(chunk, mask, index) -> pytree of arrays`` (same structure every chunk).
        xs: pytree of arrays with a shared leading ``batch`` axis.
        chunk_size: examples per chunk.
        index_offset: the first chunk's index (an int or a traced integer scalar).

    Returns:
        The summed pytree.

    Raises:
        ValueError: if ``chunk_size <= 0`` or ``xs`` is empty.
    """
    check_positive("chunked_sum", "chunk_size", chunk_size, integer=True)
    leaves = jax.tree_util.tree_leaves(xs)
    n = leaves[0].shape[0] if leaves else 0
    if n == 0:
        raise fail("chunked_sum", "xs", "a non-empty batch", n)
    c = min(int(chunk_size), n)
    n_chunks = -(-n // c)
    pad = n_chunks * c - n

    def split(a: Any) -> Array:
        a = jnp.asarray(a)
        if pad:
            a = jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)], axis=0)
        return a.reshape(n_chunks, c, *a.shape[1:])

    chunks = jax.tree_util.tree_map(split, xs)
    mask = (jnp.arange(n_chunks * c) < n).astype(jnp.float64).reshape(n_chunks, c)
    first = jax.tree_util.tree_map(lambda a: a[0], chunks)
    init = jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first, mask[0], 0)
    )

    def body(acc: PyTree, inp: tuple[PyTree, Array, Array]) -> tuple[PyTree, None]:
        chunk, m, i = inp
        # under a mesh with a "data" axis each chunk's examples are split over the devices
        # (a chunk size they do not divide runs whole on each); the sums stay global
        chunk, m = shard_batch((chunk, m), strict=False, what="chunk")
        return jax.tree_util.tree_map(jnp.add, acc, fn(chunk, m, i)), None

    total, _ = jax.lax.scan(body, init, (chunks, mask, index_offset + jnp.arange(n_chunks)))
    return total


def einsum64(spec: str, *ops: Array) -> Array:
    """``jnp.einsum`` at the highest precision (float64 inside an x64 context)."""
    return jnp.einsum(spec, *ops, precision=_HI)
