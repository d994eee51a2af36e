"""``flowmc sample``: an exact ensemble by Metropolis–Hastings with a flow proposal."""

from __future__ import annotations

import argparse
from pathlib import Path

from flowmc.checkpoint import load_model
from flowmc.commands._common import (
    add_ensemble_options,
    default_model_path,
    storage_kwargs,
    write_json,
)
from flowmc.config import add_common_options, apply_threads, resolve_device, resolve_dtype
from flowmc.sampler import FlowMHConfig, run_flow_mh


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="sample an exact ensemble with the flow as independence MH proposal",
        description="Run C independent Metropolis-Hastings chains whose proposals are drawn from "
        "a trained flow (K per flow call) and write every configuration and per-config scalars "
        "to an HDF5 ensemble (docs/ensemble-format.md). Interrupted runs leave a valid file; "
        "--resume continues them to a new --n, bit-identical to an uninterrupted run.",
    )
    add_common_options(p)
    add_ensemble_options(p)
    p.add_argument("--model", type=Path, default=None, help="flow checkpoint (default: shipped "
                   "flow for L=8, m2=-4, lam=8)")
    p.add_argument("--batch", type=int, default=1024, help="proposals per chain per flow call")
    p.add_argument("--thin", type=int, default=1, help="record every THIN-th step")
    p.add_argument("--therm", type=int, default=0, help="steps discarded per chain at the start")
    p.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="override the checkpoint's Z2-symmetrised proposal")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    storage = storage_kwargs(args, "sample")  # validates --n and --out first
    device = resolve_device(args.device)
    model_path = args.model or default_model_path()
    model = load_model(
        model_path, device=device, dtype=resolve_dtype(args.dtype), symmetric=args.symmetric
    )
    cfg = FlowMHConfig(
        n=args.n,
        chains=args.chains,
        batch=args.batch,
        thin=args.thin,
        therm=args.therm,
        seed=args.seed,
    )
    summary = run_flow_mh(model, args.out, cfg, **storage)
    print(
        f"flow MH: {summary['n']} configs x {summary['chains']} chains -> {summary['path']}\n"
        f"  acceptance {summary['acceptance']:.4f}, longest rejection run "
        f"{summary['longest_rejection_run']}, non-finite proposals {summary['n_nonfinite']}\n"
        f"  {summary['seconds']:.2f} s this run, {summary['samples_per_second']:.0f} samples/s"
    )
    if args.json:
        write_json(args.json, summary)
    return 0
