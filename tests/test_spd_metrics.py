import math

import numpy as np
import pytest

from jaxinterp.decomposition.spd_metrics import (
    ci_l0,
    dense_ci_error,
    dense_ci_unread,
    identity_ci_error,
    n_non_negligible,
    permute_columns_for_heatmap,
    spd_mmcs_ml2r,
    spd_neuron_contributions,
    subcomponent_norms,
)


def perfect_g(F=5, C=8, seed=0):
    """One-hot rows on F distinct random columns of C (a permuted identity plus zero columns)."""
    cols = np.random.default_rng(seed).permutation(C)[:F]
    G = np.zeros((F, C))
    G[np.arange(F), cols] = 1.0
    return G, cols


# Greedy takes the 1.0 at (0, 0) and leaves row 1 with the 0.0 at (1, 1): 1 low diagonal plus
# 2 large off-diagonal entries. Hungarian takes the anti-diagonal (sum 1.9 > 1.0): only the
# 1.0 at (0, 0) is off-pattern.
TRAP = np.array([[1.0, 0.95], [0.95, 0.0]])


@pytest.mark.parametrize("greedy", [None, False, True])
@pytest.mark.parametrize("F,C", [(1, 1), (5, 5), (5, 8)])
def test_identity_perfect_is_zero(F, C, greedy):
    G, _ = perfect_g(F, C)
    assert identity_ci_error(G, greedy=greedy) == 0


def test_identity_clips_to_unit_interval():
    G, cols = perfect_g()
    G[0, cols[0]] = 1.4
    G[G == 0.0] = -0.3
    assert identity_ci_error(G) == 0


@pytest.mark.parametrize("greedy", [False, True])
def test_identity_counts_single_errors(greedy):
    G, cols = perfect_g()
    low = G.copy()
    low[2, cols[2]] = 0.5
    assert identity_ci_error(low, greedy=greedy) == 1
    off = G.copy()
    off[3, (cols[3] + 1) % G.shape[1]] = 0.5
    assert identity_ci_error(off, greedy=greedy) == 1
    both = low.copy()
    both[3, (cols[3] + 1) % G.shape[1]] = 0.5
    assert identity_ci_error(both, greedy=greedy) == 2


def test_identity_tolerance():
    G, cols = perfect_g()
    G[0, cols[0]] = 0.85  # < 0.9 but >= 0.8
    G[1, (cols[1] + 1) % G.shape[1]] = 0.15  # > 0.1 but <= 0.2
    assert identity_ci_error(G, tol=0.1) == 2
    assert identity_ci_error(G, tol=0.2) == 0


def test_identity_hungarian_beats_greedy():
    assert identity_ci_error(TRAP, greedy=False) == 1
    assert identity_ci_error(TRAP, greedy=True) == 3
    # With tol = 0.6 (threshold 0.4 on the match, 0.6 off it) Hungarian is perfect.
    G = np.array([[0.6, 0.45], [0.45, 0.0]])
    assert identity_ci_error(G, tol=0.6, greedy=False) == 0
    assert identity_ci_error(G, tol=0.6, greedy=True) == 1


@pytest.mark.parametrize("n,expected", [(499, 1), (500, 3)])
def test_identity_switches_to_greedy_at_500(n, expected):
    G = np.eye(n)
    G[:2, :2] = TRAP
    assert identity_ci_error(G) == expected


@pytest.mark.parametrize(
    "G", [np.ones((3, 2)), np.ones(4), np.ones((2, 0)), np.array([[np.nan, 1.0]])]
)
def test_identity_bad_shapes(G):
    with pytest.raises(ValueError, match="identity_ci_error: expected G"):
        identity_ci_error(G)


@pytest.mark.parametrize("tol", [-0.1, 1.0, "0.1"])
def test_identity_bad_tol(tol):
    with pytest.raises(ValueError, match="identity_ci_error: expected tol"):
        identity_ci_error(np.eye(2), tol=tol)


# column sums 2.5, 0.05, 2.87, 0.2 -> order [2, 0, 3, 1]
DENSE = np.array([[1.0, 0.0, 0.95, 0.2], [0.5, 0.0, 1.0, 0.0], [1.0, 0.05, 0.92, 0.0]])


