r"""The schema of an ensemble file: its root attributes and its datasets, written down once.

Every writer of an ensemble (:meth:`flowmc.io.ensemble.EnsembleWriter.create`, the rebuild of a
file not closed cleanly, the join of a sharded run in :mod:`flowmc.io.join`) takes the names,
types and layout from here, and the reader (:class:`flowmc.io.ensemble.Ensemble`) checks against
the same lists. The format is documented in ``docs/ensemble-format.md`` (``schema_version`` 1)::

    /                       root attributes (ROOT_ATTRS), 'n' first
    /configs                (n, C, *L)  float32 | float64   (absent when store_configs=False)
    /scalars/<name>         (n, C)      float64 (bool for BOOL_SCALARS)
    /chunks/wall_time       (k,)        float64
    /chunks/end             (k,)        int64
    /state/slot0, slot1     sampler state, double-buffered (attrs n, seq, attrs_json)

Example:
    >>> row_datasets(store_configs=True, scalar_names=["action", "accepted"])
    ['configs', 'scalars/action', 'scalars/accepted']
    >>> scalar_dtype("accepted"), scalar_dtype("action")
    (dtype('bool'), dtype('float64'))
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flowmc.io.formats import ENSEMBLE_FORMAT, ENSEMBLE_SCHEMA_VERSION

__all__ = [
    "FORMAT",
    "SCHEMA_VERSION",
    "ROOT_ATTRS",
    "JSON_ATTRS",
    "BOOL_SCALARS",
    "CONFIG_DTYPES",
    "COMPRESSIONS",
    "CHUNK_DATASETS",
    "SLOTS",
    "MAX_ATTR_BYTES",
    "row_datasets",
    "datasets",
    "scalar_dtype",
    "json_dumps",
    "json_normalise",
    "root_attrs",
    "write_root",
    "create_layout",
    "empty_slot",
]

#: The root attribute ``format`` of every ensemble file.
FORMAT = ENSEMBLE_FORMAT
#: The schema version this flowmc writes (and the newest it reads).
SCHEMA_VERSION = ENSEMBLE_SCHEMA_VERSION

#: The root attributes, in the order a writer creates them (``shards`` only in a join).
ROOT_ATTRS = (
    "n",  # committed rows per chain: the commit record (first, early in the object header)
    "format",
    "schema_version",
    "flowmc_version",
    "created",
    "command_line",
    "lattice_shape",
    "n_chains",
    "action",
    "sampler",
    "model_sha256",
    "seed",
    "meta",
    "scalar_names",
    "store_configs",
    "config_dtype",
    "compression",
    "writing",  # 1 while a writer has the file open; 0 after a clean close
    "shards",
)
#: Root attributes stored as JSON text.
JSON_ATTRS = ("action", "sampler", "meta", "scalar_names", "shards")
#: Scalar names stored as booleans; every other per-configuration scalar is float64.
BOOL_SCALARS = frozenset({"accepted", "is_accepted"})
#: Storage dtypes of configurations.
CONFIG_DTYPES = ("float32", "float64")
#: Compressions of configurations (``None`` is stored as ``""``).
COMPRESSIONS = (None, "gzip", "lzf")
#: The chunk record: one entry per commit.
CHUNK_DATASETS = ("chunks/end", "chunks/wall_time")
#: The two state slots (double buffer).
SLOTS = ("slot0", "slot1")
#: Compact HDF5 attributes must stay below 64 KiB.
MAX_ATTR_BYTES = 60_000
_MAX_CHUNK_BYTES = 4 * 2**20  # cap on one HDF5 chunk of configs


def row_datasets(*, store_configs: bool, scalar_names: Sequence[str]) -> list[str]:
    """The datasets with one row per configuration: ``configs`` (if stored), ``scalars/*``."""
    return (["configs"] if store_configs else []) + [f"scalars/{s}" for s in scalar_names]


def datasets(*, store_configs: bool, scalar_names: Sequence[str]) -> list[str]:
    """Every dataset of an ensemble: :func:`row_datasets`, then :data:`CHUNK_DATASETS`."""
    rows = row_datasets(store_configs=store_configs, scalar_names=scalar_names)
    return rows + list(CHUNK_DATASETS)


def scalar_dtype(name: str) -> np.dtype:
    """The storage dtype of scalar ``name``: bool for :data:`BOOL_SCALARS`, else float64."""
    return np.dtype(np.bool_) if name in BOOL_SCALARS else np.dtype(np.float64)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


def json_dumps(name: str, value: Any) -> str:
    """``value`` as the JSON text of a root attribute (sorted keys; at most 60,000 bytes).

    Raises:
        ValueError: naming ``name``, if ``value`` is not JSON-serialisable or too long.
    """
    try:
        text = json.dumps(value, sort_keys=True, allow_nan=True, default=_json_default)
    except (TypeError, ValueError) as e:
        raise ValueError(f"Expected {name} to be JSON-serialisable; got {value!r} ({e})") from None
    if len(text.encode()) > MAX_ATTR_BYTES:
        raise ValueError(
            f"Expected {name} to serialise to at most {MAX_ATTR_BYTES} bytes of JSON; "
            f"got {len(text.encode())}"
        )
    return text


def json_normalise(value: Any) -> Any:
    """Round-trip through JSON so that tuples/lists and numpy scalars compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=_json_default))


def root_attrs(
    *,
    n: int,
    lattice_shape: Sequence[int],
    n_chains: int,
    action: Mapping[str, Any] | str,
    sampler: Mapping[str, Any] | str,
    meta: Mapping[str, Any] | str,
    scalar_names: Sequence[str] | str,
    store_configs: bool,
    seed: int | None,
    writing: int,
    flowmc_version: str | None,
    created: str | None,
    command_line: str | None,
    model_sha256: str | None,
    config_dtype: str | None,
    compression: str | None,
    shards: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The root attributes as stored, in the order of :data:`ROOT_ATTRS`.

    JSON attributes may be given as text already (:func:`json_dumps`). The provenance and
    storage strings (``flowmc_version`` ... ``compression``) are left out when ``None``; a join
    copies them from its shards. ``seed=None`` is stored as ``-1``.
    """

    def as_json(name: str, value: Any) -> str:
        return value if isinstance(value, str) else json_dumps(name, value)

    values: dict[str, Any] = {
        "n": np.int64(n),
        "format": FORMAT,
        "schema_version": np.int64(SCHEMA_VERSION),
        "flowmc_version": flowmc_version,
        "created": created,
        "command_line": command_line,
        "lattice_shape": np.asarray(tuple(lattice_shape), dtype=np.int64),
        "n_chains": np.int64(n_chains),
        "action": as_json("action", action),
        "sampler": as_json("sampler", sampler),
        "model_sha256": model_sha256,
        "seed": np.int64(-1 if seed is None else int(seed)),
        "meta": as_json("meta", meta),
        "scalar_names": as_json("scalar_names", list(scalar_names)),
        "store_configs": np.bool_(store_configs),
        "config_dtype": config_dtype,
        "compression": compression,
        "writing": np.int64(writing),
        "shards": None if shards is None else json_dumps("shards", shards),
    }
    return {k: v for k, v in values.items() if v is not None}


def write_root(attrs: Any, values: Mapping[str, Any]) -> None:
    """Write root attributes into an h5py ``attrs``: ``n`` first, then the rest in order."""
    attrs.create("n", values["n"])
    for key, value in values.items():
        if key != "n":
            attrs[key] = value


def create_layout(
    f: Any,
    *,
    lattice_shape: tuple[int, ...],
    n_chains: int,
    scalar_names: Sequence[str],
    store_configs: bool,
    config_dtype: str,
    compression: str | None,
    chunk_size: int,
) -> None:
    """Create the empty, resizable datasets and the two empty state slots of a new ensemble.

    Scalars use chunks of ``chunk_size`` rows; configurations as many rows as fit in 4 MiB (at
    most ``chunk_size``), or one row per chunk when compressed: a compressed chunk that is
    rewritten moves on disk, and a kill while it is flushed can destroy rows it already held, so
    committed compressed chunks are never rewritten. Uncompressed chunks are rewritten in place
    with identical bytes for committed rows, which is safe.
    """
    rows = int(chunk_size)
    if store_configs:
        row_bytes = n_chains * math.prod(lattice_shape) * np.dtype(config_dtype).itemsize
        crow = 1 if compression else max(1, min(rows, _MAX_CHUNK_BYTES // row_bytes))
        f.create_dataset(
            "configs",
            shape=(0, n_chains, *lattice_shape),
            maxshape=(None, n_chains, *lattice_shape),
            dtype=config_dtype,
            chunks=(crow, n_chains, *lattice_shape),
            compression=compression,
            shuffle=compression is not None,
        )
    g = f.create_group("scalars")
    for s in scalar_names:
        g.create_dataset(
            s,
            shape=(0, n_chains),
            maxshape=(None, n_chains),
            dtype=np.bool_ if s in BOOL_SCALARS else np.float64,
            chunks=(rows, n_chains),
        )
    c = f.create_group("chunks")
    c.create_dataset("wall_time", shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(256,))
    c.create_dataset("end", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(256,))
    st = f.create_group("state")
    for slot in SLOTS:
        empty_slot(st.create_group(slot))


def empty_slot(g: Any) -> None:
    """Mark a state slot empty: ``n = seq = -1`` (no commit) and no attributes."""
    g.attrs.create("n", np.int64(-1))
    g.attrs.create("seq", np.int64(-1))
    g.attrs["attrs_json"] = "{}"
