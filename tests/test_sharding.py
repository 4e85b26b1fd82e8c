"""Data parallelism (jaxinterp.sharding): meshes, batch splitting, and device-count
invariance of every decomposition (1, 2 and 4 CPU devices, in a subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxinterp import sharding
from jaxinterp.train import fit

HERE = Path(__file__).parent
TOL = 1e-5  # the bound on metrics and final parameters, relative


def test_data_mesh_and_errors():
    mesh = sharding.data_mesh(1)
    assert mesh.axis_names == (sharding.DATA,) and mesh.devices.size == 1
    assert sharding.data_mesh().devices.size == len(jax.devices())
    n = len(jax.devices())
    with pytest.raises(ValueError, match=rf"data_mesh: expected devices at most the {n} "):
        sharding.data_mesh(n + 1)
    with pytest.raises(ValueError, match="devices"):
        sharding.data_mesh(0)
    other = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("model",))
    with pytest.raises(ValueError, match="'data' axis"):
        with sharding.use_mesh(other):
            pass


def test_shard_batch_without_mesh_is_identity():
    x = jnp.arange(6.0).reshape(3, 2)
    assert sharding.data_size() == 1
    assert sharding.shard_batch(x) is x
    with sharding.use_mesh(sharding.data_mesh(1)):
        assert sharding.data_size() == 1
        y = jax.jit(sharding.shard_batch)(x)
    np.testing.assert_array_equal(y, x)


def _toy_fit(mesh, **kw):
    w0 = {"w": jnp.ones((3,))}

    def loss_fn(p, frozen, batch):
        x, y = batch
        err = x @ p["w"] - y
        return jnp.mean(err**2), {"max": jnp.max(jnp.abs(err))}

    def sample_fn(_, k, step):
        x = jax.random.normal(k, (8, 3))
        return x, x @ jnp.array([1.0, -2.0, 0.5])

    return fit(loss_fn, w0, None, optax.adam(0.3), sample_fn, steps=20, key=jax.random.key(0),
               steps_per_call=10, progress=False, mesh=mesh, **kw)


def test_fit_on_a_one_device_mesh_equals_no_mesh(tmp_path):
    a = _toy_fit(None)
    b = _toy_fit(sharding.data_mesh(1), checkpoint_dir=tmp_path, checkpoint_every=10)
    np.testing.assert_array_equal(np.asarray(a.params["w"]), np.asarray(b.params["w"]))
    np.testing.assert_array_equal(a.history["loss"], b.history["loss"])
    assert a.history["loss"][-1] < 0.1 * a.history["loss"][0]
    # the checkpoint written under the mesh resumes without one
    c = fit(lambda p, f, b: (jnp.sum(p["w"]), {}), {"w": jnp.ones((3,))}, None,
            optax.sgd(0.0), lambda d, k, s: jnp.zeros((8, 3)), steps=20,
            key=jax.random.key(0), progress=False, checkpoint_dir=tmp_path)
    assert c.step == 20 and c.steps_run == 0


def _invariance(cases: list[str]) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(HERE / "device_invariance.py"), *cases],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cases", [["target", "spd"], ["apd", "resume"],
                                   ["l3d", "gram", "channel_graph"], ["errors"]])
def test_device_count_invariance(cases):
    """The same run on meshes of 1, 2 and 4 devices: final parameters (Grams, edge arrays)
    and every scalar metric agree to 1e-5 relative; the 4-device batch is really split."""
    report = _invariance(cases)
    assert report.pop("sharded") is True
    if cases == ["errors"]:
        assert "expected batch of a size divisible by the 4 devices" in report["errors"]
        assert "expected devices at most the 4 cpu device(s)" in report["errors"]
        return
    assert sorted(report) == sorted(cases)
    for case, by_n in report.items():
        assert sorted(by_n) == ["2", "4"], case
        for n, r in by_n.items():
            assert r["n_arrays"] > 0, (case, n)
            assert r["missing"] == [], (case, n, r["missing"])
            assert r["params"] <= TOL, (case, n, r)
            assert r["metrics"] <= TOL, (case, n, r)
        if case in ("spd", "apd", "l3d", "channel_graph"):
            assert by_n["4"]["n_metrics"] >= 10, case


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_multi_process_run_matches_one_process():
    """Two processes with two CPU devices each (jax.distributed, gloo collectives) train
    on one 4-device mesh and end where one process on its 2 devices does."""
    script = str(HERE / "multihost_fit.py")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, script, str(i), "2", port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    single = subprocess.run([sys.executable, script, "0", "1", "0"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads(single.stdout.strip().splitlines()[-1])
    assert [o["devices"] for o in outs] == [4, 4] and all(o["multi_process"] for o in outs)
    assert one["devices"] == 2 and not one["multi_process"]
    assert one["loss"][-1] < 0.5 * one["loss"][0]
    for o in outs:
        np.testing.assert_allclose(o["w"], one["w"], rtol=1e-5)
        np.testing.assert_allclose(o["loss"], one["loss"], rtol=1e-5)
