#!/usr/bin/env python
r"""Issue 11's benchmark: tuned HMC, flow MH and the hybrid flow + HMC chain, in one process.

For every point (default: crit16 = (16, -4, 4.25), L8 = (8, -4, 8), E2 = (8, -4, 6.008),
E5 = (14, -4, 5.113) and broken16 = (16, -4, 3), the broken phase) and a trained flow per point
(``--model POINT=PATH``), the script runs, in this process, with the same torch threads and the
same number of configurations (``--n`` rows x ``--chains`` chains) for every method:

1. **HMC, tuned for real**: one run per trajectory length in ``--hmc-lengths`` (each with its
   step size tuned by dual averaging in its own warm-up); the length with the lowest cost per
   independent chi_2 sample is *the* HMC reference (all lengths are reported). At broken-phase
   points HMC runs without the Z2 flip (its sign changes are reported) and the best length is
   run once more *with* ``--flip`` as the reference for <m>.
2. **flow MH** (K = 0) and the **hybrid** for every K >= 1 in ``--hybrid-k`` (one flow
   proposal then K HMC trajectories per cycle; B = ``--hybrid-batch`` cycles per flow call; the
   HMC part uses the best HMC length unless ``--hybrid-traj-length`` is given, and tunes its own
   step size); the best K >= 1 by cost per independent chi_2 sample is *the* hybrid.

Per method: sampling wall time (the ensemble's chunk wall times, as ``flowmc compare``), CPU time
(``time.process_time`` of the whole run call: warm-up + sampling + writing), warm-up time, the
flow's training time (checkpoint meta), configurations, the acceptance of each kernel, tau_int
(1/2 + sum rho) of chi_2 and |m| with errors, the cost per independent sample
``wall * 2 tau_int / N`` (sampling only; + training beside it), <m>, the sign changes of M per
chain per 100 configurations, the analysis' ``reliable`` flags, and the load average before and
after. Ensembles are kept in ``--out-dir/<point>/`` so ``flowmc compare`` can be run on them.
The JSON (``--json``, default ``<out-dir>/bench_hybrid.json``, rewritten after every point) ends
with the verdicts of issue 11: hybrid/HMC cost ratio of chi_2 (<= 0.25 at crit16, <= 1.25 at
L8, E2, E5) with its error, and at broken-phase points <m> = 0 within ``--z`` errors and at
least one sign change of M per 100 configurations in every chain.

Examples:
    python scripts/bench_hybrid.py --quick --out-dir /tmp/bh      # smoke test, < 60 s
    python scripts/bench_hybrid.py --threads 1 --chains 4 --n 20000 --out-dir results/bench_hybrid \
        --model crit16=m/crit16.pt --model L8=data/phi4_L8_m2-4_lam8.pt --model E2=m/E2.pt \
        --model E5=m/E5.pt --model broken16=m/broken16.pt
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowmc.analysis.compare import ensemble_cost
from flowmc.analysis.ensemble import analyze
from flowmc.io.checkpoint import LoadedModel, load_model, machine_info
from flowmc.io.ensemble import check_output, file_sha256
from flowmc.io.identity import check_checkpoint
from flowmc.lattice.action import Phi4Action
from flowmc.report import check_outputs, fmt, write_json
from flowmc.sampling.run import HMCSettings, RunConfig, run_ensemble

REPORT_KIND = "bench-hybrid"
#: Observables whose cost per independent sample is reported (chi_2 decides the verdicts).
COST_OBS = ("chi2", "abs_m")
#: Observables whose value is reported.
VALUE_OBS = ("chi2", "abs_m", "m")
#: Force evaluations per integration step.
FORCES_PER_STEP = {"omelyan": 2, "leapfrog": 1}


@dataclass(frozen=True)
class Point:
    """A benchmark point: the action ``(L, m2, lam)`` on an ``L x L`` lattice and its verdict.

    Attributes:
        name: label (``--points``, ``--model NAME=PATH``).
        L, m2, lam: the phi^4 action.
        target: largest acceptable hybrid/HMC cost ratio of chi_2, or ``None`` (no cost target).
        broken: a broken-phase point (verdict: <m> = 0 and sign changes of M).
    """

    name: str
    L: int
    m2: float
    lam: float
    target: float | None = 1.25
    broken: bool = False

    def action(self) -> Phi4Action:
        return Phi4Action(self.m2, self.lam, (self.L, self.L))


POINTS = {
    p.name: p
    for p in (
        Point("crit16", 16, -4.0, 4.25, 0.25),
        Point("L8", 8, -4.0, 8.0, 1.25),
        Point("E2", 8, -4.0, 6.008, 1.25),
        Point("E5", 14, -4.0, 5.113, 1.25),
        Point("broken16", 16, -4.0, 3.0, None, broken=True),
    )
}
QUICK_POINTS = {
    p.name: p
    for p in (Point("q-sym", 4, -4.0, 8.0, 1.25), Point("q-broken", 4, -4.0, 3.0, None, True))
}
#: ``--quick``: a tiny lattice, a 2-layer flow trained 40 steps, few rows (numbers mean nothing).
QUICK = {"n": 100, "chains": 4, "hmc_lengths": "0.5,1", "hybrid_k": "0,1,2", "hmc_warmup": 30,
         "hybrid_batch": 8, "train_steps": 40}  # fmt: skip
QUICK_FLOW = {"n_layers": 2, "hidden": (8,)}
QUICK_TRAIN = {"batch_size": 64}


# ============================================================================ arguments
def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{what}: expected comma-separated numbers; got {text!r}"
        ) from None
    if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"{what}: expected numbers > 0; got {text!r}")
    return vals


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{what}: expected comma-separated integers; got {text!r}"
        ) from None
    if not vals or min(vals) < 0 or len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"{what}: expected distinct integers >= 0; got {text!r}")
    return vals


def parse_point(text: str) -> Point:
    """``NAME=L,M2,LAM[,TARGET|broken]`` (``--point``); the default target is 1.25."""
    name, sep, rest = text.partition("=")
    parts = [s.strip() for s in rest.split(",")]
    bad = f"--point: expected NAME=L,M2,LAM[,TARGET|broken]; got {text!r}"
    if not sep or not name.strip() or len(parts) not in (3, 4):
        raise ValueError(bad)
    try:
        L, m2, lam = int(parts[0]), float(parts[1]), float(parts[2])
        target: float | None = 1.25
        broken = False
        if len(parts) == 4:
            if parts[3] == "broken":
                target, broken = None, True
            else:
                target = float(parts[3])
    except ValueError:
        raise ValueError(bad) from None
    if L < 2 or L % 2 or lam < 0 or (target is not None and not target > 0):
        raise ValueError(f"{bad} (L even >= 2, LAM >= 0, TARGET > 0)")
    return Point(name.strip(), L, m2, lam, target, broken)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--points", default=None,
                   help=f"comma-separated points (default {','.join(POINTS)}; --quick: "
                   f"{','.join(QUICK_POINTS)})")
    p.add_argument("--point", action="append", default=[], metavar="NAME=L,M2,LAM[,TARGET|broken]",
                   help="define (or redefine) a point; repeatable")
    p.add_argument("--model", action="append", default=[], metavar="POINT=PATH",
                   help="the trained flow of a point (checkpoint path or shipped name); repeatable")
    p.add_argument("--train-steps", type=int, default=None,
                   help="train a flow (recipe --recipe) for points without --model, saved in "
                   "<out-dir>/models/ (default: every point needs --model)")
    p.add_argument("--recipe", default="default", help="training recipe with --train-steps")
    p.add_argument("--n", type=int, default=5000,
                   help="recorded rows per chain, the same for every method (default 5000)")
    p.add_argument("--seconds", type=float, default=None,
                   help="instead of a fixed --n: sample each method until its sampling wall time "
                   "reaches SECONDS (--n is the first try); all methods are then analysed on the "
                   "same number of rows, the smallest, the extra first rows discarded")
    p.add_argument("--max-n", type=int, default=None,
                   help="with a fixed --n: while a tau_int (chi2, |m|) is unreliable, double the "
                   "rows of every method of the point (resume), as long as 2n <= MAX_N")
    p.add_argument("--chains", type=int, default=4, help="chains per method (default 4)")
    p.add_argument("--discard-frac", type=float, default=0.05,
                   help="fraction of the analysed rows discarded at the start (default 0.05)")
    p.add_argument("--hmc-lengths", default="0.5,1,2,4",
                   help="HMC trajectory lengths scanned (default 0.5,1,2,4)")
    p.add_argument("--hmc-warmup", type=int, default=200,
                   help="warm-up (step-size tuning) trajectories per chain (default 200)")
    p.add_argument("--integrator", choices=sorted(FORCES_PER_STEP), default="omelyan")
    p.add_argument("--target-accept", type=float, default=0.8)
    p.add_argument("--hmc-flip", action="store_true",
                   help="the HMC scan uses the exact Z2 flip (default: plain HMC; broken-phase "
                   "points always get an extra flip run at the best length)")
    p.add_argument("--hybrid-k", default="0,1,2,4,8",
                   help="HMC trajectories per cycle scanned; 0 = flow MH (default 0,1,2,4,8)")
    p.add_argument("--hybrid-batch", type=int, default=16,
                   help="hybrid: cycles per flow call B (default 16)")
    p.add_argument("--flow-batch", type=int, default=1024,
                   help="flow MH: MH steps per flow call (default 1024)")
    p.add_argument("--hybrid-traj-length", default="best",
                   help="trajectory length of the hybrid's HMC part: 'best' (the best HMC "
                   "length of the point, default) or a number")
    p.add_argument("--chunk", type=int, default=1024,
                   help="rows per chain per commit, every method (default 1024)")
    p.add_argument("--z", type=float, default=2.576,
                   help="broken phase: |<m>| / error below this is 'zero within errors' "
                   "(default 2.576, two-sided 1%%)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("results/bench_hybrid"))
    p.add_argument("--json", type=Path, default=None,
                   help="JSON report (default <out-dir>/bench_hybrid.json)")
    p.add_argument("--force", action="store_true", help="replace existing ensembles/flows")
    p.add_argument("--quick", action="store_true",
                   help="smoke test (< 60 s): L = 4, tiny flows trained in-process, few rows")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    explicit = {a.split("=")[0].lstrip("-").replace("-", "_") for a in given
                if a.startswith("--")}  # fmt: skip
    if args.quick:
        for k, v in QUICK.items():
            if k not in explicit:
                setattr(args, k, v)
    try:
        _finish_args(args)
    except (ValueError, argparse.ArgumentTypeError) as e:
        p.error(str(e))
    return args


def _finish_args(args: argparse.Namespace) -> None:
    table = dict(QUICK_POINTS if args.quick else POINTS)
    for spec in args.point:
        pt = parse_point(spec)
        table[pt.name] = pt
    default = ",".join(QUICK_POINTS if args.quick else POINTS)
    names = [s.strip() for s in (args.points or default).split(",") if s.strip()]
    unknown = [s for s in names if s not in table]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"--points: expected distinct names from {sorted(table)}; got {names}")
    args.point_list = [table[s] for s in names]
    args.models = {}
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise ValueError(f"--model: expected POINT=PATH; got {spec!r}")
        if name not in names:
            raise ValueError(f"--model: expected a point of --points {names}; got {name!r}")
        args.models[name] = path
    missing = [s for s in names if s not in args.models]
    if missing and args.train_steps is None and not args.quick:
        raise ValueError(f"--model: no flow for point(s) {missing}; give --model POINT=PATH "
                         "(or --train-steps N to train one)")  # fmt: skip
    for name in ("n", "chains", "hmc_warmup", "hybrid_batch", "flow_batch", "chunk", "threads"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 1; got {value}")
    if args.train_steps is not None and args.train_steps < 1:
        raise ValueError(f"--train-steps: expected >= 1; got {args.train_steps}")
    if args.seconds is not None and not (math.isfinite(args.seconds) and args.seconds > 0):
        raise ValueError(f"--seconds: expected > 0; got {args.seconds}")
    if args.seconds is not None and args.max_n is not None:
        raise ValueError("--max-n works with a fixed --n, not with --seconds")
    if args.max_n is not None and args.max_n < args.n:
        raise ValueError(f"--max-n: expected >= --n ({args.n}); got {args.max_n}")
    if not 0 <= args.discard_frac < 1:
        raise ValueError(f"--discard-frac: expected in [0, 1); got {args.discard_frac}")
    if not args.z > 0:
        raise ValueError(f"--z: expected > 0; got {args.z}")
    args.hmc_lengths = _floats(str(args.hmc_lengths), "--hmc-lengths")
    args.hybrid_k = _ints(str(args.hybrid_k), "--hybrid-k")
    if args.hybrid_traj_length != "best":
        args.hybrid_traj_length = _floats(str(args.hybrid_traj_length), "--hybrid-traj-length")[0]
    args.json = args.json or args.out_dir / "bench_hybrid.json"


# ============================================================================ statistics
def cost_entry(est: Any, cost_per_config: float, train_cost_per_config: float | None) -> dict:
    """One observable of one method: value, tau_int and the cost per independent sample.

    ``cost = 2 tau_int * cost_per_config`` (= sampling wall time / ESS), its error from
    ``tau_int_error`` (the wall time is measured, not estimated).
    """
    tau, dtau = float(est.tau_int), float(est.tau_int_error)
    cost = 2.0 * tau * cost_per_config
    out = {
        "value": float(est.value), "error": float(est.error), "tau_int": tau,
        "tau_int_error": dtau, "ess": float(est.ess), "reliable": bool(est.reliable),
        "cost_per_independent_s": cost,
        "cost_per_independent_error_s": 2.0 * dtau * cost_per_config,
        "cost_per_independent_with_training_s": None,
    }  # fmt: skip
    if train_cost_per_config is not None:
        out["cost_per_independent_with_training_s"] = (
            2.0 * tau * (cost_per_config + train_cost_per_config)
        )
    return out


def pick_best(records: list[dict], obs: str = "chi2") -> dict | None:
    """The record with the lowest cost per independent ``obs`` sample.

    Records whose tau_int of ``obs`` is reliable are preferred (an unreliable tau_int is
    usually underestimated, which would make a method look cheaper than it is); if none is
    reliable, the cheapest of all. ``None`` if no record has a finite cost.
    """
    finite = [r for r in records
              if math.isfinite(r["observables"].get(obs, {}).get("cost_per_independent_s")
                               or math.nan)]  # fmt: skip
    if not finite:
        return None
    reliable = [r for r in finite if r["observables"][obs]["reliable"]]
    pool = reliable or finite
    return min(pool, key=lambda r: r["observables"][obs]["cost_per_independent_s"])


def cost_ratio(num: dict, den: dict, obs: str = "chi2", *, with_training: bool = False) -> dict:
    """``num``'s cost per independent ``obs`` sample over ``den``'s, with its error.

    The relative error adds the relative errors of the two tau_int in quadrature (the chains
    are independent; the wall times are measured). ``with_training``: ``num``'s cost includes
    its flow's training time amortised over its configurations (``den``'s as it is).
    """
    a, b = num["observables"][obs], den["observables"][obs]
    key = "cost_per_independent_with_training_s" if with_training else "cost_per_independent_s"
    ca, cb = a.get(key), b.get("cost_per_independent_s")
    if ca is None or cb is None or not cb > 0:
        return {"ratio": None, "ratio_error": None}
    r = ca / cb
    rel = math.hypot(a["tau_int_error"] / a["tau_int"], b["tau_int_error"] / b["tau_int"])
    return {"ratio": r, "ratio_error": r * rel}


def ratio_verdict(method: dict | None, reference: dict | None, target: float | None,
                  obs: str = "chi2") -> dict:  # fmt: skip
    """Issue 11's cost verdict: ``method``'s cost per independent ``obs`` sample over the
    ``reference``'s (the hybrid over tuned HMC), against ``target``.

    ``pass`` is ``ratio <= target``; ``pass_at_2sigma`` needs ``ratio + 2 error <= target`` and
    ``fail_at_2sigma`` means ``ratio - 2 error > target`` (neither: the data do not decide).
    ``ratio_with_training`` charges ``method`` its flow's training time as well.
    """
    out: dict[str, Any] = {"observable": obs, "target": target}
    if method is None or reference is None:
        return {**out, "ratio": None, "ratio_error": None, "pass": None,
                "note": "no result with a finite cost for the method or the reference"}
    out.update(method=method["label"], reference=reference["label"],
               **cost_ratio(method, reference, obs))  # fmt: skip
    out["ratio_with_training"] = cost_ratio(method, reference, obs, with_training=True)["ratio"]
    out["reliable"] = bool(method["observables"][obs]["reliable"]
                           and reference["observables"][obs]["reliable"])  # fmt: skip
    r, e = out["ratio"], out["ratio_error"]
    if target is None or r is None:
        out["pass"] = None
        return out
    out["pass"] = bool(r <= target)
    out["pass_at_2sigma"] = bool(r + 2.0 * e <= target)
    out["fail_at_2sigma"] = bool(r - 2.0 * e > target)
    return out


def broken_verdict(rec: dict | None, z_crit: float, min_per_100: float = 1.0) -> dict:
    """Issue 11's broken-phase verdict: <m> = 0 within ``z_crit`` errors and every chain
    changes the sign of M at least ``min_per_100`` times per 100 configurations."""
    if rec is None:
        return {"pass": None, "note": "no hybrid result"}
    m = rec["observables"]["m"]
    z = m["value"] / m["error"] if m["error"] > 0 else math.copysign(math.inf, m["value"] or 1.0)
    per100 = rec["sign_changes_per_100"]
    m_zero = bool(abs(z) < z_crit)
    tunnels = bool(min(per100) >= min_per_100)
    return {
        "method": rec["label"], "m": m["value"], "m_error": m["error"], "m_over_error": z,
        "z_crit": z_crit, "m_zero": m_zero, "m_reliable": bool(m["reliable"]),
        "sign_changes_per_100": per100, "min_sign_changes_per_100": min(per100),
        "required_per_100": min_per_100, "tunnels": tunnels, "pass": m_zero and tunnels,
    }  # fmt: skip


# ============================================================================ methods
@dataclass
class Method:
    """One sampler of a point: how to (re)run it, and what it cost."""

    label: str
    kind: str  # "hmc" | "flow-imh" | "hybrid"
    path: Path
    make_config: Callable[[int], RunConfig]
    run_kwargs: dict
    info: dict = field(default_factory=dict)
    n: int = 0
    cpu_s: float = 0.0
    call_wall_s: float = 0.0
    calls: int = 0
    load_before: list[float] | None = None
    load_after: list[float] | None = None
    summary: dict = field(default_factory=dict)

    def run(self, n: int, *, force: bool, progress: bool) -> None:
        """Run to ``n`` rows per chain (the first call creates, later calls resume)."""
        resume = self.calls > 0
        if self.load_before is None:
            self.load_before = list(os.getloadavg())
        cpu0, t0 = time.process_time(), time.perf_counter()
        self.summary = run_ensemble(
            self.path, self.make_config(n), resume=resume, force=force and not resume,
            progress=progress, **self.run_kwargs,
        )  # fmt: skip
        self.cpu_s += time.process_time() - cpu0
        self.call_wall_s += time.perf_counter() - t0
        self.load_after = list(os.getloadavg())
        self.calls += 1
        self.n = n

    def sampling_seconds(self) -> float:
        return float(ensemble_cost(self.path)["wall_time_s"])


def block_size(n: int, want: int) -> int:
    """Rows per flow call for a run of ``n`` rows: ``want`` or less, dividing ``n`` if possible.

    A run whose target ends inside a block computes the whole block, and a resumed run redoes
    it: both count in the sampling wall time. A block that divides ``n`` (hence ``2n``, ...)
    wastes nothing. Returns the largest divisor of ``n`` in ``[want/2, want]``, else ``want``
    (``n`` itself if ``n < want``).
    """
    if n <= want:
        return n
    for b in range(want, (want + 1) // 2 - 1, -1):
        if n % b == 0:
            return b
    return want


def run_for_seconds(
    m: Method, seconds: float, n0: int, *, block: int = 1, force: bool, progress: bool
) -> None:
    """Grow ``m`` (resume) until its sampling wall time reaches ``seconds``; ``n`` stays a
    multiple of ``block`` (whole flow calls, see :func:`block_size`)."""

    def whole(n: int) -> int:
        return block * max(1, math.ceil(n / block))

    n = whole(n0)
    for _ in range(16):
        m.run(n, force=force, progress=progress)
        spent = m.sampling_seconds()
        if spent >= 0.97 * seconds:
            return
        n = whole(max(n + 1, min(20 * n, math.ceil(n * seconds / max(spent, 1e-3)))))


def record(m: Method, n_common: int, discard_frac: float, integrator: str) -> dict:
    """Analyse ``m`` on its last ``n_common`` rows minus ``discard_frac`` of them; JSON record."""
    discard = (m.n - n_common) + int(discard_frac * n_common)
    res = analyze(m.path, discard=discard)
    cost = ensemble_cost(m.path)
    per = cost["cost_per_config_s"]
    train_per = cost["train_cost_per_config_s"]
    s = m.summary
    obs = {}
    for k in VALUE_OBS:
        est = res.observables.get(k)
        if est is not None:
            obs[k] = cost_entry(est, per, train_per)
    crossings = list(res.diagnostics.mode_crossings or [])
    acc = {}
    if "flow_acceptance" in s:
        acc["flow"] = s["flow_acceptance"]
    if "hmc_acceptance" in s:
        acc["hmc"] = s["hmc_acceptance"]
    forces = None
    if s.get("num_steps"):
        forces = s["num_steps"] * FORCES_PER_STEP[integrator] * int(m.info.get("K", 1))
    rec = {
        "label": m.label, "method": m.kind, **m.info, "path": str(m.path),
        "chains": cost["chains"], "n": cost["n"], "configs": cost["configs"],
        "n_analysed": res.n, "configs_analysed": res.n * res.chains, "discard": discard,
        "wall_time_s": cost["wall_time_s"], "cost_per_config_s": per,
        "cpu_time_s": m.cpu_s, "call_wall_time_s": m.call_wall_s,
        "cpu_over_wall": m.cpu_s / m.call_wall_s if m.call_wall_s > 0 else None,
        "warmup_time_s": cost["warmup_time_s"], "train_time_s": cost["train_time_s"],
        "acceptance": acc, "acceptance_by_kernel": dict(res.diagnostics.acceptance_by_kernel),
        "step_size": s.get("step_size"), "num_steps": s.get("num_steps"),
        "force_evals_per_row": forces, "n_divergent": s.get("n_divergent"),
        "n_nonfinite": s.get("n_nonfinite"),
        "observables": obs,
        "sign_changes_per_chain": crossings,
        "sign_changes_per_100": [100.0 * c / res.n for c in crossings],
        "loadavg_before": m.load_before, "loadavg_after": m.load_after,
        "unreliable": [k for k in COST_OBS if k in obs and not obs[k]["reliable"]],
        "analysis_warnings": list(res.warnings),
    }  # fmt: skip
    if forces and "chi2" in obs:
        # independent chi_2 samples per 1000 force evaluations per chain: what a trajectory
        # length criterion should maximise if forces dominate the cost
        rec["indep_chi2_per_1k_forces"] = 1000.0 / (2.0 * obs["chi2"]["tau_int"] * forces)
    return rec


def _load(point: Point, path: str | Path) -> LoadedModel:
    model = load_model(path, lam=point.lam)
    if model.action != point.action():
        raise ValueError(f"--model {point.name}: expected a flow for {point.action()!r}; got "
                         f"one for {model.action!r}")  # fmt: skip
    return model


def get_model(point: Point, args: argparse.Namespace) -> LoadedModel:
    """The point's flow: ``--model``, else trained (``--train-steps`` or ``--quick``)."""
    if point.name in args.models:
        return _load(point, args.models[point.name])
    from flowmc.training.workflow import train_flow

    out = args.out_dir / "models" / f"{point.name}.pt"
    if out.exists() and not args.force:
        print(f"[{point.name}] using the flow trained earlier, {out}", flush=True)
        check_checkpoint(out, {"action": point.action().params(), "recipe": args.recipe,
                               "seed": args.seed},
                         hint="not the flow this benchmark would train; --force retrains it")
        return _load(point, out)
    print(f"[{point.name}] training a flow ({args.train_steps} steps) -> {out}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    train_flow(
        point.action(), recipe=args.recipe,
        flow_overrides=QUICK_FLOW if args.quick else None,
        train_overrides={"n_steps": args.train_steps, **(QUICK_TRAIN if args.quick else {})},
        seed=args.seed, out=out, force=args.force, checkpoint_every=0,
        progress=not args.quiet, meta={"script": "scripts/bench_hybrid.py"},
    )  # fmt: skip
    return _load(point, out)


