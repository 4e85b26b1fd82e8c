"""Run each decomposition on meshes of 1, 2 and 4 CPU devices and print, as one JSON line,
how far the 2- and 4-device results are from the 1-device ones (``test_sharding.py`` runs
this in a subprocess, because the device count is fixed when JAX starts).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/device_invariance.py

Each case returns its final parameters (or Gram / graph arrays) and its scalar metrics;
the output maps case -> {"params": max relative error, "metrics": max relative error,
"sharded": whether the 4-device batch really was split}.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxinterp as ji  # noqa: E402
from jaxinterp.sharding import data_mesh, use_mesh  # noqa: E402

DEVICES = (1, 2, 4)


def _numbers(metrics: dict) -> dict[str, float]:
    """The finite scalar entries of a (nested) metrics dict, flattened."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _numbers(v).items()})
        elif isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
            if np.isfinite(v):
                out[k] = float(v)
    return {k: v for k, v in out.items()
            if not any(w in k for w in ("time", "wall", "seconds"))}  # clocks differ


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.max(np.abs(a))) if a.size else 0.0, 1e-30)
    return float(np.max(np.abs(a - b))) / scale if a.size else 0.0


def _tms(steps: int = 300):
    with jax.enable_x64(False):
        target = ji.get_target("tms-5-2")
        tcfg = target.config(steps=steps, n_seeds=1, batch_size=256)
        return target, tcfg, ji.train_target(target, tcfg, progress=False, plots=False).model


TARGET = None


def case_target():
    target, tcfg, model = _tms(steps=60)
    return jax.tree_util.tree_leaves(model), {}


def case_spd():
    from jaxinterp.decomposition import spd_config, train_spd

    target, tcfg, model = TARGET
    cfg = spd_config("tms-5-2", steps=30, steps_per_call=15, batch_size=256, eval_size=256)
    with jax.enable_x64(False):
        res = train_spd(model, target, tcfg, cfg, [0, 1], progress=False)
    return jax.tree_util.tree_leaves(res.components), res.metrics


def case_apd():
    from jaxinterp.decomposition import apd_config, train_apd

    target, tcfg, model = TARGET
    cfg = apd_config("tms-5-2", steps=30, steps_per_call=15, batch_size=256, eval_size=256)
    with jax.enable_x64(False):
        res = train_apd(model, target, tcfg, cfg, [0], progress=False)
    return jax.tree_util.tree_leaves(res.components), res.metrics


def case_l3d():
    from jaxinterp.decomposition import l3d_config
    from jaxinterp.decomposition.l3d_run import train_l3d

    target, tcfg, model = TARGET
    cfg = l3d_config("tms-5-2", epochs=2, steps_per_call=31, n_eval=128, n_data=256)
    # float64: with float32 gradients, entries that vanish in exact arithmetic come out as
    # round-off (~1e-12 against 1e-2) that depends on the order of the batch sums, and
    # Adam's first steps turn them into updates of up to lr * |dg| / eps; in float64 that
    # round-off is ~1e-20 and the comparison sees the sharding alone
    with jax.enable_x64(True):
        model = jax.tree_util.tree_map(
            lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
            model)
        res = train_l3d(model, target, tcfg, cfg, [0], progress=False)
    return jax.tree_util.tree_leaves(res.subnetworks), res.metrics


def case_resume():
    """SPD: 15 updates on this mesh, checkpointed, then resumed to 30 on one device (a
    resumed run is bit-identical to an uninterrupted one, so the one-device reference is
    a plain 30-update run)."""
    import tempfile

    from jaxinterp.decomposition import spd_config, train_spd

    target, tcfg, model = TARGET
    kw = dict(steps_per_call=15, batch_size=256, eval_size=256, schedule="constant")
    with jax.enable_x64(False), tempfile.TemporaryDirectory() as out:
        train_spd(model, target, tcfg, spd_config("tms-5-2", steps=15, **kw), [0],
                  out=out, progress=False)
        with use_mesh(data_mesh(1)):
            res = train_spd(model, target, tcfg, spd_config("tms-5-2", steps=30, **kw), [0],
                            out=out, progress=False)
    return jax.tree_util.tree_leaves(res.components), res.metrics


