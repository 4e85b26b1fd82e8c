"""Fourier labels of basis directions of the modular-addition model.

For a direction ``j``, tabulate ``f_hat_j(a, b)`` over all ``p^2`` input pairs and take
the 2-D DFT over ``(a, b)``. Frequencies ``k`` and ``p - k`` are one real frequency, so
power is folded onto ``k in 0..p//2`` along each axis. The dominant term is the folded
``(k_a, k_b)`` with the most non-DC power; the direction's frequency is its non-zero
entry (``k_a`` when both are non-zero) and its purity the dominant power over the total
non-DC power. For a node layer with several positions each position is labelled and
the one with the most non-DC power is kept.

References:
    Bushnaq et al. (2024), "The Local Interaction Basis" (arXiv 2405.10928), Fourier
    labelling of LIB features; Nanda et al. (2023), "Progress measures for grokking via
    mechanistic interpretability" (arXiv 2301.05217).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._checks import check_rank, fail

__all__ = ["FourierLabels", "fourier_labels", "same_frequency_fraction"]


class FourierLabels(NamedTuple):
    """Per direction: ``frequency`` (0: constant, non-DC power below ``1e-12`` of the
    total), ``purity``, ``term`` (the folded ``(k_a, k_b)``) and ``power`` (non-DC)."""

    frequency: np.ndarray
    purity: np.ndarray
    term: np.ndarray
    power: np.ndarray


def _fold(power: np.ndarray, p: int) -> np.ndarray:
    """``(p, p, ...)`` power -> ``(p//2 + 1, p//2 + 1, ...)`` with ``k`` and ``p - k`` summed."""
    idx = np.minimum(np.arange(p), p - np.arange(p))
    half = p // 2 + 1
    out = np.zeros((half, half, *power.shape[2:]))
    np.add.at(out, (idx[:, None], idx[None, :]), power)
    return out


def fourier_labels(table: np.ndarray) -> FourierLabels:
    """Label directions from ``table: (p, p, P, n)`` = ``f_hat[a, b, position, direction]``.

    Raises:
        ValueError: if ``table`` is not ``(p, p, P, n)``.
    """
    check_rank("fourier_labels", "table", table, 4, "Tabulate f_hat over all (a, b) pairs.")
    p = table.shape[0]
    if table.shape[1] != p:
        raise fail("fourier_labels", "table", "of shape (p, p, P, n)", table.shape)
    power = np.abs(np.fft.fft2(np.asarray(table, np.float64), axes=(0, 1))) ** 2
    folded = _fold(power, p)  # (half, half, P, n)
    with_dc = folded.sum(axis=(0, 1))
    folded[0, 0] = 0.0
    total = folded.sum(axis=(0, 1))  # (P, n)
    pos = np.argmax(total, axis=0)  # the position with most non-DC power, per direction
    n = table.shape[-1]
    best = folded[:, :, pos, np.arange(n)]  # (half, half, n)
    flat = best.reshape(-1, n)
    top = np.argmax(flat, axis=0)
    ka, kb = np.unravel_index(top, best.shape[:2])
    tot = total[pos, np.arange(n)]
    tot = np.where(tot > 1e-12 * with_dc[pos, np.arange(n)], tot, 0.0)  # round-off: no tone
    purity = np.where(tot > 0, flat[top, np.arange(n)] / np.where(tot > 0, tot, 1.0), 0.0)
    freq = np.where(ka > 0, ka, kb)
    freq = np.where(tot > 0, freq, 0)
    return FourierLabels(
        frequency=freq.astype(int), purity=purity, term=np.stack([ka, kb], axis=1), power=tot
    )


def same_frequency_fraction(
    e: np.ndarray,
    freq_in: np.ndarray,
    freq_out: np.ndarray,
    nodes_in: np.ndarray,
    nodes_out: np.ndarray,
) -> float:
    """Share of the edge weight among the chosen nodes that joins equal frequencies.

    Args:
        e: edges ``(m_out, m_in)``.
        freq_in, freq_out: frequencies of the chosen input / output nodes.
        nodes_in, nodes_out: their indices in ``e``.
    """
    sub = np.abs(np.asarray(e, np.float64)[np.ix_(nodes_out, nodes_in)])
    same = (np.asarray(freq_out)[:, None] == np.asarray(freq_in)[None, :]) & (
        np.asarray(freq_out)[:, None] > 0
    )
    total = sub.sum()
    return float(sub[same].sum() / total) if total > 0 else 0.0