def _hmc_label(tau: float, flip: bool) -> str:
    return f"hmc{'_flip' if flip else ''}_tau{tau:g}"


def _flow_label(k: int) -> str:
    return "flow_mh" if k == 0 else f"hybrid_K{k}"


def planned_paths(point: Point, args: argparse.Namespace) -> list[Path]:
    d = args.out_dir / point.name
    paths = [d / f"{_hmc_label(t, args.hmc_flip)}.h5" for t in args.hmc_lengths]
    if point.broken and not args.hmc_flip:
        paths += [d / f"{_hmc_label(t, True)}.h5" for t in args.hmc_lengths]
    return paths + [d / f"{_flow_label(k)}.h5" for k in args.hybrid_k]


class PointRun:
    """The methods of one point, run with a common row count."""

    def __init__(self, point: Point, args: argparse.Namespace) -> None:
        self.point, self.args = point, args
        self.dir = args.out_dir / point.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.methods: list[Method] = []
        self.warnings: list[str] = []

    def _common(self) -> dict:
        a = self.args
        return {"chains": a.chains, "seed": a.seed, "chunk": a.chunk}

    def _meta(self, label: str) -> dict:
        return {"bench_hybrid": {"point": self.point.name, "method": label}}

    def hmc_method(self, tau: float, flip: bool) -> Method:
        a, label = self.args, _hmc_label(tau, flip)
        settings = HMCSettings(traj_length=tau, integrator=a.integrator,
                               target_accept=a.target_accept, warmup=a.hmc_warmup, flip=flip)

        def cfg(n: int) -> RunConfig:
            return RunConfig(n=n, hmc=settings, **self._common())

        return Method(label, "hmc", self.dir / f"{label}.h5", cfg,
                      {"action": self.point.action(), "meta": self._meta(label),
                       "command_line": " ".join(sys.argv)},
                      info={"traj_length": tau, "flip": flip})  # fmt: skip

    def flow_method(self, k: int, model: LoadedModel, tau: float, n: int) -> Method:
        a, label = self.args, _flow_label(k)
        want = a.hybrid_batch if k else a.flow_batch
        batch = want if a.seconds is not None else block_size(n, want)
        settings = HMCSettings(traj_length=tau, integrator=a.integrator,
                               target_accept=a.target_accept, warmup=a.hmc_warmup)

        def cfg(n: int) -> RunConfig:
            return RunConfig(n=n, hmc_traj=k, batch=batch, hmc=settings, **self._common())

        info: dict[str, Any] = {"K": k, "batch": batch}
        if k:
            info["traj_length"] = tau
        return Method(label, "hybrid" if k else "flow-imh", self.dir / f"{label}.h5", cfg,
                      {"model": model, "meta": self._meta(label),
                       "command_line": " ".join(sys.argv)}, info=info)  # fmt: skip

    def run(self, m: Method, n: int) -> Method:
        a = self.args
        print(f"[{self.point.name}] {m.label}", flush=True)
        if a.seconds is None:
            m.run(n, force=a.force, progress=not a.quiet)
        else:
            block = m.info.get("batch", 1)
            run_for_seconds(m, a.seconds, n, block=block, force=a.force, progress=not a.quiet)
        self.methods.append(m)
        return m

    def records(self, methods: list[Method]) -> list[dict]:
        n_common = min(m.n for m in self.methods)
        a = self.args
        return [record(m, n_common, a.discard_frac, a.integrator) for m in methods]

    def extend_until_reliable(self, methods: list[Method], n: int) -> int:
        """Double the rows of every method run so far while one of ``methods`` is unreliable
        and ``2n <= --max-n``."""
        a = self.args
        while a.max_n is not None and 2 * n <= a.max_n:
            bad = [r["label"] for r in self.records(methods) if r["unreliable"]]
            if not bad:
                break
            n = 2 * n
            print(f"[{self.point.name}] tau_int unreliable for {bad}: all methods to n = {n}",
                  flush=True)  # fmt: skip
            for m in self.methods:
                if m.n < n:
                    m.run(n, force=a.force, progress=not a.quiet)
        return n


