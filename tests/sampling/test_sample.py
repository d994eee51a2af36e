"""flowmc sample: HDF5 ensembles, crash safety, bit-identical resume, clear errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch

from flowmc.cli import main
from flowmc.flows.flow import FlowConfig, build_flow
from flowmc.io.checkpoint import load_model, save_checkpoint
from flowmc.io.ensemble import open_ensemble
from flowmc.lattice.action import Phi4Action
from flowmc.sampling.run import SCALARS, RunConfig, run_ensemble


def _make_model(path, seed=0, shape=(4, 4)):
    torch.manual_seed(seed)
    flow = build_flow(FlowConfig(shape, n_layers=2, hidden=(4,), prior_sigma=0.6))
    for p in flow.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_checkpoint(path, flow, Phi4Action(-1.0, 1.0, shape), symmetric=False)
    return path


@pytest.fixture()
def model_path(tmp_path):
    return _make_model(tmp_path / "model.pt")


def _arrays(path):
    with open_ensemble(path) as ens:
        return {"configs": np.asarray(ens.configs),
                **{k: ens.scalar(k) for k in SCALARS["flow-imh"]}}, ens


def test_sample_cli_writes_valid_ensemble(model_path, tmp_path, capsys):
    out = tmp_path / "ens.h5"
    rc = main(["sample", "--model", str(model_path), "--n", "300", "--chains", "3",
               "--batch", "128", "--out", str(out), "--quiet"])
    assert rc == 0
    assert "acceptance" in capsys.readouterr().out
    ens = open_ensemble(out)
    assert ens.n == 300 and ens.n_chains == 3 and ens.lattice_shape == (4, 4)
    assert ens.sampler["name"] == "flow-imh" and ens.action["m2"] == -1.0
    assert len(ens.model_sha256) == 64
    configs = np.asarray(ens.configs)
    assert configs.shape == (300, 3, 4, 4)
    # the stored scalars describe the stored configurations
    np.testing.assert_allclose(ens.scalar("magnetization"), configs.sum((2, 3)), rtol=1e-5)
    s = Phi4Action(-1.0, 1.0, (4, 4))(torch.from_numpy(configs.reshape(-1, 4, 4)).double())
    np.testing.assert_allclose(ens.scalar("action").ravel(), s.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        ens.scalar("log_weight"), -ens.scalar("action") - ens.scalar("log_q"), atol=1e-9
    )
    # a rejected step repeats the previous configuration
    acc = ens.scalar("accepted")
    k = np.argwhere(~acc[1:, 0])[0, 0] + 1
    np.testing.assert_array_equal(configs[k, 0], configs[k - 1, 0])
    ens.close()


def test_resume_is_bit_identical(model_path, tmp_path):
    model = load_model(model_path)
    full = tmp_path / "full.h5"
    part = tmp_path / "part.h5"
    cfg = RunConfig(n=700, chains=2, batch=96, thin=2, therm=5, seed=3)
    run_ensemble(full, cfg, model=model, progress=False)
    run_ensemble(part, replace(cfg, n=250), model=model, progress=False)  # stops mid-block
    run_ensemble(part, replace(cfg, n=401), model=model, resume=True, progress=False)  # again
    run_ensemble(part, cfg, model=model, resume=True, progress=False)
    a, _ = _arrays(full)
    b, _ = _arrays(part)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_refuses_to_overwrite_and_checks_model(model_path, tmp_path):
    out = tmp_path / "ens.h5"
    args = ["sample", "--model", str(model_path), "--n", "50", "--batch", "32", "--out", str(out),
            "--quiet"]
    assert main(args) == 0
    with pytest.raises(FileExistsError, match="--force"):
        run_ensemble(out, RunConfig(n=10), model=load_model(model_path), progress=False)
    assert main([*args, "--force"]) == 0
    other = _make_model(tmp_path / "other.pt", seed=1)
    with pytest.raises(ValueError, match="model_sha256"):
        run_ensemble(out, RunConfig(n=100, batch=32), model=load_model(other), resume=True,
                     progress=False)
    with pytest.raises(ValueError, match="sampler"):  # other settings than the file's
        run_ensemble(out, RunConfig(n=100, batch=64), model=load_model(model_path), resume=True,
                     progress=False)


def test_bad_files_give_clear_errors(model_path, tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not an HDF5 file")
    with pytest.raises(ValueError, match="notes.h5"):
        open_ensemble(text)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(ValueError, match="not a flowmc ensemble"):
        open_ensemble(foreign)
    out = tmp_path / "ens.h5"
    run_ensemble(out, RunConfig(n=20, batch=32), model=load_model(model_path), progress=False)
    with h5py.File(out, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(ValueError, match="schema"):
        open_ensemble(out)
    with pytest.raises(ValueError, match="not a readable flowmc checkpoint|not a flowmc"):
        load_model(text)
    with pytest.raises(ValueError, match="lattice"):
        load_model(model_path, lattice_shape=(8, 8))


def test_sigkill_leaves_valid_resumable_file(model_path, tmp_path):
    """Kill a sampling subprocess mid-run: the file holds exactly the flushed blocks, resumes to
    the target, and equals an uninterrupted run."""
    out = tmp_path / "killed.h5"
    ref = tmp_path / "ref.h5"
    cmd = [sys.executable, "-m", "flowmc.cli", "sample", "--model", str(model_path), "--n",
           "400000", "--batch", "64", "--chains", "2", "--seed", "7", "--out", str(out), "--quiet",
           "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or out.stat().st_size < 60_000):
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ens = open_ensemble(out)
    n_killed = ens.n
    assert n_killed > 0 and n_killed % 64 == 0  # whole blocks only
    assert ens.chunk_ends[-1] == n_killed
    ens.close()
    target = n_killed + 100
    model = load_model(model_path)
    cfg = RunConfig(n=target, chains=2, batch=64, seed=7)
    run_ensemble(out, cfg, model=model, resume=True, progress=False)
    run_ensemble(ref, cfg, model=model, progress=False)
    a, _ = _arrays(out)
    b, _ = _arrays(ref)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
