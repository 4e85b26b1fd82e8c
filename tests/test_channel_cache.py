"""Channel-graph stage cache: stages reused only when their inputs and options match, the
blocked edge sums equal one pass, and an interrupted edge pass resumes where it stopped
with the same result."""

import json

import jax
import numpy as np
import pytest

from jaxinterp import cli
from jaxinterp.channel.adapters import channel_model_for
from jaxinterp.channel.cache import PartialSums, StageCache
from jaxinterp.channel.edges import causal_edges
from jaxinterp.channel.stats import channel_stats
from jaxinterp.channel.subspaces import channels_from_stats
from jaxinterp.models.planted import PlantedChannels, product_design


@pytest.fixture(scope="module")
def planted():
    m = PlantedChannels(18, 6, activation="tanh", key=jax.random.key(7))
    with jax.enable_x64(True):
        cm = channel_model_for("planted-channels", m)
        xs = product_design(jax.random.key(8), (1.0, 0.9, 0.8, 0.7, 0.6, 0.5), 10)
        cs = channels_from_stats(channel_stats(cm, xs), cm.node_names)
    return cm, xs, cs


def _same_edges(a, b, rtol=0.0):
    for field in ("w", "signed", "ablation", "channel", "null_w", "null_channel"):
        da, db = getattr(a, field), getattr(b, field)
        assert list(da) == list(db), field  # same pairs in the same (reader-major) order
        scale = max(float(np.max(np.abs(v), initial=0.0)) for v in da.values())
        for k in da:  # relative to the field's largest entry (round-off edges are ~1e-32)
            np.testing.assert_allclose(da[k], db[k], rtol=0.0, atol=rtol * scale,
                                       err_msg=field)


def test_blocked_edge_sums_equal_one_pass(planted, getkey):
    cm, xs, cs = planted
    key = getkey()
    kw = dict(probes="random", n_probes=4, n_null=3, chunk_size=16, key=key)
    one = causal_edges(cm, cs, xs[:96], **kw)
    # 96 examples in blocks of 2 chunks (40 -> 32): the random probes are the same draws,
    # so only the order of the float64 sums differs
    _same_edges(one, causal_edges(cm, cs, xs[:96], block_size=40, **kw), rtol=1e-12)
    # a short last block splits its chunk's key into fewer examples' keys: the same
    # keys as long as split is prefix-stable (jax_threefry_partitionable, the default)
    k = jax.random.fold_in(key, 5)
    np.testing.assert_array_equal(jax.random.key_data(jax.random.split(k, 4)),
                                  jax.random.key_data(jax.random.split(k, 16))[:4])
    with pytest.raises(ValueError, match="block_size"):
        causal_edges(cm, cs, xs, block_size=0, **kw)


class _Interrupt(Exception):
    pass


class _Recorder(PartialSums):
    """Records every save; raises after ``stop_after`` of them."""

    def __init__(self, path, fingerprint, stop_after=None):
        super().__init__(path, fingerprint)
        self.saved, self.stop_after = [], stop_after

    def save(self, done, sums):
        super().save(done, sums)
        self.saved.append(done)
        if self.stop_after is not None and len(self.saved) >= self.stop_after:
            raise _Interrupt


def test_edge_sums_resume_after_interruption(planted, tmp_path, getkey):
    cm, xs, cs = planted
    kw = dict(probes="random", n_probes=4, n_null=3, chunk_size=16, block_size=32,
              key=getkey())
    xs = xs[:96]
    full = _Recorder(tmp_path / "full.pkl", "fp")
    ref = causal_edges(cm, cs, xs, partial=full, **kw)
    assert full.saved == [32, 64, 96]

    first = _Recorder(tmp_path / "edges.pkl", "fp", stop_after=1)
    with pytest.raises(_Interrupt):
        causal_edges(cm, cs, xs, partial=first, **kw)
    again = _Recorder(tmp_path / "edges.pkl", "fp")
    res = causal_edges(cm, cs, xs, partial=again, **kw)
    assert again.saved == [64, 96]  # the first block was not recomputed
    _same_edges(ref, res)  # bit for bit: the same blocks added in the same order

    # running sums of another stage configuration are not picked up
    other = _Recorder(tmp_path / "edges.pkl", "another fingerprint")
    causal_edges(cm, cs, xs, partial=other, **kw)
    assert other.saved == [32, 64, 96]


def test_cli_rerun_reuses_matching_stages_only(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "channel-graph", "planted-channels", "--out", str(out), "--no-progress",
            "--activation", "tanh", "--n-side", "6", "--n-null", "2", "--n-null-graphs", "2",
            "--plots", "false"]

    def run(*extra):
        assert cli.main([*args, *extra]) == 0, capsys.readouterr().err
        return json.loads((out / "metrics.json").read_text())

    first = run()
    assert first["cached_stages"] == [] and (out / "cache" / "edges.pkl").exists()
    assert not list((out / "cache").glob("*.partial.pkl"))  # cleared once stored
    # host-side clustering options reuse every stage, with the same results
    again = run("--n-null-graphs", "3")
    assert again["cached_stages"] == ["channels", "compression", "edges", "usage"]
    for k in ("ranks", "compression_curve", "edges", "circuits"):
        assert again[k] == first[k], k
    # a pruning option reruns the usage stage; an edge option the edges and usage
    assert run("--quantile", "0.9")["cached_stages"] == ["channels", "compression", "edges"]
    assert run("--n-null", "3")["cached_stages"] == ["channels", "compression"]
    assert run("--cache", "false")["cached_stages"] == []


def test_fingerprints_follow_model_data_and_key(planted, tmp_path):
    cm, xs, _ = planted
    k = jax.random.key(0)
    base = StageCache(tmp_path, cm, xs, k).base
    assert StageCache(tmp_path, cm, xs, k).base == base
    assert StageCache(tmp_path, cm, xs[::-1], k).base != base
    assert StageCache(tmp_path, cm, xs, jax.random.key(1)).base != base
    other = PlantedChannels(18, 6, activation="tanh", key=jax.random.key(9))
    with jax.enable_x64(True):
        assert StageCache(tmp_path, channel_model_for("planted-channels", other), xs,
                          k).base != base
    c = StageCache(tmp_path, cm, xs, k)
    assert c.fingerprint(base, n_null=2) != c.fingerprint(base, n_null=3)
    assert c.run("s", "a", lambda: 1) == 1 and c.run("s", "a", lambda: 2) == 1
    assert c.run("s", "b", lambda: 3) == 3 and c.loaded == ["s"]
