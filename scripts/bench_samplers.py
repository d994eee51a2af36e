#!/usr/bin/env python
r"""Issue 23's benchmark: the cluster kernel against tuned HMC and flow MH near criticality.

For every point (default: crit8 = (8, -4, 4.25), crit16 = (16, -4, 4.25), the L = 8/16 points
near the U4 crossing lambda_c = 4.29 of ``docs/scan.md``, and crit32 = (32, -4, 4.572)), the
script runs, in this process, one after the other, with the same torch threads (default 1):

1. **HMC, tuned**: ``--chains`` chains (default 32) at every trajectory length of
   ``--hmc-lengths`` (default 1, 2, 4, 8; each with its own dual-averaging warm-up); the length
   with the lowest cost per independent chi_2 sample (reliable tau_int preferred) is *the* HMC;
2. **the cluster kernel** (``flowmc cluster``): ``--chains`` chains, ``--num-hits`` Metropolis
   hits per site then ``--num-clusters`` Wolff clusters per step, step size adapted in warm-up;
3. **flow MH** (``flowmc sample``) if the point has a flow (``--model POINT=PATH`` or
   ``--model L=PATH``): ``--flow-chains`` chains (default 4), ``--flow-batch`` proposals per flow
   call.

Every method is an ordinary ensemble written by :func:`flowmc.sampling.run.run_ensemble` into
``--out-dir/<point>/<method>.h5`` (``flowmc compare`` can be run on them), analysed by
:func:`flowmc.analysis.ensemble.analyze` and costed by :func:`flowmc.analysis.compare.ensemble_cost`
(the sampling wall time is the ensemble's chunk wall times: warm-up and training excluded). With
``--max-n`` a method whose tau_int(chi_2) is unreliable is resumed to twice its rows while
``2n <= MAX_N``.

Per method: rows, configurations, sampling wall time, CPU time (``time.process_time`` over its
run calls: warm-up + sampling + writing) and CPU/wall, warm-up time, configurations per second,
tau_int (1/2 + sum rho, in rows) of chi_2, |m|, U_4 and the Ising energy with their Gamma-method
errors, **ms per independent chi_2 sample** ``1000 * wall * 2 tau_int / configs`` with its error
(from tau_int's), the acceptance of every kernel (and the mean cluster size), and the 1-minute
load average before and after. Per point: the cost ratios cluster / HMC and flow MH / HMC, and
the pairwise agreement z-scores of <|m|>, chi_2, U_4 and E between the methods (HMC: the best
length) with the Bonferroni critical value over all of them at level 1%.

Examples:
    python scripts/bench_samplers.py --quick --out-dir /tmp/bs              # smoke test, < 1 min
    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python scripts/bench_samplers.py --threads 1 \
        --n 4000 --max-n 32000 --model crit16=data/phi4_L16_m2-4_lam4.25.pt \
        --out-dir results/bench_samplers
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_hybrid as BH  # noqa: E402  (its Method, Point, cost and ratio helpers)

from flowmc.analysis.compare import ensemble_cost  # noqa: E402
from flowmc.analysis.ensemble import analyze  # noqa: E402
from flowmc.io.checkpoint import LoadedModel, load_model, machine_info  # noqa: E402
from flowmc.io.ensemble import check_output, file_sha256  # noqa: E402
from flowmc.report import check_outputs, fmt, write_json  # noqa: E402
from flowmc.sampling.cluster import ClusterSettings  # noqa: E402
from flowmc.sampling.run import HMCSettings, RunConfig  # noqa: E402

REPORT_KIND = "bench-samplers"
#: Observables with value, tau_int and cost per independent sample in every record.
OBS = ("chi2", "abs_m", "binder", "energy", "m")
#: Observables of the agreement z-scores.
AGREE = ("abs_m", "chi2", "binder", "energy")
ALPHA = 0.01

POINTS = {p.name: p for p in (BH.Point("crit8", 8, -4.0, 4.25, None),
                              BH.Point("crit16", 16, -4.0, 4.25, None),
                              BH.Point("crit32", 32, -4.0, 4.572, None))}  # fmt: skip
QUICK_POINTS = {"q4": BH.Point("q4", 4, -4.0, 4.25, None)}
#: ``--quick``: a 4x4 lattice, few rows and chains (the numbers mean nothing).
QUICK = {"n": 60, "chains": 4, "flow_chains": 2, "hmc_lengths": "1,2", "hmc_warmup": 20,
         "cluster_warmup": 20, "flow_batch": 30}  # fmt: skip


# ============================================================================ arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--points", default=None,
                   help=f"comma-separated points (default {','.join(POINTS)}; --quick: q4)")
    p.add_argument("--point", action="append", default=[], metavar="NAME=L,M2,LAM",
                   help="define (or redefine) a point; repeatable")
    p.add_argument("--model", action="append", default=[], metavar="POINT=PATH",
                   help="a flow for flow MH at a point (POINT: its name or its L); repeatable; "
                   "points without one run HMC and the cluster kernel only")
    p.add_argument("--n", type=int, default=2000, help="rows per chain per method (default 2000)")
    p.add_argument("--max-n", type=int, default=None,
                   help="double the rows of a method (resume) while its tau_int(chi2) is "
                   "unreliable and 2n <= MAX_N")
    p.add_argument("--chains", type=int, default=32, help="HMC and cluster chains (default 32)")
    p.add_argument("--flow-chains", type=int, default=4, help="flow-MH chains (default 4)")
    p.add_argument("--flow-batch", type=int, default=1024,
                   help="flow MH: proposals per chain per flow call (default 1024)")
    p.add_argument("--hmc-lengths", default="1,2,4,8",
                   help="HMC trajectory lengths (default 1,2,4,8); the best is the reference")
    p.add_argument("--hmc-warmup", type=int, default=200, help="HMC warm-up trajectories")
    p.add_argument("--integrator", choices=sorted(BH.FORCES_PER_STEP), default="omelyan")
    p.add_argument("--num-hits", type=int, default=3, help="cluster: Metropolis hits per site")
    p.add_argument("--num-clusters", type=int, default=2, help="cluster: Wolff clusters per step")
    p.add_argument("--cluster-warmup", type=int, default=200, help="cluster warm-up steps")
    p.add_argument("--discard-frac", type=float, default=0.05,
                   help="fraction of each method's rows discarded by the analysis (0.05)")
    p.add_argument("--chunk", type=int, default=1024, help="rows per chain per commit")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("results/bench_samplers"))
    p.add_argument("--json", type=Path, default=None,
                   help="JSON report (default <out-dir>/bench_samplers.json)")
    p.add_argument("--force", action="store_true", help="replace existing ensembles")
    p.add_argument("--quick", action="store_true", help="smoke test: L = 4, few rows")
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
        pt = BH.parse_point(spec)
        table[pt.name] = BH.Point(pt.name, pt.L, pt.m2, pt.lam, None)
    default = ",".join(QUICK_POINTS if args.quick else POINTS)
    names = [s.strip() for s in (args.points or default).split(",") if s.strip()]
    if not names or len(set(names)) != len(names) or any(s not in table for s in names):
        raise ValueError(f"--points: expected distinct names from {sorted(table)}; got {names}")
    args.point_list = [table[s] for s in names]
    args.models = {}
    for spec in args.model:
        key, sep, path = spec.partition("=")
        hits = [pt.name for pt in args.point_list if key in (pt.name, str(pt.L))]
        if not sep or not path or len(hits) != 1:
            raise ValueError(f"--model: expected POINT=PATH or L=PATH naming one point of "
                             f"{names}; got {spec!r}")  # fmt: skip
        args.models[hits[0]] = path
    for name in ("n", "chains", "flow_chains", "flow_batch", "hmc_warmup", "num_hits", "chunk",
                 "threads"):  # fmt: skip
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 1; got {value}")
    if args.num_clusters < 0 or args.cluster_warmup < 2:
        raise ValueError("--num-clusters: expected >= 0; --cluster-warmup: expected >= 2")
    if args.max_n is not None and args.max_n < args.n:
        raise ValueError(f"--max-n: expected >= --n ({args.n}); got {args.max_n}")
    if not 0 <= args.discard_frac < 1:
        raise ValueError(f"--discard-frac: expected in [0, 1); got {args.discard_frac}")
    args.hmc_lengths = BH._floats(str(args.hmc_lengths), "--hmc-lengths")
    args.json = args.json or args.out_dir / "bench_samplers.json"


# ============================================================================ methods
def _labels(args: argparse.Namespace, point: BH.Point) -> list[str]:
    labels = [f"hmc_tau{t:g}" for t in args.hmc_lengths] + ["cluster"]
    return labels + (["flow_mh"] if point.name in args.models else [])


def make_methods(point: BH.Point, args: argparse.Namespace) -> list[BH.Method]:
    """The point's methods (nothing run yet): HMC per length, the cluster kernel, flow MH."""
    d = args.out_dir / point.name
    common = {"seed": args.seed, "chunk": args.chunk}
    meta = lambda label: {"bench_samplers": {"point": point.name, "method": label}}  # noqa: E731
    kw = {"command_line": " ".join(sys.argv)}
    methods = []
    for tau in args.hmc_lengths:
        label = f"hmc_tau{tau:g}"
        hmc = HMCSettings(traj_length=tau, integrator=args.integrator, warmup=args.hmc_warmup)
        methods.append(BH.Method(
            label, "hmc", d / f"{label}.h5",
            lambda n, hmc=hmc: RunConfig(n=n, chains=args.chains, hmc=hmc, **common),
            {"action": point.action(), "meta": meta(label), **kw}, info={"traj_length": tau},
        ))  # fmt: skip
    cl = ClusterSettings(num_hits=args.num_hits, num_clusters=args.num_clusters,
                         warmup=args.cluster_warmup)  # fmt: skip
    methods.append(BH.Method(
        "cluster", "cluster", d / "cluster.h5",
        lambda n: RunConfig(n=n, chains=args.chains, cluster=cl, **common),
        {"action": point.action(), "meta": meta("cluster"), **kw},
        info={"num_hits": args.num_hits, "num_clusters": args.num_clusters},
    ))  # fmt: skip
    if point.name in args.models:
        model = load_flow(point, args.models[point.name])
        batch = BH.block_size(args.n, args.flow_batch)
        methods.append(BH.Method(
            "flow_mh", "flow-imh", d / "flow_mh.h5",
            lambda n: RunConfig(n=n, chains=args.flow_chains, batch=batch, **common),
            {"model": model, "meta": meta("flow_mh"), **kw}, info={"batch": batch},
        ))  # fmt: skip
    return methods


