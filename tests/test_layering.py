"""The layering of the package, checked on its source (AST, nothing imported).

:data:`LAYERS` is the one written statement of which module may import which: a module may
import modules of its own layer or a lower one, never a higher one. Three rules:

(a) no import cycles among flowmc modules (imports inside functions count; those under
    ``if TYPE_CHECKING:`` do not, they never run);
(b) no module uses another module's private names (``from flowmc.x import _y``, or ``x._y`` on
    an imported module ``x``), unless both lie in the same subpackage (``flowmc.io.join`` may use
    ``flowmc.io.ensemble``'s privates); a private *module* (``flowmc._checks``,
    ``flowmc.commands._common``) is open to its own package and everything below it;
(c) no module imports a module of a higher layer.

A negative control runs the same checker on a small synthetic package with one violation of
each rule, and it must report all three. The import graph comes from ``scripts/code_stats.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Module prefix -> layer, bottom (0) to top; a module's layer is that of its longest prefix.
LAYERS: dict[str, int] = {
    # 0: no flowmc imports at all
    "flowmc._checks": 0,
    "flowmc._version": 0,
    "flowmc._compat": 0,
    # 1: the physics of the lattice, and process groups (torch.distributed)
    "flowmc.lattice": 1,
    "flowmc.parallel": 1,
    # 2: flows and Markov chain kernels
    "flowmc.flows": 2,
    "flowmc.mcmc": 2,
    # 3: files (checkpoints hold flows, so io sits above them)
    "flowmc.io": 3,
    # 4: training and the analysis of ensembles (each uses the other's lower modules: training
    #    the Kish ESS and the Z2 sign rule of analysis; the free energy the flow evaluation)
    "flowmc.training": 4,
    "flowmc.analysis": 4,
    # 5: sampling runs (the adaptive warm-up trains the flow: sampling above training)
    "flowmc.sampling": 5,
    # 6: reports (tables, JSON, plots) and scans (sampling + analysis + reports)
    "flowmc.report": 6,
    "flowmc.scan": 6,
    # 7: the command line and its configuration files; the package itself (its __init__
    #    re-exports the public API of the layers below, and the command line reads its version)
    "flowmc.config": 7,
    "flowmc.cli": 7,
    "flowmc.commands": 7,
    "flowmc.__main__": 7,
    "flowmc": 7,
}


def _code_stats():
    spec = importlib.util.spec_from_file_location("code_stats", ROOT / "scripts" / "code_stats.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("code_stats", module)
    spec.loader.exec_module(module)
    return module


code_stats = _code_stats()


def layer_of(module: str, layers: dict[str, int]) -> int:
    """The layer of ``module``: that of its longest prefix in ``layers``."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in layers:
            return layers[key]
    raise KeyError(f"{module} has no layer")


def _package(module: str, modules: dict[str, Path]) -> str:
    """The package a module belongs to (a package's ``__init__`` belongs to the package)."""
    if modules[module].name == "__init__.py":
        return module
    return module.rpartition(".")[0]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_allowed(source: str, target: str, name: str, modules: dict[str, Path]) -> bool:
    """Whether ``source`` may use the private ``name`` of the module ``target`` (rule b)."""
    full = f"{target}.{name}"
    if full in modules:  # a private module: open to its own package and everything below it
        parent = full.rpartition(".")[0]
        return source == parent or source.startswith(parent + ".")
    package = _package(target, modules)
    root = target.split(".")[0]
    # the same subpackage (the modules directly in the root package are units of their own)
    return package != root and _package(source, modules) == package


def check_layering(package_dir: Path, layers: dict[str, int]) -> list[str]:
    """Every violation of rules (a)-(c) in the package at ``package_dir``, one line each."""
    modules, imports, uses = code_stats.import_graph(package_dir)
    problems = []
    graph = code_stats.edges(imports)
    for comp in code_stats.strongly_connected(graph, list(modules)):
        problems.append(f"import cycle: {' <-> '.join(comp)}")
    for imp in imports:
        parent, _, last = imp.target.rpartition(".")
        if _is_private(last) and not _private_allowed(imp.source, parent, last, modules):
            problems.append(f"{imp.source}:{imp.line} imports the private module {imp.target}")
        for name in imp.names:
            if _is_private(name) and not _private_allowed(imp.source, imp.target, name, modules):
                problems.append(f"{imp.source}:{imp.line} imports the private {imp.target}.{name}")
        low, high = layer_of(imp.target, layers), layer_of(imp.source, layers)
        if low > high:
            problems.append(f"{imp.source}:{imp.line} (layer {high}) imports {imp.target} "
                            f"(layer {low}, higher)")  # fmt: skip
    for use in uses:
        if _is_private(use.name) and not _private_allowed(use.source, use.target, use.name,
                                                          modules):  # fmt: skip
            problems.append(f"{use.source}:{use.line} uses the private {use.target}.{use.name}")
    return sorted(set(problems))


