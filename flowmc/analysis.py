r"""Error analysis of a stored ensemble: every observable with a Gamma-method error bar.

:func:`analyze` streams the configurations of an ensemble file chunk by chunk (never the whole
ensemble at once), measures the per-configuration primaries of :func:`flowmc.observables.measure`
and analyses them with Wolff's Gamma method, the ``C`` chains acting as replicas:

* primaries (``m``, ``abs_m``, ``m2``, ``energy``, ``action_density``, ``sd_check``): mean, error,
  :math:`\tau_\mathrm{int}` (½ + Σρ convention) and ESS :math:`= N/(2\tau_\mathrm{int})`;
* derived quantities (``chi2``, ``chi_conn``, ``binder``, ``xi2``) by linearisation
  (:func:`flowmc.autocorr.derived_gamma`), :math:`\tau_\mathrm{int}` of the projected series;
* the two-point function ``G_x``, the zero-momentum correlator ``C_t`` and the effective mass
  ``m_eff`` from block means (bins of ``b`` consecutive configurations, Gamma method on the bin
  series), and a pole mass from a cosh fit with a jackknife error;
* sampler diagnostics (acceptance, longest rejection run, :math:`\langle e^{-\Delta H}\rangle`
  for HMC) and :math:`Z_2` diagnostics (sign balance, mode crossings) with plain-language
  ``warnings``.

The JSON keys of the result are listed, with definitions, in ``docs/analysis.md``; formulas of
the observables are in ``docs/observables.md``, statistical conventions in ``docs/statistics.md``.
Keys starting with ``_`` hold in-memory extras (Gamma results, series) for plotting and are
dropped by :func:`flowmc.commands._common.write_json`.

References:
    U. Wolff, "Monte Carlo errors with less errors", hep-lat/0306017.
"""

from __future__ import annotations

import math
import os
import warnings as _warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from flowmc.autocorr import AutocorrError, GammaResult, derived_gamma, gamma_analysis, jackknife
from flowmc.ensemble import Ensemble, open_ensemble
from flowmc.observables import fit_cosh, measure

__all__ = ["analyze", "SCALAR_KEYS", "NO_CONFIG_KEYS", "ENTRY_KEYS"]

#: Scalar observables reported by :func:`analyze` (each an entry with :data:`ENTRY_KEYS`).
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
    "sd_check",
)
#: The subset computable from the stored scalars alone (ensembles without configurations).
NO_CONFIG_KEYS = ("m", "abs_m", "m2", "chi2", "chi_conn", "binder", "action_density")
#: Keys of every scalar entry.
ENTRY_KEYS = ("value", "error", "tau_int", "tau_int_error", "ess", "window", "reliable")

#: Upper bound on the number of bins per chain for ``G_x`` / ``C_t`` (memory: bins * C * V).
MAX_BINS = 256
#: Sign-balance threshold (in standard errors) for the Z2 warnings.
Z2_SIGMA = 4.0


def _entry(res: GammaResult) -> dict[str, float]:
    return {
        "value": float(res.value),
        "error": float(res.error),
        "tau_int": float(res.tau_int),
        "tau_int_error": float(res.tau_int_error),
        "ess": float(res.ess),
        "window": int(res.window),
    }


