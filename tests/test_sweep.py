"""Vmapped sweeps: per-run hyperparameters inside one fit, and `jaxinterp sweep`."""

import csv
import json

import jax
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.cli import main
from jaxinterp.decomposition import spd_config, train_spd
from jaxinterp.decomposition.runs import run_settings
from jaxinterp.decomposition.sweep import parse_grid


@pytest.fixture(scope="module")
def tms():
    with jax.enable_x64(False):
        target = ji.get_target("tms-5-2")
        tcfg = target.config(steps=300, n_seeds=1, batch_size=256)
        model = ji.train_target(target, tcfg, progress=False, plots=False).model
    return target, tcfg, model


def _cfg(**kw):
    return spd_config("tms-5-2", steps=20, steps_per_call=10, batch_size=256, eval_size=256,
                      **kw)


def _leaves(tree, i):
    return [np.asarray(a)[i] for a in jax.tree_util.tree_leaves(tree)]


def test_vmapped_settings_equal_separate_runs(tms):
    """Two settings of one seed in one vmapped fit (c_imp and lr traced) end where two
    separate runs with those configs end, and evaluate with their own config."""
    target, tcfg, model = tms
    with jax.enable_x64(False):
        both = train_spd(model, target, tcfg, _cfg(), [0, 0], progress=False,
                         hyper={"c_imp": [1e-3, 3e-2], "lr": [1e-3, 3e-3]})
        runs = [train_spd(model, target, tcfg, _cfg(c_imp=c, lr=lr), [0], progress=False)
                for c, lr in ((1e-3, 1e-3), (3e-2, 3e-3))]
    for i, one in enumerate(runs):
        for a, b in zip(_leaves(both.components, i), _leaves(one.components, 0), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
        for key in ("mmcs", "ml2r", "loss/importance_minimality", "loss/stochastic_recon"):
            np.testing.assert_allclose(both.seed_metrics[i][key], one.seed_metrics[0][key],
                                       rtol=1e-4)
    # the two settings did differ
    imp = [m["loss/importance_minimality"] for m in both.seed_metrics]
    assert abs(imp[0] - imp[1]) > 1e-3 * abs(imp[0])


def test_run_settings_errors():
    cfg = _cfg()
    with pytest.raises(ValueError, match="fields that may vary within one vmapped fit"):
        run_settings("f", cfg, 2, {"C": [10, 20]}, ("c_imp",))
    with pytest.raises(ValueError, match=r"expected hyper\['c_imp'\] 2 values"):
        run_settings("f", cfg, 2, {"c_imp": [1.0]}, ("c_imp",))
    with pytest.raises(ValueError, match="a term that is on"):
        run_settings("f", cfg, 2, {"c_subset": [1.0, 2.0]}, ("c_subset",))
    with pytest.raises(ValueError, match="fields of SPDConfig"):
        run_settings("f", cfg, 1, {"nope": [1.0]}, ("nope",))
    with pytest.raises(ValueError, match="positive learning rates"):
        run_settings("f", cfg, 2, {"lr": [1e-3, 0.0]}, ("lr",))
    with pytest.raises(ValueError, match="SPDConfig: expected compute_dtype one of"):
        _cfg(compute_dtype="float8")
    s = run_settings("f", cfg, 2, {"lr": [1e-3, 4e-3]}, ("lr",))
    np.testing.assert_allclose(np.asarray(s.fit_hyper["lr_scale"]), [1.0, 4.0])
    assert [c.lr for c in s.configs] == [1e-3, 4e-3]


def test_parse_grid():
    assert parse_grid(["c-imp=1e-3,3e-3", "lr=1e-3"]) == {"c_imp": ["1e-3", "3e-3"],
                                                          "lr": ["1e-3"]}
    for bad in (["c_imp"], ["c_imp="], ["=1"]):
        with pytest.raises(ValueError, match="--grid"):
            parse_grid(bad)
    with pytest.raises(ValueError, match="each field once"):
        parse_grid(["lr=1", "lr=2"])


def test_sweep_cli_writes_results_and_resumes(tms, tmp_path, capsys):
    """A 2 x 2 grid over a traced field (c_imp) and a structural one (C) with 2 seeds:
    2 groups of 4 runs in chunks of 2, one CSV row per run, per-setting success rates and
    the distribution figure; a rerun resumes every chunk and gives the same table."""
    target, tcfg, model = tms
    tdir = tmp_path / "target"
    with jax.enable_x64(False):
        ji.train_target(target, tcfg, out=tdir, progress=False, plots=False)
    out = tmp_path / "sweep"
    argv = ["sweep", "spd", "tms-5-2", "--seeds", "0-1", "--grid", "c-imp=1e-3,3e-2",
            "--grid", "C=10,20", "--steps", "20", "--steps-per-call", "10", "--batch-size",
            "256", "--eval-size", "256", "--chunk-size", "2", "--target", str(tdir),
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "8 runs (4 settings x 2 seeds) in 4 chunk(s)" in printed
    assert "vmapped fields: c_imp" in printed
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 8
    assert [(r["c_imp"], r["C"], r["seed"]) for r in rows[:2]] == [("0.001", "10", "0"),
                                                                   ("0.001", "10", "1")]
    assert {"mmcs", "ml2r", "success", "identity_ci_error.total"} <= set(rows[0])
    m = json.load(open(out / "metrics.json"))
    assert m["n_runs"] == 8 and m["n_chunks"] == 4 and m["vmapped_fields"] == ["c_imp"]
    for entry in m["settings"]:
        assert entry["n_runs"] == 2 and 0.0 <= entry["success_rate"] <= 1.0
        mm = entry["metrics"]["mmcs"]
        assert mm["min"] <= mm["mean"] <= mm["max"] and mm["n"] == 2
    assert (out / "distributions.png").stat().st_size > 10_000
    assert len(list((out / "chunks").iterdir())) == 4
    assert main(argv) == 0  # every chunk resumes from its finished checkpoint
    again = list(csv.DictReader(open(out / "results.csv")))
    assert again == rows


def test_sweep_cli_errors(capsys):
    for argv, match in (
        (["sweep", "spd", "tms-5-2", "--seeds", "0-1", "--grid", "c_imp"], "--grid"),
        (["sweep", "spd", "tms-5-2", "--seeds", "0-1", "--grid", "nope=1,2"], "fields of"),
        (["sweep", "spd", "tms-5-2", "--seeds", "0-1", "--grid", "lr=1e-3", "--lr", "1e-3"],
         "not also given"),
        (["sweep", "lib", "modadd", "--seeds", "0-1"], "has no sweep"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err, (argv, err)
