r"""Error analysis of a stored ensemble, in three stages: measure, estimate, diagnose.

:func:`analyze` runs the three stages on an ensemble file and returns a typed
:class:`AnalysisResult`:

1. :func:`measure_ensemble` streams the configurations once, chunk by chunk (never the whole
   ensemble at once), and returns :class:`Measurements`: the per-configuration primary series
   of :func:`flowmc.lattice.observables.measure` (``m``, ``abs_m``, ``m2``, ``m4``, ``energy``,
   ``phi4``, ``action_density``, ``sd_check`` and the momentum-space two-point function at
   :math:`p = 0` and :math:`p_\mathrm{min}`), the per-row sampler scalars, and bin means of
   :math:`G(x)` and :math:`C(t)`.
2. :func:`estimate` runs Wolff's Gamma method on the primaries (the ``C`` chains are
   replicas) and propagates errors to every derived quantity through **one tested function of**
   :mod:`flowmc.lattice.observables` each (:func:`~flowmc.lattice.observables.chi2_from_means`,
   :func:`~flowmc.lattice.observables.chi_connected_from_means`,
   :func:`~flowmc.lattice.observables.binder_from_means`,
   :func:`~flowmc.lattice.observables.xi2_from_momenta`,
   :func:`~flowmc.lattice.observables.effective_mass_from_slices`,
   :func:`~flowmc.lattice.observables.fit_cosh`); correlators from the bin means.
3. :func:`diagnose` computes the acceptance of every kernel present, rejection runs,
   :math:`\langle e^{-\Delta H}\rangle`, the Schwinger–Dyson check and the Z2 sign balance
   (:func:`flowmc.analysis.diagnostics.sign_balance_rule`, the one rule also used by ``flowmc eval``
   and ``flowmc train``), with plain-language warnings.

Observables that need a larger lattice than the ensemble's (:math:`\xi_2` needs
:math:`L_0 \ge 2`, :math:`m_\mathrm{eff}` :math:`L_0 \ge 3`, the pole mass :math:`L_0 \ge 6`)
are skipped with a note, down to a single site.

The JSON form (:meth:`AnalysisResult.to_dict`) has the keys listed, with definitions, in
``docs/analysis.md``; formulas of the observables are in ``docs/observables.md``, statistical
conventions in ``docs/statistics.md``.

References:
    U. Wolff, "Monte Carlo errors with less errors", hep-lat/0306017.
"""

from __future__ import annotations

import functools
import math
import os
import warnings as _warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from flowmc.analysis.autocorr import (
    AutocorrError,
    GammaResult,
    derived_gamma,
    gamma_analysis,
    jackknife,
)
from flowmc.analysis.diagnostics import (
    Z2_SIGMA,
    SignBalance,
    acceptance_by_kernel,
    binomial_error,
    kernel_of_sampler,
    longest_rejection_run,
    sign_balance_rule,
    sign_changes,
    stuck_chains,
)
from flowmc.io.ensemble import Ensemble, open_ensemble
from flowmc.lattice.observables import (
    binder_from_means,
    chi2_from_means,
    chi_connected_from_means,
    effective_mass_from_slices,
    fit_cosh,
    measure,
    xi2_from_momenta,
)

__all__ = [
    "analyze",
    "measure_ensemble",
    "estimate",
    "diagnose",
    "AnalysisResult",
    "Measurements",
    "Estimates",
    "Diagnostics",
    "Estimate",
    "Correlator",
    "EffectiveMass",
    "PoleMass",
    "SCALAR_KEYS",
    "NO_CONFIG_KEYS",
    "ENTRY_KEYS",
]

#: The scalar observables of an analysis, in table order: the one list used by
#: ``flowmc analyze``, ``flowmc compare`` and the reports.
SCALAR_KEYS = (
    "m",
    "abs_m",
    "m2",
    "chi2",
    "chi_conn",
    "binder",
    "energy",
    "xi2",
    "action_density",
    "phi4",
    "sd_check",
)
#: The subset computable from the stored scalars alone (ensembles without configurations).
NO_CONFIG_KEYS = ("m", "abs_m", "m2", "chi2", "chi_conn", "binder", "action_density")
#: Keys of every scalar entry.
ENTRY_KEYS = ("value", "error", "tau_int", "tau_int_error", "ess", "window", "reliable")

#: Primaries analysed directly (the others in :data:`SCALAR_KEYS` are derived).
PRIMARY_KEYS = ("m", "abs_m", "m2", "energy", "action_density", "phi4", "sd_check")
#: Upper bound on the number of bins per chain for ``G_x`` / ``C_t`` (memory: bins * C * V).
MAX_BINS = 256


