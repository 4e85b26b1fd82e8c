"""``induction``: a two-layer attention-only transformer trained to complete a repeated
bigram in context (``specs/toy-models.md`` section 8), the channel graph's induction toy.

Sequences are ``[BOS] ... T S M ... T S`` and the label is ``M``: as in the SPD
induction-head task, ``S`` is the special (induction) token, the ``T`` (every ``...``)
are filler tokens and ``M`` the memorised token, both drawn uniformly from the
``n_tokens`` ordinary tokens; the first ``S M`` starts at a uniform position in
``1 .. n_ctx - 4`` and the sequence ends with a filler and ``S``. Only the last
position's prediction is trained. Tokens ``0 .. n_tokens - 1`` are ordinary,
``n_tokens`` is ``BOS`` and ``n_tokens + 1`` is ``S``.

The model has no LayerNorm, no MLP and no biases. Fixed sinusoidal positions are added to
the inputs of ``W_Q`` and ``W_K`` only, never to the residual stream or the values:

    q = (r + pos) W_Q,   k = (r + pos) W_K,   v = r W_V,   o = softmax(q k^T / sqrt(e)) v W_O

so position reaches the stream only through attention patterns. The circuit that solves
the task is a previous-token head in layer 0 (positions in QK; at ``M`` it attends to the
``S`` before it and its OV writes that ``S`` was the previous token) composed with an
induction head in layer 1 (its query at the final ``S`` matches the keys carrying "the
previous token was ``S``", which layer 0 wrote: K-composition; its OV copies ``M``).
Because ``S`` is one special token, layer 0 needs to move only that token, and trained
heads attend to a recent ``S`` rather than to every previous token (see
``prev_token_at_m`` in :func:`head_scores`). Weights use the TransformerLens layout
(``W_Q: (n_heads, d_model, d_head)``, ``W_O: (n_heads, d_head, d_model)``) under
``.layers[i]``; the embedding is ``.W_E`` and the unembedding ``.W_U``.

References:
    Elhage et al. (2021), "A Mathematical Framework for Transformer Circuits"; Olsson et
    al. (2022), "In-context Learning and Induction Heads" (arXiv 2209.11895); Press,
    Smith, Lewis (2021), "Shortformer" (positions added to queries and keys only).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import plots
from .._checks import check_positive, check_shape, fail
from .._types import Array, Float, Int, Key
from .base import ToyTarget, TrainConfig, register

__all__ = ["Attention", "InductionTransformer", "final_logits", "head_forward",
           "induction_batch", "labels_of", "sinusoidal_positions"]


def sinusoidal_positions(n_ctx: int, d: int, dtype: Any = jnp.float32) -> Array:
    """``(n_ctx, d)``: ``sin(t w_i)`` in even and ``cos(t w_i)`` in odd columns,
    ``w_i = 10000^(-2i/d)`` (Vaswani et al. 2017)."""
    t = jnp.arange(n_ctx, dtype=dtype)[:, None]
    w = 10_000.0 ** (-jnp.arange(0, d, 2, dtype=dtype) / d)
    ang = t * w[None, :]
    return jnp.stack([jnp.sin(ang), jnp.cos(ang)], axis=-1).reshape(n_ctx, -1)[:, :d]


class Attention(eqx.Module):
    """One layer's heads (no biases).

    Attributes:
        W_Q, W_K, W_V: ``(n_heads, d_model, d_head)``.
        W_O: ``(n_heads, d_head, d_model)``.
    """

    W_Q: Float[Array, "heads d_resid d_head"]
    W_K: Float[Array, "heads d_resid d_head"]
    W_V: Float[Array, "heads d_resid d_head"]
    W_O: Float[Array, "heads d_head d_resid"]


def head_forward(w_q: Array, w_k: Array, w_v: Array, w_o: Array, pos: Array | float,
                 r: Array, *, frozen_pattern: bool = False, frozen_values: bool = False,
                 frozen_queries: bool = False, frozen_keys: bool = False,
                 bias: tuple[Array, Array, Array] | None = None) -> dict[str, Array]:
    """One head on one example's stream.

    Args:
        w_q, w_k, w_v: ``(d_model, d_head)``; w_o: ``(d_head, d_model)``.
        pos: ``(P, d_model)`` positions added to the query and key inputs (0: none).
        r: ``(P, d_model)`` residual stream.
        frozen_pattern: compute the pattern from ``stop_gradient(r)``: the same values,
            but derivatives hold the attention pattern at its value (the head is then
            linear in ``r`` through OV).
        frozen_values: compute the values from ``stop_gradient(r)``: derivatives move
            the pattern only (the QK path). The full Jacobian is the sum of the two.
        frozen_queries, frozen_keys: compute the queries (keys) from
            ``stop_gradient(r)``: with ``frozen_values``, derivatives move the pattern
            through the keys only (K-composition) or the queries only (Q-composition);
            the QK path is the sum of those two.
        bias: ``(b_q, b_k, b_v)``, each ``(d_head,)``, added to q, k and v (None: none).

    Returns:
        ``{"x": r + pos, "q", "k", "v": (P, d_head), "pattern": (P, P) (query, key),
        "z": (P, d_head), "out": (P, d_model)}``.
    """
    x = r + pos
    held = jax.lax.stop_gradient(x)
    q = (held if frozen_pattern or frozen_queries else x) @ w_q
    k = (held if frozen_pattern or frozen_keys else x) @ w_k
    v = (jax.lax.stop_gradient(r) if frozen_values else r) @ w_v
    if bias is not None:
        q, k, v = q + bias[0][None, :], k + bias[1][None, :], v + bias[2][None, :]
    n = r.shape[0]
    scores = (q @ k.T) / jnp.sqrt(jnp.asarray(w_q.shape[-1], r.dtype))
    causal = jnp.tril(jnp.ones((n, n), dtype=bool))
    pattern = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    z = pattern @ v
    return {"x": x, "q": q, "k": k, "v": v, "pattern": pattern, "z": z, "out": z @ w_o}


def _layer_forward(at: Attention, pos: Array, r: Array) -> dict[str, Array]:
    """Every head of a layer, vmapped over heads (leading ``heads`` axis)."""
    return jax.vmap(head_forward, in_axes=(0, 0, 0, 0, None, None))(
        at.W_Q, at.W_K, at.W_V, at.W_O, pos, r)


class InductionTransformer(eqx.Module):
    """Attention-only transformer. Call on ONE example ``tokens: (n_ctx,)``; vmap for
    batches.

    Attributes:
        W_E: ``(vocab, d_model)``; W_U: ``(d_model, vocab)``.
        layers: one :class:`Attention` per layer.
        n_tokens: ordinary tokens (``vocab = n_tokens + 2``: BOS and T).
        n_ctx: sequence length.
    """

    W_E: Float[Array, "vocab d_resid"]
    layers: tuple[Attention, ...]
    W_U: Float[Array, "d_resid vocab"]
    n_tokens: int = eqx.field(static=True)
    n_ctx: int = eqx.field(static=True)

    def __init__(self, n_tokens: int = 128, n_ctx: int = 64, d_model: int = 16,
                 n_layers: int = 2, n_heads: int = 1, d_head: int = 16, *,
                 init_scale: float = 1.0, key: Key):
        fn = "InductionTransformer"
        for name, v in [("n_tokens", n_tokens), ("d_model", d_model), ("n_layers", n_layers),
                        ("n_heads", n_heads), ("d_head", d_head)]:
            check_positive(fn, name, v, integer=True)
        check_positive(fn, "init_scale", init_scale)
        if n_ctx < 6:
            raise fail(fn, "n_ctx", ">= 6 (BOS, T S M, T S)", n_ctx)
        vocab = n_tokens + 2
        ks = iter(jax.random.split(key, 2 + 4 * n_layers))
        std = init_scale / d_model**0.5
        self.W_E = init_scale * jax.random.normal(next(ks), (vocab, d_model))
        self.layers = tuple(
            Attention(
                W_Q=std * jax.random.normal(next(ks), (n_heads, d_model, d_head)),
                W_K=std * jax.random.normal(next(ks), (n_heads, d_model, d_head)),
                W_V=std * jax.random.normal(next(ks), (n_heads, d_model, d_head)),
                W_O=init_scale / d_head**0.5
                * jax.random.normal(next(ks), (n_heads, d_head, d_model)),
            )
            for _ in range(n_layers))
        self.W_U = std * jax.random.normal(next(ks), (d_model, vocab))
        self.n_tokens, self.n_ctx = n_tokens, n_ctx

    @property
    def vocab(self) -> int:
        return self.n_tokens + 2

    @property
    def bos(self) -> int:
        return self.n_tokens

    @property
    def special(self) -> int:
        """The special induction token ``S``."""
        return self.n_tokens + 1

    @property
    def n_heads(self) -> int:
        return self.layers[0].W_Q.shape[0]

    def positions(self) -> Array:
        """``(n_ctx, d_model)`` sinusoidal positions (not trained)."""
        return sinusoidal_positions(self.n_ctx, self.W_E.shape[1], self.W_E.dtype)

    def forward_with_cache(self, tokens: Int[Array, " positions"]
                           ) -> tuple[Array, dict[str, tuple[Array, Array]]]:
        """Logits ``(n_ctx, vocab)`` at every position and, per weight matrix, its
        (input, output): ``.W_E`` (one-hot tokens), ``.layers[i].W_Q``/``W_K`` (stream
        plus positions, broadcast over heads: ``(heads, P, d_model) -> (heads, P,
        d_head)``), ``.layers[i].W_V`` (stream), ``.layers[i].W_O`` (``z (heads, P,
        d_head) -> (heads, P, d_model)``, per head before the sum) and ``.W_U``."""
        check_shape("InductionTransformer", "tokens", tokens, (f"positions={self.n_ctx}",),
                    "The model takes one example; vmap over the batch.")
        cache: dict[str, tuple[Array, Array]] = {}
        one_hot = jax.nn.one_hot(tokens, self.vocab, dtype=self.W_E.dtype)
        r = one_hot @ self.W_E
        cache[".W_E"] = (one_hot, r)
        pos = self.positions()
        for i, at in enumerate(self.layers):
            h = _layer_forward(at, pos, r)
            name = f".layers[{i}]"
            rb = jnp.broadcast_to(r[None], (at.W_Q.shape[0], *r.shape))
            cache[f"{name}.W_Q"] = (h["x"], h["q"])  # x = r + pos, one copy per head
            cache[f"{name}.W_K"] = (h["x"], h["k"])
            cache[f"{name}.W_V"] = (rb, h["v"])
            cache[f"{name}.W_O"] = (h["z"], h["out"])
            r = r + jnp.sum(h["out"], axis=0)
        logits = r @ self.W_U
        cache[".W_U"] = (r, logits)
        return logits, cache

    def __call__(self, tokens: Int[Array, " positions"]) -> Float[Array, "positions vocab"]:
        return self.forward_with_cache(tokens)[0]

    def patterns(self, tokens: Int[Array, " positions"]) -> Float[Array, "layers heads P P"]:
        """Attention patterns ``(n_layers, n_heads, P, P)`` (query, key) of one example."""
        pos, r, out = self.positions(), self.W_E[tokens], []
        for at in self.layers:
            h = _layer_forward(at, pos, r)
            out.append(h["pattern"])
            r = r + jnp.sum(h["out"], axis=0)
        return jnp.stack(out)

    def ground_truth(self) -> dict[str, Any]:
        """The task's structure (the head roles are measured, see
        :func:`head_scores`)."""
        return {"n_tokens": self.n_tokens, "bos": self.bos, "special": self.special,
                "n_ctx": self.n_ctx, "label": "the token after the first S"}


def final_logits(model: InductionTransformer,
                 tokens: Int[Array, "batch positions"]) -> Float[Array, "batch vocab"]:
    """Last-position logits of a batch, computing the last layer only at the last query.
    Equals ``jax.vmap(model)(tokens)[:, -1]`` up to float rounding (used for training)."""
    check_shape("final_logits", "tokens", tokens, (None, model.n_ctx))
    pos = model.positions()

    def one(tok):
        r = model.W_E[tok]
        for at in model.layers[:-1]:
            r = r + jnp.sum(_layer_forward(at, pos, r)["out"], axis=0)
        at = model.layers[-1]
        x = r + pos
        q = jnp.einsum("d,hde->he", x[-1], at.W_Q)
        k = jnp.einsum("pd,hde->hpe", x, at.W_K)
        v = jnp.einsum("pd,hde->hpe", r, at.W_V)
        scores = jnp.einsum("he,hpe->hp", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], r.dtype))
        a = jax.nn.softmax(scores, axis=-1)  # the last query sees every key
        out = jnp.einsum("hp,hpe,hed->d", a, v, at.W_O)
        return (r[-1] + out) @ model.W_U

    return jax.vmap(one)(tokens)


def induction_batch(key: Key, batch: int, n_ctx: int, n_tokens: int
                    ) -> Int[Array, "batch positions"]:
    """``(batch, n_ctx)`` sequences ``[BOS] ... T S M ... T S`` (see the module
    docstring); the label of a row is :func:`labels_of`."""
    fn = "induction_batch"
    check_positive(fn, "batch", batch, integer=True)
    if n_ctx < 6:
        raise fail(fn, "n_ctx", ">= 6", n_ctx)
    check_positive(fn, "n_tokens", n_tokens, integer=True)
    return _induction_batch(key, batch, n_ctx, n_tokens)


@eqx.filter_jit
def _induction_batch(key: Key, batch: int, n_ctx: int, n_tokens: int) -> Array:
    km, kf, ki = jax.random.split(key, 3)
    m = jax.random.randint(km, (batch, 1), 0, n_tokens)
    fill = jax.random.randint(kf, (batch, n_ctx), 0, n_tokens)
    start = jax.random.randint(ki, (batch, 1), 1, n_ctx - 3)  # S M in 1 .. n_ctx - 3
    p = jnp.arange(n_ctx)[None, :]
    bos, s = n_tokens, n_tokens + 1
    tok = jnp.where((p == start) | (p == n_ctx - 1), s, fill)
    tok = jnp.where(p == start + 1, m, tok)
    return jnp.where(p == 0, bos, tok).astype(jnp.int32)


def labels_of(tokens: Int[Array, "batch positions"], n_tokens: int) -> Int[Array, " batch"]:
    """The token after the first ``S`` of each row (``S = n_tokens + 1``)."""
    pos = match_positions(tokens, n_tokens)
    return jnp.take_along_axis(tokens, pos[:, None], axis=1)[:, 0]


def match_positions(tokens: Int[Array, "batch positions"], n_tokens: int
                    ) -> Int[Array, " batch"]:
    """Position of ``M``, after the first ``S`` (where an induction head at the last
    position should look)."""
    return jnp.argmax(tokens == n_tokens + 1, axis=1) + 1


def head_scores(model: InductionTransformer, tokens: Int[Array, "batch positions"]
                ) -> dict[str, np.ndarray]:
    """Per head ``(n_layers, n_heads)``: ``prev_token`` (mean attention from every
    position ``t >= 2`` to ``t - 1``), ``prev_token_at_m`` (from the position of ``M``
    to the ``S`` before it: the one previous-token move the task needs) and
    ``induction`` (from the last position to the position of ``M``)."""
    return {k: np.asarray(v) for k, v in _head_scores(model, jnp.asarray(tokens)).items()}


@eqx.filter_jit
def _head_scores(model: InductionTransformer, tokens: Array) -> dict[str, Array]:
    pats = jax.vmap(model.patterns)(tokens)  # (B, L, H, P, P)
    t = jnp.arange(2, model.n_ctx)
    prev = jnp.mean(pats[:, :, :, t, t - 1], axis=(0, 3))
    mpos = match_positions(tokens, model.n_tokens)

    def at(query, key):  # (B,) positions -> (B, L, H)
        rows = jnp.take_along_axis(pats, query[:, None, None, None, None], axis=3)[..., 0, :]
        return jnp.take_along_axis(rows, key[:, None, None, None], axis=-1)[..., 0]

    last = jnp.full_like(mpos, model.n_ctx - 1)
    return {"prev_token": prev, "prev_token_at_m": jnp.mean(at(mpos, mpos - 1), axis=0),
            "induction": jnp.mean(at(last, mpos), axis=0)}


@eqx.filter_jit
def _evaluate(model: InductionTransformer, key: Key, n: int, n_ctx: int, n_tokens: int):
    tok = induction_batch(key, n, n_ctx, n_tokens)
    labels = labels_of(tok, n_tokens)
    logits = jax.vmap(model)(tok)[:, -1]
    return (cross_entropy(logits, labels), jnp.mean(jnp.argmax(logits, axis=-1) == labels),
            jnp.max(jnp.abs(final_logits(model, tok) - logits)), tok[:512])


def cross_entropy(logits: Float[Array, "batch vocab"], labels: Int[Array, " batch"]) -> Array:
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class InductionConfig(TrainConfig):
    """``specs/toy-models.md`` section 8: AdamW lr 1e-3, weight decay 0.01, warm-up 1 000
    of the 100k updates (``warmup_frac = 0.01``, so short runs scale it), batch 1024.

    Attributes:
        n_tokens, n_ctx, d_model, n_layers, n_heads, d_head, init_scale: model.
        eval_size: fresh sequences of the evaluation (and the training-time metrics).
        gate_accuracy: quality gate on the accuracy of predicting ``M``.
        early_stop: stop once the last ``stop_patience`` evaluations reached
            ``stop_accuracy`` (0: never).
    """

    n_tokens: int = 128
    n_ctx: int = 64
    d_model: int = 16
    n_layers: int = 2
    n_heads: int = 1
    d_head: int = 16
    init_scale: float = 1.0
    steps: int = 100_000
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.01
    steps_per_call: int = 250
    eval_every: int = 1000
    checkpoint_every: int = 5000
    eval_size: int = 4096
    gate_accuracy: float = 0.9
    early_stop: bool = True
    stop_accuracy: float = 0.99
    stop_patience: int = 3

    def __post_init__(self):
        super().__post_init__()
        fn = "InductionConfig"
        for name in ("n_tokens", "d_model", "n_layers", "n_heads", "d_head", "eval_size",
                     "stop_patience"):
            check_positive(fn, name, getattr(self, name), integer=True)
        if self.n_ctx < 6:
            raise fail(fn, "n_ctx", ">= 6", self.n_ctx)
        if self.n_layers < 2:
            raise fail(fn, "n_layers", ">= 2 (induction needs two layers)", self.n_layers)


@eqx.filter_jit
def _init(n_tokens: int, n_ctx: int, d_model: int, n_layers: int, n_heads: int, d_head: int,
          init_scale: float, key: Key) -> InductionTransformer:
    return InductionTransformer(n_tokens, n_ctx, d_model, n_layers, n_heads, d_head,
                                init_scale=init_scale, key=key)


class InductionTarget(ToyTarget):
    name = "induction"
    description = "2-layer attention-only transformer completing [BOS] ... T S M ... T S -> M"
    config_cls = InductionConfig
    classification = True

    def init(self, cfg: InductionConfig, key: Key) -> InductionTransformer:
        return _init(cfg.n_tokens, cfg.n_ctx, cfg.d_model, cfg.n_layers, cfg.n_heads,
                     cfg.d_head, cfg.init_scale, key)

    def sample(self, cfg: InductionConfig, data: Any, key: Key, step: Array) -> Array:
        """Fresh ``(batch_size, n_ctx)`` token sequences (labels: :func:`labels_of`)."""
        return induction_batch(key, cfg.batch_size, cfg.n_ctx, cfg.n_tokens)

    def loss(self, cfg: InductionConfig, model: InductionTransformer, batch: Array):
        return cross_entropy(final_logits(model, batch), labels_of(batch, cfg.n_tokens)), {}

    def train_metrics(self, cfg: InductionConfig, model: InductionTransformer, data: Any,
                      key: Key) -> dict[str, Array]:
        tok = induction_batch(key, cfg.eval_size, cfg.n_ctx, cfg.n_tokens)
        logits, labels = final_logits(model, tok), labels_of(tok, cfg.n_tokens)
        return {"in_context_loss": cross_entropy(logits, labels),
                "accuracy": jnp.mean(jnp.argmax(logits, axis=-1) == labels)}

    def should_stop(self, cfg: InductionConfig, evals: dict[str, np.ndarray]) -> bool:
        if not cfg.early_stop or "accuracy" not in evals:
            return False
        acc = np.asarray(evals["accuracy"])
        k = cfg.stop_patience
        if len(acc) < k:
            return False
        return bool(np.all(acc[-k:].reshape(k, -1) >= cfg.stop_accuracy))

    def evaluate(self, cfg: InductionConfig, model: InductionTransformer, data: Any,
                 key: Key) -> dict[str, Any]:
        """In-context loss and accuracy of the full model on ``eval_size`` fresh
        sequences, head scores, and the fast path's agreement; gate: accuracy."""
        loss, acc, diff, tok = _evaluate(model, key, cfg.eval_size, cfg.n_ctx, cfg.n_tokens)
        loss, acc = float(loss), float(acc)
        scores = head_scores(model, tok)
        checks = {"accuracy": {"value": acc, "min": cfg.gate_accuracy,
                               "ok": bool(acc >= cfg.gate_accuracy)}}
        return {
            "final_loss": loss, "in_context_loss": loss, "accuracy": acc,
            "uniform_loss": float(np.log(cfg.n_tokens)),
            "prev_token_score": scores["prev_token"].tolist(),
            "prev_token_at_m_score": scores["prev_token_at_m"].tolist(),
            "induction_score": scores["induction"].tolist(),
            "fast_path_max_abs_diff": float(diff),
            "gate": {"passed": all(c["ok"] for c in checks.values()), "checks": checks},
        }

    def plot(self, cfg: InductionConfig, model: InductionTransformer, data: Any, result: Any,
             run_dir: Path) -> list[Path]:
        out = [plots.loss_curves(result.history, Path(run_dir) / "loss.png", title=self.name)]
        ev = result.evals
        if len(ev.get("step", ())):
            out.append(plots.curves(np.asarray(ev["step"]),
                                    {k: ev[k] for k in ("in_context_loss", "accuracy")},
                                    Path(run_dir) / "eval.png",
                                    title=f"{self.name}: in-context loss and accuracy"))
        out.append(_pattern_plot(model, cfg, Path(run_dir) / "attention.png", self.name))
        return [p for p in out if p is not None]


def _pattern_plot(model: InductionTransformer, cfg: InductionConfig, path: Path,
                  name: str) -> Path:
    """Every head's attention pattern on one sequence (the last row is the query that
    must find ``M``)."""
    tok = induction_batch(jax.random.key(0), 1, cfg.n_ctx, cfg.n_tokens)
    pats = np.asarray(eqx.filter_jit(model.patterns)(tok[0]))
    n_l, n_h = pats.shape[:2]
    fig, axes = plots.plt.subplots(n_l, n_h, figsize=(3.2 * n_h, 3.0 * n_l), squeeze=False)
    m = int(match_positions(tok, cfg.n_tokens)[0])
    for i in range(n_l):
        for j in range(n_h):
            ax = axes[i, j]
            ax.imshow(pats[i, j], cmap="viridis", vmin=0, vmax=1)
            ax.plot([m], [cfg.n_ctx - 1], "r+", ms=8)
            ax.set_title(f"L{i}H{j}", fontsize=9)
            ax.set_xlabel("key")
            ax.set_ylabel("query")
    fig.suptitle(f"{name}: attention patterns (+: position of M)", fontsize=10)
    return plots.save(fig, path)


register(InductionTarget())
