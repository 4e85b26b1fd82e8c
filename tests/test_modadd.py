"""The modular-addition transformer: model, fast training path, data, early stop, Fourier
ground truth, the committed fixture, and (slow) the quality gate from scratch."""

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.models import base
from jaxinterp.models.modadd import (
    ModAddTransformer,
    cross_entropy,
    fourier_norms,
    key_frequencies,
    last_position_logits,
    tokens_of,
)

P = 113
FIXTURE = Path(ji.__file__).parent / "fixtures" / "modadd-seed0"
TARGET = ji.get_target("modadd")


def random_model(key, scale=0.3):
    """A model with every leaf (biases included) random and large enough that attention
    patterns are far from uniform: a strong test of the fast path."""
    model = ModAddTransformer(key=jax.random.fold_in(key, 0))
    leaves, treedef = jax.tree_util.tree_flatten(model)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    leaves = [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def random_pairs(key, n):
    return jax.random.randint(key, (n, 2), 0, P)


def full_last_logits(model, pairs):
    return jax.vmap(model)(tokens_of(pairs, model.p))[:, -1]


def test_shapes_keypaths_and_init(getkey):
    model = ModAddTransformer(key=getkey())
    assert model(jnp.asarray([3, 5, P])).shape == (3, P + 1)
    shapes = {name: leaf.shape for name, leaf in ji.tree.leaves_with_names(model)}
    assert shapes[".embed.W_E"] == (P + 1, 128)
    assert shapes[".pos_embed.W_pos"] == (3, 128)
    assert shapes[".blocks[0].attn.W_Q"] == (4, 128, 32)
    assert shapes[".blocks[0].attn.W_O"] == (4, 32, 128)
    assert shapes[".blocks[0].attn.b_O"] == (128,)
    assert shapes[".blocks[0].mlp.W_in"] == (128, 512)
    assert shapes[".blocks[0].mlp.W_out"] == (512, 128)
    assert shapes[".W_U"] == (128, P + 1) and shapes[".b_U"] == (P + 1,)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 227_442
    w = np.concatenate([np.ravel(ji.tree.get(model, n)) for n in shapes if ".W_" in n])
    np.testing.assert_allclose(w.std(), 0.8 / 128**0.5, rtol=0.02)
    for n in shapes:
        if ".b_" in n:
            assert not np.any(np.asarray(ji.tree.get(model, n)))


def test_cache_records_input_and_pre_bias_output(getkey):
    model = random_model(getkey())
    tokens = jnp.asarray([7, 100, P])
    logits, cache = model.forward_with_cache(tokens)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(model(tokens)))
    contraction = {"W_Q": "pd,hde->phe", "W_K": "pd,hde->phe", "W_V": "pd,hde->phe",
                   "W_O": "phe,hed->pd"}
    expected = {".embed.W_E", ".pos_embed.W_pos", ".W_U", ".blocks[0].mlp.W_in",
                ".blocks[0].mlp.W_out"} | {f".blocks[0].attn.{w}" for w in contraction}
    assert set(cache) == expected
    for site, (inp, out) in cache.items():
        w = ji.tree.get(model, site)
        leaf = site.rsplit(".", 1)[-1]
        want = jnp.einsum(contraction[leaf], inp, w) if leaf in contraction else inp @ w
        np.testing.assert_allclose(np.asarray(want), np.asarray(out), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache[".embed.W_E"][0]).argmax(-1), [7, 100, P])
    np.testing.assert_allclose(np.asarray(logits[-1]),
                               np.asarray(cache[".W_U"][1][-1] + model.b_U), rtol=1e-6)


def test_attention_is_causal(getkey):
    model = random_model(getkey())
    a = model(jnp.asarray([4, 9, P]))
    b = model(jnp.asarray([4, 60, P]))
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.allclose(np.asarray(a[1:]), np.asarray(b[1:]))
    c = model(jnp.asarray([4, 9, 0]))
    np.testing.assert_array_equal(np.asarray(a[:2]), np.asarray(c[:2]))


