r"""Lattice :math:`\phi^4` action in any dimension, and the exactly solvable free theory.

Normalisation (Albergo et al., arXiv:1904.12072, eq. 9), periodic boundaries:

.. math::

    S[\phi] = \sum_n \Big[ \sum_{\mu=1}^{d}
              (2\phi_n^2 - \phi_n\phi_{n+\hat\mu} - \phi_n\phi_{n-\hat\mu})
              + m^2 \phi_n^2 + \lambda \phi_n^4 \Big]

so that the quadratic part is :math:`\phi^T (-\Delta + m^2) \phi = \tfrac12 \phi^T K \phi` with
:math:`K = 2(-\Delta + m^2)`. The free theory (:math:`\lambda = 0`, :math:`m^2 > 0`) is the Gaussian
:math:`N(0, K^{-1})`; :class:`FreeTheory` gives its covariance, propagator,
:math:`\langle M^2\rangle`
and :math:`\log Z` exactly (by FFT), for tests and benchmarks.

Fields are tensors of shape ``(B, L_1, ..., L_d)``; every function is batched over ``B``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Phi4Action", "FreeTheory", "hopping_to_standard", "standard_to_hopping", "check_field"]


def _check_shape(lattice_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in lattice_shape)
    if len(shape) < 1:
        raise ValueError("Expected lattice_shape with at least one dimension; got ()")
    if any(s < 1 for s in shape):
        raise ValueError(f"Expected positive lattice extents in lattice_shape; got {shape}")
    return shape


def check_field(phi: Tensor, lattice_shape: tuple[int, ...], name: str = "phi") -> None:
    """Raise ``ValueError`` unless ``phi`` has shape ``(B, *lattice_shape)``.

    Args:
        phi: the field tensor to check.
        lattice_shape: the expected lattice extents ``(L_1, ..., L_d)``.
        name: the argument name used in the error message.

    Raises:
        ValueError: if the trailing dimensions are not ``lattice_shape`` or a batch axis is missing.
    """
    if not isinstance(phi, Tensor):
        raise TypeError(f"Expected {name} to be a torch.Tensor; got {type(phi).__name__}")
    if phi.dim() != len(lattice_shape) + 1 or tuple(phi.shape[1:]) != tuple(lattice_shape):
        raise ValueError(
            f"Expected {name} of shape (B, {', '.join(map(str, lattice_shape))}) for lattice "
            f"{tuple(lattice_shape)}; got {tuple(phi.shape)}"
        )


def _check_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"Expected a finite value for {name}; got {value}")
    return value


def hopping_to_standard(kappa: float, lam_h: float, dim: int) -> tuple[float, float]:
    r"""Map hopping parameters :math:`(\kappa, \lambda_h)` to :math:`(m^2, \lambda)`.

    The hopping form :math:`S = \sum_n[-2\kappa\sum_\mu \varphi_n\varphi_{n+\hat\mu}
    + (1-2\lambda_h)\varphi_n^2 + \lambda_h\varphi_n^4]` equals the standard form under
    :math:`\phi = \sqrt{\kappa}\,\varphi`, :math:`m^2 = (1-2\lambda_h)/\kappa - 2d`,
    :math:`\lambda = \lambda_h/\kappa^2`.

    Args:
        kappa: hopping parameter, > 0.
        lam_h: quartic coupling in the hopping form, >= 0.
        dim: number of lattice dimensions d.

    Returns:
        ``(m2, lam)``.
    """
    kappa = _check_finite("kappa", kappa)
    lam_h = _check_finite("lam_h", lam_h)
    if kappa <= 0:
        raise ValueError(f"Expected kappa > 0; got {kappa}")
    if lam_h < 0:
        raise ValueError(f"Expected lam_h >= 0; got {lam_h}")
    return (1.0 - 2.0 * lam_h) / kappa - 2.0 * dim, lam_h / kappa**2


def standard_to_hopping(m2: float, lam: float, dim: int) -> tuple[float, float]:
    r"""Inverse of :func:`hopping_to_standard`: :math:`(m^2, \lambda) \mapsto (\kappa, \lambda_h)`.

    Solves :math:`2\lambda\kappa^2 + (m^2 + 2d)\kappa - 1 = 0` for the positive root.

    Raises:
        ValueError: if no positive hopping parameter exists (``lam == 0`` and ``m2 + 2d <= 0``).
    """
    m2 = _check_finite("m2", m2)
    lam = _check_finite("lam", lam)
    if lam < 0:
        raise ValueError(f"Expected lam >= 0; got {lam}")
    b = m2 + 2.0 * dim
    if lam == 0:
        if b <= 0:
            raise ValueError(f"Expected m2 > -2*dim when lam == 0; got m2={m2}")
        kappa = 1.0 / b
    else:
        kappa = (-b + math.sqrt(b * b + 8.0 * lam)) / (4.0 * lam)
    return kappa, lam * kappa**2


class Phi4Action:
    r"""The lattice :math:`\phi^4` action, batched, periodic, in any dimension.

    Args:
        m2: bare mass squared :math:`m^2` (may be negative).
        lam: quartic coupling :math:`\lambda \ge 0` (``lam == 0`` requires ``m2 > 0``).
        lattice_shape: lattice extents ``(L_1, ..., L_d)``.

    Example:
        >>> action = Phi4Action(-4.0, 8.0, (8, 8))
        >>> action(torch.zeros(3, 8, 8)).shape
        torch.Size([3])

    References:
        Albergo, Kanwar, Shanahan, arXiv:1904.12072.
    """

    def __init__(self, m2: float, lam: float, lattice_shape: Sequence[int]) -> None:
        self.m2 = _check_finite("m2", m2)
        self.lam = _check_finite("lam", lam)
        self.lattice_shape = _check_shape(lattice_shape)
        if self.lam < 0:
            raise ValueError(
                f"Expected lam >= 0 (the action is unbounded below otherwise); got {lam}"
            )
        if self.lam == 0 and self.m2 <= 0:
            raise ValueError(
                f"Expected m2 > 0 when lam == 0 (the free theory is not normalisable); got m2={m2}"
            )

    @classmethod
    def from_hopping(cls, kappa: float, lam_h: float, lattice_shape: Sequence[int]) -> Phi4Action:
        """Build the action from hopping parameters (see :func:`hopping_to_standard`)."""
        shape = _check_shape(lattice_shape)
        m2, lam = hopping_to_standard(kappa, lam_h, len(shape))
        return cls(m2, lam, shape)

    def to_hopping(self) -> tuple[float, float]:
        """Return ``(kappa, lam_h)``; fields map as ``phi = sqrt(kappa) * phi_h``."""
        return standard_to_hopping(self.m2, self.lam, self.dim)

    @property
    def dim(self) -> int:
        return len(self.lattice_shape)

    @property
    def volume(self) -> int:
        return int(np.prod(self.lattice_shape))

    @property
    def is_z2_symmetric(self) -> bool:
        """The action is invariant under phi -> -phi (always true for phi^4)."""
        return True

    def params(self) -> dict:
        """JSON-serialisable description, stored in checkpoints and ensembles."""
        return {
            "name": "phi4",
            "m2": self.m2,
            "lam": self.lam,
            "lattice_shape": list(self.lattice_shape),
        }

    @classmethod
    def from_params(cls, params: dict) -> Phi4Action:
        if params.get("name", "phi4") != "phi4":
            raise ValueError(f"Expected action params with name 'phi4'; got {params.get('name')!r}")
        return cls(params["m2"], params["lam"], params["lattice_shape"])

    def __repr__(self) -> str:
        return f"Phi4Action(m2={self.m2}, lam={self.lam}, lattice_shape={self.lattice_shape})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Phi4Action) and self.params() == other.params()

    def _axes(self) -> range:
        return range(1, self.dim + 1)

    def _lam(self, phi: Tensor, lam: Tensor | None) -> float | Tensor:
        """The quartic coupling: this action's, or one per configuration ``(B,)``."""
        if lam is None:
            return self.lam
        lam = torch.as_tensor(lam, dtype=phi.dtype, device=phi.device).reshape(-1)
        if lam.shape != (phi.shape[0],):
            raise ValueError(f"Expected lam of shape ({phi.shape[0]},); got {tuple(lam.shape)}")
        return lam.view(-1, *([1] * self.dim))

    def __call__(self, phi: Tensor, lam: Tensor | None = None) -> Tensor:
        """Action :math:`S[\\phi]`.

        Args:
            phi: ``(B, *L)`` field configurations.
            lam: optional ``(B,)`` quartic couplings, one per configuration, replacing
                ``self.lam`` (for training a flow conditioned on the coupling).

        Returns:
            ``(B,)`` action values.
        """
        check_field(phi, self.lattice_shape)
        phi2 = phi * phi
        density = (2 * self.dim + self.m2) * phi2 + self._lam(phi, lam) * phi2 * phi2
        for mu in self._axes():
            # sum_n phi_n phi_{n-mu} == sum_n phi_n phi_{n+mu}, hence the factor 2
            density = density - 2.0 * phi * torch.roll(phi, -1, mu)
        return density.flatten(1).sum(1)

    def grad(self, phi: Tensor, lam: Tensor | None = None) -> Tensor:
        """Analytic gradient :math:`\\partial S/\\partial\\phi_n`, shape ``(B, *L)`` (``lam``
        as in :meth:`__call__`)."""
        check_field(phi, self.lattice_shape)
        out = (4 * self.dim + 2 * self.m2) * phi + 4 * self._lam(phi, lam) * phi * phi * phi
        for mu in self._axes():
            out = out - 2.0 * (torch.roll(phi, -1, mu) + torch.roll(phi, 1, mu))
        return out

    def force(self, phi: Tensor) -> Tensor:
        """HMC force :math:`F = -\\partial S/\\partial\\phi`, shape ``(B, *L)``."""
        return -self.grad(phi)

    def free_theory(self) -> FreeTheory:
        """The exact Gaussian theory for ``lam == 0``.

        Raises:
            ValueError: if ``lam != 0``.
        """
        if self.lam != 0:
            raise ValueError(f"Expected lam == 0 for the exact free theory; got lam={self.lam}")
        return FreeTheory(self.m2, self.lattice_shape)


