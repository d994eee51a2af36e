r"""Reports: the text tables, JSON files and PNG plots of every flowmc command, in one place.

The numerical core (:mod:`flowmc.analysis`, :mod:`flowmc.analysis.compare`,
:mod:`flowmc.training.evaluate`, :mod:`flowmc.training.train`, ...) returns results; this module
turns them into text (``*_table``), JSON (:func:`write_json`) and figures (``plot_*``). It is the
only flowmc module that imports matplotlib, and it uses :class:`matplotlib.figure.Figure` directly
(no pyplot, no global backend switch, safe in notebooks).

Every file goes through :mod:`flowmc.io.safeio`: a report replaces only an earlier report of its
own **kind** (JSON reports carry ``"flowmc_report": "<kind>"``, PNG plots the text chunk
``Software: flowmc <kind>``), never an ensemble, a checkpoint, an input of the command or a
foreign file, and it is written atomically. The kinds:

| JSON kind | written by |
|---|---|
| ``analysis`` | ``flowmc analyze --json`` |
| ``compare`` | ``flowmc compare --json`` |
| ``eval`` | ``flowmc eval --json`` |
| ``summary`` | ``flowmc sample --json`` and ``flowmc hmc --json`` (the run summary) |
| ``scan`` | ``flowmc scan``: ``DIR/summary.json`` (and the CSV ``summary.csv``) |
| ``scan-manifest`` | ``flowmc scan``: ``DIR/manifest.json`` (the scan's settings) |
| ``scan-logz`` | ``flowmc scan``: ``DIR/L<L>_lam<lam>.logz.json`` (a flow's log Z) |

CSV reports (:func:`write_csv`) start with the line ``# flowmc_report: <kind>``.

| PNG kind | file |
|---|---|
| ``analysis-history`` | ``analyze --plots DIR``: ``history.png`` |
| ``analysis-hist-m`` | ``hist_m.png`` |
| ``analysis-correlators`` | ``correlators.png`` |
| ``analysis-autocorr`` | ``autocorr.png`` |
| ``action-vs-effective`` | ``action_vs_effective.png`` (analyze) and ``eval --plot`` |
| ``compare`` | ``compare --plots DIR``: ``cost_per_independent.png`` |
| ``train-history`` | ``flowmc train`` (``--plot``, default ``<out>.train.png``) |
| ``configurations`` | :func:`plot_configurations` (the tutorial, ``docs/tutorial.ipynb``) |
| ``coupling`` | :func:`plot_coupling` (the tutorial) |
| ``histograms`` | :func:`plot_histograms` (the tutorial) |
| ``scan-chi2`` | ``flowmc scan``: ``DIR/chi2.png`` (and :data:`SCAN_PLOTS`) |
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flowmc.analysis.ensemble import SCALAR_KEYS
from flowmc.io.safeio import CSV_PREFIX, PNG_SOFTWARE_PREFIX, REPORT_KEY, check_output, write_atomic

__all__ = [
    "fmt",
    "to_jsonable",
    "write_json",
    "write_csv",
    "save_figure",
    "check_outputs",
    "analysis_table",
    "ANALYSIS_PLOTS",
    "analysis_plots",
    "plot_action_vs_effective",
    "plot_configurations",
    "plot_coupling",
    "plot_histograms",
    "compare_table",
    "COMPARE_PLOT",
    "plot_compare",
    "eval_table",
    "plot_training_history",
    "default_train_plot_path",
    "SCAN_PLOTS",
    "scan_table",
    "scan_plots",
]

PathLike = str | os.PathLike[str]


# ============================================================================ formatting, files
def fmt(value: float | None, err: float | None = None) -> str:
    """``value ± err`` with the error to 2 significant digits (``-`` for ``None``).

    Example:
        >>> fmt(0.73127, 0.0064)
        '0.7313 ± 0.0064'
    """
    if value is None:
        return "-"
    if err is None or not math.isfinite(err) or err <= 0:
        return f"{value:.6g}"
    digits = max(0, 1 - int(math.floor(math.log10(err))))
    return f"{value:.{digits}f} ± {err:.{digits}f}"


def to_jsonable(obj: Any) -> Any:
    """JSON types only: NaN/inf -> ``None``, numpy -> Python, objects with ``to_dict()`` and
    NamedTuples -> dicts, paths -> strings; keys starting with ``_`` are dropped."""
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_jsonable(obj.to_dict())
    if isinstance(obj, tuple) and hasattr(obj, "_asdict"):
        return to_jsonable(obj._asdict())
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(
    path: PathLike, obj: Any, kind: str = "summary", *, inputs: Iterable[PathLike] = ()
) -> Path:
    """Write a JSON report atomically, marked ``{"flowmc_report": kind, ...}``.

    Args:
        path: destination; may replace only an earlier JSON report of the same ``kind``.
        obj: a dict, or a result with ``to_dict()`` (see :func:`to_jsonable`).
        kind: the report kind (see the module docstring).
        inputs: files the command reads; the destination must differ from them.

    Returns:
        The path written.

    Raises:
        FileExistsError, ValueError: if the destination may not be replaced (one line naming
            it and what it is).
    """
    data = to_jsonable(obj)
    if not isinstance(data, dict):
        raise ValueError(f"Expected a dict-like report; got {type(obj).__name__}")
    data = {REPORT_KEY: kind, **{k: v for k, v in data.items() if k != REPORT_KEY}}
    text = json.dumps(data, indent=2) + "\n"
    return write_atomic(path, text.encode("utf-8"), fmt="json", kind=kind, inputs=inputs)


def _csv_cell(v: Any) -> str:
    v = to_jsonable(v)
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    text = str(v)
    if any(c in text for c in ',"\n\r'):
        text = '"' + text.replace('"', '""') + '"'
    return text


def write_csv(
    path: PathLike,
    columns: Sequence[str],
    rows: Iterable[Mapping[str, Any]],
    kind: str,
    *,
    inputs: Iterable[PathLike] = (),
) -> Path:
    """Write a CSV report atomically: the line ``# flowmc_report: <kind>``, a header, one line
    per row (missing and non-finite values empty; floats with all their digits).

    Read it with ``pandas.read_csv(path, comment="#")`` or
    ``numpy.genfromtxt(path, delimiter=",", names=True, skip_header=1, dtype=None)``. The rules
    of :func:`write_json`
    apply (it replaces only an earlier CSV report of the same kind).

    Returns:
        The path written.
    """
    cols = [str(c) for c in columns]
    lines = [f"{CSV_PREFIX}{kind}", ",".join(cols)]
    for row in rows:
        lines.append(",".join(_csv_cell(row.get(c)) for c in cols))
    data = ("\n".join(lines) + "\n").encode("utf-8")
    return write_atomic(path, data, fmt="csv", kind=kind, inputs=inputs)


def save_figure(
    fig: Any, path: PathLike, kind: str, *, inputs: Iterable[PathLike] = (), dpi: int = 120
) -> Path:
    """Save a matplotlib figure as a PNG report of ``kind`` (text chunk
    ``Software: flowmc <kind>``), atomically; see :func:`write_json` for the rules."""

    def write(tmp: Path) -> None:
        fig.savefig(
            tmp, format="png", dpi=dpi, metadata={"Software": f"{PNG_SOFTWARE_PREFIX}{kind}"}
        )

    return write_atomic(path, write, fmt="png", kind=kind, inputs=inputs)


def check_outputs(
    outputs: Iterable[tuple[PathLike | None, str, str]], *, inputs: Iterable[PathLike] = ()
) -> None:
    """Check report destinations before the work starts (fail fast, before a long run).

    Args:
        outputs: ``(path, fmt, kind)`` triples; ``None`` paths are skipped.
        inputs: files the command reads or writes otherwise.

    Raises:
        FileExistsError, ValueError: as :func:`flowmc.io.safeio.check_output`; also when two
            outputs share a path.
    """
    inputs = [i for i in inputs if i is not None]
    seen: list[str] = []
    for path, fmt_, kind in outputs:
        if path is None:
            continue
        check_output(path, fmt=fmt_, kind=kind, inputs=[*inputs, *seen])
        seen.append(os.fspath(path))


def _figure(**kw: Any) -> Any:
    from matplotlib.figure import Figure

    return Figure(**kw)


# ============================================================================ analysis
#: Table labels of the scalar observables (JSON key -> printed name).
ANALYSIS_LABELS = {
    "m": "<m>",
    "abs_m": "<|m|>",
    "m2": "<m^2>",
    "chi2": "chi2 = V<m^2>",
    "chi_conn": "chi_conn",
    "binder": "Binder U4",
    "energy": "E (Ising)",
    "xi2": "xi_2 (2nd mom.)",
    "action_density": "S/V",
    "phi4": "<phi^4> per site",
    "sd_check": "SD check (=1)",
    "exp_minus_delta_h": "<exp(-dH)> (=1)",
    "frac_m_positive": "frac(m > 0)",
}

#: Files written by :func:`analysis_plots` and their report kinds.
ANALYSIS_PLOTS = {
    "history.png": "analysis-history",
    "hist_m.png": "analysis-hist-m",
    "correlators.png": "analysis-correlators",
    "autocorr.png": "analysis-autocorr",
    "action_vs_effective.png": "action-vs-effective",
}


def _as_dict(res: Any) -> dict[str, Any]:
    return res.to_dict() if hasattr(res, "to_dict") else dict(res)


def _row(label: str, e: Mapping[str, Any]) -> str:
    tau = fmt(e["tau_int"], e["tau_int_error"])
    flag = "" if e.get("reliable", True) else "  (!)"
    return f"{label:<17} {fmt(e['value'], e['error']):>24} {tau:>18} {e['ess']:>9.0f}{flag}"


def analysis_table(res: Any) -> str:
    """The printed report of an analysis (an :class:`~flowmc.analysis.AnalysisResult` or its
    JSON form)."""
    d = _as_dict(res)
    sampler = d["sampler"].get("name", "?")
    lines = [
        f"ensemble   {d['path']}  ({sampler}, L = {tuple(d['lattice_shape'])}, "
        f"{d['chains']} chains x {d['n']} configs, discard {d['discard']}, S = {d['S']})",
        f"action     {d['action']}",
        "",
        f"{'observable':<17} {'value ± error':>24} {'tau_int ± err':>18} {'ESS':>9}",
        "-" * 71,
    ]
    for key in (*SCALAR_KEYS, "exp_minus_delta_h", "frac_m_positive"):
        if key in d:
            lines.append(_row(ANALYSIS_LABELS.get(key, key), d[key]))
    lines.append("-" * 71)
    if "pole_mass" in d:
        pm = d["pole_mass"]
        lines.append(
            f"pole mass  {fmt(pm['value'], pm['error'])}  "
            f"(cosh fit t = {pm['tmin']}..{pm['tmax']}, "
            f"chi2/dof = {pm['chi2']:.2f}/{pm['dof']}, jackknife error)"
        )
    if "m_eff" in d:
        vals = d["m_eff"]["value"]
        parts = [
            f"{t}: {fmt(v, e)}"
            for t, (v, e) in enumerate(zip(vals, d["m_eff"]["error"]))
            if v is not None and t <= len(vals) // 2
        ]
        lines.append("m_eff(t)   " + ("; ".join(parts) if parts else "undefined"))
    if "acceptance" in d:
        lines.append(
            f"acceptance {d['acceptance']:.4f}   longest rejection run "
            f"{d['longest_rejection_run']} (per chain {d['longest_rejection_run_per_chain']})"
        )
    kernels = d.get("acceptance_by_kernel") or {}
    if len(kernels) > 1 or (kernels and "acceptance" not in d):
        lines.append(
            "kernels    " + ", ".join(f"{k} acceptance {v:.4f}" for k, v in kernels.items())
        )
    if "mode_crossings" in d:
        moe = d["m_over_error"]
        lines.append(
            f"Z2         <m>/sigma = {'-' if moe is None else f'{moe:+.2f}'}, sign changes of "
            f"M per chain {d['mode_crossings']}"
        )
    for note in d["notes"]:
        lines.append(f"note: {note}")
    for w in d["warnings"]:
        lines.append(f"WARNING: {w}")
    if any(not d[k].get("reliable", True) for k in SCALAR_KEYS if k in d):
        lines.append("(!) = error and tau_int unreliable (series too short), see warnings")
    return "\n".join(lines)


def analysis_plots(res: Any, outdir: PathLike, *, inputs: Iterable[PathLike] = ()) -> list[Path]:
    """Write the diagnostic PNGs of an :class:`~flowmc.analysis.AnalysisResult` into ``outdir``.

    ``history.png`` (M and S against Monte Carlo time), ``hist_m.png``, ``correlators.png``
    (G along axis 0, C(t) and m_eff(t)), ``autocorr.png`` (rho(t) with the chosen windows) and,
    for flow ensembles, ``action_vs_effective.png`` (S against S_eff = -log q). Each file may
    replace only an earlier plot of its kind (:data:`ANALYSIS_PLOTS`).

    Returns:
        The paths written.
    """
    outdir = Path(outdir)
    inputs = list(inputs)
    check_outputs(((outdir / n, "png", k) for n, k in ANALYSIS_PLOTS.items()), inputs=inputs)
    d = res.to_dict()
    paths: list[Path] = []
    vol = res.volume
    series, scalars = res.series, res.scalars
    discard = res.discard

    def save(fig: Any, name: str) -> None:
        paths.append(save_figure(fig, outdir / name, ANALYSIS_PLOTS[name], inputs=inputs, dpi=100))

    m = series.get("m")
    fig = _figure(figsize=(7, 5), dpi=100, layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    if m is not None:
        for c in range(m.shape[1]):
            axes[0].plot(np.arange(discard, discard + m.shape[0]), m[:, c] * vol, lw=0.5,
                         label=f"chain {c}")  # fmt: skip
    axes[0].set_ylabel("M")
    s_hist = scalars.get("action")
    if s_hist is None and "action_density" in series:
        s_hist = series["action_density"] * vol
    if s_hist is not None:
        s_hist = np.asarray(s_hist, dtype=float)
        for c in range(s_hist.shape[1]):
            axes[1].plot(np.arange(discard, discard + s_hist.shape[0]), s_hist[:, c], lw=0.5)
    axes[1].set_ylabel("S")
    axes[1].set_xlabel("Monte Carlo time (rows)")
    if m is not None and m.shape[1] <= 8:
        axes[0].legend(fontsize=6, loc="upper right")
    save(fig, "history.png")

    if m is not None:
        fig = _figure(figsize=(5, 3.5), dpi=100, layout="constrained")
        ax = fig.subplots()
        ax.hist(m.ravel(), bins=80, density=True, color="C0", alpha=0.8)
        ax.axvline(0, color="k", lw=0.5)
        ax.set_xlabel("m = M/V")
        ax.set_ylabel("density")
        save(fig, "hist_m.png")

    if "G_x" in d and "C_t" in d:
        g, ge = np.asarray(d["G_x"]["value"]), np.asarray(d["G_x"]["error"])
        idx = (slice(None),) + (0,) * (g.ndim - 1)
        fig = _figure(figsize=(11, 3.4), dpi=100, layout="constrained")
        axes = fig.subplots(1, 3)
        axes[0].errorbar(np.arange(g.shape[0]), g[idx], ge[idx], fmt="o", ms=3, capsize=2)
        axes[0].set_xlabel("x (along axis 0)")
        axes[0].set_ylabel("G(x)")
        c, ce = np.asarray(d["C_t"]["value"]), np.asarray(d["C_t"]["error"])
        axes[1].errorbar(np.arange(c.size), c, ce, fmt="o", ms=3, capsize=2)
        axes[1].set_yscale("log" if np.all(c > 0) else "linear")
        axes[1].set_xlabel("t")
        axes[1].set_ylabel("C(t)")
        if "m_eff" in d:
            mv = np.array([np.nan if v is None else v for v in d["m_eff"]["value"]], float)
            me = np.array([np.nan if v is None else v for v in d["m_eff"]["error"]], float)
            axes[2].errorbar(np.arange(mv.size), mv, me, fmt="o", ms=3, capsize=2)
            if "pole_mass" in d:
                pm = d["pole_mass"]
                axes[2].axhspan(pm["value"] - pm["error"], pm["value"] + pm["error"],
                                color="C1", alpha=0.3, label="cosh fit")  # fmt: skip
                axes[2].legend(fontsize=7)
        axes[2].set_xlabel("t")
        axes[2].set_ylabel(r"$m_{\rm eff}(t)$")
        save(fig, "correlators.png")

    gam = res.gamma
    chosen = [k for k in ("m2", "abs_m", "action_density", "energy", "xi2") if k in gam]
    if chosen:
        fig = _figure(figsize=(6, 4), dpi=100, layout="constrained")
        ax = fig.subplots()
        for i, k in enumerate(chosen):
            r = gam[k]
            label = f"{k}: tau_int = {fmt(r.tau_int, r.tau_int_error)}, W = {r.window}"
            ax.plot(np.arange(r.rho.size), r.rho, "-", color=f"C{i}", label=label)
            ax.axvline(r.window, color=f"C{i}", ls=":", lw=1)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("t (rows)")
        ax.set_ylabel(r"$\rho(t)$")
        ax.set_title("normalised autocorrelation (dotted: window W)")
        ax.legend(fontsize=7)
        save(fig, "autocorr.png")

    if "action" in scalars and "log_q" in scalars:
        path = plot_action_vs_effective(
            scalars["action"], scalars["log_q"], outdir / "action_vs_effective.png",
            title="chain states: action vs effective action", inputs=inputs,
        )  # fmt: skip
        if path is not None:
            paths.append(path)
    return paths


def plot_action_vs_effective(
    action: Any,
    log_q: Any,
    path: PathLike,
    *,
    title: str = "",
    inputs: Iterable[PathLike] = (),
) -> Path | None:
    """The seed notebook's diagnostic: S against S_eff = -log q, with a slope-1 line.

    For q ∝ e^{-S} the points lie on a line of slope 1 (offset log Z). Used for chain states
    (``flowmc analyze``) and fresh flow draws (``flowmc eval``).

    Args:
        action: actions S of the configurations (any shape).
        log_q: their log proposal densities (same shape).
        path: the PNG to write (kind ``action-vs-effective``).
        title: plot title.
        inputs: files the command reads.

    Returns:
        The path written, or ``None`` if fewer than 2 finite points.
    """
    s = np.asarray(action, dtype=float).ravel()
    s_eff = -np.asarray(log_q, dtype=float).ravel()
    ok = np.isfinite(s) & np.isfinite(s_eff)
    if np.count_nonzero(ok) < 2:
        return None
    s, s_eff = s[ok], s_eff[ok]
    fig = _figure(figsize=(4.5, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot(s_eff, s, ".", ms=1.5, alpha=0.4)
    b = float(np.mean(s) - np.mean(s_eff))
    xs = np.linspace(s_eff.min(), s_eff.max(), 4)
    ax.plot(xs, xs + b, "k:", label=f"slope 1, offset {b:.3f}")
    ax.set_xlabel(r"$S_{\rm eff} = -\log q(\phi)$")
    ax.set_ylabel(r"$S(\phi)$")
    ax.set_title(title or "action vs effective action")
    ax.legend(fontsize=7)
    return save_figure(fig, path, "action-vs-effective", inputs=inputs)


# ============================================================ fields, layers, histograms
def _numpy(x: Any) -> np.ndarray:
    """A float64 numpy copy of a numpy array or a (possibly grad-tracking) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=float)


