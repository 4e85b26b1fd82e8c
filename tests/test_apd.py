"""APD: weight-use interception, attributions against dense references, top-k masks,
losses against direct numpy evaluations of the spec's formulas, gradient routing,
unit-norm, errors, multi-seed determinism and the CLI. The paper-number gates are slow."""

import dataclasses
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.cli import main as cli_main
from jaxinterp.decomposition import apd, apd_config, train_apd
from jaxinterp.decomposition.apd_metrics import mmcs_ml2r, neuron_contributions, scrub_masks
from jaxinterp.decomposition.weights import forward_sites

RESID_PATHS = (".layers[0].mlp_in", ".layers[0].mlp_out", ".layers[1].mlp_in",
               ".layers[1].mlp_out")


def to64(t):
    return jax.tree_util.tree_map(
        lambda v: v.astype(jnp.float64) if eqx.is_inexact_array(v) else v, t)


def make_target(name, getkey, **kw):
    target = ji.get_target(name)
    cfg = target.config(**kw)
    model = to64(target.init(cfg, getkey()))
    t = ji.target.from_equinox(model)
    return model, cfg, t


def case(name, getkey):
    if name.startswith("tms"):
        model, cfg, t = make_target(name, getkey)
        paths = (".W_enc", ".hidden[0]") if name.endswith("id") else (".W_enc",)
    else:
        model, cfg, t = make_target("resid-mlp-2", getkey, d_resid=12, n_features=10)
        paths = RESID_PATHS
    x = jax.random.uniform(getkey(), (cfg.n_features,), jnp.float64)
    sites = apd.make_sites(t.apply, t.params, x, paths)
    return model, cfg, t, paths, sites, x


def random_components(t, paths, C, m, key):
    return to64(apd.init_components(t.params, paths, C, m, gain=30.0, key=key))


def exact_components(t, paths, fractions):
    """Components that sum exactly to the target weights: P_c = fraction_c * W."""
    A, B = {}, {}
    for p in paths:
        w = ji.tree.get(t.params, p)
        d_in, d_out = w.shape
        if d_in <= d_out:
            A[p] = jnp.stack([jnp.eye(d_in)] * len(fractions))
            B[p] = jnp.stack([f * w for f in fractions])
        else:
            A[p] = jnp.stack([f * w for f in fractions])
            B[p] = jnp.stack([jnp.eye(d_out)] * len(fractions))
    return apd.APDComponents(A, B)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("name", ["tms-5-2", "tms-5-2-id", "resid"])
def test_exact_components_reproduce_target_outputs_and_caches(name, getkey):
    _, _, t, paths, sites, x = case(name, getkey)
    comps = exact_components(t, paths, [0.25, 0.5, 0.25])
    y_t, c_t = forward_sites(t.apply, t.params, x, paths)
    w = {p: comps.weight(p) for p in paths}
    y_f, c_f = forward_sites(t.apply, t.params, x, paths, weights=w)
    np.testing.assert_allclose(y_f, y_t, atol=1e-12)
    assert list(c_f) == list(c_t) == list(sites.names)
    for s in c_t:
        np.testing.assert_allclose(c_f[s][1], c_t[s][1], atol=1e-12)
    assert float(apd.faithfulness_loss(t.params, comps, sites)) < 1e-28
    if name.startswith("tms"):
        assert ".W_enc:T" in sites.names  # the tied decoder is its own site


def dense_gradient_attr(t, paths, comps, x, apd_model):
    weights = {p: comps.weight(p) for p in paths} if apd_model else None
    _, cache = forward_sites(t.apply, t.params, x, paths, weights=weights)
    zeros = {s: jnp.zeros_like(h) for s, (_, h) in cache.items()}
    J = jax.jacrev(lambda d: forward_sites(t.apply, t.params, x, paths, weights=weights,
                                           deltas=d)[0])(zeros)
    out = []
    for c in range(comps.n_components):
        jt = 0.0
        for s, (a, _) in cache.items():
            P = comps.matrices(s.removesuffix(":T"))[c]
            P = P.T if s.endswith(":T") else P
            jt = jt + J[s] @ (a @ P)
        out.append(float(jnp.sum(jt**2)))
    return np.array(out)


