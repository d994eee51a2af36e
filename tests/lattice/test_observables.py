"""Tests for flowmc.lattice.observables.

Statistical tests use *exact independent* free-theory samples (``FreeTheory.sample``), so the
per-configuration series are iid and the plain standard error ``sd/sqrt(N)`` is the exact MCSE;
no autocorrelation estimate is involved. Each z-score is compared with the Bonferroni threshold
``Phi^-1(1 - alpha/(2 m))``, alpha = 0.01, m = number of simultaneous checks in the module's
z-test family.

Sample size: N = 4000 gives a relative SE of sqrt(2/N) = 2.2% on <m^2> (m is Gaussian), so a
bias of 4 x 2.2% ~ 9% in <m^2> (i.e. a ~9% error in m^2 or in the normalisation of M) is
resolved at the quarter-MCSE level asked by STYLE.md section 6.3. The negative control (m^2
off by 25%) must fail.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from scipy.stats import t as student_t

from flowmc.lattice import observables as ob
from flowmc.lattice.action import FreeTheory, Phi4Action

SHAPES = [(16,), (8, 8), (4, 4, 4)]
MASSES2 = [0.5, 1.0]
NUM_SAMPLES = 4000
CHECKS_PER_CASE = 11
NUM_CHECKS = len(SHAPES) * len(MASSES2) * CHECKS_PER_CASE
Z_MAX = norm.ppf(1 - 0.01 / (2 * NUM_CHECKS))  # ~3.79


def _samples(m2: float, shape: tuple[int, ...], seed: int, n: int = NUM_SAMPLES) -> torch.Tensor:
    return FreeTheory(m2, shape).sample(n, generator=torch.Generator().manual_seed(seed))


def _unit(d: int, mu: int, r: int = 1) -> tuple[int, ...]:
    return tuple(r if b == mu else 0 for b in range(d))


def _exact_values(m2: float, shape: tuple[int, ...]) -> dict[str, float]:
    """Exact free-theory expectations of the primaries checked by the z-tests."""
    ft = FreeTheory(m2, shape)
    vol, d = ft.volume, len(shape)
    g = ft.propagator()
    c1d = FreeTheory(m2, (shape[0],)).propagator()  # C(t) == 1-d propagator, any d
    m2_exact = ft.m2_expectation() / vol**2
    return {
        "m2": m2_exact,
        "abs_m": math.sqrt(2 * m2_exact / math.pi),  # m ~ N(0, <m^2>)
        "G0": g[(0,) * d],
        "G1": g[_unit(d, 0, 1)],
        "G2": g[_unit(d, 0, 2)],
        "C0": c1d[0],
        "C1": c1d[1],
        "C2": c1d[2],
        "energy": sum(g[_unit(d, mu)] for mu in range(d)) / d,
        "action_density": 0.5,  # S = phi^T K phi / 2, <phi^T K phi> = V
        "sd": 1.0,  # Schwinger-Dyson, any correct sampler
    }


def _series(phi: torch.Tensor, action: Phi4Action) -> dict[str, np.ndarray]:
    obs = ob.measure(phi, action, chunk_size=1500)
    d = phi.dim() - 1
    return {
        "m2": obs["m2"],
        "abs_m": obs["abs_m"],
        "G0": obs["G_x"][(slice(None), *(0,) * d)],
        "G1": obs["G_x"][(slice(None), *_unit(d, 0, 1))],
        "G2": obs["G_x"][(slice(None), *_unit(d, 0, 2))],
        "C0": obs["C_t"][:, 0],
        "C1": obs["C_t"][:, 1],
        "C2": obs["C_t"][:, 2],
        "energy": obs["energy"],
        "action_density": obs["action_density"],
        "sd": obs["sd"],
    }


def _z_scores(series: dict[str, np.ndarray], exact: dict[str, float]) -> dict[str, float]:
    out = {}
    for key, x in series.items():
        se = x.std(ddof=1) / math.sqrt(x.size)
        out[key] = abs(x.mean() - exact[key]) / se
    return out


# ----------------------------------------------------------------------------- z-tests
@pytest.mark.parametrize("m2", MASSES2)
@pytest.mark.parametrize("shape", SHAPES)
def test_primaries_match_free_theory(shape: tuple[int, ...], m2: float) -> None:
    seed = 100 * len(shape) + int(10 * m2)
    action = Phi4Action(m2, 0.0, shape)
    series = _series(_samples(m2, shape, seed), action)
    exact = _exact_values(m2, shape)
    assert len(series) == CHECKS_PER_CASE
    z = _z_scores(series, exact)
    bad = {k: round(v, 2) for k, v in z.items() if v >= Z_MAX}
    assert not bad, f"z >= {Z_MAX:.2f}: {bad}"


def test_negative_control_wrong_mass_fails() -> None:
    """Samples with m^2 = 1.25 judged against m^2 = 1.0: the z-test must fire."""
    shape, m2 = (4, 4, 4), 1.0
    series = _series(_samples(1.25 * m2, shape, seed=7), Phi4Action(m2, 0.0, shape))
    z = _z_scores(series, _exact_values(m2, shape))
    assert z["m2"] > Z_MAX
    assert z["sd"] > Z_MAX  # the Schwinger-Dyson check alone detects the wrong sampler
    assert z["action_density"] > Z_MAX


def test_derived_quantities_jackknife() -> None:
    """xi_2, chi_2, U_4 and m_eff from sample means, jackknife errors, vs exact values.

    The estimators are evaluated only on (resampled) means, as the statistics module will. With
    ``nbin`` jackknife bins the error itself has ``nbin - 1`` degrees of freedom, so the z-score
    follows Student's t: the Bonferroni threshold is taken from t(nbin - 1), not the normal.
    """
    shape, m2, nbin = (8, 8), 0.5, 20
    obs = ob.measure(_samples(m2, shape, seed=11), None)
    vol = math.prod(shape)

    def derived(sl: np.ndarray) -> np.ndarray:
        g = obs["G_x"][sl].mean(0)
        m2m, m4m = obs["m2"][sl].mean(), obs["m4"][sl].mean()
        c = ob.zero_momentum_from_two_point(g)
        return np.array(
            [
                ob.xi2_from_G(g),
                ob.chi2_from_means(m2m, vol),
                ob.binder_from_means(m2m, m4m),
                ob.effective_mass(c)[1],
            ]
        )

    idx = np.arange(NUM_SAMPLES)
    full = derived(idx)
    jk = np.array([derived(idx[idx % nbin != b]) for b in range(nbin)])
    err = np.sqrt((nbin - 1) / nbin * ((jk - jk.mean(0)) ** 2).sum(0))
    exact = np.array([1 / math.sqrt(m2), 1 / (2 * m2), 0.0, 2 * math.asinh(math.sqrt(m2) / 2)])
    z = np.abs(full - exact) / err
    assert np.all(z < student_t.ppf(1 - 0.01 / (2 * exact.size), df=nbin - 1)), z


# ----------------------------------------------------------------------------- exact identities
@pytest.mark.parametrize("m2", MASSES2)
@pytest.mark.parametrize("shape", [*SHAPES, (8, 4)])
def test_free_theory_exact_mass_and_xi(shape: tuple[int, ...], m2: float) -> None:
    ft = FreeTheory(m2, shape)
    g = ft.propagator()
    c = ob.zero_momentum_from_two_point(g)
    np.testing.assert_allclose(c, FreeTheory(m2, (shape[0],)).propagator(), rtol=0, atol=1e-12)
    m_e = 2 * math.asinh(math.sqrt(m2) / 2)  # cosh(m_E) = 1 + m^2/2
    meff = ob.effective_mass(c)
    assert math.isnan(meff[0])
    np.testing.assert_allclose(meff[1:], m_e, rtol=0, atol=1e-10)
    fit = ob.fit_cosh(c, tmin=0, tmax=shape[0] - 1)
    assert abs(fit.mass - m_e) < 1e-10
    assert abs(fit.amplitude - c[0]) < 1e-10 and fit.chi2 < 1e-20
    # xi_2^2 = 1/m^2 exactly with p_hat^2 = 4 sin^2(p/2): along axis 0, and over all equal axes
    assert abs(ob.xi2_from_G(g, axes=[0]) - 1 / math.sqrt(m2)) < 1e-12
    assert abs(ob.xi2_from_G(g, axes=[0], squared=True) - 1 / m2) < 1e-12
    if len(set(shape)) == 1:
        assert abs(ob.xi2_from_G(g) - 1 / math.sqrt(m2)) < 1e-12
    # chi_2 = V <m^2> = G~(0) = 1/(2 m^2)
    chi2 = ob.chi2_from_means(ft.m2_expectation() / ft.volume**2, ft.volume)
    assert abs(chi2 - ob.momentum_two_point(g)[(0,) * len(shape)]) < 1e-12
    assert abs(chi2 - 1 / (2 * m2)) < 1e-12


def test_pole_mass_default_range_and_errors() -> None:
    c = FreeTheory(0.5, (16,)).propagator()
    m_e = 2 * math.asinh(math.sqrt(0.5) / 2)
    mass, err = ob.pole_mass(c)
    assert abs(mass - m_e) < 1e-10 and err < 1e-10
    fit = ob.fit_cosh(c, np.full(16, 1e-3), tmin=2, tmax=7)
    assert abs(fit.mass - m_e) < 1e-10 and 0 < fit.mass_err < 0.05 and fit.dof == 4


def test_ensemble_functions_exact() -> None:
    sigma2 = 0.3  # Gaussian m: <m^4> = 3 sigma^4 -> U_4 = 0
    assert abs(ob.binder_from_means(sigma2, 3 * sigma2**2)) < 1e-15
    assert abs(ob.binder_from_means(0.25, 0.0625) - 2 / 3) < 1e-15  # m = +-1/2
    vol = 64
    chi = ob.chi_connected_from_means(sigma2, math.sqrt(2 * sigma2 / math.pi), vol)
    assert abs(chi - vol * sigma2 * (1 - 2 / math.pi)) < 1e-12
    assert ob.chi2_from_means(sigma2, vol) == pytest.approx(vol * sigma2, abs=1e-12)


@pytest.mark.parametrize("m2", MASSES2)
def test_scalar_forms_of_xi2_and_meff(m2: float) -> None:
    """xi2_from_momenta / effective_mass_from_slices (what the analysis propagates errors
    through) are exact on the free theory and agree with the array-level functions."""
    shape = (8, 8)
    g = FreeTheory(m2, shape).propagator()
    gt = ob.momentum_two_point(g)
    g1 = np.mean([gt[1, 0], gt[0, 1]])
    assert abs(ob.xi2_from_momenta(gt[0, 0], g1, 8) - 1 / math.sqrt(m2)) < 1e-12
    assert ob.xi2_from_momenta(gt[0, 0], g1, 8, squared=True) == pytest.approx(1 / m2, abs=1e-12)
    assert ob.xi2_from_momenta(gt[0, 0], g1, 8) == ob.xi2_from_G(g)
    assert math.isnan(ob.xi2_from_momenta(1.0, 2.0, 8))  # xi^2 < 0
    assert math.isnan(ob.xi2_from_momenta(1.0, 0.0, 8))
    with pytest.raises(ValueError, match="length >= 2"):
        ob.xi2_from_momenta(1.0, 1.0, 1)
    c = ob.zero_momentum_from_two_point(g)
    m_e = 2 * math.asinh(math.sqrt(m2) / 2)
    for t in range(1, 8):
        v = ob.effective_mass_from_slices(c[t - 1], c[t], c[(t + 1) % 8])
        assert isinstance(v, float) and abs(v - m_e) < 1e-10
    np.testing.assert_array_equal(  # t = 1..6 from arrays equals effective_mass
        ob.effective_mass_from_slices(c[:-2], c[1:-1], c[2:]), ob.effective_mass(c)[1:7]
    )
    assert math.isnan(ob.effective_mass_from_slices(0.1, 1.0, 0.1))  # ratio < 1


def _direct_two_point(phi: np.ndarray) -> np.ndarray:
    shape = phi.shape[1:]
    out = np.zeros_like(phi)
    sites = list(itertools.product(*[range(n) for n in shape]))
    for x in sites:
        for y in sites:
            yx = tuple((a + b) % n for a, b, n in zip(y, x, shape, strict=True))
            out[(slice(None), *x)] += phi[(slice(None), *y)] * phi[(slice(None), *yx)]
    return out / len(sites)


@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 2)])
def test_two_point_fft_equals_direct_sum(shape: tuple[int, ...]) -> None:
    phi = np.random.default_rng(0).normal(size=(2, *shape))
    g = ob.two_point(phi)
    np.testing.assert_allclose(g, _direct_two_point(phi), rtol=0, atol=1e-12)
    axes = tuple(range(1, len(shape) + 1))
    g0 = g[(slice(None), *(0,) * len(shape))]
    np.testing.assert_allclose(g0, (phi**2).mean(axes), atol=1e-12)
    flipped = np.roll(np.flip(g, axes), 1, axes)  # G(-x)
    np.testing.assert_allclose(g, flipped, atol=1e-12)
    m = ob.magnetization(phi)
    np.testing.assert_allclose(g.sum(axes), m**2 / phi[0].size, atol=1e-12)
    c_sum = ob.zero_momentum_correlator(phi).sum(1)
    np.testing.assert_allclose(c_sum, m**2 / phi[0].size, atol=1e-12)
    d = len(shape)
    links = [(slice(None), *(1 % shape[mu] if b == mu else 0 for b in range(d))) for mu in range(d)]
    e_from_g = sum(g[u] for u in links) / d
    np.testing.assert_allclose(ob.ising_energy(phi), e_from_g, atol=1e-12)


def test_zero_momentum_correlator_slice_sums() -> None:
    phi = np.random.default_rng(1).normal(size=(3, 4, 4))
    vol = 16
    for axis in (0, 1):
        slices = phi.sum(axis=2 - axis)  # (N, L_axis)
        direct = np.stack(
            [(slices * np.roll(slices, -t, axis=1)).mean(1) / (vol / 4) for t in range(4)], 1
        )
        c = ob.zero_momentum_correlator(phi, axis=axis, average=False)
        np.testing.assert_allclose(c, direct, atol=1e-12)
    avg = ob.zero_momentum_correlator(phi)
    both = [ob.zero_momentum_correlator(phi, axis=a, average=False) for a in (0, 1)]
    np.testing.assert_allclose(avg, 0.5 * (both[0] + both[1]), atol=1e-12)
    # unequal extents: only the axis itself
    phi2 = np.random.default_rng(2).normal(size=(3, 6, 4))
    assert ob.zero_momentum_correlator(phi2, axis=1).shape == (3, 4)


def test_magnetization_and_energy_symmetries() -> None:
    phi = np.random.default_rng(3).normal(size=(4, 4, 6))
    m = ob.magnetization(phi)
    np.testing.assert_allclose(ob.magnetization(-phi), -m, atol=1e-12)
    np.testing.assert_allclose(ob.magnetization(np.roll(phi, (1, 2), (1, 2))), m, atol=1e-12)
    np.testing.assert_allclose(ob.magnetization(np.flip(phi, 2)), m, atol=1e-12)
    np.testing.assert_allclose(ob.magnetization_density(phi), m / 24, atol=1e-12)
    e = ob.ising_energy(phi)
    np.testing.assert_allclose(ob.ising_energy(-phi), e, atol=1e-12)
    np.testing.assert_allclose(ob.ising_energy(np.roll(np.flip(phi, 1), 3, 2)), e, atol=1e-12)
    g = ob.two_point(phi)
    np.testing.assert_allclose(e, 0.5 * (g[:, 1, 0] + g[:, 0, 1]), atol=1e-12)
    np.testing.assert_allclose(ob.two_point(np.roll(phi, 1, 1)), g, atol=1e-12)


def test_numpy_and_torch_inputs_agree() -> None:
    shape = (4, 4)
    action = Phi4Action(-1.0, 0.7, shape)
    phi_t = torch.randn(5, *shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    phi_n = phi_t.numpy()
    a, b = ob.measure(phi_t, action), ob.measure(phi_n, action)
    keys = {"m", "abs_m", "m2", "m4", "energy", "phi4", "G_x", "C_t", "action_density", "sd"}
    assert set(a) == set(b) == keys
    for key in a:
        assert a[key].dtype == np.float64
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-12)
    np.testing.assert_allclose(a["action_density"], action(phi_t).numpy() / 16, atol=1e-12)
    f32 = ob.two_point(phi_t.float())
    assert f32.dtype == np.float64
    np.testing.assert_allclose(f32, a["G_x"], atol=1e-5)


def test_sd_autograd_path_equals_grad() -> None:
    shape = (4, 4)
    action = Phi4Action(-2.0, 1.3, shape)

    class PlainAction:  # no .grad: exercises the autograd fallback
        lattice_shape = shape

        def __call__(self, phi: torch.Tensor) -> torch.Tensor:
            return action(phi)

    phi = torch.randn(3, *shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    np.testing.assert_allclose(
        ob.sd_observable(phi, PlainAction()), ob.sd_observable(phi, action), atol=1e-12
    )


def test_measure_chunking_is_invisible() -> None:
    phi = _samples(1.0, (4, 4), seed=6, n=10)
    action = Phi4Action(1.0, 0.0, (4, 4))
    whole, chunked = ob.measure(phi, action, chunk_size=100), ob.measure(phi, action, chunk_size=3)
    for key in whole:
        np.testing.assert_array_equal(whole[key].shape, chunked[key].shape)
        np.testing.assert_allclose(whole[key], chunked[key], atol=1e-13)
    assert "sd" not in ob.measure(phi, None) and "action_density" not in ob.measure(phi)


def test_bad_inputs_raise_value_error_naming_argument() -> None:
    with pytest.raises(ValueError, match="Expected phi"):
        ob.two_point(np.zeros(8))
    with pytest.raises(ValueError, match="Expected phi"):
        ob.magnetization(torch.zeros(()))
    with pytest.raises(ValueError, match="Expected phi"):
        ob.sd_observable(torch.zeros(2, 4, 5), Phi4Action(1.0, 0.0, (4, 4)))
    with pytest.raises(ValueError, match="Expected phi"):
        ob.measure(np.zeros((2, 4, 5)), Phi4Action(1.0, 0.0, (4, 4)))
    with pytest.raises(ValueError, match="Expected C_mean"):
        ob.effective_mass(np.ones((4, 4)))
    with pytest.raises(ValueError, match="Expected C_err"):
        ob.fit_cosh(np.ones(8), np.ones(7))
    with pytest.raises(ValueError, match="tmin"):
        ob.pole_mass(np.ones(8), tmin=5, tmax=3)
    with pytest.raises(ValueError, match="extent"):
        ob.xi2_from_G(np.ones((8, 4)))
    with pytest.raises(ValueError, match="axis"):
        ob.zero_momentum_correlator(np.ones((2, 4, 4)), axis=2)
    with pytest.raises(ValueError, match="chunk_size"):
        ob.measure(np.ones((2, 4)), chunk_size=0)
