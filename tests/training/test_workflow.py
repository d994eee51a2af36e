"""The library training workflow (flowmc.training.workflow.train_flow) in one process: transfer L ->
2L (flowmc.flows.flow.transfer_state_dict and ``flowmc train --init-from``), stage time accounting,
the per-step random streams, and the errors. The distributed path is in test_distributed.py.

Exactness checks are in float64: a transferred flow must be a valid flow on the new lattice, so
its log-det equals the autograd Jacobian's (atol 1e-10, as in test_flow.py) and
``log_prob(sample)`` reproduces the sampled ``log_q`` (round-trip rounding ~1e-13).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flowmc.cli import main
from flowmc.flows.couplings import checkerboard
from flowmc.flows.flow import COUPLINGS, FlowConfig, build_flow, transfer_state_dict
from flowmc.io.checkpoint import load_checkpoint, save_checkpoint
from flowmc.io.ensemble import file_sha256
from flowmc.lattice.action import Phi4Action
from flowmc.training.train import TrainConfig, Trainer, step_generator, step_seed
from flowmc.training.workflow import TrainResult, train_flow

DT = torch.float64
SMALL = {
    "affine": FlowConfig((4, 4), n_layers=2, hidden=(4,)),
    "spline": FlowConfig((4, 4), n_layers=2, hidden=(4,), coupling="spline",
                         extra={"n_bins": 4, "spline_bound": 2.5}),
}  # fmt: skip
QUICK = TrainConfig(n_steps=5, batch_size=16, lr=3e-2)


def _trained(kind: str, tmp_path, **kw) -> TrainResult:  # noqa: ANN001
    return train_flow(Phi4Action(-4.0, 8.0, (4, 4)), flow_config=SMALL[kind], train_config=QUICK,
                      dtype=DT, progress=False, symmetric=False, out=tmp_path / f"{kind}.pt", **kw)


@pytest.mark.parametrize("kind", list(SMALL))
def test_transfer_to_twice_the_lattice_keeps_weights_and_is_a_valid_flow(kind, tmp_path):
    small = _trained(kind, tmp_path)
    old_cfg = SMALL[kind]
    new_cfg = FlowConfig.from_dict({**old_cfg.to_dict(), "lattice_shape": [8, 8]})
    sd = transfer_state_dict(small.flow.state_dict(), old_cfg, new_cfg)
    big = build_flow(new_cfg).to(DT)
    big.load_state_dict(sd)
    # every parameter (the conv weights) is the trained one, and training moved them
    fresh = build_flow(old_cfg).to(DT).state_dict()
    for name, p in small.flow.named_parameters():
        assert torch.equal(dict(big.named_parameters())[name], p), name
    assert any(not torch.equal(p, fresh[n]) for n, p in small.flow.named_parameters())
    for i, layer in enumerate(big.layers):  # the masks belong to the new lattice
        assert torch.equal(layer.mask, checkerboard((8, 8), i % 2).to(DT))
    # a valid flow at L = 8: invertible, log_prob consistent with sampling, exact log-det
    gen = torch.Generator().manual_seed(0)
    phi, log_q = big.sample(6, generator=gen)
    torch.testing.assert_close(big.log_prob(phi), log_q, atol=1e-10, rtol=0)
    z = big.prior.sample(1, generator=gen)
    x, ld = big(z)
    torch.testing.assert_close(big.inverse(x)[0], z, atol=1e-10, rtol=0)
    jac = torch.autograd.functional.jacobian(lambda v: big(v.view(1, 8, 8))[0].flatten(),
                                             z.flatten())  # fmt: skip
    assert abs(float(torch.linalg.slogdet(jac).logabsdet - ld[0].detach())) < 1e-10
    assert not torch.allclose(x, z)  # negative control: the transferred flow is not trivial


class _SiteScale(nn.Module):
    """A test layer with a lattice-shaped parameter: y = x * exp(a), a per site."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(shape))

    def forward(self, x):  # noqa: ANN001, ANN201
        return x * self.a.exp(), self.a.sum().expand(x.shape[0])

    def inverse(self, y):  # noqa: ANN001, ANN201
        return y * (-self.a).exp(), -self.a.sum().expand(y.shape[0])


