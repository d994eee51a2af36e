"""The tutorial (docs/tutorial.md): the seed notebook's path and beyond, with flowmc's Python API.

Each section of docs/tutorial.md shows the body of one ``step_*`` function below, up to its line
``# -- numbers quoted in the text``; what follows that line only collects the numbers the text
quotes. The markdown is *rendered* from this file (code blocks, numbers, printed tables), so the
doc cannot drift from the code: ``tests/test_scripts.py`` re-renders it and compares.

The steps communicate through files only: flows and ensembles in a cache folder ``--work``
(default ``build/tutorial``), figures (PNG) and the numbers (``tutorial.json``) in ``--out``
(default ``docs/tutorial``). A step whose outputs are there is not run again; a step that was
interrupted continues (training and sampling resume from their files); every step after one
that ran is redone from scratch. ``--force`` redoes everything.

Usage:
    python scripts/tutorial.py --threads 1        # full: L = 8; about 15 CPU-minutes on one thread;
                                                  # writes docs/tutorial/ and re-renders the doc
    python scripts/tutorial.py --quick --out /tmp/t/out --work /tmp/t/work    # CI, < 60 s
    python scripts/tutorial.py --render-doc       # only re-render docs/tutorial.md (after editing
                                                  # this file), from docs/tutorial/tutorial.json
"""

from __future__ import annotations

# [doc:imports]
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowmc import GaussianPrior, Phi4Action, build_flow, gamma_analysis, load_model, report
from flowmc.analysis import analyze
from flowmc.analysis.compare import compare
from flowmc.flows.couplings import AffineCoupling, checkerboard
from flowmc.flows.nets import PeriodicCNN
from flowmc.io.identity import check_checkpoint
from flowmc.sampling.run import HMCSettings, RunConfig, run_ensemble
from flowmc.scan import ScanConfig, ScanOptions, parse_lams, run_scan
from flowmc.training.evaluate import draw_samples, evaluate_model
from flowmc.training.recipes import get_recipe
from flowmc.training.workflow import train_flow

# [/doc:imports]

ROOT = Path(__file__).resolve().parents[1]

# the runner (not part of the tutorial's code)
import argparse  # noqa: E402
import ast  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Mapping  # noqa: E402
from typing import Any  # noqa: E402

DOC = ROOT / "docs" / "tutorial.md"
DEFAULT_OUT = ROOT / "docs" / "tutorial"
DEFAULT_WORK = ROOT / "build" / "tutorial"
NUMBERS = "tutorial.json"
MARKER = "# -- numbers quoted in the text"


# [doc:params]
@dataclass(frozen=True)
class Params:
    """The sizes of a run: FULL makes the figures of docs/tutorial.md, QUICK is the CI check."""

    L: int = 8  # the notebook's lattice, L x L, at (m², λ) = (−4, 8)
    m2: float = -4.0
    lam: float = 8.0
    train_steps: int | None = None  # None: the recipe's (default: 1,800 steps)
    n_eval: int = 10240  # fresh flow draws for the ESS and S vs S_eff
    mh_n: int = 25000  # flow-MH rows per chain
    mh_chains: int = 4
    hmc_n: int = 5000  # HMC trajectories per chain (recorded)
    hmc_chains: int = 8
    hmc_warmup: int = 200  # HMC warm-up trajectories (step size tuning)
    broken_n: int = 5000  # rows per chain at λ = 1 (shipped flow, HMC)
    hybrid_n: int = 1000  # hybrid cycles per chain
    hybrid_chains: int = 16
    hybrid_k: int = 3  # HMC trajectories per cycle
    scan_sizes: tuple[int, ...] = (4, 8)  # one flow conditioned on λ per size
    scan_steps: tuple[int, ...] = (400, 600)  # their training steps
    scan_range: tuple[float, float] = (3.5, 5.0)  # the flows' λ range
    scan_lams: str = "3.8:4.8:6"  # the scan grid: 6 points from 3.8 to 4.8
    scan_n: int = 2000  # flow-MH rows per chain and point
    scan_chains: int = 4
    logz_n: int = 4096  # flow draws for log Z per point


