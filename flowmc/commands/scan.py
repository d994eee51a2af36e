"""``flowmc scan``: one ensemble per (L, lambda), the critical point and the free energy."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from flowmc import report
from flowmc.analysis.crossing import METHODS
from flowmc.analysis.free_energy import RULES
from flowmc.commands._common import (
    HMC_FLAGS,
    MIN_L,
    TUNING,
    add_cluster_options,
    add_hmc_options,
    check_cluster_runtime,
    cluster_settings,
    hmc_settings,
)
from flowmc.config import (
    NON_NEGATIVE,
    POSITIVE,
    IntRange,
    add_common_options,
    apply_threads,
    refuse_unused,
    resolve_device,
    resolve_dtype,
    resolved,
)
from flowmc.sampling.run import START_KINDS, RunConfig
from flowmc.scan import (
    MANIFEST,
    SUMMARY_CSV,
    SUMMARY_JSON,
    TI_ANCHORS,
    ScanConfig,
    ScanOptions,
    parse_lams,
    parse_models,
    run_scan,
)


def _lams(text: str) -> tuple[float, ...]:
    try:
        return parse_lams(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_lams.__name__ = "coupling grid"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scan",
        help="scan the coupling: an ensemble per (L, lambda), crossings, free energy",
        description="Sample one ensemble per lattice size L and coupling lambda into the scan "
        "directory --out (flow MH with a flow conditioned on lambda per L, the hybrid with "
        "--hmc-traj K, local HMC with --hmc, or the Metropolis + Wolff cluster kernel with "
        "--cluster), analyse every point, locate the crossings of "
        "U4 and xi2/L between sizes (the critical coupling) and compute the free-energy density "
        "f = -log Z / V (flow log Z; thermodynamic integration in lambda). Writes "
        f"{SUMMARY_JSON}, {SUMMARY_CSV} and PNG plots there. Rerunning the same command "
        "resumes the scan (finished points are skipped); other settings are refused "
        "(docs/scan.md).",
    )
    add_common_options(p)
    p.add_argument("--out", type=Path, default=None, help="the scan directory (its own)")
    p.add_argument("--L", type=IntRange(MIN_L), nargs="+", default=None,
                   help="lattice sizes (all directions), e.g. --L 8 16")
    p.add_argument("--lam", type=_lams, default=None,
                   help="couplings: LO:HI:N (N points, both ends included) or a list a,b,c")
    p.add_argument("--m2", type=float, default=None,
                   help="bare mass squared (required for HMC; default: the flows')")
    p.add_argument("--dim", type=IntRange(1), default=2, help="number of dimensions (default 2)")
    p.add_argument("--model", nargs="+", default=None,
                   help="one flow per --L, in the order of --L (--model m8.pt m16.pt) or as "
                   "L=PATH (--model 8=m8.pt,16=m16.pt); L=hmc samples that size by local HMC")
    p.add_argument("--hmc", action="store_true", help="local HMC at every size (no flow)")
    p.add_argument("--cluster", action="store_true",
                   help="the cluster kernel (Metropolis sweeps + Wolff clusters, CPU, numba) at "
                   "every size (no flow; docs/cluster.md)")
    e = p.add_argument_group("sampling of every point")
    e.add_argument("--n", type=POSITIVE, default=None, help="configurations per chain (target)")
    e.add_argument("--chains", type=POSITIVE, default=1, help="independent chains (default 1)")
    e.add_argument("--thin", type=POSITIVE, default=1, help="record every THIN-th step")
    e.add_argument("--therm", type=NON_NEGATIVE, default=0,
                   help="steps discarded per chain after warm-up, before the first record")
    e.add_argument("--chunk", type=POSITIVE, default=None, help="recorded rows per commit")
    e.add_argument("--batch", type=POSITIVE, default=None,
                   help="flow proposals per chain per flow call (default 1024 for flow MH; 16 "
                   "cycles for the hybrid)")
    e.add_argument("--hmc-traj", type=NON_NEGATIVE, default=0,
                   help="hybrid: HMC trajectories after each flow proposal (sizes with a flow)")
    e.add_argument("--start", choices=list(START_KINDS), default="cold",
                   help="initial fields of HMC and cluster chains (default cold)")
    add_hmc_options(p, "HMC (--hmc, L=hmc, and the HMC part of the hybrid; --warmup also "
                    "counts the warm-up steps of --cluster)")
    add_cluster_options(p, "cluster kernel (--cluster)", prefix="cluster-")
    a = p.add_argument_group("analysis (may change between reruns)")
    a.add_argument("--discard", type=NON_NEGATIVE, default=0,
                   help="rows per chain dropped at the start of every ensemble")
    a.add_argument("--S", type=float, default=1.5, help="Wolff windowing parameter (1.5)")
    a.add_argument("--logz-n", type=NON_NEGATIVE, default=10240,
                   help="fresh flow draws for log Z per flow point (default 10240; 0: none)")
    a.add_argument("--logz-batch", type=POSITIVE, default=1024, help="draws per flow call")
    a.add_argument("--anchor-model", nargs="+", default=None,
                   help="L=PATH: a flow whose log Z anchors the thermodynamic integration of an "
                   "HMC size (at the scan points it serves)")
    a.add_argument("--ti-anchor", choices=list(TI_ANCHORS), default="auto",
                   help="start of the thermodynamic integration: free (lam = 0, m2 > 0), flow "
                   "(the best flow point), auto (free if m2 > 0, else flow), none")
    a.add_argument("--ti-rule", choices=list(RULES), default="quadratic",
                   help="integration rule over the grid (default quadratic; its error estimate "
                   "is the difference to the trapezoid rule)")
    a.add_argument("--crossing", choices=list(METHODS), default="quadratic",
                   help="interpolation of the crossing (default quadratic)")
    a.add_argument("--crossing-window", type=IntRange(3), default=4,
                   help="points of the quadratic interpolation (default 4)")
    a.add_argument("--n-boot", type=NON_NEGATIVE, default=2000,
                   help="bootstrap replicas of the crossing error (default 2000)")
    a.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.set_defaults(func=run, interrupted=_interrupted)


def _interrupted(args: argparse.Namespace) -> str:
    out = getattr(args, "out", None)
    where = f"{str(out)!r}" if out is not None else "the scan directory"
    return (
        f"interrupted; {where} keeps every finished point and the committed rows of the "
        "current one; rerun the same command to continue the scan"
    )


def check_modes(args: argparse.Namespace, sizes: list[int], models: dict, anchors: dict) -> None:
    """Refuse options that do nothing for the scan's samplers, sizes or analysis (one line)."""
    flows = any(v is not None for v in models.values())
    hmc_sizes = args.hmc or any(v is None for v in models.values())
    uses_hmc = hmc_sizes or bool(flows and args.hmc_traj)
    if not uses_hmc:
        refuse_unused(args, [f for f in HMC_FLAGS if f != "--warmup"],
                      "needs HMC (--hmc, L=hmc in --model, or the hybrid --hmc-traj K)")
    elif args.step_size is not None:
        refuse_unused(args, ["--target-accept"], TUNING)
    if not (uses_hmc or args.cluster):
        refuse_unused(args, ["--warmup"], "needs HMC or --cluster (flow MH has no warm-up)")
    if not (hmc_sizes or args.cluster):
        refuse_unused(args, ["--start"], "needs HMC or --cluster (flow chains start at flow "
                      "draws)")
    if not args.cluster:
        refuse_unused(args, ["--num-hits", "--num-clusters", "--cluster-target-accept",
                             "--cluster-step-size"], "needs --cluster")
    elif args.cluster_step_size is not None:
        refuse_unused(args, ["--cluster-target-accept"],
                      "needs step-size tuning (no --cluster-step-size)")
    if not flows:
        refuse_unused(args, ["--batch"], "needs a flow (--model)")
    if not (flows or anchors):
        refuse_unused(args, ["--dtype", "--logz-n", "--logz-batch"],
                      "needs a flow (--model or --anchor-model): it sets the flows' dtype and "
                      "draws; HMC and cluster chains run in float64")
    elif not args.logz_n:
        refuse_unused(args, ["--logz-batch"], "needs --logz-n N >= 2")
    if len(sizes) < 2:
        refuse_unused(args, ["--crossing", "--crossing-window", "--n-boot"],
                      "needs two or more sizes (--L) to cross")
    elif args.crossing == "linear":
        refuse_unused(args, ["--crossing-window"], "needs --crossing quadratic")
    if args.ti_anchor == "none":
        refuse_unused(args, ["--ti-rule"], "needs a thermodynamic integration (--ti-anchor "
                      "other than none)")


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    if args.out is None or args.n is None or args.lam is None or not args.L:
        raise ValueError("--out, --L, --lam and --n are required")
    sizes = list(args.L)
    modes = [flag for flag, on in (("--model", bool(args.model)), ("--hmc", args.hmc),
                                   ("--cluster", args.cluster)) if on]  # fmt: skip
    if len(modes) > 1:
        raise ValueError(
            f"give either --model (flows) or --hmc or --cluster, not several; got "
            f"{' and '.join(modes)}"
        )
    if not modes:
        raise ValueError(
            "--model (one flow per --L; L=hmc for local HMC at that size), --hmc or --cluster "
            "is required"
        )
    if args.cluster:
        check_cluster_runtime(args.device)
    models = {} if not args.model else parse_models(args.model, sizes, "--model", every=True)
    anchors = parse_models(args.anchor_model, sizes, "--anchor-model", every=False)
    if any(v is None for v in anchors.values()):
        raise ValueError("--anchor-model: expected L=PATH (a flow), not L=hmc")
    if args.hmc_traj and all(v is None for v in models.values()):
        raise ValueError("--hmc-traj K (the hybrid) needs a flow (--model)")
    check_modes(args, sizes, models, anchors)
    run_cfg = RunConfig(
        n=args.n, chains=args.chains, thin=args.thin, therm=args.therm, seed=args.seed,
        chunk=args.chunk, batch=args.batch, hmc_traj=args.hmc_traj, hmc=hmc_settings(args),
        start=args.start,
        cluster=cluster_settings(args, prefix="cluster-") if args.cluster else None,
    )  # fmt: skip
    config = ScanConfig(sizes=tuple(sizes), lams=args.lam, run=run_cfg, models=models,
                        m2=args.m2, dim=args.dim, anchor_models=anchors)  # fmt: skip
    options = ScanOptions(
        discard=args.discard, S=args.S, logz_n=args.logz_n, logz_batch=args.logz_batch,
        ti_anchor=args.ti_anchor, ti_rule=args.ti_rule, crossing_method=args.crossing,
        crossing_window=args.crossing_window, n_boot=args.n_boot,
    )  # fmt: skip
    summary = run_scan(
        args.out, config, options, device=resolve_device(args.device),
        dtype=resolve_dtype(args.dtype), progress=not args.quiet, plots=not args.no_plots,
        command_line=shlex.join(["flowmc", "scan", *sys.argv[2:]]),
        meta={"resolved_config": resolved(args)},
    )  # fmt: skip
    print(report.scan_table(summary))
    plots = "" if args.no_plots else ", " + ", ".join(report.SCAN_PLOTS)
    print(f"files      {args.out}/: {MANIFEST}, {SUMMARY_JSON}, {SUMMARY_CSV}{plots}")
    return 0
