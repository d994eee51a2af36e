"""Data-parallel training (DDP, gloo on CPU, 2 processes, L = 4).

Two multi-process runs (each 2 ranks forked from the test process, rendezvous on a free port):

* ``test_two_ranks_*``: one job does every check (process start-up is the expensive part):
  ``flowmc train`` under a torchrun environment, gradient equality with one process on the
  concatenated batch for both estimators (plain and Z2-symmetrised), identical parameters,
  distinct samples per rank, the gathered ESS, a skipped non-finite step, resume with the same
  and with a different number of ranks;
* ``test_stalled_rank_times_out``: a rank that stops answering makes the other fail after the
  process-group timeout instead of hanging.

Tolerances: float64 everywhere. The all-reduced gradient is (g_0 + g_1) / 2 and the reference is
the gradient of (l_0 + l_1) / 2; they differ only by rounding, ~1e-16 relative, so 1e-10 absolute
(gradients are O(1)-O(100)) is loose yet 8 orders below the negative control, the gradient of
one rank's shard alone, which differs at O(1).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from flowmc.analysis.autocorr import kish_ess
from flowmc.cli import main
from flowmc.flows.flow import FlowConfig, build_flow
from flowmc.io.checkpoint import load_checkpoint
from flowmc.lattice.action import Phi4Action
from flowmc.training.train import TrainConfig, Trainer, step_generator
from flowmc.training.workflow import train_flow
from tests.helpers import free_port as _free_port

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

WORLD = 2
L = 4
BATCH = 16  # global
SEED = 5
ACTION = Phi4Action(-4.0, 8.0, (L, L))
FLOW_CFG = FlowConfig((L, L), n_layers=2, hidden=(4,))
GRAD_CASES = [("reparam", False), ("path", False), ("reparam", True), ("path", True)]
CLI_ARGS = ["--L", str(L), "--m2", "-4", "--lam", "8", "--layers", "2", "--hidden", "4",
            "--batch", str(BATCH), "--dtype", "float64", "--seed", "3", "--quiet"]  # fmt: skip


CNF_CFG = FlowConfig((L, L), n_layers=1, coupling="cnf", momentum=True,
                     extra={"n_freq": 4, "n_channels": 3, "int_steps": 4, "penalty_batch": 3})


def _perturbed_flow(cfg: FlowConfig = FLOW_CFG) -> torch.nn.Module:
    """The test flow with every parameter randomised (the zero-initialised last layers would
    make the flow the identity, a special point for the gradient)."""
    torch.manual_seed(11)
    flow = build_flow(cfg).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


def _entry(worker, rank: int, world: int, ports: list[int], tmp: str) -> None:  # noqa: ANN001
    """Child process: the torchrun environment, then ``worker``; errors go to a file."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), WORLD_SIZE=str(world),
        RANK=str(rank), LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    try:
        worker(rank, world, ports, Path(tmp))
    except BaseException:
        (Path(tmp) / f"error{rank}.txt").write_text(traceback.format_exc())
        sys.stdout.flush()
        os._exit(1)


def _start(worker, tmp: Path, n_ports: int = 1) -> list:  # noqa: ANN001
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    ctx = mp.get_context(method)
    ports = [_free_port() for _ in range(n_ports)]
    procs = [ctx.Process(target=_entry, args=(worker, r, WORLD, ports, str(tmp)))
             for r in range(WORLD)]  # fmt: skip
    for p in procs:
        p.start()
    return procs


def _join(procs: list, timeout: float) -> list[int | None]:
    t_end = time.monotonic() + timeout
    for p in procs:
        p.join(max(t_end - time.monotonic(), 0.1))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes


# --------------------------------------------------------------------------- the main job


