"""The ``jaxinterp`` command.

    jaxinterp list
    jaxinterp train TARGET [--seed N] [--steps N] [--out DIR] [--FIELD VALUE ...]
    jaxinterp run METHOD TARGET [--seed N | --seeds A-B] [--steps N] [--out DIR] [--target DIR]
    jaxinterp sweep METHOD TARGET --seeds A-B [--grid FIELD=v1,v2 ...] [--chunk-size N]

``train``, ``run`` and ``sweep`` take ``--devices N`` (split every batch over a mesh of N
devices; on a CPU-only machine N host devices are made; results agree with one device to
round-off) and ``--distributed`` (``jax.distributed.initialize`` first, for multi-host runs).

Any config field of the target's recipe can be overridden with ``--field-name value``
(``jaxinterp train tms-5-2 --lr 1e-3 --batch-size 512``); a method may take options that
are not fields (``jaxinterp run spd tms-5-2 --recipe main``). User errors print one line
and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np


class UserError(Exception):
    """A mistake in the command line: printed as one line, exit status 2."""


def _parse_overrides(extra: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    i = 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--") or len(tok) <= 2:
            raise UserError(f"unexpected argument {tok!r}; config overrides look like --lr 1e-3")
        key, eq, val = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise UserError(f"missing value for --{key}")
            val = extra[i + 1]
            i += 1
        out[key.replace("-", "_")] = val
        i += 1
    return out


def parse_seeds(text: str) -> list[int]:
    """``"3"`` -> [3]; ``"0-15"`` -> [0..15]."""
    try:
        if "-" in text:
            a, b = (int(t) for t in text.split("-", 1))
        else:
            a = b = int(text)
    except ValueError:
        raise UserError(f"--seeds expects A-B (e.g. 0-15), got {text!r}") from None
    if a < 0 or b < a:
        raise UserError(f"--seeds expects 0 <= A <= B, got {text!r}")
    return list(range(a, b + 1))


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float | np.floating):
        return f"{v:.4g}"
    return str(v)


def results_table(rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {_fmt(v)}" for k, v in rows)


def cmd_list(args: argparse.Namespace) -> int:
    from .methods import METHODS
    from .models import TARGETS

    print("targets (jaxinterp train TARGET):")
    width = max(len(n) for n in TARGETS)
    for name in sorted(TARGETS):
        print(f"  {name:<{width}}  {TARGETS[name].description}")
    print("methods (jaxinterp run METHOD TARGET):")
    if not METHODS:
        print("  (none registered yet)")
    for name in sorted(METHODS):
        m = METHODS[name]
        print(f"  {name:<{width}}  {m.description} [targets: {', '.join(m.targets)}]")
    return 0


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from .models import get_target, train_target

    target = get_target(args.target)
    overrides: dict[str, Any] = _parse_overrides(extra)
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.steps is not None:
        overrides["steps"] = args.steps
    cfg = target.config(**overrides)
    out = Path(args.out) if args.out else Path("runs") / f"{target.name}-seed{cfg.seed}"
    if not args.resume and (out / "checkpoint.eqx").exists():
        (out / "checkpoint.eqx").unlink()
    result = train_target(target, cfg, out=out, progress=not args.no_progress)
    m = result.metrics
    rows: list[tuple[str, Any]] = [("target", target.name), ("seed kept", result.seed),
                                   ("seeds trained", ", ".join(str(s["seed"]) for s in
                                                               result.seed_metrics)),
                                   ("steps", m["steps"]), ("wall time (s)", m["wall_time_s"]),
                                   ("final_loss", m["final_loss"])]
    if "test_accuracy" in m:
        rows.append(("test_accuracy", m["test_accuracy"]))
    for name, chk in m["gate"]["checks"].items():
        bound = f"<= {_fmt(chk['max'])}" if "max" in chk else f">= {_fmt(chk.get('min'))}"
        verdict = "ok" if chk["ok"] else "FAIL"
        rows.append((f"gate {name}", f"{_fmt(chk['value'])} ({bound}) {verdict}"))
    rows.append(("gate passed", bool(m["gate"]["passed"])))
    print(f"\n{target.name}: {target.description}")
    print(results_table(rows))
    pngs = sorted(p.name for p in out.glob("*.png"))
    print(f"\nrun directory: {out}  (config.json, metrics.json, model.eqx, history.npz)")
    if pngs:
        print(f"plots: {', '.join(str(out / p) for p in pngs)}")
    if not m["gate"]["passed"]:
        print("warning: the quality gate did not pass; train more steps or seeds "
              "(--steps, --n-seeds).", file=sys.stderr)
    return 0


def _method_for(args: argparse.Namespace) -> Any:
    """The method of ``run`` / ``sweep``, after checking that it supports the target and
    that ``--target`` exists."""
    from .methods import get_method
    from .models import get_target

    method = get_method(args.method)
    get_target(args.target)
    if args.target not in method.targets:
        raise UserError(f"method {method.name!r} supports targets {', '.join(method.targets)}; "
                        f"got {args.target!r}")
    if args.target_dir and not Path(args.target_dir).exists():
        raise UserError(f"--target: no such run directory {args.target_dir!r}")
    return method


def cmd_run(args: argparse.Namespace, extra: list[str]) -> int:
    method = _method_for(args)
    if args.seed is not None and args.seeds is not None:
        raise UserError("give either --seed or --seeds, not both")
    seeds = parse_seeds(args.seeds) if args.seeds else [args.seed or 0]
    metrics = method.run(args.target, seeds=seeds, steps=args.steps, out=args.out,
                         target_dir=args.target_dir, overrides=_parse_overrides(extra),
                         progress=not args.no_progress)
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, int | float | np.floating | bool)]
    if rows:
        print(results_table(rows))
    return 0


def cmd_sweep(args: argparse.Namespace, extra: list[str]) -> int:
    from .decomposition.sweep import parse_grid
    from .methods import METHODS

    method = _method_for(args)
    if method.sweep is None:
        raise UserError(f"method {method.name!r} has no sweep; methods with one: "
                        + ", ".join(sorted(m for m, v in METHODS.items() if v.sweep)))
    out = args.out or f"runs/sweep-{args.method}-{args.target}"
    summary = method.sweep(args.target, seeds=parse_seeds(args.seeds),
                           grid=parse_grid(args.grid), steps=args.steps, out=out,
                           target_dir=args.target_dir, overrides=_parse_overrides(extra),
                           chunk_size=args.chunk_size, progress=not args.no_progress)
    print(f"\nsweep directory: {out}  ({', '.join(summary['files'])})")
    print(f"{summary['n_runs']} runs ({summary['n_settings']} settings x "
          f"{len(summary['seeds'])} seeds) in {summary['n_chunks']} chunk(s), "
          f"{summary['wall_time_s']:.1f} s; vmapped fields: "
          f"{', '.join(summary['vmapped_fields']) or 'none'}")
    for entry in summary["settings"]:
        label = ", ".join(f"{k}={v}" for k, v in entry["setting"].items()) or "base"
        rates = {k: v for k, v in entry.items() if k.endswith("_rate")}
        print(f"  {label}: " + ", ".join(f"{k} {v:.3g}" for k, v in rates.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxinterp", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list targets and methods")
    t = sub.add_parser("train", help="train a toy target; any config field via --field value")
    t.add_argument("target")
    t.add_argument("--seed", type=int)
    t.add_argument("--steps", type=int)
    t.add_argument("--out", help="run directory (default runs/TARGET-seedN)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start afresh even if the run directory has a checkpoint")
    r = sub.add_parser("run", help="run a decomposition method on a target")
    r.add_argument("method")
    r.add_argument("target")
    r.add_argument("--seed", type=int)
    r.add_argument("--seeds", help="A-B: run seeds A..B in one vmapped run")
    r.add_argument("--steps", type=int)
    r.add_argument("--out")
    r.add_argument("--target", dest="target_dir", help="run directory of a trained target")
    r.add_argument("--no-progress", action="store_true")
    w = sub.add_parser("sweep", help="many seeds x settings of a method, vmapped together")
    w.add_argument("method")
    w.add_argument("target")
    w.add_argument("--seeds", required=True, help="A-B: the seeds of every setting")
    w.add_argument("--grid", action="append", metavar="FIELD=V1,V2",
                   help="values of a config field (repeat for a product grid)")
    w.add_argument("--chunk-size", type=int,
                   help="runs vmapped together (default: a group's runs, at most 64)")
    w.add_argument("--steps", type=int)
    w.add_argument("--out", help="sweep directory (default runs/sweep-METHOD-TARGET)")
    w.add_argument("--target", dest="target_dir", help="run directory of a trained target")
    w.add_argument("--no-progress", action="store_true")
    for q in (t, r, w):
        q.add_argument("--devices", type=int, help="data-parallel over the first N devices "
                       "(CPU: N host devices); the same results as one device, to round-off")
        q.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() first (multi-host; with "
                       "--devices, N counts the devices of all processes)")
    return p


def _mesh(args: argparse.Namespace) -> Any:
    """The data mesh ``--devices`` / ``--distributed`` ask for (None: one device)."""
    from . import sharding

    if args.devices is not None and args.devices < 1:
        raise UserError(f"--devices: expected a positive number, got {args.devices}")
    if args.distributed:
        sharding.initialize_distributed()
    if args.devices is None and not args.distributed:
        return None
    if args.devices is not None:
        sharding.request_host_devices(args.devices)
    mesh = sharding.data_mesh(args.devices)
    devs = mesh.devices.ravel()
    print(f"data-parallel over {devs.size} {devs[0].platform} device(s)", file=sys.stderr)
    return mesh


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command == "list":
            if extra:
                raise UserError(f"unexpected arguments {' '.join(extra)}")
            return cmd_list(args)
        from .sharding import use_mesh

        with use_mesh(_mesh(args)):
            if args.command == "train":
                return cmd_train(args, extra)
            if args.command == "sweep":
                return cmd_sweep(args, extra)
            return cmd_run(args, extra)
    except (UserError, ValueError, FileNotFoundError, FloatingPointError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"jaxinterp: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxinterp: interrupted; rerun the same command to resume from the last "
              "checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
