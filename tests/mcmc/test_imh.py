"""Independence Metropolis-Hastings: detailed balance, exactness on the free theory, controls."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from flowmc.analysis.autocorr import gamma_analysis
from flowmc.flows.flow import FlowConfig, Z2SymmetricFlow, build_flow
from flowmc.lattice.action import FreeTheory, Phi4Action
from flowmc.mcmc import imh
from flowmc.mcmc.rng import ChainRNG


# --- exact finite-state check -----------------------------------------------------------------
def _transition_matrix(log_pi_unnorm: np.ndarray, log_q: np.ndarray, use_q: bool) -> np.ndarray:
    """P_ij = q_j A(i -> j) (i != j), built from the kernel's own acceptance rule."""
    lw = torch.tensor(log_pi_unnorm - (log_q if use_q else 0.0))
    k = len(lw)
    log_a = imh.log_accept_probability(lw.view(-1, 1).expand(k, k), lw.view(1, -1).expand(k, k))
    p = np.exp(log_q)[None, :] * np.exp(log_a.numpy())
    np.fill_diagonal(p, 0.0)
    np.fill_diagonal(p, 1.0 - p.sum(1))
    return p


def _finite_state_problem() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # a one-site field on a grid of K values, target e^{-S} with a double well,
    # a deliberately mismatched categorical proposal
    x = np.linspace(-2.5, 2.5, 11)
    log_pi = -(-4 * x**2 + 2 * x**4)
    rng = np.random.default_rng(0)
    q = rng.uniform(0.2, 1.0, size=x.size)
    log_q = np.log(q / q.sum())
    pi = np.exp(log_pi - log_pi.max())
    return log_pi, log_q, pi / pi.sum()


def test_detailed_balance_finite_state():
    log_pi, log_q, pi = _finite_state_problem()
    p = _transition_matrix(log_pi, log_q, use_q=True)
    assert np.all(p >= -1e-15)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
    flux = pi[:, None] * p
    np.testing.assert_allclose(flux, flux.T, atol=1e-12)
    np.testing.assert_allclose(pi @ p, pi, atol=1e-12)


def test_detailed_balance_negative_control_without_log_q():
    """Dropping log q (a 'symmetric proposal' default) breaks stationarity of pi."""
    log_pi, log_q, pi = _finite_state_problem()
    p = _transition_matrix(log_pi, log_q, use_q=False)
    assert np.max(np.abs(pi @ p - pi)) > 1e-3


# --- the vectorised block equals a plain reference loop ----------------------------------------
def test_accept_reject_matches_reference_loop():
    gen = torch.Generator().manual_seed(5)
    K, C = 200, 3
    action = torch.randn(K, C, generator=gen, dtype=torch.float64)
    log_q = torch.randn(K, C, generator=gen, dtype=torch.float64)
    log_q[7, 1] = float("nan")  # a non-finite proposal must be rejected
    log_u = torch.rand(K, C, generator=gen, dtype=torch.float64).log()
    phi = torch.randn(K, C, 2, generator=gen, dtype=torch.float64)
    state = imh.init(torch.zeros(C, 2, dtype=torch.float64), torch.zeros(C, dtype=torch.float64),
                     torch.zeros(C, dtype=torch.float64))
    new, info = imh.accept_reject(state, phi, action, log_q, log_u)
    for c in range(C):
        lw, cur = 0.0, -1
        for k in range(K):
            lw_new = -action[k, c].item() - log_q[k, c].item()
            ok = math.isfinite(lw_new) and log_u[k, c].item() < min(0.0, lw_new - lw)
            if ok:
                lw, cur = lw_new, k
            assert bool(info.is_accepted[k, c]) == ok
            # the trace: the chain after step k is proposal `cur` (or the start)
            want = phi[cur, c] if cur >= 0 else state.phi[c]
            torch.testing.assert_close(info.phi[k, c], want, atol=0, rtol=0)
            want_s = action[cur, c] if cur >= 0 else state.action[c]
            assert info.action[k, c].item() == want_s.item()
            assert info.log_weight[k, c].item() == lw
        if cur >= 0:
            torch.testing.assert_close(new.phi[c], phi[cur, c])
    assert bool(info.is_nonfinite[7, 1]) and not bool(info.is_accepted[7, 1])
    torch.testing.assert_close(info.phi[-1], new.phi)
    torch.testing.assert_close(info.log_q[-1], new.log_q)


def test_init_rejects_nonfinite():
    with pytest.raises(ValueError, match="not finite"):
        imh.init(torch.zeros(1, 2), torch.tensor([float("nan")]), torch.zeros(1))


M2_FREE = 4.0