@pytest.mark.parametrize(
    "k,tol,expected",
    [
        (1, 0.1, 4),  # outside {2}: column 0 (1.0, 0.5, 1.0) and (0, 3) = 0.2
        (2, 0.1, 2),  # inside {2, 0}: (1, 0) = 0.5; outside: (0, 3) = 0.2
        (2, 0.2, 1),  # (0, 3) = 0.2 is no longer > tol
        (3, 0.1, 4),  # inside {2, 0, 3}: 0.5 and column 3's 0.2, 0.0, 0.0
        (4, 0.1, 7),  # every entry below 0.9
    ],
)
def test_dense_by_hand(k, tol, expected):
    assert dense_ci_error(DENSE, k, tol) == expected
    assert dense_ci_error(DENSE[:, ::-1], k, tol) == expected  # column order is irrelevant


def test_dense_perfect():
    G = np.zeros((4, 6))
    G[:, [1, 4]] = 1.0
    assert dense_ci_error(G, 2) == 0
    assert dense_ci_error(G, 1) == 4


@pytest.mark.parametrize("k", [0, 5, -1, 2.0, True])
def test_dense_bad_k(k):
    with pytest.raises(ValueError, match="dense_ci_error: expected k"):
        dense_ci_error(DENSE, k)


def test_dense_unread_by_hand():
    # k = 3 takes columns [2, 0, 3]; its "too low" entries (tol 0.1) are (1, 0) = 0.5 and
    # column 3's three (0.2, 0.0, 0.0). Reads: column 0 max 4 -> (1, 0) reads 0.3 <= 0.4;
    # column 3 max 2 -> rows 0 and 2 read 2.0 and 0.25, row 1 reads -0.1 (|.| <= 0.2).
    H = np.array([[4.0, 1.0, 1.0, 2.0], [0.3, 1.0, 1.0, -0.1], [-4.0, 1.0, 1.0, 0.25]])
    assert dense_ci_error(DENSE, 3) == 4
    assert dense_ci_unread(DENSE, H, 3) == 2            # (1, 0) and (1, 3)
    assert dense_ci_unread(DENSE, H, 3, read_frac=0.13) == 3   # (2, 3): 0.25 <= 0.26
    assert dense_ci_unread(DENSE, H, 3, read_frac=0.0) == 0
    assert dense_ci_unread(DENSE, H, 1) == 0            # column 2 has no "too low" entry
    # permuting columns of both changes nothing
    assert dense_ci_unread(DENSE[:, ::-1], H[:, ::-1], 3) == 2
    with pytest.raises(ValueError, match=r"dense_ci_unread: expected H the shape of G"):
        dense_ci_unread(DENSE, H[:, :3], 3)
    with pytest.raises(ValueError, match=r"dense_ci_unread: expected k"):
        dense_ci_unread(DENSE, H, 0)
    with pytest.raises(ValueError, match=r"dense_ci_unread: expected read_frac"):
        dense_ci_unread(DENSE, H, 2, read_frac=1.5)


def test_ci_l0_by_hand():
    g = np.array([[0.0, 0.2, 0.1, 0.9], [1.0, 1.0, 1.0, 0.05]])  # 0.1 is not > 0.1
    assert ci_l0(g) == 2.5
    assert ci_l0(g, tau=0.5) == 2.0
    assert ci_l0(g[0]) == 2.0
    g3 = np.stack([g, np.zeros_like(g)])  # (2, 2, 4): counts 2, 3, 0, 0
    assert ci_l0(g3) == 1.25


@pytest.mark.parametrize("g", [np.float64(0.5), np.zeros((3, 0)), np.zeros((0, 4))])
def test_ci_l0_bad(g):
    with pytest.raises(ValueError, match="ci_l0: expected tau"):
        ci_l0(np.ones((2, 3)), tau="0.1")
    with pytest.raises(ValueError, match="ci_l0: expected g"):
        ci_l0(g)


def test_heatmap_order_by_hand():
    G = np.array([[0.1, 0.9, 0.0, 0.0, 0.4], [0.2, 0.8, 0.7, 0.0, 0.0]])
    # row 0 -> 1; row 1 -> 2 (1 is taken); rest {0, 3, 4} by sum: 0.4, 0.3, 0.0
    np.testing.assert_array_equal(permute_columns_for_heatmap(G), [1, 2, 4, 0, 3])


