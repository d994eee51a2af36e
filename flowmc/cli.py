"""The ``flowmc`` command: ``flowmc train|eval|sample|analyze|hmc|compare|scan ...``.

Each subcommand lives in its own module under :mod:`flowmc.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``.

Exit codes: 0 success; 2 a user error, printed as one line ``flowmc CMD: error: ...`` (bad
options or config, a missing or unsuitable file, a full disk); 130 Ctrl-C, printed as one line
that says what the output file holds and how to continue. Anything else is a bug and keeps its
traceback (see :func:`is_user_error`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from pathlib import Path

import flowmc
import flowmc.commands
from flowmc.config import parse_with_config

__all__ = ["main", "build_parser", "is_user_error"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(flowmc.__file__))


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (exit 2), like every user error.

    Options must be spelled in full: an abbreviation (``--thread`` for ``--threads``) is an
    unrecognized argument, so that a typo, or an option a later version adds, never changes
    which option a command line sets.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and a dict of the subcommand parsers by name."""
    parser = _Parser(
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


def _raised_by_flowmc(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is flowmc's own code."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = os.path.abspath(tb.tb_frame.f_code.co_filename)
    return path.startswith(_PACKAGE_DIR + os.sep)


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` reports bad input or a bad environment (one line) rather than a bug.

    User errors are ``OSError`` (missing, locked or unsuitable files, full disks), memory
    exhaustion, and the ``ValueError`` / ``RuntimeError`` that flowmc raises *itself* with a
    message written for the user ("Expected ...; got ..."). The same types raised inside torch,
    numpy or h5py, and every other exception, are bugs: the caller re-raises them so that the
    traceback is shown.
    """
    if isinstance(exc, (OSError, MemoryError)):
        return True
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return isinstance(exc, (ValueError, RuntimeError)) and _raised_by_flowmc(exc)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def interrupted_message(args: argparse.Namespace | None) -> str:
    """What Ctrl-C left behind in ``args.out`` and how to continue, in one line."""
    hint = getattr(args, "interrupted", None) if args is not None else None
    if callable(hint):  # a command's own message (e.g. flowmc scan: a directory)
        return hint(args)
    out = getattr(args, "out", None) if args is not None else None
    if out is None:
        return "interrupted"
    out = Path(out)
    from flowmc.io.ensemble import last_commit, open_ensemble
    from flowmc.parallel import torchrun_env

    env = torchrun_env()
    if env is not None and env[1] > 1 and hasattr(args, "chains"):  # a sharded run: this rank's
        from flowmc.io.join import shard_path

        out = shard_path(out, env[0], env[1])

    left = last_commit(out)
    if left is not None and not left[1]:
        return (
            f"interrupted before the first commit; nothing was written to {str(out)!r} (an "
            "existing file there is unchanged); run the command again"
        )
    if not out.exists():
        return (
            f"interrupted before the first commit; nothing was written to {str(out)!r}; run "
            "the command again"
        )
    try:
        with open_ensemble(out) as ens:
            n = ens.n
        return (
            f"interrupted; {str(out)!r} holds n = {n} committed rows per chain; continue with "
            "--resume"
        )
    except (ValueError, OSError):
        pass
    try:
        from flowmc.io.checkpoint import load_checkpoint

        ckpt = load_checkpoint(out, require_trainer_state=True)
        step = ckpt["trainer_state"]["step"]
        return (
            f"interrupted; {str(out)!r} holds the checkpoint of step {step}; continue with "
            "--resume"
        )
    except (ValueError, OSError):
        return f"interrupted; see {str(out)!r}"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun -m flowmc -- CMD ...` passes the separator on
        argv = argv[1:]
    parser, commands = build_parser()
    if not argv or argv[0] not in commands:
        parser.parse_args(argv or ["--help"])  # prints help / version / the usage error
        return 0
    name = argv[0]
    args = None
    try:
        args = parse_with_config(commands[name], argv[1:], section=name, sections=commands)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _close_writers()
        if sys.stderr.isatty():  # end a progress bar's line
            sys.stderr.write("\n")
        print(f"flowmc {name}: {interrupted_message(args)}", file=sys.stderr)
        return 130
    except Exception as exc:
        _close_writers()
        if not is_user_error(exc):
            raise
        print(f"flowmc {name}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _close_writers() -> None:
    """Close ensemble writers a failed command left open (temporary files go, names free)."""
    from flowmc.io.ensemble import EnsembleWriter

    EnsembleWriter.close_all()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
