import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import jacobians as J
from jaxinterp.interventions import AddToOutput, perturb_at
from jaxinterp.target import from_equinox

N = 6  # examples / tangents in most tests


# --- fixtures and toy functions -----------------------------------------------------


def tree_fn(p):
    """Pytree -> array (4,): a small smooth nonlinear map."""
    h = jnp.tanh(p["a"] @ p["b"])  # (3,) @ (3, 4)
    return jnp.sin(h) * p["a"].sum() + h**2


def numpy_rng(key):
    """A numpy generator seeded from a jax key: test data without per-shape jax compiles."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())


def normal(key, shape, dtype=jnp.float32):
    return jnp.asarray(numpy_rng(key).normal(size=shape), dtype)


def uniform(key, shape, dtype=jnp.float32):
    return jnp.asarray(numpy_rng(key).uniform(size=shape), dtype)


def make_primal(key, dtype=jnp.float32):
    rng = numpy_rng(key)
    return {"a": jnp.asarray(rng.normal(size=(3,)), dtype),
            "b": jnp.asarray(rng.normal(size=(3, 4)), dtype)}


def stack_like(key, tree, n):
    rng = numpy_rng(key)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=(n, *x.shape)), x.dtype), tree)


def mat_fn(x):
    """(2, 3) -> (4,): input with a matrix shape."""
    w = jnp.arange(24.0, dtype=x.dtype).reshape(6, 4) / 10.0
    return jnp.tanh(x.reshape(-1) @ w) + x.sum() ** 2


def mlp_apply(params, x):
    h = jax.nn.gelu(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def mlp_params(key, d_in=3, d_h=5, d_out=2, dtype=jnp.float32):
    rng = numpy_rng(key)
    shapes = {"w1": (d_in, d_h), "b1": (d_h,), "w2": (d_h, d_out), "b2": (d_out,)}
    return {k: jnp.asarray(rng.normal(size=v), dtype) for k, v in shapes.items()}


def central_difference(f, x, v, eps=1e-5):
    return (f(x + eps * v) - f(x - eps * v)) / (2 * eps)


class LinearMLP(eqx.Module):
    """Two ``eqx.nn.Linear`` layers with a ReLU between them (one example per call)."""

    layers: tuple

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.layers = (eqx.nn.Linear(3, 4, key=k1), eqx.nn.Linear(4, 2, key=k2))

    def __call__(self, x):
        return self.layers[1](jax.nn.relu(self.layers[0](x)))


CHUNKS = [None, 1, 3, N]


# --- jvps / vjps --------------------------------------------------------------------


@jax.jit
def dense_tree_products(primal, tangents, cts):
    """Reference J t and J^T u from the dense Jacobian of ``tree_fn``."""
    dense = jax.jacfwd(tree_fn)(primal)  # {'a': (4, 3), 'b': (4, 3, 4)}
    jt = (jnp.einsum("oi,ni->no", dense["a"], tangents["a"])
          + jnp.einsum("oij,nij->no", dense["b"], tangents["b"]))
    jtu = {"a": jnp.einsum("no,oi->ni", cts, dense["a"]),
           "b": jnp.einsum("no,oij->nij", cts, dense["b"])}
    return jt, jtu


single_jvp = jax.jit(lambda p, t: jax.jvp(tree_fn, (p,), (t,))[1])
single_vjp = jax.jit(lambda p, u: jax.vjp(tree_fn, p)[1](u)[0])


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_jvps_vjps_match_dense_and_loop(getkey, chunk_size):
    primal = make_primal(getkey())
    tangents, cts = stack_like(getkey(), primal, N), normal(getkey(), (N, 4))
    run = jax.jit(lambda p, t, c: (J.jvps(tree_fn, p, t, chunk_size=chunk_size),
                                   J.vjps(tree_fn, p, c, chunk_size=chunk_size)))
    (out, t_out), back = run(primal, tangents, cts)
    jt, jtu = dense_tree_products(primal, tangents, cts)
    loop_jt = jnp.stack([single_jvp(primal, jax.tree_util.tree_map(lambda t, i=i: t[i],
                                                                    tangents))
                         for i in range(N)])
    loop_jtu = jax.tree_util.tree_map(lambda *x: jnp.stack(x),
                                      *[single_vjp(primal, cts[i]) for i in range(N)])
    assert t_out.shape == (N, 4) and back["a"].shape == (N, 3) and back["b"].shape == (N, 3, 4)
    np.testing.assert_allclose(out, tree_fn(primal), rtol=1e-6)
    np.testing.assert_allclose(t_out, jt, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(t_out, loop_jt, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(back, jtu, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(back, loop_jtu, rtol=1e-5, atol=1e-6)


def test_jvps_vjps_finite_differences_float64(getkey):
    with jax.enable_x64(True):
        primal = make_primal(getkey(), jnp.float64)
        tangents = stack_like(getkey(), primal, 4)
        cts = normal(getkey(), (3, 4), jnp.float64)

        @jax.jit
        def run(primal, tangents, cts):
            _, t_out = J.jvps(tree_fn, primal, tangents)
            shift = lambda s: jax.tree_util.tree_map(lambda p, t: p[None] + s * t, primal,
                                                     tangents)
            fd = (jax.vmap(tree_fn)(shift(1e-6)) - jax.vmap(tree_fn)(shift(-1e-6))) / 2e-6
            return t_out, fd, J.vjps(tree_fn, primal, cts)

        t_out, fd, back = run(primal, tangents, cts)
        np.testing.assert_allclose(t_out, fd, rtol=1e-7, atol=1e-8)
        # adjoint identity <u, J v> = <J^T u, v> ties vjps to the checked jvps
        lhs = jnp.einsum("uo,to->ut", cts, t_out)
        rhs = sum(jnp.einsum("u...,t...->ut", back[k], tangents[k]) for k in primal)
        np.testing.assert_allclose(lhs, rhs, rtol=1e-10)


@pytest.mark.parametrize("n", [1, 9])
def test_jvps_vjps_trace_fn_once_whatever_the_number_of_directions(getkey, n):
    traces = []

    def fn(p):
        traces.append(1)
        return tree_fn(p)

    primal = make_primal(getkey())
    jax.eval_shape(lambda p, t: J.jvps(fn, p, t, chunk_size=2), primal,
                   stack_like(getkey(), primal, n))
    jax.eval_shape(lambda p, c: J.vjps(fn, p, c, chunk_size=2), primal, jnp.ones((n, 4)))
    assert len(traces) == 2  # one linearize + one vjp; no per-direction retrace


# --- JacobianOperator ---------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_operator_products_and_materialize(getkey, chunk_size):
    x = normal(getkey(), (2, 3))
    vs, us = normal(getkey(), (N, 2, 3)), normal(getkey(), (N, 4))

    @jax.jit
    def run(x, vs, us):
        op = J.linearize(mat_fn, x, chunk_size=chunk_size)
        assert op.shape == (4, 2, 3) and op.in_shape == (2, 3) and op.out_shape == (4,)
        assert op.in_structure == jax.ShapeDtypeStruct((2, 3), jnp.float32)
        assert op.out_structure == jax.ShapeDtypeStruct((4,), jnp.float32)
        products = (op.mv(vs[0]), op.rmv(us[0]), op.mm(vs), op.rmm(us))
        mats = (op.materialize("fwd"), op.materialize("rev"), op.materialize())
        return op.out, products, mats, jax.jacfwd(mat_fn)(x), jax.jacrev(mat_fn)(x)

    out, (mv, rmv, mm, rmm), (fwd, rev, auto), dense, dense_rev = run(x, vs, us)
    np.testing.assert_allclose(out, mat_fn(x), rtol=1e-6)
    np.testing.assert_allclose(fwd, dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rev, dense_rev, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(auto, dense, rtol=1e-5, atol=1e-5)
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mv, jnp.einsum("oij,ij->o", dense, vs[0]), **tol)
    np.testing.assert_allclose(rmv, jnp.einsum("o,oij->ij", us[0], dense), **tol)
    np.testing.assert_allclose(mm, jnp.einsum("oij,nij->no", dense, vs), **tol)
    np.testing.assert_allclose(rmm, jnp.einsum("no,oij->nij", us, dense), **tol)


def test_operator_finite_differences_float64(getkey):
    with jax.enable_x64(True):
        x = normal(getkey(), (2, 3), jnp.float64)
        vs = normal(getkey(), (3, 2, 3), jnp.float64)

        @jax.jit
        def run(x, vs):
            op = J.linearize(mat_fn, x)
            fd = jax.vmap(lambda v: central_difference(mat_fn, x, v, 1e-6))(vs)
            return op, op.mm(vs), fd

        op, mm, fd = run(x, vs)  # the operator is a pytree: it can leave a jit
        assert mm.dtype == jnp.float64
        np.testing.assert_allclose(mm, fd, rtol=1e-7, atol=1e-7)
        np.testing.assert_allclose(jax.jit(lambda o, v: o.mv(v))(op, vs[0]), mm[0], rtol=1e-12)


# --- per-example Jacobians ---------------------------------------------------------

MODE_CHUNKS = [("auto", None), ("fwd", 1), ("rev", 3), ("fwd", N), ("rev", None), ("auto", 4)]
dense_input_jacobian = jax.jit(jax.vmap(jax.jacfwd(mlp_apply, argnums=1), in_axes=(None, 0)))
single_input_jacobian = jax.jit(jax.jacrev(mlp_apply, argnums=1))


@pytest.mark.parametrize("mode,chunk_size", MODE_CHUNKS)
def test_input_jacobian_matches_dense_and_loop(getkey, mode, chunk_size):
    params = mlp_params(getkey())
    xs = normal(getkey(), (N, 3))
    run = jax.jit(lambda p, xs: J.input_jacobian(mlp_apply, p, xs, mode=mode,
                                                 chunk_size=chunk_size))
    got = run(params, xs)
    assert got.shape == (N, 2, 3)
    loop = jnp.stack([single_input_jacobian(params, xs[i]) for i in range(N)])
    np.testing.assert_allclose(got, loop, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, dense_input_jacobian(params, xs), rtol=1e-5, atol=1e-5)


def test_input_jacobian_finite_differences_float64(getkey):
    with jax.enable_x64(True):
        params = mlp_params(getkey(), dtype=jnp.float64)
        xs = normal(getkey(), (4, 3), jnp.float64)

        @jax.jit
        def run(params, xs):
            f = lambda x: mlp_apply(params, x)
            per_dir = lambda x, e: central_difference(f, x, e, 1e-6)  # (2,)
            basis = jnp.eye(3, dtype=xs.dtype)
            fd = jax.vmap(lambda x: jax.vmap(lambda e: per_dir(x, e), out_axes=1)(basis))(xs)
            return J.input_jacobian(mlp_apply, params, xs), fd

        got, fd = run(params, xs)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, fd, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_tms_input_jacobian_closed_form(getkey, mode):
    """x_hat = ReLU(x @ W @ W.T + b): d x_hat / d x = diag(1[pre > 0]) (W W^T)^T."""
    params = {"W": normal(getkey(), (5, 2)),
              "b": 0.1 * normal(getkey(), (5,))}
    xs = uniform(getkey(), (16, 5))
    apply = lambda p, x: jax.nn.relu(x @ p["W"] @ p["W"].T + p["b"])
    got = jax.jit(lambda p, xs: J.input_jacobian(apply, p, xs, mode=mode, chunk_size=5))(
        params, xs)
    pre = np.asarray(xs) @ np.asarray(params["W"]) @ np.asarray(params["W"]).T + np.asarray(
        params["b"])[None, :]
    assert (pre > 0).any() and (pre <= 0).any()  # both ReLU branches occur
    wwt = np.asarray(params["W"]) @ np.asarray(params["W"]).T
    want = (pre > 0).astype(np.float32)[:, :, None] * wwt.T[None, :, :]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


dense_param_jacobian = jax.jit(jax.vmap(jax.jacrev(mlp_apply), in_axes=(None, 0)))


@pytest.mark.parametrize("mode,select,names", [
    ("auto", None, ["['b1']", "['b2']", "['w1']", "['w2']"]),
    ("fwd", None, ["['b1']", "['b2']", "['w1']", "['w2']"]),
    ("rev", "w1", ["['w1']"]),
    ("fwd", "['w*']", ["['w1']", "['w2']"]),
    ("rev", ["b1", "w2"], ["['b1']", "['w2']"]),
])
def test_param_jacobian_matches_jacrev(getkey, mode, select, names):
    params = mlp_params(getkey())
    xs = normal(getkey(), (N, 3))
    got = jax.jit(lambda p, xs: J.param_jacobian(mlp_apply, p, xs, select=select, mode=mode,
                                                 chunk_size=4))(params, xs)
    assert list(got) == names
    dense = dense_param_jacobian(params, xs)
    for name in names:
        leaf = name[2:-2]
        assert got[name].shape == (N, 2, *params[leaf].shape)
        np.testing.assert_allclose(got[name], dense[leaf], rtol=1e-5, atol=1e-5)


def test_param_jacobian_on_equinox_target_skips_static_leaves(getkey):
    model = eqx.nn.MLP(3, 2, 4, 1, activation=jnp.tanh, key=getkey())
    target = from_equinox(model)
    xs = normal(getkey(), (N, 3))
    got = eqx.filter_jit(lambda t, xs: J.param_jacobian(t.apply, t.params, xs,
                                                        select=".layers[1]"))(target, xs)
    assert sorted(got) == [".layers[1].bias", ".layers[1].weight"]  # jit sorts dict keys
    h = np.tanh(np.asarray(xs) @ np.asarray(model.layers[0].weight).T
                + np.asarray(model.layers[0].bias)[None, :])  # (N, 4)
    # y = W1 h + b1 with W1 (2, 4): dy_o / dW1[p, q] = [o == p] h_q
    want = np.einsum("op,nq->nopq", np.eye(2), h)
    np.testing.assert_allclose(got[".layers[1].weight"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[".layers[1].bias"], np.broadcast_to(np.eye(2), (N, 2, 2)))


@pytest.mark.parametrize("mode,d_act", [("auto", None), ("fwd", 4), ("rev", (4,))])
def test_activation_jacobian_linear_mlp_by_hand(getkey, mode, d_act):
    model = LinearMLP(getkey())
    xs = normal(getkey(), (N, 3))

    @eqx.filter_jit
    def run(model, xs):
        return (J.activation_jacobian(model, ".layers[0]", xs, d_act=d_act, mode=mode,
                                      chunk_size=4),
                J.activation_jacobian(model, ".layers[1]", xs, mode=mode))

    got, last = run(model, xs)
    l0, l1 = (jax.tree_util.tree_map(np.asarray, layer) for layer in model.layers)
    pre = np.asarray(xs) @ l0.weight.T + l0.bias[None, :]  # eqx Linear: y = weight @ x + bias
    assert (pre > 0).any() and (pre <= 0).any()
    want = l1.weight[None, :, :] * (pre > 0).astype(np.float32)[:, None, :]  # (N, 2, 4)
    assert got.shape == (N, 2, 4)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(last, np.broadcast_to(np.eye(2), (N, 2, 2)), atol=1e-7)


def all_transforms(params, model, primal, tangents, xs, *, eager_subset=False):
    """Every transform once, on shared small shapes (eager op-by-op runs are slow on CPU, so
    the eager comparison uses a representative subset)."""
    out = {
        "jvps": J.jvps(tree_fn, primal, tangents),
        "vjps": J.vjps(tree_fn, primal, tangents["b"][:, 0], chunk_size=4),
        "input": J.input_jacobian(mlp_apply, params, xs, chunk_size=4),
        "gram": J.gram(jnp.tanh, xs, chunk_size=4, center=True),
    }
    if not eager_subset:
        out |= {
            "operator": J.linearize(mat_fn, xs[:2]).rmm(tangents["b"][:, 0]),
            "param": J.param_jacobian(mlp_apply, params, xs, select="w2"),
            "activation": J.activation_jacobian(model, ".layers[0]", xs, d_act=4),
            "jacobian_gram": J.jacobian_gram(lambda x: mlp_apply(params, x), xs,
                                             chunk_size=4),
        }
    return out


def test_jit_equals_no_jit_no_retrace_inputs_unchanged(getkey):
    params, model = mlp_params(getkey()), LinearMLP(getkey())

    @eqx.filter_jit
    @chex.assert_max_traces(n=1)
    def run(params, model, primal, tangents, xs):
        return all_transforms(params, model, primal, tangents, xs)

    for _ in range(3):  # same shapes, new values: traced once
        primal = make_primal(getkey())
        tangents, xs = stack_like(getkey(), primal, N), normal(getkey(), (N, 3))
        jitted = run(params, model, primal, tangents, xs)
    assert len(jitted) == 8
    # eager, on mutable numpy inputs that must come back unchanged
    args = jax.tree_util.tree_map(np.array, (params, primal, tangents, xs))
    before = jax.tree_util.tree_map(np.copy, args)
    eager = all_transforms(args[0], model, *args[1:], eager_subset=True)
    chex.assert_trees_all_equal(args, before)
    chex.assert_trees_all_close({k: jitted[k] for k in eager}, eager, rtol=1e-5, atol=1e-6)
    assert jitted["gram"].gram.dtype == eager["gram"].gram.dtype == jnp.float64
    # vmap over the batch == a loop over examples
    one = eqx.filter_jit(lambda m, x: J.activation_jacobian(m, ".layers[0]", x[None])[0])
    loop = jnp.stack([one(model, xs[i]) for i in range(N)])
    np.testing.assert_allclose(jitted["activation"], loop, rtol=1e-6, atol=1e-7)


def test_perturb_at_leaves_the_model_unchanged(getkey):
    model = LinearMLP(getkey())
    x = normal(getkey(), (3,))
    wrapped = perturb_at(model, ".layers[0]", jnp.ones(4))
    assert isinstance(wrapped.layers[0], AddToOutput)
    assert isinstance(model.layers[0], eqx.nn.Linear)
    assert eqx.tree_equal(wrapped.layers[1], model.layers[1])
    np.testing.assert_allclose(wrapped(x), model.layers[1](jax.nn.relu(model.layers[0](x) + 1.0)),
                               rtol=1e-6)


# --- Gram accumulation --------------------------------------------------------------


def gram_fn(x):
    return jnp.concatenate([jnp.sin(x), x[:1] * x[1:2]])  # (3,) -> (4,)


@pytest.mark.parametrize("chunk_size,center", [(1, False), (3, True), (7, False), (12, True)])
def test_gram_equals_dense_mean_of_outer_products(getkey, chunk_size, center):
    xs = normal(getkey(), (7, 3))
    res = jax.jit(lambda xs: J.gram(gram_fn, xs, chunk_size=chunk_size, center=center))(xs)
    g = np.asarray(jax.vmap(gram_fn)(xs), np.float64)
    mean = g.mean(0)
    if center:
        g = g - mean
    want = np.einsum("ni,nj->ij", g, g) / 7
    assert res.gram.dtype == jnp.float64 and res.gram.shape == (4, 4) and res.count == 7
    np.testing.assert_allclose(res.gram, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(res.mean, mean, rtol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 3, 5])
def test_gram_of_matrices_sums_rows(getkey, chunk_size):
    xs = normal(getkey(), (5, 2, 3))
    res = jax.jit(lambda xs: J.gram(lambda x: x, xs, chunk_size=chunk_size))(xs)
    g = np.asarray(xs, np.float64)
    np.testing.assert_allclose(res.gram, np.einsum("nki,nkj->ij", g, g) / 5, rtol=1e-12)
    assert res.mean.shape == (2, 3)


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_gram_accumulates_float32_features_in_float64(chunk_size):
    # float32 sums lose every +1 next to 1e8 (spacing 8); float64 sums are exact here
    xs = jnp.ones((16, 1), jnp.float32).at[0, 0].set(1e4)
    res = jax.jit(lambda xs: J.gram(lambda x: x, xs, chunk_size=chunk_size))(xs)
    assert res.gram.dtype == jnp.float64
    assert float(res.gram[0, 0]) * 16 == 1e8 + 15
    f32 = np.float32(0.0)
    for v in np.asarray(xs[:, 0]) ** 2:  # what float32 accumulation would give
        f32 = f32 + v
    assert float(f32) == 1e8


@pytest.mark.parametrize("mode,chunk_size", [("auto", 1), ("fwd", 4), ("rev", 9), ("rev", 4)])
def test_jacobian_gram_matches_dense(getkey, mode, chunk_size):
    params = mlp_params(getkey(), d_in=4, d_out=2)
    xs = normal(getkey(), (9, 4))
    res = jax.jit(lambda p, xs: J.jacobian_gram(lambda x: mlp_apply(p, x), xs,
                                                chunk_size=chunk_size, mode=mode))(params, xs)
    jac = np.asarray(dense_input_jacobian(params, xs), np.float64)  # (9, 2, 4)
    assert res.gram.shape == (4, 4) and res.gram.dtype == jnp.float64 and res.count == 9
    np.testing.assert_allclose(res.gram, np.einsum("nok,noj->kj", jac, jac) / 9, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(res.mean, jac.mean(0), rtol=1e-5, atol=1e-6)


# --- errors (raised at trace time: checked under eval_shape, nothing runs) ----------


def trace(fn, *args, **kwargs):
    return jax.eval_shape(lambda: fn(*args, **kwargs))


def test_jvps_vjps_errors(getkey):
    primal = make_primal(getkey())
    good = stack_like(getkey(), primal, 3)
    with pytest.raises(ValueError, match=r"jvps: expected tangents to have the same tree "
                                         r"structure as primal"):
        trace(J.jvps, tree_fn, primal, {"a": good["a"]})
    with pytest.raises(ValueError, match=r"jvps: expected tangents leaves sharing one leading "
                                         r"axis, got leading sizes \['a'\]: 3, \['b'\]: 2"):
        trace(J.jvps, tree_fn, primal, {"a": good["a"], "b": good["b"][:2]})
    with pytest.raises(ValueError, match=r"jvps: expected tangents\['b'\] of shape \(3, 3, 4\)"):
        trace(J.jvps, tree_fn, primal, {"a": good["a"], "b": good["b"][:, :2]})
    with pytest.raises(ValueError, match=r"jvps: expected tangents a leading axis"):
        trace(J.jvps, jnp.sin, jnp.float32(1.0), jnp.float32(1.0))
    with pytest.raises(ValueError, match=r"jvps: expected tangents\['a'\] of dtype float32"):
        trace(J.jvps, tree_fn, primal, good | {"a": good["a"].astype(jnp.bfloat16)})
    with pytest.raises(ValueError, match=r"jvps: expected primal\['a'\] a floating-point array"):
        trace(J.jvps, tree_fn, primal | {"a": jnp.arange(3)}, good)
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match=rf"jvps: expected chunk_size a positive integer, "
                                             rf"got {bad}"):
            trace(J.jvps, tree_fn, primal, good, chunk_size=bad)
        with pytest.raises(ValueError, match=r"vjps: expected chunk_size a positive integer"):
            trace(J.vjps, tree_fn, primal, jnp.ones((3, 4)), chunk_size=bad)
    with pytest.raises(ValueError, match=r"vjps: expected cotangents of shape \(3, 4\)"):
        trace(J.vjps, tree_fn, primal, jnp.ones((3, 5)))
    with pytest.raises(ValueError, match=r"vjps: expected cotangents to have the same tree"):
        trace(J.vjps, tree_fn, primal, [jnp.ones((3, 4))])


def test_operator_errors(getkey):
    x = normal(getkey(), (2, 3))
    op = lambda: J.linearize(mat_fn, x)
    with pytest.raises(ValueError, match=r"JacobianOperator.mv: expected v of shape \(2, 3\), "
                                         r"got \(6,\)"):
        trace(lambda: op().mv(jnp.ones(6)))
    with pytest.raises(ValueError, match=r"JacobianOperator.rmm: expected us of shape "
                                         r"\(n, \*\(4,\)\), got \(4,\)"):
        trace(lambda: op().rmm(jnp.ones(4)))
    with pytest.raises(ValueError, match=r"JacobianOperator.materialize: expected mode one of"):
        trace(lambda: op().materialize("backward"))
    with pytest.raises(ValueError, match=r"linearize: expected primal a floating-point array"):
        trace(J.linearize, mat_fn, jnp.arange(6).reshape(2, 3))
    with pytest.raises(ValueError, match=r"linearize: expected fn\(primal\) one array"):
        trace(J.linearize, lambda x: (x, x), x)
    with pytest.raises(ValueError, match=r"linearize: expected chunk_size a positive integer"):
        trace(J.linearize, mat_fn, x, chunk_size=0)


def test_per_example_errors(getkey):
    params = mlp_params(getkey())
    model = LinearMLP(getkey())
    xs = normal(getkey(), (N, 3))
    with pytest.raises(ValueError, match=r"input_jacobian: expected xs a leading batch axis so "
                                         r"that xs\[0\] is one example, got \(3,\)"):
        trace(J.input_jacobian, mlp_apply, params, xs[0])
    with pytest.raises(ValueError, match=r"input_jacobian: expected xs a leading axis"):
        trace(J.input_jacobian, mlp_apply, params, jnp.float32(1.0))
    with pytest.raises(ValueError, match=r"input_jacobian: expected xs a floating-point array"):
        trace(J.input_jacobian, mlp_apply, params, jnp.ones((N, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"input_jacobian: expected mode one of 'auto', 'fwd', "
                                         r"'rev', got 'forward'"):
        trace(J.input_jacobian, mlp_apply, params, xs, mode="forward")
    with pytest.raises(ValueError, match=r"input_jacobian: expected chunk_size a positive"):
        trace(J.input_jacobian, mlp_apply, params, xs, chunk_size=0)
    with pytest.raises(ValueError, match=r"input_jacobian: expected the model output one array"):
        trace(J.input_jacobian, lambda p, x: (x, x), params, xs)
    with pytest.raises(ValueError, match=r"param_jacobian: expected select to pick floating"):
        trace(J.param_jacobian, mlp_apply, params | {"n": jnp.arange(2)}, xs, select=["w1", "n"])
    with pytest.raises(ValueError, match=r"tree.where: expected selector to match"):
        trace(J.param_jacobian, mlp_apply, params, xs, select="nope")
    with pytest.raises(ValueError, match=r"activation_jacobian: expected d_act to match the "
                                         r"activation at '.layers\[0\]' of shape \(4,\), "
                                         r"got \(5,\)"):
        trace(J.activation_jacobian, model, ".layers[0]", xs, d_act=5)
    with pytest.raises(ValueError, match=r"activation_jacobian: expected path to name a "
                                         r"callable submodule"):
        trace(J.activation_jacobian, model, ".layers[0].weight", xs)
    with pytest.raises(ValueError, match=r"perturb_at: expected path to name a callable"):
        perturb_at(model, ".layers[0].weight", jnp.zeros(4))
    with pytest.raises(ValueError, match=r"tree.get: expected path to name a part of the tree"):
        perturb_at(model, ".layers[3]", jnp.zeros(4))
    with pytest.raises(ValueError, match=r"AddToOutput: expected delta of a shape broadcasting "
                                         r"to the output shape \(4,\), got \(3,\)"):
        trace(perturb_at(model, ".layers[0]", jnp.zeros(3)), xs[0])
    with pytest.raises(ValueError, match=r"AddToOutput: expected inner a callable submodule"):
        AddToOutput(jnp.ones(3), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"gram: expected chunk_size a positive integer"):
        trace(J.gram, lambda x: x, xs, chunk_size=0)
    with pytest.raises(ValueError, match=r"gram: expected fn\(x\) of shape \(d,\) or \(k, d\)"):
        trace(J.gram, lambda x: x, jnp.ones((N, 2, 2, 2)), chunk_size=2)
    with pytest.raises(ValueError, match=r"gram: expected xs leaves sharing one leading axis"):
        trace(J.gram, lambda x: x["a"] + x["b"], {"a": jnp.ones((3, 2)), "b": jnp.ones((4, 2))},
              chunk_size=2)
    with pytest.raises(ValueError, match=r"jacobian_gram: expected chunk_size a positive"):
        trace(J.jacobian_gram, lambda x: x, xs, chunk_size=-1)
