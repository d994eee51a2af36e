r"""A scan in the quartic coupling: one ensemble per (L, λ), their analysis, the critical point and
the free energy — what ``flowmc scan`` runs.

:func:`run_scan` samples every point of a grid :math:`\lambda_1 < \dots < \lambda_K` at every
lattice size :math:`L` into its own directory, then :func:`summarize_scan` analyses the points
and writes the summary. Each size is sampled with

* a **flow conditioned on** :math:`\lambda` (``flowmc train --lam LO:HI``; one trained flow serves
  every point of its range) by flow Metropolis–Hastings, or by the hybrid chain with
  ``RunConfig(hmc_traj=K)``; a flow of one coupling serves only that coupling;
* or **local HMC** (no model), or the **cluster kernel** (no model, ``RunConfig(cluster=...)``:
  Metropolis sweeps + Wolff clusters, :mod:`flowmc.sampling.cluster`) at every size.

**The scan directory** is the scan's own. It holds ``manifest.json`` (the settings; a rerun with
other settings is refused), one ensemble per point ``L<L>_lam<λ>.h5`` (the usual format,
``docs/ensemble-format.md``), the flow's :math:`\log\hat Z` per point ``L<L>_lam<λ>.logz.json``,
and the results: ``summary.json``, ``summary.csv`` and the plots ``chi2.png``, ``binder.png``,
``xi2_over_L.png``, ``free_energy.png`` (:mod:`flowmc.report`). A directory holding anything
else (or a symbolic link) is refused; one scan at a time may write it (a lock on the manifest).
A file under a point's name is reused only if it is that point of this scan — lattice, action,
sampler and settings, flow, seed and the scan's ``id`` (:mod:`flowmc.io.identity`) — checked
before anything is sampled and before it is analysed.

**Resume.** Rerunning the same scan skips finished points, resumes an interrupted one
(:func:`flowmc.sampling.run.run_ensemble` with ``resume=True``, bit-identical to an uninterrupted
run), and reuses stored :math:`\log\hat Z`; a larger ``n`` extends every point. Point ``i`` of size
``L`` runs with the seed ``SeedSequence(seed, spawn_key=(L, i, 0))`` (:func:`point_seed`), so the
points are independent (no common random numbers), as the error propagation of the crossing
and of the integration assumes; its flow draws for :math:`\log\hat Z` use stream 1.

**Results** per point: every observable of :func:`flowmc.analysis.ensemble.analyze` with its
Γ-method error, τ_int, :math:`\xi_2/L`, acceptances, cost (sampling and warm-up seconds, seconds per
configuration and per independent :math:`\chi_2` sample); per size the free-energy density
(:mod:`flowmc.analysis.free_energy`: flow :math:`\log\hat Z` and thermodynamic integration); for
every pair of sizes the crossings of :math:`U_4` and :math:`\xi_2/L`
(:mod:`flowmc.analysis.crossing`). ``docs/scan.md`` documents the workflow, formulas and keys.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowmc import report
from flowmc._checks import check_int, is_int, is_real
from flowmc._version import flowmc_version
from flowmc.analysis.compare import ensemble_cost
from flowmc.analysis.crossing import METHODS, pairwise_crossings
from flowmc.analysis.ensemble import SCALAR_KEYS, analyze
from flowmc.analysis.free_energy import (
    RULES,
    Anchor,
    compare_free_energies,
    flow_free_energy,
    free_theory_anchor,
    thermodynamic_integration,
)
from flowmc.io.checkpoint import load_checkpoint, load_model
from flowmc.io.durable import NameLock
from flowmc.io.ensemble import file_sha256, open_ensemble
from flowmc.io.identity import TUNED, check_identity, ensemble_identity, first_difference
from flowmc.io.safeio import sniff
from flowmc.io.shipped import resolve_model_path
from flowmc.lattice.action import Phi4Action
from flowmc.mcmc.rng import RNG_SCHEME
from flowmc.sampling.run import RunConfig, run_ensemble

__all__ = [
    "ScanConfig",
    "ScanOptions",
    "run_scan",
    "summarize_scan",
    "parse_lams",
    "parse_models",
    "point_name",
    "point_seed",
    "MANIFEST",
    "SUMMARY_JSON",
    "SUMMARY_CSV",
    "TI_ANCHORS",
    "CROSSING_OBSERVABLES",
]

#: The scan directory's settings (written first; a resumed scan must match them).
MANIFEST = "manifest.json"
#: The scan's results: every point's observables, the crossings and the free energy.
SUMMARY_JSON = "summary.json"
#: The points of :data:`SUMMARY_JSON` as a CSV table, one row per (L, λ).
SUMMARY_CSV = "summary.csv"
_LOGZ_SUFFIX = ".logz.json"
#: Manifest ``format`` and its version.
FORMAT = "flowmc-scan"
VERSION = 1
#: Choices of :attr:`ScanOptions.ti_anchor`.
TI_ANCHORS = ("auto", "free", "flow", "none")
#: The curves whose crossings locate the critical coupling.
CROSSING_OBSERVABLES = ("binder", "xi2_over_L")
#: Significant digits of grid couplings (a linspace's 3.9250000000000003 becomes 3.925).
_DIGITS = 12


# ============================================================================ grid and names
def _round(x: float) -> float:
    return float(f"{float(x):.{_DIGITS}g}")


def parse_lams(spec: str | float | Sequence[float]) -> tuple[float, ...]:
    """The coupling grid of a scan.

    Args:
        spec: ``"LO:HI:N"`` (``N`` equally spaced points from ``LO`` to ``HI``, both included),
            ``"a,b,c"`` (a list), a number, or a sequence of numbers.

    Returns:
        Strictly increasing couplings >= 0, rounded to 12 significant digits.

    Raises:
        ValueError: on a malformed spec, ``N < 2``, ``LO >= HI``, negative, non-finite or
            repeated couplings (checked before the grid is computed: no numpy warning).

    Example:
        >>> parse_lams("3.8:4.8:5")
        (3.8, 4.05, 4.3, 4.55, 4.8)
    """
    want = "Expected --lam LO:HI:N (N points from LO to HI) or a list a,b,c"
    if is_real(spec):
        values = [float(spec)]
    elif isinstance(spec, str):
        text = spec.strip()
        parts = text.split(":")
        try:
            if len(parts) == 3:
                lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
            elif len(parts) == 1:
                values = [float(v) for v in text.split(",") if v.strip()]
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"{want}; got {spec!r}") from None
        if len(parts) == 3:
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"Expected finite couplings LO:HI:N; got {spec!r}")
            if n < 2 or not lo < hi:
                raise ValueError(f"{want} with N >= 2 and LO < HI; got {spec!r}")
            values = [float(v) for v in np.linspace(lo, hi, n)]
    else:
        try:
            values = [float(v) for v in spec]
        except (TypeError, ValueError):
            raise ValueError(f"{want}; got {spec!r}") from None
    if not values:
        raise ValueError(f"{want}; got {spec!r}")
    values = [_round(v) for v in values]
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"Expected finite couplings lam >= 0; got {values}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"Expected strictly increasing couplings; got {values}")
    return tuple(values)


def point_name(L: int, lam: float) -> str:
    """The stem of a point's files: ``L8_lam4.125`` (λ with up to 12 significant digits)."""
    return f"L{int(L)}_lam{_round(lam):.{_DIGITS}g}"


