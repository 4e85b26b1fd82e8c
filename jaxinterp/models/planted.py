"""``planted-channels``: a hand-built residual network whose blocks read and write planted,
mutually orthogonal subspaces of the stream (no training). Two modules, A and B:

    embed:   x[0:3] -> S_1,  x[3:6] -> S_2      (orthonormal bases, r_0 = x E)
    A_1: S_1 -> W_1,   B_1: S_2 -> W_2,   A_2: W_1 -> O_1,   B_2: W_2 -> O_2
    unembed: y = r @ [O_1 | O_2]

Each block is ``h_b(r) = phi(r V_b A_b + c_b) B_b U_b^T`` with ``V_b``, ``U_b`` column
groups of one random orthogonal ``d x d`` matrix, Gaussian ``A_b (3, 8)``, ``B_b (8, r)``,
``c_b (8,)`` and ``phi`` identity or tanh. Blocks run in the order A_1, B_1, A_2, B_2,
each adding its write to the stream.

Variants (config): ``gated`` (each module's inputs zeroed with probability 1/2,
independently), ``kappa > 0`` (crosstalk: A_2 also writes ``kappa`` times its first output
coordinate along the first direction of W_2, which B_2 reads), ``out_rank = 2`` (O_1 and
O_2 are 2-d: unequal ranks). The analysis data are a product design: every pairing of
``n_side`` module-A draws with ``n_side`` module-B draws, so cross-module covariances
vanish exactly, and (by default) the draws come in antithetic pairs ``(z, -z)``, so each
module's inputs have mean exactly zero.

References:
    specs/channel-graph.md section 8, T1 (project toy).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .._checks import check_in, check_nonnegative, check_positive, check_shape, fail
from .._types import Array, Key
from .base import ToyTarget, TrainConfig, register

ACTIVATIONS = ("identity", "tanh")
BLOCKS = ("A1", "B1", "A2", "B2")
MODULE_OF_BLOCK = {"A1": 0, "A2": 0, "B1": 1, "B2": 1}


def _activation(name: str):
    return jnp.tanh if name == "tanh" else (lambda z: z)


class PlantedBlock(eqx.Module):
    """One block's weights: ``A (3, h)``, ``c (h,)``, ``B (h, r_out)``."""

    A: Array
    c: Array
    B: Array


