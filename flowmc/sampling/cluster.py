r"""The cluster sampler of :func:`flowmc.sampling.run.run_ensemble`: Metropolis sweeps + Wolff
clusters (:mod:`flowmc.mcmc.cluster`) with the surface of HMC.

A run with ``RunConfig(cluster=ClusterSettings(...))`` and no model (``flowmc cluster``,
``flowmc scan --cluster``) writes the usual ensemble with ``sampler["name"] == "cluster"``: one
row per step (one checkerboard sweep of ``num_hits`` Metropolis hits per site, then
``num_clusters`` Wolff clusters) with the per-row scalars

* ``action``, ``magnetization`` (as every sampler);
* ``metropolis_acceptance``: the chain's fraction of accepted Metropolis hits in that step
  (:func:`flowmc.analysis.diagnostics.acceptance_by_kernel` reports it as kernel
  ``"metropolis"``);
* ``cluster_size``: the mean over the step's clusters of the fraction of sites flipped.

There is no per-step accept/reject (a Wolff flip is always taken), so there is no generic
``accepted`` scalar and no rejection runs; the run summary's ``acceptance`` is the Metropolis
acceptance.

**Warm-up** (as HMC's): ``warmup`` steps from a cold (φ = 0) or random start; with no fixed
``step_size`` the Metropolis half-width δ is adapted towards ``target_accept``
(:func:`flowmc.mcmc.cluster.tune_step_size`, mean acceptance over *all* chains of the run, also
when sharded) and frozen. The frozen δ is stored as ``sampler["step_size"]`` (the given one as
``fixed_step_size``) and re-read on ``--resume``, so a resumed run continues with the same kernel
bit for bit; the state saved with every commit is ``phi`` and ``action`` of every chain, plus the
per-chain generator states (:class:`flowmc.mcmc.rng.ChainRNG`).

The kernel is compiled with numba for the CPU, float64, serial (one chain after another).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from flowmc._checks import check_int, is_int
from flowmc.mcmc import cluster as CL
from flowmc.mcmc.hmc import ChainMean, local_mean
from flowmc.mcmc.rng import RNG_SCHEME, ChainRNG
from flowmc.sampling.samplers import (
    Counters,
    dtype_name,
    fixed_warmup,
    magnetization,
    to_tensor,
)

if TYPE_CHECKING:
    from flowmc.sampling.run import RunConfig

__all__ = ["ClusterSettings", "ClusterSampler", "CLUSTER_SCALARS"]

#: Per-row scalars of a cluster ensemble.
CLUSTER_SCALARS = ("action", "metropolis_acceptance", "cluster_size", "magnetization")


@dataclass(frozen=True)
class ClusterSettings:
    """Settings of the cluster kernel (``flowmc cluster``, ``flowmc scan --cluster``).

    Attributes:
        num_hits: Metropolis hits per site and sweep (>= 1: the Wolff move keeps every
            :math:`|\\phi_x|`, so without hits the chain is not ergodic).
        num_clusters: Wolff clusters per step (>= 0; 0 is plain Metropolis).
        target_accept: Metropolis acceptance the warm-up adapts the step size to.
        warmup: warm-up steps per chain (discarded; the step size is adapted here).
        step_size: a fixed Metropolis half-width δ (no adaptation), or ``None`` to adapt it.
    """

    num_hits: int = 3
    num_clusters: int = 2
    target_accept: float = 0.5
    warmup: int = 200
    step_size: float | None = None

    def __post_init__(self) -> None:
        if not is_int(self.num_hits, minimum=1):  # the reason is part of the message
            raise ValueError(
                "Expected an integer num_hits >= 1 (the clusters keep |phi|: without Metropolis "
                f"hits the chain is not ergodic); got {self.num_hits!r}"
            )
        check_int("num_clusters", self.num_clusters, 0)
        check_int("warmup", self.warmup, 0)
        if not (isinstance(self.target_accept, (int, float)) and 0.0 < self.target_accept < 1.0):
            raise ValueError(f"Expected target_accept in (0, 1); got {self.target_accept!r}")
        if self.step_size is not None:
            ok = isinstance(self.step_size, (int, float)) and not isinstance(self.step_size, bool)
            if not (ok and math.isfinite(self.step_size) and self.step_size > 0):
                raise ValueError(f"Expected a finite step_size > 0; got {self.step_size!r}")
        elif self.warmup < 2:
            raise ValueError(
                f"Expected warmup >= 2 to adapt the step size; got warmup={self.warmup} without "
                "a fixed step_size (give one, or allow warm-up steps)"
            )

    def attrs(self, step_size: float | None) -> dict:
        """Settings plus the adapted (frozen) step size, for the ``sampler`` attribute."""
        d = asdict(self)
        d.pop("step_size")
        return {
            **d,
            "fixed_step_size": self.step_size,
            "step_size": None if step_size is None else float(step_size),
        }


class ClusterSampler:
    """Metropolis sweeps + Wolff clusters for :func:`flowmc.sampling.run.run_ensemble` (the
    same methods as :class:`flowmc.sampling.samplers.HMCSampler`; module docstring)."""

    name = "cluster"
    scalars = CLUSTER_SCALARS
    sub_steps = 1

    def __init__(
        self,
        action: Any,
        config: RunConfig,
        device: torch.device,
        dtype: torch.dtype,
        chain_mean: ChainMean | None = None,
    ) -> None:
        CL.require_numba()
        if torch.device(device).type != "cpu":
            raise ValueError(
                f"Expected device cpu for the cluster kernel (compiled for the CPU with numba); "
                f"got {device}"
            )
        if dtype != torch.float64:
            raise ValueError(
                f"Expected dtype float64 for the cluster kernel (it computes in double "
                f"precision); got {dtype_name(dtype)}"
            )
        if not isinstance(config.cluster, ClusterSettings):
            raise ValueError(
                f"Expected config.cluster to be ClusterSettings; got "
                f"{type(config.cluster).__name__}"
            )
        s = config.cluster
        CL.build_kernel(action, num_hits=s.num_hits, num_clusters=s.num_clusters)  # checks action
        self.action, self.config, self.device, self.dtype = action, config, device, dtype
        self.chain_mean = chain_mean or local_mean
        self.settings: ClusterSettings = s
        self.step_size: float | None = None

    def freeze(self, step_size: float, num_steps: int | None = None) -> None:
        """Fix the Metropolis step size (``num_steps``: HMC's, ignored)."""
        del num_steps
        s = self.settings
        self.step_size = float(step_size)
        self.kernel = CL.cluster(self.action, self.step_size, s.num_hits, s.num_clusters)

    def attrs(self) -> dict:
        c = self.config
        return {
            "name": self.name, **self.settings.attrs(self.step_size),
            "chains": c.chains, "first_chain": c.first_chain, "thin": c.thin,
            "therm": c.therm, "start": c.start, "dtype": dtype_name(self.dtype),
            "rng": RNG_SCHEME,
        }  # fmt: skip

    def start(self, rng: ChainRNG) -> tuple[CL.ClusterState, dict]:
        c, s = self.config, self.settings
        shape = (c.chains, *self.action.lattice_shape)
        if c.start == "cold":
            phi0 = torch.zeros(shape, dtype=self.dtype)
        else:
            phi0 = rng.normal(shape[1:], self.dtype)
        state = CL.init(phi0, self.action)
        record: dict = {"steps": s.warmup}
        if s.step_size is None:
            state, eps, hist = CL.tune_step_size(
                self.action, state, rng, target_accept=s.target_accept, num_warmup=s.warmup,
                num_hits=s.num_hits, num_clusters=s.num_clusters, chain_mean=self.chain_mean,
            )  # fmt: skip
            acc = hist["acceptance_rate"]
            record["step_size_first"] = hist["step_size"][0]
            self.freeze(eps)
            if acc:
                record["acceptance_last_quarter"] = float(np.mean(acc[-max(1, len(acc) // 4):]))
        else:
            self.freeze(s.step_size)
            state = fixed_warmup(self.kernel, state, rng, s.warmup, self.chain_mean, record)
        return state, record

    def step(self, state: CL.ClusterState, rng: ChainRNG) -> tuple[CL.ClusterState, CL.ClusterInfo]:
        return self.kernel.step(state, rng)

    def tally(self, info: CL.ClusterInfo, lo: int, hi: int, ctr: Counters) -> None:
        s, vol = self.settings, self.action.volume
        hits = s.num_hits * vol
        flips = vol * max(s.num_clusters, 1)
        ctr.add(
            metropolis_hits=hits * info.acceptance_rate.numel(),
            metropolis_accepted=torch.round(info.acceptance_rate * hits).long(),
            clusters=s.num_clusters * info.cluster_size.numel(),
            cluster_sites=torch.round(info.cluster_size * flips).long(),
        )

    def rows(
        self, info: CL.ClusterInfo, state: CL.ClusterState, idx: Tensor
    ) -> tuple[dict, Tensor]:
        phi = state.phi[None]
        return {
            "action": state.action[None].double(),
            "metropolis_acceptance": info.acceptance_rate[None].double(),
            "cluster_size": info.cluster_size[None].double(),
            "magnetization": magnetization(phi),
        }, phi

    @staticmethod
    def pack(state: CL.ClusterState) -> dict:
        return {"phi": state.phi, "action": state.action}

    def unpack(self, arrays: dict, device: torch.device) -> CL.ClusterState:
        return CL.ClusterState(*(to_tensor(arrays[k], device) for k in ("phi", "action")))

    def summary(self, ctr: Counters) -> dict:
        t, s = ctr.totals, self.settings
        acc = t["metropolis_accepted"] / t["metropolis_hits"] if t["metropolis_hits"] else math.nan
        size = (t["cluster_sites"] / (t["clusters"] * self.action.volume)
                if t["clusters"] else 0.0)  # fmt: skip
        return {
            "acceptance": acc,
            "metropolis_acceptance": acc,
            "cluster_size": size,
            "step_size": self.step_size,
            "num_hits": s.num_hits,
            "num_clusters": s.num_clusters,
        }
