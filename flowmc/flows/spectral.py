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

**Conditional layers.** Given ``degree`` (for a flow conditioned on a coupling, see
:class:`flowmc.flows.flow.FlowConfig` ``condition``), each parameter becomes a polynomial of that
degree in the normalised context :math:`t\in[-1, 1]` (one value per sample), so one layer serves a
whole range of couplings.

Direction convention as in :mod:`flowmc.flows.couplings`: ``forward`` is prior → field.

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

from flowmc.flows.splines import rq_spline

__all__ = [
    "momentum_orbits", "MomentumScaling", "ZeroModeSpline", "ZeroModeSpectrum", "poly_basis",
]


def poly_basis(context: Tensor | None, degree: int | None, like: Tensor) -> Tensor | None:
    """``(B, degree + 1)`` powers :math:`t^0..t^{degree}` of a context ``(B,)``; ``None`` for an
    unconditional layer (``degree is None``).

    Raises:
        ValueError: if a conditional layer gets no context or an unconditional one gets one.
    """
    if degree is None:
        if context is not None:
            raise ValueError("Expected no context for an unconditional layer")
        return None
    if context is None:
        raise ValueError("Expected a context (B,) for a conditional layer; got None")
    t = context.reshape(-1).to(like.dtype)
    return torch.stack([t**p for p in range(degree + 1)], 1)


def _chebyshev_nodes(n: int) -> np.ndarray:
    return np.cos(np.pi * (np.arange(n) + 0.5) / n)


