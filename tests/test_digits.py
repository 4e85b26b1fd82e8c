"""The digits MLP: the fixed split, the model and its cache, and the quality gate (cheap
enough to train from scratch in the default suite)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.models import base
from jaxinterp.models.digits import DigitsMLP, digits_split

TARGET = ji.get_target("digits-mlp")


def test_split_is_stratified_fixed_and_scaled():
    d = digits_split()
    assert d["x_train"].shape == (1347, 64) and d["x_test"].shape == (450, 64)
    assert 0.0 <= d["x_train"].min() and d["x_train"].max() <= 1.0
    train_counts = np.bincount(d["y_train"], minlength=10)
    test_counts = np.bincount(d["y_test"], minlength=10)
    # Stratified: every class in both splits, in roughly the 3:1 proportion.
    assert np.all(np.abs(train_counts / (train_counts + test_counts) - 0.75) < 0.02)
    np.testing.assert_array_equal(digits_split()["y_test"], d["y_test"])
    with pytest.raises(ValueError):
        d["x_train"][0, 0] = 1.0


def test_model_shapes_init_bounds_and_cache(getkey):
    model = TARGET.init(TARGET.config(), getkey())
    assert isinstance(model, DigitsMLP)
    shapes = [(ji.tree.get(model, f".layers[{i}].weight").shape) for i in range(3)]
    assert shapes == [(64, 64), (64, 64), (64, 10)]
    w = ji.tree.get(model, "layers.0.weight")
    assert float(jnp.abs(w).max()) <= 1 / 8 and float(jnp.abs(w).max()) > 0.1
    x = jax.random.uniform(getkey(), (64,))
    y, cache = model.forward_with_cache(x)
    np.testing.assert_allclose(y, model(x), rtol=1e-6)
    assert set(cache) == {".layers[0].weight", ".layers[1].weight", ".layers[2].weight"}
    h_in, out = cache[".layers[2].weight"]
    np.testing.assert_allclose(out + model.layers[2].bias, y, rtol=1e-5, atol=1e-6)
    assert bool(jnp.all(h_in >= 0))  # post-ReLU
    with pytest.raises(ValueError, match="x"):
        model(jnp.zeros((2, 64)))


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="test_size"):
        TARGET.config(test_size=1.5)
    with pytest.raises(ValueError, match="hidden"):
        TARGET.config(hidden=(64, 0))


def test_quality_gate_and_reload(tmp_path):
    r = ji.train_target("digits-mlp", TARGET.config(n_seeds=1), out=tmp_path, progress=False)
    assert r.metrics["gate"]["passed"], r.metrics["gate"]
    assert r.metrics["test_accuracy"] >= 0.96 and r.metrics["steps"] == 2100
    model, cfg, target = ji.load_target(tmp_path)
    assert target is TARGET and cfg.n_seeds == 1
    data = base.make_seed_data(target, cfg, 0)
    logits = jax.vmap(model)(jnp.asarray(data["x_test"]))
    acc = float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(data["y_test"])))
    assert acc == pytest.approx(r.metrics["test_accuracy"])
