r"""The join of a sharded ensemble: one HDF5 file whose datasets map the ranks' shards.

A run under ``torchrun`` with ``W`` ranks (:mod:`flowmc.sampling.shards`) writes one **shard** per
rank, ``ens.h5`` → ``ens.shards/rank-0000r-of-0000W.h5`` (:func:`shard_path`), each an ordinary
ensemble. At its end rank 0 writes the **join** ``ens.h5`` (:func:`join_shards`): a small HDF5 file
whose ``configs`` and ``scalars/*`` are *virtual datasets* mapping the shards' rows, so
:func:`flowmc.io.ensemble.open_ensemble`, ``flowmc analyze`` and plain ``h5py`` read all ranks as
one ensemble of ``C`` chains in global chain order, without a copy.

The join (root attribute ``shards``, see ``docs/ensemble-format.md``):

* its ``n`` is the **minimum** of the shards' committed ``n`` (after a normal end all are
  equal; after a crash the shards that ran ahead keep their extra rows for the resume);
* its ``chunks/end`` are the union of the shards' commit points up to ``n``, and its
  ``chunks/wall_time`` the job's elapsed sampling time per block: with ``T_r(b)`` the sampling
  seconds rank ``r`` needed for its first ``b`` rows (its chunk times summed, linear inside a
  chunk), block ``(a, b]`` costs ``max_r T_r(b) - max_r T_r(a)``, so the total is the sampling
  time of the slowest rank and ``flowmc compare``'s cost per configuration is wall-clock seconds
  of the whole job (``W`` devices) per configuration; ``shards["device_seconds"]`` is the sum
  over ranks, for a cost in device-seconds;
* it holds no sampler state and cannot be resumed itself (the shards are resumed; the join is
  rewritten), and it is written atomically (temporary file, ``fsync``, rename), replacing only
  an earlier join (or, with ``--force`` on a new run, a flowmc ensemble);
* :func:`flowmc.io.ensemble.check_join` (with the reader) validates it whenever it is opened: every
  shard file exists, is a flowmc ensemble of the same job (a random ``job`` id that every shard
  records in ``meta["shard"]``), holds at least ``n`` committed rows and the chains the join says,
  and the virtual datasets map exactly these files. A missing or foreign shard is an error, never
  rows of HDF5 fill values.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from flowmc.io import durable, safeio, schema
from flowmc.io.ensemble import open_ensemble

__all__ = [
    "identify_join",
    "join_shards",
    "shard_dir",
    "shard_path",
    "world_sizes",
]

_SHARD_RE = re.compile(r"^rank-(\d{5})-of-(\d{5})\.h5$")


# --------------------------------------------------------------------------- layout


def shard_dir(out: str | os.PathLike[str]) -> Path:
    """The directory of the shards of ``out``: ``ens.h5`` → ``ens.shards``."""
    out = Path(out)
    if out.suffix == ".shards":
        raise ValueError(f"Expected an ensemble name not ending in .shards; got {str(out)!r}")
    return out.with_suffix(".shards")


def shard_path(out: str | os.PathLike[str], rank: int, world_size: int) -> Path:
    """Rank ``rank``'s shard of ``out``: ``ens.shards/rank-RRRRR-of-WWWWW.h5``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"Expected 0 <= rank < world_size; got rank {rank}, size {world_size}")
    return shard_dir(out) / f"rank-{rank:05d}-of-{world_size:05d}.h5"


def world_sizes(directory: Path) -> set[int]:
    """The numbers of ranks whose shard files lie in ``directory``."""
    if not directory.is_dir():
        return set()
    return {int(m.group(2)) for p in directory.iterdir() if (m := _SHARD_RE.match(p.name))}


# --------------------------------------------------------------------------- the join


def _is_join(path: Path) -> bool:
    try:
        with h5py.File(path, "r", locking=False) as f:
            return "shards" in f.attrs
    except Exception:  # noqa: BLE001 - not a readable HDF5 file: not a join
        return False


def identify_join(path: str) -> str | None:
    """``None`` if ``path`` is the join of a sharded run, else what it is (for error messages)."""
    info = safeio.sniff(path)
    if info.kind != "ensemble":
        return f"it is {info.what}"
    if not _is_join(Path(path)):
        return "it is a flowmc ensemble, not the join of a sharded run"
    return None


def _cum_wall(ends: np.ndarray, walls: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A shard's sampling seconds to reach each of ``rows``: chunk times summed, linear inside."""
    x = np.concatenate([[0], np.asarray(ends, np.float64)])
    y = np.concatenate([[0.0], np.cumsum(np.asarray(walls, np.float64))])
    return np.interp(rows, x, y)


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)