# --- exactness on the free theory with a poor flow ---------------------------------------------
def _run_chains(use_log_q: bool, seed: int) -> dict[str, np.ndarray]:
    """C chains of IMH at m2 = 4 on 4x4 with an untrained flow: q = N(0, sigma^2) with sigma just
    above the widest mode of the target (so the weights are bounded), acceptance ~0.16."""
    torch.manual_seed(seed)
    shape, C, therm, n = (4, 4), 128, 100, 600
    action = Phi4Action(M2_FREE, 0.0, shape)
    sigma = 1.02 * float(np.sqrt(1 / FreeTheory(M2_FREE, shape).eigenvalues().min()))
    flow = build_flow(FlowConfig(shape, n_layers=2, hidden=(4,), prior_sigma=sigma)).double()
    rng = ChainRNG(seed, C)
    with torch.no_grad():
        state = imh.sample_init(flow, action, rng)
        if use_log_q:
            _, info = imh.flow_imh(flow, action, therm + n).step(state, rng)
        else:  # the blackjax irmh omission: the proposal treated as symmetric
            phi, s, lq = imh.propose(flow, action, therm + n, rng)
            log_u = rng.uniform((therm + n,)).log().t()
            state = state._replace(log_q=torch.zeros_like(state.log_q))
            _, info = imh.accept_reject(state, phi, s, torch.zeros_like(lq), log_u)
        chain = info.phi[therm:]  # (n, C, 4, 4)
    return {
        "phi2": chain.pow(2).mean((2, 3)).T.numpy(),
        "M2": chain.sum((2, 3)).pow(2).T.numpy(),
        "G1": (chain * torch.roll(chain, 1, 2)).mean((2, 3)).T.numpy(),
        "acceptance": info.is_accepted.double().mean().item(),
    }


def _z_scores(series: dict[str, np.ndarray], quiet: bool = False) -> dict[str, float]:
    ft = FreeTheory(M2_FREE, (4, 4))
    exact = {"phi2": ft.phi2(), "M2": ft.m2_expectation(), "G1": ft.propagator()[1, 0]}
    out = {}
    for key, truth in exact.items():
        res = gamma_analysis(series[key], quiet=quiet)  # chains are replicas; includes tau_int
        out[key] = abs(res.value - truth) / res.error
    return out


def test_imh_exact_on_free_theory_with_poor_flow():
    """N = 128 chains x 600 steps, tau_int ~ 11-18 -> ESS ~ 2500: the MCSE of <phi^2> is ~1.5% of
    its value, far below the bias of the negative control (which targets p*q, whose variance is
    about half of p's). Bonferroni over 3 checks, alpha = 0.01."""
    series = _run_chains(use_log_q=True, seed=11)
    assert 0.08 < series["acceptance"] < 0.3  # the flow is poor on purpose
    threshold = norm.ppf(1 - 0.01 / (2 * 3))
    z = _z_scores(series)
    assert max(z.values()) < threshold, z


def test_imh_negative_control_without_log_q_fails():
    series = _run_chains(use_log_q=False, seed=11)
    threshold = norm.ppf(1 - 0.01 / (2 * 3))
    with pytest.warns(RuntimeWarning):  # the biased chain also sticks: tau_int is huge
        z = _z_scores(series, quiet=True)
    assert max(z.values()) > 3 * threshold, z


# --- the symmetrised proposal -----------------------------------------------------------------
def test_z2_symmetric_flow_density_is_exact_and_even():
    torch.manual_seed(0)
    flow = build_flow(FlowConfig((4, 4), n_layers=4, hidden=(8,))).double()
    for p in flow.parameters():
        torch.nn.init.normal_(p, std=0.2)
    # push the flow towards one sign so that q(phi) != q(-phi)
    sym = Z2SymmetricFlow(flow)
    phi, log_q = sym.sample(64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(log_q, sym.log_prob(phi), atol=1e-10, rtol=0)
    torch.testing.assert_close(sym.log_prob(-phi), sym.log_prob(phi), atol=1e-10, rtol=0)
    # normalisation on the free theory: importance estimate of Z with q_s on a 2x2 lattice
    ft = FreeTheory(0.5, (2, 2))
    action = Phi4Action(0.5, 0.0, (2, 2))
    small = build_flow(FlowConfig((2, 2), n_layers=2, hidden=(4,), prior_sigma=0.6)).double()
    for p in small.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        x, lq = Z2SymmetricFlow(small).sample(20000, generator=torch.Generator().manual_seed(2))
        w = torch.exp(-action(x) - lq)
    z_hat, se = w.mean().item(), w.std().item() / math.sqrt(len(w))
    assert abs(z_hat - math.exp(ft.log_z())) < 4 * se