@pytest.mark.parametrize("name", ["tms-5-2", "tms-5-2-id", "resid"])
@pytest.mark.parametrize("kind", ["gradient", "gradient_apd"])
def test_gradient_attributions_equal_dense_jacobian_both_modes(name, kind, getkey):
    _, _, t, paths, sites, x = case(name, getkey)
    comps = random_components(t, paths, 7, 3, getkey())
    ref = dense_gradient_attr(t, paths, comps, x, kind == "gradient_apd")
    for mode in ("fwd", "rev", "auto"):
        attr, _, _ = apd.attributions(t.apply, t.params, sites, comps, x, kind=kind, mode=mode)
        np.testing.assert_allclose(attr, ref, rtol=1e-6)
    # Sites whose output gradients are the same for every example: only the last MLP
    # output of the residual model (linear path to the output); TMS ends in a ReLU.
    const = apd.constant_gradient_sites(t.apply, t.params, sites, comps,
                                        jnp.stack([x, 0.5 * x, x**2]), kind=kind)
    assert const == ({".layers[1].mlp_out"} if name == "resid" else set())
    attr, _, _ = apd.attributions(t.apply, t.params, sites, comps, x, kind=kind, mode="rev",
                                  const_sites=const)
    np.testing.assert_allclose(attr, ref, rtol=1e-6)


def test_constant_gradient_order_is_used_when_cheaper_and_checked(getkey):
    _, _, t, paths, sites, x = case("resid", getkey)
    comps = random_components(t, paths, 7, 3, getkey())
    # width h = 12, m = 3, d_y = 10: cheaper for a batch of 64 (3*10*(1+12/64) < 12*13)
    assert apd._constant_order_is_cheaper(sites, comps, ".layers[1].mlp_out", 64)
    assert not apd._constant_order_is_cheaper(sites, comps, ".layers[1].mlp_out", 1)
    with pytest.raises(ValueError, match="const_sites"):
        apd.attributions(t.apply, t.params, sites, comps, x, mode="rev",
                         const_sites=frozenset({".nowhere"}))


def test_loss_is_the_same_with_attributions_by_jvps_or_vjps(getkey):
    """``attr_mode`` only changes how the attributions are computed: the loss terms, the
    top-k mask among them, agree, and so do their gradients."""
    _, _, t, paths, sites, _ = case("resid", getkey)
    comps = random_components(t, paths, 6, 2, getkey())
    x = jax.random.uniform(getkey(), (16, 10), jnp.float64)
    cfgs = {mode: apd_config("resid-mlp-2", paths=paths, C=6, m=2, topk=1.0,
                             attr_mode=mode).loss_config() for mode in apd.ATTR_MODES}
    out = {mode: jax.value_and_grad(lambda c, lc=lc: apd.apd_loss(
        c, t.params, x, apply=t.apply, sites=sites, cfg=lc), has_aux=True)(comps)
        for mode, lc in cfgs.items()}
    (ref, ref_aux), ref_g = out["rev"]
    for mode in ("fwd", "auto"):
        (val, aux), g = out[mode]
        np.testing.assert_allclose(val, ref, rtol=1e-12)
        assert float(aux["n_active"]) == float(ref_aux["n_active"])
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref_g),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("m", [1, 2, 6])  # m = 1: factored order; m = 6: dense order
def test_component_tangents_both_orders_equal_dense_products(m, getkey):
    A = {"w": jax.random.normal(getkey(), (4, 5, m))}
    B = {"w": jax.random.normal(getkey(), (4, m, 3))}
    comps = apd.APDComponents(A, B)
    a = jax.random.normal(getkey(), (7, 5))  # a position axis
    for site, want in (("w", jnp.einsum("pi,cio->cpo", a, comps.matrices("w"))),
                       ("w:T", jnp.einsum("po,cio->cpi", a[:, :3], comps.matrices("w")))):
        inp = a if site == "w" else a[:, :3]
        got = apd.component_tangents(comps, {site: inp})[site]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_activation_and_ablation_attributions_match_definitions(getkey):
    _, _, t, paths, sites, x = case("resid", getkey)
    comps = random_components(t, paths, 5, 2, getkey())
    w_full = {p: comps.weight(p) for p in paths}
    y_full, cache = forward_sites(t.apply, t.params, x, paths, weights=w_full)
    abl, _, _ = apd.attributions(t.apply, t.params, sites, comps, x, kind="ablation")
    act, _, _ = apd.attributions(t.apply, t.params, sites, comps, x, kind="activation")
    for c in range(5):
        keep = jnp.ones(5).at[c].set(0.0)
        y_minus = forward_sites(t.apply, t.params, x, paths,
                                weights={p: comps.weight(p, keep) for p in paths})[0]
        np.testing.assert_allclose(abl[c], jnp.mean((y_full - y_minus) ** 2), rtol=1e-9)
        ref = sum(jnp.sum((a @ comps.matrices(s)[c]) ** 2) for s, (a, _) in cache.items())
        np.testing.assert_allclose(act[c], ref, rtol=1e-9)


