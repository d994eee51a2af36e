"""The module paths of flowmc before its subpackages, kept working as aliases.

Until version 0.2 every module sat directly in ``flowmc/`` (``flowmc.run``, ``flowmc.hmc``,
``flowmc.ensemble``, ...). Each old name in :data:`ALIASES` now stands for its module in a
subpackage: ``import flowmc.run`` gives *the same module object* as ``import flowmc.sampling.run``
(registered under both names in :data:`sys.modules`, and as the attribute ``flowmc.run``), so
``from flowmc.run import RunConfig``, ``flowmc.run._private``, monkeypatching and ``isinstance``
behave exactly as before. A name not in the table is not found (``ModuleNotFoundError``).

flowmc's own code, tests and scripts use the new paths; the aliases are for users.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

__all__ = ["ALIASES", "install", "module_attribute"]

#: Old module name -> its module now.
ALIASES: dict[str, str] = {
    "flowmc.action": "flowmc.lattice.action",
    "flowmc.observables": "flowmc.lattice.observables",
    "flowmc.prior": "flowmc.flows.prior",
    "flowmc.nets": "flowmc.flows.nets",
    "flowmc.couplings": "flowmc.flows.couplings",
    "flowmc.splines": "flowmc.flows.splines",
    "flowmc.spectral": "flowmc.flows.spectral",
    "flowmc.flow": "flowmc.flows.flow",
    "flowmc.rng": "flowmc.mcmc.rng",
    "flowmc.kernel": "flowmc.mcmc.kernel",
    "flowmc.imh": "flowmc.mcmc.imh",
    "flowmc.hmc": "flowmc.mcmc.hmc",
    "flowmc.hybrid": "flowmc.mcmc.hybrid",
    "flowmc.durable": "flowmc.io.durable",
    "flowmc.safeio": "flowmc.io.safeio",
    "flowmc.ensemble": "flowmc.io.ensemble",
    "flowmc.checkpoint": "flowmc.io.checkpoint",
    "flowmc.shipped": "flowmc.io.shipped",
    "flowmc.interop": "flowmc.io.interop",
    "flowmc.train": "flowmc.training.train",
    "flowmc.recipes": "flowmc.training.recipes",
    "flowmc.workflow": "flowmc.training.workflow",
    "flowmc.adapt": "flowmc.training.adapt",
    "flowmc.evaluate": "flowmc.training.evaluate",
    "flowmc.distributed": "flowmc.training.distributed",
    "flowmc.run": "flowmc.sampling.run",
    "flowmc.samplers": "flowmc.sampling.samplers",
    "flowmc.shards": "flowmc.sampling.shards",
    "flowmc.autocorr": "flowmc.analysis.autocorr",
    "flowmc.diagnostics": "flowmc.analysis.diagnostics",
    "flowmc.compare": "flowmc.analysis.compare",
    "flowmc.crossing": "flowmc.analysis.crossing",
    "flowmc.free_energy": "flowmc.analysis.free_energy",
}


class _AliasLoader(importlib.abc.Loader):
    """Loads an old name as the already imported module it stands for."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self._spec = module.__spec__  # the import system sets __spec__ to the alias's; undone below
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec  # the module keeps its own spec (name, origin, loader)


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds the old names of :data:`ALIASES` (and nothing else)."""

    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = ALIASES.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install() -> None:
    """Put the alias finder first on :data:`sys.meta_path` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())


def module_attribute(package: ModuleType, name: str) -> ModuleType:
    """``flowmc.<name>`` for an old module name (the package's ``__getattr__``).

    Raises:
        AttributeError: if ``name`` is not an old module name.
    """
    full = f"{package.__name__}.{name}"
    if full not in ALIASES:
        raise AttributeError(f"module {package.__name__!r} has no attribute {name!r}")
    return importlib.import_module(full)
