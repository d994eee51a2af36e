"""The docs site (``mkdocs.yml``, ``docs/api/``): every public name has a docstring and a page.

*Public* means named in the ``__all__`` of a module of flowmc (private modules such as
``flowmc._checks`` included: their names are checked, not rendered). A class must have a
docstring of its own, not the one ``@dataclass`` or ``NamedTuple`` makes up; a constant must have
a ``#:`` comment above its assignment or a string below it (what ``griffe_sphinx`` and griffe read).

The site's strict build (``mkdocs build --strict``, in ``.ci/run``) checks the rendering; the
last test here shows, on a small package of its own, that the build fails on a broken link, a
public name without a docstring and a docstring that does not render (skipped where the ``docs``
extra is not installed).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import pkgutil
import re
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import pytest

import flowmc

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _modules() -> list[str]:
    names = ["flowmc"] + [m.name for m in pkgutil.walk_packages(flowmc.__path__, "flowmc.")]
    return sorted(n for n in names if n != "flowmc.__main__")


def public_names() -> list[tuple[str, str]]:
    """``(module, name)`` for every name of every ``__all__`` in flowmc."""
    out = []
    for mod in _modules():
        for name in getattr(importlib.import_module(mod), "__all__", ()):
            out.append((mod, name))
    return out


@cache
def _tree(mod: str) -> tuple[ast.Module, list[str]]:
    source = Path(importlib.import_module(mod).__file__).read_text()
    return ast.parse(source), source.splitlines()


def _constant_documented(mod: str, name: str) -> bool:
    """Whether the assignment of ``name`` in ``mod`` (or in the module it imports it from) has a
    ``#:`` comment above it or a string right below it."""
    tree, lines = _tree(mod)
    body = tree.body
    for i, node in enumerate(body):
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, ast.AnnAssign) else [])  # fmt: skip
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            above = lines[node.lineno - 2].strip() if node.lineno >= 2 else ""
            below = body[i + 1] if i + 1 < len(body) else None
            string_below = (isinstance(below, ast.Expr) and isinstance(below.value, ast.Constant)
                            and isinstance(below.value.value, str))  # fmt: skip
            return above.startswith("#:") or string_below
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _constant_documented(node.module, alias.name)
    return False


def _made_up(cls: type) -> bool:
    """The docstring ``@dataclass`` and ``NamedTuple`` write for a class that has none."""
    doc = cls.__doc__ or ""
    return not doc.strip() or doc.startswith(f"{cls.__name__}(")


def undocumented(names: list[tuple[str, str]]) -> list[str]:
    """The public names without a docstring of their own."""
    missing = []
    for mod, name in names:
        if name == "__version__":
            continue  # a version string
        obj = getattr(importlib.import_module(mod), name)
        if inspect.isclass(obj):
            ok = not _made_up(obj)
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.ismodule(obj):
            ok = bool((obj.__doc__ or "").strip())
        else:
            ok = _constant_documented(mod, name)
        if not ok:
            missing.append(f"{mod}.{name}")
    return missing


def test_every_public_name_has_a_docstring():
    names = public_names()
    assert len(names) > 300  # the walk found the package
    missing = undocumented(names)
    assert missing == [], f"{len(missing)} of {len(names)} public names have no docstring"


def test_the_checker_sees_a_missing_docstring():
    """Negative control of the checker: a class without a docstring, a dataclass and a
    NamedTuple with only their made-up ones, and an undocumented constant are all reported."""
    from dataclasses import dataclass
    from typing import NamedTuple

    class Bare:
        pass

    @dataclass
    class Data:
        x: int

    class Pair(NamedTuple):
        a: int

    assert _made_up(Bare) and _made_up(Data) and _made_up(Pair)
    assert not _made_up(flowmc.FlowConfig)
    assert _constant_documented("flowmc.mcmc.hmc", "OMELYAN_LAMBDA")
    assert _constant_documented("flowmc.analysis", "SCALAR_KEYS")  # re-exported: followed
    assert not _constant_documented("flowmc.mcmc.hmc", "no_such_name")


def _directives() -> dict[str, list[str]]:
    """``{page: [module, ...]}`` of the ``::: module`` directives of docs/api/."""
    return {p.name: re.findall(r"^::: ([\w.]+)$", p.read_text(), re.M)
            for p in sorted((DOCS / "api").glob("*.md"))}  # fmt: skip


def test_every_public_module_has_a_page():
    """Each public module with an ``__all__`` is rendered on exactly one API page; every
    directive names a module that exists."""
    rendered = [m for mods in _directives().values() for m in mods]
    assert len(rendered) == len(set(rendered)), "a module is rendered twice"
    for mod in rendered:
        assert importlib.util.find_spec(mod) is not None, mod
    public = {m for m in _modules() if hasattr(importlib.import_module(m), "__all__")
              and not any(p.startswith("_") for p in m.split("."))}  # fmt: skip
    assert public - set(rendered) == set()