def case_gram():
    from jaxinterp.lib.grams import jacobian_gram

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    w1 = jax.random.normal(k1, (6, 8)) / 2
    w2 = jax.random.normal(k2, (8, 5)) / 2
    ys = np.asarray(jax.random.normal(k3, (96, 3, 6)))

    def F(y):  # (P, d) -> (P, m'), mixing positions through a softmax-weighted sum
        h = jnp.tanh(y @ w1)
        return jax.nn.softmax(h.sum(-1))[:, None] * (h @ w2)

    exact = jacobian_gram(F, ys, chunk_size=16)
    stoch = jacobian_gram(F, ys, chunk_size=16, sources=(2, 2), key=jax.random.key(1))
    return [exact, stoch], {}


def case_channel_graph():
    from jaxinterp.channel.pipeline import ChannelGraphConfig
    from jaxinterp.channel.run import run_channel_graph

    target, tcfg, model = TARGET
    cfg = ChannelGraphConfig(n_data=256, chunk_size=64, n_null=2, n_null_graphs=2)
    run = run_channel_graph(model, "tms-5-2", tcfg, cfg, progress=False)
    st, ce = run.analysis.stats, run.analysis.causal
    arrays = [a for a in (*st.write_cov, *st.sensitivity) if a is not None]
    arrays += [np.asarray(ce.w[k]) for k in sorted(ce.w)]
    arrays += [np.asarray(ce.channel[k]) for k in sorted(ce.channel)]
    return arrays, run.metrics


def batch_is_split() -> bool:
    """Whether a sampled batch under the 4-device mesh comes out split along ``data``."""
    from jaxinterp.sharding import shard_batch

    with use_mesh(data_mesh(4)):
        x = jax.jit(lambda k: shard_batch(jax.random.normal(k, (8, 3))))(jax.random.key(0))
    return len({str(s.index) for s in x.addressable_shards}) == 4 and x.sharding.spec[0] == "data"


def errors() -> str:
    """The messages of a batch the 4 devices do not divide and of a mesh too large."""
    import optax

    from jaxinterp.train import fit

    out = []
    try:
        fit(lambda p, f, b: (jnp.sum(b) * p, {}), jnp.ones(()), None, optax.sgd(0.1),
            lambda d, k, s: jax.random.normal(k, (6, 2)), steps=1, key=jax.random.key(0),
            progress=False, mesh=data_mesh(4))
    except ValueError as e:
        out.append(str(e))
    try:
        data_mesh(5)
    except ValueError as e:
        out.append(str(e))
    return " | ".join(out)


def main(names: list[str]) -> None:
    global TARGET
    if len(jax.devices()) < max(DEVICES):
        raise SystemExit(f"need {max(DEVICES)} devices, have {len(jax.devices())}")
    report = {"sharded": batch_is_split()}
    if names == ["errors"]:
        report["errors"] = errors()
        print(json.dumps(report))
        return
    TARGET = _tms()
    for name in names:
        fn = globals()[f"case_{name}"]
        runs = {}
        for n in DEVICES:
            t0 = time.perf_counter()
            with use_mesh(data_mesh(n)):
                arrays, metrics = fn()
            print(f"{name} on {n} device(s): {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            runs[n] = ([np.asarray(a) for a in arrays], _numbers(metrics))
        ref_a, ref_m = runs[1]
        report[name] = {}
        for n in DEVICES[1:]:
            arrays, metrics = runs[n]
            p = max((_rel(a, b) for a, b in zip(ref_a, arrays, strict=True)), default=0.0)
            common = sorted(ref_m.keys() & metrics.keys())
            # relative, with round-off of quantities that are zero (null std) as absolute
            errs = {k: abs(ref_m[k] - metrics[k]) / max(abs(ref_m[k]), 1e-9) for k in common}
            worst = max(errs, key=errs.get, default=None)
            m = errs.get(worst, 0.0)
            report[name][str(n)] = {"params": p, "metrics": m, "n_arrays": len(arrays),
                                    "n_metrics": len(common), "worst": worst,
                                    "missing": sorted(ref_m.keys() ^ metrics.keys())}
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:] or ["target", "spd", "apd", "l3d", "gram", "channel_graph"])
