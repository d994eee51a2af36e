"""``flowmc compare``: tables, JSON keys, z-scores, cost arithmetic, training-cost amortisation.

Two real ensembles (flow MH with an untrained 2-layer flow and HMC, 4x4, 60 rows x 4 chains)
and a synthetic "hybrid" that carries the HMC rows unchanged (so its z-score against HMC is
exactly 0) plus the hybrid's per-kernel scalars. About 5 s in all.
"""

from __future__ import annotations

import builtins
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmc import report
from flowmc.analysis.compare import compare, ensemble_cost
from flowmc.analysis.ensemble import SCALAR_KEYS, analyze
from flowmc.cli import main
from flowmc.flows.flow import FlowConfig, build_flow
from flowmc.io.checkpoint import load_model, save_checkpoint
from flowmc.io.ensemble import EnsembleWriter, open_ensemble
from flowmc.lattice.action import Phi4Action
from flowmc.sampling.run import HMCSettings, RunConfig, run_ensemble

SHAPE = (4, 4)
TRAIN_TIME = 12.5
HYBRID_TRAIN_TIME = 5.0
STAT_KEYS = ("value", "error", "tau_int", "tau_int_error", "ess", "cost_per_independent_s",
             "cost_per_independent_with_training_s", "z_vs_reference", "cost_ratio_vs_reference")


def _model_meta(path: Path, seconds: float | None) -> dict:
    """``meta["model"]`` as the unified sampling driver records it (branch ``driver``)."""
    return {"model": {"path": str(path), "sha256": "0" * 64, "training_time_s": seconds,
                      "recipe": "default"}}


def _copy_as(src: Path, dst: Path, *, sampler: dict, meta: dict, extra: dict) -> Path:
    """Write ``src``'s rows again under another sampler name, with extra per-row scalars."""
    with open_ensemble(src) as ens:
        scalars = {k: ens.scalar(k) for k in ens.scalar_names}
        configs = ens.configs[:]
        shape, c, action = ens.lattice_shape, ens.n_chains, ens.action
        wall = float(np.sum(ens.chunk_wall_times))
    scalars.update(extra)
    with EnsembleWriter.create(
        dst, lattice_shape=shape, n_chains=c, scalar_names=list(scalars), action=action,
        sampler=sampler, meta=meta, store_configs=True, config_dtype="float64",
    ) as w:  # fmt: skip
        w.append(scalars=scalars, configs=configs, state={"phi": configs[-1]}, wall_time=wall)
    return dst


