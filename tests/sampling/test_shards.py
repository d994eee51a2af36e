"""Sharded ensembles (torch.distributed, gloo on CPU, 2 processes, L = 4).

One 2-rank job (forked from the test process, rendezvous on free ports; process start-up is the
expensive part) does every multi-process step and records what the tests check:

* ``flowmc hmc`` and ``flowmc sample --hmc-traj 2`` as under torchrun (the CLI joins the group);
* sharded runs of the library: HMC with a fixed and with a tuned step size (3 chains: an uneven
  split), flow MH, the hybrid (tuned), a run killed after its first stage whose rank 1 ran
  ahead, then resumed;
* the error cases: fewer chains than ranks, an adaptive warm-up, an existing output, shards of
  two different runs.

The one-process references are computed here with :func:`flowmc.sampling.run.run_ensemble`.

Tolerances: HMC chains are compared bit for bit (each chain's trajectory depends only on its
stream, and the tuned step size is the mean over the gathered per-chain acceptances in global
chain order, the same float operation as in one process). Flow-MH and hybrid runs put all of a
process's proposals through one batched flow call whose batch size changes with the number of
chains, so their values are compared to float32 rounding (1e-5, as tests/sampling/test_run.py) and
the accept decisions exactly (see docs/hybrid.md).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from flowmc.analysis.compare import ensemble_cost
from flowmc.analysis.ensemble import analyze
from flowmc.cli import main
from flowmc.io.ensemble import EnsembleWriter, open_ensemble
from flowmc.io.join import join_shards, shard_dir, shard_path
from flowmc.lattice.action import Phi4Action
from flowmc.sampling.run import HMCSettings, RunConfig, run_ensemble
from flowmc.sampling.shards import chain_blocks
from flowmc.training.adapt import AdaptConfig
from tests.helpers import free_port as _free_port

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

WORLD = 2
SHAPE = (4, 4)
ACTION = Phi4Action(-4.0, 8.0, SHAPE)
HMC_FIXED = RunConfig(n=12, chains=4, seed=9, start="random",
                      hmc=HMCSettings(warmup=4, step_size=0.15, flip=True))  # fmt: skip
HMC_TUNED = RunConfig(n=10, chains=3, seed=4, start="random", hmc=HMCSettings(warmup=8))
FLOW = RunConfig(n=16, chains=4, seed=5, batch=8)
HYBRID = RunConfig(n=8, chains=4, seed=6, batch=4, hmc_traj=2, hmc=HMCSettings(warmup=6))
CLI_HMC = ["hmc", "--L", "4", "--m2", "-4", "--lam", "8", "--n", "6", "--chains", "4",
           "--warmup", "5", "--seed", "3", "--quiet"]  # fmt: skip
KW = {"config_dtype": "float64", "progress": False}


def _entry(rank: int, ports: list[int], tmp: str, model: str) -> None:
    """Child process: the torchrun environment, then the job; errors go to a file."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]),
                      WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    try:
        _job(rank, ports, Path(tmp), Path(model))
    except BaseException:
        (Path(tmp) / f"error{rank}.txt").write_text(traceback.format_exc())
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def _error(fn) -> str:  # noqa: ANN001
    """``type: message`` of what ``fn()`` raises (the test fails if it raises nothing)."""
    try:
        fn()
    except (ValueError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _job(rank: int, ports: list[int], tmp: Path, model: Path) -> None:
    import torch.distributed as dist

    from flowmc import parallel
    from flowmc.sampling.shards import run_sharded

    probe: dict = {}
    # 1. the commands as under torchrun: each joins the job's group from the environment
    for i, argv in enumerate([
        [*CLI_HMC, "--out", str(tmp / "cli_hmc.h5")],
        ["sample", "--model", str(model), "--hmc-traj", "2", "--n", "8", "--chains", "3",
         "--batch", "4", "--warmup", "4", "--quiet", "--out", str(tmp / "cli_hybrid.h5")],
    ]):  # fmt: skip
        os.environ["MASTER_PORT"] = str(ports[i])
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
        probe[f"cli{i}"] = (rc, out.getvalue(), err.getvalue())

    # 2. the library, in a group this process opened
    os.environ["MASTER_PORT"] = str(ports[2])
    with parallel.process_group("cpu", timeout_s=60):
        run = lambda out, cfg, **kw: run_sharded(tmp / out, cfg, **KW, **kw)  # noqa: E731
        probe["fixed"] = run("fixed.h5", HMC_FIXED, action=ACTION)
        probe["tuned"] = run("tuned.h5", HMC_TUNED, action=ACTION)
        probe["flow"] = run("flow.h5", FLOW, model=model)
        probe["hybrid"] = run("hybrid.h5", HYBRID, model=model)

        # a run killed after 6 rows, whose rank 1 went on alone to 9, then resumed to 12
        run("resumed.h5", replace(HMC_FIXED, n=6), action=ACTION)
        if rank == 1:
            first, count = chain_blocks(4, WORLD)[1]
            run_ensemble(shard_path(tmp / "resumed.h5", 1, WORLD),
                         replace(HMC_FIXED, n=9, chains=count, first_chain=first), action=ACTION,
                         resume=True, **KW)  # fmt: skip
        dist.barrier()
        if rank == 0:
            (tmp / "resumed.h5").unlink()  # killed before the join: rewritten by hand
            join_shards(tmp / "resumed.h5")
            with open_ensemble(tmp / "resumed.h5") as ens:
                probe["partial_n"] = ens.n
        dist.barrier()
        probe["resumed"] = run("resumed.h5", HMC_FIXED, action=ACTION, resume=True)

        # errors: on every rank, before anything is written
        probe["too_few"] = _error(lambda: run("few.h5", replace(HMC_FIXED, chains=1),
                                              action=ACTION))  # fmt: skip
        probe["adapt"] = _error(lambda: run("adapt.h5", replace(FLOW, adapt=AdaptConfig(steps=2)),
                                            model=model))  # fmt: skip
        probe["exists"] = _error(lambda: run("fixed.h5", HMC_FIXED, action=ACTION))
        small = replace(HMC_FIXED, n=2)
        run("mm.h5", small, action=ACTION)
        run("other.h5", small, action=ACTION)
        dist.barrier()
        if rank == 0:  # a shard of another run where rank 1's belongs
            shutil.copy(shard_path(tmp / "other.h5", 1, WORLD), shard_path(tmp / "mm.h5", 1, WORLD))
        dist.barrier()
        probe["mismatch"] = _error(lambda: run("mm.h5", replace(small, n=4), action=ACTION,
                                               resume=True))  # fmt: skip
        # a file flowmc did not write is never replaced by a join (new run with --force, resume)
        if rank == 0:
            (tmp / "notes.h5").write_text("my notes\n")
            (tmp / "other.h5").unlink()
            (tmp / "other.h5").write_text("my notes\n")
        dist.barrier()
        probe["foreign_force"] = _error(lambda: run("notes.h5", small, action=ACTION, force=True))
        probe["foreign_resume"] = _error(lambda: run("other.h5", replace(small, n=4),
                                                     action=ACTION, resume=True))  # fmt: skip
    torch.save(probe, tmp / f"probe{rank}.pt")


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, model_path: Path):
    tmp = tmp_path_factory.mktemp("shards")
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    ports = [_free_port() for _ in range(3)]
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_entry, args=(r, ports, str(tmp), str(model_path)))
             for r in range(WORLD)]  # fmt: skip
    for p in procs:
        p.start()
    t_end = time.monotonic() + 240
    for p in procs:
        p.join(max(t_end - time.monotonic(), 0.1))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = "".join(p.read_text() for p in tmp.glob("error*.txt"))
    assert codes == [0, 0], errors or f"exit codes {codes}"
    probes = [torch.load(tmp / f"probe{r}.pt", weights_only=False) for r in range(WORLD)]
    return tmp, probes, time.perf_counter() - t0


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    """The one-process ensembles of the same settings."""
    tmp = tmp_path_factory.mktemp("ref")
    run_ensemble(tmp / "fixed.h5", HMC_FIXED, action=ACTION, **KW)
    run_ensemble(tmp / "tuned.h5", HMC_TUNED, action=ACTION, **KW)
    run_ensemble(tmp / "flow.h5", FLOW, model=model_path, **KW)
    run_ensemble(tmp / "hybrid.h5", HYBRID, model=model_path, **KW)
    return tmp


