"""SPD options from the later (``main``) code, each against a direct evaluation: the delta
component (exact reproduction, gradient through W - V U), the normal init and faithfulness
warm-up, the frequency term and p-annealing of importance minimality, subset routing, PGD
masks, hidden-activation reconstruction, the KL divergence, the vector / shared CI MLPs,
C per keypath rule, embedding lookups, gradient clipping, configuration errors, and a
short training run with every main option on."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import erf

import jaxinterp as ji
from jaxinterp.decomposition import apd, spd, spd_run
from jaxinterp.decomposition.runs import coerce_overrides
from jaxinterp.decomposition.weights import WeightSite, forward_sites
from jaxinterp.train import make_optimizer

RESID1 = (".layers[0].mlp_in", ".layers[0].mlp_out")
RESID2 = (*RESID1, ".layers[1].mlp_in", ".layers[1].mlp_out")
# Test data comes from NumPy: every new shape drawn with jax.random compiles a program.
RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def to64(t):
    return jax.tree_util.tree_map(
        lambda v: v.astype(jnp.float64) if eqx.is_inexact_array(v) else v, t)


def case(name, getkey, paths=None, batch=6):
    """A small target (random weights), its sites and a batch of inputs."""
    target = ji.get_target(name)
    small = {"d_resid": 12, "n_features": 10, "d_mlp": 6} if name.startswith("resid") else {}
    cfg = target.config(**small)
    model = to64(target.init(cfg, getkey()))
    t = ji.target.from_equinox(model)
    if paths is None:
        paths = (RESID1 if name.startswith("resid") else
                 (".W_enc", ".hidden[0]") if name.endswith("id") else (".W_enc",))
    x = jnp.asarray(RNG.uniform(size=(batch, cfg.n_features)))
    return model, t, apd.make_sites(t.apply, t.params, x[0], paths), x


def normal(*shape, std=1.0):
    return jnp.asarray(std * RNG.normal(size=shape))


def random_ci(ci_fn, C, d_in, H):  # noqa: N803
    """A CI function with random weights AND biases."""
    if ci_fn == "mlp":
        return spd.CIParams(normal(C, H, std=1.4), normal(C, H), normal(C, H, std=0.5),
                            normal(C))
    if ci_fn == "vector_mlp":
        return spd.VectorCIParams(normal(C, d_in, H), normal(C, H), normal(C, H), normal(C))
    return spd.SharedCIParams(normal(d_in, H), normal(H), normal(H, C), normal(C))


def random_comps(t, sites, C=5, H=4, ci_fn="mlp"):  # noqa: N803
    """Random factors (``V U != W``) and CI functions, drawn with NumPy."""
    V, U = {}, {}
    for path in sites.paths:
        d_in, d_out = ji.tree.get(t.params, path).shape
        V[path], U[path] = normal(d_in, C, std=d_in**-0.5), normal(C, d_out, std=C**-0.5)
    factors = spd.SPDComponents(V, U, {})
    ci = {s: random_ci(ci_fn, C, factors.site_factors(s)[0].shape[0], H) for s in sites.names}
    return spd.SPDComponents(V, U, ci)


def importances(comps, t, sites, x, gated=False):
    """Per-example ``(y*, cache, g, g+)`` computed the plain way (vmap over examples)."""
    y_t, cache = jax.vmap(lambda xx: forward_sites(t.apply, t.params, xx, sites.paths))(x)
    g, g_up = jax.vmap(lambda c: spd.causal_importances(
        comps, {s: a for s, (a, _) in c.items()}, gated=gated))(cache)
    return y_t, cache, g, g_up


def loss_cfg(**kw):
    base = dict(c_faith=None, c_stoch=None, c_layerwise=None, c_imp=None, p=1.0, gated=False)
    return spd.SPDLossConfig(**{**base, **kw})


def forward_batch(t, sites, comps, x, masks, routes=None, dmasks=None):
    return jnp.stack([spd.spd_forward(
        t.apply, t.params, sites, comps, x[b], {k: v[b] for k, v in masks.items()},
        None if routes is None else {k: v[b] for k, v in routes.items()},
        None if dmasks is None else {k: v[b] for k, v in dmasks.items()})
        for b in range(x.shape[0])])


def gelu(v):
    return 0.5 * v * (1.0 + erf(v / np.sqrt(2.0)))


# --- delta component -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tms-5-2", "resid-mlp-1"])
def test_delta_component_with_unit_masks_reproduces_the_target(name, getkey):
    _, t, sites, x = case(name, getkey)
    comps = random_comps(t, sites)
    assert float(spd.faithfulness_loss(t.params, comps, sites)) > 1e-3  # V U != W
    ones = {s: jnp.ones(comps.site_factors(s)[0].shape[1]) for s in sites.names}
    d_one = {s: jnp.ones(()) for s in sites.names}
    d_zero = {s: jnp.zeros(()) for s in sites.names}
    for xx in x[:2]:
        y_t = t.apply(t.params, xx)
        y = spd.spd_forward(t.apply, t.params, sites, comps, xx, ones, delta_masks=d_one)
        np.testing.assert_allclose(y, y_t, atol=1e-12, rtol=0)
        # m_delta = 0 is the components alone, which do not reproduce the target
        y0 = spd.spd_forward(t.apply, t.params, sites, comps, xx, ones, delta_masks=d_zero)
        np.testing.assert_array_equal(y0, spd.spd_forward(t.apply, t.params, sites, comps, xx,
                                                          ones))
    assert not np.allclose(y0, y_t, atol=1e-3)
    if name != "tms-5-2":
        return

    def out(c, m):
        dm = {s: jnp.asarray(m) for s in sites.names}
        return jnp.sum(spd.spd_forward(t.apply, t.params, sites, c, x[0], ones,
                                       delta_masks=dm) ** 2)

    path = sites.paths[0]
    # Delta = W - V U carries gradient: with m_delta = 1 the output does not depend on V.
    np.testing.assert_allclose(jax.grad(out)(comps, 1.0).V[path], 0.0, atol=1e-12)
    assert float(jnp.abs(jax.grad(out)(comps, 0.5).V[path]).sum()) > 1e-6


def test_delta_in_the_stochastic_loss_uses_one_uniform_mask_per_example_and_site(getkey):
    _, t, sites, x = case("tms-5-2", getkey)
    comps = random_comps(t, sites)
    key = getkey()
    _, aux = spd.spd_loss(comps, t.params, x, key, apply=t.apply, sites=sites,
                          cfg=loss_cfg(c_stoch=1.0, delta=True))
    y_t, _, g, _ = importances(comps, t, sites, x)
    k = jax.random.fold_in(key, spd.STOCHASTIC)
    masks, dm = spd.stochastic_masks(g, k), spd.delta_masks(g, k)
    assert all(v.shape == (x.shape[0],) for v in dm.values())
    flat = np.concatenate([np.asarray(v) for v in dm.values()])
    assert np.all((flat >= 0) & (flat < 1)) and len(np.unique(flat)) == flat.size
    y = forward_batch(t, sites, comps, x, masks, dmasks=dm)
    np.testing.assert_allclose(aux["stochastic_recon"], np.mean((y - y_t) ** 2), rtol=1e-12)


def test_delta_applies_to_the_transposed_use_as_the_transpose(getkey):
    model, t, sites, x = case("tms-5-2", getkey)
    comps = random_comps(t, sites)
    V, U = np.asarray(comps.V[".W_enc"]), np.asarray(comps.U[".W_enc"])
    W, b = np.asarray(model.W_enc), np.asarray(model.b)
    m = {".W_enc": jnp.full(5, 0.3), ".W_enc:T": jnp.full(5, 0.8)}
    d = {".W_enc": jnp.asarray(0.25), ".W_enc:T": jnp.asarray(0.6)}
    xx = np.asarray(x[0])
    h = (xx @ V * 0.3) @ U + 0.25 * xx @ (W - V @ U)
    pre = (h @ U.T * 0.8) @ V.T + 0.6 * h @ (W - V @ U).T
    np.testing.assert_allclose(spd.spd_forward(t.apply, t.params, sites, comps, x[0], m,
                                               delta_masks=d),
                               np.maximum(pre + b, 0.0), rtol=1e-12)


# --- init and faithfulness warm-up ----------------------------------------------------


def test_normal_init_and_kaiming_ci_functions(getkey):
    params = {"W": jnp.zeros((64, 32))}
    big = apd.make_sites(lambda p, x: x @ p["W"], params, jnp.zeros(64), ("['W']",))
    comps = spd.init_spd(params, big, 200, 16, init="normal", key=getkey())
    V, U = np.asarray(comps.V["['W']"]), np.asarray(comps.U["['W']"])
    np.testing.assert_allclose(V.std(), 1 / np.sqrt(64), rtol=0.05)
    np.testing.assert_allclose(U.std(), 1 / np.sqrt(200), rtol=0.05)
    ci = comps.ci["['W']"]
    np.testing.assert_allclose(np.std(ci.w_in), np.sqrt(2.0), rtol=0.05)
    np.testing.assert_allclose(np.std(ci.w_out), 1 / 4, rtol=0.05)
    assert not np.any(ci.b_in) and not np.any(ci.b_out)
    vec = spd.init_ci("vector_mlp", 200, 10, 16, key=getkey())
    np.testing.assert_allclose(np.std(vec.w_in), np.sqrt(2 / 10), rtol=0.05)
    np.testing.assert_allclose(np.std(vec.w_out), 1 / 4, rtol=0.05)
    sh = spd.init_ci("shared_mlp", 200, 40, 16, key=getkey())
    np.testing.assert_allclose(np.std(sh.w_in), np.sqrt(2 / 40), rtol=0.1)
    np.testing.assert_allclose(np.std(sh.w_out), 1 / 4, rtol=0.05)
    assert not np.any(vec.b_in) and not np.any(sh.b_out)
    # the projection init with the scalar MLPs is the default
    key = getkey()
    default = spd.init_spd(params, big, 200, 16, key=key)
    explicit = spd.init_spd(params, big, 200, 16, init="projection", ci_fn="mlp", key=key)
    for a, b in zip(jax.tree_util.tree_leaves(default), jax.tree_util.tree_leaves(explicit),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_faithfulness_warmup_is_adamw_on_faithfulness_alone(getkey):
    _, t, sites, _ = case("tms-5-2", getkey)
    comps = random_comps(t, sites)
    out = spd.faithfulness_warmup(t.params, comps, sites, 5)
    opt = optax.adamw(0.01, weight_decay=0.1)
    vu = (comps.V, comps.U)
    state = opt.init(vu)
    for _ in range(5):
        grads = jax.grad(lambda p: spd.faithfulness_loss(
            t.params, spd.SPDComponents(p[0], p[1], {}), sites))(vu)
        updates, state = opt.update(grads, state, vu)
        vu = optax.apply_updates(vu, updates)
    for a, b in zip(jax.tree_util.tree_leaves((out.V, out.U)), jax.tree_util.tree_leaves(vu),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    assert out.ci is comps.ci
    long = spd.faithfulness_warmup(t.params, comps, sites, 200)
    before = float(spd.faithfulness_loss(t.params, comps, sites))
    assert float(spd.faithfulness_loss(t.params, long, sites)) < 0.1 * before
    assert spd.faithfulness_warmup(t.params, comps, sites, 0) is comps
    with pytest.raises(ValueError, match="steps"):
        spd.faithfulness_warmup(t.params, comps, sites, -1)


# --- importance minimality: frequency term and p-annealing ------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.7])
@pytest.mark.parametrize("p", [1.0, 0.6])
def test_importance_minimality_with_frequency_term_against_numpy(beta, p):
    b = RNG.uniform(size=(4, 3, 6))
    b[0, 0, 0] = 0.0
    g_up = {"a": jnp.asarray(1.2 * RNG.uniform(size=(5, 3))), "b": jnp.asarray(b)}
    want = 0.0
    for v in g_up.values():
        v = np.asarray(v).reshape(-1, v.shape[-1])
        s = np.sum((v + 1e-12) ** p, axis=0)
        want += np.sum(s / v.shape[0] * (1 + beta * np.log2(1 + s)))
    got = spd.importance_minimality(g_up, p, beta)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # traced p (annealing), jit
    np.testing.assert_allclose(jax.jit(spd.importance_minimality, static_argnums=2)(
        g_up, jnp.asarray(p), beta), want, rtol=1e-12)
    if beta == 0.0:  # the paper's mean over the batch of the sum over components
        paper = sum(np.mean(np.sum((np.asarray(v) + 1e-12) ** p, -1)) for v in g_up.values())
        np.testing.assert_allclose(got, paper, rtol=1e-12)


def test_annealed_p_is_linear_between_the_fractions():
    steps = np.array([0, 10, 25, 40, 50, 60, 75, 90, 99])
    got = np.asarray(spd.annealed_p(jnp.asarray(steps), 100, 2.0, (0.5, 0.25, 0.75)))
    frac = steps / 100
    want = 2.0 + (0.5 - 2.0) * np.clip((frac - 0.25) / 0.5, 0, 1)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    step_fn = np.asarray(spd.annealed_p(jnp.asarray(steps), 100, 2.0, (1.0, 0.5, 0.5)))
    np.testing.assert_array_equal(step_fn, np.where(frac >= 0.5, 1.0, 2.0))
    assert spd.annealed_p(jnp.asarray(7), 100, 2.0, None) == 2.0


def test_spd_loss_uses_the_given_exponent(getkey):
    _, t, sites, x = case("tms-5-2", getkey)
    comps = random_comps(t, sites)
    cfg = loss_cfg(c_imp=1.0, p=2.0, beta=0.3)
    _, _, _, g_up = importances(comps, t, sites, x)
    for p in (None, 0.7):
        _, aux = spd.spd_loss(comps, t.params, x, getkey(), apply=t.apply, sites=sites,
                              cfg=cfg, p=p)
        want = spd.importance_minimality(g_up, 2.0 if p is None else p, 0.3)
        np.testing.assert_allclose(aux["importance_minimality"], want, rtol=1e-12)


# --- subset routing --------------------------------------------------------------------


def test_subset_routes_draw_k_uniformly_then_a_uniform_subset(getkey):
    names = ("a", "b", "c", "d")
    r = spd.subset_routes(names, (20_000,), getkey())
    routed = np.stack([np.asarray(r[s]) for s in names], -1)
    k = routed.sum(-1)
    assert k.min() == 1 and k.max() == 4
    np.testing.assert_allclose(np.bincount(k, minlength=5)[1:] / k.size, 0.25, atol=0.015)
    np.testing.assert_allclose(routed.mean(0), 2.5 / 4, atol=0.015)  # every site alike
    two = routed[k == 2]  # each of the 6 pairs equally often
    pairs = np.unique(two, axis=0, return_counts=True)[1]
    assert len(pairs) == 6 and pairs.min() > 0.8 * pairs.mean()
    assert spd.subset_routes(names, (3, 5), getkey())["b"].shape == (3, 5)


def test_subset_loss_with_one_site_equals_the_stochastic_loss(getkey):
    _, t, sites, x = case("resid-mlp-1", getkey, paths=(".layers[0].mlp_in",))
    assert sites.names == (".layers[0].mlp_in",)
    comps = random_comps(t, sites)
    key = getkey()
    _, aux = spd.spd_loss(comps, t.params, x, key, apply=t.apply, sites=sites,
                          cfg=loss_cfg(c_subset=1.0))
    y_t, _, g, _ = importances(comps, t, sites, x)
    masks = spd.stochastic_masks(g, jax.random.fold_in(key, spd.SUBSET))
    y = jax.vmap(lambda xx, mk: spd.spd_forward(t.apply, t.params, sites, comps, xx, mk))(x,
                                                                                         masks)
    np.testing.assert_allclose(aux["subset_recon"], np.mean((y - y_t) ** 2), rtol=1e-12)


def test_subset_loss_equals_a_loop_over_examples(getkey):
    _, t, sites, x = case("tms-5-2", getkey)
    comps = random_comps(t, sites)
    key = getkey()
    _, aux = spd.spd_loss(comps, t.params, x, key, apply=t.apply, sites=sites,
                          cfg=loss_cfg(c_subset=1.0, delta=True))
    y_t, _, g, _ = importances(comps, t, sites, x)
    k = jax.random.fold_in(key, spd.SUBSET)
    routes = spd.subset_routes(sites.names, (x.shape[0],),
                               jax.random.fold_in(k, spd.ROUTE_KEY))
    y = forward_batch(t, sites, comps, x, spd.stochastic_masks(g, k), routes,
                      spd.delta_masks(g, k))
    np.testing.assert_allclose(aux["subset_recon"], np.mean((y - y_t) ** 2), rtol=1e-12)
    # a routed-out site is exactly the target's: no route at all gives the target output
    off = {s: jnp.zeros(x.shape[0], bool) for s in sites.names}
    np.testing.assert_array_equal(
        forward_batch(t, sites, comps, x, spd.stochastic_masks(g, k), off,
                      spd.delta_masks(g, k)), jnp.stack([t.apply(t.params, xx) for xx in x]))


# --- PGD ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
def test_pgd_recon_equals_a_hand_written_signed_ascent(shared, getkey):
    _, t, sites, x = case("tms-5-2", getkey)
    comps = random_comps(t, sites)
    pgd = spd.PGDConfig(steps=3, step_size=0.2, init="random", shared=shared)
    y_t, _, g, _ = importances(comps, t, sites, x)
    lead = (1,) if shared else (x.shape[0],)
    rng = np.random.default_rng(7)
    s0 = {s: jnp.asarray(rng.uniform(0.05, 0.95, size=(*lead, 6))) for s in sites.names}

    def objective(c, gg, s):
        masks = {k: v + (1 - v) * s[k][..., :5] for k, v in gg.items()}
        dm = {k: jnp.broadcast_to(s[k][..., 5], v.shape[:-1]) for k, v in gg.items()}
        y = jax.vmap(lambda xx, mk, d: spd.spd_forward(t.apply, t.params, sites, c, xx, mk,
                                                       delta_masks=d))(x, masks, dm)
        return jnp.mean((y - y_t) ** 2)

    s = s0
    for _ in range(3):
        grad = jax.grad(objective, argnums=2)(comps, g, s)
        s = {k: jnp.clip(s[k] + 0.2 * jnp.sign(grad[k]), 0.0, 1.0) for k in s}
    loss, final = spd.pgd_recon(comps, t.params, x, apply=t.apply, sites=sites, pgd=pgd,
                                delta=True, key=getkey(), sources=s0)
    for k in s:
        np.testing.assert_array_equal(final[k], s[k])
    np.testing.assert_allclose(loss, objective(comps, g, s), rtol=1e-12)
    # Three steps of 0.2 may overshoot, so "the ascent found worse masks" is checked where
    # it must hold: one step of 1e-4 from interior sources raises the loss by about
    # 1e-4 * |grad|_1 (first order), and pgd_recon takes exactly that step.
    tiny = spd.PGDConfig(steps=1, step_size=1e-4, init="random", shared=shared)
    up, _ = spd.pgd_recon(comps, t.params, x, apply=t.apply, sites=sites, pgd=tiny,
                          delta=True, key=getkey(), sources=s0)
    grad0 = jax.grad(objective, argnums=2)(comps, g, s0)
    rise = 1e-4 * sum(float(jnp.abs(v).sum()) for v in grad0.values())
    assert rise > 0
    np.testing.assert_allclose(float(up) - float(objective(comps, g, s0)), rise, rtol=1e-2)
    if shared:
        return
    # gradient: through g at the final sources, which are a leaf

    def via_pgd(c):
        return spd.pgd_recon(c, t.params, x, apply=t.apply, sites=sites, pgd=pgd, delta=True,
                             key=getkey(), sources=s0)[0]

    def at_final(c):
        _, _, gg, _ = importances(c, t, sites, x)
        return objective(c, gg, s)

    g1, g2 = jax.grad(via_pgd)(comps), jax.grad(at_final)(comps)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-14)
    assert float(jnp.abs(g1.ci[".W_enc"].w_out).sum()) > 0


def test_pgd_term_of_spd_loss_and_source_inits(getkey):
    _, t, sites, x = case("tms-5-2", getkey)
    comps = random_comps(t, sites)
    key = getkey()
    for init in ("random", "ones", "zeros"):
        pgd = spd.PGDConfig(steps=2, step_size=0.1, init=init, shared=False)
        _, aux = spd.spd_loss(comps, t.params, x, key, apply=t.apply, sites=sites,
                              cfg=loss_cfg(c_pgd=1.0, pgd=pgd))
        want, src = spd.pgd_recon(comps, t.params, x, apply=t.apply, sites=sites, pgd=pgd,
                                  key=jax.random.fold_in(key, spd.PGD))
        np.testing.assert_allclose(aux["pgd_recon"], want, rtol=1e-12)
        assert all(v.shape == (x.shape[0], 5) for v in src.values())
    # zero steps from "ones" are the unmasked components
    ones = spd.PGDConfig(steps=0, init="ones")
    loss, _ = spd.pgd_recon(comps, t.params, x, apply=t.apply, sites=sites, pgd=ones,
                            key=getkey())
    y_t, _, g, _ = importances(comps, t, sites, x)
    y = forward_batch(t, sites, comps, x, {s: jnp.ones_like(v) for s, v in g.items()})
    np.testing.assert_allclose(loss, np.mean((y - y_t) ** 2), rtol=1e-12)


def test_pgd_sources_of_the_wrong_shape_are_rejected(getkey):
    _, t, sites, x = case("tms-5-2", getkey)
    comps = random_comps(t, sites)
    no_delta = {s: jnp.ones((6, 5)) for s in sites.names}
    with pytest.raises(ValueError, match=r"sources\['.W_enc'\].*C \+ 1 = 6.*\(6, 5\)"):
        spd.pgd_recon(comps, t.params, x, apply=t.apply, sites=sites, delta=True,
                      key=getkey(), sources=no_delta)
    with pytest.raises(ValueError, match="sources"):
        spd.pgd_recon(comps, t.params, x, apply=t.apply, sites=sites, key=getkey(),
                      sources={".W_enc": jnp.ones((6, 5))})
    with pytest.raises(ValueError, match="pgd.init"):
        spd.pgd_recon(comps, t.params, x, apply=t.apply, sites=sites, key=getkey(),
                      pgd=spd.PGDConfig(init="half"))


# --- hidden-activation reconstruction and divergences ------------------------------------


def test_hidden_recon_against_numpy(getkey):
    model, t, sites, x = case("tms-5-2-id", getkey)
    comps = random_comps(t, sites)
    key = getkey()
    _, aux = spd.spd_loss(comps, t.params, x, key, apply=t.apply, sites=sites,
                          cfg=loss_cfg(c_hidden_recon=1.0, c_stoch=1.0))
    _, _, g, _ = importances(comps, t, sites, x)
    m = {s: np.asarray(v) for s, v in
         spd.stochastic_masks(g, jax.random.fold_in(key, spd.STOCHASTIC)).items()}
    W, Id = np.asarray(model.W_enc), np.asarray(model.hidden[0])
    V1, U1 = np.asarray(comps.V[".W_enc"]), np.asarray(comps.U[".W_enc"])
    V2, U2 = np.asarray(comps.V[".hidden[0]"]), np.asarray(comps.U[".hidden[0]"])
    xx = np.asarray(x)
    enc = (xx @ V1 * m[".W_enc"]) @ U1
    hid = (enc @ V2 * m[".hidden[0]"]) @ U2
    dec = (hid @ U1.T * m[".W_enc:T"]) @ V1.T
    t_enc = xx @ W
    t_hid = t_enc @ Id
    want = np.mean([np.mean((enc - t_enc) ** 2), np.mean((hid - t_hid) ** 2),
                    np.mean((dec - t_hid @ W.T) ** 2)])
    np.testing.assert_allclose(aux["hidden_recon"], want, rtol=1e-10)
    out = np.maximum(dec + np.asarray(model.b), 0)
    np.testing.assert_allclose(aux["stochastic_recon"],
                               np.mean((out - np.maximum(t_hid @ W.T + np.asarray(model.b),
                                                         0)) ** 2), rtol=1e-10)


def test_kl_divergence_against_numpy():
    y = jnp.asarray(3 * RNG.normal(size=(4, 3, 7)))
    y_t = jnp.asarray(3 * RNG.normal(size=(4, 3, 7)))

    def log_softmax(v):
        v = np.asarray(v)
        v = v - v.max(-1, keepdims=True)
        return v - np.log(np.exp(v).sum(-1, keepdims=True))

    lt, lm = log_softmax(y_t), log_softmax(y)
    want = np.mean(np.sum(np.exp(lt) * (lt - lm), -1))
    np.testing.assert_allclose(spd.divergence(y, y_t, "kl"), want, rtol=1e-12)
    np.testing.assert_allclose(spd.divergence(y, y_t, "mse"),
                               np.mean((np.asarray(y) - np.asarray(y_t)) ** 2), rtol=1e-12)
    assert float(spd.divergence(y_t, y_t, "kl")) == pytest.approx(0.0, abs=1e-14)
    with pytest.raises(ValueError, match="kind"):
        spd.divergence(y, y_t, "l1")


def test_kl_divergence_in_the_layerwise_loss(getkey):
    _, t, sites, x = case("tms-5-2", getkey)
    comps = random_comps(t, sites)
    key = getkey()
    _, aux = spd.spd_loss(comps, t.params, x, key, apply=t.apply, sites=sites,
                          cfg=loss_cfg(c_layerwise=1.0, divergence="kl"))
    y_t, _, g, _ = importances(comps, t, sites, x)
    masks = spd.stochastic_masks(g, jax.random.fold_in(key, spd.LAYERWISE))
    per_site = []
    for s in sites.names:
        routes = {r: jnp.full(x.shape[0], r == s) for r in sites.names}
        y = forward_batch(t, sites, comps, x, masks, routes)
        per_site.append(spd.divergence(y, y_t, "kl"))
    np.testing.assert_allclose(aux["layerwise_recon"], np.mean(per_site), rtol=1e-12)


# --- CI function variants ----------------------------------------------------------------


def test_vector_and_shared_ci_mlps_against_numpy():
    C, d, H = 4, 3, 5

    def normal(*shape):
        return jnp.asarray(RNG.normal(size=shape))

    vec = spd.VectorCIParams(normal(C, d, H), normal(C, H), normal(C, H), normal(C))
    sh = spd.SharedCIParams(normal(d, H), normal(H), normal(H, C), normal(C))
    a = normal(2, 6, d)
    an = np.asarray(a)
    w_in, b_in, w_out, b_out = (np.asarray(v) for v in (vec.w_in, vec.b_in, vec.w_out,
                                                        vec.b_out))
    want = np.einsum("pnch,ch->pnc", gelu(np.einsum("pni,cih->pnch", an, w_in) + b_in),
                     w_out) + b_out
    np.testing.assert_allclose(vec(a), want, rtol=1e-10)
    np.testing.assert_allclose(vec(a[0, 0]), want[0, 0], rtol=1e-10)
    want = gelu(an @ np.asarray(sh.w_in) + np.asarray(sh.b_in)) @ np.asarray(sh.w_out) \
        + np.asarray(sh.b_out)
    np.testing.assert_allclose(sh(a), want, rtol=1e-10)


@pytest.mark.parametrize("ci_fn", ["vector_mlp", "shared_mlp"])
def test_input_ci_functions_read_the_site_input(ci_fn, getkey):
    _, t, sites, x = case("resid-mlp-1", getkey)
    shapes = jax.eval_shape(lambda k: spd.init_spd(t.params, sites, 5, 4, ci_fn=ci_fn, key=k),
                            getkey())
    # the named CI function at every site, with that site's input width (12 and 6)
    cls = spd.VectorCIParams if ci_fn == "vector_mlp" else spd.SharedCIParams
    assert all(isinstance(c, cls) for c in shapes.ci.values())
    assert shapes.ci[".layers[0].mlp_out"].w_in.shape == ((5, 6, 4) if ci_fn == "vector_mlp"
                                                           else (6, 4))
    comps = random_comps(t, sites, ci_fn=ci_fn)
    _, cache, g, g_up = importances(comps, t, sites, x)
    for s in sites.names:
        z = comps.ci[s](cache[s][0])
        np.testing.assert_allclose(g[s], spd.lower_leaky_hard_sigmoid(z), rtol=1e-12)
        np.testing.assert_allclose(g_up[s], spd.upper_leaky_hard_sigmoid(z), rtol=1e-12)
    cfg = loss_cfg(c_imp=1.0, p=2.0)
    grads = jax.grad(lambda c: spd.spd_loss(c, t.params, x, getkey(), apply=t.apply,
                                            sites=sites, cfg=cfg)[0])(comps)
    # importances no longer read h = a V: no gradient into V from the importance loss
    assert all(float(jnp.abs(v).sum()) == 0 for v in grads.V.values())
    assert float(jnp.abs(grads.ci[".layers[0].mlp_out"].w_in).sum()) > 0


# --- C per keypath rule ------------------------------------------------------------------


def test_C_per_keypath_rule(getkey):  # noqa: N802
    paths = spd_run.resid_paths(2)
    rules = {".layers[*].mlp_in": 3, ".layers[?].mlp_out": 4}
    assert spd.resolve_C("f", rules, paths) == {
        ".layers[0].mlp_in": 3, ".layers[0].mlp_out": 4, ".layers[1].mlp_in": 3,
        ".layers[1].mlp_out": 4}
    exact = {"layers.0.mlp_in": 2, ".layers[1].mlp_in": 5, "*mlp_out": 6}  # dotted form too
    assert spd.resolve_C("f", exact, paths)[".layers[0].mlp_in"] == 2
    with pytest.raises(ValueError, match=r"f: expected C .*'\.layers\[1\]\.mlp_out', got 0"):
        spd.resolve_C("f", {".layers[*].mlp_in": 3, ".layers[0].mlp_out": 4}, paths)
    with pytest.raises(ValueError, match=r"'\.layers\[0\]\.mlp_in', got 2 matching"):
        spd.resolve_C("f", {".layers[*].mlp_in": 3, ".layers[0].*": 4, "*out": 1}, paths)
    with pytest.raises(ValueError, match="C"):
        spd.resolve_C("f", {"*": 0}, paths)
    _, t, sites, _ = case("resid-mlp-1", getkey)
    comps = jax.eval_shape(lambda k: spd.init_spd(t.params, sites, rules, 4, key=k), getkey())
    assert comps.V[".layers[0].mlp_in"].shape == (12, 3)
    assert comps.U[".layers[0].mlp_out"].shape == (4, 12)
    assert comps.ci[".layers[0].mlp_out"].w_in.shape == (4, 4)
    cfg = spd_run.SPDConfig(paths=paths, C=rules)
    assert cfg.C == rules
    with pytest.raises(ValueError, match=r"SPDConfig: expected C .*mlp_out"):
        spd_run.SPDConfig(paths=paths, C={".layers[*].mlp_in": 3})


# --- embeddings -------------------------------------------------------------------------


class TinyLM(eqx.Module):
    """One token -> logits: an equinox embedding, then an unembedding matrix."""

    embed: eqx.nn.Embedding
    unembed: jax.Array

    def __call__(self, token):
        return self.embed(token) @ self.unembed


class TinySeq(eqx.Module):
    """Tokens ``(P,)`` -> logits ``(P, vocab)`` through an embedding lookup."""

    E: jax.Array
    W: jax.Array

    def __call__(self, tokens):
        return self.E[tokens] @ self.W


def test_embedding_lookup_is_decomposed_as_a_one_hot_matmul(getkey):
    model = to64(TinyLM(eqx.nn.Embedding(7, 3, key=getkey()),
                        jnp.asarray(RNG.normal(size=(3, 7)))))
    t = ji.target.from_equinox(model)
    tokens = jnp.array([0, 3, 6, 2, 5])
    sites = apd.make_sites(t.apply, t.params, tokens[0], (".embed.weight", ".unembed"))
    assert sites.shapes[".embed.weight"] == ((7,), (3,))
    _, cache = forward_sites(t.apply, t.params, tokens[4], sites.paths)
    np.testing.assert_array_equal(cache[".embed.weight"][0], jax.nn.one_hot(5, 7))
    np.testing.assert_allclose(cache[".embed.weight"][1], model.embed.weight[5])
    comps = random_comps(t, sites)
    ones = {s: jnp.ones(5) for s in sites.names}
    V, U = np.asarray(comps.V[".embed.weight"]), np.asarray(comps.U[".embed.weight"])
    for tok in tokens[:2]:
        np.testing.assert_allclose(
            spd.spd_forward(t.apply, t.params, sites, comps, tok, ones,
                            delta_masks={s: jnp.ones(()) for s in sites.names}),
            t.apply(t.params, tok), atol=1e-12)
        m = jnp.asarray(RNG.uniform(size=5))
        got = spd.spd_forward(t.apply, t.params, sites, comps, tok,
                              {".embed.weight": m})
        want = (V[int(tok)] * np.asarray(m)) @ U @ np.asarray(model.unembed)
        np.testing.assert_allclose(got, want, rtol=1e-10)
    cfg = loss_cfg(c_stoch=1.0, c_imp=1e-2, delta=True, divergence="kl")
    total, _ = spd.spd_loss(comps, t.params, tokens, getkey(), apply=t.apply, sites=sites,
                            cfg=cfg)
    assert np.isfinite(float(total))
    grads = jax.grad(lambda c: jnp.sum(spd.spd_forward(t.apply, t.params, sites, c, tokens[1],
                                                       ones) ** 2))(comps)
    assert float(jnp.abs(grads.U[".embed.weight"][:, 3]).sum()) > 0
    with pytest.raises(ValueError, match="index"):
        WeightSite(model.unembed, None, None, ".unembed")[1.5]
    with pytest.raises(ValueError, match="index"):
        spd.SPDWeight(V, U, model.embed.weight, None, None, None, None)[:, 0]


def test_per_position_masks_routes_and_delta(getkey):
    model = TinySeq(jnp.asarray(RNG.normal(size=(9, 4))), jnp.asarray(RNG.normal(size=(4, 9))))
    t = ji.target.from_equinox(model)
    x = jnp.asarray(RNG.integers(0, 9, size=(5, 6)))
    sites = apd.make_sites(t.apply, t.params, x[0], (".E", ".W"))
    assert sites.shapes[".E"] == ((6, 9), (6, 4))
    comps = random_comps(t, sites, ci_fn="shared_mlp")
    y_t, _, g, _ = importances(comps, t, sites, x)
    assert g[".E"].shape == (5, 6, 5)
    key = getkey()
    cfg = loss_cfg(c_subset=1.0, c_pgd=1.0, delta=True, divergence="kl",
                   pgd=spd.PGDConfig(steps=1, step_size=0.3))
    _, aux = spd.spd_loss(comps, t.params, x, key, apply=t.apply, sites=sites, cfg=cfg)
    k = jax.random.fold_in(key, spd.SUBSET)
    routes = spd.subset_routes(sites.names, (5, 6), jax.random.fold_in(k, spd.ROUTE_KEY))
    masks, dm = spd.stochastic_masks(g, k), spd.delta_masks(g, k)
    assert dm[".W"].shape == (5, 6) and routes[".W"].shape == (5, 6)
    y = forward_batch(t, sites, comps, x, masks, routes, dm)
    np.testing.assert_allclose(aux["subset_recon"], spd.divergence(y, y_t, "kl"), rtol=1e-12)
    # numpy, position by position: routed-out positions are exactly the target's
    E, W = np.asarray(model.E), np.asarray(model.W)
    Ve, Ue, Vw, Uw = (np.asarray(v) for v in (comps.V[".E"], comps.U[".E"], comps.V[".W"],
                                               comps.U[".W"]))
    rn, mn, dn, xn, yn = jax.tree_util.tree_map(np.asarray, (routes, masks, dm, x, y))
    for b in range(5):
        for p in range(6):
            r = {s: bool(v[b, p]) for s, v in rn.items()}
            mk = {s: v[b, p] for s, v in mn.items()}
            dd = {s: v[b, p] for s, v in dn.items()}
            tok = int(xn[b, p])
            h = ((Ve[tok] * mk[".E"]) @ Ue + dd[".E"] * (E - Ve @ Ue)[tok]) if r[".E"] else E[tok]
            out = ((h @ Vw * mk[".W"]) @ Uw + dd[".W"] * h @ (W - Vw @ Uw)) if r[".W"] else h @ W
            np.testing.assert_allclose(yn[b, p], out, rtol=1e-10)
    off = {s: jnp.zeros((5, 6), bool).at[:, 2].set(True) for s in sites.names}
    y_off = forward_batch(t, sites, comps, x, masks, off, dm)
    y_t1 = jnp.stack([t.apply(t.params, xx) for xx in x])
    np.testing.assert_array_equal(np.delete(np.asarray(y_off), 2, axis=1),
                                  np.delete(np.asarray(y_t1), 2, axis=1))
    assert not np.allclose(y_off[:, 2], y_t[:, 2])
    assert np.isfinite(float(aux["pgd_recon"]))


# --- optimizer, configuration errors, CLI -------------------------------------------------


def test_gradient_clipping_in_make_optimizer():
    opt = make_optimizer("sgd", 1.0, 10, grad_clip=0.5)
    params = {"w": jnp.zeros(4)}
    big, small = {"w": jnp.array([3.0, 0.0, 4.0, 0.0])}, {"w": jnp.array([0.1, 0.2, 0.0, 0.0])}
    up, _ = opt.update(big, opt.init(params), params)
    np.testing.assert_allclose(up["w"], [-0.3, 0.0, -0.4, 0.0], rtol=1e-6)
    up, _ = opt.update(small, opt.init(params), params)
    np.testing.assert_allclose(up["w"], -small["w"], rtol=1e-6)
    plain = make_optimizer("sgd", 1.0, 10)
    up, _ = plain.update(big, plain.init(params), params)
    np.testing.assert_allclose(up["w"], -big["w"])
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="grad_clip"):
            make_optimizer("adam", 1e-3, 10, grad_clip=bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ci_fn="conv"), r"SPDConfig: expected ci_fn one of 'mlp', 'vector_mlp', "
                         r"'shared_mlp', got 'conv'"),
    (dict(divergence="l1"), r"expected divergence one of 'mse', 'kl', got 'l1'"),
    (dict(init="xavier"), r"expected init one of 'projection', 'normal', got 'xavier'"),
    (dict(pgd_init="half"), r"expected pgd_init one of .*got 'half'"),
    (dict(pgd_steps=-1), r"expected pgd_steps a non-negative integer, got -1"),
    (dict(pgd_steps=1.5), r"pgd_steps"),
    (dict(pgd_step_size=0.0), r"expected pgd_step_size a positive number, got 0.0"),
    (dict(c_pgd=1.0), r"expected pgd_steps >= 1 when c_pgd is set, got 0"),
    (dict(p_anneal=(1.0, 0.6, 0.4)), r"p_anneal fractions 0 <= start_frac <= end_frac <= 1, "
                                     r"got start_frac=0.6, end_frac=0.4"),
    (dict(p_anneal=(1.0, -0.1, 0.5)), r"p_anneal fractions"),
    (dict(p_anneal=(1.0, 0.5, 1.5)), r"p_anneal fractions"),
    (dict(p_anneal=(1.0, 0.5)), r"p_anneal \(p_final, start_frac, end_frac\)"),
    (dict(p_anneal=(0.0, 0.1, 0.5)), r"p_final"),
    (dict(beta=-0.5), r"expected beta a non-negative number, got -0.5"),
    (dict(faith_warmup_steps=-5), r"faith_warmup_steps"),
    (dict(clip_norm=0.0), r"expected clip_norm a positive number, got 0.0"),
    (dict(C=0), r"expected C a positive integer, got 0"),
    (dict(C={".nope*": 4}), r"exactly one rule matching the path '\.W_enc', got 0"),
    (dict(C={".W_*": 3, ".W_enc": 4}), r"'\.W_enc', got 2 matching"),
])
def test_bad_spd_configs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spd_run.SPDConfig(**kwargs)


def test_bad_loss_and_init_arguments_raise_clear_errors(getkey):
    _, t, sites, x = case("tms-5-2", getkey)
    comps = random_comps(t, sites)

    def loss(**kw):
        return spd.spd_loss(comps, t.params, x, getkey(), apply=t.apply, sites=sites,
                            cfg=loss_cfg(**kw))

    with pytest.raises(ValueError, match=r"spd_loss: expected cfg.divergence one of"):
        loss(c_stoch=1.0, divergence="js")
    with pytest.raises(ValueError, match=r"pgd.steps a non-negative integer, got -2"):
        loss(c_pgd=1.0, pgd=spd.PGDConfig(steps=-2))
    with pytest.raises(ValueError, match=r"cfg.beta"):
        loss(c_imp=1.0, beta=-1.0)
    with pytest.raises(ValueError, match=r"init_spd: expected init one of"):
        spd.init_spd(t.params, sites, 5, 4, init="xavier", key=getkey())
    with pytest.raises(ValueError, match=r"init_spd: expected ci_fn one of"):
        spd.init_spd(t.params, sites, 5, 4, ci_fn="conv", key=getkey())


def test_main_recipe_presets_follow_section_9():
    for name in spd_run.PRESETS:
        paper, main = spd_run.spd_config(name), spd_run.spd_config(name, recipe="main")
        assert (main.c_faith, main.delta, main.init, main.faith_warmup_steps, main.gated) == \
            (None, True, "normal", 200, True), name
        assert (paper.c_faith, paper.delta, paper.init, paper.gated) == \
            (1.0, False, "projection", False), name
        assert main.paths == paper.paths and main.c_imp == (
            1e-5 if name == "resid-mlp-3" else paper.c_imp), name
    tms = spd_run.spd_config("tms-40-10", recipe="main")
    assert (tms.steps, tms.schedule, tms.C) == (10_000, "half_cosine", 200)
    assert spd_run.spd_config("tms-40-10-id", recipe="main").steps == 20_000
    r1 = spd_run.spd_config("resid-mlp-1", recipe="main")
    assert (r1.steps, r1.lr, r1.schedule, r1.C) == (20_000, 2e-3, "constant", 100)
    r3 = spd_run.spd_config("resid-mlp-3", recipe="main")
    assert (r3.ci_hidden, r3.steps) == (128, 50_000)
    # explicit overrides win over the recipe
    assert spd_run.spd_config("tms-5-2", recipe="main", steps=7, delta=False).steps == 7
    assert not spd_run.spd_config("tms-5-2", recipe="main", delta=False).delta
    with pytest.raises(ValueError, match=r"expected recipe one of 'paper', 'main', got 'x'"):
        spd_run.spd_config("tms-5-2", recipe="x")


def test_cli_coercion_of_the_new_fields():
    got = coerce_overrides({"p_anneal": "1,0.2,0.8", "clip_norm": "0.5", "delta": "true",
                            "ci_fn": "shared_mlp", "pgd_steps": "3", "c_pgd": "none"},
                           spd_run.SPDConfig, "spd", ("C",))
    assert got == {"p_anneal": (1.0, 0.2, 0.8), "clip_norm": 0.5, "delta": True,
                   "ci_fn": "shared_mlp", "pgd_steps": 3, "c_pgd": None}
    assert spd_run.SPDConfig(**got).p_anneal == (1.0, 0.2, 0.8)


# --- training with every main option on --------------------------------------------------


def test_train_spd_with_every_main_option_on():
    with jax.enable_x64(False):
        target = ji.get_target("tms-5-2")
        tcfg = target.config()
        model = target.init(tcfg, jax.random.key(0))
        cfg = spd_run.spd_config(
            "tms-5-2", steps=30, steps_per_call=30, batch_size=64, eval_size=128,
            C={".W_enc": 8}, init="normal", faith_warmup_steps=20, delta=True, c_faith=None,
            c_stoch=None, c_layerwise=None, c_subset=1.0, c_pgd=1.0, pgd_steps=1,
            pgd_step_size=0.1, pgd_shared=True, beta=0.5, p=2.0, p_anneal=(1.0, 0.2, 0.8),
            gated=True, clip_norm=1.0, schedule="half_cosine")
        res = spd_run.train_spd(model, target, tcfg, cfg, [3], progress=False)
    h = res.history
    for k in ("loss", "subset_recon", "pgd_recon", "importance_minimality"):
        assert h[k].shape == (30, 1) and np.all(np.isfinite(h[k])), k
    assert not {"faithfulness", "stochastic_recon", "layerwise_recon"} & set(h)
    # the annealed exponent reached the loss at every step
    want = spd.annealed_p(np.arange(30), 30, 2.0, (1.0, 0.2, 0.8))
    np.testing.assert_allclose(h["p"][:, 0], want, rtol=1e-6)
    m = res.metrics
    assert np.isfinite(m["pgd_recon_mse"]) and np.isfinite(m["loss/pgd_recon"])
    assert "loss/p" not in m
    assert res.components.V[".W_enc"].shape == (1, 5, 8)
    assert dataclasses.asdict(cfg)["C"] == {".W_enc": 8}


# --- reuse of the target's inner activations ---------------------------------------------


def test_first_masked_site_is_the_first_in_use_order(getkey):
    _, _, sites, _ = case("resid-mlp-2", getkey, paths=RESID2)
    assert spd.first_masked_site(sites, set(sites.names)) == ".layers[0].mlp_in"
    assert spd.first_masked_site(sites, {".layers[1].mlp_out", ".layers[0].mlp_out"}) == \
        ".layers[0].mlp_out"
    assert spd.first_masked_site(sites, {}) is None


@pytest.mark.parametrize("name, hidden", [("resid-mlp-1", True), ("resid-mlp-2", True),
                                          ("resid-mlp-2", False), ("tms-5-2", True)])
def test_reusing_the_target_inner_activations_keeps_losses_and_gradients(name, hidden, getkey,
                                                                          monkeypatch):
    """Every reconstruction term (stochastic, layerwise, subset, PGD, hidden) with the
    delta channel on, values and gradients, equals the pass that recomputes ``a @ V`` and
    ``a @ W`` at every site and runs the model for every layerwise pass (reuse and the
    folded passes switched off: resid-mlp's last ``mlp_out`` in the layerwise loss, and
    the stochastic pass at it: from the target's output for resid-mlp-1, whose masks reach
    the output only through it, and from the pass with it held at 0 for resid-mlp-2 when
    the hidden loss is off)."""
    from jaxinterp.decomposition.spd import losses

    paths = {"resid-mlp-1": RESID1, "resid-mlp-2": RESID2}.get(name)
    _, t, sites, x = case(name, getkey, paths=paths)
    comps = random_comps(t, sites)
    key = getkey()
    cfg = loss_cfg(c_stoch=1.0, c_layerwise=0.7, c_subset=0.5, c_pgd=0.3,
                   c_hidden_recon=0.2 if hidden else None, c_imp=1e-2, delta=True,
                   pgd=spd.PGDConfig(steps=2))

    def run(c):
        return spd.spd_loss(c, t.params, x, key, apply=t.apply, sites=sites, cfg=cfg)

    monkeypatch.setattr(losses, "_folding_is_cheaper", lambda *_: True)  # at toy sizes too
    (total, aux), grads = jax.value_and_grad(run, has_aux=True)(comps)
    monkeypatch.setattr(losses, "first_masked_site", lambda *_: None)
    monkeypatch.setattr(losses, "affine_output_sites", lambda *_: frozenset())
    (total0, aux0), grads0 = jax.value_and_grad(run, has_aux=True)(comps)
    for k in aux0:
        np.testing.assert_allclose(aux[k], aux0[k], rtol=1e-10, err_msg=k)
    np.testing.assert_allclose(total, total0, rtol=1e-10)
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True):
        np.testing.assert_allclose(g, g0, rtol=1e-8, atol=1e-12)


def test_affine_output_sites_are_those_read_by_a_fixed_linear_map(getkey):
    """resid-mlp's last ``mlp_out`` reaches the output through the frozen unembedding
    alone; every earlier site passes a ReLU, and TMS's sites pass its output ReLU."""
    from jaxinterp.decomposition.spd import losses

    _, t, sites, x = case("resid-mlp-2", getkey, paths=RESID2)
    assert losses.affine_output_sites(t.apply, t.params, sites, x) == {".layers[1].mlp_out"}
    # holding the last mlp_out fixed, layer 0's outputs still reach y through the residual
    assert not any(losses._only_through(t.apply, t.params, sites, s, x) for s in sites.names)
    _, t, sites, x = case("resid-mlp-1", getkey, paths=RESID1)
    assert losses._only_through(t.apply, t.params, sites, ".layers[0].mlp_out", x)
    assert not losses._only_through(t.apply, t.params, sites, ".layers[0].mlp_in", x)
    _, t, sites, x = case("tms-5-2-id", getkey)
    assert losses.affine_output_sites(t.apply, t.params, sites, x) == frozenset()
    assert losses._only_through(t.apply, t.params, sites, ".W_enc:T", x)  # the last use
    # resid-mlp-1's preset (d_resid 1000, 50 neurons, C 100): folded from ~180 examples
    target = ji.get_target("resid-mlp-1")
    t = ji.target.from_equinox(target.init(target.config(), getkey()))
    sites = apd.make_sites(t.apply, t.params, jnp.zeros(100), RESID1)
    comps = spd.init_spd(t.params, sites, 100, 4, key=getkey())
    assert not losses._folding_is_cheaper(sites, comps, ".layers[0].mlp_out", 100)
    assert losses._folding_is_cheaper(sites, comps, ".layers[0].mlp_out", 2048)