def test_heatmap_recovers_permuted_identity():
    G, cols = perfect_g(6, 9, seed=3)
    order = permute_columns_for_heatmap(0.9 * G + 0.05)
    assert sorted(order.tolist()) == list(range(9))
    np.testing.assert_array_equal(order[:6], cols)
    np.testing.assert_array_equal(G[:, order][:, :6], np.eye(6))


def test_heatmap_more_rows_than_columns():
    G = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    np.testing.assert_array_equal(permute_columns_for_heatmap(G), [1, 0])


def test_norms_and_non_negligible():
    V = np.array([[3.0, 0.0, 0.05], [4.0, 0.1, 0.0]])  # column norms 5, 0.1, 0.05
    U = np.array([[1.0, 0.0], [0.0, 5.0], [0.6, 0.8]])  # row norms 1, 5, 1
    np.testing.assert_allclose(subcomponent_norms(V, U), [5.0, 0.5, 0.05])
    assert n_non_negligible(V, U) == 2  # 0.5 >= 0.1 * 5 exactly
    assert n_non_negligible(V, U, frac=0.11) == 1
    assert n_non_negligible(V, U, frac=0.01) == 3
    assert n_non_negligible(np.zeros_like(V), U) == 0
    with pytest.raises(ValueError, match="subcomponent_norms: expected U"):
        subcomponent_norms(V, U[:2])
    with pytest.raises(ValueError, match="n_non_negligible: expected frac"):
        n_non_negligible(V, U, frac=0.0)


def test_mmcs_ml2r_exact_reproduction():
    F, d_h, C = 5, 2, 8
    W = np.random.default_rng(0).normal(size=(F, d_h))
    V = np.eye(F, C)  # feature j -> subcomponent j; columns F.. are zero
    U = np.zeros((C, d_h))
    U[:F] = W
    out = spd_mmcs_ml2r(W, V, U)
    assert out["mmcs"] == pytest.approx(1.0) and out["ml2r"] == pytest.approx(1.0)
    assert out["mmcs_std"] == pytest.approx(0.0, abs=1e-9)
    assert out["ml2r_std"] == pytest.approx(0.0, abs=1e-9)
    # a misaligned decomposition is not perfect
    assert spd_mmcs_ml2r(W, V, np.roll(U, 1, axis=1))["mmcs"] < 0.99


def test_mmcs_ml2r_by_hand():
    W = np.array([[1.0, 0.0], [1.0, 1.0]])
    V = np.array([[1.0, 0.5], [0.0, 2.0]])
    U = np.array([[2.0, 0.0], [0.0, 1.0]])
    # j = 0: p_00 = (2, 0) cos 1, ratio 2; p_10 = (0, .5) cos 0.
    # j = 1: p_01 = 0; p_11 = (0, 2) cos 1/sqrt2, ratio sqrt2.
    out = spd_mmcs_ml2r(W, V, U)
    r = 1 / math.sqrt(2)
    assert out["mmcs"] == pytest.approx((1 + r) / 2)
    assert out["mmcs_std"] == pytest.approx((1 - r) / 2)
    assert out["ml2r"] == pytest.approx((2 + math.sqrt(2)) / 2)
    assert out["ml2r_std"] == pytest.approx((2 - math.sqrt(2)) / 2)
    # an anti-aligned subcomponent has cos -1 and is not chosen over the aligned one
    out = spd_mmcs_ml2r(W[:1], np.array([[-1.0, 0.5]]), np.array([[1.0, 0.0], [3.0, 0.0]]))
    assert out["mmcs"] == pytest.approx(1.0) and out["ml2r"] == pytest.approx(1.5)


@pytest.mark.parametrize(
    "W,V,U,arg",
    [
        (np.ones((3, 2)), np.ones((4, 5)), np.ones((5, 2)), "V and U"),
        (np.ones((3, 2)), np.ones((3, 5)), np.ones((5, 4)), "V and U"),
        (np.ones((3, 2)), np.ones((3, 5)), np.ones((4, 2)), "U"),
        (np.ones(3), np.ones((3, 5)), np.ones((5, 2)), "W"),
        (np.array([[1.0, 0.0], [0.0, 0.0]]), np.ones((2, 2)), np.ones((2, 2)), "W"),
    ],
)
def test_mmcs_ml2r_bad_input(W, V, U, arg):
    with pytest.raises(ValueError, match=f"spd_mmcs_ml2r: expected {arg}"):
        spd_mmcs_ml2r(W, V, U)


