"""Reports never replace what they did not create (issue 14 item 3): flowmc.io.safeio +
flowmc.report.

Before this change ``flowmc analyze ens.h5 --json ens.h5`` replaced the ensemble, ``eval --json
model.pt`` the model, ``train --out tp.png`` wrote the checkpoint and then the training plot
overwrote it, and ``train --out important.pt`` silently replaced ``important.png``; each case
below failed then. A report may replace only an earlier report of its own kind; writes are
atomic. About 10 s in all (two 5-step trainings, small analyses).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmc import report
from flowmc.cli import main
from flowmc.flows.flow import FlowConfig, build_flow
from flowmc.io import safeio
from flowmc.io.checkpoint import load_checkpoint, save_checkpoint
from flowmc.io.ensemble import EnsembleWriter
from flowmc.lattice.action import FreeTheory, Phi4Action

SHAPE = (4, 4)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ensemble(path: Path, n: int = 40, chains: int = 2) -> Path:
    phi = FreeTheory(0.5, SHAPE).sample(n * chains, generator=torch.Generator().manual_seed(0))
    phi = phi.numpy().reshape(n, chains, *SHAPE)
    scalars = {"magnetization": phi.reshape(n, chains, -1).sum(-1),
               "accepted": np.ones((n, chains), bool)}  # fmt: skip
    with EnsembleWriter.create(
        path, lattice_shape=SHAPE, n_chains=chains, scalar_names=list(scalars),
        action={"m2": 0.5, "lam": 0.0}, sampler={"name": "hmc"}, config_dtype="float64",
    ) as w:  # fmt: skip
        w.append(scalars=scalars, configs=phi, state={"phi": phi[-1]}, wall_time=0.1)
    return path


def _checkpoint(path: Path) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        flow = build_flow(FlowConfig(SHAPE, n_layers=2, hidden=(4,)))
    save_checkpoint(path, flow, Phi4Action(-4.0, 8.0, SHAPE))
    return path


def _foreign_png(path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.subplots().plot([0, 1])
    fig.savefig(path, format="png")  # no flowmc metadata: someone else's picture
    return path


_BOOM: list[str] = []


def _boom() -> None:  # would run if the sniffer unpickled the file
    _BOOM.append("unpickled")


class _Boom:
    def __reduce__(self):  # noqa: ANN204
        return (_boom, ())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sniff")
    out = {"ensemble": _ensemble(d / "ens.h5"), "checkpoint": _checkpoint(d / "m.pt")}
    torch.save({"weights": torch.zeros(3)}, d / "other.pt")
    out["torch"] = d / "other.pt"
    with zipfile.ZipFile(d / "evil.pt", "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"format": _Boom()}, protocol=2))
    out["evil"] = d / "evil.pt"
    out["png"] = _foreign_png(d / "theirs.png")
    (d / "theirs.json").write_text('{"results": [1, 2]}\n')
    out["json"] = d / "theirs.json"
    (d / "notes.txt").write_text("precious\n")
    out["text"] = d / "notes.txt"
    return out


def test_sniff_tells_what_a_file_is(files: dict[str, Path], tmp_path: Path) -> None:
    assert safeio.sniff(files["ensemble"]).kind == "ensemble"
    assert safeio.sniff(files["checkpoint"]).kind == "checkpoint"
    for key in ("torch", "png", "json", "text"):
        assert safeio.sniff(files[key]).kind == "other", key
    assert safeio.sniff(tmp_path / "nothing").kind == "missing"
    assert safeio.sniff(tmp_path).kind == "directory"
    assert safeio.sniff("/dev/null") == ("special", None, "a device node")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert safeio.sniff(fifo).kind == "special"  # never opened: opening a FIFO would block
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert safeio.sniff(tmp_path / "dangling").kind == "special"
    (tmp_path / "empty").write_bytes(b"")
    assert safeio.sniff(tmp_path / "empty").kind == "other"
    # a checkpoint is recognised from pickle opcodes only, never unpickled
    assert safeio.sniff(files["evil"]).kind == "other" and _BOOM == []
    # flowmc reports carry their kind
    j = report.write_json(tmp_path / "r.json", {"x": 1.0, "nan": float("nan")}, "analysis")
    assert safeio.sniff(j) == ("json-report", "analysis", "a flowmc 'analysis' report (JSON)")
    assert json.loads(j.read_text()) == {"flowmc_report": "analysis", "x": 1.0, "nan": None}
    fig = report._figure()
    fig.subplots().plot([0, 1])
    p = report.save_figure(fig, tmp_path / "p.png", "compare")
    assert safeio.png_text(p)["Software"] == "flowmc compare"
    assert safeio.sniff(p)[:2] == ("png-report", "compare")


def test_reports_replace_only_their_own_kind(files: dict[str, Path], tmp_path: Path) -> None:
    ok = report.write_json(tmp_path / "a.json", {"v": 1}, "analysis")
    report.write_json(ok, {"v": 2}, "analysis")  # its own earlier report: replaced
    assert json.loads(ok.read_text())["v"] == 2
    with pytest.raises(FileExistsError, match="'analysis' report"):
        report.write_json(ok, {"v": 3}, "compare")  # a report of another kind: refused
    for key, what in (("ensemble", "flowmc ensemble"), ("checkpoint", "flowmc checkpoint"),
                      ("json", "did not write"), ("png", "PNG image"), ("text", "did not write"),
                      ("torch", "not a flowmc checkpoint")):  # fmt: skip
        before = _sha(files[key])
        with pytest.raises(FileExistsError, match=what) as exc:
            report.write_json(files[key], {"v": 1}, "analysis")
        assert str(files[key]) in str(exc.value) and "\n" not in str(exc.value)
        fig = report._figure()
        with pytest.raises(FileExistsError, match=what):
            report.save_figure(fig, files[key], "analysis-history")
        assert _sha(files[key]) == before, key
    with pytest.raises(FileExistsError, match="directory"):
        report.write_json(tmp_path, {"v": 1}, "analysis")
    with pytest.raises(ValueError, match="reads or writes"):
        report.write_json(tmp_path / "new.json", {}, "analysis", inputs=[tmp_path / "new.json"])
    # the run-summary shim of flowmc sample/hmc goes through the same rule
    from flowmc.commands._common import write_json

    with pytest.raises(FileExistsError, match="flowmc ensemble"):
        write_json(files["ensemble"], {"n": 1})


def test_atomic_write_leaves_no_trace_on_failure(tmp_path: Path) -> None:
    dest = report.write_json(tmp_path / "r.json", {"v": 1}, "eval")

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"{partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        safeio.write_atomic(dest, broken, fmt="json", kind="eval")
    assert json.loads(dest.read_text()) == {"flowmc_report": "eval", "v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_analyze_refuses_to_replace_inputs_and_foreign_files(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ens = _ensemble(tmp_path / "ens.h5")
    before = _sha(ens)
    assert main(["analyze", str(ens), "--json", str(ens)]) == 2  # replaced the ensemble before
    err = capsys.readouterr().err
    assert "reads or writes" in err and err.count("\n") == 1 and _sha(ens) == before
    other = _ensemble(tmp_path / "other.h5")
    assert main(["analyze", str(ens), "--json", str(other)]) == 2
    assert "flowmc ensemble" in capsys.readouterr().err
    plots = tmp_path / "plots"
    plots.mkdir()
    _foreign_png(plots / "history.png")
    theirs = _sha(plots / "history.png")
    assert main(["analyze", str(ens), "--plots", str(plots)]) == 2  # checked before the work
    assert "PNG image flowmc did not write" in capsys.readouterr().err
    assert _sha(plots / "history.png") == theirs and sorted(os.listdir(plots)) == ["history.png"]
    (plots / "history.png").unlink()
    out = tmp_path / "a.json"
    for _ in range(2):  # the second run replaces the first run's reports
        assert main(["analyze", str(ens), "--json", str(out), "--plots", str(plots)]) == 0
    assert json.loads(out.read_text())["flowmc_report"] == "analysis"
    kinds = {p.name: safeio.sniff(p).report for p in plots.iterdir()}
    assert kinds == {k: v for k, v in report.ANALYSIS_PLOTS.items() if k in kinds}
    assert len(kinds) == 4  # no log_q scalar: no action_vs_effective.png
    assert main(["analyze", str(ens), "--plots", str(files["text"])]) == 2
    assert "a file flowmc did not write, not a directory" in capsys.readouterr().err


def test_eval_refuses_to_replace_the_model(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = _checkpoint(tmp_path / "model.pt")
    before = _sha(model)
    args = ["eval", "--model", str(model), "--n", "256", "--batch", "128", "--quiet"]
    assert main([*args, "--json", str(model)]) == 2  # replaced the model before
    assert "reads or writes" in capsys.readouterr().err and _sha(model) == before
    assert main([*args, "--json", str(files["checkpoint"])]) == 2
    assert "flowmc checkpoint" in capsys.readouterr().err
    assert main([*args, "--plot", str(files["png"])]) == 2
    assert "PNG image" in capsys.readouterr().err
    js, png = tmp_path / "e.json", tmp_path / "s.png"
    assert main([*args, "--json", str(js), "--plot", str(png)]) == 0
    assert safeio.sniff(js)[:2] == ("json-report", "eval")
    assert safeio.sniff(png)[:2] == ("png-report", "action-vs-effective")
    load_checkpoint(model)  # still a valid checkpoint


def test_train_plot_never_clobbers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--out tp.png``: the curve went to OUT.png = the checkpoint; ``--out important.pt``
    replaced ``important.png``. Now the default curve is OUT.train.png and foreign files are
    refused before training starts."""
    base = ["train", "--L", "4", "--m2", "-4", "--lam", "8", "--layers", "2", "--hidden", "4",
            "--steps", "5", "--batch", "8", "--quiet", "--symmetric"]  # fmt: skip
    tp = tmp_path / "tp.png"
    assert main([*base, "--out", str(tp)]) == 0
    assert safeio.sniff(tp).kind == "checkpoint"  # the checkpoint survived
    assert safeio.sniff(tmp_path / "tp.train.png")[:2] == ("png-report", "train-history")
    important = _foreign_png(tmp_path / "important.png")
    before = _sha(important)
    assert main([*base, "--out", str(tmp_path / "important.pt")]) == 0
    assert _sha(important) == before  # untouched: the curve is important.train.png
    assert (tmp_path / "important.train.png").exists()
    theirs = _foreign_png(tmp_path / "mine.train.png")
    assert main([*base, "--out", str(tmp_path / "mine.pt")]) == 2  # refused before training
    assert "PNG image flowmc did not write" in capsys.readouterr().err
    assert not (tmp_path / "mine.pt").exists() and _sha(theirs) == before
    assert main([*base, "--out", str(tmp_path / "x.pt"), "--plot", str(tmp_path / "x.pt")]) == 2
    assert "reads or writes" in capsys.readouterr().err
    assert main([*base, "--resume", "--steps", "7", "--out", str(tp)]) == 0  # own curve replaced
    assert load_checkpoint(tp)["trainer_state"]["step"] == 7


