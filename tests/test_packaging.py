"""The installable package: shipped flows by name, the version in every file, and the wheel.

The wheel test builds ``flowmc-lattice`` from a copy of this checkout (``pip wheel --no-deps
--no-build-isolation --no-index``: no network), installs it with ``pip install --no-deps --target
SITE`` and runs it from a directory outside the checkout with ``PYTHONPATH=SITE``: ``flowmc
--version``, ``flowmc --help``, ``flowmc sample`` with the shipped flow (no ``--model``),
``flowmc analyze``, and ``load_model`` of a shipped flow by name. Every run checks that the
``flowmc`` it imported is the wheel's (an editable install of the checkout must not shadow it).
Negative control: with the wheel's ``flowmc/data`` removed, the same ``flowmc sample`` fails.
The full check in a fresh virtual environment (``python -m build``, wheel and sdist) is
``.ci/check-wheel``, which ``.ci/run`` calls.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import flowmc
from flowmc.flows.flow import FlowConfig, build_flow
from flowmc.io.checkpoint import load_checkpoint, load_model, save_checkpoint
from flowmc.io.ensemble import open_ensemble
from flowmc.io.shipped import (
    DEFAULT_MODEL,
    data_dir,
    default_model_path,
    resolve_model_path,
    shipped_model_path,
    shipped_models,
)
from flowmc.sampling.run import RunConfig, run_ensemble

ROOT = Path(__file__).resolve().parents[1]
DIST = "flowmc-lattice"
NAME = "phi4_L8_m2-4_lam8"


# ------------------------------------------------------------------- shipped flows by name


def test_shipped_models_are_the_data_folder() -> None:
    models = shipped_models()
    assert set(models) == {p.stem for p in (ROOT / "data").glob("*.pt")}
    assert {"phi4_L8_m2-4_lam8", "phi4_L8_m2-4_lam1"} <= set(models)
    for name, path in models.items():
        assert path.is_file() and path.suffix == ".pt"
        assert (path.parent / f"{name}.md").is_file(), f"model card of {name} missing"
    assert data_dir() == (ROOT / "data")  # the checkout's folder, not another worktree's
    assert default_model_path() == models[DEFAULT_MODEL.removesuffix(".pt")]


def test_shipped_model_path_and_errors() -> None:
    assert shipped_model_path(NAME) == shipped_model_path(NAME + ".pt") == ROOT / "data" / (
        NAME + ".pt"
    )
    with pytest.raises(ValueError, match=r"Expected the name of a shipped flow .*got 'nope'"):
        shipped_model_path("nope")


def test_load_model_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(NAME)
    assert model.path == shipped_model_path(NAME)
    assert model.action.params()["lam"] == 8.0 and model.action.lattice_shape == (8, 8)
    monkeypatch.chdir(tmp_path)
    # a bare name that is neither a file nor shipped: one line naming the shipped flows
    with pytest.raises(FileNotFoundError, match=r"not found: nope\.pt .*phi4_L8_m2-4_lam8"):
        load_model("nope.pt")
    # a path with a folder part is never looked up among the shipped flows
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(Path("sub") / (NAME + ".pt"))
    # an existing file wins over the shipped flow of the same name
    local = tmp_path / (NAME + ".pt")
    local.write_bytes(b"")
    assert resolve_model_path(NAME + ".pt") == Path(NAME + ".pt")
    with pytest.raises(ValueError, match="not a readable flowmc checkpoint"):
        load_model(NAME + ".pt")


def test_cli_model_by_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from flowmc.cli import main

    out = tmp_path / "x.h5"
    argv = ["sample", "--model", "phi4_L8_m2-4_lam1", "--n", "20", "--batch", "16", "--out",
            str(out), "--quiet"]
    assert main(argv) == 0
    with open_ensemble(out) as ens:
        assert ens.action["lam"] == 1.0
        assert ens.meta["model_path"] == str(shipped_model_path("phi4_L8_m2-4_lam1"))
    assert main([*argv[:2], "nope", *argv[3:], "--force"]) == 2
    assert "not a file, nor a shipped flow" in capsys.readouterr().err


def test_data_dir_missing_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import flowmc.io.shipped as shipped

    monkeypatch.setattr(shipped, "_candidates", lambda: [tmp_path / "gone"])
    with pytest.raises(FileNotFoundError, match="cannot find flowmc's shipped flows"):
        data_dir()
    with pytest.raises(FileNotFoundError, match=f"not found: {NAME}.*shipped flows"):
        load_model(NAME)


# --------------------------------------------------------------- the version in every file


def test_version_is_recorded_in_checkpoint_and_ensemble(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints and ensembles record ``flowmc.__version__`` as it is when they are written.

    Negative control: under a patched ``__version__`` the files record the patched value, so the
    check reads the running version and not a constant that happens to match.
    """
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", flowmc.__version__)
    action = flowmc.Phi4Action(-4.0, 8.0, (4, 4))
    flow = build_flow(FlowConfig((4, 4), n_layers=2, hidden=(4,)))
    for version in (flowmc.__version__, "9.9.9"):
        monkeypatch.setattr(flowmc, "__version__", version)
        ckpt = tmp_path / f"{version}.pt"
        save_checkpoint(ckpt, flow, action)
        assert load_checkpoint(ckpt)["flowmc_version"] == version
        out = tmp_path / f"{version}.h5"
        summary = run_ensemble(out, RunConfig(n=8, batch=8), model=load_model(ckpt), progress=False)
        assert summary["flowmc_version"] == version
        with open_ensemble(out) as ens:
            assert ens.attrs["flowmc_version"] == version


