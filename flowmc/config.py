"""Command-line options, TOML configs and the resolved configuration of a run.

Precedence: built-in defaults < ``--config FILE.toml`` < explicit command-line flags. The resolved
options are returned as a plain dict and written into every output (checkpoint or ensemble), so
each file says how it was made.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["add_common_options", "parse_with_config", "resolve_device", "resolve_dtype", "DTYPES"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def add_common_options(p: argparse.ArgumentParser) -> None:
    """Options every subcommand takes, with the same spellings everywhere."""
    p.add_argument("--config", type=Path, default=None, help="TOML file with any of the options")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="floating point type"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_with_config(
    parser: argparse.ArgumentParser, argv: list[str] | None, section: str | None = None
) -> argparse.Namespace:
    """Parse ``argv``; if ``--config`` is given, its keys become the parser's defaults.

    Keys may sit at top level or under ``[section]``; dashes and underscores are equivalent.

    Raises:
        SystemExit: (through argparse) on an unknown key in the config file.
    """
    args, _ = parser.parse_known_args(argv)
    cfg_path = getattr(args, "config", None)
    if cfg_path is not None:
        try:
            data = tomllib.loads(Path(cfg_path).read_text())
        except FileNotFoundError:
            parser.error(f"--config: file not found: {cfg_path}")
        except tomllib.TOMLDecodeError as exc:
            parser.error(f"--config: {cfg_path} is not valid TOML: {exc}")
        if section is not None and isinstance(data.get(section), dict):
            data = {**{k: v for k, v in data.items() if not isinstance(v, dict)}, **data[section]}
        known = {a.dest for a in parser._actions}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict):
                continue
            dest = key.replace("-", "_")
            if dest not in known:
                parser.error(f"--config: unknown option {key!r} in {cfg_path}")
            values[dest] = value
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def resolved(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved options as a JSON-serialisable dict."""
    out = {}
    for k, v in vars(args).items():
        if k in ("func",) or callable(v):
            continue
        out[k] = str(v) if isinstance(v, Path) else v
    return out


def resolve_device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"Expected --dtype in {sorted(DTYPES)}; got {name!r}")
    return DTYPES[name]


def apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))
