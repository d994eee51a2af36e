"""Tests for flowmc.flows.flow, flowmc.flows.couplings and flowmc.flows.splines.

Exactness (STYLE.md 6.2): log-det against the autograd Jacobian in float64 on 4x4, the Jacobian
structure of one coupling layer, inverse log-det = -forward, round trips, symmetries
(translation by 2 sites, phi -> -phi for equivariant flows), eval() == train(), checkpoint
round trip. Statistics (STYLE.md 6.1): on the exactly solvable free theory the variational bound
F_q >= -log Z holds and the importance estimate of Z is unbiased, for untrained and briefly
trained flows. Everything is seeded and runs on one thread in a few seconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowmc.flows.couplings import checkerboard
from flowmc.flows.flow import Flow, FlowConfig, build_flow
from flowmc.flows.splines import rq_spline
from flowmc.io.checkpoint import load_model, save_checkpoint
from flowmc.lattice.action import Phi4Action
from flowmc.training.train import TrainConfig, Trainer

DT = torch.float64
SHAPE = (4, 4)
CONFIGS = {
    "affine": {"coupling": "affine"},
    "affine-equivariant": {"coupling": "affine", "equivariant": True},
    "affine-tanh": {"coupling": "affine", "activation": "tanh", "kernel_size": 5},
    "spline": {"coupling": "spline", "extra": {"n_bins": 6, "spline_bound": 2.0}},
    "spline-equivariant": {"coupling": "spline", "equivariant": True,
                           "extra": {"n_bins": 6, "spline_bound": 2.0}},
    "momentum-spline-zeromode": {"coupling": "spline", "momentum": True, "zero_mode_bins": 4,
                                 "extra": {"n_bins": 6, "spline_bound": 2.0}},
    "spline-blur": {"coupling": "spline", "extra": {"n_bins": 6, "spline_bound": 2.0,
                                                    "blur": [1.5, 0], "out_kernel": 1}},
    "momentum-equivariant-zeromode-last": {
        "coupling": "spline", "equivariant": True, "momentum": True, "zero_mode_bins": 4,
        "extra": {"n_bins": 6, "spline_bound": 2.0, "zero_mode_bound": 0.8,
                  "zero_mode_position": "last", "blur": [0]}},
    "momentum-equivariant-zeromode-spectrum": {
        "coupling": "spline", "equivariant": True, "momentum": True, "zero_mode_bins": 4,
        "extra": {"n_bins": 6, "spline_bound": 2.0, "zero_mode_spectrum": 2,
                  "zero_mode_scale": 0.3}},
}
#: the flows whose every layer is odd (with an even prior: q(-phi) = q(phi))
EQUIVARIANT = ("affine-equivariant", "spline-equivariant", "momentum-equivariant-zeromode-last",
               "momentum-equivariant-zeromode-spectrum")


def _randomised(kind: str, n_layers: int = 4, shape: tuple[int, ...] = SHAPE, std: float = 0.2,
                seed: int = 0) -> Flow:
    """A float64 flow whose last conditioner layers are non-zero (so it is not the identity)."""
    torch.manual_seed(seed)
    flow = build_flow(FlowConfig(shape, n_layers=n_layers, hidden=(6, 6), **CONFIGS[kind])).to(DT)
    with torch.no_grad():
        for layer in flow.layers:
            if hasattr(layer, "net"):
                last = layer.net.net[-1]
                last.weight.normal_(0.0, std)
                if last.bias is not None:
                    last.bias.normal_(0.0, std)
            else:  # global layers (momentum scaling, zero-mode spline): all parameters
                for q in layer.parameters():
                    q.normal_(0.0, std)
    return flow


def _jacobian(fn, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    shape = x.shape
    return torch.autograd.functional.jacobian(lambda v: fn(v.view(shape))[0].flatten(),
                                              x.flatten())


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_round_trip_and_inverse_log_det(kind: str) -> None:
    flow = _randomised(kind)
    z = 1.3 * torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=DT)
    phi, ld = flow(z)
    z_back, ld_inv = flow.inverse(phi)
    assert torch.allclose(z_back, z, atol=1e-10)
    assert torch.allclose(ld_inv, -ld, atol=1e-10)
    assert not torch.allclose(phi, z)  # negative control: the flow is not the identity


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_log_det_matches_autograd_jacobian(kind: str) -> None:
    flow = _randomised(kind)
    z = 1.3 * torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=DT)
    jac = _jacobian(flow, z)
    _, ld = flow(z)
    assert torch.allclose(torch.linalg.slogdet(jac).logabsdet, ld[0], atol=1e-10)
    # and the inverse: log|det dz/dphi| at phi = f(z)
    phi = flow(z)[0]
    jac_inv = _jacobian(flow.inverse, phi)
    assert torch.allclose(torch.linalg.slogdet(jac_inv).logabsdet, flow.inverse(phi)[1][0],
                          atol=1e-10)


@pytest.mark.parametrize(
    "kind", ["affine", "affine-equivariant", "spline", "spline-equivariant", "spline-blur"]
)
def test_single_layer_jacobian_structure(kind: str) -> None:
    """Frozen rows are identity; active sites depend only on themselves and frozen sites."""
    layer = _randomised(kind).layers[0]
    mask = layer.mask.flatten().bool()
    z = 1.3 * torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=DT)
    jac = _jacobian(layer, z)
    eye = torch.eye(mask.numel(), dtype=DT)
    assert torch.equal(jac[~mask], eye[~mask])  # frozen sites pass through
    active_block = jac[mask][:, mask]
    assert torch.equal(active_block, torch.diag(torch.diagonal(active_block)))  # elementwise
    diag = torch.diagonal(jac)
    assert torch.allclose(diag.abs().log().sum(), layer(z)[1][0], atol=1e-10)
    assert jac[mask][:, ~mask].abs().sum() > 0  # negative control: conditioning is active


def test_checkerboard_masks_and_odd_extent() -> None:
    m0, m1 = checkerboard((4, 6), 0), checkerboard((4, 6), 1)
    assert torch.equal(m0 + m1, torch.ones(4, 6))
    assert torch.equal(m0, torch.roll(m1, 1, 0))
    with pytest.raises(ValueError, match="even lattice extents"):
        checkerboard((5, 4), 0)
    with pytest.raises(ValueError, match="even lattice extents"):
        build_flow(FlowConfig((6, 5)))


def test_bad_configs_raise() -> None:
    with pytest.raises(ValueError, match="coupling"):
        FlowConfig(SHAPE, coupling="nope")
    with pytest.raises(ValueError, match="zero_mode_bins"):
        FlowConfig(SHAPE, zero_mode_bins=1)
    with pytest.raises(ValueError, match="zero_mode_position"):
        FlowConfig(SHAPE, zero_mode_bins=4, extra={"zero_mode_position": "middle"})


def test_spline_is_identity_outside_bound_and_at_init() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.tensor([-7.0, -2.0, 2.5, 9.0], dtype=DT)
    raw = [torch.randn(4, k, generator=g, dtype=DT) for k in (5, 5, 4)]
    y, ld = rq_spline(x, *raw, bound=2.0)
    assert torch.equal(y, x) and torch.equal(ld, torch.zeros_like(ld))
    x = torch.linspace(-1.9, 1.9, 11, dtype=DT)
    zeros = [torch.zeros(11, k, dtype=DT) for k in (5, 5, 4)]
    y, ld = rq_spline(x, *zeros, bound=2.0)
    assert torch.allclose(y, x, atol=1e-12) and torch.allclose(ld, torch.zeros_like(ld), atol=1e-12)
    # monotone and continuous across the boundary with random parameters
    x = torch.linspace(-3, 3, 2001, dtype=DT)
    raw = [torch.randn(1, k, generator=g, dtype=DT).expand(2001, k) for k in (5, 5, 4)]
    y, _ = rq_spline(x, *raw, bound=2.0)
    assert (y.diff() > 0).all() and y.diff().max() < 0.1


@pytest.mark.parametrize("kind", EQUIVARIANT)
def test_z2_equivariance(kind: str) -> None:
    flow = _randomised(kind)
    z = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(5), dtype=DT)
    assert torch.allclose(flow(-z)[0], -flow(z)[0], atol=1e-12)
    phi = flow(z)[0]
    assert torch.allclose(flow.log_prob(-phi), flow.log_prob(phi), atol=1e-10)
    plain = _randomised({"affine-equivariant": "affine", "spline-equivariant": "spline"}.get(
        kind, "momentum-spline-zeromode"))
    # negative control: the same family without equivariant couplings is not odd
    assert not torch.allclose(plain(-z)[0], -plain(z)[0], atol=1e-6)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_translation_by_two_equivariance(kind: str) -> None:
    flow = _randomised(kind, shape=(4, 6))
    z = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(6), dtype=DT)
    for shift, dim in ((2, 1), (2, 2), (-2, 2)):
        assert torch.allclose(flow(torch.roll(z, shift, dim))[0],
                              torch.roll(flow(z)[0], shift, dim), atol=1e-12)
    # negative control: a shift by one site swaps the checkerboard parities
    assert not torch.allclose(flow(torch.roll(z, 1, 1))[0], torch.roll(flow(z)[0], 1, 1),
                              atol=1e-6)


def test_eval_equals_train_and_checkpoint_round_trip(tmp_path) -> None:  # noqa: ANN001
    flow = _randomised("spline")
    action = Phi4Action(-4.0, 8.0, SHAPE)
    phi = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(7), dtype=DT)
    flow.train()
    lp_train = flow.log_prob(phi)
    flow.eval()
    assert torch.equal(flow.log_prob(phi), lp_train)
    path = tmp_path / "flow.pt"
    save_checkpoint(path, flow, action, symmetric=False)
    model = load_model(path, dtype=DT)
    assert model.flow.config == flow.config
    assert torch.allclose(model.flow.log_prob(phi), lp_train, atol=1e-12)
    assert model.action == action


def _free_theory_checks(flow: Flow, action: Phi4Action, n: int, seed: int) -> None:
    """F_q >= -log Z - 3 MCSE and |Z_hat - Z| < 4 SE (Z_hat = mean of e^{-S}/q is unbiased)."""
    log_z = action.free_theory().log_z()
    with torch.no_grad():
        phi, log_q = flow.sample(n, generator=torch.Generator().manual_seed(seed))
        log_w = -action(phi) - log_q
    f = -log_w
    assert f.mean() >= -log_z - 3 * f.std() / math.sqrt(n)
    w = torch.exp(log_w - log_z)  # Z_hat / Z per sample, mean 1
    se = w.std() / math.sqrt(n)
    assert abs(w.mean() - 1) < 4 * se, (float(w.mean()), float(se))


@pytest.mark.parametrize("kind", ["affine", "spline"])
def test_free_theory_bound_and_unbiased_z(kind: str) -> None:
    """Free theory m^2=1 on 4x4 (exact log Z): untrained and after 150 training steps.

    A sign error in the log-det or a missing prior normaliser shifts F_q by O(V) and breaks
    the bound or Z_hat by many standard errors.
    """
    action = Phi4Action(1.0, 0.0, SHAPE)
    torch.manual_seed(0)
    cfg = FlowConfig(SHAPE, n_layers=4, hidden=(8,), prior_sigma=0.5, **CONFIGS[kind])
    flow = build_flow(cfg).to(DT)
    _free_theory_checks(flow, action, 4000, seed=11)
    trainer = Trainer(flow, action, TrainConfig(n_steps=150, batch_size=128, lr=5e-3),
                      generator=torch.Generator().manual_seed(12))
    trainer.run(progress=False)
    assert trainer.history["ess"][-1] > trainer.history["ess"][0]
    _free_theory_checks(flow, action, 4000, seed=13)


def test_wrong_normalisation_is_caught() -> None:
    """Negative control for the Z check: dropping the prior normaliser fails it."""
    action = Phi4Action(1.0, 0.0, SHAPE)
    flow = build_flow(FlowConfig(SHAPE, n_layers=2, hidden=(4,))).to(DT)
    log_z = action.free_theory().log_z()
    with torch.no_grad():
        z = flow.prior.sample(4000, generator=torch.Generator().manual_seed(14))
        phi, ld = flow(z)
        log_q_bad = -0.5 * z.pow(2).flatten(1).sum(1) - ld  # no -V/2 log 2 pi
        w = torch.exp(-action(phi) - log_q_bad - log_z)
    assert abs(w.mean() - 1) > 4 * w.std() / math.sqrt(4000)
