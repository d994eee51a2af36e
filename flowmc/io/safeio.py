r"""Safe report outputs: know what a file is before replacing it, and replace it atomically.

A report (a JSON file or a PNG plot written by ``flowmc analyze``, ``compare``, ``eval``,
``train``, ...) may replace only **an earlier report of its own kind** — never an ensemble, a
checkpoint, a file of another kind, or anything flowmc did not write. :func:`sniff` tells what
an existing path is *without trusting it*:

* ``ensemble``: an HDF5 file whose root attribute ``format`` is ``"flowmc-ensemble"``;
* ``checkpoint``: a torch zip archive whose pickle starts with the key ``format`` and the value
  ``"flowmc-checkpoint"`` — read with :mod:`pickletools` (opcodes only), never unpickled;
* ``json-report``: a JSON object with a top-level ``"flowmc_report": "<kind>"``
  (:data:`REPORT_KEY`, written by :func:`flowmc.report.write_json`);
* ``png-report``: a PNG whose text chunk ``Software`` reads ``"flowmc <kind>"``
  (written by :func:`flowmc.report.save_figure` through matplotlib's ``metadata=``);
* ``csv-report``: a text file whose first line is ``# flowmc_report: <kind>``
  (:data:`CSV_PREFIX`, written by :func:`flowmc.report.write_csv`);
* ``directory``, ``special`` (device node, FIFO, socket, dangling link: never opened),
  ``missing``, or ``other``.

:func:`write_atomic` checks the destination (:func:`check_output`), writes a temporary file in
the same directory, fsyncs it, checks again, renames it over the destination and fsyncs the
directory (:func:`flowmc.io.durable.publish`): a reader sees either the old or the new report,
never a torn one. Every refusal is
one line naming the path and what it is (a :class:`FileExistsError` or :class:`ValueError`).
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import stat
import struct
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from flowmc.io import durable
from flowmc.io.formats import CHECKPOINT_FORMAT, ENSEMBLE_FORMAT

__all__ = [
    "REPORT_KEY",
    "CSV_PREFIX",
    "FileInfo",
    "sniff",
    "check_output",
    "write_atomic",
    "png_text",
]

#: Top-level key that marks a JSON file as a flowmc report; its value is the report kind.
REPORT_KEY = "flowmc_report"
#: Prefix of the PNG ``Software`` text of a flowmc plot; the rest is the plot kind.
PNG_SOFTWARE_PREFIX = "flowmc "
#: First line of a flowmc CSV report, up to the kind: ``# flowmc_report: <kind>``.
CSV_PREFIX = f"# {REPORT_KEY}: "

_HDF5_SIG = b"\x89HDF\r\n\x1a\n"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_ZIP_SIG = b"PK\x03\x04"
_MAX_JSON_BYTES = 256 * 2**20  # larger JSON files are not parsed (treated as foreign)
_MAX_PICKLE_OPS = 64
_MAX_PNG_CHUNKS = 4096
_MAX_PNG_TEXT = 2**16


class FileInfo(NamedTuple):
    """What :func:`sniff` found at a path.

    Attributes:
        kind: ``"missing"``, ``"directory"``, ``"special"``, ``"ensemble"``, ``"checkpoint"``,
            ``"json-report"``, ``"png-report"``, ``"csv-report"`` or ``"other"``.
        report: the report kind for ``json-report``/``png-report``/``csv-report`` (e.g.
            ``"analysis"``), else ``None``.
        what: a short description for messages, e.g. ``"a flowmc ensemble (HDF5)"``.
    """

    kind: str
    report: str | None
    what: str


def _is_hdf5(head: bytes, path: str) -> bool:
    if head.startswith(_HDF5_SIG):
        return True
    # the superblock may follow a user block of 512 * 2**k bytes
    with open(path, "rb") as fh:
        off = 512
        size = os.fstat(fh.fileno()).st_size
        while off + 8 <= size and off <= 2**30:
            fh.seek(off)
            if fh.read(8) == _HDF5_SIG:
                return True
            off *= 2
    return False


def _sniff_hdf5(path: str) -> FileInfo:
    try:
        import h5py

        with h5py.File(path, "r", locking=False) as f:
            fmt = f.attrs.get("format")
    except Exception:  # noqa: BLE001 - any failure: an HDF5 file we cannot read
        return FileInfo("other", None, "an HDF5 file flowmc cannot read")
    if isinstance(fmt, bytes):
        fmt = fmt.decode("utf-8", "replace")
    if fmt == ENSEMBLE_FORMAT:
        return FileInfo("ensemble", None, "a flowmc ensemble (HDF5)")
    return FileInfo("other", None, "an HDF5 file that is not a flowmc ensemble")


def _sniff_zip(path: str) -> FileInfo:
    """A torch checkpoint: the first two strings of ``*/data.pkl`` are 'format', the format."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names:
                return FileInfo("other", None, "a zip archive that is not a flowmc checkpoint")
            with z.open(names[0]) as fh:
                head = fh.read(1 << 16)
        strings: list[str] = []
        for i, (_, arg, _) in enumerate(pickletools.genops(io.BytesIO(head))):
            if isinstance(arg, str):
                strings.append(arg)
            if len(strings) >= 2 or i >= _MAX_PICKLE_OPS:
                break
    except Exception:  # noqa: BLE001 - truncated/odd archives or pickles: not ours
        return FileInfo("other", None, "a zip archive flowmc cannot read")
    if strings == ["format", CHECKPOINT_FORMAT]:
        return FileInfo("checkpoint", None, "a flowmc checkpoint")
    return FileInfo("other", None, "a zip archive (torch file?) that is not a flowmc checkpoint")