def plot_configurations(
    phi: Any,
    path: PathLike,
    *,
    title: str = "",
    n: int = 16,
    inputs: Iterable[PathLike] = (),
) -> Path:
    """The seed notebook's picture of field configurations: tanh(φ) of the first ``n`` (a
    square grid of panels; colour range [-1, 1]), so smooth patches show correlations.

    Args:
        phi: ``(B, L_1, L_2)`` configurations of a 2-d lattice (numpy or torch).
        path: the PNG to write (kind ``configurations``).
        title: figure title.
        n: how many to show (at most ``B``; the grid is ``ceil(sqrt(n))`` wide).
        inputs: files the command reads.

    Returns:
        The path written.

    Raises:
        ValueError: if ``phi`` is not a batch of 2-d configurations or ``n < 1``.
    """
    arr = _numpy(phi)
    if arr.ndim != 3 or arr.shape[0] < 1:
        raise ValueError(f"Expected phi of shape (B, L1, L2) with B >= 1; got {arr.shape}")
    if n < 1:
        raise ValueError(f"Expected n >= 1; got {n}")
    n = min(n, arr.shape[0])
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig = _figure(figsize=(1.1 * cols + 0.6, 1.1 * rows + 0.5), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    image = None
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i < n:
            image = ax.imshow(np.tanh(arr[i]), vmin=-1, vmax=1, cmap="viridis")
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label=r"$\tanh\,\phi$")
    fig.suptitle(title or "configurations")
    return save_figure(fig, path, "configurations", inputs=inputs)


