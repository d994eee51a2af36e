"""Command-line options, TOML configs and the resolved configuration of a run.

Precedence: built-in defaults < ``--config FILE.toml`` < explicit command-line flags. The resolved
options are returned as a plain dict and written into every output (checkpoint or ensemble), so
each file says how it was made.

Options are typed once, in their ``argparse`` declaration, and TOML values are checked against
the same declaration (:func:`parse_with_config`): a flag (``store_true``) needs a TOML boolean,
an integer option a TOML integer (``2.5`` is an error, not ``2``), a float option a number, a
path or text option a string, and ``choices`` and ranges (:class:`IntRange`) apply to both.
Sections must be subcommand names. Every violation is one ``ValueError`` naming the file, the
key, what was expected and what was given.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flowmc._checks import is_int, is_real

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "add_common_options",
    "given",
    "parse_with_config",
    "refuse_unused",
    "resolve_device",
    "resolve_dtype",
    "DTYPES",
    "IntRange",
    "int_list",
]

#: The ``--dtype`` choices: name -> torch dtype.
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Attribute of a parsed namespace: the options the user gave (:func:`given`).
GIVEN = "_given"


class IntRange:
    """An ``argparse`` type: an integer in ``[minimum, maximum]``, also applied to TOML values.

    Args:
        minimum: smallest allowed value (``None``: unbounded).
        maximum: largest allowed value (``None``: unbounded).
        why: reason for the minimum, appended to the error message.
    """

    def __init__(self, minimum: int | None = None, maximum: int | None = None, why: str = ""):
        self.minimum, self.maximum, self.why = minimum, maximum, why
        self.__name__ = "integer"  # argparse names the type in its messages

    def describe(self) -> str:
        if self.minimum is not None and self.maximum is not None:
            return f"an integer in [{self.minimum}, {self.maximum}]"
        if self.minimum is not None:
            return f"an integer >= {self.minimum}"
        if self.maximum is not None:
            return f"an integer <= {self.maximum}"
        return "an integer"

    def check(self, value: int) -> int:
        """Return ``value`` or raise ``ValueError`` if it is out of range."""
        if (self.minimum is not None and value < self.minimum) or (
            self.maximum is not None and value > self.maximum
        ):
            why = f" ({self.why})" if self.why else ""
            raise ValueError(f"expected {self.describe()}{why}; got {value}")
        return value

    def __call__(self, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
        try:
            return self.check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    def __repr__(self) -> str:
        return f"IntRange({self.minimum}, {self.maximum})"


def int_list(text: str) -> tuple[int, ...]:
    """An ``argparse`` type: comma-separated integers (``"8,8"``); TOML may give a list."""
    try:
        return tuple(int(h) for h in str(text).split(",") if h.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers; got {text!r}"
        ) from None


int_list.__name__ = "integer list"

POSITIVE = IntRange(1)
NON_NEGATIVE = IntRange(0)


def add_common_options(p: argparse.ArgumentParser) -> None:
    """Options every subcommand takes, with the same spellings everywhere."""
    p.add_argument("--config", type=Path, default=None, help="TOML file with any of the options")
    p.add_argument("--seed", type=IntRange(0, 2**63 - 1), default=0,
                   help="random seed, >= 0 (default 0)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps "
                   "(default cpu)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="floating point type"
    )
    p.add_argument("--threads", type=POSITIVE, default=None,
                   help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------- TOML typing

_TOML_TYPE = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
              list: "an array", dict: "a table"}


def _toml_type(value: Any) -> str:
    return next((name for t, name in _TOML_TYPE.items() if type(value) is t),
                type(value).__name__)


def _convert(action: argparse.Action, value: Any) -> Any:
    """Check a TOML ``value`` against ``action``'s declaration; return the converted value.

    Raises:
        ValueError: "expected ...; got ..." (without file and key; the caller adds them).
    """
    def want(expected: str) -> ValueError:
        return ValueError(f"expected {expected}; got {value!r} ({_toml_type(value)})")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                           argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise want("a boolean (true or false, without quotes)")
        return value
    if not isinstance(action, argparse._StoreAction):
        raise ValueError("is not an option a config file can set")
    if action.nargs in ("+", "*"):  # a list option (--L 8 16): a TOML array, or one value
        items = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not items:
            raise want("a non-empty array")
        one = copy.copy(action)
        one.nargs = None
        return [_convert(one, v) for v in items]
    t = action.type
    if t is int or isinstance(t, IntRange):
        if not is_int(value):
            raise want(t.describe() if isinstance(t, IntRange) else "an integer")
        if isinstance(t, IntRange):
            t.check(value)
    elif t is float:
        if not is_real(value):
            raise want("a number")
        value = float(value)
    elif t is int_list:
        if isinstance(value, list) and all(is_int(v) for v in value):
            value = tuple(value)
        elif isinstance(value, str):
            try:
                value = int_list(value)
            except argparse.ArgumentTypeError as e:
                raise ValueError(str(e)) from None
        else:
            raise want("a list of integers or a string like \"8,8\"")
    elif t is None or t is str or t is Path:
        if not isinstance(value, str):
            raise want("a string (a path)" if t is Path else "a string")
        value = Path(value) if t is Path else value
    else:  # another callable parses the value (a string, or a number it accepts)
        if not (isinstance(value, str) or is_real(value)):
            raise want("a string or a number")
        try:
            value = t(value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            raise ValueError(str(e)) from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(repr(c) for c in action.choices)
        raise ValueError(f"expected one of {choices}; got {value!r}")
    return value


def _read_toml(path: Path) -> dict[str, Any]:
    where = f"--config {str(path)!r}"
    if not path.exists():
        raise ValueError(f"{where}: file not found")
    if path.is_dir():
        raise ValueError(f"{where}: is a directory, expected a TOML file")
    if not path.is_file():
        raise ValueError(f"{where}: is not a regular file, expected a TOML file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{where}: is not UTF-8 text, expected a TOML file") from None
    except OSError as e:
        raise ValueError(f"{where}: cannot be read ({e.strerror or e})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{where}: is not valid TOML: {exc}") from None


def _values(
    parser: argparse.ArgumentParser, items: Mapping[str, Any], where: str
) -> dict[str, Any]:
    """Validate ``items`` (TOML key -> value) against ``parser``; return dest -> value."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    positional = {a.dest for a in parser._actions if not a.option_strings}
    out: dict[str, Any] = {}
    for key, value in items.items():
        dest = key.replace("-", "_")
        if dest in positional:
            raise ValueError(f"{where}: {key!r} is a positional argument; give it on the "
                             "command line")
        if dest not in actions or dest in ("config", "help", "version"):
            raise ValueError(f"{where}: unknown option {key!r} for '{parser.prog}'")
        try:
            out[dest] = _convert(actions[dest], value)
        except ValueError as e:
            raise ValueError(f"{where}: key {key!r}: {e}") from None
    return out


