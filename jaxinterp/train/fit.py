"""A generic optax fit loop: many updates per jit call, progress, evaluation, exact resume.

The loop is written for one run; with ``seeds=True`` every array in the state carries a
leading ``seeds`` axis and the whole update is vmapped, so N independent runs cost one
compiled program. Randomness at update ``s`` is ``step_key(key, s, DATA)``: it depends on
the run key and the update index only, which is what makes a resumed run bit-identical to
an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from .. import io
from .._checks import check_positive, fail
from ..rng import Stream, step_key
from ..sharding import DATA, replicate, shard_batch, use_mesh
from .schedules import depends_on_total

LossFn = Callable[[Any, Any, Any], tuple[jax.Array, dict[str, jax.Array]]]
SampleFn = Callable[[Any, jax.Array, jax.Array], Any]
CHECKPOINT = "checkpoint.eqx"
HISTORY = "checkpoint_history.npz"
# config fields that may differ when a run resumes: they do not change the updates
RUN_MECHANICS = ("steps_per_call", "checkpoint_every", "eval_every", "eval_size", "seed_batch")
LR_SCALE = "lr_scale"  # the hyper entry that scales a run's updates (learning rate)
EVAL_PREFIXES = ("gate_", "success_")  # quality-gate and success thresholds: evaluation only


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss term becomes NaN or infinite; names the step and the term."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def steps_extendable(cfg: Any) -> bool:
    """Whether a run of the config dataclass ``cfg`` may resume with more ``steps``: its
    ``schedule`` does not depend on the total (:func:`~jaxinterp.train.depends_on_total`)
    and nothing else is a fraction of it (no ``p_anneal``). A config without a
    ``schedule`` field (L3D: steps from epochs) is not extendable."""
    schedule = getattr(cfg, "schedule", None)
    return (schedule is not None and getattr(cfg, "p_anneal", None) is None
            and not depends_on_total(schedule, getattr(cfg, "warmup_frac", 0.0),
                                     getattr(cfg, "warmup_steps", None)))


def check_resume(path: str | Path, header: dict[str, Any] | None, steps: int, *,
                 extendable: bool = False) -> None:
    """Raise a ``ValueError`` if the checkpoint at ``path`` (if any) cannot continue the
    run described by ``header`` with ``steps`` updates in all.

    Its header must agree with ``header`` on every entry both hold (config fields, seeds,
    target, ...), except the run mechanics of :data:`RUN_MECHANICS` (they do not change
    the updates) and ``steps`` when ``extendable`` (a schedule that does not depend on the
    total number of updates, see :func:`jaxinterp.train.depends_on_total`) and the
    evaluation thresholds (names starting with ``gate_`` or ``success_``); and its
    step must not be past ``steps``. Entries only one header holds are not compared (a
    checkpoint written before a field existed still resumes).
    """
    path = Path(path)
    if not path.exists():
        return
    stored = io.read_header(path)
    done = int(stored.get("step", 0))
    if done > steps:
        raise fail("fit", "steps", f">= {done}, the step of the checkpoint to resume", steps,
                   f"{path} has done {done} updates: ask for at least as many, or start "
                   "afresh with --no-resume (resume=False).")
    old = _flat({k: v for k, v in stored.items() if k != "step"})
    new = _flat(json.loads(json.dumps(io.to_jsonable(header or {}))))
    diffs = []
    for key in sorted(old.keys() & new.keys()):
        leaf = key.rsplit(".", 1)[-1]
        if (old[key] == new[key] or leaf in RUN_MECHANICS or leaf.startswith(EVAL_PREFIXES)
                or (leaf == "steps" and extendable)):
            continue
        why = " (the schedule depends on the total number of updates)" * (leaf == "steps")
        diffs.append(f"{key} {old[key]!r} (checkpoint) vs {new[key]!r}{why}")
    if diffs:
        raise fail("fit", "settings", "equal to those of the checkpoint to resume",
                   "; ".join(diffs), f"{path} was written by another run: start afresh with "
                   "--no-resume (resume=False), or use another run directory.")


def open_run_dir(run_dir: Path | None, header: dict[str, Any], steps: int, *, resume: bool,
                 extendable: bool) -> None:
    """Create ``run_dir`` and write ``header`` to its ``config.json``, after checking that
    a checkpoint there can continue this run (:func:`check_resume`; only when
    ``resume``), so that a refused resume leaves the old ``config.json``. None: nothing."""
    if run_dir is None:
        return
    if resume:
        check_resume(run_dir / CHECKPOINT, header, steps, extendable=extendable)
    run_dir.mkdir(parents=True, exist_ok=True)
    io.write_json(run_dir / "config.json", header)


class TrainState(eqx.Module):
    params: Any
    opt_state: Any
    step: jax.Array


@dataclasses.dataclass(frozen=True)
class FitResult:
    """Outcome of :func:`fit`.

    Attributes:
        params: trained parameters (leading ``seeds`` axis when vmapped).
        opt_state: final optimizer state.
        step: number of updates done.
        history: ``{"step": (n,), term: (n,) or (n, seeds)}`` for every loss term.
        evals: ``{"step": (m,), metric: (m,) or (m, seeds)}`` from ``eval_fn``.
        wall_time: seconds spent in this call (excluding what a resumed run did before).
        steps_run: updates done in this call (``step`` minus the resumed start).
    """

    params: Any
    opt_state: Any
    step: int
    history: dict[str, np.ndarray]
    evals: dict[str, np.ndarray]
    wall_time: float
    steps_run: int = 0

    @property
    def time_per_step(self) -> float:
        """Seconds per update done in this call (0 when none was)."""
        return self.wall_time / self.steps_run if self.steps_run else 0.0


def _seeds_step(one_step, frozen_axis, data_axis, seed_batch):
    """``one_step`` over a leading seeds axis: vmapped over groups of ``seed_batch`` seeds
    (all at once when None), the groups one after another (``lax.map``). One seed runs
    without a vmap (a size-1 vmap measured 7-11 % slower on an APD resid-mlp-1 step,
    CPU); shapes are static, so the path is chosen at trace time."""
    vmapped = jax.vmap(one_step, in_axes=(0, frozen_axis, data_axis, 0))

    def step(state, frozen, data, key):
        def one(xs):
            st, fr, da, k = xs
            return one_step(st, frozen if frozen_axis is None else fr,
                            data if data_axis is None else da, k)

        # the operands with a seeds axis; shared ones stay out (None) and are closed over
        xs = (state, None if frozen_axis is None else frozen,
              None if data_axis is None else data, key)
        n = jnp.shape(jax.tree_util.tree_leaves(key)[0])[0]  # key: (run keys, hyper)
        if n == 1:
            out = one(jax.tree_util.tree_map(lambda v: v[0], xs))
            return jax.tree_util.tree_map(lambda v: v[None], out)
        if seed_batch is None or seed_batch >= n:
            return vmapped(state, frozen, data, key)
        return jax.lax.map(one, xs, batch_size=seed_batch)  # groups vmapped, in turn

    return step


def initial_state(params: Any, optimizer: optax.GradientTransformation, seeds: bool
                  ) -> TrainState:
    """Step 0 of :func:`fit`: ``optimizer``'s state for ``params`` (per seed, vmapped, with a
    ``(seeds,)`` step counter when ``seeds``)."""
    if not seeds:
        return TrainState(params, optimizer.init(params), jnp.asarray(0, jnp.int32))
    n_seeds = jax.tree_util.tree_leaves(params)[0].shape[0]
    return TrainState(params, jax.vmap(optimizer.init)(params),
                      jnp.zeros((n_seeds,), jnp.int32))


def _make_chunk(loss_fn: LossFn, sample_fn: SampleFn, optimizer, seeds: bool, data_axis,
                frozen_axis=0, project=None, seed_batch: int | None = None):
    def one_step(state: TrainState, frozen, data, run):
        key, hyper = run
        k = step_key(key, state.step, Stream.DATA)
        batch = shard_batch(sample_fn(data, k, state.step))  # split over a "data" mesh axis
        if hyper is None:
            value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
            (loss, aux), grads = value_and_grad(state.params, frozen, batch)
        else:
            value_and_grad = jax.value_and_grad(lambda p: loss_fn(p, frozen, batch, hyper),
                                                has_aux=True)
            (loss, aux), grads = value_and_grad(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        if hyper is not None and LR_SCALE in hyper:  # the optimizers are linear in lr
            updates = jax.tree_util.tree_map(lambda u: u * hyper[LR_SCALE], updates)
        params = optax.apply_updates(state.params, updates)
        if project is not None:
            params = project(params)
        terms = {"loss": loss, **aux}
        return TrainState(params, opt_state, state.step + 1), terms

    if seeds:
        one_step = _seeds_step(one_step, frozen_axis, data_axis, seed_batch)

    @eqx.filter_jit
    def chunk(state, frozen, data, key, n: int, hyper=None):
        run = (key, hyper)  # vmapped together over the seeds axis

        def body(s, _):
            s, terms = one_step(s, frozen, data, run)
            return s, terms

        return jax.lax.scan(body, state, None, length=n)

    return chunk


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def mixed_precision(loss_fn: Callable[..., Any], compute_dtype: str) -> Callable[..., Any]:
    """``loss_fn`` evaluated on copies of its float32 arguments cast to ``compute_dtype``,
    returning float32 loss and terms (gradients reach the float32 originals through the
    casts). ``"float32"``: ``loss_fn`` itself."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise fail("fit", "compute_dtype", f"one of {COMPUTE_DTYPES}", repr(compute_dtype))
    if compute_dtype == "float32":
        return loss_fn
    low = jnp.dtype(compute_dtype)

    def down(tree):
        return jax.tree_util.tree_map(
            lambda a: a.astype(low) if eqx.is_inexact_array(a) and a.dtype == jnp.float32
            else a, tree)

    def up(tree):
        return jax.tree_util.tree_map(
            lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, tree)

    def cast_loss(params, frozen, batch, *hyper):
        loss, aux = loss_fn(down(params), down(frozen), down(batch), *hyper)
        return up(loss), up(aux)

    return cast_loss