class _Collector:
    """Runs Gamma analyses, turning too-short series into recorded warnings (or raising)."""

    def __init__(self, *, S: float, quiet: bool) -> None:
        self.S = S
        self.quiet = quiet
        self.warnings: list[str] = []
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

    def entry(self, name: str, res: GammaResult) -> dict[str, Any]:
        return {**_entry(res), "reliable": name not in self.short}

    def short_warning(self) -> str | None:
        """One message naming every series too short for its autocorrelation time."""
        if not self.short:
            return None
        n = next(iter(self.short.values())).n
        items = ", ".join(
            f"{k} (tau_int = {r.tau_int:.3g} +- {r.tau_int_error:.2g})"
            for k, r in self.short.items()
        )
        return (
            f"series too short for a reliable autocorrelation analysis (need N >= 50 tau_int "
            f"and a closed window; N = {n} over all chains): {items}. Their error bars and "
            "tau_int are unreliable (probably underestimated): run longer chains or improve "
            "the sampler."
        )

    def scalar(self, name: str, series: np.ndarray) -> dict[str, float]:
        """Gamma analysis of an ``(n, C)`` series; chains are replicas."""
        return self.entry(name, self.run(name, gamma_analysis, np.ascontiguousarray(series.T)))

    def derived(
        self,
        name: str,
        f: Callable[..., float],
        series: Sequence[np.ndarray],
        grad: Callable[..., Sequence[float]] | None = None,
    ) -> dict[str, float] | None:
        data = [np.ascontiguousarray(s.T) for s in series]
        try:
            res = self.run(name, derived_gamma, f, data, grad=grad)
        except ValueError as exc:  # f non-finite at the means (e.g. xi2^2 < 0)
            self.warnings.append(f"{name}: not computed ({exc})")
            return None
        return self.entry(name, res)


# ----------------------------------------------------------------------------- helpers
def _build_action(params: dict[str, Any], shape: tuple[int, ...]) -> tuple[Any, str | None]:
    """The action object of an ensemble, or ``(None, reason)``."""
    from flowmc.action import Phi4Action

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


def _longest_false_run(acc: np.ndarray) -> np.ndarray:
    """Longest run of consecutive ``False`` along axis 0 of an ``(n, C)`` bool array, ``(C,)``."""
    out = np.zeros(acc.shape[1], dtype=np.int64)
    for c in range(acc.shape[1]):
        rej = np.concatenate([[0], (~acc[:, c]).astype(np.int8), [0]])
        d = np.diff(rej)
        starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
        if starts.size:
            out[c] = int((ends - starts).max())
    return out


def _sign_changes(m: np.ndarray) -> list[int]:
    """Number of sign changes of ``m`` along axis 0, per chain (zeros are skipped)."""
    out = []
    for c in range(m.shape[1]):
        s = np.sign(m[:, c])
        s = s[s != 0]
        out.append(int(np.count_nonzero(s[1:] != s[:-1])))
    return out


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

    def bin_means(self) -> np.ndarray:
        """``(n_bins, C, *shape)``."""
        return self.sums / self.b

    def mean(self) -> np.ndarray:
        return self.total.sum(axis=0) / (self.n * self.total.shape[0])


