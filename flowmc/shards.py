r"""Sharded ensembles: the chains of one run spread over the ranks of a ``torch.distributed`` job.

Under ``torchrun`` with ``W = WORLD_SIZE > 1`` ranks, ``flowmc sample`` (flow MH and the hybrid)
and ``flowmc hmc`` call :func:`run_sharded`:

* the ``C`` chains (global indices ``first_chain .. first_chain + C - 1``) are split into ``W``
  contiguous blocks, the first ``C mod W`` ranks holding one chain more (:func:`chain_blocks`;
  ``C >= W`` is required);
* rank ``r`` runs :func:`flowmc.run.run_ensemble` on its block (``RunConfig.first_chain``) into
  its own **shard**, an ordinary ensemble file with its own lock, durable commits and exact
  resume: ``ens.h5`` → ``ens.shards/rank-0000r-of-0000W.h5`` (:func:`shard_path`; the name
  carries ``W``, so a resume with another number of ranks finds no shards and says so);
* chain ``c`` draws from the stream ``(seed, c)`` whatever ``W`` (:mod:`flowmc.rng`), and the
  dual-averaging step-size tuning averages the acceptance over **all** chains of the job
  (:class:`GatheredMean`: an ``all_gather`` of the per-chain acceptance, concatenated in global
  chain order, then the same ``mean`` one process would take), so every rank tunes the step
  size of a one-process run with all ``C`` chains, bit for bit on the CPU;
* at the end (and at the end of every ``--resume``) rank 0 writes the **join** ``ens.h5``
  (:func:`join_shards`): a small HDF5 file whose ``configs`` and ``scalars/*`` are *virtual
  datasets* mapping the shards' rows, so :func:`flowmc.ensemble.open_ensemble`,
  ``flowmc analyze`` and plain ``h5py`` read all ranks as one ensemble of ``C`` chains in global
  chain order, without a copy.

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
* :func:`check_join` validates it whenever it is opened: every shard file exists, is a flowmc
  ensemble of the same job (a random ``job`` id that every shard records in
  ``meta["shard"]``), holds at least ``n`` committed rows and the chains the join says, and the
  virtual datasets map exactly these files. A missing or foreign shard is an error, never rows
  of HDF5 fill values.

Not supported: the adaptive warm-up (``--adapt-steps``: each rank would adapt its own flow) and
resuming with another number of ranks (the state of a chain lives in its rank's shard).

A run killed at any point leaves shards that ``--resume`` continues (each one exactly as a
one-process run), and either no join or the previous one, which still reads the rows it
promised (a shard's committed rows never change).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from flowmc import distributed, durable, safeio
from flowmc.ensemble import (
    BOOL_SCALARS,
    FORMAT,
    SCHEMA_VERSION,
    _json_dumps,
    _open_h5,
    _validate_root,
    check_output,
    open_ensemble,
)
from flowmc.run import RunConfig, run_ensemble

__all__ = [
    "GatheredMean",
    "chain_blocks",
    "check_join",
    "job_device",
    "join_shards",
    "run_sharded",
    "shard_dir",
    "shard_path",
]

_SHARD_RE = re.compile(r"^rank-(\d{5})-of-(\d{5})\.h5$")
#: Exceptions a rank's failed pre-flight check is re-raised as on every rank.
_SHARED_ERRORS = {e.__name__: e for e in (ValueError, OSError, FileExistsError,
                                          FileNotFoundError, BlockingIOError, PermissionError)}


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


def _world_sizes(directory: Path) -> set[int]:
    """The numbers of ranks whose shard files lie in ``directory``."""
    if not directory.is_dir():
        return set()
    return {int(m.group(2)) for p in directory.iterdir() if (m := _SHARD_RE.match(p.name))}


def chain_blocks(chains: int, world_size: int, first_chain: int = 0) -> list[tuple[int, int]]:
    """``(first_chain, chains)`` of every rank: contiguous blocks in rank order.

    The first ``chains mod world_size`` ranks hold one chain more than the others.

    Example:
        >>> chain_blocks(5, 2)
        [(0, 3), (3, 2)]

    Raises:
        ValueError: if there are fewer chains than ranks.
    """
    if chains < world_size:
        raise ValueError(
            f"Expected --chains >= the number of ranks {world_size}; got {chains}"
        )
    base, extra = divmod(chains, world_size)
    blocks, start = [], first_chain
    for r in range(world_size):
        c = base + (r < extra)
        blocks.append((start, c))
        start += c
    return blocks


def job_device(device: str | torch.device) -> torch.device:
    """This process's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    env = distributed.torchrun_env()
    if env is None:
        return torch.device(device)
    return distributed.rank_device(device, env[2], env[1])


