"""The optimised flow passes (issue 20 item 4) compute the same maps as before, up to rounding.

``reference_impl`` keeps the pre-optimisation code verbatim; every test here runs it and the
library side by side on fixed inputs: the shipped checkpoints' ``log q`` and samples, spline
couplings of every conditioner shape (equivariant or not, conditional, a 3x3 output layer, a
conditioner that is not a PeriodicCNN) with their gradients, and the continuous flow's integration
with its gradients. Tolerances: ~1e-5 relative in float32 and ~1e-12 in float64, so a change of
the maths fails while a reordering of sums passes.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from flowmc.flows.cnf import ContinuousFlow
from flowmc.flows.couplings import checkerboard
from flowmc.flows.flow import FlowConfig, build_flow
from flowmc.flows.nets import Blur, PeriodicCNN
from flowmc.flows.splines import SplineCoupling
from flowmc.io.checkpoint import load_checkpoint, load_model, resolve_model_path
from flowmc.io.shipped import shipped_models

from . import reference_impl as ref

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-11)}


def _close(a: Tensor, b: Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    tol = TOL[dtype]
    torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * scale)


def _close_grads(grads: tuple[Tensor, ...], grads_ref: tuple[Tensor, ...], dtype: torch.dtype
                 ) -> None:  # fmt: skip
    """Gradients sum many terms of both signs: compared relative to their largest entry (float32:
    1e-3, the float32 reference's own error against float64 is of that order on these steep
    random splines; float64: 1e-11)."""
    rel = 1e-3 if dtype == torch.float32 else 1e-11
    for a, b in zip(grads, grads_ref, strict=True):
        scale = float(b.abs().max()) + 1e-3
        torch.testing.assert_close(a, b, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(shipped_models()))
def test_shipped_flows_give_the_same_log_q_and_samples(name: str, dtype: torch.dtype) -> None:
    path = resolve_model_path(name)
    saved = load_checkpoint(path)["model_state"]
    flow = load_model(name, dtype=dtype).flow
    # the same entries and shapes as the stored flow (non-persistent helper buffers only added)
    assert {k: tuple(v.shape) for k, v in flow.state_dict().items()} == {
        k: tuple(v.shape) for k, v in saved.items()
    }
    g = torch.Generator().manual_seed(7)
    n = 64 if math.prod(flow.config.lattice_shape) <= 256 else 16  # L = 32: fewer draws
    z = flow.prior.sample(n, generator=g).to(dtype)
    with torch.no_grad():
        phi, ld = flow(z)
        phi_ref, ld_ref = ref.forward(flow, z)
        _close(phi, phi_ref, dtype)
        _close(ld, ld_ref, dtype, scale=10)
        log_q, log_q_ref = flow.log_prob(phi), ref.log_prob(flow, phi)
        # log q is O(V): 1e-5 (1e-12) relative to it
        _close(log_q, log_q_ref, dtype, scale=float(log_q_ref.abs().max()))


def _spline(kind: str, dtype: torch.dtype) -> tuple[SplineCoupling, Tensor | None]:
    shape, k = (8, 6), 5
    blur = Blur(shape, [0, 1.5]) if kind != "plain" else None
    n_ctx = 1 if kind == "conditional" else 0
    cin = 1 + (2 if blur is not None else 0) + n_ctx
    out_kernel = 3 if kind == "out3" else 1
    if kind == "foreign":  # a conditioner that is not a PeriodicCNN
        net: nn.Module = nn.Sequential(
            nn.Conv2d(cin, 7, 3, padding=1, padding_mode="circular"), nn.Tanh(),
            nn.Conv2d(7, 3 * k - 1, 1),
        )
    else:
        net = PeriodicCNN(2, cin, 3 * k - 1, (7, 9), 3, zero_init=False,
                          out_kernel_size=out_kernel)  # fmt: skip
    layer = SplineCoupling(checkerboard(shape, 1), net, n_bins=k, bound=2.0,
                           equivariant=kind != "plain", blur=blur)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(3)
        for p in layer.parameters():
            p.data.normal_(0.0, 0.5)
    ctx = torch.linspace(-1, 1, 12) if kind == "conditional" else None
    return layer.to(dtype), (None if ctx is None else ctx.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["plain", "equivariant", "conditional", "out3", "foreign"])
@pytest.mark.parametrize("chunk_sites", [0, 240])  # whole batch; chunks of 5 samples (5, 5, 2)
def test_spline_coupling_matches_the_reference_with_gradients(
    kind: str, dtype: torch.dtype, chunk_sites: int
) -> None:
    layer, ctx = _spline(kind, dtype)
    layer.chunk_sites = chunk_sites
    x = (1.2 * torch.randn(12, 8, 6, generator=torch.Generator().manual_seed(1))).to(dtype)
    for inverse in (False, True):
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        y, ld = (layer.inverse if inverse else layer)(xs[0], ctx)
        y_ref, ld_ref = ref.spline_transform(layer, xs[1], inverse, ctx)
        _close(y, y_ref, dtype)
        _close(ld, ld_ref, dtype, scale=10)
        w = torch.randn(12, 8, 6, generator=torch.Generator().manual_seed(2)).to(dtype)
        params = list(layer.parameters())
        grads = torch.autograd.grad((y * w).sum() + ld.sum(), [xs[0], *params])
        grads_ref = torch.autograd.grad((y_ref * w).sum() + ld_ref.sum(), [xs[1], *params])
        _close_grads(grads, grads_ref, dtype)


def _cnf(dtype: torch.dtype, degree: int | None = None) -> ContinuousFlow:
    with torch.random.fork_rng():
        torch.manual_seed(5)
        layer = ContinuousFlow((6, 4), n_freq=5, n_channels=3, n_time=3, int_steps=3,
                               degree=degree)  # fmt: skip
        with torch.no_grad():
            layer.weight.normal_(0.0, 0.05)
    return layer.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("chunk_sites", [0, 48])  # whole batch; chunks of 2 samples (2, 2, 1)
def test_continuous_flow_matches_the_reference_with_gradients(
    conditional: bool, dtype: torch.dtype, chunk_sites: int
) -> None:
    layer = _cnf(dtype, degree=2 if conditional else None)
    layer.chunk_sites = chunk_sites
    ctx = torch.linspace(-1, 1, 5).to(dtype) if conditional else None
    x = torch.randn(5, 6, 4, generator=torch.Generator().manual_seed(4)).to(dtype)
    for reverse in (False, True):
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        y, ell = layer.integrate(xs[0], ctx, reverse=reverse)
        y_ref, ell_ref = ref.integrate(layer, xs[1], ctx, reverse=reverse)
        _close(y, y_ref, dtype)
        _close(ell, ell_ref, dtype, scale=10)
        w = torch.randn(5, 6, 4, generator=torch.Generator().manual_seed(2)).to(dtype)
        params = list(layer.parameters())
        grads = torch.autograd.grad((y * w).sum() + ell.sum(), [xs[0], *params])
        grads_ref = torch.autograd.grad((y_ref * w).sum() + ell_ref.sum(), [xs[1], *params])
        _close_grads(grads, grads_ref, dtype)


@pytest.mark.parametrize("coupling", ["spline", "cnf"])
def test_a_training_step_matches_the_reference(coupling: str) -> None:
    """The default recipe's architecture (small) and the cnf recipe's: same loss and gradient."""
    extra = ({"n_bins": 6, "out_kernel": 1, "blur": [0, 2.0], "zero_mode_spectrum": 2}
             if coupling == "spline" else {"n_freq": 4, "n_channels": 3, "int_steps": 4,
                                           "penalty": 0.0})  # fmt: skip
    cfg = FlowConfig((8, 8), n_layers=2, hidden=(6, 6), coupling=coupling, equivariant=True,
                     momentum=True, zero_mode_bins=4 if coupling == "spline" else 0,
                     extra=extra)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(11)
        flow = build_flow(cfg).double()
        with torch.no_grad():
            for p in flow.parameters():
                p.add_(0.05 * torch.randn_like(p))
    z = torch.randn(6, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    phi, ld = flow(z)
    phi_ref, ld_ref = ref.forward(flow, z)
    params = list(flow.parameters())
    grads = torch.autograd.grad((phi**4).sum() + ld.sum(), params)
    grads_ref = torch.autograd.grad((phi_ref**4).sum() + ld_ref.sum(), params)
    _close(phi, phi_ref, torch.float64)
    _close_grads(grads, grads_ref, torch.float64)


@pytest.mark.parametrize(
    ("shape", "kernel", "activation"),
    [((6,), 3, "leaky_relu"), ((4, 6), 3, "tanh"), ((4, 6), 5, "gelu"), ((4, 6), 1, "relu"),
     ((4, 4, 6), 3, "silu"), ((8, 6), 3, "leaky_relu")],
)  # fmt: skip
def test_periodic_cnn_matches_the_conv_stack(
    shape: tuple[int, ...], kernel: int, activation: str
) -> None:
    """PeriodicCNN.forward (one-buffer circular padding, channels-last activations, activations
    in place) against its own nn.Sequential of torch's circular-padding convolutions, with
    gradients; forward_at against the full output at some sites (and the pair symmetrisation)."""
    net = PeriodicCNN(len(shape), 3, 5, (4, 6), kernel, activation, zero_init=False,
                      out_kernel_size=1 if kernel == 3 else kernel).double()  # fmt: skip
    x = torch.randn(4, 3, *shape, dtype=torch.float64, requires_grad=True)
    out, ref_out = net(x), net.net(x)
    _close(out, ref_out, torch.float64)
    w = torch.randn_like(ref_out)
    params = [x, *net.parameters()]
    _close_grads(torch.autograd.grad((out * w).sum(), params),
                 torch.autograd.grad((ref_out * w).sum(), params), torch.float64)  # fmt: skip
    sites = torch.tensor([0, 3, 5])
    full = ref_out.flatten(2)[:, :, sites].movedim(1, 0)  # (C, B, A)
    _close(net.forward_at(x, sites), full, torch.float64)
    perm = torch.tensor([4, 2, 3, 1, 0])
    pair = 0.5 * (full[:, :2] + full[perm][:, 2:])
    _close(net.forward_at(x, sites, pair_perm=perm), pair, torch.float64)