def point_seed(seed: int, L: int, index: int, stream: int = 0) -> int:
    """The seed of point ``index`` of size ``L``: ``SeedSequence(seed, spawn_key=(L, index,
    stream))`` as a 63-bit integer (stream 0: the Markov chains, 1: the flow's log Z draws)."""
    ss = np.random.SeedSequence(int(seed), spawn_key=(int(L), int(index), int(stream)))
    return int(ss.generate_state(1, dtype=np.uint64)[0]) & (2**63 - 1)


def parse_models(
    tokens: list[str] | None, sizes: list[int], flag: str, *, every: bool
) -> dict[int, str | None]:
    """Flows per size from ``--model``-style values: paths in the order of ``sizes``, or
    ``L=PATH`` items (comma-separated or not); ``hmc`` (any case) stands for no flow (local HMC).

    Args:
        tokens: the values (``None`` or empty: no flows).
        sizes: the lattice sizes, in the order the paths pair with.
        flag: the option's name, for messages.
        every: require an entry for every size (``L=PATH`` form).

    Returns:
        ``{L: path or None}``.

    Raises:
        ValueError: on a malformed item, an unknown or repeated size, mixed forms, a count that
            does not match ``sizes``, or (with ``every``) a size without an entry.

    Example:
        >>> parse_models(["8=a.pt,16=hmc"], [8, 16], "--model", every=True)
        {8: 'a.pt', 16: None}
    """
    if not tokens:
        return {}
    items: list[str] = []
    for t in tokens:
        items += [x for x in str(t).split(",") if x] if "=" in str(t) else [str(t)]
    keyed = ["=" in it for it in items]
    out: dict[int, str | None] = {}
    if all(keyed):
        for it in items:
            key, _, value = it.partition("=")
            try:
                L = int(key)
            except ValueError:
                raise ValueError(f"{flag}: expected L=PATH; got {it!r}") from None
            if L not in sizes:
                raise ValueError(f"{flag}: L={L} is not one of the sizes --L {sizes}")
            if L in out:
                raise ValueError(f"{flag}: L={L} given twice")
            if not value:
                raise ValueError(f"{flag}: expected L=PATH; got {it!r}")
            out[L] = None if value.lower() == "hmc" else value
        missing = [L for L in sizes if L not in out]
        if every and missing:
            raise ValueError(
                f"{flag} gives no flow for L = {missing} (give L=PATH for every --L, or L=hmc)"
            )
        return out
    if any(keyed):
        raise ValueError(f"{flag}: give either paths in the order of --L or L=PATH items, not both")
    if len(items) != len(sizes):
        raise ValueError(
            f"Expected one {flag} per --L ({len(sizes)}: {' '.join(map(str, sizes))}); got "
            f"{len(items)} (or give L=PATH items)"
        )
    return {L: (None if v.lower() == "hmc" else v) for L, v in zip(sizes, items)}