class _ResampledSiteScale(_SiteScale):
    def resample_state(self, state, old_shape, new_shape):  # noqa: ANN001, ANN201
        reps = [n // o for o, n in zip(old_shape, new_shape)]
        return {"a": state["a"].repeat(*reps)}  # periodic tiling


def test_transfer_calls_resample_state_and_refuses_lattice_shaped_parameters(monkeypatch):
    def factory(cls):  # noqa: ANN001, ANN202
        return lambda cfg, parity: cls(cfg.lattice_shape)

    monkeypatch.setitem(COUPLINGS, "hooked", factory(_ResampledSiteScale))
    monkeypatch.setitem(COUPLINGS, "plain_site", factory(_SiteScale))
    old, new = FlowConfig((2, 4), n_layers=2, coupling="hooked"), None
    new = FlowConfig((4, 8), n_layers=2, coupling="hooked")
    src = build_flow(old)
    with torch.no_grad():
        src.layers[1].a.copy_(torch.arange(8.0).view(2, 4))
    sd = transfer_state_dict(src.state_dict(), old, new)
    assert torch.equal(sd["layers.1.a"], torch.arange(8.0).view(2, 4).repeat(2, 2))
    build_flow(new).load_state_dict(sd)
    # negative control: the same layer without the hook cannot be transferred
    old_p = FlowConfig((2, 4), n_layers=2, coupling="plain_site")
    new_p = FlowConfig((4, 8), n_layers=2, coupling="plain_site")
    with pytest.raises(ValueError, match="layers.0.a.*resample_state"):
        transfer_state_dict(build_flow(old_p).state_dict(), old_p, new_p)
    with pytest.raises(ValueError, match="same lattice dimension"):
        transfer_state_dict(build_flow(SMALL["affine"]).state_dict(), SMALL["affine"],
                            FlowConfig((4, 4, 4), n_layers=2, hidden=(4,)))  # fmt: skip
    with pytest.raises(ValueError, match="same architecture"):
        transfer_state_dict(build_flow(SMALL["affine"]).state_dict(), SMALL["affine"],
                            FlowConfig((8, 8), n_layers=3, hidden=(4,)))  # fmt: skip


def test_cli_init_from_records_ancestry_and_total_time(tmp_path, capsys):
    small = _trained("affine", tmp_path)
    path = tmp_path / "affine.pt"
    mid, big = tmp_path / "mid.pt", tmp_path / "big.pt"
    args = ["--steps", "3", "--batch", "8", "--quiet", "--dtype", "float64", "--no-symmetric"]
    assert main(["train", "--init-from", str(path), "--L", "8", "--out", str(mid), *args]) == 0
    ck = load_checkpoint(mid)
    assert ck["flow_config"]["lattice_shape"] == [8, 8]
    assert ck["action"] == {"name": "phi4", "m2": -4.0, "lam": 8.0, "lattice_shape": [8, 8]}
    anc = ck["meta"]["init_from"]
    assert anc["path"] == str(path.resolve()) and anc["sha256"] == file_sha256(path)
    assert anc["lattice_shape"] == [4, 4]
    assert anc["training_time_s"] == pytest.approx(small.training_time_s)
    own = ck["meta"]["training_time_s"]
    assert own == pytest.approx(ck["trainer_state"]["elapsed"]) and own > 0
    assert ck["meta"]["training_time_total_s"] == pytest.approx(own + small.training_time_s)
    # the stage started from the ancestor's weights: 3 Adam steps of lr 3e-3 (the default
    # recipe) move each one by at most ~3 lr each; a fresh initialisation is O(0.3) away
    moved = max(float((ck["model_state"][k] - v).abs().max())
                for k, v in small.flow.state_dict().items() if "weight" in k)  # fmt: skip
    torch.manual_seed(1)  # negative control: another initialisation (the ancestor's seed was 0)
    fresh = build_flow(SMALL["affine"]).to(DT).state_dict()
    control = max(float((fresh[k] - v).abs().max())
                  for k, v in small.flow.state_dict().items() if "weight" in k)  # fmt: skip
    assert moved < 3 * 3 * 3e-3 < 0.1 < control, (moved, control)
    # a third stage (same lattice) with new couplings adds up every ancestor
    assert main(["train", "--init-from", str(mid), "--L", "8", "--m2", "-4", "--lam", "6",
                 "--out", str(big), *args]) == 0  # fmt: skip
    ck2 = load_checkpoint(big)
    assert ck2["action"]["lam"] == 6.0
    assert ck2["meta"]["training_time_total_s"] == pytest.approx(
        ck2["meta"]["training_time_s"] + ck["meta"]["training_time_total_s"]
    )
    # one coupling given: the other is the ancestor's (m2 = -4 here, lam from the flag)
    one = tmp_path / "one.pt"
    assert main(["train", "--init-from", str(mid), "--L", "8", "--lam", "5", "--out", str(one),
                 *args]) == 0  # fmt: skip
    assert load_checkpoint(one)["action"] == {"name": "phi4", "m2": -4.0, "lam": 5.0,
                                              "lattice_shape": [8, 8]}  # fmt: skip
    assert main(["train", "--L", "8", "--lam", "5", "--out", str(tmp_path / "x.pt"),
                 *args]) == 2  # negative control: without --init-from both are required
    assert "--m2 and --lam are required" in capsys.readouterr().err
    # a resumed stage keeps its ancestry
    assert main(["train", "--resume", "--out", str(big), "--steps", "4", "--quiet"]) == 0
    ck3 = load_checkpoint(big)
    assert ck3["meta"]["init_from"] == ck2["meta"]["init_from"]
    assert ck3["meta"]["training_time_total_s"] == pytest.approx(
        ck3["meta"]["training_time_s"] + ck["meta"]["training_time_total_s"]
    )
    capsys.readouterr()
    assert main(["train", "--init-from", str(path), "--L", "8", "--layers", "3", "--out",
                 str(tmp_path / "x.pt")]) == 2  # fmt: skip
    assert "--init-from; drop --layers" in capsys.readouterr().err
    assert main(["train", "--init-from", str(path), "--resume", "--out", str(big)]) == 2
    assert "--resume or --init-from" in capsys.readouterr().err


def test_train_flow_result_streams_and_resume(tmp_path):
    action = Phi4Action(-4.0, 8.0, (4, 4))
    kw = dict(flow_config=SMALL["affine"], dtype=DT, progress=False, seed=7)
    full = train_flow(action, train_config=TrainConfig(n_steps=6, batch_size=8), symmetric=True,
                      out=tmp_path / "full.pt", checkpoint_every=2, **kw)  # fmt: skip
    assert isinstance(full, TrainResult) and full.symmetric and not full.auto_symmetrised
    assert type(full.proposal).__name__ == "Z2SymmetricFlow" and full.world_size == 1
    assert full.checkpoint == tmp_path / "full.pt" and not full.flow.training
    state = load_checkpoint(full.checkpoint)["trainer_state"]
    assert state["seed"] == 7 and state["generator"] is None  # the stream is (seed, step, rank)
    half = train_flow(action, train_config=TrainConfig(n_steps=3, batch_size=8), symmetric=True,
                      out=tmp_path / "half.pt", **kw)  # fmt: skip
    resumed = train_flow(out=half.checkpoint, resume=True, train_overrides={"n_steps": 6},
                         progress=False, seed=123)  # the stored seed wins  # fmt: skip
    assert resumed.history["loss"] == pytest.approx(full.history["loss"], abs=1e-12)
    for a, b in zip(resumed.flow.parameters(), full.flow.parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    # the per-step streams: distinct for every (seed, step, rank), reproducible
    seeds = {step_seed(s, t, r) for s in (0, 1) for t in range(50) for r in range(4)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)
    a = torch.randn(3, generator=step_generator(1, 2, 3))
    assert torch.equal(a, torch.randn(3, generator=step_generator(1, 2, 3)))
    with pytest.raises(ValueError, match="generator or seed"):
        Trainer(full.flow, action, TrainConfig(), generator=torch.Generator(), seed=1)


def test_train_flow_errors(tmp_path):
    action = Phi4Action(-4.0, 8.0, (4, 4))
    with pytest.raises(ValueError, match="either resume or init_from"):
        train_flow(action, resume=True, init_from=tmp_path / "a.pt", out=tmp_path / "b.pt")
    with pytest.raises(ValueError, match="architecture comes from init_from.*n_layers"):
        train_flow(action, init_from=tmp_path / "a.pt", flow_overrides={"n_layers": 3})
    with pytest.raises(ValueError, match="flow_config for lattice"):
        train_flow(action, flow_config=FlowConfig((8, 8)), progress=False)
    with pytest.raises(FileNotFoundError):
        train_flow(action, init_from=tmp_path / "missing.pt", progress=False)
    save_checkpoint(tmp_path / "weights.pt", build_flow(SMALL["affine"]), action)  # no trainer
    with pytest.raises(ValueError, match="no trainer state to resume.*init_from"):
        train_flow(out=tmp_path / "weights.pt", resume=True, progress=False)
    (tmp_path / "exists.pt").write_bytes(b"")
    with pytest.raises(FileExistsError, match="--force"):
        train_flow(action, out=tmp_path / "exists.pt")


def test_staged_pipeline_transfers_and_resumes(tmp_path):
    """train_staged: stage 0 on the small lattice, the last stage starts from it (ancestry and
    total time recorded); with resume a finished stage is skipped and a missing one rerun."""
    from flowmc.training.recipes import Stage, plan_stages
    from flowmc.training.workflow import stage_path, train_staged

    assert [s.lattice_shape for s in plan_stages("default", (32, 32))] == [(8, 8), (16, 16),
                                                                          (32, 32)]
    assert len(plan_stages("default", (8, 8))) == len(plan_stages("local", (16, 16))) == 1
    stages = [Stage((4, 4), QUICK), Stage((8, 8), QUICK)]
    small = {"n_layers": 2, "hidden": (4,), "extra": {"blur": [0]}}
    out = tmp_path / "big.pt"
    action = Phi4Action(-4.0, 8.0, (8, 8))
    res = train_staged(action, out=out, stages=stages, flow_overrides=small, dtype=DT,
                       progress=False)
    first = stage_path(out, (4, 4))
    assert first.name == "big.L4.pt" and first.exists() and out.exists()
    meta = load_checkpoint(out)["meta"]
    assert meta["init_from"]["path"] == str(first.resolve())
    t0 = load_checkpoint(first)["meta"]["training_time_s"]
    assert meta["training_time_total_s"] == pytest.approx(t0 + meta["training_time_s"])
    assert tuple(res.flow.lattice_shape) == (8, 8) and res.flow.config.n_layers == 2
    before = first.stat().st_mtime_ns
    out.unlink()
    train_staged(action, out=out, stages=stages, resume=True, dtype=DT, progress=False)
    assert out.exists() and first.stat().st_mtime_ns == before  # stage 0 was not retrained
    with pytest.raises(ValueError, match="last stage"):
        train_staged(Phi4Action(-4.0, 8.0, (6, 6)), out=tmp_path / "x.pt", stages=stages)


def test_the_three_start_modes_on_their_own(tmp_path, capsys):
    """train_flow's start modes, each alone: a new flow drawn from the seed, a resumed one (its
    action, weights, dtype and trainer state), a stage from an ancestor on a larger lattice."""
    from flowmc.training import workflow

    action = Phi4Action(-4.0, 8.0, (4, 4))
    new = workflow._start_new(action, SMALL["affine"], {}, 3, None, {"x": 1})
    again = workflow._start_new(action, SMALL["affine"], {}, 3, None, None)
    assert all(torch.equal(a, b) for a, b in zip(new.flow.parameters(), again.flow.parameters()))
    assert new.trainer_state is None and new.ancestor is None and new.record == {"x": 1}
    with pytest.raises(ValueError, match=r"Expected a flow_config for lattice \(8, 8\)"):
        workflow._start_new(Phi4Action(-4.0, 8.0, (8, 8)), SMALL["affine"], {}, 3, None, None)

    done = _trained("affine", tmp_path)
    resumed = workflow._start_resumed(done.checkpoint, None, None, {"n_steps": 9}, None,
                                      {"y": 2}, announce=True)  # fmt: skip
    assert "resuming" in capsys.readouterr().err and resumed.action == action
    assert resumed.dtype == DT and resumed.train_cfg.n_steps == 9
    assert resumed.trainer_state["step"] == QUICK.n_steps and resumed.record["resumed_with"] == {
        "y": 2}
    assert all(torch.equal(a, b) for a, b in zip(resumed.flow.parameters(),
                                                 done.flow.parameters()))  # fmt: skip
    with pytest.raises(ValueError, match="not train_config"):
        workflow._start_resumed(done.checkpoint, None, QUICK, {}, None, None, announce=False)

    big = Phi4Action(-4.0, 8.0, (8, 8))
    stage = workflow._start_from(done.checkpoint, big, DT, None)
    assert stage.ancestor["sha256"] == file_sha256(done.checkpoint)
    assert stage.flow.config.lattice_shape == (8, 8) and stage.train_cfg is None
    trainer = workflow._make_trainer(stage._replace(train_cfg=QUICK), 0, distributed_run=False,
                                     device=torch.device("cpu"))  # fmt: skip
    assert isinstance(trainer, Trainer) and trainer.step_count == 0

    # choosing among them: a new stage gets the recipe's hyper-parameters with the overrides
    stage = workflow._start_stage(action, "fast", None, None, {}, None, {"n_steps": 3}, True, 0,
                                  None, None)  # fmt: skip
    assert stage.train_cfg.n_steps == 3 and stage.train_cfg.symmetric is True
    with pytest.raises(ValueError, match="either resume or init_from"):
        workflow._check_start(tmp_path / "x.pt", True, tmp_path / "y.pt", 0, {}, None)
    with pytest.raises(ValueError, match="architecture comes from init_from"):
        workflow._check_start(None, False, tmp_path / "y.pt", 0, {"hidden": (2,)}, None)
