import equinox as eqx
import jax.numpy as jnp
import pytest

from jaxinterp import tree


class Layer(eqx.Module):
    w_in: jnp.ndarray
    w_out: jnp.ndarray


class Net(eqx.Module):
    layers: tuple
    scale: float = eqx.field(static=True)


def make_net():
    return Net(layers=(Layer(jnp.ones((2, 3)), jnp.zeros((3, 2))),
                       Layer(2 * jnp.ones((2, 3)), jnp.ones((3, 2)))), scale=1.0)


@pytest.mark.parametrize("path,expected", [
    (".layers[0].w_in", (".layers", 0, "w_in")),
    ("layers.0.w_in", ("layers", 0, "w_in")),
    ("['params']['Dense_0']['kernel']", ("params", "Dense_0", "kernel")),
    ("params.Dense_0.kernel", ("params", "Dense_0", "kernel")),
])
def test_parse_path(path, expected):
    want = tuple(t.lstrip(".") if isinstance(t, str) else t for t in expected)
    assert tree.parse_path(path) == want


def test_names_are_keystr():
    assert tree.names(make_net()) == [".layers[0].w_in", ".layers[0].w_out",
                                      ".layers[1].w_in", ".layers[1].w_out"]


@pytest.mark.parametrize("path", [".layers[1].w_in", "layers.1.w_in"])
def test_get_and_replace_immutable(path):
    net = make_net()
    assert float(tree.get(net, path)[0, 0]) == 2.0
    new = tree.replace(net, path, jnp.full((2, 3), 7.0))
    assert float(tree.get(new, path)[0, 0]) == 7.0
    assert float(tree.get(net, path)[0, 0]) == 2.0  # original untouched


def test_where_select_apply_partition():
    net = make_net()
    assert list(tree.select(net, ".layers[*].w_in")) == [".layers[0].w_in", ".layers[1].w_in"]
    assert list(tree.select(net, "layers.0")) == [".layers[0].w_in", ".layers[0].w_out"]
    assert list(tree.select(net, lambda n, x: float(x.sum()) == 0.0)) == [".layers[0].w_out"]
    assert list(tree.select(net, [".layers[0].w_out", "layers.1.w_in"])) == [
        ".layers[0].w_out", ".layers[1].w_in"]
    doubled = tree.apply(net, ".layers[1]", lambda x: 2 * x)
    assert float(doubled.layers[1].w_out[0, 0]) == 2.0
    assert float(doubled.layers[0].w_in[0, 0]) == 1.0
    sel, rest = tree.partition(net, "layers.0.w_in")
    assert sel.layers[1].w_in is None and rest.layers[0].w_in is None
    assert float(eqx.combine(sel, rest).layers[0].w_in[0, 0]) == 1.0


def test_errors_name_the_problem():
    net = make_net()
    with pytest.raises(ValueError, match=r"tree.get: expected path .*'layers.5.w_in'"):
        tree.get(net, "layers.5.w_in")
    with pytest.raises(ValueError, match="to match at least one leaf.*Available leaves"):
        tree.where(net, ".nothing")
    with pytest.raises(ValueError, match="keypath"):
        tree.parse_path("layers..[x")
    assert not any(tree.where(net, ".nothing", allow_empty=True).layers[0].__dict__.values())
