r"""HDF5 storage of Markov chain ensembles: one file per run, crash-safe appends, exact resume.

Both samplers (flow independence Metropolis-Hastings and HMC) write through
:class:`EnsembleWriter`; analysis reads through :class:`Ensemble` (read-only, lazy). The layer is
sampler-agnostic: it stores arrays and JSON metadata. The schema (``schema_version`` 1) is
documented in ``docs/ensemble-format.md``; files are readable with plain ``h5py``.

Layout (``n`` configurations per chain, ``C`` chains, lattice ``L``)::

    /                       attrs: format, schema_version, n, lattice_shape, n_chains, action, ...
    /configs                (n, C, *L)  float32 | float64   (absent when store_configs=False)
    /scalars/<name>         (n, C)      float64 (bool for ``accepted`` / ``is_accepted``)
    /chunks/wall_time       (k,)        float64 seconds spent on each appended chunk
    /chunks/end             (k,)        int64   row index after each chunk
    /state/slot0, slot1     sampler state, double-buffered (attrs n, seq, attrs_json)

Crash safety: the root attribute ``n`` is the only source of truth. :meth:`EnsembleWriter.append`
writes rows, chunk timing and the sampler state, flushes, and only then updates ``n`` and flushes
again, so a process killed at any moment leaves a file whose first ``n`` rows and state are those
of the last completed :meth:`~EnsembleWriter.append`. Rows beyond ``n`` are ignored on read and
truncated on resume.

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

import hashlib
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np

try:  # h5py is a declared dependency, but keep the module importable without it.
    import h5py
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    h5py = None

__all__ = [
    "SCHEMA_VERSION",
    "FORMAT",
    "EnsembleWriter",
    "Ensemble",
    "open_ensemble",
    "file_sha256",
]

FORMAT = "flowmc-ensemble"
SCHEMA_VERSION = 1

#: Scalar names stored as booleans; every other per-configuration scalar is float64.
BOOL_SCALARS = frozenset({"accepted", "is_accepted"})
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
_CONFIG_DTYPES = ("float32", "float64")
_COMPRESSIONS = (None, "gzip", "lzf")
_SLOTS = ("slot0", "slot1")
_MAX_CHUNK_BYTES = 4 * 2**20  # cap on one HDF5 chunk of configs
_MAX_ATTR_BYTES = 60_000  # compact HDF5 attributes must stay below 64 KiB
_CHUNK_CACHE_BYTES = 64 * 2**20


def _require_h5py() -> None:
    if h5py is None:
        raise ImportError("install h5py to use flowmc ensembles")


def _flowmc_version() -> str:
    mod = sys.modules.get("flowmc")
    version = getattr(mod, "__version__", None)
    if version is not None:
        return str(version)
    try:  # pragma: no cover - only when this file is loaded outside the package
        from importlib.metadata import version as _v

        return _v("flowmc")
    except Exception:  # pragma: no cover
        return "unknown"


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


def _json_dumps(name: str, value: Any) -> str:
    try:
        text = json.dumps(value, sort_keys=True, allow_nan=True, default=_json_default)
    except (TypeError, ValueError) as e:
        raise ValueError(f"Expected {name} to be JSON-serialisable; got {value!r} ({e})") from None
    if len(text.encode()) > _MAX_ATTR_BYTES:
        raise ValueError(
            f"Expected {name} to serialise to at most {_MAX_ATTR_BYTES} bytes of JSON; "
            f"got {len(text.encode())}"
        )
    return text


def _json_normalise(value: Any) -> Any:
    """Round-trip through JSON so that tuples/lists and numpy scalars compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=_json_default))


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


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


