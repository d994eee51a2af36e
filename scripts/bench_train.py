"""Benchmark flowmc's training recipes on the same machine, in the same run: ESS, acceptance, time.

For each point and recipe the flow is trained from scratch (``default`` beyond extent 8 through
its stages: train at L = 8, transfer, fine-tune — :func:`flowmc.training.workflow.train_staged`) and
the script records the training wall time summed over every stage (optimizer steps only), the
process CPU time of the whole training call, steps and steps/s, the reweighting ESS on 10x1024 fresh
samples (all 10,240, and mean +- spread over the 10 batches), the independence-MH acceptance on the
same draws, F_q and log Z. With ``--mh-n`` it also runs a flow Metropolis-Hastings ensemble with the
trained flow (``--mh-chains`` chains) and reports tau_int(chi2), the longest rejection run and the
cost per independent chi2 sample; with ``--hmc-n`` an HMC ensemble at the same point (trajectory
length ``--hmc-traj-length``) and the z-scores of chi2, |m|, U4 and E between the two
(``flowmc compare``). The load average is stored at the start and end of each run.

Points (issues 7 and 10):
    t1   (L=8,  m2=-4, lam=8)       ESS >= 0.98, acceptance >= 0.93 in <= 10 min; ESS >= 0.9 in <= 2
    e2   (L=8,  m2=-4, lam=6.008)   the arXiv:1904.12072 line m_p L ~ 4
    e4   (L=12, m2=-4, lam=5.276)
    e5   (L=14, m2=-4, lam=5.113)   acceptance >= 0.8 in <= 30 min (all stages)
    c16  (L=16, m2=-4, lam=4.25)    acceptance >= 0.6 and flow-MH tau_int(chi2) <= 3 in <= 30 min
    c32  (L=32, m2=-4, lam=4.572)   by transfer, <= 60 CPU-min in all

Examples::

    python scripts/bench_train.py --points t1 --recipes seed,local,fast,default --out t1.json
    python scripts/bench_train.py --points c16 --recipes default --mh-n 5000 --hmc-n 5000 \
        --out c16.json
    python scripts/bench_train.py --quick --out /tmp/bench_quick.json    # smoke test (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from flowmc.flows.flow import Z2SymmetricFlow
from flowmc.io.checkpoint import load_checkpoint
from flowmc.lattice.action import Phi4Action
from flowmc.training.evaluate import evaluate_flow
from flowmc.training.recipes import Stage, get_recipe, plan_stages
from flowmc.training.train import Trainer
from flowmc.training.workflow import train_staged

POINTS = {
    "t1": {"L": 8, "m2": -4.0, "lam": 8.0, "recipes": ["seed", "local", "fast", "default"]},
    "e2": {"L": 8, "m2": -4.0, "lam": 6.008, "recipes": ["local", "default"]},
    "e4": {"L": 12, "m2": -4.0, "lam": 5.276, "recipes": ["local", "default"]},
    "e5": {"L": 14, "m2": -4.0, "lam": 5.113, "recipes": ["local", "default"]},
    "c16": {"L": 16, "m2": -4.0, "lam": 4.25, "recipes": ["local", "default"]},
    "c32": {"L": 32, "m2": -4.0, "lam": 4.572, "recipes": ["default"]},
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
    out = (Path(args.save_dir) if args.save_dir else Path(args.work)) / f"{point}_{recipe}.pt"
    stages = None
    if args.quick:  # the recipe's stages, each cut to the quick step count
        stages = [Stage(st.lattice_shape, replace(st.train, n_steps=steps))
                  for st in plan_stages(recipe, action.lattice_shape)]
    result = train_staged(
        action, recipe=recipe, stages=stages,
        train_overrides={"n_steps": args.steps} if args.steps else None,
        seed=args.seed, dtype=dtype, out=out, force=True, checkpoint_every=0, progress=False,
        callback=checkpoint if args.curve else None, callback_every=every,
        record={"script": "scripts/bench_train.py", **vars(args)},
    )  # the library workflow, as `flowmc train` (its stages and its Z2 rule)
    cpu_train = time.process_time() - cpu0  # every stage, checkpoints and curve evaluations
    load1 = loadavg()
    stage_records = [_stage_record(path) for path in _ancestry(out)]
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
        "stages": stage_records,
        "train_time_s": result.training_time_total_s,
        "train_time_last_stage_s": trainer.elapsed,
        "steps_per_s": trainer.step_count / max(trainer.elapsed, 1e-9),
        "samples_per_s": trainer.step_count * train_cfg.batch_size / max(trainer.elapsed, 1e-9),
        "cpu_time_s": cpu_train,
        "checkpoint": str(out),
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
        "mh": _mh_run(out, action, args) if args.mh_n else None,
    }


def _ancestry(path: Path) -> list[Path]:
    """The checkpoint and its init_from ancestors, first stage first."""
    chain = [path]
    while True:
        anc = (load_checkpoint(chain[-1]).get("meta", {}) or {}).get("init_from")
        if not anc or not Path(anc["path"]).exists():
            return chain[::-1]
        chain.append(Path(anc["path"]))


def _stage_record(path: Path) -> dict:
    ck = load_checkpoint(path)
    meta = ck.get("meta", {}) or {}
    return {"checkpoint": str(path), "lattice_shape": ck["flow_config"]["lattice_shape"],
            "steps": (ck.get("trainer_state") or {}).get("step"),
            "lr": ck["train_config"].get("lr"), "train_time_s": meta.get("training_time_s")}


def _mh_run(model_path: Path, action: Phi4Action, args: argparse.Namespace) -> dict:
    """Flow MH (and optionally HMC) ensembles at the point: tau_int, costs, agreement."""
    from flowmc.analysis.compare import compare
    from flowmc.analysis.ensemble import analyze
    from flowmc.io.checkpoint import load_model
    from flowmc.sampling.run import HMCSettings, RunConfig, run_ensemble

    work = Path(args.work)
    flow_h5 = work / f"{model_path.stem}_mh.h5"
    t0, c0 = time.perf_counter(), time.process_time()
    summary = run_ensemble(flow_h5, RunConfig(n=args.mh_n, chains=args.mh_chains, seed=args.seed),
                           model=load_model(model_path), force=True, progress=False)
    rec: dict = {"flow": {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                          "sampling_s": summary.get("seconds"), "path": str(flow_h5)}}
    res = analyze(flow_h5, discard=args.mh_n // 20)
    rec["flow"].update({
        "acceptance": res.get("acceptance"),
        "longest_rejection_run": res.get("longest_rejection_run"),
        **{k: {f: res[k][f] for f in ("value", "error", "tau_int", "tau_int_error", "reliable")}
           for k in ("chi2", "abs_m", "binder", "energy")},
    })
    n_cfg = args.mh_n * args.mh_chains
    rec["flow"]["cost_per_independent_chi2_s"] = (
        summary["seconds"] * 2 * res["chi2"]["tau_int"] / n_cfg)
    if args.hmc_n:
        hmc_h5 = work / f"{model_path.stem}_hmc.h5"
        t0, c0 = time.perf_counter(), time.process_time()
        hs = run_ensemble(hmc_h5, RunConfig(n=args.hmc_n, chains=args.mh_chains, seed=args.seed,
                                            hmc=HMCSettings(traj_length=args.hmc_traj_length)),
                          action=action, force=True, progress=False)  # fmt: skip
        cmp = compare(flow_h5, hmc_h5, discard=min(args.mh_n, args.hmc_n) // 20)
        labels = cmp["labels"]
        rec["hmc"] = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                      "sampling_s": hs.get("seconds"), "path": str(hmc_h5),
                      "step_size": hs.get("step_size"), "acceptance": hs.get("acceptance")}
        rec["agreement"] = {}
        for k in ("chi2", "abs_m", "binder", "energy"):
            row = cmp["observables"].get(k, {})
            rec["agreement"][k] = {
                "z": row.get("diff_sigma"),
                "tau_int_flow": row.get(labels[0], {}).get("tau_int"),
                "tau_int_hmc": row.get(labels[1], {}).get("tau_int"),
                "cost_per_independent_s_flow": row.get(labels[0], {}).get("cost_per_independent_s"),
                "cost_per_independent_s_hmc": row.get(labels[1], {}).get("cost_per_independent_s"),
            }
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench_train.json"))
    ap.add_argument("--points", default="t1", help=f"comma-separated subset of {sorted(POINTS)}")
    ap.add_argument("--recipes", default=None,
                    help="comma-separated recipes (default: the point's seed/default pair)")
    ap.add_argument("--quick", action="store_true", help="30 steps, 2,048 samples: smoke test")
    ap.add_argument("--steps", type=int, default=None, help="override every recipe's n_steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-dir", type=Path, default=None,
                    help="write each trained flow as a flowmc checkpoint <point>_<recipe>.pt")
    ap.add_argument("--n-eval", type=int, default=10240, help="final evaluation samples")
    ap.add_argument("--curve-n", type=int, default=1024, help="samples per ESS checkpoint")
    ap.add_argument("--eval-every", type=int, default=0, help="steps between ESS checkpoints")
    ap.add_argument("--curve", action="store_true", help="ESS checkpoints during training")
    ap.add_argument("--work", type=Path, default=Path("results/bench_train"),
                    help="folder for checkpoints and ensembles (without --save-dir)")
    ap.add_argument("--mh-n", type=int, default=0, help="flow-MH rows per chain (0: no MH run)")
    ap.add_argument("--mh-chains", type=int, default=4, help="chains of the MH and HMC runs")
    ap.add_argument("--hmc-n", type=int, default=0, help="HMC rows per chain (0: no HMC run)")
    ap.add_argument("--hmc-traj-length", type=float, default=2.0, help="HMC trajectory length")
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
                  f"(cpu {run['cpu_time_s']:7.1f} s) "
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