def test_batch_topk_keeps_exactly_floor_kb_even_with_ties():
    attr = jnp.ones((10, 4))
    mask = apd.batch_topk_mask(attr, 0.75)
    assert float(mask.sum()) == 7.0
    attr = jnp.arange(40.0).reshape(10, 4)
    mask = apd.batch_topk_mask(attr, 1.0)
    np.testing.assert_array_equal(np.asarray(mask).ravel(), (np.arange(40) >= 30).astype(float))
    m2 = apd.sample_topk_mask(jnp.array([[1.0, 3.0, 2.0], [5.0, 4.0, 6.0]]), 2)
    np.testing.assert_array_equal(m2, [[0, 1, 1], [1, 0, 1]])
    with pytest.raises(ValueError, match="k"):
        apd.batch_topk_mask(attr, 0.0)
    with pytest.raises(ValueError, match="k"):
        apd.batch_topk_mask(attr, 0.05)  # floor(0.5) = 0 entries
    with pytest.raises(ValueError, match="k"):
        apd.sample_topk_mask(attr, 5)


def test_losses_equal_numpy_formulas_including_tied_double_count(getkey):
    model, cfg, t, paths, sites, _ = case("tms-5-2", getkey)
    C, m, B = 4, 3, 6
    comps = random_components(t, paths, C, m, getkey())
    W = np.asarray(model.W_enc)
    A, Bm = np.asarray(comps.A[".W_enc"]), np.asarray(comps.B[".W_enc"])
    P = np.einsum("cim,cmo->cio", A, Bm)
    n_params = 2 * W.size
    assert sites.n_params == n_params
    lf = 2 * np.sum((W - P.sum(0)) ** 2) / n_params
    np.testing.assert_allclose(apd.faithfulness_loss(t.params, comps, sites), lf, rtol=1e-12)
    mask = (np.asarray(jax.random.uniform(getkey(), (B, C))) > 0.5).astype(float)
    for p in (1.0, 0.9):
        ls = 0.0
        for b in range(B):
            for c in range(C):
                for j in range(m):
                    prod = np.sum(A[c, :, j] ** 2) * np.sum(Bm[c, j, :] ** 2)
                    ls += 2 * (mask[b, c] * prod + 1e-16) ** (p / 2)
        ls /= n_params * B
        np.testing.assert_allclose(apd.schatten_loss(comps, sites, jnp.asarray(mask), p), ls,
                                   rtol=1e-10)
        # a 0/1 mask summed over the batch first: the same value and gradient
        def both(cc, binary, p=p):
            return apd.schatten_loss(cc, sites, jnp.asarray(mask), p, binary=binary)

        np.testing.assert_allclose(both(comps, True), ls, rtol=1e-10)
        g1, g0 = jax.grad(both)(comps, True), jax.grad(both)(comps, False)
        for u, v in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
            np.testing.assert_allclose(u, v, rtol=1e-10, atol=1e-14)
    # Masked-off terms contribute the eps constant: all-zero mask gives exactly that.
    zero = apd.schatten_loss(comps, sites, jnp.zeros((B, C)), 0.9)
    np.testing.assert_allclose(zero, 2 * B * C * m * 1e-16 ** 0.45 / (n_params * B), rtol=1e-9)


