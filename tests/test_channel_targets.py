"""Channel-graph cuts of the trained targets of spec T4-T6 (``resid-mlp-1``,
``resid-mlp-2``, ``modadd``) on tiny untrained instances: the cuts reproduce the models,
the ``span`` stream coordinates of a residual MLP give the same spectra and edges as the
full stream, the exact rank bound ``d_mlp`` holds, the T4-T6 checks compute what they
say on hand-made inputs, and a tiny CLI run per target writes its metrics. (The runs on
the trained targets are experiments: ``experiments/channel_graph.md``.)"""

import dataclasses
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import cli, io
from jaxinterp.channel.adapters import (
    channel_model_for,
    modadd_model,
    resid_mlp_model,
    resid_stream_basis,
)
from jaxinterp.channel.assemble import load_json
from jaxinterp.channel.edges import causal_edges
from jaxinterp.channel.model import to_float64, trace
from jaxinterp.channel.pipeline import ChannelGraphConfig
from jaxinterp.channel.stats import channel_stats
from jaxinterp.channel.subspaces import channels_from_stats, numerical_rank
from jaxinterp.models import get_target
from jaxinterp.models.data import sparse_uniform
from jaxinterp.models.modadd import key_frequencies, tokens_of

F, D, D_MLP = 10, 40, 3
TINY_MODADD = {"p": 7, "d_model": 16, "n_heads": 2, "d_head": 4, "d_mlp": 16}


def _resid(n_layers, key=0):
    target = get_target("resid-mlp-2" if n_layers > 1 else "resid-mlp-1")
    cfg = target.config(n_features=F, d_resid=D, d_mlp=D_MLP, n_layers=n_layers)
    model = target.init(cfg, jax.random.key(key))
    # the zoo init is tiny (U(+-sqrt(6 / (d_resid d_mlp)))); scale up so the MLPs matter
    return eqx.tree_at(lambda m: [w for lay in m.layers for w in (lay.mlp_in, lay.mlp_out)],
                       model, replace_fn=lambda w: 8.0 * w)


def _modadd(key=0):
    target = get_target("modadd")
    return target.init(target.config(**TINY_MODADD), jax.random.key(key))


def _all_tokens(p):
    pairs = np.stack(np.meshgrid(np.arange(p), np.arange(p), indexing="ij"), -1).reshape(-1, 2)
    return tokens_of(jnp.asarray(pairs), p)


@pytest.mark.parametrize("attention", ["full", "frozen_pattern", "qk"])
def test_modadd_cut_sums_back_to_the_model(attention):
    """embed + the 4 (here 2) heads + the MLP, summed on the stream, give the model's
    last-position logits to float64 round-off; the heads alone sum to the attention
    layer's output with ``b_O``."""
    model = _modadd()
    tok = _all_tokens(TINY_MODADD["p"])
    with jax.enable_x64(True):
        m64 = to_float64(model)
        cm = channel_model_for("modadd", m64, attention=attention)
        tr = jax.vmap(lambda t: trace(cm, t))(tok)
        ref = jax.vmap(m64)(tok)
        np.testing.assert_allclose(np.asarray(tr.y[:, 0]), np.asarray(ref[:, -1]),
                                   rtol=1e-12, atol=1e-12)
        _, cache = jax.vmap(m64.forward_with_cache)(tok)
        heads = sum(tr.writes[1:1 + TINY_MODADD["n_heads"]])
        attn_out = cache[".blocks[0].attn.W_O"][1] + m64.blocks[0].attn.b_O[None, None, :]
        np.testing.assert_allclose(np.asarray(heads), np.asarray(attn_out), rtol=1e-12,
                                   atol=1e-12)
        with pytest.raises(ValueError, match="model"):
            modadd_model(eqx.tree_at(lambda mm: mm.blocks, m64, m64.blocks * 2), attention)
    assert cm.names == ("L0H0", "L0H1", ".blocks[0].mlp") and cm.depths == (0, 0, 1)
    assert cm.output == "softmax" and tr.y.shape[1:] == (1, TINY_MODADD["p"] + 1)


def test_modadd_head_linearisations_add_up(getkey):
    """``full`` JVP of a head = ``frozen_pattern`` + ``qk``; ``frozen_pattern`` is linear
    in the stream except for its biases (the OV map under the clean pattern)."""
    model = _modadd()
    tok = _all_tokens(TINY_MODADD["p"])[5]
    with jax.enable_x64(True):
        m64 = to_float64(model)
        cms = {a: modadd_model(m64, a) for a in ("full", "frozen_pattern", "qk", "q", "k")}
        r = trace(cms["full"], tok).reads[0]
        t = jax.random.normal(getkey(), r.shape, jnp.float64)
        jv = {a: jax.jvp(cm.blocks[0], (r,), (t,))[1] for a, cm in cms.items()}
        np.testing.assert_allclose(np.asarray(jv["full"]),
                                   np.asarray(jv["frozen_pattern"] + jv["qk"]), atol=1e-12)
        h = cms["frozen_pattern"].blocks[0]
        lin = jax.jvp(h, (r,), (2.0 * t,))[1]
        np.testing.assert_allclose(np.asarray(lin), 2.0 * np.asarray(jv["frozen_pattern"]),
                                   atol=1e-12)
        assert float(jnp.max(jnp.abs(jv["qk"]))) > 1e-8  # the QK path is not empty
        np.testing.assert_allclose(np.asarray(jv["q"] + jv["k"]), np.asarray(jv["qk"]),
                                   atol=1e-12)  # Q- plus K-composition