def _binned_errors(bins: np.ndarray, S: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Gamma-method errors of each component of bin means ``(n_bins, C, *shape)``.

    Returns ``(error, tau_int_in_bins, n_failed)`` with arrays of ``shape``. A component whose
    window could not be established keeps its (unreliable) estimate and is counted.
    """
    shape = bins.shape[2:]
    flat = bins.reshape(bins.shape[0], bins.shape[1], -1)
    err = np.zeros(flat.shape[2])
    tau = np.zeros(flat.shape[2])
    failed = 0
    for j in range(flat.shape[2]):
        series = np.ascontiguousarray(flat[:, :, j].T)
        try:
            res = gamma_analysis(series, S=S, quiet=False)
        except AutocorrError as exc:
            res, failed = exc.result, failed + 1
        # error of the mean of n_bins*C bin means of size b == error of the full mean
        err[j], tau[j] = res.error, res.tau_int
    return err.reshape(shape), tau.reshape(shape), failed


def _meff_entry(c_bins: np.ndarray, col: _Collector, warn: list[str]) -> dict[str, list]:
    """Effective mass per t by linearisation over the bin means of C(t-1), C(t), C(t+1)."""
    length = c_bins.shape[2]
    values: list[float | None] = [None] * length
    errors: list[float | None] = [None] * length
    n_short = 0

    def f(cm: float, c0: float, cp: float) -> float:
        r = (cm + cp) / (2.0 * c0)
        return math.acosh(r) if r >= 1.0 else float("nan")

    for t in range(1, length):
        series = [np.ascontiguousarray(c_bins[:, :, (t + s) % length].T) for s in (-1, 0, 1)]
        try:
            res = derived_gamma(f, series, S=col.S, quiet=False)
        except AutocorrError as exc:
            if not col.quiet:
                raise
            res, n_short = exc.result, n_short + 1
        except ValueError:  # ratio < 1 at the means (or at a finite-difference step)
            continue
        values[t], errors[t] = float(res.value), float(res.error)
    if n_short:
        warn.append(
            f"m_eff: the bin series of {n_short} time slices were too short for a reliable "
            "window; their errors are unreliable"
        )
    return {"value": values, "error": errors}


def _pole_mass(
    c_mean: np.ndarray, c_err: np.ndarray, c_bins: np.ndarray, warn: list[str]
) -> dict[str, Any] | None:
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
            n_tot = c_bins.shape[0] * c_bins.shape[1]
            n_jk = int(min(50, n_tot))
            data = [np.ascontiguousarray(c_bins[:, :, t].T) for t in range(length)]
            _, jk_err = jackknife(mass, data, n_bins=n_jk)
    except (RuntimeError, ValueError) as exc:
        warn.append(f"pole_mass: cosh fit failed ({exc})")
        return None
    return {
        "value": fit.mass,
        "error": float(jk_err),
        "fit_error": fit.mass_err,
        "amplitude": fit.amplitude,
        "chi2": fit.chi2,
        "dof": fit.dof,
        "tmin": tmin,
        "tmax": tmax,
        "n_jackknife_bins": n_jk,
    }


# ----------------------------------------------------------------------------- main entry
def analyze(
    path_or_ensemble: str | os.PathLike[str] | Ensemble,
    *,
    discard: int = 0,
    S: float = 1.5,
    chunk: int = 512,
    quiet_autocorr: bool = True,
) -> dict[str, Any]:
    r"""Analyse an ensemble: observables with Gamma-method errors and sampler/Z2 diagnostics.

    Streams the configurations ``chunk`` rows (times ``C`` chains) at a time. All ``C`` chains
    are replicas of one Monte Carlo history in the Gamma method (one global mean, Γ(t) summed
    over chains).

    Args:
        path_or_ensemble: an ensemble file or an open :class:`~flowmc.ensemble.Ensemble`.
        discard: rows per chain dropped at the start (thermalisation).
        S: Wolff's windowing parameter (see :func:`flowmc.autocorr.gamma_analysis`).
        chunk: rows per chain read from disk at a time (bounds memory).
        quiet_autocorr: record a too-short series (``AutocorrError``) as a message in
            ``result["warnings"]`` and keep its unreliable estimate; if ``False`` re-raise it.

    Returns:
        A dict with the keys documented in ``docs/analysis.md``: one entry
        ``{value, error, tau_int, tau_int_error, ess, window}`` for each of :data:`SCALAR_KEYS`
        that could be computed, ``G_x``, ``C_t``, ``m_eff``, ``pole_mass``, sampler and Z2
        diagnostics, ``warnings`` and ``notes``. Keys starting with ``_`` are in-memory extras.

    Raises:
        ValueError: if ``discard`` leaves fewer than 5 rows per chain, or on bad arguments.
        AutocorrError: for a too-short series when ``quiet_autocorr=False``.

    Example:
        >>> res = analyze("run.h5", discard=100)  # doctest: +SKIP
        >>> res["chi2"]["value"], res["chi2"]["error"]  # doctest: +SKIP
    """
    if isinstance(path_or_ensemble, Ensemble):
        return _analyze(path_or_ensemble, discard, S, chunk, quiet_autocorr)
    with open_ensemble(path_or_ensemble) as ens:
        return _analyze(ens, discard, S, chunk, quiet_autocorr)


def _analyze(ens: Ensemble, discard: int, S: float, chunk: int, quiet: bool) -> dict[str, Any]:
    if int(discard) != discard or discard < 0:
        raise ValueError(f"Expected discard >= 0; got {discard!r}")
    if int(chunk) != chunk or chunk < 1:
        raise ValueError(f"Expected chunk >= 1; got {chunk!r}")
    if not (math.isfinite(S) and S >= 0):
        raise ValueError(f"Expected S >= 0; got {S!r}")
    discard, chunk = int(discard), int(chunk)
    n = ens.n - discard
    if n < 5:
        raise ValueError(
            f"Expected at least 5 configurations per chain after discarding {discard}; "
            f"{ens.path!r} has n = {ens.n}"
        )
    shape = tuple(ens.lattice_shape)
    vol = math.prod(shape)
    n_chains = ens.n_chains
    col = _Collector(S=S, quiet=quiet)
    notes: list[str] = []
    action, why = _build_action(ens.action, shape)
    if action is None:
        notes.append(f"action-dependent observables skipped: {why}")

    out: dict[str, Any] = {
        "path": ens.path,
        "n": n,
        "n_total": ens.n,
        "discard": discard,
        "chains": n_chains,
        "lattice_shape": list(shape),
        "volume": vol,
        "sampler": dict(ens.sampler),
        "action": dict(ens.action),
        "has_configs": bool(ens.has_configs),
        "S": S,
    }
    names = set(ens.scalar_names)
    series: dict[str, np.ndarray] = {}

    # ---------------------------------------------------------------- per-config series
    c_binner = g_binner = None
    if ens.has_configs:
        n_bins = _n_bins(n, n_chains, vol)
        g_binner = _Binner(n, n_chains, shape, n_bins)
        c_binner = _Binner(n, n_chains, (shape[0],), n_bins)
        axes = [a for a in range(len(shape)) if shape[a] == shape[0]]
        parts: dict[str, list[np.ndarray]] = {}
        row = 0
        for block in ens.iter_configs(chunk, start=discard):
            k = block.shape[0]
            flat = np.asarray(block, dtype=np.float64).reshape(k * n_chains, *shape)
            obs = measure(flat, action, chunk_size=k * n_chains)
            g = obs.pop("G_x").reshape(k, n_chains, *shape)
            g_binner.add(row, g)
            c_binner.add(row, obs.pop("C_t").reshape(k, n_chains, shape[0]))
            # per-config momentum-space G at p = 0 and p_min (for xi2), averaged over axes
            gt = np.fft.fftn(g, axes=tuple(range(2, 2 + len(shape)))).real
            lat0 = (slice(None), slice(None))
            parts.setdefault("gp0", []).append(gt[(*lat0, *(0,) * len(shape))])
            gp1 = np.mean(
                [gt[(*lat0, *(1 if b == a else 0 for b in range(len(shape))))] for a in axes],
                axis=0,
            )
            parts.setdefault("gp1", []).append(gp1)
            for key, val in obs.items():
                parts.setdefault(key, []).append(val.reshape(k, n_chains))
            row += k
        series = {key: np.concatenate(v) for key, v in parts.items()}
        if "sd" in series:
            series["sd_check"] = series.pop("sd")
    else:
        notes.append(
            "the ensemble stores no configurations (--no-configs): energy, xi2, sd_check, G_x, "
            "C_t, m_eff and pole_mass are not computed"
        )
        if "magnetization" in names:
            m = ens.scalar("magnetization")[discard:] / vol
            series.update(m=m, abs_m=np.abs(m), m2=m**2, m4=m**4)
        else:
            notes.append("no 'magnetization' scalar: magnetisation observables skipped")
        if "action" in names:
            series["action_density"] = ens.scalar("action")[discard:] / vol

    # ---------------------------------------------------------------- primaries
    for key in ("m", "abs_m", "m2", "energy", "action_density", "sd_check"):
        if key in series:
            out[key] = col.scalar(key, series[key])

    # ---------------------------------------------------------------- derived
    if "m2" in series:
        out["chi2"] = col.derived(
            "chi2", lambda a: vol * a, [series["m2"]], grad=lambda a: [float(vol)]
        )
        out["chi_conn"] = col.derived(
            "chi_conn",
            lambda a, b: vol * (a - b * b),
            [series["m2"], series["abs_m"]],
            grad=lambda a, b: [float(vol), -2.0 * vol * b],
        )
        out["binder"] = col.derived(
            "binder",
            lambda a, b: 1.0 - b / (3.0 * a * a),
            [series["m2"], series["m4"]],
            grad=lambda a, b: [2.0 * b / (3.0 * a**3), -1.0 / (3.0 * a * a)],
        )
    if "gp0" in series:
        if shape[0] >= 2:
            s2 = 4.0 * math.sin(math.pi / shape[0]) ** 2

            def xi(p0: float, p1: float) -> float:
                x = (p0 / p1 - 1.0) / s2
                return math.sqrt(x) if x >= 0 else float("nan")

            out["xi2"] = col.derived("xi2", xi, [series["gp0"], series["gp1"]])
        else:
            notes.append("xi2 needs L >= 2 along axis 0; skipped")
    for key in SCALAR_KEYS:
        if key in out and out[key] is None:
            del out[key]

    # ---------------------------------------------------------------- correlators
    warn = col.warnings
    if g_binner is not None and c_binner is not None:
        g_mean = g_binner.mean()
        g_err, _, g_fail = _binned_errors(g_binner.bin_means(), S)
        c_mean = c_binner.mean()
        c_bins = c_binner.bin_means()
        c_err, _, c_fail = _binned_errors(c_bins, S)
        if g_fail or c_fail:
            warn.append(
                f"G_x/C_t: the bin series of {g_fail} separations / {c_fail} time slices were "
                "too short for a reliable window; their errors are unreliable"
            )
        out["G_x"] = {
            "value": g_mean.tolist(),
            "error": g_err.tolist(),
            "bin_size": g_binner.b,
            "n_bins": g_binner.n_bins,
        }
        out["C_t"] = {
            "value": c_mean.tolist(),
            "error": c_err.tolist(),
            "bin_size": c_binner.b,
            "n_bins": c_binner.n_bins,
        }
        if shape[0] >= 3:
            out["m_eff"] = _meff_entry(c_bins, col, warn)
        else:
            notes.append("m_eff needs L >= 3 along axis 0; skipped")
        if shape[0] >= 6:  # fit range t = 1..L/2 with at least 3 points for 2 parameters
            pm = _pole_mass(c_mean, c_err, c_bins, warn)
            if pm is not None:
                out["pole_mass"] = pm
        else:
            notes.append("pole_mass needs L >= 6 along axis 0 (3 points in t = 1..L/2); skipped")

    # ---------------------------------------------------------------- sampler diagnostics
    if "accepted" in names or "is_accepted" in names:
        acc = ens.scalar("accepted" if "accepted" in names else "is_accepted")[discard:]
        acc = np.asarray(acc, dtype=bool)
        out["acceptance"] = float(acc.mean())
        out["acceptance_per_chain"] = acc.mean(axis=0).tolist()
        runs = _longest_false_run(acc)
        out["longest_rejection_run"] = int(runs.max())
        out["longest_rejection_run_per_chain"] = runs.tolist()
    else:
        notes.append("no 'accepted' scalar: acceptance and rejection runs not computed")
    if "delta_h" in names:
        dh = np.asarray(ens.scalar("delta_h")[discard:], dtype=np.float64)
        dh = np.nan_to_num(dh, nan=np.inf, posinf=np.inf)
        out["exp_minus_delta_h"] = col.scalar("exp_minus_delta_h", np.exp(-dh))
        e = out["exp_minus_delta_h"]
        if e["error"] > 0 and abs(e["value"] - 1.0) > Z2_SIGMA * e["error"]:
            warn.append(
                f"<exp(-dH)> = {e['value']:.4g} +- {e['error']:.2g} differs from 1 by more than "
                f"{Z2_SIGMA:g} sigma: the HMC integrator is not reversible/area preserving"
            )

    # ---------------------------------------------------------------- consistency checks
    sd = out.get("sd_check")
    if sd is not None and sd["error"] > 0 and abs(sd["value"] - 1.0) > Z2_SIGMA * sd["error"]:
        warn.append(
            f"Schwinger-Dyson check <sd> = {sd['value']:.5g} +- {sd['error']:.2g} differs from "
            f"its exact value 1 by more than {Z2_SIGMA:g} sigma: the ensemble does not sample "
            "exp(-S) (biased sampler, or unreliable error bars)"
        )

    # ---------------------------------------------------------------- Z2 diagnostics
    if "m" in series:
        _z2(out, series["m"], action, col, warn, notes)

    short = col.short_warning()
    if short is not None:
        warn.insert(0, short)
    out["warnings"] = warn
    out["notes"] = notes
    out["_gamma"] = col.gamma
    out["_series"] = series
    return out


def _z2(
    out: dict[str, Any],
    m: np.ndarray,
    action: Any,
    col: _Collector,
    warn: list[str],
    notes: list[str],
) -> None:
    """Sign balance and mode crossings of the magnetisation; appends warnings."""
    n_tot = m.size
    pos = (m > 0).astype(np.float64)
    res = col.run("frac_m_positive", gamma_analysis, np.ascontiguousarray(pos.T))
    p = float(res.value)
    # binomial floor: a one-signed (constant) series has zero Gamma error
    err = max(float(res.error), math.sqrt(max(p * (1.0 - p), 0.25 / n_tot) / n_tot))
    out["frac_m_positive"] = {**col.entry("frac_m_positive", res), "error": err}
    me = out["m"]
    out["m_over_error"] = float(me["value"] / me["error"]) if me["error"] > 0 else float("inf")
    out["mode_crossings"] = _sign_changes(m)

    z2 = bool(getattr(action, "is_z2_symmetric", False)) if action is not None else None
    out["z2_symmetric_action"] = z2
    if not z2:
        notes.append("Z2 sign-balance checks skipped (action unknown or not Z2 symmetric)")
        return
    z_frac = abs(p - 0.5) / err
    if abs(out["m_over_error"]) > Z2_SIGMA or z_frac > Z2_SIGMA:
        warn.append(
            f"Z2 sign balance is off: <m> = {me['value']:.4g} +- {me['error']:.2g} "
            f"({out['m_over_error']:+.1f} sigma from 0), frac(m > 0) = {p:.3f} +- {err:.2g} "
            f"({z_frac:.1f} sigma from 1/2), although the action is Z2 symmetric. The chains do "
            "not sample both modes in proportion: Z2-odd observables are biased and errors of "
            "the others may be underestimated. Use a Z2-symmetrised flow (--symmetric) or "
            "longer chains."
        )
    stuck = []
    for c in range(m.shape[1]):
        mc = m[:, c]
        sd = float(mc.std())
        if out["mode_crossings"][c] == 0 and abs(float(mc.mean())) > 3.0 * sd:
            stuck.append(c)
    if stuck:
        warn.append(
            f"chain(s) {stuck} never crossed between the modes m > 0 and m < 0 while |<m>| is "
            "large compared with its spread (broken phase): each chain samples one Z2 sector "
            "only, so m, frac(m > 0) and tau_int are unreliable; symmetrise the observables or "
            "the proposal."
        )