# ============================================================================ result types
class Estimate(NamedTuple):
    """One scalar observable with its Gamma-method error (the JSON entry of ``docs/analysis.md``).

    Attributes:
        value: the estimate (mean, or derived quantity at the means).
        error: statistical error including autocorrelations.
        tau_int: integrated autocorrelation time, ½ + Σρ convention, in rows.
        tau_int_error: its error.
        ess: chain effective sample size ``N / (2 tau_int)`` over all chains.
        window: the summation window W (rows).
        reliable: ``False`` when the series was too short for a reliable window.
    """

    value: float
    error: float
    tau_int: float
    tau_int_error: float
    ess: float
    window: int
    reliable: bool

    @classmethod
    def from_gamma(cls, res: GammaResult, *, reliable: bool = True) -> Estimate:
        return cls(
            float(res.value),
            float(res.error),
            float(res.tau_int),
            float(res.tau_int_error),
            float(res.ess),
            int(res.window),
            bool(reliable),
        )

    def to_dict(self) -> dict[str, Any]:
        """``{value, error, tau_int, tau_int_error, ess, window, reliable}``."""
        return dict(self._asdict())


class Correlator(NamedTuple):
    """A binned correlator: ``G(x)`` (shape ``L``) or ``C(t)`` (shape ``(L_0,)``).

    Attributes:
        value: the mean over all analysed rows.
        error: Gamma-method errors from the bin series.
        bin_size: configurations per bin.
        n_bins: bins per chain.
    """

    value: np.ndarray
    error: np.ndarray
    bin_size: int
    n_bins: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value.tolist(),
            "error": self.error.tolist(),
            "bin_size": int(self.bin_size),
            "n_bins": int(self.n_bins),
        }


class EffectiveMass(NamedTuple):
    """Effective mass per time slice (``None`` at t = 0 and where undefined)."""

    value: list[float | None]
    error: list[float | None]

    def to_dict(self) -> dict[str, Any]:
        return {"value": list(self.value), "error": list(self.error)}


class PoleMass(NamedTuple):
    """Cosh fit to C(t) on ``[tmin, tmax]``; ``error`` is the jackknife error."""

    value: float
    error: float
    fit_error: float
    amplitude: float
    chi2: float
    dof: int
    tmin: int
    tmax: int
    n_jackknife_bins: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self._asdict())


class _Binned(NamedTuple):
    mean: np.ndarray  # (*shape)
    bins: np.ndarray  # (n_bins, C, *shape)
    bin_size: int
    n_bins: int


@dataclass
class Measurements:
    """Stage 1: what :func:`measure_ensemble` read from the file.

    Attributes:
        path: the ensemble file.
        n: rows per chain analysed (after ``discard``).
        n_total: rows per chain in the file.
        discard: rows per chain dropped at the start.
        n_chains: number of chains ``C``.
        lattice_shape: the lattice ``L``.
        sampler: the ensemble's ``sampler`` attribute.
        action_params: the ensemble's ``action`` attribute.
        action: the :class:`~flowmc.lattice.action.Phi4Action`, or ``None`` if it cannot be built.
        has_configs: whether configurations were stored (and measured).
        series: per-configuration primaries, each ``(n, C)`` float64: ``m``, ``abs_m``,
            ``m2``, ``m4`` and, as available, ``energy``, ``phi4``, ``action_density``,
            ``sd_check``,
            ``gp0`` (:math:`\\tilde G(0)`), ``gp1`` (:math:`\\tilde G(p_\\mathrm{min})`).
        scalars: the per-row scalars stored by the sampler, each ``(n, C)`` (``accepted``,
            ``action``, ``log_q``, ``delta_h``, ...).
        G: bin means of :math:`G(x)`, or ``None``.
        C: bin means of :math:`C(t)`, or ``None``.
        notes: what could not be measured, and why.
    """

    path: str
    n: int
    n_total: int
    discard: int
    n_chains: int
    lattice_shape: tuple[int, ...]
    sampler: dict[str, Any]
    action_params: dict[str, Any]
    action: Any
    has_configs: bool
    series: dict[str, np.ndarray]
    scalars: dict[str, np.ndarray]
    G: _Binned | None = None
    C: _Binned | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def volume(self) -> int:
        return math.prod(self.lattice_shape)


