r"""Adaptive warm-up: train the flow further on the chains' own configurations, then freeze it.

During warm-up only, the sampler alternates chain steps with optimizer steps on

.. math::

    \mathcal L(\theta) = -\frac1B\sum_{b=1}^B \log q_\theta(\phi_b)
        \;+\; w\,\Big\langle \log q_\theta + S\Big\rangle_{q_\theta},

the forward KL divergence :math:`D_{KL}(p\,\|\,q_\theta)` up to a constant (maximum likelihood of
the proposal density on a minibatch of recent chain configurations :math:`\phi_b`, which are
approximately distributed as :math:`p`), optionally mixed with weight :math:`w` with the reverse
KL loss of :func:`flowmc.training.train.reverse_kl_loss`. The forward KL is mass-covering: it pulls
the flow onto regions (e.g. modes) that the chains visit but the flow misses, the failure mode of a
reverse-KL fit. With a Z2-symmetrised proposal the likelihood is that of
:math:`q_s = \tfrac12[q(\phi) + q(-\phi)]`, the density actually proposed.

Adaptation uses each chain's past, so it breaks the Markov property: it happens **before** any
row is recorded, and the flow is frozen afterwards; the recorded chain is an exact MCMC chain with
the adapted (fixed) proposal. This is the scheme of flowMC (Gabrié, Rotskoff,
Vanden-Eijnden, arXiv:2105.12603; Wong, Gabrié, Foreman-Mackey, arXiv:2211.06397), restricted to
warm-up.

Minibatches (and the reverse-KL samples) come from one run-level generator
(:func:`flowmc.mcmc.rng.run_generator`), so the adapted flow depends on the seed and on *all*
chains.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from flowmc._checks import check_int
from flowmc.flows.flow import Flow, Z2SymmetricFlow
from flowmc.lattice.action import Phi4Action
from flowmc.training.train import reverse_kl_loss

__all__ = ["AdaptConfig", "Adapter", "forward_kl_loss"]


@dataclass(frozen=True)
class AdaptConfig:
    """Settings of the adaptive warm-up (stored in the ensemble's ``sampler["adapt"]``).

    Attributes:
        steps: optimizer steps; each follows one kernel step of the chains (a block of flow
            proposals for flow MH, one cycle for the hybrid).
        lr: Adam learning rate.
        batch: configurations per minibatch (drawn from the buffer with replacement).
        buffer: the most recent chain configurations kept for the minibatches.
        reverse_kl: weight :math:`w` of the reverse-KL term (0: forward KL only).
    """

    steps: int
    lr: float = 1e-4
    batch: int = 256
    buffer: int = 4096
    reverse_kl: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "buffer"):
            check_int(f"adapt {name}", getattr(self, name), 1, strict=False)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"Expected adapt lr > 0; got {self.lr}")
        if not (math.isfinite(self.reverse_kl) and self.reverse_kl >= 0):
            raise ValueError(f"Expected adapt reverse_kl >= 0; got {self.reverse_kl}")

    def to_dict(self) -> dict:
        return asdict(self)


def forward_kl_loss(proposal: Flow | Z2SymmetricFlow, phi: Tensor) -> Tensor:
    r"""Forward-KL (maximum-likelihood) loss :math:`-\overline{\log q(\phi)}` on ``phi (B, *L)``."""
    return -proposal.log_prob(phi).mean()


class Adapter:
    """Replay buffer of chain configurations plus an optimizer that fits the flow to them.

    Args:
        flow: the flow to adapt (modified in place; parameters get ``requires_grad``).
        proposal: ``flow`` or its :class:`~flowmc.flows.flow.Z2SymmetricFlow`.
        action: the target action (for the reverse-KL term).
        config: the settings.
        generator: source of minibatch indices and reverse-KL samples.
    """

    def __init__(
        self,
        flow: Flow,
        proposal: Flow | Z2SymmetricFlow,
        action: Phi4Action,
        config: AdaptConfig,
        generator: torch.Generator,
    ) -> None:
        self.flow, self.proposal, self.action, self.config = flow, proposal, action, config
        self.generator = generator
        p = next(flow.parameters())
        self.dtype, self.device = p.dtype, p.device
        for q in flow.parameters():
            q.requires_grad_(True)
        flow.train()
        self.optimizer = torch.optim.Adam(flow.parameters(), lr=config.lr)
        self._buf = torch.empty(
            (config.buffer, *flow.lattice_shape), dtype=self.dtype, device=self.device
        )
        self._size, self._pos = 0, 0
        self.history: dict[str, list[float]] = {"forward_kl": [], "reverse_kl": [], "loss": []}
        self.seconds = 0.0

    def add(self, phi: Tensor) -> None:
        """Append configurations ``phi (B, *L)`` (the oldest are overwritten when full)."""
        x = phi.detach().reshape(-1, *self.flow.lattice_shape).to(self.device, self.dtype)
        cap = self.config.buffer
        if x.shape[0] >= cap:
            x = x[-cap:]
        n = x.shape[0]
        end = self._pos + n
        if end <= cap:
            self._buf[self._pos:end] = x
        else:
            k = cap - self._pos
            self._buf[self._pos:] = x[:k]
            self._buf[: n - k] = x[k:]
        self._pos = end % cap
        self._size = min(cap, self._size + n)

    def step(self) -> float:
        """One optimizer step on a minibatch from the buffer; returns the loss."""
        if self._size == 0:
            raise ValueError("Expected configurations in the adaptation buffer; got none")
        t0 = time.perf_counter()
        cfg = self.config
        with torch.enable_grad():
            idx = torch.randint(
                self._size, (cfg.batch,), generator=self.generator, device=self.device
            )
            fwd = forward_kl_loss(self.proposal, self._buf[idx])
            loss = fwd
            rev = torch.zeros((), dtype=self.dtype, device=self.device)
            if cfg.reverse_kl > 0:
                rev, _, _ = reverse_kl_loss(
                    self.flow, self.action, cfg.batch, generator=self.generator,
                    symmetric=isinstance(self.proposal, Z2SymmetricFlow),
                )
                loss = fwd + cfg.reverse_kl * rev
            self.optimizer.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
                self.optimizer.step()
        self.history["forward_kl"].append(float(fwd))
        self.history["reverse_kl"].append(float(rev))
        self.history["loss"].append(float(loss))
        self.seconds += time.perf_counter() - t0
        return float(loss)

    def finish(self) -> dict:
        """Freeze the flow (eval mode, no gradients) and return a summary of the adaptation."""
        self.flow.eval()
        for q in self.flow.parameters():
            q.requires_grad_(False)
        h = self.history
        tail = max(1, len(h["loss"]) // 10)
        return {
            "steps": len(h["loss"]),
            "forward_kl_first": h["forward_kl"][0] if h["forward_kl"] else None,
            "forward_kl_last10pct": sum(h["forward_kl"][-tail:]) / tail if h["loss"] else None,
            "optimizer_seconds": self.seconds,
        }
