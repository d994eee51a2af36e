r"""Data-parallel training on ``torch.distributed``: the DDP trainer.

Under ``torchrun``, :func:`flowmc.parallel.process_group` joins the job's process group (NCCL
when the device is CUDA, gloo otherwise) and :class:`DistributedTrainer` wraps the step's loss in
:class:`~torch.nn.parallel.DistributedDataParallel`:

* ``config.batch_size`` is the **global** batch; each of the ``W`` ranks draws ``B / W`` samples
  (an error if ``W`` does not divide ``B``);
* rank ``r`` draws step ``t``'s samples from a generator seeded by
  :func:`flowmc.training.train.step_seed` ``(seed, t, r)``: ranks never share samples, and no
  per-rank generator state exists, so a checkpoint written by ``W`` ranks resumes on any number of
  ranks;
* DDP averages the gradients over ranks, i.e. the gradient of the mean loss over the global
  batch (both estimators: the path estimator's ``functional_call`` runs on the unwrapped flow
  inside the wrapped forward);
* the loss, ``log_p``, ``log_q`` and ESS of each step are computed on the gathered global batch
  (``all_gather`` of :math:`\log p` and :math:`\log q`), so the history does not depend on ``W``
  except through the samples drawn; the finite-loss test is global, so all ranks skip together;
* every collective has the process group's timeout: a rank that fails or stalls makes the others
  raise after ``timeout_s`` instead of waiting forever (``torchrun`` also stops the surviving
  workers when one exits with an error).

Only rank 0 writes files; :func:`flowmc.training.workflow.train_flow` enforces that. The
single-process :class:`~flowmc.training.train.Trainer` contains no distributed code.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from flowmc.flows.flow import Flow
from flowmc.lattice.action import Phi4Action

# the process-group utilities lived here until they moved to flowmc.parallel; the old module
# path flowmc.distributed (an alias of this module) still offers them
from flowmc.parallel import (
    DEFAULT_TIMEOUT_S,
    DistInfo,
    backend_for,
    barrier,
    broadcast_flag,
    process_group,
    rank_device,
    torchrun_env,
)
from flowmc.training.train import TrainConfig, Trainer

__all__ = [
    "DistInfo",
    "DistributedTrainer",
    "process_group",
    "torchrun_env",
    "backend_for",
    "rank_device",
    "local_batch_size",
    "broadcast_flag",
    "barrier",
    "DEFAULT_TIMEOUT_S",
]

# the buffers (checkerboard masks) are constants: no need to re-broadcast them every forward
# (``broadcast_buffers`` is deprecated from torch 2.13 on in favour of ``forward_sync_buffers``)
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


def local_batch_size(batch_size: int, world_size: int) -> int:
    """The per-rank share of a global batch.

    Raises:
        ValueError: if ``world_size`` does not divide ``batch_size``.
    """
    if batch_size % world_size:
        raise ValueError(
            f"Expected --batch (the global batch) divisible by the number of ranks "
            f"{world_size}; got {batch_size}"
        )
    return batch_size // world_size


class DistributedTrainer(Trainer):
    """A :class:`~flowmc.training.train.Trainer` whose step runs data-parallel over the process
    group.

    Args:
        flow: the flow (the same initial weights on every rank; DDP broadcasts rank 0's).
        action: the target action.
        config: hyper-parameters; ``config.batch_size`` is the global batch.
        seed: the run's seed; rank ``r`` draws step ``t`` from ``step_generator(seed, t, r)``.
        device_ids: ``[local_rank]`` for CUDA, ``None`` for CPU.

    Raises:
        ValueError: if the number of ranks does not divide the global batch.
        RuntimeError: if no process group is initialised.
    """

    def __init__(
        self,
        flow: Flow,
        action: Phi4Action,
        config: TrainConfig,
        *,
        seed: int,
        device_ids: list[int] | None = None,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistributedTrainer needs an initialised process group")
        world = dist.get_world_size()
        local = local_batch_size(config.batch_size, world)
        super().__init__(flow, action, config, seed=seed)
        self.rank = dist.get_rank()
        self.world_size = world
        self.local_batch_size = local
        self.model = DistributedDataParallel(
            self.loss_module, device_ids=device_ids, **_NO_BUFFER_SYNC
        )

    def _gather(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
        """All ranks' ``(log_p, log_q)``, concatenated in rank order."""
        mine = torch.stack([log_p, log_q])
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine)
        both = torch.cat(parts, dim=1)
        return both[0], both[1]
