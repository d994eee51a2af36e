r"""Autocorrelation and error analysis: Wolff's Gamma method, jackknife, Kish ESS.

Conventions (read this before comparing numbers with other codes):

* The **integrated autocorrelation time** is

  .. math:: \tau_\mathrm{int} = \tfrac12 + \sum_{t \ge 1} \rho(t),
            \qquad \rho(t) = \Gamma(t) / \Gamma(0),

  so iid data have :math:`\tau_\mathrm{int} = 1/2` (Wolff, pyerrors convention).
  emcee's ``integrated_time`` and the ``1 + 2\sum\rho`` of the statistics literature are
  **twice** this number. Never mix the two.
* The error of the mean of :math:`N` correlated samples is
  :math:`\sigma = \sqrt{2\tau_\mathrm{int}\,\Gamma(0)/N}`, and the "chain" effective sample
  size is :math:`N_\mathrm{eff} = N / (2\tau_\mathrm{int})` (arviz' ``ess(method="mean")``
  estimates the same quantity).
* Several **replicas** (independent chains, possibly of different lengths) are analysed as in
  Wolff: one global mean over all :math:`N = \sum_r N_r` samples, :math:`\Gamma(t)` summed over
  replicas and divided by :math:`\sum_r (N_r - t)`.
* The Kish effective sample size of importance weights (:func:`kish_ess`) is a *fraction*
  in :math:`[1/N, 1]`; it is unrelated to the chain ESS above.

A series that is too short for a reliable window raises :class:`AutocorrError` (carrying the
estimate in ``.tau``) unless ``quiet=True``, in which case a warning is issued and the
estimate is returned. No function returns a silent NaN.

References:
    U. Wolff, "Monte Carlo errors with less errors", Comput. Phys. Commun. 156 (2004) 143,
    https://arxiv.org/abs/hep-lat/0306017
    N. Madras and A. D. Sokal, J. Stat. Phys. 50 (1988) 109.
    L. Kish, "Survey Sampling", Wiley (1965).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.fft import irfft, next_fast_len, rfft
from scipy.special import logsumexp

__all__ = [
    "AutocorrError",
    "GammaResult",
    "arviz_ess",
    "autocovariance",
    "derived_gamma",
    "gamma_analysis",
    "jackknife",
    "kish_ess",
    "kish_ess_batches",
    "tau_int",
]

#: Smallest number of samples per replica accepted by the public functions.
MIN_SAMPLES = 5

#: Input type: one series ``(n,)``, equal-length replicas ``(n_chains, n)`` or a sequence of
#: 1-D replicas of possibly different lengths.
SeriesLike = ArrayLike | Sequence[ArrayLike]


class AutocorrError(RuntimeError):
    """The series is too short for a reliable estimate of the autocorrelation time.

    Attributes:
        tau: the (unreliable) estimate of :math:`\\tau_\\mathrm{int}` in the ½ + Σρ convention.
        result: the full :class:`GammaResult` computed anyway, or ``None``.
    """

    def __init__(self, message: str, tau: float, result: GammaResult | None = None) -> None:
        super().__init__(message)
        self.tau = tau
        self.result = result


@dataclass(frozen=True)
class GammaResult:
    """Result of a Gamma-method analysis.

    Attributes:
        value: the estimate (mean, or derived quantity at the means).
        error: its statistical error including autocorrelations, :math:`\\sqrt{C_F(W)/N}`.
        error_error: error of ``error``, :math:`\\sigma\\sqrt{(W + 1/2)/N}` (Wolff eq. 44).
        tau_int: integrated autocorrelation time (½ + Σρ convention, floored at ½).
        tau_int_error: its error (Wolff eq. 42, Madras–Sokal),
            :math:`2\\tau_\\mathrm{int}\\sqrt{(W + 1/2 - \\tau_\\mathrm{int})/N}`.
        window: the summation window :math:`W` chosen by the automatic windowing.
        ess: chain effective sample size :math:`N / (2\\tau_\\mathrm{int})`.
        n: total number of samples over all replicas.
        n_replicas: number of replicas.
        rho: ``(L + 1,)`` bias-corrected normalised autocorrelation :math:`\\rho(t)`,
            ``t = 0..L`` with ``L = min(W_max, max(2W, 20))`` and ``W_max = min_r N_r // 2``.
        naive_error: error ignoring autocorrelations, :math:`\\sqrt{s^2/N}` with the unbiased
            sample variance :math:`s^2`.
    """

    value: float
    error: float
    error_error: float
    tau_int: float
    tau_int_error: float
    window: int
    ess: float
    n: int
    n_replicas: int
    rho: np.ndarray
    naive_error: float


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------


def _as_replicas(data: SeriesLike, name: str = "data") -> list[np.ndarray]:
    """Convert the accepted input forms into a list of 1-D float64 arrays (one per replica)."""
    if isinstance(data, np.ndarray) or np.isscalar(data):
        arr = np.asarray(data, dtype=np.float64)
        if arr.ndim == 1:
            reps = [arr]
        elif arr.ndim == 2:
            reps = list(arr)
        else:
            raise ValueError(
                f"Expected {name} with shape (n,) or (n_chains, n); got shape {arr.shape}"
            )
    elif isinstance(data, Sequence) and len(data) > 0 and all(np.ndim(d) == 0 for d in data):
        reps = [np.asarray(data, dtype=np.float64)]
    elif isinstance(data, Sequence):
        reps = [np.asarray(d, dtype=np.float64) for d in data]
        if not reps:
            raise ValueError(f"Expected at least one replica in {name}; got an empty sequence")
        for i, r in enumerate(reps):
            if r.ndim != 1:
                raise ValueError(
                    f"Expected replica {i} of {name} to be 1-D; got shape {r.shape}"
                )
    else:
        raise TypeError(
            f"Expected {name} as an array (n,) / (n_chains, n) or a sequence of 1-D arrays; "
            f"got {type(data).__name__}"
        )
    for i, r in enumerate(reps):
        if r.shape[0] < MIN_SAMPLES:
            raise ValueError(
                f"Expected at least {MIN_SAMPLES} samples per replica in {name}; "
                f"replica {i} has {r.shape[0]}"
            )
        if not np.all(np.isfinite(r)):
            bad = int(np.flatnonzero(~np.isfinite(r))[0])
            raise ValueError(f"Expected finite values in {name}; replica {i} contains "
                             f"{r[bad]} at index {bad}")  # fmt: skip
    return reps


def _mean_and_deltas(reps: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
    """Global mean and per-replica fluctuations; exact zeros for a constant series."""
    flat = np.concatenate(reps)
    mean = float(np.mean(flat))
    if np.all(flat == flat[0]):
        return float(flat[0]), [np.zeros_like(r) for r in reps]
    return mean, [r - mean for r in reps]


# --------------------------------------------------------------------------------------------
# autocovariance
# --------------------------------------------------------------------------------------------


def _autocov_from_deltas(deltas: list[np.ndarray], max_lag: int) -> np.ndarray:
    r""":math:`\Gamma(t) = \sum_r \sum_i d^r_i d^r_{i+t} / \sum_r (N_r - t)` by FFT."""
    num = np.zeros(max_lag + 1)
    den = np.zeros(max_lag + 1)
    lags = np.arange(max_lag + 1)
    for d in deltas:
        n = d.shape[0]
        nfft = next_fast_len(2 * n, real=True)  # zero padding: no circular wrap-around
        f = rfft(d, nfft)
        acf = irfft(f * np.conj(f), nfft)[: min(n, max_lag + 1)]
        num[: acf.shape[0]] += acf
        den += np.clip(n - lags, 0, None)
    out = np.zeros(max_lag + 1)
    np.divide(num, den, out=out, where=den > 0)
    return out


def autocovariance(data: SeriesLike, max_lag: int | None = None) -> np.ndarray:
    r"""Autocovariance :math:`\Gamma(t)` of one series or several replicas (FFT based).

    .. math:: \Gamma(t) = \frac{1}{\sum_r (N_r - t)} \sum_r \sum_{i=1}^{N_r - t}
              (a^r_i - \bar a)(a^r_{i+t} - \bar a)

    with :math:`\bar a` the mean over all samples (Wolff eq. 31). No bias correction.

    Args:
        data: ``(n,)`` series, ``(n_chains, n)`` replicas, or a sequence of 1-D replicas.
        max_lag: largest lag; defaults to ``min_r N_r - 1``.

    Returns:
        ``(max_lag + 1,)`` array :math:`\Gamma(0), \ldots, \Gamma(\mathrm{max\_lag})`.

    Raises:
        ValueError: on malformed input or a ``max_lag`` outside ``[0, min_r N_r - 1]``.

    Example:
        >>> import numpy as np
        >>> autocovariance(np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0]), max_lag=1)
        array([ 1., -1.])
    """
    reps = _as_replicas(data)
    n_min = min(r.shape[0] for r in reps)
    if max_lag is None:
        max_lag = n_min - 1
    if not 0 <= max_lag <= n_min - 1:
        raise ValueError(f"Expected 0 <= max_lag <= {n_min - 1}; got {max_lag}")
    _, deltas = _mean_and_deltas(reps)
    return _autocov_from_deltas(deltas, int(max_lag))


# --------------------------------------------------------------------------------------------
# Gamma method
# --------------------------------------------------------------------------------------------


def _rho_len(window: int, w_max: int) -> int:
    return min(w_max, max(2 * window, 20))


def _gamma_from_deltas(
    deltas: list[np.ndarray],
    value: float,
    *,
    S: float,
    tol: float,
    quiet: bool,
) -> GammaResult:
    """Gamma method on mean-subtracted replicas; ``value`` is reported as the estimate."""
    if not S >= 0 or not math.isfinite(S):
        raise ValueError(f"Expected S >= 0; got {S}")
    if not tol >= 0:
        raise ValueError(f"Expected tol >= 0; got {tol}")
    n_rep = len(deltas)
    n_tot = int(sum(d.shape[0] for d in deltas))
    w_max = min(d.shape[0] for d in deltas) // 2
    gamma = _autocov_from_deltas(deltas, w_max)
    g0 = gamma[0]
    if g0 == 0.0:  # constant series (or zero projection): no fluctuations at all
        rho = np.zeros(_rho_len(0, w_max) + 1)
        rho[0] = 1.0
        return GammaResult(
            value=value, error=0.0, error_error=0.0, tau_int=0.5, tau_int_error=0.0,
            window=0, ess=float(n_tot), n=n_tot, n_replicas=n_rep, rho=rho, naive_error=0.0,
        )  # fmt: skip

    failed = False
    if S == 0.0:
        window = 0
    else:
        # Wolff sec. 3.3: W = first W with g(W) < 0, where
        # g(W) = exp(-W/tau(W)) - tau(W)/sqrt(W N),
        # tau(W) = S / ln((2 tau_int(W) + 1)/(2 tau_int(W) - 1))
        ws = np.arange(1, w_max + 1)
        gint = np.cumsum(gamma[1:] / g0)  # = tau_int(W) - 1/2
        with np.errstate(divide="ignore", invalid="ignore"):
            tau_w = np.where(gint > 0, S / np.log1p(1.0 / np.where(gint > 0, gint, 1.0)), 1e-300)
            g_w = np.exp(-ws / tau_w) - tau_w / np.sqrt(ws * n_tot)
        neg = np.flatnonzero(g_w < 0)
        if neg.size:
            window = int(ws[neg[0]])
        else:
            window, failed = w_max, True

    # bias correction of Gamma (Wolff eq. 49): Gamma(t) -> Gamma(t) + C(W)/N
    c_w = g0 + 2.0 * gamma[1 : window + 1].sum()
    gamma_c = gamma + c_w / n_tot
    c_w_c = gamma_c[0] + 2.0 * gamma_c[1 : window + 1].sum()  # = C(W) (1 + (2W+1)/N)
    tau_raw = c_w_c / (2.0 * gamma_c[0]) if gamma_c[0] > 0 else 0.5
    tau = float(max(tau_raw, 0.5))  # conservative: never report less than the naive error
    var = gamma_c[0] if gamma_c[0] > 0 else g0
    naive_error = math.sqrt(g0 / (n_tot - 1))  # sqrt(s^2 / N), unbiased sample variance s^2
    error = max(math.sqrt(2.0 * tau * float(var) / n_tot), naive_error)
    tau_err = 2.0 * tau * math.sqrt(max(window + 0.5 - tau, 0.0) / n_tot)
    rho = gamma_c[: _rho_len(window, w_max) + 1] / gamma_c[0] if gamma_c[0] > 0 else gamma[
        : _rho_len(window, w_max) + 1
    ] / g0
    result = GammaResult(
        value=float(value),
        error=error,
        error_error=error * math.sqrt((window + 0.5) / n_tot),
        tau_int=float(tau),
        tau_int_error=float(tau_err),
        window=window,
        ess=float(n_tot / (2.0 * tau)),
        n=n_tot,
        n_replicas=n_rep,
        rho=rho,
        naive_error=naive_error,
    )

    problem = None
    if failed:
        problem = (
            f"The automatic windowing condition (S={S}) was not met up to W = min_r N_r // 2 = "
            f"{w_max}; the series is too short to estimate tau_int (current estimate "
            f"{tau:.4g}, N = {n_tot})"
        )
    elif n_tot < tol * tau:
        problem = (
            f"The series is too short for a reliable autocorrelation time: N = {n_tot} < "
            f"tol * tau_int = {tol} * {tau:.4g}; tau_int = {tau:.4g} +- {tau_err:.2g}"
        )
    if problem is not None:
        if quiet:
            warnings.warn(problem, RuntimeWarning, stacklevel=3)
        else:
            raise AutocorrError(problem, tau=float(tau), result=result)
    return result


def gamma_analysis(
    data: SeriesLike, *, S: float = 1.5, tol: float = 50.0, quiet: bool = False
) -> GammaResult:
    r"""Mean, error and integrated autocorrelation time by Wolff's Gamma method.

    The window :math:`W` is the first one with
    :math:`g(W) = e^{-W/\tau(W)} - \tau(W)/\sqrt{WN} < 0`,
    :math:`\tau(W) = S / \ln\frac{2\tau_\mathrm{int}(W)+1}{2\tau_\mathrm{int}(W)-1}`;
    :math:`\Gamma` is then bias corrected (Wolff eq. 49) and

    .. math:: \tau_\mathrm{int} = \frac{C(W)}{2\Gamma(0)},\quad
              C(W) = \Gamma(0) + 2\sum_{t=1}^{W}\Gamma(t),\quad
              \sigma = \sqrt{C(W)/N} = \sqrt{2\tau_\mathrm{int}\Gamma(0)/N}.

    Estimates :math:`\tau_\mathrm{int} < 1/2` (noise or anticorrelation) are floored at ½
    and ``error`` is never below ``naive_error`` (conservative). ``S = 0`` skips the
    windowing (``W = 0``, ``tau_int = 1/2``): the naive error up to :math:`1 + O(N^{-2})`.

    Args:
        data: ``(n,)`` series, ``(n_chains, n)`` replicas, or a sequence of 1-D replicas of
            possibly different lengths (at least 5 samples each).
        S: Wolff's :math:`S = \tau/\tau_\mathrm{int}` windowing parameter (1–2 is typical).
        tol: require ``N >= tol * tau_int`` (total samples over replicas).
        quiet: warn instead of raising :class:`AutocorrError`.

    Returns:
        A :class:`GammaResult`. A constant series gives ``error == 0``, ``tau_int == 0.5``.

    Raises:
        ValueError: on malformed input (wrong shape, NaN/inf, fewer than 5 samples).
        AutocorrError: if the windowing fails before ``W = min_r N_r // 2`` or
            ``N < tol * tau_int``, unless ``quiet``.

    References:
        U. Wolff, hep-lat/0306017, eqs. (31)–(52).

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).standard_normal(10_000)
        >>> res = gamma_analysis(x)
        >>> abs(res.tau_int - 0.5) < 3 * res.tau_int_error + 1e-3
        True
    """
    reps = _as_replicas(data)
    mean, deltas = _mean_and_deltas(reps)
    return _gamma_from_deltas(deltas, mean, S=S, tol=tol, quiet=quiet)


def tau_int(data: SeriesLike, **kwargs: Any) -> tuple[float, float]:
    r"""Integrated autocorrelation time and its error, ½ + Σρ convention.

    Args:
        data: as for :func:`gamma_analysis`.
        **kwargs: forwarded to :func:`gamma_analysis` (``S``, ``tol``, ``quiet``).

    Returns:
        ``(tau_int, tau_int_error)``.

    Raises:
        ValueError: on malformed input.
        AutocorrError: if the series is too short (unless ``quiet=True``).
    """
    res = gamma_analysis(data, **kwargs)
    return res.tau_int, res.tau_int_error


# --------------------------------------------------------------------------------------------
# derived quantities
# --------------------------------------------------------------------------------------------


def _observables(data_list: Sequence[SeriesLike]) -> list[list[np.ndarray]]:
    if isinstance(data_list, np.ndarray) and data_list.ndim == 1:
        raise ValueError(
            "Expected data_list as a sequence of observables (each (n,), (n_chains, n) or a "
            "list of replicas); got a single 1-D array"
        )
    obs = [_as_replicas(d, name=f"data_list[{i}]") for i, d in enumerate(data_list)]
    if not obs:
        raise ValueError("Expected at least one observable in data_list; got none")
    shape0 = [r.shape[0] for r in obs[0]]
    for i, o in enumerate(obs[1:], start=1):
        shape = [r.shape[0] for r in o]
        if shape != shape0:
            raise ValueError(
                f"Expected all observables with the same replica lengths {shape0}; "
                f"data_list[{i}] has {shape}"
            )
    return obs


def derived_gamma(
    f: Callable[..., float],
    data_list: Sequence[SeriesLike],
    *,
    grad: Callable[..., Sequence[float]] | None = None,
    S: float = 1.5,
    tol: float = 50.0,
    quiet: bool = False,
) -> GammaResult:
    r"""Gamma-method error of a function of several primary means, by linearisation.

    With :math:`F = f(\bar a_1, \ldots, \bar a_k)` and :math:`f_\alpha = \partial f/\partial
    A_\alpha` at the means, the projected series :math:`\sum_\alpha f_\alpha (a_{\alpha,i} -
    \bar a_\alpha)` carries all of the leading-order fluctuations of :math:`F`; the Gamma method
    is run on it (Wolff sec. 3.2). Without ``grad``, :math:`f_\alpha` comes from central
    differences with step :math:`h_\alpha = \sqrt{\Gamma_{\alpha\alpha}(0)/N}/4` (Wolff's
    UWerr choice: a quarter of the naive error, so the truncation error is statistically
    irrelevant; floored at :math:`10^{-8}|\bar a_\alpha|` against roundoff).

    Args:
        f: ``f(*means) -> float``, e.g. ``lambda m2, m1: V * (m2 - m1**2)``.
        data_list: ``k`` observables, each in a form accepted by :func:`gamma_analysis`, all
            with identical replica lengths (same Monte Carlo time series).
        grad: optional analytic gradient, ``grad(*means) -> k`` partial derivatives.
        S: windowing parameter, see :func:`gamma_analysis`.
        tol: require ``N >= tol * tau_int``.
        quiet: warn instead of raising :class:`AutocorrError`.

    Returns:
        A :class:`GammaResult` with ``value = f(means)`` (no bias correction of the value).

    Raises:
        ValueError: on malformed input, mismatched replicas, or a non-finite ``f``/gradient.
        AutocorrError: if the projected series is too short (unless ``quiet``).

    References:
        U. Wolff, hep-lat/0306017, sec. 3.2 and eqs. (19)–(24).

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(1).standard_normal(4000)
        >>> res = derived_gamma(lambda a, b: a - b**2, [x**2, x])
        >>> bool(abs(res.value - 1.0) < 5 * res.error)
        True
    """
    obs = _observables(data_list)
    means, deltas = zip(*(_mean_and_deltas(o) for o in obs))
    means = np.array(means, dtype=np.float64)
    n_tot = sum(r.shape[0] for r in obs[0])
    value = float(f(*means))
    if not math.isfinite(value):
        raise ValueError(f"Expected a finite f at the means; got {value}")
    if grad is not None:
        g = np.asarray(grad(*means), dtype=np.float64).reshape(-1)
        if g.shape != means.shape:
            raise ValueError(f"Expected grad to return {means.shape[0]} values; got {g.shape[0]}")
    else:
        g = np.zeros_like(means)
        for a, d in enumerate(deltas):
            var = sum(float(np.dot(x, x)) for x in d) / n_tot
            if var == 0.0:
                continue  # no fluctuations: the derivative does not matter
            # Wolff's step, but never below the resolution of the mean itself
            h = max(math.sqrt(var / n_tot) / 4.0, 1e-8 * abs(means[a]))
            up, dn = means.copy(), means.copy()
            up[a] += h
            dn[a] -= h
            g[a] = (float(f(*up)) - float(f(*dn))) / (2.0 * h)
    if not np.all(np.isfinite(g)):
        raise ValueError(f"Expected a finite gradient of f at the means; got {g}")
    proj = [sum(g[a] * deltas[a][r] for a in range(len(obs))) for r in range(len(obs[0]))]
    return _gamma_from_deltas(
        [np.asarray(p, dtype=np.float64) for p in proj], value, S=S, tol=tol, quiet=quiet
    )


def jackknife(
    f: Callable[..., float], data_list: Sequence[SeriesLike], *, n_bins: int = 100
) -> tuple[float, float]:
    r"""Binned jackknife estimate and error of ``f(*means)``.

    The common bin size is :math:`b = \lfloor N / n_\mathrm{bins} \rfloor`; every replica is
    cut into :math:`\lfloor N_r / b \rfloor` bins of ``b`` consecutive samples (a bin never
    straddles two replicas) and its last :math:`N_r \bmod b` samples are left out of the
    jackknife samples. The bin size must be large compared with :math:`\tau_\mathrm{int}` for
    the error to include the autocorrelations.

    .. math:: \sigma^2_\mathrm{JK} = \frac{M-1}{M} \sum_{j=1}^{M}
              (f_{(j)} - \bar f_{(\cdot)})^2

    Args:
        f: ``f(*means) -> float``.
        data_list: ``k`` observables as for :func:`derived_gamma`.
        n_bins: target number of bins ``M`` (at least 2).

    Returns:
        ``(value, error)`` with ``value = f(means over all samples)``.

    Raises:
        ValueError: on malformed input, ``n_bins < 2`` or fewer than 2 bins.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(2).standard_normal(1000)
        >>> value, error = jackknife(lambda a: a, [x], n_bins=100)
        >>> bool(0.7 < error / (x.std(ddof=1) / np.sqrt(1000)) < 1.3)
        True
    """
    if int(n_bins) != n_bins or n_bins < 2:
        raise ValueError(f"Expected an integer n_bins >= 2; got {n_bins}")
    obs = _observables(data_list)
    n_tot = sum(r.shape[0] for r in obs[0])
    b = max(1, n_tot // int(n_bins))
    # bin sums per observable: (k, M)
    sums = np.array(
        [
            np.concatenate([r[: (r.shape[0] // b) * b].reshape(-1, b).sum(axis=1) for r in o])
            for o in obs
        ]
    )
    m = sums.shape[1]
    if m < 2:
        raise ValueError(f"Expected at least 2 jackknife bins of size {b}; got {m}")
    means = np.array([np.mean(np.concatenate(o)) for o in obs])
    value = float(f(*means))
    loo = (sums.sum(axis=1, keepdims=True) - sums) / ((m - 1) * b)  # (k, M) leave-one-out means
    fj = np.array([float(f(*loo[:, j])) for j in range(m)])
    if not (math.isfinite(value) and np.all(np.isfinite(fj))):
        raise ValueError("Expected f to be finite at the means and all jackknife samples")
    error = math.sqrt((m - 1) / m * float(np.sum((fj - fj.mean()) ** 2)))
    return value, error


# --------------------------------------------------------------------------------------------
# importance-weight ESS and arviz interop
# --------------------------------------------------------------------------------------------


def _log_weights(log_weights: ArrayLike) -> np.ndarray:
    lw = np.asarray(log_weights, dtype=np.float64).reshape(-1)
    if lw.size == 0:
        raise ValueError("Expected at least one log weight; got none")
    if np.any(np.isnan(lw)) or np.any(lw == np.inf):
        raise ValueError("Expected log weights that are finite or -inf; got NaN or +inf")
    if np.all(lw == -np.inf):
        raise ValueError("Expected at least one non-zero weight; all log weights are -inf")
    return lw


def kish_ess(log_weights: ArrayLike, *, nonfinite: str = "raise") -> float:
    r"""Normalised Kish effective sample size of importance weights (flowmc's one Kish ESS).

    .. math:: \mathrm{ESS} = \frac{(\sum_i w_i)^2}{N \sum_i w_i^2}
              = \exp\!\big(2\,\mathrm{LSE}(\log w) - \mathrm{LSE}(2\log w) - \log N\big)
              \in [1/N, 1],

    computed in log space (no overflow for huge log weights, invariant under a constant shift).
    For flow samples use ``log_weights = -action - log_q``.

    Args:
        log_weights: ``(N,)`` log importance weights (``-inf`` = zero weight); a numpy array,
            a sequence or a torch tensor (any device).
        nonfinite: ``"raise"`` (default): a NaN or ``+inf`` log weight is an error;
            ``"zero"``: every non-finite log weight counts as a zero weight (a flow sample whose
            action or density overflowed; used by training and :func:`flowmc.training.evaluate`).

    Returns:
        The ESS fraction (multiply by ``N`` for an effective number of samples).

    Raises:
        ValueError: if any log weight is NaN or ``+inf`` (``nonfinite="raise"``), or all are
            ``-inf``, or ``nonfinite`` is unknown.

    Example:
        >>> kish_ess([0.0, 0.0, 0.0, 0.0])
        1.0
        >>> kish_ess([0.0, float("nan")], nonfinite="zero")
        0.5
    """
    if nonfinite not in ("raise", "zero"):
        raise ValueError(f"Expected nonfinite 'raise' or 'zero'; got {nonfinite!r}")
    if hasattr(log_weights, "detach"):  # a torch tensor, possibly on an accelerator
        log_weights = log_weights.detach().double().cpu().numpy()
    if nonfinite == "zero":
        lw = np.asarray(log_weights, dtype=np.float64).reshape(-1)
        log_weights = np.where(np.isfinite(lw), lw, -np.inf)
    lw = _log_weights(log_weights)
    val = math.exp(2.0 * logsumexp(lw) - logsumexp(2.0 * lw) - math.log(lw.size))
    return float(min(max(val, 1.0 / lw.size), 1.0))  # clip roundoff outside [1/N, 1]


def kish_ess_batches(log_weights: ArrayLike, n_batches: int) -> tuple[float, float]:
    """Kish ESS fraction averaged over contiguous batches, with its standard error.

    Args:
        log_weights: ``(N,)`` log importance weights.
        n_batches: number of batches (>= 2); sizes differ by at most one (``np.array_split``).

    Returns:
        ``(mean, std_error)`` of the per-batch :func:`kish_ess`, ``std_error = s / sqrt(B)``
        with the unbiased sample standard deviation ``s``.

    Raises:
        ValueError: if ``n_batches < 2`` or fewer than one weight per batch.
    """
    lw = _log_weights(log_weights)
    if int(n_batches) != n_batches or n_batches < 2:
        raise ValueError(f"Expected an integer n_batches >= 2; got {n_batches}")
    if lw.size < n_batches:
        raise ValueError(f"Expected at least n_batches = {n_batches} log weights; got {lw.size}")
    vals = np.array([kish_ess(b) for b in np.array_split(lw, int(n_batches))])
    return float(vals.mean()), float(vals.std(ddof=1) / math.sqrt(vals.size))


def arviz_ess(data: ArrayLike, method: str = "mean") -> float:
    """Effective sample size from :func:`arviz.ess`, for cross-checks.

    arviz' ``method="mean"`` estimates :math:`N / (1 + 2\\sum\\rho) = N / (2\\tau_\\mathrm{int})`,
    i.e. the same quantity as :attr:`GammaResult.ess` (Geyer's initial monotone sequence instead
    of Wolff's window, with split chains).

    Args:
        data: ``(n_chains, n)`` or ``(n,)`` samples.
        method: arviz ESS method (``"mean"``, ``"bulk"``, ...).

    Returns:
        The ESS (total over chains).

    Raises:
        ValueError: on malformed input.
        ImportError: if arviz is not installed.
    """
    arr = np.asarray(data, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] < MIN_SAMPLES:
        raise ValueError(
            f"Expected data with shape (n_chains, n >= {MIN_SAMPLES}) or (n,); got {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError("Expected finite values in data; got NaN or inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz
    res = arviz.ess(arr, method=method)  # a scalar for ndarray input (xarray for datasets)
    if hasattr(res, "to_array"):
        res = res.to_array()
    return float(np.asarray(res).reshape(-1)[0])
