"""The ``flowmc`` command: ``flowmc train|eval|sample|analyze|hmc|compare ...``.

Each subcommand lives in its own module under :mod:`flowmc.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import flowmc
import flowmc.commands
from flowmc.config import parse_with_config

__all__ = ["main", "build_parser"]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and a dict of the subcommand parsers by name."""
    parser = argparse.ArgumentParser(
        prog="flowmc",
        description="Flow-assisted MCMC for lattice phi^4 theory: train flows, sample exact "
        "ensembles by flow Metropolis-Hastings or HMC, analyse and compare them.",
    )
    parser.add_argument("--version", action="version", version=f"flowmc {flowmc.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(flowmc.commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"flowmc.commands.{info.name}").register(sub)
    return parser, dict(sub.choices)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    if not argv or argv[0] not in commands:
        parser.parse_args(argv or ["--help"])  # prints help / version / the usage error
        return 0
    name = argv[0]
    args = parse_with_config(commands[name], argv[1:], section=name)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"flowmc {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
