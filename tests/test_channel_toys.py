"""Channel graph on its ground-truth toys: the planted-channel network (spec T1) through
the CLI, and (slow) T1 over 5 seeds and its variants and T2 on ``block-mlp``."""

import json

import numpy as np
import pytest

from jaxinterp import cli
from jaxinterp.channel.run import channel_graph_config, load_target_for, run_channel_graph

KEYS = ("ranks", "compression_curve", "edges", "components", "modularity_q",
        "planted_recovery")


def _t1_checks(pr, ranks, *, kappa=0.0):
    """The T1 expectations that hold for every variant (spec section 8)."""
    for name in ("A1", "B1", "A2", "B2"):
        assert ranks[name]["read"]["eta_rank"] <= 3 and ranks[name]["write"]["eta_rank"] <= 3
    assert pr["max_angle"] <= 1e-6
    for e in ("E1", "E3", "E4"):
        assert pr[e]["max_off_planted_relative"] <= 1e-12
        assert pr[e]["min_planted"] > 0
    assert pr["components_ok"]
    assert pr["compression_all_numerical"] <= 1e-10
    assert pr["min_drop_weakest"] > 1e-6


def test_cli_planted_channels_t1(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["run", "channel-graph", "planted-channels", "--out", str(out),
                     "--no-progress", "--activation", "tanh", "--n-side", "14",
                     "--n-null", "3", "--n-null-graphs", "3", "--chunk-size", "256"])
    assert code == 0
    assert "ARI" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    for k in KEYS:
        assert k in m
    for f in ("graph.json", "channels.npz", "block_graph.png", "compression.png", "usage.png"):
        assert (out / f).exists()
    pr = m["planted_recovery"]
    _t1_checks(pr, m["ranks"])
    for name in ("A1", "B1", "A2", "B2"):
        assert pr["blocks"][name]["read_rank"] == 3 and pr["blocks"][name]["write_rank"] == 3
    assert m["components"] == [["A1", "A2"], ["B1", "B2"]]
    assert pr["n_communities"] == 2 and pr["ari"] == 1.0 and pr["modularity_q"] >= 0.45


def test_cli_block_mlp_direction_edges(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["run", "channel-graph", "block-mlp", "--out", str(out), "--no-progress",
                     "--n-data", "400", "--n-null", "3", "--n-null-graphs", "2",
                     "--usage", "false", "--plots", "false",
                     "--direction-rule", "gauss_legendre", "--direction-intervals", "2"])
    assert code == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    de = m["direction_edges"]
    assert de.pop("rule") == "gauss_legendre" and len(de) == len(m["ranks"]) - 1
    assert all(np.all(np.asarray(e) >= 0) for e in de.values())
    code = cli.main(["run", "channel-graph", "planted-channels", "--out", str(tmp_path / "p"),
                     "--no-progress", "--n-side", "6", "--direction-rule", "gradient"])
    assert code == 2 and "direction_rule" in capsys.readouterr().err


def _run(target, seed, **target_overrides):
    model, tcfg = load_target_for(target, seed, None, False, target_overrides)
    cfg = channel_graph_config(target, plots=False, n_null_graphs=5)
    return run_channel_graph(model, target, tcfg, cfg, seed=seed, progress=False).metrics


def test_t1_linear_channel_edges_are_one_to_one():
    """Why channel-level Louvain cannot return the 2 planted modules when phi = identity.

    For a linear writer a and reader b with ``o_b = J o_a``, relevance pulls back,
    ``K_a = Jᵀ K_b J``. With ``X = K_b^½ J Σ_a^½``, a's write channels diagonalise
    ``XᵀX`` and b's diagonalise ``XXᵀ``: they are the right and left singular vectors of
    ``X``, so the E4 coupling between them is diagonal. Each module is then a set of
    disconnected channel chains, and no modularity maximiser merges disconnected parts.
    """
    model, tcfg = load_target_for("planted-channels", 0, None, False, {"n_side": 30})
    cfg = channel_graph_config("planted-channels", plots=False, n_null_graphs=0)
    res = run_channel_graph(model, "planted-channels", tcfg, cfg, seed=0, progress=False)
    cg = res.analysis.graph
    checked = 0
    for (a, b), e in zip(cg.pairs, cg.edges, strict=True):
        if (a, b) not in (("A1", "A2"), ("B1", "B2")):
            continue
        e = np.abs(np.asarray(e, np.float64))
        big = e > 1e-10 * e.max()
        assert e.shape == (3, 3)
        assert (big.sum(0) == 1).all() and (big.sum(1) == 1).all(), e  # a permutation
        checked += 1
    assert checked == 2
    assert res.metrics["communities"]["gamma=1"]["n_communities"] > 2


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_t1_planted_tanh_over_seeds(seed):
    m = _run("planted-channels", seed, activation="tanh")
    pr = m["planted_recovery"]
    _t1_checks(pr, m["ranks"])
    assert pr["n_communities"] == 2 and pr["ari"] == 1.0 and pr["modularity_q"] >= 0.45


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("variant", [{}, {"gated": True}, {"out_rank": 2},
                                     {"activation": "tanh", "gated": True},
                                     {"activation": "tanh", "kappa": 0.3}])