FULL = Params()
QUICK = Params(
    L=6, train_steps=30, n_eval=1024, mh_n=1000, mh_chains=2, hmc_n=300, hmc_chains=4,
    hmc_warmup=50, broken_n=300, hybrid_n=48, hybrid_chains=4, hybrid_k=2, scan_sizes=(2, 4),
    scan_steps=(20, 20), scan_lams="3.8:4.8:3", scan_n=200, scan_chains=2, logz_n=256,
)
# [/doc:params]


def _est(e: Any) -> dict:
    """``{value, error, tau_int}`` of an Estimate / GammaResult / analysis dict entry."""
    get = (lambda k: e[k]) if isinstance(e, Mapping) else (lambda k: getattr(e, k))
    return {"value": float(get("value")), "error": float(get("error")),
            "tau_int": float(get("tau_int"))}  # fmt: skip


def _ve(value: float, error: float) -> dict:
    return {"value": float(value), "error": float(error)}


def _tidy(text: str, work: Path) -> str:
    """A printed table as the doc shows it: paths relative to the cache folder."""
    return text.replace(str(work) + "/", "")


# ============================================================================ the notebook's path
def step_action(P: Params, out: Path, work: Path) -> dict:
    """The action and samples of the prior."""
    action = Phi4Action(P.m2, P.lam, (P.L, P.L))
    prior = GaussianPrior((P.L, P.L), sigma=1.0).double()  # sigma: the standard deviation
    z = prior.sample(1024, generator=torch.Generator().manual_seed(0))
    # S by hand, the kinetic term summed over BOTH directions (the seed returned after one)
    kinetic = sum(2 * z**2 - z * z.roll(1, d) - z * z.roll(-1, d) for d in (1, 2))
    by_hand = (kinetic + P.m2 * z**2 + P.lam * z**4).sum((1, 2))
    print("max |S - by hand| =", (action(z) - by_hand).abs().max().item())
    print("standard deviation of the prior draws:", z.std().item())
    report.plot_configurations(z, out / "prior_samples.png", title="samples of the prior")
    report.plot_action_vs_effective(action(z), prior.log_prob(z), out / "prior_action.png",
                                    title="prior: S against S_eff = -log r(z)")
    # -- numbers quoted in the text
    s = action(z)
    return {
        "max_abs_diff": float((s - by_hand).abs().max()),
        "max_rel_diff": float(((s - by_hand).abs() / s.abs()).max()),
        "prior_std": float(z.std()),
        "offset": float((s + prior.log_prob(z)).mean()),
    }