def _h5(path: Path) -> dict[str, np.ndarray]:
    """Every committed row, read with plain h5py (as docs/ensemble-format.md shows)."""
    with h5py.File(path, "r") as f:
        n = int(f.attrs["n"])
        out = {k: f[f"scalars/{k}"][:n] for k in f["scalars"]}
        out["configs"] = f["configs"][:n]
    return out


def _sampler(path: Path) -> dict:
    with open_ensemble(path) as ens:
        return dict(ens.sampler)


# --------------------------------------------------------------------------- equality


@pytest.mark.parametrize("name", ["fixed", "tuned"])
def test_sharded_hmc_is_bit_identical_to_one_process(job, ref, name):
    tmp, probes, _ = job
    one, two = _h5(ref / f"{name}.h5"), _h5(tmp / f"{name}.h5")
    assert two.keys() == one.keys() and two["configs"].shape[1] == (4 if name == "fixed" else 3)
    for key in one:
        np.testing.assert_array_equal(two[key], one[key], err_msg=key)
    # the sampler record (tuned step size included) is the one-process run's, bit for bit
    assert _sampler(tmp / f"{name}.h5") == _sampler(ref / f"{name}.h5")
    for probe in probes:
        assert probe[name]["step_size"] == _sampler(ref / f"{name}.h5")["step_size"]
        assert probe[name]["chains"] == one["configs"].shape[1] and probe[name]["ranks"] == 2


