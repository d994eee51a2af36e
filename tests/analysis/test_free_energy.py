"""Free-energy density f = -log Z / V (flowmc.analysis.free_energy, and through flowmc scan): the
phi4 primary, the integration rules and their error estimates, the propagated statistical error, and
end-to-end scans on a 2x2 lattice against log Z(lambda) computed exactly by quadrature, with the
free theory (m2 > 0) as the anchor — by HMC and thermodynamic integration, and by a flow
conditioned on lambda (flow log Z and the integration). Negative controls: a wrong sign of the
integrand, a fully correlated error formula, the flow's f compared at the neighbouring coupling.

Tolerances: z-scores against the exact values with the Bonferroni bound
Phi^-1(1 - 0.01 / (2 m)) for m simultaneous checks.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

from flowmc.analysis.ensemble import analyze
from flowmc.analysis.free_energy import (
    Anchor,
    compare_free_energies,
    free_theory_anchor,
    integration_weights,
    thermodynamic_integration,
)
from flowmc.io.ensemble import EnsembleWriter
from flowmc.lattice.action import FreeTheory, Phi4Action
from flowmc.lattice.observables import phi4_density
from flowmc.sampling.run import HMCSettings, RunConfig
from flowmc.scan import ScanConfig, ScanOptions, parse_lams, run_scan

M2 = 1.0
LAMS = parse_lams("0:1:5")  # 0, 0.25, ..., 1


def z_crit(m: int) -> float:
    return float(norm.ppf(1 - 0.01 / (2 * m)))


def exact_2x2(m2: float, lam: float, R: float = 5.0, N: int = 801) -> tuple[float, float]:
    """(log Z, <phi^4> per site) of the 2x2 periodic lattice by quadrature.

    S = (4 + m2) sum phi^2 + lam sum phi^4 - 4 (ab + cd + ac + bd) for sites a=(0,0), b=(1,0),
    c=(0,1), d=(1,1): given (a, d), the b and c integrals factorise into I(a + d)^2 with
    I(s) = int dx exp(-(4 + m2) x^2 - lam x^4 + 4 x s). Trapezoid on a uniform grid (spectrally
    accurate for this smooth, Gaussian-decaying integrand), in log space.
    """
    x = np.linspace(-R, R, N)
    h = x[1] - x[0]
    a = -(4 + m2) * x**2 - lam * x**4
    s = np.linspace(-2 * R, 2 * R, 2 * N - 1)
    log_i = np.log(h) + np.logaddexp.reduce(a[:, None] + 4 * x[:, None] * s[None, :], axis=0)
    ij = np.arange(N)[:, None] + np.arange(N)[None, :]
    log_w = 2 * np.log(h) + a[:, None] + a[None, :] + 2 * log_i[ij]
    c = log_w.max()
    w = np.exp(log_w - c)
    z = w.sum()
    return float(np.log(z) + c), float((w * x[:, None] ** 4).sum() / z)


@pytest.fixture(scope="module")
def exact() -> dict[float, tuple[float, float]]:
    """{lam: (f, <phi^4>)} on the scan grid."""
    out = {}
    for lam in LAMS:
        log_z, p4 = exact_2x2(M2, lam)
        out[lam] = (-log_z / 4, p4)
    return out


# ----------------------------------------------------------------------------- the primary
def test_phi4_density_is_the_lambda_derivative_of_the_action() -> None:
    """S is linear in lambda: (S(lam2) - S(lam1)) / (lam2 - lam1) / V = mean phi^4 per site,
    the integrand of thermodynamic integration, exactly."""
    phi = torch.randn(5, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s1 = Phi4Action(-2.0, 0.5, (4, 6))(phi)
    s2 = Phi4Action(-2.0, 3.0, (4, 6))(phi)
    np.testing.assert_allclose(phi4_density(phi), ((s2 - s1) / 2.5 / 24).numpy(), atol=1e-12)


def test_quadrature_reference_and_free_anchor() -> None:
    """The quadrature reproduces the free theory's exact log Z (FFT) and <phi^4> = 3 G(0)^2."""
    log_z, p4 = exact_2x2(M2, 0.0)
    ft = FreeTheory(M2, (2, 2))
    assert log_z == pytest.approx(ft.log_z(), abs=1e-10)
    anchor = free_theory_anchor(M2, (2, 2))
    assert anchor.lam == 0.0 and anchor.error == 0.0
    assert anchor.f == pytest.approx(-log_z / 4, abs=1e-12)
    assert anchor.phi4 == pytest.approx(p4, abs=1e-12)
    with pytest.raises(ValueError, match="m2 > 0"):
        free_theory_anchor(-1.0, (2, 2))