# ============================================================================ configuration
@dataclass(frozen=True)
class ScanConfig:
    """What to sample: sizes, couplings, samplers (these shape the ensembles; see the manifest).

    Attributes:
        sizes: lattice extents ``L`` (all directions), increasing, no repeats.
        lams: the coupling grid (:func:`parse_lams`).
        run: run settings of every point (``n``, ``chains``, ``thin``, ``therm``, ``seed`` —
            the master seed, see :func:`point_seed` —, ``batch``, ``hmc_traj`` for the hybrid,
            ``hmc``, ``start``; ``cluster`` for the cluster kernel at every size); ``adapt`` is
            not supported.
        models: ``{L: checkpoint}`` (a flow conditioned on λ covering the grid, or a flow of
            one coupling for a one-point grid); sizes without an entry, or with ``None``, are
            sampled by local HMC (by the cluster kernel with ``run.cluster``, which takes no
            models).
        m2: the bare mass squared (required unless a model gives it; must agree with them).
        dim: number of dimensions.
        anchor_models: ``{L: checkpoint}`` flows that give :math:`\\log\\hat Z` (and so a
            thermodynamic-integration anchor) for sizes sampled without a flow.
    """

    sizes: tuple[int, ...]
    lams: tuple[float, ...]
    run: RunConfig
    models: Mapping[int, str | os.PathLike[str] | None] = field(default_factory=dict)
    m2: float | None = None
    dim: int = 2
    anchor_models: Mapping[int, str | os.PathLike[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = tuple(int(s) for s in self.sizes)
        if not sizes or any(s < 2 for s in sizes) or len(set(sizes)) != len(sizes):
            raise ValueError(f"Expected distinct lattice sizes L >= 2; got {list(self.sizes)}")
        object.__setattr__(self, "sizes", tuple(sorted(sizes)))
        object.__setattr__(self, "lams", parse_lams(list(self.lams)))
        if not is_int(self.dim, minimum=1, strict=False):
            raise ValueError(f"Expected dim >= 1; got {self.dim!r}")
        if not isinstance(self.run, RunConfig):
            raise ValueError(f"Expected run to be a RunConfig; got {type(self.run).__name__}")
        if self.run.adapt is not None:
            raise ValueError("Expected run.adapt=None: a scan does not adapt its flows")
        if self.run.first_chain != 0:
            raise ValueError(f"Expected run.first_chain=0; got {self.run.first_chain}")
        if self.run.cluster is not None and any(v is not None for v in self.models.values()):
            raise ValueError(
                "Expected no models with run.cluster (the cluster kernel samples every size "
                f"without a flow); got models for L = {sorted(self.models)}"
            )
        for name, mapping in (("models", self.models), ("anchor_models", self.anchor_models)):
            extra = sorted(set(int(k) for k in mapping) - set(sizes))
            if extra:
                raise ValueError(
                    f"Expected {name} only for the scanned sizes {list(sizes)}; got L = {extra}"
                )
        if self.m2 is not None and not math.isfinite(float(self.m2)):
            raise ValueError(f"Expected a finite m2; got {self.m2!r}")

    def model_for(self, L: int) -> str | None:
        m = {int(k): v for k, v in self.models.items()}.get(int(L))
        return None if m is None else os.fspath(m)

    def anchor_model_for(self, L: int) -> str | None:
        m = {int(k): v for k, v in self.anchor_models.items()}.get(int(L))
        return None if m is None else os.fspath(m)


@dataclass(frozen=True)
class ScanOptions:
    """How to analyse a scan (may change between reruns; nothing here shapes an ensemble).

    Attributes:
        discard: rows per chain dropped at the start of every ensemble.
        S: Wolff's windowing parameter.
        logz_n: fresh flow draws for :math:`\\log\\hat Z` per flow point (0: none).
        logz_batch: draws per flow call.
        ti_anchor: thermodynamic integration from ``"free"`` (λ = 0, needs m² > 0), ``"flow"``
            (the flow point with the smallest error), ``"auto"`` (free if m² > 0, else flow) or
            ``"none"``.
        ti_rule: ``"trapezoid"`` or ``"quadratic"`` (:mod:`flowmc.analysis.free_energy`).
        crossing_method: ``"quadratic"`` or ``"linear"`` (:mod:`flowmc.analysis.crossing`).
        crossing_window: points of the quadratic interpolation.
        n_boot: bootstrap replicas of the crossing errors.
    """

    discard: int = 0
    S: float = 1.5
    logz_n: int = 10240
    logz_batch: int = 1024
    ti_anchor: str = "auto"
    ti_rule: str = "quadratic"
    crossing_method: str = "quadratic"
    crossing_window: int = 4
    n_boot: int = 2000

    def __post_init__(self) -> None:
        for name, minimum in (("discard", 0), ("logz_n", 0), ("logz_batch", 1), ("n_boot", 0),
                              ("crossing_window", 3)):  # fmt: skip
            check_int(name, getattr(self, name), minimum)
        if self.logz_n == 1:
            raise ValueError("Expected logz_n = 0 (off) or >= 2 draws; got 1")
        if not (math.isfinite(self.S) and self.S >= 0):
            raise ValueError(f"Expected S >= 0; got {self.S!r}")
        for name, choices in (("ti_anchor", TI_ANCHORS), ("ti_rule", RULES),
                              ("crossing_method", METHODS)):  # fmt: skip
            if getattr(self, name) not in choices:
                raise ValueError(f"Expected {name} in {choices}; got {getattr(self, name)!r}")


# ============================================================================ models and plan
@dataclass
class _Size:
    """One lattice size of the scan: its sampler and flows."""

    L: int
    shape: tuple[int, ...]
    sampler: str
    model: str | None = None
    model_record: dict | None = None
    anchor: str | None = None
    anchor_record: dict | None = None


def _model_record(path: str, L: int, lams: tuple[float, ...], dim: int, role: str) -> dict:
    """Inspect a checkpoint for size ``L``: lattice, m2, coupling coverage, provenance."""
    p = resolve_model_path(path)
    ckpt = load_checkpoint(p)
    flag = "--model" if role == "model" else "--anchor-model"
    shape = tuple(int(s) for s in ckpt["flow_config"]["lattice_shape"])
    want = (int(L),) * dim
    if shape != want:
        raise ValueError(
            f"{flag} {path} is a flow for lattice {shape}; the scan's L={L} needs {want}"
        )
    action = ckpt.get("action") or {}
    cond = (ckpt["flow_config"].get("condition") or {}).get("lam")
    meta = ckpt.get("meta") or {}
    rec = {
        "path": str(p),
        "sha256": file_sha256(p),
        "m2": float(action["m2"]),
        "lam_range": None if cond is None else [float(cond[0]), float(cond[1])],
        "lam": None if cond is not None else float(action["lam"]),
        "training_time_s": meta.get("training_time_total_s", meta.get("training_time_s")),
        "recipe": meta.get("recipe"),
    }
    if role == "model":
        if cond is None:
            if any(lam != rec["lam"] for lam in lams):
                raise ValueError(
                    f"{flag} {path} (L={L}) was trained at lam = {rec['lam']:g} only (it is not "
                    f"conditioned on lam) and cannot serve the scan points lam = "
                    f"{_span(lams)}; train a flow over a range (flowmc train --lam LO:HI)"
                )
        else:
            lo, hi = rec["lam_range"]
            out = [lam for lam in lams if not lo <= lam <= hi]
            if out:
                raise ValueError(
                    f"{flag} {path} (L={L}) is conditioned on lam over [{lo:g}, {hi:g}]; the "
                    f"scan points lam = {_span(out)} are outside it"
                )
    else:
        served = _served(rec, lams)
        if not served:
            where = (f"lam = {rec['lam']:g}" if cond is None
                     else f"[{rec['lam_range'][0]:g}, {rec['lam_range'][1]:g}]")  # fmt: skip
            raise ValueError(
                f"{flag} {path} (L={L}) serves {where}, which holds no scan point "
                f"({_span(lams)})"
            )
    return rec


def _served(rec: dict, lams: Sequence[float]) -> list[float]:
    """The scan couplings a flow record can evaluate."""
    if rec["lam_range"] is None:
        return [lam for lam in lams if lam == rec["lam"]]
    lo, hi = rec["lam_range"]
    return [lam for lam in lams if lo <= lam <= hi]


def _span(lams: Sequence[float]) -> str:
    lams = list(lams)
    if len(lams) <= 3:
        return ", ".join(f"{v:g}" for v in lams)
    return f"{lams[0]:g} .. {lams[-1]:g} ({len(lams)} points)"


def _plan(config: ScanConfig) -> tuple[list[_Size], float]:
    """Check every model against the scan; the sizes and the common m2."""
    sizes: list[_Size] = []
    m2s: dict[str, float] = {}
    for L in config.sizes:
        shape = (L,) * config.dim
        path = config.model_for(L)
        if path is None:
            size = _Size(L, shape, "hmc" if config.run.cluster is None else "cluster")
        else:
            rec = _model_record(path, L, config.lams, config.dim, "model")
            size = _Size(L, shape, "hybrid" if config.run.hmc_traj else "flow-imh", path, rec)
            m2s[f"--model {path}"] = rec["m2"]
        anchor = config.anchor_model_for(L)
        if anchor is not None:
            if path is not None:
                raise ValueError(
                    f"Expected --anchor-model only for sizes sampled by HMC; L={L} has the flow "
                    f"{path}, whose log Z is used"
                )
            size.anchor = anchor
            size.anchor_record = _model_record(anchor, L, config.lams, config.dim, "anchor")
            m2s[f"--anchor-model {anchor}"] = size.anchor_record["m2"]
        sizes.append(size)
    m2 = config.m2
    for who, value in m2s.items():
        if m2 is None:
            m2 = value
        elif value != float(m2):
            raise ValueError(
                f"Expected m2 = {float(m2):g} for every flow; {who} has m2 = {value:g}"
            )
    if m2 is None:
        raise ValueError("Expected m2 (--m2) for a scan without flows")
    m2 = float(m2)
    for lam in config.lams:  # e.g. lam = 0 needs m2 > 0
        Phi4Action(m2, lam, sizes[0].shape)
    return sizes, m2


def _check_options(options: ScanOptions, sizes: list[_Size], m2: float) -> None:
    """Fail before sampling on an analysis the scan cannot give."""
    if options.ti_anchor == "free" and m2 <= 0:
        raise ValueError(
            f"Expected m2 > 0 for the free-theory anchor (--ti-anchor free); got m2 = {m2:g}"
        )
    if options.ti_anchor == "flow":
        if not options.logz_n:
            raise ValueError("Expected --logz-n > 0 for a flow anchor (--ti-anchor flow); got 0")
        bare = [s.L for s in sizes if s.model is None and s.anchor is None]
        if bare:
            raise ValueError(
                f"Expected a flow for every size with --ti-anchor flow; L = {bare} has none "
                "(give --anchor-model L=PATH)"
            )


def _run_settings(run: RunConfig) -> dict:
    d = asdict(run)
    d.pop("chunk")  # commit granularity: does not shape the chains
    d.pop("adapt")
    d.pop("first_chain")
    return d


def _manifest(config: ScanConfig, sizes: list[_Size], m2: float, dtype: torch.dtype) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "sizes": list(config.sizes),
        "dim": int(config.dim),
        "m2": m2,
        "lams": list(config.lams),
        "samplers": {str(s.L): s.sampler for s in sizes},
        "models": {str(s.L): s.model_record for s in sizes},
        "anchor_models": {str(s.L): s.anchor_record for s in sizes if s.anchor_record},
        "run": _run_settings(config.run),
        "flow_dtype": str(dtype).replace("torch.", ""),
        "points": [
            {"L": s.L, "lam": lam, "name": point_name(s.L, lam),
             "seed": point_seed(config.run.seed, s.L, i)}
            for s in sizes for i, lam in enumerate(config.lams)
        ],  # fmt: skip
        "flowmc_version": flowmc_version(),
    }


#: Manifest entries that may differ between runs of one scan (``n`` may only grow; ``id`` is
#: drawn when the scan is created and kept by every rerun).
_FREE = ("flowmc_version", "created", "command_line", "updated", "id")


def _comparable(man: dict) -> dict:
    man = json.loads(json.dumps(report.to_jsonable(man)))  # the types a stored manifest has
    d = {k: v for k, v in man.items() if k not in _FREE and k != report.REPORT_KEY}
    d["run"] = {k: v for k, v in (d.get("run") or {}).items() if k != "n"}
    for key in ("models", "anchor_models"):  # a flow is identified by its content, not its path
        d[key] = {
            L: None if r is None else {k: v for k, v in r.items() if k not in ("path",)}
            for L, r in (d.get(key) or {}).items()
        }
    return d


def _first_difference(a: dict, b: dict) -> str | None:
    """``field: stored ..., given ...`` of the first setting that differs; the per-point table
    (names and seeds, which follow from the others) last, so that a changed ``--seed`` reads
    ``run.seed: stored 0, given 1``."""
    order = sorted(set(a) | set(b), key=lambda k: (k == "points", str(k)))
    diff = first_difference({k: a.get(k) for k in order}, {k: b.get(k) for k in order})
    return None if diff is None else f"{diff[0]}: stored {diff[1]!r}, given {diff[2]!r}"


# ============================================================================ the directory
def _expected_files(man: dict) -> dict[str, tuple[str, str | None]]:
    """name -> (what sniff must find, report kind) for every file a scan may hold."""
    files: dict[str, tuple[str, str | None]] = {
        MANIFEST: ("json-report", "scan-manifest"),
        SUMMARY_JSON: ("json-report", "scan"),
        SUMMARY_CSV: ("csv-report", "scan"),
    }
    for name, kind in report.SCAN_PLOTS.items():
        files[name] = ("png-report", kind)
    for p in man["points"]:
        files[p["name"] + ".h5"] = ("ensemble", None)
        files[p["name"] + _LOGZ_SUFFIX] = ("json-report", "scan-logz")
    return files


def _is_ours_hidden(entry: str, names: Mapping[str, Any]) -> bool:
    """The storage layer's lock files ``.<name>.lock`` and temporary files ``.<name>.tmp-PID``
    of the scan's own names."""
    if not entry.startswith("."):
        return False
    body = entry[1:]
    if body.endswith(".lock"):
        return body[: -len(".lock")] in names
    head, sep, pid = body.rpartition(".tmp-")
    return bool(sep) and pid.isdigit() and head in names


def _check_directory(out: Path, man: dict) -> dict | None:
    """Refuse a directory with foreign files or another scan's settings; the stored manifest."""
    if os.path.lexists(out) and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} is {sniff(out).what}; a scan writes a directory")
    if not out.exists():
        return None
    expected = _expected_files(man)
    entries = [e for e in sorted(os.listdir(out)) if not _is_ours_hidden(e, expected)]
    stored = None
    if MANIFEST in entries:
        info = sniff(out / MANIFEST)
        if info.kind != "json-report" or info.report != "scan-manifest":
            raise FileExistsError(
                f"refusing to use {str(out)!r} as a scan directory: its {MANIFEST} is {info.what}"
            )
        stored = _read_json(out / MANIFEST)
        diff = _first_difference(_comparable(stored), _comparable(man))
        if diff:
            raise ValueError(
                f"{str(out)!r} holds a scan with other settings ({diff}); rerun it with its "
                "own settings, or choose another --out"
            )
        if int(man["run"]["n"]) < int(stored["run"]["n"]):
            raise ValueError(
                f"{str(out)!r} holds a scan with n = {stored['run']['n']} per chain; --n may "
                f"only grow (got {man['run']['n']})"
            )
    elif entries:
        raise FileExistsError(
            f"refusing to write a scan into {str(out)!r}: it holds {len(entries)} entries (e.g. "
            f"{entries[0]!r}) but no scan manifest ({MANIFEST}); choose a new or empty directory"
        )
    for entry in entries:
        if (out / entry).is_symlink():
            raise FileExistsError(
                f"refusing to use the scan directory {str(out)!r}: {entry!r} is a symbolic "
                "link; a scan holds its own files (a link would make it read, or resume into, "
                "a file of another scan); move it away"
            )
        want = expected.get(entry)
        info = sniff(out / entry)
        if want is None or info.kind != want[0] or (want[1] is not None and info.report != want[1]):
            raise FileExistsError(
                f"refusing to use the scan directory {str(out)!r}: {entry!r} is {info.what}, "
                "not a file of this scan; move it away"
            )
    return stored


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# ============================================================================ identity of a point
def _point_identity(man: Mapping[str, Any], p: Mapping[str, Any]) -> dict:
    """What the ensemble of point ``p`` must be (:mod:`flowmc.io.identity`): its lattice,
    action, sampler with the scan's settings, flow, seed and this scan's point."""
    L, lam = int(p["L"]), float(p["lam"])
    shape = [L] * int(man["dim"])
    kind = man["samplers"][str(L)]
    run = man["run"]
    sampler: dict[str, Any] = {"name": kind, "chains": run["chains"], "first_chain": 0,
                               "thin": run["thin"], "therm": run["therm"], "rng": RNG_SCHEME}
    if kind in ("hmc", "hybrid"):
        h = dict(run["hmc"])
        sampler.update({k: h[k] for k in ("traj_length", "integrator", "target_accept",
                                          "warmup", "flip")}, fixed_step_size=h["step_size"])
    if kind in ("hmc", "cluster"):
        sampler.update(start=run["start"], dtype="float64")
    if kind == "cluster":
        c = dict(run["cluster"])
        sampler.update({k: c[k] for k in ("num_hits", "num_clusters", "target_accept",
                                          "warmup")}, fixed_step_size=c["step_size"])
    if kind in ("flow-imh", "hybrid"):
        batch = run["batch"] or (1024 if kind == "flow-imh" else 16)
        sampler.update(batch=batch, dtype=man["flow_dtype"], adapt=None)
    if kind == "hybrid":
        sampler.update(hmc_traj=run["hmc_traj"], chain_dtype="float64")
    model = man["models"].get(str(L))
    member = {"L": L, "lam": lam, "index": list(man["lams"]).index(lam)}
    if man.get("id"):
        member["id"] = man["id"]
    return {
        "lattice_shape": shape,
        "action": Phi4Action(float(man["m2"]), lam, tuple(shape)).params(),
        "sampler": sampler,
        "model_sha256": "" if model is None else model["sha256"],
        "seed": int(p["seed"]),
        "scan": member,
    }