def _main_worker(rank: int, world: int, ports: list[int], tmp: Path) -> None:
    import flowmc.report as train_cmd  # the training curve is written by flowmc.report
    import flowmc.training.workflow as workflow
    from flowmc import parallel
    from flowmc.training import distributed

    probe: dict = {}
    # 1. `flowmc train` as under torchrun: the CLI joins the group from the environment
    calls: list[str] = []
    save, plot = workflow.save_checkpoint, train_cmd.plot_training_history
    workflow.save_checkpoint = lambda *a, **k: (calls.append("checkpoint"), save(*a, **k))
    train_cmd.plot_training_history = lambda *a, **k: (calls.append("plot"), plot(*a, **k))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        probe["cli_rc"] = main(["train", *CLI_ARGS, "--steps", "6", "--checkpoint-every", "3",
                                "--out", str(tmp / "ddp.pt")])  # fmt: skip
    workflow.save_checkpoint, train_cmd.plot_training_history = save, plot
    probe.update(calls=calls, stdout=out.getvalue(), stderr=err.getvalue())

    # 2. the library under a group the caller opened (a second port: the first is released)
    os.environ["MASTER_PORT"] = str(ports[1])
    with parallel.process_group("cpu", timeout_s=60) as info:
        assert info is not None and info.world_size == world and info.backend == "gloo"
        for est, sym in GRAD_CASES:
            cfg = TrainConfig(batch_size=BATCH, estimator=est, symmetric=sym)
            tr = distributed.DistributedTrainer(_perturbed_flow(), ACTION, cfg, seed=SEED)
            gi = tr.compute_gradient()
            probe[f"grad_{est}_{sym}"] = [p.grad.clone() for p in tr.flow.parameters()]
            probe[f"gather_{est}_{sym}"] = gi
        # a continuous flow: each rank adds the integration penalty of its own shard
        tr = distributed.DistributedTrainer(_perturbed_flow(CNF_CFG), ACTION,
                                            TrainConfig(batch_size=BATCH), seed=SEED)
        tr.flow.train()
        tr.compute_gradient()
        probe["grad_cnf"] = [p.grad.clone() for p in tr.flow.parameters()]
        # several steps: identical parameters, ESS on the gathered batch, a skipped step
        cfg = TrainConfig(batch_size=BATCH, lr=1e-2, grad_clip=1.0)
        tr = distributed.DistributedTrainer(_perturbed_flow(), ACTION, cfg, seed=SEED)
        gathered = []
        gather = tr._gather
        tr._gather = lambda p, q: gathered.append(gather(p, q)) or gathered[-1]
        probe["metrics"] = [tr.step() for _ in range(3)]
        tr.action = lambda phi: torch.full((phi.shape[0],), math.nan, dtype=phi.dtype)
        probe["nan_step"] = tr.step()
        tr.action = ACTION
        probe["metrics"].append(tr.step())
        probe["gathered"] = gathered
        probe["params"] = [p.detach().clone() for p in tr.flow.parameters()]
        probe["skipped"] = tr.skipped_steps
        # resume with the same number of ranks reproduces the uninterrupted run
        kw = dict(flow_config=FLOW_CFG, seed=SEED, dtype=torch.float64, progress=False,
                  checkpoint_every=0, symmetric=False)  # fmt: skip
        tc = TrainConfig(n_steps=6, batch_size=BATCH, lr=1e-2)
        full = train_flow(ACTION, train_config=tc, out=tmp / "full.pt", **kw)
        train_flow(ACTION, train_config=TrainConfig(n_steps=3, batch_size=BATCH, lr=1e-2),
                   out=tmp / "half.pt", **kw)  # fmt: skip
        half = train_flow(out=tmp / "half.pt", resume=True, train_overrides={"n_steps": 6},
                          progress=False, checkpoint_every=0, symmetric=False)  # fmt: skip
        probe["full"] = [p.detach().clone() for p in full.flow.parameters()]
        probe["half"] = [p.detach().clone() for p in half.flow.parameters()]
        probe["full_history"], probe["half_history"] = full.history, half.history
        # resume a one-process checkpoint (written by the test) on two ranks
        one = train_flow(out=tmp / "one.pt", resume=True, train_overrides={"n_steps": 6},
                         progress=False, checkpoint_every=0)  # fmt: skip
        probe["one_world"] = one.world_size
        probe["one_params"] = [p.detach().clone() for p in one.flow.parameters()]
        # a global batch the ranks cannot split
        try:
            distributed.DistributedTrainer(_perturbed_flow(), ACTION,
                                           TrainConfig(batch_size=15), seed=SEED)  # fmt: skip
        except ValueError as exc:
            probe["odd_batch_error"] = str(exc)
    torch.save(probe, tmp / f"probe{rank}.pt")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    # a one-process checkpoint for the 1 -> 2 ranks resume
    assert main(["train", *CLI_ARGS, "--steps", "3", "--symmetric", "--out",
                 str(tmp / "one.pt")]) == 0  # fmt: skip
    t0 = time.perf_counter()
    codes = _join(_start(_main_worker, tmp, n_ports=2), timeout=240)
    errors = "".join(p.read_text() for p in tmp.glob("error*.txt"))
    assert codes == [0, 0], errors or f"exit codes {codes}"
    probes = [torch.load(tmp / f"probe{r}.pt", weights_only=False) for r in range(WORLD)]
    return tmp, probes, time.perf_counter() - t0


