"""HMC ensembles on disk: CLI, bit-identical resume, exactness, agreement with flow MH."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm
from scipy.stats import t as student_t

from flowmc.cli import main
from flowmc.io.ensemble import EnsembleWriter, open_ensemble
from flowmc.lattice.action import Phi4Action
from flowmc.lattice.observables import ising_energy
from flowmc.sampling.run import SCALARS, HMCSettings, RunConfig, run_ensemble
from tests.helpers import ensemble_dump as _dump

ALPHA = 0.01
HMC_SCALARS = SCALARS["hmc"]


def _cfg(n: int, *, chains: int = 1, thin: int = 1, start: str = "cold", chunk: int | None = None,
         seed: int = 0, **hmc_settings: object) -> RunConfig:
    """An HMC run configuration (``hmc_settings`` go into :class:`HMCSettings`)."""
    return RunConfig(n=n, chains=chains, thin=thin, start=start, chunk=chunk, seed=seed,
                     hmc=HMCSettings(**hmc_settings))


def run_hmc(action: Phi4Action, out: Path, cfg: RunConfig, **kw: object) -> dict:
    return run_ensemble(out, cfg, action=action, **kw)


def _z_crit(m: int, dof: int | None = None) -> float:
    """Two-sided Bonferroni critical value for ``m`` simultaneous tests at level ALPHA.

    With ``dof`` the error is itself estimated (from ``dof + 1`` chain means): Student t.
    """
    q = 1 - ALPHA / (2 * m)
    return float(norm.ppf(q) if dof is None else student_t.ppf(q, dof))


def _chain_mean_z(x: np.ndarray, truth: float) -> tuple[float, float, float]:
    """z-score of the mean of ``x`` (n, C) with the error from the spread of the C chain means."""
    cm = x.mean(axis=0)
    err = cm.std(ddof=1) / math.sqrt(cm.size)
    return (cm.mean() - truth) / err, cm.mean(), err


# ------------------------------------------------------------------------------------- CLI


def test_hmc_cli_writes_valid_ensemble(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "hmc.h5"
    argv = ["hmc", "--L", "4", "--m2", "-4", "--lam", "8", "--n", "30", "--chains", "3",
            "--warmup", "20", "--out", str(out), "--quiet", "--json", str(tmp_path / "s.json")]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "acceptance" in text and "step size" in text and str(out) in text
    with open_ensemble(out) as ens:
        assert ens.n == 30 and ens.n_chains == 3 and ens.lattice_shape == (4, 4)
        assert ens.scalar_names == HMC_SCALARS and ens.model_sha256 == ""
        s = ens.sampler
        assert s["name"] == "hmc" and s["integrator"] == "omelyan" and s["warmup"] == 20
        assert s["step_size"] > 0 and s["num_steps"] == math.ceil(1.0 / s["step_size"])
        assert s["traj_length"] == 1.0 and s["target_accept"] == 0.8 and s["flip"] is False
        assert ens.action == Phi4Action(-4.0, 8.0, (4, 4)).params()
        assert ens.configs.shape == (30, 3, 4, 4)
        np.testing.assert_allclose(
            ens.scalar("magnetization"), np.asarray(ens.configs).sum((2, 3)), rtol=1e-5
        )
        # the stored action is the action of the stored configuration (float32 storage)
        cfg = torch.as_tensor(np.asarray(ens.configs[:5]), dtype=torch.float64).flatten(0, 1)
        s_re = Phi4Action(-4.0, 8.0, (4, 4))(cfg).numpy().reshape(5, 3)
        np.testing.assert_allclose(ens.scalar("action")[:5], s_re, rtol=1e-4, atol=1e-4)
        assert ens.scalar("accepted").dtype == np.bool_
        assert ens.chunk_ends[-1] == 30 and np.all(ens.chunk_wall_times > 0)
        assert ens.meta["warmup"]["trajectories"] == 20
        assert ens.meta["resolved_config"]["n"] == 30
    # refuses to overwrite, and --resume checks the settings
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err
    assert main([*argv[:-2], "--resume", "--flip"]) == 2
    assert "flip" in capsys.readouterr().err
    with pytest.raises(ValueError, match="warmup >= 1"):
        HMCSettings(warmup=0)
    with pytest.raises(ValueError, match="integrator"):
        HMCSettings(integrator="euler")


def test_no_configs_and_fixed_step_size(tmp_path: Path) -> None:
    action = Phi4Action(-4.0, 8.0, (4, 4))
    cfg = _cfg(12, chains=2, warmup=3, step_size=0.1, thin=2, chunk=5,
               integrator="leapfrog", flip=True, start="cold")
    s = run_hmc(action, tmp_path / "a.h5", cfg, store_configs=False, progress=False)
    assert s["step_size"] == 0.1 and s["num_steps"] == 10 and s["trajectories"] == 24
    with open_ensemble(tmp_path / "a.h5") as ens:
        assert not ens.has_configs and ens.n == 12
        assert ens.sampler["fixed_step_size"] == 0.1 and ens.sampler["thin"] == 2
        assert list(ens.chunk_ends) == [5, 10, 12]


# ---------------------------------------------------------------------------------- resume


def test_resume_is_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted (by an exception mid-run) and resumed == uninterrupted, byte for byte."""
    action = Phi4Action(-4.0, 8.0, (4, 4))
    cfg = _cfg(25, chains=3, warmup=15, chunk=4, thin=2, flip=True, seed=11)
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    run_hmc(action, full, cfg, progress=False, config_dtype="float64")

    calls = {"n": 0}
    real_append = EnsembleWriter.append

    def crashing_append(self: EnsembleWriter, **kw: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # "killed" between commits
        real_append(self, **kw)

    monkeypatch.setattr(EnsembleWriter, "append", crashing_append)
    with pytest.raises(KeyboardInterrupt):
        run_hmc(action, part, cfg, progress=False, config_dtype="float64")
    monkeypatch.setattr(EnsembleWriter, "append", real_append)
    with open_ensemble(part) as ens:
        assert ens.n == 8
    # resume in two steps, to an intermediate and then to the final length
    run_hmc(action, part, replace(cfg, n=13), resume=True,
            progress=False, config_dtype="float64")
    s = run_hmc(action, part, cfg, resume=True, progress=False, config_dtype="float64")
    assert s["n"] == 25 and s["trajectories"] == 50
    a, b = _dump(full), _dump(part)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k


def test_resume_right_after_warmup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill after the post-warm-up ``save_state`` but before any row resumes exactly."""
    action = Phi4Action(-4.0, 8.0, (4, 4))
    cfg = _cfg(6, chains=2, warmup=10, chunk=3, seed=3)
    run_hmc(action, tmp_path / "full.h5", cfg, progress=False)

    def boom(self: EnsembleWriter, **kw: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(EnsembleWriter, "append", boom)
    with pytest.raises(KeyboardInterrupt):
        run_hmc(action, tmp_path / "part.h5", cfg, progress=False)
    monkeypatch.undo()
    with open_ensemble(tmp_path / "part.h5") as ens:
        assert ens.n == 0 and ens.has_state
    run_hmc(action, tmp_path / "part.h5", cfg, resume=True, progress=False)
    assert _dump(tmp_path / "full.h5") == _dump(tmp_path / "part.h5")


# ------------------------------------------------------------------------------ exactness


def _free_theory_z(tmp_path: Path, integrator: str, step_size: float) -> dict[str, tuple]:
    action = Phi4Action(0.5, 0.0, (4, 4))
    free = action.free_theory()
    cfg = _cfg(150, chains=32, warmup=30, step_size=step_size,
               integrator=integrator, seed=5, traj_length=1.5)
    run_hmc(action, tmp_path / "free.h5", cfg, progress=False, config_dtype="float64",
            force=True)
    with open_ensemble(tmp_path / "free.h5") as ens:
        M = ens.scalar("magnetization")
        phi2 = (np.asarray(ens.configs) ** 2).mean((2, 3))
        acc = ens.scalar("accepted").mean()
    checks = {
        "M": (M, 0.0),
        "M2/V": (M**2 / 16, free.m2_expectation() / 16),
        "phi2": (phi2, free.phi2()),
    }
    out = {name: (*_chain_mean_z(x, truth), truth) for name, (x, truth) in checks.items()}
    out["acceptance"] = acc
    return out


@pytest.mark.parametrize(("integrator", "step_size"), [("omelyan", 0.6), ("leapfrog", 0.35)])
def test_exact_on_free_theory(tmp_path: Path, integrator: str, step_size: float) -> None:
    """Free theory, 4x4, m2 = 0.5: <M^2>/V = 1/(2 m^2) = 1, <phi_x^2> = G(0), <M> = 0.

    A step size close to the integrator's stability limit (acceptance ~0.6) makes the
    integration error large, so an inexact accept/reject would show (negative control
    below). Errors come from the spread of C = 32 independent chain means (each chain is 150
    trajectories after warm-up, tau_int ~ 1, so the chain means are nearly Gaussian); the
    relative error of <M^2>/V is then ~3%. Bonferroni over m = 3 checks.
    """
    res = _free_theory_z(tmp_path, integrator, step_size)
    assert 0.3 < res.pop("acceptance") < 0.9
    for name, (z, mean, err, truth) in res.items():
        assert abs(z) < _z_crit(3, dof=31), (
            f"{name}: {mean:.4f} ± {err:.4f} vs exact {truth:.4f} (z={z:.2f})"
        )


def test_exact_on_free_theory_negative_control(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same run without the Metropolis test (every trajectory accepted) must fail."""
    from flowmc.mcmc import hmc
    from flowmc.mcmc.rng import draw_normal

    def accept_all_kernel(action: Phi4Action, *, integrator: str, step_size: float,
                          num_steps: int, flip: bool = False, **_: object):  # noqa: ANN202
        integrate = hmc._INTEGRATOR_FNS[integrator]

        def step(state: hmc.HMCState, gen: torch.Generator):  # noqa: ANN202
            pi0 = draw_normal(gen, state.phi.shape, dtype=state.phi.dtype, device="cpu")
            phi1, pi1, g1 = integrate(state.phi, pi0, state.grad, action, step_size, num_steps)
            s1 = action(phi1)
            dh = hmc.kinetic_energy(pi1) + s1 - hmc.kinetic_energy(pi0) - state.action
            yes = torch.ones_like(s1, dtype=torch.bool)
            return hmc.HMCState(phi1, s1, g1), hmc.HMCInfo(yes, yes.double(), dh, ~yes)

        return step

    monkeypatch.setattr(hmc, "build_kernel", accept_all_kernel)
    res = _free_theory_z(tmp_path, "omelyan", 0.6)
    res.pop("acceptance")
    assert max(abs(z) for z, *_ in res.values()) > _z_crit(3, dof=31)


# ------------------------------------------------------------------ HMC vs flow MH (8, -4, 8)


def _shipped_flow() -> Path | None:
    from flowmc.commands._common import DEFAULT_MODELS, data_dir

    try:
        path = data_dir() / DEFAULT_MODELS[(8, -4.0, 8.0)]
    except FileNotFoundError:
        return None
    return path if path.exists() else None


def _quick_flow(tmp_path: Path) -> Path:
    """A small flow for (8, -4, 8), trained briefly (acceptance ~0.05-0.1 as Z2-symmetric MH)."""
    from flowmc.flows.flow import FlowConfig, build_flow
    from flowmc.io.checkpoint import save_checkpoint
    from flowmc.training.train import TrainConfig, Trainer

    action = Phi4Action(-4.0, 8.0, (8, 8))
    torch.manual_seed(0)
    flow = build_flow(FlowConfig((8, 8), n_layers=4, hidden=(8, 8)))
    tc = TrainConfig(n_steps=120, batch_size=64, lr=5e-3)
    tr = Trainer(flow, action, tc, generator=torch.Generator().manual_seed(1))
    tr.run(progress=False)
    path = tmp_path / "flow.pt"
    save_checkpoint(path, flow, action, symmetric=True, train_config=tc.to_dict(),
                    meta={"training_time_s": tr.elapsed})
    return path


def _flow_mh_from(model: object, phi0: torch.Tensor, num_steps: int, seed: int) -> np.ndarray:
    """``num_steps`` flow-MH steps of C chains started at ``phi0`` (C, *L); configs (K, C, *L)."""
    from flowmc.mcmc import imh
    from flowmc.mcmc.rng import ChainRNG

    kernel = imh.flow_imh(model.proposal, model.action, num_steps)
    state = kernel.init(phi0.to(torch.float32))
    _, info = kernel.step(state, ChainRNG(seed, phi0.shape[0]))
    return info.phi.double().numpy()


def test_hmc_and_flow_mh_agree_at_L8(tmp_path: Path) -> None:
    """<|m|>, chi_2 = V<m^2> and the Ising energy agree between HMC and flow MH at (8, -4, 8).

    Both ensembles consist of many independent chains, and each estimate's error is the spread
    of the chain means (valid whatever tau_int is, provided the chains start in equilibrium);
    the difference is z-tested with a Bonferroni correction over the 3 observables. HMC is
    also checked against the published chi_2 = 0.75(1) (arXiv:2101.08176).

    With the shipped flow (data/phi4_L8_m2-4_lam8.pt) flow MH runs through ``run_ensemble``
    from its own (flow) start. Without it, a flow trained here for 120 steps has acceptance
    ~0.05-0.1 and rejection runs of hundreds of steps: a CI-sized run could not wash out the
    start, and the comparison would measure initial-state bias. The flow-MH chains are then
    started from the final HMC configurations (equilibrium) instead; stationarity of an exact
    kernel keeps them distributed as e^{-S}, so the z-test still catches a wrong acceptance
    ratio (each chain accepts ~20 proposals), though less strictly than the first path.
    """
    from flowmc.io.checkpoint import load_model

    action = Phi4Action(-4.0, 8.0, (8, 8))
    V = 64
    run_hmc(action, tmp_path / "hmc.h5", _cfg(300, chains=32, warmup=100, seed=1),
            progress=False)
    with open_ensemble(tmp_path / "hmc.h5") as ens:
        cfg_hmc = np.asarray(ens.configs, dtype=np.float64)
        phi_last = torch.as_tensor(ens.load_state()[0]["phi"])
    shipped = _shipped_flow()
    if shipped is not None:
        model = load_model(shipped, symmetric=True)
        run_ensemble(tmp_path / "flow.h5",
                     RunConfig(n=600, chains=16, batch=256, therm=200, seed=2), model=model,
                     progress=False)
        with open_ensemble(tmp_path / "flow.h5") as ens:
            cfg_flow = np.asarray(ens.configs, dtype=np.float64)
    else:
        model = load_model(_quick_flow(tmp_path), symmetric=True)
        cfg_flow = _flow_mh_from(model, phi_last, num_steps=300, seed=2)
    est = {}
    for name, cfg in (("hmc", cfg_hmc), ("flow", cfg_flow)):
        M = cfg.sum((2, 3))
        e = ising_energy(cfg.reshape(-1, 8, 8)).reshape(cfg.shape[:2])
        est[name] = {"abs_m": np.abs(M) / V, "chi2": M**2 / V, "energy": e}
    crit = _z_crit(3, dof=min(cfg_hmc.shape[1], cfg_flow.shape[1]) - 1)
    for obs in ("abs_m", "chi2", "energy"):
        _, ma, ea = _chain_mean_z(est["hmc"][obs], 0.0)
        _, mb, eb = _chain_mean_z(est["flow"][obs], 0.0)
        z = (ma - mb) / math.hypot(ea, eb)
        assert abs(z) < crit, f"{obs}: HMC {ma:.4f} ± {ea:.4f} vs flow {mb:.4f} ± {eb:.4f}"
    _, chi2, err = _chain_mean_z(est["hmc"]["chi2"], 0.0)
    assert abs(chi2 - 0.75) < _z_crit(1) * math.hypot(err, 0.01)  # published anchor
