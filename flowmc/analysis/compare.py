r"""Side-by-side comparison of two or more ensembles (flow MH, HMC, hybrid, ...) at equal footing.

For every observable of :func:`flowmc.analysis.ensemble.analyze` the comparison reports each
estimate with its error, its z-score against a **reference** ensemble (the first one) and the
pairwise z-scores between all ensembles, the integrated autocorrelation times and the **wall-clock
cost per independent sample**

.. math::

    c_\mathrm{indep}(O) = 2\tau_\mathrm{int}(O)\, c_\mathrm{config},\qquad
    c_\mathrm{config} = \frac{\sum_\mathrm{chunks} t_\mathrm{wall}}{n\,C},

(:math:`\tau_\mathrm{int}` in the ½ + Σρ convention, measured in recorded configurations; the
chunk wall times are those stored in the ensemble, so HMC warm-up and flow training are *not*
in :math:`c_\mathrm{config}`). For an ensemble that uses a flow (flow MH or hybrid) the
training time :math:`T` is reported beside it and amortised over the configurations drawn,
:math:`c'_\mathrm{config} = c_\mathrm{config} + T/(nC)`, with the break-even number of
independent samples :math:`T / (c^{B}_\mathrm{indep} - c^{A}_\mathrm{indep})` against every
other ensemble.

:math:`T` is ``train_time`` if given, else the ``meta["model"]["training_time_s"]`` the sampler
recorded in the ensemble at sampling time, else unknown. The comparison **never opens a file
because an ensemble names it** (no checkpoint is read): a crafted ``meta`` cannot make it read
``/dev/zero``.

The result is a JSON-ready dict (see :func:`compare` and ``docs/hmc.md``); tables and plots are
in :mod:`flowmc.report` (:func:`~flowmc.report.compare_table`,
:func:`~flowmc.report.plot_compare`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from flowmc._checks import float_or_none
from flowmc.analysis.ensemble import SCALAR_KEYS
from flowmc.io.ensemble import open_ensemble

__all__ = ["ensemble_cost", "compare", "uses_flow"]

_STAT_KEYS = ("value", "error", "tau_int", "tau_int_error", "ess")


def uses_flow(sampler: Mapping[str, Any]) -> bool:
    """Whether an ensemble's sampler uses a trained flow (flow MH or the hybrid)."""
    name = str(sampler.get("name", ""))
    return name.startswith("flow") or name == "hybrid"


def _training_time(
    path: str, meta: Mapping[str, Any], train_time: float | None
) -> tuple[float | None, str | None, list[str]]:
    """Training time of a flow ensemble: explicit value, else what the sampler recorded."""
    if train_time is not None:
        return float(train_time), "given", []
    model = meta.get("model")
    t = float_or_none(model.get("training_time_s")) if isinstance(model, Mapping) else None
    if t is not None and t >= 0:
        return t, "ensemble", []
    return None, None, [
        f"{path}: training time unknown (the ensemble records no "
        "meta['model']['training_time_s']); pass --train-time SECONDS"
    ]


