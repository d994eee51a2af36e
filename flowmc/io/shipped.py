"""The trained flows shipped with flowmc, found by name in a wheel or in a checkout.

The checkpoints (``NAME.pt``) and their model cards (``NAME.md``) live in the repository's
top-level ``data/`` folder. A wheel carries the same files as package data ``flowmc/data/``
(``pyproject.toml`` maps the package ``flowmc.data`` to the folder ``data/``). :func:`data_dir`
looks in the installed package first (:mod:`importlib.resources`), then in the source checkout
next to the ``flowmc/`` folder (editable installs and plain checkouts).

Example:
    >>> import flowmc
    >>> "phi4_L8_m2-4_lam8" in flowmc.shipped_models()
    True
    >>> model = flowmc.load_model("phi4_L8_m2-4_lam8")  # a shipped name works as a path
    >>> model.path == flowmc.shipped_model_path("phi4_L8_m2-4_lam8")
    True
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_MODEL",
    "data_dir",
    "shipped_models",
    "shipped_model_path",
    "resolve_model_path",
    "default_model_path",
]

#: Shipped flow (file name) for each action point ``(L, m2, lam)``.
DEFAULT_MODELS: dict[tuple[int, float, float], str] = {
    (8, -4.0, 8.0): "phi4_L8_m2-4_lam8.pt",
    (8, -4.0, 1.0): "phi4_L8_m2-4_lam1.pt",
    (16, -4.0, 4.25): "phi4_L16_m2-4_lam4.25_cnf.pt",
    (32, -4.0, 4.572): "phi4_L32_m2-4_lam4.572.pt",
}
#: The flow ``flowmc sample`` and ``flowmc eval`` use without ``--model``.
DEFAULT_MODEL: str = DEFAULT_MODELS[(8, -4.0, 8.0)]


def _candidates() -> list[Path]:
    """Where the shipped flows may be: installed package data, then the source checkout."""
    out = []
    installed = files("flowmc").joinpath("data")
    if isinstance(installed, Path):  # a zip import gives a zipfile.Path that torch cannot open
        out.append(installed)
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file():  # a checkout, not site-packages
        out.append(root / "data")
    return out


def data_dir() -> Path:
    """The folder holding the shipped flows and their model cards.

    Returns:
        ``flowmc/data`` of an installed wheel, else ``data/`` of the source checkout.

    Raises:
        FileNotFoundError: if neither exists (a broken installation).
    """
    candidates = _candidates()
    for cand in candidates:
        if cand.is_dir() and any(cand.glob("*.pt")):
            return cand
    looked = ", ".join(str(c) for c in candidates) or "nowhere"
    raise FileNotFoundError(
        f"cannot find flowmc's shipped flows (looked in {looked}); reinstall flowmc-lattice "
        "or pass --model explicitly"
    )


def shipped_models() -> dict[str, Path]:
    """Every shipped flow, by name.

    Returns:
        ``{name: checkpoint path}`` sorted by name, e.g. ``"phi4_L8_m2-4_lam8"`` maps to
        ``.../phi4_L8_m2-4_lam8.pt``. The model card of ``name`` is ``data_dir() / f"{name}.md"``.

    Raises:
        FileNotFoundError: if the shipped data cannot be found (see :func:`data_dir`).
    """
    return {p.stem: p for p in sorted(data_dir().glob("*.pt"))}


def shipped_model_path(name: str) -> Path:
    """The checkpoint file of a shipped flow.

    Args:
        name: its name, with or without ``.pt`` (e.g. ``"phi4_L8_m2-4_lam8"``).

    Returns:
        The path of the checkpoint, inside the installed package or the checkout.

    Raises:
        ValueError: if ``name`` is not a shipped flow.
        FileNotFoundError: if the shipped data cannot be found (see :func:`data_dir`).
    """
    stem = name[:-3] if name.endswith(".pt") else name
    models = shipped_models()
    if stem not in models:
        raise ValueError(
            f"Expected the name of a shipped flow ({', '.join(models)}); got {name!r}"
        )
    return models[stem]


def resolve_model_path(path: str | os.PathLike[str]) -> Path:
    """A checkpoint path, or the name of a shipped flow, as a path.

    An existing file always wins; a bare name (no folder part, with or without ``.pt``) that is
    not a file is looked up among the shipped flows.

    Args:
        path: a checkpoint file or a shipped flow's name.

    Returns:
        The checkpoint's path (``path`` unchanged if it is not a bare name; a missing file is
        reported when it is opened).

    Raises:
        FileNotFoundError: if ``path`` is a bare name that is neither a file nor a shipped flow.
    """
    p = Path(path)
    if p.exists() or p.name != str(path):
        return p
    try:
        return shipped_model_path(str(path))
    except ValueError:
        pass
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"model checkpoint not found: {path} ({exc})") from exc
    raise FileNotFoundError(
        f"model checkpoint not found: {path} (not a file, nor a shipped flow: "
        f"{', '.join(shipped_models())})"
    )


def default_model_path() -> Path:
    """The checkpoint ``flowmc sample``/``flowmc eval`` use without ``--model``."""
    return data_dir() / DEFAULT_MODEL
