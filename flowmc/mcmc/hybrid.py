r"""The hybrid kernel: flow independence-MH proposals cycled with HMC trajectories, in blocks.

One **cycle** is one flow independence-MH step followed by ``K`` HMC trajectories; it is exactly
``flowmc.mcmc.kernel.cycle([flow_imh(proposal, action, 1), hmc_alg], [1, K])``. :func:`hybrid` runs
``B`` cycles per ``step`` and draws the ``B`` flow proposals of every chain in **one** flow call
at the start of the block: an independence proposal does not depend on the current state, so
drawing it early changes nothing in the chain's law (each cycle still uses a fresh, independent
proposal), while the forward flow call is amortised over ``B`` cycles. What cannot be batched is
the flow's density of the *current* configuration after HMC moved it: one ``proposal.log_prob``
call on the ``C`` configurations per cycle (the ``adopt`` hand-over of :mod:`flowmc.mcmc.kernel`).

Per chain the stream is used in this order per block: the ``B`` proposals' noise (as
:func:`flowmc.mcmc.imh.propose`), ``B`` accept uniforms, then per cycle the HMC draws. With
``B = 1`` this is the order of the plain cycle, and the two kernels give identical chains (tested).

Why the chain is exact: see :mod:`flowmc.mcmc.kernel` (each component leaves :math:`p` invariant, so
does their cycle) and ``docs/hybrid.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from flowmc.mcmc import imh
from flowmc.mcmc.kernel import RNG, CycleState, SamplingAlgorithm, check_repeats
from flowmc.mcmc.rng import draw_uniform

__all__ = ["HybridInfo", "hybrid"]


class HybridInfo(NamedTuple):
    """Record of a block of ``B`` cycles of ``C`` chains.

    Attributes:
        flow: the flow steps' :class:`~flowmc.mcmc.imh.IMHInfo`, each field ``(B, C, ...)``
            (``flow.phi`` is the chain right after each flow step).
        hmc_accepted: ``(B, C)`` number of accepted trajectories in each cycle (0..K).
        hmc_acceptance_rate: ``(B, C)`` mean Metropolis probability of the cycle's trajectories.
        delta_h: ``(B, C)`` energy error of each cycle's last trajectory.
        is_divergent: ``(B, C)`` number of divergent trajectories in each cycle.
        phi: ``(B, C, *L)`` the chain after each cycle.
        action: ``(B, C)`` its action after each cycle.
    """

    flow: imh.IMHInfo
    hmc_accepted: Tensor
    hmc_acceptance_rate: Tensor
    delta_h: Tensor
    is_divergent: Tensor
    phi: Tensor
    action: Tensor


def hybrid(
    proposal: torch.nn.Module,
    action: Callable[[Tensor], Tensor],
    hmc_alg: SamplingAlgorithm,
    hmc_traj: int,
    cycles: int = 1,
) -> SamplingAlgorithm:
    """The hybrid kernel: ``cycles`` cycles of (1 flow MH step, ``hmc_traj`` trajectories).

    Args:
        proposal: the flow (or its Z2-symmetrised version); frozen.
        action: the action.
        hmc_alg: the HMC kernel (:func:`flowmc.mcmc.hmc.hmc`), with ``adopt``.
        hmc_traj: HMC trajectories per cycle ``K >= 1``.
        cycles: cycles per ``step`` ``B >= 1``, whose proposals come from one flow call.

    Returns:
        ``SamplingAlgorithm`` with ``init(phi) -> CycleState``,
        ``step(state, rng) -> (CycleState, HybridInfo)`` and ``adopt``; the state is that of
        ``cycle([flow_imh(proposal, action, 1), hmc_alg], [1, hmc_traj])``: the flow kernel's
        last state and the HMC state (the current position).

    Raises:
        ValueError: for ``hmc_traj`` or ``cycles`` not integers >= 1.
    """
    k, b = check_repeats((hmc_alg, hmc_alg), (hmc_traj, cycles))
    flow_alg = imh.flow_imh(proposal, action, 1)

    def init(phi: Tensor) -> CycleState:
        fs = flow_alg.init(phi)
        return CycleState((fs, hmc_alg.adopt(None, fs)))

    @torch.no_grad()
    def step(state: CycleState, rng: RNG) -> tuple[CycleState, HybridInfo]:
        fs, hs = state.states
        c = hs.phi.shape[0]
        phi_p, s_p, lq_p = imh.propose(proposal, action, b, rng, num_chains=c, dtype=hs.phi.dtype)
        log_u = draw_uniform(rng, (c, b), dtype=torch.float64, device=hs.phi.device).log().t()
        flow_infos, rec = [], {"n_acc": [], "rate": [], "dh": [], "div": [], "phi": [], "s": []}
        for i in range(b):
            fs = flow_alg.adopt(fs, hs)
            sl = slice(i, i + 1)
            fs, finfo = imh.accept_reject(fs, phi_p[sl], s_p[sl], lq_p[sl], log_u[sl])
            flow_infos.append(finfo)
            hs = hmc_alg.adopt(hs, fs)
            n_acc = n_div = rate = 0
            for _ in range(k):
                hs, hinfo = hmc_alg.step(hs, rng)
                n_acc = n_acc + hinfo.is_accepted.to(torch.int64)
                n_div = n_div + hinfo.is_divergent.to(torch.int64)
                rate = rate + hinfo.acceptance_rate
            rec["n_acc"].append(n_acc)
            rec["div"].append(n_div)
            rec["rate"].append(rate / k)
            rec["dh"].append(hinfo.delta_h)
            rec["phi"].append(hs.phi)
            rec["s"].append(hs.action)
        flow = imh.IMHInfo(*(torch.cat(x) for x in zip(*flow_infos)))
        info = HybridInfo(
            flow=flow,
            hmc_accepted=torch.stack(rec["n_acc"]),
            hmc_acceptance_rate=torch.stack(rec["rate"]),
            delta_h=torch.stack(rec["dh"]),
            is_divergent=torch.stack(rec["div"]),
            phi=torch.stack(rec["phi"]),
            action=torch.stack(rec["s"]),
        )
        return CycleState((fs, hs)), info

    def adopt(own: CycleState | None, other: object) -> CycleState:
        if isinstance(other, CycleState):
            return other
        fs = flow_alg.adopt(None if own is None else own.states[0], other)
        return CycleState((fs, hmc_alg.adopt(None if own is None else own.states[1], fs)))

    return SamplingAlgorithm(init, step, adopt)