def _check_point(out: Path, p: Mapping[str, Any], man: Mapping[str, Any]) -> int:
    """Refuse a point's ensemble that is not this scan's point (one line naming the file and
    the field); its committed rows per chain."""
    path = out / (p["name"] + ".h5")
    stored, n = ensemble_identity(path)
    check_identity(
        path, stored, _point_identity(man, p), who="this scan",
        hint=(f"it is not the ensemble of this scan's point L={p['L']} lam={p['lam']:g}; move "
              "it away (the scan then samples the point), or choose another --out"),
        partial=("sampler", "scan"), ignore=TUNED,
    )  # fmt: skip
    return n


def _logz_identity(doc: Mapping[str, Any]) -> dict:
    """The identity fields of a stored log Z (older files keep ``L``/``lam`` outside the key)."""
    key = dict(doc.get("key") or {})
    ident = {"L": key.get("L", doc.get("L")), "lam": key.get("lam", doc.get("lam"))}
    ident.update({k: key.get(k) for k in ("model_sha256", "seed", "dtype")})
    if key.get("scan"):
        ident["scan"] = key["scan"]
    return ident


def _check_logz(path: Path, doc: Mapping[str, Any], key: Mapping[str, Any]) -> None:
    """Refuse a stored log Z of another point, flow, seed or scan (its draws may differ: a
    rerun with other ``--logz-n`` recomputes it)."""
    want = _logz_identity({"key": key})
    if not _logz_identity(doc).get("scan"):
        want.pop("scan", None)
    check_identity(path, _logz_identity(doc), want, who="this scan",
                   hint="it is not this scan's log Z of the point; move it away")  # fmt: skip