def _open_h5(path: str, mode: str) -> h5py.File:
    """Open ``path`` with h5py, turning every low-level failure into a clear error."""
    _require_h5py()
    if not os.path.exists(path):
        raise FileNotFoundError(f"No flowmc ensemble at {path!r}: file does not exist")
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
    """Check format and schema version; return the decoded root attributes."""
    try:
        raw = dict(f.attrs.items())
    except (OSError, RuntimeError, KeyError) as e:
        raise ValueError(f"{path!r} is not a readable flowmc ensemble (corrupt file?): {e}") from e
    fmt = _decode(raw.get("format"))
    if fmt != FORMAT:
        what = "is missing" if fmt is None else f"is {fmt!r}"
        raise ValueError(
            f"{path!r} is not a flowmc ensemble: root attribute 'format' {what} "
            f"(expected {FORMAT!r})"
        )
    version = _decode(raw.get("schema_version"))
    if not isinstance(version, int):
        raise ValueError(f"{path!r}: invalid or missing 'schema_version' attribute {version!r}")
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"{path!r} has schema_version {version}, but this flowmc (version "
            f"{_flowmc_version()}) supports schema_version <= {SCHEMA_VERSION}; upgrade flowmc"
        )
    attrs: dict[str, Any] = {}
    for key, value in raw.items():
        value = _decode(value)
        if key in ("action", "sampler", "meta", "scalar_names"):
            try:
                value = json.loads(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path!r}: root attribute {key!r} is not valid JSON: {e}") from e
        attrs[key] = value
    if attrs.get("seed") == -1:
        attrs["seed"] = None
    n = attrs.get("n")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"{path!r}: invalid or missing root attribute 'n' ({n!r})")
    for key in ("lattice_shape", "n_chains", "scalar_names", "store_configs"):
        if key not in attrs:
            raise ValueError(f"{path!r}: missing root attribute {key!r} (corrupt file?)")
    attrs["lattice_shape"] = tuple(int(s) for s in attrs["lattice_shape"])
    attrs["store_configs"] = bool(attrs["store_configs"])
    # Every dataset must hold at least n rows.
    names = ["configs"] if attrs["store_configs"] else []
    names += [f"scalars/{s}" for s in attrs["scalar_names"]]
    for name in names:
        if name not in f or f[name].shape[0] < n:
            have = f[name].shape[0] if name in f else "missing"
            raise ValueError(
                f"{path!r}: dataset {name!r} has {have} rows but n = {n} (corrupt file?)"
            )
    return attrs


def _valid_slot(f: h5py.File, n: int) -> h5py.Group | None:
    """The state slot that belongs to the committed ``n`` (highest ``seq`` wins), or ``None``."""
    best, best_seq = None, -1
    state = f.get("state")
    if state is None:
        return None
    for name in _SLOTS:
        g = state.get(name)
        if g is None:
            continue
        slot_n, seq = int(g.attrs.get("n", -1)), int(g.attrs.get("seq", -1))
        if slot_n == n and seq > best_seq:
            best, best_seq = g, seq
    return best