def plot_coupling(
    mask: Any,
    jacobian: Any,
    path: PathLike,
    *,
    title: str = "",
    inputs: Iterable[PathLike] = (),
) -> Path:
    """One coupling layer: its checkerboard mask and the magnitude of its Jacobian with the sites
    ordered frozen first, then transformed, where the matrix is block triangular (identity on
    the frozen block, diagonal on the transformed one, zero above).

    Args:
        mask: ``(*L)`` 0/1 mask, 1 = transformed sites.
        jacobian: ``(V, V)`` Jacobian ``d y / d x`` of the layer on flattened configurations.
        path: the PNG to write (kind ``coupling``).
        title: figure title.
        inputs: files the command reads.

    Returns:
        The path written.

    Raises:
        ValueError: if the Jacobian is not ``(V, V)`` for the mask's ``V`` sites.
    """
    m = _numpy(mask)
    jac = _numpy(jacobian)
    vol = m.size
    if jac.shape != (vol, vol):
        raise ValueError(f"Expected a ({vol}, {vol}) Jacobian for the mask; got {jac.shape}")
    order = np.concatenate([np.flatnonzero(m.ravel() == 0), np.flatnonzero(m.ravel() != 0)])
    mag = np.abs(jac[np.ix_(order, order)])
    tiny = mag[mag > 0].min() if np.any(mag > 0) else 1.0
    fig = _figure(figsize=(9, 4), dpi=100, layout="constrained")
    ax_m, ax_j = fig.subplots(1, 2, width_ratios=(1, 1.3))
    if m.ndim == 2:
        ax_m.imshow(m, cmap="gray_r", vmin=0, vmax=1.6)
    else:
        ax_m.imshow(m.reshape(1, -1), cmap="gray_r", vmin=0, vmax=1.6, aspect="auto")
    ax_m.set_title("mask (dark: transformed, light: frozen)")
    ax_m.set_xticks([])
    ax_m.set_yticks([])
    shown = ax_j.imshow(np.log10(np.where(mag > 0, mag, tiny * 1e-3)), cmap="magma",
                        vmin=np.log10(tiny), interpolation="nearest")  # fmt: skip
    n_frozen = int(np.count_nonzero(m.ravel() == 0))
    ax_j.axhline(n_frozen - 0.5, color="w", lw=0.8)
    ax_j.axvline(n_frozen - 0.5, color="w", lw=0.8)
    ax_j.set_xlabel("input site x (frozen, then transformed)")
    ax_j.set_ylabel("output site y (frozen, then transformed)")
    ax_j.set_title(r"$\log_{10}|\partial y/\partial x|$ (black: 0)")
    fig.colorbar(shown, ax=ax_j, shrink=0.8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, "coupling", inputs=inputs)