def test_tuning_without_the_gather_tunes_another_step_size(tmp_path, job, ref):
    """Negative control: rank 0's block tuned alone (what a rank does without GatheredMean)."""
    first, count = chain_blocks(HMC_TUNED.chains, WORLD)[0]
    s = run_ensemble(tmp_path / "alone.h5", replace(HMC_TUNED, chains=count, first_chain=first),
                     action=ACTION, **KW)  # fmt: skip
    assert s["step_size"] != _sampler(ref / "tuned.h5")["step_size"]
    alone, whole = _h5(tmp_path / "alone.h5")["action"], _h5(ref / "tuned.h5")["action"]
    assert not np.array_equal(alone, whole[:, :count])


@pytest.mark.parametrize("name", ["flow", "hybrid"])
def test_sharded_flow_chains_equal_one_process(job, ref, name):
    tmp, _, _ = job
    one, two = _h5(ref / f"{name}.h5"), _h5(tmp / f"{name}.h5")
    np.testing.assert_array_equal(two["accepted"], one["accepted"])
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-5, err_msg=key)
    if name == "hybrid":
        a, b = _sampler(tmp / "hybrid.h5"), _sampler(ref / "hybrid.h5")
        assert a.pop("step_size") == pytest.approx(b.pop("step_size"), rel=1e-6)
        assert a == b


# --------------------------------------------------------------------------- the join


