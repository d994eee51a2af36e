"""Crossings of two finite-size curves (flowmc.analysis.crossing) on synthetic data with a known
crossing and known errors: exactness, the linear error propagation against its closed form, the
bootstrap against the linear propagation (within the bootstrap's own uncertainty), coverage
over many noisy data sets (with a negative control: halved errors fail it), and curves that do
not cross."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flowmc.analysis.crossing import find_crossing, pairwise_crossings

LAMS = np.linspace(3.8, 4.8, 9)
LAM_C, U_C = 4.31, 0.55


def curves(lams: np.ndarray, curvature: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Two curves crossing at (LAM_C, U_C); the second steeper (like U4 of a larger volume)."""
    t = lams - LAM_C
    return U_C + 0.3 * t + curvature * t**2, U_C + 0.9 * t - curvature * t**2


@pytest.mark.parametrize("method", ["quadratic", "linear"])
def test_exact_on_straight_curves(method: str) -> None:
    y1, y2 = curves(LAMS)
    c = find_crossing(LAMS, y1, np.full(9, 0.01), y2, np.full(9, 0.01), method=method, n_boot=0,
                      observable="binder", sizes=(8, 16))  # fmt: skip
    assert c.found and c.method == method and c.sizes == (8, 16)
    assert c.lam == pytest.approx(LAM_C, abs=1e-12)
    assert c.value == pytest.approx(U_C, abs=1e-12)
    assert c.bracket == (4.3, 4.425) and c.n_brackets == 1 and c.note == ""


def test_quadratic_exact_on_curved_data_where_linear_is_biased() -> None:
    y1, y2 = curves(LAMS, curvature=0.5)  # d = 0.6 t - t^2: its other root (t = 0.6) lies outside
    err = np.full(9, 0.01)
    quad = find_crossing(LAMS, y1, err, y2, err, n_boot=0)
    lin = find_crossing(LAMS, y1, err, y2, err, method="linear", n_boot=0)
    assert quad.lam == pytest.approx(LAM_C, abs=1e-10)
    assert quad.chi2 == pytest.approx(0.0, abs=1e-12) and quad.dof == 1
    assert len(quad.window) == 4 and quad.window[1:3] == quad.bracket
    assert abs(lin.lam - LAM_C) > 1e-3  # O(h^2) interpolation bias of the straight line


def test_linear_propagation_matches_its_closed_form() -> None:
    """lam* = x0 + h d0/(d0 - d1): sigma^2 = h^2 (d1^2 s0^2 + d0^2 s1^2)/(d0 - d1)^4."""
    rng = np.random.default_rng(1)
    y1, y2 = curves(LAMS)
    e1, e2 = rng.uniform(0.002, 0.01, 9), rng.uniform(0.002, 0.01, 9)
    c = find_crossing(LAMS, y1, e1, y2, e2, method="linear", n_boot=0)
    i = 4
    d0, d1 = y2[i] - y1[i], y2[i + 1] - y1[i + 1]
    s0, s1 = math.hypot(e1[i], e2[i]), math.hypot(e1[i + 1], e2[i + 1])
    h = LAMS[i + 1] - LAMS[i]
    want = h * math.sqrt(d1**2 * s0**2 + d0**2 * s1**2) / (d0 - d1) ** 2
    assert c.error_linear == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("method", ["quadratic", "linear"])
def test_bootstrap_matches_linear_propagation(method: str) -> None:
    """Small errors (sigma_d / slope difference across the bracket ~ 2%): the crossing is linear
    in the data, so the bootstrap error equals the propagated one within the bootstrap's own
    uncertainty, error / sqrt(2 (B - 1)) (3 of them)."""
    y1, y2 = curves(LAMS, curvature=0.5)
    rng = np.random.default_rng(2)
    e1, e2 = rng.uniform(0.0005, 0.0015, 9), rng.uniform(0.0005, 0.0015, 9)
    c = find_crossing(LAMS, y1, e1, y2, e2, method=method, n_boot=8000, seed=3)
    assert c.n_failed == 0
    assert c.error_error == pytest.approx(c.error / math.sqrt(2 * 7999))
    assert abs(c.error - c.error_linear) < 3 * c.error_error
    assert abs(c.value_error - c.value_error_linear) < 3 * c.value_error / math.sqrt(2 * 7999)


