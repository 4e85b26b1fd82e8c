"""SPD reproductions on the paper presets (specs/spd.md section 10, slow tests; run with
``python -m pytest -m slow tests/test_spd_slow.py``). Each trains its target first."""

import jax
import pytest

import jaxinterp as ji
from jaxinterp.decomposition import spd_config, train_spd


def _run(name: str, seeds: list[int]):
    with jax.enable_x64(False):
        target = ji.get_target(name)
        model = ji.train_target(name, progress=False, plots=False).model
        return train_spd(model, target, target.config(), spd_config(name), seeds,
                         progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tms-5-2", "tms-5-2-id"])
def test_spd_tms_meets_the_paper_numbers_on_some_seed(name):
    res = _run(name, [0, 1, 2, 3])
    print(name, "success rate", res.metrics["success_rate"])
    assert res.metrics["success_rate"] > 0, [
        (m["mmcs"], m["ml2r"], m["identity_ci_error"]) for m in res.seed_metrics]
    for m, ok in zip(res.seed_metrics, res.metrics["seed_success"], strict=True):
        if ok:  # a passing seed has exactly one live subcomponent per feature (+ d_h on id)
            assert m["n_non_negligible"][".W_enc"] == 5
            if name.endswith("-id"):
                assert m["n_non_negligible"][".hidden[0]"] == 2


@pytest.mark.slow
def test_spd_resid_mlp_1_reaches_zero_identity_ci_error():
    res = _run("resid-mlp-1", [0])
    print("resid-mlp-1", res.metrics["identity_ci_error"])
    assert res.metrics["identity_ci_error"]["total"] == 0
