"""Training loop, checkpoints, resume, the train/eval CLI and its config handling."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flowmc.cli import main
from flowmc.flows.flow import FlowConfig, build_flow
from flowmc.io.checkpoint import load_checkpoint, load_model
from flowmc.lattice.action import Phi4Action
from flowmc.training.train import TrainConfig, Trainer


def _trainer(n_steps, seed=0, **kw):
    torch.manual_seed(seed)
    action = Phi4Action(-4.0, 8.0, (4, 4))
    flow = build_flow(FlowConfig((4, 4), n_layers=4, hidden=(8,))).double()
    cfg = TrainConfig(n_steps=n_steps, batch_size=32, **kw)
    return Trainer(flow, action, cfg, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("estimator", ["reparam", "path"])
def test_training_improves_and_records_history(estimator):
    tr = _trainer(120, estimator=estimator, schedule="cosine", grad_clip=10.0)
    h = tr.run(progress=False)
    assert set(h) == set(Trainer.HISTORY_KEYS) and len(h["loss"]) == 120
    first, last = sum(h["loss"][:10]) / 10, sum(h["loss"][-10:]) / 10
    assert last < first - 1.0
    assert all(0 < e <= 1 for e in h["ess"])
    assert h["lr"][-1] < h["lr"][0]  # cosine schedule decays


def test_resume_reproduces_uninterrupted_training(tmp_path):
    full = _trainer(40)
    full.run(progress=False)
    half = _trainer(40)
    half.run(20, progress=False)
    state = half.state_dict()
    torch.save({"model": half.flow.state_dict(), "trainer": state}, tmp_path / "c.pt")
    resumed = _trainer(40, seed=99)  # different init and generator: everything must come back
    blob = torch.load(tmp_path / "c.pt", weights_only=True)
    resumed.flow.load_state_dict(blob["model"])
    resumed.load_state_dict(blob["trainer"])
    resumed.run(progress=False)
    assert resumed.history["loss"] == pytest.approx(full.history["loss"], abs=1e-12)
    for a, b in zip(resumed.flow.parameters(), full.flow.parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_nonfinite_loss_is_skipped_then_stops():
    tr = _trainer(10, max_bad_steps=3)

    class Broken:
        lattice_shape = (4, 4)

        def __call__(self, phi):
            return torch.full((phi.shape[0],), float("nan"), dtype=phi.dtype)

    tr.action = Broken()
    before = [p.clone() for p in tr.flow.parameters()]
    assert math.isnan(tr.step()["loss"])
    for a, b in zip(before, tr.flow.parameters()):
        torch.testing.assert_close(a, b)  # nothing was trained on the NaN
    with pytest.raises(RuntimeError, match="non-finite"):
        tr.run(progress=False)


def test_bad_train_config_and_lattice():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=1)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="even lattice"):
        build_flow(FlowConfig((5, 4)))
    flow = build_flow(FlowConfig((4, 4), n_layers=2, hidden=(4,)))
    with pytest.raises(ValueError, match="lattice"):
        Trainer(flow, Phi4Action(-4.0, 8.0, (8, 8)), TrainConfig())


def test_cli_train_resume_eval_and_config(tmp_path, capsys):
    out = tmp_path / "m.pt"
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('[train]\nL = 4\nm2 = -4.0\nlam = 8.0\nlayers = 2\nhidden = "4"\nsteps = 30\n'
                   'batch = 16\n')
    assert main(["train", "--config", str(cfg), "--steps", "20", "--out", str(out), "--quiet"]) == 0
    ck = load_checkpoint(out)
    assert ck["trainer_state"]["step"] == 20  # the flag overrides the file
    assert ck["flow_config"]["n_layers"] == 2 and ck["resolved_config"]["L"] == 4
    assert ck["action"] == {"name": "phi4", "m2": -4.0, "lam": 8.0, "lattice_shape": [4, 4]}
    assert (tmp_path / "m.train.png").exists()  # default curve: OUT.train.png
    assert isinstance(ck["symmetric"], bool)  # decided by the sign-balance check
    assert main(["train", "--config", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(out), "--steps", "25"]) == 0
    assert f"resuming {out} at step 20 -> 25" in capsys.readouterr().err
    assert load_checkpoint(out)["trainer_state"]["step"] == 25
    # --steps is the total: one not beyond the step reached trains nothing, and says so
    assert main(["train", "--resume", "--out", str(out), "--steps", "10"]) == 0
    assert "at step 25 (n_steps = 10 is the total, not beyond it: nothing to train)" in (
        capsys.readouterr().err
    )
    assert load_checkpoint(out)["trainer_state"]["step"] == 25
    assert len(load_checkpoint(out)["trainer_state"]["history"]["loss"]) == 25
    js = tmp_path / "e.json"
    png = tmp_path / "s.png"
    assert main(["eval", "--model", str(out), "--n", "512", "--batch", "128", "--json", str(js),
                 "--plot", str(png)]) == 0
    res = json.loads(js.read_text())
    for key in ("ess", "ess_batch_mean", "f_q", "log_z", "mh_acceptance", "frac_m_positive"):
        assert key in res
    assert 0 < res["ess"] <= 1 and png.exists()
    model = load_model(out)
    assert model.action == Phi4Action(-4.0, 8.0, (4, 4))


def test_cli_errors_name_the_parameter(tmp_path, capsys):
    assert main(["train", "--L", "4", "--m2", "-4", "--lam", "-1", "--out",
                 str(tmp_path / "x.pt")]) == 2
    assert "lam" in capsys.readouterr().err
    assert main(["train", "--L", "5", "--m2", "-4", "--lam", "1", "--out",
                 str(tmp_path / "x.pt")]) == 2
    assert "even lattice" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "missing.pt")]) == 2
    assert "not found" in capsys.readouterr().err


def test_sign_balance_decides_symmetrisation_of_shipped_flows():
    """The symmetric-phase flow is balanced (sampled plainly); the broken-phase flow is not."""
    from pathlib import Path

    from flowmc.training.evaluate import needs_symmetrisation

    data = Path(__file__).resolve().parents[2] / "data"
    gen = torch.Generator().manual_seed(0)
    for name, expected in [("phi4_L8_m2-4_lam8.pt", False), ("phi4_L8_m2-4_lam1.pt", True)]:
        model = load_model(data / name)
        assert needs_symmetrisation(model.flow, model.action, generator=gen) is expected, name
        assert model.symmetric is expected
