r"""HDF5 storage of Markov chain ensembles: one file per run, durable commits, exact resume.

Both samplers (flow independence Metropolis-Hastings and HMC) write through
:class:`EnsembleWriter`; analysis reads through :class:`Ensemble` (read-only, lazy). The layer is
sampler-agnostic: it stores arrays and JSON metadata. The schema (``schema_version`` 1: the root
attributes, the datasets and their layout) lives in :mod:`flowmc.io.schema` and is documented in
``docs/ensemble-format.md``; files are readable with plain ``h5py``.

Layout (``n`` configurations per chain, ``C`` chains, lattice ``L``)::

    /                       attrs: format, schema_version, n, lattice_shape, n_chains, action, ...
    /configs                (n, C, *L)  float32 | float64   (absent when store_configs=False)
    /scalars/<name>         (n, C)      float64 (bool for ``accepted`` / ``is_accepted``)
    /chunks/wall_time       (k,)        float64 seconds spent on each appended chunk
    /chunks/end             (k,)        int64   row index after each chunk
    /state/slot0, slot1     sampler state, double-buffered (attrs n, seq, attrs_json)

Durability: the root attribute ``n`` is the only source of truth. :meth:`EnsembleWriter.append`
reserves disk space, writes rows, chunk timing and the sampler state, flushes and ``fsync``-s, and
only then updates ``n``, flushes and ``fsync``-s again, so a process killed (or a machine that
loses power) at any moment leaves a file whose first ``n`` rows and state are those of the last
completed commit. Every write goes through :class:`flowmc.io.durable.DurableFile`, so a failed write
(full disk, I/O error) is never silent: it raises, poisons the writer and leaves the last commit.
A new file appears under its name only at its first commit (the rename of
:class:`flowmc.io.durable.Staged`); a writer holds its output name (``.<name>.lock``) until it is
closed; a file not closed cleanly is rebuilt from its committed part when resumed (a copy
published by :func:`flowmc.io.durable.publish`). Rows beyond ``n`` are ignored on read and
truncated on resume. Details and the remaining risks: ``docs/ensemble-format.md``,
"Durability".

Example:
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "run.h5")
    >>> with EnsembleWriter.create(path, lattice_shape=(4, 4), n_chains=2,
    ...                            scalar_names=["action", "accepted"], action={"m2": -4.0},
    ...                            sampler={"name": "hmc"}) as w:
    ...     w.append(scalars={"action": np.zeros((3, 2)), "accepted": np.ones((3, 2), bool)},
    ...              configs=np.zeros((3, 2, 4, 4)), state={"phi": np.zeros((2, 4, 4))},
    ...              wall_time=0.1)
    >>> with open_ensemble(path) as ens:
    ...     ens.n, ens.configs.shape, ens.scalar("accepted").dtype
    (3, (3, 2, 4, 4), dtype('bool'))
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shlex
import sys
import weakref
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

try:  # h5py is a declared dependency, but keep the module importable without it.
    import h5py
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    h5py = None

from flowmc._checks import is_int
from flowmc._version import flowmc_version
from flowmc.io import durable, safeio, schema
from flowmc.io.schema import BOOL_SCALARS, FORMAT, SCHEMA_VERSION, json_dumps

__all__ = [
    "SCHEMA_VERSION",
    "FORMAT",
    "EnsembleWriter",
    "Ensemble",
    "open_ensemble",
    "check_output",
    "last_commit",
    "file_sha256",
    "check_join",
    "json_dumps",
]

#: Keys that :meth:`EnsembleWriter.resume` can check through ``expect``.
EXPECT_KEYS = (
    "lattice_shape",
    "n_chains",
    "action",
    "sampler",
    "model_sha256",
    "seed",
    "scalar_names",
    "store_configs",
    "config_dtype",
    "compression",
)
_RESERVE_SLACK = 256 * 2**10  # metadata a commit may add (index nodes, headers), generously
_CHUNK_CACHE_BYTES = 64 * 2**20


def _require_h5py() -> None:
    if h5py is None:
        raise ImportError("install h5py to use flowmc ensembles")


def file_sha256(path: str | os.PathLike[str], *, block_size: int = 2**20) -> str:
    """SHA-256 hex digest of a file, read in blocks (for model checkpoints).

    Args:
        path: the file to hash.
        block_size: bytes read at a time.

    Returns:
        The 64-character lowercase hexadecimal digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- helpers


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ValueError(f"Expected {kind} name to be a non-empty string without '/'; got {name!r}")
    return name


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return tuple(v.item() for v in value.ravel()) if value.ndim <= 1 else value
    if isinstance(value, np.generic):
        return value.item()
    return value


def _shards_hint(path: str | os.PathLike[str]) -> str:
    """For a missing ensemble ``ens.h5``: what ``ens.shards/`` holds, if anything (a sharded run
    killed before its join), and how to go on; ``""`` otherwise."""
    p = Path(path)
    sdir = p.with_suffix(".shards")
    if p.suffix == ".shards" or not sdir.is_dir():
        return ""
    counts: dict[int, int] = {}
    for entry in sdir.glob("rank-*-of-*.h5"):
        try:
            counts.setdefault(int(entry.stem.rsplit("-of-", 1)[1]), 0)
            counts[int(entry.stem.rsplit("-of-", 1)[1])] += 1
        except ValueError:
            continue
    if not counts:
        return ""
    runs = ", ".join(f"{n} shards of a run with {w} ranks" for w, n in sorted(counts.items()))
    w = max(counts)
    return (
        f"; {str(sdir)!r} holds {runs} (stopped before its join?): resume it under torchrun "
        f"with {w} ranks and --resume (torchrun --nproc-per-node {w} -m flowmc ... --resume), "
        f"which writes the join, or join what they hold with "
        f"flowmc.io.join.join_shards({str(p)!r})"
    )

def _open_h5(path: str, mode: str) -> h5py.File:
    """Open ``path`` with h5py, turning every low-level failure into a clear error."""
    _require_h5py()
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No flowmc ensemble at {path!r}: file does not exist{_shards_hint(path)}"
        )
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory, not a flowmc ensemble file")
    try:
        is_h5 = h5py.is_hdf5(path)
    except OSError:
        is_h5 = False
    if not is_h5:
        raise ValueError(f"{path!r} is not a flowmc ensemble: it is not an HDF5 file")
    try:
        return h5py.File(path, mode, rdcc_nbytes=_CHUNK_CACHE_BYTES)
    except OSError as e:
        if re.search(r"\block(ing)?\b", str(e).lower()):
            raise OSError(
                f"Cannot open flowmc ensemble {path!r}: it is locked by another process "
                f"(is a sampler still writing it?): {e}"
            ) from e
        raise ValueError(
            f"{path!r} is not a readable flowmc ensemble: HDF5 cannot open it "
            f"(corrupt or truncated file?): {e}"
        ) from e


def _validate_root(f: h5py.File, path: str) -> dict[str, Any]:
    """Check the whole structure once at open; return the decoded root attributes.

    Checks format, schema version, every root attribute's type, and that every dataset the
    attributes promise exists with the right shape (``(>= n, C, *L)`` configs, ``(>= n, C)``
    scalars, 1-D ``chunks/*``), so that no later reshape fails on a hand-edited file.

    Raises:
        ValueError: naming ``path`` and the problem.
    """
    try:
        return _validate_root_unchecked(f, path)
    except (OSError, RuntimeError, KeyError, TypeError) as e:
        raise ValueError(f"{path!r} is not a readable flowmc ensemble (corrupt file?): {e}") from e


