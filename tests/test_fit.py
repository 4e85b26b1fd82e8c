import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxinterp.train import NonFiniteLossError, fit, make_optimizer


def quad_loss(params, frozen, batch):
    pred = batch @ params["w"] + frozen["b"]
    loss = jnp.mean((pred - batch.sum(-1, keepdims=True)) ** 2)
    return loss, {"w_norm": jnp.sum(params["w"] ** 2)}


def sample(data, key, step):
    return jax.random.normal(key, (16, 3))


def setup():
    params = {"w": jnp.zeros((3, 1))}
    frozen = {"b": jnp.zeros(())}
    return params, frozen, make_optimizer("adamw", 0.05, 40, weight_decay=0.01,
                                          schedule="quarter_cosine")


def test_fit_learns_and_records_every_term():
    params, frozen, opt = setup()
    r = fit(quad_loss, params, frozen, opt, sample, steps=40, key=jax.random.key(0),
            steps_per_call=8, progress=False)
    assert r.step == 40
    assert r.history["step"].tolist() == list(range(1, 41))
    assert set(r.history) == {"step", "loss", "w_norm"}
    assert r.history["loss"][-1] < 0.1 * r.history["loss"][0]
    np.testing.assert_array_equal(params["w"], np.zeros((3, 1)))  # inputs unchanged