def join_shards(
    out: str | os.PathLike[str],
    *,
    world_size: int | None = None,
    force: bool = False,
    lock_held: bool = False,
) -> dict:
    """Write (or rewrite) the join ``out`` of the shards in ``out``'s shard directory.

    Every run under ``torchrun`` calls it at its end (rank 0); call it yourself to read the
    committed rows of a run that was killed before (the shards must not be being written).

    Args:
        out: the ensemble name (``ens.h5``; its shards are ``ens.shards/rank-*-of-*.h5``).
        world_size: the number of ranks (default: found from the shard files).
        force: replace any flowmc ensemble at ``out`` (default: only an earlier join).
        lock_held: the caller holds the :class:`flowmc.io.durable.NameLock` of ``out``.

    Returns:
        The ``shards`` record written into the join (``job, world_size, files, n, ...``).

    Raises:
        FileNotFoundError: if no shards (or not all of them) exist.
        ValueError: if the shards do not belong together (another job, another number of
            ranks, other settings, non-contiguous chains).
        FileExistsError: if ``out`` exists and may not be replaced.
        BlockingIOError: if a shard or ``out`` is being written.
    """
    out = Path(out)
    sdir = shard_dir(out)
    if world_size is None:
        sizes = world_sizes(sdir)
        if len(sizes) != 1:
            raise (FileNotFoundError if not sizes else ValueError)(
                f"Cannot join {str(out)!r}: {str(sdir)!r} holds "
                + ("no shard files" if not sizes else f"shards of runs with {sorted(sizes)} ranks")
                + " (expected rank-RRRRR-of-WWWWW.h5 of one run)"
            )
        world_size = sizes.pop()
    lock = None if lock_held else durable.NameLock(out).acquire()
    try:
        return _write_join(out, sdir, world_size, force)
    finally:
        if lock is not None:
            lock.release()


def _read_shards(out: Path, W: int) -> list[dict]:
    shards = []
    for r in range(W):
        p = shard_path(out, r, W)
        if not p.exists():
            raise FileNotFoundError(
                f"Cannot join {str(out)!r}: the shard of rank {r} of {W}, {str(p)!r}, is missing"
            )
        with open_ensemble(p) as ens:
            f = ens._file()
            names = schema.row_datasets(store_configs=ens.has_configs,
                                        scalar_names=ens.scalar_names)
            shards.append({
                "path": p, "attrs": dict(ens.attrs), "n": ens.n, "chains": ens.n_chains,
                "ends": np.asarray(ens.chunk_ends), "walls": np.asarray(ens.chunk_wall_times),
                "shapes": {name: f[name].shape for name in names},
            })  # fmt: skip
    return shards


#: Root attributes that every shard of a job must share (the sampler is compared apart).
_SAME = ("lattice_shape", "action", "model_sha256", "seed", "scalar_names", "store_configs",
         "config_dtype", "compression")  # fmt: skip


def _check_shards(out: Path, shards: list[dict], W: int) -> str:
    """The job id; raise if the shards do not form one run."""

    def mismatch(r: int, what: str) -> ValueError:
        return ValueError(f"Cannot join {str(out)!r}: mismatched shards: {what} (rank {r})")

    a0 = shards[0]["attrs"]
    job = ((a0.get("meta") or {}).get("shard") or {}).get("job")
    if not isinstance(job, str) or not job:
        raise mismatch(0, f"{str(shards[0]['path'])!r} records no sharded job")
    first = a0["sampler"].get("first_chain")
    for r, s in enumerate(shards):
        a = s["attrs"]
        sh = (a.get("meta") or {}).get("shard") or {}
        name = str(s["path"])
        if sh.get("job") != job:
            raise mismatch(r, f"{name!r} belongs to another run (job {sh.get('job')!r}, rank 0's "
                              f"is {job!r})")  # fmt: skip
        if sh.get("rank") != r or sh.get("world_size") != W:
            raise mismatch(r, f"{name!r} says it is rank {sh.get('rank')} of "
                              f"{sh.get('world_size')}")  # fmt: skip
        if a["sampler"].get("first_chain") != first:
            raise mismatch(r, f"{name!r} starts at chain {a['sampler'].get('first_chain')}, "
                              f"expected {first}")  # fmt: skip
        first += s["chains"]
        for key in _SAME:
            if a.get(key) != a0.get(key):
                raise mismatch(r, f"{key} {a.get(key)!r} differs from rank 0's {a0.get(key)!r}")
        strip = lambda d: {k: v for k, v in d.items() if k not in ("chains", "first_chain")}  # noqa: E731
        if strip(a["sampler"]) != strip(a0["sampler"]):
            raise mismatch(r, f"sampler settings {a['sampler']!r} differ from rank 0's "
                              f"{a0['sampler']!r}")  # fmt: skip
    return job