# --------------------------------------------------------------------------- tuning


class GatheredMean:
    """The ``chain_mean`` of one rank of a sharded run (see :func:`flowmc.hmc.tune_step_size`).

    ``GatheredMean(counts)(x)`` gathers the per-chain tensors ``x`` (``(counts[rank],)``) of
    every rank (``all_gather``, padded to the largest block), concatenates them in rank order,
    which is global chain order, and returns ``float(mean)`` of the ``(sum(counts),)`` tensor:
    the number one process holding all chains computes, in the same order.

    Args:
        counts: chains per rank.
    """

    def __init__(self, counts: Sequence[int]) -> None:
        self.counts = [int(c) for c in counts]
        self.width = max(self.counts)

    def __call__(self, x: Tensor) -> float:
        rank = dist.get_rank()
        if x.ndim != 1 or x.shape[0] != self.counts[rank]:
            raise ValueError(
                f"Expected a per-chain tensor of shape ({self.counts[rank]},) on rank {rank}; "
                f"got {tuple(x.shape)}"
            )
        buf = x.new_zeros(self.width)
        buf[: x.shape[0]] = x
        parts = [torch.empty_like(buf) for _ in self.counts]
        dist.all_gather(parts, buf)
        return float(torch.cat([p[:c] for p, c in zip(parts, self.counts)]).mean())


# --------------------------------------------------------------------------- the join


def _is_join(path: Path) -> bool:
    try:
        with h5py.File(path, "r", locking=False) as f:
            return "shards" in f.attrs
    except Exception:  # noqa: BLE001 - not a readable HDF5 file: not a join
        return False


def _identify_join(path: str) -> str | None:
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
        lock_held: the caller holds the :class:`flowmc.durable.NameLock` of ``out``.

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
        sizes = _world_sizes(sdir)
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
            names = (["configs"] if ens.has_configs else []) + [
                f"scalars/{s}" for s in ens.scalar_names
            ]
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

    tmp = durable.temp_path(str(out))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fio = durable.DurableFile(tmp, create=True)
    try:
        f = h5py.File(fio, "w")
        try:
            at = f.attrs
            at.create("n", np.int64(n))
            at["format"] = FORMAT
            at["schema_version"] = np.int64(SCHEMA_VERSION)
            for key in ("flowmc_version", "created", "command_line", "model_sha256",
                        "config_dtype", "compression"):  # fmt: skip
                if key in a0:
                    at[key] = a0[key]
            at["lattice_shape"] = np.asarray(shape, dtype=np.int64)
            at["n_chains"] = np.int64(C)
            at["action"] = _json_dumps("action", a0["action"])
            at["sampler"] = _json_dumps("sampler", sampler)
            at["seed"] = np.int64(-1 if a0.get("seed") is None else a0["seed"])
            at["meta"] = _json_dumps("meta", meta)
            at["scalar_names"] = _json_dumps("scalar_names", list(a0["scalar_names"]))
            at["store_configs"] = np.bool_(a0["store_configs"])
            at["writing"] = np.int64(0)
            at["shards"] = _json_dumps("shards", record)
            names = (["configs"] if a0["store_configs"] else []) + [
                f"scalars/{s}" for s in a0["scalar_names"]
            ]
            for name in names:
                tail = (*shape,) if name == "configs" else ()
                if name == "configs":
                    dtype, fill = np.dtype(a0.get("config_dtype", "float32")), np.nan
                elif name.split("/")[1] in BOOL_SCALARS:
                    dtype, fill = np.dtype(np.bool_), False
                else:
                    dtype, fill = np.dtype(np.float64), np.nan
                layout = h5py.VirtualLayout(shape=(n, C, *tail), dtype=dtype)
                for s, fe in zip(shards, files):
                    src = h5py.VirtualSource(fe["path"], name, shape=s["shapes"][name])
                    c0 = fe["first_chain"] - files[0]["first_chain"]
                    layout[:, c0 : c0 + fe["chains"]] = src[:n]
                f.create_virtual_dataset(name, layout, fillvalue=fill)
            c = f.create_group("chunks")
            c.create_dataset("end", data=np.asarray(points, np.int64), maxshape=(None,),
                             chunks=(256,))  # fmt: skip
            c.create_dataset("wall_time", data=np.asarray(walls, np.float64), maxshape=(None,),
                             chunks=(256,))  # fmt: skip
            f.flush()
            fio.check()
        finally:
            f.close()
        fio.sync()
        fio.check()
        fio.close()
        with open_ensemble(tmp):  # the written join passes the checks of every reader
            pass
        durable.check_replaceable(
            str(out), force=True, what="join of a sharded ensemble", lock_held=True,
            identify=_identify_ensemble_any if force else _identify_join,
        )  # fmt: skip
        os.replace(tmp, out)
    except BaseException:
        fio.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    durable.fsync_dir(str(out))
    return record


