"""Generic checks over every registered target, plus each toy's analytic facts.
Quality gates (training from scratch to the spec's numbers) are slow-marked."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.models import TARGETS, base
from jaxinterp.models.resid_mlp import monosemantic_mse

SMALL = {"eval_size": 2000, "n_train": 512, "n_eval": 512, "n_data": 256, "d_resid": 64}
FAST_TARGETS = sorted(n for n in TARGETS if n not in ("modadd", "digits-mlp"))


def small_config(name, **kw):
    target = ji.get_target(name)
    fields = base.config_fields(target.config_cls)
    over = {k: v for k, v in SMALL.items() if k in fields}
    steps = 0 if target.config().steps == 0 else 6
    return target.config(**{"steps": steps, "steps_per_call": 3, "n_seeds": 2, **over, **kw})


@pytest.mark.parametrize("name", FAST_TARGETS)
def test_forward_with_cache_matches_call_and_records_inputs(name, getkey):
    target = ji.get_target(name)
    cfg = small_config(name)
    model = target.init(cfg, getkey())
    data = target.make_data(cfg, getkey())
    x = data["x_train" if data and "x_train" in data else "x"][0] if data else \
        target.sample(cfg, None, getkey(), jnp.asarray(0))[0]
    y, cache = model.forward_with_cache(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(model(x)))
    for site, (inp, out) in cache.items():
        path = site.split(":")[0]
        w = ji.tree.get(model, path)
        w = w.T if site.endswith(":T") else w
        np.testing.assert_allclose(np.asarray(inp @ w), np.asarray(out), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FAST_TARGETS)
def test_train_target_runs_saves_and_reloads(name, tmp_path):
    target = ji.get_target(name)
    cfg = small_config(name)
    r = ji.train_target(name, cfg, out=tmp_path, progress=False)
    for f in ("config.json", "metrics.json", "model.eqx", "history.npz"):
        assert (tmp_path / f).exists(), f
    assert list(tmp_path.glob("*.png")), "a run directory has plots"
    metrics = ji.io.read_json(tmp_path / "metrics.json")
    assert "final_loss" in metrics and "passed" in metrics["gate"]
    assert len(r.seed_metrics) == 2
    model, cfg2, _ = ji.load_target(tmp_path)
    assert cfg2 == cfg
    for a, b in zip(jax.tree_util.tree_leaves(model), jax.tree_util.tree_leaves(r.model),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if cfg.steps:
        assert np.isfinite(r.history["loss"]).all() and len(r.history["loss"]) == cfg.steps
        # frozen parts are never trained
        init_one = lambda k: target.init(cfg, ji.rng.stream_key(k, ji.rng.Stream.INIT))
        init = eqx.filter_vmap(init_one)(
            jnp.stack([ji.rng.seed_key(s) for s in (0, 1)]))
        for path in target.frozen:
            for leaf_a, leaf_b in zip(jax.tree_util.tree_leaves(ji.tree.get(init, path)),
                                      jax.tree_util.tree_leaves(ji.tree.get(model, path)),
                                      strict=True):
                np.testing.assert_array_equal(np.asarray(leaf_a[r.seed]), np.asarray(leaf_b))


def test_seeds_are_deterministic_and_distinct():
    cfg = small_config("tms-5-2")
    a = ji.train_target("tms-5-2", cfg, progress=False)
    b = ji.train_target("tms-5-2", cfg, progress=False)
    np.testing.assert_array_equal(np.asarray(a.model.W_enc), np.asarray(b.model.W_enc))
    other = ji.train_target("tms-5-2", dataclasses.replace(cfg, seed=5), progress=False)
    assert not np.allclose(np.asarray(a.model.W_enc), np.asarray(other.model.W_enc))


def test_tms_is_tied_and_analytic(getkey):
    target = ji.get_target("tms-5-2-id")
    model = target.init(target.config(), getkey())
    assert ji.tree.names(model) == [".W_enc", ".b", ".hidden[0]"]  # one array, read twice
    x = jax.random.uniform(getkey(), (5,))
    w = model.W_enc
    np.testing.assert_allclose(model(x), jax.nn.relu(x @ w @ w.T + model.b), rtol=1e-6)
    gt = model.ground_truth()
    np.testing.assert_allclose(gt["W_enc_mechanisms"].sum(0), w, rtol=1e-6)
    assert gt["n_mechanisms"] == 6


def test_resid_mlp_unembeds_with_embedding_transpose_and_baseline(getkey):
    target = ji.get_target("resid-mlp-2")
    model = target.init(target.config(d_resid=64), getkey())
    np.testing.assert_allclose(np.linalg.norm(model.W_E, axis=1), 1.0, rtol=1e-5)
    x = jax.random.uniform(getkey(), (100,), minval=-1, maxval=1)
    r = x @ model.W_E
    for layer in model.layers:
        r = r + jax.nn.relu(r @ layer.mlp_in) @ layer.mlp_out
    np.testing.assert_allclose(model(x), r @ model.W_E.T, rtol=1e-5, atol=1e-6)
    xs = np.asarray(jax.random.uniform(getkey(), (50, 100), minval=-1, maxval=1))
    err = np.where(np.arange(100) < 50, 0.0, np.maximum(xs, 0.0))
    assert float(monosemantic_mse(jnp.asarray(xs), 50)) == pytest.approx((err**2).mean(), rel=1e-5)


def test_resid_mlp_embedding_is_shared_across_seeds(getkey):
    target = ji.get_target("resid-mlp-1")
    cfg = target.config(d_resid=32)
    a, b = target.init(cfg, getkey()), target.init(cfg, getkey())
    np.testing.assert_array_equal(a.W_E, b.W_E)
    assert not np.allclose(a.layers[0].mlp_in, b.layers[0].mlp_in)


def test_block_mlp_has_exactly_zero_cross_block_jacobian(getkey):
    target = ji.get_target("block-mlp")
    model = target.init(target.config(), getkey())
    xs = jax.random.normal(getkey(), (64, 8))
    jac = np.asarray(jax.vmap(jax.jacfwd(model))(xs))
    assert np.all(jac[:, :4, 4:] == 0.0) and np.all(jac[:, 4:, :4] == 0.0)
    linear = target.init(target.config(activation="identity"), getkey())
    jac = np.asarray(jax.jacfwd(linear)(xs[0]))
    assert np.all(jac[:4, 4:] == 0.0) and np.abs(jac[:4, :4]).min() > 0
    same = target.init(target.config(same_matrix_every_layer=True), getkey())
    np.testing.assert_array_equal(same.layers[0].weight, same.layers[3].weight)


def test_block_mlp_data_variants(getkey):
    target = ji.get_target("block-mlp")
    d = target.make_data(target.config(correlated=True, n_data=100), getkey())["x"]
    assert np.allclose(d[:, 0], d[:, 3]) and np.allclose(d[:, 4], d[:, 7])
    g = np.asarray(target.make_data(target.config(gated=True, n_data=1000), getkey())["x"])
    off = (g[:, :4] == 0).all(1)
    assert 0.4 < off.mean() < 0.6


def test_tmcs_labels_and_groups(getkey):
    target = ji.get_target("high-rank")
    cfg = target.config(n_train=256, n_eval=256)
    model = target.init(cfg, getkey())
    x = target.make_data(cfg, getkey())["x_train"]
    np.testing.assert_allclose(target.labels(cfg, model, x), x @ model.A, rtol=1e-6)
    act = np.asarray(x > 0).reshape(256, 6, 5)
    assert (act.all(-1) == act.any(-1)).all() and act.any((1, 2)).all()
    assert model.ground_truth()["groups"].shape == (6, 5)


@pytest.mark.parametrize("name,kw,match", [
    ("tms-5-2", dict(p=1.5), "p a probability"),
    ("tms-5-2", dict(d_hidden=9), "d_hidden"),
    ("tms-5-2", dict(n_seeds=0), "n_seeds"),
    ("tms-5-2", dict(bogus=1), "config field"),
    ("tms-5-2", dict(lr="fast"), "lr a value of type float"),
    ("high-rank", dict(group=7), "group"),
    ("block-mlp", dict(steps=3), "steps 0"),
    ("x-squared", dict(activation="tanh"), "activation"),
])
def test_bad_configs_raise_clear_errors(name, kw, match):
    with pytest.raises(ValueError, match=match):
        ji.get_target(name).config(**kw)


def test_models_reject_batched_input(getkey):
    target = ji.get_target("tms-5-2")
    model = target.init(target.config(), getkey())
    msg = r"TMS: expected x of shape \(n_features=5\), got \(3, 5\)"
    with pytest.raises(ValueError, match=msg):
        model(jnp.ones((3, 5)))


GATES = ["tms-5-2", "tms-5-2-id", "tms-40-10", "tms-40-10-id", "resid-mlp-1", "resid-mlp-2",
         "resid-mlp-3", "tmcs", "high-rank", "x-squared", "block-mlp"]


@pytest.mark.slow
@pytest.mark.parametrize("name", GATES)
def test_quality_gate_from_scratch(name, tmp_path):
    r = ji.train_target(name, out=tmp_path, progress=False)
    assert r.metrics["gate"]["passed"], r.metrics["gate"]
