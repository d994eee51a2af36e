r"""Global flow layers: a momentum-space linear layer and a zero-mode (magnetisation) spline.

**Momentum-space scaling.** The Gaussian part of a lattice field is diagonal in momentum space.
:class:`MomentumScaling` multiplies every Fourier mode of its input by a learned positive scale,

.. math::

    \phi = \mathcal F^{-1}\big[\sigma(k)\,\mathcal F[z]\big], \qquad
    \log\Big|\det\frac{\partial\phi}{\partial z}\Big| = \sum_k \log\sigma(k),

with one parameter :math:`\log\sigma` per orbit of :math:`k` under the lattice symmetries (axis
reflections :math:`k_\mu\to-k_\mu` and permutations of axes of equal extent), so the map is real,
linear, translation- and :math:`\mathbb{Z}_2`-equivariant (:math:`z\to-z` gives
:math:`\phi\to-\phi`) and costs :math:`O(V\log V)`. With
:math:`\sigma(k)^{-2} \propto \hat k^2 + m^2` (:math:`\hat k^2 = \sum_\mu 4\sin^2(k_\mu/2)`) it maps
white noise exactly to the free theory (:meth:`MomentumScaling.set_free`); a trained layer carries
the long-distance correlations that local couplings would have to build out of many small steps.
The zero mode :math:`k = 0` is its own orbit. Moved to another lattice size
(:meth:`MomentumScaling.resample_state`), :math:`\sigma^{-2}` is interpolated linearly in
:math:`\hat k^2`, which is exact for a free propagator.

**Zero-mode spline.** Near criticality the magnetisation is far from Gaussian (double-peaked in
the broken phase). :class:`ZeroModeSpline` applies a learned monotone rational-quadratic spline
:math:`g` to the orthonormal zero-mode coordinate :math:`a = \sum_x\phi_x/\sqrt V` only,
:math:`\phi \mapsto \phi + (g(a) - a)/\sqrt V`, with :math:`\log|\det| = \log g'(a)`. With
``odd=True`` the spline is odd, :math:`g(-a) = -g(a)`, so the layer is :math:`\mathbb{Z}_2`
equivariant. The spline acts on :math:`a/\sqrt V = \bar\phi` (the magnetisation density), so its
parameters mean the same thing on every lattice size.

Direction convention as in :mod:`flowmc.couplings`: ``forward`` is prior → field.

References:
    Komijani, Marinkovic, arXiv:2301.01504 (power-spectral-density layer);
    Gerdes, de Haan, Rainone, Bondesan, Cheng, arXiv:2207.00283.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from flowmc.splines import rq_spline

__all__ = ["momentum_orbits", "MomentumScaling", "ZeroModeSpline"]


def _momenta(lattice_shape: Sequence[int]) -> list[np.ndarray]:
    """Integer momentum grids ``n_mu`` (FFT ordering), each of shape ``lattice_shape``."""
    return list(np.meshgrid(*[np.arange(n) for n in lattice_shape], indexing="ij"))


def momentum_orbits(lattice_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    r"""Orbits of the momentum grid under the lattice symmetries.

    Two momenta are in one orbit when they differ by reflections :math:`n_\mu\to L_\mu-n_\mu` and
    permutations of axes of equal extent.

    Args:
        lattice_shape: lattice extents ``(L_1, ..., L_d)``.

    Returns:
        ``(orbit, khat2)``: ``orbit`` of shape ``lattice_shape`` (int64, orbit id of each
        momentum, 0 for the zero mode) and ``khat2`` of shape ``(n_orbits,)``, the lattice momentum
        squared :math:`\hat k^2 = \sum_\mu 4\sin^2(\pi n_\mu/L_\mu)` of each orbit.
    """
    shape = tuple(int(s) for s in lattice_shape)
    grids = _momenta(shape)
    folded = [np.minimum(g, n - g) for g, n in zip(grids, shape)]
    # axes of equal extent may be permuted: sort the folded momenta within each group
    groups: dict[int, list[int]] = {}
    for axis, n in enumerate(shape):
        groups.setdefault(n, []).append(axis)
    keys = np.zeros((*shape, len(shape)), dtype=np.int64)
    col = 0
    for n in sorted(groups):
        axes = groups[n]
        block = np.sort(np.stack([folded[a] for a in axes], axis=-1), axis=-1)
        keys[..., col : col + len(axes)] = block
        col += len(axes)
    flat = keys.reshape(-1, len(shape))
    uniq, inverse = np.unique(flat, axis=0, return_inverse=True)  # zero mode sorts first
    orbit = inverse.reshape(shape).astype(np.int64)
    khat2 = np.zeros(len(uniq))
    lap = sum(4.0 * np.sin(np.pi * g / n) ** 2 for g, n in zip(grids, shape))
    khat2[orbit.ravel()] = lap.ravel()
    return orbit, khat2


class MomentumScaling(nn.Module):
    r"""Linear layer :math:`\phi = \mathcal F^{-1}[\sigma(k)\mathcal F[z]]`, one :math:`\log\sigma`
    per momentum orbit (see the module docstring). Starts as the identity.

    Args:
        lattice_shape: lattice extents ``(L_1, ..., L_d)`` (any dimension).
    """

    def __init__(self, lattice_shape: Sequence[int]) -> None:
        super().__init__()
        self.lattice_shape = tuple(int(s) for s in lattice_shape)
        orbit, khat2 = momentum_orbits(self.lattice_shape)
        self.register_buffer("orbit", torch.from_numpy(orbit), persistent=False)
        self.register_buffer("khat2", torch.from_numpy(khat2), persistent=False)
        counts = np.bincount(orbit.ravel(), minlength=len(khat2))
        self.register_buffer("counts", torch.from_numpy(counts.astype(np.float64)),
                             persistent=False)
        self.log_sigma = nn.Parameter(torch.zeros(len(khat2)))
        self._dims = tuple(range(1, len(self.lattice_shape) + 1))

    @property
    def n_orbits(self) -> int:
        return int(self.log_sigma.numel())

    def _scale(self, sign: float) -> tuple[Tensor, Tensor]:
        """Per-mode factor on the rfft half-grid and the log-det (for ``sign`` = ±1)."""
        ls = self.log_sigma
        full = ls[self.orbit]  # (*L)
        half = full[..., : self.lattice_shape[-1] // 2 + 1]
        log_det = sign * (ls.double() * self.counts).sum().to(ls.dtype)
        return torch.exp(sign * half), log_det

    def _scaled(self, x: Tensor, sign: float) -> tuple[Tensor, Tensor]:
        factor, log_det = self._scale(sign)
        xk = torch.fft.rfftn(x, dim=self._dims)
        y = torch.fft.irfftn(xk * factor.to(xk.real.dtype), s=self.lattice_shape, dim=self._dims)
        return y.to(x.dtype), log_det.expand(x.shape[0])

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._scaled(z, 1.0)

    def inverse(self, phi: Tensor) -> tuple[Tensor, Tensor]:
        return self._scaled(phi, -1.0)

    @torch.no_grad()
    def set_free(self, m2: float, prior_sigma: float = 1.0) -> None:
        r"""Set :math:`\sigma(k) = 1/(\sigma_p\sqrt{2(\hat k^2 + m^2)})`: with an i.i.d.
        :math:`N(0,\sigma_p^2)` prior the output is exactly the free theory of mass :math:`m^2`."""
        if not m2 > 0:
            raise ValueError(f"Expected m2 > 0 for a free propagator; got {m2}")
        var = 1.0 / (2.0 * (self.khat2 + m2))
        self.log_sigma.copy_((0.5 * torch.log(var) - math.log(prior_sigma)).to(self.log_sigma))

    def resample_state(
        self,
        state: dict[str, Tensor],
        old_lattice_shape: Sequence[int],
        new_lattice_shape: Sequence[int],
    ) -> dict[str, Tensor]:
        r"""This layer's state for another lattice: :math:`\sigma^{-2}` linear in :math:`\hat k^2`.

        Args:
            state: ``{"log_sigma": (n_orbits_old,)}`` of a layer on ``old_lattice_shape``.
            old_lattice_shape: the lattice the state was trained on.
            new_lattice_shape: the lattice to move to (the same dimension).

        Returns:
            ``{"log_sigma": (n_orbits_new,)}``.
        """
        if len(old_lattice_shape) != len(new_lattice_shape):
            raise ValueError(
                f"Expected lattices of the same dimension; got {tuple(old_lattice_shape)} and "
                f"{tuple(new_lattice_shape)}"
            )
        old = state["log_sigma"].detach().double().cpu().numpy()
        _, k_old = momentum_orbits(old_lattice_shape)
        _, k_new = momentum_orbits(new_lattice_shape)
        if old.shape != k_old.shape:
            raise ValueError(
                f"Expected log_sigma with {k_old.size} orbits for lattice "
                f"{tuple(old_lattice_shape)}; got {old.shape}"
            )
        inv_var = np.exp(-2.0 * old)
        xs, idx = np.unique(k_old, return_inverse=True)  # average orbits of equal khat2
        ys = np.bincount(idx, weights=inv_var) / np.bincount(idx)
        new_inv_var = np.interp(k_new, xs, ys)  # both grids span [0, 4d] for even extents
        if np.any(new_inv_var <= 0):
            raise ValueError("resampled sigma^-2 is not positive")
        new = -0.5 * np.log(new_inv_var)
        return {"log_sigma": torch.as_tensor(new, dtype=state["log_sigma"].dtype)}

    def extra_repr(self) -> str:
        return f"lattice_shape={self.lattice_shape}, n_orbits={self.n_orbits}"


class ZeroModeSpline(nn.Module):
    r"""A learned monotone spline of the magnetisation density (see the module docstring).

    The spline :math:`h` acts on :math:`\bar\phi = a/\sqrt V` on :math:`[-B, B]` (identity
    outside); :math:`g(a) = \sqrt V\,h(a/\sqrt V)`, so :math:`g'(a) = h'(\bar\phi)`. Starts as the
    identity.

    Args:
        lattice_shape: lattice extents.
        n_bins: spline bins (on the half-interval :math:`[0, B]` when ``odd``).
        bound: half-width :math:`B` of the spline interval, in units of :math:`\bar\phi`.
        odd: make the spline odd (the layer then commutes with :math:`\phi\to-\phi`).
    """

    def __init__(
        self, lattice_shape: Sequence[int], n_bins: int = 8, bound: float = 1.5, odd: bool = True
    ) -> None:
        super().__init__()
        if n_bins < 2:
            raise ValueError(f"Expected n_bins >= 2; got {n_bins}")
        if not bound > 0:
            raise ValueError(f"Expected bound > 0; got {bound}")
        self.lattice_shape = tuple(int(s) for s in lattice_shape)
        self.n_bins, self.bound, self.odd = int(n_bins), float(bound), bool(odd)
        self.raw_w = nn.Parameter(torch.zeros(self.n_bins))
        self.raw_h = nn.Parameter(torch.zeros(self.n_bins))
        # odd: the derivative at the centre knot and at the K-1 interior knots of [0, B]
        self.raw_d = nn.Parameter(torch.zeros(self.n_bins if self.odd else self.n_bins - 1))
        self._dims = tuple(range(1, len(self.lattice_shape) + 1))

    def _params(self) -> tuple[Tensor, Tensor, Tensor]:
        if not self.odd:
            return self.raw_w, self.raw_h, self.raw_d
        # mirror the half-interval spline: bins of [-B, 0] are those of [0, B] reversed; the
        # derivative at 0 is free (a shared parameter), interior ones mirrored
        w = torch.cat([self.raw_w.flip(0), self.raw_w])
        h = torch.cat([self.raw_h.flip(0), self.raw_h])
        d = torch.cat([self.raw_d[1:].flip(0), self.raw_d[:1], self.raw_d[1:]])
        return w, h, d

    def _map(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        mbar = x.flatten(1).mean(1)  # a / sqrt(V)
        w, h, d = self._params()
        bound = self.bound
        new, log_det = rq_spline(
            mbar, w.expand(mbar.shape[0], -1), h.expand(mbar.shape[0], -1),
            d.expand(mbar.shape[0], -1), bound=bound, inverse=inverse,
        )
        shift = (new - mbar).view(-1, *([1] * len(self.lattice_shape)))
        return x + shift, log_det

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._map(z, inverse=False)

    def inverse(self, phi: Tensor) -> tuple[Tensor, Tensor]:
        return self._map(phi, inverse=True)

    def resample_state(
        self,
        state: dict[str, Tensor],
        old_lattice_shape: Sequence[int],
        new_lattice_shape: Sequence[int],
    ) -> dict[str, Tensor]:
        """The spline acts on the magnetisation density: its parameters carry over unchanged."""
        return {k: v.clone() for k, v in state.items()}

    def extra_repr(self) -> str:
        return f"n_bins={self.n_bins}, bound={self.bound}, odd={self.odd}"