def ensemble_cost(path: str | os.PathLike[str], *, train_time: float | None = None) -> dict:
    """Wall-clock cost figures of one ensemble (reads the ensemble file only).

    Args:
        path: the ensemble file.
        train_time: training seconds to amortise (ensembles that use a flow only); if
            ``None``, ``meta["model"]["training_time_s"]`` recorded at sampling time.

    Returns:
        dict with ``path, sampler, is_flow, action, n, chains, configs, wall_time_s,
        cost_per_config_s, warmup_time_s, train_time_s, train_time_source, model,
        train_cost_per_config_s, cost_per_config_with_training_s, warnings``.
    """
    if train_time is not None and not (float_or_none(train_time) is not None and train_time >= 0):
        raise ValueError(f"Expected train_time >= 0 seconds; got {train_time!r}")
    with open_ensemble(path) as ens:
        wall = float(np.sum(ens.chunk_wall_times))
        configs = ens.n * ens.n_chains
        flow = uses_flow(ens.sampler)
        meta = ens.meta if isinstance(ens.meta, Mapping) else {}
        t_train, source, warnings = (
            _training_time(str(path), meta, train_time) if flow else (None, None, [])
        )
        warm = meta.get("warmup", {})
        model = meta.get("model")
        out = {
            "path": str(path),
            "sampler": dict(ens.sampler),
            "is_flow": flow,
            "action": dict(ens.action),
            "n": ens.n,
            "chains": ens.n_chains,
            "configs": configs,
            "wall_time_s": wall,
            "cost_per_config_s": wall / configs if configs else None,
            "warmup_time_s": (
                float_or_none(warm.get("seconds")) if isinstance(warm, Mapping) else None
            ),
            "train_time_s": t_train,
            "train_time_source": source,
            "model": dict(model) if isinstance(model, Mapping) else None,
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


def _default_analyze(path: str, discard: int) -> Any:
    from flowmc.analysis.ensemble import analyze

    return analyze(path, discard=discard)


def _labels(ens: list[dict]) -> list[str]:
    names = [str(e["sampler"].get("name") or "?") for e in ens]
    if len(set(names)) == len(names):
        return names
    letters = [chr(ord("A") + i) if i < 26 else f"#{i + 1}" for i in range(len(names))]
    return [f"{a} ({n})" for a, n in zip(letters, names)]


def _z(a: dict, b: dict) -> tuple[float | None, float | None, float | None]:
    """``(a - b, its error, z)`` for two stats entries, ``None`` where undefined."""
    if a["value"] is None or b["value"] is None:
        return None, None, None
    diff = a["value"] - b["value"]
    errs = [a["error"], b["error"]]
    err = math.hypot(*errs) if all(e is not None for e in errs) else None
    return diff, err, (diff / err if err else None)


def compare(
    *paths: str | os.PathLike[str],
    discard: int = 0,
    train_time: float | None = None,
    analyze_fn: Callable[[str, int], Any] | None = None,
) -> dict:
    """Compare ensembles observable by observable, with z-scores and costs.

    Args:
        *paths: two or more ensemble files; the first is the reference of the z-scores.
        discard: rows per chain discarded by the analysis (costs still count every row).
        train_time: training seconds of every ensemble that uses a flow, overriding what the
            ensembles recorded.
        analyze_fn: ``analyze_fn(path, discard)`` returning an
            :class:`~flowmc.analysis.ensemble.AnalysisResult` or its dict form (default
            :func:`flowmc.analysis.ensemble.analyze`).

    Returns:
        A JSON-ready dict with keys

        * ``labels``: one label per ensemble (the sampler names; ``"A (name)"``, ... if two
            names coincide); ``reference``: the first label;
        * ``ensembles``: ``{label: ensemble_cost(...) + {"acceptance", "acceptance_by_kernel",
            "n_analysed"}}``;
        * ``same_action``: whether all ensembles sample the same action;
        * ``observables``: ``{name: {label: stats, "pairwise_z": {a: {b: z}}}}`` for every
            observable of :data:`~flowmc.analysis.ensemble.SCALAR_KEYS` that all analyses report,
            where ``stats`` holds ``value, error, tau_int, tau_int_error, ess, (reliable),
            cost_per_independent_s, cost_per_independent_with_training_s, z_vs_reference,
            cost_ratio_vs_reference, break_even_independent`` (``{other label: number}`` for
            an ensemble with a known training time); with exactly two ensemble also the
            two-way keys ``diff, diff_error, diff_sigma`` (first minus second), ``cost_ratio``
            (first / second) and ``break_even_independent_<label>``;
        * ``warnings``: list of strings.

    Raises:
        FileNotFoundError, ValueError: if a file is missing or not an ensemble, or fewer than
            two paths are given.
    """
    if len(paths) < 2:
        raise ValueError(f"Expected at least two ensembles to compare; got {len(paths)}")
    analyze_fn = analyze_fn or _default_analyze
    ens = [ensemble_cost(p, train_time=train_time) for p in paths]
    labels = _labels(ens)
    res = []
    for p in paths:
        r = analyze_fn(str(p), discard)
        res.append(r.to_dict() if hasattr(r, "to_dict") else dict(r))
    warnings: list[str] = []
    for lab, e, r in zip(labels, ens, res):
        warnings += e.pop("warnings")
        warnings += [f"{lab}: {w}" for w in r.get("warnings", [])]
        e["acceptance"] = float_or_none(r.get("acceptance"))
        by_kernel = r.get("acceptance_by_kernel") or {}
        e["acceptance_by_kernel"] = {str(k): float_or_none(v) for k, v in by_kernel.items()}
        e["n_analysed"] = r.get("n")
    same = all(e["action"] == ens[0]["action"] for e in ens[1:])
    if not same:
        acts = "; ".join(f"{lab}: {e['action']}" for lab, e in zip(labels, ens))
        warnings.append(f"the ensembles sample different actions: {acts}")
    ref = labels[0]
    obs: dict[str, dict] = {}
    for name in SCALAR_KEYS:
        if not all(isinstance(r.get(name), Mapping) for r in res):
            continue
        row: dict[str, Any] = {}
        for lab, e, r in zip(labels, ens, res):
            s: dict[str, Any] = {k: float_or_none(r[name].get(k)) for k in _STAT_KEYS}
            if "reliable" in r[name]:
                s["reliable"] = bool(r[name]["reliable"])
            tau, per = s["tau_int"], e["cost_per_config_s"]
            per_t = e["cost_per_config_with_training_s"]
            s["cost_per_independent_s"] = 2 * tau * per if tau and per else None
            s["cost_per_independent_with_training_s"] = 2 * tau * per_t if tau and per_t else None
            row[lab] = s
        pair: dict[str, dict[str, float | None]] = {a: {} for a in labels}
        for a in labels:
            for b in labels:
                if a != b:
                    pair[a][b] = _z(row[a], row[b])[2]
        for lab, e in zip(labels, ens):
            s = row[lab]
            s["z_vs_reference"] = None if lab == ref else pair[lab][ref]
            c, c_ref = s["cost_per_independent_s"], row[ref]["cost_per_independent_s"]
            s["cost_ratio_vs_reference"] = c / c_ref if c and c_ref else None
            t = e["train_time_s"]
            if t is not None:
                be: dict[str, float | None] = {}
                for other in labels:
                    c_other = row[other]["cost_per_independent_s"]
                    if other == lab or c is None or c_other is None:
                        continue
                    be[other] = t / (c_other - c) if c_other > c else None
                s["break_even_independent"] = be
        row["pairwise_z"] = pair
        if len(labels) == 2:  # the two-way keys of earlier versions
            a, b = labels
            row["diff"], row["diff_error"], row["diff_sigma"] = _z(row[a], row[b])
            ca, cb = row[a]["cost_per_independent_s"], row[b]["cost_per_independent_s"]
            row["cost_ratio"] = ca / cb if ca and cb else None
            for lab, other in ((a, b), (b, a)):
                be = row[lab].get("break_even_independent")
                if be is not None and other in be:
                    row[f"break_even_independent_{lab}"] = be[other]
        obs[name] = row
    return {
        "labels": list(labels),
        "reference": ref,
        "ensembles": dict(zip(labels, ens)),
        "same_action": same,
        "observables": obs,
        "warnings": warnings,
    }
