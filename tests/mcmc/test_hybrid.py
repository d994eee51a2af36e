"""The hybrid chain (flow independence MH cycled with HMC): exactness, controls, broken phase.

* Finite-state: each component satisfies detailed balance, and their cycle leaves pi invariant
  (to 1e-12); dropping log q in the flow component breaks it (negative control).
* Free theory (lambda = 0, exact <M^2> and G(x)): N chains start from exact i.i.d. samples and
  take k hybrid cycles with a deliberately poor flow; stationarity keeps them exact and i.i.d.,
  so plain i.i.d. errors apply (STYLE.md 6.3). Two negative controls fail the same check: the
  flow step without log q, and a hand-over that keeps a stale log q after HMC moved the chain.
* Broken phase (8, -4, 1), no flip: the hybrid with the shipped symmetrised flow has <m> = 0 and
  every chain changes sign; HMC alone does not tunnel (control).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

from flowmc.analysis.autocorr import gamma_analysis
from flowmc.flows.flow import FlowConfig, build_flow
from flowmc.io.ensemble import open_ensemble
from flowmc.lattice.action import FreeTheory, Phi4Action
from flowmc.mcmc import hmc, imh
from flowmc.mcmc.hybrid import hybrid
from flowmc.mcmc.kernel import SamplingAlgorithm, cycle
from flowmc.mcmc.rng import ChainRNG
from flowmc.sampling.run import HMCSettings, RunConfig, run_ensemble

ALPHA = 0.01


def _z_crit(m: int) -> float:
    """Two-sided Bonferroni critical value for ``m`` simultaneous z-tests at level ALPHA."""
    return float(norm.ppf(1 - ALPHA / (2 * m)))


# ------------------------------------------------------------------------- finite state


def _mh_matrix(log_pi: np.ndarray, log_q_prop: np.ndarray, log_q_weight: np.ndarray) -> np.ndarray:
    """Independence-MH matrix on K states: propose j with prob q_j, accept by the kernel's rule
    with weights pi / q_weight (q_weight = q: correct; q_weight = 1: log q dropped)."""
    lw = torch.tensor(log_pi - log_q_weight)
    k = len(lw)
    log_a = imh.log_accept_probability(lw.view(-1, 1).expand(k, k), lw.view(1, -1).expand(k, k))
    p = np.exp(log_q_prop)[None, :] * np.exp(log_a.numpy())
    np.fill_diagonal(p, 0.0)
    np.fill_diagonal(p, 1.0 - p.sum(1))
    return p


def _local_matrix(log_pi: np.ndarray) -> np.ndarray:
    """Random-walk MH to a neighbour i +- 1 (symmetric proposal; outside the grid: stay)."""
    k = len(log_pi)
    p = np.zeros((k, k))
    lp = torch.tensor(log_pi)
    for i in range(k):
        for j in (i - 1, i + 1):
            if 0 <= j < k:
                p[i, j] = 0.5 * math.exp(float(imh.log_accept_probability(lp[i], lp[j])))
        p[i, i] = 1.0 - p[i].sum()
    return p


def _finite_problem() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.linspace(-2.5, 2.5, 11)
    log_pi = -(-4 * x**2 + 2 * x**4)  # a double well
    q = np.random.default_rng(0).uniform(0.2, 1.0, size=x.size)
    log_q = np.log(q / q.sum())  # a deliberately mismatched proposal
    pi = np.exp(log_pi - log_pi.max())
    return log_pi, log_q, pi / pi.sum()


def test_cycle_of_components_is_stationary_finite_state() -> None:
    """Each component is reversible w.r.t. pi; the cycle (1 flow step, 3 local steps) is not
    reversible but leaves pi invariant."""
    log_pi, log_q, pi = _finite_problem()
    flow = _mh_matrix(log_pi, log_q, log_q)
    local = _local_matrix(log_pi)
    for p in (flow, local):
        assert np.all(p >= -1e-15)
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
        flux = pi[:, None] * p
        np.testing.assert_allclose(flux, flux.T, atol=1e-12)
    hybrid = flow @ np.linalg.matrix_power(local, 3)
    np.testing.assert_allclose(pi @ hybrid, pi, atol=1e-12)
    flux = pi[:, None] * hybrid
    assert np.max(np.abs(flux - flux.T)) > 1e-4  # a cycle need not be reversible


def test_cycle_negative_control_without_log_q() -> None:
    log_pi, log_q, pi = _finite_problem()
    flow_bad = _mh_matrix(log_pi, log_q, np.zeros_like(log_q))
    hybrid = flow_bad @ np.linalg.matrix_power(_local_matrix(log_pi), 3)
    assert np.max(np.abs(pi @ hybrid - pi)) > 1e-3


# ------------------------------------------------------------------------- free theory

M2_FREE, SHAPE = 4.0, (4, 4)


class _NoLogQ(torch.nn.Module):
    """Negative control: the flow's proposals with log q dropped (treated as symmetric)."""

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.base, self.lattice_shape = base, base.lattice_shape

    def from_noise(self, eps: torch.Tensor, u: torch.Tensor | None = None):  # noqa: ANN201
        phi, log_q = self.base.from_noise(eps, u)
        return phi, torch.zeros_like(log_q)

    def log_prob(self, phi: torch.Tensor) -> torch.Tensor:
        return torch.zeros(phi.shape[0], dtype=phi.dtype, device=phi.device)


