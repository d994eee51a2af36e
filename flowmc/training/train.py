r"""Reverse-KL training of flows, with resumable checkpoints.

The loss is the variational free energy

.. math::

    F_q = \mathbb{E}_{\phi\sim q}[\log q(\phi) + S(\phi)]
        = D_{KL}(q\,\|\,p) - \log Z \;\ge\; -\log Z,

so a negative loss is normal: it is bounded below by :math:`-\log Z` and the gap is the KL
divergence. Two gradient estimators are offered: ``"reparam"`` (the plain reparameterisation
gradient of :math:`F_q`) and ``"path"`` (the path gradient of Vaitl et al., arXiv:2207.08219, whose
variance vanishes as :math:`q \to p`).

Random streams: a :class:`Trainer` built with ``seed=`` draws step ``t``'s batch from a fresh
generator seeded by :func:`step_seed` ``(seed, t, rank)``, so nothing but the step counter is
needed to continue a run (a resume reproduces the uninterrupted run, and a distributed run can be
resumed on another number of ranks; see ``docs/distributed.md``). A trainer built with
``generator=`` instead consumes that one generator step after step (the older, carried stream).

References:
    Albergo, Kanwar, Shanahan, arXiv:1904.12072; Vaitl, Nicoli, Nakajima, Kessel, arXiv:2207.08219.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from flowmc.analysis.autocorr import kish_ess
from flowmc.flows.flow import Flow, Z2SymmetricFlow
from flowmc.lattice.action import Phi4Action

__all__ = [
    "TrainConfig",
    "Trainer",
    "GradientInfo",
    "reverse_kl_loss",
    "step_seed",
    "step_generator",
]


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (stored in checkpoints).

    Attributes:
        n_steps: number of optimizer steps.
        batch_size: samples per step.
        lr: Adam learning rate.
        schedule: ``"constant"`` or ``"cosine"`` (decays to ``lr * lr_min_factor``).
        lr_min_factor: final learning rate as a fraction of ``lr`` for the cosine schedule.
        betas: Adam's ``(beta1, beta2)``.
        grad_clip: max gradient norm (``0`` disables clipping).
        estimator: ``"reparam"`` or ``"path"``.
        symmetric: train the Z2-symmetrised density ½[q(φ)+q(−φ)] (see ``Z2SymmetricFlow``).
        max_bad_steps: consecutive non-finite losses tolerated before training stops.
    """

    n_steps: int = 2500
    batch_size: int = 64
    lr: float = 1e-3
    schedule: str = "constant"
    lr_min_factor: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.0
    estimator: str = "reparam"
    symmetric: bool = False
    max_bad_steps: int = 20

    def __post_init__(self) -> None:
        if self.n_steps < 0:
            raise ValueError(f"Expected n_steps >= 0; got {self.n_steps}")
        if self.batch_size < 2:
            raise ValueError(f"Expected batch_size >= 2; got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"Expected lr > 0; got {self.lr}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"Expected schedule 'constant' or 'cosine'; got {self.schedule!r}")
        if self.estimator not in ("reparam", "path"):
            raise ValueError(f"Expected estimator 'reparam' or 'path'; got {self.estimator!r}")
        if self.grad_clip < 0:
            raise ValueError(f"Expected grad_clip >= 0; got {self.grad_clip}")
        try:
            betas = tuple(float(b) for b in self.betas)
        except (TypeError, ValueError):
            betas = ()
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Expected betas (b1, b2) in [0, 1); got {self.betas!r}")
        object.__setattr__(self, "betas", betas)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _proposal(flow: Flow, symmetric: bool) -> Flow | Z2SymmetricFlow:
    return Z2SymmetricFlow(flow) if symmetric else flow


def _draw_lam(flow: Flow, n: int, generator: torch.Generator | None) -> dict[str, Tensor]:
    """``{"lam": (n,)}`` couplings for a conditional flow's batch, ``{}`` otherwise."""
    return {"lam": flow.draw_lam(n, generator=generator)} if flow.is_conditional else {}