def plot_histograms(
    samples: Mapping[str, Any],
    path: PathLike,
    *,
    xlabel: str = "",
    title: str = "",
    bins: int = 61,
    inputs: Iterable[PathLike] = (),
) -> Path:
    """Normalised histograms of several samples of one quantity on common bins (e.g. the
    magnetisation of two samplers), one outline per label.

    Args:
        samples: ``{label: values}`` (any shape; non-finite values are dropped).
        path: the PNG to write (kind ``histograms``).
        xlabel: the quantity.
        title: figure title.
        bins: number of common bins.
        inputs: files the command reads.

    Returns:
        The path written.

    Raises:
        ValueError: if ``samples`` is empty, a sample has no finite value, or ``bins < 1``.
    """
    if not samples:
        raise ValueError("Expected at least one sample to histogram; got none")
    if bins < 1:
        raise ValueError(f"Expected bins >= 1; got {bins}")
    data = {}
    for label, values in samples.items():
        v = _numpy(values).ravel()
        v = v[np.isfinite(v)]
        if v.size == 0:
            raise ValueError(f"Expected finite values in sample {label!r}; got none")
        data[label] = v
    lo = min(float(v.min()) for v in data.values())
    hi = max(float(v.max()) for v in data.values())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    fig = _figure(figsize=(6, 3.8), dpi=100, layout="constrained")
    ax = fig.subplots()
    for i, (label, v) in enumerate(data.items()):
        ax.hist(v, bins=edges, density=True, histtype="step", lw=1.5, color=f"C{i}",
                label=f"{label} (n = {v.size})")  # fmt: skip
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return save_figure(fig, path, "histograms", inputs=inputs)