def test_join_layout_readers_and_costs(job, ref):
    tmp, probes, _ = job
    join = tmp / "fixed.h5"
    with h5py.File(join, "r") as f:  # plain h5py: virtual datasets over the two shards
        assert f["configs"].is_virtual and f["scalars/accepted"].dtype == np.bool_
        files = [m.file_name for m in f["configs"].virtual_sources()]
    assert files == [f"fixed.shards/rank-0000{r}-of-00002.h5" for r in range(WORLD)]
    assert sorted(p.name for p in shard_dir(join).iterdir()) == [
        "rank-00000-of-00002.h5", "rank-00001-of-00002.h5"]  # fmt: skip
    with open_ensemble(join) as ens, open_ensemble(ref / "fixed.h5") as one:
        assert (ens.n, ens.n_chains, ens.has_state) == (one.n, 4, False)
        assert ens.attrs["shards"]["world_size"] == 2
        np.testing.assert_array_equal(ens.configs[3:7, 1:3], one.configs[3:7, 1:3])
        walls, ends = ens.chunk_wall_times, ens.chunk_ends
    # the join's wall time: per block, the increase of the slowest rank's sampling time
    rank_walls = []
    for r in range(WORLD):
        with open_ensemble(shard_path(join, r, WORLD)) as s:
            rank_walls.append(float(np.sum(s.chunk_wall_times)))
            np.testing.assert_array_equal(s.chunk_ends, ends)
    assert float(np.sum(walls)) == pytest.approx(max(rank_walls), rel=1e-12)
    cost = ensemble_cost(join)
    assert cost["chains"] == 4 and cost["cost_per_config_s"] == pytest.approx(
        max(rank_walls) / (12 * 4), rel=1e-12)  # fmt: skip
    # analysis of the join = analysis of the one-process ensemble (the same numbers)
    a, b = analyze(join), analyze(ref / "fixed.h5")
    assert a.observables.keys() == b.observables.keys() and len(a.observables) > 5
    for key, est in a.observables.items():
        assert (est.value, est.error) == (b.observables[key].value, b.observables[key].error), key
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["analyze", str(join)]) == 0


def test_join_moves_with_its_shards_and_a_missing_shard_is_an_error(job, tmp_path):
    tmp, _, _ = job
    shutil.copy(tmp / "fixed.h5", tmp_path / "fixed.h5")
    shutil.copytree(tmp / "fixed.shards", tmp_path / "fixed.shards")
    ref = _h5(tmp / "fixed.h5")
    moved = _h5(tmp_path / "fixed.h5")  # relative source paths: the copy reads its own shards
    for key in ref:
        np.testing.assert_array_equal(moved[key], ref[key])
    shard_path(tmp_path / "fixed.h5", 1, WORLD).unlink()
    with pytest.raises(ValueError, match="rank-00001-of-00002.h5' \\(rank 1\\) is missing"):
        open_ensemble(tmp_path / "fixed.h5")
    # negative control: what a reader gets without the check (HDF5 fills the missing shard)
    assert np.isnan(_h5(tmp_path / "fixed.h5")["action"][:, 2:]).all()
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert main(["analyze", str(tmp_path / "fixed.h5")]) == 2
    assert "is missing" in err.getvalue()


def test_join_refuses_resume_and_reports_a_writer(job):
    tmp, _, _ = job
    join = tmp / "fixed.h5"
    with pytest.raises(ValueError, match="join of a sharded ensemble"):
        EnsembleWriter.resume(join)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([*CLI_HMC, "--n", "14", "--out", str(join), "--resume", "--chains", "4",
                   "--step-size", "0.15", "--warmup", "4", "--seed", "9"])  # fmt: skip
    assert rc == 2 and "join of a sharded ensemble" in err.getvalue()
    with EnsembleWriter.resume(shard_path(join, 0, WORLD)):  # a sampler writes a shard
        with pytest.raises(OSError, match="locked"):
            open_ensemble(join)
    with open_ensemble(join) as ens:
        assert ens.n == 12


# --------------------------------------------------------------------------- resume, errors, CLI


def test_resume_of_a_sharded_run(job, ref):
    tmp, probes, _ = job
    assert probes[0]["partial_n"] == 6  # rank 1 had 9 rows, rank 0 had 6: the join has the minimum
    one, two = _h5(ref / "fixed.h5"), _h5(tmp / "resumed.h5")
    for key in one:
        np.testing.assert_array_equal(two[key], one[key], err_msg=key)
    assert probes[0]["resumed"]["n"] == 12
    with open_ensemble(tmp / "resumed.h5") as ens:
        assert ens.chunk_ends.tolist() == [6, 9, 12]  # rank 0 committed at 6 and 12, rank 1 at 9
        total = float(np.sum(ens.chunk_wall_times))
    slowest = 0.0
    for r in range(WORLD):
        with open_ensemble(shard_path(tmp / "resumed.h5", r, WORLD)) as s:
            slowest = max(slowest, float(np.sum(s.chunk_wall_times)))
    assert total == pytest.approx(slowest, rel=1e-12)


