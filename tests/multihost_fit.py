"""One process of a multi-host run on CPU (``test_sharding.py``): ``python
tests/multihost_fit.py PROCESS_ID N_PROCESSES PORT`` joins ``jax.distributed`` (N > 1) with
two host devices per process, fits a small regression on a data mesh over every process's
devices and prints its final weights and loss as JSON."""

import json
import sys

import jax

pid, n_proc, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_num_cpu_devices", 2)

from jaxinterp import sharding  # noqa: E402

if n_proc > 1:
    sharding.initialize_distributed(coordinator_address=f"localhost:{port}",
                                    num_processes=n_proc, process_id=pid)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxinterp.train import fit  # noqa: E402


def loss_fn(p, frozen, batch):
    x, y = batch
    err = x @ p["w"] - y
    return jnp.mean(err**2), {"max_err": jnp.max(jnp.abs(err))}


def sample_fn(_, k, step):
    x = jax.random.normal(k, (8, 3))
    return x, x @ jnp.array([1.0, -2.0, 0.5])


mesh = sharding.data_mesh()
r = fit(loss_fn, {"w": jnp.ones((3,))}, None, optax.adam(0.3), sample_fn, steps=20,
        key=jax.random.key(0), steps_per_call=10, progress=False, mesh=mesh)
w = r.params["w"]
print(json.dumps({"process": pid, "devices": int(mesh.devices.size),
                  "multi_process": bool(mesh.is_multi_process),
                  "w": np.asarray(w.addressable_data(0)).tolist(),
                  "loss": [float(v) for v in r.history["loss"]]}))
