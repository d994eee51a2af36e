"""``flowmc compare``: two ensembles side by side, with the cost per independent sample."""

from __future__ import annotations

import argparse
from pathlib import Path

from flowmc.commands._common import write_json
from flowmc.compare import compare, format_table, plot_costs
from flowmc.config import add_common_options, apply_threads


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare two ensembles (e.g. flow MH vs HMC): values, tau_int, cost",
        description="Analyse two ensembles and print every observable side by side (value ± "
        "error, difference in sigma), tau_int, acceptance, the wall-clock cost per "
        "configuration and per independent sample (2 tau_int x cost per config), and for a "
        "flow ensemble its training cost amortised over the samples drawn (docs/hmc.md).",
    )
    add_common_options(p)
    p.add_argument("a", type=Path, help="first ensemble (.h5), e.g. flow MH")
    p.add_argument("b", type=Path, help="second ensemble (.h5), e.g. HMC")
    p.add_argument("--discard", type=int, default=0,
                   help="rows per chain discarded by the analysis (default 0)")
    p.add_argument("--train-time", type=float, default=None,
                   help="training seconds of the flow (default: the checkpoint's "
                   "meta['training_time_s'] if the checkpoint is found)")
    p.add_argument("--json", type=Path, default=None, help="write the comparison as JSON")
    p.add_argument("--plots", type=Path, default=None,
                   help="directory for cost_per_independent.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    if args.train_time is not None and not args.train_time >= 0:
        raise ValueError(f"Expected --train-time >= 0; got {args.train_time}")
    result = compare(args.a, args.b, discard=args.discard, train_time=args.train_time)
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
        print(f"JSON: {args.json}")
    if args.plots:
        path = plot_costs(result, Path(args.plots) / "cost_per_independent.png")
        print(f"plot: {path}")
    return 0