@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("stream", ["full", "span"])
def test_resid_cut_reproduces_the_model(n_layers, stream):
    model = _resid(n_layers)
    x = sparse_uniform(jax.random.key(1), 64, F, 0.2, -1.0, 1.0, "allow")
    with jax.enable_x64(True):
        m64 = to_float64(model)
        cm = resid_mlp_model(m64, stream)
        y = jax.vmap(lambda e: trace(cm, e).y[0])(x.astype(jnp.float64))
        ref = jax.vmap(m64)(x.astype(jnp.float64))
        d = trace(cm, x[0].astype(jnp.float64)).reads[0].shape[-1]
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-12, atol=1e-12)
    q = resid_stream_basis(model)
    assert q.shape == (D, F + n_layers * D_MLP)
    np.testing.assert_allclose(q.T @ q, np.eye(q.shape[1]), atol=1e-12)
    assert d == (D if stream == "full" else q.shape[1])


@pytest.fixture(scope="module")
def resid2_runs():
    """Channels and edges of a 2-layer residual MLP in both stream coordinates."""
    model = _resid(2)
    x = sparse_uniform(jax.random.key(2), 200, F, 0.3, -1.0, 1.0, "allow")
    out = {}
    for stream in ("full", "span"):
        with jax.enable_x64(True):
            cm = resid_mlp_model(to_float64(model), stream)
        st = channel_stats(cm, x, chunk_size=100)
        cs = channels_from_stats(st, cm.node_names)
        ce = causal_edges(cm, cs, x, n_null=1, chunk_size=100, key=jax.random.key(3))
        out[stream] = (cm, cs, ce)
    return model, x, out