def test_cli_version(capsys: pytest.CaptureFixture) -> None:
    from flowmc.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"flowmc {flowmc.__version__}"


# ------------------------------------------------------------ the wheel, outside the checkout


def _run(
    cmd: list[str], site: Path | None, cwd: Path, ok: bool = True
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``cwd`` with ``PYTHONPATH=site`` (none if ``site`` is None)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    if site is not None:
        env["PYTHONPATH"] = str(site)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Build the wheel from a copy of the checkout and install it into a --target folder.

    Returns:
        ``(wheel file, SITE folder)``.
    """
    need = re.search(r'"setuptools>=(\d+)', (ROOT / "pyproject.toml").read_text())
    try:
        from importlib.metadata import version

        have = int(version("setuptools").split(".")[0])
    except Exception:  # noqa: BLE001 - not installed, or an odd version string
        have = None
    if need is None or have is None or have < int(need.group(1)):
        pytest.skip(f"needs setuptools>={need.group(1) if need else '?'} in this environment "
                    f"to build without isolation; found {have}")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: building in the checkout would leave build/ and *.egg-info
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "flowmc", src / "flowmc", ignore=ignore)
    shutil.copytree(ROOT / "data", src / "data", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "CHANGELOG.md"):
        shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
          str(tmp / "dist"), str(src)], site=None, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("*.whl")
    site = tmp / "site"
    _run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
         site=None, cwd=tmp)
    return wheel, site


def test_pyproject_lists_every_package() -> None:
    """``[tool.setuptools] packages`` names every package folder under ``flowmc/`` (a folder left
    out would be missing from the wheel), and ``py.typed`` is there to be shipped."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "flowmc").rglob(
        "__init__.py") if "__pycache__" not in p.parts}  # fmt: skip
    assert "flowmc.lattice" in folders and "flowmc.mcmc" in folders  # control: the scan sees them
    assert set(listed) == folders | {"flowmc.data"}
    assert (ROOT / "flowmc" / "py.typed").is_file()