def load_flow(point: BH.Point, path: str) -> LoadedModel:
    model = load_model(path, lam=point.lam)
    if model.action != point.action():
        raise ValueError(f"--model {point.name}: expected a flow for {point.action()!r}; got "
                         f"one for {model.action!r}")  # fmt: skip
    return model


def record(m: BH.Method, discard_frac: float) -> dict:
    """Analyse ``m`` (all its rows but the first ``discard_frac``): the JSON record."""
    res = analyze(m.path, discard=int(discard_frac * m.n))
    cost = ensemble_cost(m.path)
    per, s = cost["cost_per_config_s"], m.summary
    obs = {k: BH.cost_entry(res.observables[k], per, cost["train_cost_per_config_s"])
           for k in OBS if k in res.observables}  # fmt: skip
    chi2 = obs.get("chi2")
    return {
        "label": m.label, "method": m.kind, **m.info, "path": str(m.path),
        "chains": cost["chains"], "n": cost["n"], "configs": cost["configs"],
        "n_analysed": res.n, "wall_time_s": cost["wall_time_s"], "cost_per_config_s": per,
        "configs_per_s": 1.0 / per if per else None,
        "cpu_time_s": m.cpu_s, "call_wall_time_s": m.call_wall_s,
        "cpu_over_wall": m.cpu_s / m.call_wall_s if m.call_wall_s > 0 else None,
        "warmup_time_s": cost["warmup_time_s"], "train_time_s": cost["train_time_s"],
        "acceptance_by_kernel": dict(res.diagnostics.acceptance_by_kernel),
        "cluster_size": s.get("cluster_size"), "step_size": s.get("step_size"),
        "num_steps": s.get("num_steps"),
        "ms_per_independent_chi2": None if chi2 is None else 1e3 * chi2["cost_per_independent_s"],
        "ms_per_independent_chi2_error": (
            None if chi2 is None else 1e3 * chi2["cost_per_independent_error_s"]),
        "observables": obs,
        "loadavg_before": m.load_before, "loadavg_after": m.load_after,
        "unreliable": [k for k in ("chi2", "abs_m") if k in obs and not obs[k]["reliable"]],
        "analysis_warnings": list(res.warnings),
    }  # fmt: skip


