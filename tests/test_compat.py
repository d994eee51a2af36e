"""The module paths of flowmc before its subpackages (flowmc._compat): the same modules, not copies.

Every old name (``flowmc.run``, ``flowmc.hmc``, ...) is the module object of its new path, so
attributes, privates, monkeypatching and ``isinstance`` behave as before; the names README.md and
docs/ show resolve; an unknown name is still an error (the negative controls).
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import flowmc
import flowmc.sampling.run
from flowmc._compat import ALIASES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("old", sorted(ALIASES))
def test_old_path_is_the_new_module(old: str) -> None:
    new = ALIASES[old]
    mod = importlib.import_module(old)
    assert mod is importlib.import_module(new) is sys.modules[old] is sys.modules[new]
    assert getattr(flowmc, old.split(".")[1]) is mod  # the attribute flowmc.<old name>
    assert mod.__name__ == new and mod.__spec__.name == new  # it keeps its own identity
    assert Path(mod.__file__).parent.name == new.split(".")[1]


def test_old_paths_in_a_fresh_interpreter() -> None:
    """Imported first under the old name (nothing imported the new path before)."""
    code = (
        "import flowmc.run, sys\n"
        "from flowmc.workflow import train_flow\n"
        "from flowmc import hmc, imh\n"
        "import flowmc.sampling.run, flowmc.training.workflow, flowmc.mcmc.hmc\n"
        "assert flowmc.run is flowmc.sampling.run is sys.modules['flowmc.run']\n"
        "assert train_flow is flowmc.training.workflow.train_flow\n"
        "assert hmc is flowmc.mcmc.hmc and imh is sys.modules['flowmc.mcmc.imh']\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0 and out.stdout == "ok\n", out.stderr[-2000:]


def test_privates_monkeypatching_and_isinstance(monkeypatch: pytest.MonkeyPatch) -> None:
    import flowmc.run as old_run
    from flowmc.run import RunConfig

    assert old_run._check_resume_settings is flowmc.sampling.run._check_resume_settings  # private
    monkeypatch.setattr(old_run, "run_ensemble", "patched")  # through the old path ...
    assert flowmc.sampling.run.run_ensemble == "patched"  # ... it patches the one module
    assert isinstance(flowmc.sampling.run.RunConfig(n=1), RunConfig)


def test_names_of_the_split_modules() -> None:
    """flowmc.shards and flowmc.distributed were split (io.join, parallel); their names remain."""
    import flowmc.distributed
    import flowmc.shards

    import flowmc.io.ensemble
    import flowmc.io.join
    import flowmc.parallel

    for name in ("GatheredMean", "chain_blocks", "check_join", "job_device", "join_shards",
                 "run_sharded", "shard_dir", "shard_path"):  # fmt: skip
        assert name in flowmc.shards.__all__ and hasattr(flowmc.shards, name), name
    assert flowmc.shards.check_join is flowmc.io.ensemble.check_join
    assert flowmc.shards.join_shards is flowmc.io.join.join_shards
    for name in ("DistInfo", "DistributedTrainer", "process_group", "torchrun_env", "backend_for",
                 "rank_device", "local_batch_size", "broadcast_flag", "barrier"):  # fmt: skip
        assert name in flowmc.distributed.__all__ and hasattr(flowmc.distributed, name), name
    assert flowmc.distributed.process_group is flowmc.parallel.process_group
    assert flowmc.checkpoint.FORMAT == "flowmc-checkpoint"
    assert flowmc.ensemble.FORMAT == "flowmc-ensemble"


def test_analysis_package_keeps_the_old_module_names() -> None:
    """flowmc.analysis became a package; the public names of the old module are re-exported
    and no submodule shadows a function of the same name."""
    import flowmc.analysis
    import flowmc.analysis.ensemble as impl

    for name in [*impl.__all__, "PRIMARY_KEYS", "MAX_BINS"]:
        assert getattr(flowmc.analysis, name) is getattr(impl, name), name
    for name in ("analyze", "estimate", "diagnose", "measure_ensemble"):
        assert callable(getattr(flowmc.analysis, name))
    assert set(flowmc.analysis.__all__) == set(impl.__all__)


def test_unknown_names_are_still_errors() -> None:
    """Negative controls: the aliases cover their table and nothing else."""
    with pytest.raises(ModuleNotFoundError, match="flowmc.nonexistent"):
        importlib.import_module("flowmc.nonexistent")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("flowmc.lattice.run")  # an old name under a new package
    with pytest.raises(ImportError):
        exec("from flowmc import nonexistent", {})
    with pytest.raises(AttributeError, match="has no attribute 'nonexistent'"):
        flowmc.nonexistent  # noqa: B018
    assert "flowmc.run" in ALIASES and "flowmc.nonexistent" not in ALIASES


_IMPORT = re.compile(r"^[ \t]*(from flowmc[\w.]* import (?:\([^)]*\)|[^#\n]+)|import flowmc[\w.]*)",
                     re.M)
_DOTTED = re.compile(r"`~?(flowmc(?:\.\w+)+)`")


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_names_shown_in_readme_and_docs_resolve() -> None:
    """Every ``import`` of flowmc in a Python block of README.md and docs/*.md runs, and every
    ```flowmc.x.y``` they name resolves (a module, or an attribute of one)."""
    imports, dotted = set(), set()
    for path in _docs():
        text = path.read_text()
        for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
            imports |= {m.strip() for m in _IMPORT.findall(block)}
        dotted |= set(_DOTTED.findall(text))
    assert "from flowmc.analysis import analyze" in imports  # control: README's example is seen
    assert len(dotted) > 20
    for stmt in sorted(imports):
        exec(stmt, {})
    for name in sorted(dotted):
        parts = name.split(".")
        for k in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:k]))
                break
            except ModuleNotFoundError:
                continue
        for attr in parts[k:]:
            obj = getattr(obj, attr)  # AttributeError names what does not resolve
