"""The cluster kernel with the surface of HMC: ``flowmc cluster``, ensembles, resume, compare, scan.

The kernel itself (detailed balance on 2x2, the free theory, agreement with HMC at (8, -4, 8) and
(16, -4, 4.25), negative controls) is tested in tests/mcmc/test_cluster.py; here what the surface
adds: the CLI writes an ensemble that agrees with an ``flowmc hmc`` ensemble (Gamma-method errors,
Bonferroni over the observables, with a negative control that shows the test has power), a run
interrupted and resumed equals an uninterrupted one byte for byte, ``flowmc compare`` reports the
cluster's kernel and cost, ``flowmc scan --cluster`` records its sampler, and the input errors
are one line. The sharded run under torchrun is in tests/sampling/test_cluster_shards.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

from flowmc.analysis.ensemble import analyze
from flowmc.cli import main
from flowmc.io.ensemble import EnsembleWriter, open_ensemble
from flowmc.lattice.action import Phi4Action
from flowmc.mcmc import cluster as CL
from flowmc.sampling.cluster import CLUSTER_SCALARS, ClusterSettings
from flowmc.sampling.run import SCALARS, RunConfig, run_ensemble
from flowmc.scan import ScanConfig
from tests.helpers import ensemble_dump

ALPHA = 0.01
ACTION4 = Phi4Action(-4.0, 8.0, (4, 4))
KW = {"progress": False, "config_dtype": "float64"}


def _z_crit(m: int) -> float:
    """Two-sided Bonferroni critical value for ``m`` simultaneous z-tests at level ALPHA."""
    return float(norm.ppf(1 - ALPHA / (2 * m)))


def _cfg(n: int, *, chains: int = 2, seed: int = 0, chunk: int | None = None, thin: int = 1,
         start: str = "cold", **settings: object) -> RunConfig:  # fmt: skip
    return RunConfig(n=n, chains=chains, seed=seed, chunk=chunk, thin=thin, start=start,
                     cluster=ClusterSettings(**settings))  # fmt: skip


def _dump(path: Path) -> dict[str, bytes]:
    """:func:`tests.helpers.ensemble_dump` plus the sampler record."""
    with open_ensemble(path) as ens:
        sampler = json.dumps(ens.sampler, sort_keys=True).encode()
    return {**ensemble_dump(path), "sampler": sampler}


# ------------------------------------------------------------------------------------- CLI


def test_cluster_cli_writes_valid_ensemble(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cl.h5"
    argv = ["cluster", "--L", "4", "--m2", "-4", "--lam", "8", "--n", "30", "--chains", "3",
            "--warmup", "20", "--out", str(out), "--quiet", "--json", str(tmp_path / "s.json")]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Metropolis hits" in text and "Wolff clusters" in text and str(out) in text
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["sampler"] == "cluster" and summary["n"] == 30 and summary["chains"] == 3
    assert 0.3 < summary["metropolis_acceptance"] < 0.7  # adapted towards 0.5
    assert summary["acceptance"] == summary["metropolis_acceptance"]
    assert 0 < summary["cluster_size"] < 1
    with open_ensemble(out) as ens:
        assert ens.n == 30 and ens.n_chains == 3 and ens.lattice_shape == (4, 4)
        assert ens.scalar_names == SCALARS["cluster"] == CLUSTER_SCALARS
        s = ens.sampler
        assert s["name"] == "cluster" and s["num_hits"] == 3 and s["num_clusters"] == 2
        assert s["warmup"] == 20 and s["target_accept"] == 0.5 and s["fixed_step_size"] is None
        assert s["step_size"] == summary["step_size"] > 0 and s["dtype"] == "float64"
        assert s["start"] == "cold" and s["rng"] == "per-chain-v1"
        assert ens.action == ACTION4.params() and ens.model_sha256 == ""
        configs = np.asarray(ens.configs)
        np.testing.assert_allclose(ens.scalar("magnetization"), configs.sum((2, 3)), rtol=1e-5)
        s_re = ACTION4(torch.as_tensor(configs, dtype=torch.float64).flatten(0, 1))
        np.testing.assert_allclose(ens.scalar("action"), s_re.numpy().reshape(30, 3),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
        acc = ens.scalar("metropolis_acceptance")
        assert acc.dtype == np.float64 and np.all((acc >= 0) & (acc <= 1))
        assert abs(acc.mean() - summary["metropolis_acceptance"]) < 1e-12
        size = ens.scalar("cluster_size")
        assert np.all((size > 0) & (size <= 1))
        assert abs(size.mean() - summary["cluster_size"]) < 1e-12
        assert ens.meta["warmup"]["steps"] == 20 and ens.meta["resolved_config"]["n"] == 30
        assert ens.chunk_ends[-1] == 30 and np.all(ens.chunk_wall_times > 0)
    # refuses to overwrite; --resume checks the sampler settings
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err
    assert main([*argv[:-2], "--resume", "--num-hits", "2"]) == 2
    assert "num_hits" in capsys.readouterr().err
    # --resume to a larger n reads the adapted step size back from the file
    assert main([*argv[:-2], "--resume", "--n", "40"]) == 0
    with open_ensemble(out) as ens:
        assert ens.n == 40 and ens.sampler["step_size"] == summary["step_size"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device", "cuda"], "Expected --device cpu: the cluster kernel is compiled for the CPU"),
        (["--dtype", "float32"], "Expected --dtype float64"),
        (["--num-hits", "0"], "--num-hits: expected an integer >= 1"),
        (["--warmup", "1"], "Expected warmup >= 2 to adapt the step size"),
        (["--step-size", "-1"], "Expected a finite step_size > 0"),
        (["--target-accept", "1.5"], r"Expected target_accept in \(0, 1\)"),
        (["--L", "5"], r"Expected even lattice extents >= 2 .* got \(5, 5\)"),
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str],
                                 message: str) -> None:  # fmt: skip
    import re

    argv = ["cluster", "--L", "4", "--m2", "-4", "--lam", "8", "--n", "5", "--quiet",
            "--out", str(tmp_path / "x.h5"), *extra]  # fmt: skip
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "x.h5").exists()


def test_without_numba_one_line_names_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(CL, "_numba", None)
    argv = ["cluster", "--L", "4", "--m2", "-4", "--lam", "8", "--n", "5", "--quiet",
            "--out", str(tmp_path / "x.h5")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install flowmc-lattice[cluster]" in err, err
    scan = ["scan", "--cluster", "--L", "4", "--m2", "-4", "--lam", "4,5", "--n", "5",
            "--quiet", "--out", str(tmp_path / "scan")]  # fmt: skip
    assert main(scan) == 2
    assert "pip install flowmc-lattice[cluster]" in capsys.readouterr().err
    with pytest.raises(ImportError, match=r"flowmc-lattice\[cluster\]"):
        run_ensemble(tmp_path / "y.h5", _cfg(5), action=ACTION4, **KW)


def test_config_file_section(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[cluster]\nnum-hits = 2\nnum-clusters = 1\nstep-size = 0.8\nwarmup = 4\n")
    out = tmp_path / "c.h5"
    argv = ["cluster", "--config", str(cfg), "--L", "4", "--m2", "-4", "--lam", "8", "--n", "4",
            "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    with open_ensemble(out) as ens:
        s = ens.sampler
        assert (s["num_hits"], s["num_clusters"], s["fixed_step_size"], s["step_size"],
                s["warmup"]) == (2, 1, 0.8, 0.8, 4)  # fmt: skip


def test_library_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Expected cluster to be ClusterSettings"):
        RunConfig(n=1, cluster={"num_hits": 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not ergodic"):
        ClusterSettings(num_hits=0)
    with pytest.raises(ValueError, match="Expected device cpu"):
        run_ensemble(tmp_path / "a.h5", _cfg(2), action=ACTION4, device="meta", **KW)
    with pytest.raises(ValueError, match="Expected dtype float64"):
        run_ensemble(tmp_path / "a.h5", _cfg(2), action=ACTION4, dtype=torch.float32, **KW)
    with pytest.raises(ValueError, match="Expected no model for a cluster run"):
        run_ensemble(tmp_path / "a.h5", _cfg(2), model="no-such.pt", **KW)
    with pytest.raises(ValueError, match="Phi4Action"):
        free = Phi4Action(0.5, 0.0, (4, 4)).free_theory()
        run_ensemble(tmp_path / "a.h5", _cfg(2), action=free, **KW)
    # an HMC file cannot be resumed as a cluster run (and vice versa)
    run_ensemble(tmp_path / "h.h5", RunConfig(n=2, chains=2), action=ACTION4, **KW)
    with pytest.raises(ValueError, match="it holds a 'hmc' ensemble; this run is 'cluster'"):
        run_ensemble(tmp_path / "h.h5", _cfg(4), action=ACTION4, resume=True, **KW)
    assert not (tmp_path / "a.h5").exists()


# ---------------------------------------------------------------------------------- resume


def test_resume_is_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted (an exception between commits) and resumed twice == uninterrupted, byte for
    byte: rows, configurations, chain states, generator states, counters, the sampler record."""
    cfg = _cfg(25, chains=3, warmup=15, chunk=4, thin=2, seed=11, start="random",
               num_clusters=1)  # fmt: skip
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    s_full = run_ensemble(full, cfg, action=ACTION4, **KW)

    calls = {"n": 0}
    real_append = EnsembleWriter.append

    def crashing_append(self: EnsembleWriter, **kw: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # "killed" between commits
        real_append(self, **kw)

    monkeypatch.setattr(EnsembleWriter, "append", crashing_append)
    with pytest.raises(KeyboardInterrupt):
        run_ensemble(part, cfg, action=ACTION4, **KW)
    monkeypatch.setattr(EnsembleWriter, "append", real_append)
    with open_ensemble(part) as ens:
        assert ens.n == 8
    run_ensemble(part, replace(cfg, n=13), action=ACTION4, resume=True, **KW)
    s = run_ensemble(part, cfg, action=ACTION4, resume=True, **KW)
    assert s["n"] == 25 and s["steps"] == 50 and s["step_size"] == s_full["step_size"]
    for key in ("metropolis_acceptance", "cluster_size"):  # totals over the whole run
        assert s[key] == pytest.approx(s_full[key], abs=1e-15)
    a, b = _dump(full), _dump(part)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k


def test_resume_right_after_warmup_with_fixed_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill after the post-warm-up state commit but before any row resumes exactly."""
    cfg = _cfg(6, chains=2, warmup=5, chunk=3, seed=3, step_size=0.7, num_hits=2)
    run_ensemble(tmp_path / "full.h5", cfg, action=ACTION4, **KW)

    def boom(self: EnsembleWriter, **kw: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(EnsembleWriter, "append", boom)
    with pytest.raises(KeyboardInterrupt):
        run_ensemble(tmp_path / "part.h5", cfg, action=ACTION4, **KW)
    monkeypatch.undo()
    with open_ensemble(tmp_path / "part.h5") as ens:
        assert ens.n == 0 and ens.has_state and ens.sampler["step_size"] == 0.7
    run_ensemble(tmp_path / "part.h5", cfg, action=ACTION4, resume=True, **KW)
    assert _dump(tmp_path / "full.h5") == _dump(tmp_path / "part.h5")


# ------------------------------------------------------------- agreement with HMC, compare

POINT = ["--L", "8", "--m2", "-4"]
#: Observables z-tested between the samplers (Bonferroni over these).
AGREE = ("abs_m", "chi2", "energy", "action_density")


@pytest.fixture(scope="module")
def ensembles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``flowmc hmc`` and ``flowmc cluster`` at (8, -4, 8); ``flowmc cluster`` at (8, -4, 7.5)
    for the negative control. 8 chains each; HMC 1000 trajectories per chain (tau_int(chi2)
    ~ 1), the cluster 2000 steps (it is ~5x cheaper per step here)."""
    tmp = tmp_path_factory.mktemp("agree")
    common = ["--chains", "8", "--warmup", "100", "--quiet", "--threads", "1"]
    runs = [
        ["hmc", *POINT, "--lam", "8", "--n", "1000", "--seed", "1", "--out", str(tmp / "hmc.h5")],
        ["cluster", *POINT, "--lam", "8", "--n", "2000", "--seed", "2",
         "--out", str(tmp / "cluster.h5")],
        ["cluster", *POINT, "--lam", "7.5", "--n", "2000", "--seed", "3",
         "--out", str(tmp / "cluster_lam7.5.h5")],
    ]  # fmt: skip
    for argv in runs:
        assert main([*argv, *common]) == 0
    return tmp


def _zscores(a: Path, b: Path) -> dict[str, float]:
    ra, rb = analyze(a), analyze(b)
    out = {}
    for k in AGREE:
        ea, eb = ra.observables[k], rb.observables[k]
        out[k] = (ea.value - eb.value) / math.hypot(ea.error, eb.error)
    return out


def test_cluster_cli_agrees_with_hmc_cli(ensembles: Path) -> None:
    """<|m|>, chi2, the Ising energy and S/V of the two CLI ensembles agree: z with the
    Gamma-method errors of both (``flowmc analyze``), Bonferroni over the 4 observables.

    With ~8000 (HMC) and ~16000 (cluster) configurations at tau_int ~ 1 the error of chi2 is
    ~1.5%; a bias of 5% would be a 3-sigma effect. The negative control below shows the test
    resolves a 6% change of the coupling."""
    z = _zscores(ensembles / "hmc.h5", ensembles / "cluster.h5")
    assert max(abs(v) for v in z.values()) < _z_crit(len(AGREE)), z
    with open_ensemble(ensembles / "cluster.h5") as ens:
        assert ens.sampler["name"] == "cluster" and ens.n == 2000 and ens.n_chains == 8


def test_agreement_negative_control(ensembles: Path) -> None:
    """The same test against a cluster ensemble at lambda = 7.5 instead of 8 must fail."""
    z = _zscores(ensembles / "hmc.h5", ensembles / "cluster_lam7.5.h5")
    assert max(abs(v) for v in z.values()) > _z_crit(len(AGREE)), z


def test_compare_cluster_with_hmc(ensembles: Path, capsys: pytest.CaptureFixture) -> None:
    hmc, cl = ensembles / "hmc.h5", ensembles / "cluster.h5"
    js = ensembles / "compare.json"
    assert main(["compare", str(hmc), str(cl), "--json", str(js), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "acceptance metropolis 0." in text and "acceptance hmc 0." in text
    res = json.loads(js.read_text())
    assert res["labels"] == ["hmc", "cluster"] and res["same_action"]
    e = res["ensembles"]["cluster"]
    assert set(e["acceptance_by_kernel"]) == {"metropolis"}
    assert 0.4 < e["acceptance_by_kernel"]["metropolis"] < 0.6
    assert not e["is_flow"] and e["train_time_s"] is None and e["cost_per_config_s"] > 0
    assert e["warmup_time_s"] > 0 and e["sampler"]["name"] == "cluster"
    assert set(res["ensembles"]["hmc"]["acceptance_by_kernel"]) == {"hmc"}
    z = _zscores(hmc, cl)
    for k in AGREE:
        row = res["observables"][k]
        c = row["cluster"]
        assert c["z_vs_reference"] == pytest.approx(-z[k], rel=1e-9)
        assert c["cost_per_independent_s"] == pytest.approx(
            2 * c["tau_int"] * e["cost_per_config_s"])
        assert row["cost_ratio"] > 0


# -------------------------------------------------------------------------------- scan


def test_scan_cluster(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "scan"
    argv = ["scan", "--cluster", "--L", "4", "--m2", "-4", "--lam", "4,6", "--n", "40",
            "--chains", "2", "--warmup", "10", "--num-hits", "2", "--cluster-target-accept",
            "0.4", "--quiet", "--no-plots", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "L=4 cluster" in text
    man = json.loads((out / "manifest.json").read_text())
    assert man["samplers"] == {"4": "cluster"}
    assert man["run"]["cluster"] == {"num_hits": 2, "num_clusters": 2, "target_accept": 0.4,
                                     "warmup": 10, "step_size": None}  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    for pt in summary["points"]:
        assert pt["sampler"] == "cluster" and pt["complete"]
        assert set(pt["acceptance_by_kernel"]) == {"metropolis"}
        assert pt["cost"]["s_per_independent_chi2"] > 0
        with open_ensemble(out / pt["file"]) as ens:
            s = ens.sampler
            assert s["name"] == "cluster" and s["num_hits"] == 2 and s["target_accept"] == 0.4
            assert ens.meta["scan"]["lam"] == pt["lam"]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    assert main(argv) == 0  # a rerun skips the finished points
    capsys.readouterr()
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")} == before
    # the same directory with HMC is another scan (the sampler is part of its identity)
    hmc = [a for a in argv if a != "--cluster"]
    hmc = [*hmc[:1], "--hmc", *hmc[1:]]
    for drop in ("--num-hits", "--cluster-target-accept"):
        i = hmc.index(drop)
        del hmc[i:i + 2]
    assert main(hmc) == 2
    assert "run.cluster" in capsys.readouterr().err
    # one mode at a time
    assert main([*argv[:1], "--hmc", *argv[1:]]) == 2
    assert "give either --model (flows) or --hmc or --cluster, not several; got --hmc and " \
        "--cluster" in capsys.readouterr().err
    assert main([*argv, "--device", "cuda"]) == 2
    assert "Expected --device cpu" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Expected no models with run.cluster"):
        ScanConfig(sizes=(4,), lams=(4.0, 5.0), models={4: "m.pt"},
                   run=RunConfig(n=2, cluster=ClusterSettings()))  # fmt: skip