# ============================================================================ compare
#: The file written by ``flowmc compare --plots DIR`` and its report kind.
COMPARE_PLOT = ("cost_per_independent.png", "compare")


def _sec(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _table(head: Sequence[str], rows: list[list[str]], first: int = 15) -> list[str]:
    widths = [max(first, len(head[0]) + 1)] + [
        max(len(h) + 2, *(len(r[i]) + 2 for r in rows)) if rows else len(h) + 2
        for i, h in enumerate(head) if i > 0
    ]  # fmt: skip
    line = "".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(head))
    out = [line, "-" * len(line)]
    for r in rows:
        out.append(r[0].ljust(widths[0]) + "".join(c.rjust(w) for c, w in zip(r[1:], widths[1:])))
    return out


def compare_table(result: Mapping[str, Any]) -> str:
    """A comparison (:func:`flowmc.analysis.compare.compare`) as plain text: values with z-scores
    against the reference, then τ_int and costs, then one line per ensemble."""
    labels = list(result["labels"])
    ref = result.get("reference", labels[0])
    others = [lab for lab in labels if lab != ref]
    obs = result["observables"]
    head = ["observable", *labels, *(f"z {lab}" for lab in others)]
    rows = []
    for name, row in obs.items():
        cells = [name, *(fmt(row[lab]["value"], row[lab]["error"]) for lab in labels)]
        for lab in others:
            z = row[lab].get("z_vs_reference")
            cells.append("-" if z is None else f"{z:+.2f}")
        rows.append(cells)
    lines = [f"values; z = (x - x_ref) / sqrt(σ² + σ_ref²) against the reference {ref}", ""]
    lines += _table(head, rows)
    head2 = ["observable", *(f"τ_int {lab}" for lab in labels),
             *(f"s/indep {lab}" for lab in labels)]  # fmt: skip
    rows2 = []
    for name, row in obs.items():
        rows2.append([
            name,
            *(fmt(row[lab]["tau_int"], row[lab]["tau_int_error"]) for lab in labels),
            *(_sec(row[lab]["cost_per_independent_s"]) for lab in labels),
        ])  # fmt: skip
    lines += ["", "autocorrelation and cost per independent sample (2 τ_int × s/config, "
              "sampling only)", ""]  # fmt: skip
    lines += _table(head2, rows2)
    lines.append("")
    for lab in labels:
        e = result["ensembles"][lab]
        acc = e.get("acceptance")
        kernels = e.get("acceptance_by_kernel") or {}
        acc_text = (
            ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in kernels.items())
            if kernels else ("-" if acc is None else f"{acc:.3f}")
        )  # fmt: skip
        text = (
            f"{lab}: {e['n']} x {e['chains']} configs, acceptance {acc_text}, sampling "
            f"{e['wall_time_s']:.3g} s, {_sec(e['cost_per_config_s'])} s/config"
        )
        if e.get("warmup_time_s"):
            text += f", warm-up {e['warmup_time_s']:.3g} s (not included)"
        if e["is_flow"]:
            t = e["train_time_s"]
            source = {"given": "--train-time", "ensemble": "recorded at sampling"}.get(
                e.get("train_time_source"), e.get("train_time_source"))  # fmt: skip
            text += (
                ", training time unknown" if t is None else
                f", training {t:.3g} s ({source}) = "
                f"{e['train_cost_per_config_s']:.3g} s/config amortised"
            )  # fmt: skip
        lines.append(text)
    for name in ("chi2", "abs_m", "energy"):
        row = obs.get(name, {})
        for lab in labels:
            for other, val in (row.get(lab, {}).get("break_even_independent") or {}).items():
                if val is not None:
                    lines.append(
                        f"{lab} incl. training is cheaper than {other} beyond {val:.3g} "
                        f"independent {name} samples"
                    )
    for w in result["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def plot_compare(
    result: Mapping[str, Any], path: PathLike, *, inputs: Iterable[PathLike] = ()
) -> Path:
    """Two panels: the cost per independent sample of each observable and ensemble (log
    scale; hatched: with amortised training) and each observable's z-score against the
    reference ensemble (band: |z| < 2).

    Returns:
        The path written (kind ``compare``).
    """
    labels = list(result["labels"])
    ref = result.get("reference", labels[0])
    obs = result["observables"]
    names = [n for n, r in obs.items() if any(r[lab]["cost_per_independent_s"] for lab in labels)]
    series = [(lab, "cost_per_independent_s", None) for lab in labels]
    for lab in labels:
        if result["ensembles"][lab]["train_time_s"] is not None:
            series.append((lab, "cost_per_independent_with_training_s", "//"))
    fig = _figure(figsize=(max(7.0, 0.9 * len(names) + 3), 6.5), layout="constrained")
    ax, ax_z = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(names))
    width = 0.8 / max(len(series), 1)
    colors = {lab: f"C{i}" for i, lab in enumerate(labels)}
    for i, (lab, key, hatch) in enumerate(series):
        vals = [obs[n][lab][key] or np.nan for n in names]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, color=colors[lab],
               label=lab + (" + training" if hatch else ""), hatch=hatch,
               alpha=0.5 if hatch else 1.0)  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylabel("wall-clock s per\nindependent sample")
    ax.set_title("cost per independent sample (2 τ_int × s/config)")
    ax.legend(fontsize=8)
    others = [lab for lab in labels if lab != ref]
    wz = 0.8 / max(len(others), 1)
    for i, lab in enumerate(others):
        z = [obs[n][lab].get("z_vs_reference") for n in names]
        ax_z.bar(x + (i - (len(others) - 1) / 2) * wz, [np.nan if v is None else v for v in z],
                 wz, color=colors[lab], label=f"{lab} vs {ref}")  # fmt: skip
    ax_z.axhspan(-2, 2, color="0.85", zorder=0)
    ax_z.axhline(0, color="k", lw=0.5)
    ax_z.set_ylabel(f"z vs {ref}")
    ax_z.set_xticks(x, names, rotation=30, ha="right")
    if others:
        ax_z.legend(fontsize=8)
    return save_figure(fig, path, COMPARE_PLOT[1], inputs=inputs)