def test_rejects_batched_tokens_and_bad_pairs(getkey):
    model = ModAddTransformer(key=getkey())
    with pytest.raises(ValueError, match=r"ModAddTransformer: expected tokens of shape "
                                         r"\(positions=3\), got \(2, 3\)"):
        model(jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"last_position_logits: expected pairs of shape"):
        last_position_logits(model, jnp.zeros((5, 3), jnp.int32))


@pytest.mark.parametrize("source", ["random", "real"])
def test_fast_path_equals_full_model(source, getkey):
    model = random_model(getkey())
    if source == "random":
        pairs = random_pairs(getkey(), 512)
    else:
        data = base.make_seed_data(TARGET, TARGET.config(), 0)
        pairs = jnp.asarray(data["train_pairs"])
    fast = eqx.filter_jit(last_position_logits)(model, pairs)
    full = eqx.filter_jit(full_last_logits)(model, pairs)
    assert fast.shape == (pairs.shape[0], P + 1)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(full), rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(full).max()))


@eqx.filter_jit
def both_gradients(model, pairs, labels):
    def grad(logits_fn):
        return eqx.filter_grad(lambda m: cross_entropy(logits_fn(m, pairs), labels))(model)

    return grad(last_position_logits), grad(full_last_logits)


def test_fast_path_gradients_equal_full_model(getkey):
    model = random_model(getkey(), scale=0.2)
    pairs = random_pairs(getkey(), 256)
    labels = (pairs.sum(1) % P).astype(jnp.int32)
    g_fast, g_full = both_gradients(model, pairs, labels)
    top = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(g_full))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_fast),
                            jax.tree_util.tree_leaves(g_full), strict=True):
        name = jax.tree_util.keystr(path)
        if name == ".blocks[0].attn.b_K":
            # softmax is shift-invariant: b_K's exact gradient is zero in both paths
            assert float(jnp.abs(a).max()) < 1e-6 * top
            assert float(jnp.abs(b).max()) < 1e-6 * top
            continue
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                   atol=1e-5 * float(jnp.abs(b).max()), err_msg=name)
    # '=' only ever sits at position 2, whose residual the fast path shares
    assert float(jnp.abs(g_fast.embed.W_E[P]).max()) > 0


def test_data_split_sizes_disjoint_and_deterministic():
    cfg = TARGET.config()
    d0 = base.make_seed_data(TARGET, cfg, 0)
    assert d0["train_pairs"].shape == (3830, 2) and d0["test_pairs"].shape == (8939, 2)
    code = lambda pairs: pairs[:, 0] * P + pairs[:, 1]
    tr, te = code(d0["train_pairs"]), code(d0["test_pairs"])
    assert len(np.unique(tr)) == 3830 and len(np.unique(te)) == 8939
    assert not np.intersect1d(tr, te).size
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), np.arange(P * P))
    for s in ("train", "test"):
        pairs = d0[f"{s}_pairs"]
        np.testing.assert_array_equal(d0[f"{s}_labels"], (pairs[:, 0] + pairs[:, 1]) % P)
    again = base.make_seed_data(TARGET, cfg, 0)
    for k in d0:
        np.testing.assert_array_equal(d0[k], again[k])
    d1 = base.make_seed_data(TARGET, cfg, 1)
    assert not np.array_equal(np.sort(tr), np.sort(code(d1["train_pairs"])))