def parse_with_config(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    section: str | None = None,
    sections: Mapping[str, argparse.ArgumentParser] | None = None,
) -> argparse.Namespace:
    """Parse ``argv``; if ``--config`` is given, its checked keys become the parser's defaults.

    Keys may sit at top level (they apply to the running command and must be its options) or
    under ``[section]``; dashes and underscores are equivalent. Every value is checked against
    the option's declared type, choices and range, in every section of the file, once.

    Args:
        parser: the running subcommand's parser.
        argv: its arguments.
        section: its name (the TOML section it reads).
        sections: every subcommand's parser by name; tables must be among these names and are
            all validated. Without it, only ``section`` is known.

    Raises:
        ValueError: on an unreadable file, an unknown section or key, or a value of the wrong
            type or out of range (one line: file, key, expected, got).
        SystemExit: (through argparse) on bad command-line flags.
    """
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # a typo (--fllip) or an option of another command: never dropped silently
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    cfg_path = getattr(args, "config", None)
    if cfg_path is None:
        setattr(args, GIVEN, _explicit(parser, argv))
        return args
    data = _read_toml(Path(cfg_path))
    known = dict(sections or {})
    if section is not None:
        known.setdefault(section, parser)
    where = f"--config {str(cfg_path)!r}"
    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    values = _values(parser, top, where)
    for name, table in data.items():
        if not isinstance(table, dict):
            continue
        if name not in known:
            raise ValueError(
                f"{where}: unknown section [{name}]; expected one of "
                f"{', '.join(f'[{s}]' for s in sorted(known))}"
            )
        nested = [k for k, v in table.items() if isinstance(v, dict)]
        if nested:
            raise ValueError(f"{where}: [{name}] has a nested table {nested[0]!r}; options "
                             "are plain keys")
        checked = _values(known[name], table, f"{where} [{name}]")
        if name == section:
            values.update(checked)
    parser.set_defaults(**values)
    args = parser.parse_args(argv)
    setattr(args, GIVEN, _explicit(parser, argv) | set(values))
    return args