def _identify_ensemble_any(path: str) -> str | None:
    info = safeio.sniff(path)
    return None if info.kind == "ensemble" else f"it is {info.what}"


def check_join(f: h5py.File, path: str, attrs: dict[str, Any]) -> None:
    """Check that the join ``path`` (open as ``f``, root attributes ``attrs``) reads its shards.

    Called by :class:`flowmc.ensemble.Ensemble` when it opens a file with a ``shards``
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
    names = (["configs"] if attrs["store_configs"] else []) + [
        f"scalars/{s}" for s in attrs["scalar_names"]
    ]
    for name in names:
        ds = f[name]
        got = [(m.file_name, m.dset_name.lstrip("/")) for m in ds.virtual_sources()] if (
            ds.is_virtual) else []  # fmt: skip
        if got != [(e["path"], name) for e in files]:
            raise bad(f"dataset {name!r} does not map the shards listed in its 'shards' "
                      "attribute (corrupt or hand-edited file?)")  # fmt: skip


# --------------------------------------------------------------------------- the run


def _preflight(
    out: Path, spath: Path, rank: int, W: int, block: tuple[int, int], resume: bool, force: bool
) -> dict:
    """This rank's checks before any work; returns its shard identity (``job`` on resume)."""
    sdir = shard_dir(out)
    if os.path.lexists(sdir) and not sdir.is_dir():
        raise FileExistsError(f"{str(sdir)!r} (where the shards of {str(out)!r} go) is not a "
                              "directory")  # fmt: skip
    others = sorted(_world_sizes(sdir) - {W})
    if resume:
        if not spath.exists():
            hint = (f"; {str(sdir)!r} holds shards of a run with {others} ranks: resume with "
                    "that many" if others else "")  # fmt: skip
            raise FileNotFoundError(
                f"Cannot resume {str(out)!r}: the shard of rank {rank} of {W}, {str(spath)!r}, "
                f"does not exist{hint}"
            )
        with open_ensemble(spath) as ens:
            sh = dict(ens.meta.get("shard") or {})
        if not sh.get("job"):
            raise ValueError(f"Cannot resume {str(out)!r}: {str(spath)!r} is not a shard of a "
                             "sharded run (no meta['shard'])")  # fmt: skip
        want = {"rank": rank, "world_size": W, "first_chain": block[0], "chains": block[1]}
        got = {k: sh.get(k) for k in want}
        if got != want:
            raise ValueError(f"Cannot resume {str(out)!r}: mismatched shards: {str(spath)!r} "
                             f"holds {got}, this run needs {want}")  # fmt: skip
        if rank == 0 and os.path.lexists(out):
            why = _identify_join(str(out))
            if why is not None:
                raise FileExistsError(f"Refusing to overwrite {str(out)!r} with the join of the "
                                      f"sharded run: {why}")  # fmt: skip
        return sh
    if rank == 0:
        check_output(out, force=force, lock_held=True)
        if others:
            raise FileExistsError(
                f"{str(sdir)!r} holds the shards of a run with {others} ranks; move them away "
                f"or choose another --out (this run has {W})"
            )
    check_output(spath, force=force)
    return {"job": uuid.uuid4().hex if rank == 0 else None}