def test_api_index_lists_the_top_level_names():
    text = (DOCS / "api" / "index.md").read_text()
    listed = re.findall(r"^\| \[`(\w+)`\]\[([\w.]+)\] \| `([\w.]+)` \|$", text, re.M)
    assert [n for n, _, _ in listed] == [n for n in flowmc.__all__ if n != "__version__"]
    for name, path, mod in listed:
        obj = getattr(flowmc, name)
        assert path == f"{obj.__module__}.{obj.__qualname__}" and mod == obj.__module__


def _nav_pages() -> list[str]:
    nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:\n", 1)[1].split("\n\n", 1)[0]
    return re.findall(r":\s+(\S+\.(?:md|ipynb))$", nav, re.M)


def test_nav_lists_every_page():
    pages = _nav_pages()
    assert len(pages) == len(set(pages))
    for page in pages:
        assert (DOCS / page).is_file(), page
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert on_disk - set(pages) == set()
    assert "tutorial.ipynb" in pages


# ---------------------------------------------------------------------------- the strict build
CONTROL_PKG = '''
"""A package for the negative controls of the strict build."""

__all__ = ["good", "CONSTANT"{extra}]

#: A documented constant.
CONSTANT = 1


def good(x: int) -> int:
    """Return ``x``, with maths :math:`x^2 \\\\geq 0` and a link to :data:`CONSTANT`.

    Args:
        x: a number.

    Returns:
        The number.
    """
    return x
{code}
'''
NOTEBOOK = {"cells": [{"cell_type": "markdown", "metadata": {},
                       "source": "# A notebook\n\n{link}"}],
            "metadata": {}, "nbformat": 4, "nbformat_minor": 5}  # fmt: skip
CONTROLS = {  # label: (extra __all__ names, extra code, link of the page, link of the notebook)
    "clean": ("", "", "[home](index.md)", "[home](index.md#home)"),
    "broken link": ("", "", "[nowhere](missing.md)", ""),
    "broken link in the notebook": ("", "", "", "[nowhere](missing.md)"),
    "no docstring": (', "bare"', "\n\ndef bare(x):\n    return x\n", "", ""),
    "does not render": (', "bad"', '''

def bad(x: int) -> int:
    """A docstring whose Args section does not parse.

    Args:
        x, y: two names in one entry.
    """
    return x
''', "", ""),
    "stale reference": (', "stale"', '''

def stale() -> None:
    """Points at :func:`controlpkg.no_such_function`."""
''', "", ""),
}


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None
                    or importlib.util.find_spec("mkdocstrings_handlers") is None,
                    reason='needs the docs extra: pip install -e ".[docs]"')  # fmt: skip
def test_strict_build_fails_on_each_defect(tmp_path):
    """The site's own configuration, on a site of two pages and a notebook: the clean one
    builds, and each defect alone makes ``mkdocs build --strict`` fail and name it."""
    config = (ROOT / "mkdocs.yml").read_text()
    head, rest = config.split("\nnav:\n", 1)
    config = (head + "\nnav:\n  - index.md\n  - api.md\n  - tutorial.ipynb\n\n"
              + rest.split("\n\n", 1)[1])  # fmt: skip
    config = config.replace("docs/_ext/", str(DOCS / "_ext") + "/")
    assert "strict: true" in config and "FlowmcDocstrings" in config and "hooks.py" in config
    results = {}
    for label, (extra, code, link, nb_link) in CONTROLS.items():
        site = tmp_path / label.replace(" ", "_")
        (site / "docs").mkdir(parents=True)
        (site / "controlpkg").mkdir()
        (site / "controlpkg" / "__init__.py").write_text(
            textwrap.dedent(CONTROL_PKG).format(extra=extra, code=code))
        (site / "docs" / "index.md").write_text(f"# Home\n\n{link}\n")
        (site / "docs" / "api.md").write_text("# API\n\n::: controlpkg\n")
        (site / "docs" / "tutorial.ipynb").write_text(
            json.dumps(NOTEBOOK).replace("{link}", nb_link))
        (site / "mkdocs.yml").write_text(config)
        proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict"], cwd=site,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        results[label] = (proc.returncode, proc.stdout + proc.stderr)
    code, log = results.pop("clean")
    assert code == 0, log[-3000:]
    expected = {
        "broken link": "contains a link 'missing.md'",
        "broken link in the notebook": "'tutorial.ipynb' contains a link 'missing.md'",
        "no docstring": "controlpkg.bare is public (in __all__) and has no docstring",
        "does not render": "Parameter 'x, y' does not appear in the function signature",
        "stale reference": "controlpkg.no_such_function` does not exist",
    }
    for label, (code, log) in results.items():
        assert code != 0, f"{label}: the strict build passed\n{log[-3000:]}"
        assert expected[label] in log, f"{label}:\n{log[-3000:]}"
