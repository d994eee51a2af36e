"""``flowmc scan`` and flowmc.scan: the grid, the scan directory (its own; manifest; foreign
files and other settings refused), resume (finished points skipped, an interrupted point resumed
bit-identically, a larger n extends every point), the flows a scan accepts, the summary files
and the CLI (one-line errors, Ctrl-C). Physics of the results: test_free_energy.py (free energy
against exact quadrature) and test_crossing.py (crossings)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flowmc.cli import main
from flowmc.flows.flow import FlowConfig, build_flow
from flowmc.io.checkpoint import save_checkpoint
from flowmc.io.ensemble import file_sha256, open_ensemble
from flowmc.io.safeio import sniff
from flowmc.lattice.action import Phi4Action
from flowmc.sampling.run import HMCSettings, RunConfig, run_ensemble
from flowmc.scan import (
    ScanConfig,
    ScanOptions,
    parse_lams,
    point_name,
    point_seed,
    run_scan,
    summarize_scan,
)

HMC = HMCSettings(warmup=10)
FAST = ScanOptions(n_boot=100, logz_n=256, logz_batch=128)


def _flow(path: Path, L: int, m2: float = -1.0, lam: float = 1.0,
          cond: tuple[float, float] | None = None) -> Path:  # fmt: skip
    """An untrained flow checkpoint (MH is exact with any flow)."""
    cfg = FlowConfig((L, L), n_layers=2, hidden=(4,),
                     condition={} if cond is None else {"lam": list(cond)})  # fmt: skip
    save_checkpoint(path, build_flow(cfg), Phi4Action(m2, lam, (L, L)))
    return path


def _hmc_config(n: int = 30, lams: str = "0.5:1:3") -> ScanConfig:
    return ScanConfig(sizes=(2, 4), lams=parse_lams(lams), m2=-1.0,
                      run=RunConfig(n=n, chains=2, hmc=HMC))  # fmt: skip


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(d.glob("*.h5"))}


def test_grid_names_and_seeds() -> None:
    assert parse_lams("3.8:4.8:9")[1] == 3.925 and len(parse_lams("3.8:4.8:9")) == 9
    assert parse_lams("1,2.5") == (1.0, 2.5) and parse_lams(4) == (4.0,)
    for bad, msg in [("4:3:5", "LO < HI"), ("1:2:1", "N >= 2"), ("1:2", "LO:HI:N"),
                     ("2,1", "increasing"), ("-1,2", "lam >= 0"), ("a", "LO:HI:N")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            parse_lams(bad)
    assert point_name(8, 4.125) == "L8_lam4.125" and point_name(16, 4.0) == "L16_lam4"
    seeds = {point_seed(0, L, i, s) for L in (8, 16) for i in range(9) for s in (0, 1)}
    assert len(seeds) == 36 and point_seed(0, 8, 3) == point_seed(0, 8, 3) < 2**63


def test_hmc_scan_writes_its_files_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "scan"
    s = run_scan(out, _hmc_config(), FAST, progress=False)
    assert s["complete"] and len(s["points"]) == 6
    assert {p["sampler"] for p in s["points"]} == {"hmc"}
    names = {p.name for p in out.iterdir()}
    assert {"manifest.json", "summary.json", "summary.csv", "chi2.png", "binder.png",
            "xi2_over_L.png", "free_energy.png", "L2_lam0.5.h5", "L4_lam1.h5"} <= names
    kinds = {n: sniff(out / n) for n in ("manifest.json", "summary.json", "summary.csv",
                                         "binder.png", "L2_lam0.5.h5")}  # fmt: skip
    assert [(k.kind, k.report) for k in kinds.values()] == [
        ("json-report", "scan-manifest"), ("json-report", "scan"), ("csv-report", "scan"),
        ("png-report", "scan-binder"), ("ensemble", None)]  # fmt: skip
    table = np.genfromtxt(out / "summary.csv", delimiter=",", names=True, skip_header=1,
                          dtype=None, encoding="utf-8")  # fmt: skip
    assert table.shape == (6,) and list(table["L"]) == [2, 2, 2, 4, 4, 4]
    assert np.all(np.isfinite(table["chi2_err"])) and np.all(table["n"] == 30)
    assert [c["observable"] for c in s["crossings"]] == ["binder", "xi2_over_L"]
    assert s["crossings"][0]["sizes"] == [2, 4]
    # m2 < 0 and no flow: no thermodynamic integration, said so
    assert "m2 <= 0" in s["free_energy"]["2"]["note"]
    with open_ensemble(out / "L4_lam0.75.h5") as ens:  # each point has its own seed
        assert ens.seed == point_seed(0, 4, 1) and ens.meta["scan"]["lam"] == 0.75

    before = _hashes(out)
    run_scan(out, _hmc_config(), FAST, progress=False, plots=False)  # finished points: skipped
    assert _hashes(out) == before

    # an interrupted point: 10 of 30 rows committed; the rerun resumes it bit-identically
    victim = out / "L2_lam0.75.h5"
    with open_ensemble(victim) as ens:
        full = np.asarray(ens.configs[:])
    victim.unlink()
    scan_id = json.loads((out / "manifest.json").read_text())["id"]  # the point's own identity
    run_ensemble(victim, RunConfig(n=10, chains=2, hmc=HMC, seed=point_seed(0, 2, 1)),
                 action=Phi4Action(-1.0, 0.75, (2, 2)), progress=False,
                 meta={"scan": {"L": 2, "lam": 0.75, "index": 1, "id": scan_id}})  # fmt: skip
    run_scan(out, _hmc_config(), FAST, progress=False, plots=False)
    with open_ensemble(victim) as ens:
        assert ens.n == 30
        np.testing.assert_array_equal(np.asarray(ens.configs[:]), full)

    s40 = run_scan(out, _hmc_config(n=40), FAST, progress=False, plots=False)  # extends all
    assert all(p["n"] == 40 for p in s40["points"])
    assert json.loads((out / "manifest.json").read_text())["run"]["n"] == 40
    with pytest.raises(ValueError, match="may only grow"):
        run_scan(out, _hmc_config(n=20), FAST, progress=False, plots=False)
    with pytest.raises(ValueError, match=r"other settings \(lams: stored"):
        run_scan(out, _hmc_config(n=40, lams="0.5:1:5"), FAST, progress=False, plots=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="'notes.txt' is a file flowmc did not write"):
        run_scan(out, _hmc_config(n=40), FAST, progress=False, plots=False)
    # the analysis alone, with other options, without sampling
    (out / "notes.txt").unlink()
    again = summarize_scan(out, ScanOptions(discard=5, crossing_method="linear", n_boot=0),
                           plots=False)  # fmt: skip
    assert again["points"][0]["observables"]["chi2"]["value"] != s40["points"][0][
        "observables"]["chi2"]["value"]  # fmt: skip


def test_directories_that_are_not_a_scan_are_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="a scan writes a directory"):
        run_scan(tmp_path / "file", _hmc_config(), FAST, progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "data.h5").write_text("x")
    with pytest.raises(FileExistsError, match="no scan manifest"):
        run_scan(busy, _hmc_config(), FAST, progress=False)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "manifest.json").write_text('{"a": 1}')
    with pytest.raises(FileExistsError, match="its manifest.json is a JSON file flowmc did not"):
        run_scan(fake, _hmc_config(), FAST, progress=False)
    with pytest.raises(ValueError, match="no scan manifest|has none"):
        summarize_scan(tmp_path)


def test_the_flows_a_scan_accepts(tmp_path: Path) -> None:
    fixed = _flow(tmp_path / "fixed.pt", 2, lam=1.0)
    cond = _flow(tmp_path / "cond.pt", 2, cond=(0.5, 1.0))
    run = RunConfig(n=5, chains=1)

    def cfg(lams: str, models: dict, **kw: object) -> ScanConfig:
        return ScanConfig(sizes=(2,), lams=parse_lams(lams), run=run, models=models, **kw)

    with pytest.raises(ValueError, match=r"trained at lam = 1 only .* cannot serve the scan "
                       r"points lam = 0.5, 0.75, 1; train a flow over a range"):  # fmt: skip
        run_scan(tmp_path / "a", cfg("0.5:1:3", {2: fixed}), progress=False)
    with pytest.raises(ValueError, match=r"conditioned on lam over \[0.5, 1\]; the scan points "
                       r"lam = 0.25 are outside it"):  # fmt: skip
        run_scan(tmp_path / "b", cfg("0.25,0.5,1", {2: cond}), progress=False)
    with pytest.raises(ValueError, match=r"lattice \(2, 2\); the scan's L=4 needs \(4, 4\)"):
        run_scan(tmp_path / "c", ScanConfig(sizes=(4,), lams=(1.0,), run=run, models={4: cond}),
                 progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="has m2 = -1"):
        run_scan(tmp_path / "d", cfg("1", {2: fixed}, m2=-2.0), progress=False)
    with pytest.raises(ValueError, match=r"Expected m2 \(--m2\)"):
        run_scan(tmp_path / "e", ScanConfig(sizes=(2,), lams=(1.0,), run=run), progress=False)
    with pytest.raises(ValueError, match="m2 > 0 when lam == 0"):
        run_scan(tmp_path / "f", ScanConfig(sizes=(2,), lams=(0.0, 1.0), run=run, m2=-1.0),
                 progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="--ti-anchor free"):
        run_scan(tmp_path / "g", cfg("1", {2: fixed}), ScanOptions(ti_anchor="free"),
                 progress=False)  # fmt: skip
    assert not any((tmp_path / x).exists() for x in "abcdefg")  # refused before writing
    # a fixed-lambda flow serves its own coupling; the log Z of each flow point is stored
    s = run_scan(tmp_path / "ok", cfg("1", {2: fixed}), FAST, progress=False, plots=False)
    assert s["points"][0]["sampler"] == "flow-imh" and s["points"][0]["free_energy"]["flow"]
    assert sniff(tmp_path / "ok" / "L2_lam1.logz.json").report == "scan-logz"


def test_cli_scan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cond = _flow(tmp_path / "c2.pt", 2, cond=(0.5, 1.0))
    out = tmp_path / "mixed"
    argv = ["scan", "--model", f"2={cond},4=hmc", "--L", "2", "4", "--m2", "-1", "--lam",
            "0.5:1:3", "--n", "20", "--chains", "2", "--warmup", "10", "--hmc-traj", "1",
            "--batch", "4", "--logz-n", "256", "--n-boot", "100", "--out", str(out), "--quiet",
            "--no-plots"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "crossing U4     L=2/4" in text and "files      " in text
    man = json.loads((out / "manifest.json").read_text())
    assert man["samplers"] == {"2": "hybrid", "4": "hmc"} and man["models"]["4"] is None
    assert main(argv) == 0  # resume: nothing left to sample
    assert "skipped" not in capsys.readouterr().err  # --quiet: no progress lines

    cfg = tmp_path / "scan.toml"
    cfg.write_text('[scan]\nL = [2, 4]\nlam = "1,2"\nm2 = -1.0\nhmc = true\nn = 10\nwarmup = 5\n'
                   'n-boot = 0\n')  # fmt: skip
    assert main(["scan", "--config", str(cfg), "--out", str(tmp_path / "toml"), "--quiet",
                 "--no-plots"]) == 0
    assert json.loads((tmp_path / "toml" / "manifest.json").read_text())["sizes"] == [2, 4]
    capsys.readouterr()

    base = ["scan", "--L", "2", "4", "--lam", "1,2", "--n", "5", "--out", str(tmp_path / "x")]
    for extra, msg in [
        (["--model", str(cond)], "Expected one --model per --L (2: 2 4); got 1"),
        (["--model", str(cond), "--hmc"], "either --model (flows) or --hmc"),
        (["--model", f"2={cond}", str(cond)], "not both"),
        (["--model", f"2={cond}"], "gives no flow for L = [4]"),
        (["--model", f"8={cond}"], "L=8 is not one of the sizes"),
        ([], "--model (one flow per --L"),
        (["--hmc", "--m2", "-1", "--hmc-traj", "2"], "needs a flow"),
        (["--hmc", "--m2", "-1", "--anchor-model", "2=hmc"], "not L=hmc"),
    ]:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("flowmc scan: error:"), err
        assert msg in err, (msg, err)
    assert not (tmp_path / "x").exists()


def test_ctrl_c_says_how_to_continue(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import flowmc.scan

    calls = []

    def interrupt(*args: object, **kw: object) -> None:
        calls.append(args)
        raise KeyboardInterrupt

    monkeypatch.setattr(flowmc.scan, "run_ensemble", interrupt)
    out = tmp_path / "s"
    assert main(["scan", "--hmc", "--L", "2", "--m2", "-1", "--lam", "1,2", "--n", "5",
                 "--out", str(out), "--quiet"]) == 130  # fmt: skip
    err = capsys.readouterr().err
    assert "rerun the same command to continue the scan" in err and calls
    assert (out / "manifest.json").exists() and not (out / ".manifest.json.lock").exists()