def _type_name(value: Any) -> str:
    return {dict: "JSON object", list: "JSON list", str: "string", bool: "boolean"}.get(
        type(value), type(value).__name__
    )


def _validate_root_unchecked(f: h5py.File, path: str) -> dict[str, Any]:
    def bad(problem: str) -> ValueError:
        return ValueError(f"{path!r}: {problem} (corrupt or hand-edited file?)")

    raw = dict(f.attrs.items())
    fmt = _decode(raw.get("format"))
    if fmt != FORMAT:
        what = "is missing" if fmt is None else f"is {fmt!r}"
        raise ValueError(
            f"{path!r} is not a flowmc ensemble: root attribute 'format' {what} "
            f"(expected {FORMAT!r})"
        )
    version = _decode(raw.get("schema_version"))
    if not is_int(version):
        raise ValueError(f"{path!r}: invalid or missing 'schema_version' attribute {version!r}")
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"{path!r} has schema_version {version}, but this flowmc (version "
            f"{flowmc_version()}) supports schema_version <= {SCHEMA_VERSION}; upgrade flowmc"
        )
    attrs: dict[str, Any] = {}
    for key, value in raw.items():
        value = _decode(value)
        if key in schema.JSON_ATTRS:
            try:
                value = json.loads(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path!r}: root attribute {key!r} is not valid JSON: {e}") from e
        attrs[key] = value
    for key in ("lattice_shape", "n_chains", "scalar_names", "store_configs"):
        if key not in attrs:
            raise ValueError(f"{path!r}: missing root attribute {key!r} (corrupt file?)")
    for key in ("action", "sampler", "meta", "shards"):
        if key in attrs and not isinstance(attrs[key], dict):
            raise bad(f"root attribute {key!r} must be a JSON object; got {_type_name(attrs[key])}")
    n = attrs.get("n")
    if not is_int(n, minimum=0):
        raise ValueError(f"{path!r}: invalid or missing root attribute 'n' ({n!r})")
    shape = attrs["lattice_shape"]
    if not isinstance(shape, tuple):
        shape = (shape,)
    if not shape or not all(is_int(s, minimum=1) for s in shape):
        raise bad(f"root attribute 'lattice_shape' must be positive integers; got {shape!r}")
    attrs["lattice_shape"] = shape
    C = attrs["n_chains"]
    if not is_int(C, minimum=1):
        raise bad(f"root attribute 'n_chains' must be an integer >= 1; got {C!r}")
    names = attrs["scalar_names"]
    if not isinstance(names, list) or not all(isinstance(s, str) and s for s in names):
        raise bad(f"root attribute 'scalar_names' must be a JSON list of names; got {names!r}")
    if not isinstance(attrs["store_configs"], bool):
        raise bad(f"root attribute 'store_configs' must be a boolean; got "
                  f"{attrs['store_configs']!r}")
    if attrs["store_configs"] and attrs.get("config_dtype", "float32") not in schema.CONFIG_DTYPES:
        raise bad(f"root attribute 'config_dtype' must be one of {schema.CONFIG_DTYPES}; got "
                  f"{attrs.get('config_dtype')!r}")
    if attrs.get("compression", "") not in ("", "gzip", "lzf"):
        raise bad(f"root attribute 'compression' must be '', 'gzip' or 'lzf'; got "
                  f"{attrs.get('compression')!r}")
    if not isinstance(attrs.get("model_sha256", ""), str):
        raise bad(f"root attribute 'model_sha256' must be a string; got "
                  f"{attrs['model_sha256']!r}")
    seed = attrs.get("seed", -1)
    if not is_int(seed):
        raise bad(f"root attribute 'seed' must be an integer; got {seed!r}")
    attrs["seed"] = None if seed == -1 else seed

    def dataset(name: str, tail: tuple[int, ...] | None) -> None:
        ds = f.get(name)
        if not isinstance(ds, h5py.Dataset):
            raise bad(f"dataset {name!r} is missing" if ds is None else f"{name!r} is no dataset")
        if tail is not None and (ds.ndim != 1 + len(tail) or tuple(ds.shape[1:]) != tail):
            raise bad(
                f"dataset {name!r} has shape {ds.shape}, but n_chains = {C} and lattice_shape "
                f"= {shape} need (rows, {', '.join(map(str, tail))})"
            )
        if tail is not None and ds.shape[0] < n:
            raise ValueError(
                f"{path!r}: dataset {name!r} has {ds.shape[0]} rows but n = {n} (corrupt file?)"
            )

    for name in schema.row_datasets(store_configs=attrs["store_configs"], scalar_names=names):
        dataset(name, (C, *shape) if name == "configs" else (C,))
    for name in schema.CHUNK_DATASETS:
        dataset(name, None)
        if f[name].ndim != 1:
            raise bad(f"dataset {name!r} must be 1-D; got shape {f[name].shape}")
    k = _committed_chunks(f["chunks/end"], n, path)
    if f["chunks/wall_time"].shape[0] < k:
        raise bad(f"dataset 'chunks/wall_time' has {f['chunks/wall_time'].shape[0]} entries but "
                  f"{k} chunks are committed")
    attrs["_n_chunks"] = k
    state = f.get("state")
    if state is not None and not isinstance(state, h5py.Group):
        raise bad("'state' is not a group")
    return attrs


def _committed_chunks(end: h5py.Dataset, n: int, path: str) -> int:
    """The number ``k`` of committed entries of ``chunks/end``: entry ``k - 1`` equals ``n``.

    Entries beyond the committed ones belong to an interrupted append (their value is larger
    than ``n``, or a fill value, or unreadable after a write failure), so the committed count is
    found as the first entry equal to ``n``, not by a search that assumes sorted values.
    """
    if n == 0:
        return 0
    try:
        ends = end[()]
    except (OSError, RuntimeError):  # an interrupted append left an unreadable tail
        ends = None
    if ends is not None:
        hits = np.flatnonzero(ends == n)
        if hits.size:
            return int(hits[0]) + 1
    else:
        for i in range(end.shape[0]):
            if int(end[i]) == n:
                return i + 1
    raise ValueError(
        f"{path!r}: no entry of 'chunks/end' equals n = {n} (corrupt or hand-edited file?)"
    )


def _valid_slot(f: h5py.File, n: int) -> h5py.Group | None:
    """The state slot that belongs to the committed ``n`` (highest ``seq`` wins), or ``None``."""
    best, best_seq = None, -1
    state = f.get("state")
    if not isinstance(state, h5py.Group):
        return None
    for name in schema.SLOTS:
        g = state.get(name)
        if not isinstance(g, h5py.Group):
            continue
        try:
            slot_n, seq = int(g.attrs.get("n", -1)), int(g.attrs.get("seq", -1))
        except (TypeError, ValueError):
            continue
        if slot_n == n and seq > best_seq:
            best, best_seq = g, seq
    return best


