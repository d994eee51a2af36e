"""Tests of flowmc.analysis.autocorr: Gamma method, derived quantities, jackknife, Kish ESS.

Every statistical assertion compares with a known truth (AR(1) processes have exact
autocorrelations) using a tolerance derived from an error estimate, with a fixed seed, and
most come with a negative control showing that the assertion can fail.

AR(1): x_t = a x_{t-1} + sqrt(1 - a^2) eps_t, stationary with unit variance,
rho(t) = a^t, tau_int = 1/2 + a/(1 - a) = (1/2)(1 + a)/(1 - a)   (NOT emcee's (1 + a)/(1 - a)).
"""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
from scipy.signal import lfilter

import flowmc.analysis.autocorr as ac
from flowmc.analysis.autocorr import (
    AutocorrError,
    arviz_ess,
    autocovariance,
    derived_gamma,
    gamma_analysis,
    jackknife,
    kish_ess,
    kish_ess_batches,
    tau_int,
)

Z = 3.0  # 3 sigma: two-sided p = 0.0027 per check; every check is deterministic (fixed seed)


def ar1(a: float, n: int, n_chains: int = 1, seed: int = 0) -> np.ndarray:
    """``(n_chains, n)`` stationary AR(1) chains with unit variance (exact start x_0 ~ N(0,1))."""
    rng = np.random.default_rng(seed)
    eps = rng.standard_normal((n_chains, n))
    x_prev = rng.standard_normal(n_chains)
    y, _ = lfilter([math.sqrt(1 - a * a)], [1.0, -a], eps, axis=-1, zi=(a * x_prev)[:, None])
    return y


def ar1_tau(a: float) -> float:
    return 0.5 * (1 + a) / (1 - a)


def ar1_error_of_mean(a: float, n: int) -> float:
    """Exact finite-n standard deviation of the mean of n stationary unit-variance AR(1) draws."""
    t = np.arange(1, n)
    return math.sqrt((n + 2.0 * np.sum((n - t) * a**t)) / n**2)


def direct_autocov(reps: list[np.ndarray], max_lag: int) -> np.ndarray:
    """Wolff eq. (31) by explicit sums (reference for the FFT implementation)."""
    mean = np.concatenate(reps).mean()
    d = [r - mean for r in reps]
    out = np.empty(max_lag + 1)
    for t in range(max_lag + 1):
        num = sum(float(np.dot(x[: len(x) - t], x[t:])) for x in d)
        out[t] = num / sum(len(x) - t for x in d)
    return out


# ------------------------------------------------------------------ AR(1): tau_int and error


@pytest.mark.parametrize("a, seed", [(0.5, 1), (0.9, 2)])
def test_ar1_tau_int_and_error(a: float, seed: int) -> None:
    # N = 1e5: dtau/tau = 2 sqrt((W + 1/2 - tau)/N) ~ 2-5 %, FFT of 1e5 points takes ~10 ms.
    n = 100_000
    x = ar1(a, n, seed=seed)[0]
    res = gamma_analysis(x)
    exact = ar1_tau(a)
    assert abs(res.tau_int - exact) < Z * res.tau_int_error
    # negative control: the emcee convention (1 + 2 sum rho = 2 tau_int) is rejected
    assert abs(res.tau_int - 2 * exact) > Z * res.tau_int_error

    # error of the mean vs the exact finite-N value (asymptotically sqrt(2 tau/N) * sd);
    # the error's own error is sigma sqrt((W + 1/2)/N) (Wolff eq. 44)
    exact_err = ar1_error_of_mean(a, n)
    assert abs(exact_err - math.sqrt(2 * exact / n)) < 1e-3 * exact_err  # finite-N term small
    assert abs(res.error - exact_err) < Z * res.error_error
    assert abs(res.value - 0.0) < Z * res.error  # z-test of the mean itself
    # negative control: the naive error misses the autocorrelation by sqrt(2 tau) >= sqrt(3)
    assert abs(res.naive_error - exact_err) > Z * res.error_error

    assert res.ess == pytest.approx(n / (2 * res.tau_int), rel=1e-12)
    assert res.n == n and res.n_replicas == 1
    assert res.rho[0] == pytest.approx(1.0)
    assert res.window >= 1 and res.rho.shape[0] >= res.window + 1
    assert tau_int(x) == (res.tau_int, res.tau_int_error)


# ------------------------------------------------------------------ invariants