def test_wheel_contents(wheel_site: tuple[Path, Path]) -> None:
    wheel, _ = wheel_site
    version = flowmc.__version__
    assert wheel.name == f"flowmc_lattice-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"flowmc_lattice-{version}.dist-info"
        metadata = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    for path in sorted((ROOT / "data").iterdir()):
        if path.suffix in (".pt", ".md"):
            assert f"flowmc/data/{path.name}" in names, f"{path.name} not in the wheel"
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "flowmc").rglob("*.py")}
    assert source <= names, sorted(source - names)
    assert "flowmc/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "data/", "docs/")) or ".pyc" in n]
    assert f"Name: {DIST}\n" in metadata and f"Version: {version}\n" in metadata
    assert re.search(r"Requires-Dist: torch<2\.15,>=2\.1|Requires-Dist: torch>=2\.1,<2\.15",
                     metadata)
    assert "flowmc = flowmc.cli:main" in entry_points


_PROBE = """
import contextlib, io, json, importlib.metadata as md, flowmc
from flowmc.cli import main
out = {}
for arg in ("--version", "--help"):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main([arg])
        except SystemExit as exc:
            out[arg] = [exc.code, buf.getvalue()]
m = flowmc.load_model("phi4_L8_m2-4_lam8")
out.update(file=flowmc.__file__, version=flowmc.__version__, model=str(m.path),
           dist_version=md.version("flowmc-lattice"), shipped=sorted(flowmc.shipped_models()))
print(json.dumps(out))
"""


def test_wheel_works_outside_checkout(wheel_site: tuple[Path, Path], tmp_path: Path) -> None:
    """``--version``/``--help`` run in-process in one interpreter (each start imports torch);
    the console script itself runs ``sample`` and ``analyze`` (``.ci/check-wheel`` runs all four
    through it)."""
    _, site = wheel_site
    cwd = tmp_path  # outside the checkout
    assert ROOT not in cwd.parents and ROOT not in site.parents
    flowmc_cmd = str(site / "bin" / "flowmc")

    probe = json.loads(_run([sys.executable, "-c", _PROBE], site, cwd).stdout)
    assert Path(probe["file"]) == site / "flowmc" / "__init__.py"  # not the editable checkout
    assert Path(probe["model"]) == site / "flowmc" / "data" / f"{NAME}.pt"
    assert probe["version"] == probe["dist_version"] == flowmc.__version__
    assert set(probe["shipped"]) == set(shipped_models())
    assert probe["--version"] == [0, f"flowmc {flowmc.__version__}\n"]
    assert probe["--help"][0] == 0
    listed = set(re.findall(r"^ {4}(\w+)\b", probe["--help"][1], flags=re.M))
    assert {"train", "eval", "sample", "hmc", "analyze", "compare"} <= listed, listed

    _run([flowmc_cmd, "sample", "--n", "200", "--out", "x.h5", "--quiet"], site, cwd)
    with open_ensemble(cwd / "x.h5") as ens:
        assert ens.n == 200
        assert Path(ens.meta["model_path"]) == site / "flowmc" / "data" / f"{NAME}.pt"
        assert ens.attrs["flowmc_version"] == flowmc.__version__
    text = _run([flowmc_cmd, "analyze", "x.h5"], site, cwd).stdout
    assert "chi2" in text and "acceptance" in text


def test_wheel_without_its_data_fails(wheel_site: tuple[Path, Path], tmp_path: Path) -> None:
    """Negative control: the wheel's own flowmc/data is what the check above used."""
    _, site = wheel_site
    bare = tmp_path / "site"
    shutil.copytree(site, bare, ignore=shutil.ignore_patterns("data"), symlinks=True)
    assert not (bare / "flowmc" / "data").exists() and (bare / "bin" / "flowmc").exists()
    proc = _run([str(bare / "bin" / "flowmc"), "sample", "--n", "10", "--out", "y.h5", "--quiet"],
                bare, tmp_path, ok=False)
    assert proc.returncode == 2, proc.stderr
    assert "cannot find flowmc's shipped flows" in proc.stderr
    assert not (tmp_path / "y.h5").exists()