def _nc_case(seed=0, F=6, d=12, N=5, C=9, Cout=7, W_E=None):
    """Target layer with W_in = sum_i outer(W_E[i], u_i) (orthonormal W_E rows), and a
    decomposition whose subcomponent i is exactly feature i's read direction; the spare
    subcomponents F..C-1 read random directions."""
    rng = np.random.default_rng(seed)
    if W_E is None:
        W_E = np.linalg.qr(rng.normal(size=(d, d)))[0][:F]
    u = rng.normal(size=(F, N))
    W_in = W_E.T @ u
    assert np.allclose(W_E @ W_E.T, np.eye(F))
    W_out = rng.normal(size=(N, d))
    V_in = np.concatenate([W_E.T, rng.normal(size=(d, C - F))], axis=1)
    U_in = np.concatenate([u, rng.normal(size=(C - F, N))], axis=0)
    V_out = rng.normal(size=(N, Cout))
    U_out = np.linalg.lstsq(V_out, W_out, rcond=None)[0]  # V_out @ U_out == W_out
    G = np.zeros((F, C))
    G[np.arange(F), np.arange(F)] = 1.0
    return W_E, dict(W_in=W_in, W_out=W_out, V_in=V_in, U_in=U_in, V_out=V_out, U_out=U_out,
                     G_in=G)


def test_neuron_contributions_exact_decomposition_gives_r_and_slope_one():
    W_E, layer = _nc_case()
    out = spd_neuron_contributions(W_E, [layer, _nc_case(1, W_E=W_E)[1]], threshold=1e-6)
    assert out["nc_pearson_r"] == pytest.approx(1.0, abs=1e-9)
    assert out["nc_slope"] == pytest.approx(1.0, abs=1e-9)
    assert out["nc_intercept"] == pytest.approx(0.0, abs=1e-9)
    assert out["nc_pairs"] == 2 * 6 * 5


def test_neuron_contributions_match_a_direct_loop_and_detect_wrong_choices():
    W_E, layer = _nc_case()
    G = np.zeros_like(layer["G_in"])  # every feature picks a spare (wrong) subcomponent
    G[np.arange(6), 6 + np.arange(6) % 3] = 1.0
    bad = spd_neuron_contributions(W_E, [{**layer, "G_in": G}], threshold=1e-6)
    assert bad["nc_pearson_r"] < 0.9
    # direct evaluation of the spec's formula, pair by pair
    xs, ys = [], []
    W_dec = layer["V_out"] @ layer["U_out"]
    for i in range(W_E.shape[0]):
        c = int(np.argmax(G[i]))
        W_sub = np.outer(layer["V_in"][:, c], layer["U_in"][c])
        for n in range(layer["W_in"].shape[1]):
            xs.append((W_E[i] @ layer["W_in"])[n] * (layer["W_out"][n] @ W_E[i]))
            ys.append((W_E[i] @ W_sub)[n] * (W_dec[n] @ W_E[i]))
    xs, ys = np.array(xs), np.array(ys)
    assert bad["nc_pearson_r"] == pytest.approx(np.corrcoef(xs, ys)[0, 1], abs=1e-9)
    assert bad["nc_slope"] == pytest.approx(np.polyfit(xs, ys, 1)[0], abs=1e-9)


def test_neuron_contributions_bad_input():
    W_E, layer = _nc_case()
    with pytest.raises(ValueError, match="layers"):
        spd_neuron_contributions(W_E, [])
    with pytest.raises(ValueError, match="G_in"):
        spd_neuron_contributions(W_E, [{**layer, "G_in": layer["G_in"][:, :3]}])
    with pytest.raises(ValueError, match="missing"):
        spd_neuron_contributions(W_E, [{k: v for k, v in layer.items() if k != "U_out"}])
    with pytest.raises(ValueError, match="threshold"):
        spd_neuron_contributions(W_E, [layer], threshold=1e9)