def test_every_module_has_a_layer() -> None:
    """Every module is placed explicitly (the bare prefix "flowmc" places only the package)."""
    for module in code_stats.modules(ROOT / "flowmc"):
        parts = module.split(".")
        assert any(".".join(parts[:i]) in LAYERS for i in range(2, len(parts) + 1)) or (
            module == "flowmc"
        ), f"{module}: add it to LAYERS"


def test_layering() -> None:
    assert check_layering(ROOT / "flowmc", LAYERS) == []


def test_the_graph_sees_function_level_imports_and_skips_type_checking() -> None:
    """Two known edges: cli imports flowmc.io.join inside a function; samplers imports
    flowmc.sampling.run only under TYPE_CHECKING (an edge there would be a cycle)."""
    _, imports, _ = code_stats.import_graph(ROOT / "flowmc")
    pairs = {(i.source, i.target): i.module_level for i in imports}
    assert pairs[("flowmc.cli", "flowmc.io.join")] is False
    assert ("flowmc.sampling.samplers", "flowmc.sampling.run") not in pairs


SYNTHETIC = {
    "__init__.py": "",
    "low/__init__.py": "",
    "low/a.py": "from pkg.low import b\n\ndef _helper():\n    pass\n",
    "low/b.py": "def f():\n    from pkg.low import a  # a cycle through a function-level import\n",
    "low/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import d\n",
    "high/__init__.py": "",
    "high/d.py": "from pkg.low.a import _helper\n",
    "high/e.py": "from pkg.low import a\n\na._helper()\n",
    "low/up.py": "import pkg.high.e\n",
}
SYNTHETIC_LAYERS = {"pkg": 9, "pkg.low": 0, "pkg.high": 1}


def test_negative_control(tmp_path: Path) -> None:
    """A cycle (through a function-level import), two private uses and an upward import in a
    synthetic package are all reported; the import under TYPE_CHECKING (upward) is not."""
    pkg = tmp_path / "pkg"
    for rel, text in SYNTHETIC.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    problems = check_layering(pkg, SYNTHETIC_LAYERS)
    assert problems == [
        "import cycle: pkg.low.a <-> pkg.low.b",
        "pkg.high.d:1 imports the private pkg.low.a._helper",
        "pkg.high.e:3 uses the private pkg.low.a._helper",
        "pkg.low.up:1 (layer 0) imports pkg.high.e (layer 1, higher)",
    ], problems
    (pkg / "low/b.py").write_text("def f():\n    pass\n")  # the control of the control
    (pkg / "high/d.py").write_text("from pkg.low.a import f\n")
    (pkg / "high/e.py").write_text("from pkg.low import a\n\na.f()\n")
    (pkg / "low/up.py").write_text("")
    assert check_layering(pkg, SYNTHETIC_LAYERS) == []


@pytest.mark.parametrize(("source", "target", "name", "allowed"), [
    ("flowmc.io.join", "flowmc.io.ensemble", "_open_h5", True),  # same subpackage
    ("flowmc.sampling.run", "flowmc.mcmc.hmc", "_check_step_size", False),
    ("flowmc.sampling.run", "flowmc", "_checks", True),  # a private module of the package
    ("flowmc.scan", "flowmc.commands", "_common", False),  # ... open to its package only
    ("flowmc.commands.hmc", "flowmc.commands", "_common", True),
    ("flowmc.scan", "flowmc.cli", "_private", False),  # top-level modules: units of their own
])  # fmt: skip
def test_private_rule(source: str, target: str, name: str, allowed: bool) -> None:
    modules = code_stats.modules(ROOT / "flowmc")
    assert _private_allowed(source, target, name, modules) is allowed
