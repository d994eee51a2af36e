"""``flowmc compare``: table, JSON keys, cost arithmetic and training-cost amortisation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmc.action import Phi4Action
from flowmc.checkpoint import load_model, save_checkpoint
from flowmc.cli import main
from flowmc.compare import OBSERVABLES, compare, ensemble_cost, format_table
from flowmc.ensemble import open_ensemble
from flowmc.flow import FlowConfig, build_flow
from flowmc.run import HMCSettings, RunConfig, run_ensemble

SHAPE = (4, 4)
TRAIN_TIME = 12.5
STAT_KEYS = ("value", "error", "tau_int", "tau_int_error", "ess", "cost_per_independent_s",
             "cost_per_independent_with_training_s")


@pytest.fixture(scope="module")
def ensembles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small flow-MH ensemble (untrained 2-layer flow) and an HMC ensemble, 4x4."""
    d = tmp_path_factory.mktemp("cmp")
    action = Phi4Action(-4.0, 8.0, SHAPE)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        flow = build_flow(FlowConfig(SHAPE, n_layers=2, hidden=(4,), prior_sigma=0.6))
    model_path = d / "model.pt"
    save_checkpoint(model_path, flow, action, symmetric=True,
                    meta={"training_time_s": TRAIN_TIME})
    run_ensemble(d / "flow.h5", RunConfig(n=60, chains=4, batch=32, seed=1),
                 model=load_model(model_path), progress=False)
    run_ensemble(d / "hmc.h5", RunConfig(n=60, chains=4, chunk=25, hmc=HMCSettings(warmup=20)),
                 action=action, progress=False)
    return {"flow": d / "flow.h5", "hmc": d / "hmc.h5", "model": model_path, "dir": d}


def _stub(values: dict[str, tuple[float, float, float]], acc: float) -> dict:
    out = {
        name: {"value": v, "error": e, "tau_int": t, "tau_int_error": 0.1 * t, "ess": 100.0}
        for name, (v, e, t) in values.items()
    }
    return {**out, "acceptance": acc, "n": 60, "warnings": ["short chain"]}


def test_cli_prints_table_and_writes_json(
    ensembles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out_json, plots = tmp_path / "cmp.json", tmp_path / "plots"
    argv = ["compare", str(ensembles["flow"]), str(ensembles["hmc"]), "--json", str(out_json),
            "--plots", str(plots)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for word in ("observable", "flow-imh", "hmc", "chi2", "abs_m", "energy", "s/indep",
                 "training 12.5 s (checkpoint)"):
        assert word in text, word
    res = json.loads(out_json.read_text())
    assert set(res) == {"labels", "ensembles", "same_action", "observables", "warnings"}
    assert res["labels"] == ["flow-imh", "hmc"] and res["same_action"] is True
    assert set(res["observables"]) <= set(OBSERVABLES)
    assert {"chi2", "abs_m", "energy", "m2"} <= set(res["observables"])
    for row in res["observables"].values():
        assert {"flow-imh", "hmc", "diff", "diff_error", "diff_sigma", "cost_ratio"} <= set(row)
        for lab in res["labels"]:
            assert set(STAT_KEYS) <= set(row[lab])
    flow, hmc = res["ensembles"]["flow-imh"], res["ensembles"]["hmc"]
    assert flow["train_time_s"] == TRAIN_TIME and flow["train_time_source"] == "checkpoint"
    assert hmc["train_time_s"] is None and hmc["warmup_time_s"] > 0
    for e in (flow, hmc):
        assert e["configs"] == 240 and e["cost_per_config_s"] > 0 and 0 < e["acceptance"] <= 1
    assert (plots / "cost_per_independent.png").stat().st_size > 1000


def test_cost_arithmetic_with_stub_analysis(ensembles: dict[str, Path]) -> None:
    stubs = {
        str(ensembles["flow"]): _stub({"chi2": (0.80, 0.03, 4.0), "abs_m": (0.1, 0.01, 2.0)}, 0.3),
        str(ensembles["hmc"]): _stub({"chi2": (0.75, 0.04, 1.5), "abs_m": (0.1, 0.01, 1.0)}, 0.9),
    }
    res = compare(ensembles["flow"], ensembles["hmc"], analyze_fn=lambda p, d: stubs[p])
    assert list(res["observables"]) == ["abs_m", "chi2"]  # table order, only those present
    row = res["observables"]["chi2"]
    assert row["diff"] == pytest.approx(0.05)
    assert row["diff_sigma"] == pytest.approx(0.05 / 0.05)
    costs = {}
    for lab, path in (("flow-imh", ensembles["flow"]), ("hmc", ensembles["hmc"])):
        with open_ensemble(path) as ens:
            per = float(np.sum(ens.chunk_wall_times)) / (ens.n * ens.n_chains)
        assert res["ensembles"][lab]["cost_per_config_s"] == pytest.approx(per)
        tau = stubs[str(path)]["chi2"]["tau_int"]
        assert row[lab]["cost_per_independent_s"] == pytest.approx(2 * tau * per)
        costs[lab] = 2 * tau * per
    amort = res["ensembles"]["flow-imh"]["train_cost_per_config_s"]
    assert amort == pytest.approx(TRAIN_TIME / 240)
    assert row["flow-imh"]["cost_per_independent_with_training_s"] == pytest.approx(
        2 * 4.0 * (res["ensembles"]["flow-imh"]["cost_per_config_s"] + amort)
    )
    assert row["hmc"]["cost_per_independent_with_training_s"] is None
    assert row["cost_ratio"] == pytest.approx(costs["flow-imh"] / costs["hmc"])
    be = row["break_even_independent_flow-imh"]
    if costs["hmc"] > costs["flow-imh"]:
        assert be == pytest.approx(TRAIN_TIME / (costs["hmc"] - costs["flow-imh"]))
    else:
        assert be is None  # the flow never catches up
    assert res["ensembles"]["flow-imh"]["acceptance"] == 0.3
    assert "flow-imh: short chain" in res["warnings"]
    assert "chi2" in format_table(res)


def test_training_time_sources(ensembles: dict[str, Path], tmp_path: Path) -> None:
    assert ensemble_cost(ensembles["flow"], train_time=3.0)["train_time_source"] == "given"
    assert ensemble_cost(ensembles["hmc"], train_time=3.0)["train_time_s"] is None
    # checkpoint moved away: no training time, and a warning that says what to do
    moved = tmp_path / "moved.pt"
    ensembles["model"].rename(moved)
    try:
        e = ensemble_cost(ensembles["flow"])
        assert e["train_time_s"] is None and "--train-time" in e["warnings"][0]
    finally:
        moved.rename(ensembles["model"])


def test_different_actions_warn_and_bad_input(
    ensembles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = tmp_path / "other.h5"
    run_ensemble(other, RunConfig(n=10, chains=2, hmc=HMCSettings(warmup=5)),
                 action=Phi4Action(-4.0, 6.0, SHAPE), progress=False)
    stub = _stub({"chi2": (0.7, 0.05, 1.0)}, 0.8)
    res = compare(ensembles["hmc"], other, analyze_fn=lambda p, d: stub)
    assert res["labels"] == ["A (hmc)", "B (hmc)"] and res["same_action"] is False
    assert any("different actions" in w for w in res["warnings"])
    assert math.isclose(res["observables"]["chi2"]["diff_sigma"], 0.0)
    assert main(["compare", str(ensembles["hmc"]), str(tmp_path / "missing.h5")]) == 2
    assert "missing.h5" in capsys.readouterr().err
