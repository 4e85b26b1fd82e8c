"""``jaxinterp sweep METHOD TARGET --seeds A-B [--grid FIELD=v1,v2 ...]``: many seeds and
settings of one decomposition, vmapped together.

Every combination of the grid's values is a *setting*; every (setting, seed) pair is a
*run*. Runs whose settings differ only in fields the method can trace (its ``SWEEPABLE``
fields: loss coefficients that are on, exponents, the learning rate as a factor on the
updates) share one compiled program, and are vmapped together in chunks of at most
``chunk_size`` runs; settings that change the program (``C``, ``steps``, a term switched
on or off, ...) form separate groups, run one after another. A run with seed ``s`` draws
the same initialisation, data and masks under every setting (common random numbers), so
settings are compared on equal footing.

The sweep directory holds ``chunks/NNN/`` (each chunk's resumable run directory; a rerun
skips finished chunks), ``results.csv`` (one row per run: setting, seed, every scalar
metric), ``metrics.json`` (per setting: success rates, mean / std / min / max of each
metric) and ``distributions.png`` (each main metric's values per setting).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .. import io
from .._checks import fail
from .runs import coerce_overrides, load_or_train_target

MAX_CHUNK = 64  # runs vmapped together when no chunk size is given
PLOTTED = ("success", "success_unread_excluded", "mmcs", "ml2r", "identity_ci_error.total",
           "ci_l0.total", "reconstruction_error", "heldout_fvu", "n_matched")


def parse_grid(items: list[str] | None) -> dict[str, list[str]]:
    """``["c_imp=1e-3,3e-3", "lr=1e-3"]`` (dashes or underscores) -> ``{"c_imp": [...]}``."""
    grid: dict[str, list[str]] = {}
    for item in items or []:
        key, eq, vals = item.partition("=")
        values = [v for v in vals.split(",") if v]
        if not eq or not key or not values:
            raise fail("sweep", "--grid", "FIELD=v1,v2,...", repr(item))
        name = key.strip().lstrip("-").replace("-", "_")
        if name in grid:
            raise fail("sweep", "--grid", "each field once", repr(name))
        grid[name] = values
    return grid


def _flatten(m: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Scalars of a nested dict under dotted names (keypaths keep their own dot:
    ``identity_ci_error.W_enc``)."""
    out: dict[str, float] = {}
    for k, v in m.items():
        name = f"{prefix}{k[1:]}" if prefix and k.startswith(".") else f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{name}."))
        elif isinstance(v, bool | np.bool_ | int | float | np.integer | np.floating):
            out[name] = float(v)
    return out


def _run_rows(res: Any) -> list[dict[str, float]]:
    """One flat dict of scalar metrics per run of a finished method result (with the
    per-run success flags of its ``seed_success*`` lists as ``success*``)."""
    rows = [_flatten(m) for m in res.seed_metrics]
    for key, flags in res.metrics.items():
        if key.startswith("seed_success") and isinstance(flags, list):
            name = "success" + key[len("seed_success"):]
            for row, flag in zip(rows, flags, strict=True):
                row[name] = float(flag)
    return rows


