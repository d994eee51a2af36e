"""``flowmc analyze``: observables with Gamma-method errors, diagnostics, JSON and plots."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from flowmc.analysis import SCALAR_KEYS, analyze
from flowmc.commands._common import fmt, write_json
from flowmc.config import add_common_options, apply_threads
from flowmc.ensemble import open_ensemble

#: Table labels of the scalar observables (JSON key -> printed name).
LABELS = {
    "m": "<m>",
    "abs_m": "<|m|>",
    "m2": "<m^2>",
    "chi2": "chi2 = V<m^2>",
    "chi_conn": "chi_conn",
    "binder": "Binder U4",
    "energy": "E (Ising)",
    "xi2": "xi_2 (2nd mom.)",
    "action_density": "S/V",
    "sd_check": "SD check (=1)",
    "exp_minus_delta_h": "<exp(-dH)> (=1)",
    "frac_m_positive": "frac(m > 0)",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="observables with Gamma-method errors, autocorrelation times, Z2 diagnostics",
        description="Analyse an ensemble file: magnetisation, susceptibilities, Binder "
        "cumulant, energy, second-moment correlation length, Schwinger-Dyson check, G(x), C(t), "
        "effective and pole mass, each with a Gamma-method error (chains as replicas), tau_int "
        "(1/2 + sum rho convention) and ESS; acceptance, longest rejection run and Z2 sign "
        "balance, with warnings. Keys of --json are documented in docs/analysis.md.",
    )
    add_common_options(p)
    p.add_argument("ensemble", type=Path, help="ensemble file (HDF5) from flowmc sample / hmc")
    p.add_argument("--discard", type=int, default=0, help="rows per chain to drop (thermalisation)")
    p.add_argument("--S", type=float, default=1.5, help="Wolff windowing parameter (default 1.5)")
    p.add_argument("--chunk", type=int, default=512, help="rows per chain read at a time")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--plots", type=Path, default=None, help="write PNG plots into this folder")
    p.set_defaults(func=run)


def _row(label: str, e: dict[str, Any]) -> str:
    tau = fmt(e["tau_int"], e["tau_int_error"])
    flag = "" if e.get("reliable", True) else "  (!)"
    return f"{label:<17} {fmt(e['value'], e['error']):>24} {tau:>18} {e['ess']:>9.0f}{flag}"


def format_table(res: dict[str, Any]) -> str:
    """The printed report of an :func:`~flowmc.analysis.analyze` result."""
    sampler = res["sampler"].get("name", "?")
    lines = [
        f"ensemble   {res['path']}  ({sampler}, L = {tuple(res['lattice_shape'])}, "
        f"{res['chains']} chains x {res['n']} configs, discard {res['discard']}, S = {res['S']})",
        f"action     {res['action']}",
        "",
        f"{'observable':<17} {'value ± error':>24} {'tau_int ± err':>18} {'ESS':>9}",
        "-" * 71,
    ]
    for key in (*SCALAR_KEYS, "exp_minus_delta_h", "frac_m_positive"):
        if key in res:
            lines.append(_row(LABELS.get(key, key), res[key]))
    lines.append("-" * 71)
    if "pole_mass" in res:
        pm = res["pole_mass"]
        lines.append(
            f"pole mass  {fmt(pm['value'], pm['error'])}  "
            f"(cosh fit t = {pm['tmin']}..{pm['tmax']}, "
            f"chi2/dof = {pm['chi2']:.2f}/{pm['dof']}, jackknife error)"
        )
    if "m_eff" in res:
        parts = []
        for t, (v, e) in enumerate(zip(res["m_eff"]["value"], res["m_eff"]["error"], strict=True)):
            if v is not None and t <= len(res["m_eff"]["value"]) // 2:
                parts.append(f"{t}: {fmt(v, e)}")
        lines.append("m_eff(t)   " + ("; ".join(parts) if parts else "undefined"))
    if "acceptance" in res:
        lines.append(
            f"acceptance {res['acceptance']:.4f}   longest rejection run "
            f"{res['longest_rejection_run']} (per chain "
            f"{res['longest_rejection_run_per_chain']})"
        )
    if "mode_crossings" in res:
        lines.append(
            f"Z2         <m>/sigma = {res['m_over_error']:+.2f}, sign changes of M per chain "
            f"{res['mode_crossings']}"
        )
    for note in res["notes"]:
        lines.append(f"note: {note}")
    for w in res["warnings"]:
        lines.append(f"WARNING: {w}")
    if any(not res[k].get("reliable", True) for k in SCALAR_KEYS if k in res):
        lines.append("(!) = error and tau_int unreliable (series too short), see warnings")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    res = analyze(args.ensemble, discard=args.discard, S=args.S, chunk=args.chunk)
    print(format_table(res))
    if args.json:
        write_json(args.json, res)
    if args.plots:
        paths = make_plots(res, args.ensemble, args.plots, discard=args.discard)
        print(f"plots      {len(paths)} PNGs in {args.plots}")
    return 0


# ----------------------------------------------------------------------------- plots
def make_plots(
    res: dict[str, Any], ensemble: Path, outdir: Path, *, discard: int = 0
) -> list[Path]:
    """Write the diagnostic PNGs of an analysis into ``outdir``; returns their paths.

    ``history.png`` (M and S against Monte Carlo time), ``hist_m.png``, ``correlators.png``
    (G along axis 0, C(t) and m_eff(t)), ``autocorr.png`` (rho(t) with the chosen windows) and,
    for flow ensembles, ``action_vs_effective.png`` (S against S_eff = -log q).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    vol = res["volume"]
    series = res.get("_series", {})

    def save(fig: Any, name: str) -> None:
        path = outdir / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)

    with open_ensemble(ensemble) as ens:
        scal = {k: ens.scalar(k)[discard:] for k in ("action", "log_q") if k in ens.scalar_names}
    # Monte Carlo history of M and S
    m = series.get("m")
    fig, axes = plt.subplots(2, 1, figsize=(7, 5), dpi=100, layout="constrained", sharex=True)
    if m is not None:
        for c in range(m.shape[1]):
            axes[0].plot(np.arange(discard, discard + m.shape[0]), m[:, c] * vol, lw=0.5,
                         label=f"chain {c}")  # fmt: skip
    axes[0].set_ylabel("M")
    s_hist = scal.get("action")
    if s_hist is None and "action_density" in series:
        s_hist = series["action_density"] * vol
    if s_hist is not None:
        for c in range(s_hist.shape[1]):
            axes[1].plot(np.arange(discard, discard + s_hist.shape[0]), s_hist[:, c], lw=0.5)
    axes[1].set_ylabel("S")
    axes[1].set_xlabel("Monte Carlo time (rows)")
    if m is not None and m.shape[1] <= 8:
        axes[0].legend(fontsize=6, loc="upper right")
    save(fig, "history.png")

    if m is not None:
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100, layout="constrained")
        ax.hist(m.ravel(), bins=80, density=True, color="C0", alpha=0.8)
        ax.axvline(0, color="k", lw=0.5)
        ax.set_xlabel("m = M/V")
        ax.set_ylabel("density")
        save(fig, "hist_m.png")

    if "G_x" in res and "C_t" in res:
        g = np.asarray(res["G_x"]["value"])
        ge = np.asarray(res["G_x"]["error"])
        idx = (slice(None),) + (0,) * (g.ndim - 1)
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), dpi=100, layout="constrained")
        axes[0].errorbar(np.arange(g.shape[0]), g[idx], ge[idx], fmt="o", ms=3, capsize=2)
        axes[0].set_xlabel("x (along axis 0)")
        axes[0].set_ylabel("G(x)")
        c, ce = np.asarray(res["C_t"]["value"]), np.asarray(res["C_t"]["error"])
        axes[1].errorbar(np.arange(c.size), c, ce, fmt="o", ms=3, capsize=2)
        axes[1].set_yscale("log" if np.all(c > 0) else "linear")
        axes[1].set_xlabel("t")
        axes[1].set_ylabel("C(t)")
        if "m_eff" in res:
            mv = np.array([np.nan if v is None else v for v in res["m_eff"]["value"]], float)
            me = np.array([np.nan if v is None else v for v in res["m_eff"]["error"]], float)
            axes[2].errorbar(np.arange(mv.size), mv, me, fmt="o", ms=3, capsize=2)
            if "pole_mass" in res:
                pm = res["pole_mass"]
                axes[2].axhspan(pm["value"] - pm["error"], pm["value"] + pm["error"],
                                color="C1", alpha=0.3, label="cosh fit")  # fmt: skip
                axes[2].legend(fontsize=7)
        axes[2].set_xlabel("t")
        axes[2].set_ylabel(r"$m_{\rm eff}(t)$")
        save(fig, "correlators.png")

    gam = res.get("_gamma", {})
    chosen = [k for k in ("m2", "abs_m", "action_density", "energy", "xi2") if k in gam]
    if chosen:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100, layout="constrained")
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

    if "action" in scal and "log_q" in scal:
        s = np.asarray(scal["action"], float).ravel()
        s_eff = -np.asarray(scal["log_q"], float).ravel()
        ok = np.isfinite(s) & np.isfinite(s_eff)
        if np.count_nonzero(ok) >= 2:
            s, s_eff = s[ok], s_eff[ok]
            fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100, layout="constrained")
            ax.plot(s_eff, s, ".", ms=1.5, alpha=0.4)
            b = float(np.mean(s) - np.mean(s_eff))
            xs = np.linspace(s_eff.min(), s_eff.max(), 4)
            ax.plot(xs, xs + b, "k:", label=f"slope 1, offset {b:.3f}")
            ax.set_xlabel(r"$S_{\rm eff} = -\log q(\phi)$")
            ax.set_ylabel(r"$S(\phi)$")
            ax.set_title("chain states: action vs effective action")
            ax.legend(fontsize=7)
            save(fig, "action_vs_effective.png")
    return paths
