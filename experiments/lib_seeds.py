"""Summarise ``jaxinterp run lib modadd`` run directories over seeds against the checks of
``specs/lib.md`` section 9 (one row per check, one column per seed, and the verdict).

Usage: ``python experiments/lib_seeds.py RUN_DIR [RUN_DIR ...]``, e.g. after
``for s in 0 1 2 3 4; do jaxinterp run lib modadd --seed $s --out runs/lib-modadd-seed$s; done``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from jaxinterp import io

PAIRS = ("resid_pre->resid_mid", "resid_mid->resid_post", "resid_post->output")
LAYERS = ("resid_pre", "resid_mid", "resid_post")


def _acc_at(m: dict, basis: str, layer: str, n: int) -> float:
    na = m["node_ablation"][basis][layer]
    counts, scores = np.asarray(na["counts"]), np.asarray(na["scores"])
    return float(scores[np.argmin(np.abs(counts - n))])


def rows(ms: list[dict]) -> list[tuple[str, list, str]]:
    """``(check, per-seed values, verdict)`` rows."""
    out = []
    acc = [round(m["base_score"], 4) for m in ms]
    out.append(("target test accuracy [>= 0.998]", acc, _v(all(a >= 0.998 for a in acc))))
    rel = [m["n_relevant_directions"]["lib"]["resid_mid"] for m in ms]
    cliff = [(r["n_rel"], round(r["gap_ratio"], 1)) for r in rel]
    ok = all(12 <= n <= 18 and g >= 30 for n, g in cliff)
    out.append(("Λ cliff resid_mid (n, gap) [12-18, >=30x]", cliff, _v(ok)))
    pg = [round(m["n_relevant_directions"]["pca"]["resid_mid"]["gap_ratio"], 1) for m in ms]
    out.append(("PCA eigengap resid_mid [<=100x]", pg, _v(all(g <= 100 for g in pg))))
    post = [(m["n_relevant_directions"]["lib"]["resid_post"]["n_rel"],
             round(m["n_relevant_directions"]["lib"]["resid_post"]["gap_ratio"], 1)) for m in ms]
    out.append(("Λ resid_post (n, gap) [6-11, >=10x]", post,
                _v(all(6 <= n <= 11 and g >= 10 for n, g in post))))
    ranges = {"resid_pre": (8 - 2, 13 + 2), "resid_mid": (13 - 2, 17 + 2),
              "resid_post": (7 - 2, 10 + 2)}
    for layer in LAYERS:
        lib = [m["node_ablation"]["lib"][layer]["minimal_directions"] for m in ms]
        pca = [m["node_ablation"]["pca"][layer]["minimal_directions"] for m in ms]
        lo, hi = ranges[layer]
        out.append((f"min directions {layer} LIB [{lo}-{hi}]", lib,
                    _v(all(lo <= v <= hi for v in lib))))
        out.append((f"min directions {layer} PCA (LIB <= PCA + 2)", pca,
                    _v(all(a <= b + 2 for a, b in zip(lib, pca, strict=True)))))
    a_lib = [_acc_at(m, "lib", "resid_mid", 11) for m in ms]
    a_pca = [_acc_at(m, "pca", "resid_mid", 11) for m in ms]
    out.append(("acc resid_mid n=11 LIB / PCA [mean LIB >= PCA]",
                [f"{a:.3f}/{b:.3f}" for a, b in zip(a_lib, a_pca, strict=True)],
                _v(np.mean(a_lib) >= np.mean(a_pca)) + f" ({np.mean(a_lib):.3f} vs "
                f"{np.mean(a_pca):.3f})"))
    for pair, strict in zip(PAIRS, (True, True, False), strict=True):
        lib = [m["edges_required"]["lib"][pair] for m in ms]
        pca = [m["edges_required"]["pca"][pair] for m in ms]
        ok = np.mean(lib) < np.mean(pca) if strict else np.mean(lib) <= np.mean(pca)
        out.append((f"edges required {pair} LIB/PCA [mean LIB {'<' if strict else '<='} PCA]",
                    [f"{a}/{b}" for a, b in zip(lib, pca, strict=True)],
                    _v(ok) + f" ({np.mean(lib):.0f} vs {np.mean(pca):.0f})"))
        if pair == PAIRS[0]:
            wins = sum(a < b for a, b in zip(lib, pca, strict=True))
            out.append(("  seed-wise LIB < PCA pre->mid [>= 3 of 5]", wins,
                        _v(wins >= min(3, len(ms)))))
    for pair in PAIRS[:2]:
        lib = [m["edge_mass_n99"]["lib"][pair] for m in ms]
        pca = [m["edge_mass_n99"]["pca"][pair] for m in ms]
        out.append((f"n99 {pair} LIB/PCA [mean LIB < PCA]",
                    [f"{a}/{b}" for a, b in zip(lib, pca, strict=True)],
                    _v(np.mean(lib) < np.mean(pca))))
    if all("same_frequency_edge_fraction" in m for m in ms):
        lib = [m["same_frequency_edge_fraction"]["lib"][PAIRS[0]] for m in ms]
        pca = [m["same_frequency_edge_fraction"]["pca"][PAIRS[0]] for m in ms]
        out.append(("same-frequency edge fraction pre->mid LIB/PCA [LIB >= 0.75, > PCA]",
                    [f"{a:.2f}/{b:.2f}" for a, b in zip(lib, pca, strict=True)],
                    _v(all(a >= 0.75 and a > b for a, b in zip(lib, pca, strict=True)))))
    if all("fourier_frequencies" in m for m in ms):
        ff = [m["fourier_frequencies"] for m in ms]
        freqs = [f["lib"]["resid_pre"]["relevant_frequencies"] for f in ff]
        out.append(("LIB key frequencies resid_pre [3-6 cos/sin pairs]", freqs,
                    _v(all(3 <= len(f) <= 6 for f in freqs))))
        knee = [m["node_ablation"]["lib"]["resid_pre"]["minimal_directions"] for m in ms]
        pred = [1 + 2 * len(f) for f in freqs]
        out.append(("  1 + 2 x frequencies vs LIB knee resid_pre [~, +-2]",
                    [f"{a}/{b}" for a, b in zip(pred, knee, strict=True)],
                    _v(all(b is not None and abs(a - b) <= 2
                           for a, b in zip(pred, knee, strict=True)))))
        for layer in LAYERS:  # both over LIB's relevant count at the layer
            ns = [m["n_relevant_directions"]["lib"][layer]["n_rel"] for m in ms]
            lib, pca = ([float(np.mean(f[b][layer]["purity"][:n]))
                         for f, n in zip(ff, ns, strict=True)] for b in ("lib", "pca"))
            out.append((f"Fourier purity {layer} LIB/PCA [mean LIB >= PCA - 0.02]",
                        [f"{a:.2f}/{b:.2f}" for a, b in zip(lib, pca, strict=True)],
                        _v(np.mean(lib) >= np.mean(pca) - 0.02)
                        + f" ({np.mean(lib):.2f} vs {np.mean(pca):.2f})"))
    build = [round(sum(m["build_seconds"]["lib"].values()), 2) for m in ms]
    out.append(("LIB build seconds (basis + edges) [<= 60 s CPU]", build,
                _v(all(b <= 60 for b in build))))
    q = [round(m["modularity_q"]["lib"]["gamma=1"], 3) for m in ms]
    out.append(("modularity Q (LIB, gamma=1) [report]", q, "-"))
    z = [m["communities"]["lib"]["gamma=1"].get("null_z") for m in ms]
    out.append(("  null z of Q (LIB, gamma=1) [report]",
                [None if v is None else round(v, 1) for v in z], "-"))
    return out


def _v(ok: bool) -> str:
    return "ok" if ok else "FAIL"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    ms = [io.read_json(Path(d) / "metrics.json") for d in argv]
    print("seeds:", [m["seed"] for m in ms])
    for name, vals, verdict in rows(ms):
        print(f"{name:<62} {verdict:<22} {vals}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
