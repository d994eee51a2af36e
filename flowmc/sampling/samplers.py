r"""The three samplers of :func:`flowmc.sampling.run.run_ensemble`: how each starts, warms up,
steps, records rows and saves its state.

Each sampler wraps a kernel (:mod:`flowmc.mcmc.kernel`) for the driver:

* ``start(rng) -> (state, warm-up record)``: initial state and warm-up (HMC step-size tuning);
* ``step(state, rng) -> (state, info)``: one kernel step of ``sub_steps`` chain steps (a block of
  MH steps for flow MH, a block of cycles for the hybrid, one trajectory for HMC);
* ``tally(info, lo, hi, counters)`` and ``rows(info, state, idx)``: the counters and per-row
  scalars of chain steps ``lo .. hi - 1`` of that kernel step; ``scalars`` names those scalars,
  in the order they are stored;
* ``pack(state)`` / ``unpack(arrays, device)``: the state arrays committed with every append;
* ``attrs()`` (the ``sampler`` attribute) and ``summary(counters)``;
* flow samplers also ``use_model``, ``refresh`` and ``adapt_step`` for the adaptive warm-up.

The protocols of this seam: :mod:`flowmc.sampling.protocol`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from flowmc.flows.flow import check_integration
from flowmc.io.checkpoint import LoadedModel
from flowmc.mcmc import hmc, imh
from flowmc.mcmc.hybrid import HybridInfo, hybrid
from flowmc.mcmc.kernel import CycleState, SamplingAlgorithm, cycle
from flowmc.mcmc.rng import RNG_SCHEME, ChainRNG

if TYPE_CHECKING:
    from flowmc.sampling.run import RunConfig
    from flowmc.training.adapt import Adapter

__all__ = ["Counters", "FlowIMHSampler", "HMCSampler", "HybridSampler", "fixed_warmup"]


class Counters:
    """Totals over all processed steps, and per-chain runs of rejections of ``accepted``."""

    KEYS = ("n_accepted", "flow_steps", "flow_accepted", "n_nonfinite", "hmc_trajectories",
            "hmc_accepted", "n_divergent",
            "metropolis_hits", "metropolis_accepted", "clusters", "cluster_sites")  # cluster

    def __init__(self, chains: int) -> None:
        self.chains = chains
        self.totals = dict.fromkeys(self.KEYS, 0)
        self.cur_run = np.zeros(chains, np.int64)
        self.max_run = np.zeros(chains, np.int64)

    def add(self, **kw: Tensor | int) -> None:
        for k, v in kw.items():
            self.totals[k] += int(v.sum()) if isinstance(v, Tensor) else int(v)

    def accepted(self, acc: Tensor) -> None:
        """``acc (k, C)``: the ``accepted`` flag of ``k`` consecutive steps."""
        a = acc.cpu().numpy()
        for row in a:
            self.cur_run = np.where(row, 0, self.cur_run + 1)
            self.max_run = np.maximum(self.max_run, self.cur_run)
        self.totals["n_accepted"] += int(a.sum())

    def arrays(self) -> dict:
        return {"cur_run": self.cur_run, "max_run": self.max_run}

    def load(self, attrs: dict, arrays: dict) -> None:
        self.totals = {k: int(attrs.get(k, 0)) for k in self.KEYS}
        self.cur_run = np.asarray(arrays["cur_run"], np.int64)
        self.max_run = np.asarray(arrays["max_run"], np.int64)


def magnetization(phi: Tensor) -> Tensor:
    return phi.flatten(2).sum(2).double()


def fixed_warmup(kernel: SamplingAlgorithm, state: Any, rng: ChainRNG, warmup: int,
                 chain_mean: Callable[[Tensor], float], record: dict) -> Any:
    """``warmup`` steps of a kernel with a fixed (given) step size; the mean acceptance over the
    last quarter goes into ``record["acceptance_last_quarter"]``. Returns the state."""
    acc = []
    for _ in range(warmup):
        state, info = kernel.step(state, rng)
        acc.append(chain_mean(info.acceptance_rate))
    if acc:
        record["acceptance_last_quarter"] = float(np.mean(acc[-max(1, len(acc) // 4):]))
    return state


def _int_steps(model: LoadedModel) -> dict:
    """``{"int_steps": N}`` for a flow with continuous layers (part of the proposal), else
    ``{}`` (the records of coupling flows stay as they were)."""
    return {} if model.int_steps is None else {"int_steps": int(model.int_steps)}


class FlowIMHSampler:
    """Flow independence Metropolis–Hastings (:func:`flowmc.mcmc.imh.flow_imh`): ``sub_steps``
    chain steps per flow call, every row records the proposal's ``log_q`` and ``log_weight``."""

    name = "flow-imh"
    scalars = ("action", "log_q", "log_weight", "accepted", "magnetization")

    def __init__(self, model: LoadedModel, config: RunConfig) -> None:
        self.config = config
        self.sub_steps = config.flow_batch()
        self.use_model(model)

    def use_model(self, model: LoadedModel) -> None:
        check_integration(model.proposal, str(model.path))
        self.model, self.action, self.proposal = model, model.action, model.proposal
        self.dtype = imh.proposal_dtype(self.proposal)
        self.kernel = imh.flow_imh(self.proposal, self.action, self.sub_steps)

    def attrs(self) -> dict:
        c = self.config
        return {
            "name": self.name, "chains": c.chains, "first_chain": c.first_chain,
            "batch": self.sub_steps, "thin": c.thin, "therm": c.therm,
            "symmetric": bool(self.model.symmetric), "dtype": dtype_name(self.dtype),
            "rng": RNG_SCHEME, "adapt": None if c.adapt is None else c.adapt.to_dict(),
            **_int_steps(self.model),
        }  # fmt: skip

    def start(self, rng: ChainRNG) -> tuple[imh.IMHState, dict]:
        return imh.sample_init(self.proposal, self.action, rng), {}

    def adapt_step(self, state: imh.IMHState, rng: ChainRNG, adapter: Adapter) -> imh.IMHState:
        state, info = self.kernel.step(state, rng)
        adapter.add(info.phi.flatten(0, 1))
        adapter.step()
        return self.refresh(state)

    def refresh(self, state: imh.IMHState) -> imh.IMHState:
        """The state with ``log q`` recomputed under the current (e.g. just adapted) flow."""
        return self.kernel.adopt(None, state)

    def step(self, state: imh.IMHState, rng: ChainRNG) -> tuple[imh.IMHState, imh.IMHInfo]:
        return self.kernel.step(state, rng)

    def tally(self, info: imh.IMHInfo, lo: int, hi: int, ctr: Counters) -> None:
        acc = info.is_accepted[lo:hi]
        ctr.accepted(acc)
        ctr.add(flow_steps=hi - lo, flow_accepted=acc,
                n_nonfinite=info.is_nonfinite[lo:hi])  # fmt: skip

    def rows(self, info: imh.IMHInfo, state: imh.IMHState, idx: Tensor) -> tuple[dict, Tensor]:
        dev = info.phi.device
        phi = info.phi[idx.to(dev)]
        return {
            "action": info.action[idx.to(dev)].double(),
            "log_q": info.log_q[idx.to(dev)].double(),
            "log_weight": info.log_weight[idx],
            "accepted": info.is_accepted[idx],
            "magnetization": magnetization(phi),
        }, phi

    @staticmethod
    def pack(state: imh.IMHState) -> dict:
        return {"phi": state.phi, "action": state.action, "log_q": state.log_q}

    def unpack(self, arrays: dict, device: torch.device) -> imh.IMHState:
        return imh.IMHState(*(to_tensor(arrays[k], device) for k in ("phi", "action", "log_q")))

    @staticmethod
    def summary(ctr: Counters) -> dict:
        t = ctr.totals
        return {
            "flow_acceptance": t["flow_accepted"] / max(t["flow_steps"] * ctr.chains, 1),
            "n_nonfinite": t["n_nonfinite"],
        }