@pytest.fixture(scope="module")
def ensembles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Flow MH, HMC and a synthetic hybrid (HMC's rows) on a 4x4 lattice."""
    d = tmp_path_factory.mktemp("cmp")
    action = Phi4Action(-4.0, 8.0, SHAPE)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        flow = build_flow(FlowConfig(SHAPE, n_layers=2, hidden=(4,), prior_sigma=0.6))
    model_path = d / "model.pt"
    save_checkpoint(model_path, flow, action, symmetric=True,
                    meta={"training_time_s": TRAIN_TIME})  # recorded at sampling time
    run_ensemble(d / "flow.h5", RunConfig(n=60, chains=4, batch=32, seed=1),
                 model=load_model(model_path), progress=False)
    run_ensemble(d / "hmc.h5", RunConfig(n=60, chains=4, chunk=25, hmc=HMCSettings(warmup=20)),
                 action=action, progress=False)
    rng = np.random.default_rng(3)
    extra = {  # the hybrid's schema: 'accepted' is the flow step's, hmc_accepted counts of K
        "accepted": rng.random((60, 4)) < 0.3,
        "hmc_accepted": rng.integers(0, 4, (60, 4)).astype(float),  # counts of 3 trajectories
        "hmc_acceptance": rng.random((60, 4)),
    }
    hybrid = _copy_as(d / "hmc.h5", d / "hybrid.h5",
                      sampler={"name": "hybrid", "hmc_traj": 3},
                      meta=_model_meta(model_path, HYBRID_TRAIN_TIME), extra=extra)
    return {"flow": d / "flow.h5", "hmc": d / "hmc.h5", "hybrid": hybrid, "model": model_path,
            "dir": d, "extra": extra}


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
                 "z hmc", "training 12.5 s (recorded at sampling)"):
        assert word in text, word
    res = json.loads(out_json.read_text())
    assert set(res) == {"flowmc_report", "labels", "reference", "ensembles", "same_action",
                        "observables", "warnings"}
    assert res["flowmc_report"] == "compare"
    assert res["labels"] == ["flow-imh", "hmc"] and res["same_action"] is True
    assert res["reference"] == "flow-imh"
    assert set(res["observables"]) <= set(SCALAR_KEYS)
    assert {"chi2", "abs_m", "energy", "m2"} <= set(res["observables"])
    for row in res["observables"].values():
        assert {"flow-imh", "hmc", "diff", "diff_error", "diff_sigma", "cost_ratio",
                "pairwise_z"} <= set(row)
        for lab in res["labels"]:
            assert set(STAT_KEYS) <= set(row[lab])
    flow, hmc = res["ensembles"]["flow-imh"], res["ensembles"]["hmc"]
    assert flow["train_time_s"] == TRAIN_TIME and flow["train_time_source"] == "ensemble"
    assert hmc["train_time_s"] is None and hmc["warmup_time_s"] > 0
    assert flow["acceptance_by_kernel"] == {"flow": flow["acceptance"]}
    assert hmc["acceptance_by_kernel"] == {"hmc": hmc["acceptance"]}
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
    assert row["hmc"]["z_vs_reference"] == pytest.approx(-0.05 / 0.05)
    assert row["flow-imh"]["z_vs_reference"] is None
    assert row["pairwise_z"]["hmc"]["flow-imh"] == pytest.approx(-1.0)
    assert row["pairwise_z"]["flow-imh"]["hmc"] == pytest.approx(1.0)
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
    assert row["hmc"]["cost_ratio_vs_reference"] == pytest.approx(costs["hmc"] / costs["flow-imh"])
    be = row["break_even_independent_flow-imh"]
    assert row["flow-imh"]["break_even_independent"] == {"hmc": be}
    if costs["hmc"] > costs["flow-imh"]:
        assert be == pytest.approx(TRAIN_TIME / (costs["hmc"] - costs["flow-imh"]))
    else:
        assert be is None  # the flow never catches up
    assert res["ensembles"]["flow-imh"]["acceptance"] == 0.3
    assert "flow-imh: short chain" in res["warnings"]
    assert "chi2" in report.compare_table(res)


