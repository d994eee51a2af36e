"""Issue 24: a reused file is what it claims to be, and nothing is accepted silently.

Every place where flowmc reuses a file instead of writing it compares the file's identity
(action, lattice, sampler and its settings, seed, the run or scan it belongs to, the flow's
SHA-256) with what the command would have produced, and refuses a mismatch in one line naming
the file and the field. Each reuse site has a *negative control* here: a foreign but valid file
under the expected name, which must be refused. Then the CLI: unknown options and options that
do nothing in the chosen mode are errors; no library warning precedes a one-line error; the
messages of the probe name what is wrong and where.

The cases of the issue (B1-B5 and the poor messages) failed on the code before this change;
each test says which.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from flowmc.cli import main
from flowmc.flows.flow import FlowConfig, build_flow
from flowmc.io.checkpoint import load_checkpoint, save_checkpoint
from flowmc.io.ensemble import file_sha256, open_ensemble
from flowmc.io.join import shard_path
from flowmc.lattice.action import Phi4Action
from flowmc.sampling.run import HMCSettings, RunConfig, adapted_model_path, run_ensemble
from flowmc.scan import (
    ScanConfig,
    ScanOptions,
    parse_lams,
    point_seed,
    run_scan,
    summarize_scan,
)
from flowmc.training.adapt import AdaptConfig

HMC = HMCSettings(warmup=10)
FAST = ScanOptions(n_boot=50, logz_n=64, logz_batch=32)
REPO = Path(__file__).resolve().parents[1]


def _scan_config(seed: int = 0) -> ScanConfig:
    return ScanConfig(sizes=(2, 4), lams=parse_lams("0.5:1:3"), m2=-1.0,
                      run=RunConfig(n=30, chains=1, seed=seed, hmc=HMC))  # fmt: skip


def _flow(path: Path, L: int = 2, m2: float = -1.0, lam: float = 1.0,
          cond: tuple[float, float] | None = None, seed: int | None = None) -> Path:  # fmt: skip
    cfg = FlowConfig((L, L), n_layers=2, hidden=(4,),
                     condition={} if cond is None else {"lam": list(cond)})  # fmt: skip
    meta = None if seed is None else {"seed": seed}
    save_checkpoint(path, build_flow(cfg), Phi4Action(m2, lam, (L, L)), meta=meta)
    return path


def _main(argv: list[str]) -> int:
    """``flowmc ARGV``'s exit code (a usage error leaves argparse through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _one_line(capsys: pytest.CaptureFixture, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"flowmc {command}: error: "), err
    return err[0]


