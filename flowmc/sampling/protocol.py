"""The driver's seam: what :func:`flowmc.sampling.run.run_ensemble` needs of a sampler.

A sampler wraps a kernel (:mod:`flowmc.mcmc.kernel`) for the one run driver. The three of
:mod:`flowmc.sampling.samplers` (flow MH, HMC, the hybrid) implement :class:`Sampler`; those with
a tuned HMC step size also :class:`TunedSampler`, those with a flow :class:`FlowSampler` (the
adaptive warm-up). The protocols are structural (:class:`typing.Protocol`): a sampler does not
inherit from them.

Each sampler declares the per-row scalars it records (:attr:`Sampler.scalars`, the keys of
:meth:`Sampler.rows` in the order of the datasets ``scalars/<name>`` of its ensembles), so the
driver never keeps a list of its own; :data:`flowmc.sampling.run.SCALARS` is derived from them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from flowmc.io.checkpoint import LoadedModel
    from flowmc.mcmc.rng import ChainRNG
    from flowmc.sampling.samplers import Counters
    from flowmc.training.adapt import Adapter

__all__ = ["Sampler", "TunedSampler", "FlowSampler"]


class Sampler(Protocol):
    """One sampler as the driver sees it (see :mod:`flowmc.sampling.samplers` for the three).

    Attributes:
        name: ``sampler["name"]`` in the file (``"flow-imh"``, ``"hmc"``, ``"hybrid"``).
        scalars: the per-row scalars, in the order they are stored.
        sub_steps: chain steps per kernel step (a block of MH steps or cycles; 1 for HMC).
    """

    name: ClassVar[str]
    scalars: ClassVar[tuple[str, ...]]
    sub_steps: int

    def attrs(self) -> dict:
        """The ``sampler`` attribute of the file: name and settings."""
        ...

    def start(self, rng: ChainRNG) -> tuple[Any, dict]:
        """The initial state after warm-up, and the warm-up record."""
        ...

    def step(self, state: Any, rng: ChainRNG) -> tuple[Any, Any]:
        """One kernel step of ``sub_steps`` chain steps: ``(state, info)``."""
        ...

    def tally(self, info: Any, lo: int, hi: int, ctr: Counters) -> None:
        """Add chain steps ``lo .. hi - 1`` of the kernel step ``info`` to the counters."""
        ...

    def rows(self, info: Any, state: Any, idx: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The rows of the chain steps ``idx``: ``{scalar: (k, C)}`` (keys :attr:`scalars`) and
        the configurations ``(k, C, *L)``."""
        ...

    def pack(self, state: Any) -> dict[str, Tensor]:
        """The state as named arrays (committed with every append)."""
        ...

    def unpack(self, arrays: dict, device: torch.device) -> Any:
        """The state from the arrays of :meth:`pack`."""
        ...

    def summary(self, ctr: Counters) -> dict:
        """The sampler's entries of the run summary."""
        ...


class TunedSampler(Sampler, Protocol):
    """A sampler with an HMC step size, tuned in warm-up and frozen (HMC, the hybrid)."""

    def freeze(self, step_size: float, num_steps: int) -> None:
        """Fix the step size and steps per trajectory (a resumed run reads them from its file)."""
        ...


class FlowSampler(Sampler, Protocol):
    """A sampler with a flow proposal (flow MH, the hybrid); it can adapt the flow in warm-up."""

    model: LoadedModel

    def use_model(self, model: LoadedModel) -> None:
        """Propose from ``model`` from now on."""
        ...

    def refresh(self, state: Any) -> Any:
        """The state with its ``log q`` recomputed under the current flow."""
        ...

    def adapt_step(self, state: Any, rng: ChainRNG, adapter: Adapter) -> Any:
        """One step of the chains that also feeds (and steps) the flow's adapter."""
        ...