def _stale(kernel: SamplingAlgorithm) -> SamplingAlgorithm:
    """Negative control: a hand-over that keeps the old log q after HMC moved the chain."""

    def adopt(own: imh.IMHState | None, other: object) -> imh.IMHState:
        if own is None:
            return kernel.adopt(own, other)
        return imh.IMHState(other.phi, other.action, own.log_q)

    return SamplingAlgorithm(kernel.init, kernel.step, adopt)


def _free_theory_z(variant: str, block: int = 0) -> tuple[dict[str, float], float]:
    """z-scores of <M^2>, G(0), G(1), G(2) after k = 10 hybrid cycles of N = 1000 chains.

    ``block = B > 0`` runs the production kernel (:func:`flowmc.mcmc.hybrid.hybrid`, the proposals
    of B cycles from one flow call) instead of the plain ``cycle``.

    The flow is untrained (2 layers) with prior width 0.7 sqrt(G(0)): narrower than the target,
    flow acceptance ~0.16, so the MH correction does most of the work. The chain dtype is
    float64, the flow's float32 (the production hand-over). Each final configuration is an
    exact, independent sample if the cycle is exact: Var(M^2) = 2<M^2>^2 gives a relative MCSE
    of sqrt(2/N) = 4.5% on <M^2>; the controls are biased by > 30% (measured |z| > 5 on M^2 and
    > 13 on G(0), so the MCSE is far below a quarter of the bias).
    """
    action = Phi4Action(M2_FREE, 0.0, SHAPE)
    free = FreeTheory(M2_FREE, SHAPE)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        flow = build_flow(FlowConfig(SHAPE, n_layers=2, hidden=(4,),
                                     prior_sigma=0.7 * math.sqrt(free.phi2())))  # fmt: skip
    n_chains, k = 1000, 10
    flow_k = imh.flow_imh(_NoLogQ(flow) if variant == "no_log_q" else flow, action, 1)
    if variant == "stale_log_q":
        flow_k = _stale(flow_k)
    hmc_k = hmc.hmc(action, 0.25, 2, "leapfrog")
    kernel = cycle([flow_k, hmc_k], [1, 1]) if not block else hybrid(flow, action, hmc_k, 1, block)
    phi0 = free.sample(n_chains, generator=torch.Generator().manual_seed(1))
    rng = ChainRNG(seed=3, chain_ids=range(n_chains))
    acc = []
    with torch.no_grad():
        state = kernel.init(phi0)
        for _ in range(k // max(block, 1)):
            state, info = kernel.step(state, rng)
            flow_info = info.flow if block else info.infos[0][0]
            acc.append(flow_info.is_accepted.double().mean().item())
    phi = state.phi
    assert phi.dtype == torch.float64
    series = {"M2": phi.sum((1, 2)) ** 2}
    exact = {"M2": free.m2_expectation()}
    for r in (0, 1, 2):
        series[f"G{r}"] = (phi * torch.roll(phi, r, 1)).mean((1, 2))
        exact[f"G{r}"] = free.propagator()[r, 0]
    z = {
        key: (x.mean().item() - exact[key]) / (x.std().item() / math.sqrt(n_chains))
        for key, x in series.items()
    }
    return z, float(np.mean(acc))


@pytest.mark.parametrize("block", [0, 5])
def test_hybrid_exact_on_free_theory(block: int) -> None:
    z, acc = _free_theory_z("exact", block)
    assert 0.05 < acc < 0.4, acc  # the flow is poor on purpose: the MH correction matters
    assert max(abs(v) for v in z.values()) < _z_crit(4), z


@pytest.mark.parametrize("variant", ["no_log_q", "stale_log_q"])
def test_hybrid_negative_controls_fail(variant: str) -> None:
    z, _ = _free_theory_z(variant)
    assert max(abs(v) for v in z.values()) > 2 * _z_crit(4), z


def test_block_kernel_equals_plain_cycle() -> None:
    """hybrid(..., cycles=1) consumes each chain's stream like the plain cycle: same chains, bit
    for bit; with cycles=B the block's records are those of its B cycles."""
    action = Phi4Action(-1.0, 1.0, SHAPE)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        flow = build_flow(FlowConfig(SHAPE, n_layers=2, hidden=(4,), prior_sigma=0.6))
    hmc_k = hmc.hmc(action, 0.2, 3, "omelyan", flip=True)
    plain = cycle([imh.flow_imh(flow, action, 1), hmc_k], [1, 2])
    block = hybrid(flow, action, hmc_k, 2, 1)
    phi0 = torch.zeros(3, *SHAPE, dtype=torch.float64)
    sa, sb = plain.init(phi0), block.init(phi0)
    ra, rb = ChainRNG(1, 3), ChainRNG(1, 3)
    for _ in range(6):
        sa, ia = plain.step(sa, ra)
        sb, ib = block.step(sb, rb)
        for x, y in zip((*sa.states[0], *sa.states[1]), (*sb.states[0], *sb.states[1])):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        assert torch.equal(ia.infos[0][0].is_accepted, ib.flow.is_accepted)
        n_acc = sum(t.is_accepted.long() for t in ia.infos[1])
        assert torch.equal(n_acc, ib.hmc_accepted[0])
        assert torch.equal(ia.infos[1][-1].delta_h, ib.delta_h[0])
    _, info = hybrid(flow, action, hmc_k, 2, 4).step(sb, rb)
    assert info.phi.shape == (4, 3, *SHAPE) and info.flow.is_accepted.shape == (4, 3)


# ------------------------------------------------------------------------- broken phase

MODEL = Path(__file__).resolve().parents[2] / "data" / "phi4_L8_m2-4_lam1.pt"


def _sign_changes(m: np.ndarray) -> np.ndarray:
    return (np.diff(np.sign(m), axis=0) != 0).sum(0)


@pytest.mark.skipif(not MODEL.exists(), reason=f"shipped flow {MODEL.name} is absent")
def test_broken_phase_hybrid_tunnels_without_flip(tmp_path: Path) -> None:
    """(8, -4, 1) without --flip: hybrid <m> = 0 within errors, every chain changes sign.

    8 chains x 40 cycles (1 flow proposal + 2 HMC trajectories each), shipped Z2-symmetrised
    flow (acceptance ~0.9, a random sign per accepted proposal): ~18 sign changes per chain are
    expected, and sigma(<m>) ~ 0.08 against the mode at |m| = 1.36. Control: HMC alone (the
    hybrid's tuned step size, 80 trajectories, chains started in the +m mode) never changes
    sign, and its <m> is > 10 sigma from 0.
    """
    out = tmp_path / "hybrid.h5"
    cfg = RunConfig(n=40, chains=8, seed=4, hmc_traj=2, hmc=HMCSettings(warmup=20))
    s = run_ensemble(out, cfg, model=MODEL, progress=False)
    with open_ensemble(out) as ens:
        m = ens.scalar("magnetization") / 64
        eps, n_steps = ens.sampler["step_size"], ens.sampler["num_steps"]
    changes = _sign_changes(m)
    res = gamma_analysis(m.T)
    assert abs(res.value) / res.error < _z_crit(1), (res.value, res.error)
    assert changes.min() >= 1, f"sign changes per chain: {changes.tolist()}"
    assert s["flow_acceptance"] > 0.5 and not ens.sampler["flip"]
    # control: HMC alone, same step size and trajectory count, does not tunnel
    action = Phi4Action(-4.0, 1.0, (8, 8))
    kernel = hmc.hmc(action, eps, n_steps, "omelyan")
    rng = ChainRNG(seed=5, chain_ids=range(8))
    state = kernel.init(torch.full((8, 8, 8), 1.36, dtype=torch.float64))
    ms = []
    with torch.no_grad():
        for _ in range(80):
            state, _ = kernel.step(state, rng)
            ms.append(state.phi.mean((1, 2)).numpy())
    ms = np.asarray(ms)
    assert _sign_changes(ms).max() == 0
    assert ms.mean() / (ms.mean(0).std(ddof=1) / math.sqrt(8)) > 10