def _is_oom(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def run_sweep(method: str, target_name: str, *, seeds: list[int], grid: dict[str, list[str]],
              make_config: Callable[..., Any], cls: type, int_fields: tuple[str, ...],
              train: Callable[..., Any],
              sweepable: tuple[str, ...] | Callable[[Any], tuple[str, ...]],
              overrides: dict[str, Any], options: tuple[str, ...] = (),
              steps: int | None = None, out: str | Path | None = None,
              target_dir: str | Path | None = None, chunk_size: int | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Run every (setting, seed) of ``grid`` x ``seeds`` and write the sweep directory.

    Args:
        method, target_name: names (``make_config(target_name, **overrides)`` builds a
            setting's config; ``train(model, target, tcfg, cfg, seeds, out=, hyper=)``
            runs one vmapped chunk).
        seeds: seeds of every setting.
        grid: ``{field: [values as strings]}`` (coerced like CLI overrides).
        cls, int_fields, options: the config class, its integer fields and the method's
            non-field options (``--recipe``), as for ``jaxinterp run``.
        sweepable: fields that may vary within one vmapped fit (or a function of the
            base config giving them).
        overrides: the base settings (CLI ``--field value``).
        steps, out, target_dir: as for ``jaxinterp run``.
        chunk_size: runs vmapped together (None: a group's runs, at most
            :data:`MAX_CHUNK`); a chunk that runs out of memory is retried in halves.

    Returns:
        The sweep's ``metrics.json`` content.
    """
    fn = "sweep"
    if not seeds:
        raise fail(fn, "seeds", "at least one seed", seeds)
    if chunk_size is not None and chunk_size < 1:
        raise fail(fn, "chunk_size", "a positive number of runs", chunk_size)
    if steps is not None:
        overrides = {**overrides, "steps": steps}
    extra = {k: v for k, v in overrides.items() if k in options}
    base = coerce_overrides({k: v for k, v in overrides.items() if k not in options},
                            cls, method, int_fields)
    clash = sorted(set(grid) & (set(base) | set(extra)))
    if clash:
        raise fail(fn, "--grid", "fields not also given as --FIELD", clash)
    bad = sorted(set(grid) - {f.name for f in dataclasses.fields(cls)})
    if bad:
        raise fail(fn, "--grid", f"fields of {cls.__name__}", bad)
    typed = {k: [coerce_overrides({k: v}, cls, method, int_fields)[k] for v in vals]
             for k, vals in grid.items()}
    settings = [dict(zip(typed, combo, strict=True)) for combo in
                itertools.product(*typed.values())] or [{}]
    configs = [make_config(target_name, **extra, **base, **s) for s in settings]
    # fields vmapped within a group: sweepable, and on (not None) in every setting
    if callable(sweepable):
        sweepable = sweepable(configs[0])
    traced = [k for k in typed if k in sweepable and all(v is not None for v in typed[k])]

    def static(cfg: Any) -> str:
        fixed = dataclasses.replace(cfg, **{k: getattr(configs[0], k) for k in traced})
        return json.dumps(io.to_jsonable(dataclasses.asdict(fixed)), sort_keys=True)

    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(static(cfg), []).append(i)
    chunks: list[tuple[int, list[tuple[int, int]]]] = []  # (group's first setting, runs)
    for members in groups.values():
        runs = [(i, s) for i in members for s in seeds]
        size = min(chunk_size or MAX_CHUNK, len(runs))
        chunks += [(members[0], runs[j:j + size]) for j in range(0, len(runs), size)]

    out_dir = Path(out or f"runs/sweep-{method}-{target_name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tcfg, target = load_or_train_target(target_name, target_dir, progress=progress)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=sum(len(c) for _, c in chunks), desc=f"sweep {method} {target_name}",
               unit="run", disable=not progress, dynamic_ncols=True)
    todo = [(k, first, runs) for k, (first, runs) in enumerate(chunks)]
    try:
        while todo:
            k, first, runs = todo.pop(0)
            chunk_dir = out_dir / "chunks" / (f"{k:03d}" if isinstance(k, int) else k)
            hyper = {f: [getattr(configs[i], f) for i, _ in runs] for f in traced} or None
            try:
                res = train(model, target, tcfg, configs[first], [s for _, s in runs],
                            out=chunk_dir, progress=progress and len(chunks) == 1,
                            hyper=hyper)
            except Exception as e:  # XLA reports an out-of-memory chunk as a runtime error
                if not _is_oom(e) or len(runs) == 1:
                    raise
                half = len(runs) // 2
                tqdm.write(f"sweep: chunk {k} ({len(runs)} runs) ran out of memory; "
                           f"running it in halves")
                todo[:0] = [(f"{k}a", first, runs[:half]), (f"{k}b", first, runs[half:])]
                continue
            for (i, s), metrics in zip(runs, _run_rows(res), strict=True):
                rows.append({"setting": i, **{f: _cell(v) for f, v in settings[i].items()},
                             "seed": s, **{m: v for m, v in metrics.items() if m != "seed"}})
            bar.update(len(runs))
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    rows.sort(key=lambda r: (r["setting"], seeds.index(r["seed"])))
    summary = _summarise(method, target_name, grid, settings, seeds, rows, traced, len(chunks),
                         wall)
    _write_csv(out_dir / "results.csv", rows)
    io.write_json(out_dir / "metrics.json", summary)
    plot = _plot(out_dir / "distributions.png", settings, rows)
    summary["files"] = ["results.csv", "metrics.json"] + ([plot.name] if plot else [])
    return summary


def _cell(v: Any) -> Any:
    return ",".join(str(x) for x in v) if isinstance(v, tuple | list) else v


def _summarise(method: str, target_name: str, grid: dict[str, list[str]],
               settings: list[dict[str, Any]], seeds: list[int], rows: list[dict[str, Any]],
               traced: list[str], n_chunks: int, wall: float) -> dict[str, Any]:
    keys = sorted({k for r in rows for k in r} - {"setting", "seed", *grid})
    per_setting = []
    for i, s in enumerate(settings):
        mine = [r for r in rows if r["setting"] == i]
        stats: dict[str, Any] = {}
        for k in keys:
            v = np.asarray([r[k] for r in mine if isinstance(r.get(k), float)], np.float64)
            v = v[np.isfinite(v)]
            if v.size:
                stats[k] = {"mean": float(v.mean()), "std": float(v.std()),
                            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}
        entry = {"setting": {k: _cell(v) for k, v in s.items()}, "n_runs": len(mine),
                 "metrics": stats}
        for k in keys:
            if k.startswith("success") and k in stats:
                entry[f"{k}_rate"] = stats[k]["mean"]
        per_setting.append(entry)
    return {"method": method, "target": target_name, "grid": grid, "seeds": seeds,
            "n_settings": len(settings), "n_runs": len(rows), "vmapped_fields": traced,
            "n_chunks": n_chunks, "wall_time_s": wall,
            "time_per_run_s": wall / max(len(rows), 1), "settings": per_setting}


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def _plot(path: Path, settings: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Path | None:
    """Each main metric's per-run values (dots) and mean (bar) per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in PLOTTED if any(isinstance(r.get(k), float) for r in rows)]
    if not names:
        return None
    labels = [", ".join(f"{k}={_cell(v)}" for k, v in s.items()) or "base" for s in settings]
    fig, axes = plt.subplots(len(names), 1, figsize=(max(4.0, 0.9 * len(settings) + 2),
                                                     2.2 * len(names)), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, name in zip(axes[:, 0], names, strict=True):
        for i in range(len(settings)):
            v = np.asarray([r[name] for r in rows if r["setting"] == i
                            and isinstance(r.get(name), float)])
            if v.size:
                ax.bar(i, v.mean(), color="0.85", width=0.6)
                ax.scatter(i + rng.uniform(-0.2, 0.2, v.size), v, s=10, color="C0", zorder=3)
        ax.set_ylabel(name, fontsize=8)
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels(labels if ax is axes[-1, 0] else [], rotation=30, ha="right",
                           fontsize=7)
    axes[0, 0].set_title("per-run values (dots) and mean (bar) per setting", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
