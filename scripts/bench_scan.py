"""Benchmark of issue 12: one flow for a whole scan in the coupling (writes JSON).

Three parts, run one after the other in this process (one heavy job at a time, ``--threads``
torch threads, default 1); every stage records its wall time, the process CPU time
(``time.process_time``) and the load average (``os.getloadavg()``) before and after it:

1. ``conditional`` — one flow conditioned on λ over ``--cond-range`` (default [4, 8]) at
   ``--L`` (8) and m² = ``--m2`` (−4), trained with ``--recipe`` (+ ``--flow-overrides`` /
   ``--train-overrides`` as JSON) for ``--steps`` steps, or, without ``--steps``, for as many
   steps as fit ``--train-budget-s`` (default 1200 s: the issue's 20 minutes), calibrated on 10
   steps of a throwaway copy; or ``--model PATH`` (an existing conditional flow, its training
   time read from its checkpoint). At each ``--check-lams`` (4, 5, 6, 7, 8): the MH acceptance
   (of ``--eval-n`` fresh draws, and of a flow-MH ensemble), and χ₂, |m|, U₄ of the flow-MH
   ensemble against an HMC ensemble at the same point (z-scores). Targets: acceptance ≥ 0.7 and
   |z| < 3 everywhere. Both are ``flowmc scan`` runs (the HMC scan anchors its thermodynamic
   integration at the flow's log Z, so f(λ) from both is in the JSON).
2. ``cost`` — the 9-point scan ``--cost-lams`` (4:8:9) at ``--L`` with that flow (sampling,
   flow log Z and analysis, timed) plus its training, against 9 separate trainings with the
   ``--separate-recipe`` (default) plus the same sampling: the script trains ONE flow at the
   middle coupling, multiplies its training time by the number of points (said in the JSON), and
   adds the sampling and analysis time measured at each point of the scan. Target: ratio ≤ 1/3.
3. ``critical`` — ``flowmc scan`` at ``--crit-sizes`` (8 16) over ``--crit-lams`` (3.8:4.8:9),
   each size sampled as ``--crit-models`` says (``8=hmc,16=hmc`` by default; ``L=PATH`` for a
   flow, with ``--crit-hmc-traj K`` for the hybrid) and the U₄ crossing with its error. Target:
   error ≤ 0.03 in λ.

Examples::

    python scripts/bench_scan.py --out bench_scan.json                   # all parts
    python scripts/bench_scan.py --parts conditional,cost --steps 3000 --out b.json
    python scripts/bench_scan.py --quick --out /tmp/bench_scan_quick.json  # smoke test (< 60 s)

The scans and flows go to ``--workdir`` (default: the output's name without suffix +
``_work``), which must be new or empty (timings of a resumed scan would mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowmc.flows.flow import build_flow
from flowmc.io.checkpoint import load_checkpoint
from flowmc.lattice.action import Phi4Action
from flowmc.sampling.run import HMCSettings, RunConfig
from flowmc.scan import ScanConfig, ScanOptions, parse_lams, parse_models, run_scan
from flowmc.training.recipes import get_recipe
from flowmc.training.train import Trainer
from flowmc.training.workflow import train_flow

PARTS = ("conditional", "cost", "critical")
COMPARED = ("chi2", "abs_m", "binder")


def loadavg() -> list[float]:
    try:
        return [float(x) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not available
        return [math.nan] * 3


class Stage:
    """Wall time, CPU time and load average around a block."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.record: dict[str, Any] = {}

    def __enter__(self) -> Stage:
        print(f"== {self.name}", file=sys.stderr, flush=True)
        self._w, self._c = time.perf_counter(), time.process_time()
        self.record["loadavg_start"] = loadavg()
        return self

    def __exit__(self, *exc: object) -> None:
        self.record.update(
            wall_s=time.perf_counter() - self._w,
            cpu_s=time.process_time() - self._c,
            loadavg_end=loadavg(),
        )