def test_total_loss_terms_equal_direct_evaluation(getkey):
    model, cfg, t, paths, sites, _ = case("resid", getkey)
    comps = random_components(t, paths, 6, 2, getkey())
    x = jax.random.uniform(getkey(), (8, cfg.n_features), jnp.float64, -1, 1)
    acfg = apd_config("resid-mlp-2", C=6, m=2, topk=1.5)
    lcfg = acfg.loss_config()._replace(act_sites=(".layers[0].mlp_in", ".layers[1].mlp_in"))
    total, aux = apd.apd_loss(comps, t.params, x, apply=t.apply, sites=sites, cfg=lcfg)
    attr = jax.vmap(lambda xx: apd.attributions(t.apply, t.params, sites, comps, xx)[0])(x)
    mask = np.asarray(apd.batch_topk_mask(attr, 1.5))
    assert mask.sum() == 12
    y_t, h_t, y_m, h_m = [], [], [], []
    for b in range(8):
        yt, ct = forward_sites(t.apply, t.params, x[b], paths)
        w = {p: comps.weight(p, jnp.asarray(mask[b])) for p in paths}
        ym, cm = forward_sites(t.apply, t.params, x[b], paths, weights=w)
        y_t.append(yt), y_m.append(ym)
        h_t.append([np.maximum(ct[s][1], 0) for s in lcfg.act_sites])
        h_m.append([np.maximum(cm[s][1], 0) for s in lcfg.act_sites])
    lm = np.mean((np.array(y_m) - np.array(y_t)) ** 2)
    d_mlp = sum(h.shape[-1] for h in h_t[0])
    la = np.mean([sum(np.sum((a - b) ** 2) for a, b in zip(ht, hm, strict=True))
                  for ht, hm in zip(h_t, h_m, strict=True)]) / d_mlp
    np.testing.assert_allclose(aux["topk_recon"], lm, rtol=1e-9)
    np.testing.assert_allclose(aux["act_recon"], la, rtol=1e-9)
    expect = (aux["faithfulness"] + 2.0 * lm + 1.0 * la
              + 7.0 * apd.schatten_loss(comps, sites, jnp.asarray(mask), 0.9))
    np.testing.assert_allclose(total, expect, rtol=1e-9)
    assert float(aux["n_active"]) == 1.5


@pytest.mark.parametrize("pos", [(), (3,)])
def test_sparse_masked_matmul_equals_the_dense_sum(pos, getkey):
    """Vmapped over examples, the sparse masked low-rank matmul (only the active pairs)
    gives the dense masked sum's values and gradients, with a position axis, under an
    outer vmap over seeds with jit, called on one example, and with fewer active pairs
    than its budget."""
    from jaxinterp.decomposition.sparse_mask import masked_lowrank_matmul
    from jaxinterp.decomposition.weights import lowrank_matmul as dense

    n, C, d_in, m, d_out = 16, 7, 5, 3, 4
    a = jax.random.normal(getkey(), (n, *pos, d_in), jnp.float64)
    A = jax.random.normal(getkey(), (2, C, d_in, m), jnp.float64)
    B = jax.random.normal(getkey(), (2, C, m, d_out), jnp.float64)
    mask = apd.batch_topk_mask(jax.random.uniform(getkey(), (n, C)), 1.5)
    k = int(mask.sum())

    def loss(fn, a, A, B):
        return jnp.sum(jnp.sin(jax.vmap(fn, in_axes=(0, 0, None, None))(a, mask, A, B)))

    def sparse(a, mk, A, B):
        return masked_lowrank_matmul(a, mk, A, B, max_active=k + 3)

    one_seed = jax.value_and_grad(loss, argnums=(1, 2, 3))
    seeds = jax.jit(jax.vmap(jax.grad(loss, argnums=(1, 2, 3)), in_axes=(None, None, 0, 0)),
                    static_argnums=0)
    for fn, args in ((one_seed, (a, A[0], B[0])), (seeds, (a, A, B))):
        ref, got = fn(dense, *args), fn(sparse, *args)
        for r, g in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got),
                        strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-12, atol=1e-12)
    one = masked_lowrank_matmul(a[0], mask[0], A[0], B[0], max_active=k)
    np.testing.assert_allclose(one, dense(a[0], mask[0], A[0], B[0]), rtol=1e-12)