@pytest.mark.parametrize("seed", range(5))
def test_tau_int_at_least_half(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    iid = rng.standard_normal(2000)
    anti = ar1(-0.5, 2000, seed=seed)[0]  # anticorrelated: raw sum can fall below 1/2
    for x in (iid, anti):
        res = gamma_analysis(x)
        assert res.tau_int >= 0.5
        assert res.error >= res.naive_error * (1 - 1e-12)


def test_iid_error_is_naive() -> None:
    n = 20_000
    x = np.random.default_rng(7).normal(3.0, 2.0, n)
    naive = x.std(ddof=1) / math.sqrt(n)
    # S = 0: no windowing, W = 0. Bias-corrected Gamma(0)(1 + 1/N)/N vs s^2/N differ by
    # the factor (1 - 1/N^2) in the variance.
    res0 = gamma_analysis(x, S=0)
    assert res0.tau_int == 0.5 and res0.window == 0 and res0.tau_int_error == 0.0
    assert res0.error == pytest.approx(naive, rel=1.0 / n)
    assert res0.naive_error == pytest.approx(naive, rel=1e-12)
    # default S: the error ratio sqrt(tau_int / (1/2)) is 1 up to the statistical error of
    # tau_int, i.e. |ratio - 1| ~ dtau / (2 tau) = dtau  (tau = 1/2), plus O(W/N) bias correction
    res = gamma_analysis(x)
    assert abs(res.error / naive - 1) < Z * max(res.tau_int_error, 1 / math.sqrt(n))
    # negative control: correlated data are not at the naive error
    y = ar1(0.5, n, seed=7)[0]
    ry = gamma_analysis(y)
    assert abs(ry.error / ry.naive_error - 1) > Z * ry.tau_int_error


def test_fft_autocovariance_matches_direct_sum() -> None:
    rng = np.random.default_rng(11)
    reps = [rng.standard_normal(m) * 5.0 + 2.0 for m in (200, 317, 251)]
    max_lag = 150
    fft = autocovariance(reps, max_lag=max_lag)
    direct = direct_autocov(reps, max_lag)
    eps = np.finfo(float).eps

    def scale(reps: list[np.ndarray], max_lag: int) -> np.ndarray:
        # roundoff of the unnormalised sums is ~eps * sum_i d_i^2; dividing by sum_r (N_r - t)
        # gives the scale Gamma(0) N / sum_r (N_r - t) at lag t
        n = sum(len(r) for r in reps)
        return direct_autocov(reps, 0)[0] * n / np.array(
            [sum(len(r) - t for r in reps) for t in range(max_lag + 1)]
        )

    assert np.all(np.abs(fft - direct) <= 10 * eps * scale(reps, max_lag))
    # single series, default max_lag = n - 1, and the (n_chains, n) form
    x = rng.standard_normal(64)
    assert np.all(np.abs(autocovariance(x) - direct_autocov([x], 63)) <= 10 * eps * scale([x], 63))
    two = rng.standard_normal((2, 64))
    np.testing.assert_array_equal(autocovariance(two, max_lag=5), autocovariance(list(two), 5))
    with pytest.raises(ValueError, match="max_lag"):
        autocovariance(x, max_lag=64)


@pytest.mark.parametrize(
    "data",
    [np.full(50, 0.1), np.full((3, 40), -7.3), [np.full(20, 1e300), np.full(35, 1e300)]],
)
def test_constant_series(data: object) -> None:
    res = gamma_analysis(data)
    assert res.error == 0.0 and res.naive_error == 0.0 and res.error_error == 0.0
    assert res.tau_int == 0.5 and res.tau_int_error == 0.0
    first = data[0] if isinstance(data, list) else np.ravel(data)[0]
    assert res.value == np.ravel(first)[0]
    assert all(math.isfinite(v) for v in (res.value, res.ess)) and np.all(np.isfinite(res.rho))
    # derived quantity of constant observables: zero error too
    dres = derived_gamma(lambda a, b: a * b, [np.full(30, 2.0), np.full(30, 3.0)])
    assert dres.value == 6.0 and dres.error == 0.0


def test_too_short_series_raises() -> None:
    x = ar1(0.99, 300, seed=5)[0]  # tau_int = 99.5 > N / 50
    with pytest.raises(AutocorrError, match="too short") as info:
        gamma_analysis(x)
    assert info.value.tau >= 0.5 and info.value.result is not None
    with pytest.warns(RuntimeWarning, match="too short"):
        res = gamma_analysis(x, quiet=True)
    assert math.isfinite(res.error) and res.error > 0 and math.isfinite(res.tau_int)
    # windowing failure: W may not exceed half the shortest replica (here 10 // 2 = 5)
    reps = [ar1(0.999, 10_000, seed=6)[0], ar1(0.999, 10, seed=7)[0]]
    with pytest.raises(AutocorrError, match="windowing condition"):
        gamma_analysis(reps)
    with pytest.raises(AutocorrError):
        derived_gamma(lambda a: a, [x])
    # negative control: a weakly correlated series of the same length is fine
    gamma_analysis(ar1(0.5, 300, seed=5)[0])


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="at least 5 samples"):
        gamma_analysis([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="at least 5 samples"):
        gamma_analysis([np.ones(10), np.ones(3)])
    with pytest.raises(ValueError, match="finite"):
        gamma_analysis(np.array([1.0, 2.0, np.nan, 4.0, 5.0, 6.0]))
    with pytest.raises(ValueError, match=r"shape \(n,\) or \(n_chains, n\)"):
        gamma_analysis(np.zeros((2, 3, 10)))
    with pytest.raises(ValueError, match="S >= 0"):
        gamma_analysis(np.arange(10.0), S=-1)
    with pytest.raises(ValueError, match="same replica lengths"):
        derived_gamma(lambda a, b: a + b, [np.arange(10.0), np.arange(11.0)])
    with pytest.raises(ValueError, match="n_bins"):
        jackknife(lambda a: a, [np.arange(10.0)], n_bins=1)


# ------------------------------------------------------------------ replicas


def test_replicas_consistent_with_single_chain() -> None:
    a, n = 0.9, 40_000
    x = ar1(a, n, seed=21)[0]
    one = gamma_analysis(x)
    split = gamma_analysis(x.reshape(4, n // 4))
    ragged = gamma_analysis([x[:10_000], x[10_000:22_000], x[22_000:]])
    for res in (split, ragged):
        assert res.n == n and res.n_replicas in (3, 4)
        assert res.value == pytest.approx(one.value, rel=1e-12, abs=1e-15)
        # Same data: splitting only drops the (R - 1) * W pairs that straddle the cuts, an
        # O(R W / N) ~ 1e-2 relative change, far below dtau/tau ~ 0.1; so 1 sigma suffices.
        assert abs(res.tau_int - one.tau_int) < one.tau_int_error
    # independent replicas: tau and the error of the grand mean against the exact values
    reps = ar1(a, 20_000, n_chains=5, seed=22)
    res = gamma_analysis(reps)
    assert abs(res.tau_int - ar1_tau(a)) < Z * res.tau_int_error
    exact_err = ar1_error_of_mean(a, 20_000) / math.sqrt(5)
    assert abs(res.error - exact_err) < Z * res.error_error
    assert res.ess == pytest.approx(5 * 20_000 / (2 * res.tau_int))


# ------------------------------------------------------------------ derived quantities


def test_derived_linearisation_agrees_with_jackknife() -> None:
    a, n = 0.9, 50_000
    x = ar1(a, n, seed=31)[0]
    data = [x**2, np.abs(x), x**4]
    f_width = lambda m2, m1, m4: m2 - m1**2  # noqa: E731  <x^2> - <|x|>^2 = 1 - 2/pi
    f_binder = lambda m2, m1, m4: 1 - m4 / (3 * m2**2)  # noqa: E731  = 0 for a Gaussian
    n_bins = 100
    for f, truth in ((f_width, 1 - 2 / math.pi), (f_binder, 0.0)):
        gam = derived_gamma(f, data)
        val, err = jackknife(f, data, n_bins=n_bins)
        assert val == pytest.approx(gam.value, rel=1e-12, abs=1e-15)
        # Both are estimates of the same error from the same data. Relative statistical
        # uncertainty: jackknife with M bins ~ 1/sqrt(2 (M - 1)) = 7 %, Gamma method
        # sqrt((W + 1/2)/N) ~ 4 %. Treating them as independent (conservative, they are
        # positively correlated) gives 3 sigma ~ 24 %. Bin size 500 >> tau (~5-10) makes the
        # binning bias O(tau/b) ~ 1 %.
        rel_tol = Z * math.sqrt(1 / (2 * (n_bins - 1)) + (gam.window + 0.5) / n)
        assert abs(err / gam.error - 1) < rel_tol
        assert abs(gam.value - truth) < Z * gam.error  # and the value is right
        # negative control: jackknife with bin size 2 << tau misses the autocorrelation
        _, err1 = jackknife(f, data, n_bins=n // 2)
        assert abs(err1 / gam.error - 1) > rel_tol
    # analytic gradient gives the same projection as the numerical one
    g_num = derived_gamma(f_binder, data)
    g_ana = derived_gamma(
        f_binder, data, grad=lambda m2, m1, m4: (2 * m4 / (3 * m2**3), 0.0, -1 / (3 * m2**2))
    )
    assert g_ana.error == pytest.approx(g_num.error, rel=1e-6)
    assert g_ana.tau_int == pytest.approx(g_num.tau_int, rel=1e-4)
    # linear f reduces to the plain Gamma method
    lin = derived_gamma(lambda m: 2.0 * m + 1.0, [x], grad=lambda m: (2.0,))
    plain = gamma_analysis(x)
    assert lin.error == pytest.approx(2 * plain.error, rel=1e-12)
    assert lin.tau_int == pytest.approx(plain.tau_int, rel=1e-12)


def test_jackknife_replicas_binning() -> None:
    rng = np.random.default_rng(41)
    reps = [rng.standard_normal(1000), rng.standard_normal(1510)]
    # N = 2510, 10 bins -> b = 251: 3 + 6 = 9 bins, 247 + 4 samples left out of the bins
    val, err = jackknife(lambda m: m, [reps], n_bins=10)
    assert val == pytest.approx(np.concatenate(reps).mean(), rel=1e-12)
    bins = np.concatenate([r[: (len(r) // 251) * 251].reshape(-1, 251).mean(1) for r in reps])
    # for a linear f the jackknife error is the standard error of the bin means
    assert err == pytest.approx(bins.std(ddof=1) / math.sqrt(len(bins)), rel=1e-10)


# ------------------------------------------------------------------ arviz cross-check


def test_ess_agrees_with_arviz() -> None:
    pytest.importorskip("arviz")
    a = 0.9
    chains = ar1(a, 25_000, n_chains=4, seed=51)
    res = gamma_analysis(chains)
    az = arviz_ess(chains, method="mean")
    # Same quantity N/(2 tau_int) from the same data (Wolff window vs Geyer's initial
    # monotone sequence): the difference is below the statistical error of either, so the
    # relative error of our ESS, dtau/tau (~5 %), at 3 sigma is a conservative bound.
    rel_tol = Z * res.tau_int_error / res.tau_int
    assert abs(res.ess / az - 1) < rel_tol
    assert abs(res.ess - 4 * 25_000 / (2 * ar1_tau(a))) < rel_tol * res.ess  # and the truth
    # negative control: an ESS computed with emcee's tau (twice ours) is off by a factor 2
    assert abs(res.n / (2 * 2 * res.tau_int) / az - 1) > rel_tol


# ------------------------------------------------------------------ Kish ESS


def test_kish_ess() -> None:
    n = 1000
    assert kish_ess(np.zeros(n)) == pytest.approx(1.0, rel=1e-14)
    one = np.full(n, -np.inf)
    one[17] = 0.0
    assert kish_ess(one) == pytest.approx(1 / n, rel=1e-14)
    dom = np.zeros(n)
    dom[3] = 1e4  # dominates completely, exp(1e4) would overflow
    assert kish_ess(dom) == pytest.approx(1 / n, rel=1e-12)
    # hand value: w = (1, 2): 3^2 / (2 * 5) = 0.9
    assert kish_ess(np.log([1.0, 2.0])) == pytest.approx(0.9, rel=1e-14)
    lw = np.random.default_rng(61).normal(0.0, 1.0, n)
    w = np.exp(lw)
    ref = w.sum() ** 2 / (n * (w**2).sum())
    assert kish_ess(lw) == pytest.approx(ref, rel=1e-12)
    assert kish_ess(lw + 1234.5) == pytest.approx(ref, rel=1e-12)
    assert kish_ess(lw + 1e4) == pytest.approx(ref, rel=1e-9)  # no overflow, finite
    # log-normal weights with variance s^2: ESS -> exp(-s^2) = 0.37 for s = 1 (N -> inf)
    assert abs(kish_ess(lw) - math.exp(-1.0)) < 0.1
    with pytest.raises(ValueError, match="NaN"):
        kish_ess([0.0, np.nan])
    with pytest.raises(ValueError, match="all log weights are -inf"):
        kish_ess([-np.inf, -np.inf])


def test_kish_ess_batches() -> None:
    assert kish_ess_batches(np.zeros(100), 4) == (pytest.approx(1.0), pytest.approx(0.0))
    lw = np.random.default_rng(71).normal(0.0, 1.0, 10_001)
    mean, se = kish_ess_batches(lw, 10)
    vals = [kish_ess(b) for b in np.array_split(lw, 10)]
    assert mean == pytest.approx(np.mean(vals), rel=1e-12)
    assert se == pytest.approx(np.std(vals, ddof=1) / math.sqrt(10), rel=1e-12)
    # batches of 1000 log-normal(s=1) weights: E[ESS] ~ exp(-1) up to O(1/n) and tails
    assert abs(mean - math.exp(-1.0)) < 0.1
    with pytest.raises(ValueError, match="n_batches"):
        kish_ess_batches(lw, 1)


def test_doctests() -> None:
    res = doctest.testmod(ac, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0 and res.attempted > 0
