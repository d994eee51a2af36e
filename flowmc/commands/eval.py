"""``flowmc eval``: ESS, free-energy bound, log Z and sign balance of a trained flow."""

from __future__ import annotations

import argparse
from pathlib import Path

from flowmc import report
from flowmc.commands._common import default_model_path, make_generator
from flowmc.config import add_common_options, apply_threads, resolve_device, resolve_dtype
from flowmc.io.checkpoint import load_model
from flowmc.training.evaluate import evaluate_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a trained flow (ESS, F_q, log Z, M>0 fraction)",
        description="Draw N fresh samples from a trained flow and report the reweighting ESS on "
        "all N (and its spread over batches), the variational bound F_q >= -log Z, the "
        "importance estimate of log Z, the independence-MH acceptance on the same draws, and the "
        "fraction of samples with M > 0. --json and --plot replace only earlier reports of "
        "their own kind.",
    )
    add_common_options(p)
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: shipped flow)")
    p.add_argument("--lam", type=float, default=None,
                   help="the coupling to evaluate a flow conditioned on lambda at")
    p.add_argument("--n", type=int, default=10240, help="number of samples (default 10240)")
    p.add_argument("--batch", type=int, default=1024, help="batch size (default 1024)")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--plot", type=Path, default=None, help="S vs S_eff PNG")
    p.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="override the checkpoint's Z2-symmetrisation")
    p.add_argument("--int-steps", type=int, default=None,
                   help="integration steps of a continuous flow (default: as trained; more "
                   "steps make its log density more exact, docs/recipes.md)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    device = resolve_device(args.device)
    model_path = args.model or default_model_path()
    inputs = [model_path]
    report.check_outputs(
        [(args.json, "json", "eval"), (args.plot, "png", "action-vs-effective")], inputs=inputs
    )
    model = load_model(model_path, device=device, dtype=resolve_dtype(args.dtype),
                       symmetric=args.symmetric, lam=args.lam,
                       int_steps=args.int_steps)
    res = evaluate_model(model, args.n, batch_size=args.batch,
                         generator=make_generator(args.seed, device))  # fmt: skip
    print(report.eval_table(res))
    if args.json:
        report.write_json(args.json, res, "eval", inputs=inputs)
    if args.plot:
        report.plot_action_vs_effective(
            res.samples["action"], res.samples["log_q"], args.plot, title=str(model_path.name),
            inputs=inputs,
        )  # fmt: skip
    return 0
