"""A flow conditioned on the quartic coupling, end to end through the CLI: ``flowmc train --lam
LO:HI`` records the range, ``flowmc eval|sample --lam X`` use the flow at X (the ensemble records
the action at X), and every misuse is one line with exit code 2.

Exactness of the conditional layers (log-det, invertibility, equivariance at several couplings)
and the per-sample couplings of the loss are tested in test_spectral.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from flowmc.cli import main
from flowmc.io.checkpoint import load_checkpoint, load_model
from flowmc.io.ensemble import open_ensemble


@pytest.fixture(scope="module")
def conditional(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    d = tmp_path_factory.mktemp("cond")
    out = d / "c.pt"
    argv = ["train", "--L", "4", "--m2", "-4", "--lam", "3:6", "--layers", "2", "--hidden", "4",
            "--momentum", "--steps", "10", "--batch", "16", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    return out


def test_train_records_the_range_and_load_needs_a_coupling(conditional) -> None:  # noqa: ANN001
    ck = load_checkpoint(conditional)
    assert ck["flow_config"]["condition"] == {"lam": [3.0, 6.0]}
    assert ck["flow_config"]["momentum"] is True
    model = load_model(conditional, lam=4.25)
    assert model.lam == 4.25 and model.action.lam == 4.25 and model.action.m2 == -4.0
    phi, log_q = model.proposal.sample(8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.proposal.log_prob(phi), log_q, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="give the coupling"):
        load_model(conditional)
    with pytest.raises(ValueError, match=r"inside the range \[3, 6\]"):
        load_model(conditional, lam=7.0)
    with pytest.raises(ValueError, match="not conditioned on lam"):
        load_model("phi4_L8_m2-4_lam8", lam=4.25)
    assert load_model("phi4_L8_m2-4_lam8", lam=8.0).lam is None  # its own coupling is fine


def test_eval_and_sample_at_a_coupling(conditional, tmp_path, capsys) -> None:  # noqa: ANN001
    js = tmp_path / "e.json"
    assert main(["eval", "--model", str(conditional), "--lam", "5", "--n", "256", "--batch",
                 "128", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["action"]["lam"] == 5.0
    ens = tmp_path / "s.h5"
    assert main(["sample", "--model", str(conditional), "--lam", "3.5", "--n", "20", "--batch",
                 "8", "--out", str(ens), "--quiet"]) == 0
    with open_ensemble(ens) as e:
        assert e.action["lam"] == 3.5 and e.n == 20
    capsys.readouterr()
    assert main(["sample", "--model", str(conditional), "--n", "5", "--out",
                 str(tmp_path / "x.h5"), "--quiet"]) == 2
    assert "--lam" in capsys.readouterr().err
    assert main(["eval", "--model", str(conditional), "--lam", "2", "--n", "64"]) == 2
    assert "inside the range" in capsys.readouterr().err


def test_ranges_only_where_they_mean_something(tmp_path, capsys) -> None:  # noqa: ANN001
    assert main(["hmc", "--L", "4", "--m2", "-4", "--lam", "3:6", "--n", "5", "--out",
                 str(tmp_path / "h.h5")]) == 2
    assert "only flowmc train takes one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--L", "4", "--m2", "-4", "--lam", "6:3", "--out", str(tmp_path / "t.pt")])