def test_should_stop_rule():
    assert not TARGET.config().early_stop  # the spec's recipe runs all 60k updates
    cfg = TARGET.config(early_stop=True)

    def ev(acc, loss):
        return {"test_accuracy": np.asarray(acc, float)[:, None],
                "test_loss": np.asarray(loss, float)[:, None]}

    assert TARGET.should_stop(cfg, ev([0.999] * 3, [0.010, 0.0101, 0.0102]))
    assert not TARGET.should_stop(cfg, ev([0.999] * 2, [0.010, 0.010]))  # too few evals
    assert not TARGET.should_stop(cfg, ev([0.99, 0.999, 0.999], [0.01] * 3))  # not held
    assert not TARGET.should_stop(cfg, ev([1.0] * 3, [0.03, 0.01, 0.01]))  # still falling
    assert TARGET.should_stop(cfg, ev([1.0] * 3, [1e-4, 2e-3, 1e-5]))  # low, oscillating
    assert not TARGET.should_stop(cfg, ev([1.0] * 3, [0.05] * 3))  # loss too high
    two = {"test_accuracy": np.asarray([[1.0, 1.0]] * 3),
           "test_loss": np.asarray([[0.01, 0.05]] * 3)}
    assert not TARGET.should_stop(cfg, two)  # every seed must be done
    assert not TARGET.should_stop(TARGET.config(early_stop=False),
                                  ev([1.0] * 3, [0.01] * 3))


def test_key_frequencies_of_an_analytic_embedding(getkey):
    model = ModAddTransformer(key=getkey())
    t = np.arange(P)[:, None]
    w = np.zeros((P, 128))
    for j, (k, amp) in enumerate([(3, 3.0), (17, 2.0), (41, 1.5)]):
        w[:, 2 * j:2 * j + 1] = amp * np.cos(2 * np.pi * k * t / P)
        w[:, 2 * j + 1:2 * j + 2] = amp * np.sin(2 * np.pi * k * t / P)
    w += 0.01 * np.random.default_rng(0).normal(size=w.shape)
    w_e = jnp.concatenate([jnp.asarray(w, jnp.float32), model.embed.W_E[P:]])
    model = eqx.tree_at(lambda m: m.embed.W_E, model, w_e)
    assert fourier_norms(model).shape == (P // 2 + 1,)
    assert key_frequencies(model) == [3, 17, 41]
    assert key_frequencies(model, n=1) == [3]
    assert model.ground_truth()["key_frequencies"] == [3, 17, 41]


def test_a_few_training_steps_reduce_the_loss_and_reload(tmp_path):
    cfg = TARGET.config(steps=30, steps_per_call=10, eval_every=10, checkpoint_every=0)
    r = ji.train_target("modadd", cfg, out=tmp_path, progress=False)
    loss = r.history["loss"]
    assert loss.shape == (30,) and np.isfinite(loss).all()
    assert loss[-1] < loss[0] - 0.05 and np.all(np.diff(loss[10:]) < 0)
    assert set(r.evals) >= {"step", "train_loss", "train_accuracy", "test_loss", "test_accuracy"}
    m = r.metrics
    assert m["fast_path_max_abs_diff"] < 1e-3 * max(1.0, m["train_loss"])
    assert 0.0 <= m["test_accuracy"] <= 1.0 and not m["gate"]["passed"]
    assert {"loss.png", "accuracy.png", "train_test_loss.png"} <= {
        p.name for p in tmp_path.glob("*.png")}
    model, cfg2, target = ji.load_target(tmp_path)
    assert target is TARGET and cfg2 == cfg
    for a, b in zip(jax.tree_util.tree_leaves(model), jax.tree_util.tree_leaves(r.model),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fixture_is_grokked():
    model, cfg, target = ji.load_target(FIXTURE)
    assert target.name == "modadd" and cfg.seed == 0
    data = base.make_seed_data(target, cfg, 0)
    pairs, labels = jnp.asarray(data["test_pairs"]), jnp.asarray(data["test_labels"])
    logits = eqx.filter_jit(full_last_logits)(model, pairs)
    acc = float(jnp.mean(jnp.argmax(logits, -1) == labels))
    assert acc >= 0.998
    fast = last_position_logits(model, pairs)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(logits), rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(logits).max()))
    keys = key_frequencies(model)
    assert 2 <= len(keys) <= 8, keys


@pytest.mark.slow
def test_modadd_quality_gate_from_scratch(tmp_path):
    r = ji.train_target("modadd", out=tmp_path, progress=False)
    assert r.metrics["gate"]["passed"], r.metrics["gate"]