def step_coupling(P: Params, out: Path, work: Path) -> dict:
    """One coupling layer: invertible, with an exact log-det."""
    mask = checkerboard((P.L, P.L), parity=0)  # 1: transformed sites, 0: frozen
    net = PeriodicCNN(2, 1, 2, hidden=(8, 8), kernel_size=3, zero_init=False)  # -> (s, t)
    layer = AffineCoupling(mask, net).double().requires_grad_(False)  # the seed's layer, e^s x + t
    x = torch.randn(3, P.L, P.L, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y, log_det = layer(x)  # forward = prior -> field, with log|det dy/dx| per configuration
    x_back, log_det_back = layer.inverse(y)
    print("max |inverse(forward(x)) - x| =", (x_back - x).abs().max().item())
    print("max |log-det forward + inverse| =", (log_det + log_det_back).abs().max().item())
    J = torch.autograd.functional.jacobian(
        lambda v: layer(v.view(1, P.L, P.L))[0].flatten(), x[0].flatten()
    )
    print("log|det J|: autograd", torch.linalg.slogdet(J).logabsdet.item(),
          "layer", log_det[0].item())
    report.plot_coupling(mask, J, out / "coupling.png", title="one affine coupling layer")
    # -- numbers quoted in the text
    return {
        "round_trip": float((x_back - x).abs().max()),
        "log_det_sum": float((log_det + log_det_back).abs().max()),
        "log_det": float(log_det[0]),
        "log_det_autograd_diff": float(abs(torch.linalg.slogdet(J).logabsdet - log_det[0])),
        "frozen_block_max": float(J[mask.flatten() == 0][:, mask.flatten() != 0].abs().max()),
    }


def step_stack(P: Params, out: Path, work: Path) -> dict:
    """The stack of layers: a recipe."""
    flow_config, train_config = get_recipe("default", (P.L, P.L))
    print(flow_config)  # the architecture
    print(train_config)  # the training hyper-parameters
    flow = build_flow(flow_config).double().requires_grad_(False)  # no training here
    phi, log_q = flow.sample(8, generator=torch.Generator().manual_seed(2))
    print("max |log_prob(phi) - log q| =", (flow.log_prob(phi) - log_q).abs().max().item())
    print("parameters:", sum(p.numel() for p in flow.parameters()))
    # -- numbers quoted in the text
    return {
        "n_layers": flow_config.n_layers,
        "coupling": flow_config.coupling,
        "hidden": list(flow_config.hidden),
        "prior_sigma": flow_config.prior_sigma,
        "n_bins": flow_config.extra.get("n_bins"),
        "spline_bound": flow_config.extra.get("spline_bound"),
        "n_params": sum(p.numel() for p in flow.parameters()),
        "n_params_seed": sum(p.numel() for p in build_flow(get_recipe("seed", (P.L, P.L))[0])
                             .parameters()),  # fmt: skip
        "batch_size": train_config.batch_size,
        "lr": train_config.lr,
        "recipe_steps": train_config.n_steps,
        "log_prob_diff": float((flow.log_prob(phi) - log_q).abs().max()),
    }


def step_train(P: Params, out: Path, work: Path) -> dict:
    """Reverse-KL training."""
    action = Phi4Action(P.m2, P.lam, (P.L, P.L))
    ckpt = work / "flow.pt"
    res = train_flow(action, recipe="default", train_overrides={"n_steps": P.train_steps},
                     seed=0, out=ckpt, resume=ckpt.exists())  # resume: continue if interrupted
    h = res.history  # one entry per step: loss, log_p, log_q, ess, lr, time
    print(f"{len(h['loss'])} steps in {res.training_time_s:.0f} s; last 100 steps: "
          f"ESS {np.mean(h['ess'][-100:]):.3f}, loss {np.mean(h['loss'][-100:]):.3f}")
    report.plot_training_history(h, out / "training.png", title="reverse-KL training")
    # -- numbers quoted in the text
    return {
        "steps": len(h["loss"]),
        "training_time_s": res.training_time_s,
        "ess_last100": float(np.mean(h["ess"][-100:])),
        "loss_last100": float(np.mean(h["loss"][-100:])),
        "loss_first": float(h["loss"][0]),
        "symmetric": bool(res.symmetric),
    }


def step_effective(P: Params, out: Path, work: Path) -> dict:
    """The learned effective action: S against S_eff."""
    model = load_model(work / "flow.pt")
    ev = evaluate_model(model, n=P.n_eval, generator=torch.Generator().manual_seed(3))
    print(report.eval_table(ev))
    s = ev.samples  # the draws' action, log_q and magnetization (float64 arrays)
    report.plot_action_vs_effective(s["action"], s["log_q"], out / "action_vs_effective.png",
                                    title="trained flow: S against S_eff = -log q")
    phi, _ = model.proposal.sample(16, generator=torch.Generator().manual_seed(4))
    report.plot_configurations(phi, out / "flow_samples.png", title="samples from the flow")
    # -- numbers quoted in the text
    return {
        "table": _tidy(report.eval_table(ev), work),
        "n": ev.n,
        "ess": ev.ess,
        "ess_batch": _ve(ev.ess_batch_mean, ev.ess_batch_err),
        "mh_acceptance": ev.mh_acceptance,
        "f_q": _ve(ev.f_q, ev.f_q_err),
        "log_z": _ve(ev.log_z, ev.log_z_err),
        "kl": _ve(ev.f_q + ev.log_z, math.hypot(ev.f_q_err, ev.log_z_err)),
        "offset": float(np.mean(s["action"] + s["log_q"])),
    }


def step_mh(P: Params, out: Path, work: Path) -> dict:
    """Independence Metropolis-Hastings: an exact chain."""
    ens = work / "flow_mh.h5"
    run = run_ensemble(ens, RunConfig(n=P.mh_n, chains=P.mh_chains, seed=0),
                       model=work / "flow.pt", resume=ens.exists())
    print(f"acceptance {run['acceptance']:.3f}, longest rejection run "
          f"{run['longest_rejection_run']}, {run['samples_per_second']:.0f} steps/s")
    # -- numbers quoted in the text
    return {
        "configs": P.mh_n * P.mh_chains,
        "acceptance": run["acceptance"],
        "longest_rejection_run": run["longest_rejection_run"],
        "samples_per_second": run["samples_per_second"],
    }


def step_analysis(P: Params, out: Path, work: Path) -> dict:
    """Magnetisation and correlators with Γ-method errors."""
    res = analyze(work / "flow_mh.h5")
    print(report.analysis_table(res))
    report.analysis_plots(res, out / "analysis")  # history, hist_m, correlators, autocorr, ...
    chi2 = res.observables["chi2"]
    print(f"chi2 = {report.fmt(chi2.value, chi2.error)}, tau_int = {chi2.tau_int:.2f}")
    # -- numbers quoted in the text
    d = res.to_dict()
    pm = d.get("pole_mass")
    return {
        "table": _tidy(report.analysis_table(res), work),
        "chi2": _est(chi2),
        "m": _est(res.observables["m"]),
        "abs_m": _est(res.observables["abs_m"]),
        "xi2": _est(res.observables["xi2"]) if "xi2" in res.observables else None,
        "sd_check": _est(res.observables["sd_check"]),
        "pole_mass": _ve(pm["value"], pm["error"]) if pm else None,
        "tau_int_max": max(e.tau_int for e in res.observables.values()),
        "n_warnings": len(res.warnings),
    }


# ============================================================================ beyond the notebook
def step_exact(P: Params, out: Path, work: Path) -> dict:
    """Exact, with honest error bars."""
    model = load_model(work / "flow.pt")
    V = P.L * P.L
    draws = draw_samples(model.proposal, model.action, P.n_eval,
                         generator=torch.Generator().manual_seed(5))
    raw = gamma_analysis(draws["magnetization"] ** 2 / V)  # chi2 = <M^2>/V under q, iid draws
    chain = analyze(work / "flow_mh.h5").gamma["chi2"]  # the MH chain: under p, exactly
    print(f"chi2 from flow draws  {report.fmt(raw.value, raw.error)}   (the flow's q, biased)")
    print(f"chi2 from the chain   {report.fmt(chain.value, chain.error)}   (p; Gamma method)")
    print(f"naive error {chain.naive_error:.4f} = Gamma error / sqrt(2 tau_int), "
          f"tau_int = {chain.tau_int:.2f}")
    # -- numbers quoted in the text
    return {
        "raw": _ve(raw.value, raw.error),
        "chain": _est(chain),
        "z_raw_vs_chain": (raw.value - chain.value) / math.hypot(raw.error, chain.error),
        "naive_error": float(chain.naive_error),
        "error_ratio": float(chain.error / chain.naive_error),
    }


def step_hmc(P: Params, out: Path, work: Path) -> dict:
    """The comparison with HMC."""
    action = Phi4Action(P.m2, P.lam, (P.L, P.L))
    ens = work / "hmc.h5"
    run = run_ensemble(ens, RunConfig(n=P.hmc_n, chains=P.hmc_chains, seed=1,
                                      hmc=HMCSettings(warmup=P.hmc_warmup)),
                       action=action, resume=ens.exists())
    print(f"HMC: step size {run['step_size']:.3f} x {run['num_steps']}, "
          f"acceptance {run['acceptance']:.3f}")
    result = compare(work / "flow_mh.h5", ens)  # the first ensemble is the reference
    print(report.compare_table(result))
    report.plot_compare(result, out / "compare.png")
    # -- numbers quoted in the text
    return _compare_numbers(result, run, work)


def _compare_numbers(result: dict, run: dict, work: Path) -> dict:
    obs, labels = result["observables"], result["labels"]
    zs = [abs(r[lab]["z_vs_reference"]) for r in obs.values() for lab in labels[1:]
          if r[lab]["z_vs_reference"] is not None]  # fmt: skip
    chi2 = obs["chi2"]
    return {
        "table": _tidy(report.compare_table(result), work),
        "labels": labels,
        "chi2": {lab: _ve(chi2[lab]["value"], chi2[lab]["error"]) for lab in labels},
        "z_chi2": {lab: chi2[lab]["z_vs_reference"] for lab in labels[1:]},
        "max_abs_z": max(zs) if zs else None,
        "n_z": len(zs),
        "cost_chi2_ms": {lab: 1e3 * chi2[lab]["cost_per_independent_s"] for lab in labels},
        "tau_chi2": {lab: chi2[lab]["tau_int"] for lab in labels},
        "train_time_s": result["ensembles"][labels[0]]["train_time_s"],
        "break_even": chi2[labels[0]].get("break_even_independent"),
        "acceptance": run["acceptance"],
        "step_size": run.get("step_size"),
        "num_steps": run.get("num_steps"),
        "flow_acceptance": run.get("flow_acceptance"),
        "hmc_acceptance": run.get("hmc_acceptance"),
    }


def step_broken(P: Params, out: Path, work: Path) -> dict:
    """The broken phase without mode collapse."""
    name = "phi4_L8_m2-4_lam1"  # shipped flow: L = 8, m² = -4, λ = 1, two modes ±φ
    plain = load_model(name, symmetric=False)  # the flow q alone, without symmetrisation
    m_q = draw_samples(plain.proposal, plain.action, 4096,
                       generator=torch.Generator().manual_seed(6))["magnetization"]
    m_q = m_q / plain.action.volume
    print(f"q alone: fraction of draws with M > 0 = {np.mean(m_q > 0):.3f}")  # one mode only
    ens, hmc_ens = work / "broken.h5", work / "broken_hmc.h5"
    run_ensemble(ens, RunConfig(n=P.broken_n, chains=4, seed=2), model=name,
                 resume=ens.exists())  # the checkpoint says: sample q_s = [q(φ) + q(-φ)]/2
    run_ensemble(hmc_ens, RunConfig(n=P.broken_n, chains=4, seed=2,
                                    hmc=HMCSettings(warmup=P.hmc_warmup)),
                 action=plain.action, resume=hmc_ens.exists())  # local HMC without the flip
    flow_res, hmc_res = analyze(ens), analyze(hmc_ens)
    for label, r in (("flow MH with q_s", flow_res), ("HMC without flip", hmc_res)):
        print(f"{label}: <m> = {report.fmt(r['m']['value'], r['m']['error'])}, "
              f"sign changes per chain {r['mode_crossings']}, warnings {r.warnings}")
    report.plot_histograms(
        {"flow MH with q_s": flow_res.series["m"], "HMC without flip": hmc_res.series["m"],
         "draws of q alone": m_q},
        out / "broken_m.png", xlabel="m = M/V", title="λ = 1: magnetisation",
    )
    # -- numbers quoted in the text
    return {
        "frac_q": float(np.mean(m_q > 0)),
        "flow_m": _est(flow_res["m"]),
        "flow_abs_m": _est(flow_res["abs_m"]),
        "flow_frac": _est(flow_res["frac_m_positive"]),
        "flow_crossings": flow_res["mode_crossings"],
        "flow_acceptance": flow_res["acceptance"],
        "flow_warnings": len(flow_res.warnings),
        "hmc_m": _est(hmc_res["m"]),
        "hmc_abs_m": _est(hmc_res["abs_m"]),
        "hmc_crossings": hmc_res["mode_crossings"],
        "hmc_warnings": hmc_res.warnings,
        "hmc_z2_warning": any("crossed" in w or "sign balance" in w for w in hmc_res.warnings),
    }


def step_hybrid(P: Params, out: Path, work: Path) -> dict:
    """The hybrid chain: flow proposals and HMC."""
    ens = work / "hybrid.h5"
    run = run_ensemble(ens, RunConfig(n=P.hybrid_n, chains=P.hybrid_chains, hmc_traj=P.hybrid_k,
                                      seed=3, hmc=HMCSettings(warmup=P.hmc_warmup)),
                       model=work / "flow.pt", resume=ens.exists())
    print(f"flow acceptance {run['flow_acceptance']:.3f}, "
          f"HMC acceptance {run['hmc_acceptance']:.3f}")
    result = compare(work / "flow_mh.h5", work / "hmc.h5", ens)
    print(report.compare_table(result))
    report.plot_compare(result, out / "compare_hybrid.png")
    # -- numbers quoted in the text
    return _compare_numbers(result, run, work)


def step_scan(P: Params, out: Path, work: Path) -> dict:
    """The λ-scan with a conditional flow."""
    lo, hi = P.scan_range
    models = {}
    for L, steps in zip(P.scan_sizes, P.scan_steps):
        ckpt, action = work / f"conditional_L{L}.pt", Phi4Action(P.m2, (lo + hi) / 2, (L, L))
        if ckpt.exists():  # written once, at the end of the training: a rerun reuses it if it
            check_checkpoint(ckpt, {"action": action.params(), "condition": [lo, hi], "seed": 0})
        else:  # is this flow (the same action, range and seed), and refuses it otherwise
            train_flow(action, recipe="default",
                       flow_overrides={"condition": {"lam": [lo, hi]}},  # one flow for [lo, hi]
                       train_overrides={"n_steps": steps}, seed=0, out=ckpt, checkpoint_every=0)
        models[L] = ckpt
    config = ScanConfig(sizes=P.scan_sizes, lams=parse_lams(P.scan_lams), models=models,
                        run=RunConfig(n=P.scan_n, chains=P.scan_chains))
    summary = run_scan(work / "scan", config, ScanOptions(logz_n=P.logz_n), plots=False)
    print(report.scan_table(summary))  # rerunning run_scan continues an interrupted scan
    report.scan_plots(summary, out / "scan")  # chi2, binder, xi2_over_L, free_energy
    # -- numbers quoted in the text
    crossings = {f"{c['observable']}": {
        "found": c["found"], "lam": c.get("lam"), "error": c.get("error"),
        "value": c.get("value"), "sizes": c["sizes"]} for c in summary["crossings"]}  # fmt: skip
    acc = [p["acceptance"] for p in summary["points"]]
    fe = summary["free_energy"]
    return {
        "table": _tidy(report.scan_table(summary), work),
        "crossings": crossings,
        "binder": crossings.get("binder"),
        "acceptance_min": min(acc),
        "acceptance_max": max(acc),
        "free_energy_max_abs_z": max((v.get("max_abs_z") or 0.0) for v in fe.values()),
        "free_energy_n_compared": sum(int(v.get("n_compared") or 0) for v in fe.values()),
        "training_s": [summary["cost"]["training_s"][str(L)] for L in P.scan_sizes],
        "sampling_s": summary["cost"]["sampling_s"],
        "n_warnings": len(summary["warnings"]),
    }


# ============================================================================ the runner
#: step name -> (function, figures it writes under --out)
STEPS: dict[str, tuple[Callable[[Params, Path, Path], dict], tuple[str, ...]]] = {
    "action": (step_action, ("prior_samples.png", "prior_action.png")),
    "coupling": (step_coupling, ("coupling.png",)),
    "stack": (step_stack, ()),
    "train": (step_train, ("training.png",)),
    "effective": (step_effective, ("action_vs_effective.png", "flow_samples.png")),
    "mh": (step_mh, ()),
    "analysis": (step_analysis, tuple(f"analysis/{n}" for n in report.ANALYSIS_PLOTS)),
    "exact": (step_exact, ()),
    "hmc": (step_hmc, ("compare.png",)),
    "broken": (step_broken, ("broken_m.png",)),
    "hybrid": (step_hybrid, ("compare_hybrid.png",)),
    "scan": (step_scan, tuple(f"scan/{n}" for n in report.SCAN_PLOTS)),
}


def work_files(name: str, P: Params) -> list[str]:
    """The files (and the scan folder) a step writes under --work."""
    return {
        "train": ["flow.pt"],
        "mh": ["flow_mh.h5"],
        "hmc": ["hmc.h5"],
        "broken": ["broken.h5", "broken_hmc.h5"],
        "hybrid": ["hybrid.h5"],
        "scan": [*(f"conditional_L{L}.pt" for L in P.scan_sizes), "scan"],
    }.get(name, [])


def _remove(work: Path, names: list[str]) -> None:
    """Delete what a step wrote under ``work`` (only these names)."""
    for n in names:
        p = work / n
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def _params(P: Params) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(P)))


