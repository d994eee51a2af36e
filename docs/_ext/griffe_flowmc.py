"""Griffe extension of the docs site: flowmc's docstrings (Google style, reST roles) as Markdown.

flowmc's docstrings are written for ``help()`` and Sphinx-style readers: Google sections, maths
in ``:math:`...``` and ``.. math::``, cross-references in ``:func:``, ``:class:``, ``:meth:``,
``:mod:``, ``:data:`` and ``:attr:``, and ``::`` literal blocks. mkdocstrings renders Markdown,
so this extension rewrites each docstring once the package is loaded:

* ``:math:`x``` becomes ``\\(x\\)`` and a ``.. math::`` block becomes ``$$ ... $$`` (both
  rendered by ``pymdownx.arithmatex`` and MathJax);
* a role naming an object of the site becomes an autorefs link (``[title][path]``); one naming an
  object outside flowmc (``torch.Generator``) becomes inline code;
* ``text::`` followed by an indented block becomes ``text:`` and a fenced ``text`` block;
* an ``Example:`` section is read as ``Examples:`` (doctests, not an admonition).

It also makes the build fail (a warning, an error under ``mkdocs build --strict``) where a name of
an ``__all__`` has no docstring, and where a role names a flowmc object that does not exist or is
not on the site (a stale path). Loaded by ``mkdocs.yml`` (``extensions:`` of the python handler)
after ``griffe_sphinx``, which turns the ``#:`` comments above constants into docstrings.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import griffe

logger = logging.getLogger("mkdocs.plugins.flowmc_docs")  # under mkdocs: a warning fails --strict

ROLE_RE = re.compile(r":(func|class|meth|mod|data|attr|exc|obj):`([^`]+)`")
EXAMPLE_RE = re.compile(r"^([ \t]*)Example:[ \t]*$", re.M)
MATH_ROLE_RE = re.compile(r":math:`([^`]+)`", re.S)
MATH_DIRECTIVE_RE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<inline>.*)$")
#: How these roles were written (kept for the report of the extension at the end of a build).
STATS: dict[str, int] = {"math": 0, "linked": 0, "code": 0, "blocks": 0}


def _is_private(path: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in path.split("."))


def _lookup(pkg: griffe.Module, path: str) -> griffe.Object | griffe.Alias | None:
    """The object at a dotted ``path`` under ``pkg`` (following aliases), or None."""
    if path == pkg.path:
        return pkg
    if not path.startswith(pkg.path + "."):
        return None
    obj: Any = pkg
    for part in path[len(pkg.path) + 1 :].split("."):
        try:
            obj = obj.final_target if obj.is_alias else obj
            obj = obj.members[part]
        except (KeyError, AttributeError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
    return obj


def _canonical(obj: griffe.Object | griffe.Alias) -> str:
    try:
        return obj.final_target.path if obj.is_alias else obj.path
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return obj.path


def _has_doc(obj: griffe.Object | griffe.Alias) -> bool:
    try:
        target = obj.final_target if obj.is_alias else obj
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False
    return bool(target.docstring and target.docstring.value.strip())


def rendered_paths(pkg: griffe.Module) -> set[str]:
    """Canonical paths of everything the API pages show: every public module with an
    ``__all__``, each name in it, and the documented public members of those classes."""
    paths: set[str] = set()

    def add_members(obj: griffe.Object) -> None:
        for name, member in obj.members.items():
            if name.startswith("_") or member.is_alias or not _has_doc(member):
                continue
            paths.add(member.path)
            if member.is_class:
                add_members(member)

    for mod in _modules(pkg):
        if _is_private(mod.path):
            continue
        paths.add(mod.path)  # every public module has a section (its docstring at least)
        for name in _exports(mod):
            member = mod.members.get(name)
            if member is None:
                continue
            paths.add(_canonical(member))
            target = member.final_target if member.is_alias else member
            if target.is_class:
                add_members(target)
    return paths


def _modules(mod: griffe.Module) -> list[griffe.Module]:
    out = [mod]
    for sub in mod.modules.values():
        if not sub.is_alias:
            out.extend(_modules(sub))
    return out


def _exports(mod: griffe.Module) -> list[str]:
    return [e if isinstance(e, str) else e.name for e in (mod.exports or [])]


class FlowmcDocstrings(griffe.Extension):
    """Rewrites flowmc's reST roles and math as Markdown, and checks every public docstring."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Runs once a whole package is loaded (and griffe_sphinx has attached ``#:`` docs)."""
        self.pkg = pkg
        self.rendered = rendered_paths(pkg)
        for mod in _modules(pkg):
            self._check_exports(mod)
            self._walk(mod)

    def _check_exports(self, mod: griffe.Module) -> None:
        for name in _exports(mod):
            member = mod.members.get(name)
            if member is None:
                logger.warning(f"{mod.path}.__all__ names {name!r}, which it does not define")
            elif not _has_doc(member) and name != "__version__":
                logger.warning(f"{mod.path}.{name} is public (in __all__) and has no docstring")

    def _walk(self, obj: griffe.Object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = self.translate(obj.docstring.value, obj)
        for member in obj.members.values():
            if not member.is_alias and not member.is_module:
                self._walk(member)

    # ------------------------------------------------------------------------ the translation
    def translate(self, text: str, obj: griffe.Object) -> str:
        """The docstring ``text`` of ``obj`` as Markdown."""
        # "Example:" is an admonition to griffe; flowmc means the Examples section (doctests)
        text = EXAMPLE_RE.sub(r"\1Examples:", text)
        text = self._math_blocks(text)
        text = self._literal_blocks(text)

        def math(m: re.Match) -> str:
            STATS["math"] += 1
            return r"\(" + " ".join(m.group(1).split()) + r"\)"

        text = MATH_ROLE_RE.sub(math, text)
        return ROLE_RE.sub(lambda m: self._role(m.group(1), m.group(2), obj), text)

    def _math_blocks(self, text: str) -> str:
        lines, out, i = text.split("\n"), [], 0
        while i < len(lines):
            m = MATH_DIRECTIVE_RE.match(lines[i])
            if m is None:
                out.append(lines[i])
                i += 1
                continue
            indent, body = m.group("indent"), [m.group("inline").strip()] if m.group(
                "inline").strip() else []  # fmt: skip
            i += 1
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(indent)):
                body.append(lines[i].strip())
                i += 1
            while body and not body[-1]:
                body.pop()
            trailing = [ln for ln in body if ln]
            STATS["blocks"] += 1
            if out and out[-1].strip():
                out.append("")
            out += [f"{indent}$$", *(f"{indent}{ln}" for ln in trailing), f"{indent}$$", ""]
        return "\n".join(out)

    def _literal_blocks(self, text: str) -> str:
        lines, out, i = text.split("\n"), [], 0
        while i < len(lines):
            line = lines[i]
            if line.rstrip().endswith("::") and not line.strip().startswith(".."):
                j = i + 1
                while j < len(lines) and not lines[j].strip():
                    j += 1
                if j < len(lines) and _indent(lines[j]) > _indent(line):
                    indent = " " * _indent(line)
                    stem = line.rstrip()[:-2].rstrip()
                    out += [stem + ":" if stem else "", "", f"{indent}```text"]
                    k = j
                    while k < len(lines) and (not lines[k].strip() or
                                              _indent(lines[k]) > _indent(line)):  # fmt: skip
                        k += 1
                    while k > j and not lines[k - 1].strip():
                        k -= 1
                    block = lines[j:k]
                    cut = min(_indent(ln) for ln in block if ln.strip())
                    out += [indent + ln[cut:] if ln.strip() else "" for ln in block]
                    out += [f"{indent}```"]
                    i = k
                    continue
            out.append(line)
            i += 1
        return "\n".join(out)

    def _role(self, role: str, target: str, obj: griffe.Object) -> str:
        target = target.strip()
        short = target.startswith("~")
        path = target.lstrip("~").removesuffix("()")
        title = path.rsplit(".", 1)[-1] if short else path
        resolved = self._resolve(path, obj)
        # a member without a section of its own (a dataclass field, a dunder) links to the
        # nearest documented object that holds it: its class, or its module
        anchor = resolved
        while anchor and anchor not in self.rendered and "." in anchor:
            anchor = anchor.rsplit(".", 1)[0]
        if resolved is not None and anchor in self.rendered and anchor != self.pkg.path:
            STATS["linked"] += 1
            return f"[`{title}`][{anchor}]"
        if resolved is None and path.startswith(self.pkg.path + ".") or (
            resolved and not _is_private(resolved)
        ):
            where = f"{obj.path} ({obj.relative_filepath}:{obj.lineno})"
            why = "is not on the API pages" if resolved else "does not exist"
            logger.warning(f"{where}: :{role}:`{target}` {why}")
        STATS["code"] += 1
        return f"`{title}`"

    def _resolve(self, path: str, obj: griffe.Object) -> str | None:
        """The canonical path of the flowmc object that ``path`` names from ``obj``'s scope."""
        first, _, rest = path.partition(".")
        candidates = [path]
        scope: Any = obj
        while scope is not None:
            try:
                base = scope.resolve(first)
            except (griffe.NameResolutionError, griffe.AliasResolutionError):
                base = None
            if base:
                candidates.insert(0, base + ("." + rest if rest else ""))
                break
            scope = scope.parent
        for cand in candidates:
            found = _lookup(self.pkg, cand)
            if found is not None:
                return _canonical(found)
        return None


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())
