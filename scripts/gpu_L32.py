"""GPU recipe for L=32 lattice phi^4 at (m2, lam) = (-4, 4.572): train, evaluate, save.

This is a documented, single-script recipe meant for one GPU (``--device cuda``). It has only been
smoke-tested on a CPU (``--smoke``, tiny lattice and few steps, < 30 s); the numbers it prints on
a GPU are the measurement, nothing here claims them in advance.

Recipe (the L=8 ``default`` recipe scaled up; see docs/recipes.md for why each choice):

* flow: rational-quadratic spline couplings with linear tails (Durkan et al. arXiv:1906.04032),
  checkerboard masks, periodic CNN conditioners; at L=32 the correlation length is larger, so
  more layers and wider/deeper conditioners (receptive field grows with depth x kernel);
* training: reverse KL with Adam, large batch (GPU throughput is flat in batch size until the
  device is full), cosine learning-rate decay, gradient clipping, and a batch-size ramp (small
  batches early for many cheap steps, large batches late for low-variance gradients);
* prior sigma 0.5 with spline bound 2.5 (5 sigma): outside the bound every spline layer is the
  identity, so prior sites beyond it reach the field unchanged with weight ~0; at V=1024 sites a
  bound of 4 sigma would spoil ~6% of all samples (docs/recipes.md);
* the final ``--path-steps`` use the path-gradient estimator (Vaitl et al. arXiv:2207.08219),
  whose variance vanishes as q -> p, to polish the flow.

Outputs: a flowmc checkpoint (``--out``, loadable by ``flowmc eval --model``; the earlier stages
are kept next to it as ``OUT.stage<i>.pt`` and recorded in its ``meta["init_from"]`` chain) and a
JSON report (``--json``) with the training curve and the final ESS / MH acceptance on
``--n-eval`` samples.

Examples::

    python scripts/gpu_L32.py --device cuda --out phi4_L32.pt --json phi4_L32.json
    python scripts/gpu_L32.py --smoke            # CPU, tiny, < 30 s
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from flowmc.flows.flow import FlowConfig
from flowmc.lattice.action import Phi4Action
from flowmc.training.evaluate import evaluate_flow
from flowmc.training.train import TrainConfig
from flowmc.training.workflow import train_flow


def build(args: argparse.Namespace) -> tuple[Phi4Action, FlowConfig]:
    shape = (args.L, args.L)
    action = Phi4Action(args.m2, args.lam, shape)
    flow_cfg = FlowConfig(
        shape,
        n_layers=args.layers,
        hidden=tuple(int(h) for h in args.hidden.split(",")),
        kernel_size=args.kernel,
        activation="gelu",
        coupling="spline",
        prior_sigma=args.prior_sigma,
        extra={"n_bins": args.bins, "spline_bound": args.bound},
    )
    return action, flow_cfg


def stages(args: argparse.Namespace) -> list[TrainConfig]:
    """Batch-size ramp: constant lr while the batch grows, a cosine decay to ``lr/10`` in the
    last reverse-KL stage, then path-gradient polishing from ``lr/10`` down to 0."""
    out = []
    per = max(args.steps // len(args.batches), 1)
    for i, b in enumerate(args.batches):
        last = i == len(args.batches) - 1
        out.append(TrainConfig(n_steps=per, batch_size=b, lr=args.lr,
                               schedule="cosine" if last else "constant", lr_min_factor=0.1,
                               grad_clip=args.grad_clip, estimator="reparam"))
    if args.path_steps:
        out.append(TrainConfig(n_steps=args.path_steps, batch_size=args.batches[-1],
                               lr=args.lr * 0.1, schedule="cosine", grad_clip=args.grad_clip,
                               estimator="path"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test: L=8, 20 steps")
    ap.add_argument("--L", type=int, default=32)
    ap.add_argument("--m2", type=float, default=-4.0)
    ap.add_argument("--lam", type=float, default=4.572)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", default="64,64,64")
    ap.add_argument("--kernel", type=int, default=3)
    ap.add_argument("--bins", type=int, default=8)
    ap.add_argument("--bound", type=float, default=2.5,
                    help="spline half-width (>= 5 prior sigmas)")
    ap.add_argument("--prior-sigma", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=20000, help="reverse-KL steps over all stages")
    ap.add_argument("--batches", default="256,512,1024,2048", help="batch-size ramp")
    ap.add_argument("--path-steps", type=int, default=2000, help="final path-gradient steps")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--grad-clip", type=float, default=10.0)
    ap.add_argument("--n-eval", type=int, default=102400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("phi4_L32_m2-4_lam4.572.pt"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.L, args.layers, args.hidden = "cpu", 8, 2, "4"
        args.steps, args.batches, args.path_steps, args.n_eval = 10, "16,32", 3, 512
        torch.set_num_threads(1)  # tiny tensors: more threads only add synchronisation
        if args.out == ap.get_default("out"):
            args.out = Path("/tmp/flowmc_gpu_L32_smoke.pt")
    args.batches = [int(b) for b in str(args.batches).split(",")]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available (use --smoke for a CPU test)")
    dtype = torch.float64 if args.dtype == "float64" else torch.float32

    action, flow_cfg = build(args)
    # every stage is one library call; stage i > 0 starts from stage i - 1's checkpoint
    # (init_from: weights kept, fresh Adam state), so the final checkpoint's meta counts the
    # training time of all stages (training_time_total_s)
    cfgs = stages(args)
    history: list[dict] = []
    prev: Path | None = None
    t0 = time.perf_counter()
    for i, cfg in enumerate(cfgs):
        last = i == len(cfgs) - 1
        path = args.out if last else args.out.with_name(f"{args.out.stem}.stage{i}.pt")
        res = train_flow(
            action, flow_config=None if prev else flow_cfg, train_config=cfg,
            seed=args.seed + i, device=device, dtype=dtype, out=path, force=True,
            init_from=prev, checkpoint_every=0, progress=not args.smoke,
            symmetric=None if last else False,  # the Z2 sign check once, on the final flow
            record={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            meta={"script": "scripts/gpu_L32.py", "stage": i},
        )  # fmt: skip
        prev = path
        h = res.history
        tail = h["ess"][-50:]
        history.append({"stage": i, "batch_size": cfg.batch_size, "estimator": cfg.estimator,
                        "steps": res.trainer.step_count, "train_time_s": res.training_time_s,
                        "batch_ess_tail": sum(tail) / max(len(tail), 1),
                        "loss_tail": sum(h["loss"][-50:]) / max(len(h["loss"][-50:]), 1),
                        "checkpoint": str(path)})
        print(f"stage {i}: batch {cfg.batch_size} {cfg.estimator} {res.trainer.step_count} steps "
              f"{res.training_time_s:.1f} s  batch ESS {history[-1]['batch_ess_tail']:.3f}",
              file=sys.stderr)
    wall = time.perf_counter() - t0
    flow = res.flow
    ev = evaluate_flow(res.proposal, action, args.n_eval, batch_size=1024,
                       generator=torch.Generator(device).manual_seed(args.seed + 2)).to_dict()
    report = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "flow_config": flow.config.to_dict(), "stages": history, "train_wall_s": wall,
              "training_time_total_s": res.training_time_total_s, "symmetric": res.symmetric,
              "eval": {k: v for k, v in ev.items() if not (isinstance(v, float)
                                                           and not math.isfinite(v))}}
    print(f"L={args.L} (m2={args.m2}, lam={args.lam}): trained {wall:.1f} s "
          f"(optimizer {res.training_time_total_s:.1f} s); ESS {ev['ess']:.4f}, "
          f"MH acceptance {ev['mh_acceptance']:.4f} on {ev['n']} samples; checkpoint {args.out}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
