"""Broken-phase benchmark: symmetrised flow MH against HMC with the global Z2 flip (issue 6).

Nearer the transition than the shipped (8, -4, 1) point: by default L = 16, m2 = -4, lam = 3
(broken at L = 16: the HMC histogram of m is bimodal and plain HMC rarely tunnels). Steps:

1. HMC reference: ``C`` chains, ordered start at +phi0, step size tuned by dual averaging, then
   frozen; once *with* the exact global flip (the reference) and once *without* (sign changes
   of m per trajectory measure how rare tunnelling is; the m histogram shows the two modes).
2. A flow trained by reverse KL with the CLI default for a Z2-symmetric action
   (trained plain, sampled through q_s = [q(phi) + q(-phi)]/2 when sign-imbalanced), the default
   recipe's architecture (``--recipe``) and a modest step budget (or ``--model`` to reuse a
   checkpoint).
3. The flow's ESS / acceptance / frac(M > 0) on fresh draws (``evaluate_flow``) and an
   independence-MH chain with q_s.
4. For both samplers: <m>, <|m|>, tau_int of m and |m| (1/2 + sum rho), acceptance, seconds per
   step and per effective sample (``2 tau_int * seconds/step``; HMC: per trajectory per chain).

Writes one JSON file. ``--quick`` (< 60 s on one thread) runs a tiny L = 8 version to check the
pipeline; its figures mean nothing.

Example:
    python scripts/bench_broken.py --out bench_broken.json            # full (~15 min, 1 thread)
    python scripts/bench_broken.py --quick --out /tmp/bb.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from flowmc.analysis.autocorr import gamma_analysis
from flowmc.io.checkpoint import load_model, machine_info
from flowmc.lattice.action import Phi4Action
from flowmc.mcmc import hmc, imh
from flowmc.mcmc.rng import ChainRNG
from flowmc.training.evaluate import evaluate_flow
from flowmc.training.workflow import train_flow

FULL = {"L": 16, "lam": 3.0, "train_steps": 300, "n": 4096, "chains": 4, "hmc_chains": 16,
        "hmc_traj": 2000, "hmc_warmup": 200, "eval_n": 10240}  # fmt: skip
QUICK = {"L": 8, "lam": 3.0, "train_steps": 30, "n": 512, "chains": 2, "hmc_chains": 8,
         "hmc_traj": 200, "hmc_warmup": 50, "eval_n": 1024}  # fmt: skip


def _stats(m: np.ndarray) -> dict:
    """<m>, <|m|>, tau_int of both, frac(m > 0) from an ``(n, C)`` series of m.

    A series too short for its tau_int is kept (``quiet``) and named in ``unreliable``.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g_m = gamma_analysis(m.T, quiet=True)
        n_m = len(caught)
        g_a = gamma_analysis(np.abs(m).T, quiet=True)
        n_a = len(caught)
        g_p = gamma_analysis((m > 0).astype(float).T, quiet=True)
    flags = [n_m > 0, len(caught[:n_a]) > n_m, len(caught) > n_a]
    return {
        "unreliable": [k for k, bad in zip(("m", "abs_m", "frac_m_positive"), flags) if bad],
        "m": [g_m.value, g_m.error],
        "m_over_error": g_m.value / g_m.error if g_m.error > 0 else math.inf,
        "tau_int_m": [g_m.tau_int, g_m.tau_int_error],
        "abs_m": [g_a.value, g_a.error],
        "tau_int_abs_m": [g_a.tau_int, g_a.tau_int_error],
        "frac_m_positive": [g_p.value, max(g_p.error, 0.5 / math.sqrt(m.size))],
        "n": int(m.size),
    }