def _single(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def ref_scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "scan"
    run_scan(out, _scan_config(), FAST, progress=False, plots=False)
    return out


@pytest.fixture(scope="module")
def seed1_scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seed1") / "scan"
    run_scan(out, _scan_config(seed=1), FAST, progress=False, plots=False)
    return out


# ============================================================ B1: scan points (reuse sites 1-3)


def _foreign_point(kind: str, scan: Path, other: Path, tmp: Path) -> tuple[str, str]:
    """Put a foreign but valid file under a point's name; returns (file name, field)."""
    if kind == "other-lam":  # the case: the lam = 0.75 point under the lam = 0.5 name
        shutil.copy(scan / "L4_lam0.75.h5", scan / "L4_lam0.5.h5")
        return "L4_lam0.5.h5", "action.lam is 0.75, this scan needs 0.5"
    if kind == "other-size":  # an L = 4 ensemble under an L = 2 name
        shutil.copy(scan / "L4_lam1.h5", scan / "L2_lam1.h5")
        return "L2_lam1.h5", "lattice_shape is [4, 4], this scan needs [2, 2]"
    if kind == "other-seed":  # the same point of a scan with another --seed
        shutil.copy(other / "L2_lam0.75.h5", scan / "L2_lam0.75.h5")
        return "L2_lam0.75.h5", f"seed is {point_seed(1, 2, 1)}, this scan needs"
    if kind == "flow-mh":  # a flow-MH ensemble of the right point under an HMC point's name
        (scan / "L2_lam0.5.h5").unlink()
        run_ensemble(scan / "L2_lam0.5.h5", RunConfig(n=30, seed=point_seed(0, 2, 0), batch=8),
                     model=_flow(tmp / "f.pt", lam=0.5), progress=False)  # fmt: skip
        return "L2_lam0.5.h5", "sampler.name is 'flow-imh', this scan needs 'hmc'"
    if kind == "other-scan":  # every setting right, but written by another scan
        (scan / "L2_lam0.5.h5").unlink()
        run_ensemble(scan / "L2_lam0.5.h5", RunConfig(n=30, seed=point_seed(0, 2, 0), hmc=HMC),
                     action=Phi4Action(-1.0, 0.5, (2, 2)), progress=False,
                     meta={"scan": {"L": 2, "lam": 0.5, "index": 0, "id": "f" * 32}})  # fmt: skip
        return "L2_lam0.5.h5", "scan.id is 'ffff"
    if kind == "plain-hmc":  # the right chains by `flowmc hmc`, not a point of any scan
        (scan / "L2_lam0.5.h5").unlink()
        run_ensemble(scan / "L2_lam0.5.h5", RunConfig(n=30, seed=point_seed(0, 2, 0), hmc=HMC),
                     action=Phi4Action(-1.0, 0.5, (2, 2)), progress=False)  # fmt: skip
        return "L2_lam0.5.h5", "scan is None, this scan needs"
    if kind == "incomplete":  # a foreign point with fewer rows: it would have been resumed
        (scan / "L2_lam1.h5").unlink()
        run_ensemble(scan / "L2_lam1.h5", RunConfig(n=10, seed=point_seed(0, 2, 2), hmc=HMC),
                     action=Phi4Action(-1.0, 0.75, (2, 2)), progress=False)  # fmt: skip
        return "L2_lam1.h5", "action.lam is 0.75, this scan needs 1"
    raise AssertionError(kind)


KINDS = ["other-lam", "other-size", "other-seed", "flow-mh", "other-scan", "plain-hmc",
         "incomplete"]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_scan_refuses_a_foreign_point(kind: str, ref_scan: Path, seed1_scan: Path,
                                      tmp_path: Path) -> None:  # fmt: skip
    """B1. Failed before: every variant ran with rc 0 and reported the foreign file as the
    point (the incomplete one was resumed only if its sampler settings happened to differ)."""
    scan = tmp_path / "scan"
    shutil.copytree(ref_scan, scan)
    name, field = _foreign_point(kind, scan, seed1_scan, tmp_path)
    before = file_sha256(scan / name)
    with pytest.raises(ValueError) as exc:  # sampling: the file is never skipped or resumed
        run_scan(scan, _scan_config(), FAST, progress=False, plots=False)
    msg = _single(exc)
    assert f"{scan / name}" in msg and field in msg, msg
    with pytest.raises(ValueError) as exc:  # the analysis alone: never analysed as the point
        summarize_scan(scan, FAST, plots=False)
    assert f"{scan / name}" in _single(exc) and field in str(exc.value)
    assert file_sha256(scan / name) == before  # refused, not touched


def test_scan_refuses_a_symlinked_point(ref_scan: Path, tmp_path: Path) -> None:
    """B1 (symlink). Failed before: rc 0, the link's target reported as the point."""
    scan = tmp_path / "scan"
    shutil.copytree(ref_scan, scan)
    (scan / "L2_lam1.h5").unlink()
    (scan / "L2_lam1.h5").symlink_to(ref_scan / "L2_lam1.h5")  # even the right file
    with pytest.raises(FileExistsError, match=r"'L2_lam1.h5' is a symbolic link"):
        run_scan(scan, _scan_config(), FAST, progress=False, plots=False)


def test_scan_cli_b1(ref_scan: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """B1 as the issue ran it: the same arguments, a copied point. Failed before: rc 0."""
    scan = tmp_path / "e7"
    shutil.copytree(ref_scan, scan)
    shutil.copy(scan / "L4_lam0.75.h5", scan / "L4_lam0.5.h5")
    argv = ["scan", "--threads", "1", "--hmc", "--L", "2", "4", "--m2", "-1", "--lam", "0.5:1:3",
            "--n", "30", "--warmup", "10", "--quiet", "--no-plots", "--n-boot", "50",
            "--out", str(scan)]  # fmt: skip
    assert main(argv) == 2
    err = _one_line(capsys, "scan")
    assert "L4_lam0.5.h5" in err and "action.lam is 0.75, this scan needs 0.5" in err
    assert "move it away" in err


def test_scan_reuses_its_own_points(ref_scan: Path, tmp_path: Path) -> None:
    """The positive control: an untouched scan (moved to another directory) is reused as is."""
    scan = tmp_path / "moved"
    shutil.copytree(ref_scan, scan)
    before = {p.name: file_sha256(p) for p in scan.glob("*.h5")}
    s = run_scan(scan, _scan_config(), FAST, progress=False, plots=False)
    assert s["complete"] and {p.name: file_sha256(p) for p in scan.glob("*.h5")} == before
    man = json.loads((scan / "manifest.json").read_text())
    with open_ensemble(scan / "L2_lam0.5.h5") as ens:
        assert ens.meta["scan"]["id"] == man["id"] and len(man["id"]) == 32


# ================================================================= scan log Z (reuse site 4)


def test_scan_refuses_a_foreign_logz(tmp_path: Path) -> None:
    """A flow point's stored log Z of another coupling. Failed before: reused (the key held the
    model, draws and seed, not the point), or silently shown by the analysis."""
    cond = _flow(tmp_path / "c.pt", cond=(0.5, 1.0))
    cfg = ScanConfig(sizes=(2,), lams=parse_lams("0.5:1:3"), models={2: cond},
                     run=RunConfig(n=8, batch=8))  # fmt: skip
    scan = tmp_path / "s"
    run_scan(scan, cfg, FAST, progress=False, plots=False)
    a, b = scan / "L2_lam0.5.logz.json", scan / "L2_lam1.logz.json"
    shutil.copy(a, b)
    with pytest.raises(ValueError) as exc:
        run_scan(scan, cfg, FAST, progress=False, plots=False)
    assert f"{b}: lam is 0.5, this scan needs 1" in _single(exc)
    with pytest.raises(ValueError, match="lam is 0.5, this scan needs 1"):
        summarize_scan(scan, FAST, plots=False)
    # positive control: other draws (an analysis option) recompute it, no error
    b.unlink()
    run_scan(scan, cfg, replace(FAST, logz_n=32), progress=False, plots=False)
    stored = json.loads(a.read_text())
    assert stored["key"]["n"] == 32 and stored["key"]["lam"] == 0.5


# ================================================================= scan messages


def test_scan_rerun_with_another_seed_names_the_setting(ref_scan: Path, tmp_path: Path) -> None:
    """Failed before: a ~700-character dump of both point tables."""
    scan = tmp_path / "scan"
    shutil.copytree(ref_scan, scan)
    with pytest.raises(ValueError) as exc:
        run_scan(scan, _scan_config(seed=1), FAST, progress=False, plots=False)
    msg = _single(exc)
    assert "(run.seed: stored 0, given 1)" in msg and len(msg) < 250, msg


def test_parse_lams_without_library_warnings(capsys: pytest.CaptureFixture) -> None:
    """B4. Failed before: numpy's two-line RuntimeWarning, then the one-line error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for bad in ("4:inf:3", "nan:5:3", "4:1e309:3", "-inf:inf:3"):
            with pytest.raises(ValueError, match="finite"):
                parse_lams(bad)
    assert _main(["scan", "--hmc", "--L", "2", "--m2", "-1", "--lam", "4:inf:3", "--n", "5",
                 "--out", "never"]) == 2  # fmt: skip
    err = _one_line(capsys, "scan")
    assert "finite" in err and not Path("never").exists()


# ================================================================= run_ensemble resume (site 5)


@pytest.mark.parametrize("change, field", [
    ({"lam": 0.75}, "action"),
    ({"seed": 2}, "seed"),
    ({"flip": True}, "flip"),
    ({"chains": 2}, "chains"),
    ({"L": 4}, "lattice_shape"),
])  # fmt: skip
def test_resume_refuses_a_foreign_ensemble(change: dict, field: str, tmp_path: Path) -> None:
    """``--resume`` of a file of another run (negative control of the driver's resume)."""
    out = tmp_path / "e.h5"
    run_ensemble(out, RunConfig(n=5, seed=1, hmc=HMC), action=Phi4Action(-1.0, 0.5, (2, 2)),
                 progress=False)  # fmt: skip
    L = change.get("L", 2)
    cfg = RunConfig(n=10, seed=change.get("seed", 1), chains=change.get("chains", 1),
                    hmc=replace(HMC, flip=change.get("flip", False)))  # fmt: skip
    with pytest.raises(ValueError) as exc:
        run_ensemble(out, cfg, action=Phi4Action(-1.0, change.get("lam", 0.5), (L, L)),
                     resume=True, progress=False)  # fmt: skip
    assert str(out) in _single(exc) and field in str(exc.value)


# ================================================================= adapted flow (site 6)


def test_resume_refuses_a_foreign_adapted_flow(tmp_path: Path) -> None:
    """``OUT.adapted.pt`` of another run under this ensemble's name. Failed before: refused, but
    the message named the ensemble's model_sha256, not the adapted flow."""
    model = _flow(tmp_path / "f.pt")
    adapt = AdaptConfig(steps=2, batch=4, buffer=16)
    for name, seed in (("a.h5", 1), ("b.h5", 2)):
        run_ensemble(tmp_path / name, RunConfig(n=4, seed=seed, batch=4, adapt=adapt),
                     model=model, progress=False)  # fmt: skip
    mine = adapted_model_path(tmp_path / "a.h5")
    shutil.copy(adapted_model_path(tmp_path / "b.h5"), mine)
    with pytest.raises(ValueError) as exc:
        run_ensemble(tmp_path / "a.h5", RunConfig(n=8, seed=1, batch=4, adapt=adapt),
                     model=model, resume=True, progress=False)  # fmt: skip
    assert f"{mine}: sha256 is" in _single(exc) and "sampled with" in str(exc.value)


# ================================================================= shards (sites 7, 8)


def test_shard_resume_refuses_a_foreign_shard(tmp_path: Path) -> None:
    """A valid ensemble that is not this run's shard, under a shard's name (one process; the
    two-rank job in tests/sampling/test_shards.py also copies another run's shard in)."""
    from flowmc.sampling.shards import _preflight

    out = tmp_path / "ens.h5"
    spath = shard_path(out, 0, 2)
    spath.parent.mkdir()
    action = Phi4Action(-1.0, 0.5, (2, 2))
    run_ensemble(spath, RunConfig(n=3, chains=2, hmc=HMC), action=action, progress=False)
    with pytest.raises(ValueError, match="not a shard of a sharded run"):
        _preflight(out, spath, 0, 2, (0, 2), resume=True, force=False)
    spath.unlink()
    run_ensemble(spath, RunConfig(n=3, chains=2, first_chain=2, hmc=HMC), action=action,
                 progress=False, meta={"shard": {"job": "j", "rank": 1, "world_size": 2,
                                                 "first_chain": 2, "chains": 2}})  # fmt: skip
    with pytest.raises(ValueError, match="mismatched shards"):
        _preflight(out, spath, 0, 2, (0, 2), resume=True, force=False)


def test_missing_join_names_the_shards(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A sharded run killed before its join. Failed before: 'file does not exist' only."""
    out = tmp_path / "ens.h5"
    for r in range(2):
        shard_path(out, r, 2).parent.mkdir(exist_ok=True)
        run_ensemble(shard_path(out, r, 2), RunConfig(n=3, chains=1, first_chain=r, hmc=HMC),
                     action=Phi4Action(-1.0, 0.5, (2, 2)), progress=False)  # fmt: skip
    with pytest.raises(FileNotFoundError) as exc:
        open_ensemble(out)
    msg = _single(exc)
    assert "ens.shards" in msg and "2 shards of a run with 2 ranks" in msg and "join" in msg
    assert _main(["analyze", str(out)]) == 2
    assert "2 shards of a run with 2 ranks" in _one_line(capsys, "analyze")
    assert _main(["hmc", "--L", "2", "--m2", "-1", "--lam", "0.5", "--n", "5", "--out", str(out),
                 "--resume", "--quiet"]) == 2  # fmt: skip
    assert "torchrun" in _one_line(capsys, "hmc")


# ================================================================= training (sites 9-11)


TRAIN = ["train", "--threads", "1", "--quiet", "--layers", "1", "--hidden", "2", "--batch", "8",
         "--steps", "2", "--checkpoint-every", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """c.pt: conditioned on lam over [3, 6]; f.pt: at lam = 8 (both L = 2, 2 steps)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    for lam, name in (("3:6", "c.pt"), ("8", "f.pt")):
        argv = [*TRAIN, "--L", "2", "--m2", "-4", "--lam", lam, "--out", str(tmp / name)]
        assert _main(argv) == 0
    return tmp


@pytest.mark.parametrize("extra, msg", [
    (["--lam", "8"], "conditioned on lam over [3, 6]; this run needs lam = 8"),
    (["--lam", "2:9"], "conditioned on lam over [3, 6]; this run needs lam over [2, 9]"),
])  # fmt: skip
def test_init_from_checks_the_condition(extra: list[str], msg: str, ckpts: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """B2. Failed before: rc 0 and a checkpoint at lam = 8 conditioned on [3, 6] (a range: an
    error about 'architecture options')."""
    out = tmp_path / "d.pt"
    capsys.readouterr()
    assert _main([*TRAIN[:4], "--init-from", str(ckpts / "c.pt"), "--L", "2", *extra,
                 "--steps", "2", "--batch", "8", "--out", str(out)]) == 2  # fmt: skip
    err = _one_line(capsys, "train")
    assert str(ckpts / "c.pt") in err and msg in err, err
    assert not out.exists()


def test_init_from_takes_shipped_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Failed before: 'model checkpoint not found: phi4_L8_m2-4_lam8' (sample and eval took it)."""
    out = tmp_path / "g.pt"
    assert _main(["train", "--threads", "1", "--quiet", "--init-from", "phi4_L8_m2-4_lam8",
                 "--L", "8", "--steps", "1", "--batch", "4", "--checkpoint-every", "0",
                 "--out", str(out)]) == 0  # fmt: skip
    anc = load_checkpoint(out)["meta"]["init_from"]
    assert anc["path"].endswith("phi4_L8_m2-4_lam8.pt") and anc["action"]["lam"] == 8.0


@pytest.mark.parametrize("extra, field", [
    (["--lam", "5"], "action.lam is 8.0, this run needs 5.0"),
    (["--L", "4"], "action.lattice_shape is [2, 2], this run needs [4, 4]"),
    (["--seed", "3"], "seed is 0, this run needs 3"),
    (["--layers", "3"], "flow_config.n_layers is 1, this run needs 3"),
    (["--recipe", "fast"], "recipe is 'default', this run needs 'fast'"),
    (["--dtype", "float64"], "dtype is 'float32', this run needs 'float64'"),
])  # fmt: skip
def test_train_resume_refuses_other_settings(extra: list[str], field: str, ckpts: Path,
                                             tmp_path: Path, capsys: pytest.CaptureFixture
                                             ) -> None:  # fmt: skip
    """``train --resume`` given settings that differ from the checkpoint's. Failed before: the
    options were dropped and the run continued the stored one (rc 0)."""
    out = tmp_path / "f.pt"
    shutil.copy(ckpts / "f.pt", out)
    before = file_sha256(out)
    capsys.readouterr()
    assert _main(["train", "--threads", "1", "--quiet", "--resume", "--out", str(out), "--steps",
                 "3", *extra]) == 2  # fmt: skip
    err = _one_line(capsys, "train")
    assert f"{out}: {field}" in err, err
    assert file_sha256(out) == before
    # positive control: the same settings given again are fine
    assert _main(["train", "--threads", "1", "--quiet", "--resume", "--out", str(out), "--steps",
                 "3", "--L", "2", "--m2", "-4", "--lam", "8", "--layers", "1", "--seed", "0"]) == 0


def test_staged_resume_refuses_a_foreign_stage(tmp_path: Path) -> None:
    """A finished intermediate stage ``OUT.L2.pt`` of another action. Failed before: skipped as
    done, and the next stage started from it."""
    from flowmc.training.recipes import Stage, TrainConfig
    from flowmc.training.workflow import stage_path, train_staged

    action = Phi4Action(-4.0, 8.0, (4, 4))
    tc = TrainConfig(n_steps=2, batch_size=8)
    stages = [Stage((2, 2), tc), Stage((4, 4), tc)]
    kw = {"recipe": "default", "stages": stages, "progress": False,
          "flow_overrides": {"n_layers": 1, "hidden": (2,)}}  # fmt: skip
    train_staged(action, out=tmp_path / "a.pt", **kw)
    first = stage_path(tmp_path / "a.pt", (2, 2))
    train_staged(Phi4Action(-4.0, 6.0, (4, 4)), out=tmp_path / "b.pt", **kw)
    shutil.copy(stage_path(tmp_path / "b.pt", (2, 2)), first)
    (tmp_path / "a.pt").unlink()
    with pytest.raises(ValueError) as exc:
        train_staged(action, out=tmp_path / "a.pt", resume=True, **kw)
    assert f"{first}: action.lam is 6.0, this run needs 8.0" in _single(exc)


# ================================================================= B5: unknown options


UNKNOWN = {
    "train": ["--L", "2", "--m2", "-4", "--lam", "8"],
    "eval": [],
    "sample": ["--n", "5"],
    "hmc": ["--L", "4", "--m2", "-4", "--lam", "8", "--n", "50"],
    "cluster": ["--L", "4", "--m2", "-4", "--lam", "8", "--n", "50"],
    "analyze": ["x.h5"],
    "compare": ["x.h5", "y.h5"],
    "scan": ["--hmc", "--L", "2", "--m2", "-1", "--lam", "1,2", "--n", "5"],
}


@pytest.mark.parametrize("command", sorted(UNKNOWN))
@pytest.mark.parametrize("bad", [["--bogus-option", "3"], ["--fllip"], ["--kernel", "cluster"],
                                 ["--thread", "1"]])
def test_unknown_options_are_errors(command: str, bad: list[str], tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """B5. Failed before: rc 0 and a run without the option (hmc --kernel cluster ran HMC)."""
    if command == "train" and bad[0] == "--kernel":
        bad = ["--kernal", "3"]  # --kernel is train's conv kernel size
    out = tmp_path / "o"
    has_out = command not in ("eval", "analyze", "compare")
    argv = [command, *UNKNOWN[command], *(["--out", str(out)] if has_out else []), *bad]
    assert _main(argv) == 2
    err = _one_line(capsys, command)
    assert f"unrecognized arguments: {' '.join(bad)}" in err and not out.exists()


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name(
    "torchrun").exists(), reason="torchrun not installed")  # fmt: skip
def test_unknown_options_under_a_real_torchrun(tmp_path: Path) -> None:
    """B5 as ``torchrun -m flowmc -- ...`` (one process). Failed before: rc 0 (and a leading
    ``--`` was an 'invalid choice')."""
    exe = Path(sys.executable).with_name("torchrun")
    exe = str(exe) if exe.exists() else shutil.which("torchrun")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "k.h5"
    r = subprocess.run([exe, "--nproc-per-node", "1", "-m", "flowmc", "--", "hmc", "--L", "4",
                        "--m2", "-4", "--lam", "8", "--n", "50", "--out", str(out),
                        "--bogus-option", "3"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=180)  # fmt: skip
    assert r.returncode != 0 and not out.exists()
    assert ("flowmc hmc: error: unrecognized arguments: --bogus-option 3 (see flowmc hmc --help)"
            in r.stderr.splitlines()), r.stderr  # fmt: skip


def test_unknown_options_under_torchrun(tmp_path: Path) -> None:
    """B5 under ``torchrun -m flowmc``: the same parser. Failed before: rc 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": "1", "RANK": "0",
           "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    out = tmp_path / "k.h5"
    r = subprocess.run([sys.executable, "-m", "flowmc", "hmc", "--L", "4", "--m2", "-4", "--lam",
                        "8", "--n", "50", "--out", str(out), "--bogus-option", "3"],
                       env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "flowmc hmc: error: unrecognized arguments: --bogus-option 3 (see flowmc hmc --help)"]
    assert not out.exists()


# ================================================================= options without effect


MODE = [
    # B3: the HMC options of the hybrid without --hmc-traj (flow MH alone)
    ("sample", ["--flip", "--step-size", "0.1", "--traj-length", "3"],
     "--traj-length, --step-size, --flip need --hmc-traj K >= 1"),
    ("sample", ["--warmup", "5"], "--warmup needs --hmc-traj K >= 1"),
    ("sample", ["--integrator", "leapfrog"], "--integrator needs --hmc-traj K >= 1"),
    ("sample", ["--target-accept", "0.7"], "--target-accept needs --hmc-traj K >= 1"),
    ("sample", ["--adapt-lr", "0.01", "--adapt-batch", "8"],
     "--adapt-lr, --adapt-batch need --adapt-steps N >= 1"),
    ("sample", ["--adapt-reverse-kl", "1"], "--adapt-reverse-kl needs --adapt-steps N >= 1"),
    ("sample", ["--hmc-traj", "2", "--step-size", "0.1", "--target-accept", "0.7"],
     "--target-accept needs step-size tuning (no --step-size)"),
    ("sample", ["--dist-timeout", "10"], "--dist-timeout needs torchrun"),
    ("hmc", ["--resume", "--force"], "--force needs a new run (without --resume"),
    ("train", ["--resume", "--force"], "--force needs a new run (without --resume"),
    ("hmc", ["--step-size", "0.1", "--target-accept", "0.7"],
     "--target-accept needs step-size tuning (no --step-size)"),
    ("hmc", ["--dist-timeout", "10"], "--dist-timeout needs torchrun"),
    ("cluster", ["--step-size", "0.5", "--target-accept", "0.3"],
     "--target-accept needs step-size tuning (no --step-size)"),
    ("scan", ["--hmc", "--dtype", "float64"],
     "--dtype needs a flow (--model or --anchor-model)"),
    ("scan", ["--hmc", "--batch", "8"], "--batch needs a flow (--model)"),
    ("scan", ["--hmc", "--num-hits", "2"], "--num-hits needs --cluster"),
    ("scan", ["--cluster", "--flip"], "--flip needs HMC"),
    ("scan", ["--hmc", "--logz-n", "100"], "--logz-n needs a flow (--model or --anchor-model)"),
    ("scan", ["--hmc", "--crossing", "linear", "--crossing-window", "5"],
     "--crossing-window needs --crossing quadratic"),
    ("scan", ["--hmc", "--L", "2", "--n-boot", "10"], "--n-boot needs two or more sizes"),
    ("scan", ["--model", "FLOW", "--flip"], "--flip needs HMC"),
    ("scan", ["--model", "FLOW", "--start", "random"], "--start needs HMC or --cluster"),
    ("train", ["--recipe", "seed", "--bins", "4"], "--bins needs --coupling spline"),
    ("train", ["--coupling", "spline", "--int-steps", "4"], "--int-steps needs --coupling cnf"),
    ("train", ["--recipe", "cnf", "--hidden", "4"],
     "--hidden does not apply to a continuous flow (coupling cnf;"),
    ("train", ["--coupling", "cnf", "--equivariant"],
     "--equivariant does not apply to a continuous flow (coupling cnf;"),
    ("analyze", ["--seed", "3"], "--seed has no effect in flowmc analyze"),
    ("compare", ["--dtype", "float64", "--device", "cpu"],
     "--dtype, --device have no effect in flowmc compare"),
]  # fmt: skip


@pytest.mark.parametrize("command, extra, msg", MODE)
def test_options_without_effect_are_errors(command: str, extra: list[str], msg: str,
                                           ckpts: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """B3 and its kind in every subcommand. Failed before: rc 0, the options dropped."""
    base = {
        "sample": ["--model", str(ckpts / "f.pt"), "--n", "5", "--batch", "4"],
        "hmc": ["--L", "2", "--m2", "-4", "--lam", "8", "--n", "5"],
        "cluster": ["--L", "2", "--m2", "-4", "--lam", "8", "--n", "5"],
        "scan": ["--m2", "-4", "--lam", "8", "--n", "5", "--no-plots"],
        "train": ["--L", "2", "--m2", "-4", "--lam", "8", "--steps", "1", "--batch", "4"],
        "analyze": [],
        "compare": [],
    }[command]
    extra = [str(ckpts / "f.pt") if x == "FLOW" else x for x in extra]
    if command == "scan":
        sizes = ["--L", "2"] if "--model" in extra else ["--L", "2", "4"]
        base = ([] if "--L" in extra else sizes) + base
    if command in ("analyze", "compare"):
        run_ensemble(tmp_path / "e.h5", RunConfig(n=10, hmc=HMC),
                     action=Phi4Action(-1.0, 0.5, (2, 2)), progress=False)  # fmt: skip
        base = [str(tmp_path / "e.h5")] * (1 if command == "analyze" else 2)
        out = []
    else:
        out = ["--out", str(tmp_path / "o")]
    capsys.readouterr()
    assert _main([command, "--quiet", *base, *out, *extra]) == 2
    err = _one_line(capsys, command)
    assert msg in err, err
    assert not (tmp_path / "o").exists()


def test_options_without_effect_from_a_config_file(
    ckpts: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """B3 with the options in ``--config``: given is given, wherever."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[sample]\nflip = true\ntraj-length = 1.0\n")
    assert _main(["sample", "--config", str(cfg), "--model", str(ckpts / "f.pt"), "--n", "5",
                 "--out", str(tmp_path / "o.h5"), "--quiet"]) == 2  # fmt: skip
    assert "--traj-length, --flip need --hmc-traj K >= 1" in _one_line(capsys, "sample")
    # the same options with the hybrid: used, so accepted
    assert _main(["sample", "--config", str(cfg), "--model", str(ckpts / "f.pt"), "--n", "3",
                 "--hmc-traj", "1", "--batch", "2", "--warmup", "3",
                 "--out", str(tmp_path / "o.h5"), "--quiet"]) == 0  # fmt: skip
    with open_ensemble(tmp_path / "o.h5") as ens:
        assert ens.sampler["flip"] is True


# ================================================================= messages of the probe


def test_nonfinite_data_names_file_observable_and_row(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Failed before: 'Expected finite values in data; replica 2 contains NaN or inf'."""
    out = tmp_path / "e.h5"
    run_ensemble(out, RunConfig(n=20, chains=3, hmc=HMC), action=Phi4Action(-1.0, 0.5, (2, 2)),
                 progress=False)  # fmt: skip
    ok = tmp_path / "ok.h5"
    shutil.copy(out, ok)
    with h5py.File(out, "r+") as f:
        f["scalars/action"][7, 2] = np.nan
    assert _main(["analyze", str(out), "--discard", "2"]) == 2
    err = _one_line(capsys, "analyze")
    assert f"{str(out)!r}" in err and "'action'" in err and "chain 2, row 7" in err, err
    with h5py.File(ok, "r+") as f:  # positive control: a divergent trajectory's Delta H = inf
        f["scalars/delta_h"][7, 2] = np.inf
    assert _main(["analyze", str(ok)]) == 0


def test_compare_warns_about_dependent_samples(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """Failed before: no warning for a file compared with itself, or with its copy."""
    a = tmp_path / "a.h5"
    run_ensemble(a, RunConfig(n=20, hmc=HMC), action=Phi4Action(-1.0, 0.5, (2, 2)),
                 progress=False)  # fmt: skip
    shutil.copy(a, tmp_path / "b.h5")
    run_ensemble(tmp_path / "c.h5", RunConfig(n=20, seed=4, hmc=HMC),
                 action=Phi4Action(-1.0, 0.5, (2, 2)), progress=False)  # fmt: skip
    for other, why in ((a, "the same file"), (tmp_path / "b.h5", "the same chains")):
        assert _main(["compare", str(a), str(other)]) == 0
        err = capsys.readouterr().err
        assert "flowmc compare: warning:" in err and why in err and "not independent" in err
    assert _main(["compare", str(a), str(tmp_path / "c.h5")]) == 0  # independent: no warning
    assert "warning" not in capsys.readouterr().err


def test_compare_warns_about_a_join_and_its_shard(tmp_path: Path) -> None:
    """A join and one of its own shards share chains. Failed before: no warning."""
    from flowmc.commands.compare import dependent_pairs
    from flowmc.io.join import join_shards

    out = tmp_path / "ens.h5"
    job = {"job": "j", "world_size": 2}
    for r in range(2):
        shard_path(out, r, 2).parent.mkdir(exist_ok=True)
        run_ensemble(shard_path(out, r, 2), RunConfig(n=6, chains=1, first_chain=r,
                                                      hmc=replace(HMC, step_size=0.3)),
                     action=Phi4Action(-1.0, 0.5, (2, 2)), progress=False,
                     meta={"shard": {**job, "rank": r, "first_chain": r, "chains": 1}})  # fmt: skip
    join_shards(out)
    found = dependent_pairs([out, shard_path(out, 1, 2)])
    assert len(found) == 1 and "shard" in found[0] and "not independent" in found[0]


# ================================================================= scripts (sites 12, 13)


def _script(name: str):  # noqa: ANN202
    import importlib.util

    mod_name = f"flowmc_{name}_script"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


def _tutorial_reuse_loop() -> str:
    """The tutorial notebook's loop that reuses or trains ``conditional_L<L>.pt`` (its scan
    cell, up to the end of the loop)."""
    nb = json.loads((REPO / "docs" / "tutorial.ipynb").read_text())
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] == "code" and 'f"conditional_L{L}.pt"' in src:
            lines = [ln for ln in src.splitlines() if not ln.startswith("%%")]
            end = next(i for i, ln in enumerate(lines) if ln.strip() == "models[L] = cond")
            return "\n".join(lines[: end + 1])
    raise AssertionError("the tutorial notebook has no conditional-flow reuse loop")


def test_tutorial_refuses_a_foreign_conditional_flow(tmp_path: Path) -> None:
    """The tutorial notebook reuses ``conditional_L<L>.pt`` of an earlier run. Failed before: any
    checkpoint there was used (here: conditioned on another range). Positive control: the flow
    the notebook would train is reused without training."""
    from types import SimpleNamespace

    from flowmc.io.identity import check_checkpoint

    work = tmp_path / "work"
    work.mkdir()
    P = SimpleNamespace(scan_range=(3.5, 5.0), scan_sizes=[2], scan_steps=[1], m2=-4.0)

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the notebook trained instead of reusing")

    ns = {"P": P, "work": work, "Phi4Action": Phi4Action, "check_checkpoint": check_checkpoint,
          "train_flow": no_training}  # fmt: skip
    _flow(work / "conditional_L2.pt", L=2, m2=-4.0, lam=4.25, cond=(3.5, 6.0), seed=0)
    with pytest.raises(ValueError) as exc:
        exec(_tutorial_reuse_loop(), dict(ns))
    assert "conditional_L2.pt: condition is [3.5, 6.0], this run needs [3.5, 5.0]" in _single(exc)
    _flow(work / "conditional_L2.pt", L=2, m2=-4.0, lam=4.25, cond=(3.5, 5.0), seed=0)
    run = dict(ns)
    exec(_tutorial_reuse_loop(), run)
    assert run["models"] == {2: work / "conditional_L2.pt"}


def test_bench_hybrid_refuses_a_foreign_flow(tmp_path: Path) -> None:
    """scripts/bench_hybrid.py reuses ``models/<point>.pt`` unless --force. Failed before: only
    its action was compared (another recipe or seed was used as if it were this run's)."""
    import argparse

    bench = _script("bench_hybrid")
    point = next(iter(bench.POINTS.values()))
    out = tmp_path / "models" / f"{point.name}.pt"
    out.parent.mkdir()
    L = point.action().lattice_shape[0]
    _flow(out, L=L, m2=point.action().m2, lam=point.action().lam)  # recipe None, seed None
    args = argparse.Namespace(models={}, out_dir=tmp_path, force=False, recipe="default", seed=0)
    with pytest.raises(ValueError) as exc:
        bench.get_model(point, args)
    assert f"{out}: recipe is None, this run needs 'default'" in _single(exc)
