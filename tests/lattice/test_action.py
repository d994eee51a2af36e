"""Action, force, hopping map and the exact free theory."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from flowmc.lattice.action import FreeTheory, Phi4Action, hopping_to_standard, standard_to_hopping


def naive_action(phi: np.ndarray, m2: float, lam: float) -> float:
    """Site-by-site loop, straight from the definition."""
    shape = phi.shape
    s = 0.0
    for n in itertools.product(*[range(L) for L in shape]):
        x = phi[n]
        for mu in range(len(shape)):
            up = list(n)
            dn = list(n)
            up[mu] = (up[mu] + 1) % shape[mu]
            dn[mu] = (dn[mu] - 1) % shape[mu]
            s += 2 * x * x - x * phi[tuple(up)] - x * phi[tuple(dn)]
        s += m2 * x * x + lam * x**4
    return s


@pytest.mark.parametrize("shape", [(7,), (4, 6), (3, 4, 2), (2, 2)])
def test_action_matches_site_loop(shape):
    gen = torch.Generator().manual_seed(1)
    phi = torch.randn((3, *shape), generator=gen, dtype=torch.float64)
    action = Phi4Action(-4.0, 8.0, shape)
    got = action(phi)
    for b in range(3):
        assert got[b].item() == pytest.approx(naive_action(phi[b].numpy(), -4.0, 8.0), abs=1e-10)


def test_hand_computed_2x2():
    # phi = [[1, 0], [0, 0]]: kinetic per direction 2*1 (site) ; potential m2 + lam
    phi = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    assert Phi4Action(-4.0, 8.0, (2, 2))(phi).item() == pytest.approx(2 * 2 * 1 - 4 + 8)
    phi = torch.ones(1, 2, 2, dtype=torch.float64)
    # constant field: kinetic vanishes, 4 sites * (m2 + lam)
    assert Phi4Action(-4.0, 8.0, (2, 2))(phi).item() == pytest.approx(4 * (-4 + 8))


def test_seed_bug_all_directions_counted():
    # a field varying only along the second axis has kinetic energy the seed's loop missed
    phi = torch.zeros(1, 4, 4, dtype=torch.float64)
    phi[0, :, 0] = 1.0
    a = Phi4Action(1.0, 0.0, (4, 4))
    # along axis 2 each of the 4 unit sites has two zero neighbours: 2*1 each; potential 4*m2
    assert a(phi).item() == pytest.approx(4 * 2 + 4 * 1.0)  # the seed's loop gave 4


@pytest.mark.parametrize("shape", [(6,), (4, 4), (2, 4, 2)])
def test_grad_and_force_match_autograd(shape):
    action = Phi4Action(-4.0, 5.0, shape)
    phi = torch.randn((2, *shape), dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(action(phi).sum(), phi)
    torch.testing.assert_close(action.grad(phi.detach()), g, atol=1e-12, rtol=0)
    torch.testing.assert_close(action.force(phi.detach()), -g, atol=1e-12, rtol=0)


def test_symmetries():
    gen = torch.Generator().manual_seed(3)
    phi = torch.randn(4, 6, 6, generator=gen, dtype=torch.float64)
    a = Phi4Action(-4.0, 8.0, (6, 6))
    s = a(phi)
    torch.testing.assert_close(a(-phi), s)
    torch.testing.assert_close(a(torch.roll(phi, (1, 3), (1, 2))), s)
    torch.testing.assert_close(a(torch.flip(phi, (1,))), s)
    torch.testing.assert_close(a(phi.transpose(1, 2)), s)


def test_float32_and_float64():
    a = Phi4Action(-4.0, 8.0, (8, 8))
    phi = torch.randn(5, 8, 8, dtype=torch.float64)
    assert a(phi.float()).dtype == torch.float32
    torch.testing.assert_close(a(phi.float()).double(), a(phi), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_hopping_round_trip(dim):
    for m2, lam in [(-4.0, 8.0), (-4.0, 1.0), (0.5, 0.0), (-1.0, 0.3)]:
        if lam == 0 and m2 <= 0:
            continue
        kappa, lam_h = standard_to_hopping(m2, lam, dim)
        assert kappa > 0
        m2b, lamb = hopping_to_standard(kappa, lam_h, dim)
        assert m2b == pytest.approx(m2, abs=1e-12) and lamb == pytest.approx(lam, abs=1e-12)


def test_hopping_action_equals_standard():
    kappa, lam_h, shape = 0.3, 0.02, (4, 4)
    phi_h = torch.randn(3, *shape, dtype=torch.float64)
    s_h = (
        -2 * kappa * sum((phi_h * torch.roll(phi_h, -1, mu)) for mu in (1, 2))
        + (1 - 2 * lam_h) * phi_h**2
        + lam_h * phi_h**4
    ).flatten(1).sum(1)
    a = Phi4Action.from_hopping(kappa, lam_h, shape)
    torch.testing.assert_close(a(math.sqrt(kappa) * phi_h), s_h, atol=1e-10, rtol=0)
    k2, l2 = a.to_hopping()
    assert (k2, l2) == pytest.approx((kappa, lam_h))


@pytest.mark.parametrize("shape,m2", [((6,), 0.7), ((4, 4), 0.5), ((2, 4, 2), 1.3)])
def test_free_theory_fft_vs_dense(shape, m2):
    ft = FreeTheory(m2, shape)
    k = ft.precision()
    # the action's Hessian is K: S = 1/2 phi^T K phi
    a = Phi4Action(m2, 0.0, shape)
    phi = torch.randn(1, *shape, dtype=torch.float64)
    v = phi.flatten().numpy()
    assert a(phi).item() == pytest.approx(0.5 * v @ k @ v, rel=1e-12)
    cov = np.linalg.inv(k)
    np.testing.assert_allclose(ft.covariance(), cov, atol=1e-12)
    vol = ft.volume
    assert ft.phi2() == pytest.approx(cov[0, 0], rel=1e-12)
    assert ft.m2_expectation() == pytest.approx(cov.sum(), rel=1e-12)
    assert ft.m2_expectation() == pytest.approx(vol / (2 * m2), rel=1e-12)
    logdet = np.linalg.slogdet(k)[1]
    assert ft.log_z() == pytest.approx(0.5 * vol * math.log(2 * math.pi) - 0.5 * logdet, rel=1e-12)


def test_free_theory_samples_have_exact_covariance():
    ft = FreeTheory(0.8, (4, 4))
    x = ft.sample(40000, generator=torch.Generator().manual_seed(0)).flatten(1).numpy()
    emp = x.T @ x / len(x)
    cov = ft.covariance()
    # each entry's standard error is about sqrt((C_ii C_jj + C_ij^2) / N); allow 5 sigma
    se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / len(x))
    assert np.max(np.abs(emp - cov) / se) < 5.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"m2": -4.0, "lam": -1.0, "lattice_shape": (4, 4)}, "lam"),
        ({"m2": -1.0, "lam": 0.0, "lattice_shape": (4, 4)}, "m2"),
        ({"m2": float("nan"), "lam": 1.0, "lattice_shape": (4, 4)}, "m2"),
        ({"m2": 1.0, "lam": float("inf"), "lattice_shape": (4, 4)}, "lam"),
        ({"m2": 1.0, "lam": 1.0, "lattice_shape": (4, 0)}, "lattice_shape"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Phi4Action(**kwargs)


def test_wrong_field_shape():
    a = Phi4Action(-4.0, 8.0, (8, 8))
    with pytest.raises(ValueError, match=r"Expected phi of shape \(B, 8, 8\)"):
        a(torch.zeros(2, 8, 9))
    with pytest.raises(ValueError, match="Expected phi"):
        a(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="lam == 0"):
        a.free_theory()
    with pytest.raises(ValueError, match="kappa"):
        hopping_to_standard(-0.1, 0.0, 2)
