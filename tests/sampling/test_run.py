"""The run driver: per-chain RNG streams, hybrid CLI/resume, adaptive warm-up, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from flowmc.cli import main
from flowmc.flows.flow import Z2SymmetricFlow
from flowmc.io.checkpoint import load_checkpoint, load_model
from flowmc.io.ensemble import EnsembleWriter, file_sha256, open_ensemble
from flowmc.lattice.action import Phi4Action
from flowmc.mcmc.rng import ChainRNG, chain_seed, run_generator
from flowmc.sampling.protocol import FlowSampler, Sampler, TunedSampler
from flowmc.sampling.run import SCALARS, HMCSettings, RunConfig, adapted_model_path, run_ensemble
from flowmc.sampling.samplers import FlowIMHSampler, HMCSampler, HybridSampler
from flowmc.training.adapt import AdaptConfig
from tests.helpers import ensemble_dump as _dump

SHAPE = (4, 4)


def _columns(path: Path) -> dict[str, np.ndarray]:
    with open_ensemble(path) as ens:
        return {"configs": np.asarray(ens.configs),
                **{k: ens.scalar(k) for k in ens.scalar_names}}  # fmt: skip


# ------------------------------------------------------------------------------ RNG


def test_chain_rng_streams() -> None:
    a = ChainRNG(7, range(4))
    b = ChainRNG(7, [2, 3])
    torch.testing.assert_close(a.normal((5,))[2:], b.normal((5,)), rtol=0, atol=0)
    torch.testing.assert_close(a.uniform((2, 3))[2:], b.uniform((2, 3)), rtol=0, atol=0)
    state = a.get_state()
    assert state.shape[0] == 4 and state.dtype == np.uint8
    x = a.normal((3,))
    a.set_state(state)
    torch.testing.assert_close(a.normal((3,)), x, rtol=0, atol=0)
    assert chain_seed(7, 0) != chain_seed(7, 1) != chain_seed(8, 1)
    assert not torch.equal(ChainRNG(7, 2).normal((4,))[0], ChainRNG(7, 2).normal((4,))[1])
    g = run_generator(7, 1)
    assert g.initial_seed() not in {chain_seed(7, c) for c in range(16)}
    with pytest.raises(ValueError, match="seed"):
        ChainRNG(-1, 2)
    with pytest.raises(ValueError, match="distinct"):
        ChainRNG(0, [1, 1])
    with pytest.raises(ValueError, match="shape"):
        a.set_state(state[:2])


def _shards(tmp_path: Path, cfg: RunConfig, **kw: object) -> tuple[dict, dict]:
    """A run of chains 0..3, and the same chains as two runs of chains [0, 1] and [2, 3]."""
    run_ensemble(tmp_path / "all.h5", cfg, config_dtype="float64", progress=False, **kw)
    for first in (0, 2):
        run_ensemble(tmp_path / f"shard{first}.h5", replace(cfg, chains=2, first_chain=first),
                     config_dtype="float64", progress=False, **kw)  # fmt: skip
    whole = _columns(tmp_path / "all.h5")
    parts = [_columns(tmp_path / f"shard{f}.h5") for f in (0, 2)]
    joined = {k: np.concatenate([p[k] for p in parts], axis=1) for k in whole}
    return whole, joined


def test_hmc_chains_independent_of_chain_count(tmp_path: Path) -> None:
    """Chains [0, 1, 2, 3] in one run equal, bit for bit, chains [0, 1] and [2, 3] in two runs
    (fixed step size: the tuned one averages over the chains of a run, see docs)."""
    cfg = RunConfig(n=15, chains=4, seed=9, start="random",
                    hmc=HMCSettings(warmup=5, step_size=0.15, flip=True))  # fmt: skip
    whole, joined = _shards(tmp_path, cfg, action=Phi4Action(-4.0, 8.0, SHAPE))
    for key in whole:
        np.testing.assert_array_equal(whole[key], joined[key], err_msg=key)


@pytest.mark.parametrize("hmc_traj", [0, 2])
def test_flow_chains_independent_of_chain_count(
    tmp_path: Path, model_path: Path, hmc_traj: int
) -> None:
    """The same for flow MH (K = 16 proposals per chain per flow call) and the hybrid.

    The flow's proposals of all chains go through one batched flow call, whose size changes
    with the chain count; torch's CPU convolutions gave bit-identical rows for batches >= 2
    here (not for a batch of 1), but that is not guaranteed on every CPU/BLAS, so the values
    are compared to float32 rounding and the accept decisions exactly.
    """
    cfg = RunConfig(n=24, chains=4, seed=5, batch=16, hmc_traj=hmc_traj,
                    hmc=HMCSettings(warmup=4, step_size=0.2))  # fmt: skip
    whole, joined = _shards(tmp_path, cfg, model=model_path)
    np.testing.assert_array_equal(whole["accepted"], joined["accepted"])
    for key in whole:
        np.testing.assert_allclose(whole[key], joined[key], rtol=1e-5, atol=1e-5, err_msg=key)


# ------------------------------------------------------------------------------ hybrid


@pytest.mark.parametrize("name", ["flow-imh", "hmc", "hybrid"])
def test_each_sampler_declares_its_scalars(
    tmp_path: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """The driver's seam: every sampler has the members of the protocols it implements, and
    its ``scalars`` are the keys of its rows, in order, and the datasets of its files (the
    driver keeps no list of its own; SCALARS is derived)."""
    cls = {s.name: s for s in (FlowIMHSampler, HMCSampler, HybridSampler)}[name]
    protocols = [Sampler] + [p for p, kinds in ((TunedSampler, ("hmc", "hybrid")),
                             (FlowSampler, ("flow-imh", "hybrid"))) if name in kinds]  # fmt: skip
    for proto in protocols:
        members = {k for k in vars(proto) if not k.startswith("_")} | set(
            getattr(proto, "__annotations__", {}))
        for member in members - {"model", "sub_steps"}:  # set per instance
            assert hasattr(cls, member), (name, proto.__name__, member)
    seen = []
    rows = cls.rows

    def spy(self, *args: object) -> tuple:
        out = rows(self, *args)
        seen.append(tuple(out[0]))
        return out

    monkeypatch.setattr(cls, "rows", spy)
    config = RunConfig(n=4, chains=2, batch=2, hmc_traj=0 if name == "flow-imh" else 1,
                       hmc=HMCSettings(warmup=2, step_size=0.2))  # fmt: skip
    kw = {"action": Phi4Action(-1.0, 1.0, SHAPE)} if name == "hmc" else {"model": model_path}
    run_ensemble(tmp_path / "s.h5", config, progress=False, **kw)
    assert seen and set(seen) == {cls.scalars} and SCALARS[name] == cls.scalars
    with open_ensemble(tmp_path / "s.h5") as ens:
        assert ens.sampler["name"] == name and ens.scalar_names == cls.scalars


def test_hybrid_cli_writes_valid_ensemble(
    tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "hyb.h5"
    argv = ["sample", "--model", str(model_path), "--hmc-traj", "3", "--warmup", "12",
            "--n", "20", "--chains", "2", "--out", str(out), "--quiet",
            "--json", str(tmp_path / "s.json")]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "hybrid" in text and "HMC (omelyan x 3 per cycle)" in text
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["sampler"] == "hybrid" and summary["trajectories"] == 60
    assert summary["acceptance"] == summary["flow_acceptance"]
    with open_ensemble(out) as ens:
        s = ens.sampler
        assert ens.scalar_names == SCALARS["hybrid"]
        assert s["name"] == "hybrid" and s["hmc_traj"] == 3 and s["rng"] == "per-chain-v1"
        assert s["chain_dtype"] == "float64" and s["dtype"] == "float32" and s["symmetric"]
        assert s["step_size"] > 0 and s["num_steps"] >= 1 and s["warmup"] == 12
        assert ens.model_sha256 == file_sha256(model_path)
        assert ens.meta["model"] == {"path": str(model_path), "sha256": ens.model_sha256,
                                     "training_time_s": 12.5, "recipe": "test"}  # fmt: skip
        assert ens.meta["warmup"]["flow_steps"] == 4
        configs = np.asarray(ens.configs)
        action = Phi4Action(-1.0, 1.0, SHAPE)
        s_re = action(torch.from_numpy(configs.reshape(-1, *SHAPE)).double()).numpy()
        np.testing.assert_allclose(ens.scalar("action").ravel(), s_re, rtol=1e-5, atol=1e-4)
        n_acc = ens.scalar("hmc_accepted")
        assert np.all((n_acc >= 0) & (n_acc <= 3) & (n_acc == np.round(n_acc)))
        assert ens.scalar("accepted").dtype == np.bool_
        assert np.all(np.isfinite(ens.scalar("delta_h")))
    # resume refuses other hybrid settings, and an HMC run on a flow file
    assert main([*argv[:-2], "--resume", "--hmc-traj", "2"]) == 2
    assert "hmc_traj" in capsys.readouterr().err


def test_hybrid_resume_is_bit_identical(
    tmp_path: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between commits (an exception in the 3rd append), resumed in two steps to a
    larger n == uninterrupted, byte for byte (rows, state, generator states, counters).

    Blocks of 5 cycles per flow call: the intermediate target (13 rows = 29 cycles) ends inside
    a block, whose start is committed and redone on resume."""
    cfg = RunConfig(n=23, chains=3, seed=2, thin=2, therm=3, chunk=4, hmc_traj=2, batch=5,
                    hmc=HMCSettings(warmup=10, flip=True))  # fmt: skip
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    kw = {"model": model_path, "progress": False, "config_dtype": "float64"}
    run_ensemble(full, cfg, **kw)
    real_append = EnsembleWriter.append
    calls = {"n": 0}

    def crashing_append(self: EnsembleWriter, **a: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real_append(self, **a)

    monkeypatch.setattr(EnsembleWriter, "append", crashing_append)
    with pytest.raises(KeyboardInterrupt):
        run_ensemble(part, cfg, **kw)
    monkeypatch.undo()
    with open_ensemble(part) as ens:
        assert ens.n == 11  # rows at cycles 4, 6, 8, ...; commits after blocks 3 and 5 (of 5)
    run_ensemble(part, replace(cfg, n=13), resume=True, **kw)
    with open_ensemble(part) as ens:
        _, attrs = ens.load_state()
        assert (attrs["block_start"], attrs["steps_done"]) == (25, 29)
    s = run_ensemble(part, cfg, resume=True, **kw)
    assert s["n"] == 23 and s["steps"] == 3 + 46
    assert _dump(full) == _dump(part)


def test_hybrid_sigkill_leaves_valid_resumable_file(tmp_path: Path, model_path: Path) -> None:
    """SIGKILL a hybrid `flowmc sample --hmc-traj` mid-run: the file holds whole committed
    blocks, resumes to a larger n, and equals an uninterrupted run."""
    out, ref = tmp_path / "killed.h5", tmp_path / "ref.h5"
    cmd = [sys.executable, "-m", "flowmc.cli", "sample", "--model", str(model_path),
           "--hmc-traj", "1", "--batch", "4", "--chunk", "1", "--warmup", "5", "--n", "1000000",
           "--chains", "2", "--seed", "7", "--out", str(out), "--quiet", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or out.stat().st_size < 60_000):
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open_ensemble(out) as ens:
        n_killed = ens.n
        assert n_killed > 0 and n_killed % 4 == 0  # whole blocks of 4 cycles
        assert ens.chunk_ends[-1] == n_killed and ens.has_state
    cfg = RunConfig(n=n_killed + 10, chains=2, seed=7, batch=4, chunk=1, hmc_traj=1,
                    hmc=HMCSettings(warmup=5))  # fmt: skip
    run_ensemble(out, cfg, model=model_path, resume=True, progress=False)
    run_ensemble(ref, cfg, model=model_path, progress=False)
    a, b = _columns(out), _columns(ref)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_resume_refusals(tmp_path: Path, model_path: Path) -> None:
    """Old RNG scheme, changed storage options, another sampler: one clear error each."""
    out = tmp_path / "ens.h5"
    cfg = RunConfig(n=10, chains=2, batch=8)
    run_ensemble(out, cfg, model=model_path, progress=False)
    for kw, key in (({"store_configs": False}, "store_configs"),
                    ({"config_dtype": "float64"}, "config_dtype"),
                    ({"compression": "gzip"}, "compression")):  # fmt: skip
        with pytest.raises(ValueError, match=key):
            run_ensemble(out, replace(cfg, n=20), model=model_path, resume=True,
                         progress=False, **kw)  # fmt: skip
    with pytest.raises(ValueError, match="'flow-imh' ensemble; this run is 'hybrid'"):
        run_ensemble(out, replace(cfg, hmc_traj=1), model=model_path, resume=True,
                     progress=False)  # fmt: skip
    with h5py.File(out, "r+") as f:  # as written by an older flowmc
        sampler = json.loads(f.attrs["sampler"])
        del sampler["rng"]
        f.attrs["sampler"] = json.dumps(sampler)
    with pytest.raises(ValueError, match="another random-number scheme"):
        run_ensemble(out, replace(cfg, n=20), model=model_path, resume=True, progress=False)
    with pytest.raises(FileExistsError, match="--force"):
        run_ensemble(out, cfg, model=model_path, progress=False)


# ------------------------------------------------------------------------------ adaptation


def test_adaptive_warmup_saves_verifies_and_resumes(tmp_path: Path, model_path: Path) -> None:
    """--adapt-steps: the flow changes during warm-up only, is saved as OUT.adapted.pt with its
    SHA-256 as the ensemble's model_sha256, and resume samples with it (a resumed run equals an
    uninterrupted one, which it could not if it fell back to the base flow)."""
    adapt = AdaptConfig(steps=6, lr=1e-2, batch=32, buffer=64)
    cfg = RunConfig(n=30, chains=2, batch=16, seed=1, adapt=adapt)
    a, b = tmp_path / "a" / "ens.h5", tmp_path / "b" / "ens.h5"
    a.parent.mkdir()
    b.parent.mkdir()
    sa = run_ensemble(a, cfg, model=model_path, progress=False)
    run_ensemble(b, replace(cfg, n=11), model=model_path, progress=False)
    run_ensemble(b, cfg, model=model_path, resume=True, progress=False)
    path = adapted_model_path(a)
    assert path.name == "ens.adapted.pt" and sa["adapted_model"] == str(path)
    assert sa["adapt"]["steps"] == 6
    with open_ensemble(a) as ens:
        assert ens.model_sha256 == file_sha256(path)
        rec = ens.meta["model"]
        assert rec["path"] == str(path) and rec["adapted_from"]["sha256"] == file_sha256(model_path)
        assert rec["training_time_s"] == pytest.approx(12.5 + rec["adapt_time_s"])
        assert ens.sampler["adapt"]["steps"] == 6
    ckpt = load_checkpoint(path)
    assert ckpt["meta"]["adapted_for"] == "ens.h5" and ckpt["symmetric"] is True
    base = load_model(model_path).flow.state_dict()
    moved = load_model(path).flow.state_dict()
    assert any(not torch.equal(base[k], moved[k]) for k in base)  # the flow was adapted
    ca, cb = _columns(a), _columns(b)
    for key in ca:
        np.testing.assert_array_equal(ca[key], cb[key], err_msg=key)
    # a tampered adapted flow is refused on resume
    torch.save({**ckpt, "meta": {**ckpt["meta"], "note": "edited"}}, path)
    with pytest.raises(ValueError, match="ens.adapted.pt: sha256 is .* was sampled with"):
        run_ensemble(a, replace(cfg, n=40), model=model_path, resume=True, progress=False)
    # a file at the adapted path that flowmc did not write there is never overwritten
    c = tmp_path / "c" / "ens.h5"
    c.parent.mkdir()
    adapted_model_path(c).write_text("someone's notes")
    with pytest.raises(FileExistsError, match="Refusing to overwrite"):
        run_ensemble(c, cfg, model=model_path, progress=False)
    assert adapted_model_path(c).read_text() == "someone's notes" and not c.exists()


# ------------------------------------------------------------------------------ pieces


def test_from_noise_matches_sample(model_path: Path) -> None:
    flow = load_model(model_path, dtype=torch.float64).flow
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    phi, log_q = flow.sample(8, generator=g1)
    phi2, log_q2 = flow.from_noise(torch.randn((8, *SHAPE), generator=g2, dtype=torch.float64))
    torch.testing.assert_close(phi, phi2, rtol=0, atol=0)
    torch.testing.assert_close(log_q, log_q2, rtol=0, atol=0)
    sym = Z2SymmetricFlow(flow)
    eps = torch.randn((8, *SHAPE), generator=g2, dtype=torch.float64)
    u = torch.tensor([0.1, 0.9] * 4, dtype=torch.float64)
    phi_s, log_q_s = sym.from_noise(eps, u)
    torch.testing.assert_close(phi_s[1::2], flow.from_noise(eps)[0][1::2])
    torch.testing.assert_close(phi_s[0::2], -flow.from_noise(eps)[0][0::2])
    torch.testing.assert_close(log_q_s, sym.log_prob(phi_s), atol=1e-10, rtol=0)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="chains"):
        RunConfig(n=5, chains=0)
    with pytest.raises(ValueError, match="start"):
        RunConfig(n=5, start="warm")
    with pytest.raises(ValueError, match="hmc_traj"):
        RunConfig(n=5, hmc_traj=-1)
    with pytest.raises(ValueError, match="adapt steps"):
        AdaptConfig(steps=0)
    with pytest.raises(ValueError, match="action"):
        run_ensemble("x.h5", RunConfig(n=5))
    with pytest.raises(ValueError, match="no flow to adapt"):
        run_ensemble("x.h5", RunConfig(n=5, adapt=AdaptConfig(steps=1)),
                     action=Phi4Action(1.0, 0.0, SHAPE))  # fmt: skip