def _shard_reference(est: str, sym: bool, n_shards: int = WORLD, cfg: FlowConfig = FLOW_CFG):
    """One process: the loss on the concatenation of the shards' batches (same streams)."""
    flow = _perturbed_flow(cfg)
    cfg = TrainConfig(batch_size=BATCH, estimator=est, symmetric=sym)
    tr = Trainer(flow, ACTION, cfg, seed=SEED)
    b = BATCH // WORLD
    losses, log_p, log_q = [], [], []
    for r in range(n_shards):
        loss, lp, lq = tr.loss_module(b, step_generator(SEED, 0, r))
        losses.append(loss)
        log_p.append(lp.detach())
        log_q.append(lq.detach())
    # mean over the concatenated batch = the mean of the equal shards' means
    (sum(losses) / n_shards).backward()
    return [p.grad.clone() for p in flow.parameters()], torch.cat(log_p), torch.cat(log_q)


@pytest.mark.parametrize("est,sym", GRAD_CASES)
def test_two_ranks_gradient_equals_one_process_on_concatenated_batch(ddp_run, est, sym):
    _, probes, _ = ddp_run
    ref, ref_p, ref_q = _shard_reference(est, sym)
    for probe in probes:  # all-reduced: the same on both ranks
        for g, r in zip(probe[f"grad_{est}_{sym}"], ref):
            torch.testing.assert_close(g, r, atol=1e-10, rtol=0)
        gi = probe[f"gather_{est}_{sym}"]
        torch.testing.assert_close(gi.log_p, ref_p, atol=1e-12, rtol=0)
        torch.testing.assert_close(gi.log_q, ref_q, atol=1e-12, rtol=0)
    # negative control: one shard's gradient (what a rank has without the all-reduce)
    alone, _, _ = _shard_reference(est, sym, n_shards=1)
    diff = max(float((a - r).abs().max()) for a, r in zip(alone, ref))
    assert diff > 1e-4, diff


def test_two_ranks_continuous_flow_gradient(ddp_run):
    """A continuous flow trains data-parallel: the all-reduced gradient is the mean over the
    shards of (loss + integration penalty on that shard's first samples); negative control: one
    shard alone."""
    _, probes, _ = ddp_run
    ref, _, _ = _shard_reference("reparam", False, cfg=CNF_CFG)
    for probe in probes:
        for g, r in zip(probe["grad_cnf"], ref):
            torch.testing.assert_close(g, r, atol=1e-10, rtol=0)
    alone, _, _ = _shard_reference("reparam", False, n_shards=1, cfg=CNF_CFG)
    assert max(float((a - r).abs().max()) for a, r in zip(alone, ref)) > 1e-4