# ============================================================================ eval
def eval_table(res: Any) -> str:
    """The printed report of a flow evaluation (:class:`~flowmc.training.evaluate.FlowEvaluation`),
    with the Z2 sign rule's warning when the flow's draws are sign-imbalanced."""
    d = _as_dict(res)
    exact = d.get("log_z_exact")
    lines = [
        f"model        {d.get('model', '-')}  ({d.get('action', {})}, "
        f"symmetric={d.get('symmetric')})",
        f"samples      {d['n']} in batches of {d['batch_size']}"
        + (f" ({d['seconds']:.2f} s)" if d.get("seconds") is not None else ""),
        f"ESS (all N)  {d['ess']:.4f}",
        f"ESS (batch)  {fmt(d['ess_batch_mean'], d['ess_batch_err'])}",
        f"MH accept    {d['mh_acceptance']:.4f}",
        f"F_q          {fmt(d['f_q'], d['f_q_err'])}   (bound: F_q >= -log Z)",
        f"log Z        {fmt(d['log_z'], d['log_z_err'])}"
        + (f"   exact {exact:.6f}" if exact is not None else ""),
        f"frac M > 0   {fmt(d['frac_m_positive'], d['frac_m_positive_err'])}",
    ]
    for i in d.get("integration", []):
        lines.append(
            f"log q error  {i['steps']} steps: l_N - l_2N sd {i['sd']:.2g} (mean {i['mean']:.2g}, "
            f"max {i['max']:.2g}) on {i['n']} draws (tolerance on sd {i['tolerance']:g}: "
            + ("within" if i["within"] else "EXCEEDED, flowmc sample refuses it")
            + f"); round trip {i['round_trip']:.2g}"
        )
    if d["n_nonfinite"]:
        lines.append(f"non-finite   {d['n_nonfinite']} samples had non-finite weights")
    bins = d.get("by_magnetization") or []
    if bins:
        lines.append("by m = M/V   (equal-count bins: draws under q and p, spread of log w)")
        for b in bins:
            lines.append(
                f"  [{b['lo']:+.3f}, {b['hi']:+.3f}]  q {b['q_frac']:.3f}  p {b['p_frac']:.3f}  "
                f"<log w> {b['mean_log_w']:+.3f}  sd {b['sd_log_w']:.3f}"
            )
    sb = d.get("sign_balance")
    if sb is not None and sb["imbalanced"]:
        lines.append(
            f"WARNING: the target is Z2 symmetric but the flow's draws are sign-imbalanced: "
            f"frac(M > 0) = {sb['frac_positive']:.4f}, {sb['z_frac']:.1f} sigma from 1/2. MH "
            "stays exact, but a flow that (nearly) misses a mode may never visit it in practice: "
            "sample with the symmetrised proposal (--symmetric), which is exactly even."
        )
    return "\n".join(lines)