def reverse_kl_loss(
    flow: Flow,
    action: Phi4Action,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    symmetric: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Monte Carlo estimate of :math:`F_q = \langle \log q + S\rangle_q` (reparameterised).

    For a flow conditioned on the coupling each sample gets its own :math:`\lambda`, drawn
    stratified over the flow's range, and the loss is the average over :math:`\lambda` of
    :math:`F_q(\lambda) = D_{KL}(q_\lambda\|p_\lambda) - \log Z(\lambda)`.

    Returns:
        ``(loss, log_p, log_q)`` with ``log_p = -S`` and ``log_q`` of shape ``(batch_size,)``.
    """
    lam = _draw_lam(flow, batch_size, generator)
    phi, log_q = _proposal(flow, symmetric).sample(batch_size, generator=generator, **lam)
    log_p = -action(phi, **lam)
    loss = (log_q - log_p).mean()
    aux = flow.auxiliary_loss()  # a continuous flow's integration-error penalty
    return (loss if aux is None else loss + aux), log_p, log_q


def _path_gradient_loss(
    flow: Flow,
    action: Phi4Action,
    batch_size: int,
    *,
    generator: torch.Generator | None,
    symmetric: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Surrogate whose gradient is the path gradient of F_q (score term removed).

    ``phi = f_theta(z)`` carries the parameter dependence; ``log q`` is then evaluated at ``phi``
    with *detached* parameters, so only ``d(log q + S)/d phi * d phi/d theta`` survives.
    """
    lam = _draw_lam(flow, batch_size, generator)
    z = flow.prior.sample(batch_size, generator=generator)
    phi, _ = flow(z, **lam)
    if symmetric:
        u = torch.rand(batch_size, generator=generator, device=z.device, dtype=z.dtype)
        phi = phi * torch.where(u < 0.5, -1.0, 1.0).to(z.dtype).view(-1, *([1] * (phi.dim() - 1)))
    wrapper = _LogProb(_proposal(flow, symmetric))
    frozen = {f"proposal.{k}": v.detach() for k, v in wrapper.proposal.named_parameters()}
    log_q = torch.func.functional_call(wrapper, frozen, (phi,), lam)
    log_p = -action(phi, **lam)
    return (log_q - log_p).mean(), log_p.detach(), log_q.detach()


class _LogProb(nn.Module):
    def __init__(self, proposal: nn.Module) -> None:
        super().__init__()
        self.proposal = proposal

    def forward(self, x: Tensor, **lam: Tensor) -> Tensor:
        return self.proposal.log_prob(x, **lam)


class _KLLoss(nn.Module):
    """One step's loss as a module: the unit a data-parallel wrapper wraps.

    Its only parameters are the flow's, and every parameter-dependent computation of both
    estimators happens inside ``forward``, so ``DistributedDataParallel(_KLLoss(...))`` sees the
    whole step (the path estimator's ``functional_call`` runs on the unwrapped flow, with detached
    parameters, exactly as in one process).
    """

    def __init__(self, flow: Flow, action: Phi4Action, config: TrainConfig) -> None:
        super().__init__()
        self.flow = flow
        self.action = action
        self.symmetric = config.symmetric
        self.fn = _path_gradient_loss if config.estimator == "path" else reverse_kl_loss

    def forward(
        self, batch_size: int, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        return self.fn(
            self.flow, self.action, batch_size, generator=generator, symmetric=self.symmetric
        )


_STREAM_TAG = 0x666C6F776D63  # "flowmc": keeps these seeds apart from other uses of the seed


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The 63-bit seed of the generator that draws step ``step``'s batch on rank ``rank``.

    A hash (``numpy.random.SeedSequence``) of ``(seed, step, rank)``: distinct, statistically
    independent streams for every step and rank, computable from these three integers alone.

    Raises:
        ValueError: if ``step`` or ``rank`` is negative.
    """
    if step < 0 or rank < 0:
        raise ValueError(f"Expected step >= 0 and rank >= 0; got step={step}, rank={rank}")
    entropy = [_STREAM_TAG, int(seed) % 2**64, int(step), int(rank)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1


def step_generator(
    seed: int, step: int, rank: int = 0, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded by :func:`step_seed` ``(seed, step, rank)``."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, rank))


class GradientInfo(NamedTuple):
    """What :meth:`Trainer.compute_gradient` saw.

    Attributes:
        log_p: ``(B,)`` :math:`-S` of the *global* batch (gathered over ranks in rank order).
        log_q: ``(B,)`` :math:`\\log q` of the global batch.
        local_log_p: ``(B / world_size,)`` this rank's part of ``log_p``.
        local_log_q: this rank's part of ``log_q``.
        finite: whether the global loss was finite (if not, no gradient was computed).
    """

    log_p: Tensor
    log_q: Tensor
    local_log_p: Tensor
    local_log_q: Tensor
    finite: bool


class Trainer:
    """Reverse-KL trainer with explicit, checkpointable state.

    Args:
        flow: the flow to train (modified in place).
        action: the target action.
        config: training hyper-parameters.
        generator: a generator consumed step after step (carried stream; saved in
            :meth:`state_dict`).
        seed: instead of ``generator``: draw step ``t`` from :func:`step_generator`
            ``(seed, t, rank)`` (the stream :func:`flowmc.training.workflow.train_flow` uses).

    With neither, the global torch RNG is used. The history holds one entry per step: ``loss``
    (= F_q estimate), ``log_p`` (mean of −S), ``log_q`` (mean), ``ess`` (Kish ESS of the batch),
    ``lr`` and ``time`` (seconds since start).

    Raises:
        ValueError: if the flow and the action are for different lattices, or both
            ``generator`` and ``seed`` are given.
    """

    HISTORY_KEYS = ("loss", "log_p", "log_q", "ess", "lr", "time")
    #: this process's rank and the number of ranks (a distributed subclass changes them)
    rank = 0
    world_size = 1

    def __init__(
        self,
        flow: Flow,
        action: Phi4Action,
        config: TrainConfig,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        if tuple(flow.lattice_shape) != tuple(action.lattice_shape):
            raise ValueError(
                f"Expected a flow for lattice {action.lattice_shape}; got one for "
                f"{tuple(flow.lattice_shape)}"
            )
        if generator is not None and seed is not None:
            raise ValueError("Expected either generator or seed, not both")
        self.flow = flow
        self.loss_module = _KLLoss(flow, action, config)
        self.config = config
        self.generator = generator
        self.seed = None if seed is None else int(seed)
        if config.estimator == "path" and getattr(flow, "continuous_layers", None):
            raise ValueError(
                "Expected estimator 'reparam' for a continuous flow (its log_prob integrates "
                "backwards, which inverts the sampling map only up to the integration error); "
                "got 'path'"
            )
        self.optimizer = torch.optim.Adam(flow.parameters(), lr=config.lr, betas=config.betas)
        self.step_count = 0
        self.bad_steps = 0
        self.skipped_steps = 0
        self.elapsed = 0.0
        self.history: dict[str, list[float]] = {k: [] for k in self.HISTORY_KEYS}
        #: the module whose forward computes a step's loss (a DDP wrapper in distributed runs)
        self.model: nn.Module = self.loss_module
        #: the samples this process draws per step
        self.local_batch_size = config.batch_size

    @property
    def action(self) -> Phi4Action:
        """The target action (settable)."""
        return self.loss_module.action

    @action.setter
    def action(self, action: Phi4Action) -> None:
        self.loss_module.action = action

    def lr_at(self, step: int) -> float:
        cfg = self.config
        if cfg.schedule == "constant" or cfg.n_steps <= 1:
            return cfg.lr
        frac = min(step / (cfg.n_steps - 1), 1.0)
        lo = cfg.lr * cfg.lr_min_factor
        return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * frac))

    def generator_for(self, step: int) -> torch.Generator | None:
        """The generator that draws step ``step``'s batch on this rank."""
        if self.seed is None:
            return self.generator
        device = next(self.flow.parameters()).device
        return step_generator(self.seed, step, self.rank, device)

    def _gather(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
        """The global batch's ``(log_p, log_q)``: in one process, this process's."""
        return log_p, log_q

    def compute_gradient(self) -> GradientInfo:
        """Draw this step's batch and leave the gradient of the loss in the parameters' ``.grad``.

        The optimizer is not stepped and the step counter does not move. Under data parallelism
        the gradient is the average over ranks (that of the global batch's mean loss) and the
        returned ``log_p``/``log_q`` are the gathered global batch; if the global loss is not
        finite no backward pass runs on any rank.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss, log_p, log_q = self.model(self.local_batch_size, self.generator_for(self.step_count))
        local_p, local_q = log_p.detach(), log_q.detach()
        all_p, all_q = self._gather(local_p, local_q)
        finite = bool(torch.isfinite(all_q - all_p).all())
        if finite:
            loss.backward()
        return GradientInfo(all_p, all_q, local_p, local_q, finite)

    def step(self) -> dict[str, float]:
        """One optimizer step; returns this step's metrics (also appended to the history).

        A non-finite loss is not trained on: the step is skipped and counted; after
        ``max_bad_steps`` consecutive ones a ``RuntimeError`` stops training.
        """
        cfg = self.config
        t0 = time.perf_counter()
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        info = self.compute_gradient()
        if not info.finite:
            self.bad_steps += 1
            self.skipped_steps += 1
            if self.bad_steps >= cfg.max_bad_steps:
                raise RuntimeError(
                    f"training stopped: {self.bad_steps} consecutive non-finite losses at step "
                    f"{self.step_count} (try a smaller lr or grad_clip)"
                )
            self.step_count += 1
            return {"loss": float("nan")}
        self.bad_steps = 0
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.flow.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step_count += 1
        self.elapsed += time.perf_counter() - t0
        metrics = {
            "loss": float((info.log_q - info.log_p).mean()),
            "log_p": float(info.log_p.mean()),
            "log_q": float(info.log_q.mean()),
            "ess": kish_ess(info.log_p - info.log_q, nonfinite="zero"),
            "lr": lr,
            "time": self.elapsed,
        }
        for k in self.HISTORY_KEYS:
            self.history[k].append(metrics[k])
        return metrics

    def run(
        self,
        n_steps: int | None = None,
        *,
        progress: bool = True,
        callback: Callable[[Trainer], None] | None = None,
        callback_every: int = 0,
    ) -> dict[str, list[float]]:
        """Run until ``n_steps`` (default ``config.n_steps``) total steps have been taken."""
        target = self.config.n_steps if n_steps is None else n_steps
        bar = tqdm(
            total=max(target, self.step_count),
            initial=self.step_count,
            disable=not progress or self.step_count >= target,
            desc="train",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        self.flow.train()
        try:
            while self.step_count < target:
                self.step()
                bar.update(1)
                if not bar.disable:
                    bar.set_postfix_str(self._progress_text(), refresh=False)
                due = callback_every and self.step_count % callback_every == 0
                if callback is not None and due:
                    callback(self)
        finally:
            bar.close()
        return self.history

    def _progress_text(self, window: int = 50) -> str:
        """Moving averages of the last ``window`` steps for the progress bar."""
        ess = self.history["ess"][-window:]
        loss = self.history["loss"][-window:]
        ess_avg = sum(ess) / len(ess) if ess else float("nan")
        loss_avg = sum(loss) / len(loss) if loss else float("nan")
        return f"loss(F_q) {loss_avg:.4f} ess {ess_avg:.3f}"

    # --- checkpointable state --------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue: optimizer, step, history and the random stream.

        With ``seed=`` the stream is ``{"seed": seed}`` (no generator state: step ``t`` on rank
        ``r`` is reseeded from ``(seed, t, r)``, so any number of ranks can resume it).
        """
        return {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_count,
            "skipped_steps": self.skipped_steps,
            "elapsed": self.elapsed,
            "history": {k: list(v) for k, v in self.history.items()},
            "seed": self.seed,
            "generator": (
                self.generator.get_state()
                if self.generator is not None and self.seed is None
                else None
            ),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; a stored per-step ``seed`` replaces this trainer's."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.elapsed = float(state["elapsed"])
        self.history = {k: list(state["history"].get(k, [])) for k in self.HISTORY_KEYS}
        if state.get("seed") is not None and (self.seed is not None or self.generator is None):
            self.seed = int(state["seed"])
        elif self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])