def _write_join(out: Path, sdir: Path, W: int, force: bool) -> dict:
    shards = _read_shards(out, W)
    job = _check_shards(out, shards, W)
    a0 = shards[0]["attrs"]
    n = min(s["n"] for s in shards)
    C = sum(s["chains"] for s in shards)
    shape = tuple(a0["lattice_shape"])
    base = out.parent
    # row blocks: every shard's commit points below n, and n itself
    points = sorted({int(e) for s in shards for e in s["ends"] if 0 < e < n} | {n} - {0})
    walls = np.zeros(0)
    if points:
        rows = np.asarray(points, np.float64)
        cum = np.max([_cum_wall(s["ends"], s["walls"], rows) for s in shards], axis=0)
        walls = np.diff(np.concatenate([[0.0], cum]))
    rank_seconds = [float(np.sum(s["walls"])) for s in shards]
    files = [{"path": _rel(s["path"], base), "rank": r, "first_chain": s["attrs"]["sampler"][
        "first_chain"], "chains": s["chains"], "n": s["n"], "sampling_seconds": rank_seconds[r]}
        for r, s in enumerate(shards)]  # fmt: skip
    record = {
        "job": job, "world_size": W, "dir": _rel(sdir, base), "files": files, "n": n,
        "n_rule": "minimum of the shards' committed n",
        "wall_time": "per row block, the increase of the slowest rank's cumulative sampling time",
        "device_seconds": float(sum(rank_seconds)),
        "joined": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    meta = {k: v for k, v in (a0.get("meta") or {}).items() if k != "shard"}
    warm = [((s["attrs"].get("meta") or {}).get("warmup") or {}).get("seconds") for s in shards]
    if isinstance(meta.get("warmup"), dict) and all(isinstance(w, (int, float)) for w in warm):
        meta["warmup"] = {**meta["warmup"], "seconds": max(warm), "seconds_by_rank": warm}
    sampler = {**a0["sampler"], "chains": C}

    root = schema.root_attrs(
        n=n, lattice_shape=shape, n_chains=C, action=a0["action"], sampler=sampler, meta=meta,
        scalar_names=a0["scalar_names"], store_configs=a0["store_configs"], seed=a0.get("seed"),
        writing=0, shards=record,
        **{key: a0.get(key) for key in ("flowmc_version", "created", "command_line",
                                        "model_sha256", "config_dtype", "compression")},
    )  # fmt: skip

    def replaceable(temp: str) -> None:
        with open_ensemble(temp):  # the written join passes the checks of every reader
            pass
        durable.check_replaceable(
            str(out), force=True, what="join of a sharded ensemble", lock_held=True,
            identify=_identify_ensemble_any if force else identify_join,
        )  # fmt: skip

    with durable.publish(out, verify=replaceable) as staged:
        fio = staged.open()
        f = h5py.File(fio, "w")
        try:
            schema.write_root(f.attrs, root)
            _write_virtual(f, shards, files, a0, n, C, shape)
            c = f.create_group("chunks")
            c.create_dataset("end", data=np.asarray(points, np.int64), maxshape=(None,),
                             chunks=(256,))  # fmt: skip
            c.create_dataset("wall_time", data=np.asarray(walls, np.float64), maxshape=(None,),
                             chunks=(256,))  # fmt: skip
            f.flush()
            fio.check()
        finally:
            f.close()
    return record


def _write_virtual(
    f: h5py.File, shards: list[dict], files: list[dict], a0: dict, n: int, C: int,
    shape: tuple[int, ...],
) -> None:
    """The join's ``configs`` and ``scalars/*``: virtual datasets of the shards' first ``n`` rows,
    the chains of rank ``r`` at columns ``first_chain_r - first_chain_0`` onwards."""
    for name in schema.row_datasets(store_configs=a0["store_configs"],
                                    scalar_names=a0["scalar_names"]):  # fmt: skip
        if name == "configs":
            tail = (*shape,)
            dtype, fill = np.dtype(a0.get("config_dtype", "float32")), np.nan
        else:
            tail = ()
            dtype = schema.scalar_dtype(name.split("/")[1])
            fill = False if dtype == np.bool_ else np.nan
        layout = h5py.VirtualLayout(shape=(n, C, *tail), dtype=dtype)
        for s, fe in zip(shards, files):
            src = h5py.VirtualSource(fe["path"], name, shape=s["shapes"][name])
            c0 = fe["first_chain"] - files[0]["first_chain"]
            layout[:, c0 : c0 + fe["chains"]] = src[:n]
        f.create_virtual_dataset(name, layout, fillvalue=fill)


def _identify_ensemble_any(path: str) -> str | None:
    info = safeio.sniff(path)
    return None if info.kind == "ensemble" else f"it is {info.what}"
