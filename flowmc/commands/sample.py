"""``flowmc sample``: an exact ensemble by flow Metropolis–Hastings, or the flow + HMC hybrid."""

from __future__ import annotations

import argparse
from pathlib import Path

from flowmc.commands._common import (
    HMC_FLAGS,
    TUNING,
    add_ensemble_options,
    add_hmc_options,
    check_distributed_options,
    default_model_path,
    hmc_settings,
    print_run_summary,
    run_config,
    storage_kwargs,
    write_json,
)
from flowmc.config import (
    add_common_options,
    apply_threads,
    refuse_unused,
    resolve_device,
    resolve_dtype,
)
from flowmc.io.checkpoint import load_model
from flowmc.sampling.shards import job_device, run_sharded
from flowmc.training.adapt import AdaptConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="sample an exact ensemble with the flow as independence MH proposal "
        "(optionally cycled with HMC)",
        description="Run C independent Metropolis-Hastings chains whose proposals are drawn from "
        "a trained flow (K per flow call) and write every configuration and per-config scalars "
        "to an HDF5 ensemble (docs/ensemble-format.md). With --hmc-traj K each chain cycles one "
        "flow proposal and K HMC trajectories (the hybrid, docs/hybrid.md). Interrupted runs "
        "leave a valid file; --resume continues them to a new --n, bit-identical to an "
        "uninterrupted run. Under torchrun the chains are split over the ranks, each writing a "
        "shard, joined by OUT (docs/distributed.md).",
    )
    add_common_options(p)
    add_ensemble_options(p)
    p.add_argument("--model", type=Path, default=None, help="flow checkpoint (default: shipped "
                   "flow for L=8, m2=-4, lam=8)")
    p.add_argument("--lam", type=float, default=None,
                   help="the coupling to sample with a flow conditioned on lambda (inside its "
                   "range; docs/scan.md)")
    p.add_argument("--batch", type=int, default=None,
                   help="flow proposals per chain per flow call (default 1024 for flow MH; 16 "
                   "cycles for the hybrid)")
    p.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="override the checkpoint's Z2-symmetrised proposal")
    p.add_argument("--int-steps", type=int, default=None,
                   help="integration steps of a continuous flow (default: as trained; more "
                   "steps make its log density more exact, docs/recipes.md)")
    p.add_argument("--hmc-traj", type=int, default=0,
                   help="hybrid: HMC trajectories after each flow proposal (default 0: flow MH "
                   "alone); the chains then run in float64")
    add_hmc_options(p, "HMC part of the hybrid (with --hmc-traj K >= 1)")
    a = p.add_argument_group("adaptive warm-up (flow MH and hybrid; docs/hybrid.md)")
    a.add_argument("--adapt-steps", type=int, default=0,
                   help="train the flow on the chains for this many optimizer steps during "
                   "warm-up, then freeze it; saved as OUT.adapted.pt (default 0: off)")
    a.add_argument("--adapt-lr", type=float, default=1e-4, help="Adam learning rate (1e-4)")
    a.add_argument("--adapt-batch", type=int, default=256,
                   help="chain configurations per optimizer step (default 256)")
    a.add_argument("--adapt-reverse-kl", type=float, default=0.0,
                   help="weight of the reverse-KL term added to the forward KL (default 0)")
    p.set_defaults(func=run)


def check_modes(args: argparse.Namespace) -> None:
    """Refuse options that do nothing in the chosen mode (flow MH alone, no adaptation)."""
    if not args.hmc_traj:
        refuse_unused(args, HMC_FLAGS, "needs --hmc-traj K >= 1 (the HMC part of the hybrid; "
                      "flow MH alone runs no HMC)")
    elif args.step_size is not None:
        refuse_unused(args, ["--target-accept"], TUNING)
    if not args.adapt_steps:
        refuse_unused(args, ["--adapt-lr", "--adapt-batch", "--adapt-reverse-kl"],
                      "needs --adapt-steps N >= 1 (the adaptive warm-up)")
    check_distributed_options(args)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    check_modes(args)
    storage = storage_kwargs(args, "sample")  # validates --n and --out first
    adapt = None
    if args.adapt_steps:
        adapt = AdaptConfig(steps=args.adapt_steps, lr=args.adapt_lr, batch=args.adapt_batch,
                            reverse_kl=args.adapt_reverse_kl)
    cfg = run_config(args, batch=args.batch, hmc_traj=args.hmc_traj, hmc=hmc_settings(args),
                     adapt=adapt)
    device = job_device(resolve_device(args.device))  # cuda:LOCAL_RANK under torchrun
    model = load_model(args.model or default_model_path(), device=device,
                       dtype=resolve_dtype(args.dtype), symmetric=args.symmetric, lam=args.lam,
                       int_steps=args.int_steps)
    # under torchrun: each rank samples its block of chains into its shard (flowmc.sampling.shards)
    summary = run_sharded(args.out, cfg, model=model, device=device,
                          timeout_s=args.dist_timeout, **storage)  # fmt: skip
    if summary["rank"] != 0:  # rank 0 alone reports
        return 0
    print_run_summary(summary)
    if args.json:
        write_json(args.json, summary)
    return 0