def run_method(m: BH.Method, args: argparse.Namespace, name: str) -> dict:
    """Run ``m`` to ``--n`` rows, doubling (resume) while tau_int(chi2) is unreliable and
    ``2n <= --max-n``; its record."""
    print(f"[{name}] {m.label}", flush=True)
    m.run(args.n, force=args.force, progress=not args.quiet)
    rec = record(m, args.discard_frac)
    while args.max_n is not None and rec["unreliable"] and 2 * m.n <= args.max_n:
        print(f"[{name}] {m.label}: tau_int unreliable for {rec['unreliable']}, n -> {2 * m.n}",
              flush=True)  # fmt: skip
        m.run(2 * m.n, force=False, progress=not args.quiet)
        rec = record(m, args.discard_frac)
    return rec


def agreement(recs: list[dict]) -> dict:
    """Pairwise z-scores of the :data:`AGREE` observables; Bonferroni over all of them."""
    pairs: dict[str, dict[str, float | None]] = {}
    for i, a in enumerate(recs):
        for b in recs[i + 1:]:
            zs = {}
            for k in AGREE:
                ea, eb = a["observables"].get(k), b["observables"].get(k)
                err = math.hypot(ea["error"], eb["error"]) if ea and eb else 0.0
                zs[k] = (ea["value"] - eb["value"]) / err if err > 0 else None
            pairs[f"{a['label']} vs {b['label']}"] = zs
    m = max(1, sum(len(v) for v in pairs.values()))
    crit = float(norm.ppf(1 - ALPHA / (2 * m)))
    finite = [abs(z) for v in pairs.values() for z in v.values() if z is not None]
    return {"pairs": pairs, "z_crit": crit, "alpha": ALPHA, "tests": m,
            "max_abs_z": max(finite, default=None),
            "agree": all(z < crit for z in finite)}  # fmt: skip