def _explicit(parser: argparse.ArgumentParser, argv: list[str] | None) -> frozenset[str]:
    """The destinations ``argv`` sets on the command line (a value equal to the default
    included): parsed into a namespace that holds a sentinel for every option."""
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions
                               if a.dest != argparse.SUPPRESS})  # fmt: skip
    parser.parse_known_args(argv, ns)
    return frozenset(k for k, v in vars(ns).items() if v is not unset)


def given(args: argparse.Namespace, dest: str) -> bool:
    """Whether the user set option ``dest`` (on the command line or in ``--config``), whatever
    its value; ``False`` for a namespace that was not parsed by :func:`parse_with_config`."""
    return dest in getattr(args, GIVEN, ())


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def refuse_unused(args: argparse.Namespace, flags: list[str], says: str) -> None:
    """Refuse options that do nothing in the chosen mode, in one line that says why.

    Args:
        args: the parsed options.
        flags: the options (``"--flip"``), in the order the message lists them.
        says: the rest of the sentence for one option, starting with ``needs``, ``has`` or
            ``does`` (``"needs --hmc-traj K >= 1 (the hybrid)"``); for several options its first
            word becomes ``need``, ``have`` or ``do``.

    Raises:
        ValueError: ``--a, --b need MODE`` if the user gave any of ``flags`` (on the command
            line or in ``--config``, whatever the value).
    """
    got = [f for f in flags if given(args, _dest(f))]
    if not got:
        return
    if len(got) > 1:
        head, _, tail = says.partition(" ")
        says = f"{_PLURAL.get(head, head)} {tail}"
    raise ValueError(f"{', '.join(got)} {says}")


_PLURAL = {"needs": "need", "has": "have", "does": "do"}


def resolved(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved options as a JSON-serialisable dict."""
    out = {}
    for k, v in vars(args).items():
        if k in ("func", GIVEN) or callable(v):
            continue
        out[k] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    return out


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``), checked to exist.

    Raises:
        ValueError: on another device type (e.g. ``meta``) or one this machine lacks.
    """
    expected = "Expected --device cpu, cuda, cuda:N or mps"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{expected}; got {name!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s)")
        return dev
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"--device {name}: MPS is not available on this machine")
        return dev
    raise ValueError(f"{expected}; got {name!r} (flowmc cannot compute on {dev.type!r})")


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` name (a key of :data:`DTYPES`).

    Raises:
        ValueError: for any other name.

    Examples:
        >>> resolve_dtype("float64")
        torch.float64
    """
    if name not in DTYPES:
        raise ValueError(f"Expected --dtype in {sorted(DTYPES)}; got {name!r}")
    return DTYPES[name]


def apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))