def run_point(point: Point, args: argparse.Namespace) -> dict:
    """Every method of one point, the records, the best of each kind and the verdicts."""
    pr = PointRun(point, args)
    model = get_model(point, args)
    meta = model.checkpoint.get("meta", {}) or {}
    n = args.n
    hmc_runs = [pr.run(pr.hmc_method(t, args.hmc_flip), n) for t in args.hmc_lengths]
    n = pr.extend_until_reliable(hmc_runs, n)
    best_hmc = pick_best(pr.records(hmc_runs))
    best_tau = best_hmc["traj_length"] if best_hmc else args.hmc_lengths[0]
    tau_h = best_tau if args.hybrid_traj_length == "best" else args.hybrid_traj_length
    flow_runs = [pr.run(pr.flow_method(k, model, tau_h, n), n) for k in args.hybrid_k]
    flip_runs = []
    if point.broken and not args.hmc_flip:
        flip_runs = [pr.run(pr.hmc_method(best_tau, True), n)]
    n = pr.extend_until_reliable(flow_runs, n)

    hmc_recs = pr.records(hmc_runs)
    flow_recs = pr.records(flow_runs)
    flip_recs = pr.records(flip_runs)
    best_hmc = pick_best(hmc_recs)
    hybrids = [r for r in flow_recs if r["K"] > 0]
    best_hyb = pick_best(hybrids)
    flow_mh = next((r for r in flow_recs if r["K"] == 0), None)
    configs = {r["configs_analysed"] for r in hmc_recs + flow_recs + flip_recs}
    warns = [f"{r['label']}: tau_int unreliable for {r['unreliable']} (N = "
             f"{r['configs_analysed']}); raise --n or use --max-n"
             for r in hmc_recs + flow_recs + flip_recs if r["unreliable"]]  # fmt: skip
    if args.threads == 1:
        warns += [f"{r['label']}: CPU time / wall time of its run = {r['cpu_over_wall']:.2f} "
                  "with one thread: the process was waiting (for a CPU under other load, or "
                  "for the disk), so its wall times and costs may be inflated"
                  for r in hmc_recs + flow_recs + flip_recs
                  if r["cpu_over_wall"] is not None and r["cpu_over_wall"] < 0.9]  # fmt: skip
    if args.hybrid_traj_length == "best" and best_hmc and best_hmc["traj_length"] != tau_h:
        warns.append(f"the hybrids ran at the HMC length that was best on the HMC runs alone "
                     f"({tau_h:g}); on the final analysis {best_hmc['label']} is the best")
    if len(configs) != 1:
        warns.append(f"methods analysed on different numbers of configurations: {sorted(configs)}")
    verdict: dict[str, Any] = {
        "hybrid_vs_hmc": ratio_verdict(best_hyb, best_hmc, point.target),
        "hybrid_vs_hmc_abs_m": ratio_verdict(best_hyb, best_hmc, None, "abs_m"),
        "flow_mh_vs_hmc": ratio_verdict(flow_mh, best_hmc, None),
    }
    if point.broken:
        verdict["broken_phase"] = broken_verdict(best_hyb, args.z)
        verdict["hmc_sign_changes_per_100"] = None if best_hmc is None else {
            "label": best_hmc["label"], "flip": best_hmc["flip"],
            "per_chain": best_hmc["sign_changes_per_100"],
        }  # fmt: skip
        ref = flip_recs[0] if flip_recs else best_hmc
        verdict["hmc_flip_reference"] = None if ref is None else {
            "label": ref["label"], "m": ref["observables"]["m"]["value"],
            "m_error": ref["observables"]["m"]["error"],
            "sign_changes_per_100": ref["sign_changes_per_100"],
        }  # fmt: skip
    parts = [verdict["hybrid_vs_hmc"]["pass"]]
    if point.broken:
        parts = [verdict["broken_phase"]["pass"]]
    verdict["pass"] = None if any(p is None for p in parts) else all(parts)
    return {
        "name": point.name, "L": point.L, "m2": point.m2, "lam": point.lam,
        "broken": point.broken, "target": point.target,
        "model": {"path": str(model.path), "sha256": file_sha256(model.path),
                  "symmetric": model.symmetric,
                  "training_time_s": meta.get("training_time_s"),
                  "training_time_total_s": meta.get("training_time_total_s"),
                  "recipe": meta.get("recipe")},
        "rows_per_chain": min(m.n for m in pr.methods), "chains": args.chains,
        "configs": next(iter(configs)) if len(configs) == 1 else sorted(configs),
        "hmc_scan": hmc_recs, "hmc_best": best_hmc["label"] if best_hmc else None,
        "hmc_flip": flip_recs[0] if flip_recs else None,
        "flow_mh": flow_mh, "hybrid_scan": hybrids,
        "hybrid_best": best_hyb["label"] if best_hyb else None,
        "hybrid_traj_length": tau_h,
        "verdict": verdict, "warnings": warns,
    }  # fmt: skip