def test_span_coordinates_give_the_full_stream_spectra_and_edges(resid2_runs):
    _, _, runs = resid2_runs
    (_, full, e_full), (_, span, e_span) = runs["full"], runs["span"]
    for a, b in zip(full.nodes, span.nodes, strict=True):
        for field in ("read_lambdas", "write_mus"):
            va, vb = getattr(a, field), getattr(b, field)
            if va is None:
                assert vb is None
                continue
            r = numerical_rank(va)
            assert r == numerical_rank(vb) and r > 0
            np.testing.assert_allclose(vb[:r], va[:r], rtol=1e-7, atol=1e-12 * va[0])
    for p, w in e_full.w.items():
        np.testing.assert_allclose(e_span.w[p], w, rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(e_span.channel[p], e_full.channel[p], rtol=1e-6,
                                   atol=1e-10 * max(e_full.channel[p].max(initial=0), 1e-300))


def test_mlp_ranks_obey_the_exact_bound(resid2_runs):
    """The MLP Jacobian is ``W_in D(x) W_out``: read and write ranks <= d_mlp (3), while
    the embedding writes all F = 10 features (so the bound is not trivially met)."""
    _, _, runs = resid2_runs
    _, cs, _ = runs["span"]
    for k in (1, 2):
        assert 1 <= numerical_rank(cs.nodes[k].read_lambdas) <= D_MLP
        assert 1 <= numerical_rank(cs.nodes[k].write_mus) <= D_MLP
    assert numerical_rank(cs.nodes[0].write_mus) == F


def test_bad_inputs_name_the_argument():
    model = _modadd()
    with pytest.raises(ValueError, match="attention"):
        channel_model_for("modadd", model, attention="ov")
    with pytest.raises(ValueError, match="stream"):
        channel_model_for("modadd", model, stream="span")
    with pytest.raises(ValueError, match="stream"):
        resid_mlp_model(_resid(1), "half")
    with pytest.raises(ValueError, match="stream"):
        ChannelGraphConfig(stream="diag")


KEYS = ("ranks", "compression_curve", "edges", "components", "modularity_q", "communities",
        "circuits", "circuit_coverage", "target_checks", "seconds")


def _save_target(name, model, cfg, tdir):
    io.save_tree(tdir / "model.eqx", model, {"target": name, "config": dataclasses.asdict(cfg)})


def _cli(target, tdir, out, capsys, n=49):
    code = cli.main(["run", "channel-graph", target, "--target", str(tdir), "--out", str(out),
                     "--no-progress", "--n-data", "49", "--n-null", "2", "--n-null-graphs",
                     "0", "--chunk-size", "49", "--plots", "false"])
    assert code == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    for k in KEYS:
        assert k in m, k
    assert m["n_examples"] == n
    return m, printed


@pytest.mark.parametrize("n_layers", [1, 2])
def test_cli_resid_mlp_and_its_checks(n_layers, tmp_path, capsys):
    """``jaxinterp run channel-graph resid-mlp-N --target DIR``: metrics keys, the T4/T5
    checks against the run's own edges and circuits, and the stream basis."""
    name = f"resid-mlp-{n_layers}"
    _save_target(name, _resid(n_layers), get_target(name).config(
        n_features=F, d_resid=D, d_mlp=D_MLP, n_layers=n_layers), tmp_path / "t")
    m, printed = _cli(name, tmp_path / "t", tmp_path / "run", capsys)
    assert "MLP write channels in one circuit" in printed
    tc = m["target_checks"]
    mlps = [f".layers[{i}]" for i in range(n_layers)]
    assert tc["rank_bound"] == D_MLP and set(tc["ranks"]) == set(mlps)
    for blk in mlps:
        r = m["ranks"][blk]
        assert tc["ranks"][blk]["write_eta"] == r["write"]["eta_rank"]
        assert tc["ranks"][blk]["within_bound"] == (
            max(r["read"]["numerical_rank"], r["write"]["numerical_rank"]) <= D_MLP)
        cov = tc["coverage"][blk]
        assert cov == m["circuit_coverage"][blk]
        members = (m["circuits"][cov["largest_circuit"]]["members"]
                   if cov["largest_circuit"] is not None else [])
        n_in = sum(u.rpartition("/")[0] == blk for u in members)
        assert cov["fraction"] == pytest.approx(n_in / cov["n_channels"])
    want = {f"embed->{b}" for b in mlps} | {f"{b}->unembed" for b in mlps} | {"embed->unembed"}
    assert set(tc["expected_edges_kept"]) == want
    best = {v["largest_circuit"] for v in tc["coverage"].values()}
    assert tc["one_circuit"] == (len(best) == 1 and None not in best)
    assert ("cross_layer" in tc) == (n_layers == 2)
    if n_layers == 2:
        w = {(e["writer"], e["reader"]): e["driven_variance"] for e in m["edges"]}
        ratio = tc["cross_layer"][".layers[1]"]["driven_variance"]["ratio"]
        assert ratio == pytest.approx(w[(".layers[0]", ".layers[1]")]
                                      / w[("embed", ".layers[1]")], rel=1e-12)
    arrays = np.load(tmp_path / "run" / "channels.npz")
    q = arrays["stream_basis"]
    assert q.shape == (D, F + n_layers * D_MLP)
    assert arrays[".layers[0]/omega"].shape[0] == q.shape[1]


def test_cli_modadd_and_its_checks(tmp_path, capsys):
    """``jaxinterp run channel-graph modadd --target DIR`` on a tiny untrained model: every
    channel node gets a frequency label, and the same-frequency edge fraction and the
    community counts equal direct counts over the written graph and communities."""
    target = get_target("modadd")
    cfg = target.config(**TINY_MODADD)
    model = _modadd()
    _save_target("modadd", model, cfg, tmp_path / "t")
    m, printed = _cli("modadd", tmp_path / "t", tmp_path / "run", capsys, n=cfg.n_train)
    assert "same-frequency edge fraction" in printed
    tc = m["target_checks"]
    p = TINY_MODADD["p"]
    cg = load_json(tmp_path / "run" / "graph.json")
    freq = {}
    for la in cg.layers:
        fr = tc["nodes"][la.name]["frequencies"]
        assert len(fr) == la.size and all(0 <= f <= p // 2 for f in fr)
        freq.update(dict(zip(la.ids, fr, strict=True)))
    same = total = 0.0
    for (a, b), e in zip(cg.pairs, cg.edges, strict=True):
        la, lb = cg.layer(a), cg.layer(b)
        for i, j in zip(*np.nonzero(np.asarray(e)), strict=True):
            total += e[i, j]
            same += e[i, j] * (freq[la.ids[j]] == freq[lb.ids[i]] > 0)
    assert total > 0
    assert tc["same_frequency_edge_fraction"]["raw"] == pytest.approx(same / total)
    assert tc["key_frequencies"] == [int(k) for k in key_frequencies(model)]
    for g, v in tc["communities"].items():
        assert v["n_nonsingleton"] == sum(len(c) > 1 for c in m["communities"][g]["members"])
        assert v["n_nonsingleton"] == len(v["communities"])
        for c in v["communities"]:
            assert 0.0 < c["purity"] <= 1.0 or c["dominant_frequency"] == 0