def _json_overrides(text: str | None, flag: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise SystemExit(f"{flag}: expected a JSON object; got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise SystemExit(f"{flag}: expected a JSON object; got {text!r}")
    return value


def _flow_overrides(args: argparse.Namespace) -> dict:
    over = _json_overrides(args.flow_overrides, "--flow-overrides")
    if "hidden" in over:
        over["hidden"] = tuple(over["hidden"])
    return over


def calibrate_steps(action: Phi4Action, args: argparse.Namespace, condition: dict) -> dict:
    """Steps of the recipe that fit ``--train-budget-s``: time 10 steps of a throwaway copy."""
    flow_cfg, train_cfg = get_recipe(args.recipe, action.lattice_shape)
    from dataclasses import replace

    from flowmc.training.recipes import override

    flow_cfg = override(flow_cfg, **{**_flow_overrides(args), "condition": condition})
    extra = _json_overrides(args.train_overrides, "--train-overrides")
    train_cfg = replace(override(train_cfg, **extra), n_steps=10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 999)
        flow = build_flow(flow_cfg)
        trainer = Trainer(flow, action, train_cfg, seed=args.seed + 999)
        trainer.run(progress=False)
    per_step = trainer.elapsed / max(trainer.step_count, 1)
    steps = max(int(0.95 * args.train_budget_s / per_step), 1)
    return {"calibration_steps": trainer.step_count, "s_per_step": per_step, "steps": steps,
            "budget_s": args.train_budget_s}  # fmt: skip


def train_conditional(args: argparse.Namespace, work: Path, out: dict) -> Path:
    """Part 1a: the conditional flow (or the given one)."""
    lo, hi = args.cond_range
    rec: dict[str, Any] = {"range": [lo, hi], "L": args.L, "m2": args.m2}
    if args.model is not None:
        ckpt = load_checkpoint(args.model)
        meta = ckpt.get("meta") or {}
        cond = (ckpt["flow_config"].get("condition") or {}).get("lam")
        rec.update(model=str(args.model), given=True, condition=cond,
                   training_time_s=meta.get("training_time_total_s", meta.get("training_time_s")),
                   recipe=meta.get("recipe"))  # fmt: skip
        out["training"] = rec
        return Path(args.model)
    action = Phi4Action(args.m2, 0.5 * (lo + hi), (args.L, args.L))
    condition = {"lam": [lo, hi]}
    if args.steps is None:
        with Stage("calibrate training steps") as st:
            rec["calibration"] = calibrate_steps(action, args, condition)
        rec["calibration"].update(st.record)
        steps = rec["calibration"]["steps"]
    else:
        steps = args.steps
    path = work / f"conditional_L{args.L}.pt"
    with Stage(f"train the conditional flow ({steps} steps)") as st:
        res = train_flow(
            action, recipe=args.recipe,
            flow_overrides={**_flow_overrides(args), "condition": condition},
            train_overrides={**_json_overrides(args.train_overrides, "--train-overrides"),
                             "n_steps": steps},
            seed=args.seed, out=path, checkpoint_every=0, progress=not args.quiet,
            record={"script": "scripts/bench_scan.py"},
        )  # fmt: skip
    rec.update(st.record)
    rec.update(model=str(path), given=False, recipe=args.recipe, steps=res.trainer.step_count,
               training_time_s=res.training_time_s, symmetric=res.symmetric,
               flow_config=res.flow.config.to_dict(), train_config=res.trainer.config.to_dict(),
               within_budget=res.training_time_s <= args.train_budget_s)  # fmt: skip
    out["training"] = rec
    return path


def _by_lam(summary: dict) -> dict[float, dict]:
    return {p["lam"]: p for p in summary["points"]}


def part_conditional(args: argparse.Namespace, work: Path, model: Path, out: dict) -> None:
    """Part 1b: flow MH and HMC at the check couplings, acceptance and z-scores."""
    lams = parse_lams(args.check_lams)
    opts = ScanOptions(logz_n=args.eval_n, n_boot=0)
    flow_cfg = ScanConfig(sizes=(args.L,), lams=lams, models={args.L: model},
                          run=RunConfig(n=args.n_flow, chains=args.chains, seed=args.seed))
    with Stage("flow-MH scan at the check couplings") as st_f:
        flow = run_scan(work / "check_flow", flow_cfg, opts, progress=not args.quiet,
                        plots=args.plots)  # fmt: skip
    hmc_cfg = ScanConfig(
        sizes=(args.L,), lams=lams, m2=args.m2, anchor_models={args.L: model},
        run=RunConfig(n=args.n_hmc, chains=args.hmc_chains, seed=args.seed,
                      hmc=HMCSettings(warmup=args.hmc_warmup)),
    )  # fmt: skip
    with Stage("HMC scan at the check couplings") as st_h:
        hmc = run_scan(work / "check_hmc", hmc_cfg, opts, progress=not args.quiet,
                       plots=args.plots)  # fmt: skip
    rows = []
    fpts, hpts = _by_lam(flow), _by_lam(hmc)
    for lam in lams:
        f, h = fpts[lam], hpts[lam]
        row: dict[str, Any] = {
            "lam": lam,
            "mh_acceptance_fresh_draws": (f["free_energy"]["flow"] or {}).get("mh_acceptance"),
            "ess_fresh_draws": (f["free_energy"]["flow"] or {}).get("ess"),
            "mh_acceptance_chain": f.get("acceptance"),
            "hmc_acceptance": h.get("acceptance"),
            "flow_f": f["free_energy"]["flow"],
            "hmc_ti_f": h["free_energy"]["ti"],
            "hmc_ti_vs_flow_z": h["free_energy"]["z_ti_vs_flow"],
        }
        for key in COMPARED:
            a, b = f["observables"].get(key), h["observables"].get(key)
            if a is None or b is None:
                continue
            sigma = math.hypot(a["error"], b["error"])
            row[key] = {"flow": a, "hmc": b,
                        "z": (a["value"] - b["value"]) / sigma if sigma > 0 else None}  # fmt: skip
        rows.append(row)
    zs = [abs(r[k]["z"]) for r in rows for k in COMPARED if k in r and r[k]["z"] is not None]
    accs = [r["mh_acceptance_chain"] for r in rows if r["mh_acceptance_chain"] is not None]
    out["points"] = rows
    out["flow_scan"] = {"directory": flow["directory"], **st_f.record,
                        "warnings": flow["warnings"]}  # fmt: skip
    out["hmc_scan"] = {"directory": hmc["directory"], **st_h.record,
                       "warnings": hmc["warnings"]}  # fmt: skip
    train = out.get("training", {})
    out["verdict"] = {
        "min_mh_acceptance": min(accs) if accs else None,
        "acceptance_target": 0.7,
        "acceptance_ok": bool(accs) and min(accs) >= 0.7,
        "max_abs_z": max(zs) if zs else None,
        "z_ok": bool(zs) and max(zs) < 3,
        "training_time_s": train.get("training_time_s"),
        "training_target_s": 1200.0,
        "training_ok": (train.get("training_time_s") or math.inf) <= 1200.0,
    }


def part_cost(args: argparse.Namespace, work: Path, model: Path, training: dict,
              out: dict) -> None:  # fmt: skip
    """Part 2: the whole scan with one flow against separate trainings."""
    lams = parse_lams(args.cost_lams)
    cfg = ScanConfig(sizes=(args.L,), lams=lams, models={args.L: model},
                     run=RunConfig(n=args.n_flow, chains=args.chains, seed=args.seed))
    with Stage(f"the {len(lams)}-point scan with the conditional flow") as st:
        summary = run_scan(work / "cost_scan", cfg, ScanOptions(logz_n=args.eval_n, n_boot=0),
                           progress=not args.quiet, plots=args.plots)  # fmt: skip
    per_point = [
        {"lam": p["lam"], "sampling_s": p["cost"]["sampling_s"], "warmup_s": p["cost"]["warmup_s"],
         "analysis_s": p["cost"]["analysis_s"],
         "logz_s": (p["free_energy"]["flow"] or {}).get("seconds", 0.0),
         "acceptance": p.get("acceptance")}
        for p in summary["points"]
    ]  # fmt: skip
    sampling = sum(p["sampling_s"] + (p["warmup_s"] or 0.0) + p["analysis_s"] for p in per_point)
    t_cond = float(training.get("training_time_s") or 0.0)
    mid = lams[len(lams) // 2]
    action = Phi4Action(args.m2, mid, (args.L, args.L))
    steps = args.separate_steps
    with Stage(f"one separate training ({args.separate_recipe}) at lam = {mid:g}") as st1:
        res = train_flow(
            action, recipe=args.separate_recipe,
            train_overrides={"n_steps": steps} if steps else None, seed=args.seed,
            out=work / f"separate_L{args.L}_lam{mid:g}.pt", checkpoint_every=0,
            progress=not args.quiet,
        )  # fmt: skip
    t_one = res.training_time_s
    scan_total = t_cond + st.record["wall_s"]
    separate_total = len(lams) * t_one + sampling
    out.update(
        lams=list(lams),
        scan={"directory": summary["directory"], **st.record, "per_point": per_point,
              "sampling_warmup_analysis_s": sampling},  # fmt: skip
        conditional_training_s=t_cond,
        separate_training={
            "recipe": args.separate_recipe, "lam": mid, "steps": res.trainer.step_count,
            "training_time_s": t_one, **st1.record,
            "note": f"ONE training timed and multiplied by {len(lams)} (the number of points); "
                    "each separate flow is assumed to sample as fast as the conditional flow "
                    "did at that point (the scan's measured sampling + analysis per point)",
        },  # fmt: skip
        scan_total_s=scan_total,
        separate_total_s=separate_total,
        verdict={"ratio": scan_total / separate_total if separate_total > 0 else None,
                 "target": 1 / 3,
                 "ok": separate_total > 0 and scan_total / separate_total <= 1 / 3},  # fmt: skip
    )


def _models(spec: str, sizes: list[int]) -> dict[int, str | None]:
    return parse_models([spec], sizes, "--crit-models", every=True)


def part_critical(args: argparse.Namespace, work: Path, out: dict) -> None:
    """Part 3: two (or more) sizes over the critical region, the U4 crossing."""
    sizes = [int(s) for s in args.crit_sizes]
    lams = parse_lams(args.crit_lams)
    models = _models(args.crit_models, sizes)
    cfg = ScanConfig(
        sizes=tuple(sizes), lams=lams, m2=args.m2, models=models,
        run=RunConfig(n=args.n_crit, chains=args.crit_chains, seed=args.seed,
                      hmc_traj=args.crit_hmc_traj, hmc=HMCSettings(warmup=args.hmc_warmup)),
    )  # fmt: skip
    flows = any(models.values())
    opts = ScanOptions(logz_n=args.eval_n if flows else 0, n_boot=args.n_boot)
    with Stage(f"critical scan L = {sizes} over {args.crit_lams}") as st:
        summary = run_scan(work / "critical", cfg, opts, progress=not args.quiet,
                           plots=args.plots)  # fmt: skip
    u4 = [c for c in summary["crossings"] if c["observable"] == "binder"]
    spec = ",".join(f"{L}={m or 'hmc'}" for L, m in models.items())
    command = (
        f"flowmc scan --L {' '.join(map(str, sizes))} --lam {args.crit_lams} --m2 {args.m2:g} "
        + (f"--model {spec} " if flows else "--hmc ")
        + (f"--hmc-traj {args.crit_hmc_traj} " if args.crit_hmc_traj else "")
        + f"--n {args.n_crit} --chains {args.crit_chains} --warmup {args.hmc_warmup} "
        f"--seed {args.seed} --out {work / 'critical'}"
    )  # fmt: skip
    out.update(
        sizes=sizes, lams=list(lams), samplers=summary["settings"]["samplers"],
        command=command, **st.record, crossings=summary["crossings"],
        per_point=[{"L": p["L"], "lam": p["lam"], "binder": p["observables"].get("binder"),
                    "xi2_over_L": p["observables"].get("xi2_over_L"),
                    "sampling_s": p["cost"]["sampling_s"], "acceptance": p.get("acceptance")}
                   for p in summary["points"]],
        warnings=summary["warnings"],
        verdict={
            "u4_crossings": [{"sizes": c["sizes"], "found": c["found"], "lam": c["lam"],
                              "error": c["error"]} for c in u4],
            "target_error": 0.03,
            "ok": bool(u4) and all(c["found"] and c["error"] is not None and c["error"] <= 0.03
                                   for c in u4),
        },
    )  # fmt: skip


def _jsonable(x: object) -> object:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return str(x)


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _range(text: str) -> tuple[float, float]:
    lo, hi = (float(x) for x in text.split(":"))
    return lo, hi


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench_scan.json"))
    ap.add_argument("--workdir", type=Path, default=None,
                    help="scans and flows (default: OUT without suffix + _work); new or empty")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test (< 60 s): L = 4 (critical: 4 and 6), few steps and rows")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                    help="write each scan's plots (default on; off in --quick)")
    g = ap.add_argument_group("the conditional flow (parts 1 and 2)")
    g.add_argument("--L", type=int, default=8)
    g.add_argument("--m2", type=float, default=-4.0)
    g.add_argument("--cond-range", type=_range, default=(4.0, 8.0), help="LO:HI (default 4:8)")
    g.add_argument("--model", type=Path, default=None,
                   help="use this conditional flow instead of training one")
    g.add_argument("--recipe", default="default", help="training recipe (default 'default')")
    g.add_argument("--flow-overrides", default=None,
                   help='FlowConfig fields as JSON, e.g. \'{"momentum": true, "n_layers": 8}\'')
    g.add_argument("--train-overrides", default=None,
                   help='TrainConfig fields as JSON, e.g. \'{"batch_size": 512, "lr": 0.002}\'')
    g.add_argument("--steps", type=int, default=None,
                   help="training steps (default: as many as fit --train-budget-s)")
    g.add_argument("--train-budget-s", type=float, default=1200.0,
                   help="training time budget in seconds (default 1200)")
    g.add_argument("--check-lams", default="4,5,6,7,8", help="couplings of part 1")
    g.add_argument("--n-flow", type=int, default=20000, help="flow-MH rows per chain per point")
    g.add_argument("--chains", type=int, default=1, help="flow-MH chains per point")
    g.add_argument("--n-hmc", type=int, default=20000, help="HMC trajectories per chain")
    g.add_argument("--hmc-chains", type=int, default=1, help="HMC chains per point")
    g.add_argument("--hmc-warmup", type=int, default=500, help="HMC warm-up trajectories")
    g.add_argument("--eval-n", type=int, default=10240, help="fresh flow draws for log Z")
    c = ap.add_argument_group("part 2 (cost)")
    c.add_argument("--cost-lams", default="4:8:9", help="the scan of part 2 (default 4:8:9)")
    c.add_argument("--separate-recipe", default="default", help="recipe of a separate training")
    c.add_argument("--separate-steps", type=int, default=None,
                   help="its steps (default: the recipe's)")
    k = ap.add_argument_group("part 3 (critical point)")
    k.add_argument("--crit-sizes", nargs="+", type=int, default=[8, 16])
    k.add_argument("--crit-lams", default="3.8:4.8:9")
    k.add_argument("--crit-models", default="8=hmc,16=hmc",
                   help="L=PATH (a flow conditioned on lam covering --crit-lams) or L=hmc per size")
    k.add_argument("--crit-hmc-traj", type=int, default=0, help="hybrid K for sizes with a flow")
    k.add_argument("--n-crit", type=int, default=20000, help="rows per chain per point")
    k.add_argument("--crit-chains", type=int, default=1)
    k.add_argument("--n-boot", type=int, default=2000)
    args = ap.parse_args(argv)
    if args.quick:
        args.L, args.steps, args.separate_steps = 4, 20, 20
        args.check_lams, args.cost_lams, args.crit_lams = "4,8", "4:8:3", "3.8:4.8:3"
        args.n_flow = args.n_hmc = 256
        args.n_crit, args.hmc_warmup, args.eval_n, args.n_boot = 128, 20, 512, 200
        args.crit_sizes, args.crit_models, args.plots = [4, 6], "4=hmc,6=hmc", False
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise SystemExit(f"--parts: expected a subset of {PARTS}; got {bad}")
    args.parts = parts
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.workdir or args.out.with_name(args.out.stem + "_work")
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"--workdir {work} is not empty: timings of resumed scans mean nothing; "
                         "choose a new one")  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "argv": sys.argv if argv is None else argv,
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "workdir": str(work),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parts": {},
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(_clean(result), indent=1, default=_jsonable) + "\n")

    steps: list[tuple[str, Callable[[], None]]] = []
    cond: dict[str, Any] = {}
    model: list[Path] = []
    if "conditional" in args.parts or "cost" in args.parts:
        result["parts"]["conditional"] = cond
        steps.append(("training", lambda: model.append(train_conditional(args, work, cond))))
    if "conditional" in args.parts:
        steps.append(("conditional", lambda: part_conditional(args, work, model[0], cond)))
    if "cost" in args.parts:
        cost: dict[str, Any] = {}
        result["parts"]["cost"] = cost
        steps.append(("cost", lambda: part_cost(args, work, model[0], cond["training"], cost)))
    if "critical" in args.parts:
        crit: dict[str, Any] = {}
        result["parts"]["critical"] = crit
        steps.append(("critical", lambda: part_critical(args, work, crit)))
    for _, step in steps:
        step()
        save()
    verdicts = {name: part.get("verdict") for name, part in result["parts"].items()
                if part.get("verdict")}  # fmt: skip
    result["verdicts"] = verdicts
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    print(json.dumps(_clean(verdicts), indent=1, default=_jsonable))
    return 0


if __name__ == "__main__":
    sys.exit(main())
