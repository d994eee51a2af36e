"""flowmc.analysis / ``flowmc analyze`` / flowmc.io.interop on synthetic ensembles with known truth.

The reference ensemble holds **exact independent** samples of the free theory
(``FreeTheory(m2, L).sample``) written as ``C`` chains, so every expectation value is known in
closed form and the data are iid (tau_int = 1/2 exactly). Each statistical check is a z-score
against the analysis' own error bar, with a Bonferroni threshold over the simultaneous checks
(STYLE.md §6.3). N = C * n = 4000 samples: the relative error of chi2 is sqrt(2/N) ~ 2%, the
bias of the derived (nonlinear) estimators is O(1/N) ~ 0.03% and negligible against it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

from flowmc.analysis.autocorr import AutocorrError, arviz_ess
from flowmc.analysis.ensemble import ENTRY_KEYS, NO_CONFIG_KEYS, SCALAR_KEYS, analyze
from flowmc.cli import main
from flowmc.io.ensemble import EnsembleWriter
from flowmc.io.interop import to_inference_data
from flowmc.lattice.action import FreeTheory, Phi4Action
from flowmc.lattice.observables import zero_momentum_from_two_point

M2 = 0.5
L = (8, 8)
V = 64
C = 2
N = 2000  # per chain
IMH_SCALARS = ["action", "log_q", "log_weight", "accepted", "magnetization"]

#: Top-level JSON keys of a full analysis of a flow ensemble with configurations (docs/analysis.md).
FULL_KEYS = {
    "path", "n", "n_total", "discard", "chains", "lattice_shape", "volume", "sampler", "action",
    "has_configs", "S", *SCALAR_KEYS, "G_x", "C_t", "m_eff", "pole_mass", "acceptance",
    "acceptance_per_chain", "longest_rejection_run", "longest_rejection_run_per_chain",
    "frac_m_positive", "m_over_error", "mode_crossings", "z2_symmetric_action", "warnings",
    "notes", "acceptance_by_kernel",
}  # fmt: skip


def _write(
    path: Path,
    phi: np.ndarray,
    *,
    action: dict,
    store_configs: bool = True,
    extra: dict[str, np.ndarray] | None = None,
    sampler: str = "flow-imh",
) -> Path:
    """Write fields ``(n, C, *L)`` as an ensemble; scalars as a perfect flow (q = p) would."""
    n, c = phi.shape[:2]
    act = Phi4Action.from_params({**action, "lattice_shape": list(phi.shape[2:])})
    s = act(torch.from_numpy(phi.reshape(n * c, *phi.shape[2:]))).numpy().reshape(n, c)
    scalars = {
        "action": s,
        "accepted": np.ones((n, c), bool),
        "magnetization": phi.reshape(n, c, -1).sum(-1),
    }
    if sampler == "flow-imh":
        log_z = FreeTheory(M2, phi.shape[2:]).log_z()
        scalars.update(log_q=-s - log_z, log_weight=np.full((n, c), log_z))
    scalars.update(extra or {})
    with EnsembleWriter.create(
        path, lattice_shape=phi.shape[2:], n_chains=c, scalar_names=list(scalars),
        action=action, sampler={"name": sampler}, store_configs=store_configs,
        config_dtype="float64",
    ) as w:  # fmt: skip
        w.append(scalars=scalars, configs=phi if store_configs else None,
                 state={"phi": phi[-1]}, wall_time=0.0)  # fmt: skip
    return path


def _free_fields(n: int, seed: int, shape: tuple[int, ...] = L) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return FreeTheory(M2, shape).sample(n * C, generator=gen).numpy().reshape(n, C, *shape)


FREE_ACTION = {"name": "phi4", "m2": M2, "lam": 0.0}


@pytest.fixture(scope="module")
def free_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("free") / "free.h5"
    return _write(path, _free_fields(N, 1), action=FREE_ACTION)


@pytest.fixture(scope="module")
def free_res(free_path: Path) -> dict:
    return analyze(free_path, chunk=300)  # several chunks: exercises the streaming


def _exact() -> dict[str, float]:
    ft = FreeTheory(M2, L)
    var_m = 1.0 / (2 * M2 * V)  # <m^2> = <M^2>/V^2
    prop = ft.propagator()
    return {
        "m": 0.0,
        "abs_m": math.sqrt(2 * var_m / math.pi),
        "m2": var_m,
        "chi2": 1.0 / (2 * M2),
        "chi_conn": (1 - 2 / math.pi) / (2 * M2),
        "binder": 0.0,
        "energy": float(prop[1, 0]),
        "xi2": 1.0 / math.sqrt(M2),  # second-moment xi is exactly 1/m for the free theory
        "action_density": 0.5,
        "sd_check": 1.0,
    }


def test_free_theory_values_within_z(free_res: dict) -> None:
    """Every scalar, G(x) at 2 separations, C(t) at 2 slices, m_eff(1), the pole mass."""
    exact = _exact()
    prop = FreeTheory(M2, L).propagator()
    c_exact = zero_momentum_from_two_point(prop)
    m_e = 2 * math.asinh(math.sqrt(M2) / 2)
    checks = {k: (free_res[k]["value"], free_res[k]["error"], v) for k, v in exact.items()}
    g = free_res["G_x"]
    for x in ((0, 0), (2, 1)):
        checks[f"G{x}"] = (g["value"][x[0]][x[1]], g["error"][x[0]][x[1]], prop[x])
    for t in (1, 3):
        checks[f"C({t})"] = (free_res["C_t"]["value"][t], free_res["C_t"]["error"][t], c_exact[t])
    checks["m_eff(1)"] = (free_res["m_eff"]["value"][1], free_res["m_eff"]["error"][1], m_e)
    pm = free_res["pole_mass"]
    checks["pole_mass"] = (pm["value"], pm["error"], m_e)
    zmax = norm.ppf(1 - 0.01 / (2 * len(checks)))
    z = {k: abs(v - t) / e for k, (v, e, t) in checks.items()}
    assert all(e > 0 for _, e, _ in checks.values())
    assert max(z.values()) < zmax, z


def test_negative_control_wrong_mass(tmp_path: Path) -> None:
    """Samples at m2 25% off fail the chi2 z-test: the check can fail."""
    gen = torch.Generator().manual_seed(7)
    phi = FreeTheory(1.25 * M2, L).sample(N * C, generator=gen).numpy().reshape(N, C, *L)
    res = analyze(_write(tmp_path / "wrong.h5", phi, action=FREE_ACTION, store_configs=False))
    chi2 = res["chi2"]
    assert abs(chi2["value"] - 1 / (2 * M2)) / chi2["error"] > 5


def test_iid_tau_int_and_entries(free_res: dict) -> None:
    """iid data: tau_int = 1/2 within its error, ESS ~ N, all entries reliable, no warnings."""
    for key in SCALAR_KEYS:
        e = free_res[key]
        assert tuple(e) == ENTRY_KEYS
        assert e["reliable"] is True
        # tau_int >= 1/2 by construction; the upper side within 4 of its own errors
        assert 0.5 <= e["tau_int"] < 0.5 + 4 * max(e["tau_int_error"], 1 / math.sqrt(N * C))
        assert e["ess"] == pytest.approx(N * C / (2 * e["tau_int"]))
    assert free_res["warnings"] == []
    assert free_res["notes"] == []
    assert free_res["acceptance"] == 1.0
    assert free_res["longest_rejection_run"] == 0
    assert free_res["n"] == N and free_res["chains"] == C


def test_json_keys_stable(free_path: Path, free_res: dict, tmp_path: Path) -> None:
    from flowmc.report import write_json

    write_json(tmp_path / "r.json", free_res, "analysis")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data.pop("flowmc_report") == "analysis"  # the report marker (flowmc.io.safeio)
    assert set(data) == FULL_KEYS
    assert data == json.loads(json.dumps(free_res.to_dict()).replace("NaN", "null"))
    assert data["acceptance_by_kernel"] == {"flow": 1.0}
    assert np.shape(data["G_x"]["value"]) == L and np.shape(data["G_x"]["error"]) == L
    assert len(data["C_t"]["value"]) == L[0] and len(data["m_eff"]["error"]) == L[0]
    assert data["m_eff"]["value"][0] is None  # undefined at t = 0, null in JSON (not NaN)
    assert set(data["frac_m_positive"]) == set(ENTRY_KEYS)
    assert len(data["mode_crossings"]) == C


def test_cli_writes_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _write(tmp_path / "small.h5", _free_fields(300, 8), action=FREE_ACTION)
    out_json, plots = tmp_path / "a.json", tmp_path / "plots"
    rc = main(["analyze", str(path), "--json", str(out_json), "--plots", str(plots),
               "--discard", "10"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "chi2 = V<m^2>" in text and "tau_int" in text and "acceptance" in text
    assert json.loads(out_json.read_text())["n"] == 300 - 10
    names = {p.name for p in plots.glob("*.png")}
    assert names == {"history.png", "hist_m.png", "correlators.png", "autocorr.png",
                     "action_vs_effective.png"}  # fmt: skip
    assert all((plots / p).stat().st_size > 1000 for p in names)


def test_no_configs(tmp_path: Path, free_res: dict) -> None:
    phi = _free_fields(N, 1)  # the same fields as free_path
    res = analyze(_write(tmp_path / "nc.h5", phi, action=FREE_ACTION, store_configs=False))
    for key in NO_CONFIG_KEYS:  # the scalars give the same numbers as the configurations
        assert res[key]["value"] == pytest.approx(free_res[key]["value"], rel=1e-9, abs=1e-12)
    for key in ("energy", "xi2", "sd_check", "G_x", "C_t", "m_eff", "pole_mass"):
        assert key not in res
    assert any("no configurations" in note for note in res["notes"])
    assert res["has_configs"] is False


def test_sign_balance_warning_broken_phase(tmp_path: Path) -> None:
    """One-signed ensemble of a Z2-symmetric action: sign-balance and no-crossing warnings."""
    phi = _free_fields(500, 3) + 1.0  # m = 1 +- 0.125: every configuration has m > 0
    res = analyze(_write(tmp_path / "b.h5", phi, action={"m2": -4.0, "lam": 8.0}))
    assert res["frac_m_positive"]["value"] == 1.0
    assert res["mode_crossings"] == [0] * C
    assert res["m_over_error"] > 4
    text = "\n".join(res["warnings"])
    assert "Z2 sign balance is off" in text
    assert "never crossed" in text


def test_stuck_chains_warn_even_if_balanced(tmp_path: Path) -> None:
    """Chain 0 at +m0 and chain 1 at -m0: <m> ~ 0 but neither chain crossed."""
    phi = _free_fields(500, 4)
    phi[:, 0] += 1.0
    phi[:, 1] -= 1.0
    res = analyze(_write(tmp_path / "s.h5", phi, action={"m2": -4.0, "lam": 8.0}))
    assert abs(res["frac_m_positive"]["value"] - 0.5) < 1e-12
    assert any("never crossed" in w for w in res["warnings"])


def test_balanced_no_sign_warning(free_res: dict) -> None:
    assert abs(free_res["m_over_error"]) < 4
    frac = free_res["frac_m_positive"]
    assert abs(frac["value"] - 0.5) < 4 * frac["error"]
    assert min(free_res["mode_crossings"]) > 100
    assert not any("Z2" in w or "crossed" in w for w in free_res["warnings"])


def _ar1_fields(n: int, a: float, seed: int) -> np.ndarray:
    """phi_t = a phi_{t-1} + sqrt(1-a^2) xi_t: stationary free theory, tau_int = (1+a)/(2(1-a))."""
    xi = _free_fields(n, seed)
    phi = np.empty_like(xi)
    phi[0] = xi[0]
    for t in range(1, n):
        phi[t] = a * phi[t - 1] + math.sqrt(1 - a * a) * xi[t]
    return phi


def test_short_series_warns_not_nan(tmp_path: Path) -> None:
    path = _write(tmp_path / "ar.h5", _ar1_fields(200, 0.99, 5), action=FREE_ACTION)
    res = analyze(path)  # tau_int ~ 100, N = 400 < 50 tau_int
    assert "too short" in res["warnings"][0]
    assert res["m2"]["reliable"] is False
    for key in SCALAR_KEYS:
        assert math.isfinite(res[key]["value"]) and math.isfinite(res[key]["error"])
    with pytest.raises(AutocorrError):
        analyze(path, quiet_autocorr=False)


def test_discard_and_bad_arguments(free_path: Path) -> None:
    res = analyze(free_path, discard=N - 50)
    assert res["n"] == 50 and res["n_total"] == N
    with pytest.raises(ValueError, match="at least 5 configurations"):
        analyze(free_path, discard=N - 3)
    with pytest.raises(ValueError, match="discard"):
        analyze(free_path, discard=-1)


def test_hmc_scalars(tmp_path: Path) -> None:
    """exp(-dH) with dH ~ N(s^2/2, s^2) has mean exactly 1; a known rejection run."""
    rng = np.random.default_rng(0)
    n, s = 600, 0.3
    acc = np.ones((n, C), bool)
    acc[100:117, 0] = False  # run of 17
    acc[300:305, 1] = False  # run of 5
    extra = {"delta_h": rng.normal(s * s / 2, s, (n, C)), "accepted": acc}
    path = _write(tmp_path / "h.h5", _free_fields(n, 6), action=FREE_ACTION, extra=extra,
                  sampler="hmc")  # fmt: skip
    res = analyze(path)
    e = res["exp_minus_delta_h"]
    assert abs(e["value"] - 1) / e["error"] < 3.5
    assert res["longest_rejection_run"] == 17
    assert res["longest_rejection_run_per_chain"] == [17, 5]
    assert res["acceptance"] == pytest.approx(1 - 22 / (n * C))
    assert res["sampler"]["name"] == "hmc"


def test_to_inference_data(free_path: Path, free_res: dict) -> None:
    idata = to_inference_data(free_path, discard=100)
    post = idata.posterior
    for key in ("m", "abs_m", "m2", "action_density", "energy"):
        assert post[key].shape == (C, N - 100)
    assert idata.sample_stats["accepted"].shape == (C, N - 100)
    assert json.loads(post.attrs["lattice_shape"]) == list(L)
    # same numbers as the analysis (without discard)
    full = to_inference_data(free_path)
    assert float(full.posterior["m2"].mean()) == pytest.approx(free_res["m2"]["value"], rel=1e-12)


def test_arviz_ess_agrees_on_iid(free_path: Path, free_res: dict) -> None:
    """Both estimate N/(2 tau_int) = N for iid data.

    The relative error of our ESS is that of tau_int, 2 sqrt((W + 1/2 - tau)/N) ~ 0.03 for
    W <= 2 and N = 4000 (Madras-Sokal); arviz' Geyer estimator has a comparable spread, so the
    ratio has sd ~ 0.05 and a 4-sigma band is 0.2. (arviz may exceed N on anticorrelated noise,
    ours is capped at N.)
    """
    idata = to_inference_data(free_path, energy=False)
    for key in ("m", "m2", "action_density"):
        ours = free_res[key]["ess"]
        theirs = arviz_ess(idata.posterior[key].values, method="mean")
        assert abs(ours / theirs - 1) < 0.2, (key, ours, theirs)


# ----------------------------------------------------------------------------- typed result, stages
def test_typed_result_and_stages(free_path: Path, free_res) -> None:
    """analyze returns an AnalysisResult whose typed fields equal its JSON form, and the three
    stages run separately give the same numbers; no private keys."""
    from flowmc.analysis.ensemble import (
        AnalysisResult,
        Correlator,
        Estimate,
        diagnose,
        estimate,
        measure_ensemble,
    )
    from flowmc.io.ensemble import open_ensemble

    assert isinstance(free_res, AnalysisResult)
    assert list(free_res.observables) == list(SCALAR_KEYS)
    for key, e in free_res.observables.items():
        assert isinstance(e, Estimate) and e._fields == ENTRY_KEYS
        assert free_res[key] == e.to_dict()
    assert isinstance(free_res.G_x, Correlator) and free_res.G_x.value.shape == L
    assert free_res.diagnostics.frac_m_positive.to_dict() == free_res["frac_m_positive"]
    assert free_res.gamma["m2"].rho.ndim == 1 and free_res.series["m"].shape == (N, C)
    assert free_res.scalars["accepted"].shape == (N, C)
    assert not any(k.startswith("_") for k in free_res.to_dict())
    with open_ensemble(free_path) as ens:
        meas = measure_ensemble(ens, chunk=300)
    est = estimate(meas)
    diag = diagnose(meas, est)
    assert est.observables == free_res.observables
    assert diag.acceptance == free_res["acceptance"]
    assert diag.frac_m_positive == free_res.diagnostics.frac_m_positive


def test_derived_quantities_are_the_observables_functions(free_res) -> None:
    """chi2, chi_conn, binder, xi2 and m_eff are the tested functions of flowmc.lattice.observables
    at the means (value = f(means); only the error comes from the Gamma method)."""
    from flowmc.lattice import observables as ob

    s = free_res.series
    m2, abs_m, m4 = (float(s[k].mean()) for k in ("m2", "abs_m", "m4"))
    assert free_res["chi2"]["value"] == pytest.approx(ob.chi2_from_means(m2, V), rel=1e-12)
    assert free_res["chi_conn"]["value"] == pytest.approx(
        ob.chi_connected_from_means(m2, abs_m, V), rel=1e-12)
    assert free_res["binder"]["value"] == pytest.approx(ob.binder_from_means(m2, m4), rel=1e-12)
    # the mean of the per-configuration G~(p) is G~(p) of the mean G: xi2_from_G(<G>)
    assert free_res["xi2"]["value"] == pytest.approx(ob.xi2_from_G(free_res.G_x.value), rel=1e-9)
    c = free_res.C_t.value
    assert free_res["m_eff"]["value"][2] == pytest.approx(float(ob.effective_mass(c)[2]), rel=1e-9)


@pytest.mark.parametrize("shape", [(1, 1), (1,), (2, 2), (4, 1), (3,)])
@pytest.mark.parametrize("store_configs", [True, False])
def test_tiny_lattices_skip_with_notes(tmp_path: Path, shape: tuple[int, ...],
                                       store_configs: bool) -> None:
    """Issue 14 item 6: `flowmc hmc --L 1` then `flowmc analyze` died with an IndexError.
    Observables that need a larger L are skipped with a note; the rest is computed."""
    phi = _free_fields(200, 2, shape)
    path = _write(tmp_path / "tiny.h5", phi, action=FREE_ACTION, store_configs=store_configs,
                  sampler="hmc")  # fmt: skip
    res = analyze(path)
    assert {"m", "abs_m", "m2", "chi2", "action_density"} <= set(res.observables)
    notes = "\n".join(res["notes"])
    if not store_configs:
        assert "no configurations" in notes
        return
    assert {"energy", "sd_check", "G_x", "C_t"} <= set(res.keys())
    assert ("xi2" in res) == (shape[0] >= 2)
    assert ("m_eff" in res) == (shape[0] >= 3)
    assert "pole_mass" not in res and "pole_mass needs L >= 6" in notes
    if shape[0] < 2:
        assert "xi2 needs L >= 2" in notes
    if shape[0] < 3:
        assert "m_eff needs L >= 3" in notes
    assert np.shape(res["G_x"]["value"]) == shape
    json.dumps(res.to_dict())  # JSON-serialisable
    assert main(["analyze", str(path)]) == 0