# ============================================================================ training
def default_train_plot_path(out: PathLike) -> Path:
    """Default training-curve path of ``flowmc train --out OUT``: ``OUT`` with its suffix
    replaced by ``.train.png`` (``model.pt`` -> ``model.train.png``), so that it never equals
    the checkpoint and never takes the name of an unrelated ``model.png``."""
    out = Path(out)
    return out.with_name(out.stem + ".train.png")


def plot_training_history(
    history: Mapping[str, Sequence[float]],
    path: PathLike,
    *,
    title: str = "",
    inputs: Iterable[PathLike] = (),
) -> Path:
    """Training curve: batch ESS and the loss F_q against step (moving averages of 25 steps).

    Returns:
        The path written (kind ``train-history``).
    """

    def smooth(xs: Sequence[float], w: int = 25) -> np.ndarray:
        arr = np.asarray(xs, dtype=float)
        return np.convolve(arr, np.ones(w) / w, "valid") if len(arr) > w else arr

    fig = _figure(figsize=(7, 3.5), dpi=120, layout="constrained")
    ax = fig.subplots()
    ess = smooth(history["ess"])
    ax.plot(np.arange(len(ess)), ess, color="C0", label="ESS (batch)")
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_ylabel("ESS", color="C0")
    ax2 = ax.twinx()
    loss = smooth(history["loss"])
    ax2.plot(np.arange(len(loss)), loss, color="C1", label="F_q")
    ax2.set_ylabel(r"loss $F_q = \langle \log q + S\rangle$", color="C1")
    if len(loss):
        lo, hi = np.percentile(loss, 5), np.percentile(loss, 60)
        ax2.set_ylim(lo - 0.1 * abs(hi - lo) - 1e-3, hi + 0.5 * abs(hi - lo) + 1e-3)
    ax.set_title(title)
    return save_figure(fig, path, "train-history", inputs=inputs)


# ============================================================================ scan
#: The plots of ``flowmc scan`` (files in the scan directory) and their report kinds.
SCAN_PLOTS = {
    "chi2.png": "scan-chi2",
    "binder.png": "scan-binder",
    "xi2_over_L.png": "scan-xi2-over-L",
    "free_energy.png": "scan-free-energy",
}

_SCAN_LABELS = {"chi2": r"$\chi_2$", "binder": r"$U_4$", "xi2_over_L": r"$\xi_2/L$"}


def _by_size(summary: Mapping[str, Any]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for pt in summary["points"]:
        out.setdefault(int(pt["L"]), []).append(pt)
    for pts in out.values():
        pts.sort(key=lambda p: p["lam"])
    return out


def _obs(pt: Mapping[str, Any], key: str) -> tuple[float, float]:
    e = pt["observables"].get(key)
    if e is None or e.get("value") is None or e.get("error") is None:
        return math.nan, math.nan
    return float(e["value"]), float(e["error"])


def scan_table(summary: Mapping[str, Any]) -> str:
    """The printed report of a scan (:func:`flowmc.scan.summarize_scan`): one line per point,
    then the crossings, the free energy, the cost and the warnings."""
    s = summary["settings"]
    lams = s["lams"]
    samplers = ", ".join(f"L={L} {name}" for L, name in s["samplers"].items())
    lines = [
        f"scan       {summary['directory']}  (m2 = {s['m2']:g}, {len(lams)} couplings "
        f"{lams[0]:g} .. {lams[-1]:g}; {samplers}; n = {s['run']['n']} x "
        f"{s['run']['chains']} chains per point)",
        "",
    ]
    head = (f"{'L':>3} {'lam':>8} {'chi2':>16} {'U4':>16} {'xi2/L':>16} {'f (flow)':>20} "
            f"{'f (TI)':>20} {'z':>6} {'acc':>6} {'tau(chi2)':>10}")  # fmt: skip
    lines += [head, "-" * len(head)]
    for L, pts in _by_size(summary).items():
        for pt in pts:
            cells = []
            for key in ("chi2", "binder", "xi2_over_L"):
                v, e = _obs(pt, key)
                cells.append("-" if not math.isfinite(v) else fmt(v, e))
            fe = pt["free_energy"]
            ff = "-" if not fe["flow"] else fmt(fe["flow"]["f"], fe["flow"]["error"])
            ti = fe["ti"]
            ft = "-" if not ti else fmt(ti["f"], math.hypot(ti["error"], ti["disc"] or 0.0))
            z = fe["z_ti_vs_flow"]
            acc = pt.get("acceptance")
            chi = pt["observables"].get("chi2")
            tau = "-" if chi is None else f"{chi['tau_int']:.3g}"
            flag = "" if pt["complete"] else "  (incomplete)"
            lines.append(
                f"{L:>3} {pt['lam']:>8g} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16} {ff:>20} "
                f"{ft:>20} {'-' if z is None else f'{z:+.2f}':>6} "
                f"{'-' if acc is None else f'{acc:.3f}':>6} {tau:>10}{flag}"
            )
    lines.append("-" * len(head))
    for c in summary["crossings"]:
        name = {"binder": "U4", "xi2_over_L": "xi2/L"}.get(c["observable"], c["observable"])
        pair = f"L={c['sizes'][0]}/{c['sizes'][1]}"
        if not c["found"]:
            lines.append(f"crossing {name:<6} {pair}: none ({c['note']})")
            continue
        err = c["error"] if c["error"] is not None else c["error_linear"]
        lines.append(
            f"crossing {name:<6} {pair}: lam_c = {fmt(c['lam'], err)} (bootstrap over points; "
            f"linear propagation {c['error_linear']:.2g}), {name}* = "
            f"{fmt(c['value'], c['value_error'] or c['value_error_linear'])} [{c['method']}, "
            f"points {c['window'][0]:g} .. {c['window'][-1]:g}]"
        )
    for L, fe in summary["free_energy"].items():
        a = fe.get("anchor")
        if a is None:
            lines.append(f"free energy L={L}: {fe.get('note') or 'not computed'}")
            continue
        z = fe.get("max_abs_z")
        comp = ("" if not fe.get("n_compared") else
                f"; TI vs flow: max |z| = {z:.2f} over {fe['n_compared']} points")  # fmt: skip
        lines.append(
            f"free energy L={L}: thermodynamic integration ({fe['rule']}) from {a['source']} "
            f"at lam = {a['lam']:g} (f = {fmt(a['f'], a['error'] or None)}){comp}"
        )
    cost = summary["cost"]
    train = ", ".join(f"L={L} {v:.0f} s" for L, v in cost["training_s"].items() if v)
    lines.append(
        f"cost       sampling {cost['sampling_s']:.1f} s, warm-up {cost['warmup_s']:.1f} s, "
        f"flow log Z {cost['logz_s']:.1f} s, analysis {cost['analysis_s']:.1f} s"
        + (f"; training {train}" if train else "")
    )
    for w in summary["warnings"]:
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)