def test_t1_variants_over_seeds(seed, variant):
    m = _run("planted-channels", seed, **variant)
    pr = m["planted_recovery"]
    _t1_checks(pr, m["ranks"], kappa=variant.get("kappa", 0.0))
    if variant.get("out_rank") == 2 and variant.get("activation", "identity") == "identity":
        assert pr["blocks"]["A2"]["read_rank"] == 2 and pr["blocks"]["A1"]["write_rank"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_t2_block_mlp(seed):
    m = _run("block-mlp", seed)
    pr = m["planted_recovery"]
    assert pr["cross_mass"] <= 1e-12
    assert len(pr["channel_components"]) == 2
    assert all(len(c) == 7 for c in pr["channel_components"])  # embed, 5 layers, unembed
    assert m["communities"]["gamma=0.5"]["ari"] == 1.0
    assert np.isfinite(m["modularity_q"]["gamma=1"])


@pytest.mark.slow
def test_cli_induction_from_a_target_dir(tmp_path, capsys):
    """``jaxinterp run channel-graph induction --target RUN`` on a briefly trained tiny
    target: the run directory and the induction checks' keys."""
    from jaxinterp.models import train_target

    target = tmp_path / "target"
    train_target("induction", _tiny_induction_config(steps=20), out=target, progress=False)
    out = tmp_path / "run"
    code = cli.main(["run", "channel-graph", "induction", "--target", str(target),
                     "--out", str(out), "--no-progress", "--n-data", "32", "--n-null", "2",
                     "--n-null-graphs", "2", "--chunk-size", "16"])
    assert code == 0
    assert "prev-token head top (E3)" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    for k in KEYS:
        assert k in m
    pr = m["planted_recovery"]
    assert set(pr["roles"]) >= {"prev_token_head", "induction_head"}
    assert pr["losses"]["two_heads"] == pr["losses"]["full"]
    assert {e["writer"] for e in m["edges"] if e["reader"] == "L1H0"} == {"embed", "L0H0"}


def _tiny_induction_config(**kw):
    from jaxinterp.models import get_target

    return get_target("induction").config(n_tokens=16, n_ctx=12, d_model=8, d_head=8,
                                          batch_size=64, eval_size=256, **kw)


@pytest.mark.slow
def test_induction_circuit_on_the_trained_target(tmp_path):
    """Issue 7's induction checks on a target trained with a shortened recipe (batch 256,
    early stop at accuracy >= 0.99; about 13k updates, 8 minutes on 2 CPU cores): an
    induction head forms, the previous-token head is the top channel-level (E4) writer
    into it, and the two heads at their eta-rank write channels, every other channel
    mean-ablated, recover >= 90 % of the in-context loss reduction. (The block-level E3
    ranks ``embed`` first: a finding, see experiments/channel_graph.md.)"""
    from jaxinterp.models import get_target, train_target

    cfg = get_target("induction").config(steps=20_000, batch_size=256, warmup_steps=1000,
                                         eval_every=500)
    r = train_target("induction", cfg, out=tmp_path / "target", progress=False)
    assert r.metrics["accuracy"] >= 0.99 and r.metrics["in_context_loss"] < 0.05
    ccfg = channel_graph_config("induction", plots=False, n_null_graphs=2)
    m = run_channel_graph(r.model, "induction", r.config, ccfg, progress=False).metrics
    pr = m["planted_recovery"]
    assert pr["roles"]["prev_token_head"] == "L0H0" and pr["roles"]["induction_head"] == "L1H0"
    assert pr["roles"]["induction_score"][1][0] > 0.9
    assert pr["roles"]["prev_token_at_m_score"][0][0] > 0.5
    assert pr["top_edge_is_prev_token"]["channel_max"]
    assert pr["recovery"]["write_eta"] >= 0.9
    assert pr["necessity"]["ablate_prev_token"] < 0.1 and pr["necessity"]["ablate_induction"] < 0.1