# ============================================================================ output
def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1e3 * x:.3g}"


def _tau(o: dict | None) -> str:
    return "-" if not o else fmt(o["tau_int"], o["tau_int_error"]) + ("" if o["reliable"] else "?")


def print_point(row: dict) -> None:
    print(f"\n== {row['name']}  (L={row['L']}, m2={row['m2']:g}, lam={row['lam']:g})  "
          f"{row['configs']} configs per method; flow training "
          f"{row['model']['training_time_s'] or float('nan'):.0f} s")  # fmt: skip
    head = (f"{'method':<16}{'acc flow':>9}{'acc hmc':>8}{'tau chi2':>16}{'ms/ind chi2':>12}"
            f"{'tau |m|':>16}{'ms/ind |m|':>11}{'wall s':>8}{'cpu s':>8}{'warm s':>8}"
            f"{'sign/100':>9}{'load':>11}")  # fmt: skip
    print(head)
    print("-" * len(head))
    recs = [*row["hmc_scan"], *([row["hmc_flip"]] if row["hmc_flip"] else []),
            *([row["flow_mh"]] if row["flow_mh"] else []), *row["hybrid_scan"]]  # fmt: skip
    for r in recs:
        o = r["observables"]
        c2, am = o.get("chi2"), o.get("abs_m")
        acc = r["acceptance"]
        mark = " *" if r["label"] in (row["hmc_best"], row["hybrid_best"]) else ""
        sc = r["sign_changes_per_100"]
        load = f"{r['loadavg_before'][0]:.1f}/{r['loadavg_after'][0]:.1f}"
        print(f"{r['label'] + mark:<16}"
              f"{'-' if 'flow' not in acc else format(acc['flow'], '.3f'):>9}"
              f"{'-' if 'hmc' not in acc else format(acc['hmc'], '.3f'):>8}"
              f"{_tau(c2):>16}{_ms(c2 and c2['cost_per_independent_s']):>12}"
              f"{_tau(am):>16}{_ms(am and am['cost_per_independent_s']):>11}"
              f"{r['wall_time_s']:>8.1f}{r['cpu_time_s']:>8.1f}{r['warmup_time_s'] or 0:>8.1f}"
              f"{min(sc) if sc else float('nan'):>9.2f}{load:>11}")  # fmt: skip
    print("* best of its kind by cost per independent chi2; ? tau_int unreliable; sign/100: "
          "fewest sign changes of M per 100 configs over the chains; load: 1-min load average "
          "before/after")
    v = row["verdict"]
    h = v["hybrid_vs_hmc"]
    if h.get("ratio") is not None:
        tgt = "" if h["target"] is None else f" (target <= {h['target']:g}: " + (
            "PASS" if h["pass"] else "FAIL") + ")"
        print(f"cost per independent chi2, {h['method']} / {h['reference']}: "
              f"{fmt(h['ratio'], h['ratio_error'])}{tgt}; flow MH / HMC: "
              f"{fmt(v['flow_mh_vs_hmc']['ratio'], v['flow_mh_vs_hmc']['ratio_error'])}")
    b, hs = v.get("broken_phase"), v.get("hmc_sign_changes_per_100")
    if b and b.get("pass") is not None and hs:
        print(f"broken phase, {b['method']}: <m> = {fmt(b['m'], b['m_error'])} "
              f"({b['m_over_error']:+.2f} sigma), min sign changes per 100 = "
              f"{b['min_sign_changes_per_100']:.2f}: {'PASS' if b['pass'] else 'FAIL'}; "
              f"HMC ({hs['label']}): {[round(x, 2) for x in hs['per_chain']]}")
    for w in row["warnings"]:
        print(f"warning: {w}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    check_outputs([(args.json, "json", REPORT_KIND)])  # fail before hours of sampling
    for pt in args.point_list:
        for path in planned_paths(pt, args):
            check_output(path, force=args.force)
    t0 = time.perf_counter()
    header = {
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "quick": args.quick, "threads": torch.get_num_threads(),
        "env_threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        "machine": machine_info(), "python": platform.python_version(),
        "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("point_list", "point", "model")},
        "points_defined": {p.name: vars(p) for p in args.point_list},
        "definitions": {
            "cost_per_independent_s": "sampling wall time * 2 tau_int / configs (tau_int: "
            "1/2 + sum rho, in rows; wall time: the ensemble's chunk wall times)",
            "cpu_time_s": "time.process_time over the run call(s): warm-up + sampling + writing",
            "sign_changes_per_100": "sign changes of M per chain per 100 analysed rows",
        },
    }  # fmt: skip
    rows: list[dict] = []
    for pt in args.point_list:
        rows.append(run_point(pt, args))
        print_point(rows[-1])
        write_json(args.json, {
            **header, "points": rows,
            "verdicts": {r["name"]: r["verdict"] for r in rows},
            "seconds_total": time.perf_counter() - t0,
        }, REPORT_KIND)  # fmt: skip
    print(f"\nJSON: {args.json}; ensembles in {args.out_dir}/<point>/ "
          f"(flowmc compare A.h5 B.h5 ...); total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