def _read_slot(g: h5py.Group | None, path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if g is None:
        raise LookupError(f"{path!r} holds no sampler state for its committed rows")
    arrays = {name: np.asarray(ds[()]) for name, ds in g.items()}
    return arrays, json.loads(_decode(g.attrs["attrs_json"]))


# --------------------------------------------------------------------------- writer


class EnsembleWriter:
    """Append-only writer of one ensemble file; create with :meth:`create` or :meth:`resume`.

    Not constructed directly. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, f: h5py.File, path: str, attrs: dict[str, Any]) -> None:
        self._f: h5py.File | None = f
        self.path = path
        self._n = int(attrs["n"])
        self.lattice_shape: tuple[int, ...] = tuple(attrs["lattice_shape"])
        self.n_chains = int(attrs["n_chains"])
        self.scalar_names: tuple[str, ...] = tuple(attrs["scalar_names"])
        self.store_configs = bool(attrs["store_configs"])
        self._seq = 0
        for name in _SLOTS:
            g = f.get(f"state/{name}")
            if g is not None:
                self._seq = max(self._seq, int(g.attrs.get("seq", -1)) + 1)

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
        """Create a new, empty ensemble file.

        Args:
            path: output file. An existing file is only replaced when ``force=True``.
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
            force: replace an existing file.
            command_line: recorded command line; defaults to ``sys.argv``.

        Returns:
            An open writer with ``n == 0``.

        Raises:
            FileExistsError: if ``path`` exists and ``force`` is false.
            ValueError: on invalid arguments.
            ImportError: if h5py is not installed.
        """
        _require_h5py()
        path = os.fspath(path)
        shape = tuple(int(s) for s in lattice_shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(
                f"Expected lattice_shape of positive extents; got {tuple(lattice_shape)}"
            )
        if int(n_chains) != n_chains or n_chains < 1:
            raise ValueError(f"Expected n_chains >= 1; got {n_chains!r}")
        n_chains = int(n_chains)
        if isinstance(scalar_names, str):
            raise ValueError(
                f"Expected scalar_names to be a sequence of names; got {scalar_names!r}"
            )
        names = tuple(_check_name("scalar", s) for s in scalar_names)
        if len(set(names)) != len(names):
            raise ValueError(f"Expected unique scalar_names; got {names}")
        if config_dtype not in _CONFIG_DTYPES:
            raise ValueError(f"Expected config_dtype in {_CONFIG_DTYPES}; got {config_dtype!r}")
        if compression not in _COMPRESSIONS:
            raise ValueError(f"Expected compression in {_COMPRESSIONS}; got {compression!r}")
        if int(chunk_size) != chunk_size or chunk_size < 1:
            raise ValueError(f"Expected chunk_size >= 1; got {chunk_size!r}")
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
        action_json = _json_dumps("action", dict(action))
        sampler_json = _json_dumps("sampler", dict(sampler))
        meta_json = _json_dumps("meta", dict(meta or {}))
        if command_line is None:
            command_line = " ".join(shlex.quote(a) for a in sys.argv)
        command_line = str(command_line)[: _MAX_ATTR_BYTES // 4]

        if os.path.lexists(path):
            if not force:
                raise FileExistsError(
                    f"Refusing to overwrite existing file {path!r}; pass --force (force=True) "
                    "to replace it, or resume it instead"
                )
            if os.path.isdir(path):
                raise ValueError(f"{path!r} is a directory; cannot replace it with an ensemble")
            os.remove(path)

        f = h5py.File(path, "w-", rdcc_nbytes=_CHUNK_CACHE_BYTES)
        try:
            a = f.attrs
            # 'n' first so that it sits early in the root object header.
            a.create("n", np.int64(0))
            a["format"] = FORMAT
            a["schema_version"] = np.int64(SCHEMA_VERSION)
            a["flowmc_version"] = _flowmc_version()
            a["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            a["command_line"] = command_line
            a["lattice_shape"] = np.asarray(shape, dtype=np.int64)
            a["n_chains"] = np.int64(n_chains)
            a["action"] = action_json
            a["sampler"] = sampler_json
            a["model_sha256"] = model_sha256
            a["seed"] = np.int64(-1 if seed is None else int(seed))
            a["meta"] = meta_json
            a["scalar_names"] = json.dumps(list(names))
            a["store_configs"] = np.bool_(store_configs)
            a["config_dtype"] = config_dtype
            a["compression"] = compression or ""

            rows = int(chunk_size)
            if store_configs:
                row_bytes = n_chains * math.prod(shape) * np.dtype(config_dtype).itemsize
                # A compressed chunk that is rewritten moves on disk, and a kill while that is
                # flushed can destroy rows it already held. One row per chunk means committed
                # compressed chunks are never rewritten. Uncompressed chunks are rewritten in
                # place with identical bytes for committed rows, which is safe.
                crow = 1 if compression else max(1, min(rows, _MAX_CHUNK_BYTES // row_bytes))
                f.create_dataset(
                    "configs",
                    shape=(0, n_chains, *shape),
                    maxshape=(None, n_chains, *shape),
                    dtype=config_dtype,
                    chunks=(crow, n_chains, *shape),
                    compression=compression,
                    shuffle=compression is not None,
                )
            g = f.create_group("scalars")
            for s in names:
                g.create_dataset(
                    s,
                    shape=(0, n_chains),
                    maxshape=(None, n_chains),
                    dtype=np.bool_ if s in BOOL_SCALARS else np.float64,
                    chunks=(rows, n_chains),
                )
            c = f.create_group("chunks")
            c.create_dataset(
                "wall_time", shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(256,)
            )
            c.create_dataset("end", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(256,))
            st = f.create_group("state")
            for slot in _SLOTS:
                sg = st.create_group(slot)
                sg.attrs.create("n", np.int64(-1))
                sg.attrs.create("seq", np.int64(-1))
                sg.attrs["attrs_json"] = "{}"
            f.flush()
            attrs = _validate_root(f, path)
        except BaseException:
            f.close()
            raise
        return cls(f, path, attrs)

    @classmethod
    def resume(
        cls, path: str | os.PathLike[str], *, expect: Mapping[str, Any] | None = None
    ) -> EnsembleWriter:
        """Reopen an ensemble for appending; rows beyond the committed ``n`` are truncated.

        Args:
            path: an existing ensemble file.
            expect: values the file must hold, keyed by any of ``lattice_shape``, ``n_chains``,
                ``action``, ``sampler``, ``model_sha256``, ``seed``, ``scalar_names``,
                ``store_configs``, ``config_dtype``. Dicts compare after a JSON round trip.

        Returns:
            An open writer positioned after the last committed row.

        Raises:
            ValueError: if the file is not a (supported) flowmc ensemble, or an expected value
                differs (the message names the key, the stored and the given value).
            FileNotFoundError: if ``path`` does not exist.
        """
        path = os.fspath(path)
        expect = dict(expect or {})
        unknown = set(expect) - set(EXPECT_KEYS)
        if unknown:
            raise ValueError(f"Unknown expect keys {sorted(unknown)}; allowed: {list(EXPECT_KEYS)}")
        f = _open_h5(path, "r+")
        try:
            attrs = _validate_root(f, path)
            for key, given in expect.items():
                stored = attrs.get(key)
                if key == "lattice_shape":
                    ok = tuple(stored) == tuple(int(s) for s in given)
                elif key == "scalar_names":
                    ok = list(stored) == list(given)
                else:
                    ok = _json_normalise(stored) == _json_normalise(given)
                if not ok:
                    raise ValueError(
                        f"Cannot resume {path!r}: {key} mismatch: "
                        f"stored {stored!r}, given {given!r}"
                    )
            writer = cls(f, path, attrs)
            writer._truncate()
        except BaseException:
            f.close()
            raise
        return writer

    # ---------------------------------------------------------------- properties

    @property
    def n(self) -> int:
        """Committed configurations per chain."""
        return self._n

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._f is None

    def _file(self) -> h5py.File:
        if self._f is None:
            raise RuntimeError(f"EnsembleWriter for {self.path!r} is closed")
        return self._f

    def _truncate(self) -> None:
        """Cut every dataset back to the committed ``n`` rows (and committed chunks)."""
        f = self._file()
        n = self._n
        names = (["configs"] if self.store_configs else []) + [
            f"scalars/{s}" for s in self.scalar_names
        ]
        for name in names:
            if f[name].shape[0] != n:
                f[name].resize(n, axis=0)
        ends = f["chunks/end"][()]
        k = int(np.searchsorted(ends, n, side="right")) if len(ends) else 0
        for name in ("chunks/end", "chunks/wall_time"):
            if f[name].shape[0] != k:
                f[name].resize(k, axis=0)
        f.flush()

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

        Rows, timing and state are written and flushed first; the root attribute ``n`` is
        updated and flushed last, so a crash leaves either the old or the new ``n``, never a mix.

        Args:
            scalars: every name of ``scalar_names`` mapped to an array ``(k, C)``.
            configs: field configurations ``(k, C, *L)`` (numpy or torch); required when the
                file stores configurations, ignored otherwise.
            state: sampler state after the last row, name to array (numpy or torch), e.g.
                ``{"phi": (C, *L), "action": (C,), "rng": torch_generator.get_state()}``.
            state_attrs: small JSON-serialisable scalars of the state (``{"step": 123}``).
            wall_time: seconds spent producing this chunk.

        Raises:
            ValueError: on missing/extra scalars or wrong shapes.
            RuntimeError: if the writer is closed.
        """
        f = self._file()
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
        wall_time = float(wall_time)
        if not math.isfinite(wall_time) or wall_time < 0:
            raise ValueError(f"Expected a finite wall_time >= 0; got {wall_time}")
        state_arrays, attrs_json = self._check_state(state, state_attrs)

        n_old, n_new = self._n, self._n + k
        # 1. rows (datasets may be longer than n after a failed append: resize, then overwrite)
        if cfg is not None:
            ds = f["configs"]
            ds.resize(n_new, axis=0)
            ds[n_old:n_new] = cfg.astype(ds.dtype, copy=False)
        for name, x in arrays.items():
            ds = f[f"scalars/{name}"]
            ds.resize(n_new, axis=0)
            ds[n_old:n_new] = x
        # 2. chunk timing
        end, wt = f["chunks/end"], f["chunks/wall_time"]
        nk = int(np.searchsorted(end[()], n_old, side="right")) if end.shape[0] else 0
        for ds, value in ((end, n_new), (wt, wall_time)):
            ds.resize(nk + 1, axis=0)
            ds[nk] = value
        # 3. state, into the slot that is not the committed one; valid only once n == n_new
        self._write_state(state_arrays, attrs_json, n_new)
        f.flush()
        # 4. commit
        f.attrs.modify("n", np.int64(n_new))
        f.flush()
        self._n = n_new

    def save_state(self, state: Mapping[str, Any], attrs: Mapping[str, Any] | None = None) -> None:
        """Replace the sampler state without adding rows (e.g. after thermalisation).

        Crash-safe like :meth:`append`: until the call returns, the previous state stays valid.
        """
        f = self._file()
        state_arrays, attrs_json = self._check_state(state, attrs)
        slot = self._write_state(state_arrays, attrs_json, None)
        f.flush()
        slot.attrs.modify("n", np.int64(self._n))
        f.flush()

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
        return out, _json_dumps("state_attrs", dict(attrs or {}))

    def _write_state(
        self, arrays: dict[str, np.ndarray], attrs_json: str, n: int | None
    ) -> h5py.Group:
        """Write ``arrays`` into the non-committed slot; mark it for ``n`` (or invalid if None)."""
        f = self._file()
        current = _valid_slot(f, self._n)
        name = _SLOTS[0] if current is None or current.name.endswith(_SLOTS[1]) else _SLOTS[1]
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
        """Flush and close the file (idempotent)."""
        if self._f is not None:
            try:
                self._f.flush()
            finally:
                self._f.close()
                self._f = None

    def __enter__(self) -> EnsembleWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"n={self._n}"
        return f"EnsembleWriter({self.path!r}, {state}, C={self.n_chains}, L={self.lattice_shape})"


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
        except BaseException:
            self._f.close()
            self._f = None
            raise
        a = self.attrs
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
        ends = self._file()["chunks/end"][()]
        return int(np.searchsorted(ends, self.n, side="right")) if len(ends) else 0

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