def _write_iid(path: Path, phi: np.ndarray, m2: float) -> Path:
    n, c = phi.shape[:2]
    act = Phi4Action(m2, 0.0, phi.shape[2:])
    s = act(torch.from_numpy(phi.reshape(n * c, *phi.shape[2:]))).numpy().reshape(n, c)
    scalars = {"action": s, "accepted": np.ones((n, c), bool),
               "magnetization": phi.reshape(n, c, -1).sum(-1)}  # fmt: skip
    with EnsembleWriter.create(
        path, lattice_shape=phi.shape[2:], n_chains=c, scalar_names=list(scalars),
        action=act.params(), sampler={"name": "hmc"}, config_dtype="float64",
    ) as w:  # fmt: skip
        w.append(scalars=scalars, configs=phi, state={"phi": phi[-1]}, wall_time=0.0)
    return path


def test_phi4_primary_on_exact_free_samples(tmp_path: Path) -> None:
    """4000 x 2 iid free-theory configurations (4x4): the analysis' phi4 equals 3 G(0)^2 within
    z_crit(1) of its Gamma-method error; negative control: the value for m2 * 1.25 is far off."""
    ft = FreeTheory(M2, (4, 4))
    phi = ft.sample(8000, generator=torch.Generator().manual_seed(1)).numpy()
    res = analyze(_write_iid(tmp_path / "free.h5", phi.reshape(4000, 2, 4, 4), M2))
    e = res["phi4"]
    assert e["reliable"] and 0.5 <= e["tau_int"] < 0.7
    assert abs(e["value"] - 3 * ft.phi2() ** 2) / e["error"] < z_crit(1)
    wrong = 3 * FreeTheory(1.25 * M2, (4, 4)).phi2() ** 2
    assert abs(e["value"] - wrong) / e["error"] > 5


# ----------------------------------------------------------------------------- the rules
def test_integration_rules_are_exact_where_they_should_be() -> None:
    """On a non-uniform grid: the trapezoid integrates linear functions exactly, the quadratic
    rule quadratics; for a quadratic integrand the disc estimate (the difference of the rules) is
    then exactly the trapezoid's error."""
    x = np.array([0.0, 0.1, 0.35, 0.5, 0.9, 1.0])
    lin, quad = 1 - 2 * x, 2 * x**2 + x - 0.3
    np.testing.assert_allclose(integration_weights(x) @ lin, x - x**2, atol=1e-14)
    exact = 2 * x**3 / 3 + x**2 / 2 - 0.3 * x
    np.testing.assert_allclose(integration_weights(x, "quadratic") @ quad, exact, atol=1e-14)
    anchor = Anchor(0.0, 1.0, 0.0, "test")
    trap = thermodynamic_integration(x, quad, np.zeros(6), anchor, rule="trapezoid")
    np.testing.assert_allclose(trap.disc, np.abs(1 + exact - np.array(trap.f)), atol=1e-14)
    q = thermodynamic_integration(x, quad, np.zeros(6), anchor, rule="quadratic")
    np.testing.assert_allclose(q.f, 1 + exact, atol=1e-14)
    with pytest.raises(ValueError, match="rule"):
        integration_weights(x, "simpson")