def _histogram(m: np.ndarray, bins: int = 41) -> dict:
    lim = float(np.abs(m).max())
    counts, edges = np.histogram(m.ravel(), bins=bins, range=(-lim, lim))
    centre = counts[bins // 2 - 1 : bins // 2 + 2].mean()
    return {
        "edges": edges.tolist(),
        "counts": counts.tolist(),
        # bimodal: the bins at m = 0 hold far fewer samples than the peaks
        "centre_over_peak": float(centre / counts.max()),
    }


def run_hmc(action: Phi4Action, cfg: dict, *, flip: bool, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    c, shape = cfg["hmc_chains"], tuple(action.lattice_shape)
    # ordered start in the classical vacuum phi0 = sqrt(-m2 / (2 lam)): a start at phi = 0 can
    # freeze chains into metastable two-domain (stripe) states; the flip supplies the other sign
    phi0 = math.sqrt(max(-action.m2, 0.0) / (2.0 * action.lam)) if action.lam > 0 else 0.0
    state = hmc.init(torch.full((c, *shape), phi0, dtype=torch.float64), action)
    t0 = time.perf_counter()
    state, eps, n_steps, _ = hmc.tune_step_size(
        action, state, gen, traj_length=1.0, num_warmup=cfg["hmc_warmup"], initial_step_size=0.1
    )
    t_warm = time.perf_counter() - t0
    kernel = hmc.build_kernel(action, step_size=eps, num_steps=n_steps, flip=flip)
    ms, acc = [], []
    t0 = time.perf_counter()
    for _ in range(cfg["hmc_traj"]):
        state, info = kernel(state, gen)
        ms.append(state.phi.flatten(1).mean(1).numpy())
        acc.append(info.is_accepted.double().mean().item())
    sec = time.perf_counter() - t0
    m = np.asarray(ms)
    out = _stats(m)
    sec_step = sec / m.size
    out.update({
        "flip": flip, "step_size": eps, "num_steps": n_steps, "trajectory_length": 1.0,
        "acceptance": float(np.mean(acc)), "warmup_seconds": t_warm, "seconds": sec,
        "seconds_per_step": sec_step,
        "seconds_per_eff_sample_m": sec_step * 2 * out["tau_int_m"][0],
        "seconds_per_eff_sample_abs_m": sec_step * 2 * out["tau_int_abs_m"][0],
        "sign_changes_per_chain": [int(x) for x in (np.diff(np.sign(m), axis=0) != 0).sum(0)],
        "histogram": _histogram(m),
    })  # fmt: skip
    return out


def train(
    action: Phi4Action, cfg: dict, seed: int, recipe: str = "default"
) -> tuple[torch.nn.Module, dict]:
    res = train_flow(action, recipe=recipe, train_overrides={"n_steps": cfg["train_steps"]},
                     seed=seed, progress=False)  # the library workflow, incl. its Z2 rule
    for p in res.flow.parameters():
        p.requires_grad_(False)
    tail = res.history["ess"][-50:]
    info = {
        "recipe": recipe, "flow_config": res.flow.config.to_dict(),
        "train_config": res.trainer.config.to_dict(), "symmetric": res.symmetric,
        "train_seconds": res.training_time_s,
        "batch_ess_last50": float(np.mean(tail)) if tail else None,
    }  # fmt: skip
    return res.proposal, info


@torch.no_grad()
def run_flow_chain(proposal: torch.nn.Module, action: Phi4Action, cfg: dict, seed: int) -> dict:
    rng = ChainRNG(seed, cfg["chains"])
    c, n = cfg["chains"], cfg["n"]
    kernel = imh.flow_imh(proposal, action, max(1024 // c, 1))
    t0 = time.perf_counter()
    state = imh.sample_init(proposal, action, rng)
    ms, acc, done = [], [], 0
    while done < n:
        state, info = kernel.step(state, rng)
        k = min(info.is_accepted.shape[0], n - done)
        ms.append(info.phi[:k].flatten(2).mean(2).double().numpy())
        acc.append(info.is_accepted[:k].numpy())
        done += k
    sec = time.perf_counter() - t0
    m = np.concatenate(ms)
    out = _stats(m)
    sec_step = sec / m.size
    out.update({
        "acceptance": float(np.concatenate(acc).mean()), "seconds": sec,
        "seconds_per_step": sec_step,
        "seconds_per_eff_sample_m": sec_step * 2 * out["tau_int_m"][0],
        "seconds_per_eff_sample_abs_m": sec_step * 2 * out["tau_int_abs_m"][0],
    })  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny L=8 run (< 60 s), pipeline check")
    p.add_argument("--L", type=int, default=None)
    p.add_argument("--m2", type=float, default=-4.0)
    p.add_argument("--lam", type=float, default=None)
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--model", type=Path, default=None, help="reuse a trained checkpoint")
    p.add_argument("--recipe", default="default", help="training recipe (flowmc.training.recipes)")
    p.add_argument("--n", type=int, default=None, help="flow-MH steps per chain")
    p.add_argument("--chains", type=int, default=None)
    p.add_argument("--hmc-chains", type=int, default=None)
    p.add_argument("--hmc-traj", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench_broken.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("L", "lam", "train_steps", "n", "chains", "hmc_chains", "hmc_traj"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    t_all = time.perf_counter()
    action = Phi4Action(args.m2, cfg["lam"], (cfg["L"], cfg["L"]))
    res: dict = {"action": action.params(), "config": cfg, "quick": args.quick,
                 "machine": machine_info(), "python": platform.python_version()}  # fmt: skip
    res["hmc_flip"] = run_hmc(action, cfg, flip=True, seed=args.seed + 1)
    res["hmc_noflip"] = run_hmc(action, cfg, flip=False, seed=args.seed + 2)
    if args.model is not None:
        model = load_model(args.model, lattice_shape=tuple(action.lattice_shape))
        if model.action != action:
            raise ValueError(f"Expected a model for {action!r}; got one for {model.action!r}")
        proposal, res["flow_training"] = model.proposal, {"model": str(args.model)}
    else:
        proposal, res["flow_training"] = train(action, cfg, args.seed, args.recipe)
    ev = evaluate_flow(proposal, action, cfg["eval_n"], generator=torch.Generator().manual_seed(7))
    res["flow_eval"] = {k: ev[k] for k in ("n", "ess", "ess_batch_mean", "ess_batch_err",
                                           "mh_acceptance", "frac_m_positive",
                                           "frac_m_positive_err", "f_q", "log_z", "log_z_err")}
    res["flow_mh"] = run_flow_chain(proposal, action, cfg, args.seed + 3)
    res["seconds_total"] = time.perf_counter() - t_all
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=float))
    for name in ("hmc_flip", "hmc_noflip", "flow_mh"):
        r = res[name]
        print(
            f"{name:10s} acc {r['acceptance']:.3f}  <m> {r['m'][0]:+.4f}({r['m'][1]:.4f})  "
            f"<|m|> {r['abs_m'][0]:.4f}({r['abs_m'][1]:.4f})  tau_m {r['tau_int_m'][0]:.2f}  "
            f"tau_|m| {r['tau_int_abs_m'][0]:.2f}  "
            f"s/eff(|m|) {r['seconds_per_eff_sample_abs_m']:.2e}"
        )
    print(f"flow ESS {ev['ess']:.3f}, frac M>0 {ev['frac_m_positive']:.3f}; total "
          f"{res['seconds_total']:.1f} s -> {args.out}")  # fmt: skip
    return res


if __name__ == "__main__":
    main()
