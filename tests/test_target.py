import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxinterp import jacobians as J
from jaxinterp.target import (
    Target,
    from_equinox,
    from_linen,
    from_nnx,
    linen_activation_apply,
    linen_perturbations,
)

N = 5


# --- one MLP written four ways, with the same weights ---------------------------------


class LinenMLP(nn.Module):
    """Dense(4) -> ReLU -> Dense(2), with perturbation points before and after the ReLU."""

    @nn.compact
    def __call__(self, x):
        pre = self.perturb("pre", nn.Dense(4)(x))
        hidden = self.perturb("hidden", nn.relu(pre))
        return nn.Dense(2)(hidden)


class PlainLinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.relu(nn.Dense(4)(x)))


class EqxMLP(eqx.Module):
    layers: tuple

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.layers = (eqx.nn.Linear(3, 4, key=k1), eqx.nn.Linear(4, 2, key=k2))

    def __call__(self, x):
        return self.layers[1](jax.nn.relu(self.layers[0](x)))


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 4, rngs=rngs)
        self.l2 = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def plain_apply(p, x):
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def numpy_rng(key):
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())


def setup(key):
    """The four models with the weights of the linen one (row-vector kernels (d_in, d_out))."""
    rng = numpy_rng(key)
    x0 = jnp.zeros(3)
    module = LinenMLP()
    variables = module.init(jax.random.key(0), x0)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype),
                                    variables["params"])
    variables = {**variables, "params": params}
    d0, d1 = params["Dense_0"], params["Dense_1"]
    plain = {"w1": d0["kernel"], "b1": d0["bias"], "w2": d1["kernel"], "b2": d1["bias"]}
    eqx_model = EqxMLP(jax.random.key(1))  # eqx Linear stores weight as (d_out, d_in)
    eqx_model = eqx.tree_at(
        lambda m: (m.layers[0].weight, m.layers[0].bias, m.layers[1].weight, m.layers[1].bias),
        eqx_model, (d0["kernel"].T, d0["bias"], d1["kernel"].T, d1["bias"]))
    nnx_model = NnxMLP(nnx.Rngs(2))
    nnx_model.l1.kernel[...], nnx_model.l1.bias[...] = d0["kernel"], d0["bias"]
    nnx_model.l2.kernel[...], nnx_model.l2.bias[...] = d1["kernel"], d1["bias"]
    xs = jnp.asarray(rng.normal(size=(N, 3)), jnp.float32)
    return module, variables, plain, eqx_model, nnx_model, xs


def targets(module, variables, plain, eqx_model, nnx_model):
    return {"linen": from_linen(module, variables), "equinox": from_equinox(eqx_model),
            "nnx": from_nnx(nnx_model), "plain": Target(plain_apply, plain)}


@jax.jit
def outputs_and_jacobians(target, xs):
    return (target.batched(xs), J.input_jacobian(target.apply, target.params, xs, mode="fwd"),
            J.input_jacobian(target.apply, target.params, xs, mode="rev", chunk_size=2))


# --- tests ------------------------------------------------------------------------------