@dataclass
class Estimates:
    """Stage 2: what :func:`estimate` computed.

    Attributes:
        observables: ``{name: Estimate}`` for the :data:`SCALAR_KEYS` that could be computed,
            in that order.
        G_x, C_t: binned correlators, or ``None`` (no configurations).
        m_eff: effective mass per t, or ``None`` (no configurations, or ``L_0 < 3``).
        pole_mass: the cosh-fit mass, or ``None``.
        gamma: every :class:`~flowmc.analysis.autocorr.GammaResult` by name (with ``rho`` and
            ``window``, for autocorrelation plots).
        short: names whose series were too short for a reliable window.
        warnings: problems found while estimating (derived quantity undefined, failed fit, ...).
        notes: what was skipped, and why.
    """

    observables: dict[str, Estimate]
    G_x: Correlator | None = None
    C_t: Correlator | None = None
    m_eff: EffectiveMass | None = None
    pole_mass: PoleMass | None = None
    gamma: dict[str, GammaResult] = field(default_factory=dict)
    short: dict[str, GammaResult] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Diagnostics:
    """Stage 3: what :func:`diagnose` found.

    Attributes:
        acceptance: mean of the scalar ``accepted`` (or ``is_accepted``), or ``None``.
        acceptance_per_chain: per chain, or ``None``.
        acceptance_by_kernel: ``{kernel: acceptance}`` for every kernel with stored flags
            (``flow``, ``hmc``, ...; see :func:`flowmc.analysis.diagnostics.acceptance_by_kernel`).
        longest_rejection_run: longest run of stored rows with ``accepted = False``.
        longest_rejection_run_per_chain: per chain.
        exp_minus_delta_h: :math:`\\langle e^{-\\Delta H}\\rangle` (exactly 1), if ``delta_h``
            is stored.
        frac_m_positive: fraction of configurations with ``m > 0`` (error floored at the
            binomial error).
        m_over_error: :math:`\\langle m\\rangle/\\sigma_m`.
        mode_crossings: sign changes of M per chain.
        z2_symmetric_action: whether the action is Z2 symmetric (``None`` if unknown).
        sign_balance: the outcome of the Z2 sign rule, or ``None``.
        gamma: Gamma results of the diagnostics series.
        short: names whose series were too short.
        warnings, notes: plain-language findings.
    """

    acceptance: float | None = None
    acceptance_per_chain: list[float] | None = None
    acceptance_by_kernel: dict[str, float] = field(default_factory=dict)
    longest_rejection_run: int | None = None
    longest_rejection_run_per_chain: list[int] | None = None
    exp_minus_delta_h: Estimate | None = None
    frac_m_positive: Estimate | None = None
    m_over_error: float | None = None
    mode_crossings: list[int] | None = None
    z2_symmetric_action: bool | None = None
    sign_balance: SignBalance | None = None
    gamma: dict[str, GammaResult] = field(default_factory=dict)
    short: dict[str, GammaResult] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class AnalysisResult:
    """The analysis of one ensemble (:func:`analyze`).

    Indexing gives the JSON form: ``res["chi2"]["value"]`` equals
    ``res.observables["chi2"].value``; :meth:`to_dict` returns the whole JSON form, whose keys
    are documented in ``docs/analysis.md``.

    Attributes:
        path: the ensemble file.
        n: rows per chain analysed (after ``discard``).
        n_total: rows per chain in the file.
        discard: rows per chain dropped.
        chains: number of chains ``C``.
        lattice_shape: the lattice ``L``.
        volume: :math:`V = \\prod_\\mu L_\\mu`.
        sampler: the ensemble's ``sampler`` attribute.
        action: the ensemble's ``action`` attribute.
        has_configs: whether configurations were stored.
        S: Wolff's windowing parameter used.
        observables: ``{name: Estimate}`` in :data:`SCALAR_KEYS` order (those computed).
        G_x, C_t, m_eff, pole_mass: correlators (``None`` when not computed).
        diagnostics: :class:`Diagnostics`.
        warnings: every warning (a too-short-series message first, if any).
        notes: what was skipped, and why.
        gamma: every :class:`~flowmc.analysis.autocorr.GammaResult` by name.
        series: per-configuration primaries ``(n, C)`` (see :class:`Measurements`).
        scalars: per-row sampler scalars ``(n, C)``.
    """

    path: str
    n: int
    n_total: int
    discard: int
    chains: int
    lattice_shape: tuple[int, ...]
    volume: int
    sampler: dict[str, Any]
    action: dict[str, Any]
    has_configs: bool
    S: float
    observables: dict[str, Estimate]
    G_x: Correlator | None
    C_t: Correlator | None
    m_eff: EffectiveMass | None
    pole_mass: PoleMass | None
    diagnostics: Diagnostics
    warnings: list[str]
    notes: list[str]
    gamma: dict[str, GammaResult] = field(repr=False, default_factory=dict)
    series: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    scalars: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, with the keys documented in ``docs/analysis.md``."""
        d = self.diagnostics
        out: dict[str, Any] = {
            "path": self.path,
            "n": self.n,
            "n_total": self.n_total,
            "discard": self.discard,
            "chains": self.chains,
            "lattice_shape": list(self.lattice_shape),
            "volume": self.volume,
            "sampler": dict(self.sampler),
            "action": dict(self.action),
            "has_configs": self.has_configs,
            "S": self.S,
        }
        out.update({k: e.to_dict() for k, e in self.observables.items()})
        for key in ("G_x", "C_t", "m_eff", "pole_mass"):
            val = getattr(self, key)
            if val is not None:
                out[key] = val.to_dict()
        if d.acceptance is not None:
            out["acceptance"] = d.acceptance
            out["acceptance_per_chain"] = d.acceptance_per_chain
            out["longest_rejection_run"] = d.longest_rejection_run
            out["longest_rejection_run_per_chain"] = d.longest_rejection_run_per_chain
        if d.acceptance_by_kernel:
            out["acceptance_by_kernel"] = dict(d.acceptance_by_kernel)
        if d.exp_minus_delta_h is not None:
            out["exp_minus_delta_h"] = d.exp_minus_delta_h.to_dict()
        if d.frac_m_positive is not None:
            out["frac_m_positive"] = d.frac_m_positive.to_dict()
            out["m_over_error"] = d.m_over_error
            out["mode_crossings"] = list(d.mode_crossings or [])
            out["z2_symmetric_action"] = d.z2_symmetric_action
        out["warnings"] = list(self.warnings)
        out["notes"] = list(self.notes)
        return out

    # dict-like read access to the JSON form, for notebooks: res["chi2"]["value"]
    def _json(self) -> dict[str, Any]:
        cache = self.__dict__.get("_json_cache")
        if cache is None:
            cache = self.to_dict()
            self.__dict__["_json_cache"] = cache
        return cache

    def __getitem__(self, key: str) -> Any:
        return self._json()[key]

    def __contains__(self, key: object) -> bool:
        return key in self._json()

    def __iter__(self) -> Iterator[str]:
        return iter(self._json())

    def keys(self) -> Any:
        return self._json().keys()

    def get(self, key: str, default: Any = None) -> Any:
        return self._json().get(key, default)


# ============================================================================ stage 1: measure
def _build_action(params: dict[str, Any], shape: tuple[int, ...]) -> tuple[Any, str | None]:
    """The action object of an ensemble, or ``(None, reason)``."""
    from flowmc.lattice.action import Phi4Action

    p = dict(params or {})
    p.setdefault("lattice_shape", list(shape))
    try:
        action = Phi4Action.from_params(p)
    except (KeyError, TypeError, ValueError) as exc:
        return None, f"cannot build the action from {params!r} ({exc})"
    if tuple(action.lattice_shape) != tuple(shape):
        return None, (
            f"the action's lattice {tuple(action.lattice_shape)} differs from the ensemble's "
            f"{tuple(shape)}"
        )
    return action, None


def _n_bins(n: int, n_chains: int, volume: int) -> int:
    """Bins per chain for the blocked ``G_x``/``C_t`` analysis (bounded memory, >= 5 bins)."""
    cap = max(5, (2**24) // max(1, n_chains * volume))
    return int(min(n, MAX_BINS, cap))


class _Binner:
    """Accumulates per-configuration arrays ``(k, C, *shape)`` into equal bins per chain.

    Rows ``0 .. n_bins*b - 1`` go into ``n_bins`` bins of ``b`` rows; the remaining
    ``n mod b`` rows enter only the overall mean.
    """

    def __init__(self, n: int, n_chains: int, shape: tuple[int, ...], n_bins: int) -> None:
        self.b = n // n_bins
        self.n_bins = n_bins
        self.sums = np.zeros((n_bins, n_chains, *shape))
        self.total = np.zeros((n_chains, *shape))
        self.n = n

    def add(self, start: int, x: np.ndarray) -> None:
        self.total += x.sum(axis=0)
        idx = (start + np.arange(x.shape[0])) // self.b
        keep = idx < self.n_bins
        if np.any(keep):
            np.add.at(self.sums, idx[keep], x[keep])

    def result(self) -> _Binned:
        mean = self.total.sum(axis=0) / (self.n * self.total.shape[0])
        return _Binned(mean, self.sums / self.b, self.b, self.n_bins)


def measure_ensemble(ens: Ensemble, *, discard: int = 0, chunk: int = 512) -> Measurements:
    """Stage 1: stream an open ensemble once into per-configuration series and binned correlators.

    Args:
        ens: an open :class:`~flowmc.io.ensemble.Ensemble`.
        discard: rows per chain dropped at the start.
        chunk: rows per chain read from disk at a time (bounds memory).

    Returns:
        :class:`Measurements`.

    Raises:
        ValueError: on bad arguments, or fewer than 5 rows per chain after ``discard``.
    """
    if int(discard) != discard or discard < 0:
        raise ValueError(f"Expected discard >= 0; got {discard!r}")
    if int(chunk) != chunk or chunk < 1:
        raise ValueError(f"Expected chunk >= 1; got {chunk!r}")
    discard, chunk = int(discard), int(chunk)
    n = ens.n - discard
    if n < 5:
        raise ValueError(
            f"Expected at least 5 configurations per chain after discarding {discard}; "
            f"{ens.path!r} has n = {ens.n}"
        )
    shape = tuple(int(s) for s in ens.lattice_shape)
    vol = math.prod(shape)
    n_chains = ens.n_chains
    notes: list[str] = []
    action, why = _build_action(ens.action, shape)
    if action is None:
        notes.append(f"action-dependent observables skipped: {why}")
    scalars = {
        name: np.asarray(ens.scalar(name)[discard:]) for name in ens.scalar_names
    }
    meas = Measurements(
        path=ens.path, n=n, n_total=ens.n, discard=discard, n_chains=n_chains,
        lattice_shape=shape, sampler=dict(ens.sampler), action_params=dict(ens.action),
        action=action, has_configs=bool(ens.has_configs), series={}, scalars=scalars,
        notes=notes,
    )  # fmt: skip
    if not ens.has_configs:
        notes.append(
            "the ensemble stores no configurations (--no-configs): energy, xi2, phi4, sd_check, "
            "G_x, C_t, m_eff and pole_mass are not computed"
        )
        if "magnetization" in scalars:
            m = np.asarray(scalars["magnetization"], dtype=np.float64) / vol
            meas.series.update(m=m, abs_m=np.abs(m), m2=m**2, m4=m**4)
        else:
            notes.append("no 'magnetization' scalar: magnetisation observables skipped")
        if "action" in scalars:
            meas.series["action_density"] = np.asarray(scalars["action"], np.float64) / vol
        return meas

    n_bins = _n_bins(n, n_chains, vol)
    g_binner = _Binner(n, n_chains, shape, n_bins)
    c_binner = _Binner(n, n_chains, (shape[0],), n_bins)
    # axes of the same extent as axis 0; p_min = 2 pi / L_0 along each (xi2 needs L_0 >= 2)
    axes = [a for a in range(len(shape)) if shape[a] == shape[0]]
    with_p1 = shape[0] >= 2
    lat_axes = tuple(range(2, 2 + len(shape)))
    parts: dict[str, list[np.ndarray]] = {}
    row = 0
    for block in ens.iter_configs(chunk, start=discard):
        k = block.shape[0]
        flat = np.asarray(block, dtype=np.float64).reshape(k * n_chains, *shape)
        obs = measure(flat, action, chunk_size=k * n_chains)
        g = obs.pop("G_x").reshape(k, n_chains, *shape)
        g_binner.add(row, g)
        c_binner.add(row, obs.pop("C_t").reshape(k, n_chains, shape[0]))
        gt = np.fft.fftn(g, axes=lat_axes).real
        lead = (slice(None), slice(None))
        parts.setdefault("gp0", []).append(gt[(*lead, *(0,) * len(shape))])
        if with_p1:
            unit = [tuple(1 if b == a else 0 for b in range(len(shape))) for a in axes]
            parts.setdefault("gp1", []).append(np.mean([gt[(*lead, *u)] for u in unit], axis=0))
        for key, val in obs.items():
            parts.setdefault(key, []).append(val.reshape(k, n_chains))
        row += k
    series = {key: np.concatenate(v) for key, v in parts.items()}
    if "sd" in series:
        series["sd_check"] = series.pop("sd")
    meas.series = series
    meas.G = g_binner.result()
    meas.C = c_binner.result()
    return meas


# ============================================================================ stage 2: estimate
class _Collector:
    """Runs Gamma analyses, turning too-short series into recorded entries (or raising)."""

    def __init__(self, *, S: float, quiet: bool) -> None:
        self.S = S
        self.quiet = quiet
        self.gamma: dict[str, GammaResult] = {}
        self.short: dict[str, GammaResult] = {}

    def run(self, name: str, fn: Callable[..., GammaResult], *args: Any, **kw: Any) -> GammaResult:
        try:
            res = fn(*args, S=self.S, quiet=False, **kw)
        except AutocorrError as exc:
            if not self.quiet or exc.result is None:
                raise
            res = exc.result
            self.short[name] = res
        self.gamma[name] = res
        return res

    def estimate(self, name: str, res: GammaResult) -> Estimate:
        return Estimate.from_gamma(res, reliable=name not in self.short)

    def scalar(self, name: str, series: np.ndarray) -> Estimate:
        """Gamma analysis of an ``(n, C)`` series; chains are replicas."""
        return self.estimate(name, self.run(name, gamma_analysis, np.ascontiguousarray(series.T)))

    def derived(
        self, name: str, f: Callable[..., float], series: Sequence[np.ndarray], warn: list[str]
    ) -> Estimate | None:
        """``f(*means)`` with a linearised Gamma-method error; ``None`` (and a warning) if
        ``f`` is not finite at the means."""
        data = [np.ascontiguousarray(s.T) for s in series]
        try:
            res = self.run(name, derived_gamma, f, data)
        except ValueError as exc:  # f non-finite at the means (e.g. xi2^2 < 0)
            warn.append(f"{name}: not computed ({exc})")
            return None
        return self.estimate(name, res)


def _binned_errors(bins: np.ndarray, S: float) -> tuple[np.ndarray, int]:
    """Gamma-method errors of each component of bin means ``(n_bins, C, *shape)``.

    Returns ``(error, n_failed)``. A component whose window could not be established keeps
    its (unreliable) estimate and is counted.
    """
    shape = bins.shape[2:]
    flat = bins.reshape(bins.shape[0], bins.shape[1], -1)
    err = np.zeros(flat.shape[2])
    failed = 0
    for j in range(flat.shape[2]):
        series = np.ascontiguousarray(flat[:, :, j].T)
        try:
            res = gamma_analysis(series, S=S, quiet=False)
        except AutocorrError as exc:
            res, failed = exc.result, failed + 1
        # error of the mean of n_bins*C bin means of size b == error of the full mean
        err[j] = res.error
    return err.reshape(shape), failed


def _effective_mass(
    c_mean: np.ndarray, c_bins: np.ndarray, col: _Collector, warn: list[str]
) -> EffectiveMass:
    """Effective mass per t at the means of C(t-1), C(t), C(t+1) over all rows; the error is
    linearised over their bin means."""
    length = c_bins.shape[2]
    values: list[float | None] = [None] * length
    errors: list[float | None] = [None] * length
    n_short = 0
    for t in range(1, length):
        series = [np.ascontiguousarray(c_bins[:, :, (t + s) % length].T) for s in (-1, 0, 1)]
        try:
            res = derived_gamma(effective_mass_from_slices, series, S=col.S, quiet=False)
        except AutocorrError as exc:
            if not col.quiet:
                raise
            res, n_short = exc.result, n_short + 1
        except ValueError:  # ratio < 1 at the means (or at a finite-difference step)
            continue
        value = effective_mass_from_slices(*(c_mean[(t + s) % length] for s in (-1, 0, 1)))
        if math.isfinite(value):
            values[t], errors[t] = value, float(res.error)
    if n_short:
        warn.append(
            f"m_eff: the bin series of {n_short} time slices were too short for a reliable "
            "window; their errors are unreliable"
        )
    return EffectiveMass(values, errors)


def _pole_mass(
    c_mean: np.ndarray, c_err: np.ndarray, c_bins: np.ndarray, warn: list[str]
) -> PoleMass | None:
    """Cosh fit to C(t) on [1, L/2] with the errors of C fixed, jackknife over bins."""
    length = c_mean.size
    tmin, tmax = 1, length // 2
    err = np.where(c_err > 0, c_err, np.nan)
    if not np.all(np.isfinite(err[tmin : tmax + 1])):
        warn.append("pole_mass: not fitted (C(t) has zero error on the fit range)")
        return None

    def mass(*c: float) -> float:
        return fit_cosh(np.asarray(c), err, tmin=tmin, tmax=tmax).mass

    try:
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")
            fit = fit_cosh(c_mean, err, tmin=tmin, tmax=tmax)
            n_jk = int(min(50, c_bins.shape[0] * c_bins.shape[1]))
            data = [np.ascontiguousarray(c_bins[:, :, t].T) for t in range(length)]
            _, jk_err = jackknife(mass, data, n_bins=n_jk)
    except (RuntimeError, ValueError) as exc:
        warn.append(f"pole_mass: cosh fit failed ({exc})")
        return None
    return PoleMass(
        float(fit.mass), float(jk_err), float(fit.mass_err), float(fit.amplitude),
        float(fit.chi2), int(fit.dof), tmin, tmax, n_jk,
    )  # fmt: skip


def estimate(meas: Measurements, *, S: float = 1.5, quiet_autocorr: bool = True) -> Estimates:
    """Stage 2: Gamma-method estimates of every observable the measurements allow.

    Primaries directly; derived quantities by linearisation through one function of
    :mod:`flowmc.lattice.observables` each; ``G_x``/``C_t``/``m_eff`` from bin means; the pole mass
    by a cosh fit with a jackknife error.

    Args:
        meas: the output of :func:`measure_ensemble`.
        S: Wolff's windowing parameter.
        quiet_autocorr: record too-short series in :attr:`Estimates.short` (if ``False``,
            re-raise the :class:`~flowmc.analysis.autocorr.AutocorrError`).

    Returns:
        :class:`Estimates`.
    """
    if not (math.isfinite(S) and S >= 0):
        raise ValueError(f"Expected S >= 0; got {S!r}")
    col = _Collector(S=S, quiet=quiet_autocorr)
    warn: list[str] = []
    notes: list[str] = []
    series = meas.series
    vol = meas.volume
    length0 = meas.lattice_shape[0]
    found: dict[str, Estimate | None] = {}
    for key in PRIMARY_KEYS:
        if key in series:
            found[key] = col.scalar(key, series[key])
    if "m2" in series:
        m2, abs_m, m4 = series["m2"], series["abs_m"], series["m4"]
        found["chi2"] = col.derived(
            "chi2", functools.partial(chi2_from_means, volume=vol), [m2], warn
        )
        found["chi_conn"] = col.derived(
            "chi_conn", functools.partial(chi_connected_from_means, volume=vol), [m2, abs_m], warn
        )
        found["binder"] = col.derived("binder", binder_from_means, [m2, m4], warn)
    if "gp1" in series:
        found["xi2"] = col.derived(
            "xi2", functools.partial(xi2_from_momenta, length=length0),
            [series["gp0"], series["gp1"]], warn,
        )  # fmt: skip
    elif "gp0" in series:
        notes.append(f"xi2 needs L >= 2 along axis 0 (L_0 = {length0}); skipped")
    out = Estimates(
        observables={k: found[k] for k in SCALAR_KEYS if found.get(k) is not None},
        warnings=warn,
        notes=notes,
    )

    if meas.G is not None and meas.C is not None:
        g_err, g_fail = _binned_errors(meas.G.bins, S)
        c_err, c_fail = _binned_errors(meas.C.bins, S)
        if g_fail or c_fail:
            warn.append(
                f"G_x/C_t: the bin series of {g_fail} separations / {c_fail} time slices were "
                "too short for a reliable window; their errors are unreliable"
            )
        out.G_x = Correlator(meas.G.mean, g_err, meas.G.bin_size, meas.G.n_bins)
        out.C_t = Correlator(meas.C.mean, c_err, meas.C.bin_size, meas.C.n_bins)
        if length0 >= 3:
            out.m_eff = _effective_mass(meas.C.mean, meas.C.bins, col, warn)
        else:
            notes.append(f"m_eff needs L >= 3 along axis 0 (L_0 = {length0}); skipped")
        if length0 >= 6:  # fit range t = 1..L/2 with at least 3 points for 2 parameters
            out.pole_mass = _pole_mass(meas.C.mean, c_err, meas.C.bins, warn)
        else:
            notes.append(
                f"pole_mass needs L >= 6 along axis 0 (3 points in t = 1..L/2; L_0 = "
                f"{length0}); skipped"
            )
    out.gamma, out.short = col.gamma, col.short
    return out


# ============================================================================ stage 3: diagnose
def diagnose(
    meas: Measurements, est: Estimates, *, S: float = 1.5, quiet_autocorr: bool = True
) -> Diagnostics:
    """Stage 3: sampler and consistency diagnostics, with plain-language warnings.

    Acceptance (generic ``accepted`` and per kernel), longest rejection runs,
    :math:`\\langle e^{-\\Delta H}\\rangle` (exactly 1 for HMC), the Schwinger–Dyson check
    (exactly 1), the Z2 sign rule (:func:`flowmc.analysis.diagnostics.sign_balance_rule`) and chains
    stuck in one mode.

    Args:
        meas: the output of :func:`measure_ensemble`.
        est: the output of :func:`estimate` (for ``m`` and ``sd_check``).
        S: Wolff's windowing parameter.
        quiet_autocorr: as for :func:`estimate`.

    Returns:
        :class:`Diagnostics`.
    """
    col = _Collector(S=S, quiet=quiet_autocorr)
    out = Diagnostics()
    warn, notes = out.warnings, out.notes
    sc = meas.scalars
    generic = next((k for k in ("accepted", "is_accepted") if k in sc), None)
    if generic is not None:
        acc = np.asarray(sc[generic], dtype=bool)
        runs = longest_rejection_run(acc)
        out.acceptance = float(acc.mean())
        out.acceptance_per_chain = acc.mean(axis=0).tolist()
        out.longest_rejection_run = int(runs.max())
        out.longest_rejection_run_per_chain = runs.tolist()
        if meas.sampler.get("name") == "hybrid":
            notes.append(
                f"'accepted' of a hybrid ensemble is the {kernel_of_sampler(meas.sampler)} "
                "step's: acceptance and rejection runs refer to it"
            )
    else:
        notes.append("no 'accepted' scalar: acceptance and rejection runs not computed")
    out.acceptance_by_kernel, kernel_notes = acceptance_by_kernel(sc, meas.sampler)
    notes.extend(kernel_notes)

    if "delta_h" in sc:
        dh = np.nan_to_num(np.asarray(sc["delta_h"], dtype=np.float64), nan=np.inf, posinf=np.inf)
        e = col.scalar("exp_minus_delta_h", np.exp(-dh))
        out.exp_minus_delta_h = e
        if e.error > 0 and abs(e.value - 1.0) > Z2_SIGMA * e.error:
            warn.append(
                f"<exp(-dH)> = {e.value:.4g} +- {e.error:.2g} differs from 1 by more than "
                f"{Z2_SIGMA:g} sigma: the HMC integrator is not reversible/area preserving"
            )

    sd = est.observables.get("sd_check")
    if sd is not None and sd.error > 0 and abs(sd.value - 1.0) > Z2_SIGMA * sd.error:
        warn.append(
            f"Schwinger-Dyson check <sd> = {sd.value:.5g} +- {sd.error:.2g} differs from "
            f"its exact value 1 by more than {Z2_SIGMA:g} sigma: the ensemble does not sample "
            "exp(-S) (biased sampler, or unreliable error bars)"
        )

    m = meas.series.get("m")
    m_est = est.observables.get("m")
    if m is not None and m_est is not None:
        _z2(out, m, m_est, meas.action, col)
    out.gamma, out.short = col.gamma, col.short
    return out


def _z2(out: Diagnostics, m: np.ndarray, m_est: Estimate, action: Any, col: _Collector) -> None:
    """Sign balance and mode crossings of the magnetisation (the one Z2 rule)."""
    pos = (m > 0).astype(np.float64)
    res = col.run("frac_m_positive", gamma_analysis, np.ascontiguousarray(pos.T))
    p = float(res.value)
    # a one-signed (constant) series has zero Gamma error: floor at the binomial error
    err = max(float(res.error), binomial_error(p, m.size))
    out.frac_m_positive = col.estimate("frac_m_positive", res)._replace(error=err)
    out.m_over_error = (
        float(m_est.value / m_est.error)
        if m_est.error > 0
        else math.copysign(math.inf, m_est.value)
    )
    out.mode_crossings = sign_changes(m)
    z2 = bool(getattr(action, "is_z2_symmetric", False)) if action is not None else None
    out.z2_symmetric_action = z2
    if not z2:
        out.notes.append("Z2 sign-balance checks skipped (action unknown or not Z2 symmetric)")
        return
    rule = sign_balance_rule(p, err, m_over_error=out.m_over_error)
    out.sign_balance = rule
    if rule.imbalanced:
        out.warnings.append(
            f"Z2 sign balance is off: <m> = {m_est.value:.4g} +- {m_est.error:.2g} "
            f"({out.m_over_error:+.1f} sigma from 0), frac(m > 0) = {p:.3f} +- {err:.2g} "
            f"({rule.z_frac:.1f} sigma from 1/2), although the action is Z2 symmetric. The chains "
            "do not sample both modes in proportion: Z2-odd observables are biased and errors of "
            "the others may be underestimated. Use a Z2-symmetrised flow (--symmetric) or "
            "longer chains."
        )
    stuck = stuck_chains(m)
    if stuck:
        out.warnings.append(
            f"chain(s) {stuck} never crossed between the modes m > 0 and m < 0 while |<m>| is "
            "large compared with its spread (broken phase): each chain samples one Z2 sector "
            "only, so m, frac(m > 0) and tau_int are unreliable; symmetrise the observables or "
            "the proposal."
        )


def _short_warning(short: dict[str, GammaResult]) -> str | None:
    """One message naming every series too short for its autocorrelation time."""
    if not short:
        return None
    n = next(iter(short.values())).n
    items = ", ".join(
        f"{k} (tau_int = {r.tau_int:.3g} +- {r.tau_int_error:.2g})" for k, r in short.items()
    )
    return (
        f"series too short for a reliable autocorrelation analysis (need N >= 50 tau_int "
        f"and a closed window; N = {n} over all chains): {items}. Their error bars and "
        "tau_int are unreliable (probably underestimated): run longer chains or improve "
        "the sampler."
    )


def _check_finite(meas: Measurements) -> None:
    """Refuse non-finite data before any estimate, naming the file, the series, the chain and
    the row (0-based, counted in the file) of the first NaN or inf. Checked: the stored action
    and magnetisation and every measured observable (``delta_h`` may be infinite: a divergent
    trajectory, handled by its diagnostic)."""
    stored = {k: meas.scalars[k] for k in ("action", "magnetization") if k in meas.scalars}
    named = {**stored, **meas.series}
    for name, values in named.items():
        arr = np.asarray(values)
        if arr.ndim != 2 or np.all(np.isfinite(arr)):
            continue
        row, chain = (int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        source = "scalar" if name in meas.scalars else "measured observable"
        raise ValueError(
            f"{meas.path!r}: {source} {name!r} is {arr[row, chain]} in chain {chain}, row "
            f"{row + meas.discard} (rows counted from 0 in the file): the file is damaged or "
            "was written by a broken sampler; no error bar can be computed from it"
        )


# ============================================================================ entry point
def analyze(
    path_or_ensemble: str | os.PathLike[str] | Ensemble,
    *,
    discard: int = 0,
    S: float = 1.5,
    chunk: int = 512,
    quiet_autocorr: bool = True,
) -> AnalysisResult:
    r"""Analyse an ensemble: observables with Gamma-method errors and sampler/Z2 diagnostics.

    Runs :func:`measure_ensemble`, :func:`estimate` and :func:`diagnose`. All ``C`` chains are
    replicas of one Monte Carlo history in the Gamma method (one global mean, Γ(t) summed over
    chains).

    Args:
        path_or_ensemble: an ensemble file or an open :class:`~flowmc.io.ensemble.Ensemble`.
        discard: rows per chain dropped at the start (thermalisation).
        S: Wolff's windowing parameter (see :func:`flowmc.analysis.autocorr.gamma_analysis`).
        chunk: rows per chain read from disk at a time (bounds memory).
        quiet_autocorr: record a too-short series (``AutocorrError``) as a message in
            ``warnings`` and keep its unreliable estimate; if ``False`` re-raise it.

    Returns:
        :class:`AnalysisResult`; ``res["chi2"]`` (and :meth:`AnalysisResult.to_dict`) give the
        JSON form documented in ``docs/analysis.md``.

    Raises:
        ValueError: if ``discard`` leaves fewer than 5 rows per chain, or on bad arguments.
        AutocorrError: for a too-short series when ``quiet_autocorr=False``.

    Example:
        >>> res = analyze("run.h5", discard=100)  # doctest: +SKIP
        >>> res["chi2"]["value"], res.observables["chi2"].error  # doctest: +SKIP
    """
    try:
        ok = math.isfinite(float(S)) and float(S) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"Expected S >= 0; got {S!r}")
    if isinstance(path_or_ensemble, Ensemble):
        meas = measure_ensemble(path_or_ensemble, discard=discard, chunk=chunk)
    else:
        with open_ensemble(path_or_ensemble) as ens:
            meas = measure_ensemble(ens, discard=discard, chunk=chunk)
    _check_finite(meas)
    est = estimate(meas, S=S, quiet_autocorr=quiet_autocorr)
    diag = diagnose(meas, est, S=S, quiet_autocorr=quiet_autocorr)
    short = _short_warning({**est.short, **diag.short})
    warnings = ([short] if short else []) + est.warnings + diag.warnings
    return AnalysisResult(
        path=meas.path, n=meas.n, n_total=meas.n_total, discard=meas.discard,
        chains=meas.n_chains, lattice_shape=meas.lattice_shape, volume=meas.volume,
        sampler=meas.sampler, action=meas.action_params, has_configs=meas.has_configs,
        S=float(S), observables=est.observables, G_x=est.G_x, C_t=est.C_t, m_eff=est.m_eff,
        pole_mass=est.pole_mass, diagnostics=diag, warnings=warnings,
        notes=meas.notes + est.notes + diag.notes, gamma={**est.gamma, **diag.gamma},
        series=meas.series, scalars=meas.scalars,
    )  # fmt: skip