# ============================================================================ running
def _log(progress: bool) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    return log


def _point_run(size: _Size, config: ScanConfig, index: int) -> RunConfig:
    seed = point_seed(config.run.seed, size.L, index)
    hmc_traj = config.run.hmc_traj if size.sampler == "hybrid" else 0
    return replace(config.run, seed=seed, hmc_traj=hmc_traj)


def _logz_key(rec: dict, n: int, batch: int, seed: int, dtype: torch.dtype | str, L: int,
              lam: float, scan_id: str | None) -> dict:  # fmt: skip
    return {"L": int(L), "lam": float(lam), "model_sha256": rec["sha256"], "seed": int(seed),
            "dtype": str(dtype).replace("torch.", ""), "scan": scan_id, "n": int(n),
            "batch": int(batch)}  # fmt: skip


def _ensure_logz(
    out: Path, size: _Size, lam: float, index: int, rec: dict, path: str, config: ScanConfig,
    options: ScanOptions, device: torch.device, dtype: torch.dtype, log: Callable[[str], None],
    scan_id: str | None,
) -> None:  # fmt: skip
    """Compute (or reuse) the flow's log Z at one point, stored as ``<point>.logz.json``."""
    target = out / (point_name(size.L, lam) + _LOGZ_SUFFIX)
    seed = point_seed(config.run.seed, size.L, index, stream=1)
    key = _logz_key(rec, options.logz_n, options.logz_batch, seed, dtype, size.L, lam, scan_id)
    if target.exists():
        try:
            old = _read_json(target)
        except (OSError, ValueError):
            old = {}
        if old:
            _check_logz(target, old, key)  # this point's (else refused); same draws: reused
            if all((old.get("key") or {}).get(k) == key[k] for k in ("n", "batch")):
                return
    model = load_model(path, device=device, dtype=dtype, lam=lam)
    gen = torch.Generator(device=device).manual_seed(seed)
    res = flow_free_energy(model.proposal, model.action, options.logz_n,
                           batch_size=options.logz_batch, generator=gen)  # fmt: skip
    log(f"scan L={size.L} lam={lam:g}: flow log Z = {res['log_z']:.6g} +- "
        f"{res['log_z_err']:.2g} ({options.logz_n} draws, {res['seconds']:.1f} s)")  # fmt: skip
    report.write_json(target, {"L": size.L, "lam": lam, "volume": model.action.volume,
                               "key": key, "result": res}, "scan-logz")  # fmt: skip


