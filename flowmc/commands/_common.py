"""Helpers shared by the CLI subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flowmc._checks import is_real
from flowmc.config import NON_NEGATIVE, POSITIVE, IntRange, refuse_unused
from flowmc.io.ensemble import check_output
from flowmc.io.shipped import (  # noqa: F401 - re-exported for the subcommands
    DEFAULT_MODEL,
    DEFAULT_MODELS,
    data_dir,
    default_model_path,
)
from flowmc.lattice.action import Phi4Action
from flowmc.sampling.cluster import ClusterSettings
from flowmc.sampling.run import HMCSettings, RunConfig

#: Smallest lattice extent of the commands that build an action (train, hmc): with L = 1 every
#: site is its own neighbour (no kinetic term) and no distance-1 correlator exists, so
#: ``flowmc analyze`` could not analyse the ensemble.
MIN_L = 2
_L_TYPE = IntRange(MIN_L, why="a periodic lattice needs distinct neighbours")


def add_action_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group(
        "action (S = sum_n [sum_mu (2 phi^2 - 2 phi phi_+mu) + m2 phi^2 + lam phi^4])"
    )
    g.add_argument("--L", type=_L_TYPE, default=None,
                   help=f"lattice extent (all directions), >= {MIN_L}")
    g.add_argument("--dim", type=IntRange(1), default=2, help="number of dimensions (default 2)")
    g.add_argument("--m2", type=float, default=None, help="bare mass squared")
    g.add_argument("--lam", type=lam_value, default=None,
                   help="quartic coupling lambda >= 0 (flowmc train also takes a range LO:HI: "
                   "a flow conditioned on lambda)")
    g.add_argument("--kappa", type=float, default=None,
                   help="hopping parameter (instead of m2/lam)")
    g.add_argument("--lam-h", type=float, default=None, help="hopping-form quartic coupling")


def lam_value(text: str | float) -> float | tuple[float, float]:
    """``--lam``: a coupling (``8``) or a range ``LO:HI`` (``4:8``)."""
    if is_real(text):
        return float(text)
    parts = str(text).split(":")
    try:
        values = [float(x) for x in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or a range LO:HI; got {text!r}"
        ) from None
    if len(values) == 1:
        return values[0]
    if len(values) != 2 or not values[0] < values[1]:
        raise argparse.ArgumentTypeError(f"expected a range LO:HI with LO < HI; got {text!r}")
    return values[0], values[1]


def action_from_args(args: argparse.Namespace) -> Phi4Action:
    if args.L is None:
        raise ValueError("--L is required (lattice extent)")
    try:
        _L_TYPE.check(args.L)
    except ValueError as e:
        raise ValueError(f"--L: {e}") from None
    shape = (args.L,) * args.dim
    if args.kappa is not None or args.lam_h is not None:
        if args.m2 is not None or args.lam is not None:
            raise ValueError("give either --m2/--lam or --kappa/--lam-h, not both")
        if args.kappa is None or args.lam_h is None:
            raise ValueError("--kappa and --lam-h go together")
        return Phi4Action.from_hopping(args.kappa, args.lam_h, shape)
    if args.m2 is None or args.lam is None:
        raise ValueError("--m2 and --lam are required (or --kappa and --lam-h)")
    if isinstance(args.lam, tuple):
        raise ValueError(
            f"--lam {args.lam[0]:g}:{args.lam[1]:g} is a range; only flowmc train takes one "
            "(it trains a flow conditioned on lambda)"
        )
    return Phi4Action(args.m2, args.lam, shape)


def add_ensemble_options(p: argparse.ArgumentParser) -> None:
    """Options of every command that writes an HDF5 ensemble (flowmc sample, flowmc hmc)."""
    p.add_argument("--n", type=POSITIVE, default=None, help="configurations per chain (target)")
    p.add_argument("--out", type=Path, default=None, help="ensemble file (.h5)")
    p.add_argument("--chains", type=POSITIVE, default=1, help="independent chains (default 1)")
    p.add_argument("--thin", type=POSITIVE, default=1, help="record every THIN-th step")
    p.add_argument("--therm", type=NON_NEGATIVE, default=0,
                   help="steps discarded per chain after warm-up, before the first record")
    p.add_argument("--chunk", type=POSITIVE, default=None,
                   help="recorded rows per commit to the file (default: every flow call for "
                   "flow MH, 100 otherwise)")
    p.add_argument("--resume", action="store_true", help="continue --out to the new --n")
    p.add_argument("--force", action="store_true",
                   help="replace an existing flowmc ensemble --out (at the first commit)")
    p.add_argument("--no-configs", action="store_true", help="store per-config scalars only")
    p.add_argument("--store-dtype", choices=["float32", "float64"], default="float32",
                   help="storage dtype of configurations")
    p.add_argument("--compression", choices=["none", "gzip", "lzf"], default="none")
    p.add_argument("--json", type=Path, default=None, help="write the run summary as JSON")
    p.add_argument("--dist-timeout", type=float, default=600.0,
                   help="under torchrun (sharded run, docs/distributed.md): seconds a rank waits "
                   "for the others before failing")


def add_hmc_options(p: argparse.ArgumentParser, title: str) -> None:
    """HMC options, shared by ``flowmc hmc`` and the hybrid of ``flowmc sample --hmc-traj``."""
    g = p.add_argument_group(title)
    g.add_argument("--traj-length", type=float, default=1.0,
                   help="trajectory length tau (default 1)")
    g.add_argument("--integrator", choices=["omelyan", "leapfrog"], default="omelyan",
                   help="MD integrator (default omelyan)")
    g.add_argument("--target-accept", type=float, default=0.8,
                   help="acceptance targeted by the step-size tuning (default 0.8)")
    g.add_argument("--warmup", type=int, default=200,
                   help="warm-up trajectories per chain, discarded (default 200)")
    g.add_argument("--step-size", type=float, default=None,
                   help="fixed step size (skips tuning; warm-up still thermalises)")
    g.add_argument("--flip", action="store_true", help="add the exact global Z2 flip move")


#: The options of :func:`add_hmc_options`, in the order messages list them.
HMC_FLAGS = ["--traj-length", "--integrator", "--target-accept", "--warmup", "--step-size",
             "--flip"]  # fmt: skip
#: Why ``--force`` and ``--resume`` do not go together.
RESUME_FORCE = ("needs a new run (without --resume: a resumed file is continued, never "
                "replaced)")
#: What ``--target-accept`` needs: a tuned step size.
TUNING = "needs step-size tuning (no --step-size)"


def check_distributed_options(args: argparse.Namespace) -> None:
    """``--dist-timeout`` does something only under torchrun (a sharded or distributed run)."""
    from flowmc.parallel import torchrun_env

    if torchrun_env() is None:
        refuse_unused(args, ["--dist-timeout"], "needs torchrun (a run over several processes, "
                      "docs/distributed.md)")


def hmc_settings(args: argparse.Namespace) -> HMCSettings:
    """The :class:`~flowmc.sampling.run.HMCSettings` of :func:`add_hmc_options`."""
    return HMCSettings(
        traj_length=args.traj_length,
        integrator=args.integrator,
        target_accept=args.target_accept,
        warmup=args.warmup,
        step_size=args.step_size,
        flip=args.flip,
    )


def add_cluster_options(p: argparse.ArgumentParser, title: str, *, prefix: str = "") -> None:
    """Options of the cluster kernel: ``flowmc cluster`` (``prefix=""``, with its own
    ``--warmup``) and ``flowmc scan --cluster`` (``prefix="cluster-"`` for the step size and the
    target acceptance, which HMC's options already name; ``--warmup`` is shared)."""
    g = p.add_argument_group(title)
    g.add_argument("--num-hits", type=POSITIVE, default=3,
                   help="Metropolis hits per site and sweep (default 3)")
    g.add_argument("--num-clusters", type=NON_NEGATIVE, default=2,
                   help="Wolff clusters per step, after the sweep (default 2; 0: Metropolis only)")
    g.add_argument(f"--{prefix}target-accept", type=float, default=0.5,
                   help="Metropolis acceptance the warm-up adapts the step size to (default 0.5)")
    g.add_argument(f"--{prefix}step-size", type=float, default=None,
                   help="fixed Metropolis half-width delta (skips the adaptation; warm-up still "
                   "thermalises)")
    if not prefix:
        g.add_argument("--warmup", type=NON_NEGATIVE, default=200,
                       help="warm-up steps per chain, discarded (default 200)")


def cluster_settings(args: argparse.Namespace, *, prefix: str = "") -> ClusterSettings:
    """The :class:`~flowmc.sampling.cluster.ClusterSettings` of :func:`add_cluster_options`."""
    key = prefix.replace("-", "_")
    return ClusterSettings(
        num_hits=args.num_hits,
        num_clusters=args.num_clusters,
        target_accept=getattr(args, f"{key}target_accept"),
        warmup=args.warmup,
        step_size=getattr(args, f"{key}step_size"),
    )


def check_cluster_runtime(device: str) -> None:
    """Fail in one line before any work: the cluster kernel needs numba and the CPU."""
    from flowmc.mcmc.cluster import require_numba

    if str(device).split(":")[0] != "cpu":
        raise ValueError(
            f"Expected --device cpu: the cluster kernel is compiled for the CPU (numba); got "
            f"{device}"
        )
    try:
        require_numba()
    except ImportError:
        raise RuntimeError(
            "the cluster kernel needs numba; install it with `pip install "
            "flowmc-lattice[cluster]` (or `pip install numba`)"
        ) from None


def run_config(args: argparse.Namespace, **settings: object) -> RunConfig:
    """The :class:`~flowmc.sampling.run.RunConfig` of :func:`add_ensemble_options`, ``settings``."""
    return RunConfig(
        n=args.n,
        chains=args.chains,
        thin=args.thin,
        therm=args.therm,
        seed=args.seed,
        chunk=args.chunk,
        **settings,
    )


def storage_kwargs(args: argparse.Namespace, command: str) -> dict:
    """Keyword arguments of :func:`~flowmc.sampling.run.run_ensemble` from the ensemble options."""
    import shlex
    import sys

    from flowmc.config import resolved

    if args.n is None or args.out is None:
        raise ValueError("--n and --out are required")
    if args.resume:
        refuse_unused(args, ["--force"], RESUME_FORCE)
    if not args.resume:  # fail before loading a model or warming up
        check_output(args.out, force=args.force)
    return {
        "resume": args.resume,
        "force": args.force,
        "store_configs": not args.no_configs,
        "config_dtype": args.store_dtype,
        "compression": None if args.compression == "none" else args.compression,
        "progress": not args.quiet,
        "meta": {"resolved_config": resolved(args)},
        "command_line": shlex.join(["flowmc", command, *sys.argv[2:]]),
    }


def print_run_summary(s: dict) -> None:
    """Print the summary of :func:`~flowmc.sampling.run.run_ensemble` or a sharded run (rank 0)."""
    name = s["sampler"]
    lines = [f"{name}: {s['n']} configs x {s['chains']} chains -> {s['path']}"]
    if s.get("ranks", 1) > 1:
        shard_dir = Path(s["shards"][0]).parent
        lines.append(f"  sharded over {s['ranks']} ranks: {shard_dir}/ (joined by {s['path']})")
    if "flow_acceptance" in s:
        lines.append(
            f"  flow acceptance {s['flow_acceptance']:.4f}, non-finite proposals "
            f"{s['n_nonfinite']}"
        )
    if "hmc_acceptance" in s:
        per = f" x {s['hmc_traj']} per cycle" if "hmc_traj" in s else ""
        lines.append(
            f"  HMC ({s['integrator']}{per}): step size {s['step_size']:.5g} x "
            f"{s['num_steps']} steps, acceptance {s['hmc_acceptance']:.4f}, divergent "
            f"{s['n_divergent']}"
        )
    if "metropolis_acceptance" in s:
        lines.append(
            f"  cluster: {s['num_hits']} Metropolis hits per site (step size "
            f"{s['step_size']:.5g}, acceptance {s['metropolis_acceptance']:.4f}) + "
            f"{s['num_clusters']} Wolff clusters per step (mean size {s['cluster_size']:.4f} "
            "of the lattice)"
        )
    else:
        lines.append(
            f"  acceptance {s['acceptance']:.4f}, longest rejection run "
            f"{s['longest_rejection_run']}"
        )
    if s.get("adapted_model"):
        lines.append(f"  adapted flow: {s['adapted_model']}")
    warm = f", warm-up {s['warmup_seconds']:.2f} s" if s.get("warmup_seconds") else ""
    lines.append(
        f"  {s['seconds']:.2f} s this run{warm}, {s['samples_per_second']:.0f} samples/s"
    )
    print("\n".join(lines))


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def write_json(path: str | Path, obj: dict, kind: str = "summary") -> Path:
    """Write a JSON report through :func:`flowmc.report.write_json` (kind ``summary`` by default:
    the run summaries of ``flowmc sample``/``flowmc hmc``); it never replaces an ensemble, a
    checkpoint or a file flowmc did not write. Prefer calling :mod:`flowmc.report` directly."""
    from flowmc.report import write_json as _write_json

    return _write_json(path, obj, kind)
