"""``flowmc hmc``: an exact ensemble by Hybrid Monte Carlo (the local-update baseline)."""

from __future__ import annotations

import argparse

from flowmc.commands._common import (
    TUNING,
    action_from_args,
    add_action_options,
    add_ensemble_options,
    add_hmc_options,
    check_distributed_options,
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
from flowmc.sampling.run import START_KINDS
from flowmc.sampling.shards import job_device, run_sharded


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "hmc",
        help="sample an exact ensemble with Hybrid Monte Carlo",
        description="Run C HMC chains (one batched tensor) on the phi^4 action: warm-up with "
        "dual-averaging step-size tuning towards --target-accept at fixed --traj-length, then "
        "sampling with the frozen step size. Writes the same HDF5 ensemble format as "
        "'flowmc sample' (docs/ensemble-format.md, docs/hmc.md). Interrupted runs leave a valid "
        "file; --resume continues them to a new --n, bit-identical to an uninterrupted run. "
        "Under torchrun the chains are split over the ranks, each writing a shard, joined by OUT "
        "(docs/distributed.md).",
    )
    add_common_options(p)
    p.set_defaults(dtype="float64")  # Delta H is a difference of extensive numbers
    add_action_options(p)
    add_ensemble_options(p)
    add_hmc_options(p, "HMC")
    p.add_argument("--start", choices=list(START_KINDS), default="cold",
                   help="initial fields: cold = 0 (default), random = iid N(0,1) (hot)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    if args.step_size is not None:
        refuse_unused(args, ["--target-accept"], TUNING)
    check_distributed_options(args)
    storage = storage_kwargs(args, "hmc")  # validates --n and --out first
    action = action_from_args(args)
    # under torchrun: each rank samples its block of chains into its shard (flowmc.sampling.shards)
    summary = run_sharded(
        args.out,
        run_config(args, hmc=hmc_settings(args), start=args.start),
        action=action,
        device=job_device(resolve_device(args.device)),
        dtype=resolve_dtype(args.dtype),
        timeout_s=args.dist_timeout,
        **storage,
    )
    if summary["rank"] != 0:  # rank 0 alone reports
        return 0
    print_run_summary(summary)
    if args.json:
        write_json(args.json, summary)
    return 0
