r"""One run driver for every sampler: flow independence MH, HMC, and the hybrid cycle of both.

:func:`run_ensemble` runs (or resumes) ``C`` chains of one kernel (:mod:`flowmc.mcmc.kernel`) into
an HDF5 ensemble (:mod:`flowmc.io.ensemble`); what differs between samplers (start, warm-up, rows,
state arrays) lives in :mod:`flowmc.sampling.samplers`, behind the protocols of
:mod:`flowmc.sampling.protocol`. The sampler follows from the arguments:

* ``"flow-imh"`` (a ``model``, ``config.hmc_traj == 0``): each kernel step is a block of
  ``config.batch`` MH steps per chain, proposed in one flow call; one row per MH step;
* ``"hmc"`` (no model, an ``action``): one row per trajectory;
* ``"hybrid"`` (a ``model`` and ``config.hmc_traj = K >= 1``): one row per cycle, a flow
  independence-MH step followed by ``K`` HMC trajectories; each kernel step is a block of
  ``config.batch`` cycles whose flow proposals come from one flow call (:mod:`flowmc.mcmc.hybrid`);
* ``"cluster"`` (no model, ``config.cluster`` set): one row per step of Metropolis sweeps + Wolff
  clusters (:mod:`flowmc.sampling.cluster`; CPU, float64).

Phases of a run:

1. **Start and warm-up** (nothing is written; a run killed here leaves no file). Flow chains
   start at flow draws, HMC chains cold (φ = 0) or random. HMC and hybrid runs adapt the step
   size by dual averaging for ``hmc.warmup`` trajectories (the hybrid interleaves its flow step
   every ``K`` trajectories) and freeze it; with a fixed step size the warm-up only
   thermalises. With ``config.adapt`` the flow is then trained on the chains' configurations
   (:mod:`flowmc.training.adapt`), saved next to the ensemble (``ens.h5`` → ``ens.adapted.pt``) and
   frozen.
2. **The file** is created, and the post-warm-up state committed (``save_state``) before any
   row.
3. **Sampling** with the frozen kernel, exact for any settings. Step ``s`` (0-based, in MH steps
   for flow MH, trajectories for HMC, cycles for the hybrid) is recorded when ``s >= therm`` and
   ``(s - therm + 1) % thin == 0``. Rows, their wall time and the state are committed together
   (:meth:`~flowmc.io.ensemble.EnsembleWriter.append`) at the end of the first kernel step (block)
   that brings the pending rows to ``chunk`` or more, and at the end of the run; flow MH commits
   after every block by default.

**Randomness and resume.** Every chain has its own stream (:class:`flowmc.mcmc.rng.ChainRNG`, seeded
by ``(seed, c)`` for global chain index ``c``; scheme ``"per-chain-v1"`` in ``sampler["rng"]``).
Each commit saves the generator states, every array of the kernel state (configurations,
actions, the forward-pass ``log q`` of flow chains, HMC forces) and the counters, so a run
killed at any moment (SIGKILL included) and resumed, to the same or a larger ``n``, produces the
same bytes as an uninterrupted run. A run whose target ends inside a flow-MH block commits the
state and generator states *at the start of that block* plus the offset; resuming regenerates
the block identically and continues after the offset. Files without ``sampler["rng"]`` (older
flowmc) cannot be resumed.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from flowmc._checks import check_int, check_positive_float, float_or_none
from flowmc._version import flowmc_version
from flowmc.flows.flow import Z2SymmetricFlow
from flowmc.io.checkpoint import LoadedModel, load_checkpoint, load_model, save_checkpoint
from flowmc.io.ensemble import EnsembleWriter, check_output, file_sha256, open_ensemble
from flowmc.io.identity import check_adapted
from flowmc.mcmc import hmc
from flowmc.mcmc.rng import RNG_SCHEME, ChainRNG, run_generator
from flowmc.sampling.cluster import ClusterSampler, ClusterSettings
from flowmc.sampling.protocol import FlowSampler, Sampler
from flowmc.sampling.samplers import (
    Counters,
    FlowIMHSampler,
    HMCSampler,
    HybridSampler,
    to_numpy,
)
from flowmc.training.adapt import AdaptConfig, Adapter

__all__ = [
    "SAMPLERS",
    "SCALARS",
    "START_KINDS",
    "HMCSettings",
    "RunConfig",
    "run_ensemble",
    "adapted_model_path",
]

#: Sampler names (``sampler["name"]`` in the file).
SAMPLERS = ("flow-imh", "hmc", "hybrid", "cluster")
#: Per-row scalars of each sampler, as each declares them (:attr:`Sampler.scalars`).
SCALARS = {s.name: s.scalars for s in (FlowIMHSampler, HMCSampler, HybridSampler, ClusterSampler)}
#: Initial fields of HMC chains.
START_KINDS = ("cold", "random")
#: Settings that are tuned in warm-up (read from the file on resume, not compared).
_TUNED = ("step_size", "num_steps")
#: Key of the run-level stream of the adaptive warm-up (:func:`flowmc.mcmc.rng.run_generator`).
_ADAPT_STREAM = 1


@dataclass(frozen=True)
class HMCSettings:
    """HMC settings (of ``flowmc hmc``, and of the HMC part of a hybrid).

    Attributes:
        traj_length: trajectory length :math:`\\tau`; ``num_steps = ceil(tau / step_size)``.
        integrator: ``"omelyan"`` (2 force evaluations per step) or ``"leapfrog"``.
        target_accept: mean acceptance the warm-up tunes the step size to.
        warmup: warm-up trajectories per chain (discarded; the step size is tuned here).
        step_size: a fixed step size (no tuning), or ``None`` to tune by dual averaging.
        flip: add the exact global :math:`\\mathbb{Z}_2` flip after each trajectory.
    """

    traj_length: float = 1.0
    integrator: str = "omelyan"
    target_accept: float = 0.8
    warmup: int = 200
    step_size: float | None = None
    flip: bool = False

    def __post_init__(self) -> None:
        check_int("warmup", self.warmup, 0)
        if not (math.isfinite(self.traj_length) and self.traj_length > 0):
            raise ValueError(f"Expected traj_length > 0; got {self.traj_length}")
        if not 0.0 < self.target_accept < 1.0:
            raise ValueError(f"Expected target_accept in (0, 1); got {self.target_accept}")
        hmc.check_integrator(self.integrator)
        if self.step_size is not None:
            check_positive_float("step_size", self.step_size)
        elif self.warmup < 1:
            raise ValueError(
                "Expected warmup >= 1 to tune the step size; got warmup=0 without a fixed "
                "step_size (give one, or allow warm-up trajectories)"
            )

    def attrs(self, step_size: float | None, num_steps: int | None) -> dict:
        """Settings plus the tuned (frozen) step size, for the ``sampler`` attribute."""
        d = asdict(self)
        d.pop("step_size")
        return {
            **d,
            "fixed_step_size": self.step_size,
            "step_size": None if step_size is None else float(step_size),
            "num_steps": None if num_steps is None else int(num_steps),
        }


@dataclass(frozen=True)
class RunConfig:
    """Settings of a run; those that shape the chains go into the ``sampler`` attribute
    (``n``, ``seed`` and ``chunk`` do not; ``seed`` is a root attribute of its own).

    Attributes:
        n: target number of recorded configurations per chain.
        chains: number of chains ``C`` held by this run.
        thin: record every ``thin``-th step.
        therm: steps discarded per chain after warm-up (before the first recorded one).
        seed: master seed (>= 0); chain ``c`` uses the stream of ``(seed, c)``.
        chunk: recorded rows per commit (``None``: every flow block for flow MH, 100 for
            HMC and the hybrid).
        first_chain: global index of the first chain (the run holds chains
            ``first_chain .. first_chain + chains - 1``; for sharded runs).
        batch: flow proposals per chain per flow call: MH steps per kernel step for flow MH
            (default 1024), cycles per kernel step for the hybrid (default 16); not used by HMC.
        hmc_traj: with a model: HMC trajectories per cycle ``K`` (0 = flow MH alone).
        hmc: HMC settings (HMC runs and the hybrid).
        start: HMC and cluster runs only: ``"cold"`` (φ = 0) or ``"random"`` (i.i.d. N(0, 1)).
        adapt: adaptive warm-up of the flow (flow MH and hybrid), or ``None``.
        cluster: with no model: the cluster kernel's settings (Metropolis sweeps + Wolff
            clusters, :mod:`flowmc.sampling.cluster`) instead of HMC; ``None`` for HMC.
    """

    n: int
    chains: int = 1
    thin: int = 1
    therm: int = 0
    seed: int = 0
    chunk: int | None = None
    first_chain: int = 0
    batch: int | None = None
    hmc_traj: int = 0
    hmc: HMCSettings = field(default_factory=HMCSettings)
    start: str = "cold"
    adapt: AdaptConfig | None = None
    cluster: ClusterSettings | None = None

    def __post_init__(self) -> None:
        for name in ("n", "chains", "thin"):
            check_int(name, getattr(self, name), 1)
        if self.batch is not None:
            check_int("batch", self.batch, 1)
        for name in ("therm", "seed", "first_chain", "hmc_traj"):
            check_int(name, getattr(self, name), 0)
        if self.chunk is not None:
            check_int("chunk", self.chunk, 1)
        if self.start not in START_KINDS:
            raise ValueError(f"Expected start in {START_KINDS}; got {self.start!r}")
        if not isinstance(self.hmc, HMCSettings):
            raise ValueError(f"Expected hmc to be HMCSettings; got {type(self.hmc).__name__}")
        if self.adapt is not None and not isinstance(self.adapt, AdaptConfig):
            raise ValueError(f"Expected adapt to be AdaptConfig; got {type(self.adapt).__name__}")
        if self.cluster is not None and not isinstance(self.cluster, ClusterSettings):
            raise ValueError(
                f"Expected cluster to be ClusterSettings; got {type(self.cluster).__name__}"
            )

    def flow_batch(self) -> int:
        """``batch`` resolved: as given, else 1024 for flow MH and 16 for the hybrid."""
        if self.batch is not None:
            return self.batch
        return 1024 if self.hmc_traj == 0 else 16

    def steps_for(self, n_records: int) -> int:
        """Steps per chain needed to record ``n_records`` rows."""
        return self.therm + n_records * self.thin

    def chain_ids(self) -> range:
        return range(self.first_chain, self.first_chain + self.chains)


def adapted_model_path(out: str | os.PathLike[str]) -> Path:
    """Where the adapted flow of ensemble ``out`` lives: ``ens.h5`` → ``ens.adapted.pt``."""
    return Path(out).with_suffix(".adapted.pt")


# ------------------------------------------------------------------------------- models


def _model_record(model: LoadedModel, sha: str) -> dict:
    meta = model.checkpoint.get("meta", {}) or {}
    rec = {
        "path": str(model.path),
        "sha256": sha,
        "training_time_s": float_or_none(meta.get("training_time_s")),
        "recipe": meta.get("recipe"),
    }
    if meta.get("training_time_total_s") is not None:
        rec["training_time_total_s"] = float_or_none(meta.get("training_time_total_s"))
    return rec


def _check_adapted_target(path: Path, out: Path) -> None:
    """Refuse to overwrite an adapted-flow path unless it is our own file for ``out``."""
    if not os.path.lexists(path):
        return
    why = None
    if not path.is_file() or path.is_symlink():
        why = "it is not a regular file"
    else:
        try:
            ckpt = load_checkpoint(path)
            if (ckpt.get("meta") or {}).get("adapted_for") != out.name:
                why = "it is not the adapted flow of this ensemble"
        except (ValueError, OSError):
            why = "it is not a flowmc checkpoint"
    if why:
        raise FileExistsError(
            f"Refusing to overwrite {str(path)!r} (the adapted flow of {str(out)!r}): {why}; "
            "move it away or choose another --out"
        )


def _adapt(
    sampler: FlowSampler,
    state: Any,
    rng: ChainRNG,
    config: RunConfig,
    out: Path,
    base_sha: str,
) -> tuple[Any, LoadedModel, dict]:
    """Adaptive warm-up: train a copy of the flow on the chains, save it, reload it frozen."""
    base = sampler.model
    t0 = time.perf_counter()
    flow = copy.deepcopy(base.flow)
    proposal = Z2SymmetricFlow(flow) if isinstance(base.proposal, Z2SymmetricFlow) else flow
    work = copy.copy(base)
    work.flow, work.proposal = flow, proposal
    sampler.use_model(work)
    state = sampler.refresh(state)
    device = next(flow.parameters()).device
    adapter = Adapter(flow, proposal, base.action, config.adapt,
                      run_generator(config.seed, _ADAPT_STREAM, device))  # fmt: skip
    with torch.no_grad():
        for _ in range(config.adapt.steps):
            state = sampler.adapt_step(state, rng, adapter)
    record = adapter.finish()
    seconds = time.perf_counter() - t0
    record["seconds"] = seconds
    path = adapted_model_path(out)
    bmeta = base.checkpoint.get("meta", {}) or {}
    base_total = float_or_none(bmeta.get("training_time_total_s", bmeta.get("training_time_s")))
    save_checkpoint(
        path, flow, base.action, symmetric=base.symmetric,
        train_config=base.checkpoint.get("train_config"),
        resolved_config=base.checkpoint.get("resolved_config"),
        meta={
            "adapted_for": out.name,
            "adapted_from": {"path": str(base.path), "sha256": base_sha,
                             "training_time_s": base_total},
            "adapt": {**config.adapt.to_dict(), **record},
            "training_time_s": seconds,
            "training_time_total_s": None if base_total is None else base_total + seconds,
            "recipe": bmeta.get("recipe"),
        },
    )  # fmt: skip
    p = next(base.flow.parameters())
    adapted = load_model(path, device=p.device, dtype=p.dtype, symmetric=base.symmetric,
                         lam=base.lam)
    sampler.use_model(adapted)
    return sampler.refresh(state), adapted, record


def _resolve_model(
    model: LoadedModel | str | os.PathLike[str],
    device: torch.device,
    dtype: torch.dtype | None,
    symmetric: bool | None,
) -> LoadedModel:
    if isinstance(model, LoadedModel):
        if symmetric is not None and bool(symmetric) != model.symmetric:
            raise ValueError(
                f"Expected symmetric=None with a loaded model (it is symmetric="
                f"{model.symmetric}); got {symmetric} (pass symmetric= to load_model instead)"
            )
        return model
    return load_model(model, device=device, dtype=dtype or torch.float32, symmetric=symmetric)


# ------------------------------------------------------------------------------- driver


def _stored_sampler(out: Path) -> tuple[dict, dict]:
    with open_ensemble(out) as ens:
        if "shards" in ens.attrs:  # a view of shard files (flowmc.io.join)
            raise ValueError(
                f"Cannot resume {str(out)!r}: it is the join of a sharded ensemble "
                f"({ens.attrs['shards'].get('world_size')} ranks); resume the sharded run under "
                "torchrun with the same number of ranks and --resume"
            )
        return dict(ens.sampler), dict(ens.meta)


def _check_resume_settings(out: Path, stored: dict, want: dict) -> None:
    if stored.get("rng") != RNG_SCHEME:
        raise ValueError(
            f"Cannot resume {str(out)!r}: it was written with another random-number scheme "
            f"(sampler 'rng' is {stored.get('rng')!r}, this flowmc uses {RNG_SCHEME!r}); "
            "start a new ensemble"
        )
    if stored.get("name") != want["name"]:
        raise ValueError(
            f"Cannot resume {str(out)!r}: it holds a {stored.get('name')!r} ensemble; "
            f"this run is {want['name']!r}"
        )
    for key in sorted(set(stored) | set(want)):
        if key in _TUNED:
            continue
        if stored.get(key) != want.get(key):
            raise ValueError(
                f"Cannot resume {str(out)!r}: sampler setting {key!r} mismatch: stored "
                f"{stored.get(key)!r}, given {want.get(key)!r}"
            )


def run_ensemble(
    out: str | os.PathLike[str],
    config: RunConfig,
    *,
    model: LoadedModel | str | os.PathLike[str] | None = None,
    action: Any = None,
    symmetric: bool | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    resume: bool = False,
    force: bool = False,
    store_configs: bool = True,
    config_dtype: str = "float32",
    compression: str | None = None,
    progress: bool = True,
    meta: dict | None = None,
    command_line: str | None = None,
    chain_mean: hmc.ChainMean | None = None,
) -> dict:
    """Run (or resume) a flow-MH, HMC or hybrid ensemble into ``out``.

    Args:
        out: HDF5 ensemble path (created after warm-up).
        config: run settings; ``config.n`` is the target length per chain.
        model: a flow (a :class:`~flowmc.io.checkpoint.LoadedModel` or a checkpoint path) for flow
            MH (``config.hmc_traj == 0``) or the hybrid (``hmc_traj >= 1``); ``None`` for HMC.
        action: the action; required for HMC, must equal the model's otherwise (or ``None``).
        symmetric: with a checkpoint path: override its Z2-symmetrised proposal.
        device: torch device (HMC; with a checkpoint path, where to load it).
        dtype: HMC: the chain dtype (default float64). Flow MH / hybrid with a checkpoint path:
            the flow's dtype (default float32). Flow-MH chains use the flow's dtype, hybrid
            chains float64.
        resume: continue the existing ``out`` (model, action, sampler settings, seed and the
            storage options must match; tuned step sizes are read from the file).
        force: replace an existing ``out`` (without ``resume``).
        store_configs: keep configurations (else only per-row scalars).
        config_dtype: storage dtype of configurations.
        compression: ``None``, ``"gzip"`` or ``"lzf"``.
        progress: show a tqdm progress bar on stderr.
        meta: extra metadata (e.g. the resolved CLI config).
        command_line: recorded command line.
        chain_mean: the step-size tuning's mean of a per-chain ``(C,)`` tensor over all chains
            of the run (default: over this run's chains). One shard of a run spread over
            several processes passes :class:`flowmc.sampling.shards.GatheredMean`, so that every
            shard tunes the step size of the whole run (:func:`flowmc.sampling.shards.run_sharded`).

    Returns:
        A summary dict: ``path, sampler, n, chains, steps, acceptance`` (of the ``accepted``
        scalar: the flow step for flow MH and the hybrid, the trajectory for HMC),
        ``longest_rejection_run, seconds, warmup_seconds, samples_per_second`` (chain steps per
        second, this run), ``flowmc_version``, and per kernel ``flow_acceptance, n_nonfinite``
        and/or ``hmc_acceptance, trajectories, step_size, num_steps, integrator, n_divergent``
        (``hmc_traj`` for the hybrid; ``adapted_model`` and ``adapt`` with adaptation).

    Raises:
        FileExistsError: if ``out`` (or its adapted-flow file) exists and may not be replaced.
        ValueError: on invalid settings or a resume mismatch.
    """
    out = Path(out)
    sampler, lmodel, action, sha, device = _make_sampler(
        config, model, action, symmetric, torch.device(device), dtype, chain_mean
    )
    rng = ChainRNG(config.seed, config.chain_ids(), device)
    ctr = Counters(config.chains)
    files = _Files(out, tuple(int(s) for s in action.lattice_shape), action.params(),
                   store_configs, config_dtype, compression)  # fmt: skip
    if resume:
        writer, state, steps_done, block_start = _resume(files, sampler, rng, ctr, config,
                                                         lmodel, sha, device)  # fmt: skip
        warm: dict = {}
    else:
        writer, state, warm = _begin(files, sampler, rng, config, lmodel, sha, force=force,
                                     meta=meta, command_line=command_line)  # fmt: skip
        steps_done = block_start = 0
    try:
        if not resume:
            writer.save_state(*_commit_state(sampler, state, rng, ctr, steps_done, block_start))
        summary = _sample(sampler, state, rng, ctr, writer, config, steps_done, block_start,
                          progress)  # fmt: skip
    finally:
        writer.close()
    summary.update(
        path=str(out),
        sampler=sampler.name,
        chains=config.chains,
        warmup_seconds=warm.get("seconds", 0.0),
        flowmc_version=flowmc_version(),
        **sampler.summary(ctr),
    )
    if config.adapt is not None:
        summary["adapted_model"] = str(adapted_model_path(out))
        if "adapt" in warm:
            summary["adapt"] = warm["adapt"]
    return summary


def _make_sampler(
    config: RunConfig,
    model: LoadedModel | str | os.PathLike[str] | None,
    action: Any,
    symmetric: bool | None,
    device: torch.device,
    dtype: torch.dtype | None,
    chain_mean: hmc.ChainMean | None,
) -> tuple[Sampler, LoadedModel | None, Any, str, torch.device]:
    """The sampler the arguments ask for: ``(sampler, model, action, model SHA-256, device)``
    (a flow's chains live on the flow's device)."""
    if model is None:
        if action is None:
            raise ValueError("Expected an action for an HMC run (no model given); got None")
        if config.adapt is not None:
            raise ValueError("Expected adapt=None for an HMC run: there is no flow to adapt")
        if config.cluster is not None:
            sampler: Sampler = ClusterSampler(action, config, device, dtype or torch.float64,
                                              chain_mean)  # fmt: skip
        else:
            sampler = HMCSampler(action, config, device, dtype or torch.float64, chain_mean)
        return sampler, None, action, "", device
    if config.cluster is not None:
        raise ValueError(
            "Expected no model for a cluster run (config.cluster samples the action alone); "
            "got a model"
        )
    lmodel = _resolve_model(model, device, dtype, symmetric)
    if action is not None and action != lmodel.action:
        raise ValueError(f"Expected the model's action {lmodel.action!r}; got {action!r}")
    device = next(lmodel.flow.parameters()).device
    sha = file_sha256(lmodel.path)
    if config.hmc_traj == 0:
        sampler = FlowIMHSampler(lmodel, config)
    else:
        sampler = HybridSampler(lmodel, config, device, chain_mean)
    return sampler, lmodel, lmodel.action, sha, device


class _Files(NamedTuple):
    """The ensemble a run writes, and what its root attributes say."""

    out: Path
    lattice: tuple[int, ...]
    action: dict
    store_configs: bool
    config_dtype: str
    compression: str | None

    def storage(self) -> dict:
        """The storage options as the file records them (``compression`` ``""`` for none)."""
        return {"store_configs": bool(self.store_configs), "config_dtype": self.config_dtype,
                "compression": self.compression or ""}  # fmt: skip


def _commit_state(
    sampler: Sampler, state: Any, rng: ChainRNG, ctr: Counters, steps_done: int,
    block_start: int,
) -> tuple[dict, dict]:
    """The arrays and attributes a commit saves: the kernel state, generators and counters."""
    arrays = {k: to_numpy(v) for k, v in sampler.pack(state).items()}
    arrays.update(rng=rng.get_state(), **ctr.arrays())
    return arrays, {"steps_done": steps_done, "block_start": block_start, **ctr.totals}


def _resume(
    files: _Files,
    sampler: Sampler,
    rng: ChainRNG,
    ctr: Counters,
    config: RunConfig,
    lmodel: LoadedModel | None,
    sha: str,
    device: torch.device,
) -> tuple[EnsembleWriter, Any, int, int]:
    """Reopen ``files.out`` after its checks, with the sampler, generators and counters set to
    its last commit: ``(writer, state, steps_done, block_start)``."""
    out = files.out
    stored, stored_meta = _stored_sampler(out)
    if (isinstance(sampler, (HMCSampler, HybridSampler, ClusterSampler))
            and stored.get("step_size") is not None):  # fmt: skip
        sampler.freeze(stored["step_size"], stored.get("num_steps"))
    _check_resume_settings(out, stored, sampler.attrs())
    if config.adapt is not None:
        adapt_path = adapted_model_path(out)
        base_rec = (stored_meta.get("model") or {}).get("adapted_from") or {}
        if base_rec.get("sha256") != sha:
            raise ValueError(
                f"Cannot resume {str(out)!r}: model_sha256 mismatch: it was adapted from "
                f"a flow with SHA-256 {base_rec.get('sha256')!r}, given {sha!r}"
            )
        if not adapt_path.is_file():
            raise FileNotFoundError(
                f"Cannot resume {str(out)!r}: its adapted flow {str(adapt_path)!r} is missing"
            )
        check_adapted(adapt_path, out, stored_meta)
        p = next(lmodel.flow.parameters())
        lmodel = load_model(adapt_path, device=p.device, dtype=p.dtype,
                            symmetric=lmodel.symmetric, lam=lmodel.lam)  # fmt: skip
        sampler.use_model(lmodel)
        sha = file_sha256(adapt_path)
    writer = EnsembleWriter.resume(
        out,
        expect={
            "lattice_shape": files.lattice, "n_chains": config.chains, "action": files.action,
            "sampler": stored, "model_sha256": sha, "seed": config.seed,
            "scalar_names": list(sampler.scalars), **files.storage(),
        },
    )  # fmt: skip
    try:
        arrays, attrs = writer.load_state()
    except BaseException:
        writer.close()
        raise
    state = sampler.unpack(arrays, device)
    rng.set_state(arrays["rng"])
    ctr.load(attrs, arrays)
    return writer, state, int(attrs["steps_done"]), int(attrs["block_start"])


def _begin(
    files: _Files,
    sampler: Sampler,
    rng: ChainRNG,
    config: RunConfig,
    lmodel: LoadedModel | None,
    sha: str,
    *,
    force: bool,
    meta: dict | None,
    command_line: str | None,
) -> tuple[EnsembleWriter, Any, dict]:
    """A new run: its output checks, the warm-up (and adaptation), then the new file (nothing
    is written before): ``(writer, state, warm-up record)``."""
    out = files.out
    check_output(out, force=force)  # the --force policy, before the warm-up
    adapt_path = adapted_model_path(out) if config.adapt is not None else None
    if adapt_path is not None:
        _check_adapted_target(adapt_path, out)
    t0 = time.perf_counter()
    with torch.no_grad():
        state, warm = sampler.start(rng)
    model_rec = None if lmodel is None else _model_record(lmodel, sha)
    if config.adapt is not None:
        state, lmodel, warm["adapt"] = _adapt(sampler, state, rng, config, out, sha)
        base_rec, sha = model_rec, file_sha256(adapt_path)
        model_rec = _model_record(lmodel, sha)
        model_rec["adapted_from"] = base_rec
        model_rec["adapt_time_s"] = warm["adapt"]["seconds"]
        base_t = base_rec.get("training_time_total_s", base_rec.get("training_time_s"))
        model_rec["training_time_s"] = (
            None if base_t is None else base_t + warm["adapt"]["seconds"]
        )
    warm["seconds"] = time.perf_counter() - t0
    run_meta: dict = {"warmup": warm}
    if model_rec is not None:
        run_meta.update(model=model_rec, model_path=model_rec["path"])
    writer = EnsembleWriter.create(
        out, lattice_shape=files.lattice, n_chains=config.chains, scalar_names=sampler.scalars,
        action=files.action, sampler=sampler.attrs(), model_sha256=sha, seed=config.seed,
        meta={**run_meta, **(meta or {})}, store_configs=files.store_configs,
        config_dtype=files.config_dtype, compression=files.compression, force=force,
        command_line=command_line,
    )  # fmt: skip
    return writer, state, warm


@torch.no_grad()
def _sample(
    sampler: Sampler,
    state: Any,
    rng: ChainRNG,
    ctr: Counters,
    writer: EnsembleWriter,
    config: RunConfig,
    steps_done: int,
    block_start: int,
    progress: bool,
) -> dict:
    """The sampling loop: kernel steps, rows, commits (see the module docstring)."""
    K = sampler.sub_steps
    target = config.steps_for(config.n)
    chunk = config.chunk or (1 if sampler.name == "flow-imh" else 100)
    start_steps = steps_done
    pending: list[tuple[dict, Tensor]] = []
    n_pending = 0
    bar = tqdm(total=config.n, initial=writer.n, disable=not progress, file=sys.stderr,
               unit="row", desc=sampler.name, dynamic_ncols=True, leave=True)  # fmt: skip
    t_run = t_chunk = time.perf_counter()

    def commit() -> None:
        nonlocal pending, n_pending, t_chunk
        names = writer.scalar_names
        scalars = {k: torch.cat([p[0][k].cpu() for p in pending]).numpy() for k in names}
        configs = (
            torch.cat([p[1] for p in pending]).cpu().numpy() if writer.store_configs else None
        )
        arrays, attrs = _commit_state(sampler, state, rng, ctr, steps_done, block_start)
        now = time.perf_counter()
        writer.append(scalars=scalars, configs=configs, state=arrays, state_attrs=attrs,
                      wall_time=now - t_chunk)  # fmt: skip
        pending, n_pending, t_chunk = [], 0, now
        t = ctr.totals
        acc = t["n_accepted"] / max((steps_done) * config.chains, 1)
        bar.set_postfix(acc=f"{sampler.summary(ctr).get('acceptance', acc):.3f}",
                        refresh=False)  # fmt: skip

    try:
        while steps_done < target:
            offset = steps_done - block_start
            take = min(K - offset, target - steps_done)
            partial = offset + take < K
            before = rng.get_state() if partial else None
            new_state, info = sampler.step(state, rng)
            lo, hi = offset, offset + take
            sampler.tally(info, lo, hi, ctr)
            s = np.arange(steps_done, steps_done + take)
            rec = (s >= config.therm) & ((s - config.therm + 1) % config.thin == 0)
            idx = torch.as_tensor(lo + np.nonzero(rec)[0], dtype=torch.long)
            if idx.numel():
                pending.append(sampler.rows(info, new_state, idx))
                n_pending += idx.numel()
                bar.update(idx.numel())
            steps_done += take
            if partial:  # the target ends inside this block: keep its start, resume redoes it
                rng.set_state(before)
            else:
                state, block_start = new_state, steps_done
            if n_pending and (n_pending >= chunk or steps_done == target):
                commit()
        seconds = time.perf_counter() - t_run
        bar.close()
    except BaseException:
        bar.close()
        raise
    new_steps = (steps_done - start_steps) * config.chains
    t = ctr.totals
    return {
        "n": writer.n,
        "steps": steps_done,
        "acceptance": t["n_accepted"] / max(steps_done * config.chains, 1),
        "longest_rejection_run": int(ctr.max_run.max()) if ctr.max_run.size else 0,
        "seconds": seconds,
        "samples_per_second": new_steps / seconds if seconds > 0 else float("nan"),
    }