@pytest.mark.parametrize("name", ["tms-5-2", "resid"])
@pytest.mark.parametrize("mode", ["batch", "sample", "distil"])
def test_sparse_topk_forward_gives_the_dense_loss_and_gradients(name, mode, getkey):
    """``sparse_topk`` is a speed setting: the same loss terms and gradients as the dense
    masked forward (tied TMS decoder, two-layer residual MLP, each top-k mode)."""
    _, cfg, t, paths, sites, _ = case(name, getkey)
    comps = random_components(t, paths, 6, 2, getkey())
    x = jax.random.uniform(getkey(), (24, cfg.n_features), jnp.float64, -1, 1)
    preset = "tms-5-2" if name.startswith("tms") else "resid-mlp-2"
    kw = {"batch": dict(topk=0.5), "sample": dict(topk=1, topk_mode="sample"),
          "distil": dict(topk=0.5, distil_from_target=True)}[mode]
    lcfg = apd_config(preset, C=6, m=2, **kw).loss_config()
    if name == "resid":
        lcfg = lcfg._replace(act_sites=(".layers[0].mlp_in", ".layers[1].mlp_in"))
    out = {}
    for sparse in (False, True):
        c = lcfg._replace(sparse_topk=sparse)
        assert (apd._max_active(c, 24, 6) is None) == (not sparse)
        out[sparse] = jax.value_and_grad(
            lambda cc, c=c: apd.apd_loss(cc, t.params, x, apply=t.apply, sites=sites, cfg=c),
            has_aux=True)(comps)
    ((v0, a0), g0), ((v1, a1), g1) = out[False], out[True]
    np.testing.assert_allclose(v1, v0, rtol=1e-12)
    for key in a0:
        np.testing.assert_allclose(a1[key], a0[key], rtol=1e-12, atol=1e-15)
    for r, g in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-10, atol=1e-14)
    auto = lcfg._replace(sparse_topk=None)  # sparse when at most 1/8 of the entries are on
    assert apd._max_active(auto, 24, 60) is not None and apd._max_active(auto, 24, 2) is None


def test_inactive_components_get_gradient_only_from_faithfulness(getkey):
    _, cfg, t, paths, sites, _ = case("tms-5-2", getkey)
    comps = random_components(t, paths, 5, 3, getkey())
    x = jax.random.uniform(getkey(), (16, 5), jnp.float64)
    lcfg = apd_config("tms-5-2", topk=0.25).loss_config()
    attr = jax.vmap(lambda xx: apd.attributions(t.apply, t.params, sites, comps, xx,
                                                kind=lcfg.attribution)[0])(x)
    inactive = np.asarray(apd.batch_topk_mask(attr, 0.25).sum(0) == 0)
    assert inactive.any()
    no_f = lcfg._replace(c_faith=None)
    g = jax.grad(lambda c: apd.apd_loss(c, t.params, x, apply=t.apply, sites=sites,
                                        cfg=no_f)[0])(comps)
    assert np.all(np.asarray(g.A[".W_enc"])[inactive] == 0)
    assert np.any(np.asarray(g.A[".W_enc"])[~inactive] != 0)
    g_f = jax.grad(lambda c: apd.apd_loss(c, t.params, x, apply=t.apply, sites=sites,
                                          cfg=lcfg)[0])(comps)
    assert np.all(np.asarray(g_f.A[".W_enc"])[inactive] != 0)


