"""SPD evaluation (``specs/spd.md`` section 5): IdentityCIError and its dense(k) variant, CI-L0,
the column order of the CI heat-map, subcomponent norms and the non-negligible count, and MMCS /
ML2R of the best-matching rank-one subcomponent against the TMS encoder, and the neuron
contributions of the chosen subcomponents against the target's (resid).

Everything here is plain NumPy/SciPy on already-computed arrays (causal importances ``G`` or
``g``, component factors ``V`` and ``U``), so it runs on host after training, in float64.

References:
    Bushnaq, Braun, Sharkey 2025, "Stochastic Parameter Decomposition" (arXiv 2506.20790).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import linear_sum_assignment

from .._checks import fail

__all__ = [
    "identity_ci_error",
    "dense_ci_error",
    "dense_ci_unread",
    "ci_l0",
    "permute_columns_for_heatmap",
    "subcomponent_norms",
    "n_non_negligible",
    "spd_mmcs_ml2r",
    "spd_neuron_contributions",
]

_GREEDY_FROM = 500  # min(F, C) at which identity_ci_error switches to greedy matching


def _matrix(fn: str, arg: str, x: ArrayLike, shape: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise fail(fn, arg, f"a non-empty matrix of shape {shape}", f"shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise fail(fn, arg, "finite entries", f"{np.sum(~np.isfinite(a))} non-finite entries")
    return a


def _is_number(x: object) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def _check_tol(fn: str, arg: str, tol: float) -> None:
    if not _is_number(tol) or not (0.0 <= tol < 1.0):
        raise fail(fn, arg, "a number in [0, 1)", tol)


def _importances(fn: str, G: ArrayLike, tol: float) -> np.ndarray:
    _check_tol(fn, "tol", tol)
    return np.clip(_matrix(fn, "G", G, "(n_features, C)"), 0.0, 1.0)


def _greedy_assignment(G: np.ndarray) -> np.ndarray:
    """Largest remaining entry whose row and column are both free, until every row has one."""
    F, C = G.shape
    pi = np.full(F, -1, dtype=np.intp)
    col_used = np.zeros(C, dtype=bool)
    n_done = 0
    for flat in np.argsort(-G, axis=None, kind="stable"):
        i, c = divmod(int(flat), C)
        if pi[i] < 0 and not col_used[c]:
            pi[i], col_used[c] = c, True
            n_done += 1
            if n_done == F:
                break
    return pi


def identity_ci_error(G: ArrayLike, tol: float = 0.1, *, greedy: bool | None = None) -> int:
    """IdentityCIError: distance of ``G`` from the best one-subcomponent-per-feature pattern.

    ``G`` is clipped to [0, 1]; the assignment ``pi`` of distinct columns to rows maximising
    ``sum_i G[i, pi(i)]`` is found by Hungarian matching (or greedily). Then
    ``errors = #{i : G[i, pi(i)] < 1 - tol} + #{(i, c) : c != pi(i), G[i, c] > tol}``.

    Args:
        G: causal importances of the one-hot inputs, ``(n_features, C)`` with ``C >= n_features``.
        tol: tolerance in [0, 1); the paper reports 0.1 and 0.2.
        greedy: ``True`` for greedy matching (repeatedly take the largest entry whose row and
            column are both unused), ``False`` for Hungarian; ``None`` picks greedy when
            ``min(n_features, C) >= 500``.

    Returns:
        The number of entries that violate the identity pattern (0 is perfect).

    Raises:
        ValueError: ``G`` is not a finite matrix, ``C < n_features``, or ``tol`` is out of range.
    """
    fn = "identity_ci_error"
    G = _importances(fn, G, tol)
    F, C = G.shape
    if C < F:
        raise fail(
            fn,
            "G",
            "of shape (n_features, C) with C >= n_features",
            f"shape {G.shape}",
            "Each feature needs its own subcomponent; pass G with features as rows.",
        )
    if greedy is None:
        greedy = min(F, C) >= _GREEDY_FROM
    pi = _greedy_assignment(G) if greedy else linear_sum_assignment(G, maximize=True)[1]
    rows = np.arange(F)
    n_low = int(np.sum(G[rows, pi] < 1.0 - tol))
    off = G > tol
    off[rows, pi] = False
    return n_low + int(np.sum(off))


def dense_ci_error(G: ArrayLike, k: int, tol: float = 0.1) -> int:
    """Dense(k) CIError: distance of ``G`` from "the same k subcomponents for every feature".

    Columns are sorted by column sum, descending; then
    ``errors = #{(i, c) : c in the first k, G[i, c] < 1 - tol}
    + #{(i, c) : c not in the first k, G[i, c] > tol}``.

    Args:
        G: causal importances of the one-hot inputs, ``(n_features, C)``; clipped to [0, 1].
        k: number of always-active subcomponents, ``1 <= k <= C``.
        tol: tolerance in [0, 1).

    Returns:
        The number of entries that violate the dense(k) pattern.

    Raises:
        ValueError: ``G`` is not a finite matrix, or ``k`` or ``tol`` is out of range.
    """
    fn = "dense_ci_error"
    G = _importances(fn, G, tol)
    order = _dense_order(fn, G, k)
    top, rest = G[:, order[:k]], G[:, order[k:]]
    return int(np.sum(top < 1.0 - tol)) + int(np.sum(rest > tol))


def _dense_order(fn: str, G: np.ndarray, k: int) -> np.ndarray:
    """Columns by column sum, descending (stable), after checking ``1 <= k <= C``."""
    C = G.shape[1]
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= C:
        raise fail(fn, "k", f"an integer in [1, C={C}]", k)
    return np.argsort(-G.sum(axis=0), kind="stable")


def dense_ci_unread(G: ArrayLike, H: ArrayLike, k: int, tol: float = 0.1,
                    read_frac: float = 0.1) -> int:
    """How many of the dense(k) pattern's "too low" errors sit where the subcomponent
    barely reads the input: ``#{(i, c) : c in the first k, G[i, c] < 1 - tol,
    |H[i, c]| <= read_frac * max_j |H[j, c]|}``.

    A diagnostic next to :func:`dense_ci_error`: a subcomponent whose inner activation
    ``h = a . v_c`` on feature i's one-hot input is (near) zero contributes (almost)
    nothing to that input's output, so the importance loss prefers its CI at 0 there —
    a neuron-aligned ``mlp_out`` piece whose neuron is off, or an identity piece whose
    read direction is orthogonal to a feature's hidden vector.

    Args:
        G: causal importances of the one-hot inputs, ``(n_features, C)``; clipped to [0, 1].
        H: the subcomponents' inner activations on the same inputs, ``(n_features, C)``.
        k, tol: as in :func:`dense_ci_error` (same column order).
        read_frac: a read is "barely" when at most this fraction of the column's largest.

    Raises:
        ValueError: ``G`` or ``H`` is not a finite matrix, their shapes differ, or ``k``,
            ``tol`` or ``read_frac`` is out of range.
    """
    fn = "dense_ci_unread"
    G = _importances(fn, G, tol)
    H = np.abs(_matrix(fn, "H", H, "(n_features, C)"))
    if H.shape != G.shape:
        raise fail(fn, "H", f"the shape of G {G.shape}", f"shape {H.shape}")
    _check_tol(fn, "read_frac", read_frac)
    top = _dense_order(fn, G, k)[:k]
    low = G[:, top] < 1.0 - tol
    unread = H[:, top] <= read_frac * H[:, top].max(axis=0, keepdims=True)
    return int(np.sum(low & unread))


def ci_l0(g: ArrayLike, tau: float = 0.1) -> float:
    """CI-L0: mean number of subcomponents with causal importance above ``tau``.

    Args:
        g: causal importances ``(..., C)``, e.g. ``(batch, C)`` or ``(batch, positions, C)``.
        tau: threshold; 0.1 for the toy models.

    Returns:
        ``mean over the leading axes of #{c : g[..., c] > tau}`` (the count itself for 1-D g).

    Raises:
        ValueError: ``g`` is a scalar or empty, or ``tau`` is not a number.
    """
    a = np.asarray(g, dtype=np.float64)
    if a.ndim == 0 or a.size == 0:
        raise fail("ci_l0", "g", "a non-empty array of shape (..., C)", f"shape {a.shape}")
    if not _is_number(tau):
        raise fail("ci_l0", "tau", "a number", tau)
    return float(np.mean(np.sum(a > tau, axis=-1)))


def permute_columns_for_heatmap(G: ArrayLike) -> np.ndarray:
    """Column order for the CI heat-map: iterative argmax without replacement.

    Row by row, the not-yet-used column with the largest ``G[i, c]`` is taken (ties go to the
    lowest index); the columns left over follow, by column sum descending.

    Args:
        G: causal importances of the one-hot inputs, ``(n_features, C)``.

    Returns:
        A permutation of ``range(C)``, shape ``(C,)``; plot ``G[:, order]``.

    Raises:
        ValueError: ``G`` is not a finite matrix.
    """
    G = _matrix("permute_columns_for_heatmap", "G", G, "(n_features, C)")
    F, C = G.shape
    used = np.zeros(C, dtype=bool)
    order: list[int] = []
    for i in range(min(F, C)):
        c = int(np.argmax(np.where(used, -np.inf, G[i])))
        order.append(c)
        used[c] = True
    rest = np.flatnonzero(~used)
    rest = rest[np.argsort(-G[:, rest].sum(axis=0), kind="stable")]
    return np.concatenate([np.asarray(order, dtype=np.intp), rest.astype(np.intp)])


def _factors(fn: str, V: ArrayLike, U: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    V = _matrix(fn, "V", V, "(d_in, C)")
    U = _matrix(fn, "U", U, "(C, d_out)")
    if V.shape[1] != U.shape[0]:
        raise fail(
            fn, "U", f"of shape (C={V.shape[1]}, d_out) to match V {V.shape}", f"shape {U.shape}"
        )
    return V, U


def subcomponent_norms(V: ArrayLike, U: ArrayLike) -> np.ndarray:
    """Norms ``||V[:, c]|| * ||U[c, :]||`` of the rank-one subcomponents ``V[:, c] U[c, :]``.

    Args:
        V: ``(d_in, C)``.
        U: ``(C, d_out)``.

    Returns:
        ``(C,)`` Frobenius norms of the subcomponent matrices.

    Raises:
        ValueError: the shapes do not agree or an entry is not finite.
    """
    V, U = _factors("subcomponent_norms", V, U)
    return np.linalg.norm(V, axis=0) * np.linalg.norm(U, axis=1)


def n_non_negligible(V: ArrayLike, U: ArrayLike, frac: float = 0.1) -> int:
    """Number of subcomponents whose norm is ``>= frac`` times the module's largest.

    Args:
        V: ``(d_in, C)``.
        U: ``(C, d_out)``.
        frac: relative threshold in (0, 1].

    Returns:
        The count; 0 when every subcomponent is exactly zero.

    Raises:
        ValueError: the shapes do not agree, or ``frac`` is out of range.
    """
    if not _is_number(frac) or not (0.0 < frac <= 1.0):
        raise fail("n_non_negligible", "frac", "a number in (0, 1]", frac)
    norms = subcomponent_norms(V, U)
    top = norms.max()
    return 0 if top == 0.0 else int(np.sum(norms >= frac * top))


def spd_mmcs_ml2r(W: ArrayLike, V: ArrayLike, U: ArrayLike) -> dict[str, float]:
    """MMCS and ML2R of the best-matching subcomponent row for each TMS feature.

    With ``w_j = W[j, :]`` and ``p_{c,j} = V[j, c] * U[c, :]``:
    ``cos_{c,j} = p.w / (|p| |w| + 1e-12)``, ``c*(j) = argmax_c cos_{c,j}``,
    ``MMCS = mean_j cos_{c*(j),j}`` and ``ML2R = mean_j |p_{c*(j),j}| / |w_j|``.

    Args:
        W: TMS encoder ``(n_features, d_hidden)``.
        V: encoder factor ``(n_features, C)``.
        U: encoder factor ``(C, d_hidden)``.

    Returns:
        ``{"mmcs", "mmcs_std", "ml2r", "ml2r_std"}``: means and (population) standard
        deviations over features.

    Raises:
        ValueError: the shapes do not agree, or a row of ``W`` is zero.
    """
    fn = "spd_mmcs_ml2r"
    W = _matrix(fn, "W", W, "(n_features, d_hidden)")
    V, U = _factors(fn, V, U)
    if V.shape[0] != W.shape[0] or U.shape[1] != W.shape[1]:
        raise fail(
            fn,
            "V and U",
            f"of shapes (n_features={W.shape[0]}, C) and "
            f"(C, d_hidden={W.shape[1]}) to match W {W.shape}",
            f"{V.shape} and {U.shape}",
        )
    w_norm = np.linalg.norm(W, axis=1)  # (F,)
    if np.any(w_norm == 0.0):
        raise fail(fn, "W", "rows of non-zero norm", f"{int(np.sum(w_norm == 0))} zero rows")
    # p_{c,j} is never materialised: p.w = V[j,c] (U[c].w_j) and |p| = |V[j,c]| |U[c]|.
    p_norm = np.abs(V) * np.linalg.norm(U, axis=1)[None, :]  # (F, C)
    cos = V * (W @ U.T) / (p_norm * w_norm[:, None] + 1e-12)  # (F, C)
    best = np.argmax(cos, axis=1)
    rows = np.arange(W.shape[0])
    best_cos = cos[rows, best]
    ratio = p_norm[rows, best] / w_norm
    return {
        "mmcs": float(best_cos.mean()),
        "mmcs_std": float(best_cos.std()),
        "ml2r": float(ratio.mean()),
        "ml2r_std": float(ratio.std()),
    }


def spd_neuron_contributions(
    W_E: ArrayLike,
    layers: list[dict[str, ArrayLike]],
    threshold: float = 0.01,
) -> dict[str, float]:
    """Neuron contributions of the target against those of the chosen subcomponents (resid).

    For feature ``i`` and neuron ``n`` (neurons concatenated over layers) the target's
    contribution is ``NC(i)[n] = (W_E[i] @ W_in)[n] * (W_out[n] @ W_U[:, i])`` with the
    unembedding ``W_U = W_E^T``. The subcomponent version replaces ``W_in`` by the
    rank-one matrix of ``c*(i) = argmax_c G[i, c]`` (the ``mlp_in`` subcomponent most
    important for ``0.75 e_i``) and ``W_out`` by the summed decomposition ``V_out @ U_out``.

    Args:
        W_E: embedding ``(F, d_resid)``.
        layers: one dict per layer with ``W_in (d_resid, N)``, ``W_out (N, d_resid)``,
            ``V_in (d_resid, C)``, ``U_in (C, N)``, ``V_out (N, C')``, ``U_out (C', d_resid)``
            and ``G_in (F, C)``, the ``mlp_in`` importances of the one-hot inputs.
        threshold: pairs with ``|NC(i)[n]| > threshold`` enter the fit.

    Returns:
        ``{"nc_pearson_r", "nc_slope", "nc_intercept", "nc_pairs"}``: Pearson r and the
        least-squares line of subcomponent against target contributions over the pairs.

    Raises:
        ValueError: a shape does not agree, ``layers`` is empty, or fewer than two pairs
            pass the threshold.
    """
    fn = "spd_neuron_contributions"
    W_E = _matrix(fn, "W_E", W_E, "(n_features, d_resid)")
    if not layers:
        raise fail(fn, "layers", "at least one layer", layers)
    F = W_E.shape[0]
    target, sub = [], []
    for li, layer in enumerate(layers):
        need = ("W_in", "W_out", "V_in", "U_in", "V_out", "U_out", "G_in")
        missing = [k for k in need if k not in layer]
        if missing:
            raise fail(fn, f"layers[{li}]", f"keys {need}", f"missing {missing}")
        W_in = _matrix(fn, f"layers[{li}]['W_in']", layer["W_in"], "(d_resid, N)")
        W_out = _matrix(fn, f"layers[{li}]['W_out']", layer["W_out"], "(N, d_resid)")
        V_in, U_in = _factors(fn, layer["V_in"], layer["U_in"])
        V_out, U_out = _factors(fn, layer["V_out"], layer["U_out"])
        G = _matrix(fn, f"layers[{li}]['G_in']", layer["G_in"], "(n_features, C)")
        if G.shape != (F, V_in.shape[1]):
            raise fail(fn, f"layers[{li}]['G_in']", f"shape ({F}, {V_in.shape[1]})", G.shape)
        if W_in.shape != (V_in.shape[0], U_in.shape[1]) or W_out.shape != (V_out.shape[0],
                                                                           U_out.shape[1]):
            raise fail(fn, f"layers[{li}]", "factors whose shapes match W_in and W_out",
                       f"W_in {W_in.shape}, V_in@U_in {(V_in.shape[0], U_in.shape[1])}, "
                       f"W_out {W_out.shape}, V_out@U_out {(V_out.shape[0], U_out.shape[1])}")
        write_t = W_E @ W_out.T  # (F, N): W_out[n] . W_E[i]
        target.append((W_E @ W_in) * write_t)
        best = np.argmax(G, axis=1)  # (F,)
        read_s = (np.sum(W_E * V_in[:, best].T, axis=1))[:, None] * U_in[best]  # (F, N)
        sub.append(read_s * (W_E @ (V_out @ U_out).T))
    nc_t, nc_s = np.concatenate(target, axis=1), np.concatenate(sub, axis=1)
    keep = np.abs(nc_t) > threshold
    if keep.sum() < 2:
        raise fail(fn, "threshold", f"a value leaving >= 2 pairs with |NC| above it "
                   f"(max |NC| = {np.abs(nc_t).max():.3g})", threshold)
    x, y = nc_t[keep], nc_s[keep]
    slope, intercept = np.polyfit(x, y, 1)
    return {"nc_pearson_r": float(np.corrcoef(x, y)[0, 1]), "nc_slope": float(slope),
            "nc_intercept": float(intercept), "nc_pairs": int(keep.sum())}