def run(P: Params, out: Path, work: Path, *, force: bool = False) -> dict:
    """Run every step that is not done yet; returns the numbers (also in ``out/tutorial.json``).

    Raises:
        ValueError: if ``work`` or ``out`` hold a run with other parameters (without ``force``).
    """
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    stamp = work / "params.json"
    params = _params(P)
    json_path = out / NUMBERS
    numbers: dict[str, Any] = {}
    if json_path.exists():
        numbers = json.loads(json_path.read_text())
    held = json.loads(stamp.read_text())["params"] if stamp.exists() else None
    for what, other in ((work, held), (out, numbers.get("params"))):
        if other is not None and other != params and not force:
            raise ValueError(f"{what} holds a tutorial run with other parameters; "
                             "pass --force to redo it, or choose another folder")  # fmt: skip
    if force or numbers.get("params") != params:
        numbers = {}
    if force:
        for name in STEPS:
            _remove(work, work_files(name, P))
    if held != params or force:
        report.write_json(stamp, {"params": params}, "tutorial-params")
    numbers = {"params": params, "steps": numbers.get("steps", {}),
               "timing": numbers.get("timing", {})}  # fmt: skip
    redo = False  # True once a step ran: every later step starts afresh
    for name, (fn, figures) in STEPS.items():
        done = name in numbers["steps"] and all((out / f).is_file() for f in figures) and all(
            (work / f).exists() for f in work_files(name, P))
        if done and not redo:
            print(f"[tutorial] {name}: done (cached)", file=sys.stderr)
            continue
        if redo:
            _remove(work, work_files(name, P))
        redo = True
        print(f"[tutorial] {name}: {fn.__doc__.splitlines()[0]}", file=sys.stderr)
        wall, cpu = time.perf_counter(), time.process_time()
        numbers["steps"][name] = fn(P, out, work)
        numbers["timing"][name] = {"wall_s": time.perf_counter() - wall,
                                   "cpu_s": time.process_time() - cpu}  # fmt: skip
        numbers["timing"]["total"] = {
            k: sum(t[k] for s, t in numbers["timing"].items() if s in STEPS)
            for k in ("wall_s", "cpu_s")
        }
        numbers["flowmc_version"] = __import__("flowmc").__version__
        numbers["torch_threads"] = torch.get_num_threads()
        report.write_json(json_path, numbers, "tutorial")
    return numbers