def run_point(point: BH.Point, args: argparse.Namespace) -> dict:
    methods = make_methods(point, args)
    recs = [run_method(m, args, point.name) for m in methods]
    hmc = [r for r in recs if r["method"] == "hmc"]
    best = BH.pick_best(hmc)
    chosen = [r for r in recs if r["method"] != "hmc"]
    chosen = ([best] if best else []) + chosen
    ratios = {}
    for r in chosen[1:]:
        if best is not None:
            ratios[f"{r['label']}/hmc"] = BH.cost_ratio(r, best)
    warns = [f"{r['label']}: tau_int unreliable for {r['unreliable']} (n = {r['n_analysed']} "
             "per chain); raise --n or use --max-n" for r in recs if r["unreliable"]]  # fmt: skip
    if args.threads == 1:
        warns += [f"{r['label']}: CPU time / wall time = {r['cpu_over_wall']:.2f} with one "
                  "thread: the process waited (other load?), its costs may be inflated"
                  for r in recs if r["cpu_over_wall"] is not None and r["cpu_over_wall"] < 0.9]
    if point.name not in args.models:
        warns.append("no --model for this point: flow MH not run")
    model = None
    if point.name in args.models:
        mp = next(m for m in methods if m.kind == "flow-imh").run_kwargs["model"]
        meta = mp.checkpoint.get("meta", {}) or {}
        model = {"path": str(mp.path), "sha256": file_sha256(mp.path),
                 "training_time_s": meta.get("training_time_total_s",
                                             meta.get("training_time_s"))}  # fmt: skip
    return {
        "name": point.name, "L": point.L, "m2": point.m2, "lam": point.lam, "model": model,
        "methods": recs, "hmc_best": best["label"] if best else None,
        "table": {r["label"]: {k: r[k] for k in (
            "ms_per_independent_chi2", "ms_per_independent_chi2_error", "configs_per_s",
            "wall_time_s", "cpu_time_s", "chains", "configs")} | {
            "tau_int_chi2": r["observables"]["chi2"]["tau_int"],
            "tau_int_chi2_error": r["observables"]["chi2"]["tau_int_error"]}
            for r in chosen},
        "cost_ratio_vs_hmc": ratios,
        "agreement": agreement(chosen),
        "warnings": warns,
    }  # fmt: skip


