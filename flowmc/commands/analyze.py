"""``flowmc analyze``: observables with Gamma-method errors, diagnostics, JSON and plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from flowmc import report
from flowmc.analysis.ensemble import analyze
from flowmc.config import add_common_options, apply_threads, refuse_unused


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="observables with Gamma-method errors, autocorrelation times, Z2 diagnostics",
        description="Analyse an ensemble file: magnetisation, susceptibilities, Binder "
        "cumulant, energy, second-moment correlation length, Schwinger-Dyson check, G(x), C(t), "
        "effective and pole mass, each with a Gamma-method error (chains as replicas), tau_int "
        "(1/2 + sum rho convention) and ESS; acceptance of each kernel, longest rejection run "
        "and Z2 sign balance, with warnings. Keys of --json are documented in docs/analysis.md. "
        "--json and --plots replace only earlier reports of their own kind.",
    )
    add_common_options(p)
    p.add_argument("ensemble", type=Path, help="ensemble file (HDF5) from flowmc sample / hmc")
    p.add_argument("--discard", type=int, default=0, help="rows per chain to drop (thermalisation)")
    p.add_argument("--S", type=float, default=1.5, help="Wolff windowing parameter (default 1.5)")
    p.add_argument("--chunk", type=int, default=512, help="rows per chain read at a time")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--plots", type=Path, default=None, help="write PNG plots into this folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    refuse_unused(args, ["--seed", "--dtype", "--device"], "has no effect in flowmc analyze (the "
                  "analysis draws no random numbers and runs in float64 on the CPU)")
    inputs = [args.ensemble]
    plots = (
        [(args.plots / name, "png", kind) for name, kind in report.ANALYSIS_PLOTS.items()]
        if args.plots else []
    )  # fmt: skip
    report.check_outputs([(args.json, "json", "analysis"), *plots], inputs=inputs)
    res = analyze(args.ensemble, discard=args.discard, S=args.S, chunk=args.chunk)
    print(report.analysis_table(res))
    if args.json:
        report.write_json(args.json, res, "analysis", inputs=inputs)
    if args.plots:
        paths = report.analysis_plots(res, args.plots, inputs=inputs)
        print(f"plots      {len(paths)} PNGs in {args.plots}")
    return 0