def _agree(local: tuple[tuple[str, str] | None, Any], rank: int, exc: BaseException | None
           ) -> list[Any]:  # fmt: skip
    """All ranks' ``(error, value)``; raise on every rank if any rank failed."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    for r, (err, _) in enumerate(gathered):
        if err is not None:
            if r == rank and exc is not None:
                raise exc
            cls = _SHARED_ERRORS.get(err[0], RuntimeError)
            raise cls(f"rank {r}: {err[1]}")
    return [v for _, v in gathered]


def _combine(summaries: list[dict], out: Path, rank: int) -> dict:
    """One summary of the whole job from the ranks' :func:`~flowmc.run.run_ensemble` ones."""
    C = sum(s["chains"] for s in summaries)
    w = [s["chains"] / C for s in summaries]
    seconds = max(s["seconds"] for s in summaries)
    new = sum(s["samples_per_second"] * s["seconds"] for s in summaries
              if math.isfinite(s["samples_per_second"]))  # fmt: skip
    comb = dict(summaries[0])
    comb.update(
        path=str(out), chains=C, n=min(s["n"] for s in summaries),
        steps=min(s["steps"] for s in summaries),
        acceptance=sum(wi * s["acceptance"] for wi, s in zip(w, summaries)),
        longest_rejection_run=max(s["longest_rejection_run"] for s in summaries),
        seconds=seconds, warmup_seconds=max(s["warmup_seconds"] for s in summaries),
        samples_per_second=new / seconds if seconds > 0 else float("nan"),
        ranks=len(summaries), rank=rank,
        shards=[s["path"] for s in summaries],
    )  # fmt: skip
    for key in ("flow_acceptance", "hmc_acceptance"):
        if key in comb:
            comb[key] = sum(wi * s[key] for wi, s in zip(w, summaries))
    for key in ("n_nonfinite", "n_divergent"):
        if key in comb:
            comb[key] = sum(s[key] for s in summaries)
    return comb