def _crossing_bands(ax: Any, summary: Mapping[str, Any], observable: str) -> None:
    for i, c in enumerate(x for x in summary["crossings"] if x["observable"] == observable):
        if not c["found"]:
            continue
        err = c["error"] if c["error"] is not None else c["error_linear"]
        ax.axvspan(c["lam"] - err, c["lam"] + err, color=f"C{i + 5}", alpha=0.25,
                   label=f"crossing L={c['sizes'][0]}/{c['sizes'][1]}: "
                         f"{fmt(c['lam'], err)}")  # fmt: skip


def scan_plots(
    summary: Mapping[str, Any], outdir: PathLike, *, inputs: Iterable[PathLike] = ()
) -> list[Path]:
    """The PNGs of a scan in ``outdir`` (:data:`SCAN_PLOTS`): χ₂(λ), U₄(λ) and ξ₂/L(λ) per L with
    error bars (U₄ and ξ₂/L with their crossings ± error), and f(λ) per L: the flow's points and
    the thermodynamic integration (band: statistical ⊕ discretisation error), with the z-scores of
    their difference below.

    Returns:
        The paths written.
    """
    outdir = Path(outdir)
    inputs = list(inputs)
    check_outputs(((outdir / n, "png", k) for n, k in SCAN_PLOTS.items()), inputs=inputs)
    by_size = _by_size(summary)
    paths: list[Path] = []
    for key, name in (("chi2", "chi2.png"), ("binder", "binder.png"),
                      ("xi2_over_L", "xi2_over_L.png")):  # fmt: skip
        fig = _figure(figsize=(6, 4), dpi=100, layout="constrained")
        ax = fig.subplots()
        for i, (L, pts) in enumerate(by_size.items()):
            vals = np.array([_obs(p, key) for p in pts])
            ax.errorbar([p["lam"] for p in pts], vals[:, 0], vals[:, 1], fmt="o-", ms=3,
                        capsize=2, color=f"C{i}", label=f"L = {L}")  # fmt: skip
        if key != "chi2":
            _crossing_bands(ax, summary, key)
        ax.set_xlabel(r"$\lambda$")
        ax.set_ylabel(_SCAN_LABELS[key])
        ax.set_title(f"{_SCAN_LABELS[key]} at $m^2$ = {summary['settings']['m2']:g}")
        ax.legend(fontsize=7)
        paths.append(save_figure(fig, outdir / name, SCAN_PLOTS[name], inputs=inputs, dpi=100))

    fig = _figure(figsize=(6, 6), dpi=100, layout="constrained")
    ax, ax_z = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    drawn = False
    for i, (L, pts) in enumerate(by_size.items()):
        lam = np.array([p["lam"] for p in pts])
        flow = [(p["lam"], p["free_energy"]["flow"]) for p in pts if p["free_energy"]["flow"]]
        if flow:
            ax.errorbar([x for x, _ in flow], [r["f"] for _, r in flow],
                        [r["error"] for _, r in flow], fmt="o", ms=4, capsize=2,
                        color=f"C{i}", label=f"L = {L}: flow log Z")  # fmt: skip
            drawn = True
        ti = [p["free_energy"]["ti"] for p in pts]
        if all(t is not None for t in ti):
            f = np.array([t["f"] for t in ti])
            e = np.array([math.hypot(t["error"], t["disc"] or 0.0) for t in ti])
            ax.plot(lam, f, "-", color=f"C{i}", lw=1, label=f"L = {L}: thermodynamic integration")
            ax.fill_between(lam, f - e, f + e, color=f"C{i}", alpha=0.25)
            drawn = True
        zs = [(p["lam"], p["free_energy"]["z_ti_vs_flow"]) for p in pts
              if p["free_energy"]["z_ti_vs_flow"] is not None]  # fmt: skip
        if zs:
            ax_z.plot([x for x, _ in zs], [z for _, z in zs], "o", color=f"C{i}", ms=4)
    if not drawn:
        ax.text(0.5, 0.5, "no free energy (no flow log Z, no anchor)", ha="center",
                va="center", transform=ax.transAxes)  # fmt: skip
    else:
        ax.legend(fontsize=7)
    ax.set_ylabel(r"$f = -\log Z / V$")
    ax.set_title("free-energy density")
    ax_z.axhspan(-2, 2, color="0.85", zorder=0)
    ax_z.axhline(0, color="k", lw=0.5)
    ax_z.set_ylabel("z (TI - flow)")
    ax_z.set_xlabel(r"$\lambda$")
    paths.append(save_figure(fig, outdir / "free_energy.png", SCAN_PLOTS["free_energy.png"],
                             inputs=inputs, dpi=100))  # fmt: skip
    return paths