def test_disc_estimate_on_the_exact_2x2_integrand(exact) -> None:  # noqa: ANN001
    """The exact <phi^4>(lambda) on the scan grid, from the free anchor: the quadratic rule's
    error is within its (conservative) estimate, the trapezoid's estimate is of the right size
    (leading order: within a factor 2 of its actual error)."""
    g = np.array([exact[lam][1] for lam in LAMS])
    f = np.array([exact[lam][0] for lam in LAMS])
    anchor = free_theory_anchor(M2, (2, 2))
    q = thermodynamic_integration(LAMS, g, np.zeros(5), anchor, rule="quadratic")
    t = thermodynamic_integration(LAMS, g, np.zeros(5), anchor, rule="trapezoid")
    err_q, err_t = np.abs(np.array(q.f) - f)[1:], np.abs(np.array(t.f) - f)[1:]
    assert np.all(err_q <= np.array(q.disc)[1:])
    ratio = np.array(t.disc)[1:] / err_t
    assert np.all((ratio > 0.5) & (ratio < 2.0)), ratio


def test_statistical_error_by_replicas() -> None:
    """Independent noisy integrands: the spread of f over 4000 replicas equals the propagated
    error within 3 sd of a standard deviation; negative control: treating the points as fully
    correlated (sigma summed linearly) is outside that band."""
    x = np.array([0.0, 0.2, 0.5, 0.6, 1.0, 1.3])
    g = np.exp(-x)
    sig = np.array([0.01, 0.02, 0.015, 0.01, 0.03, 0.02])
    anchor = Anchor(0.5, 0.3, 0.004, "flow")
    ti = thermodynamic_integration(x, g, sig, anchor)
    rng = np.random.default_rng(5)
    n = 4000
    reps = np.array([
        thermodynamic_integration(x, g + sig * rng.standard_normal(6),
                                  sig, anchor._replace(f=0.3 + 0.004 * rng.standard_normal())).f
        for _ in range(n)
    ])  # fmt: skip
    spread = reps.std(axis=0, ddof=1)
    band = 3 / math.sqrt(2 * (n - 1))
    np.testing.assert_array_less(np.abs(spread / np.array(ti.error) - 1), band)
    w = integration_weights(x, "quadratic")
    correlated = 0.004 + np.abs(w - w[2]) @ sig
    assert np.max(np.abs(spread / correlated - 1)[[0, 4, 5]]) > band


def test_anchor_placement_and_errors() -> None:
    x, g, s = np.array([1.0, 2.0, 3.0]), np.array([0.3, 0.2, 0.1]), np.full(3, 0.01)
    at = thermodynamic_integration(x, g, s, Anchor(2.0, 5.0, 0.1, "flow"))
    assert at.f[1] == 5.0 and at.error[1] == 0.1 and at.disc[1] == 0.0
    above = thermodynamic_integration(x, g, s, Anchor(4.0, 5.0, 0.0, "exact", phi4=0.05))
    assert above.lams == (1.0, 2.0, 3.0) and above.f[2] < 5.0 and "outside the scan" in above.note
    with pytest.raises(ValueError, match="on a scan point or outside"):
        thermodynamic_integration(x, g, s, Anchor(2.5, 5.0, 0.0, "flow"))
    with pytest.raises(ValueError, match="exact integrand"):
        thermodynamic_integration(x, g, s, Anchor(0.0, 5.0, 0.0, "x"))
    rows = compare_free_energies(at, {1.0: (at.f[0] + 0.1, 0.1), 2.0: (5.0, 0.1)})
    sigma = math.sqrt(at.error[0] ** 2 + 0.01 + at.disc[0] ** 2)
    assert rows[0]["z"] == pytest.approx(-0.1 / sigma)
    assert rows[1]["z"] is None and rows[2]["f_flow"] is None  # the anchor itself; no flow


# ----------------------------------------------------------------------------- scans on 2x2
def _ti_z(summary: dict, exact: dict, sign: float = 1.0) -> list[float]:
    """z of the integration against the exact f at the non-anchor points; ``sign=-1`` redoes the
    integration with the integrand's sign flipped (the negative control)."""
    pts = sorted(summary["points"], key=lambda p: p["lam"])
    if sign != 1.0:
        ti = thermodynamic_integration(
            [p["lam"] for p in pts], [sign * p["observables"]["phi4"]["value"] for p in pts],
            [p["observables"]["phi4"]["error"] for p in pts], free_theory_anchor(M2, (2, 2)),
        )  # fmt: skip
        vals = list(zip(ti.lams, ti.f, ti.error, ti.disc))
    else:
        vals = [(p["lam"], p["free_energy"]["ti"]["f"], p["free_energy"]["ti"]["error"],
                 p["free_energy"]["ti"]["disc"]) for p in pts]  # fmt: skip
    return [(f - exact[lam][0]) / math.hypot(e, d) for lam, f, e, d in vals if lam > 0]