def test_resume_is_bit_identical(tmp_path):
    params, frozen, opt = setup()
    kw = dict(key=jax.random.key(3), steps_per_call=5, progress=False)
    full = fit(quad_loss, params, frozen, opt, sample, steps=40, **kw)
    # "interrupted" run: stops after 20 updates, checkpointing every 10
    fit(quad_loss, params, frozen, opt, sample, steps=20, checkpoint_dir=tmp_path,
        checkpoint_every=10, **kw)
    assert (tmp_path / "checkpoint.eqx").exists()
    resumed = fit(quad_loss, params, frozen, opt, sample, steps=40, checkpoint_dir=tmp_path, **kw)
    assert (full.steps_run, resumed.steps_run) == (40, 20)  # time per step uses steps_run
    np.testing.assert_array_equal(np.asarray(full.params["w"]), np.asarray(resumed.params["w"]))
    for a, b in zip(jax.tree_util.tree_leaves(full.opt_state),
                    jax.tree_util.tree_leaves(resumed.opt_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(full.history["loss"], resumed.history["loss"])


def test_vmapped_seeds_equal_separate_runs():
    params, frozen, opt = setup()
    keys = jnp.stack([jax.random.key(1), jax.random.key(2)])
    stack = lambda t: jax.tree_util.tree_map(lambda x: jnp.stack([x, x + 0.1]), t)
    both = fit(quad_loss, stack(params), stack(frozen), opt, sample, steps=20, key=keys,
               seeds=True, steps_per_call=10, progress=False)
    assert both.history["loss"].shape == (20, 2)
    for i in range(2):
        pi = jax.tree_util.tree_map(lambda x: x[i], stack(params))
        fi = jax.tree_util.tree_map(lambda x: x[i], stack(frozen))
        one = fit(quad_loss, pi, fi, opt, sample, steps=20, key=keys[i], steps_per_call=10,
                  progress=False)
        np.testing.assert_allclose(np.asarray(both.params["w"][i]), np.asarray(one.params["w"]),
                                   rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("frozen_axis", [0, None])
def test_one_seed_vmapped_fit_equals_the_plain_run(frozen_axis):
    params, frozen, opt = setup()
    key = jax.random.key(4)
    add = lambda t: jax.tree_util.tree_map(lambda x: x[None], t)  # noqa: E731
    one = fit(quad_loss, add(params), add(frozen) if frozen_axis == 0 else frozen, opt,
              sample, steps=12, key=key[None], seeds=True, frozen_axis=frozen_axis,
              steps_per_call=6, progress=False)
    plain = fit(quad_loss, params, frozen, opt, sample, steps=12, key=key, steps_per_call=6,
                progress=False)
    assert one.params["w"].shape == (1, 3, 1) and one.history["loss"].shape == (12, 1)
    # the same update program up to XLA's fusion choices (1 ulp seen)
    np.testing.assert_allclose(np.asarray(one.params["w"][0]), np.asarray(plain.params["w"]),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(one.history["loss"][:, 0], plain.history["loss"], rtol=1e-6)


def test_seed_batches_equal_one_vmap():
    params, frozen, opt = setup()
    keys = jnp.stack([jax.random.key(i) for i in range(5)])
    stack = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda x: jnp.stack([x + 0.1 * i for i in range(5)]), t)
    kw = dict(steps=12, key=keys, seeds=True, steps_per_call=6, progress=False)
    full = fit(quad_loss, stack(params), stack(frozen), opt, sample, **kw)
    for sb in (1, 2):  # 2: groups of 2, 2 and a remainder of 1
        part = fit(quad_loss, stack(params), stack(frozen), opt, sample, seed_batch=sb, **kw)
        np.testing.assert_allclose(np.asarray(part.params["w"]), np.asarray(full.params["w"]),
                                   rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(part.history["loss"], full.history["loss"], rtol=1e-6)
    shared = fit(quad_loss, stack(params), frozen, opt, sample, frozen_axis=None, seed_batch=2,
                 **kw)
    assert shared.params["w"].shape == (5, 3, 1)
    with pytest.raises(ValueError, match="seed_batch"):
        fit(quad_loss, stack(params), stack(frozen), opt, sample, seed_batch=0, **kw)


def test_non_finite_loss_names_step_and_term():
    def bad_loss(params, frozen, batch):
        loss, aux = quad_loss(params, frozen, batch)
        return loss, {"blowup": jnp.where(params["w"][0, 0] != 0, jnp.nan, 0.0)}

    params, frozen, opt = setup()
    with pytest.raises(NonFiniteLossError, match=r"'blowup' became nan at step 1\b"):
        fit(bad_loss, params, frozen, opt, sample, steps=10, key=jax.random.key(0),
            steps_per_call=5, progress=False)


def test_eval_and_early_stop():
    params, frozen, opt = setup()
    calls = []

    def eval_fn(p, f, step):
        calls.append(step)
        return {"w0": p["w"][0, 0]}

    r = fit(quad_loss, params, frozen, opt, sample, steps=40, key=jax.random.key(0),
            steps_per_call=5, eval_fn=eval_fn, eval_every=10,
            stop_fn=lambda ev: len(ev["step"]) >= 2, progress=False)
    assert calls == [10, 20] and r.step == 20
    assert r.evals["step"].tolist() == [10, 20]


def test_no_retrace_across_chunks():
    params, frozen, opt = setup()
    traces = []

    def counting_loss(p, f, b):
        traces.append(1)
        return quad_loss(p, f, b)

    fit(counting_loss, params, frozen, opt, sample, steps=30, key=jax.random.key(0),
        steps_per_call=5, progress=False)
    assert len(traces) == 1


@pytest.mark.parametrize("kwargs,match", [(dict(steps=0), "steps"),
                                          (dict(steps=5, steps_per_call=0), "steps_per_call")])
def test_fit_errors(kwargs, match):
    params, frozen, opt = setup()
    with pytest.raises(ValueError, match=match):
        fit(quad_loss, params, frozen, opt, sample, key=jax.random.key(0), progress=False,
            **kwargs)


def test_seeds_requires_key_batch():
    params, frozen, _ = setup()
    with pytest.raises(ValueError, match="seeds"):
        fit(quad_loss, params, frozen, optax.sgd(0.1), sample, steps=2, key=jax.random.key(0),
            seeds=True, progress=False)



def _write_checkpoint(path, header, steps=20):
    params, frozen, opt = setup()
    fit(quad_loss, params, frozen, opt, sample, steps=steps, key=jax.random.key(0),
        steps_per_call=10, checkpoint_dir=path, header=header, progress=False)


def test_check_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    from jaxinterp.train.fit import check_resume

    header = {"target": "t", "config": {"lr": 0.05, "steps": 20, "steps_per_call": 10,
                                        "gate_mse": 0.1, "gated": False}, "seeds": [0, 1]}
    _write_checkpoint(tmp_path, header)
    ckpt = tmp_path / "checkpoint.eqx"
    check_resume(tmp_path / "none.eqx", {"anything": 1}, 1)  # no checkpoint: nothing to check
    check_resume(ckpt, header, 20)
    # run mechanics and evaluation thresholds may change; entries one side lacks are skipped
    cfg = header["config"]
    check_resume(ckpt, {**header, "config": {**cfg, "steps_per_call": 5, "gate_mse": 0.2,
                                             "new_field": 3}, "extra": 1}, 20)
    for changed, name in [({**header, "config": {**cfg, "lr": 0.01}}, "config.lr"),
                          ({**header, "seeds": [0, 2]}, "seeds"),
                          ({**header, "target": "u"}, "target"),
                          ({**header, "config": {**cfg, "gated": True}}, "config.gated")]:
        with pytest.raises(ValueError, match=f"{name} .* \\(checkpoint\\) vs .*--no-resume"):
            check_resume(ckpt, changed, 20)
    # more steps: only when the schedule does not depend on the total
    longer = {**header, "config": {**cfg, "steps": 40}}
    with pytest.raises(ValueError, match="config.steps 20 .*depends on the total"):
        check_resume(ckpt, longer, 40)
    check_resume(ckpt, longer, 40, extendable=True)
    # never fewer steps than the checkpoint has done
    with pytest.raises(ValueError, match="steps >= 20, the step of the checkpoint.*has done 20"):
        check_resume(ckpt, {**header, "config": {**cfg, "steps": 10}}, 10, extendable=True)
    # fit itself checks before loading
    params, frozen, opt = setup()
    with pytest.raises(ValueError, match="config.lr"):
        fit(quad_loss, params, frozen, opt, sample, steps=20, key=jax.random.key(0),
            steps_per_call=10, checkpoint_dir=tmp_path, progress=False,
            header={**header, "config": {**cfg, "lr": 0.01}})
    fit(quad_loss, params, frozen, opt, sample, steps=20, key=jax.random.key(0),
        steps_per_call=10, checkpoint_dir=tmp_path, progress=False, resume=False,
        header={**header, "config": {**cfg, "lr": 0.01}})  # starting afresh is allowed


def test_resume_rules_of_the_configs():
    from jaxinterp.decomposition import l3d_config, spd_config
    from jaxinterp.models.tms import TMSConfig
    from jaxinterp.train import depends_on_total
    from jaxinterp.train.fit import RUN_MECHANICS as FREE
    from jaxinterp.train.fit import steps_extendable

    assert not depends_on_total("constant") and not depends_on_total("step")
    assert depends_on_total("quarter_cosine") and depends_on_total("linear")
    assert depends_on_total("constant", warmup_frac=0.1)
    assert not depends_on_total("constant", warmup_frac=0.1, warmup_steps=5)  # steps win
    assert steps_extendable(TMSConfig(schedule="constant"))
    assert {"steps_per_call", "eval_every", "checkpoint_every"} <= set(FREE)
    assert "steps" not in FREE and "lr" not in FREE
    assert not steps_extendable(TMSConfig(schedule="half_cosine"))
    assert not steps_extendable(TMSConfig(schedule="constant", warmup_frac=0.1))
    assert steps_extendable(TMSConfig(schedule="constant", warmup_frac=0.1, warmup_steps=3))
    assert steps_extendable(spd_config("resid-mlp-3", recipe="main"))  # constant lr
    assert {"seed_batch", "eval_size"} <= set(FREE)
    assert "gated" not in FREE and "delta" not in FREE
    assert not steps_extendable(spd_config("resid-mlp-3", p_anneal=(1.0, 0.0, 1.0)))
    assert not steps_extendable(spd_config("tms-5-2"))  # quarter-cosine
    assert not steps_extendable(l3d_config("tms-5-2"))  # steps from epochs


def test_mixed_precision_casts_compute_but_keeps_float32_state():
    import optax

    from jaxinterp.train import fit

    seen = []

    def loss_fn(p, frozen, batch):
        x, y = batch
        seen.append((p["w"].dtype, x.dtype, frozen.dtype))
        err = x @ p["w"] * frozen - y
        return jnp.mean(err**2), {"max": jnp.max(jnp.abs(err))}

    def sample_fn(_, k, step):
        x = jax.random.normal(k, (64, 3))
        return x, x @ jnp.array([1.0, -2.0, 0.5])

    def run(dtype):
        seen.clear()
        return fit(loss_fn, {"w": jnp.zeros((3,))}, jnp.ones(()), optax.adam(0.1), sample_fn,
                   steps=60, key=jax.random.key(0), steps_per_call=30, progress=False,
                   compute_dtype=dtype)

    with jax.enable_x64(False):
        full = run("float32")
        assert set(seen) == {(jnp.dtype("float32"),) * 3}
        half = run("bfloat16")
        assert set(seen) == {(jnp.dtype("bfloat16"),) * 3}
    assert half.params["w"].dtype == jnp.float32
    assert half.history["loss"].dtype == np.float32 and half.history["max"].dtype == np.float32
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a: a.dtype != jnp.bfloat16, half.opt_state))
    # bfloat16 has 8 significant bits: the fits agree to its resolution, and both converge
    np.testing.assert_allclose(half.params["w"], full.params["w"], atol=0.05)
    assert half.history["loss"][-1] < 1e-2 * half.history["loss"][0]
    assert not np.array_equal(half.history["loss"], full.history["loss"])
    with pytest.raises(ValueError, match="compute_dtype"):
        run("float8")
