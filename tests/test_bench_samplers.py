"""``scripts/bench_samplers.py --quick`` end to end (issue 23's benchmark: cluster vs HMC vs flow
MH) on a 4x4 lattice, with an untrained flow for the flow-MH path (its numbers mean nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowmc.flows.flow import FlowConfig, build_flow
from flowmc.io.checkpoint import save_checkpoint
from flowmc.io.ensemble import open_ensemble
from flowmc.lattice.action import Phi4Action

ROOT = Path(__file__).resolve().parents[1]


def test_bench_samplers_quick(tmp_path: Path) -> None:
    model = tmp_path / "q4.pt"
    flow = build_flow(FlowConfig((4, 4), n_layers=2, hidden=(4,), prior_sigma=0.6))
    for p in flow.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_checkpoint(model, flow, Phi4Action(-4.0, 4.25, (4, 4)), symmetric=True,
                    meta={"training_time_s": 1.5})  # fmt: skip
    out = tmp_path / "bs"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_samplers.py"), "--quick", "--quiet",
         "--out-dir", str(out), "--model", f"4={model}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "cost per independent chi2, cluster/hmc" in proc.stdout
    res = json.loads((out / "bench_samplers.json").read_text())
    assert res["flowmc_report"] == "bench-samplers" and res["threads"] == 1
    (pt,) = res["points"]
    assert (pt["name"], pt["L"], pt["lam"]) == ("q4", 4, 4.25)
    labels = [r["label"] for r in pt["methods"]]
    assert labels == ["hmc_tau1", "hmc_tau2", "cluster", "flow_mh"]
    assert pt["hmc_best"] in labels[:2] and pt["model"]["training_time_s"] == 1.5
    for r in pt["methods"]:
        assert Path(r["path"]).is_file() and r["wall_time_s"] > 0 and r["cpu_time_s"] > 0
        assert len(r["loadavg_before"]) == len(r["loadavg_after"]) == 3
        c2 = r["observables"]["chi2"]
        assert r["ms_per_independent_chi2"] == pytest.approx(
            1e3 * 2 * c2["tau_int"] * r["wall_time_s"] / r["configs"])
        assert r["configs_per_s"] == pytest.approx(r["configs"] / r["wall_time_s"])
        assert {"abs_m", "binder", "energy"} <= set(r["observables"])
    by = {r["label"]: r for r in pt["methods"]}
    assert by["cluster"]["chains"] == 4 and by["flow_mh"]["chains"] == 2
    assert set(by["cluster"]["acceptance_by_kernel"]) == {"metropolis"}
    assert 0 < by["cluster"]["cluster_size"] < 1
    assert set(pt["table"]) == {pt["hmc_best"], "cluster", "flow_mh"}
    assert set(pt["cost_ratio_vs_hmc"]) == {"cluster/hmc", "flow_mh/hmc"}
    ag = pt["agreement"]
    assert ag["tests"] == 3 * 4 and ag["z_crit"] > 3 and isinstance(ag["agree"], bool)
    with open_ensemble(Path(by["cluster"]["path"])) as ens:
        assert ens.sampler["name"] == "cluster" and ens.meta["bench_samplers"]["point"] == "q4"