def test_three_way_z_scores_costs_and_kernels(
    ensembles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """flow MH, HMC and hybrid: z of each against the reference, pairwise z, per-kernel
    acceptance, training time of both flow users; JSON and plot."""
    paths = [ensembles[k] for k in ("flow", "hmc", "hybrid")]
    out_json, plots = tmp_path / "three.json", tmp_path / "plots"
    argv = ["compare", *map(str, paths), "--json", str(out_json), "--plots", str(plots)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for word in ("z hmc", "z hybrid", "τ_int hybrid", "s/indep hybrid", "flow 0.", "hmc 0.",
                 "training 5 s (recorded at sampling)"):
        assert word in text, word
    res = json.loads(out_json.read_text())
    labels = ["flow-imh", "hmc", "hybrid"]
    assert res["labels"] == labels and res["reference"] == "flow-imh"
    hyb = res["ensembles"]["hybrid"]
    extra = ensembles["extra"]
    assert hyb["is_flow"] is True and hyb["train_time_s"] == HYBRID_TRAIN_TIME
    kernels = hyb["acceptance_by_kernel"]
    assert kernels["flow"] == pytest.approx(extra["accepted"].mean())
    # hmc_acceptance (probabilities) is read after hmc_accepted (counts / hmc_traj); both given
    assert kernels["hmc"] == pytest.approx(extra["hmc_acceptance"].mean())
    for name, row in res["observables"].items():
        assert "diff" not in row and "cost_ratio" not in row  # two-way keys only for two
        ref = row["flow-imh"]
        for lab in labels[1:]:
            s = row[lab]
            want = (s["value"] - ref["value"]) / math.hypot(s["error"], ref["error"])
            assert s["z_vs_reference"] == pytest.approx(want, rel=1e-12), (name, lab)
        pz = row["pairwise_z"]
        for a in labels:
            for b in labels:
                if a != b:
                    assert pz[a][b] == pytest.approx(-pz[b][a], rel=1e-12)
        assert pz["hybrid"]["hmc"] == 0.0  # identical rows: the same estimate
        assert set(row["hybrid"]["break_even_independent"]) == {"flow-imh", "hmc"}
        assert row["hmc"].get("break_even_independent") is None
    assert (plots / "cost_per_independent.png").stat().st_size > 1000


def test_hybrid_kernel_acceptance_rules(ensembles: dict[str, Path], tmp_path: Path) -> None:
    """Counts are divided by hmc_traj; without it the kernel is skipped with a note."""
    extra = ensembles["extra"]
    counts_only = {"accepted": extra["accepted"], "hmc_accepted": extra["hmc_accepted"]}
    path = _copy_as(ensembles["hmc"], tmp_path / "h.h5", sampler={"name": "hybrid", "hmc_traj": 3},
                    meta={}, extra=counts_only)
    res = analyze(path)
    assert res["acceptance_by_kernel"]["hmc"] == pytest.approx(extra["hmc_accepted"].mean() / 3)
    assert res["acceptance_by_kernel"]["flow"] == pytest.approx(extra["accepted"].mean())
    assert any("hybrid ensemble is the flow step's" in n for n in res["notes"])
    path = _copy_as(ensembles["hmc"], tmp_path / "k.h5", sampler={"name": "hybrid"}, meta={},
                    extra=counts_only)
    res = analyze(path)
    assert "hmc" not in res["acceptance_by_kernel"]
    assert any("'hmc_traj'" in n for n in res["notes"])


def test_training_time_sources(ensembles: dict[str, Path], tmp_path: Path) -> None:
    assert ensemble_cost(ensembles["flow"], train_time=3.0)["train_time_source"] == "given"
    assert ensemble_cost(ensembles["hmc"], train_time=3.0)["train_time_s"] is None
    e = ensemble_cost(ensembles["flow"])
    assert (e["train_time_s"], e["train_time_source"]) == (TRAIN_TIME, "ensemble")
    # no training time recorded (ensembles of earlier versions): unknown, with what to do
    old = _copy_as(ensembles["flow"], tmp_path / "old.h5", sampler={"name": "flow-imh"},
                   meta={"model_path": str(ensembles["model"])}, extra={})
    e = ensemble_cost(old)
    assert e["train_time_s"] is None and "--train-time" in e["warnings"][0]
    assert "training time unknown" in report.compare_table(
        compare(old, ensembles["hmc"], analyze_fn=lambda p, d: _stub({}, 0.5)))
    with pytest.raises(ValueError, match="train_time"):
        ensemble_cost(ensembles["flow"], train_time=-1.0)


def test_compare_never_opens_a_file_an_ensemble_names(
    ensembles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14 item 8: compare read ``meta.model_path`` and opened that checkpoint (a crafted
    ``/dev/zero`` hung it). Before the fix this test failed: compare called ``file_sha256`` and
    ``load_checkpoint`` on the named path. Now any open of a named path raises."""
    named = {os.path.realpath(ensembles["model"]), "/dev/zero"}
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) in named:
            raise AssertionError(f"compare opened {file}")
        return real_open(file, *args, **kwargs)

    def fail(*args, **kwargs):
        raise AssertionError("compare loaded a checkpoint")

    crafted = _copy_as(ensembles["flow"], tmp_path / "crafted.h5", sampler={"name": "flow-imh"},
                       meta={"model_path": "/dev/zero",
                             "model": {"path": "/dev/zero", "training_time_s": 7.0}},
                       extra={})  # fmt: skip
    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(torch, "load", fail)
    monkeypatch.setattr("flowmc.io.checkpoint.load_checkpoint", fail)
    monkeypatch.setattr("flowmc.io.ensemble.file_sha256", fail)
    res = compare(crafted, ensembles["flow"], ensembles["hmc"])
    assert res["ensembles"]["A (flow-imh)"]["train_time_s"] == 7.0
    assert res["ensembles"]["B (flow-imh)"]["train_time_s"] == TRAIN_TIME
    # the guard is live: opening a named path does fail (negative control)
    with pytest.raises(AssertionError, match="compare opened"):
        open(ensembles["model"], "rb")


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
    assert main(["compare", str(ensembles["hmc"])]) == 2
    assert "at least two" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least two"):
        compare(ensembles["hmc"])