def _coverage(method: str, scale: float, n_sets: int = 400) -> tuple[float, float]:
    """Mean and sd of z = (lam* - LAM_C) / (scale * error_linear) over noisy data sets."""
    rng = np.random.default_rng(4)
    y1, y2 = curves(LAMS)
    err = np.full(9, 0.003)
    z = []
    for _ in range(n_sets):
        a = y1 + err * rng.standard_normal(9)
        b = y2 + err * rng.standard_normal(9)
        c = find_crossing(LAMS, a, err, b, err, method=method, n_boot=0)
        z.append((c.lam - LAM_C) / (scale * c.error_linear))
    z = np.asarray(z)
    return float(z.mean()), float(z.std(ddof=1))


@pytest.mark.parametrize("method", ["quadratic", "linear"])
def test_coverage_of_the_error_over_noisy_data_sets(method: str) -> None:
    """400 data sets with known errors around a known crossing: z = (lam* - lam_c)/error has
    mean 0 (within 3/sqrt(400)) and sd 1 (within 3 sd(sd) = 3/sqrt(2*399)). Negative control:
    errors understated by 2 give sd(z) ~ 2, far outside that band."""
    n = 400
    band = 3 / math.sqrt(2 * (n - 1))
    mean, sd = _coverage(method, 1.0, n)
    assert abs(mean) < 3 / math.sqrt(n)
    assert abs(sd - 1) < band
    _, sd_bad = _coverage(method, 0.5, n)
    assert abs(sd_bad - 1) > band


def test_no_crossing_inside_the_range() -> None:
    y1, _ = curves(LAMS)
    c = find_crossing(LAMS, y1, np.full(9, 0.01), y1 + 0.05, np.full(9, 0.01),
                      observable="binder", sizes=(8, 16))  # fmt: skip
    assert not c.found and c.lam is None and c.error is None
    assert "no crossing of binder between L=8 and L=16 inside [3.8, 4.8]" in c.note
    assert "> 0 at all 9 points" in c.note and c.to_dict()["range"] == [3.8, 4.8]


def test_several_sign_changes_use_the_most_significant_with_a_note() -> None:
    y1, y2 = curves(LAMS)
    y2 = y2.copy()
    y2[0] = y1[0] + 0.001  # a spurious sign change at the low end, 0.1 sigma
    c = find_crossing(LAMS, y1, np.full(9, 0.01), y2, np.full(9, 0.01), n_boot=0)
    assert c.n_brackets == 2 and c.bracket == (4.3, 4.425)
    assert "changes sign in 2 grid intervals" in c.note


def test_insignificant_crossing_is_flagged() -> None:
    y1, y2 = curves(LAMS)
    c = find_crossing(LAMS, y1, np.full(9, 0.5), y2, np.full(9, 0.5), n_boot=500)
    assert c.found and c.n_failed > 5 and "not significant" in c.note


def test_pairwise_crossings_of_three_sizes_drop_missing_points() -> None:
    y1, y2 = curves(LAMS)
    y3 = U_C + 1.5 * (LAMS - LAM_C)
    err = [0.01] * 9
    vals3 = [None if i == 0 else v for i, v in enumerate(y3)]
    out = pairwise_crossings(
        {16: (LAMS, y2, err), 8: (LAMS, y1, err), 32: (LAMS, vals3, err)},
        observable="binder", n_boot=0,
    )  # fmt: skip
    assert [c.sizes for c in out] == [(8, 16), (8, 32), (16, 32)]
    assert all(c.found and c.lam == pytest.approx(LAM_C, abs=1e-12) for c in out)
    assert out[1].range == (3.925, 4.8)  # the missing point at 3.8 is dropped
    short = pairwise_crossings({8: ([1.0], [0.1], [0.1]), 16: ([1.0], [0.2], [0.1])},
                               observable="binder")  # fmt: skip
    assert not short[0].found and "fewer than 2 points" in short[0].note


