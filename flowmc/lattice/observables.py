r"""Lattice observables: per-configuration primaries and estimators built from their means.

Conventions (see ``docs/observables.md`` for the full list of formulas). Fields have shape
``(N, L_1, ..., L_d)`` (torch tensors or numpy arrays, any ``d``); per-configuration observables
come back as numpy ``float64`` arrays with leading axis ``N``. With :math:`V = \prod_\mu L_\mu`:

.. math::

    M = \sum_x \phi_x, \qquad m = M/V, \qquad
    G(x) = \frac1V \sum_y \phi_y \phi_{y+x}, \qquad
    C_\mu(t) = \sum_{x \perp \hat\mu} G(t\hat\mu + x_\perp).

The *ensemble-level* quantities (susceptibilities, Binder cumulant, effective and pole masses,
second-moment correlation length) are pure functions of **means** of the primaries, so that an
error analysis (jackknife, Gamma method with linear error propagation) can re-evaluate them on
resampled means.

References:
    Wolff, "Monte Carlo errors with less errors", hep-lat/0306017.
    Cooper, Freedman, Preston, Nucl. Phys. B210 (1982) 210 (second-moment correlation length).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import curve_fit
from torch import Tensor

__all__ = [
    "magnetization",
    "magnetization_density",
    "action_density",
    "two_point",
    "zero_momentum_correlator",
    "zero_momentum_from_two_point",
    "momentum_two_point",
    "ising_energy",
    "phi4_density",
    "sd_observable",
    "chi2_from_means",
    "chi_connected_from_means",
    "binder_from_means",
    "xi2_from_G",
    "xi2_from_momenta",
    "effective_mass",
    "effective_mass_from_slices",
    "CoshFit",
    "fit_cosh",
    "pole_mass",
    "measure",
]

ArrayLike = np.ndarray | Tensor
Action = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------- input handling
def _as_fields(phi: ArrayLike, name: str = "phi") -> np.ndarray:
    """Return ``phi`` as a float64 numpy array of shape ``(N, *L)`` or raise ``ValueError``."""
    if isinstance(phi, Tensor):
        arr = phi.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(phi, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            msg = f"Expected {name} to be a real numeric array; got {type(phi).__name__}"
            raise ValueError(msg) from exc
    if arr.ndim < 2 or arr.shape[0] < 1 or min(arr.shape[1:]) < 1:
        raise ValueError(
            f"Expected {name} of shape (N, L_1, ..., L_d) with N >= 1 and d >= 1; "
            f"got {tuple(arr.shape)}"
        )
    return arr


def _as_torch(phi: ArrayLike) -> Tensor:
    """float64 tensor (keeping the device of a tensor input) for evaluating an action."""
    if isinstance(phi, Tensor):
        return phi.detach().to(torch.float64)
    return torch.from_numpy(np.ascontiguousarray(phi, dtype=np.float64))


def _check_action_shape(arr: np.ndarray, action: object) -> None:
    shape = getattr(action, "lattice_shape", None)
    if shape is not None and tuple(arr.shape[1:]) != tuple(shape):
        raise ValueError(
            f"Expected phi of shape (N, {', '.join(map(str, shape))}) for the action's lattice "
            f"{tuple(shape)}; got {tuple(arr.shape)}"
        )


def _lattice_axes(arr: np.ndarray) -> tuple[int, ...]:
    return tuple(range(1, arr.ndim))


def _as_lattice_array(x: ArrayLike, name: str, ndim: int | None = None) -> np.ndarray:
    arr = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, float)
    if arr.ndim < 1 or arr.size == 0 or (ndim is not None and arr.ndim != ndim):
        want = f"{ndim}-dimensional" if ndim is not None else "a non-empty"
        raise ValueError(f"Expected {name} to be {want} array; got shape {tuple(arr.shape)}")
    return arr


# ----------------------------------------------------------------------------- per configuration
def magnetization(phi: ArrayLike) -> np.ndarray:
    r"""Total magnetisation :math:`M = \sum_x \phi_x`.

    Args:
        phi: ``(N, *L)`` field configurations.

    Returns:
        ``(N,)`` float64 array.

    Example:
        >>> magnetization(np.ones((2, 4, 4)))
        array([16., 16.])
    """
    arr = _as_fields(phi)
    return arr.sum(axis=_lattice_axes(arr))


def magnetization_density(phi: ArrayLike) -> np.ndarray:
    r"""Magnetisation per site :math:`m = M/V`, shape ``(N,)``."""
    arr = _as_fields(phi)
    return arr.mean(axis=_lattice_axes(arr))


def action_density(phi: ArrayLike, action: Action) -> np.ndarray:
    r"""Action per site :math:`S[\phi]/V`, shape ``(N,)`` (evaluated in float64)."""
    arr = _as_fields(phi)
    _check_action_shape(arr, action)
    vol = math.prod(arr.shape[1:])
    s = action(_as_torch(phi))
    return s.detach().cpu().double().numpy() / vol


def two_point(phi: ArrayLike) -> np.ndarray:
    r"""Translation-averaged two-point function of each configuration, by FFT.

    .. math:: G(x) = \frac1V \sum_y \phi_y\,\phi_{y+x}
              = \frac1V\,\mathcal F^{-1}\big[|\tilde\phi(k)|^2\big](x)

    Not connected (no :math:`\langle\phi\rangle^2` subtracted). Per configuration
    :math:`G(0) = \overline{\phi^2}`, :math:`G(x) = G(-x)` and :math:`\sum_x G(x) = M^2/V`.

    Args:
        phi: ``(N, *L)`` field configurations.

    Returns:
        ``(N, *L)`` float64 array indexed by the separation ``x`` (periodic, FFT ordering).
    """
    arr = _as_fields(phi)
    axes = _lattice_axes(arr)
    shape = arr.shape[1:]
    ft = np.fft.rfftn(arr, axes=axes)
    power = ft.real**2 + ft.imag**2
    return np.fft.irfftn(power, s=shape, axes=axes) / math.prod(shape)


def _c_from_g(g: np.ndarray, axis: int, average: bool) -> np.ndarray:
    """``(N, *L)`` two-point -> ``(N, L_axis)`` zero-momentum correlator."""
    d = g.ndim - 1
    if not -d <= axis < d:
        raise ValueError(f"Expected axis in [0, {d}) for a {d}-dimensional lattice; got {axis}")
    axis %= d
    length = g.shape[axis + 1]
    mus = [nu for nu in range(d) if g.shape[nu + 1] == length] if average else [axis]
    out = np.zeros((g.shape[0], length))
    for nu in mus:  # loop over <= d axes, not over sites
        perp = tuple(1 + a for a in range(d) if a != nu)
        out += g.sum(axis=perp) if perp else g
    return out / len(mus)


def zero_momentum_from_two_point(
    G_mean: ArrayLike, axis: int = 0, average: bool = True
) -> np.ndarray:
    r"""Zero-momentum correlator :math:`C_\mu(t) = \sum_{x_\perp} G(t\hat\mu + x_\perp)` of a ``G``.

    Linear in ``G``, so it commutes with averaging over configurations.

    Args:
        G_mean: ``(*L)`` two-point function (e.g. the ensemble mean of :func:`two_point`).
        axis: the "time" axis :math:`\mu` (0-based lattice axis).
        average: average :math:`C_\nu` over every axis :math:`\nu` with :math:`L_\nu = L_\mu`.

    Returns:
        ``(L_axis,)`` float64 array, :math:`t = 0, \dots, L_\mu - 1`.
    """
    g = _as_lattice_array(G_mean, "G_mean")
    return _c_from_g(g[None], axis, average)[0]


def zero_momentum_correlator(phi: ArrayLike, axis: int = 0, average: bool = True) -> np.ndarray:
    r"""Per-configuration zero-momentum (time-slice) correlator.

    With slice sums :math:`\Phi(\tau) = \sum_{x_\perp}\phi(\tau\hat\mu + x_\perp)`,

    .. math:: C_\mu(t) = \sum_{x_\perp} G(t\hat\mu + x_\perp)
              = \frac{1}{L_\mu}\sum_\tau \frac{\Phi(\tau)\,\Phi(\tau+t)}{V/L_\mu},

    i.e. the slice-sum correlator averaged over origins :math:`\tau` and divided by the slice
    volume. :math:`\sum_t C(t) = M^2/V`. For the free theory :math:`C(t)` is exactly the 1-d
    propagator, a :math:`\cosh` with :math:`m_E = 2\,\mathrm{arcsinh}(m/2)`.

    Args:
        phi: ``(N, *L)`` field configurations.
        axis: the time axis (0-based lattice axis).
        average: average over all axes with the same extent as ``axis``.

    Returns:
        ``(N, L_axis)`` float64 array.
    """
    return _c_from_g(two_point(phi), axis, average)


def momentum_two_point(G_mean: ArrayLike) -> np.ndarray:
    r""":math:`\tilde G(p) = \sum_x G(x)\,e^{-ipx}` on the grid :math:`p_\mu = 2\pi n_\mu/L_\mu`.

    Args:
        G_mean: ``(*L)`` two-point function.

    Returns:
        ``(*L)`` real array in FFT ordering; :math:`\tilde G(0) = \chi_2`.
    """
    g = _as_lattice_array(G_mean, "G_mean")
    return np.fft.fftn(g).real


def ising_energy(phi: ArrayLike) -> np.ndarray:
    r"""Nearest-neighbour ("Ising") energy :math:`E = \frac1d\sum_\mu G(\hat\mu)
    = \frac{1}{dV}\sum_{x,\mu}\phi_x\phi_{x+\hat\mu}`, shape ``(N,)``."""
    arr = _as_fields(phi)
    axes = _lattice_axes(arr)
    links = sum(arr * np.roll(arr, -1, axis=a) for a in axes)
    return links.mean(axis=axes) / len(axes)


def phi4_density(phi: ArrayLike) -> np.ndarray:
    r"""Quartic term per site :math:`\frac1V\sum_x \phi_x^4`, shape ``(N,)``.

    Its ensemble mean is the λ-derivative of the free-energy density,
    :math:`\partial f/\partial\lambda = \langle \frac1V\sum_x\phi_x^4\rangle` with
    :math:`f = -\log Z / V`, since :math:`\partial_\lambda \log Z = -\langle\sum_x
    \phi_x^4\rangle`: the integrand of thermodynamic integration in the coupling
    (:mod:`flowmc.analysis.free_energy`). For the free theory :math:`\langle\phi_x^4\rangle =
    3\langle\phi_x^2\rangle^2` (Wick).

    Args:
        phi: ``(N, *L)`` field configurations.

    Returns:
        ``(N,)`` float64 array.

    Example:
        >>> phi4_density(np.full((1, 2, 2), 2.0))
        array([16.])
    """
    arr = _as_fields(phi)
    sq = arr * arr
    return (sq * sq).mean(axis=_lattice_axes(arr))


def sd_observable(phi: ArrayLike, action: Action) -> np.ndarray:
    r"""Schwinger–Dyson observable :math:`\frac1V\sum_n \phi_n\,\partial S/\partial\phi_n`.

    Integrating :math:`\partial_{\phi_n}(\phi_n e^{-S})` over field space gives
    :math:`\langle \phi_n \partial S/\partial\phi_n \rangle = 1` for every site, so the ensemble
    mean of this observable is exactly 1 for any correct sampler of :math:`e^{-S}` (any
    :math:`m^2, \lambda`, any volume). Uses ``action.grad`` when present, autograd otherwise.

    Args:
        phi: ``(N, *L)`` field configurations.
        action: callable ``(N, *L) -> (N,)``, optionally with ``.grad``.

    Returns:
        ``(N,)`` float64 array.
    """
    arr = _as_fields(phi)
    _check_action_shape(arr, action)
    t = _as_torch(phi)
    if hasattr(action, "grad"):
        grad = action.grad(t)
    else:
        t = t.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(action(t).sum(), t)
    vol = math.prod(arr.shape[1:])
    return (t.detach() * grad.detach()).flatten(1).sum(1).cpu().double().numpy() / vol


# ----------------------------------------------------------------------------- from means
def chi2_from_means(m2_mean: float, volume: int) -> float:
    r"""Susceptibility :math:`\chi_2 = V\langle m^2\rangle = \langle M^2\rangle/V = \tilde G(0)`."""
    return float(volume) * float(m2_mean)


def chi_connected_from_means(m2_mean: float, abs_m_mean: float, volume: int) -> float:
    r"""Connected susceptibility :math:`\chi = V(\langle m^2\rangle - \langle|m|\rangle^2)`."""
    return float(volume) * (float(m2_mean) - float(abs_m_mean) ** 2)


def binder_from_means(m2_mean: float, m4_mean: float) -> float:
    r"""Binder cumulant :math:`U_4 = 1 - \langle m^4\rangle / (3\langle m^2\rangle^2)`.

    0 for a Gaussian (disordered) distribution of :math:`m`, 2/3 for :math:`m = \pm m_0`.
    """
    return 1.0 - float(m4_mean) / (3.0 * float(m2_mean) ** 2)


def xi2_from_G(
    G_mean: ArrayLike, axes: Sequence[int] | None = None, squared: bool = False
) -> float:
    r"""Second-moment correlation length from a (mean) two-point function.

    .. math:: \xi_2^2 = \frac{\tilde G(0)/\tilde G(p_{\min}) - 1}{4\sin^2(\pi/L)},
              \qquad p_{\min} = 2\pi/L

    with :math:`\tilde G(p_{\min})` averaged over the lattice axes ``axes`` (which must share
    one extent :math:`L`). For the free theory :math:`\tilde G(p) \propto 1/(m^2 + \hat p^2)`,
    :math:`\hat p^2 = \sum_\mu 4\sin^2(p_\mu/2)`, so :math:`\xi_2 = 1/m` exactly.

    Args:
        G_mean: ``(*L)`` two-point function (mean over configurations).
        axes: lattice axes to average over; default all (all extents must then be equal).
        squared: return :math:`\xi_2^2` (smooth, may be negative on noisy data) instead of
            :math:`\xi_2`.

    Returns:
        :math:`\xi_2` (NaN if :math:`\xi_2^2 < 0`), or :math:`\xi_2^2` if ``squared``.

    Raises:
        ValueError: if the chosen axes have different extents or an extent is < 2.
    """
    g = _as_lattice_array(G_mean, "G_mean")
    d = g.ndim
    axes = tuple(range(d)) if axes is None else tuple(int(a) for a in axes)
    if not axes or any(not 0 <= a < d for a in axes):
        raise ValueError(f"Expected axes within [0, {d}); got {axes}")
    lengths = {g.shape[a] for a in axes}
    if len(lengths) != 1 or min(lengths) < 2:
        raise ValueError(
            f"Expected axes of one common extent >= 2; got extents "
            f"{[g.shape[a] for a in axes]} (pass axes= explicitly)"
        )
    length = lengths.pop()
    gt = momentum_two_point(g)
    zero = (0,) * d
    gp = np.mean([gt[tuple(1 if b == a else 0 for b in range(d))] for a in axes])
    return xi2_from_momenta(gt[zero], gp, length, squared=squared)


def xi2_from_momenta(G0: float, G1: float, length: int, squared: bool = False) -> float:
    r"""Second-moment correlation length from :math:`\tilde G(0)` and :math:`\tilde G(p_{\min})`.

    .. math:: \xi_2^2 = \frac{\tilde G(0)/\tilde G(p_{\min}) - 1}{4\sin^2(\pi/L)}

    The formula of :func:`xi2_from_G`, which calls it; as a function of two means it is what
    the error analysis propagates (the Gamma method on the per-configuration
    :math:`\tilde G(0)` and :math:`\tilde G(p_{\min})` series).

    Args:
        G0: :math:`\tilde G(0) = \chi_2` (mean).
        G1: :math:`\tilde G(p_{\min})`, :math:`p_{\min} = 2\pi/L` (mean, averaged over axes).
        length: the extent :math:`L` of those axes (>= 2).
        squared: return :math:`\xi_2^2` instead of :math:`\xi_2`.

    Returns:
        :math:`\xi_2` (NaN if :math:`\xi_2^2 < 0` or :math:`\tilde G(p_{\min}) = 0`), or
        :math:`\xi_2^2` if ``squared``.

    Raises:
        ValueError: if ``length < 2``.

    Example:
        >>> round(xi2_from_momenta(2.0, 1.0, 4), 6)  # (2 - 1) / (4 sin^2(pi/4)) = 1/2
        0.707107
    """
    if int(length) != length or length < 2:
        raise ValueError(f"Expected a lattice extent length >= 2; got {length!r}")
    G0, G1 = float(G0), float(G1)
    if G1 == 0.0:
        return float("nan")
    xi_sq = (G0 / G1 - 1.0) / (4.0 * math.sin(math.pi / int(length)) ** 2)
    if squared:
        return float(xi_sq)
    return float(math.sqrt(xi_sq)) if xi_sq >= 0 else float("nan")


def _check_correlator(c: ArrayLike, name: str) -> np.ndarray:
    arr = _as_lattice_array(c, name, ndim=1)
    if arr.size < 3:
        raise ValueError(f"Expected {name} with at least 3 time slices; got {arr.size}")
    return arr


def effective_mass(C_mean: ArrayLike) -> np.ndarray:
    r"""Cosh effective mass :math:`m_{\rm eff}(t) = \mathrm{arccosh}\frac{C(t-1)+C(t+1)}{2C(t)}`.

    Uses periodicity :math:`C(L) = C(0)`, for which an exact
    :math:`C(t) = A\cosh(m(t - L/2))` gives :math:`m_{\rm eff}(t) = m` at every
    :math:`t = 1, \dots, L-1`.

    Args:
        C_mean: ``(L,)`` zero-momentum correlator (mean over configurations).

    Returns:
        ``(L,)`` array indexed by ``t``; entry 0 and entries whose ratio is < 1 are NaN.
    """
    c = _check_correlator(C_mean, "C_mean")
    out = np.asarray(effective_mass_from_slices(np.roll(c, 1), c, np.roll(c, -1)), dtype=float)
    out[0] = np.nan
    return out


def effective_mass_from_slices(
    C_prev: ArrayLike | float, C_t: ArrayLike | float, C_next: ArrayLike | float
) -> np.ndarray | float:
    r"""Cosh effective mass :math:`\mathrm{arccosh}\frac{C(t-1)+C(t+1)}{2C(t)}` from three slices.

    The formula of :func:`effective_mass`, which calls it; as a function of three means it is
    what the error analysis propagates for each :math:`t`.

    Args:
        C_prev: :math:`C(t-1)` (a number or an array).
        C_t: :math:`C(t)`.
        C_next: :math:`C(t+1)`.

    Returns:
        The effective mass (same shape as the inputs; a float for scalar inputs), NaN where the
        ratio is < 1 or undefined.

    Example:
        >>> m = 0.3
        >>> round(float(effective_mass_from_slices(math.cosh(m), 1.0, math.cosh(m))), 12)
        0.3
    """
    a, b, c = (np.asarray(x, dtype=np.float64) for x in (C_prev, C_t, C_next))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = (a + c) / (2.0 * b)
        out = np.arccosh(np.where(ratio >= 1.0, ratio, np.nan))
    return float(out) if out.ndim == 0 else out


class CoshFit(NamedTuple):
    """Result of :func:`fit_cosh`: :math:`C(t) = A\\,[e^{-mt} + e^{-m(L-t)}]/(1 + e^{-mL})`."""

    mass: float
    mass_err: float
    amplitude: float
    amplitude_err: float
    chi2: float
    dof: int


def fit_cosh(
    C_mean: ArrayLike,
    C_err: ArrayLike | None = None,
    *,
    tmin: int = 1,
    tmax: int | None = None,
) -> CoshFit:
    r"""Least-squares fit of a periodic cosh to :math:`C(t)`, :math:`t \in [t_{\min}, t_{\max}]`.

    Model :math:`C(t) = A\,[e^{-mt} + e^{-m(L-t)}]/(1+e^{-mL}) = A\cosh(m(t-L/2))/\cosh(mL/2)`,
    so :math:`A = C(0)` for a pure cosh. Uses :func:`scipy.optimize.curve_fit`; with ``C_err``
    the errors are absolute (uncorrelated :math:`\chi^2`), without it the covariance is scaled by
    :math:`\chi^2/\mathrm{dof}`. Correlations between time slices are ignored, so for an honest
    error on the mass resample the fit (jackknife over configurations).

    Args:
        C_mean: ``(L,)`` zero-momentum correlator.
        C_err: ``(L,)`` standard errors of ``C_mean`` (optional, positive on the fit range).
        tmin: first time slice in the fit (>= 0).
        tmax: last time slice in the fit (default ``L // 2``, at most ``L - 1``).

    Returns:
        :class:`CoshFit` with ``mass, mass_err, amplitude, amplitude_err, chi2, dof``.

    Raises:
        ValueError: for a fit range with fewer than 2 points or out of bounds, or bad ``C_err``.
    """
    c = _check_correlator(C_mean, "C_mean")
    length = c.size
    tmax = length // 2 if tmax is None else int(tmax)
    tmin = int(tmin)
    if not (0 <= tmin < tmax <= length - 1):
        raise ValueError(
            f"Expected 0 <= tmin < tmax <= L-1 = {length - 1}; got tmin={tmin}, tmax={tmax}"
        )
    t = np.arange(tmin, tmax + 1, dtype=float)
    y = c[tmin : tmax + 1]
    sigma = None
    if C_err is not None:
        err = _as_lattice_array(C_err, "C_err", ndim=1)
        if err.shape != c.shape:
            raise ValueError(f"Expected C_err of shape {c.shape}; got {err.shape}")
        sigma = err[tmin : tmax + 1]
        if not np.all(np.isfinite(sigma) & (sigma > 0)):
            raise ValueError("Expected C_err > 0 and finite on the fit range")

    def model(tt: np.ndarray, amp: float, mass: float) -> np.ndarray:
        num = np.exp(-mass * tt) + np.exp(-mass * (length - tt))
        return amp * num / (1 + np.exp(-mass * length))

    meff = effective_mass(c)[max(tmin, 1) : tmax + 1]
    m0 = float(np.nanmedian(meff)) if np.any(np.isfinite(meff)) else 0.5
    a0 = float(y[0] / model(t[0], 1.0, m0))
    popt, pcov = curve_fit(
        model, t, y, p0=(a0, m0), sigma=sigma, absolute_sigma=sigma is not None,
        xtol=1e-15, ftol=1e-15, gtol=1e-15, maxfev=20000,
    )  # fmt: skip
    resid = (y - model(t, *popt)) / (1.0 if sigma is None else sigma)
    perr = np.sqrt(np.abs(np.diag(pcov)))
    return CoshFit(
        mass=float(abs(popt[1])),
        mass_err=float(perr[1]),
        amplitude=float(popt[0]),
        amplitude_err=float(perr[0]),
        chi2=float(resid @ resid),
        dof=int(t.size - 2),
    )


def pole_mass(
    C_mean: ArrayLike,
    C_err: ArrayLike | None = None,
    *,
    tmin: int = 1,
    tmax: int | None = None,
) -> tuple[float, float]:
    """Pole mass and its fit error from a cosh fit; see :func:`fit_cosh` for the arguments."""
    fit = fit_cosh(C_mean, C_err, tmin=tmin, tmax=tmax)
    return fit.mass, fit.mass_err


# ----------------------------------------------------------------------------- streaming
def measure(
    phi: ArrayLike, action: Action | None = None, *, chunk_size: int = 1024
) -> dict[str, np.ndarray]:
    r"""All per-configuration primary observables, computed chunk by chunk.

    Keys (``N`` = number of configurations, float64):

    - ``m`` :math:`M/V`, ``abs_m`` :math:`|m|`, ``m2`` :math:`m^2`, ``m4`` :math:`m^4` — ``(N,)``
    - ``energy`` :func:`ising_energy` — ``(N,)``
    - ``phi4`` :func:`phi4_density` (:math:`\frac1V\sum_x\phi_x^4`) — ``(N,)``
    - ``action_density`` :math:`S/V` and ``sd`` :func:`sd_observable` — ``(N,)``, only if
      ``action`` is given
    - ``G_x`` :func:`two_point` — ``(N, *L)``
    - ``C_t`` :func:`zero_momentum_correlator` along axis 0, averaged over axes of equal
      extent — ``(N, L_1)``

    Args:
        phi: ``(N, *L)`` field configurations: a tensor, an array, or anything sliceable along
            axis 0 with a ``.shape`` (e.g. an ``h5py.Dataset``, read chunk by chunk).
        action: the action (for ``action_density`` and ``sd``), or ``None`` to skip those.
        chunk_size: configurations processed at once (bounds memory).

    Returns:
        dict of numpy arrays; concatenating the dicts of consecutive chunks equals one call.
    """
    if int(chunk_size) < 1:
        raise ValueError(f"Expected chunk_size >= 1; got {chunk_size}")
    if not hasattr(phi, "shape"):
        phi = _as_fields(phi)
    n = int(phi.shape[0]) if len(phi.shape) > 0 else 0
    _as_fields(phi[:1] if n else phi)  # validate shape early (cheap)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, int(chunk_size)):
        chunk = phi[start : start + int(chunk_size)]
        arr = _as_fields(chunk)
        d = arr.ndim - 1
        g = two_point(arr)
        m = arr.mean(axis=_lattice_axes(arr))
        unit = [
            (slice(None), *(1 % arr.shape[a + 1] if b == a else 0 for b in range(d)))
            for a in range(d)
        ]
        out = {
            "m": m,
            "abs_m": np.abs(m),
            "m2": m**2,
            "m4": m**4,
            "energy": sum(g[u] for u in unit) / d,
            "phi4": phi4_density(arr),
            "G_x": g,
            "C_t": _c_from_g(g, 0, True),
        }
        if action is not None:
            torch_chunk = chunk if isinstance(chunk, Tensor) else arr
            out["action_density"] = action_density(torch_chunk, action)
            out["sd"] = sd_observable(torch_chunk, action)
        for key, val in out.items():
            parts.setdefault(key, []).append(val)
    return {key: np.concatenate(vals) for key, vals in parts.items()}
