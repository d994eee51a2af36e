"""CPU smoke runs of the benchmark and recipe scripts (their full runs are documented in
docs/benchmarks.md); each must run end to end and write its JSON/checkpoint."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> None:
    # the scripts import this checkout's flowmc (not whichever one the interpreter has installed)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_gpu_l32_recipe_smoke_on_cpu(tmp_path):
    out = tmp_path / "l32.pt"
    _run([str(ROOT / "scripts" / "gpu_L32.py"), "--smoke", "--device", "cpu", "--out", str(out)],
         tmp_path)
    assert out.exists()


def test_bench_sample_quick(tmp_path):
    out = tmp_path / "bench_sample.json"
    _run([str(ROOT / "scripts" / "bench_sample.py"), "--quick", "--out", str(out)], tmp_path)
    res = json.loads(out.read_text())
    samplers = {r["sampler"] for r in res["runs"]}
    assert {"seed_loop", "flowmc_kernel", "flowmc_sample_hdf5"} <= samplers
    assert all(0 < r["acceptance"] <= 1 for r in res["runs"])


def test_bench_hybrid_quick(tmp_path):
    """Issue 11's benchmark end to end on a 4x4 lattice (tiny flows trained in-process)."""
    out = tmp_path / "bh"
    _run([str(ROOT / "scripts" / "bench_hybrid.py"), "--quick", "--quiet", "--out-dir", str(out)],
         tmp_path)  # fmt: skip
    res = json.loads((out / "bench_hybrid.json").read_text())
    assert res["flowmc_report"] == "bench-hybrid" and res["threads"] == 1
    assert [p["name"] for p in res["points"]] == ["q-sym", "q-broken"]
    for pt in res["points"]:
        recs = [*pt["hmc_scan"], pt["flow_mh"], *pt["hybrid_scan"]]
        recs += [pt["hmc_flip"]] if pt["hmc_flip"] else []
        assert [r["traj_length"] for r in pt["hmc_scan"]] == [0.5, 1.0]
        assert [r["K"] for r in pt["hybrid_scan"]] == [1, 2] and pt["flow_mh"]["K"] == 0
        # the same configurations for every method, analysed the same way
        assert {r["configs_analysed"] for r in recs} == {pt["configs"]} == {95 * 4}
        for r in recs:
            assert Path(r["path"]).is_file()
            assert r["wall_time_s"] > 0 and r["cpu_time_s"] > 0
            assert len(r["loadavg_before"]) == len(r["loadavg_after"]) == 3
            c2 = r["observables"]["chi2"]
            assert c2["cost_per_independent_s"] == pytest.approx(
                2 * c2["tau_int"] * r["wall_time_s"] / r["configs"])
            assert len(r["sign_changes_per_100"]) == 4
        for r in pt["hybrid_scan"]:
            assert set(r["acceptance"]) == {"flow", "hmc"} and r["train_time_s"] > 0
            assert r["traj_length"] == pt["hybrid_traj_length"]
        assert pt["hmc_best"] in {r["label"] for r in pt["hmc_scan"]}
        assert pt["hybrid_best"] in {r["label"] for r in pt["hybrid_scan"]}
        v = pt["verdict"]
        assert v["hybrid_vs_hmc"]["method"] == pt["hybrid_best"]
        assert v["hybrid_vs_hmc"]["reference"] == pt["hmc_best"]
        assert isinstance(v["pass"], bool)
    sym, broken = res["points"]
    assert sym["verdict"]["hybrid_vs_hmc"]["target"] == 1.25 and sym["hmc_flip"] is None
    assert broken["hmc_flip"]["flip"] is True
    assert set(broken["verdict"]["broken_phase"]) >= {"m_zero", "tunnels", "m_over_error"}
    # the bench's cost is flowmc compare's on the stored ensembles
    from flowmc.analysis.compare import compare

    best = next(r for r in sym["hybrid_scan"] if r["label"] == sym["hybrid_best"])
    ref = next(r for r in sym["hmc_scan"] if r["label"] == sym["hmc_best"])
    cmp = compare(ref["path"], best["path"], discard=best["discard"])
    assert cmp["observables"]["chi2"]["cost_ratio"] == pytest.approx(
        1 / sym["verdict"]["hybrid_vs_hmc"]["ratio"])


def test_bench_scan_quick(tmp_path):
    """Every part of scripts/bench_scan.py end to end on tiny lattices (< 60 s): its JSON holds
    the verdicts of issue 12's three targets with the figures behind them."""
    out = tmp_path / "bench_scan.json"
    _run([str(ROOT / "scripts" / "bench_scan.py"), "--quick", "--quiet", "--out", str(out)],
         tmp_path)  # fmt: skip
    res = json.loads(out.read_text())
    assert set(res["verdicts"]) == {"conditional", "cost", "critical"}
    cond = res["parts"]["conditional"]
    assert [p["lam"] for p in cond["points"]] == [4.0, 8.0]
    for p in cond["points"]:
        assert 0 < p["mh_acceptance_chain"] <= 1 and p["chi2"]["z"] is not None
    cost = res["parts"]["cost"]
    assert cost["scan_total_s"] > 0 and "ONE training" in cost["separate_training"]["note"]
    assert len(cost["scan"]["per_point"]) == 3
    crit = res["parts"]["critical"]
    assert crit["command"].startswith("flowmc scan --L 4 6") and crit["crossings"]
    for stage in (cond["training"], cost["scan"], crit):
        assert stage["wall_s"] > 0 and stage["cpu_s"] > 0 and len(stage["loadavg_start"]) == 3