@dataclass(frozen=True)
class FreeTheory:
    r"""Exact results for the free theory :math:`S = \phi^T(-\Delta + m^2)\phi`, :math:`m^2 > 0`.

    The field is Gaussian with covariance :math:`K^{-1}`, :math:`K = 2(-\Delta + m^2)`, whose
    eigenvalues are :math:`\lambda_k = 2(m^2 + \sum_\mu 4\sin^2(k_\mu/2))`,
    :math:`k_\mu = 2\pi n_\mu/L_\mu`.

    Args:
        m2: mass squared, > 0.
        lattice_shape: lattice extents.
    """

    m2: float
    lattice_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (math.isfinite(self.m2) and self.m2 > 0):
            raise ValueError(f"Expected m2 > 0 for the free theory; got {self.m2}")
        object.__setattr__(self, "lattice_shape", _check_shape(self.lattice_shape))

    @property
    def volume(self) -> int:
        return int(np.prod(self.lattice_shape))

    def eigenvalues(self) -> np.ndarray:
        """Eigenvalues of K on the momentum grid, shape ``lattice_shape`` (FFT ordering)."""
        grids = np.meshgrid(
            *[2 * np.pi * np.fft.fftfreq(n) for n in self.lattice_shape], indexing="ij"
        )
        lap = sum(4 * np.sin(k / 2) ** 2 for k in grids)
        return 2.0 * (self.m2 + lap)

    def propagator(self) -> np.ndarray:
        r"""Exact :math:`G(x) = \langle\phi_y\phi_{y+x}\rangle`, shape ``lattice_shape``."""
        return np.real(np.fft.ifftn(1.0 / self.eigenvalues()))

    def covariance(self) -> np.ndarray:
        """Dense covariance ``K^{-1}`` of the flattened field, ``(V, V)`` (row-major sites)."""
        g = self.propagator()
        coords = np.stack(np.unravel_index(np.arange(self.volume), self.lattice_shape), axis=1)
        diff = (coords[None, :, :] - coords[:, None, :]) % np.array(self.lattice_shape)
        return g[tuple(diff[..., i] for i in range(diff.shape[-1]))]

    def precision(self) -> np.ndarray:
        """Dense K = 2(-Delta + m^2), shape ``(V, V)``, built site by site (for tests)."""
        shape, vol = self.lattice_shape, self.volume
        k = np.zeros((vol, vol))
        for i in range(vol):
            x = np.array(np.unravel_index(i, shape))
            k[i, i] += 2.0 * (self.m2 + 2 * len(shape))
            for mu in range(len(shape)):
                for step in (1, -1):
                    y = x.copy()
                    y[mu] = (y[mu] + step) % shape[mu]
                    k[i, np.ravel_multi_index(tuple(y), shape)] -= 2.0
        return k

    def phi2(self) -> float:
        r""":math:`\langle\phi_x^2\rangle = G(0)`."""
        return float(np.mean(1.0 / self.eigenvalues()))

    def m2_expectation(self) -> float:
        r""":math:`\langle M^2\rangle` with :math:`M = \sum_x\phi_x`; equals :math:`V/(2m^2)`."""
        return self.volume / (2.0 * self.m2)

    def log_z(self) -> float:
        r""":math:`\log Z = \tfrac{V}{2}\log 2\pi - \tfrac12\sum_k \log\lambda_k`."""
        return 0.5 * self.volume * math.log(2 * math.pi) - 0.5 * float(
            np.sum(np.log(self.eigenvalues()))
        )

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> Tensor:
        """Exact independent samples, shape ``(n, *lattice_shape)``, by FFT of white noise."""
        noise = torch.randn((n, *self.lattice_shape), generator=generator, dtype=torch.float64)
        scale = torch.from_numpy(self.eigenvalues() ** -0.5)
        dims = tuple(range(1, len(self.lattice_shape) + 1))
        # real white noise -> Fourier -> scale by lambda_k^{-1/2} -> back: covariance K^{-1}
        phi = torch.fft.ifftn(torch.fft.fftn(noise, dim=dims) * scale, dim=dims).real
        return phi.to(dtype)