# ============================================================================ the markdown
CODE_RE = re.compile(r"(<!-- code: ([\w-]+) -->\n)(.*?)(<!-- /code -->)", re.S)
TEXT_RE = re.compile(r"(<!-- text: ([\w.-]+) -->\n)(.*?)(<!-- /text -->)", re.S)
NUM_RE = re.compile(r"(<!--n:([\w.-]+)(?::([^>]*?))?-->)(.*?)(<!--/n-->)", re.S)
PENDING = "*pending*"  # not computed yet (no full run, or the step has not run)
NONE = "n/a"  # computed, and undefined (e.g. no crossing in the range)
MISSING = object()


def _region(source: str, name: str) -> str:
    m = re.search(rf"^# \[doc:{name}\]\n(.*?)^# \[/doc:{name}\]\n", source, re.S | re.M)
    if m is None:
        raise ValueError(f"Expected a region '# [doc:{name}]' in the script; got none")
    return m.group(1).rstrip() + "\n"


def _step_body(source: str, name: str) -> str:
    """The body of ``step_<name>`` without its docstring, up to the numbers marker."""
    tree = ast.parse(source)
    fn = next((n for n in tree.body
               if isinstance(n, ast.FunctionDef) and n.name == f"step_{name}"), None)  # fmt: skip
    if fn is None:
        raise ValueError(f"Expected a function step_{name} in the script; got none")
    lines = source.splitlines()
    first = fn.body[1] if ast.get_docstring(fn) is not None else fn.body[0]
    body = lines[first.lineno - 1 : fn.end_lineno]
    cut = next((i for i, line in enumerate(body) if line.strip() == MARKER), None)
    if cut is None:
        raise ValueError(f"Expected the line {MARKER!r} in step_{name}; got none")
    return textwrap.dedent("\n".join(body[:cut])).rstrip() + "\n"