def test_two_ranks_draw_different_samples(ddp_run):
    _, probes, _ = ddp_run
    for est, sym in GRAD_CASES:
        a, b = (p[f"gather_{est}_{sym}"] for p in probes)
        assert a.local_log_q.shape == (BATCH // WORLD,)
        assert not torch.isclose(a.local_log_q, b.local_log_q).any()
        # the gathered batch is rank 0's part followed by rank 1's, the same on both ranks
        torch.testing.assert_close(a.log_q, torch.cat([a.local_log_q, b.local_log_q]))
        torch.testing.assert_close(a.log_q, b.log_q, atol=0, rtol=0)


def test_two_ranks_parameters_identical_and_ess_on_gathered_batch(ddp_run):
    _, (p0, p1), _ = ddp_run
    for a, b in zip(p0["params"], p1["params"]):
        assert torch.equal(a, b)
    assert p0["skipped"] == 1 and math.isnan(p0["nan_step"]["loss"])
    metrics = p0["metrics"]  # 3 steps, the skipped one, 1 step
    kept = [g for i, g in enumerate(p0["gathered"]) if i != 3]
    assert len(metrics) == len(kept) == 4
    for m, (log_p, log_q) in zip(metrics, kept):
        assert log_p.shape == (BATCH,)
        lw = (log_p - log_q).numpy()
        assert m["ess"] == pytest.approx(kish_ess(lw), abs=1e-12)
        assert m["loss"] == pytest.approx(float((log_q - log_p).mean()), abs=1e-12)
        # negative control: rank 0's half alone gives another ESS
        assert abs(m["ess"] - kish_ess(lw[: BATCH // WORLD])) > 1e-6
    assert [m["ess"] for m in metrics] == [m["ess"] for m in p1["metrics"]]


def test_two_ranks_global_batch_must_split(ddp_run):
    _, probes, _ = ddp_run
    for probe in probes:
        assert "divisible by the number of ranks 2; got 15" in probe["odd_batch_error"]


def test_two_ranks_cli_rank0_alone_writes(ddp_run):
    tmp, (p0, p1), _ = ddp_run
    assert p0["cli_rc"] == 0 and p1["cli_rc"] == 0
    assert p0["calls"] == ["checkpoint", "checkpoint", "checkpoint", "plot"]  # steps 3, 6, end
    assert p1["calls"] == [] and p1["stdout"] == "" and p1["stderr"] == ""
    assert "ranks: 2, global batch 16 = 2 x 8" in p0["stdout"]
    ck = load_checkpoint(tmp / "ddp.pt")
    assert ck["trainer_state"]["step"] == 6 and ck["meta"]["world_size"] == 2
    assert ck["meta"]["backend"] == "gloo" and ck["trainer_state"]["seed"] == 3
    assert sorted(f.name for f in tmp.glob("ddp*")) == ["ddp.pt", "ddp.train.png"]


def test_two_ranks_resume_same_and_different_number_of_ranks(ddp_run):
    tmp, (p0, p1), _ = ddp_run
    # same number of ranks: the interrupted run equals the uninterrupted one
    for a, b in zip(p0["half"], p0["full"]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert p0["half_history"]["loss"] == pytest.approx(p0["full_history"]["loss"], abs=1e-12)
    # 1 -> 2 ranks: continued from step 3, the same parameters on both ranks
    assert p0["one_world"] == 2
    for a, b in zip(p0["one_params"], p1["one_params"]):
        assert torch.equal(a, b)
    ck = load_checkpoint(tmp / "one.pt")
    assert ck["trainer_state"]["step"] == 6 and len(ck["trainer_state"]["history"]["loss"]) == 6
    assert ck["symmetric"] is True  # trained with --symmetric before the resume
    # 2 -> 1 rank: the CLI checkpoint written by two ranks continues in this process
    before = load_checkpoint(tmp / "ddp.pt")["trainer_state"]["history"]["loss"]
    assert main(["train", "--resume", "--out", str(tmp / "ddp.pt"), "--steps", "9",
                 "--quiet"]) == 0  # fmt: skip
    ck = load_checkpoint(tmp / "ddp.pt")
    assert ck["trainer_state"]["step"] == 9 and ck["meta"]["world_size"] == 1
    assert ck["trainer_state"]["history"]["loss"][:6] == before


# --------------------------------------------------------------------------- timeouts


def _stall_worker(rank: int, world: int, ports: list[int], tmp: Path) -> None:
    def stall(tr: Trainer) -> None:
        if rank == 1 and tr.step_count == 2:
            time.sleep(120)  # the test kills it long before

    t0 = time.monotonic()
    try:
        train_flow(ACTION, flow_config=FLOW_CFG, train_config=TrainConfig(n_steps=5, batch_size=8),
                   progress=False, callback=stall, callback_every=1, timeout_s=3)  # fmt: skip
    except RuntimeError as exc:
        (tmp / f"stalled{rank}.txt").write_text(f"{time.monotonic() - t0:.2f}\n{exc}")
        os._exit(3)


def test_stalled_rank_times_out(tmp_path):
    procs = _start(_stall_worker, tmp_path)
    codes = _join(procs[:1], timeout=60) + _join(procs[1:], timeout=0)
    errors = "".join(p.read_text() for p in tmp_path.glob("error*.txt"))
    assert codes[0] == 3, errors or f"rank 0 exit code {codes[0]} (expected a timeout error)"
    seconds, message = (tmp_path / "stalled0.txt").read_text().split("\n", 1)
    assert 3 <= float(seconds) < 45, (seconds, message)
    assert codes[1] != 0  # rank 1 did not finish on its own: it was stopped
