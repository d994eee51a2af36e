"""``flowmc hmc``: an exact ensemble by Hybrid Monte Carlo (the local-update baseline)."""

from __future__ import annotations

import argparse

from flowmc.commands._common import (
    action_from_args,
    add_action_options,
    add_ensemble_options,
    storage_kwargs,
    write_json,
)
from flowmc.config import add_common_options, apply_threads, resolve_device, resolve_dtype
from flowmc.hmc_run import START_KINDS, HMCRunConfig, run_hmc


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "hmc",
        help="sample an exact ensemble with Hybrid Monte Carlo",
        description="Run C HMC chains (one batched tensor) on the phi^4 action: warm-up with "
        "dual-averaging step-size tuning towards --target-accept at fixed --traj-length, then "
        "sampling with the frozen step size. Writes the same HDF5 ensemble format as "
        "'flowmc sample' (docs/ensemble-format.md, docs/hmc.md). Interrupted runs leave a valid "
        "file; --resume continues them to a new --n, bit-identical to an uninterrupted run.",
    )
    add_common_options(p)
    p.set_defaults(dtype="float64")  # Delta H is a difference of extensive numbers
    add_action_options(p)
    add_ensemble_options(p)
    p.add_argument("--traj-length", type=float, default=1.0,
                   help="trajectory length tau (default 1)")
    p.add_argument("--integrator", choices=["omelyan", "leapfrog"], default="omelyan",
                   help="MD integrator (default omelyan)")
    p.add_argument("--target-accept", type=float, default=0.8,
                   help="acceptance targeted by the step-size tuning (default 0.8)")
    p.add_argument("--warmup", type=int, default=200,
                   help="warm-up trajectories per chain, discarded (default 200)")
    p.add_argument("--step-size", type=float, default=None,
                   help="fixed step size (skips tuning; warm-up still thermalises)")
    p.add_argument("--flip", action="store_true", help="add the exact global Z2 flip move")
    p.add_argument("--thin", type=int, default=1, help="record every THIN-th trajectory")
    p.add_argument("--start", choices=list(START_KINDS), default="cold",
                   help="initial fields: cold = 0 (default), random = iid N(0,1) (hot)")
    p.add_argument("--chunk", type=int, default=100,
                   help="recorded configurations per commit to the file (default 100)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    action = action_from_args(args)
    cfg = HMCRunConfig(
        n=args.n,
        chains=args.chains,
        traj_length=args.traj_length,
        integrator=args.integrator,
        target_accept=args.target_accept,
        warmup=args.warmup,
        step_size=args.step_size,
        flip=args.flip,
        thin=args.thin,
        start=args.start,
        chunk=args.chunk,
        seed=args.seed,
    )
    summary = run_hmc(
        action,
        args.out,
        cfg,
        device=resolve_device(args.device),
        dtype=resolve_dtype(args.dtype),
        **storage_kwargs(args, "hmc"),
    )
    warm = (
        f", warm-up {summary['warmup_seconds']:.2f} s" if summary["warmup_seconds"] else ""
    )
    print(
        f"HMC ({summary['integrator']}): {summary['n']} configs x {summary['chains']} chains "
        f"-> {summary['path']}\n"
        f"  step size {summary['step_size']:.5g} x {summary['num_steps']} steps, acceptance "
        f"{summary['acceptance']:.4f}, divergent {summary['n_divergent']}\n"
        f"  {summary['seconds']:.2f} s this run{warm}, "
        f"{summary['samples_per_second']:.0f} samples/s"
    )
    if args.json:
        write_json(args.json, summary)
    return 0