# ============================================================================ output
def print_point(row: dict) -> None:
    print(f"\n== {row['name']}  (L={row['L']}, m2={row['m2']:g}, lam={row['lam']:g})")
    head = (f"{'method':<12}{'chains':>7}{'configs':>9}{'acceptance':>24}{'tau chi2':>15}"
            f"{'ms/ind chi2':>14}{'configs/s':>11}{'wall s':>8}{'cpu s':>8}{'load':>10}")
    print(head)
    print("-" * len(head))
    for r in row["methods"]:
        c2 = r["observables"].get("chi2")
        acc = ", ".join(f"{k} {v:.3f}" for k, v in r["acceptance_by_kernel"].items())
        mark = " *" if r["label"] == row["hmc_best"] else ""
        ms = r["ms_per_independent_chi2"]
        print(f"{r['label'] + mark:<12}{r['chains']:>7}{r['configs']:>9}{acc:>24}"
              f"{BH._tau(c2):>15}"
              f"{'-' if ms is None else fmt(ms, r['ms_per_independent_chi2_error']):>14}"
              f"{r['configs_per_s'] or float('nan'):>11.0f}{r['wall_time_s']:>8.1f}"
              f"{r['cpu_time_s']:>8.1f}"
              f"{r['loadavg_before'][0]:>5.1f}/{r['loadavg_after'][0]:<4.1f}")  # fmt: skip
    print("* the best HMC length (reference); ? tau_int unreliable; load: 1-min load average "
          "before/after")
    for k, v in row["cost_ratio_vs_hmc"].items():
        if v["ratio"] is not None:
            print(f"cost per independent chi2, {k}: {fmt(v['ratio'], v['ratio_error'])}")
    ag = row["agreement"]
    if ag["max_abs_z"] is not None:
        print(f"agreement ({', '.join(AGREE)}; {ag['tests']} z-scores): max |z| = "
              f"{ag['max_abs_z']:.2f} (critical {ag['z_crit']:.2f}): "
              f"{'agree' if ag['agree'] else 'DISAGREE'}")
    for w in row["warnings"]:
        print(f"warning: {w}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    check_outputs([(args.json, "json", REPORT_KIND)])  # fail before hours of sampling
    for pt in args.point_list:
        (args.out_dir / pt.name).mkdir(exist_ok=True)
        for label in _labels(args, pt):
            check_output(args.out_dir / pt.name / f"{label}.h5", force=args.force)
    t0 = time.perf_counter()
    header: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "quick": args.quick, "threads": torch.get_num_threads(),
        "env_threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                        "NUMBA_NUM_THREADS")},
        "machine": machine_info(), "python": platform.python_version(),
        "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("point_list", "point", "model")},
        "points_defined": {p.name: {"L": p.L, "m2": p.m2, "lam": p.lam}
                           for p in args.point_list},
        "definitions": {
            "ms_per_independent_chi2": "1000 * sampling wall time * 2 tau_int(chi2) / configs "
            "(tau_int: 1/2 + sum rho, in rows; wall time: the ensemble's chunk wall times, "
            "warm-up and training excluded; all chains of the method together)",
            "cpu_time_s": "time.process_time over the run calls: warm-up + sampling + writing",
            "row": "one HMC trajectory, one cluster step (sweep + clusters), one flow-MH step",
        },
    }  # fmt: skip
    rows: list[dict] = []
    for pt in args.point_list:
        rows.append(run_point(pt, args))
        print_point(rows[-1])
        write_json(args.json, {**header, "points": rows, "loadavg_end": list(os.getloadavg()),
                               "seconds_total": time.perf_counter() - t0}, REPORT_KIND)
    print(f"\nJSON: {args.json}; ensembles in {args.out_dir}/<point>/ (flowmc compare A.h5 B.h5); "
          f"total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
