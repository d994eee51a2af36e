"""User errors are one line and exit 2, Ctrl-C says how to resume and exits 130, bugs keep
their traceback (issue 14, items 5 and 6). Each test names what failed before this change.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from flowmc.cli import is_user_error, main
from flowmc.flows.flow import FlowConfig, build_flow
from flowmc.io.checkpoint import load_checkpoint, load_model, save_checkpoint
from flowmc.io.ensemble import EnsembleWriter, open_ensemble
from flowmc.lattice.action import Phi4Action
from flowmc.training.train import Trainer

HMC = ["hmc", "--L", "4", "--m2", "-4", "--lam", "8", "--warmup", "3", "--chunk", "4",
       "--quiet"]
TRAIN = ["train", "--L", "4", "--m2", "-4", "--lam", "8", "--layers", "1", "--hidden", "2",
         "--batch", "8", "--quiet", "--symmetric"]


def _err(capsys: pytest.CaptureFixture, command: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flowmc {command}: "), lines
    return lines[0]


# ------------------------------------------------------------------------------ Ctrl-C


def test_ctrl_c_in_hmc_says_how_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Failed before: a KeyboardInterrupt traceback."""
    out = tmp_path / "h.h5"
    real, calls = EnsembleWriter.append, {"n": 0}

    def append(self: EnsembleWriter, **kw: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(self, **kw)

    monkeypatch.setattr(EnsembleWriter, "append", append)
    assert main([*HMC, "--n", "40", "--out", str(out)]) == 130
    assert _err(capsys, "hmc") == (
        f"flowmc hmc: interrupted; {str(out)!r} holds n = 8 committed rows per chain; "
        "continue with --resume"
    )
    monkeypatch.undo()
    assert main([*HMC, "--n", "40", "--out", str(out), "--resume"]) == 0
    with open_ensemble(out) as ens:
        assert ens.n == 40


def test_ctrl_c_before_the_first_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "h.h5"

    def save_state(self: EnsembleWriter, *a: object, **kw: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(EnsembleWriter, "save_state", save_state)
    assert main([*HMC, "--n", "4", "--out", str(out)]) == 130
    assert "interrupted before the first commit; nothing was written" in _err(capsys, "hmc")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ctrl_c_in_train_says_how_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Failed before: a KeyboardInterrupt traceback."""
    out = tmp_path / "t.pt"
    real = Trainer.step

    def step(self: Trainer) -> dict:
        if self.step_count == 3:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "step", step)
    assert main([*TRAIN, "--steps", "5", "--checkpoint-every", "2", "--out", str(out)]) == 130
    assert _err(capsys, "train") == (
        f"flowmc train: interrupted; {str(out)!r} holds the checkpoint of step 2; continue "
        "with --resume"
    )
    assert load_checkpoint(out)["trainer_state"]["step"] == 2


# ------------------------------------------------------------------------- bad checkpoints


def _checkpoint(path: Path, **overrides: object) -> Path:
    torch.manual_seed(0)
    shape = (4, 4)
    save_checkpoint(path, build_flow(FlowConfig(shape, n_layers=1, hidden=(2,))),
                    Phi4Action(-4.0, 8.0, shape), trainer_state=None)
    ckpt = torch.load(path, weights_only=True)
    for key, value in overrides.items():
        if value is None:
            del ckpt[key]
        else:
            ckpt[key] = value
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"flow_config": None}, "key 'flow_config' is missing"),
        ({"flow_config": [1, 2]}, "key 'flow_config' must be a dict; got list"),
        ({"action": None}, "key 'action' is missing"),
        ({"symmetric": "yes"}, "key 'symmetric' must be a boolean; got str"),
        ({"format_version": "1"}, "key 'format_version' must be an integer; got str"),
        ({"model_state": {"w": [1.0]}}, "model_state entry 'w' is not a tensor"),
        ({"flow_config": {"lattice_shape": [4, 4], "colour": 1}}, "invalid flow_config"),
        ({"action": {"m2": -4.0}}, "invalid action (KeyError"),
        ({"model_state": {"w": torch.zeros(2)}}, "model_state does not fit its flow_config"),
    ],
)
def test_bad_checkpoint_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, overrides: dict, expected: str
) -> None:
    """A checkpoint with the right ``format`` but missing or ill-typed keys.
    Failed before: KeyError / TypeError / RuntimeError tracebacks."""
    bad = _checkpoint(tmp_path / "bad.pt", **overrides)
    for argv in (["sample", "--model", str(bad), "--n", "5", "--out", str(tmp_path / "e.h5")],
                 ["eval", "--model", str(bad), "--n", "16", "--batch", "16"]):
        assert main(argv) == 2
        line = _err(capsys, argv[0])
        assert "bad.pt" in line and expected in line, line
    assert not (tmp_path / "e.h5").exists()


def test_train_resume_without_trainer_state(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Failed before: TypeError traceback from ``Trainer.load_state_dict(None)``."""
    ckpt = _checkpoint(tmp_path / "s.pt")  # written by a script: no trainer state
    assert main(["train", "--resume", "--out", str(ckpt), "--steps", "3", "--quiet"]) == 2
    assert "has no trainer state to resume" in _err(capsys, "train")
    load_model(ckpt)  # still fine for sampling


# ----------------------------------------------------------------------- bad ensembles


def _ensemble(path: Path) -> Path:
    with EnsembleWriter.create(path, lattice_shape=(4, 4), n_chains=2,
                               scalar_names=["action", "accepted", "magnetization"],
                               action={"m2": -4.0, "lam": 8.0, "lattice_shape": [4, 4]},
                               sampler={"name": "hmc"}) as w:
        rng = np.random.default_rng(0)
        w.append(scalars={"action": rng.normal(size=(50, 2)), "accepted": np.ones((50, 2)),
                          "magnetization": rng.normal(size=(50, 2))},
                 configs=rng.normal(size=(50, 2, 4, 4)), state={"i": np.array(0)},
                 wall_time=0.1)
    return path


def _no_chunks(f: h5py.File) -> None:
    del f["chunks"]


def _list_action(f: h5py.File) -> None:
    f.attrs["action"] = "[1, 2]"


def _wrong_chains(f: h5py.File) -> None:
    f.attrs["n_chains"] = np.int64(3)


def _wrong_lattice(f: h5py.File) -> None:
    f.attrs["lattice_shape"] = np.array([8, 2])


def _string_chains(f: h5py.File) -> None:
    f.attrs["n_chains"] = "2"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_no_chunks, "dataset 'chunks/end' is missing"),
        (_list_action, "root attribute 'action' must be a JSON object; got JSON list"),
        (_wrong_chains, "dataset 'configs' has shape (50, 2, 4, 4), but n_chains = 3"),
        (_wrong_lattice, "lattice_shape = (8, 2) need (rows, 2, 8, 2)"),
        (_string_chains, "root attribute 'n_chains' must be an integer >= 1; got '2'"),
    ],
)
def test_hand_edited_ensemble_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, edit: object, expected: str
) -> None:
    """The file's structure is validated once at open, naming the file and the problem.
    Failed before: KeyError / numpy reshape tracebacks without the file name."""
    path = _ensemble(tmp_path / "edited.h5")
    with h5py.File(path, "r+") as f:
        edit(f)
    assert main(["analyze", str(path)]) == 2
    line = _err(capsys, "analyze")
    assert "edited.h5" in line and expected in line, line
    assert main([*HMC, "--n", "60", "--out", str(path), "--resume"]) == 2
    assert expected in _err(capsys, "hmc")