def _scale_modes(
    x: Tensor, log_scale: Tensor, orbit: Tensor, counts: Tensor, sign: float,
    lattice_shape: tuple[int, ...],
) -> tuple[Tensor, Tensor]:
    """Multiply every Fourier mode of ``x`` by ``exp(sign * log_scale[orbit])``.

    Args:
        x: ``(B, *L)`` fields.
        log_scale: ``(n_orbits,)`` or, per sample, ``(B, n_orbits)`` log scales.
        orbit: ``(*L)`` orbit id of each momentum; counts: ``(n_orbits,)`` momenta per orbit.
        sign: ``+1`` (forward) or ``-1`` (inverse).
        lattice_shape: ``L``.

    Returns:
        ``(y, log_det)``: the scaled fields and ``sign * sum_k log_scale(k)`` per sample.
    """
    dims = tuple(range(1, len(lattice_shape) + 1))
    half = log_scale[..., orbit[..., : lattice_shape[-1] // 2 + 1]]  # (B?, *half)
    log_det = sign * (log_scale.double() * counts).sum(-1).to(log_scale.dtype)
    xk = torch.fft.rfftn(x, dim=dims)
    y = torch.fft.irfftn(xk * torch.exp(sign * half).to(xk.real.dtype), s=lattice_shape, dim=dims)
    return y.to(x.dtype), log_det.expand(x.shape[0])


def _interp_in_khat2(
    values: np.ndarray, old_lattice_shape: Sequence[int], new_lattice_shape: Sequence[int],
) -> np.ndarray:
    r"""Per-orbit ``values (n_old, ...)`` on another lattice: averaged over orbits of equal
    :math:`\hat k^2`, interpolated linearly in :math:`\hat k^2`; returns ``(n_new, ...)``."""
    _, k_old = momentum_orbits(old_lattice_shape)
    _, k_new = momentum_orbits(new_lattice_shape)
    if values.shape[0] != k_old.size:
        raise ValueError(
            f"Expected {k_old.size} orbit values for lattice {tuple(old_lattice_shape)}; got "
            f"{values.shape[0]}"
        )
    xs, idx = np.unique(k_old, return_inverse=True)
    flat = values.reshape(len(k_old), -1)
    out = np.empty((len(k_new), flat.shape[1]))
    for j in range(flat.shape[1]):  # both grids span [0, 4d] for even extents
        ys = np.bincount(idx, weights=flat[:, j]) / np.bincount(idx)
        out[:, j] = np.interp(k_new, xs, ys)
    return out.reshape(len(k_new), *values.shape[1:])


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
        degree: ``None`` (unconditional, ``log_sigma`` of shape ``(n_orbits,)``), or the degree of
            the polynomial in the context (``log_sigma`` of shape ``(n_orbits, degree + 1)``).
    """

    def __init__(self, lattice_shape: Sequence[int], degree: int | None = None) -> None:
        super().__init__()
        self.lattice_shape = tuple(int(s) for s in lattice_shape)
        self.degree = None if degree is None else int(degree)
        orbit, khat2 = momentum_orbits(self.lattice_shape)
        self.register_buffer("orbit", torch.from_numpy(orbit), persistent=False)
        self.register_buffer("khat2", torch.from_numpy(khat2), persistent=False)
        counts = np.bincount(orbit.ravel(), minlength=len(khat2))
        self.register_buffer("counts", torch.from_numpy(counts.astype(np.float64)),
                             persistent=False)
        shape = (len(khat2),) if self.degree is None else (len(khat2), self.degree + 1)
        self.log_sigma = nn.Parameter(torch.zeros(shape))

    @property
    def n_orbits(self) -> int:
        return int(self.log_sigma.shape[0])

    def orbit_log_sigma(self, context: Tensor | None = None) -> Tensor:
        r""":math:`\log\sigma` per orbit: ``(n_orbits,)``, or ``(B, n_orbits)`` with a context."""
        basis = poly_basis(context, self.degree, self.log_sigma)
        return self.log_sigma if basis is None else basis @ self.log_sigma.t()

    def _scaled(self, x: Tensor, sign: float, context: Tensor | None) -> tuple[Tensor, Tensor]:
        ls = self.orbit_log_sigma(context)  # (n_orbits,) or (B, n_orbits)
        return _scale_modes(x, ls, self.orbit, self.counts, sign, self.lattice_shape)

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._scaled(z, 1.0, context)

    def inverse(self, phi: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._scaled(phi, -1.0, context)

    @torch.no_grad()
    def set_free(self, m2: float, prior_sigma: float = 1.0) -> None:
        r"""Set :math:`\sigma(k) = 1/(\sigma_p\sqrt{2(\hat k^2 + m^2)})`: with an i.i.d.
        :math:`N(0,\sigma_p^2)` prior the output is exactly the free theory of mass :math:`m^2`."""
        if not m2 > 0:
            raise ValueError(f"Expected m2 > 0 for a free propagator; got {m2}")
        var = 1.0 / (2.0 * (self.khat2 + m2))
        value = (0.5 * torch.log(var) - math.log(prior_sigma)).to(self.log_sigma)
        if self.degree is None:
            self.log_sigma.copy_(value)
        else:  # the constant term; no dependence on the context
            self.log_sigma.zero_()
            self.log_sigma[:, 0] = value

    def resample_state(
        self,
        state: dict[str, Tensor],
        old_lattice_shape: Sequence[int],
        new_lattice_shape: Sequence[int],
    ) -> dict[str, Tensor]:
        r"""This layer's state for another lattice: :math:`\sigma^{-2}` linear in :math:`\hat k^2`.

        For a conditional layer the map is applied at ``degree + 1`` Chebyshev nodes of the context
        and the polynomial through the resampled values is taken.

        Args:
            state: ``{"log_sigma": (n_orbits_old,) or (n_orbits_old, degree + 1)}`` of a layer on
                ``old_lattice_shape``.
            old_lattice_shape: the lattice the state was trained on.
            new_lattice_shape: the lattice to move to (the same dimension).

        Returns:
            ``{"log_sigma": ...}`` with ``n_orbits_new`` rows.
        """
        if len(old_lattice_shape) != len(new_lattice_shape):
            raise ValueError(
                f"Expected lattices of the same dimension; got {tuple(old_lattice_shape)} and "
                f"{tuple(new_lattice_shape)}"
            )
        old = state["log_sigma"].detach().double().cpu().numpy()

        def resample(log_sigma: np.ndarray) -> np.ndarray:  # sigma^-2 linear in khat^2
            inv_var = _interp_in_khat2(np.exp(-2.0 * log_sigma), old_lattice_shape,
                                       new_lattice_shape)  # fmt: skip
            return -0.5 * np.log(inv_var)

        if old.ndim == 1:
            new = resample(old)
        else:  # values at Chebyshev nodes -> resample -> the interpolating polynomial
            nodes = _chebyshev_nodes(old.shape[1])
            vander = np.vander(nodes, old.shape[1], increasing=True)  # (P, P)
            values = np.stack([resample(old @ vander[i]) for i in range(len(nodes))])
            new = np.linalg.solve(vander, values).T  # (n_orbits_new, P)
        return {"log_sigma": torch.as_tensor(new, dtype=state["log_sigma"].dtype)}

    def extra_repr(self) -> str:
        return f"lattice_shape={self.lattice_shape}, n_orbits={self.n_orbits}, degree={self.degree}"


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
        degree: ``None`` (unconditional) or the degree of each parameter's polynomial in the
            context.
    """

    def __init__(
        self, lattice_shape: Sequence[int], n_bins: int = 8, bound: float = 1.5, odd: bool = True,
        degree: int | None = None,
    ) -> None:
        super().__init__()
        if n_bins < 2:
            raise ValueError(f"Expected n_bins >= 2; got {n_bins}")
        if not bound > 0:
            raise ValueError(f"Expected bound > 0; got {bound}")
        self.lattice_shape = tuple(int(s) for s in lattice_shape)
        self.n_bins, self.bound, self.odd = int(n_bins), float(bound), bool(odd)
        self.degree = None if degree is None else int(degree)
        tail = () if self.degree is None else (self.degree + 1,)
        self.raw_w = nn.Parameter(torch.zeros(self.n_bins, *tail))
        self.raw_h = nn.Parameter(torch.zeros(self.n_bins, *tail))
        # odd: the derivative at the centre knot and at the K-1 interior knots of [0, B]
        n_d = self.n_bins if self.odd else self.n_bins - 1
        self.raw_d = nn.Parameter(torch.zeros(n_d, *tail))

    def _params(self, n: int, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Raw spline parameters per sample: ``(n, K)``, ``(n, K)``, ``(n, K - 1)``."""
        basis = poly_basis(context, self.degree, self.raw_w)
        w, h, d = (
            (r.expand(n, -1) if basis is None else basis @ r.t())
            for r in (self.raw_w, self.raw_h, self.raw_d)
        )
        if not self.odd:
            return w, h, d
        # mirror the half-interval spline: bins of [-B, 0] are those of [0, B] reversed; the
        # derivative at 0 is free (a shared parameter), interior ones mirrored
        w = torch.cat([w.flip(1), w], 1)
        h = torch.cat([h.flip(1), h], 1)
        d = torch.cat([d[:, 1:].flip(1), d[:, :1], d[:, 1:]], 1)
        return w, h, d

    def _map(self, x: Tensor, inverse: bool, context: Tensor | None) -> tuple[Tensor, Tensor]:
        mbar = x.flatten(1).mean(1)  # a / sqrt(V)
        w, h, d = self._params(mbar.shape[0], context)
        new, log_det = rq_spline(mbar, w, h, d, bound=self.bound, inverse=inverse)
        shift = (new - mbar).view(-1, *([1] * len(self.lattice_shape)))
        return x + shift, log_det

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._map(z, False, context)

    def inverse(self, phi: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._map(phi, True, context)

    def resample_state(
        self,
        state: dict[str, Tensor],
        old_lattice_shape: Sequence[int],
        new_lattice_shape: Sequence[int],
    ) -> dict[str, Tensor]:
        """The spline acts on the magnetisation density: its parameters carry over unchanged."""
        return {k: v.clone() for k, v in state.items()}

    def extra_repr(self) -> str:
        return f"n_bins={self.n_bins}, bound={self.bound}, odd={self.odd}, degree={self.degree}"


class ZeroModeSpectrum(nn.Module):
    r"""Momentum scales that depend on the magnetisation: the long-distance Gaussian part of the
    field differs between ordered configurations (:math:`|\bar\phi|` large) and the mixed ones in
    between (domain walls, :math:`\bar\phi\approx 0`).

    Every non-zero mode is multiplied by :math:`\exp\sum_{p=1}^{D} a_{k,p}\,u^p`, with
    :math:`u = \tanh(\bar x^2/s^2)` a function of the input's zero mode :math:`\bar x` (the mean
    over the lattice), which the layer leaves unchanged; the Jacobian is therefore triangular
    with :math:`\log|\det| = \sum_{k\ne0}\sum_p a_{k,p}u^p`, and the inverse reads :math:`u` off
    its input just as well. :math:`u` is even in :math:`\bar x`, so the layer is
    :math:`\mathbb{Z}_2` equivariant. One coefficient per momentum orbit and power (zero at
    initialisation: the identity); with a context (``degree``) each is a polynomial in it.

    Args:
        lattice_shape: lattice extents.
        powers: :math:`D`, the highest power of :math:`u`.
        scale: :math:`s`, the magnetisation-density scale of :math:`u`.
        degree: ``None`` (unconditional) or the degree of the polynomial in the context.
    """

    def __init__(
        self, lattice_shape: Sequence[int], powers: int = 2, scale: float = 0.5,
        degree: int | None = None,
    ) -> None:
        super().__init__()
        if powers < 1:
            raise ValueError(f"Expected powers >= 1; got {powers}")
        if not scale > 0:
            raise ValueError(f"Expected scale > 0; got {scale}")
        self.lattice_shape = tuple(int(s) for s in lattice_shape)
        self.powers, self.scale = int(powers), float(scale)
        self.degree = None if degree is None else int(degree)
        orbit, khat2 = momentum_orbits(self.lattice_shape)
        self.register_buffer("orbit", torch.from_numpy(orbit), persistent=False)
        counts = np.bincount(orbit.ravel(), minlength=len(khat2)).astype(np.float64)
        counts[0] = 0.0  # the zero mode is not scaled
        self.register_buffer("counts", torch.from_numpy(counts), persistent=False)
        keep = torch.ones(len(khat2))
        keep[0] = 0.0
        self.register_buffer("keep", keep, persistent=False)
        tail = () if self.degree is None else (self.degree + 1,)
        self.coef = nn.Parameter(torch.zeros(len(khat2), self.powers, *tail))

    def _scaled(self, x: Tensor, sign: float, context: Tensor | None) -> tuple[Tensor, Tensor]:
        mbar = x.flatten(1).mean(1)
        u = torch.tanh((mbar / self.scale) ** 2)
        upow = torch.stack([u**p for p in range(1, self.powers + 1)], 1)  # (B, D)
        basis = poly_basis(context, self.degree, self.coef)
        coef = self.coef if basis is None else torch.einsum("kdp,bp->bkd", self.coef, basis)
        if coef.dim() == 2:
            ls = upow @ coef.t()  # (B, n_orbits)
        else:
            ls = torch.einsum("bkd,bd->bk", coef, upow)
        return _scale_modes(x, ls * self.keep, self.orbit, self.counts, sign, self.lattice_shape)

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._scaled(z, 1.0, context)

    def inverse(self, phi: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._scaled(phi, -1.0, context)

    def resample_state(
        self,
        state: dict[str, Tensor],
        old_lattice_shape: Sequence[int],
        new_lattice_shape: Sequence[int],
    ) -> dict[str, Tensor]:
        """Coefficients interpolated linearly in :math:`\\hat k^2` (the zero mode stays 0)."""
        old = state["coef"].detach().double().cpu().numpy().copy()
        _, k_old = momentum_orbits(old_lattice_shape)
        old[0] = old[1 + int(np.argmin(k_old[1:]))]  # flat below the smallest non-zero momentum
        new = _interp_in_khat2(old, old_lattice_shape, new_lattice_shape)
        new[0] = 0.0  # the zero mode is never scaled
        return {"coef": torch.as_tensor(new, dtype=state["coef"].dtype)}

    def extra_repr(self) -> str:
        return f"powers={self.powers}, scale={self.scale}, degree={self.degree}"
