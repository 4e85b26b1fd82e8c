"""Ground-truth checks of a channel graph on the toys with planted modules
(``planted-channels``: spec T1; ``block-mlp``: spec T2; ``induction``: see
:mod:`.induction`): module labels of the channel
nodes, principal angles to the planted subspaces, edge leakage off the planted pairs,
components, ARI, compression and usage precision/recall.

References:
    specs/channel-graph.md section 8 (project method).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.linalg import subspace_angles

from ..graph import parse_node_id
from .pipeline import ChannelAnalysis

__all__ = ["channel_labels", "planted_recovery"]


def _halves(v: np.ndarray, split: int) -> int:
    return int(np.linalg.norm(v[split:]) > np.linalg.norm(v[:split]))


def channel_labels(target: str, model: Any, res: ChannelAnalysis) -> dict[str, int] | None:
    """Planted module (0/1) of every channel node, or ``None`` without ground truth."""
    cg = res.graph
    out: dict[str, int] = {}
    if target == "planted-channels":
        m = model.to_float64() if hasattr(model, "to_float64") else model
        gt = m.ground_truth()
        s1, s2 = np.asarray(m.basis("S1")), np.asarray(m.basis("S2"))
        r = len(gt["module_of_output"]) // 2
        for la in cg.layers:
            for j, nid in enumerate(la.ids):
                w = np.asarray(la.basis)[:, j]
                if la.name == "embed":
                    out[nid] = int(np.linalg.norm(s2.T @ w) > np.linalg.norm(s1.T @ w))
                elif la.name == "unembed":
                    out[nid] = _halves(w, r)
                else:
                    out[nid] = gt["module_of_block"][la.name]
        return out
    if target == "block-mlp":
        for la in cg.layers:
            half = np.asarray(la.basis).shape[0] // 2
            for j, nid in enumerate(la.ids):
                out[nid] = _halves(np.asarray(la.basis)[:, j], half)
        return out
    return None


def _precision_recall(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    tp = float((pred & truth).sum())
    return {"precision": tp / max(float(pred.sum()), 1.0),
            "recall": tp / max(float(truth.sum()), 1.0)}


def _usage_check(res: ChannelAnalysis, labels: dict[str, int], truth: np.ndarray,
                 skip: tuple[str, ...]) -> dict[str, Any]:
    ids = list(res.graph.node_ids)
    use = res.usage
    act = np.asarray(res.activity, np.float64)
    blocks = [i for i, u in enumerate(ids) if parse_node_id(u)[0] not in skip]
    total = np.maximum(act[:, blocks].sum(axis=1), 1e-300)
    out = {}
    for mod in (0, 1):
        cols = [i for i, u in enumerate(ids)
                if labels[u] == mod and parse_node_id(u)[0] not in skip]
        pred = use[:, cols].any(axis=1)
        a = act[:, cols].sum(axis=1)
        share = a / total
        on, off = truth[:, mod], ~truth[:, mod]
        off_other_on = off & truth[:, 1 - mod]
        out[f"module{mod}"] = {
            **_precision_recall(pred, truth[:, mod]),
            # diagnostics. Precision: the module's activity where its inputs are zero,
            # relative to where they are not, and its share of the blocks' activity
            # where it is off and the other module on. Recall: how often the module
            # holds less than 10 % of the activity where it is on (the 90 % rule then
            # leaves it out).
            "off_to_on_activity": (float(a[off].mean() / a[on].mean())
                                   if off.any() and on.any() and a[on].mean() > 0 else None),
            "share_when_off": (float(share[off_other_on].mean()) if off_other_on.any()
                               else None),
            "share_below_0.1_when_on": float((share[on] < 0.1).mean()) if on.any() else None,
        }
    out["min_precision"] = min(v["precision"] for k, v in out.items() if k.startswith("module"))
    out["min_recall"] = min(v["recall"] for k, v in out.items() if k.startswith("module"))
    circ = [sorted({labels[u] for u in c["members"]}) for c in res.circuits]
    out["circuit_modules"] = circ
    out["circuits_pure"] = all(len(c) == 1 for c in circ)
    out["modules_covered"] = sorted({c[0] for c in circ if len(c) == 1})
    return out


def _leak(values: dict, planted: set, names: tuple[str, ...]) -> dict[str, float]:
    on = [abs(v) for (a, b), v in values.items() if (names[a], names[b]) in planted]
    off = [abs(v) for (a, b), v in values.items() if (names[a], names[b]) not in planted]
    top = max(on, default=0.0)
    return {"min_planted": float(min(on, default=0.0)),
            "max_off_planted_relative": float(max(off, default=0.0) / top) if top else None}


def planted_recovery(target: str, model: Any, res: ChannelAnalysis, xs: Any,
                     names: tuple[str, ...]) -> dict[str, Any] | None:
    """The T1 / T2 checks of ``res``, the induction checks of
    :func:`~.induction.induction_recovery` for ``induction``, ``None`` for targets without
    ground truth."""
    if target == "induction":
        from .induction import induction_recovery

        return induction_recovery(model, res, xs, names)
    labels = channel_labels(target, model, res)
    if labels is None:
        return None
    mods = res.modules.get("gamma=1", {})
    out: dict[str, Any] = {"ari": mods.get("ari"), "n_communities": mods.get("n_communities"),
                           "modularity_q": mods.get("modularity_q")}
    x = np.asarray(xs)
    if target == "planted-channels":
        m = model.to_float64() if hasattr(model, "to_float64") else model
        gt = m.ground_truth()
        planted = {tuple(p) for p in gt["planted_pairs"]}
        angles = {}
        for k, name in enumerate(names[1:-1], start=1):
            c = res.channels.nodes[k]
            nr = int((c.read_lambdas > 1e-10 * c.read_lambdas.max()).sum())
            nw = int((c.write_mus > 1e-10 * c.write_mus.max()).sum())
            read = np.asarray(m.basis(gt["read_group"][name]))
            write = np.linalg.qr(np.asarray(m.write_map(name)).T)[0]
            angles[name] = {
                "read_rank": nr, "write_rank": nw,
                "read_angle": float(subspace_angles(read, c.V[:, :nr]).max()),
                "write_angle": float(subspace_angles(write, c.U[:, :nw]).max()),
            }
        out["blocks"] = angles
        out["max_angle"] = max(max(v["read_angle"], v["write_angle"]) for v in angles.values())
        e4 = {p: float(np.max(v, initial=0.0)) for p, v in res.causal.channel.items()}
        out["E1"] = _leak({p: v["overlap"] for p, v in res.geometric.items()}, planted, names)
        out["E3"] = _leak(res.causal.w, planted, names)
        out["E4"] = _leak(e4, planted, names)
        want = [["A1", "A2"], ["B1", "B2"]] if m.kappa == 0 else [["A1", "B1", "A2", "B2"]]
        out["components"] = res.components
        out["components_ok"] = res.components == want
        truth = np.stack([np.any(x[:, :3] != 0, axis=1), np.any(x[:, 3:] != 0, axis=1)], 1)
        skip = ("embed", "unembed")
    else:
        out["cross_mass"] = _cross_mass(res, labels)
        out["channel_components"] = [sorted({parse_node_id(u)[0] for u in c})
                                     for c in res.channel_components]
        half = x.shape[1] // 2
        truth = np.stack([np.any(x[:, :half] != 0, axis=1),
                          np.any(x[:, half:] != 0, axis=1)], 1)
        skip = ("embed", "unembed")
    comp = res.compression
    out["compression_all_numerical"] = comp["all_numerical"]
    out["min_drop_weakest"] = min(min(comp["drop_weakest_read"].values()),
                                  min(comp["drop_weakest_write"].values()))
    if res.activity is not None:
        out["usage"] = _usage_check(res, labels, truth, skip)
    return out


def _cross_mass(res: ChannelAnalysis, labels: dict[str, int]) -> float:
    """Cross-module E4 mass over total (unpruned edges)."""
    cross = total = 0.0
    names = res.channels.names
    for (a, b), e in res.causal.channel.items():
        for i in range(e.shape[0]):
            for j in range(e.shape[1]):
                total += e[i, j]
                if labels[f"{names[b]}/{i}"] != labels[f"{names[a]}/{j}"]:
                    cross += e[i, j]
    return cross / total if total > 0 else 0.0