def png_text(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``tEXt``/``iTXt`` text chunks of a PNG file (keyword -> text), read chunk by chunk.

    Raises:
        ValueError: if the file is not a PNG.
    """
    out: dict[str, str] = {}
    with open(path, "rb") as fh:
        if fh.read(8) != _PNG_SIG:
            raise ValueError(f"{os.fspath(path)} is not a PNG file")
        for _ in range(_MAX_PNG_CHUNKS):
            header = fh.read(8)
            if len(header) < 8:
                break
            length, ctype = struct.unpack(">I", header[:4])[0], header[4:]
            if ctype in (b"tEXt", b"iTXt") and length <= _MAX_PNG_TEXT:
                data = fh.read(length)
                key, _, rest = data.partition(b"\0")
                if ctype == b"iTXt":  # compression flag, method, language\0, keyword\0, text
                    if rest[:1] != b"\0":  # compressed: not ours
                        fh.seek(4, 1)
                        continue
                    rest = rest[2:].split(b"\0", 2)[-1]
                    text = rest.decode("utf-8", "replace")
                else:
                    text = rest.decode("latin-1")
                out[key.decode("latin-1")] = text
                fh.seek(4, 1)  # CRC
            elif ctype == b"IEND":
                break
            else:
                fh.seek(length + 4, 1)
    return out


def _sniff_png(path: str) -> FileInfo:
    try:
        software = png_text(path).get("Software", "")
    except (OSError, ValueError, struct.error):
        software = ""
    if software.startswith(PNG_SOFTWARE_PREFIX):
        kind = software[len(PNG_SOFTWARE_PREFIX) :].strip()
        return FileInfo("png-report", kind, f"a flowmc {kind!r} plot (PNG)")
    return FileInfo("other", None, "a PNG image flowmc did not write")


def _sniff_json(path: str, size: int) -> FileInfo:
    if size > _MAX_JSON_BYTES:
        return FileInfo("other", None, "a large JSON file flowmc did not write")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return FileInfo("other", None, "a file that is not valid JSON")
    kind = data.get(REPORT_KEY) if isinstance(data, dict) else None
    if isinstance(kind, str) and kind:
        return FileInfo("json-report", kind, f"a flowmc {kind!r} report (JSON)")
    return FileInfo("other", None, f"a JSON file flowmc did not write (no {REPORT_KEY!r} key)")


def _sniff_csv(head: bytes) -> FileInfo:
    line = head.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace")
    kind = line[len(CSV_PREFIX) :].strip()
    if kind:
        return FileInfo("csv-report", kind, f"a flowmc {kind!r} report (CSV)")
    return FileInfo("other", None, "a file flowmc did not write")


def sniff(path: str | os.PathLike[str]) -> FileInfo:
    """What is at ``path``? Never follows a path into a device, FIFO or socket, never unpickles.

    Args:
        path: any path.

    Returns:
        :class:`FileInfo`.

    Example:
        >>> sniff("/nonexistent/x.json").kind
        'missing'
    """
    p = os.fspath(path)
    try:
        os.lstat(p)
    except (FileNotFoundError, NotADirectoryError):
        return FileInfo("missing", None, "missing")
    except OSError as exc:
        return FileInfo("special", None, f"not accessible ({exc.strerror})")
    try:
        st = os.stat(p)
    except OSError:
        return FileInfo("special", None, "a dangling symbolic link")
    if stat.S_ISDIR(st.st_mode):
        return FileInfo("directory", None, "a directory")
    if not stat.S_ISREG(st.st_mode):
        what = "a device node" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else (
            "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a special file")
        return FileInfo("special", None, what)
    try:
        with open(p, "rb") as fh:
            head = fh.read(256)
    except OSError as exc:
        return FileInfo("special", None, f"an unreadable file ({exc.strerror})")
    if not head:
        return FileInfo("other", None, "an empty file")
    if _is_hdf5(head, p):
        return _sniff_hdf5(p)
    if head.startswith(_PNG_SIG):
        return _sniff_png(p)
    if head.startswith(_ZIP_SIG):
        return _sniff_zip(p)
    if head.lstrip()[:1] == b"{":
        return _sniff_json(p, st.st_size)
    if head.startswith(CSV_PREFIX.encode()):
        return _sniff_csv(head)
    return FileInfo("other", None, "a file flowmc did not write")


def _same_path(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(
    path: str | os.PathLike[str],
    *,
    fmt: str,
    kind: str,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Raise unless a ``fmt`` report of ``kind`` may be written at ``path``.

    Allowed: a missing path, or an earlier report of the same format and kind. Refused: a path
    equal to one of ``inputs`` (the files the command reads or writes otherwise), and anything
    else that exists.

    Args:
        path: the output path.
        fmt: ``"json"``, ``"png"`` or ``"csv"``.
        kind: the report kind, e.g. ``"analysis"`` or ``"train-history"``.
        inputs: paths the command reads (or writes as its main output).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: if ``path`` is one of ``inputs``, or on a bad ``fmt``/``kind``.
        FileExistsError: if ``path`` exists and is not a ``fmt`` report of ``kind``.
    """
    if fmt not in ("json", "png", "csv"):
        raise ValueError(f"Expected fmt 'json', 'png' or 'csv'; got {fmt!r}")
    if not kind or not isinstance(kind, str):
        raise ValueError(f"Expected a non-empty report kind; got {kind!r}")
    p = os.fspath(path)
    label = f"the {kind} {fmt.upper()} report"
    for other in inputs:
        if other is not None and _same_path(p, os.fspath(other)):
            raise ValueError(
                f"refusing to write {label} to {p}: it is a file this command reads or writes "
                "(choose another path)"
            )
    info = sniff(p)
    if info.kind == "missing":
        parent = Path(os.path.abspath(p)).parent
        while not os.path.lexists(parent) and parent != parent.parent:
            parent = parent.parent
        where = sniff(parent)
        if where.kind != "directory":
            raise FileExistsError(
                f"cannot write {label} to {p}: {parent} is {where.what}, not a directory"
            )
        return Path(p)
    if info.kind == f"{fmt}-report" and info.report == kind:
        return Path(p)
    raise FileExistsError(
        f"refusing to write {label} to {p}: it is {info.what}; a report replaces only an "
        f"earlier {kind} report (choose another path)"
    )


def write_atomic(
    path: str | os.PathLike[str],
    write: bytes | Callable[[Path], None],
    *,
    fmt: str,
    kind: str,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Write a report atomically after :func:`check_output`.

    Published through :func:`flowmc.io.durable.publish`: the content goes to a temporary file
    ``.<name>.tmp-<pid>`` in the destination's directory (created if needed), is fsynced, the
    destination is checked again, and the temporary file is renamed over it (the directory is
    fsynced too, best effort). On any failure the temporary file is removed and the destination
    is untouched.

    Args:
        path: the destination.
        write: the bytes to write, or ``write(tmp_path)`` that writes the file itself.
        fmt: as for :func:`check_output`.
        kind: as for :func:`check_output`.
        inputs: as for :func:`check_output`.

    Returns:
        The destination path.
    """
    inputs = list(inputs)
    dest = check_output(path, fmt=fmt, kind=kind, inputs=inputs)
    dest.parent.mkdir(parents=True, exist_ok=True)

    def still_allowed(temp: str) -> None:  # nothing appeared at dest meanwhile
        check_output(dest, fmt=fmt, kind=kind, inputs=inputs)

    with durable.publish(dest, verify=still_allowed, best_effort_dir_sync=True) as staged:
        if isinstance(write, (bytes, bytearray)):
            staged.open().write(bytes(write))
        else:
            write(Path(staged.temp))
    return dest