def code_block(name: str, source: str) -> str:
    """The python code of a doc block: ``imports``, ``params`` or a step's body."""
    if name in ("imports", "params"):
        code = _region(source, name)
    else:
        code = _step_body(source, name)
    return f"```python\n{code}```\n"


def lookup(numbers: Mapping[str, Any], key: str) -> Any:
    """A dotted key (``train.steps``) in the steps' numbers, or ``timing.<step>.cpu_s``;
    :data:`MISSING` if absent."""
    node: Any = {**numbers.get("steps", {}), "timing": numbers.get("timing", {})}
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return MISSING
        node = node[part]
    return node


def format_number(value: Any, spec: str | None) -> str:
    """How a number appears in the text: ``value ± error`` pairs by :func:`report.fmt`."""
    if value is MISSING:
        return PENDING
    if value is None:
        return NONE
    if isinstance(value, Mapping) and "value" in value:
        return report.fmt(value["value"], value.get("error")) if not spec else format(
            value["value"], spec)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and spec:
        return format(value, spec)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(format_number(v, spec) for v in value)
    return str(value)


def number_keys(doc: str) -> list[str]:
    """Every number and printed text the doc quotes."""
    return [m.group(2) for m in NUM_RE.finditer(doc)] + [m.group(2) for m in TEXT_RE.finditer(doc)]


