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


# The strict rule asks for the dense(2) CI pattern on tms-5-2-id's identity, which the
# paper recipe does not reach on seeds 0-3: each identity piece ends orthogonal to one
# feature's hidden vector and its CI is 0 there, the importance-minimal pattern
# (experiments/spd.md, "TMS 5-2 + identity"). Strict xfail: a pass is news.
_DENSE_IDENTITY = pytest.mark.xfail(
    strict=True, raises=AssertionError,
    reason="dense(2) IdentityCIError on hidden.0 is not what the loss prefers "
    "(experiments/spd.md, TMS 5-2 + identity)")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tms-5-2", pytest.param("tms-5-2-id", marks=_DENSE_IDENTITY)])
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
@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="mlp_out pieces end neuron-aligned, so the dense(50) pattern fails "
                   "(4 575 errors on seed 0; experiments/spd.md, resid-mlp-1)")
def test_spd_resid_mlp_1_reaches_zero_identity_ci_error():
    res = _run("resid-mlp-1", [0])
    print("resid-mlp-1", res.metrics["identity_ci_error"])
    assert res.metrics["identity_ci_error"]["total"] == 0
