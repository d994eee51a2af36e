"""``flowmc cluster``: an exact ensemble by Metropolis sweeps + Wolff clusters (Brower-Tamayo)."""

from __future__ import annotations

import argparse

import torch

from flowmc.commands._common import (
    TUNING,
    action_from_args,
    add_action_options,
    add_cluster_options,
    add_ensemble_options,
    check_cluster_runtime,
    check_distributed_options,
    cluster_settings,
    print_run_summary,
    run_config,
    storage_kwargs,
    write_json,
)
from flowmc.config import add_common_options, apply_threads, refuse_unused, resolve_device
from flowmc.sampling.run import START_KINDS
from flowmc.sampling.shards import job_device, run_sharded


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cluster",
        help="sample an exact ensemble with Metropolis sweeps + Wolff clusters (CPU, numba)",
        description="Run C chains of the embedded-Ising cluster kernel on the phi^4 action: "
        "each step is a checkerboard sweep of --num-hits Metropolis hits per site, then "
        "--num-clusters Wolff single-cluster flips of the signs of phi (bond probability "
        "1 - exp(-4 phi_x phi_y) for flowmc's normalisation; docs/cluster.md). Warm-up adapts "
        "the Metropolis step size towards --target-accept, then sampling runs with it frozen. "
        "Writes the same HDF5 ensemble format as 'flowmc hmc' (one row per step); interrupted "
        "runs leave a valid file, --resume continues them to a new --n bit-identically; under "
        "torchrun the chains are split over the ranks (docs/distributed.md). CPU and float64 "
        "only; needs numba (pip install flowmc-lattice[cluster]).",
    )
    add_common_options(p)
    p.set_defaults(dtype="float64")
    for a in p._actions:  # the compiled kernel is serial: say what --threads does here
        if a.dest == "threads":
            a.help = ("torch CPU threads (default: torch's); they only draw the uniforms: the "
                      "compiled kernel is serial, one chain after another on one thread")
        elif a.dest == "dtype":
            a.help = "floating point type: float64 only (the kernel computes in double precision)"
    add_action_options(p)
    add_ensemble_options(p)
    add_cluster_options(p, "cluster kernel")
    p.add_argument("--start", choices=list(START_KINDS), default="cold",
                   help="initial fields: cold = 0 (default), random = iid N(0,1) (hot)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    if args.step_size is not None:
        refuse_unused(args, ["--target-accept"], TUNING)
    check_distributed_options(args)
    storage = storage_kwargs(args, "cluster")  # validates --n and --out first
    action = action_from_args(args)
    if args.dtype != "float64":
        raise ValueError(
            f"Expected --dtype float64: the cluster kernel computes in double precision; got "
            f"{args.dtype}"
        )
    check_cluster_runtime(args.device)
    device = resolve_device(args.device)
    config = run_config(args, cluster=cluster_settings(args), start=args.start)
    # under torchrun: each rank samples its block of chains into its shard (flowmc.sampling.shards)
    summary = run_sharded(
        args.out,
        config,
        action=action,
        device=job_device(device),
        dtype=torch.float64,
        timeout_s=args.dist_timeout,
        **storage,
    )
    if summary["rank"] != 0:  # rank 0 alone reports
        return 0
    print_run_summary(summary)
    if args.json:
        write_json(args.json, summary)
    return 0
