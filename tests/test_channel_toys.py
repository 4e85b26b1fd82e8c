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


def _run(target, seed, **target_overrides):
    model, tcfg = load_target_for(target, seed, None, False, target_overrides)
    cfg = channel_graph_config(target, plots=False, n_null_graphs=5)
    return run_channel_graph(model, target, tcfg, cfg, seed=seed, progress=False).metrics


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