class PlantedChannels(eqx.Module):
    """The planted-channel residual network. Call on ONE example ``x: (6,)``.

    Attributes:
        Q: ``(d, d)`` orthogonal; its column groups are the planted subspaces.
        blocks: :class:`PlantedBlock` for A_1, B_1, A_2, B_2.
        groups: static column indices of ``S1, S2, W1, W2, O1, O2``.
        activation: ``identity`` or ``tanh``.
        kappa: crosstalk strength A_2 -> W_2.
    """

    Q: Array
    blocks: tuple[PlantedBlock, ...]
    groups: dict[str, tuple[int, ...]] = eqx.field(static=True)
    activation: str = eqx.field(static=True)
    kappa: float = eqx.field(static=True)

    def __init__(self, d: int = 32, hidden: int = 8, *, out_rank: int = 3,
                 activation: str = "identity", kappa: float = 0.0, key: Key):
        fn = "PlantedChannels"
        check_in(fn, "activation", activation, ACTIVATIONS)
        check_in(fn, "out_rank", out_rank, (1, 2, 3))
        check_positive(fn, "hidden", hidden, integer=True)
        check_nonnegative(fn, "kappa", kappa)
        if d < 12 + 2 * out_rank:
            raise fail(fn, "d", f">= {12 + 2 * out_rank} (six planted subspaces)", d)
        kq, *kb = jax.random.split(key, 5)
        q, r = jnp.linalg.qr(jax.random.normal(kq, (d, d)))
        self.Q = q * jnp.where(jnp.diag(r) < 0, -1.0, 1.0)[None, :]
        sizes = {"S1": 3, "S2": 3, "W1": 3, "W2": 3, "O1": out_rank, "O2": out_rank}
        start, groups = 0, {}
        for name, size in sizes.items():
            groups[name] = tuple(range(start, start + size))
            start += size
        self.groups = groups
        blocks = []
        for i, k in enumerate(kb):
            ka, kc, kB = jax.random.split(k, 3)
            r_out = out_rank if i >= 2 else 3
            blocks.append(PlantedBlock(A=jax.random.normal(ka, (3, hidden)),
                                       c=jax.random.normal(kc, (hidden,)),
                                       B=jax.random.normal(kB, (hidden, r_out))))
        self.blocks = tuple(blocks)
        self.activation, self.kappa = activation, float(kappa)

    # --- the planted geometry -----------------------------------------------------
    def basis(self, group: str) -> Array:
        """``(d, size)`` orthonormal basis of a planted subspace."""
        return self.Q[:, list(self.groups[group])]

    def reads_writes(self, name: str) -> tuple[str, str]:
        return {"A1": ("S1", "W1"), "B1": ("S2", "W2"), "A2": ("W1", "O1"),
                "B2": ("W2", "O2")}[name]

    def write_map(self, name: str) -> Array:
        """``(r_out, d)``: the block's hidden output ``z B`` to the stream."""
        m = self.basis(self.reads_writes(name)[1]).T
        if name == "A2" and self.kappa > 0:
            w2 = self.basis("W2")[:, 0]
            m = m.at[0].add(self.kappa * w2)
        return m

    def block_fn(self, name: str, r: Array) -> Array:
        """``h_b(r)`` for a stream ``r: (..., d)``."""
        b = self.blocks[BLOCKS.index(name)]
        v = self.basis(self.reads_writes(name)[0])
        c = b.c.reshape((1,) * (r.ndim - 1) + b.c.shape)
        z = _activation(self.activation)(r @ v @ b.A + c)
        return z @ b.B @ self.write_map(name)

    def embed(self, x: Array) -> Array:
        return x[..., :3] @ self.basis("S1").T + x[..., 3:6] @ self.basis("S2").T

    def unembed(self, r: Array) -> Array:
        return r @ jnp.concatenate([self.basis("O1"), self.basis("O2")], axis=1)

    def forward_with_cache(self, x: Array) -> tuple[Array, dict[str, tuple[Array, Array]]]:
        """Output and, per weight use ``a @ W``, its (input, output): ``.blocks[i].A``
        (the block's read coordinates to its hidden pre-activation) and ``.blocks[i].B``
        (hidden to write coordinates)."""
        check_shape("PlantedChannels", "x", x, (6,),
                    "The model takes one example; vmap over the batch.")
        cache: dict[str, tuple[Array, Array]] = {}
        act = _activation(self.activation)
        r = self.embed(x)
        for i, name in enumerate(BLOCKS):
            b = self.blocks[i]
            u = r @ self.basis(self.reads_writes(name)[0])
            pre = u @ b.A
            z = act(pre + b.c)
            zb = z @ b.B
            cache[f".blocks[{i}].A"] = (u, pre)
            cache[f".blocks[{i}].B"] = (z, zb)
            r = r + zb @ self.write_map(name)
        return self.unembed(r), cache

    def __call__(self, x: Array) -> Array:
        return self.forward_with_cache(x)[0]

    def to_float64(self) -> PlantedChannels:
        """A float64 copy (call inside an x64 context) with ``Q`` re-orthonormalised, so
        the planted subspaces are orthogonal to float64 round-off."""
        m = jax.tree_util.tree_map(
            lambda a: jnp.asarray(a, jnp.float64) if eqx.is_inexact_array(a) else a, self)
        q, r = jnp.linalg.qr(m.Q)
        return eqx.tree_at(lambda t: t.Q, m, q * jnp.where(jnp.diag(r) < 0, -1.0, 1.0)[None, :])

    def ground_truth(self) -> dict[str, Any]:
        """Modules (0 = A, 1 = B): blocks, stream subspaces and output indices."""
        r = len(self.groups["O1"])
        return {
            "module_of_block": dict(MODULE_OF_BLOCK),
            "read_group": {b: self.reads_writes(b)[0] for b in BLOCKS},
            "write_group": {b: self.reads_writes(b)[1] for b in BLOCKS},
            "module_groups": [["S1", "W1", "O1"], ["S2", "W2", "O2"]],
            "module_of_output": [0] * r + [1] * r,
            "module_of_input": [0, 0, 0, 1, 1, 1],
            "planted_pairs": [["embed", "A1"], ["A1", "A2"], ["A2", "unembed"],
                              ["embed", "B1"], ["B1", "B2"], ["B2", "unembed"]]
            + ([["A2", "B2"]] if self.kappa > 0 else []),
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlantedConfig(TrainConfig):
    """Hand-built (``steps = 0``).

    Attributes:
        d: stream width; hidden: block width; out_rank: dimension of O_1, O_2.
        activation: ``identity`` or ``tanh``.
        kappa: crosstalk strength (0: none).
        gated: zero each module's inputs with probability 1/2.
        stds: standard deviations of ``x_0..x_5`` (distinct).
        n_side: draws per module; the product design has ``n_side**2`` rows.
        antithetic: draws in ``(z, -z)`` pairs (exactly centred inputs; see
            :func:`product_design`).
    """

    steps: int = 0
    d: int = 32
    hidden: int = 8
    out_rank: int = 3
    activation: str = "identity"
    kappa: float = 0.0
    gated: bool = False
    stds: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    n_side: int = 100
    antithetic: bool = True

    def __post_init__(self):
        super().__post_init__()
        fn = "PlantedConfig"
        check_in(fn, "activation", self.activation, ACTIVATIONS)
        check_nonnegative(fn, "kappa", self.kappa)
        check_positive(fn, "n_side", self.n_side, integer=True)
        if len(self.stds) != 6:
            raise fail(fn, "stds", "6 standard deviations", self.stds)
        if self.steps:
            raise fail(fn, "steps", "0 (hand-built)", self.steps)


def product_design(key: Key, stds: Any, n_side: int, *, gated: bool = False,
                   antithetic: bool = True) -> Array:
    """``(n_side**2, 6)`` inputs: every pairing of ``n_side`` Gaussian draws of
    ``x_0..x_2`` with ``n_side`` draws of ``x_3..x_5`` (scaled by ``stds``); ``gated``
    zeroes each draw with probability 1/2. ``antithetic`` draws come in pairs ``(z, -z)``
    sharing their gate (``n_side`` even), so each module's inputs have mean exactly 0 and
    a linear block's mean write is its write at zero input, as in the population (an
    odd ``n_side`` keeps the last draw unpaired)."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    s = jnp.asarray(stds)
    half = (n_side + 1) // 2 if antithetic else n_side

    def draws(k, kg, sd):
        z = jax.random.normal(k, (half, 3)) * sd[None, :]
        g = (jax.random.bernoulli(kg, 0.5, (half, 1)).astype(z.dtype) if gated
             else jnp.ones((half, 1), z.dtype))
        z = z * g
        return jnp.concatenate([z, -z], axis=0)[:n_side] if antithetic else z

    a, b = draws(k1, k3, s[:3]), draws(k2, k4, s[3:])
    return jnp.concatenate([jnp.repeat(a, n_side, axis=0), jnp.tile(b, (n_side, 1))], axis=1)


class PlantedTarget(ToyTarget):
    name = "planted-channels"
    description = "Hand-built residual network with two planted channel modules (T1)"
    config_cls = PlantedConfig

    def init(self, cfg: PlantedConfig, key: Key) -> PlantedChannels:
        return PlantedChannels(cfg.d, cfg.hidden, out_rank=cfg.out_rank,
                               activation=cfg.activation, kappa=cfg.kappa, key=key)

    def make_data(self, cfg: PlantedConfig, key: Key) -> dict[str, Array]:
        return {"x": product_design(key, cfg.stds, cfg.n_side, gated=cfg.gated,
                                    antithetic=cfg.antithetic)}

    def sample(self, cfg, data, key, step):  # hand-built: never trained
        raise RuntimeError("planted-channels is hand-built and has no training step")

    def evaluate(self, cfg: PlantedConfig, model: PlantedChannels, data: Any, key: Key):
        err = float(jnp.abs(model.Q.T @ model.Q - jnp.eye(cfg.d)).max())
        ok = err < 1e-4
        return {"final_loss": None, "orthogonality_error": err,
                "output_std": float(jnp.std(jax.vmap(model)(data["x"]))),
                "gate": {"passed": ok, "checks": {"orthogonality": {
                    "value": err, "max": 1e-4, "ok": ok}}}}


    def plot(self, cfg: PlantedConfig, model: PlantedChannels, data: Any, result: Any,
             run_dir: Any) -> list:
        """Where each block writes: ``||write_map(b) @ basis(g)||_F`` for every block and
        planted subspace (crosstalk shows as A2's mass on W2)."""
        from pathlib import Path

        import numpy as np

        from .. import plots

        groups = list(model.groups)
        m = np.array([[float(jnp.linalg.norm(model.write_map(b) @ model.basis(g)))
                       for g in groups] for b in BLOCKS])
        fig, ax = plots.plt.subplots(figsize=(5, 3))
        im = ax.imshow(m, cmap="viridis")
        ax.set_xticks(range(len(groups)), groups)
        ax.set_yticks(range(len(BLOCKS)), BLOCKS)
        ax.set_xlabel("planted stream subspace")
        ax.set_ylabel("block")
        ax.set_title(f"{self.name}: write mass per subspace")
        fig.colorbar(im, ax=ax, shrink=0.8)
        return [plots.save(fig, Path(run_dir) / "planted_writes.png")]


register(PlantedTarget())