def run_sharded(
    out: str | os.PathLike[str],
    config: RunConfig,
    *,
    timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
    device: str | torch.device = "cpu",
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    meta: dict | None = None,
    **kwargs: Any,
) -> dict:
    """:func:`flowmc.run.run_ensemble` over the ranks of a distributed job, or in one process.

    Joins the job's process group (:func:`flowmc.distributed.process_group`: under torchrun,
    or one the caller initialised). With one process it is :func:`~flowmc.run.run_ensemble`
    (one ordinary file ``out``). With ``W > 1`` ranks every rank runs its block of
    ``config.chains`` into its shard and rank 0 writes the join ``out`` (module docstring).

    Args:
        out: the ensemble (the join in a sharded run).
        config: the run's settings; ``chains`` and ``first_chain`` are those of the whole job.
        timeout_s: timeout of every collective.
        device: the device (``cuda`` is ``cuda:LOCAL_RANK`` on each rank).
        resume: continue every shard (same number of ranks), then rewrite the join.
        force: replace existing shards (and a flowmc ensemble ``out``).
        progress: a progress bar (rank 0's chains only).
        meta: extra metadata of every shard (and of the join).
        **kwargs: the other keyword arguments of :func:`~flowmc.run.run_ensemble` (``model``,
            ``action``, ``dtype``, storage options, ``command_line``, ...).

    Returns:
        The summary of :func:`~flowmc.run.run_ensemble` for the whole job (the same dict on
        every rank): counts summed, acceptances averaged over all chains, ``n`` the minimum,
        ``seconds`` the slowest rank's, plus ``ranks``, ``rank`` (this process's) and
        ``shards`` (their paths); in one process its plain summary with ``ranks = 1``.

    Raises:
        ValueError: ``config.chains`` below the number of ranks, an adaptive warm-up, mismatched
            shards on resume, or any error of :func:`~flowmc.run.run_ensemble`; a failed check
            of one rank before the run is raised on every rank (``rank r: ...``).
        FileExistsError: existing shards or ``out`` (without ``force``/``resume``).
    """
    with distributed.process_group(device, timeout_s=timeout_s) as info:
        if info is None or info.world_size == 1:
            summary = run_ensemble(out, config, device=job_device(device), resume=resume,
                                   force=force, progress=progress, meta=meta, **kwargs)  # fmt: skip
            return {**summary, "ranks": 1, "rank": 0}
        return _run_ranks(out, config, info, job_device(device), resume, force, progress, meta,
                          kwargs)  # fmt: skip


def _run_ranks(
    out: str | os.PathLike[str],
    config: RunConfig,
    info: distributed.DistInfo,
    device: torch.device,
    resume: bool,
    force: bool,
    progress: bool,
    meta: dict | None,
    kwargs: dict,
) -> dict:
    rank, W = info.rank, info.world_size
    out = Path(out)
    if config.adapt is not None:
        raise ValueError(
            "Expected no adaptive warm-up (--adapt-steps 0) in a sharded run: each rank would "
            f"adapt its own flow to its own chains; got adapt steps = {config.adapt.steps} with "
            f"{W} ranks (adapt in one process, or sample the adapted flow OUT.adapted.pt)"
        )
    blocks = chain_blocks(config.chains, W, config.first_chain)
    spath = shard_path(out, rank, W)
    lock = None
    try:
        err, exc, ident = None, None, None
        try:
            if rank == 0:  # rank 0 owns the name of the join for the whole run
                lock = durable.NameLock(out).acquire()
            ident = _preflight(out, spath, rank, W, blocks[rank], resume, force)
        except (ValueError, OSError) as e:
            err, exc = (type(e).__name__, " ".join(str(e).split())), e
        idents = _agree((err, ident), rank, exc)
        jobs = {i["job"] for i in idents} if resume else {idents[0]["job"]}
        if len(jobs) != 1:
            raise ValueError(
                f"Cannot resume {str(out)!r}: mismatched shards: they belong to different runs "
                f"(jobs {[i['job'] for i in idents]} by rank)"
            )
        job = jobs.pop()
        shard_dir(out).mkdir(exist_ok=True)
        first, count = blocks[rank]
        shard_meta = {**(meta or {}), "shard": {
            "job": job, "rank": rank, "world_size": W, "first_chain": first, "chains": count,
            "job_chains": config.chains, "job_first_chain": config.first_chain,
            "backend": info.backend,
        }}  # fmt: skip
        summary = run_ensemble(
            spath, replace(config, chains=count, first_chain=first), device=device,
            resume=resume, force=force, progress=progress and rank == 0, meta=shard_meta,
            chain_mean=GatheredMean([c for _, c in blocks]), **kwargs,
        )  # fmt: skip
        summaries: list[Any] = [None] * W
        dist.all_gather_object(summaries, summary)  # also: every shard is closed
        err, exc = None, None
        if rank == 0:
            try:
                join_shards(out, world_size=W, force=force and not resume, lock_held=True)
            except (ValueError, OSError) as e:
                err, exc = (type(e).__name__, " ".join(str(e).split())), e
        _agree((err, None), rank, exc)
    finally:
        if lock is not None:
            lock.release()
    return _combine(summaries, out, rank)