def test_driver_parts(tmp_path: Path, model_path: Path) -> None:
    """run_ensemble's parts, each on its own: the sampler the arguments ask for, a new run's
    refusal before any warm-up, and a resume that restores the last commit."""
    from flowmc.sampling import run as run_module

    cpu = torch.device("cpu")
    config = RunConfig(n=6, chains=2, batch=2, chunk=2, hmc=HMCSettings(warmup=2, step_size=0.2))
    action = Phi4Action(-1.0, 1.0, SHAPE)
    with pytest.raises(ValueError, match="Expected an action for an HMC run"):
        run_module._make_sampler(config, None, None, None, cpu, None, None)
    sampler, lmodel, act, sha, device = run_module._make_sampler(
        config, model_path, None, None, cpu, None, None)
    assert isinstance(sampler, FlowIMHSampler) and act == lmodel.action and len(sha) == 64
    with pytest.raises(ValueError, match="Expected the model's action"):
        run_module._make_sampler(config, model_path, Phi4Action(-2.0, 1.0, SHAPE), None, cpu,
                                 None, None)  # fmt: skip

    out = tmp_path / "r.h5"
    out.write_bytes(b"not an ensemble")
    hmc_sampler = run_module._make_sampler(config, None, action, None, cpu, None, None)[0]
    started = []
    hmc_sampler.start = lambda rng: started.append(1)  # type: ignore[method-assign]
    files = run_module._Files(out, SHAPE, action.params(), True, "float32", None)
    with pytest.raises(FileExistsError, match="Refusing to overwrite"):
        run_module._begin(files, hmc_sampler, ChainRNG(0, range(2)), config, None, "",
                          force=False, meta=None, command_line="x")  # fmt: skip
    assert started == []  # refused before the warm-up

    out.unlink()
    run_ensemble(out, replace(config, n=4), action=action, progress=False)
    with open_ensemble(out) as ens:
        arrays, attrs = ens.load_state()
    sampler = run_module._make_sampler(config, None, action, None, cpu, None, None)[0]
    rng, ctr = ChainRNG(0, range(2)), run_module.Counters(2)
    writer, state, steps_done, block_start = run_module._resume(
        files, sampler, rng, ctr, config, None, "", cpu)
    try:
        assert (steps_done, block_start, writer.n) == (attrs["steps_done"], attrs["block_start"], 4)
        assert np.array_equal(state.phi.numpy(), arrays["phi"]) and sampler.step_size == 0.2
        assert np.array_equal(rng.get_state(), arrays["rng"])
        assert ctr.totals["n_accepted"] == attrs["n_accepted"]
    finally:
        writer.close()
