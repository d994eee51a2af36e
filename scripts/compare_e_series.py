#!/usr/bin/env python
r"""Flow MH vs HMC on the E-series ensembles of arXiv:1904.12072 (m^2 = -4), at equal wall time.

For each point: train a flow with the ``default`` recipe (or load ``<model-dir>/<name>.pt``),
sample flow MH and HMC for ``--seconds`` of sampling wall time each, analyse both
(:func:`flowmc.analysis.compare.compare`), and collect chi_2, the Ising energy, tau_int and the cost
per independent chi_2 sample (with and without the amortised training cost). Writes
``<out-dir>/e_series.json`` and ``<out-dir>/e_series.png`` (tau_int and cost vs L).

Points (m^2 = -4):  E1 (L=6, lam=6.975)  E2 (8, 6.008)  E3 (10, 5.550)  E5 (14, 5.113)
and L8 (8, 8.0), the arXiv:2101.08176 point. Default: E1,E2,E3,L8 (add E5 with --points).

Published anchors, printed next to the results:
  HMC chi_2 = 0.75 +- 0.01 at (8, -4, 8)        (arXiv:2101.08176)
  chi_2 ~ 5.40 and E ~ 0.105 at (14, -4, 5.113)  (arXiv:1904.12072, E5)

Examples:
  python scripts/compare_e_series.py --quick                  # CPU smoke test, < 1 minute
  python scripts/compare_e_series.py --seconds 600 --train-steps 20000 --device cuda \
      --points E1,E2,E3,E5,L8 --out-dir results/e_series
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flowmc.analysis.compare import compare
from flowmc.commands._common import write_json
from flowmc.io.checkpoint import load_checkpoint, load_model, machine_info
from flowmc.io.ensemble import open_ensemble
from flowmc.lattice.action import Phi4Action
from flowmc.sampling.run import HMCSettings, RunConfig, run_ensemble
from flowmc.training.workflow import train_flow

M2 = -4.0
POINTS = {  # name: (L, lam)
    "E1": (6, 6.975),
    "E2": (8, 6.008),
    "E3": (10, 5.550),
    "E5": (14, 5.113),
    "L8": (8, 8.0),
}
DEFAULT_POINTS = "E1,E2,E3,L8"
ANCHORS = {
    "L8": {"chi2": (0.75, 0.01, "HMC, arXiv:2101.08176")},
    "E5": {"chi2": (5.40, None, "arXiv:1904.12072"), "energy": (0.105, None, "arXiv:1904.12072")},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--points", default=DEFAULT_POINTS,
                   help=f"comma-separated subset of {sorted(POINTS)} (default {DEFAULT_POINTS})")
    p.add_argument("--train-steps", type=int, default=None,
                   help="training steps (default: the recipe's)")
    p.add_argument("--seconds", type=float, default=120.0,
                   help="sampling wall time per sampler and point (default 120)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="load <model-dir>/<point>.pt if present; new flows are saved there")
    p.add_argument("--out-dir", type=Path, default=Path("results/e_series"))
    p.add_argument("--flow-chains", type=int, default=4)
    p.add_argument("--hmc-chains", type=int, default=16)
    p.add_argument("--hmc-warmup", type=int, default=500)
    p.add_argument("--integrator", choices=["omelyan", "leapfrog"], default="omelyan")
    p.add_argument("--discard", type=int, default=None,
                   help="rows per chain discarded by the analysis (default: 5%% of n)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke test: E1 and L8, a 4-layer flow trained 20 steps, 2 s each")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.points = "E1,L8"
        args.train_steps = 20 if args.train_steps is None else args.train_steps
        args.seconds = 2.0
        args.hmc_warmup = 50
        args.flow_chains, args.hmc_chains = 2, 4
    names = [s.strip() for s in args.points.split(",") if s.strip()]
    bad = [s for s in names if s not in POINTS]
    if bad or not names:
        p.error(f"--points: unknown {bad}; choose from {sorted(POINTS)}")
    args.points = names
    return args


def get_flow(name: str, action: Phi4Action, args: argparse.Namespace) -> Path:
    """The checkpoint for ``name``: loaded from --model-dir if there, else trained and saved."""
    model_dir = args.model_dir or args.out_dir / "models"
    path = model_dir / f"{name}.pt"
    if path.exists():
        ckpt = load_checkpoint(path)
        if Phi4Action.from_params(ckpt["action"]) != action:
            raise ValueError(f"{path} is for {ckpt['action']}, not {action.params()}")
        print(f"[{name}] using flow {path} "
              f"(training {ckpt.get('meta', {}).get('training_time_s', float('nan')):.1f} s)")
        return path
    print(f"[{name}] training (recipe 'default')", flush=True)
    res = train_flow(
        action, recipe="default", flow_overrides={"n_layers": 4} if args.quick else None,
        train_overrides={"n_steps": args.train_steps}, seed=args.seed, device=args.device,
        out=path, checkpoint_every=0, progress=not args.quiet,
        meta={"script": "scripts/compare_e_series.py"},
    )  # the library workflow, as `flowmc train` (incl. its Z2 rule)
    h = res.history
    ess = np.mean(h["ess"][-50:]) if h["ess"] else float("nan")
    print(f"[{name}] trained in {res.training_time_s:.1f} s, batch ESS {ess:.3f} -> {path}")
    return path


def sampled_seconds(path: Path) -> float:
    with open_ensemble(path) as ens:
        return float(np.sum(ens.chunk_wall_times))


def run_for(seconds: float, run: callable, path: Path, n0: int) -> None:
    """Call ``run(n, resume)`` with growing ``n`` until ``path`` holds ``seconds`` of sampling."""
    n, resume = n0, False
    for _ in range(12):
        run(n, resume)
        spent = sampled_seconds(path)
        if spent >= 0.97 * seconds:
            return
        # resume continues the same chains; extrapolate the rate, grow at most 20x per round
        n = max(n + 1, min(20 * n, math.ceil(n * seconds / max(spent, 1e-3))))
        resume = True


def run_point(name: str, args: argparse.Namespace) -> dict:
    L, lam = POINTS[name]
    action = Phi4Action(M2, lam, (L, L))
    out = args.out_dir
    model_path = get_flow(name, action, args)
    device = torch.device(args.device)
    flow_h5, hmc_h5 = out / f"flow_{name}.h5", out / f"hmc_{name}.h5"

    model = load_model(model_path, device=device)

    def run_flow(n: int, resume: bool) -> None:
        run_ensemble(flow_h5, RunConfig(n=n, chains=args.flow_chains, batch=1024, seed=args.seed),
                     model=model, resume=resume, force=not resume, store_configs=True,
                     progress=not args.quiet, meta={"point": name})

    def run_h(n: int, resume: bool) -> None:
        cfg = RunConfig(n=n, chains=args.hmc_chains, seed=args.seed,
                        hmc=HMCSettings(warmup=args.hmc_warmup, integrator=args.integrator,
                                        flip=True))
        run_ensemble(hmc_h5, cfg, action=action, resume=resume, force=not resume,
                     progress=not args.quiet, meta={"point": name}, device=device)

    print(f"[{name}] flow MH for {args.seconds:g} s", flush=True)
    run_for(args.seconds, run_flow, flow_h5, n0=200)
    print(f"[{name}] HMC for {args.seconds:g} s (after warm-up)", flush=True)
    run_for(args.seconds, run_h, hmc_h5, n0=20)
    with open_ensemble(flow_h5) as a, open_ensemble(hmc_h5) as b:
        n_min = min(a.n, b.n)
    discard = args.discard if args.discard is not None else n_min // 20
    res = compare(flow_h5, hmc_h5, discard=discard)
    lf, lh = res["labels"]
    row = {"name": name, "L": L, "m2": M2, "lam": lam, "discard": discard}
    for lab, key in ((lf, "flow"), (lh, "hmc")):
        e = res["ensembles"][lab]
        d = {
            "n": e["n"], "chains": e["chains"], "acceptance": e["acceptance"],
            "sampling_s": e["wall_time_s"], "cost_per_config_s": e["cost_per_config_s"],
            "train_time_s": e["train_time_s"], "warmup_time_s": e["warmup_time_s"],
        }
        if key == "hmc":
            d["step_size"] = e["sampler"].get("step_size")
            d["num_steps"] = e["sampler"].get("num_steps")
        for obs in ("chi2", "energy", "abs_m"):
            s = res["observables"].get(obs, {}).get(lab)
            if s:
                d[obs] = {k: s[k] for k in ("value", "error", "tau_int", "tau_int_error",
                                            "cost_per_independent_s",
                                            "cost_per_independent_with_training_s")}
        row[key] = d
    for obs in ("chi2", "energy"):
        r = res["observables"].get(obs)
        if r:
            row[f"{obs}_diff_sigma"] = r["diff_sigma"]
            row[f"{obs}_break_even_independent"] = r.get(f"break_even_independent_{lf}")
    row["anchors"] = {k: {"value": v, "error": e, "source": s}
                      for k, (v, e, s) in ANCHORS.get(name, {}).items()}
    row["warnings"] = res["warnings"]
    row["compare"] = res
    return row


def _pm(d: dict | None) -> str:
    if not d or d.get("value") is None:
        return "-"
    err = d.get("error")
    return f"{d['value']:.4g} ± {err:.2g}" if err else f"{d['value']:.4g}"


def print_table(rows: list[dict]) -> None:
    print(f"\n{'pt':<4}{'L':>3}{'lam':>7}  {'chi2 flow':>17}{'chi2 HMC':>17}{'Δ/σ':>6}"
          f"{'τ flow':>8}{'τ HMC':>8}{'s/indep flow':>14}{'(+train)':>10}{'s/indep HMC':>13}"
          f"{'acc flow':>9}{'acc HMC':>8}")
    for r in rows:
        f, h = r["flow"], r["hmc"]
        fc, hc = f.get("chi2", {}), h.get("chi2", {})
        ds = r.get("chi2_diff_sigma")

        def g(x: float | None, spec: str = ".3g") -> str:
            return "-" if x is None else format(x, spec)

        print(f"{r['name']:<4}{r['L']:>3}{r['lam']:>7.3f}  {_pm(fc):>17}{_pm(hc):>17}"
              f"{g(ds, '+.1f'):>6}{g(fc.get('tau_int')):>8}{g(hc.get('tau_int')):>8}"
              f"{g(fc.get('cost_per_independent_s')):>14}"
              f"{g(fc.get('cost_per_independent_with_training_s')):>10}"
              f"{g(hc.get('cost_per_independent_s')):>13}"
              f"{g(f['acceptance'], '.3f'):>9}{g(h['acceptance'], '.3f'):>8}")
        for obs, a in r["anchors"].items():
            err = f" ± {a['error']}" if a["error"] else ""
            print(f"      published {obs} = {a['value']}{err} ({a['source']}); here flow "
                  f"{_pm(f.get(obs))}, HMC {_pm(h.get(obs))}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for pts, marker in ((rows, "o"),):
        L = [r["L"] for r in pts]
        lab = [r["name"] for r in pts]

        def col(key: str, field: str, pts: list[dict] = pts) -> list[float]:
            return [(r[key].get("chi2") or {}).get(field) or np.nan for r in pts]

        ax1.errorbar(L, col("flow", "tau_int"), yerr=col("flow", "tau_int_error"),
                     fmt=marker, label="flow MH", capsize=3)
        ax1.errorbar(L, col("hmc", "tau_int"), yerr=col("hmc", "tau_int_error"),
                     fmt="s", label="HMC", capsize=3)
        ax2.plot(L, col("flow", "cost_per_independent_s"), marker, label="flow MH (sampling)")
        ax2.plot(L, col("flow", "cost_per_independent_with_training_s"), "^",
                 label="flow MH + training")
        ax2.plot(L, col("hmc", "cost_per_independent_s"), "s", label="HMC")
        for x, y, t in zip(L, col("hmc", "tau_int"), lab):
            ax1.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax1.set(xlabel="L", ylabel=r"$\tau_\mathrm{int}(\chi_2)$ (½ + Σρ)", yscale="log",
            title=r"integrated autocorrelation time of $\chi_2$")
    ax2.set(xlabel="L", ylabel="wall-clock s per independent sample", yscale="log",
            title=r"cost per independent $\chi_2$ sample")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(r"$m^2=-4$: flow MH vs HMC at equal sampling wall time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    for name in args.points:
        rows.append(run_point(name, args))
        # write after every point, so a long study leaves partial results
        write_json(args.out_dir / "e_series.json", {
            "points": rows, "args": {k: str(v) for k, v in vars(args).items()},
            "machine": machine_info(),
        })
    print_table(rows)
    plot(rows, args.out_dir / "e_series.png")
    print(f"\nJSON: {args.out_dir / 'e_series.json'}\nplot: {args.out_dir / 'e_series.png'}\n"
          f"total {time.perf_counter() - t0:.1f} s")
    json.loads((args.out_dir / "e_series.json").read_text())  # sanity: valid JSON
    return 0


if __name__ == "__main__":
    sys.exit(main())
