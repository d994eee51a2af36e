"""Tests for flowmc.mcmc.hmc: integrator invariants, exactness, tuning and the Z2 flip.

Every statistical check has an exact truth, a standard-error-based tolerance, a fixed seed, and a
negative control showing that it can fail (STYLE.md sections 6.3 and 6.4). All in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowmc.lattice.action import Phi4Action
from flowmc.mcmc import hmc as H
from tests.helpers import bonferroni as _bonferroni
from tests.helpers import gen as _gen

DT = torch.float64
INTEGRATORS = {"leapfrog": H.leapfrog, "omelyan": H.omelyan}


def _hamiltonian(action, phi, pi):
    return H.kinetic_energy(pi) + action(phi)


def _thermalised(action, num_chains, seed, step_size=0.1, num_steps=10, num_iter=50):
    g = _gen(seed)
    shape = (num_chains, *action.lattice_shape)
    state = H.init(0.1 * torch.randn(shape, generator=g, dtype=DT), action)
    kernel = H.build_kernel(action, step_size=step_size, num_steps=num_steps)
    for _ in range(num_iter):
        state, _ = kernel(state, g)
    return state, g


# ---------------------------------------------------------------------------------------------
# integrator invariants (no sampling)


def test_force_matches_autograd():
    action = Phi4Action(-4.0, 8.0, (4, 4))
    phi = torch.randn(3, 4, 4, generator=_gen(0), dtype=DT).requires_grad_(True)
    (g,) = torch.autograd.grad(action(phi).sum(), phi)
    torch.testing.assert_close(action.force(phi.detach()), -g, rtol=0, atol=1e-12)
    # the autograd fallback used for actions without .grad gives the same force
    torch.testing.assert_close(H._grad(lambda x: action(x), phi.detach()), g, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["leapfrog", "omelyan"])
def test_reversibility(name):
    """L steps, flip the momentum, L steps, flip again: back to the start to 1e-10."""
    action = Phi4Action(-4.0, 8.0, (4, 4))
    g = _gen(1)
    phi0 = torch.randn(3, 4, 4, generator=g, dtype=DT)
    pi0 = torch.randn(3, 4, 4, generator=g, dtype=DT)
    integrate = INTEGRATORS[name]
    phi1, pi1 = integrate(phi0, pi0, action, 0.02, 25)
    assert (phi1 - phi0).abs().max() > 0.1  # the trajectory really went somewhere
    phi2, pi2 = integrate(phi1, H.flip_momentum(pi1), action, 0.02, 25)
    torch.testing.assert_close(phi2, phi0, rtol=0, atol=1e-10)
    torch.testing.assert_close(H.flip_momentum(pi2), pi0, rtol=0, atol=1e-10)


def test_reversibility_negative_control():
    """A non-palindromic (symplectic Euler) integrator is not reversible: the check can fail."""
    action = Phi4Action(-4.0, 8.0, (4, 4))
    g = _gen(1)
    phi0 = torch.randn(3, 4, 4, generator=g, dtype=DT)
    pi0 = torch.randn(3, 4, 4, generator=g, dtype=DT)

    def euler(phi, pi):
        for _ in range(25):
            pi = pi + 0.02 * action.force(phi)
            phi = phi + 0.02 * pi
        return phi, pi

    phi1, pi1 = euler(phi0, pi0)
    phi2, _ = euler(phi1, -pi1)
    assert (phi2 - phi0).abs().max() > 1e-3


def _flat_map(step, action):
    def f(z):
        phi, pi = z[:4].view(1, 2, 2), z[4:].view(1, 2, 2)
        phi1, pi1 = step(phi, pi, action)
        return torch.cat([phi1.flatten(), pi1.flatten()])

    return f


@pytest.mark.parametrize("name", ["leapfrog", "omelyan"])
def test_volume_preservation(name):
    """det of the autograd Jacobian of (phi, pi) -> (phi', pi') on 2x2 equals 1 to 1e-10."""
    action = Phi4Action(-4.0, 8.0, (2, 2))
    z = torch.randn(8, generator=_gen(2), dtype=DT)

    def step(phi, pi, act):
        return INTEGRATORS[name](phi, pi, act, 0.1, 7)

    jac = torch.autograd.functional.jacobian(_flat_map(step, action), z)
    assert (jac - torch.eye(8, dtype=DT)).abs().max() > 0.1  # a non-trivial map
    assert abs(torch.linalg.det(jac).item() - 1.0) < 1e-10


def test_volume_preservation_negative_control():
    """Explicit Euler (phi' = phi + e pi, pi' = pi + e F(phi)) has det J != 1."""
    action = Phi4Action(-4.0, 8.0, (2, 2))
    z = torch.randn(8, generator=_gen(2), dtype=DT)

    def step(phi, pi, act):
        for _ in range(7):
            phi, pi = phi + 0.1 * pi, pi + 0.1 * act.force(phi)
        return phi, pi

    jac = torch.autograd.functional.jacobian(_flat_map(step, action), z)
    assert abs(torch.linalg.det(jac).item() - 1.0) > 1e-2


def _mean_abs_dh(action, state, pi, name, step_size):
    num_steps = round(1.0 / step_size)  # fixed trajectory length tau = 1
    phi1, pi1 = INTEGRATORS[name](state.phi, pi, action, step_size, num_steps, grad=state.grad)
    dh = _hamiltonian(action, phi1, pi1) - _hamiltonian(action, state.phi, pi)
    return dh.abs().mean().item()


@pytest.fixture(scope="module")
def thermal_4x4():
    torch.set_num_threads(1)
    action = Phi4Action(-4.0, 8.0, (4, 4))
    state, g = _thermalised(action, 64, seed=3)
    pi = torch.randn(state.phi.shape, generator=g, dtype=DT)
    return action, state, pi


@pytest.mark.parametrize("name", ["leapfrog", "omelyan"])
def test_energy_error_scales_as_eps_squared(name, thermal_4x4):
    """Mean |dH| over 64 thermalised configs at tau = 1: ratio 4 when eps halves (0.1 -> 0.05).

    Both step sizes use the same configurations and momenta, so the ratio has no sampling noise;
    its deviation from 4 is the O(eps^2) relative correction of the shadow Hamiltonian (measured
    4.14 for both integrators; 4.04 at eps 0.05 -> 0.025). [3.3, 4.8] excludes first order
    (ratio 2) and fourth order (ratio 16), and leaves room for the O(eps^2) correction.
    """
    action, state, pi = thermal_4x4
    big = _mean_abs_dh(action, state, pi, name, 0.1)
    small = _mean_abs_dh(action, state, pi, name, 0.05)
    assert 3.3 < big / small < 4.8, big / small


def test_omelyan_beats_leapfrog_at_equal_force_evaluations(thermal_4x4):
    """20 force evaluations per unit time: leapfrog eps=0.05 vs Omelyan eps=0.1 (2 per step).

    The minimum-norm error coefficient is ~10x smaller than leapfrog's, so at twice the step
    size Omelyan should still win by ~2.5x (measured 0.028 vs 0.011); assert a factor 1.5.
    """
    action, state, pi = thermal_4x4
    lf = _mean_abs_dh(action, state, pi, "leapfrog", 0.05)
    om = _mean_abs_dh(action, state, pi, "omelyan", 0.1)
    assert om * 1.5 < lf, (om, lf)


# ---------------------------------------------------------------------------------------------
# exactness on the free theory: the fastest honest test (STYLE 6.3)

FREE = Phi4Action(1.0, 0.0, (4, 4))
N_FREE = 4000
K_STEPS = 5
# (integrator, step_size, num_steps, flip): coarse steps, mean acceptance 0.78 and 0.73
FREE_CASES = [("leapfrog", 0.3, 3, False), ("omelyan", 0.55, 2, True)]


def _free_zscores(phi):
    """iid z-scores of <phi^2>, <M^2>, G(1) against the exact free-theory values."""
    ft = FREE.free_theory()
    p2 = (phi * phi).flatten(1).mean(1)
    m2 = phi.flatten(1).sum(1) ** 2
    g1 = 0.5 * (phi * torch.roll(phi, 1, 1) + phi * torch.roll(phi, 1, 2)).flatten(1).mean(1)
    exact = [ft.phi2(), ft.m2_expectation(), float(ft.propagator()[1, 0])]
    n = phi.shape[0]
    return [((o.mean() - e) / (o.std() / math.sqrt(n))).item() for o, e in zip((p2, m2, g1), exact)]


def _always_accept_kernel(name, step_size, num_steps):
    """Negative control: the integrator without the Metropolis correction."""

    def step(state, generator):
        pi = torch.randn(state.phi.shape, generator=generator, dtype=state.phi.dtype)
        phi, _ = INTEGRATORS[name](state.phi, pi, FREE, step_size, num_steps)
        return H.init(phi, FREE), None

    return step


def _run_from_exact(kernel, seed):
    g = _gen(seed)
    state = H.init(FREE.free_theory().sample(N_FREE, generator=g), FREE)
    accs = []
    for _ in range(K_STEPS):
        state, info = kernel(state, g)
        if info is not None:
            accs.append(info.acceptance_rate.mean().item())
    return state.phi, (sum(accs) / len(accs) if accs else 1.0)


@pytest.mark.parametrize("name,step_size,num_steps,flip", FREE_CASES)
def test_exact_on_free_theory(name, step_size, num_steps, flip):
    """N iid exact samples of m2=1 on 4x4, K HMC steps each: the output is still exact and iid.

    Choice of N: the unadjusted integrator at these step sizes biases <phi^2> by +12.5%
    (leapfrog) and -8% (Omelyan). With N = 4000 the relative MCSE is 0.8% on <phi^2>, 2.2% on
    <M^2> and 2.4% of <phi^2> on G(1), so a 3% bias in <phi^2> (>= 4 MCSE, a quarter of the
    smallest effect we want to exclude) is detected. m = 3 checks, Bonferroni alpha = 0.01.
    """
    kernel = H.build_kernel(
        FREE, integrator=name, step_size=step_size, num_steps=num_steps, flip=flip
    )
    phi, acc = _run_from_exact(kernel, seed=10)
    assert 0.6 < acc < 0.85, acc  # the accept/reject step really matters
    z = _free_zscores(phi)
    assert max(abs(x) for x in z) < _bonferroni(3), z


@pytest.mark.parametrize("name,step_size,num_steps,flip", FREE_CASES)
def test_exact_on_free_theory_negative_control(name, step_size, num_steps, flip):
    """Same test, same step size, accept/reject disabled: the z-test must fail."""
    phi, _ = _run_from_exact(_always_accept_kernel(name, step_size, num_steps), seed=10)
    z = _free_zscores(phi)
    assert max(abs(x) for x in z) > _bonferroni(3), z


def test_flip_is_a_proper_metropolis_move():
    """With a field h breaking Z2, flip=True must still leave <phi> = h / (2 m2) exact.

    S' = S_free - h sum(phi) is Gaussian with mean h/(2 m2) = 0.25 (K 1 = 2 m2 1). A flip that
    always accepted would drive <phi> towards 0; the MH test with exp(-(S'(-phi) - S'(phi)))
    rejects it. N = 4000 gives MCSE 0.0028 on <phi> (sd 0.177), one check at alpha = 0.01.
    """
    h = 0.5

    class Tilted:
        lattice_shape = FREE.lattice_shape

        def __call__(self, phi):
            return FREE(phi) - h * phi.flatten(1).sum(1)

        def grad(self, phi):
            return FREE.grad(phi) - h

    action = Tilted()
    g = _gen(11)
    phi = FREE.free_theory().sample(N_FREE, generator=g) + h / (2 * FREE.m2)
    state = H.init(phi, action)
    kernel = H.build_kernel(action, step_size=0.3, num_steps=3, flip=True)
    for _ in range(K_STEPS):
        state, _ = kernel(state, g)
    mean = state.phi.flatten(1).mean(1)
    z = (mean.mean().item() - 0.25) / (mean.std().item() / math.sqrt(N_FREE))
    assert abs(z) < _bonferroni(1), z


# ---------------------------------------------------------------------------------------------
# interacting theory


def _per_chain_z(series, truth):
    """z-score with chains as independent replicas: error from the spread of chain means."""
    chain_means = series.mean(0)  # series: (T, C)
    err = chain_means.std() / math.sqrt(chain_means.numel())
    return ((chain_means.mean() - truth) / err).item()


def _schwinger_dyson_series(kernel, state, g, num_iter=100):
    vol = state.phi[0].numel()
    out = []
    for _ in range(num_iter):
        state, _ = kernel(state, g)
        out.append((state.phi * state.grad).flatten(1).sum(1) / vol)
    return torch.stack(out)


def test_schwinger_dyson():
    """<phi . dS/dphi> / V = 1 at m2=-4, lam=8 on 6x6: 32 chains x (60 thermalisation + 100).

    The identity follows from integrating d/dphi_x (phi_x e^{-S}) = 0. Step size 0.14 x 7
    (acceptance ~0.83), the same as the negative control below, which is biased by +6% to +9%
    (z = 4.3 to 10 over 6 seeds); the chain-spread error here is ~0.012.
    """
    action = Phi4Action(-4.0, 8.0, (6, 6))
    state, g = _thermalised(action, 32, seed=4, step_size=0.12, num_steps=8, num_iter=60)
    kernel = H.build_kernel(action, step_size=0.14, num_steps=7)
    z = _per_chain_z(_schwinger_dyson_series(kernel, state, g), 1.0)
    assert abs(z) < _bonferroni(1), z


def test_schwinger_dyson_negative_control():
    """Unadjusted leapfrog at the same step size violates the identity.

    Only 60 iterations at a moderate step: without the Metropolis test a chain occasionally runs
    away to inf (seen at eps = 0.16), a trajectory that HMC would reject as divergent.
    """
    action = Phi4Action(-4.0, 8.0, (6, 6))
    state, g = _thermalised(action, 32, seed=4, step_size=0.12, num_steps=8, num_iter=60)

    def kernel(st, gen):
        pi = torch.randn(st.phi.shape, generator=gen, dtype=DT)
        phi, _ = H.leapfrog(st.phi, pi, action, 0.14, 7, grad=st.grad)
        return H.HMCState(phi, action(phi), action.grad(phi)), None

    z = _per_chain_z(_schwinger_dyson_series(kernel, state, g, num_iter=60), 1.0)
    assert abs(z) > _bonferroni(1), z


@pytest.mark.parametrize("name", ["leapfrog", "omelyan"])
def test_tuning_reaches_target_acceptance(name):
    """Dual averaging at (L, m2, lam) = (8, -4, 8), tau = 1, 64 chains, 150 warm-up iterations.

    Tolerance 0.05: the mean over 100 frozen iterations has a statistical error of ~0.005
    (per-iteration sd 0.03 over 64 chains); the systematic offset of dual averaging (it matches
    the acceptance averaged over the eps sequence, and num_steps = ceil(tau/eps) lengthens the
    trajectory) was measured over 10 seeds: 0.788-0.798 (leapfrog), 0.810-0.831 (Omelyan, whose
    acceptance falls more steeply with eps). Tuned eps: 0.125-0.128 (leapfrog, 8 steps),
    0.212-0.214 (Omelyan, 5 steps).
    """
    action = Phi4Action(-4.0, 8.0, (8, 8))
    g = _gen(5)
    state = H.init(0.1 * torch.randn(64, 8, 8, generator=g, dtype=DT), action)
    state, eps, num_steps, hist = H.tune_step_size(
        action, state, g, traj_length=1.0, target_accept=0.8, num_warmup=150, integrator=name
    )
    assert num_steps == math.ceil(1.0 / eps)
    assert len(hist["step_size"]) == 150
    kernel = H.build_kernel(action, integrator=name, step_size=eps, num_steps=num_steps)
    acc = []
    for _ in range(100):
        state, info = kernel(state, g)
        acc.append(info.acceptance_rate.mean().item())
    assert abs(sum(acc) / len(acc) - 0.8) < 0.05, (eps, sum(acc) / len(acc))


@pytest.mark.parametrize("flip", [True, False])
def test_flip_restores_z2_in_broken_phase(flip):
    """m2=-4, lam=1 on 6x6 (minima at phi = +-sqrt(2), barrier ~144): all chains start at +.

    HMC alone never tunnels (negative control: <M>/V ~ 1.36 >> 0); with the flip each step's
    sign is an independent coin, so <M> = 0 within the chain-spread error (32 chains x 50).
    """
    action = Phi4Action(-4.0, 1.0, (6, 6))
    g = _gen(6)
    state = H.init(math.sqrt(2.0) * torch.ones(32, 6, 6, dtype=DT), action)
    kernel = H.build_kernel(action, step_size=0.1, num_steps=10, flip=flip)
    for _ in range(10):
        state, _ = kernel(state, g)
    mags = []
    for _ in range(50):
        state, _ = kernel(state, g)
        mags.append(state.phi.flatten(1).mean(1))
    mags = torch.stack(mags)
    z = _per_chain_z(mags, 0.0)
    if flip:
        assert abs(z) < _bonferroni(1), z
    else:
        assert mags.mean().item() > 1.0 and z > 100, (mags.mean().item(), z)


# ---------------------------------------------------------------------------------------------
# API, purity, divergences and input errors


def test_sampling_algorithm_api_and_purity():
    action = Phi4Action(-4.0, 8.0, (4, 4))
    sampler = H.hmc(action, step_size=0.1, num_steps=10, integrator="omelyan", flip=True)
    assert isinstance(sampler, H.SamplingAlgorithm)
    phi = 0.5 * torch.randn(6, 4, 4, generator=_gen(7), dtype=DT)
    state = sampler.init(phi)
    assert isinstance(state, H.HMCState)
    torch.testing.assert_close(state.action, action(phi))
    torch.testing.assert_close(state.grad, action.grad(phi))
    before = [t.clone() for t in state]
    new1, info1 = sampler.step(state, _gen(8))
    new2, info2 = sampler.step(state, _gen(8))
    for a, b in zip(state, before):  # inputs untouched
        assert torch.equal(a, b)
    for a, b in zip((*new1, *info1), (*new2, *info2)):  # randomness only from the generator
        assert torch.equal(a, b)
    assert isinstance(info1, H.HMCInfo)
    assert info1.is_accepted.dtype == torch.bool and info1.is_accepted.shape == (6,)
    torch.testing.assert_close(
        info1.acceptance_rate, torch.clamp(torch.exp(-info1.delta_h), max=1.0)
    )
    # the state is self-consistent: cached action and gradient belong to phi
    torch.testing.assert_close(new1.action, action(new1.phi))
    torch.testing.assert_close(new1.grad, action.grad(new1.phi))


def test_divergent_trajectories_are_rejected_and_counted():
    action = Phi4Action(-4.0, 8.0, (4, 4))
    state = H.init(torch.randn(5, 4, 4, generator=_gen(9), dtype=DT), action)
    kernel = H.build_kernel(action, step_size=5.0, num_steps=20)
    new, info = kernel(state, _gen(9))
    assert info.is_divergent.all() and not info.is_accepted.any()
    assert not torch.isfinite(info.delta_h).all()
    assert (info.acceptance_rate == 0).all()
    for a, b in zip(new, state):
        assert torch.equal(a, b)


def test_invalid_parameters_raise():
    action = Phi4Action(-4.0, 8.0, (4, 4))
    with pytest.raises(ValueError, match="step_size"):
        H.build_kernel(action, step_size=0.0, num_steps=1)
    with pytest.raises(ValueError, match="step_size"):
        H.hmc(action, step_size=-0.1, num_steps=1)
    with pytest.raises(ValueError, match="step_size"):
        H.leapfrog(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), action, float("nan"), 1)
    with pytest.raises(ValueError, match="num_steps"):
        H.build_kernel(action, step_size=0.1, num_steps=0)
    with pytest.raises(ValueError, match="num_steps"):
        H.omelyan(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), action, 0.1, 1.5)
    with pytest.raises(ValueError, match="integrator"):
        H.build_kernel(action, step_size=0.1, num_steps=1, integrator="rk4")
    state = H.init(torch.zeros(2, 4, 4, dtype=DT), action)
    for bad in (0.0, 1.0, 1.2):
        with pytest.raises(ValueError, match="target_accept"):
            H.tune_step_size(action, state, _gen(0), target_accept=bad)
    with pytest.raises(ValueError, match="traj_length"):
        H.tune_step_size(action, state, _gen(0), traj_length=0.0)
    with pytest.raises(ValueError, match="num_warmup"):
        H.tune_step_size(action, state, _gen(0), num_warmup=0)
    with pytest.raises(ValueError, match="Expected pi"):
        H.leapfrog(torch.zeros(1, 4, 4), torch.zeros(2, 4, 4), action, 0.1, 1)
    with pytest.raises(ValueError, match="Expected phi"):
        H.init(torch.zeros(2, 4, 5, dtype=DT), action)


def test_non_finite_initial_action_raises():
    action = Phi4Action(-4.0, 8.0, (4, 4))
    phi = torch.zeros(3, 4, 4, dtype=DT)
    phi[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="initial action"):
        H.init(phi, action)
    phi[1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="initial action"):
        H.init(phi, action)
