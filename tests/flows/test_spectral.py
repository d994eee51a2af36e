"""Tests for flowmc.flows.spectral: the momentum-space layer and the zero-mode spline.

Exactness in float64: log-det against the autograd Jacobian, inverse round trips, the exact free
theory (log q + S = -log Z for every configuration) at lambda = 0 against ``FreeTheory``,
symmetries (translations by one site, axis permutations, phi -> -phi), and the resampling to a
larger lattice (exact for a free propagator; negative control: a plain copy of the orbit values is
not).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowmc.flows.prior import GaussianPrior
from flowmc.flows.spectral import MomentumScaling, ZeroModeSpline, momentum_orbits
from flowmc.lattice.action import Phi4Action

DT = torch.float64


def _jacobian_log_det(layer: torch.nn.Module, x: torch.Tensor) -> float:
    shape = x.shape
    jac = torch.autograd.functional.jacobian(
        lambda v: layer(v.view(shape))[0].flatten(), x.flatten()
    )
    return float(torch.linalg.slogdet(jac).logabsdet)


def _random_params(layer: torch.nn.Module, seed: int, std: float = 0.4) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in layer.parameters():
            q.copy_(std * torch.randn(q.shape, generator=g, dtype=q.dtype))
    return layer.to(DT)


def test_orbits_of_the_square_and_rectangular_lattice() -> None:
    orbit, khat2 = momentum_orbits((8, 8))
    # (n1, n2) folded to 0..4 and sorted: 15 orbits; the zero mode is orbit 0
    assert khat2.size == 15 and orbit[0, 0] == 0 and khat2[0] == 0.0
    assert orbit[1, 2] == orbit[2, 1] == orbit[7, 6] == orbit[6, 7]  # permutation and reflection
    assert orbit[1, 2] != orbit[1, 3]
    orbit, khat2 = momentum_orbits((4, 6))  # unequal extents: no axis permutation
    assert khat2.size == 3 * 4 and orbit[1, 0] != orbit[0, 1]
    assert np.isclose(khat2.max(), 8.0)  # 4 sin^2(pi/2) per axis


@pytest.mark.parametrize("shape", [(4, 4), (4, 6), (4, 4, 4), (6,)])
def test_momentum_layer_log_det_inverse_and_symmetries(shape: tuple[int, ...]) -> None:
    layer = _random_params(MomentumScaling(shape), seed=1)
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    y, ld = layer(x)
    assert abs(_jacobian_log_det(layer, x) - float(ld[0].detach())) < 1e-10
    x_back, ld_inv = layer.inverse(y)
    assert torch.allclose(x_back, x, atol=1e-12) and torch.allclose(ld_inv, -ld, atol=1e-12)
    assert not torch.allclose(y, x)  # negative control: not the identity
    assert torch.allclose(layer(-x)[0], -y, atol=1e-12)  # linear, hence Z2-odd
    for dim in range(1, len(shape) + 1):  # every translation, not only by two sites
        assert torch.allclose(layer(torch.roll(x, 1, dim))[0], torch.roll(y, 1, dim), atol=1e-12)
    if len(shape) >= 2 and shape[0] == shape[1]:
        xt = x.transpose(1, 2)
        assert torch.allclose(layer(xt)[0], y.transpose(1, 2), atol=1e-12)


def test_momentum_layer_gives_the_exact_free_theory() -> None:
    """With sigma(k) set from the free propagator, log q(phi) + S(phi) = -log Z exactly."""
    shape, m2, sigma = (6, 6), 0.5, 0.7
    action = Phi4Action(m2, 0.0, shape)
    layer = MomentumScaling(shape).to(DT)
    layer.set_free(m2, prior_sigma=sigma)
    prior = GaussianPrior(shape, sigma).to(DT)
    phi = torch.randn(5, *shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    z, ld = layer.inverse(phi)
    log_q = prior.log_prob(z) + ld
    log_z = action.free_theory().log_z()
    assert torch.allclose(log_q + action(phi), torch.full((5,), -log_z, dtype=DT), atol=1e-10)
    # negative control: a mass that is off by 10% is not exact
    layer.set_free(1.1 * m2, prior_sigma=sigma)
    z, ld = layer.inverse(phi)
    assert (prior.log_prob(z) + ld + action(phi) + log_z).abs().max() > 1e-3


def test_momentum_layer_resamples_exactly_for_a_free_propagator() -> None:
    small, big = MomentumScaling((6, 6)), MomentumScaling((12, 12))
    small.set_free(0.3, prior_sigma=0.5)
    big.load_state_dict(small.resample_state(small.state_dict(), (6, 6), (12, 12)))
    ref = MomentumScaling((12, 12))
    ref.set_free(0.3, prior_sigma=0.5)
    assert torch.allclose(big.log_sigma, ref.log_sigma, atol=1e-6)
    # negative control: interpolating log sigma linearly in khat2 is not exact
    _, k_old = momentum_orbits((6, 6))
    _, k_new = momentum_orbits((12, 12))
    xs, idx = np.unique(k_old, return_inverse=True)
    ys = np.bincount(idx, weights=small.log_sigma.detach().double().numpy()) / np.bincount(idx)
    naive = torch.as_tensor(np.interp(k_new, xs, ys), dtype=torch.float32)
    assert (naive - ref.log_sigma).abs().max() > 1e-2
    with pytest.raises(ValueError, match="same dimension"):
        small.resample_state(small.state_dict(), (6, 6), (12, 12, 12))


@pytest.mark.parametrize("odd", [True, False])
def test_zero_mode_spline(odd: bool) -> None:
    shape = (4, 4)
    layer = _random_params(ZeroModeSpline(shape, n_bins=5, bound=0.8, odd=odd), seed=4)
    x = 0.5 * torch.randn(1, *shape, generator=torch.Generator().manual_seed(5), dtype=DT)
    y, ld = layer(x)
    assert abs(_jacobian_log_det(layer, x) - float(ld[0].detach())) < 1e-10
    x_back, ld_inv = layer.inverse(y)
    assert torch.allclose(x_back, x, atol=1e-12) and torch.allclose(ld_inv, -ld, atol=1e-12)
    # only the zero mode moves: y - x is constant over the lattice, and the map is not trivial
    diff = (y - x).detach().flatten()
    assert torch.allclose(diff, diff[0].expand_as(diff), atol=1e-14) and abs(float(diff[0])) > 1e-4
    y_flip, ld_flip = layer(-x)
    if odd:
        assert torch.allclose(y_flip, -y, atol=1e-12) and torch.allclose(ld_flip, ld, atol=1e-12)
    else:  # negative control: a generic spline is not odd
        assert not torch.allclose(y_flip, -y, atol=1e-6)
    # parameters act on the magnetisation density: they carry over to any lattice unchanged
    state = layer.resample_state(layer.state_dict(), shape, (8, 8))
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())


def test_flow_with_global_layers_transfers_to_a_larger_lattice() -> None:
    """transfer_state_dict calls resample_state: a free-theory momentum layer stays exact at 2L,
    the zero-mode spline and the conv weights carry over, the result is a valid flow."""
    from flowmc.flows.flow import FlowConfig, build_flow, transfer_state_dict

    small_cfg = FlowConfig((4, 4), n_layers=2, hidden=(4,), coupling="spline", momentum=True,
                           zero_mode_bins=4, prior_sigma=0.5, extra={"n_bins": 4})
    small = build_flow(small_cfg).to(DT)
    small.layers[0].set_free(0.7, prior_sigma=0.5)
    _random_params(small.layers[1], seed=6)
    big_cfg = FlowConfig.from_dict({**small_cfg.to_dict(), "lattice_shape": [8, 8]})
    big = build_flow(big_cfg).to(DT)
    big.load_state_dict(transfer_state_dict(small.state_dict(), small_cfg, big_cfg))
    ref = MomentumScaling((8, 8)).to(DT)
    ref.set_free(0.7, prior_sigma=0.5)
    assert torch.allclose(big.layers[0].log_sigma, ref.log_sigma, atol=1e-12)
    assert torch.equal(big.layers[1].raw_w, small.layers[1].raw_w)
    assert torch.equal(big.layers[2].net.net[0].weight, small.layers[2].net.net[0].weight)
    phi, log_q = big.sample(4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(big.log_prob(phi), log_q, atol=1e-10, rtol=0)


def test_conditional_flow_is_a_valid_flow_at_every_coupling() -> None:
    """A flow conditioned on lam: exact log-det at several couplings (float64, autograd), the
    couplings really change the map, FlowAt equals passing lam, and lam outside the range or
    lam given to an unconditional flow are refused."""
    from flowmc.flows.flow import FlowConfig, build_flow

    cfg = FlowConfig((4, 4), n_layers=2, hidden=(4,), coupling="spline", momentum=True,
                     zero_mode_bins=4, equivariant=True, condition={"lam": [2.0, 6.0]},
                     extra={"n_bins": 4, "spline_bound": 2.0})
    flow = build_flow(cfg).to(DT)
    torch.manual_seed(3)
    with torch.no_grad():
        for q in flow.parameters():
            q.add_(0.2 * torch.randn_like(q))
    z = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(8), dtype=DT)
    outs = []
    for lam in (2.0, 4.5, 6.0):
        y, ld = flow(z, lam)
        jac = torch.autograd.functional.jacobian(
            lambda v, lam=lam: flow(v.view(1, 4, 4), lam)[0].flatten(), z.flatten()
        )
        assert abs(float(torch.linalg.slogdet(jac).logabsdet) - float(ld[0].detach())) < 1e-10
        assert torch.allclose(flow.inverse(y, lam)[0], z, atol=1e-10)
        assert torch.allclose(flow(-z, lam)[0], -y, atol=1e-12)  # still Z2-equivariant
        outs.append(y)
    assert not torch.allclose(outs[0], outs[2], atol=1e-4)  # the coupling matters
    at = flow.at(4.5)
    phi, log_q = at.sample(3, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(at.log_prob(phi), flow.log_prob(phi, 4.5), atol=1e-12, rtol=0)
    torch.testing.assert_close(at.log_prob(phi), log_q, atol=1e-10, rtol=0)
    per_sample = flow.log_prob(phi, torch.tensor([4.5, 4.5, 4.5], dtype=DT))
    torch.testing.assert_close(per_sample, log_q, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="inside the flow's range"):
        flow.at(6.5)
    with pytest.raises(ValueError, match="inside the flow's range"):
        flow.log_prob(phi, 1.0)
    with pytest.raises(ValueError, match="Expected lam in"):
        flow.log_prob(phi)
    plain = build_flow(FlowConfig((4, 4), n_layers=2, hidden=(4,)))
    with pytest.raises(ValueError, match="Expected a conditional flow"):
        plain.at(4.0)
    with pytest.raises(ValueError, match="not conditional"):
        plain.log_prob(phi.float(), 4.0)
    with pytest.raises(ValueError, match="lam range"):
        FlowConfig((4, 4), condition={"lam": [5.0, 3.0]})


def test_conditional_training_matches_the_action_at_each_coupling() -> None:
    """Per-sample couplings in the loss: S(phi, lam=vector) equals S at each lam, and a short
    training run of a conditional flow lowers F_q at both ends of its range."""
    from flowmc.flows.flow import FlowConfig, build_flow
    from flowmc.training.train import TrainConfig, Trainer

    phi = torch.randn(3, 4, 4, dtype=DT, generator=torch.Generator().manual_seed(1))
    lam = torch.tensor([1.0, 2.0, 7.5], dtype=DT)
    per = Phi4Action(-1.0, 0.5, (4, 4))(phi, lam=lam)
    for i in range(3):
        assert torch.allclose(per[i], Phi4Action(-1.0, float(lam[i]), (4, 4))(phi[i : i + 1])[0])
    torch.manual_seed(0)
    cfg = FlowConfig((4, 4), n_layers=2, hidden=(8,), coupling="spline", momentum=True,
                     prior_sigma=0.5, condition={"lam": [2.0, 8.0]},
                     extra={"n_bins": 6, "spline_bound": 2.5})
    flow = build_flow(cfg).to(DT)

    def f_q(lam_value: float) -> float:
        with torch.no_grad():
            x, lq = flow.at(lam_value).sample(2000, generator=torch.Generator().manual_seed(2))
            return float((lq + Phi4Action(-4.0, lam_value, (4, 4))(x)).mean())

    before = [f_q(2.0), f_q(8.0)]
    Trainer(flow, Phi4Action(-4.0, 5.0, (4, 4)), TrainConfig(n_steps=150, batch_size=128, lr=5e-3),
            generator=torch.Generator().manual_seed(3)).run(progress=False)
    after = [f_q(2.0), f_q(8.0)]
    assert after[0] < before[0] - 0.5 and after[1] < before[1] - 0.5, (before, after)


@pytest.mark.parametrize("conditional", [False, True])
def test_zero_mode_spectrum(conditional: bool) -> None:
    from flowmc.flows.spectral import ZeroModeSpectrum

    layer = _random_params(ZeroModeSpectrum((4, 4), powers=2, scale=0.4,
                                            degree=2 if conditional else None), seed=10)
    ctx = torch.tensor([0.3], dtype=DT) if conditional else None
    x = 0.6 * torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(11), dtype=DT) + 0.2
    y, ld = layer(x, ctx)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v.view(1, 4, 4), ctx)[0].flatten(),
                                             x.flatten())
    assert abs(float(torch.linalg.slogdet(jac).logabsdet) - float(ld[0].detach())) < 1e-10
    x_back, ld_inv = layer.inverse(y, ctx)
    assert torch.allclose(x_back, x, atol=1e-12) and torch.allclose(ld_inv, -ld, atol=1e-12)
    assert torch.allclose(y.mean(), x.mean(), atol=1e-14)  # the zero mode is untouched
    assert torch.allclose(layer(-x, ctx)[0], -y, atol=1e-12)  # even in the magnetisation
    # the scales really depend on the magnetisation: shifting the mean changes the other modes
    y2, _ = layer(x + 0.5, ctx)
    assert not torch.allclose(y2 - y2.mean(), y - y.mean(), atol=1e-6)
    state = layer.resample_state(layer.state_dict(), (4, 4), (8, 8))
    assert state["coef"].shape[0] == 15 and torch.all(state["coef"][0] == 0)