def test_same_weights_same_outputs_and_input_jacobians(getkey):
    module, variables, plain, eqx_model, nnx_model, xs = setup(getkey())
    pre = np.asarray(xs @ plain["w1"] + plain["b1"][None, :])
    assert (pre > 0).any() and (pre <= 0).any()  # both ReLU branches occur
    want_y = np.maximum(pre, 0) @ np.asarray(plain["w2"]) + np.asarray(plain["b2"])[None, :]
    want_jac = np.einsum("hi,nh,oh->noi", np.asarray(plain["w1"]).T, (pre > 0).astype(
        np.float32), np.asarray(plain["w2"]).T)  # (N, 2, 3): W2^T diag(1[pre>0]) W1^T
    for name, target in targets(module, variables, plain, eqx_model, nnx_model).items():
        y, jac_fwd, jac_rev = outputs_and_jacobians(target, xs)
        np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(jac_fwd, want_jac, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(jac_rev, want_jac, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(target(xs[0]), want_y[0], rtol=1e-5, atol=1e-5, err_msg=name)


def test_param_jacobians_agree_across_frameworks(getkey):
    module, variables, plain, eqx_model, nnx_model, xs = setup(getkey())
    ts = targets(module, variables, plain, eqx_model, nnx_model)
    run = jax.jit(lambda t, xs, select: J.param_jacobian(t.apply, t.params, xs, select=select),
                  static_argnums=2)
    linen = run(ts["linen"], xs, "Dense_1.kernel")["['Dense_1']['kernel']"]
    nnx_jac = run(ts["nnx"], xs, "l2.kernel")["['l2']['kernel'].value"]
    plain_jac = run(ts["plain"], xs, "w2")["['w2']"]
    eqx_jac = run(ts["equinox"], xs, ".layers[1].weight")[".layers[1].weight"]
    assert linen.shape == (N, 2, 4, 2)
    np.testing.assert_allclose(linen, plain_jac, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(nnx_jac, plain_jac, rtol=1e-6, atol=1e-7)
    # eqx stores the transpose: d y / d weight[o, h] == d y / d kernel[h, o]
    np.testing.assert_allclose(jnp.swapaxes(eqx_jac, -1, -2), plain_jac, rtol=1e-6, atol=1e-7)


def test_linen_perturbation_jacobian_equals_jacfwd_of_hidden_to_output(getkey):
    module, variables, plain, eqx_model, _, xs = setup(getkey())
    apply = linen_activation_apply(module, variables)
    zeros = linen_perturbations(module, variables, xs[0])
    # one example's activation shapes, not the (here unbatched) init shapes
    assert jax.tree_util.tree_map(jnp.shape, zeros) == {"pre": (4,), "hidden": (4,)}
    assert not any(np.any(np.asarray(z)) for z in jax.tree_util.tree_leaves(zeros))
    params = variables["params"]

    @jax.jit
    def run(xs):
        def one(x):
            jac = jax.jacrev(lambda p: apply(params, x, p))(zeros)
            pre = x @ plain["w1"] + plain["b1"]
            hidden_to_out = lambda h: h @ plain["w2"] + plain["b2"]
            pre_to_out = lambda z: hidden_to_out(jax.nn.relu(z))
            return jac, jax.jacfwd(hidden_to_out)(jax.nn.relu(pre)), jax.jacfwd(pre_to_out)(pre)

        return jax.vmap(one)(xs)

    jac, want_hidden, want_pre = run(xs)
    np.testing.assert_allclose(jac["hidden"], want_hidden, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(jac["pre"], want_pre, rtol=1e-6, atol=1e-7)
    assert not np.allclose(want_pre, want_hidden)  # the ReLU mask matters here
    # same quantity through the equinox intervention path
    act = jax.jit(lambda m, xs: J.activation_jacobian(m, ".layers[0]", xs, d_act=4))(eqx_model,
                                                                                      xs)
    np.testing.assert_allclose(act, jac["pre"], rtol=1e-5, atol=1e-6)
    # perturbations shift the activation: apply(params, x, {hidden: d}) == Dense_1(h + d)
    d = jnp.arange(4.0)
    shifted = apply(params, xs[0], {**zeros, "hidden": d})
    h = jax.nn.relu(xs[0] @ plain["w1"] + plain["b1"])
    np.testing.assert_allclose(shifted, (h + d) @ plain["w2"] + plain["b2"], rtol=1e-5)


def test_target_is_a_pytree_jitted_once_and_inputs_unchanged(getkey):
    module, variables, plain, eqx_model, nnx_model, xs = setup(getkey())
    keys_before = set(variables)
    target = from_linen(module, variables)
    assert set(variables) == keys_before and "perturbations" in variables

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(target, xs):
        return target.batched(xs)

    first = run(target, xs)
    moved = jax.tree_util.tree_map(lambda p: p + 1.0, target)  # new params, same apply
    second = run(moved, xs)
    assert not np.allclose(first, second)
    np.testing.assert_allclose(second, jax.vmap(lambda x: moved.apply(moved.params, x))(xs))
    params_before = jax.tree_util.tree_map(np.array, eqx_model)
    from_equinox(eqx_model)(xs[0])
    chex.assert_trees_all_equal(jax.tree_util.tree_map(np.array, eqx_model), params_before)


@pytest.mark.parametrize("filter_spec,n_leaves", [
    (eqx.is_inexact_array, 4),
    (lambda x: eqx.is_inexact_array(x) and x.ndim == 2, 2),
])
def test_from_equinox_filter_spec(getkey, filter_spec, n_leaves):
    model = eqx.nn.MLP(3, 2, 4, 1, key=getkey())
    target = from_equinox(model, filter_spec)
    assert len(jax.tree_util.tree_leaves(target.params)) == n_leaves
    x = jnp.linspace(-1.0, 1.0, 3)
    np.testing.assert_allclose(target(x), model(x), rtol=1e-6)


def test_from_nnx_keeps_non_param_state_fixed():
    class WithCount(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 2, rngs=rngs)
            self.scale = nnx.Variable(jnp.float32(2.0))

        def __call__(self, x):
            return self.scale[...] * self.lin(x)

    model = WithCount(nnx.Rngs(0))
    target = from_nnx(model)
    names = [name for name, _ in jax.tree_util.tree_flatten_with_path(target.params)[0]]
    assert len(names) == 2  # kernel and bias; the scale Variable is closed over
    x = jnp.ones(3)
    np.testing.assert_allclose(target(x), model(x), rtol=1e-6)
    jac = jax.jit(lambda t, xs: J.input_jacobian(t.apply, t.params, xs))(target, x[None])
    np.testing.assert_allclose(jac[0], 2.0 * model.lin.kernel[...].T, rtol=1e-6)


def test_errors(getkey):
    module, variables, *_ = setup(getkey())
    with pytest.raises(ValueError, match=r"Target: expected apply a callable apply\(params, x\), "
                                         r"got int"):
        Target(3, {})
    with pytest.raises(ValueError, match=r"Target.batched: expected xs a leading batch axis"):
        Target(plain_apply, {}).batched(jnp.float32(1.0))
    with pytest.raises(ValueError, match=r"from_equinox: expected module a callable eqx.Module, "
                                         r"got function"):
        from_equinox(plain_apply)
    with pytest.raises(ValueError, match=r"from_linen: expected module a flax.linen.Module, "
                                         r"got EqxMLP"):
        from_linen(EqxMLP(getkey()), variables)
    with pytest.raises(ValueError, match=r"from_linen: expected variables a mapping with a "
                                         r"'params' collection, got \['perturbations'\]"):
        from_linen(module, {"perturbations": variables["perturbations"]})
    with pytest.raises(ValueError, match=r"linen_activation_apply: expected variables a mapping"):
        linen_activation_apply(module, [1, 2])
    with pytest.raises(ValueError, match=r"from_nnx: expected module a flax.nnx.Module, "
                                         r"got LinenMLP"):
        from_nnx(module)
    plain_module = PlainLinenMLP()
    plain_vars = plain_module.init(jax.random.key(0), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"linen_perturbations: expected module to call "
                                         r"self.perturb"):
        linen_perturbations(plain_module, plain_vars, jnp.zeros(3))
