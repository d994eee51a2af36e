r"""Side-by-side comparison of two ensembles (typically flow MH against HMC) at equal footing.

For every observable of :func:`flowmc.analysis.analyze` the comparison reports both estimates
with their errors, the difference in units of its error, the integrated autocorrelation times
and the **wall-clock cost per independent sample**

.. math::

    c_\mathrm{indep}(O) = 2\tau_\mathrm{int}(O)\, c_\mathrm{config},\qquad
    c_\mathrm{config} = \frac{\sum_\mathrm{chunks} t_\mathrm{wall}}{n\,C},

(:math:`\tau_\mathrm{int}` in the ½ + Σρ convention, measured in recorded configurations; the
chunk wall times are those stored in the ensemble, so HMC warm-up and flow training are *not*
in :math:`c_\mathrm{config}`). For a flow ensemble the training time :math:`T` (from the
checkpoint's ``meta["training_time_s"]``, or given explicitly) is also amortised over the
configurations drawn, :math:`c'_\mathrm{config} = c_\mathrm{config} + T/(nC)`, and the
break-even number of independent samples beyond which the flow (training included) is cheaper
than the other sampler, :math:`T / (c^{B}_\mathrm{indep} - c^{A}_\mathrm{indep})`, is given.

The result is a plain dict (see :func:`compare` and ``docs/hmc.md``), printable with
:func:`format_table` and plottable with :func:`plot_costs`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from flowmc.ensemble import file_sha256, open_ensemble

__all__ = ["OBSERVABLES", "ensemble_cost", "compare", "format_table", "plot_costs"]

#: Observables compared, in table order (keys of :func:`flowmc.analysis.analyze`).
OBSERVABLES = (
    "m", "abs_m", "m2", "chi2", "chi_conn", "binder", "energy", "xi2", "action_density",
    "sd_check",
)
_STAT_KEYS = ("value", "error", "tau_int", "tau_int_error", "ess")


def _is_flow(sampler: dict) -> bool:
    return str(sampler.get("name", "")).startswith("flow")


def _float(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _training_time(ens: Any, train_time: float | None) -> tuple[float | None, str | None, list]:
    """Training time of a flow ensemble's model: explicit value, else its checkpoint's meta."""
    warnings: list[str] = []
    if train_time is not None:
        return float(train_time), "given", warnings
    path = ens.meta.get("model_path")
    if not path or not os.path.exists(path):
        warnings.append(
            f"{ens.path}: flow checkpoint {path!r} not found; training cost not included "
            "(pass --train-time SECONDS)"
        )
        return None, None, warnings
    if ens.model_sha256 and file_sha256(path) != ens.model_sha256:
        warnings.append(
            f"{ens.path}: checkpoint {path} changed since sampling (SHA-256 differs); its "
            "training time is not used (pass --train-time SECONDS)"
        )
        return None, None, warnings
    from flowmc.checkpoint import load_checkpoint

    t = _float(load_checkpoint(path).get("meta", {}).get("training_time_s"))
    if t is None:
        warnings.append(f"{ens.path}: checkpoint {path} records no training_time_s")
        return None, None, warnings
    return t, "checkpoint", warnings


def ensemble_cost(path: str | os.PathLike[str], *, train_time: float | None = None) -> dict:
    """Wall-clock cost figures of one ensemble.

    Args:
        path: the ensemble file.
        train_time: training time in seconds to amortise (flow ensembles only); if ``None``,
            read from the checkpoint at ``meta["model_path"]`` when it exists and matches the
            ensemble's ``model_sha256``.

    Returns:
        dict with ``path, sampler, is_flow, action, n, chains, configs, wall_time_s,
        cost_per_config_s, warmup_time_s, train_time_s, train_time_source,
        train_cost_per_config_s, cost_per_config_with_training_s, warnings``.
    """
    with open_ensemble(path) as ens:
        wall = float(np.sum(ens.chunk_wall_times))
        configs = ens.n * ens.n_chains
        is_flow = _is_flow(ens.sampler)
        t_train, source, warnings = (
            _training_time(ens, train_time) if is_flow else (None, None, [])
        )
        warm = ens.meta.get("warmup", {})
        out = {
            "path": str(path),
            "sampler": dict(ens.sampler),
            "is_flow": is_flow,
            "action": dict(ens.action),
            "n": ens.n,
            "chains": ens.n_chains,
            "configs": configs,
            "wall_time_s": wall,
            "cost_per_config_s": wall / configs if configs else None,
            "warmup_time_s": _float(warm.get("seconds")) if isinstance(warm, dict) else None,
            "train_time_s": t_train,
            "train_time_source": source,
            "warnings": warnings,
        }
    per = out["cost_per_config_s"]
    if t_train is not None and configs:
        out["train_cost_per_config_s"] = t_train / configs
        out["cost_per_config_with_training_s"] = (per or 0.0) + t_train / configs
    else:
        out["train_cost_per_config_s"] = None
        out["cost_per_config_with_training_s"] = None
    return out


def _default_analyze(path: str, discard: int) -> dict:
    from flowmc.analysis import analyze

    return analyze(path, discard=discard)


def _labels(a: dict, b: dict) -> tuple[str, str]:
    la, lb = a["sampler"].get("name", "A"), b["sampler"].get("name", "B")
    if la == lb:
        return f"A ({la})", f"B ({lb})"
    return str(la), str(lb)


def compare(
    path_a: str | os.PathLike[str],
    path_b: str | os.PathLike[str],
    *,
    discard: int = 0,
    train_time: float | None = None,
    analyze_fn: Callable[[str, int], dict] | None = None,
) -> dict:
    """Compare two ensembles observable by observable, with costs.

    Args:
        path_a: first ensemble (e.g. flow MH).
        path_b: second ensemble (e.g. HMC).
        discard: rows per chain discarded by the analysis (costs still count every row).
        train_time: training seconds of the flow ensemble(s), overriding the checkpoint's.
        analyze_fn: ``analyze_fn(path, discard) -> dict`` (default
            :func:`flowmc.analysis.analyze`).

    Returns:
        A dict with keys

        * ``labels``: ``[label_a, label_b]``;
        * ``ensembles``: ``{label: ensemble_cost(...) + {"acceptance", "n_analysed"}}``;
        * ``same_action``: whether both ensembles sample the same action;
        * ``observables``: ``{name: {label_a: stats, label_b: stats, "diff", "diff_error",
          "diff_sigma", "cost_ratio"}}`` where ``stats`` holds ``value, error, tau_int,
          tau_int_error, ess, cost_per_independent_s, cost_per_independent_with_training_s``
          and ``cost_ratio`` is ``cost_a / cost_b`` per independent sample (sampling only);
          for a flow ensemble with a known training time also ``break_even_independent``;
        * ``warnings``: list of strings.

    Raises:
        FileNotFoundError, ValueError: if a file is missing or not an ensemble.
    """
    analyze_fn = analyze_fn or _default_analyze
    ens = [ensemble_cost(p, train_time=train_time) for p in (path_a, path_b)]
    labels = _labels(*ens)
    res = [analyze_fn(str(p), discard) for p in (path_a, path_b)]
    warnings: list[str] = []
    for lab, e, r in zip(labels, ens, res):
        warnings += e.pop("warnings")
        warnings += [f"{lab}: {w}" for w in r.get("warnings", [])]
        e["acceptance"] = _float(r.get("acceptance"))
        e["n_analysed"] = r.get("n")
    same = ens[0]["action"] == ens[1]["action"]
    if not same:
        warnings.append(f"the ensembles sample different actions: {ens[0]['action']} vs "
                        f"{ens[1]['action']}")
    obs: dict[str, dict] = {}
    for name in OBSERVABLES:
        if not all(isinstance(r.get(name), dict) for r in res):
            continue
        row: dict[str, Any] = {}
        for lab, e, r in zip(labels, ens, res):
            s: dict[str, Any] = {k: _float(r[name].get(k)) for k in _STAT_KEYS}
            if "reliable" in r[name]:
                s["reliable"] = bool(r[name]["reliable"])
            tau, per, per_t = s["tau_int"], e["cost_per_config_s"], e[
                "cost_per_config_with_training_s"]
            s["cost_per_independent_s"] = 2 * tau * per if tau and per else None
            s["cost_per_independent_with_training_s"] = 2 * tau * per_t if tau and per_t else None
            row[lab] = s
        (sa, sb), (ea, eb) = (row[lab] for lab in labels), ens
        if sa["value"] is not None and sb["value"] is not None:
            row["diff"] = sa["value"] - sb["value"]
            errs = [x["error"] for x in (sa, sb)]
            err = math.hypot(*errs) if all(x is not None for x in errs) else None
            row["diff_error"] = err
            row["diff_sigma"] = row["diff"] / err if err else None
        else:
            row["diff"] = row["diff_error"] = row["diff_sigma"] = None
        ca, cb = sa["cost_per_independent_s"], sb["cost_per_independent_s"]
        row["cost_ratio"] = ca / cb if ca and cb else None
        for (lab, s, e), (_, s_other, _) in (
            ((labels[0], sa, ea), (labels[1], sb, eb)),
            ((labels[1], sb, eb), (labels[0], sa, ea)),
        ):
            t = e["train_time_s"]
            if t is None:
                continue
            c, c_other = s["cost_per_independent_s"], s_other["cost_per_independent_s"]
            if c is not None and c_other is not None:
                row[f"break_even_independent_{lab}"] = (
                    t / (c_other - c) if c_other > c else None
                )
        obs[name] = row
    return {
        "labels": list(labels),
        "ensembles": dict(zip(labels, ens)),
        "same_action": same,
        "observables": obs,
        "warnings": warnings,
    }


def _fmt(value: float | None, err: float | None = None) -> str:
    from flowmc.commands._common import fmt

    if value is None:
        return "-"
    return fmt(value, err)


def _sec(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def format_table(result: dict) -> str:
    """The comparison as a plain-text table (observables, then per-ensemble costs)."""
    la, lb = result["labels"]
    cols = ("observable", la, lb, "diff/σ", f"τ_int {la}", f"τ_int {lb}", f"s/indep {la}",
            f"s/indep {lb}")
    widths = [max(15, len(cols[0]) + 1)] + [max(len(c) + 2, w) for c, w in
                                             zip(cols[1:], (22, 22, 8, 14, 14, 14, 14))]
    head = "".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                   for i, c in enumerate(cols))
    lines = [head, "-" * len(head)]
    for name, row in result["observables"].items():
        a, b = row[la], row[lb]
        ds = row.get("diff_sigma")
        cells = [
            _fmt(a["value"], a["error"]), _fmt(b["value"], b["error"]),
            "-" if ds is None else f"{ds:+.2f}",
            _fmt(a["tau_int"], a["tau_int_error"]), _fmt(b["tau_int"], b["tau_int_error"]),
            _sec(a["cost_per_independent_s"]), _sec(b["cost_per_independent_s"]),
        ]
        lines.append(name.ljust(widths[0]) + "".join(c.rjust(w) for c, w in
                                                      zip(cells, widths[1:])))
    lines.append("")
    for lab in (la, lb):
        e = result["ensembles"][lab]
        acc = e.get("acceptance")
        text = (
            f"{lab}: {e['n']} x {e['chains']} configs, acceptance "
            f"{'-' if acc is None else f'{acc:.3f}'}, sampling {e['wall_time_s']:.3g} s, "
            f"{_sec(e['cost_per_config_s'])} s/config"
        )
        if e.get("warmup_time_s"):
            text += f", warm-up {e['warmup_time_s']:.3g} s (not included)"
        if e["is_flow"]:
            t = e["train_time_s"]
            text += (
                ", training time unknown" if t is None else
                f", training {t:.3g} s ({e['train_time_source']}) = "
                f"{e['train_cost_per_config_s']:.3g} s/config amortised"
            )
        lines.append(text)
    for name in ("chi2", "abs_m", "energy"):
        row = result["observables"].get(name, {})
        for key, val in row.items():
            if key.startswith("break_even_independent_") and val is not None:
                lab = key[len("break_even_independent_"):]
                lines.append(
                    f"{lab} incl. training is cheaper than the other beyond {val:.3g} "
                    f"independent {name} samples"
                )
    for w in result["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def plot_costs(result: dict, path: str | os.PathLike[str]) -> Path:
    """Bar chart (log scale) of the cost per independent sample of each observable.

    One bar per ensemble; a hatched bar adds the amortised training cost of a flow ensemble.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    la, lb = result["labels"]
    names = [n for n, r in result["observables"].items()
             if r[la]["cost_per_independent_s"] or r[lb]["cost_per_independent_s"]]
    series = [(la, "cost_per_independent_s", None), (lb, "cost_per_independent_s", None)]
    for lab in (la, lb):
        if result["ensembles"][lab]["train_time_s"] is not None:
            series.append((lab, "cost_per_independent_with_training_s", "//"))
    x = np.arange(len(names))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.0))
    for i, (lab, key, hatch) in enumerate(series):
        vals = [result["observables"][n][lab][key] or np.nan for n in names]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width,
               label=lab + (" + training" if hatch else ""), hatch=hatch,
               alpha=0.6 if hatch else 1.0)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("wall-clock s per independent sample")
    ax.set_title("cost per independent sample (2 τ_int × s/config)")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
