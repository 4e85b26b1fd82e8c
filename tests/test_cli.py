import json

import pytest

from jaxinterp import cli
from jaxinterp.methods import METHODS, Method, register_method


def run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_shows_every_target(capsys):
    code, out, _ = run(["list"], capsys)
    assert code == 0
    for name in ("tms-5-2", "resid-mlp-1", "block-mlp", "x-squared"):
        assert name in out


def test_train_writes_run_dir_and_prints_table(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, _ = run(["train", "tms-5-2", "--steps", "30", "--steps-per-call", "10",
                        "--n-seeds", "1", "--eval-size", "1000", "--out", str(out_dir),
                        "--no-progress"], capsys)
    assert code == 0
    assert "final_loss" in out and "gate passed" in out and str(out_dir) in out
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["steps"] == 30 and "final_loss" in metrics
    config = json.loads((out_dir / "config.json").read_text())
    assert config["config"]["steps"] == 30 and config["target"] == "tms-5-2"
    assert (out_dir / "feature_geometry.png").exists()


@pytest.mark.parametrize("argv,match", [
    (["train", "no-such-target"], "expected name one of"),
    (["train", "tms-5-2", "--p", "1.5"], "probability in \\[0, 1\\]"),
    (["train", "tms-5-2", "--d-hidden", "9"], "d_hidden"),
    (["train", "tms-5-2", "--bogus", "1"], "config field"),
    (["train", "tms-5-2", "--lr"], "missing value for --lr"),
    (["train", "tms-5-2", "stray"], "unexpected argument"),
    (["run", "no-such-method", "tms-5-2"], "method"),
])
def test_user_errors_are_one_line_without_traceback(argv, match, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxinterp: error:")
    assert pytest.importorskip("re").search(match, lines[0])


def test_bad_flag_type_is_reported(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "tms-5-2", "--seed", "abc"])
    assert e.value.code == 2


def test_registered_method_is_reachable_with_shared_flags(capsys, tmp_path):
    calls = {}

    def runner(target, *, seeds, steps, out, target_dir, overrides, progress):
        calls.update(target=target, seeds=seeds, steps=steps, overrides=overrides)
        return {"score": 1.5}

    register_method(Method("dummy", "test method", ("tms-5-2",), runner))
    try:
        code, out, _ = run(["run", "dummy", "tms-5-2", "--seeds", "2-4", "--steps", "7",
                            "--k", "3", "--no-progress"], capsys)
        assert code == 0 and "score" in out
        assert calls == {"target": "tms-5-2", "seeds": [2, 3, 4], "steps": 7,
                         "overrides": {"k": "3"}}
        code, _, err = run(["run", "dummy", "resid-mlp-1"], capsys)
        assert code == 2 and "supports targets" in err
        code, _, err = run(["run", "dummy", "tms-5-2", "--seeds", "5-1"], capsys)
        assert code == 2 and "--seeds" in err
        code, _, err = run(["run", "dummy", "tms-5-2", "--target", str(tmp_path / "nope")],
                           capsys)
        assert code == 2 and "no such run directory" in err
    finally:
        METHODS.pop("dummy")


def test_resume_continues_an_interrupted_run(tmp_path, capsys):
    out_dir = tmp_path / "run"
    base = ["train", "tms-5-2", "--steps-per-call", "10", "--n-seeds", "1", "--eval-size",
            "1000", "--out", str(out_dir), "--no-progress", "--checkpoint-every", "10"]
    assert run(base + ["--steps", "20"], capsys)[0] == 0
    assert run(base + ["--steps", "40"], capsys)[0] == 0
    fresh = tmp_path / "fresh"
    assert run([*base[:-5], "--out", str(fresh), "--no-progress", "--steps", "40"], capsys)[0] == 0
    a = json.loads((out_dir / "metrics.json").read_text())
    b = json.loads((fresh / "metrics.json").read_text())
    assert a["steps"] == b["steps"] == 40
    assert a["mse"] == b["mse"]
