"""Benchmark flowmc's training recipes against the seed recipe on the same machine, same run.

For each target point and recipe the flow is trained from scratch and the script records the
training wall time (optimizer steps only; evaluations are excluded), the process CPU time, steps
and steps/s, the reweighting ESS on 10x1024 fresh samples (on all 10,240 and mean +- spread over
the 10 batches), the independence-MH acceptance on the same draws, and ESS-vs-time checkpoints
(1,024 samples every ``--eval-every`` steps). The machine load (``/proc/loadavg``) is stored at the
start and end of each run: on a shared CPU the wall times are only as good as that load.

Points (issue 7):
    t1  (L=8,  m2=-4, lam=8)      target ESS >= 0.9 and acceptance >= 0.85, <= 10 min CPU training
    e2  (L=8,  m2=-4, lam=6.008)  target acceptance >= 0.85
    e5  (L=14, m2=-4, lam=5.113)  target acceptance >= 0.6, <= 30 min CPU training ("large")

Examples::

    python scripts/bench_train.py --out bench_train.json                 # t1: seed vs default
    python scripts/bench_train.py --quick --out /tmp/bench_quick.json    # smoke test (< 1 min)
    python scripts/bench_train.py --points t1,e2,e5 --out bench_all.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flowmc.action import Phi4Action
from flowmc.evaluate import evaluate_flow
from flowmc.flow import Z2SymmetricFlow
from flowmc.recipes import get_recipe
from flowmc.train import Trainer
from flowmc.workflow import train_flow

POINTS = {
    "t1": {"L": 8, "m2": -4.0, "lam": 8.0, "recipes": ["seed", "default"]},
    "e2": {"L": 8, "m2": -4.0, "lam": 6.008, "recipes": ["seed", "default"]},
    "e5": {"L": 14, "m2": -4.0, "lam": 5.113, "recipes": ["local", "default"]},
}


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:  # pragma: no cover - not Linux
        return [float("nan")] * 3


def bench_one(point: str, recipe: str, args: argparse.Namespace) -> dict:
    p = POINTS[point]
    action = Phi4Action(p["m2"], p["lam"], (p["L"], p["L"]))
    steps = get_recipe(recipe, action.lattice_shape)[1].n_steps
    if args.quick:
        steps = min(steps, 30)
    if args.steps is not None:
        steps = args.steps
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    every = args.eval_every or max(steps // 10, 1)
    curve: list[dict] = []

    def checkpoint(tr: Trainer) -> None:
        proposal = Z2SymmetricFlow(tr.flow) if tr.config.symmetric else tr.flow
        tr.flow.eval()
        r = evaluate_flow(proposal, action, args.curve_n, batch_size=args.curve_n,
                          generator=torch.Generator().manual_seed(10_000 + tr.step_count))
        tr.flow.train()
        curve.append({"step": tr.step_count, "train_time_s": round(tr.elapsed, 3),
                      "ess": r["ess"], "mh_acceptance": r["mh_acceptance"], "f_q": r["f_q"]})
        print(f"  [{point}/{recipe}] step {tr.step_count:6d}  t {tr.elapsed:7.1f} s  "
              f"ESS(1024) {r['ess']:.3f}  acc {r['mh_acceptance']:.3f}", file=sys.stderr)

    load0 = loadavg()
    cpu0 = time.process_time()
    result = train_flow(
        action, recipe=recipe, train_overrides={"n_steps": steps}, seed=args.seed, dtype=dtype,
        out=None if args.save_dir is None else Path(args.save_dir) / f"{point}_{recipe}.pt",
        force=True, checkpoint_every=0, progress=False, callback=checkpoint, callback_every=every,
        record={"script": "scripts/bench_train.py", **vars(args)},
    )  # the library workflow, as `flowmc train` (incl. its Z2 rule)
    cpu_train = time.process_time() - cpu0  # includes the checkpoints; reported for reference
    load1 = loadavg()
    trainer, flow_cfg, train_cfg = result.trainer, result.flow.config, result.trainer.config
    n_params = sum(q.numel() for q in result.flow.parameters())
    res = evaluate_flow(result.proposal, action, args.n_eval, batch_size=1024,
                        generator=torch.Generator().manual_seed(args.seed + 2))
    batches = np.asarray(res["ess_batches"])
    return {
        "point": point,
        "action": action.params(),
        "recipe": recipe,
        "flow_config": flow_cfg.to_dict(),
        "train_config": train_cfg.to_dict(),
        "symmetric": result.symmetric,
        "n_params": n_params,
        "steps": trainer.step_count,
        "skipped_steps": trainer.skipped_steps,
        "train_time_s": trainer.elapsed,
        "steps_per_s": trainer.step_count / max(trainer.elapsed, 1e-9),
        "samples_per_s": trainer.step_count * train_cfg.batch_size / max(trainer.elapsed, 1e-9),
        "cpu_time_s_incl_checkpoints": cpu_train,
        "loadavg_start": load0,
        "loadavg_end": load1,
        "eval": {
            "n": res["n"],
            "ess_all": res["ess"],
            "ess_batch_mean": float(batches.mean()),
            "ess_batch_sd": float(batches.std(ddof=1)) if batches.size > 1 else float("nan"),
            "ess_batch_err": res["ess_batch_err"],
            "ess_batches": res["ess_batches"],
            "mh_acceptance": res["mh_acceptance"],
            "f_q": res["f_q"],
            "f_q_err": res["f_q_err"],
            "log_z": res["log_z"],
            "log_z_err": res["log_z_err"],
            "frac_m_positive": res["frac_m_positive"],
            "n_nonfinite": res["n_nonfinite"],
        },
        "curve": curve,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench_train.json"))
    ap.add_argument("--points", default="t1", help="comma-separated subset of t1,e2,e5")
    ap.add_argument("--recipes", default=None,
                    help="comma-separated recipes (default: the point's seed/default pair)")
    ap.add_argument("--quick", action="store_true", help="30 steps, 2,048 samples: smoke test")
    ap.add_argument("--steps", type=int, default=None, help="override every recipe's n_steps")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-dir", type=Path, default=None,
                    help="write each trained flow as a flowmc checkpoint <point>_<recipe>.pt")
    ap.add_argument("--n-eval", type=int, default=10240, help="final evaluation samples")
    ap.add_argument("--curve-n", type=int, default=1024, help="samples per ESS checkpoint")
    ap.add_argument("--eval-every", type=int, default=0, help="steps between ESS checkpoints")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_eval = min(args.n_eval, 2048)
        args.curve_n = min(args.curve_n, 256)
    torch.set_num_threads(args.threads)
    points = [s.strip() for s in args.points.split(",") if s.strip()]
    for pt in points:
        if pt not in POINTS:
            raise ValueError(f"Expected points in {sorted(POINTS)}; got {pt!r}")
    out = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "argv": sys.argv if argv is None else argv,
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": [],
    }
    for pt in points:
        recipes = args.recipes.split(",") if args.recipes else POINTS[pt]["recipes"]
        for rec in recipes:
            print(f"== {pt} / {rec}", file=sys.stderr)
            run = bench_one(pt, rec, args)
            out["runs"].append(run)
            e = run["eval"]
            print(f"{pt:3s} {rec:8s} steps {run['steps']:6d}  train {run['train_time_s']:7.1f} s "
                  f"({run['steps_per_s']:.2f} steps/s)  ESS(all {e['n']}) {e['ess_all']:.3f}  "
                  f"ESS(batch) {e['ess_batch_mean']:.3f} +- {e['ess_batch_sd']:.3f}  "
                  f"MH acc {e['mh_acceptance']:.3f}  load {run['loadavg_start'][0]:.1f}->"
                  f"{run['loadavg_end'][0]:.1f}")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1, default=_jsonable))
    return 0


def _jsonable(x: object) -> object:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
