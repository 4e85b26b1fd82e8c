"""The induction transformer (``toy-models.md`` section 8) and its cut into attention-head
channel blocks: data, the fast training path, the ``full`` and ``frozen_pattern``
linearisations against autodiff and finite differences, and the induction checks on a
tiny untrained model (the trained checks are slow-marked in test_channel_toys.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp.channel.adapters import attention_model, channel_model_for
from jaxinterp.channel.edges import CausalEdges
from jaxinterp.channel.induction import in_context_losses, induction_recovery
from jaxinterp.channel.model import trace
from jaxinterp.channel.pipeline import ChannelAnalysis
from jaxinterp.channel.stats import channel_stats
from jaxinterp.channel.subspaces import channels_from_stats
from jaxinterp.models import get_target
from jaxinterp.models.induction import (
    InductionTransformer,
    final_logits,
    head_forward,
    head_scores,
    induction_batch,
    labels_of,
    match_positions,
)

N_TOK, N_CTX = 10, 12


@pytest.fixture(scope="module")
def tiny():
    target = get_target("induction")
    cfg = target.config(n_tokens=N_TOK, n_ctx=N_CTX, d_model=8, d_head=4)
    model = target.init(cfg, jax.random.key(0))
    assert isinstance(model, InductionTransformer)
    tokens = induction_batch(jax.random.key(1), 24, N_CTX, N_TOK)
    return model, tokens


def test_batch_structure_and_labels(tiny):
    _, tok = tiny
    tok = np.asarray(tok)
    s, bos = N_TOK + 1, N_TOK
    assert (tok[:, 0] == bos).all() and (tok[:, -1] == s).all() and (tok[:, -2] < N_TOK).all()
    assert ((tok == s).sum(1) == 2).all() and ((tok == bos).sum(1) == 1).all()
    first = np.argmax(tok == s, axis=1)
    assert (first >= 1).all() and (first <= N_CTX - 4).all()
    np.testing.assert_array_equal(np.asarray(labels_of(jnp.asarray(tok), N_TOK)),
                                  tok[np.arange(len(tok)), first + 1])
    np.testing.assert_array_equal(np.asarray(match_positions(jnp.asarray(tok), N_TOK)),
                                  first + 1)
    assert (np.asarray(labels_of(jnp.asarray(tok), N_TOK)) < N_TOK).all()


def test_fast_path_and_head_scores(tiny):
    model, tok = tiny
    np.testing.assert_allclose(np.asarray(final_logits(model, tok)),
                               np.asarray(jax.vmap(model)(tok)[:, -1]), rtol=1e-5, atol=1e-5)
    s = head_scores(model, tok)
    pats = np.asarray(jax.vmap(model.patterns)(tok))  # (B, L, H, P, P)
    np.testing.assert_allclose(pats.sum(-1), 1.0, rtol=1e-5)
    m = np.asarray(match_positions(tok, N_TOK))
    b = np.arange(len(m))
    np.testing.assert_allclose(s["induction"][1, 0], pats[b, 1, 0, -1, m].mean(), rtol=1e-5)
    np.testing.assert_allclose(s["prev_token_at_m"][0, 0], pats[b, 0, 0, m, m - 1].mean(),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="tokens"):
        model(tok)


def test_cut_reproduces_the_model_and_linearisations(tiny, getkey):
    """The cuts give the model's last-position logits; ``frozen_pattern``'s JVP is the
    OV map under the clean pattern, ``full``'s matches finite differences and is the sum
    of ``frozen_pattern``'s and ``qk``'s."""
    model, tok = tiny
    with jax.enable_x64(True):
        full = attention_model(model, "full")
        frozen = channel_model_for("induction", model, attention="frozen_pattern")
        assert full.names == ("L0H0", "L1H0") and full.depths == (0, 1)
        y = jax.vmap(lambda x: trace(frozen, x).y)(tok)  # (B, 1, vocab)
        np.testing.assert_allclose(np.asarray(y[:, 0]), np.asarray(jax.vmap(model)(tok)[:, -1]),
                                   rtol=1e-4, atol=1e-5)
        x = tok[3]
        r = trace(full, x).reads[1]  # the stream read by layer 1
        t = jax.random.normal(getkey(), r.shape, jnp.float64)
        w_q, w_k, w_v, w_o, pos = frozen.blocks[1].params
        pattern = head_forward(w_q, w_k, w_v, w_o, pos, r)["pattern"]
        _, jt = jax.jvp(frozen.blocks[1], (r,), (t,))
        np.testing.assert_allclose(np.asarray(jt), np.asarray(pattern @ (t @ w_v) @ w_o),
                                   rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(frozen.blocks[1](r)), np.asarray(full.blocks[1](r)),
                                   rtol=1e-12)
        _, jf = jax.jvp(full.blocks[1], (r,), (t,))
        eps = 1e-6
        fd = (full.blocks[1](r + eps * t) - full.blocks[1](r - eps * t)) / (2 * eps)
        np.testing.assert_allclose(np.asarray(jf), np.asarray(fd), rtol=1e-6, atol=1e-8)
        assert float(jnp.abs(jf - jt).max()) > 1e-6  # the QK path contributes
        qk = channel_model_for("induction", model, attention="qk")
        _, jq = jax.jvp(qk.blocks[1], (r,), (t,))
        np.testing.assert_allclose(np.asarray(jt + jq), np.asarray(jf), rtol=1e-9, atol=1e-12)
        # the QK path splits into Q- and K-composition; K alone against finite differences
        # of the head with only its key input moved
        lin = {a: jax.jvp(channel_model_for("induction", model, attention=a).blocks[1], (r,),
                          (t,))[1] for a in ("q", "k")}
        np.testing.assert_allclose(np.asarray(lin["q"] + lin["k"]), np.asarray(jq), rtol=1e-9,
                                   atol=1e-12)

        def keys_moved(e):
            q, k, v = (r + pos) @ w_q, (r + e * t + pos) @ w_k, r @ w_v
            n = r.shape[0]
            scaled = q @ k.T / jnp.sqrt(float(w_q.shape[-1]))
            scores = jnp.where(jnp.tril(jnp.ones((n, n), bool)), scaled, -jnp.inf)
            return jax.nn.softmax(scores, axis=-1) @ v @ w_o

        fd_k = (keys_moved(eps) - keys_moved(-eps)) / (2 * eps)
        np.testing.assert_allclose(np.asarray(lin["k"]), np.asarray(fd_k), rtol=1e-6, atol=1e-8)
        assert float(jnp.abs(lin["k"]).max()) > 1e-6 and float(jnp.abs(lin["q"]).max()) > 1e-6


def test_in_context_losses_against_direct_ablation(tiny, getkey):
    model, tok = tiny
    with jax.enable_x64(True):
        cm = channel_model_for("induction", model)
    st = channel_stats(cm, tok, probes="random", n_probes=8, key=getkey())
    cs = channels_from_stats(st, cm.node_names)
    # synthetic edges (causal_edges is tested in test_channel_core): embed -> L1H0 is the
    # larger block edge, L0H0 -> L1H0 the larger channel edge
    pairs = [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]
    val = {(0, 2): (2.0, 0.1), (1, 2): (0.5, 0.3)}
    ce = CausalEdges(
        w={p: val.get(p, (1.0, 0.0))[0] for p in pairs},
        signed={p: val.get(p, (1.0, 0.0))[0] for p in pairs},
        channel={p: np.full((2, 2), val.get(p, (1.0, 0.2))[1]) for p in pairs},
        null_w={}, null_channel={}, non_additivity={},
        ablation={p: val.get(p, (1.0, 0.0))[0] for p in pairs})
    res = ChannelAnalysis(st, cs, None, None, None, ce, None, None, None, None, None, None, [],
                          [], None, {})
    rec = induction_recovery(model, res, tok, cm.node_names)
    labels = np.asarray(labels_of(tok, N_TOK))
    logits = np.asarray(jax.vmap(model)(tok)[:, -1], np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    direct = -logp[np.arange(len(labels)), labels].mean()
    assert rec["losses"]["full"] == pytest.approx(direct, rel=1e-5)
    assert rec["losses"]["two_heads"] == rec["losses"]["full"]  # the model has two heads
    # every head at its mean write: the output is the unembedded mean stream
    with jax.enable_x64(True):
        m64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), model)
        means = [cs.nodes[k].write_mean for k in (1, 2)]
        r = m64.W_E[tok[:, -1]] + means[0][None] + means[1][None]
        lp = jax.nn.log_softmax(r @ m64.W_U, axis=-1)
        base = -float(jnp.mean(jnp.take_along_axis(lp, jnp.asarray(labels)[:, None], 1)))
    assert rec["losses"]["base"] == pytest.approx(base, rel=1e-8)
    assert rec["roles"]["induction_head"] == "L1H0" and rec["roles"]["prev_token_head"] == "L0H0"
    assert rec["top_edge_is_prev_token"] == {"driven_variance": False, "ablation": False,
                                             "signed": False, "channel_max": True,
                                             "channel_sum": True}
    edges = rec["edges_into_induction"]
    assert set(edges) == {"embed", "L0H0"}
    assert edges["L0H0"]["driven_variance"] == 0.5 and edges["L0H0"]["channel_sum"] == 1.2
    assert len(rec["recovery_by_write_rank"]) == max(cs.graph_rank(1), cs.graph_rank(2))
    with pytest.raises(ValueError, match="projectors"):
        in_context_losses(cm, tok, labels, [((), ())])


def test_position_usage_of_the_heads(tiny, getkey):
    from jaxinterp.channel.induction import position_usage
    from jaxinterp.channel.pipeline import ChannelGraphConfig, channel_graph

    model, tok = tiny
    with jax.enable_x64(True):
        cm = channel_model_for("induction", model)
    cfg = ChannelGraphConfig(probes="random", n_probes=8, n_null=2, n_null_graphs=0,
                             usage=False, prune="roundoff", plots=False)
    res = channel_graph(cm, tok, cfg, key=getkey())
    pu = position_usage(model, res, tok, cm.node_names,
                        {"prev": "L0H0", "ind": "L1H0"})
    # the last layer's write reaches the output (read at the last position) only from
    # the last position, so the induction head is used nowhere else
    assert pu["ind"]["rows_used"] > 0 and pu["ind"]["at_last"] == 1.0
    assert pu["ind"]["recall_last"] == pytest.approx(pu["ind"]["rows_used"] * tok.shape[1])
    for role in ("prev", "ind"):
        for key in ("precision_repeated", "at_m", "at_last"):
            v = pu[role][key]
            assert v is None or 0.0 <= v <= 1.0
