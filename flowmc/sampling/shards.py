r"""Sharded ensembles: the chains of one run spread over the ranks of a ``torch.distributed`` job.

Under ``torchrun`` with ``W = WORLD_SIZE > 1`` ranks, ``flowmc sample`` (flow MH and the hybrid)
and ``flowmc hmc`` call :func:`run_sharded`:

* the ``C`` chains (global indices ``first_chain .. first_chain + C - 1``) are split into ``W``
  contiguous blocks, the first ``C mod W`` ranks holding one chain more (:func:`chain_blocks`;
  ``C >= W`` is required);
* rank ``r`` runs :func:`flowmc.sampling.run.run_ensemble` on its block (``RunConfig.first_chain``)
  into its own **shard**, an ordinary ensemble file with its own lock, durable commits and exact
  resume: ``ens.h5`` → ``ens.shards/rank-0000r-of-0000W.h5`` (:func:`shard_path`; the name
  carries ``W``, so a resume with another number of ranks finds no shards and says so);
* chain ``c`` draws from the stream ``(seed, c)`` whatever ``W`` (:mod:`flowmc.mcmc.rng`), and the
  dual-averaging step-size tuning averages the acceptance over **all** chains of the job
  (:class:`GatheredMean`: an ``all_gather`` of the per-chain acceptance, concatenated in global
  chain order, then the same ``mean`` one process would take), so every rank tunes the step
  size of a one-process run with all ``C`` chains, bit for bit on the CPU;
* at the end (and at the end of every ``--resume``) rank 0 writes the **join** ``ens.h5``
  (:func:`join_shards`): a small HDF5 file whose ``configs`` and ``scalars/*`` are *virtual
  datasets* mapping the shards' rows, so :func:`flowmc.io.ensemble.open_ensemble`,
  ``flowmc analyze`` and plain ``h5py`` read all ranks as one ensemble of ``C`` chains in global
  chain order, without a copy.

The join and its checks: :mod:`flowmc.io.join` (``docs/ensemble-format.md``).

Not supported: the adaptive warm-up (``--adapt-steps``: each rank would adapt its own flow) and
resuming with another number of ranks (the state of a chain lives in its rank's shard).

A run killed at any point leaves shards that ``--resume`` continues (each one exactly as a
one-process run), and either no join or the previous one, which still reads the rows it
promised (a shard's committed rows never change).
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from flowmc import parallel
from flowmc.io import durable
from flowmc.io.ensemble import check_join, check_output, open_ensemble
from flowmc.io.join import identify_join, join_shards, shard_dir, shard_path, world_sizes
from flowmc.sampling.run import RunConfig, run_ensemble

__all__ = [  # check_join, join_shards, shard_dir, shard_path: of the old flowmc.shards
    "GatheredMean",
    "chain_blocks",
    "check_join",
    "job_device",
    "join_shards",
    "run_sharded",
    "shard_dir",
    "shard_path",
]

#: Exceptions a rank's failed pre-flight check is re-raised as on every rank.
_SHARED_ERRORS = {e.__name__: e for e in (ValueError, OSError, FileExistsError,
                                          FileNotFoundError, BlockingIOError, PermissionError)}


# --------------------------------------------------------------------------- layout


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
    env = parallel.torchrun_env()
    if env is None:
        return torch.device(device)
    return parallel.rank_device(device, env[2], env[1])


# --------------------------------------------------------------------------- tuning


class GatheredMean:
    """The ``chain_mean`` of one rank of a sharded run (see :func:`flowmc.mcmc.hmc.tune_step_size`).

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


# --------------------------------------------------------------------------- the run


def _preflight(
    out: Path, spath: Path, rank: int, W: int, block: tuple[int, int], resume: bool, force: bool
) -> dict:
    """This rank's checks before any work; returns its shard identity (``job`` on resume)."""
    sdir = shard_dir(out)
    if os.path.lexists(sdir) and not sdir.is_dir():
        raise FileExistsError(f"{str(sdir)!r} (where the shards of {str(out)!r} go) is not a "
                              "directory")  # fmt: skip
    others = sorted(world_sizes(sdir) - {W})
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
            why = identify_join(str(out))
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
    """One summary of the whole job from the ranks' summaries (of :func:`run_ensemble`)."""
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
    for key in ("flow_acceptance", "hmc_acceptance", "metropolis_acceptance", "cluster_size"):
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
    timeout_s: float = parallel.DEFAULT_TIMEOUT_S,
    device: str | torch.device = "cpu",
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    meta: dict | None = None,
    **kwargs: Any,
) -> dict:
    """:func:`flowmc.sampling.run.run_ensemble` over the ranks of a distributed job, or in one
    process.

    Joins the job's process group (:func:`flowmc.parallel.process_group`: under torchrun,
    or one the caller initialised). With one process it is :func:`~flowmc.sampling.run.run_ensemble`
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
        **kwargs: the other keyword arguments of :func:`~flowmc.sampling.run.run_ensemble`
            (``model``, ``action``, ``dtype``, storage options, ``command_line``, ...).

    Returns:
        The summary of :func:`~flowmc.sampling.run.run_ensemble` for the whole job (the same dict on
        every rank): counts summed, acceptances averaged over all chains, ``n`` the minimum,
        ``seconds`` the slowest rank's, plus ``ranks``, ``rank`` (this process's) and
        ``shards`` (their paths); in one process its plain summary with ``ranks = 1``.

    Raises:
        ValueError: ``config.chains`` below the number of ranks, an adaptive warm-up, mismatched
            shards on resume, or any error of :func:`~flowmc.sampling.run.run_ensemble`; a failed
            check of one rank before the run is raised on every rank (``rank r: ...``).
        FileExistsError: existing shards or ``out`` (without ``force``/``resume``).
    """
    with parallel.process_group(device, timeout_s=timeout_s) as info:
        if info is None or info.world_size == 1:
            summary = run_ensemble(out, config, device=job_device(device), resume=resume,
                                   force=force, progress=progress, meta=meta, **kwargs)  # fmt: skip
            return {**summary, "ranks": 1, "rank": 0}
        return _run_ranks(out, config, info, job_device(device), resume, force, progress, meta,
                          kwargs)  # fmt: skip


def _run_ranks(
    out: str | os.PathLike[str],
    config: RunConfig,
    info: parallel.DistInfo,
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
