r"""The kernel interface shared by every sampler, and the cycle (composition) of kernels.

A *kernel* follows blackjax (``blackjax/base.py``): a :class:`SamplingAlgorithm` bundles

* ``init(phi) -> State``: the state of ``C`` chains at configurations ``phi (C, *L)``;
* ``step(state, rng) -> (State, Info)``: one transition of every chain, whose only randomness is
  ``rng`` (a :class:`flowmc.mcmc.rng.ChainRNG`, one stream per chain, or a plain
  :class:`torch.Generator`);
* ``adopt(own, other) -> State`` (optional): this kernel's state at the position of ``other``,
  a state of *another* kernel. Every state carries ``phi (C, *L)`` and ``action (C,)``; ``adopt``
  reuses them, computes only what this kernel needs on top (the flow's log density, the force),
  and reuses its own cached values ``own`` for the chains whose configuration did not change.

States and infos are NamedTuples of tensors. The kernels are :func:`flowmc.mcmc.imh.flow_imh`
(independence Metropolis-Hastings with a flow proposal) and :func:`flowmc.mcmc.hmc.hmc`;
:func:`cycle` composes them.

**Why a cycle is exact.** Each component kernel :math:`P_i` leaves :math:`p \propto e^{-S}`
invariant, :math:`p P_i = p`; hence so does their product
:math:`P = P_1^{r_1} P_2^{r_2}\cdots`: :math:`pP = p`. The cycle need not satisfy detailed
balance as a whole (it is not reversible), but stationarity is what makes the chain exact; with
an irreducible component (HMC, or a flow proposal with full support) the chain converges to
:math:`p`. The tests check stationarity on the free theory, with a negative control.

Example:
    >>> import torch
    >>> from flowmc.mcmc import hmc, imh
    >>> from flowmc.lattice.action import Phi4Action
    >>> from flowmc.flows.flow import FlowConfig, build_flow
    >>> from flowmc.mcmc.rng import ChainRNG
    >>> action = Phi4Action(1.0, 0.0, (4, 4))
    >>> flow = build_flow(FlowConfig((4, 4), n_layers=2, hidden=(4,))).double()
    >>> hybrid = cycle([imh.flow_imh(flow, action), hmc.hmc(action, 0.2, 5)], [1, 3])
    >>> rng = ChainRNG(seed=0, chain_ids=range(2))
    >>> state = hybrid.init(torch.zeros(2, 4, 4, dtype=torch.float64))
    >>> state, info = hybrid.step(state, rng)
    >>> len(info.infos[1])  # three HMC trajectories per cycle
    3
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from flowmc._checks import is_int
from flowmc.mcmc.rng import ChainRNG

__all__ = [
    "RNG",
    "PositionState",
    "SamplingAlgorithm",
    "CycleState",
    "CycleInfo",
    "cycle",
    "check_repeats",
    "unchanged_chains",
]

#: What a kernel draws its randomness from.
RNG = ChainRNG | torch.Generator


class PositionState(Protocol):
    """What every kernel state exposes: ``phi (C, *L)`` and ``action (C,)``."""

    phi: Tensor
    action: Tensor


class SamplingAlgorithm(NamedTuple):
    """An ``(init, step, adopt)`` triple, as ``blackjax.base.SamplingAlgorithm`` (plus ``adopt``).

    Attributes:
        init: ``init(phi) -> State``.
        step: ``step(state, rng) -> (State, Info)``.
        adopt: ``adopt(own_state_or_None, other_state) -> State``: this kernel's state at the
            position of another kernel's state (see the module docstring); ``None`` if the
            kernel cannot be composed (then :func:`cycle` falls back to ``init(other.phi)``).
    """

    init: Callable[[Tensor], Any]
    step: Callable[[Any, RNG], tuple[Any, Any]]
    adopt: Callable[[Any, Any], Any] | None = None


class CycleState(NamedTuple):
    """State of a :func:`cycle`: the last state of each component kernel.

    After every complete cycle (and after ``init``) the *last* component's state is the current
    position of the chains; the others are kept so that their cached quantities (e.g. the
    flow's log density of a configuration that did not move since) can be reused.

    Attributes:
        states: one state per component, in cycle order.
    """

    states: tuple

    @property
    def phi(self) -> Tensor:
        """``(C, *L)`` current configurations."""
        return self.states[-1].phi

    @property
    def action(self) -> Tensor:
        """``(C,)`` current actions."""
        return self.states[-1].action


class CycleInfo(NamedTuple):
    """Infos of one cycle.

    Attributes:
        infos: per component, a tuple of its infos, one per repeat.
    """

    infos: tuple


def unchanged_chains(own: PositionState | None, other: PositionState) -> Tensor:
    """``(C,)`` bool: chains whose configuration in ``other`` equals (bitwise) that in ``own``."""
    c = other.phi.shape[0]
    if own is None or own.phi.shape != other.phi.shape or own.phi.dtype != other.phi.dtype:
        return torch.zeros(c, dtype=torch.bool, device=other.phi.device)
    return (own.phi == other.phi).flatten(1).all(1)


def check_repeats(kernels: Sequence[SamplingAlgorithm], repeats: Sequence[int]) -> list[int]:
    """The repeat counts of a :func:`cycle` of ``kernels``, checked, as ``int``.

    Raises:
        ValueError: if there is no kernel, not one count per kernel, or a count is not an
            integer >= 1.
    """
    if len(kernels) == 0:
        raise ValueError("Expected at least one kernel to cycle; got none")
    if len(repeats) != len(kernels):
        raise ValueError(
            f"Expected one repeat count per kernel ({len(kernels)}); got {len(repeats)}"
        )
    out = []
    for r in repeats:
        if not is_int(r, minimum=1, strict=False):
            raise ValueError(f"Expected integer repeat counts >= 1; got {list(repeats)}")
        out.append(int(r))
    return out


def cycle(kernels: Sequence[SamplingAlgorithm], repeats: Sequence[int]) -> SamplingAlgorithm:
    """Compose kernels: one step runs ``repeats[0]`` steps of ``kernels[0]``, then
    ``repeats[1]`` steps of ``kernels[1]``, and so on. The result is itself a kernel.

    The position is handed from one component to the next with the next component's
    ``adopt``: only what the incoming state lacks is computed (for a flow independence-MH
    component, one ``log_prob`` call on the ``C`` current configurations per cycle, unless no
    chain moved; for HMC, the analytic force).

    Args:
        kernels: the component :class:`SamplingAlgorithm` s.
        repeats: steps of each component per cycle (integers >= 1).

    Returns:
        ``SamplingAlgorithm`` with ``init(phi) -> CycleState`` and
        ``step(state, rng) -> (CycleState, CycleInfo)``.

    Raises:
        ValueError: for no kernels, or repeat counts that are not integers >= 1.
    """
    kernels = tuple(kernels)
    repeats = check_repeats(kernels, repeats)

    def _adopt_into(k: SamplingAlgorithm, own: Any, other: PositionState) -> Any:
        if k.adopt is not None:
            return k.adopt(own, other)
        return k.init(other.phi)

    def init(phi: Tensor) -> CycleState:
        first = kernels[0].init(phi)
        states = [first]
        for k in kernels[1:]:
            states.append(_adopt_into(k, None, states[-1]))
        return CycleState(tuple(states))

    def step(state: CycleState, rng: RNG) -> tuple[CycleState, CycleInfo]:
        states = list(state.states)
        current = states[-1]
        infos = []
        for i, (k, r) in enumerate(zip(kernels, repeats)):
            s = current if len(kernels) == 1 else _adopt_into(k, states[i], current)
            done = []
            for _ in range(r):
                s, info = k.step(s, rng)
                done.append(info)
            states[i] = current = s
            infos.append(tuple(done))
        return CycleState(tuple(states)), CycleInfo(tuple(infos))

    def adopt(own: CycleState | None, other: PositionState) -> CycleState:
        if isinstance(other, CycleState):
            return other
        prev = own.states if own is not None else (None,) * len(kernels)
        states = [_adopt_into(kernels[0], prev[0], other)]
        for k, p in zip(kernels[1:], prev[1:]):
            states.append(_adopt_into(k, p, states[-1]))
        return CycleState(tuple(states))

    return SamplingAlgorithm(init, step, adopt)
