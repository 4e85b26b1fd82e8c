"""The channel graph's checks on the induction transformer (issue 7; ``specs/toy-models.md``
section 8, ``specs/channel-graph.md`` T7).

* **Head roles** are measured from attention patterns on the analysis data: the
  previous-token head is the earlier-layer head with the largest mean attention from the
  position of ``M`` to the ``S`` before it; the induction head is the later-layer head
  with the largest attention from the last position to the position of ``M``.
* **Edges into the induction head**: E3 (driven variance, the block-level weight), its
  finite (ablation) version, its signed variant and E4 (channel edges, largest and
  summed) from every admissible writer; the check is that the previous-token head is
  the top writer (reported per measure).
* **In-context loss** (cross-entropy of ``M`` at the last position) with parts of the
  model mean-ablated, each a projector configuration as in the compression test: node
  ``k``'s write becomes ``o_bar_k + (o_k - o_bar_k) P_k`` and block ``b``'s read
  ``r_bar_b + (r_b - r_bar_b) Q_b``. The in-context loss reduction is ``L_base - L_full``
  with ``L_base`` the model with every head mean-ablated; a circuit's recovery is
  ``(L_base - L_circuit) / (L_base - L_full)``. Circuits: the two heads with every other
  head mean-ablated (block level; the whole model when it has two heads), each head's
  ``eta``-rank write channels with its other channels mean-ablated (``write_eta``), the
  spec's compression of reads and writes at the ``eta`` ranks (``compressed_eta``), and
  the co-usage circuits of section 5 (every channel outside the circuit, ``embed``'s
  included, mean-ablated), and each head's top ``r`` write channels for ``r = 1, 2,
  ...`` (``recovery_by_write_rank``). Necessity: each head mean-ablated alone.
* **Per-position usage** (T7's usage hypothesis): the section 5 usage rule applied to
  every (example, position) row of the writers' per-position activities
  (:func:`~.usage.position_activity`); for each head, the rows where any of its channels
  is used, and the fraction of them at repeated-token positions (the token occurred
  earlier in the sequence; the spec's precision), at the position of ``M`` and at the
  last position.

References:
    Olsson et al. (2022), "In-context Learning and Induction Heads" (arXiv 2209.11895);
    Wang et al. (2022), "Interpretability in the Wild" (mean ablation, circuit
    faithfulness as recovered performance); specs/channel-graph.md sections 3-5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import fail
from .._types import Array
from ..graph import parse_node_id
from ..lib.stats import chunked_sum
from .adapters import as_float, head_name
from .model import ChannelModel, to_float64, trace
from .pipeline import ChannelAnalysis

__all__ = ["head_roles", "in_context_losses", "induction_recovery", "position_usage"]

Config = tuple[tuple[Any, ...], tuple[Any, ...]]  # (write projectors 0..n, read projectors 1..n)


def head_roles(model: Any, tokens: Any) -> dict[str, Any]:
    """``{"prev_token_head", "induction_head", "prev_token_score",
    "prev_token_at_m_score", "induction_score"}`` (names ``L{layer}H{head}``; scores
    ``(n_layers, n_heads)`` lists, see :func:`~jaxinterp.models.induction.head_scores`).
    The previous-token head is chosen by ``prev_token_at_m`` (attention from ``M`` to the
    ``S`` before it), the move the task needs."""
    from ..models.induction import head_scores

    s = head_scores(model, jnp.asarray(tokens))
    ind_layer, ind_head = np.unravel_index(np.argmax(s["induction"][1:]), s["induction"][1:].shape)
    ind_layer += 1
    prev = s["prev_token_at_m"][:ind_layer]
    prev_layer, prev_head = np.unravel_index(np.argmax(prev), prev.shape)
    return {"prev_token_head": head_name(int(prev_layer), int(prev_head)),
            "induction_head": head_name(int(ind_layer), int(ind_head)),
            "prev_token_score": s["prev_token"].tolist(),
            "prev_token_at_m_score": s["prev_token_at_m"].tolist(),
            "induction_score": s["induction"].tolist()}


def _edited_trace(model: ChannelModel, x: Any, cfg: Any) -> Any:
    (wm, wp), (rm, rp) = cfg
    n = model.n_blocks

    def write_edit(k: int, o: Array) -> Array:
        if k > n:
            return o
        return wm[k][None, :] + (o - wm[k][None, :]) @ wp[k]

    def read_edit(k: int, r: Array) -> Array:
        if k > n:
            return r
        return rm[k - 1][None, :] + (r - rm[k - 1][None, :]) @ rp[k - 1]

    return trace(model, x, read_edit=read_edit, write_edit=write_edit)


@eqx.filter_jit
def _losses(model: ChannelModel, xs: Any, labels: Array, stack: Any, chunk: int,
            batch: int) -> Array:
    def per_chunk(inp: Any, mask: Array, idx: Array) -> Array:
        x, lab = inp

        def one(cfg: Any) -> Array:
            y = jax.vmap(lambda e: _edited_trace(model, e, cfg).y[-1])(x)
            logp = jax.nn.log_softmax(y, axis=-1)
            ce = -jnp.take_along_axis(logp, lab[:, None], axis=-1)[:, 0]
            return jnp.dot(mask, ce)

        return jax.lax.map(one, stack, batch_size=batch)

    return chunked_sum(per_chunk, (xs, labels), chunk_size=chunk)


def in_context_losses(model: ChannelModel, xs: Any, labels: Any, configs: Sequence[Config], *,
                      chunk_size: int = 256, config_batch: int = 4) -> np.ndarray:
    """Mean cross-entropy of ``labels`` at the last output position under each
    configuration ``((write_means, write_projectors), (read_means, read_projectors))``
    (nodes ``0..n`` and blocks ``1..n``), float64.

    Raises:
        ValueError: if a configuration has the wrong number of projectors.
    """
    n = model.n_blocks

    def sizes(c: Any) -> tuple[int, ...]:
        try:
            return len(c[0][0]), len(c[0][1]), len(c[1][0]), len(c[1][1])
        except (IndexError, TypeError):
            return ()

    for c in configs:
        if sizes(c) != (n + 1, n + 1, n, n):
            raise fail("in_context_losses", "configs", f"(means, projectors) pairs for {n + 1} "
                       f"writers and {n} readers", sizes(c))
    with jax.enable_x64(True):
        stack = jax.tree_util.tree_map(lambda *a: jnp.asarray(np.stack(a)), *configs)
        xs = as_float(xs)
        lab = jnp.asarray(labels)
        out = _losses(to_float64(model), xs, lab, stack, int(chunk_size), int(config_batch))
        return np.asarray(out, np.float64) / lab.shape[0]


def _config(res: ChannelAnalysis, keep_writes: dict[int, Any], keep_reads: dict[int, int]
            ) -> Config:
    """Write projectors: node ``k`` in ``keep_writes`` keeps the listed channels (``"all"``:
    identity, ``[]``: mean ablation); nodes not listed are kept whole. Reads: block
    ``k`` in ``keep_reads`` is projected onto its leading ``r`` read covectors."""
    nodes = res.channels.nodes
    n = len(nodes) - 2
    wm, wp, rm, rp = [], [], [], []
    for k in range(n + 1):
        c = nodes[k]
        d = c.write_mean.shape[0]
        keep = keep_writes.get(k, "all")
        wm.append(np.asarray(c.write_mean))
        if isinstance(keep, str):
            wp.append(np.eye(d))
        else:
            idx = list(keep)
            wp.append(c.write_readout[:, idx] @ c.write_vectors[:, idx].T if idx
                      else np.zeros((d, d)))
    for k in range(1, n + 1):
        c = nodes[k]
        d = c.read_mean.shape[0]
        rm.append(np.asarray(c.read_mean))
        if k in keep_reads:
            v = c.V[:, : keep_reads[k]]
            rp.append(v @ v.T)
        else:
            rp.append(np.eye(d))
    return (tuple(wm), tuple(wp)), (tuple(rm), tuple(rp))


def _writer_edges(res: ChannelAnalysis, names: tuple[str, ...], b: int) -> dict[str, Any]:
    out = {}
    for (a, bb), w in res.causal.w.items():
        if bb != b:
            continue
        e4 = res.causal.channel[(a, b)]
        out[names[a]] = {"driven_variance": w, "signed": res.causal.signed[(a, b)],
                         "ablation": res.causal.ablation[(a, b)],
                         "channel_max": float(np.max(e4, initial=0.0)),
                         "channel_sum": float(np.sum(e4))}
    return out


def position_usage(model: Any, res: ChannelAnalysis, xs: Any, names: tuple[str, ...],
                   heads: dict[str, str], *, attention: str = "full", frac: float = 0.9,
                   n_ref: int = 4, key: Any = None) -> dict[str, Any]:
    """T7's usage hypothesis on the induction task: where the heads' channels are used.

    Args:
        model: the induction transformer; res: its channel-graph analysis; xs: tokens
            ``(N, P)``; names: node names; heads: ``{role: head name}``.
        attention: the linearisation of ``res``.
        frac: the usage rule's activity fraction.
        n_ref, key: references of ``D`` (default key 0).

    Returns:
        per role: ``rows_used`` (fraction of (example, position) rows using the head),
        ``precision_repeated`` (fraction of those rows at repeated-token positions),
        ``at_m`` and ``at_last`` (fractions at the position of ``M`` and at the last
        position), ``recall_last`` (fraction of examples whose last position uses it);
        plus ``repeated_fraction`` (of all rows).
    """
    from .adapters import channel_model_for
    from .usage import position_activity, usage_matrix

    tokens = np.asarray(xs)
    with jax.enable_x64(True):
        cm = channel_model_for("induction", model, attention=attention)
    key = jax.random.key(0) if key is None else key
    act, ids = position_activity(cm, res.graph, jnp.asarray(tokens),
                                 [c.write_mean for c in res.channels.nodes], n_ref=n_ref,
                                 key=key)
    n, p, m = act.shape
    use = usage_matrix(act.reshape(n * p, m), frac).reshape(n, p, m)
    # repeated-token position: the token occurred at an earlier position
    earlier = np.any((tokens[:, :, None] == tokens[:, None, :]) & np.tri(p, k=-1, dtype=bool),
                     axis=-1)
    first_s = np.argmax(tokens == model.special, axis=1)
    pos = np.arange(p)[None, :]
    at_m, at_last = pos == (first_s + 1)[:, None], pos == p - 1
    out: dict[str, Any] = {"repeated_fraction": float(earlier.mean())}
    for role, head in heads.items():
        cols = [i for i, u in enumerate(ids) if parse_node_id(u)[0] == head]
        used = use[:, :, cols].any(axis=-1)
        k = int(used.sum())
        out[role] = {
            "head": head,
            "rows_used": float(used.mean()),
            "precision_repeated": float((used & earlier).sum() / k) if k else None,
            "at_m": float((used & at_m).sum() / k) if k else None,
            "at_last": float((used & at_last).sum() / k) if k else None,
            "recall_last": float(used[:, -1].mean()),
        }
    return out


def induction_recovery(model: Any, res: ChannelAnalysis, xs: Any, names: tuple[str, ...], *,
                       attention: str = "full") -> dict[str, Any]:
    """The induction checks of a channel-graph analysis ``res`` of the ``induction``
    target on tokens ``xs``.

    Returns:
        ``{"roles", "edges_into_induction", "top_writer" (per measure),
        "top_edge_is_prev_token" (per measure), "losses", "in_context_loss_reduction",
        "recovery", "recovery_by_write_rank", "necessity", "eta_ranks", "co_usage"}`` (see
        the module docstring).
    """
    from ..models.induction import labels_of
    from .adapters import channel_model_for

    tokens = np.asarray(xs)
    roles = head_roles(model, tokens[:512])
    prev, ind = names.index(roles["prev_token_head"]), names.index(roles["induction_head"])
    edges = _writer_edges(res, names, ind)
    measures = ("driven_variance", "ablation", "signed", "channel_max", "channel_sum")
    top = {m: max(edges, key=lambda a, m=m: edges[a][m]) for m in measures}
    n = len(names) - 2
    heads = range(1, n + 1)
    cs = res.channels
    eta_out = {k: list(range(cs.rank_out(k))) for k in heads}
    eta_in = {k: cs.rank_in(k) for k in heads}
    others = {k: [] for k in heads if k not in (prev, ind)}
    configs = {
        "full": _config(res, {}, {}),
        "base": _config(res, {k: [] for k in heads}, {}),
        "two_heads": _config(res, others, {}),
        "write_eta": _config(res, {**{k: eta_out[k] for k in (prev, ind)}, **others}, {}),
        "compressed_eta": _config(res, {**{k: eta_out[k] for k in (prev, ind)}, **others},
                                  {k: eta_in[k] for k in (prev, ind)}),
        "ablate_prev_token": _config(res, {prev: []}, {}),
        "ablate_induction": _config(res, {ind: []}, {}),
    }
    r_max = max(cs.graph_rank(k) for k in (prev, ind))
    for r in range(1, r_max + 1):
        top_r = {k: list(range(min(r, cs.graph_rank(k)))) for k in (prev, ind)}
        configs[f"write_rank_{r}"] = _config(res, {**top_r, **others}, {})
    circuits = [c for c in res.circuits
                if any(m.startswith(names[prev] + "/") for m in c["members"])
                or any(m.startswith(names[ind] + "/") for m in c["members"])]
    for i, c in enumerate(circuits):
        ids = [parse_node_id(m) for m in c["members"]]
        keep = {k: [j for la, j in ids if la == names[k]] for k in range(n + 1)}
        configs[f"co_usage_{i}"] = _config(res, keep, {})
    with jax.enable_x64(True):
        cm = channel_model_for("induction", model, attention=attention)
    labels = np.asarray(labels_of(jnp.asarray(tokens), model.n_tokens))
    vals = in_context_losses(cm, tokens, labels, list(configs.values()))
    losses = dict(zip(configs, map(float, vals), strict=True))
    red = losses["base"] - losses["full"]

    def rec(key: str) -> float | None:
        return (losses["base"] - losses[key]) / red if red > 0 else None

    return {
        "roles": roles,
        "edges_into_induction": edges,
        "top_writer": top,
        "top_edge_is_prev_token": {m: top[m] == names[prev] for m in measures},
        "losses": losses,
        "in_context_loss_reduction": red,
        "recovery": {k: rec(k) for k in configs if k not in ("full", "base")
                     and not k.startswith(("ablate_", "write_rank_"))},
        "recovery_by_write_rank": [rec(f"write_rank_{r}") for r in range(1, r_max + 1)],
        "necessity": {k: rec(k) for k in ("ablate_prev_token", "ablate_induction")},
        "eta_ranks": {names[k]: [eta_in[k], len(eta_out[k])] for k in (prev, ind)},
        "co_usage": [{"members": c["members"], "support": c["support"]} for c in circuits],
        "position_usage": None if res.graph is None else position_usage(
            model, res, tokens, names, {"prev_token_head": roles["prev_token_head"],
                                        "induction_head": roles["induction_head"]},
            attention=attention),
    }