def _check_finite(terms: dict[str, np.ndarray], first_step: int) -> None:
    for name, vals in terms.items():
        v = np.asarray(vals)
        bad = ~np.isfinite(v)
        if bad.any():
            idx = np.argwhere(bad)[0]
            step = first_step + int(idx[0])
            where = f" (seed index {int(idx[1])})" if v.ndim > 1 else ""
            raise NonFiniteLossError(
                f"fit: loss term '{name}' became {v[tuple(idx)]} at step {step}{where}. "
                "Lower the learning rate or check the data; the last checkpoint is intact."
            )


def fit(
    loss_fn: LossFn,
    params: Any,
    frozen: Any,
    optimizer: optax.GradientTransformation,
    sample_fn: SampleFn,
    *,
    steps: int,
    key: jax.Array,
    data: Any = None,
    seeds: bool = False,
    data_axis: int | None = None,
    frozen_axis: int | None = 0,
    steps_per_call: int = 100,
    seed_batch: int | None = None,
    project: Callable[[Any], Any] | None = None,
    eval_fn: Callable[[Any, Any, int], dict[str, Any]] | None = None,
    eval_every: int | None = None,
    stop_fn: Callable[[dict[str, np.ndarray]], bool] | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    header: dict[str, Any] | None = None,
    extendable: bool = False,
    progress: bool = True,
    desc: str = "train",
    mesh: jax.sharding.Mesh | None = None,
    hyper: dict[str, Any] | None = None,
    compute_dtype: str = "float32",
) -> FitResult:
    """Minimise ``loss_fn(params, frozen, batch)`` with ``optimizer``.

    Args:
        loss_fn: ``(params, frozen, batch) -> (loss, {term: value})``; ``frozen`` is never
            differentiated (e.g. a frozen target, embeddings).
        params: trainable pytree (leading ``seeds`` axis on every leaf if ``seeds``).
        frozen: non-trainable pytree passed through unchanged.
        optimizer: an optax transformation.
        sample_fn: ``(data, key, step) -> batch``, pure; fresh batches come from the key,
            fixed datasets from ``data``.
        steps: total number of updates (a resumed run continues up to this number).
        key: run key (``(seeds,)`` keys if ``seeds``).
        data: fixed dataset pytree handed to ``sample_fn`` (may be None).
        seeds: vmap everything over a leading ``seeds`` axis.
        data_axis: ``0`` if ``data`` has a leading ``seeds`` axis too, else None.
        frozen_axis: ``0`` if ``frozen`` has a leading ``seeds`` axis (default), None if
            all seeds share it (e.g. one target decomposed from several seeds).
        steps_per_call: updates fused into one jit-compiled ``lax.scan``.
        seed_batch: with ``seeds``, vmap this many seeds at a time and run the groups
            one after another inside the step (None: all seeds in one vmap). On a CPU a
            wide vmap can cost more per seed than running seeds in turn (APD tms-40-10:
            about 2x per seed with 4 seeds vmapped); a GPU wants them all at once.
        project: optional ``params -> params`` applied after every update (a projection
            such as L3D's decoder normalisation); per seed when ``seeds``.
        eval_fn: host-side ``(params, frozen, step) -> {metric: value}``, called every
            ``eval_every`` updates and at the end.
        eval_every: evaluation period (rounded up to a multiple of ``steps_per_call``).
        stop_fn: ``(evals) -> bool`` early stop, checked after each evaluation.
        checkpoint_dir: where ``checkpoint.eqx`` and ``checkpoint_history.npz`` go (None:
            no checkpoints).
        checkpoint_every: checkpoint period (rounded up to a multiple of ``steps_per_call``);
            a final checkpoint is always written when ``checkpoint_dir`` is set.
        resume: continue from ``checkpoint_dir/checkpoint.eqx`` if it exists; its header
            must match ``header`` (:func:`check_resume`).
        header: JSON-able dict stored in the checkpoint header (e.g. the config).
        extendable: the schedule does not depend on ``steps``, so a run may resume with
            more (or fewer, down to the checkpoint's step) updates than it was started with.
        progress: show a tqdm bar.
        desc: progress-bar label.
        mesh: a mesh with a ``"data"`` axis (:func:`jaxinterp.sharding.data_mesh`): every
            sampled batch is split along it (its size must divide the batch size) and
            state, ``frozen`` and ``data`` are replicated on it; None: the mesh set with
            ``jax.set_mesh`` if any, else one device. Results agree across device counts
            to round-off (global sums stay global; keys never depend on the device).
        hyper: per-run hyperparameters ``{name: (seeds,) array}`` (with ``seeds``) or
            scalars: ``loss_fn`` is then called as ``loss_fn(params, frozen, batch,
            hyper)`` with one run's values, so settings vmap along with the seeds
            (``jaxinterp sweep``); the entry ``"lr_scale"`` multiplies the run's updates,
            which is the learning rate times that factor for every optimizer of
            :func:`~jaxinterp.train.make_optimizer`. None: ``loss_fn(params, frozen, batch)``.
        compute_dtype: ``"bfloat16"`` or ``"float16"``: mixed precision, the loss runs on
            copies of the float32 parameters, frozen pytree and batch cast to that dtype
            (``jnp`` sums and means still accumulate in float32), and the loss, its terms,
            the gradients, the optimizer state and the parameters stay float32.

    Returns:
        A :class:`FitResult`.

    Raises:
        NonFiniteLossError: a loss term became non-finite (names step and term).
        ValueError: bad arguments, or a checkpoint this run cannot resume.
    """
    fn = "fit"
    check_positive(fn, "steps", steps, integer=True)
    check_positive(fn, "steps_per_call", steps_per_call, integer=True)
    if seeds and jnp.ndim(key) == 0:
        raise fail(fn, "key", "a (seeds,) array of keys when seeds=True", "a single key")

    def round_up(n):
        return None if not n else int(-(-n // steps_per_call) * steps_per_call)

    eval_every, checkpoint_every = round_up(eval_every), round_up(checkpoint_every)
    state = initial_state(params, optimizer, seeds)
    history: dict[str, list] = {}
    evals: dict[str, list] = {}
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    start = 0
    if ckpt is not None and resume and ckpt.exists():
        check_resume(ckpt, header, steps, extendable=extendable)
        like = eqx.filter_eval_shape(lambda s: s, state)
        state, hdr = io.load_tree(ckpt, like)
        start = int(hdr["step"])
        hist_file = ckpt.parent / HISTORY
        if hist_file.exists():
            for k, v in io.load_history(hist_file).items():
                if k.startswith("eval/"):
                    evals[k[5:]] = list(v)
                else:
                    history[k] = list(v)
    if seed_batch is not None:
        check_positive(fn, "seed_batch", seed_batch, integer=True)
    chunk = _make_chunk(mixed_precision(loss_fn, compute_dtype), sample_fn, optimizer, seeds,
                        data_axis, frozen_axis, project, seed_batch)
    if mesh is None:  # the mesh set with jax.set_mesh, if it has a data axis
        ambient = jax.sharding.get_mesh()
        mesh = ambient if not ambient.empty and DATA in ambient.axis_names else None
    if hyper is not None:
        hyper = {k: jnp.asarray(v) for k, v in hyper.items()}
        want = (jax.tree_util.tree_leaves(params)[0].shape[0],) if seeds else ()
        for k, v in hyper.items():
            if v.shape != want:
                raise fail(fn, f"hyper[{k!r}]", f"of shape {want} (one value per run)", v.shape)
    state, frozen, data, key, hyper = replicate((state, frozen, data, key, hyper), mesh)

    def flat_history():
        out = {k: np.asarray(v) for k, v in history.items()}
        out.update({f"eval/{k}": np.asarray(v) for k, v in evals.items()})
        return out

    def save(step):
        if ckpt is None:
            return
        io.save_tree(ckpt, state, {**(header or {}), "step": step})
        io.save_history(ckpt.parent / HISTORY, flat_history())

    def run_eval(step):
        if eval_fn is None:
            return
        metrics = eval_fn(state.params, frozen, step)
        evals.setdefault("step", []).append(step)
        for k, v in metrics.items():
            evals.setdefault(k, []).append(np.asarray(v))

    t0 = time.perf_counter()
    with use_mesh(mesh):  # chunks and evaluations traced under the mesh
        step = start
        bar = tqdm(total=steps, initial=start, desc=desc, disable=not progress,
                   dynamic_ncols=True, mininterval=0.5)
        try:
            while step < steps:
                n = min(steps_per_call, steps - step)
                new_state, terms = chunk(state, frozen, data, key, n, hyper)
                terms = jax.device_get(terms)
                _check_finite(terms, step)
                state = new_state
                history.setdefault("step", []).extend(range(step + 1, step + n + 1))
                for k, v in terms.items():
                    history.setdefault(k, []).extend(np.asarray(v))
                step += n
                bar.update(n)
                last = float(np.mean(terms["loss"][-1]))
                bar.set_postfix(loss=f"{last:.4g}", refresh=False)
                if eval_every and step % eval_every == 0 and step < steps:
                    run_eval(step)
                    if stop_fn is not None and stop_fn(
                            {k: np.asarray(v) for k, v in evals.items()}):
                        break
                if checkpoint_every and step % checkpoint_every == 0 and step < steps:
                    save(step)
        finally:
            bar.close()
        if eval_fn is not None and (not evals.get("step") or evals["step"][-1] != step):
            run_eval(step)
        save(step)
    return FitResult(
        params=state.params,
        opt_state=state.opt_state,
        step=step,
        history={k: np.asarray(v) for k, v in history.items()},
        evals={k: np.asarray(v) for k, v in evals.items()},
        wall_time=time.perf_counter() - t0,
        steps_run=step - start,
    )
