"""Throughput (and tau_int of chi2) of the Metropolis + Wolff cluster kernel (writes JSON).

For each ``--chains`` value: build :func:`flowmc.mcmc.cluster.cluster` at (``--L`` in ``--dim``
dimensions, ``--m2``, ``--lam``), compile it (timed separately), run ``--warmup`` steps from a cold
start, then ``--sweeps`` timed steps with ``--threads`` torch threads (numba's kernel is serial).
Each step is one checkerboard sweep with ``--num-hits`` Metropolis hits per site plus
``--num-clusters`` Wolff clusters. Reported: microseconds per sweep per chain (wall time of the
steps only), acceptance, mean cluster size, and ``chi2 = V <m^2>`` with its Gamma-method error and
tau_int (1/2 + sum rho, per sweep; the chains are replicas) and the cost per independent chi2
sample, ``2 tau_int`` times the time per sweep per chain.

``--scipy-sweeps N`` (> 0) also times, for comparison, the same step written without numba: a
torch-vectorised checkerboard sweep plus Wolff clusters as scipy ``connected_components`` of all
activated bonds (all chains in one block-diagonal graph), the seed's component flipped. Timing
only; it is the alternative that ``flowmc.mcmc.cluster``'s docstring measures against.

Example::

    NUMBA_NUM_THREADS=1 python scripts/bench_cluster.py --L 32 --m2 -4 --lam 4.572 \\
        --chains 1,32 --sweeps 20000,1000 --out bench_cluster.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from flowmc.analysis.autocorr import gamma_analysis
from flowmc.lattice.action import Phi4Action
from flowmc.mcmc import cluster as CL
from flowmc.mcmc.rng import ChainRNG


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def scipy_step(action: Phi4Action, delta: float, num_hits: int, num_clusters: int):
    """The step without numba (timing reference): torch checkerboard sweep + scipy clusters."""
    shape, vol, d = action.lattice_shape, action.volume, action.dim
    a, lam = 2.0 * d + action.m2, action.lam
    nbr = CL.neighbour_table(shape)
    parity = torch.from_numpy(np.indices(shape).sum(0).ravel() % 2 == 1)
    src, dst = np.repeat(np.arange(vol), d), nbr[:, :d].ravel()
    axes = tuple(range(1, d + 1))

    def step(phi: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        c = phi.shape[0]
        for p in (False, True):
            field = phi.view(c, *shape)
            h = sum(torch.roll(field, s, mu) for mu in axes for s in (1, -1)).view(c, vol)
            for _ in range(num_hits):
                u = torch.rand(2, c, vol, generator=gen, dtype=torch.float64)
                new = phi + delta * (2 * u[0] - 1)
                n2, o2 = new * new, phi * phi
                ds = a * (n2 - o2) + lam * (n2 * n2 - o2 * o2) - 2 * h * (new - phi)
                phi = torch.where((u[1] < torch.exp(-ds)) & (parity == p), new, phi)
        ph = phi.numpy()
        for _ in range(num_clusters):
            ub = torch.rand(c, vol * d, generator=gen, dtype=torch.float64).numpy()
            us = torch.rand(c, generator=gen, dtype=torch.float64).numpy()
            px, py = ph[:, src], ph[:, dst]
            on = (px * py > 0) & (ub < -np.expm1(-4.0 * px * py))
            cc, bb = np.nonzero(on)
            graph = sp.coo_matrix(
                (np.ones(cc.size), (cc * vol + src[bb], cc * vol + dst[bb])), shape=(c * vol,) * 2
            ).tocsr()
            lab = connected_components(graph, directed=False)[1].reshape(c, vol)
            seed = np.minimum((us * vol).astype(np.int64), vol - 1)
            ph = np.where(lab == lab[np.arange(c), seed][:, None], -ph, ph)
        return torch.from_numpy(ph)

    return step


def run_scipy(args: argparse.Namespace, num_chains: int) -> dict:
    action = Phi4Action(args.m2, args.lam, (args.L,) * args.dim)
    step = scipy_step(action, args.step_size, args.num_hits, args.num_clusters)
    gen = torch.Generator().manual_seed(args.seed)
    phi = torch.zeros(num_chains, action.volume, dtype=torch.float64)
    for _ in range(min(args.warmup, 50)):
        phi = step(phi, gen)
    t = time.perf_counter()
    for _ in range(args.scipy_sweeps):
        phi = step(phi, gen)
    elapsed = time.perf_counter() - t
    return {
        "chains": num_chains, "sweeps": args.scipy_sweeps,
        "us_per_sweep_per_chain": elapsed / (args.scipy_sweeps * num_chains) * 1e6,
    }


def run_one(args: argparse.Namespace, num_chains: int, num_sweeps: int) -> dict:
    shape = (args.L,) * args.dim
    action = Phi4Action(args.m2, args.lam, shape)
    t0 = time.perf_counter()
    sampler = CL.cluster(
        action, step_size=args.step_size, num_hits=args.num_hits, num_clusters=args.num_clusters
    )
    rng = ChainRNG(args.seed, num_chains)
    state = sampler.init(torch.zeros((num_chains, *shape), dtype=torch.float64))
    state, _ = sampler.step(state, rng)  # compiles (or loads the numba cache)
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, _ = sampler.step(state, rng)
    m2 = np.empty((num_chains, num_sweeps))
    acc = size = 0.0
    elapsed = 0.0
    cpu0 = time.process_time()
    for i in range(num_sweeps):
        t = time.perf_counter()
        state, info = sampler.step(state, rng)
        elapsed += time.perf_counter() - t
        m2[:, i] = state.phi.flatten(1).mean(1).square().numpy()
        acc += float(info.acceptance_rate.mean())
        size += float(info.cluster_size.mean())
    cpu = time.process_time() - cpu0
    vol = action.volume
    us = elapsed / (num_sweeps * num_chains) * 1e6
    out = {
        "chains": num_chains,
        "sweeps": num_sweeps,
        "compile_s": compile_s,
        "wall_s_steps": elapsed,
        "cpu_s_loop": cpu,
        "us_per_sweep_per_chain": us,
        "acceptance": acc / num_sweeps,
        "cluster_size": size / num_sweeps,
    }
    res = gamma_analysis(vol * m2, quiet=True)
    out.update(
        chi2=res.value, chi2_error=res.error, tau_int_chi2=res.tau_int,
        tau_int_chi2_error=res.tau_int_error,
        ms_per_independent_chi2=2.0 * res.tau_int * us / 1e3,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--L", type=int, default=32)
    p.add_argument("--dim", type=int, default=2)
    p.add_argument("--m2", type=float, default=-4.0)
    p.add_argument("--lam", type=float, default=4.572)
    p.add_argument("--chains", type=_ints, default=[1, 32], help="comma list, e.g. 1,32")
    p.add_argument("--sweeps", type=_ints, default=[20000, 1000],
                   help="timed sweeps, one value or one per --chains entry")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--step-size", type=float, default=1.0)
    p.add_argument("--num-hits", type=int, default=3)
    p.add_argument("--num-clusters", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scipy-sweeps", type=int, default=0,
                   help="also time the torch + scipy realisation for this many sweeps")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    sweeps = args.sweeps * len(args.chains) if len(args.sweeps) == 1 else args.sweeps
    if len(sweeps) != len(args.chains):
        p.error(f"Expected one --sweeps value or {len(args.chains)}; got {len(args.sweeps)}")
    torch.set_num_threads(args.threads)
    runs = []
    for c, n in zip(args.chains, sweeps):
        r = run_one(args, c, n)
        runs.append(r)
        print(json.dumps(r), flush=True)
    scipy_runs = []
    if args.scipy_sweeps > 0:
        for c in args.chains:
            scipy_runs.append(run_scipy(args, c))
            print(json.dumps({"scipy_reference": scipy_runs[-1]}), flush=True)
    report = {
        "flowmc_report": "bench-cluster",
        "argv": sys.argv,
        "L": args.L, "dim": args.dim, "m2": args.m2, "lam": args.lam,
        "step_size": args.step_size, "num_hits": args.num_hits,
        "num_clusters": args.num_clusters, "warmup": args.warmup, "seed": args.seed,
        "threads": args.threads,
        "numba_num_threads": os.environ.get("NUMBA_NUM_THREADS"),
        "loadavg": os.getloadavg(),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__,
        "runs": runs,
        "scipy_reference": scipy_runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