def test_bench_distributed_quick(tmp_path):
    """1 and 2 gloo processes (training, flow MH, HMC), and the GPU mode's smoke run on the CPU.

    Run in this process (its children are forked from it), to save two interpreter starts.
    """
    spec = importlib.util.spec_from_file_location("bench_distributed",
                                                  ROOT / "scripts" / "bench_distributed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, gpu = tmp_path / "bench_distributed.json", tmp_path / "bench_gpu.json"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert bench.main(["--quick", "--out", str(out)]) == 0
        assert bench.main(["--gpu", "--quick", "--device", "cpu", "--out", str(gpu)]) == 0
    res = json.loads(out.read_text())
    assert [r["ranks"] for r in res["runs"]] == [1, 2]
    for r in res["runs"]:
        assert r["train"]["global_batch"] == 64 and r["train"]["steps_per_second"] > 0
        assert r["train"]["cpu_seconds_all_ranks"] > 0 and len(r["train"]["loadavg_before"]) == 3
        assert r["flow_mh"]["configs_per_second"] > 0 and r["hmc"]["configs_per_second"] > 0
    # the chains do not depend on the number of ranks
    assert res["same_results_for_every_W"]["hmc_step_size"]
    assert res["same_results_for_every_W"]["hmc_acceptance"]
    res = json.loads(gpu.read_text())
    assert res["mode"] == "gpu" and res["train"]["steps_per_second"] > 0
    assert 0 <= res["flow_mh"]["acceptance"] <= 1 and res["flow_mh"]["model"] == "trained here"


def test_bench_train_quick(tmp_path):
    """scripts/bench_train.py end to end (30 steps): training, evaluation, a flow-MH and an HMC
    ensemble at the point and their agreement, in the JSON the recipe tables are built from."""
    out = tmp_path / "bt.json"
    _run([str(ROOT / "scripts" / "bench_train.py"), "--quick", "--points", "t1", "--recipes",
          "fast", "--mh-n", "40", "--hmc-n", "40", "--work", str(tmp_path / "w"), "--out",
          str(out)], tmp_path)  # fmt: skip
    run = json.loads(out.read_text())["runs"][0]
    assert run["recipe"] == "fast" and run["steps"] == 30 and run["cpu_time_s"] > 0
    assert len(run["stages"]) == 1 and 0 < run["eval"]["mh_acceptance"] <= 1
    mh = run["mh"]
    assert mh["flow"]["chi2"]["tau_int"] >= 0.5 and mh["hmc"]["acceptance"] > 0
    assert set(mh["agreement"]) == {"chi2", "abs_m", "binder", "energy"}


def test_explore_flow_smoke(tmp_path):
    """scripts/explore_flow.py: train, evaluate, save, and continue on twice the lattice."""
    small, log = tmp_path / "s.pt", tmp_path / "e.jsonl"
    args = ["--flow", '{"momentum": true, "n_layers": 2, "hidden": [4]}', "--neval", "64",
            "--out", str(log)]
    _run([str(ROOT / "scripts" / "explore_flow.py"), "--L", "4", "--evals", "2,4", "--save",
          str(small), *args], tmp_path)  # fmt: skip
    _run([str(ROOT / "scripts" / "explore_flow.py"), "--L", "8", "--evals", "0,2", "--init",
          str(small), *args], tmp_path)  # fmt: skip
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [[p["step"] for p in r["curve"]] for r in recs] == [[2, 4], [0, 2]]
    assert all(0 < p["acc"] <= 1 for r in recs for p in r["curve"])


def test_export_flow_script(tmp_path):
    """scripts/export_flow.py: a shipped coupling flow copied unchanged (no --int-steps); with
    --int-steps on a coupling flow, one line and exit 2, nothing written."""
    from flowmc.io.checkpoint import load_checkpoint

    _run([str(ROOT / "scripts" / "export_flow.py"), "phi4_L8_m2-4_lam8", str(tmp_path / "c.pt")],
         tmp_path)  # fmt: skip
    assert load_checkpoint(tmp_path / "c.pt")["meta"]["exported"]["int_steps"] is None
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_flow.py"),
                           "phi4_L8_m2-4_lam8", str(tmp_path / "d.pt"), "--int-steps", "40"],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "has no continuous flow layers" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "d.pt").exists()
