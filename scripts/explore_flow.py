"""Explore a flow architecture or schedule: train one configuration, evaluate it at checkpoints.

The harness behind the "what was tried" tables of ``docs/recipes.md`` (the runs' logs are in
``docs/results/explore/``). A recipe plus JSON overrides of its ``FlowConfig`` fields (``--flow``),
of its ``extra`` dict (``--extra``) and of its ``TrainConfig`` (``--train``) is trained on one
thread; at every step count of ``--evals`` the flow is evaluated on ``--neval`` fresh samples (ESS,
independence-MH acceptance, F_q, fraction with M > 0, log Z), also through the Z2-symmetrised
proposal q_s. The CPU time of the optimizer steps (evaluations excluded) is the time axis. An
optional second phase (``--phase2`` overrides, ``--evals2``) continues with other hyper-parameters
(e.g. the path-gradient estimator). ``--init`` starts from a flow saved by ``--save`` on another
lattice size (through :func:`flowmc.flows.flow.transfer_state_dict`).

Examples::

    python scripts/explore_flow.py --tag t1_global --flow '{"momentum": true}' --evals 300,1800
    python scripts/explore_flow.py --tag nc16 --L 16 --lam 4.25 --init nc8.pt --evals 0,350,700 \\
        --train '{"lr": 0.001}' --out nc16.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from flowmc.flows.flow import FlowConfig, Z2SymmetricFlow, build_flow, transfer_state_dict
from flowmc.lattice.action import Phi4Action
from flowmc.training.evaluate import evaluate_flow
from flowmc.training.recipes import get_recipe, override
from flowmc.training.train import Trainer


def _config(recipe: str, shape: tuple[int, ...], flow: dict, extra: dict) -> FlowConfig:
    fc, _ = get_recipe(recipe, shape)
    fc = override(fc, **flow)
    return override(fc, extra={**fc.extra, **extra})


def _evaluate(flow: torch.nn.Module, action: Phi4Action, n: int, symmetric: bool) -> dict:
    flow.eval()
    prop = Z2SymmetricFlow(flow) if symmetric else flow
    gen = torch.Generator().manual_seed(999)
    r = evaluate_flow(prop, action, n, batch_size=1024, generator=gen)
    r2 = evaluate_flow(Z2SymmetricFlow(flow), action, n, batch_size=1024,
                       generator=torch.Generator().manual_seed(999))  # fmt: skip
    flow.train()
    return {"ess": r["ess"], "acc": r["mh_acceptance"], "fq": r["f_q"],
            "fpos": r["frac_m_positive"], "logz": r["log_z"], "ess_sym": r2["ess"],
            "acc_sym": r2["mh_acceptance"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--L", type=int, default=8)
    p.add_argument("--m2", type=float, default=-4.0)
    p.add_argument("--lam", type=float, default=8.0)
    p.add_argument("--recipe", default="local", help="base recipe (default: local)")
    p.add_argument("--flow", default="{}", help="JSON FlowConfig overrides")
    p.add_argument("--extra", default="{}", help="JSON overrides of FlowConfig.extra")
    p.add_argument("--train", default="{}", help="JSON TrainConfig overrides")
    p.add_argument("--evals", default="300,600,1200,1800", help="step counts to evaluate at")
    p.add_argument("--neval", type=int, default=4096, help="samples per evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sym", action="store_true", help="train and evaluate the symmetrised q_s")
    p.add_argument("--init", default=None, help="start from a flow saved by --save")
    p.add_argument("--save", default=None, help="save the trained flow (torch file)")
    p.add_argument("--phase2", default=None, help="JSON TrainConfig overrides of a 2nd phase")
    p.add_argument("--evals2", default="", help="step counts (total) of the 2nd phase")
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="explore.jsonl", help="JSON lines to append the record to")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    shape = (a.L, a.L)
    action = Phi4Action(a.m2, a.lam, shape)
    fo, ex, to = json.loads(a.flow), json.loads(a.extra), json.loads(a.train)
    fc = _config(a.recipe, shape, fo, ex)
    evals = [int(x) for x in a.evals.split(",")]
    to.setdefault("n_steps", max(evals))
    _, tc = get_recipe(a.recipe, shape)
    tc = override(tc, symmetric=a.sym or None, **to)
    torch.manual_seed(a.seed)
    flow = build_flow(fc)
    if a.init:
        blob = torch.load(a.init)
        old = _config(blob["recipe"], tuple(blob["shape"]), blob["flow"], blob["extra"])
        flow.load_state_dict(transfer_state_dict(blob["state"], old, fc))
    tr = Trainer(flow, action, tc, generator=torch.Generator().manual_seed(a.seed + 1))
    rec = {"tag": a.tag, "L": a.L, "m2": a.m2, "lam": a.lam, "recipe": a.recipe, "flow": fo,
           "train": to, "extra": ex, "n_params": sum(q.numel() for q in flow.parameters()),
           "curve": [], "load0": os.getloadavg()}  # fmt: skip
    cpu0, ev_cpu = time.process_time(), 0.0

    def phase(targets: list[int], tag: int) -> None:
        nonlocal ev_cpu
        for target in targets:
            tr.run(target, progress=False)
            c1 = time.process_time()
            pt = {"step": target, "phase": tag, **_evaluate(flow, action, a.neval, tc.symmetric)}
            ev_cpu += time.process_time() - c1
            pt["cpu"] = time.process_time() - cpu0 - ev_cpu
            pt["wall_train"] = tr.elapsed
            rec["curve"].append(pt)
            print(json.dumps(pt), flush=True)

    phase(evals, 1)
    if a.phase2:
        over = json.loads(a.phase2)
        evals2 = [int(x) for x in a.evals2.split(",")]
        tr.config = override(tc, **over, n_steps=max(evals2))
        phase(evals2, 2)
    rec["load1"] = os.getloadavg()
    if a.save:
        torch.save({"state": flow.state_dict(), "shape": list(shape), "flow": fo, "extra": ex,
                    "recipe": a.recipe, "cpu": rec["curve"][-1]["cpu"]}, a.save)  # fmt: skip
    with open(a.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
