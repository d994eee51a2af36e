#!/usr/bin/env python
r"""Issue 20's measurements of a trained continuous flow: quality, exactness and cost.

For each ``--model`` (a checkpoint or a shipped name; a conditional flow with ``--lam``), in this
process, with the torch threads of ``--threads`` (default 1):

1. **quality**: :func:`flowmc.training.evaluate.evaluate_model` on ``--n`` fresh draws: Kish
   ESS (all draws and over batches), the independence-MH acceptance on the same draws,
   :math:`F_q` and :math:`\log\hat Z`;
2. **exactness of log q**: for every continuous layer, :math:`\ell_N - \ell_{2N}` (sd, mean,
   rms and max over draws) and the backward-integration round trip on ``--n-discrepancy`` draws
   (:func:`flowmc.flows.cnf.log_det_discrepancy`), at the flow's ``N`` and at each of
   ``--steps`` (e.g. ``10,20,40``); and on ``--n-exact`` draws (float64), at ``N`` and each of
   ``--exact-steps``, the true error :math:`\delta = \ell_N - \log|\det J|` against the exact
   log determinant of the discrete ``N``-step map by autograd
   (:func:`flowmc.flows.cnf.exact_log_det`: ``V`` backward passes per draw), beside the estimate
   :math:`\ell_N - \ell_{2N}` on the same draws (the sd is what can bias a chain);
3. **cost**: CPU and wall time per configuration of a sampling flow call (batch
   ``--batch``, no gradient) at each step count, and the training time recorded in the
   checkpoint (``meta["training_time_total_s"]``, wall, all stages).

The JSON (``--json``, report kind ``bench-cnf``) holds every number, the machine, torch version,
threads and the 1-minute load average before and after.

Example:
    python scripts/bench_cnf.py --model data/phi4_L16_m2-4_lam4.25.pt --steps 10,20,40 \
        --n 10240 --n-exact 4 --json docs/results/bench_cnf_L16.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from flowmc.flows.cnf import exact_log_det, log_det_discrepancy
from flowmc.flows.flow import Flow
from flowmc.io.checkpoint import load_model, machine_info
from flowmc.report import check_outputs, write_json
from flowmc.training.evaluate import evaluate_model

REPORT_KIND = "bench-cnf"


def _layer_inputs(flow: Flow, n: int, seed: int, lam: float | None) -> list[tuple]:
    """``(layer, inputs, context)`` for every continuous layer, on ``n`` prior draws."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        x = flow.prior.sample(n, generator=g)
        ctx = flow._context(lam, n, x)
        for layer in flow.layers:
            if layer in flow.continuous_layers:
                out.append((layer, x.clone(), ctx))
            x, _ = layer(x, ctx) if ctx is not None else layer(x)
    return out


def _sd(x: torch.Tensor) -> float:
    return float(x.std()) if x.numel() > 1 else 0.0


