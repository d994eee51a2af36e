"""``flowmc compare``: two or more ensembles side by side, with the cost per independent sample."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flowmc import report
from flowmc.analysis.compare import compare
from flowmc.config import add_common_options, apply_threads, refuse_unused
from flowmc.io.ensemble import open_ensemble
from flowmc.io.identity import TUNED, ensemble_identity, first_difference


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare ensembles (e.g. flow MH, HMC, hybrid): values, z-scores, tau_int, cost",
        description="Analyse two or more ensembles and print every observable side by side "
        "(value ± error, z-score against the first ensemble; pairwise z-scores in --json), "
        "tau_int, the acceptance of each kernel, the wall-clock cost per configuration and per "
        "independent sample (2 tau_int x cost per config, sampling only), and for ensembles "
        "that use a flow the training time recorded at sampling (or --train-time) amortised "
        "over the samples drawn (docs/hmc.md). No file named inside an ensemble is opened.",
    )
    add_common_options(p)
    p.add_argument("ensembles", type=Path, nargs="+", metavar="ENSEMBLE",
                   help="two or more ensembles (.h5); the first is the reference")
    p.add_argument("--discard", type=int, default=0,
                   help="rows per chain discarded by the analysis (default 0)")
    p.add_argument("--train-time", type=float, default=None,
                   help="training seconds of every flow/hybrid ensemble (default: the "
                   "meta['model']['training_time_s'] recorded at sampling, else unknown)")
    p.add_argument("--json", type=Path, default=None, help="write the comparison as JSON")
    p.add_argument("--plots", type=Path, default=None,
                   help="directory for cost_per_independent.png")
    p.set_defaults(func=run)


def _files(path: Path) -> set[str]:
    """The real files holding the rows of ``path``: itself, or a join's shards."""
    with open_ensemble(path) as ens:
        shards = ens.attrs.get("shards")
    if not shards:
        return {os.path.realpath(path)}
    base = os.path.dirname(os.path.abspath(path))
    return {os.path.realpath(os.path.join(base, f["path"])) for f in shards["files"]}


def _chains(ident: dict) -> set[int]:
    first = int(ident["sampler"].get("first_chain", 0) or 0)
    return set(range(first, first + int(ident["n_chains"])))


def dependent_pairs(paths: list[Path]) -> list[str]:
    """Pairs of ensembles that share samples, one message each: the same file, a join and its
    own shard, or the same chains again (a copy, or a rerun with the same sampler, settings,
    flow and seed)."""
    info = []
    for p in paths:
        ident, _ = ensemble_identity(p)
        info.append((p, ident, _files(p)))
    found = []
    for i, (a, ia, fa) in enumerate(info):
        for b, ib, fb in info[i + 1:]:
            if os.path.realpath(a) == os.path.realpath(b):
                why = "are the same file"
            elif fa & fb:
                why = ("are a join and one of its own shards" if len(fa) != len(fb)
                       else "share shard files")  # fmt: skip
            elif (_chains(ia) & _chains(ib) and first_difference(
                    {k: ia[k] for k in ("lattice_shape", "action", "sampler", "model_sha256",
                                        "seed")},
                    {k: ib[k] for k in ("lattice_shape", "action", "sampler", "model_sha256",
                                        "seed")}, ignore=TUNED) is None):  # fmt: skip
                why = "hold the same chains (the same sampler, settings, flow and seed)"
            else:
                continue
            found.append(f"{str(a)!r} and {str(b)!r} {why}: their samples are not independent, "
                         "so their z-score is meaningless")  # fmt: skip
    return found


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    refuse_unused(args, ["--seed", "--dtype", "--device"], "has no effect in flowmc compare (the "
                  "analysis draws no random numbers and runs in float64 on the CPU)")
    if len(args.ensembles) < 2:
        raise ValueError(f"Expected at least two ensembles to compare; got {len(args.ensembles)}")
    if args.train_time is not None and not args.train_time >= 0:
        raise ValueError(f"Expected --train-time >= 0; got {args.train_time}")
    inputs = list(args.ensembles)
    plot = args.plots / report.COMPARE_PLOT[0] if args.plots else None
    report.check_outputs(
        [(args.json, "json", "compare"), (plot, "png", report.COMPARE_PLOT[1])], inputs=inputs
    )
    for msg in dependent_pairs(list(args.ensembles)):
        print(f"flowmc compare: warning: {msg}", file=sys.stderr)
    result = compare(*args.ensembles, discard=args.discard, train_time=args.train_time)
    print(report.compare_table(result))
    if args.json:
        report.write_json(args.json, result, "compare", inputs=inputs)
        print(f"JSON: {args.json}")
    if plot is not None:
        print(f"plot: {report.plot_compare(result, plot, inputs=inputs)}")
    return 0