def test_unit_norm_projection_and_renormalisation(getkey):
    _, _, t, paths, _, _ = case("tms-5-2", getkey)
    comps = apd.normalize_columns(random_components(t, paths, 4, 3, getkey()))
    np.testing.assert_allclose(jnp.linalg.norm(comps.A[".W_enc"], axis=-2), 1.0, rtol=1e-12)
    grads = random_components(t, paths, 4, 3, getkey())
    proj, _ = apd.unit_norm_columns().update(grads, None, comps)
    dots = jnp.sum(proj.A[".W_enc"] * comps.A[".W_enc"], axis=-2)
    np.testing.assert_allclose(dots, 0.0, atol=1e-12)
    step, _ = apd.renormalize_columns().update(proj, None, comps)
    new = jax.tree_util.tree_map(lambda a, b: a + b, comps, step)
    np.testing.assert_allclose(jnp.linalg.norm(new.A[".W_enc"], axis=-2), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(step.B[".W_enc"], proj.B[".W_enc"])


def test_mmcs_ml2r_and_neuron_contributions_by_hand():
    w = np.array([[1.0, 0.0], [0.0, 2.0]])
    p = np.stack([np.array([[0.5, 0.0], [0.0, 0.0]]), np.array([[0.0, 0.0], [1.0, 1.0]])])
    m = mmcs_ml2r(w, p)
    np.testing.assert_allclose(m["mmcs"], (1.0 + 1 / np.sqrt(2)) / 2)
    np.testing.assert_allclose(m["ml2r"], (0.5 + np.sqrt(2) / 2) / 2)
    assert (m["n_features_own"], m["n_features_shared"], m["n_features_poor"]) == (1, 0, 1)
    assert m["ml2r_own"] == pytest.approx(0.5)
    shared = mmcs_ml2r(w, np.stack([np.array([[1.0, 0.0], [0.0, 1.0]]), np.zeros((2, 2))]))
    assert (shared["n_features_own"], shared["n_features_shared"]) == (0, 2)
    W_E = jnp.eye(2)
    nc = neuron_contributions(W_E, jnp.array([[2.0, 0.0], [0.0, 1.0]]),
                              jnp.array([[3.0, 0.0], [0.0, -1.0]]))
    np.testing.assert_allclose(nc, [[6.0, 0.0], [0.0, -1.0]])


def test_bad_arguments_raise_clear_errors(getkey):
    _, _, t, _, _, x = case("tms-5-2", getkey)
    with pytest.raises(ValueError, match="C"):
        apd.init_components(t.params, [".W_enc"], 0, 3, key=getkey())
    with pytest.raises(ValueError, match="paths"):
        apd.make_sites(t.apply, t.params, x, [".b"])  # a vector, not a matrix
    with pytest.raises(ValueError, match="W_nope"):
        apd.make_sites(t.apply, t.params, x, [".W_nope"])
    with pytest.raises(ValueError, match="topk"):
        apd_config("tms-5-2", topk=0.0001)
    with pytest.raises(ValueError, match="attribution"):
        apd_config("tms-5-2", attribution="saliency")
    with pytest.raises(ValueError, match="attr_mode"):
        apd_config("tms-40-10", attr_mode="backward")
    with pytest.raises(ValueError, match="overrides"):
        apd_config("tms-5-2", C_total=3)
    with pytest.raises(ValueError, match="B"):
        apd.APDComponents({".W_enc": jnp.zeros((2, 5, 1))}, {".other": jnp.zeros((2, 1, 2))})


def test_vmapped_seeds_equal_single_seed_runs_and_learn(tmp_path):
    with jax.enable_x64(False):
        target = ji.get_target("tms-5-2")
        tcfg = target.config(steps=300, n_seeds=1)
        model = ji.train_target(target, tcfg, progress=False, plots=False).model
        cfg = apd_config("tms-5-2", steps=60, steps_per_call=20, eval_size=2048)
        both = train_apd(model, target, tcfg, cfg, [3, 4], progress=False)
        one = train_apd(model, target, tcfg, cfg, [4], out=tmp_path / "r", progress=False)
        np.testing.assert_allclose(np.asarray(both.components.A[".W_enc"][1]),
                                   np.asarray(one.components.A[".W_enc"][0]), rtol=2e-5,
                                   atol=1e-7)
        loss = both.history["loss"]
        assert loss.shape == (60, 2) and np.all(loss[-1] < loss[0])
        metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
        for key in ("mmcs", "ml2r", "n_live_components", "topk_recon_mse", "target_mse",
                    "loss/faithfulness", "loss/topk_recon", "loss/schatten", "success_rate"):
            assert key in metrics
        for png in ("loss.png", "activation_frequency.png", "components_W_enc.png",
                    "component_feature_norms.png", "one_hot_attributions.png"):
            assert (tmp_path / "r" / png).exists(), png


def test_cli_run_apd_with_a_trained_target(tmp_path, capsys):
    with jax.enable_x64(False):
        tdir = tmp_path / "target"
        assert cli_main(["train", "tms-5-2", "--steps", "200", "--n-seeds", "1", "--out",
                         str(tdir), "--no-progress"]) == 0
        out = tmp_path / "apd"
        code = cli_main(["run", "apd", "tms-5-2", "--seeds", "0-1", "--steps", "40",
                         "--target", str(tdir), "--out", str(out), "--no-progress",
                         "--steps-per-call", "20", "--eval-size", "2048"])
        assert code == 0
        m = json.loads((out / "metrics.json").read_text())
        assert m["seeds"] == [0, 1] and len(m["per_seed"]) == 2 and m["steps"] == 40
        run = ji.decomposition.load_apd_run(out, target_dir=tdir)
        assert run.seeds == [0, 1] and run.config.steps == 40 and run.metrics == m
        assert run.components.A[".W_enc"].shape == (2, run.config.C, 5, run.config.m)
        for i, seed in enumerate(m["per_seed"]):  # the reloaded components give the metrics
            rows = jnp.einsum("cim,cmo->cio", run.components.A[".W_enc"][i],
                              run.components.B[".W_enc"][i])
            got = mmcs_ml2r(run.model.W_enc, rows)
            assert abs(got["mmcs"] - seed["mmcs"]) < 1e-5
        with pytest.raises(ValueError, match="run_dir"):
            ji.decomposition.load_apd_run(tdir)
        assert cli_main(["run", "apd", "tms-5-2", "--steps", "10", "--target", str(tdir),
                         "--no-progress", "--bogus", "1"]) == 2
        assert "bogus" in capsys.readouterr().err


# tms-40-10: the target trained as the APD paper trained its own (2 000 steps, batch 2 048,
# linear decay; toy-models spec: either recipe is acceptable), and the four seeds 4-7 of
# the 16-seed rate in experiments/apd.md, among which seed 7 passes. The rate there is low
# (about 1 in 16 on this target, 0 of 16 on the SPD-recipe target): this test guards the
# reproduction of that seed, it does not claim more.
_SLOW_APD = {"tms-5-2": ({}, [0, 1, 2, 3]),
             "tms-40-10": ({"steps": 2000, "batch_size": 2048, "schedule": "linear"},
                           [4, 5, 6, 7])}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tms-5-2", "tms-40-10"])
def test_apd_tms_reaches_paper_numbers(name, tmp_path):
    with jax.enable_x64(False):
        target = ji.get_target(name)
        overrides, seeds = _SLOW_APD[name]
        tcfg = target.config(**overrides)
        model = ji.train_target(target, tcfg, progress=False, plots=False).model
        cfg = apd_config(name)
        res = train_apd(model, target, tcfg, cfg, seeds, progress=False)
        print(name, "success rate", res.metrics["success_rate"])
        assert res.metrics["success_rate"] > 0, [(m["mmcs"], m["ml2r"])
                                                 for m in res.seed_metrics]
        assert dataclasses.asdict(cfg)["C"] in (5, 50)


def test_lp_variant_loss_and_gradient_through_attributions(getkey):
    _, _, t, paths, sites, _ = case("tms-5-2", getkey)
    comps = random_components(t, paths, 4, 3, getkey())
    x = jax.random.uniform(getkey(), (6, 5), jnp.float64)
    lcfg = apd_config("tms-5-2", topk=None, c_topk=None, c_lp=7.0, c_schatten=1.0,
                      lp_p=0.9, attribution="gradient").loss_config()
    total, aux = apd.apd_loss(comps, t.params, x, apply=t.apply, sites=sites, cfg=lcfg)
    attr = np.asarray(jax.vmap(lambda xx: apd.attributions(t.apply, t.params, sites, comps,
                                                           xx)[0])(x))
    s = (attr / 5 + 1e-16) ** 0.45
    np.testing.assert_allclose(aux["lp"], np.mean(s.sum(-1)), rtol=1e-9)
    expect = (aux["faithfulness"] + 7.0 * aux["lp"]
              + apd.schatten_loss(comps, sites, jnp.asarray(s), 1.0))
    np.testing.assert_allclose(total, expect, rtol=1e-9)
    assert "topk_recon" not in aux
    # The L_p term is differentiable through the attributions (finite differences).
    lp = lambda c: apd.apd_loss(c, t.params, x, apply=t.apply, sites=sites, cfg=lcfg)[1]["lp"]
    g = jax.grad(lp)(comps).A[".W_enc"]
    eps = 1e-6
    bump = lambda d: apd.APDComponents({".W_enc": comps.A[".W_enc"].at[1, 2, 0].add(d)},
                                       comps.B)
    fd = (lp(bump(eps)) - lp(bump(-eps))) / (2 * eps)
    np.testing.assert_allclose(g[1, 2, 0], fd, rtol=1e-5)


def test_resid_run_reports_features_carried_and_scrubbing(tmp_path):
    with jax.enable_x64(False):
        target = ji.get_target("resid-mlp-1")
        tcfg = target.config(d_resid=64, steps=50, n_seeds=1, eval_size=1000)
        model = ji.train_target(target, tcfg, progress=False, plots=False).model
        cfg = apd_config("resid-mlp-1", C=20, m=4, steps=20, steps_per_call=10,
                         eval_size=512, batch_size=128)
        res = train_apd(model, target, tcfg, cfg, [0], out=tmp_path, progress=False)
        m = res.seed_metrics[0]
        for key in ("features_carried", "components_mono", "scrubbed_mse",
                    "anti_scrubbed_mse", "k_only_mse", "all_components_mse",
                    "neuron_contribution_pearson_r", "target_mse",
                    "topk_recon_mse", "loss/act_recon"):
            assert key in m and np.isfinite(m[key]), key
        kinds = ("components_dead", "components_mono", "components_duo", "components_poly")
        assert sum(m[k] for k in kinds) == 20
        assert 0 <= m["features_carried"] <= 100
        assert (tmp_path / "components_layers0_mlp_in.png").exists()


def test_scrub_masks_ablate_the_spec_sets():
    # 6 features -> argmax components; components 7 and 8 dead (never live).
    c_star = jnp.array([0, 1, 2, 3, 4, 4])
    live = jnp.array([True] * 7 + [False] * 2)
    x = jnp.array([0.0, 0.7, 0.0, 0.0, 0.3, 0.0])  # K(x) = {1, 4}
    for seed in range(20):
        s, a, k_only = scrub_masks(x, jax.random.key(seed), c_star, live, 3)
        s, a, k_only = np.asarray(s), np.asarray(a), np.asarray(k_only)
        # Scrubbed: 3 ablated, all live and outside K(x); K(x) and the dead ones kept.
        assert (s == 0).sum() == 3 and s[1] == s[4] == 1 and s[7] == s[8] == 1
        # Anti-scrubbed: K(x) plus one random live non-K component, 3 in total.
        assert (a == 0).sum() == 3 and a[1] == a[4] == 0 and a[7] == a[8] == 1
        np.testing.assert_array_equal(k_only, [0, 1, 0, 0, 1, 0, 0, 0, 0])
    # K(x) larger than the budget is still ablated whole; fewer candidates than the budget
    # ablate every candidate.
    _, a, _ = scrub_masks(jnp.ones(6), jax.random.key(0), c_star, live, 2)
    assert np.asarray(a)[:5].sum() == 0 and np.asarray(a)[5:].all()
    s, _, _ = scrub_masks(x, jax.random.key(0), c_star, live, 50)
    np.testing.assert_array_equal(np.asarray(s), [0, 1, 0, 0, 1, 0, 0, 1, 1])