# -------------------------------------------------------------------- resume settings (14.6)


@pytest.mark.parametrize(
    ("flag", "key"),
    [(["--no-configs"], "store_configs"), (["--store-dtype", "float64"], "config_dtype"),
     (["--compression", "gzip"], "compression")],
)
def test_resume_refuses_changed_storage_options(
    tmp_path: Path, capsys: pytest.CaptureFixture, flag: list[str], key: str
) -> None:
    """Failed before: --resume silently ignored the changed option."""
    out = tmp_path / "r.h5"
    assert main([*HMC, "--n", "4", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*HMC, "--n", "8", "--out", str(out), "--resume", *flag]) == 2
    assert f"{key} mismatch" in _err(capsys, "hmc")
    assert main([*HMC, "--n", "8", "--out", str(out), "--resume"]) == 0


# --------------------------------------------------------------------- bugs stay visible


def test_bugs_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only bad input is a one-liner: errors raised inside libraries, and other exception
    types, propagate (negative control for the one-line mapping)."""
    import flowmc.commands.sample as sample_cmd

    def numpy_bug(args: argparse.Namespace) -> int:
        np.zeros(3).reshape(2, 2)  # ValueError raised inside numpy
        return 0

    def key_bug(args: argparse.Namespace) -> int:
        return {}["missing"]

    def torch_bug(args: argparse.Namespace) -> int:
        torch.zeros(2) @ torch.zeros(3)  # RuntimeError raised inside torch
        return 0

    argv = ["sample", "--n", "5", "--out", "x.h5"]
    for bug, exc in ((numpy_bug, ValueError), (key_bug, KeyError), (torch_bug, RuntimeError)):
        monkeypatch.setattr(sample_cmd, "run", bug)
        with pytest.raises(exc):
            main(argv)
    assert is_user_error(FileNotFoundError("x")) and is_user_error(MemoryError())
    try:
        raise ValueError("Expected --n >= 1; got 0")  # raised by flowmc code (this test is not)
    except ValueError as e:
        assert not is_user_error(e)