def test_training_progress_bar_is_tqdm(capsys: pytest.CaptureFixture) -> None:
    """One progress bar, on tqdm (stderr), with the moving averages."""
    from flowmc.training.train import TrainConfig, Trainer

    action = Phi4Action(-4.0, 8.0, SHAPE)
    flow = build_flow(FlowConfig(SHAPE, n_layers=2, hidden=(4,)))
    tr = Trainer(flow, action, TrainConfig(n_steps=3, batch_size=8),
                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    tr.run(progress=True)
    err = capsys.readouterr().err
    assert "train: 100%" in err and "3/3" in err and "loss(F_q)" in err
    tr.run(progress=False, n_steps=4)
    assert capsys.readouterr().err == ""


def test_numerical_core_imports_neither_matplotlib_nor_the_cli() -> None:
    """Tables and plots live in flowmc.report; the core never imports matplotlib or
    flowmc.commands (before, compare.py imported flowmc.commands._common)."""
    import subprocess
    import sys

    code = (
        "import sys, flowmc, flowmc.analysis, flowmc.analysis.compare, flowmc.training.evaluate, "
        "flowmc.training.train, flowmc.analysis.diagnostics, flowmc.io.safeio, "
        "flowmc.lattice.observables, flowmc.analysis.autocorr\n"
        "bad = lambda: sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib' "
        "or m.startswith('flowmc.commands') or m == 'flowmc.report')[:3]\n"
        "print(bad())\n"
        "import flowmc.report\n"
        "print(bad())\n"  # control: the check sees a module once it is imported
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()  # fmt: skip
    assert out == ["[]", "['flowmc.report']"]


def test_field_layer_and_histogram_plots(tmp_path: Path) -> None:
    """The tutorial's plot helpers write PNG reports of their own kind and refuse bad input."""
    from flowmc.flows.couplings import AffineCoupling, checkerboard
    from flowmc.flows.nets import PeriodicCNN

    phi = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(0))
    p = report.plot_configurations(phi, tmp_path / "c.png", title="draws", n=4)
    assert safeio.sniff(p)[:2] == ("png-report", "configurations")
    mask = checkerboard(SHAPE, 0)
    layer = AffineCoupling(mask, PeriodicCNN(2, 1, 2, (4,), zero_init=False)).double()
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    jac = torch.autograd.functional.jacobian(
        lambda v: layer(v.view(1, *SHAPE))[0].flatten(), x.flatten()
    )
    p = report.plot_coupling(mask, jac, tmp_path / "j.png")
    assert safeio.sniff(p)[:2] == ("png-report", "coupling")
    p = report.plot_histograms({"a": np.arange(10.0), "b": torch.ones(3)}, tmp_path / "h.png")
    assert safeio.sniff(p)[:2] == ("png-report", "histograms")
    # a plot of one kind never replaces a plot of another kind
    with pytest.raises(FileExistsError):
        report.plot_histograms({"a": np.arange(3.0)}, tmp_path / "c.png")
    with pytest.raises(ValueError, match="Expected phi of shape"):
        report.plot_configurations(phi[0], tmp_path / "x.png")
    with pytest.raises(ValueError, match="Jacobian"):
        report.plot_coupling(mask, jac[:3], tmp_path / "x.png")
    with pytest.raises(ValueError, match="finite values"):
        report.plot_histograms({"a": [float("nan")]}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
