"""Train every toy target from scratch on its default recipe and report its quality gate.

    python experiments/target_gates.py [--out runs/gates] [--targets tms-5-2,modadd] [--seed 0]

Writes one run directory per target under ``--out`` and ``summary.json`` / a printed
table with the gate values, kept seed and wall time. This is the reproduction behind the
"every target passes its gate" claim (specs/toy-models.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jaxinterp as ji


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="runs/gates")
    p.add_argument("--targets", default=",".join(sorted(ji.models.TARGETS)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    summary = {}
    for name in args.targets.split(","):
        t0 = time.perf_counter()
        cfg = ji.get_target(name).config(seed=args.seed)
        r = ji.train_target(name, cfg, out=out / name, progress=not args.no_progress)
        checks = {k: c["value"] for k, c in r.metrics["gate"]["checks"].items()}
        summary[name] = {"passed": r.metrics["gate"]["passed"], "seed": r.seed,
                         "seeds_tried": [m["seed"] for m in r.seed_metrics],
                         "n_seeds_passing": r.metrics["n_seeds_passing"],
                         "steps": r.metrics["steps"], "checks": checks,
                         "final_loss": r.metrics["final_loss"],
                         "test_accuracy": r.metrics.get("test_accuracy"),
                         "wall_time_s": time.perf_counter() - t0}
        print(f"{name:<14} passed={summary[name]['passed']} seed={r.seed} "
              f"steps={r.metrics['steps']} {checks} wall={summary[name]['wall_time_s']:.1f}s",
              flush=True)
        ji.io.write_json(out / "summary.json", summary)


if __name__ == "__main__":
    main()
