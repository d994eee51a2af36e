"""Benchmark: flow-MH throughput (samples/s) and acceptance, flowmc vs the seed notebook's loop.

Both samplers use the same trained flow, on the same machine, in the same run:

* ``seed_loop``: the notebook's ``make_mcmc_ensemble`` (arXiv:2101.08176), as the notebook runs
  it on a CPU: the flow in float64 (its default tensor type on CPU), autograd left on, a batch of
  64 proposals per flow call, then accept/reject one proposal at a time with torch scalar
  operations, appending each configuration to a Python list. It runs on the same flow as flowmc
  and, with ``--seed-model``, also on a flow trained with the seed's recipe;
* ``flowmc_kernel``: flowmc's block kernel (``imh.flow_imh``: one flow call for K proposals under
  ``no_grad``, then the accept/reject loop on plain floats), configurations kept in memory;
* ``flowmc_sample``: the full ``flowmc sample`` path, configurations written to HDF5.

Usage::

    python scripts/bench_sample.py --model data/phi4_L8_m2-4_lam8.pt --out bench_sample.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from flowmc.io.checkpoint import load_model
from flowmc.mcmc import imh
from flowmc.mcmc.rng import ChainRNG
from flowmc.sampling.run import RunConfig, run_ensemble

ROOT = Path(__file__).resolve().parents[1]


def seed_loop(proposal, action, n: int, batch_size: int = 64) -> dict:  # noqa: ANN001
    """The seed notebook's independence Metropolis loop, reproduced for timing."""
    import copy

    proposal = copy.deepcopy(proposal).double()
    for p in proposal.parameters():
        p.requires_grad_(True)  # the notebook samples with autograd on
    history = {"x": [], "logq": [], "logp": [], "accepted": []}
    last_logp = last_logq = last_x = None
    t0 = time.perf_counter()
    while len(history["x"]) < n:
        x, logq = proposal.sample(batch_size)
        logp = -action(x)
        x, logq, logp = x.detach(), logq.detach(), logp.detach()
        for i in range(batch_size):
            new_x, new_logq, new_logp = x[i], logq[i], logp[i]
            if last_logp is None:
                accepted = True
            else:
                p_accept = torch.exp((new_logp - new_logq) - (last_logp - last_logq))
                p_accept = min(1, p_accept)
                draw = torch.rand(1)
                accepted = bool(draw < p_accept)
            if accepted:
                last_x, last_logq, last_logp = new_x, new_logq, new_logp
            history["x"].append(last_x.numpy())
            history["logq"].append(float(last_logq))
            history["logp"].append(float(last_logp))
            history["accepted"].append(accepted)
    seconds = time.perf_counter() - t0
    acc = sum(history["accepted"][1:n]) / (n - 1)
    return {"n": n, "seconds": seconds, "samples_per_second": n / seconds, "acceptance": acc}


@torch.no_grad()
def flowmc_kernel(proposal, action, n: int, batch: int, chains: int = 1) -> dict:  # noqa: ANN001
    rng = ChainRNG(0, chains)
    kernel = imh.flow_imh(proposal, action, batch)
    state = imh.sample_init(proposal, action, rng)
    t0 = time.perf_counter()
    done, acc, kept = 0, 0, []
    while done < n:
        state, info = kernel.step(state, rng)
        kept.append(info.phi)
        acc += int(info.is_accepted.sum())
        done += batch
    seconds = time.perf_counter() - t0
    total = done * chains
    return {"n": total, "seconds": seconds, "samples_per_second": total / seconds,
            "acceptance": acc / total, "batch": batch, "chains": chains}


def flowmc_sample(model, n: int, batch: int, chains: int = 1) -> dict:  # noqa: ANN001
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.h5"
        res = run_ensemble(out, RunConfig(n=n, chains=chains, batch=batch, seed=0), model=model,
                           progress=False)
        res["file_mb"] = out.stat().st_size / 2**20
    res["kernel"] = res.pop("sampler")  # "flow-imh"; "sampler" names the benchmark row
    res["samples_per_second"] = res["n"] * chains / res["seconds"]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "data" / "phi4_L8_m2-4_lam8.pt")
    p.add_argument("--seed-model", type=Path, default=None,
                   help="a flow trained with the seed's recipe, for the seed loop as published")
    p.add_argument("--out", type=Path, default=Path("bench_sample.json"))
    p.add_argument("--n", type=int, default=65536, help="samples per flowmc measurement")
    p.add_argument("--n-seed", type=int, default=8192, help="samples for the seed loop")
    p.add_argument("--threads", type=str, default="1,2")
    p.add_argument("--batches", type=str, default="256,1024,4096")
    p.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    args = p.parse_args()
    if args.quick:
        args.n, args.n_seed, args.batches, args.threads = 2048, 512, "256,1024", "1"
    results = {
        "model": str(args.model),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch": str(torch.__version__), "load_avg": os.getloadavg()},
        "runs": [],
    }
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        model = load_model(args.model)
        prop, action = model.proposal, model.action
        flowmc_kernel(prop, action, 1024, 256)  # warm-up
        if args.seed_model is not None:
            sm = load_model(args.seed_model, symmetric=False)
            own = seed_loop(sm.proposal, sm.action, args.n_seed)
            results["runs"].append({"sampler": "seed_loop_seed_flow", "threads": threads, **own,
                                    "model": str(args.seed_model)})
            print(f"threads={threads} seed loop, seed flow: {own['samples_per_second']:9.0f} "
                  f"samples/s, acceptance {own['acceptance']:.3f}")
        seed = seed_loop(prop, action, args.n_seed)
        results["runs"].append({"sampler": "seed_loop", "threads": threads, **seed})
        print(f"threads={threads} seed loop, same flow: {seed['samples_per_second']:9.0f} "
              f"samples/s, acceptance {seed['acceptance']:.3f}")
        for batch in [int(b) for b in args.batches.split(",")]:
            k = flowmc_kernel(prop, action, args.n, batch)
            k["speedup_vs_seed"] = k["samples_per_second"] / seed["samples_per_second"]
            results["runs"].append({"sampler": "flowmc_kernel", "threads": threads, **k})
            print(f"threads={threads} flowmc kernel K={batch}: {k['samples_per_second']:9.0f} "
                  f"samples/s ({k['speedup_vs_seed']:.1f}x), acceptance {k['acceptance']:.3f}")
        s = flowmc_sample(model, args.n, 1024)
        s["speedup_vs_seed"] = s["samples_per_second"] / seed["samples_per_second"]
        results["runs"].append({"sampler": "flowmc_sample_hdf5", "threads": threads, **s})
        print(f"threads={threads} flowmc sample -> HDF5 K=1024: {s['samples_per_second']:9.0f} "
              f"samples/s ({s['speedup_vs_seed']:.1f}x), acceptance {s['acceptance']:.3f}")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
