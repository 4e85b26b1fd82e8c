"""Data parallelism over a device mesh, with results that do not depend on the device count.

Every decomposition runs on one device by default. Under a mesh with a ``"data"`` axis
(``with jax.set_mesh(data_mesh(4)):``, or ``fit(..., mesh=)``, or ``jaxinterp run ...
--devices 4``) the training loop shards each sampled batch along that axis and the chunked
float64 sums (LIB Grams, channel-graph statistics and edges) shard each chunk of examples.
Everything else is left to XLA's sharding propagation (GSPMD), which partitions the
computation the program describes: batch means, importance-minimality sums, batch top-k
thresholds, Grams and edge sums stay exact over the global batch; only the order of
floating-point additions changes, so runs on 1, 2 or 4 devices agree to round-off
(``tests/test_sharding.py``).

Randomness never depends on the device: keys are folded from the run key with the step,
stream and chunk indices (:mod:`jaxinterp.rng`), and random arrays are drawn at their
global shape, which ``jax_threefry_partitionable`` (on by default) makes identical however
the array is split.

Multi-host runs call :func:`initialize_distributed` first (``jax.distributed``); the mesh
then spans every process's devices, and :func:`replicate` places host values on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ._checks import check_positive, fail

__all__ = [
    "DATA",
    "data_mesh",
    "data_size",
    "initialize_distributed",
    "replicate",
    "request_host_devices",
    "shard_batch",
    "use_mesh",
]

DATA = "data"  # the mesh axis examples are split along


def request_host_devices(n: int) -> None:
    """Ask for ``n`` CPU devices (``jax_num_cpu_devices``), so that a CPU-only machine can
    run an ``n``-device mesh. Only possible before JAX runs anything; afterwards (or with
    ``n == 1``) it does nothing and :func:`data_mesh` says how many devices there are.
    Accelerator backends are not affected."""
    check_positive("request_host_devices", "n", n, integer=True)
    if n == 1:
        return
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_num_cpu_devices", int(n))


def data_mesh(devices: int | Sequence[Any] | None = None) -> Mesh:
    """A one-axis mesh named ``"data"`` over ``devices``.

    Args:
        devices: a number (the first ``n`` of ``jax.devices()``), a list of devices, or
            None (all devices, across processes in a multi-host run).

    Raises:
        ValueError: if more devices are asked for than there are.
    """
    avail = jax.devices()
    if devices is None:
        devs = list(avail)
    elif isinstance(devices, (int, np.integer)):
        check_positive("data_mesh", "devices", devices, integer=True)
        if devices > len(avail):
            raise fail("data_mesh", "devices", f"at most the {len(avail)} "
                       f"{avail[0].platform} device(s) there are", int(devices),
                       "On a CPU, call jaxinterp.sharding.request_host_devices(n) (or set "
                       "XLA_FLAGS=--xla_force_host_platform_device_count=n) before JAX runs "
                       "anything; `jaxinterp run --devices n` does this itself.")
        devs = list(avail[: int(devices)])
    else:
        devs = list(devices)
        if not devs:
            raise fail("data_mesh", "devices", "a non-empty list of devices", devs)
    return Mesh(np.asarray(devs), (DATA,), axis_types=(AxisType.Auto,))


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[None]:
    """``jax.set_mesh(mesh)`` as a context, or nothing when ``mesh`` is None."""
    if mesh is None:
        yield
        return
    if DATA not in mesh.axis_names:
        raise fail("use_mesh", "mesh", f"a mesh with a {DATA!r} axis", mesh.axis_names,
                   "Build one with jaxinterp.sharding.data_mesh(n).")
    with jax.set_mesh(mesh):
        yield


def data_size() -> int:
    """The size of the ``"data"`` axis of the mesh in context (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA not in mesh.axis_names:
        return 1
    return int(mesh.shape[DATA])


def shard_batch(tree: Any, *, strict: bool = True, what: str = "batch") -> Any:
    """Split the examples of ``tree`` along the mesh's ``"data"`` axis (inside ``jit``).

    The batch size is the leading size of the first array leaf; every leaf with that
    leading size is constrained to ``P("data")``, the others (keys, step counters, indices
    of another length) are left to sharding propagation. Without a mesh in context, or on
    a one-device data axis, ``tree`` is returned as it is.

    Args:
        tree: pytree of arrays with a shared leading batch axis.
        strict: raise if the batch size is not a multiple of the data-axis size; when
            False such a batch is left unsharded (computed whole on every device).
        what: the name of the batch in the error message.

    Raises:
        ValueError: with ``strict``, a batch size not divisible by the number of devices.
    """
    n_dev = data_size()
    if n_dev == 1:
        return tree
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(tree) if np.ndim(leaf) >= 1]
    if not leaves:
        return tree
    b = int(np.shape(leaves[0])[0])
    if b % n_dev:
        if strict:
            raise fail("shard_batch", what, f"of a size divisible by the {n_dev} devices of "
                       "the mesh's data axis", b, "Change the batch size or --devices.")
        return tree
    spec = P(DATA)

    def constrain(leaf: Any) -> Any:
        if np.ndim(leaf) >= 1 and np.shape(leaf)[0] == b and not _is_key(leaf):
            return jax.lax.with_sharding_constraint(leaf, spec)
        return leaf

    return jax.tree_util.tree_map(constrain, tree)


def _is_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Every array leaf of ``tree`` placed whole on each device of ``mesh`` (a multi-host
    mesh included: each process supplies the same host value). None: ``tree`` as it is."""
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, P())

    def place(leaf: Any) -> Any:
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            return leaf
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        if _is_key(leaf):
            data = replicate(jax.random.key_data(leaf), mesh)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        if mesh.is_multi_process:
            host = np.asarray(leaf)
            return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
        return jax.device_put(leaf, sharding)

    return jax.tree_util.tree_map(place, tree)


def initialize_distributed(**kwargs: Any) -> None:
    """``jax.distributed.initialize(**kwargs)`` for a multi-host run (coordinator address,
    number of processes and process id are detected on clusters JAX knows, or passed in).
    Call it once per process before anything else touches JAX; then
    :func:`data_mesh` spans the devices of every process."""
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"initialize_distributed: jax.distributed.initialize failed: {e}. "
                         "Pass coordinator_address, num_processes and process_id when the "
                         "cluster is not detected.") from e