def _read_slot(g: h5py.Group | None, path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if g is None:
        raise LookupError(f"{path!r} holds no sampler state for its committed rows")
    try:
        arrays = {name: np.asarray(ds[()]) for name, ds in g.items()}
        attrs = json.loads(_decode(g.attrs["attrs_json"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(
            f"{path!r}: unreadable sampler state {g.name!r} (corrupt file?): {e}"
        ) from e
    if not isinstance(attrs, dict):
        raise ValueError(f"{path!r}: sampler state attributes of {g.name!r} are not a JSON object")
    return arrays, attrs


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _os_error(message: str, errno: int | None) -> OSError:
    """An ``OSError`` whose ``str`` is ``message`` alone, keeping ``errno`` for callers."""
    err = OSError(message)
    err.errno = errno
    return err


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _identify_ensemble(path: str) -> str | None:
    """``None`` if the regular file ``path`` is a flowmc ensemble, else what it is."""
    info = safeio.sniff(path)  # the one place that tells what a file is
    return None if info.kind == "ensemble" else f"it is {info.what}"


def _open_for_update(path: str, mode: str) -> tuple[durable.DurableFile, h5py.File, dict]:
    """Open ``path`` through a locked :class:`~flowmc.io.durable.DurableFile` and validate it."""
    fio = durable.DurableFile(path, create=False)
    f = None
    try:
        if os.pread(fio.fileno(), len(_HDF5_SIGNATURE), 0) != _HDF5_SIGNATURE:
            raise ValueError(f"{path!r} is not a flowmc ensemble: it is not an HDF5 file")
        try:
            f = h5py.File(fio, mode, rdcc_nbytes=_CHUNK_CACHE_BYTES)
        except OSError as e:
            raise ValueError(
                f"{path!r} is not a readable flowmc ensemble: HDF5 cannot open it "
                f"(corrupt or truncated file?): {e}"
            ) from e
        return fio, f, _validate_root(f, path)
    except BaseException:
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()
        fio.close()
        raise


def _rebuild(src: h5py.File, path: str, attrs: dict[str, Any]) -> None:
    """Copy the committed part of ``src`` (rows, chunks, state) into a new file over ``path``.

    The copy is published (:func:`flowmc.io.durable.publish`): written as ``.<name>.tmp-<pid>``,
    made durable and renamed over ``path``; on any failure ``path`` is unchanged.

    Raises:
        OSError: if the copy cannot be written (e.g. the disk is still full).
    """
    n, k = int(attrs["n"]), int(attrs["_n_chunks"])
    try:
        with durable.publish(path) as staged:
            fio = staged.open()
            dst = h5py.File(fio, "w", rdcc_nbytes=_CHUNK_CACHE_BYTES)
            try:
                _copy_committed(src, dst, fio, attrs, n, k)
            finally:
                dst.close()
    except OSError as exc:
        raise _os_error(
            f"Cannot resume {path!r}: it was not closed cleanly, and copying its committed "
            f"part (n = {n} rows per chain) into a fresh file failed: "
            f"{exc.strerror or exc}; the file is unchanged", exc.errno,
        ) from None


def _copy_committed(
    src: h5py.File, dst: h5py.File, fio: durable.DurableFile, attrs: dict[str, Any], n: int,
    k: int,
) -> None:
    """The first ``n`` rows, ``k`` chunk entries and the committed state slot of ``src``."""
    schema.write_root(dst.attrs, {
        "n": np.int64(n),
        **{key: value for key, value in src.attrs.items() if key not in ("n", "writing")},
        "writing": np.int64(0),
    })  # fmt: skip
    rows_of = dict.fromkeys(schema.row_datasets(store_configs=attrs["store_configs"],
                                                scalar_names=attrs["scalar_names"]), n)
    rows_of.update(dict.fromkeys(schema.CHUNK_DATASETS, k))
    for name, rows in rows_of.items():
        s = src[name]
        d = dst.create_dataset(
            name, shape=(rows, *s.shape[1:]), maxshape=s.maxshape, dtype=s.dtype,
            chunks=s.chunks, compression=s.compression,
            compression_opts=s.compression_opts, shuffle=s.shuffle,
        )
        row_bytes = max(1, s.dtype.itemsize * math.prod(s.shape[1:]))
        step = max(1, _CHUNK_CACHE_BYTES // 4 // row_bytes)
        for a in range(0, rows, step):
            d[a : min(rows, a + step)] = s[a : min(rows, a + step)]
        fio.check()
    state = dst.create_group("state")
    committed = _valid_slot(src, n)
    for slot in schema.SLOTS:
        g = state.create_group(slot)
        if slot == schema.SLOTS[0] and committed is not None:
            for key, ds in committed.items():
                g.create_dataset(key, data=ds[()])
            for key in ("n", "seq", "attrs_json"):
                g.attrs[key] = committed.attrs[key]
        else:
            schema.empty_slot(g)
    dst.flush()
    fio.check()


def _check_layout_args(
    lattice_shape: Sequence[int],
    n_chains: int,
    scalar_names: Sequence[str],
    config_dtype: str,
    compression: str | None,
    chunk_size: int,
) -> tuple[tuple[int, ...], int, tuple[str, ...]]:
    """The layout arguments of :meth:`EnsembleWriter.create`, checked: ``(L, C, names)``."""
    shape = tuple(int(s) for s in lattice_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(
            f"Expected lattice_shape of positive extents; got {tuple(lattice_shape)}"
        )
    if int(n_chains) != n_chains or n_chains < 1:
        raise ValueError(f"Expected n_chains >= 1; got {n_chains!r}")
    if isinstance(scalar_names, str):
        raise ValueError(
            f"Expected scalar_names to be a sequence of names; got {scalar_names!r}"
        )
    names = tuple(_check_name("scalar", s) for s in scalar_names)
    if len(set(names)) != len(names):
        raise ValueError(f"Expected unique scalar_names; got {names}")
    if config_dtype not in schema.CONFIG_DTYPES:
        raise ValueError(f"Expected config_dtype in {schema.CONFIG_DTYPES}; got {config_dtype!r}")
    if compression not in schema.COMPRESSIONS:
        raise ValueError(f"Expected compression in {schema.COMPRESSIONS}; got {compression!r}")
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"Expected chunk_size >= 1; got {chunk_size!r}")
    return shape, int(n_chains), names


def _check_provenance_args(
    action: Mapping[str, Any],
    sampler: Mapping[str, Any],
    model_sha256: str,
    seed: int | None,
    meta: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The provenance arguments of :meth:`EnsembleWriter.create`, checked; JSON as text."""
    if not isinstance(action, Mapping) or not isinstance(sampler, Mapping):
        raise ValueError("Expected action and sampler to be dicts")
    if not isinstance(model_sha256, str) or (
        model_sha256
        and (len(model_sha256) != 64 or set(model_sha256) - set("0123456789abcdef"))
    ):
        raise ValueError(
            f"Expected model_sha256 to be '' or 64 lowercase hex digits; got {model_sha256!r}"
        )
    if seed is not None and (int(seed) != seed or not 0 <= int(seed) < 2**63):
        raise ValueError(f"Expected seed to be None or an integer in [0, 2**63); got {seed!r}")
    return {
        "action": json_dumps("action", dict(action)),
        "sampler": json_dumps("sampler", dict(sampler)),
        "model_sha256": model_sha256,
        "seed": seed,
        "meta": json_dumps("meta", dict(meta or {})),
    }


def _command_line(command_line: str | None) -> str:
    """The recorded command line (default ``sys.argv``), cut to fit an attribute."""
    if command_line is None:
        command_line = " ".join(shlex.quote(a) for a in sys.argv)
    return str(command_line)[: schema.MAX_ATTR_BYTES // 4]


#: Per path, the committed ``n`` and whether the file got its final name, of the last writer
#: closed in this process (see :func:`last_commit`).
_LAST_COMMIT: dict[str, tuple[int, bool]] = {}


def last_commit(path: str | os.PathLike[str]) -> tuple[int, bool] | None:
    """What the last :class:`EnsembleWriter` of ``path`` closed in this process left behind.

    Returns:
        ``(n, published)``: the committed rows per chain and whether the file was ever visible
        under ``path`` (``False``: closed before its first commit, nothing written there);
        ``None`` if no writer of ``path`` was closed in this process.
    """
    return _LAST_COMMIT.get(os.path.abspath(os.fspath(path)))


# --------------------------------------------------------------------------- writer


class EnsembleWriter:
    """Append-only writer of one ensemble file; create with :meth:`create` or :meth:`resume`.

    Not constructed directly. Use as a context manager, or call :meth:`close`. A writer holds
    the output name's lock (:class:`flowmc.io.durable.NameLock`) until it is closed. After a failed
    write it is *poisoned*: it refuses further writes, and closing it leaves the file as it was
    at its last commit.
    """

    #: Writers not yet closed (see :meth:`close_all`).
    _open: ClassVar[weakref.WeakSet[EnsembleWriter]] = weakref.WeakSet()

    @classmethod
    def close_all(cls) -> None:
        """Close every writer of this process that is still open, ignoring errors.

        The command line calls it when a command ends with an error or Ctrl-C, so that a
        driver that lost its writer on an error path still removes its temporary file and
        releases the name at once.
        """
        for writer in list(cls._open):
            with contextlib.suppress(Exception):
                writer.close()

    def __init__(
        self,
        f: h5py.File,
        fio: durable.DurableFile,
        path: str,
        attrs: dict[str, Any],
        *,
        lock: durable.NameLock,
        staged: durable.Staged | None = None,
        force: bool = False,
    ) -> None:
        self._f: h5py.File | None = f
        self._io = fio
        self._lock = lock
        self._staged = staged  # a new file: published (renamed) at its first commit
        self._tmp = None if staged is None else staged.temp  # None once published
        self._force = force
        self._commit_written = False  # within a transaction: the commit record was written
        self._keep_tmp = False  # publishing failed: keep the temporary file (it has a commit)
        self._failure: str | None = None  # what made a write fail
        self.path = path
        self._n = int(attrs["n"])
        self._k = int(attrs.pop("_n_chunks"))  # committed entries of chunks/*
        self.lattice_shape: tuple[int, ...] = tuple(attrs["lattice_shape"])
        self.n_chains = int(attrs["n_chains"])
        self.scalar_names: tuple[str, ...] = tuple(attrs["scalar_names"])
        self.store_configs = bool(attrs["store_configs"])
        names = schema.datasets(store_configs=self.store_configs, scalar_names=self.scalar_names)
        self._ds: dict[str, h5py.Dataset] = {name: f[name] for name in names}  # kept open
        self._seq = 0
        for name in schema.SLOTS:
            g = f.get(f"state/{name}")
            if g is not None:
                self._seq = max(self._seq, int(g.attrs.get("seq", -1)) + 1)
        EnsembleWriter._open.add(self)

    # ---------------------------------------------------------------- construction

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        lattice_shape: Sequence[int],
        n_chains: int,
        scalar_names: Sequence[str],
        action: Mapping[str, Any],
        sampler: Mapping[str, Any],
        model_sha256: str = "",
        seed: int | None = None,
        meta: Mapping[str, Any] | None = None,
        store_configs: bool = True,
        config_dtype: str = "float32",
        compression: str | None = None,
        chunk_size: int = 1024,
        force: bool = False,
        command_line: str | None = None,
    ) -> EnsembleWriter:
        """Start a new ensemble; it appears under ``path`` at its first commit.

        The file is written as ``.<name>.tmp-<pid>`` in the same directory and renamed to
        ``path`` by the first :meth:`append` or :meth:`save_state`, so ``path`` never holds a
        file without committed state. Closing the writer before that removes the temporary file
        and leaves ``path`` as it was.

        Args:
            path: output file. An existing file is only replaced when ``force=True``, and then
                only if it is a regular file holding a flowmc ensemble that no other process has
                open; the replacement happens (atomically) at the first commit.
            lattice_shape: lattice extents ``L = (L_1, ..., L_d)``.
            n_chains: number of parallel chains ``C``.
            scalar_names: per-configuration scalars, each stored as an ``(n, C)`` dataset under
                ``scalars/``; ``accepted`` and ``is_accepted`` are bool, all others float64.
            action: action parameters (JSON-serialisable dict), e.g. ``{"m2": -4, "lam": 8}``.
            sampler: sampler name and settings (JSON-serialisable dict with key ``"name"``).
            model_sha256: SHA-256 of the flow checkpoint (see :func:`file_sha256`); ``""`` for
                samplers without a model.
            seed: the run's seed (``None`` if unseeded; stored as ``-1``).
            meta: further JSON-serialisable metadata (resolved config, host, ...).
            store_configs: store the field configurations; if ``False`` only scalars are kept.
            config_dtype: storage dtype of configurations, ``"float32"`` or ``"float64"``.
            compression: ``None``, ``"gzip"`` or ``"lzf"`` for the configurations.
            chunk_size: rows per HDF5 chunk of the scalars and of uncompressed configurations
                (reduced so that one chunk of configurations stays below 4 MiB). Compressed
                configurations always use one row per chunk, for crash safety.
            force: replace an existing flowmc ensemble.
            command_line: recorded command line; defaults to ``sys.argv``.

        Returns:
            An open writer with ``n == 0``.

        Raises:
            FileExistsError: if ``path`` exists and ``force`` is false, or if ``force`` is true
                but ``path`` is not a regular file holding a flowmc ensemble.
            BlockingIOError: if another process writes ``path`` or holds it open.
            ValueError: on invalid arguments.
            ImportError: if h5py is not installed.
        """
        _require_h5py()
        path = os.fspath(path)
        shape, n_chains, names = _check_layout_args(
            lattice_shape, n_chains, scalar_names, config_dtype, compression, chunk_size
        )
        provenance = _check_provenance_args(action, sampler, model_sha256, seed, meta)
        root = schema.root_attrs(
            n=0, lattice_shape=shape, n_chains=n_chains, scalar_names=names,
            store_configs=store_configs, **provenance,
            config_dtype=config_dtype, compression=compression or "",
            flowmc_version=flowmc_version(),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            command_line=_command_line(command_line),
            writing=1,  # 0 only after a clean close (see resume)
        )  # fmt: skip
        lock = durable.NameLock(path).acquire()  # a running writer of path: fail here
        staged = f = None
        try:
            check_output(path, force=force, lock_held=True)  # again when renamed
            staged = durable.Staged(path)  # removes a temporary file left by a killed run
            fio = staged.open()
            f = h5py.File(fio, "w", rdcc_nbytes=_CHUNK_CACHE_BYTES)
            schema.write_root(f.attrs, root)
            schema.create_layout(
                f, lattice_shape=shape, n_chains=n_chains, scalar_names=names,
                store_configs=store_configs, config_dtype=config_dtype, compression=compression,
                chunk_size=chunk_size,
            )  # fmt: skip
            f.flush()
            fio.check()
            attrs = _validate_root(f, path)
            return cls(f, fio, path, attrs, lock=lock, staged=staged, force=force)
        except BaseException as exc:
            if f is not None:
                with contextlib.suppress(Exception):
                    f.close()
            failed = staged is not None and staged.file is not None and staged.file.error
            if staged is not None:
                staged.discard()
            lock.release()
            if isinstance(exc, OSError) and failed:
                raise _os_error(
                    f"Cannot create ensemble {path!r}: {exc.strerror or exc}; nothing was "
                    "written", exc.errno
                ) from None
            raise

    @classmethod
    def resume(
        cls, path: str | os.PathLike[str], *, expect: Mapping[str, Any] | None = None
    ) -> EnsembleWriter:
        """Reopen an ensemble for appending; rows beyond the committed ``n`` are truncated.

        Args:
            path: an existing ensemble file with a committed sampler state.
            expect: values the file must hold, keyed by any of ``lattice_shape``, ``n_chains``,
                ``action``, ``sampler``, ``model_sha256``, ``seed``, ``scalar_names``,
                ``store_configs``, ``config_dtype``, ``compression``. Dicts compare after a
                JSON round trip; ``compression=None`` equals the stored ``""``.

        Returns:
            An open writer positioned after the last committed row.

        Raises:
            ValueError: if the file is not a (supported) flowmc ensemble, holds no committed
                sampler state, or an expected value differs (the message names the key, the
                stored and the given value).
            FileNotFoundError: if ``path`` does not exist.
            BlockingIOError: if another process writes ``path`` or holds it open.
        """
        _require_h5py()
        path = os.fspath(path)
        expect = dict(expect or {})
        unknown = set(expect) - set(EXPECT_KEYS)
        if unknown:
            raise ValueError(f"Unknown expect keys {sorted(unknown)}; allowed: {list(EXPECT_KEYS)}")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"No flowmc ensemble at {path!r} to resume: file does not exist"
                + (_shards_hint(path) or " (a run stopped before its first commit leaves "
                   "nothing; start it again without --resume)")
            )
        if not os.path.isfile(path):
            raise ValueError(f"{path!r} is not a regular file, so not a flowmc ensemble")
        lock = durable.NameLock(path).acquire()
        fio = f = None
        try:
            fio, f, attrs = _open_for_update(path, "r")
            if "shards" in attrs:  # a view of other files (flowmc.io.join): nothing to append to
                raise ValueError(
                    f"Cannot resume {path!r}: it is the join of a sharded ensemble (its rows "
                    f"live in {attrs['shards'].get('world_size')} shard files); resume the "
                    "sharded run under torchrun with the same number of ranks and --resume"
                )
            for key, given in expect.items():
                stored = attrs.get(key)
                if key == "lattice_shape":
                    ok = tuple(stored) == tuple(int(s) for s in given)
                elif key == "scalar_names":
                    ok = list(stored) == list(given)
                elif key == "compression":
                    stored = stored or None
                    ok = stored == (given or None)
                else:
                    ok = schema.json_normalise(stored) == schema.json_normalise(given)
                if not ok:
                    raise ValueError(
                        f"Cannot resume {path!r}: {key} mismatch: "
                        f"stored {stored!r}, given {given!r}"
                    )
            if _valid_slot(f, attrs["n"]) is None:
                raise ValueError(
                    f"Cannot resume {path!r}: it holds no committed sampler state (n = "
                    f"{attrs['n']}; left by a run that stopped before its first commit, from an "
                    "older flowmc); start it again with --force"
                )
            if attrs.get("writing", 1) != 0:
                # Not closed cleanly (crash, kill, write failure): HDF5 structures outside the
                # committed part may be half written, and changing them in place can fail or
                # crash HDF5. Copy the committed part into a fresh file instead.
                _rebuild(f, path, attrs)
            f.close()
            fio.close()
            fio, f, attrs = _open_for_update(path, "r+")
            writer = cls(f, fio, path, attrs, lock=lock)
            writer._mark_writing()
            writer._truncate()
            return writer
        except BaseException:
            if f is not None:
                with contextlib.suppress(Exception):
                    f.close()
            if fio is not None:
                fio.close()
            lock.release()
            raise

    # ---------------------------------------------------------------- properties

    @property
    def n(self) -> int:
        """Committed configurations per chain."""
        return self._n

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._f is None

    @property
    def failed(self) -> bool:
        """Whether a write failed (the writer then refuses further writes)."""
        return self._failure is not None

    @property
    def fsync_stats(self) -> tuple[int, float]:
        """``(count, seconds)`` of the ``fsync`` calls made by this writer so far."""
        return self._io.n_fsync, self._io.fsync_seconds

    def _file(self) -> h5py.File:
        if self._f is None:
            raise RuntimeError(f"EnsembleWriter for {self.path!r} is closed")
        return self._f

    def _writable(self) -> h5py.File:
        f = self._file()
        if self._failure is not None:
            raise RuntimeError(
                f"EnsembleWriter for {self.path!r} failed earlier ({self._failure}); it accepts "
                "no further writes (close it and resume the file)"
            )
        return f

    def _sync(self) -> None:
        """Flush HDF5's caches through the file and ``fsync`` it; raise any write failure."""
        self._file().flush()
        self._io.check()
        self._io.sync()
        self._io.check()

    @contextlib.contextmanager
    def _writing(self, n_new: int | None = None, reserve: int = 0) -> Iterator[h5py.File]:
        """One write transaction: Ctrl-C held back, any failure poisons the writer.

        ``n_new`` is the ``n`` this transaction commits (for the error message); ``reserve``
        the bytes it may write at most, allocated on disk before it writes anything.
        """
        with durable.deferred_sigint():
            f = self._writable()
            self._commit_written = False
            try:
                self._io.reserve(reserve + _RESERVE_SLACK)
            except OSError as exc:  # nothing written: the file stays consistent
                self._failure = _one_line(exc)
                raise self._reserve_error(exc, reserve + _RESERVE_SLACK) from None
            try:
                yield f
            except OSError as exc:
                self._failure = _one_line(exc)  # text only: no reference cycle via traceback
                raise self._write_error(exc, n_new) from None
            except BaseException as exc:
                self._failure = _one_line(exc)
                raise

    def _reserve_error(self, exc: OSError, nbytes: int) -> OSError:
        where = (
            "nothing was written under that name (start the run again)"
            if self._tmp is not None
            else f"the file keeps its last commit (n = {self._n} rows per chain) and is "
            "consistent; free some space and continue with --resume"
        )
        return _os_error(
            f"Cannot write ensemble {self.path!r}: {exc.strerror or exc} (the next commit "
            f"needs up to {nbytes / 2**20:.1f} MiB); {where}", exc.errno
        )

    def _commit_bytes(self, k: int, state: Mapping[str, np.ndarray]) -> int:
        """Upper bound of the bytes that appending ``k`` rows and ``state`` may allocate."""
        total = sum(x.nbytes for x in state.values())
        for name, ds in self._ds.items():
            if name.startswith("chunks/") or not k:
                continue
            rows = ds.chunks[0]
            new = -(-(self._n + k) // rows) - -(-self._n // rows) + 1
            total += new * math.prod(ds.chunks) * ds.dtype.itemsize
        return int(1.25 * total)

    def _write_error(self, exc: OSError, n_new: int | None) -> OSError:
        if self._keep_tmp:
            return exc
        reason = exc.strerror or str(exc)
        if self._tmp is not None:  # never published: the temporary file goes at close
            msg = (
                f"Writing ensemble {self.path!r} failed: {reason}; nothing was written under "
                "that name (start the run again)"
            )
        else:
            also = (
                f", or n = {n_new} if the commit record reached the disk"
                if self._commit_written and n_new is not None and n_new != self._n
                else ""
            )
            msg = (
                f"Writing ensemble {self.path!r} failed: {reason}; the file keeps its last "
                f"complete commit (n = {self._n} rows per chain{also}); continue with --resume"
            )
        return _os_error(msg, exc.errno)

    def _mark_writing(self) -> None:
        """Set the root flag ``writing = 1`` (durably) before changing a file in place."""
        with self._writing():
            self._file().attrs.modify("writing", np.int64(1))
            self._sync()

    def _truncate(self) -> None:
        """Cut every dataset back to the committed ``n`` rows (and committed chunks)."""
        with self._writing():
            rows = dict.fromkeys(schema.row_datasets(store_configs=self.store_configs,
                                                     scalar_names=self.scalar_names), self._n)
            rows.update(dict.fromkeys(schema.CHUNK_DATASETS, self._k))
            for name, n in rows.items():
                if self._ds[name].shape[0] != n:
                    self._ds[name].resize(n, axis=0)
            self._sync()

    # ---------------------------------------------------------------- writing

    def append(
        self,
        *,
        scalars: Mapping[str, Any],
        configs: Any | None = None,
        state: Mapping[str, Any],
        state_attrs: Mapping[str, Any] | None = None,
        wall_time: float,
    ) -> None:
        """Commit ``k`` new rows per chain, the chunk timing and the sampler state after them.

        Rows, timing and state are written, flushed and ``fsync``-ed first; the root attribute
        ``n`` is updated, flushed and ``fsync``-ed last, so a crash (or power cut) leaves either
        the old or the new ``n``, never a mix. Ctrl-C during the call is delivered after it.

        Args:
            scalars: every name of ``scalar_names`` mapped to an array ``(k, C)``.
            configs: field configurations ``(k, C, *L)`` (numpy or torch); required when the
                file stores configurations, ignored otherwise.
            state: sampler state after the last row, name to array (numpy or torch), e.g.
                ``{"phi": (C, *L), "action": (C,), "rng": torch_generator.get_state()}``.
            state_attrs: small JSON-serialisable scalars of the state (``{"step": 123}``).
            wall_time: seconds spent producing this chunk.

        Raises:
            ValueError: on missing/extra scalars or wrong shapes (nothing is written).
            OSError: if a write or ``fsync`` fails (disk full, I/O error); the file keeps its
                last commit and the writer is poisoned.
            RuntimeError: if the writer is closed or poisoned.
        """
        self._writable()
        arrays, cfg, k = self._check_rows(scalars, configs)
        wall_time = float(wall_time)
        if not math.isfinite(wall_time) or wall_time < 0:
            raise ValueError(f"Expected a finite wall_time >= 0; got {wall_time}")
        state_arrays, attrs_json = self._check_state(state, state_attrs)

        n_old, n_new = self._n, self._n + k
        with self._writing(n_new, self._commit_bytes(k, state_arrays)) as f:
            # 1. rows (datasets may be longer than n after a failed append: resize, overwrite)
            if cfg is not None:
                ds = self._ds["configs"]
                ds.resize(n_new, axis=0)
                ds[n_old:n_new] = cfg.astype(ds.dtype, copy=False)
            for name, x in arrays.items():
                ds = self._ds[f"scalars/{name}"]
                ds.resize(n_new, axis=0)
                ds[n_old:n_new] = x
            self._io.check()
            # 2. chunk timing
            end, wt = self._ds["chunks/end"], self._ds["chunks/wall_time"]
            nk = self._k
            for ds, value in ((end, n_new), (wt, wall_time)):
                ds.resize(nk + 1, axis=0)
                ds[nk] = value
            # 3. state, into the slot that is not the committed one; valid only once n == n_new
            self._write_state(state_arrays, attrs_json, n_new)
            self._sync()
            # 4. commit
            self._commit_written = True
            f.attrs.modify("n", np.int64(n_new))
            self._sync()
            self._n, self._k = n_new, nk + 1
            self._publish()

    def _check_rows(
        self, scalars: Mapping[str, Any], configs: Any | None
    ) -> tuple[dict[str, np.ndarray], np.ndarray | None, int]:
        """The rows of an :meth:`append`, checked and converted: ``(scalars, configs, k)``."""
        C, L = self.n_chains, self.lattice_shape
        given = set(scalars)
        if given != set(self.scalar_names):
            raise ValueError(
                f"Expected scalars {sorted(self.scalar_names)}; got {sorted(given)} "
                f"(missing {sorted(set(self.scalar_names) - given)}, "
                f"unexpected {sorted(given - set(self.scalar_names))})"
            )
        arrays: dict[str, np.ndarray] = {}
        k = None
        for name in self.scalar_names:
            x = _to_numpy(scalars[name])
            if x.ndim != 2 or x.shape[1] != C or (k is not None and x.shape[0] != k):
                want = f"({k if k is not None else 'k'}, {C})"
                raise ValueError(f"Expected scalar {name!r} of shape {want}; got {x.shape}")
            k = x.shape[0]
            if name in BOOL_SCALARS:
                if x.dtype != np.bool_:
                    if not np.all((x == 0) | (x == 1)):
                        raise ValueError(f"Expected scalar {name!r} to hold booleans (0/1)")
                    x = x.astype(np.bool_)
            else:
                x = x.astype(np.float64, copy=False)
            arrays[name] = x
        if k is None:  # no scalars at all: take k from configs
            if configs is None or not self.store_configs:
                raise ValueError("Cannot infer the number of rows: no scalars and no configs")
            k = _to_numpy(configs).shape[0]
        if k < 1:
            raise ValueError(f"Expected at least one row to append; got k = {k}")
        cfg = None
        if self.store_configs:
            if configs is None:
                raise ValueError(
                    f"{self.path!r} stores configurations; pass configs of shape (k, C, *L)"
                )
            cfg = _to_numpy(configs)
            if cfg.shape != (k, C, *L):
                raise ValueError(f"Expected configs of shape {(k, C, *L)}; got {cfg.shape}")
        return arrays, cfg, k

    def save_state(self, state: Mapping[str, Any], attrs: Mapping[str, Any] | None = None) -> None:
        """Replace the sampler state without adding rows (e.g. after thermalisation).

        A commit like :meth:`append` (durable, publishes a new file): until the call returns,
        the previous state stays valid.

        Raises:
            ValueError: on a non-numeric state array or non-JSON attributes.
            OSError: if a write or ``fsync`` fails; the writer is then poisoned.
        """
        self._writable()
        state_arrays, attrs_json = self._check_state(state, attrs)
        with self._writing(self._n, self._commit_bytes(0, state_arrays)):
            slot = self._write_state(state_arrays, attrs_json, None)
            self._sync()
            self._commit_written = True
            slot.attrs.modify("n", np.int64(self._n))
            self._sync()
            self._publish()

    def _publish(self) -> None:
        """At the first commit: rename the temporary file to its final name, durably."""
        if self._tmp is None:
            return

        def still_replaceable(temp: str) -> None:  # (a non-flowmc file may have appeared)
            check_output(self.path, force=self._force, lock_held=True)

        try:  # atomic; replaces an old ensemble under --force
            self._staged.replace(verify=still_replaceable)
        except OSError as e:
            self._keep_tmp = True
            raise _os_error(
                f"Cannot give the new ensemble its name {self.path!r}: {e.strerror or e}; its "
                f"first commit (n = {self._n} rows per chain) is kept in {self._tmp!r}", e.errno
            ) from None
        self._tmp = None
        self._io.path = self.path
        durable.fsync_dir(self.path)  # make the new name durable

    def _check_state(
        self, state: Mapping[str, Any], attrs: Mapping[str, Any] | None
    ) -> tuple[dict[str, np.ndarray], str]:
        if not isinstance(state, Mapping):
            raise ValueError(f"Expected state to be a dict of arrays; got {type(state).__name__}")
        out = {}
        for name, x in state.items():
            x = np.asarray(_to_numpy(x), order="C")
            if x.dtype.kind not in "biufc":
                raise ValueError(f"Expected numeric state array {name!r}; got dtype {x.dtype}")
            out[_check_name("state", name)] = x
        return out, json_dumps("state_attrs", dict(attrs or {}))

    def _write_state(
        self, arrays: dict[str, np.ndarray], attrs_json: str, n: int | None
    ) -> h5py.Group:
        """Write ``arrays`` into the non-committed slot; mark it for ``n`` (or invalid if None)."""
        f = self._file()
        current = _valid_slot(f, self._n)
        slots = schema.SLOTS
        name = slots[0] if current is None or current.name.endswith(slots[1]) else slots[1]
        g = f[f"state/{name}"]
        g.attrs.modify("n", np.int64(-1))
        g.attrs.modify("seq", np.int64(-1))
        for key in list(g.keys()):
            if key not in arrays:
                del g[key]
        for key, x in arrays.items():
            ds = g.get(key)
            if ds is not None and (ds.shape != x.shape or ds.dtype != x.dtype):
                del g[key]
                ds = None
            if ds is None:
                g.create_dataset(key, data=x)
            elif x.size:
                ds[()] = x
        g.attrs["attrs_json"] = attrs_json
        g.attrs.modify("seq", np.int64(self._seq))
        self._seq += 1
        if n is not None:
            g.attrs.modify("n", np.int64(n))
        return g

    def load_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The sampler state saved with the last committed rows: ``(arrays, attrs)``.

        Raises:
            LookupError: if no state was saved yet.
        """
        return _read_slot(_valid_slot(self._file(), self._n), self.path)

    @property
    def has_state(self) -> bool:
        """Whether a committed sampler state exists."""
        return _valid_slot(self._file(), self._n) is not None

    def close(self) -> None:
        """Close the file and release the name (idempotent).

        A writer closed before its first commit removes its temporary file, so ``path`` stays
        as it was. A poisoned writer closes without touching the file again.

        Raises:
            OSError: if the final flush of a healthy, published writer fails (its commits are
                on disk regardless).
        """
        if self._f is None:
            return
        f, self._f = self._f, None
        EnsembleWriter._open.discard(self)
        problem: BaseException | None = None
        try:
            if self._io.error is None and self._tmp is None:
                # No write failed, so HDF5's structures are whole (even if a commit was cut
                # short by another error): flush everything, then declare the file clean.
                try:
                    f.flush()
                    self._io.sync()
                    self._io.check()
                    f.attrs.modify("writing", np.int64(0))
                    f.flush()
                    self._io.sync()
                except Exception as e:  # noqa: BLE001 - reported below
                    problem = e
            try:
                f.close()
            except Exception as e:  # noqa: BLE001 - reported below
                problem = e
            self._io.trim()
            self._io.sync()
            problem = problem or self._io.error
        finally:
            self._io.close()
            if self._tmp is not None and not self._keep_tmp:
                with contextlib.suppress(OSError):
                    os.unlink(self._tmp)
            self._lock.release()
            _LAST_COMMIT[os.path.abspath(self.path)] = (self._n, self._tmp is None)
        if problem is not None and self._failure is None and self._tmp is None:
            raise _os_error(
                f"Closing ensemble {self.path!r} failed: "
                f"{getattr(problem, 'strerror', None) or problem}; its last commit (n = "
                f"{self._n} rows per chain) was already on disk",
                getattr(problem, "errno", None),
            )

    def __enter__(self) -> EnsembleWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Safety net for a caller that lost an open writer on an error path: remove the
        # temporary file and release the name (nothing committed is touched).
        if getattr(self, "_f", None) is not None:
            with contextlib.suppress(Exception):
                self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"n={self._n}"
        if self.failed:
            state += ", failed"
        return f"EnsembleWriter({self.path!r}, {state}, C={self.n_chains}, L={self.lattice_shape})"


def check_output(path: str | os.PathLike[str], *, force: bool, lock_held: bool = False) -> bool:
    """Check that a new ensemble may be written to ``path`` (see :meth:`EnsembleWriter.create`).

    Call it early (before expensive work) for a clear error; :meth:`EnsembleWriter.create`
    checks again.

    Returns:
        Whether ``path`` exists (and will be replaced at the first commit).

    Raises:
        FileExistsError: if ``path`` exists and ``force`` is false, or it is not a regular file
            holding a flowmc ensemble.
        BlockingIOError: if another process holds ``path`` open.
    """
    return durable.check_replaceable(
        os.fspath(path), force=force, what="flowmc ensemble", identify=_identify_ensemble,
        lock_held=lock_held,
    )


# --------------------------------------------------------------------------- reader


class _Rows:
    """Lazy view of the first ``n`` rows of an h5py dataset; slicing reads from disk."""

    def __init__(self, ds: h5py.Dataset, n: int) -> None:
        self._ds, self._n = ds, n

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._n, *self._ds.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self._ds.dtype

    @property
    def ndim(self) -> int:
        return self._ds.ndim

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        first, rest = (key[0], key[1:]) if key else (slice(None), ())
        if first is Ellipsis:
            first, rest = slice(None), (Ellipsis, *rest)
        if isinstance(first, slice):
            start, stop, step = first.indices(self._n)
            if step > 0:
                return self._ds[(slice(start, max(start, stop), step), *rest)]
            idx = np.arange(start, stop, step)
            return (
                self._ds[(slice(0, self._n), *rest)][idx]
                if idx.size
                else self._ds[(slice(0, 0), *rest)]
            )
        if isinstance(first, (int, np.integer)):
            i = int(first)
            if not -self._n <= i < self._n:
                raise IndexError(f"row {i} out of range for {self._n} committed rows")
            return self._ds[(i % self._n, *rest)]
        idx = np.asarray(first)
        if idx.dtype == np.bool_:
            if idx.shape != (self._n,):
                raise IndexError(f"boolean row mask must have shape ({self._n},); got {idx.shape}")
            idx = np.flatnonzero(idx)
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < -self._n or idx.max() >= self._n):
            raise IndexError(f"row index out of range for {self._n} committed rows")
        idx = idx % self._n if self._n else idx
        uniq, inv = np.unique(idx, return_inverse=True)  # h5py needs increasing indices
        return self._ds[(uniq, *rest)][inv.reshape(idx.shape)]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        x = self._ds[: self._n]
        return x if dtype is None else x.astype(dtype)

    def __repr__(self) -> str:
        return f"<flowmc rows view {self._ds.name!r} shape={self.shape} dtype={self.dtype}>"


def check_join(f: h5py.File, path: str, attrs: dict[str, Any]) -> None:
    """Check that the join ``path`` (open as ``f``, root attributes ``attrs``) reads its shards.

    Called by :class:`Ensemble` when it opens a file with a ``shards``
    attribute. Each shard named there must be a regular file below the join's directory, a
    readable flowmc ensemble of the same job, the join's rank, first chain and chain count, with
    at least the join's ``n`` committed rows and the join's lattice and scalars; every virtual
    dataset must map exactly these files, in rank order.

    Raises:
        ValueError: naming ``path`` and the problem (a missing or foreign shard, ...).
        OSError: if a shard is locked by a running sampler.
    """

    def bad(problem: str) -> ValueError:
        return ValueError(f"{path!r} (the join of a sharded ensemble): {problem}")

    rec = attrs["shards"]
    job, files = rec.get("job"), rec.get("files")
    if not isinstance(job, str) or not isinstance(files, list) or not files or not all(
        isinstance(e, dict) for e in files
    ):
        raise bad("its 'shards' attribute has no job and files (corrupt or hand-edited file?)")
    base = os.path.dirname(os.path.abspath(path))
    n, C = attrs["n"], attrs["n_chains"]
    first = attrs["sampler"].get("first_chain", 0)
    total = 0
    for r, e in enumerate(files):
        rel = e.get("path")
        if not isinstance(rel, str) or os.path.isabs(rel) or ".." in Path(rel).parts:
            raise bad(f"shard {r} has the path {rel!r}; expected a path inside the join's folder")
        full = os.path.join(base, rel)
        kind = safeio.sniff(full)
        if kind.kind == "missing":
            raise bad(f"its shard {rel!r} (rank {r}) is missing; the join reads every shard")
        if kind.kind != "ensemble":
            raise bad(f"its shard {rel!r} (rank {r}) is {kind.what}")
        g = _open_h5(full, "r")
        try:
            sa = _validate_root(g, full)
        finally:
            g.close()
        sh = (sa.get("meta") or {}).get("shard") or {}
        if "shards" in sa:
            raise bad(f"its shard {rel!r} is itself a join")
        if sh.get("job") != job:
            raise bad(f"mismatched shards: {rel!r} belongs to another run (job "
                      f"{sh.get('job')!r}; the join's is {job!r})")  # fmt: skip
        if sh.get("rank") != r or sa["sampler"].get("first_chain") != first or sa[
            "n_chains"
        ] != e.get("chains"):
            raise bad(f"mismatched shards: {rel!r} is rank {sh.get('rank')} with chains "
                      f"{sa['sampler'].get('first_chain')}+{sa['n_chains']}, expected rank {r} "
                      f"with chains {first}+{e.get('chains')}")  # fmt: skip
        if sa["n"] < n:
            raise bad(f"its shard {rel!r} holds n = {sa['n']} committed rows, fewer than the "
                      f"join's n = {n}")  # fmt: skip
        for key in ("lattice_shape", "scalar_names", "store_configs", "config_dtype"):
            if sa.get(key) != attrs.get(key):
                raise bad(f"mismatched shards: {rel!r} has {key} {sa.get(key)!r}, the join "
                          f"{attrs.get(key)!r}")  # fmt: skip
        first += sa["n_chains"]
        total += sa["n_chains"]
    if total != C:
        raise bad(f"its shards hold {total} chains, but n_chains = {C}")
    for name in schema.row_datasets(store_configs=attrs["store_configs"],
                                    scalar_names=attrs["scalar_names"]):
        ds = f[name]
        got = [(m.file_name, m.dset_name.lstrip("/")) for m in ds.virtual_sources()] if (
            ds.is_virtual) else []  # fmt: skip
        if got != [(e["path"], name) for e in files]:
            raise bad(f"dataset {name!r} does not map the shards listed in its 'shards' "
                      "attribute (corrupt or hand-edited file?)")  # fmt: skip


class Ensemble:
    """Read-only, lazy access to an ensemble file; see :func:`open_ensemble`.

    Only the first ``n`` (committed) rows of every dataset are visible.

    Attributes:
        path: the file path.
        n: committed configurations per chain.
        n_chains: number of chains ``C``.
        lattice_shape: lattice extents ``L``.
        action: action parameters (dict).
        sampler: sampler name and settings (dict).
        model_sha256: SHA-256 of the flow checkpoint, or ``""``.
        seed: the run's seed or ``None``.
        meta: further metadata (dict).
        attrs: every root attribute, decoded (JSON strings parsed, arrays as tuples).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._f: h5py.File | None = _open_h5(self.path, "r")
        try:
            self.attrs: dict[str, Any] = _validate_root(self._f, self.path)
            if "shards" in self.attrs:  # the join of a sharded run: check every shard behind it
                check_join(self._f, self.path, self.attrs)
        except BaseException:
            self._f.close()
            self._f = None
            raise
        a = self.attrs
        self._k = int(a.pop("_n_chunks"))
        self.n: int = a["n"]
        self.n_chains: int = int(a["n_chains"])
        self.lattice_shape: tuple[int, ...] = a["lattice_shape"]
        self.action: dict[str, Any] = a.get("action", {})
        self.sampler: dict[str, Any] = a.get("sampler", {})
        self.model_sha256: str = a.get("model_sha256", "")
        self.seed: int | None = a.get("seed")
        self.meta: dict[str, Any] = a.get("meta", {})
        self.scalar_names: tuple[str, ...] = tuple(a["scalar_names"])
        self.has_configs: bool = a["store_configs"]

    def _file(self) -> h5py.File:
        if self._f is None:
            raise RuntimeError(f"Ensemble {self.path!r} is closed")
        return self._f

    @property
    def configs(self) -> _Rows:
        """Lazy ``(n, C, *L)`` view; index it (``ens.configs[a:b]``) to read from disk.

        Raises:
            ValueError: if the file was written with ``store_configs=False``.
        """
        if not self.has_configs:
            raise ValueError(
                f"{self.path!r} stores no configurations (written with store_configs=False)"
            )
        return _Rows(self._file()["configs"], self.n)

    def scalar(self, name: str) -> np.ndarray:
        """The per-configuration scalar ``name`` as an ``(n, C)`` array."""
        if name not in self.scalar_names:
            raise KeyError(
                f"{self.path!r} has no scalar {name!r}; available: {list(self.scalar_names)}"
            )
        return self._file()[f"scalars/{name}"][: self.n]

    def iter_configs(
        self, chunk: int = 1024, *, start: int = 0, stop: int | None = None
    ) -> Iterator[np.ndarray]:
        """Yield configurations ``(k, C, *L)`` in blocks of ``chunk`` rows, from disk.

        Args:
            chunk: rows per block (``k <= chunk``).
            start: first row.
            stop: row after the last one (default ``n``).
        """
        if int(chunk) != chunk or chunk < 1:
            raise ValueError(f"Expected chunk >= 1; got {chunk!r}")
        rows = self.configs
        start, stop, _ = slice(start, stop).indices(self.n)
        for a in range(start, stop, int(chunk)):
            yield rows[a : min(a + int(chunk), stop)]

    @property
    def chunk_wall_times(self) -> np.ndarray:
        """Seconds spent on each committed chunk, ``(k,)``."""
        return self._file()["chunks/wall_time"][: self._n_chunks()]

    @property
    def chunk_ends(self) -> np.ndarray:
        """Row index after each committed chunk, ``(k,)``; the last equals ``n``."""
        return self._file()["chunks/end"][: self._n_chunks()]

    def _n_chunks(self) -> int:
        return self._k

    @property
    def has_state(self) -> bool:
        """Whether a committed sampler state exists."""
        return _valid_slot(self._file(), self.n) is not None

    def load_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The sampler state saved with the last committed rows: ``(arrays, attrs)``.

        Raises:
            LookupError: if no state was saved.
        """
        return _read_slot(_valid_slot(self._file(), self.n), self.path)

    def _read_only(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(
            f"Ensemble {self.path!r} is opened read-only; use EnsembleWriter.resume(path) to write"
        )

    append = save_state = _read_only

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> Ensemble:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Ensemble({self.path!r}, n={self.n}, C={self.n_chains}, L={self.lattice_shape}, "
            f"sampler={self.sampler.get('name')!r})"
        )


def open_ensemble(path: str | os.PathLike[str]) -> Ensemble:
    """Open an ensemble file read-only (for analysis).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if it is not a flowmc ensemble, is corrupt, or has a newer schema version.
        ImportError: if h5py is not installed.
    """
    return Ensemble(path)