def test_input_errors() -> None:
    y1, y2 = curves(LAMS)
    e = np.full(9, 0.01)
    with pytest.raises(ValueError, match="Expected y2 as a 1-d array of 9"):
        find_crossing(LAMS, y1, e, y2[:5], e)
    with pytest.raises(ValueError, match="strictly increasing"):
        find_crossing(LAMS[::-1], y1, e, y2, e)
    with pytest.raises(ValueError, match="finite"):
        find_crossing(LAMS, np.where(LAMS > 4, np.nan, y1), e, y2, e)
    with pytest.raises(ValueError, match="errors >= 0"):
        find_crossing(LAMS, y1, -e, y2, e)
    with pytest.raises(ValueError, match="method"):
        find_crossing(LAMS, y1, e, y2, e, method="cubic")
    with pytest.raises(ValueError, match="window >= 3"):
        find_crossing(LAMS, y1, e, y2, e, window=2)


def test_the_parts_of_find_crossing() -> None:
    """find_crossing's stages on their own: brackets, the best of several, the note without a
    crossing, the interpolation (and its fallbacks), the linear errors, the bootstrap."""
    from flowmc.analysis import crossing as cr

    assert cr._brackets(np.array([1.0, -1.0, 1.0])) == [0, 1]
    assert cr._brackets(np.array([2.0, 1.0, 0.0])) == [1]  # a zero at the last point
    assert cr._brackets(np.array([1.0, 2.0])) == []
    # an isolated noisy flip loses against the sign change that splits the grid
    d = np.array([-3.0, 0.5, -0.5, -2.0, 2.0, 3.0])
    assert cr._brackets(d) == [0, 1, 3] and cr._best_bracket([0, 1, 3], d, np.ones(6)) == 3
    note = cr._no_crossing_note(np.array([1.0, 2.0]), np.array([2.0, 1.0]), np.array([0.5, 1.0]),
                                "U4", (8, 16))  # fmt: skip
    assert note == ("no crossing of U4 between L=8 and L=16 inside [1, 2]: U4(L=16) - U4(L=8) "
                    "> 0 at all 2 points (closest at lam = 2, 1.0 sigma)")  # fmt: skip

    x = np.array([0.0, 1.0, 2.0, 3.0])
    a, b = np.zeros(4), (x - 1.5) * (x + 1.0)  # a quadratic difference: root at 1.5 exactly
    s_d = np.full(4, 0.1)
    notes: list[str] = []
    interp, lam, value = cr._interpolate(x, a, b, s_d, 1, "quadratic", 4, notes)
    assert interp.method == "quadratic" and lam == pytest.approx(1.5, abs=1e-12) and not notes
    assert value == pytest.approx(0.5 * (1.5 - 1.5) * (1.5 + 1.0), abs=1e-12)
    interp, lam, _ = cr._interpolate(x[1:3], a[1:3], b[1:3], s_d[1:3], 0, "quadratic", 4, notes)
    assert interp.method == "linear" and notes == ["2 grid points: linear interpolation"]
    assert lam == pytest.approx(1.0 + 1.0 / 2.5, abs=1e-12)

    # linear errors of the linear crossing lam* = x1 d0 / (d0 - d1) (x0 = 0, d = y2 - y1)
    x2, y1, y2 = np.array([0.0, 2.0]), np.array([-1.0, 1.0]), np.array([1.0, -1.0])
    lin = cr._Interp(x2, np.ones(2), np.ones(2), 0, "linear", 2)
    err, _ = cr._linear_errors(lin, y1, y2, np.array([0.1, 0.0]), np.zeros(2))
    assert err == pytest.approx(0.025, rel=1e-6)  # |d lam*/d y1[0]| = x1 |d1| / (d0 - d1)^2

    assert cr._bootstrap(lin, y1, y2, np.full(2, 0.1), np.full(2, 0.1), 0, 0, []) == (
        None, None, None, 0)
    one = cr._bootstrap(lin, y1, y2, np.full(2, 0.1), np.full(2, 0.1), 200, 7, [])
    assert one == cr._bootstrap(lin, y1, y2, np.full(2, 0.1), np.full(2, 0.1), 200, 7, [])
    assert one[0] == pytest.approx(0.025 * 2, rel=0.2) and one[3] == 0  # 4 inputs of 0.1
    notes = []
    noisy = cr._bootstrap(lin, y1, y2, np.full(2, 3.0), np.full(2, 3.0), 200, 7, notes)
    assert noisy[3] > 2 and "not significant" in notes[0]