def test_error_cases_fail_on_every_rank(job, tmp_path):
    tmp, probes, _ = job
    for probe in probes:
        assert "Expected --chains >= the number of ranks 2" in probe["too_few"]
        assert "adaptive warm-up" in probe["adapt"]
        assert probe["exists"].startswith("FileExistsError") and "--force" in probe["exists"]
        assert "mismatched shards" in probe["mismatch"]
        assert "--force refuses to replace" in probe["foreign_force"]
        assert "Refusing to overwrite" in probe["foreign_resume"]
    assert (tmp / "notes.h5").read_text() == (tmp / "other.h5").read_text() == "my notes\n"
    assert not (tmp / "notes.shards").exists()
    assert not (tmp / "few.shards").exists() and not (tmp / "adapt.h5").exists()
    # the join of the mixed-up run is refused by every reader and by the joiner
    with pytest.raises(ValueError, match="mismatched shards.*another run"):
        open_ensemble(tmp / "mm.h5")
    with pytest.raises(ValueError, match="mismatched shards"):
        join_shards(tmp / "mm.h5")
    with pytest.raises(FileNotFoundError, match="no shard files"):
        join_shards(tmp_path / "none.h5")


def test_commands_under_torchrun(job):
    tmp, (p0, p1), _ = job
    for i, name in enumerate(["cli_hmc", "cli_hybrid"]):
        rc0, out0, _ = p0[f"cli{i}"]
        rc1, out1, err1 = p1[f"cli{i}"]
        assert rc0 == rc1 == 0, (p0[f"cli{i}"], p1[f"cli{i}"])
        assert "sharded over 2 ranks" in out0 and out1 == "" and err1 == ""
        with open_ensemble(tmp / f"{name}.h5") as ens:
            assert ens.n_chains == (4, 3)[i] and ens.n == (6, 8)[i]
            assert ens.meta["resolved_config"]["dist_timeout"] == 600.0
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["analyze", str(tmp / "cli_hybrid.h5")]) == 0


# --------------------------------------------------------------------------- one process


def test_chain_blocks_and_layout():
    assert chain_blocks(5, 2) == [(0, 3), (3, 2)]
    assert chain_blocks(4, 4, first_chain=8) == [(8, 1), (9, 1), (10, 1), (11, 1)]
    with pytest.raises(ValueError, match="Expected --chains >= the number of ranks 3; got 2"):
        chain_blocks(2, 3)
    assert shard_path("runs/ens.h5", 1, 2) == Path("runs/ens.shards/rank-00001-of-00002.h5")
    with pytest.raises(ValueError, match="not ending in .shards"):
        shard_dir("runs/ens.shards")


def test_ctrl_c_message_names_this_ranks_shard(tmp_path, monkeypatch):
    from argparse import Namespace

    from flowmc.cli import interrupted_message

    out = tmp_path / "ens.h5"
    shard = shard_path(out, 1, WORLD)
    shard.parent.mkdir()
    run_ensemble(shard, replace(HMC_FIXED, n=3, chains=2, first_chain=2), action=ACTION, **KW)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    msg = interrupted_message(Namespace(out=out, chains=4))
    assert "rank-00001-of-00002.h5' holds n = 3 committed rows" in msg and "--resume" in msg
    monkeypatch.delenv("WORLD_SIZE")  # one process: the message is about --out itself
    assert "nothing was written to" in interrupted_message(Namespace(out=out, chains=4))


def test_preflight_refuses_shards_of_another_number_of_ranks(tmp_path):
    from flowmc.sampling.shards import _preflight

    out = tmp_path / "ens.h5"
    shard_dir(out).mkdir()
    (shard_dir(out) / "rank-00000-of-00004.h5").write_bytes(b"")
    args = (out, shard_path(out, 0, 2), 0, 2, (0, 2))
    with pytest.raises(FileExistsError, match=r"holds the shards of a run with \[4\] ranks"):
        _preflight(*args, resume=False, force=True)
    with pytest.raises(FileNotFoundError, match=r"with \[4\] ranks: resume with that many"):
        _preflight(*args, resume=True, force=False)
