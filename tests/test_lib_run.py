"""LIB ablations (against naive loops), bisection, Fourier labels, the Lambda cliff and
``jaxinterp run lib`` on a two-layer block MLP."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp import cli, lib
from jaxinterp.lib import ablation as abl
from jaxinterp.lib.fourier import fourier_labels, same_frequency_fraction
from jaxinterp.lib.run import relevant_directions
from jaxinterp.models.digits import DigitsMLP


@pytest.fixture(scope="module")
def setup():
    model = DigitsMLP((6, 5, 5, 3), key=jax.random.key(3))
    xs = jax.random.normal(jax.random.key(4), (160, 6)) + 0.3
    s = lib.mlp_sections(model)
    ib = lib.interaction_basis(s, xs, chunk_size=64, cotangent_chunk_size=2)
    edges = lib.interaction_edges(s, ib, xs)
    score = abl.r2_score(jax.vmap(s)(xs))
    return s, xs, ib, edges, score


def test_kept_counts_schedule():
    c = abl.kept_counts(130)
    assert c[:21] == list(range(21)) and c[-1] == 130
    assert c[21:24] == [21, 23, 24]  # ceil(20 * 1.05^k)
    assert np.all(np.diff(c) > 0)
    assert abl.kept_counts(3) == [0, 1, 2, 3]


def test_node_ablation_matches_a_loop_and_keeps_the_model(setup):
    s, xs, ib, _, score = setup
    curve = abl.node_ablation(s, ib, xs, score, layer=1)
    b = ib[1]
    assert curve.counts.tolist() == list(range(b.size + 1))
    acts = lib.collect_activations(s, xs)
    for n in (0, 2, b.size):
        f = acts[1] @ (b.C[:, :n] @ b.C_pinv[:n]).astype(np.float32)
        want = score(jax.vmap(lambda y: s.forward_from(1, y))(f))
        assert curve.scores[n] == pytest.approx(float(want), abs=1e-5)
    assert curve.scores[-1] == pytest.approx(1.0, abs=1e-5)
    assert abl.minimal_count(curve, 1.0, 0.01) <= b.size


def test_edge_ablation_matches_per_output_node_loop(setup):
    s, xs, ib, edges, score = setup
    layer, k = 0, 7
    got = abl.edge_ablation_score(s, ib, edges, xs, score, layer=layer, k=k)
    e = edges[layer]
    vals = e[:, 1:].ravel()
    keep = np.zeros(e.shape, bool)
    keep[:, 0] = True  # edges out of the constant node are free
    top = np.argsort(-vals)[:k]
    keep[:, 1:].flat[top] = True
    xh = lib.collect_activations(s, xs)[layer] @ ib[layer].C.astype(np.float32)
    mhat = lib.edges.module_hat(s, ib, layer)
    cols = [
        jax.vmap(mhat)(xh * keep[i][None, None, :].astype(np.float32))[..., i]
        for i in range(e.shape[0])
    ]
    f_next = jnp.stack(cols, -1) @ ib[layer + 1].C_pinv.astype(np.float32)
    want = score(jax.vmap(lambda y: s.forward_from(layer + 1, y))(f_next))
    assert got == pytest.approx(float(want), abs=1e-5)
    full = abl.edge_ablation_score(s, ib, edges, xs, score, layer=layer, k=e[:, 1:].size)
    assert full == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(
        ValueError,
        match=r"edge_ablation_score: expected k in \[0, 30\] "
        r"\(non-constant edges\), got 31",
    ):
        abl.edge_ablation_score(s, ib, edges, xs, score, layer=0, k=31)


def test_bisect_returns_the_threshold_crossing(setup):
    s, xs, ib, edges, score = setup
    res = abl.bisect_edges(s, ib, edges, xs, score, layer=1, delta=0.02, base=1.0)
    assert res.k is not None and res.score_at_k is not None and res.score_below is not None
    assert res.n_edges == edges[1][:, 1:].size and 0 < res.k <= res.n_edges
    assert res.score_at_k >= 1.0 - 0.02 > res.score_below
    assert res.eps == pytest.approx(np.sort(edges[1][:, 1:].ravel())[::-1][res.k - 1])
    n90, n99 = abl.edge_mass_counts(edges[1], constant=True)
    assert 0 < n90 <= n99 <= res.n_edges


def test_relevant_directions_finds_the_cliff():
    lam = np.r_[50.0, 100.0, 80.0, 60.0, 1e-3, 5e-4]  # constant first
    r = relevant_directions(lam, constant=True)
    assert r["n_rel"] == 3 and r["gap_ratio"] == pytest.approx(6e4)
    assert r["n_with_constant"] == 4


def test_fourier_labels_of_pure_tones():
    p = 13
    a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    w = 2 * np.pi / p
    table = np.stack(
        [
            np.cos(w * 3 * (a + b)),
            np.sin(w * 5 * a),
            0 * a + 1.0,
            np.cos(w * 2 * a) + 0.5 * np.cos(w * 4 * b),
        ],
        -1,
    )[:, :, None, :]
    lab = fourier_labels(table)
    assert lab.frequency.tolist() == [3, 5, 0, 2]
    assert lab.term[0].tolist() == [3, 3] and lab.term[1].tolist() == [5, 0]
    np.testing.assert_allclose(lab.purity[:2], 1.0)
    assert lab.purity[3] == pytest.approx(0.8)
    e = np.asarray([[4.0, 1.0], [0.0, 5.0]])
    frac = same_frequency_fraction(
        e, np.asarray([3, 5]), np.asarray([3, 7]), np.asarray([0, 1]), np.asarray([0, 1])
    )
    assert frac == pytest.approx(0.4)


def test_cli_run_lib_on_a_small_block_mlp(tmp_path, capsys):
    target = ji.get_target("block-mlp")
    ji.train_target(
        target,
        target.config(n_layers=2, n_data=400),
        out=tmp_path / "t",
        progress=False,
        plots=False,
    )
    out = tmp_path / "run"
    rc = cli.main(
        [
            "run",
            "lib",
            "block-mlp",
            "--target",
            str(tmp_path / "t"),
            "--out",
            str(out),
            "--baselines",
            "pca",
            "--no-progress",
            "--resolutions",
            "0.5",
            "--n-null",
            "5",
            "--target-n",
            "2",
            "--null-mode",
            "pairs",
        ]
    )
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in (
        "lambdas",
        "n_relevant_directions",
        "node_ablation",
        "edges_required",
        "edge_mass_n99",
        "modularity_q",
    ):
        assert set(m[key]) == {"lib", "pca"}, key
    assert m["n_basis_examples"] == 400 and m["base_score"] == pytest.approx(1.0)
    names = [".layers[0].weight", ".layers[1].weight", "output"]
    assert list(m["lambdas"]["lib"]) == names
    rc = cli.main(["run", "lib", "block-mlp", "--target", str(tmp_path / "t"), "--seed", "2"])
    assert rc == 2 and "expected --seed 0 (the seed of the target" in capsys.readouterr().err
    comm = m["communities"]["lib"]
    assert comm["gamma=0.5"]["n_nonsingleton"] == 2
    assert comm["gamma=0.5"]["null_z"] > 3  # two disconnected blocks beat random placement
    assert comm["n=2"]["n_nonsingleton"] == 2 and comm["n=2"]["resolution"] > 0
    for f in (
        "lambdas.png",
        "node_ablation.png",
        "edge_mass.png",
        "graph_lib.png",
        "graph_lib.json",
        "bases.npz",
        "config.json",
    ):
        assert (out / f).exists(), f
    g = ji.graph.load_json(out / "graph_lib.json")
    assert g.names == tuple(names)
    assert (
        cli.main(["run", "lib", "block-mlp", "--basis", "ica", "--target", str(tmp_path / "t")])
        == 2
    )
    assert cli.main(["run", "lib", "block-mlp", "--steps", "3"]) == 2