def render_doc(doc: str, numbers: Mapping[str, Any], *, source: str | None = None) -> str:
    """The doc with its code blocks taken from the script and its numbers from ``numbers``."""
    source = Path(__file__).read_text() if source is None else source
    doc = CODE_RE.sub(lambda m: m.group(1) + code_block(m.group(2), source) + m.group(4), doc)

    def text(m: re.Match) -> str:
        value = lookup(numbers, m.group(2))
        body = PENDING + "\n" if value is MISSING else f"```text\n{str(value).rstrip()}\n```\n"
        return m.group(1) + body + m.group(4)

    doc = TEXT_RE.sub(text, doc)
    return NUM_RE.sub(lambda m: m.group(1) + format_number(lookup(numbers, m.group(2)),
                                                           m.group(3)) + m.group(5), doc)


def write_doc(numbers: Mapping[str, Any], doc: Path = DOC) -> bool:
    """Re-render ``doc`` in place; returns whether it changed."""
    old = doc.read_text()
    new = render_doc(old, numbers)
    if new != old:
        doc.write_text(new)
    return new != old


# ============================================================================ command line
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny lattice, few steps (CI, < 60 s)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"figures and {NUMBERS} (default docs/tutorial; --quick: required)")
    ap.add_argument("--work", type=Path, default=None,
                    help="cache of flows and ensembles (default build/tutorial)")
    ap.add_argument("--force", action="store_true", help="redo every step")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--render-doc", action="store_true",
                    help="only re-render docs/tutorial.md from this script and the numbers")
    ap.add_argument("--no-doc", action="store_true",
                    help="do not re-render docs/tutorial.md after a full run into docs/tutorial")
    args = ap.parse_args(argv)
    if args.render_doc:
        path = (args.out or DEFAULT_OUT) / NUMBERS
        numbers = json.loads(path.read_text()) if path.exists() else {}
        changed = write_doc(numbers)
        print(f"{DOC.relative_to(ROOT)} {'updated' if changed else 'unchanged'}")
        return 0
    if args.quick and (args.out is None or args.out.resolve() == DEFAULT_OUT):
        ap.error("--quick needs its own --out (never the committed docs/tutorial)")
    out = (args.out or DEFAULT_OUT).resolve()
    work = (args.work or (DEFAULT_WORK if not args.quick else out / "work")).resolve()
    torch.set_num_threads(args.threads)
    try:
        numbers = run(QUICK if args.quick else FULL, out, work, force=args.force)
    except (ValueError, FileExistsError) as e:
        print(f"tutorial: error: {e}", file=sys.stderr)
        return 2
    total = numbers["timing"].get("total", {})
    print(f"[tutorial] done: {out}; CPU time of the steps run so far "
          f"{total.get('cpu_s', 0.0):.0f} s", file=sys.stderr)
    if out == DEFAULT_OUT and not args.quick and not args.no_doc:
        changed = write_doc(numbers)
        print(f"[tutorial] {DOC.relative_to(ROOT)} {'updated' if changed else 'unchanged'}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