def run_scan(
    out: str | os.PathLike[str],
    config: ScanConfig,
    options: ScanOptions | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = True,
    plots: bool = True,
    command_line: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict:
    """Sample (or resume) every point of a scan into ``out``, then summarise it.

    Args:
        out: the scan directory (created; see the module docstring for what it may hold).
        config: what to sample.
        options: how to analyse (default :class:`ScanOptions`).
        device: torch device of the samplers and flows.
        dtype: dtype of the flows (default float32); HMC chains run in float64.
        progress: progress lines and bars on stderr.
        plots: write the PNG plots.
        command_line: recorded in the manifest and every ensemble.
        meta: extra metadata stored in every new ensemble (e.g. the CLI's resolved options).

    Returns:
        The summary (:func:`summarize_scan`), also written to ``out/summary.json``.

    Raises:
        ValueError: on settings that do not fit (a model for another lattice, m², or coupling;
            a directory holding a scan with other settings), in one line.
        FileExistsError: if ``out`` holds foreign files or is not a directory.
        BlockingIOError: if another process writes the scan.
    """
    out = Path(out)
    options = options or ScanOptions()
    device = torch.device(device)
    fdtype = dtype or torch.float32
    log = _log(progress)
    sizes, m2 = _plan(config)
    _check_options(options, sizes, m2)
    man = _manifest(config, sizes, m2, fdtype)
    stored = _check_directory(out, man)
    out.mkdir(parents=True, exist_ok=True)
    lock = NameLock(out / MANIFEST).acquire()
    try:
        stored = _check_directory(out, man)  # again, under the lock
        man["id"] = stored.get("id") if stored is not None else uuid.uuid4().hex
        for p in man["points"]:  # every file to be reused, before anything is sampled
            if (out / (p["name"] + ".h5")).exists():
                _check_point(out, p, man)
        man["created"] = (stored or {}).get("created") or time.strftime("%Y-%m-%d %H:%M:%S")
        man["command_line"] = command_line
        report.write_json(out / MANIFEST, man, "scan-manifest")
        total = len(sizes) * len(config.lams)
        k = 0
        for size in sizes:
            for i, lam in enumerate(config.lams):
                k += 1
                _sample_point(out, size, lam, i, config, m2, device, fdtype, progress, log,
                              f"({k}/{total})", command_line, meta, man["id"])  # fmt: skip
                if size.model is not None and options.logz_n:
                    _ensure_logz(out, size, lam, i, size.model_record, size.model, config,
                                 options, device, fdtype, log, man["id"])  # fmt: skip
            if size.anchor is not None and options.logz_n:
                for i, lam in enumerate(config.lams):
                    if lam in _served(size.anchor_record, config.lams):
                        _ensure_logz(out, size, lam, i, size.anchor_record, size.anchor, config,
                                     options, device, fdtype, log, man["id"])  # fmt: skip
        return summarize_scan(out, options, plots=plots)
    finally:
        lock.release()


def _sample_point(
    out: Path, size: _Size, lam: float, index: int, config: ScanConfig, m2: float,
    device: torch.device, dtype: torch.dtype, progress: bool, log: Callable[[str], None],
    counter: str, command_line: str | None, meta: Mapping[str, Any] | None, scan_id: str | None,
) -> None:  # fmt: skip
    path = out / (point_name(size.L, lam) + ".h5")
    cfg = _point_run(size, config, index)
    resume = path.exists()
    if resume:
        with open_ensemble(path) as ens:
            have = ens.n
        if have >= cfg.n:
            log(f"scan L={size.L} lam={lam:g} {counter}: done ({have} rows per chain), skipped")
            return
        log(f"scan L={size.L} lam={lam:g} {counter}: resuming {path.name} at {have} -> {cfg.n}")
    else:
        log(f"scan L={size.L} lam={lam:g} {counter}: {size.sampler} -> {path.name}")
    kw: dict[str, Any] = {}
    if size.model is not None:
        kw["model"] = load_model(size.model, device=device, dtype=dtype, lam=lam)
    else:
        kw["action"] = Phi4Action(m2, lam, size.shape)
    run_ensemble(
        path, cfg, device=device, resume=resume, progress=progress, command_line=command_line,
        meta={"scan": {"directory": str(out), "L": size.L, "lam": lam, "index": index,
                       "id": scan_id}, **(meta or {})},
        **kw,
    )  # fmt: skip


# ============================================================================ summary
def _entry(e: Mapping[str, Any] | None) -> dict | None:
    if e is None:
        return None
    return {k: e[k] for k in ("value", "error", "tau_int", "tau_int_error", "ess", "reliable")}


def _analyse_point(out: Path, p: dict, man: dict, options: ScanOptions) -> dict:
    L, lam, name = int(p["L"]), float(p["lam"]), p["name"]
    path = out / (name + ".h5")
    sampler = man["samplers"][str(L)]
    rec: dict[str, Any] = {"L": L, "lam": lam, "file": path.name, "sampler": sampler,
                           "seed": p["seed"], "n_target": int(man["run"]["n"]), "n": 0,
                           "complete": False, "observables": {}, "warnings": []}  # fmt: skip
    if not path.exists():
        rec["warnings"].append("not sampled yet")
        return rec
    _check_point(out, p, man)  # never analyse a foreign file as the point
    t0 = time.perf_counter()
    try:
        res = analyze(path, discard=options.discard, S=options.S)
    except ValueError as exc:  # too few rows
        with open_ensemble(path) as ens:
            rec["n"] = ens.n
        rec["warnings"].append(f"not analysed: {exc}")
        return rec
    d = res.to_dict()
    obs = {k: _entry(d.get(k)) for k in SCALAR_KEYS if k in d}
    xi = obs.get("xi2")
    if xi is not None:
        obs["xi2_over_L"] = {**xi, "value": xi["value"] / L, "error": xi["error"] / L}
    cost = ensemble_cost(path)
    per = cost["cost_per_config_s"]
    chi2 = obs.get("chi2")
    rec.update(
        n=res.n_total,
        chains=res.chains,
        complete=res.n_total >= rec["n_target"],
        observables=obs,
        acceptance=d.get("acceptance"),
        acceptance_by_kernel=d.get("acceptance_by_kernel") or {},
        cost={
            "sampling_s": cost["wall_time_s"],
            "warmup_s": cost["warmup_time_s"],
            "s_per_config": per,
            "s_per_independent_chi2": (
                None if per is None or chi2 is None else 2.0 * chi2["tau_int"] * per
            ),
            "analysis_s": time.perf_counter() - t0,
        },
        warnings=list(d.get("warnings") or []),
    )
    if not rec["complete"]:
        rec["warnings"].insert(0, f"incomplete: {res.n_total} of {rec['n_target']} rows per chain")
    return rec


def _flow_logz(out: Path, p: dict, man: dict) -> dict | None:
    path = out / (p["name"] + _LOGZ_SUFFIX)
    if not path.exists():
        return None
    info = sniff(path)
    if info.kind != "json-report" or info.report != "scan-logz":
        return None
    doc = _read_json(path)
    L = int(p["L"])
    rec = man["models"].get(str(L)) or (man.get("anchor_models") or {}).get(str(L))
    if rec is None:
        raise ValueError(f"{path}: a flow's log Z, but no flow of this scan serves L={L}; move "
                         "it away")  # fmt: skip
    index = list(man["lams"]).index(float(p["lam"]))
    key = _logz_key(rec, 0, 0, point_seed(man["run"]["seed"], L, index, stream=1),
                    man["flow_dtype"], L, p["lam"], man.get("id"))  # fmt: skip
    _check_logz(path, doc, key)
    return doc.get("result")


def _free_energy(size_L: int, points: list[dict], man: dict, options: ScanOptions) -> dict:
    """TI and flow free energies of one size (fills each point's ``free_energy``)."""
    m2 = float(man["m2"])
    shape = (size_L,) * int(man["dim"])
    flow = {pt["lam"]: (pt["free_energy"]["flow"]["f"], pt["free_energy"]["flow"]["error"])
            for pt in points if pt["free_energy"].get("flow")}  # fmt: skip
    out: dict[str, Any] = {"anchor": None, "rule": options.ti_rule, "note": ""}
    choice = options.ti_anchor
    if choice == "auto":
        choice = "free" if m2 > 0 else ("flow" if flow else "none")
        if choice == "none":
            out["note"] = (
                "thermodynamic integration not computed: m2 <= 0 and no flow log Z to anchor it "
                "(sample with a flow, or give an anchor model)"
            )
            return out
    if choice == "none":
        out["note"] = "thermodynamic integration not requested"
        return out
    phi4 = [pt["observables"].get("phi4") for pt in points]
    if any(e is None for e in phi4):
        missing = [pt["lam"] for pt, e in zip(points, phi4) if e is None]
        out["note"] = (
            f"thermodynamic integration not computed: no phi4 at lam = {_span(missing)} "
            "(points not analysed, or ensembles without configurations)"
        )
        return out
    if choice == "free":
        if m2 <= 0:
            raise ValueError(f"Expected m2 > 0 for the free-theory anchor; got m2 = {m2:g}")
        anchor = free_theory_anchor(m2, shape)
    else:
        if not flow:
            raise ValueError(f"Expected a flow log Z at L={size_L} for ti_anchor='flow'; none")
        lam_a = min(flow, key=lambda k: (flow[k][1], k))
        anchor = Anchor(lam_a, flow[lam_a][0], flow[lam_a][1], "flow")
    lams = [pt["lam"] for pt in points]
    ti = thermodynamic_integration(lams, [e["value"] for e in phi4], [e["error"] for e in phi4],
                                   anchor, rule=options.ti_rule)  # fmt: skip
    rows = compare_free_energies(ti, flow)
    for pt, row in zip(points, rows):
        pt["free_energy"]["ti"] = {"f": row["f_ti"], "error": row["f_ti_err"], "disc": row["disc"]}
        pt["free_energy"]["z_ti_vs_flow"] = row["z"]
    zs = [r["z"] for r in rows if r["z"] is not None]
    out.update(anchor=dict(anchor._asdict()), note=ti.note,
               max_abs_z=max((abs(z) for z in zs), default=None), n_compared=len(zs))  # fmt: skip
    return out


def summarize_scan(
    out: str | os.PathLike[str], options: ScanOptions | None = None, *, plots: bool = True
) -> dict:
    """Analyse every point of a scan directory and write ``summary.json``, ``summary.csv`` and
    (with ``plots``) the PNG plots; points not sampled yet are listed as such.

    Returns:
        The summary: ``directory``, ``complete``, ``settings`` (the manifest), ``options``,
        ``points`` (one dict per (L, λ)), ``free_energy`` (per L), ``crossings``, ``cost``,
        ``warnings`` (keys in ``docs/scan.md``).

    Raises:
        ValueError: if ``out`` holds no scan manifest.
    """
    out = Path(out)
    options = options or ScanOptions()
    info = sniff(out / MANIFEST)
    if info.kind != "json-report" or info.report != "scan-manifest":
        raise ValueError(f"Expected a scan directory with {MANIFEST}; {str(out)!r} has none")
    man = _read_json(out / MANIFEST)
    points = []
    for p in man["points"]:
        rec = _analyse_point(out, p, man, options)
        rec["free_energy"] = {"flow": _flow_logz(out, p, man), "ti": None, "z_ti_vs_flow": None}
        points.append(rec)
    warnings: list[str] = []
    free: dict[str, Any] = {}
    for L in man["sizes"]:
        pts = [pt for pt in points if pt["L"] == L]
        if all(pt["observables"] for pt in pts):
            free[str(L)] = _free_energy(L, pts, man, options)
        else:
            free[str(L)] = {"anchor": None, "rule": options.ti_rule,
                            "note": "not computed: points missing"}  # fmt: skip
    crossings = []
    if len(man["sizes"]) >= 2:
        for name in CROSSING_OBSERVABLES:
            curves = {}
            for L in man["sizes"]:
                pts = [pt for pt in points if pt["L"] == L]
                ent = [pt["observables"].get(name) for pt in pts]
                curves[L] = ([pt["lam"] for pt in pts],
                             [None if e is None else e["value"] for e in ent],
                             [None if e is None else e["error"] for e in ent])  # fmt: skip
            crossings += [c.to_dict() for c in pairwise_crossings(
                curves, observable=name, method=options.crossing_method,
                window=options.crossing_window, n_boot=options.n_boot, seed=0)]  # fmt: skip
    for pt in points:
        for w in pt["warnings"]:
            warnings.append(f"L={pt['L']} lam={pt['lam']:g}: {w}")
    for c in crossings:
        if c["note"]:
            warnings.append(f"crossing {c['observable']} L={c['sizes'][0]}/{c['sizes'][1]}: "
                            f"{c['note']}")  # fmt: skip

    def total(key: str) -> float:
        return float(sum((pt.get("cost") or {}).get(key) or 0.0 for pt in points))

    logz_s = sum((pt["free_energy"]["flow"] or {}).get("seconds", 0.0) for pt in points)
    summary = {
        "directory": str(out),
        "complete": all(pt["complete"] for pt in points),
        "settings": {k: v for k, v in man.items() if k != report.REPORT_KEY},
        "options": asdict(options),
        "points": points,
        "free_energy": free,
        "crossings": crossings,
        "cost": {
            "training_s": {L: (r or {}).get("training_time_s") for L, r in man["models"].items()},
            "sampling_s": total("sampling_s"),
            "warmup_s": total("warmup_s"),
            "logz_s": float(logz_s),
            "analysis_s": total("analysis_s"),
        },
        "warnings": warnings,
        "flowmc_version": flowmc_version(),
    }
    report.write_json(out / SUMMARY_JSON, summary, "scan")
    report.write_csv(out / SUMMARY_CSV, *_csv(points), "scan")
    if plots:
        report.scan_plots(summary, out)
    return summary


def _csv(points: list[dict]) -> tuple[list[str], list[dict]]:
    keys = [*SCALAR_KEYS, "xi2_over_L"]
    cols = ["L", "lam", "sampler", "n", "chains", "complete"]
    for k in keys:
        cols += [k, f"{k}_err", f"{k}_tau_int"]
    cols += ["acceptance", "flow_acceptance", "hmc_acceptance", "sampling_s", "warmup_s",
             "s_per_config", "s_per_independent_chi2", "f_flow", "f_flow_err", "f_ti",
             "f_ti_err", "f_ti_disc", "z_ti_vs_flow"]  # fmt: skip
    rows = []
    for pt in points:
        row: dict[str, Any] = {c: pt.get(c) for c in ("L", "lam", "sampler", "n", "chains",
                                                       "complete", "acceptance")}  # fmt: skip
        for k in keys:
            e = pt["observables"].get(k)
            if e is not None:
                row.update({k: e["value"], f"{k}_err": e["error"], f"{k}_tau_int": e["tau_int"]})
        kern = pt.get("acceptance_by_kernel") or {}
        row.update(flow_acceptance=kern.get("flow"), hmc_acceptance=kern.get("hmc"))
        row.update({k: v for k, v in (pt.get("cost") or {}).items() if k in cols})
        fe = pt["free_energy"]
        if fe["flow"]:
            row.update(f_flow=fe["flow"]["f"], f_flow_err=fe["flow"]["error"])
        if fe["ti"]:
            row.update(f_ti=fe["ti"]["f"], f_ti_err=fe["ti"]["error"], f_ti_disc=fe["ti"]["disc"])
        row["z_ti_vs_flow"] = fe["z_ti_vs_flow"]
        rows.append(row)
    return cols, rows