class HMCSampler:
    """Local HMC (:func:`flowmc.mcmc.hmc.hmc`): the step size is tuned during warm-up, then
    fixed; one trajectory per row, which records the energy error ``delta_h``."""

    name = "hmc"
    scalars = ("action", "accepted", "delta_h", "magnetization")
    sub_steps = 1

    def __init__(
        self,
        action: Any,
        config: RunConfig,
        device: torch.device,
        dtype: torch.dtype,
        chain_mean: hmc.ChainMean | None = None,
    ) -> None:
        self.action, self.config, self.device, self.dtype = action, config, device, dtype
        self.chain_mean = chain_mean or hmc.local_mean
        self.settings = config.hmc
        self.step_size: float | None = None
        self.num_steps: int | None = None

    def freeze(self, step_size: float, num_steps: int) -> None:
        s = self.settings
        self.step_size, self.num_steps = float(step_size), int(num_steps)
        self.kernel = hmc.hmc(self.action, self.step_size, self.num_steps, s.integrator, s.flip)

    def attrs(self) -> dict:
        c = self.config
        return {
            "name": self.name, **self.settings.attrs(self.step_size, self.num_steps),
            "chains": c.chains, "first_chain": c.first_chain, "thin": c.thin,
            "therm": c.therm, "start": c.start, "dtype": dtype_name(self.dtype),
            "rng": RNG_SCHEME,
        }  # fmt: skip

    def start(self, rng: ChainRNG) -> tuple[hmc.HMCState, dict]:
        c, s = self.config, self.settings
        shape = (c.chains, *self.action.lattice_shape)
        if c.start == "cold":
            phi0 = torch.zeros(shape, dtype=self.dtype, device=self.device)
        else:
            phi0 = rng.normal(shape[1:], self.dtype)
        state = hmc.init(phi0, self.action)
        record: dict = {"trajectories": s.warmup}
        if s.step_size is None:
            state, eps, num_steps, hist = hmc.tune_step_size(
                self.action, state, rng, traj_length=s.traj_length,
                target_accept=s.target_accept, num_warmup=s.warmup, integrator=s.integrator,
                chain_mean=self.chain_mean,
            )  # fmt: skip
            tail = hist["acceptance_rate"][-max(1, len(hist["acceptance_rate"]) // 4):]
            record["acceptance_last_quarter"] = float(np.mean(tail))
            record["step_size_first"] = hist["step_size"][0]
            self.freeze(eps, num_steps)
        else:
            self.freeze(s.step_size, max(1, math.ceil(s.traj_length / s.step_size)))
            state = fixed_warmup(self.kernel, state, rng, s.warmup, self.chain_mean, record)
        return state, record

    def step(self, state: hmc.HMCState, rng: ChainRNG) -> tuple[hmc.HMCState, hmc.HMCInfo]:
        return self.kernel.step(state, rng)

    def tally(self, info: hmc.HMCInfo, lo: int, hi: int, ctr: Counters) -> None:
        ctr.accepted(info.is_accepted[None])
        ctr.add(hmc_trajectories=1, hmc_accepted=info.is_accepted,
                n_divergent=info.is_divergent)  # fmt: skip

    def rows(self, info: hmc.HMCInfo, state: hmc.HMCState, idx: Tensor) -> tuple[dict, Tensor]:
        phi = state.phi[None]
        return {
            "action": state.action[None].double(),
            "accepted": info.is_accepted[None],
            "delta_h": info.delta_h[None].double(),
            "magnetization": magnetization(phi),
        }, phi

    @staticmethod
    def pack(state: hmc.HMCState) -> dict:
        return {"phi": state.phi, "action": state.action, "grad": state.grad}

    def unpack(self, arrays: dict, device: torch.device) -> hmc.HMCState:
        return hmc.HMCState(*(to_tensor(arrays[k], device) for k in ("phi", "action", "grad")))

    def summary(self, ctr: Counters) -> dict:
        t = ctr.totals
        return {
            "trajectories": t["hmc_trajectories"],
            "hmc_acceptance": t["hmc_accepted"]
            / max(t["hmc_trajectories"] * self.config.chains, 1),
            "step_size": self.step_size,
            "num_steps": self.num_steps,
            "integrator": self.settings.integrator,
            "n_divergent": t["n_divergent"],
        }


class HybridSampler:
    """Cycles of one flow independence-MH step and ``K`` HMC trajectories; chains in float64.

    Sampling runs blocks of ``batch`` cycles (:func:`flowmc.mcmc.hybrid.hybrid`); warm-up and
    adaptation run single cycles.
    """

    name = "hybrid"
    scalars = ("action", "accepted", "hmc_accepted", "delta_h", "magnetization")

    def __init__(
        self,
        model: LoadedModel,
        config: RunConfig,
        device: torch.device,
        chain_mean: hmc.ChainMean | None = None,
    ) -> None:
        self.config, self.settings, self.K = config, config.hmc, config.hmc_traj
        self.sub_steps = config.flow_batch()
        self.dtype = torch.float64  # the chain's: Delta H is a difference of extensive numbers
        self.chain_mean = chain_mean or hmc.local_mean
        self.hmc_part = HMCSampler(model.action, config, device, self.dtype, chain_mean)
        self.use_model(model)

    def use_model(self, model: LoadedModel) -> None:
        check_integration(model.proposal, str(model.path))
        self.model, self.action, self.proposal = model, model.action, model.proposal
        self.flow_dtype = imh.proposal_dtype(self.proposal)
        self.flow_kernel = imh.flow_imh(self.proposal, self.action, 1)
        if self.hmc_part.step_size is not None:
            self.freeze(self.hmc_part.step_size, self.hmc_part.num_steps)

    def freeze(self, step_size: float, num_steps: int) -> None:
        self.hmc_part.freeze(step_size, num_steps)
        hk = self.hmc_part.kernel
        self.single = cycle([self.flow_kernel, hk], [1, self.K])
        self.kernel = hybrid(self.proposal, self.action, hk, self.K, self.sub_steps)

    def attrs(self) -> dict:
        c = self.config
        return {
            "name": self.name, "chains": c.chains, "first_chain": c.first_chain,
            "batch": self.sub_steps, "thin": c.thin, "therm": c.therm,
            "symmetric": bool(self.model.symmetric), "dtype": dtype_name(self.flow_dtype),
            "chain_dtype": dtype_name(self.dtype), "hmc_traj": self.K,
            **self.settings.attrs(self.hmc_part.step_size, self.hmc_part.num_steps),
            "rng": RNG_SCHEME, "adapt": None if c.adapt is None else c.adapt.to_dict(),
            **_int_steps(self.model),
        }  # fmt: skip

    def start(self, rng: ChainRNG) -> tuple[CycleState, dict]:
        s, K = self.settings, self.K
        flow_state = imh.sample_init(self.proposal, self.action, rng, dtype=self.dtype)
        hmc_state = hmc.adopt(None, flow_state, self.action)
        record: dict = {"trajectories": s.warmup}
        flow_acc: list[float] = []
        if s.step_size is None:
            own = {"flow": flow_state}

            def flow_step(i: int, hs: hmc.HMCState) -> hmc.HMCState:
                if i % K:
                    return hs
                fs = self.flow_kernel.adopt(own["flow"], hs)
                fs, info = self.flow_kernel.step(fs, rng)
                own["flow"] = fs
                flow_acc.append(self.chain_mean(info.is_accepted[0].double()))
                return hmc.adopt(hs, fs, self.action)

            hmc_state, eps, num_steps, hist = hmc.tune_step_size(
                self.action, hmc_state, rng, traj_length=s.traj_length,
                target_accept=s.target_accept, num_warmup=s.warmup, integrator=s.integrator,
                before_trajectory=flow_step, chain_mean=self.chain_mean,
            )  # fmt: skip
            tail = hist["acceptance_rate"][-max(1, len(hist["acceptance_rate"]) // 4):]
            record["acceptance_last_quarter"] = float(np.mean(tail))
            record["step_size_first"] = hist["step_size"][0]
            self.freeze(eps, num_steps)
            state = CycleState((own["flow"], hmc_state))
        else:
            self.freeze(s.step_size, max(1, math.ceil(s.traj_length / s.step_size)))
            state = CycleState((flow_state, hmc_state))
            for _ in range(math.ceil(s.warmup / K)):
                state, info = self.single.step(state, rng)
                flow_acc.append(self.chain_mean(info.infos[0][0].is_accepted[0].double()))
        record["flow_steps"] = len(flow_acc)
        record["flow_acceptance"] = float(np.mean(flow_acc)) if flow_acc else None
        return state, record

    def adapt_step(self, state: CycleState, rng: ChainRNG, adapter: Adapter) -> CycleState:
        fs = self.flow_kernel.adopt(state.states[0], state.states[1])
        fs, info = self.flow_kernel.step(fs, rng)
        adapter.add(fs.phi)
        hs = hmc.adopt(state.states[1], fs, self.action)
        for _ in range(self.K):
            hs, _ = self.hmc_part.kernel.step(hs, rng)
            adapter.add(hs.phi)
        adapter.step()
        return CycleState((fs, hs))

    def refresh(self, state: CycleState) -> CycleState:
        """The state with the flow part's ``log q`` recomputed under the current flow."""
        return CycleState((self.flow_kernel.adopt(None, state.states[1]), state.states[1]))

    def step(self, state: CycleState, rng: ChainRNG) -> tuple[CycleState, HybridInfo]:
        return self.kernel.step(state, rng)

    def tally(self, info: HybridInfo, lo: int, hi: int, ctr: Counters) -> None:
        acc = info.flow.is_accepted[lo:hi]
        ctr.accepted(acc)
        ctr.add(flow_steps=hi - lo, flow_accepted=acc, n_nonfinite=info.flow.is_nonfinite[lo:hi],
                hmc_trajectories=(hi - lo) * self.K, hmc_accepted=info.hmc_accepted[lo:hi],
                n_divergent=info.is_divergent[lo:hi])  # fmt: skip

    def rows(self, info: HybridInfo, state: CycleState, idx: Tensor) -> tuple[dict, Tensor]:
        d = idx.to(info.phi.device)
        phi = info.phi[d]
        return {
            "action": info.action[d].double(),
            "accepted": info.flow.is_accepted[idx],
            "hmc_accepted": info.hmc_accepted[d].double(),
            "delta_h": info.delta_h[d].double(),
            "magnetization": magnetization(phi),
        }, phi

    @staticmethod
    def pack(state: CycleState) -> dict:
        f, h = state.states
        return {
            "flow_phi": f.phi, "flow_action": f.action, "flow_log_q": f.log_q,
            "phi": h.phi, "action": h.action, "grad": h.grad,
        }  # fmt: skip

    def unpack(self, arrays: dict, device: torch.device) -> CycleState:
        keys = ("phi", "action", "log_q")
        f = imh.IMHState(*(to_tensor(arrays[f"flow_{k}"], device) for k in keys))
        h = hmc.HMCState(*(to_tensor(arrays[k], device) for k in ("phi", "action", "grad")))
        return CycleState((f, h))

    def summary(self, ctr: Counters) -> dict:
        return {**FlowIMHSampler.summary(ctr), **self.hmc_part.summary(ctr), "hmc_traj": self.K}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def to_tensor(x: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)


def to_numpy(x: Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()
