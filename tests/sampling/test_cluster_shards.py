"""Sharded cluster ensembles (torch.distributed, gloo on CPU, 2 processes, L = 4).

One 2-rank job (forked from the test process, rendezvous on free ports, as in
tests/sampling/test_shards.py) runs

* ``flowmc cluster`` as under torchrun (the CLI joins the group from the environment);
* the library (:func:`flowmc.sampling.shards.run_sharded`): a tuned step size with 3 chains (an
  uneven split), and a run to 4 rows resumed to 8.

Each is compared with the one-process run of the same settings **bit for bit**: a chain's
trajectory depends only on its stream ``(seed, c)``, the compiled kernel consumes chain ``c``'s
uniforms only, and the adapted step size is the mean over the gathered per-chain acceptances in
global chain order (:class:`flowmc.sampling.shards.GatheredMean`), the same float operation as
in one process. Negative control: rank 0's block adapting alone tunes another step size.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
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

from flowmc.cli import main
from flowmc.io.ensemble import open_ensemble
from flowmc.lattice.action import Phi4Action
from flowmc.sampling.cluster import ClusterSettings
from flowmc.sampling.run import RunConfig, run_ensemble
from flowmc.sampling.shards import chain_blocks

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

WORLD = 2
ACTION = Phi4Action(-4.0, 8.0, (4, 4))
TUNED = RunConfig(n=10, chains=3, seed=4, start="random", cluster=ClusterSettings(warmup=8))
RESUMED = RunConfig(n=8, chains=4, seed=9, chunk=3,
                    cluster=ClusterSettings(warmup=3, step_size=0.8, num_clusters=1))  # fmt: skip
CLI = ["cluster", "--L", "4", "--m2", "-4", "--lam", "8", "--n", "6", "--chains", "4",
       "--warmup", "5", "--seed", "3", "--quiet"]  # fmt: skip
KW = {"config_dtype": "float64", "progress": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, ports: list[int], tmp: str) -> None:
    """Child process: the torchrun environment, then the job; errors go to a file."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]),
                      WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    try:
        _job(rank, ports, Path(tmp))
    except BaseException:
        (Path(tmp) / f"error{rank}.txt").write_text(traceback.format_exc())
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def _job(rank: int, ports: list[int], tmp: Path) -> None:
    from flowmc import parallel
    from flowmc.sampling.shards import run_sharded

    probe: dict = {}
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*CLI, "--out", str(tmp / "cli.h5")])
    probe["cli"] = (rc, out.getvalue(), err.getvalue())
    os.environ["MASTER_PORT"] = str(ports[1])
    with parallel.process_group("cpu", timeout_s=60):
        probe["tuned"] = run_sharded(tmp / "tuned.h5", TUNED, action=ACTION, **KW)
        run_sharded(tmp / "resumed.h5", replace(RESUMED, n=4), action=ACTION, **KW)
        probe["resumed"] = run_sharded(tmp / "resumed.h5", RESUMED, action=ACTION, resume=True,
                                       **KW)  # fmt: skip
    torch.save(probe, tmp / f"probe{rank}.pt")


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("cluster_shards")
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    ports = [_free_port() for _ in range(2)]
    procs = [ctx.Process(target=_entry, args=(r, ports, str(tmp))) for r in range(WORLD)]
    for p in procs:
        p.start()
    t_end = time.monotonic() + 180
    for p in procs:
        p.join(max(t_end - time.monotonic(), 0.1))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = "".join(p.read_text() for p in tmp.glob("error*.txt"))
    assert codes == [0, 0], errors or f"exit codes {codes}"
    return tmp, [torch.load(tmp / f"probe{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process ensembles of the same settings."""
    tmp = tmp_path_factory.mktemp("cluster_ref")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*CLI, "--out", str(tmp / "cli.h5")]) == 0
    run_ensemble(tmp / "tuned.h5", TUNED, action=ACTION, **KW)
    run_ensemble(tmp / "resumed.h5", RESUMED, action=ACTION, **KW)
    return tmp


def _h5(path: Path) -> dict[str, np.ndarray]:
    """Every committed row, read with plain h5py (through the join's virtual datasets)."""
    with h5py.File(path, "r") as f:
        n = int(f.attrs["n"])
        out = {k: f[f"scalars/{k}"][:n] for k in f["scalars"]}
        out["configs"] = f["configs"][:n]
    return out


def _sampler(path: Path) -> dict:
    with open_ensemble(path) as ens:
        return dict(ens.sampler)


@pytest.mark.parametrize(("name", "chains"), [("cli", 4), ("tuned", 3), ("resumed", 4)])
def test_sharded_cluster_is_bit_identical_to_one_process(job, ref, name, chains):
    tmp, probes = job
    one, two = _h5(ref / f"{name}.h5"), _h5(tmp / f"{name}.h5")
    assert two.keys() == one.keys() and two["configs"].shape[1] == chains
    for key in one:
        np.testing.assert_array_equal(two[key], one[key], err_msg=key)
    # the sampler record, adapted step size included, is the one-process run's, bit for bit
    assert _sampler(tmp / f"{name}.h5") == _sampler(ref / f"{name}.h5")
    assert _sampler(tmp / f"{name}.h5")["name"] == "cluster"


def test_summaries_and_cli_output(job, ref):
    tmp, (p0, p1) = job
    rc0, out0, _ = p0["cli"]
    rc1, out1, err1 = p1["cli"]
    assert rc0 == rc1 == 0 and "sharded over 2 ranks" in out0 and "Wolff clusters" in out0
    assert out1 == "" and err1 == ""
    with open_ensemble(ref / "tuned.h5") as ens:
        acc = float(ens.scalar("metropolis_acceptance").mean())
        size = float(ens.scalar("cluster_size").mean())
    for probe in (p0, p1):
        s = probe["tuned"]
        assert s["ranks"] == 2 and s["chains"] == 3 and s["sampler"] == "cluster"
        assert s["step_size"] == _sampler(ref / "tuned.h5")["step_size"]
        # the chain-weighted averages of the ranks are the whole run's
        assert s["metropolis_acceptance"] == pytest.approx(acc, abs=1e-12)
        assert s["acceptance"] == pytest.approx(acc, abs=1e-12)
        assert s["cluster_size"] == pytest.approx(size, abs=1e-12)
        assert probe["resumed"]["n"] == 8


def test_adapting_without_the_gather_tunes_another_step_size(tmp_path, job, ref):
    """Negative control: rank 0's block adapted alone (what a rank does without GatheredMean)."""
    first, count = chain_blocks(TUNED.chains, WORLD)[0]
    s = run_ensemble(tmp_path / "alone.h5", replace(TUNED, chains=count, first_chain=first),
                     action=ACTION, **KW)  # fmt: skip
    assert s["step_size"] != _sampler(ref / "tuned.h5")["step_size"]