def _flow_call_cost(proposal: torch.nn.Module, batch: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        proposal.sample(min(batch, 8), generator=g)  # warm-up
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(repeats):
            proposal.sample(batch, generator=g)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    n = batch * repeats
    return {"configs": n, "cpu_ms_per_config": 1e3 * cpu / n, "wall_ms_per_config": 1e3 * wall / n}


def bench_model(args: argparse.Namespace, name: str) -> dict:
    model = load_model(name, lam=args.lam)
    flow = model.flow
    if not flow.continuous_layers:
        raise SystemExit(f"{name}: not a continuous flow (no continuous layers)")
    layer0 = flow.continuous_layers[0]
    trained_steps = layer0.int_steps
    rec: dict = {"model": str(model.path), "action": model.action.params(), "lam": model.lam,
                 "int_steps": trained_steps, "integrator": layer0.integrator,
                 "n_params": sum(p.numel() for p in flow.parameters()),
                 "training_time_total_s": model.checkpoint.get("meta", {}).get(
                     "training_time_total_s")}  # fmt: skip
    t0 = time.process_time()
    res = evaluate_model(model, args.n, batch_size=args.eval_batch,
                         generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    rec["eval"] = {k: v for k, v in res.to_dict().items()
                   if k not in ("ess_batches", "by_magnetization")}  # fmt: skip
    rec["eval_cpu_s"] = time.process_time() - t0
    steps = sorted({trained_steps, *args.steps})
    rec["discrepancy"], rec["cost"] = [], []
    lam = model.lam
    for n_steps in steps:
        flow.set_int_steps(n_steps)
        for layer, x, ctx in _layer_inputs(flow, args.n_discrepancy, args.seed + 1, lam):
            d = log_det_discrepancy(layer, x, ctx)
            rec["discrepancy"].append(d._asdict())
        rec["cost"].append({"int_steps": n_steps,
                            **_flow_call_cost(model.proposal, args.batch, args.repeats)})
        print(f"  N = {n_steps}: sd(l_N - l_2N) {rec['discrepancy'][-1]['sd']:.3g}, "
              f"{rec['cost'][-1]['cpu_ms_per_config']:.3f} CPU-ms per config", flush=True)
    flow.set_int_steps(trained_steps)
    if args.n_exact:
        flow64 = load_model(name, lam=args.lam, dtype=torch.float64).flow
        rec["exact"] = []
        for n_steps in [trained_steps, *args.exact_steps]:
            for layer, x, ctx in _layer_inputs(flow64, args.n_exact, args.seed + 2, lam):
                c0 = time.process_time()
                with torch.no_grad():
                    _, ell = layer.integrate(x, ctx, steps=n_steps)
                    _, ell2 = layer.integrate(x, ctx, steps=2 * n_steps)
                delta = (ell - exact_log_det(layer, x, ctx, steps=n_steps)).double()
                proxy = (ell - ell2).double()
                rec["exact"].append({
                    "int_steps": n_steps, "n": args.n_exact,
                    "delta": [float(v) for v in delta], "proxy": [float(v) for v in proxy],
                    "delta_mean": float(delta.mean()), "delta_sd": _sd(delta),
                    "proxy_mean": float(proxy.mean()), "proxy_sd": _sd(proxy),
                    "cpu_s": time.process_time() - c0,
                })  # fmt: skip
                e = rec["exact"][-1]
                print(f"  exact (float64, N = {n_steps}, {args.n_exact} draws): delta = l_N - "
                      f"log|det J| mean {e['delta_mean']:.3g} sd {e['delta_sd']:.3g}; l_N - l_2N "
                      f"mean {e['proxy_mean']:.3g} sd {e['proxy_sd']:.3g}", flush=True)
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="checkpoint or shipped name")
    p.add_argument("--lam", type=float, default=None, help="coupling of a conditional flow")
    p.add_argument("--n", type=int, default=10240, help="draws for ESS and acceptance")
    p.add_argument("--eval-batch", type=int, default=1024)
    p.add_argument("--n-discrepancy", type=int, default=1024, help="draws for l_N - l_2N")
    p.add_argument("--n-exact", type=int, default=2, help="draws for the autograd log det")
    p.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",") if v], default=[],
                   help="further step counts to measure, e.g. 10,40")
    p.add_argument("--exact-steps", type=lambda s: [int(v) for v in s.split(",") if v],
                   default=[], help="further step counts for the autograd comparison")
    p.add_argument("--batch", type=int, default=256, help="configurations per timed flow call")
    p.add_argument("--repeats", type=int, default=2, help="timed flow calls per step count")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.json:
        check_outputs([(args.json, "json", REPORT_KIND)])
    load0 = os.getloadavg()[0]
    out = {"machine": machine_info(), "torch": torch.__version__, "threads": args.threads,
           "load_before": load0, "argv": sys.argv[1:], "models": []}  # fmt: skip
    for name in args.model:
        print(f"{name}:", flush=True)
        out["models"].append(bench_model(args, name))
        e = out["models"][-1]["eval"]
        print(f"  ESS {e['ess']:.4f}, MH acceptance {e['mh_acceptance']:.4f}", flush=True)
    out["load_after"] = os.getloadavg()[0]
    if args.json:
        write_json(args.json, out, REPORT_KIND)
    return 0


if __name__ == "__main__":
    sys.exit(main())
