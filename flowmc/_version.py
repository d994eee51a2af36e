"""The running flowmc's version, for the provenance that every written file records."""

from __future__ import annotations

import sys

__all__ = ["flowmc_version"]


def flowmc_version() -> str:
    """``flowmc.__version__`` as it is now (a test may patch it), without importing the package.

    Every module of flowmc is loaded after its package, so ``flowmc`` is in :data:`sys.modules`;
    reading it from there keeps the modules that record the version free of an import of the
    package itself (an import cycle).
    """
    mod = sys.modules.get("flowmc")
    version = getattr(mod, "__version__", None)
    if version is not None:
        return str(version)
    try:  # pragma: no cover - only when this file is loaded outside the package
        from importlib.metadata import version as _v

        return _v("flowmc-lattice")
    except Exception:  # pragma: no cover
        return "unknown"
