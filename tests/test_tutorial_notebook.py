"""The tutorial, ``docs/tutorial.ipynb``: run top to bottom by a real kernel in quick mode, and the
committed copy is a complete full-mode run.

The notebook is the tutorial's one source: the docs site renders it with its committed outputs
(``mkdocs.yml``), and its ``assert`` cells state, in both modes, what its text claims. Quick mode
(``FLOWMC_TUTORIAL_QUICK=1``) runs the same cells on a 6x6 lattice with tiny sizes.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "tutorial.ipynb"


def _text(cell) -> str:
    """The printed text of a code cell (stdout and plain-text results)."""
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream" and o.get("name") == "stdout":
            out.append(o["text"])
        elif o.get("output_type") in ("execute_result", "display_data"):
            out.append(o.get("data", {}).get("text/plain", "") if "image/png" not in o.get(
                "data", {}) else "")  # fmt: skip
    return "".join(out)


def _number(text: str, pattern: str) -> float:
    m = re.search(pattern, text)
    assert m is not None, f"no line matching {pattern!r} in:\n{text[-2000:]}"
    return float(m.group(1))


def _check_outputs(nb, mode: str) -> None:
    """What every run of the notebook prints, whichever its mode."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("outputs") is not None for c in code)
    errors = [o for c in code for o in c["outputs"] if o.get("output_type") == "error"]
    assert errors == []
    text = "\n".join(_text(c) for c in code)
    assert f"mode: {mode};" in text
    assert _number(text, r"max \|S - by hand\| / \|S\| = (\S+)") < 1e-13
    assert _number(text, r"max \|inverse\(forward\(x\)\) - x\| = (\S+)") < 1e-12
    assert _number(text, r"largest entry of J above the diagonal blocks: (\S+)") == 0
    for what in ("observables", "comparisons"):
        z, bound = re.search(rf"largest \|z\| over \d+ {what}: (\S+) \(bound (\S+)\)",
                             text).groups()  # fmt: skip
        assert float(z) < float(bound)
    assert _number(text, r"q alone: fraction of draws with M > 0 = (\S+)") < 0.05
    assert re.search(r"warning: chain\(s\) \[[\d, ]+\] never crossed between the modes", text)
    images = [o for c in code for o in c["outputs"] if "image/png" in o.get("data", {})]
    assert len(images) >= 15  # every figure of the tutorial is in the notebook


def test_tutorial_notebook_quick(tmp_path, monkeypatch):
    """Every cell, executed in order by an IPython kernel in quick mode: no cell fails (the
    ``assert`` cells included), and the printed numbers are those the text describes."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("FLOWMC_TUTORIAL_QUICK", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))  # fmt: skip
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    with contextlib.redirect_stderr(io.StringIO()):
        client.execute()
    _check_outputs(nb, "QUICK")
    assert (tmp_path / "tutorial-work-quick" / "flow_mh.h5").is_file()


def test_committed_notebook_is_a_full_run():
    """``docs/tutorial.ipynb`` as committed: every code cell run once, in order, in full mode,
    without an error; its outputs (the page of the docs site) pass the same checks."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    counts = [c.get("execution_count") for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), "rerun the notebook top to bottom"
    _check_outputs(nb, "FULL")


def test_tutorial_cli_commands_parse():
    """Every ``flowmc ...`` line of the tutorial's shell blocks is a valid command line."""
    from flowmc.cli import build_parser

    _, commands = build_parser()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    prose = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    blocks = re.findall(r"```bash\n(.*?)```", prose, re.S)
    lines = [ln for b in blocks for ln in b.splitlines() if ln.startswith("flowmc ")]
    assert len(lines) >= 12
    for line in lines:
        argv = shlex.split(line, comments=True)[1:]
        commands[argv[0]].parse_args(argv[1:])  # exits (SystemExit) on an unknown option
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        commands["sample"].parse_args(["--model", "flow.pt", "--n-configs", "5"])  # control