def test_hmc_scan_thermodynamic_integration_on_2x2(tmp_path: Path, exact) -> None:  # noqa: ANN001
    """An HMC scan (64 chains x 200 trajectories per point) integrated from the exact free
    theory at lambda = 0 agrees with the exact f at the 4 other points within z_crit(4) of
    sqrt(statistical^2 + discretisation^2); with the integrand's sign flipped it does not."""
    cfg = ScanConfig(sizes=(2,), lams=LAMS, m2=M2,
                     run=RunConfig(n=200, chains=64, hmc=HMCSettings(warmup=50)))  # fmt: skip
    summary = run_scan(tmp_path / "hmc", cfg, ScanOptions(logz_n=0), progress=False, plots=False)
    fe = summary["free_energy"]["2"]
    assert fe["anchor"]["source"] == "free theory (exact)" and fe["rule"] == "quadratic"
    z = _ti_z(summary, exact)
    assert max(abs(v) for v in z) < z_crit(4), z
    assert min(abs(v) for v in _ti_z(summary, exact, sign=-1.0)) > z_crit(4)


@pytest.fixture(scope="module")
def flow_2x2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flow for the 2x2 lattice conditioned on lambda over [0, 1] (200 steps, ~2 s): good enough
    (ESS ~0.5) that the importance-sampling error of log Z is Gaussian-like."""
    from flowmc.training.workflow import train_flow

    out = tmp_path_factory.mktemp("flow2") / "c2.pt"
    train_flow(
        Phi4Action(M2, 0.5, (2, 2)), recipe="default",
        flow_overrides={"condition": {"lam": [0.0, 1.0]}, "n_layers": 2, "hidden": (8,)},
        train_overrides={"n_steps": 200, "batch_size": 128}, out=out, progress=False,
        checkpoint_every=0,
    )  # fmt: skip
    return out


def test_flow_scan_free_energy_on_2x2(tmp_path: Path, exact, flow_2x2: Path) -> None:  # noqa: ANN001
    """Flow MH at 5 couplings with one conditional flow: the flow's f = -log Z/V (16384 fresh
    draws per point: enough for the importance-sampling error to be Gaussian-like even where the
    weights have a tail) matches the exact f at every point (z_crit(5)), and so does the integration
    from the free theory (z_crit(4)); the summary's TI-vs-flow z-scores are within z_crit(4).
    Negative control: the flow's f against the exact f of the neighbouring coupling is off."""
    cfg = ScanConfig(sizes=(2,), lams=LAMS, models={2: flow_2x2},
                     run=RunConfig(n=1024, chains=4, batch=256))  # fmt: skip
    summary = run_scan(tmp_path / "flow", cfg, ScanOptions(logz_n=16384), progress=False,
                       plots=False)  # fmt: skip
    pts = sorted(summary["points"], key=lambda p: p["lam"])
    assert {p["sampler"] for p in pts} == {"flow-imh"} and summary["complete"]
    z_flow = [(p["free_energy"]["flow"]["f"] - exact[p["lam"]][0]) / p["free_energy"]["flow"]
              ["error"] for p in pts]  # fmt: skip
    assert max(abs(v) for v in z_flow) < z_crit(5), z_flow
    assert max(abs(v) for v in _ti_z(summary, exact)) < z_crit(4)
    z_cmp = [p["free_energy"]["z_ti_vs_flow"] for p in pts if p["lam"] > 0]
    assert max(abs(v) for v in z_cmp) < z_crit(4), z_cmp
    shifted = [(p["free_energy"]["flow"]["f"] - exact[q["lam"]][0]) / p["free_energy"]["flow"]
               ["error"] for p, q in zip(pts, pts[1:])]  # fmt: skip
    assert min(abs(v) for v in shifted) > z_crit(4), shifted
