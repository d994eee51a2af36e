r"""The training workflow: one call from a recipe (or a checkpoint) to a trained, saved flow.

:func:`train_flow` is what ``flowmc train``, the benchmark scripts and distributed runs all call:

1. configuration — a named recipe plus overrides (:mod:`flowmc.training.recipes`), or the
   architecture stored in a checkpoint (``resume`` continues it; ``init_from`` starts a new stage
   from its weights, possibly on another lattice size, through
   :func:`flowmc.flows.flow.transfer_state_dict`);
2. seeded parameter initialisation (``torch.manual_seed(seed)`` in a forked RNG, on the CPU, so
   the initial flow does not depend on the device or the number of ranks);
3. reverse-KL training (:class:`~flowmc.training.train.Trainer`, or
   :class:`~flowmc.training.distributed.DistributedTrainer` under ``torchrun``), with the per-step
   random streams ``(seed, step, rank)`` (see :mod:`flowmc.training.train`);
4. periodic checkpoints (rank 0 only) and a final one;
5. the Z2 rule: for a Z2-symmetric action a flow trained plainly is sampled through
   :class:`~flowmc.flows.flow.Z2SymmetricFlow` when its draws are sign-imbalanced
   (:func:`flowmc.training.evaluate.needs_symmetrisation`).

Time accounting (``meta`` of the checkpoint): ``training_time_s`` is this stage's optimizer time
(accumulated over resumes of the same checkpoint), ``training_time_total_s`` adds every
``init_from`` ancestor's total, and ``init_from`` records the ancestor's path, SHA-256, lattice and
training times.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from flowmc import parallel
from flowmc.flows.flow import Flow, FlowConfig, Z2SymmetricFlow, build_flow, transfer_state_dict
from flowmc.io.checkpoint import (
    check_output,
    claim_output,
    load_checkpoint,
    machine_info,
    save_checkpoint,
)
from flowmc.io.ensemble import file_sha256
from flowmc.io.identity import check_condition, check_stage
from flowmc.lattice.action import Phi4Action
from flowmc.training import distributed
from flowmc.training.evaluate import needs_symmetrisation
from flowmc.training.recipes import Stage, get_recipe, override, plan_stages
from flowmc.training.train import TrainConfig, Trainer

__all__ = ["train_flow", "train_staged", "stage_path", "TrainResult"]


class TrainResult(NamedTuple):
    """What :func:`train_flow` returns.

    Attributes:
        flow: the trained flow (unwrapped, in eval mode).
        action: the target action.
        trainer: the trainer (``config``, ``history``, ``step_count``, ``elapsed``, optimizer).
        symmetric: sample through ``Z2SymmetricFlow(flow)`` (see :attr:`proposal`).
        auto_symmetrised: ``symmetric`` was switched on by the sign-balance rule.
        checkpoint: the checkpoint written (``None`` without ``out``).
        training_time_s: optimizer time of this stage (all resumes of this checkpoint).
        training_time_total_s: ``training_time_s`` plus that of every ``init_from`` ancestor.
        wall_time_s: wall time of this call (setup, training, checkpoints, the Z2 check).
        rank: this process's rank (0 in one process).
        world_size: number of ranks that trained (1 in one process).
    """

    flow: Flow
    action: Phi4Action
    trainer: Trainer
    symmetric: bool
    auto_symmetrised: bool
    checkpoint: Path | None
    training_time_s: float
    training_time_total_s: float
    wall_time_s: float
    rank: int
    world_size: int

    @property
    def proposal(self) -> Flow | Z2SymmetricFlow:
        """The density to sample: ``flow`` or its Z2-symmetrised mixture."""
        return Z2SymmetricFlow(self.flow) if self.symmetric else self.flow

    @property
    def history(self) -> dict[str, list[float]]:
        return self.trainer.history


def _set(d: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (d or {}).items() if v is not None}


def _override_flow(cfg: FlowConfig, overrides: dict[str, Any]) -> FlowConfig:
    """Apply overrides; ``extra`` is merged into the base's ``extra``, not replaced."""
    extra = overrides.pop("extra", None)
    cfg = override(cfg, **overrides)
    if extra:
        cfg = replace(cfg, extra={**cfg.extra, **extra})
    return cfg


def _imbalanced(flow: Flow, action: Phi4Action, device: torch.device, seed: int) -> bool:
    """The Z2 rule on the trained flow; a flow conditioned on lam is checked at both ends and the
    middle of its range (symmetrised if imbalanced at any of them)."""
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    if not flow.is_conditional:
        return needs_symmetrisation(flow, action, generator=gen)
    lo, hi = flow.lam_range
    return any(
        needs_symmetrisation(flow.at(lam), Phi4Action(action.m2, lam, action.lattice_shape),
                             generator=gen)
        for lam in (lo, 0.5 * (lo + hi), hi)
    )


def _ancestor(path: Path) -> tuple[dict, dict]:
    """The ``init_from`` checkpoint and its provenance record."""
    ckpt = load_checkpoint(path)
    meta = ckpt.get("meta", {}) or {}
    t = float(meta.get("training_time_s", 0.0) or 0.0)
    record = {
        "path": str(path.resolve()),
        "sha256": file_sha256(path),
        "lattice_shape": list(ckpt["flow_config"]["lattice_shape"]),
        "action": ckpt.get("action"),
        "training_time_s": t,
        "training_time_total_s": float(meta.get("training_time_total_s", t) or t),
    }
    return ckpt, record


class _Begun(NamedTuple):
    """Where a training run starts (new, resumed, or from an ancestor's weights)."""

    action: Phi4Action
    flow: Flow
    train_cfg: TrainConfig | None  # a new stage's is set by the caller (recipe + overrides)
    dtype: torch.dtype | None
    trainer_state: dict | None  # the optimizer state, step and history to resume
    ancestor: dict | None  # the init_from record
    prev_meta: dict  # the resumed checkpoint's meta
    record: dict  # the resolved options to store in the checkpoint


def _check_start(
    out: Path | None,
    resume: bool,
    init_from: Path | None,
    checkpoint_every: int,
    flow_over: dict[str, Any],
    flow_config: FlowConfig | None,
) -> None:
    """The arguments of :func:`train_flow` that choose the start mode, checked together."""
    if resume and init_from is not None:
        raise ValueError("Expected either resume or init_from, not both")
    if resume and out is None:
        raise ValueError("Expected out (the checkpoint to resume) with resume=True")
    if checkpoint_every < 0:
        raise ValueError(f"Expected checkpoint_every >= 0; got {checkpoint_every}")
    if (resume or init_from is not None) and (flow_over or flow_config is not None):
        source = "the checkpoint to resume" if resume else "init_from"
        raise ValueError(
            f"Expected no architecture options: the architecture comes from {source}; got "
            f"{sorted(flow_over) or ['flow_config']}"
        )


def _start_stage(
    action: Phi4Action | None,
    recipe: str,
    init_from: Path | None,
    flow_config: FlowConfig | None,
    flow_over: dict[str, Any],
    train_config: TrainConfig | None,
    train_over: dict[str, Any],
    symmetric: bool | None,
    seed: int,
    dtype: torch.dtype | None,
    record: Mapping[str, Any] | None,
) -> _Begun:
    """A new stage (not a resume): from ``init_from`` or a new flow, trained with the recipe's
    (or the given) hyper-parameters and ``train_over``."""
    if action is None:
        raise ValueError("Expected an action (the target to train for)")
    recipe_flow, recipe_train = get_recipe(recipe, tuple(action.lattice_shape))
    if init_from is not None:
        begun = _start_from(init_from, action, dtype, record)
    else:
        begun = _start_new(action, flow_config or recipe_flow, flow_over, seed, dtype, record)
    train_cfg = override(train_config or recipe_train, **train_over)
    if symmetric is not None:
        train_cfg = replace(train_cfg, symmetric=bool(symmetric))
    return begun._replace(train_cfg=train_cfg)


def _start_resumed(
    out: Path,
    action: Phi4Action | None,
    train_config: TrainConfig | None,
    train_over: dict[str, Any],
    dtype: torch.dtype | None,
    record: Mapping[str, Any] | None,
    *,
    announce: bool,
) -> _Begun:
    """Resume ``out``: its action, architecture, weights, hyper-parameters (with
    ``train_over``) and trainer state; ``dtype`` defaults to the checkpoint's."""
    ckpt = load_checkpoint(out, require_trainer_state=True)
    stored = Phi4Action.from_params(ckpt["action"])
    if action is not None and action != stored:
        raise ValueError(
            f"Expected the action stored in {out} ({stored!r}); got {action!r}"
        )
    flow_cfg = FlowConfig.from_dict(ckpt["flow_config"])
    if train_config is not None:
        raise ValueError("Expected train_overrides, not train_config, with resume=True")
    train_cfg = override(TrainConfig.from_dict(ckpt["train_config"]), **train_over)
    prev_meta = dict(ckpt.get("meta", {}) or {})
    if dtype is None:
        dtype = torch.float64 if prev_meta.get("dtype") == "float64" else torch.float32
    # load in the final dtype: loading float64 weights into float32 would round them
    flow = build_flow(flow_cfg).to(dtype)
    flow.load_state_dict(ckpt["model_state"])
    trainer_state = ckpt.get("trainer_state")
    if not trainer_state:
        raise ValueError(
            f"{out} has no trainer state to resume; start a new stage from it with "
            "init_from (--init-from) instead"
        )
    if announce:
        done = int(trainer_state["step"])
        more = (
            f"-> {train_cfg.n_steps}" if train_cfg.n_steps > done
            else f"(n_steps = {train_cfg.n_steps} is the total, not beyond it: "
            "nothing to train)"
        )
        print(f"resuming {out} at step {done} {more}", file=sys.stderr)
    record = {**ckpt.get("resolved_config", {}), "resumed_with": dict(record or {})}
    return _Begun(stored, flow, train_cfg, dtype, trainer_state, prev_meta.get("init_from"),
                  prev_meta, record)  # fmt: skip


def _start_from(
    init_from: Path, action: Phi4Action, dtype: torch.dtype | None,
    record: Mapping[str, Any] | None,
) -> _Begun:
    """A new stage from the ``init_from`` checkpoint's architecture and weights, moved to the
    action's lattice (:func:`flowmc.flows.flow.transfer_state_dict`)."""
    ckpt, ancestor = _ancestor(init_from)
    check_condition(init_from, ckpt, action.lam)  # it keeps its condition on lam
    old_cfg = FlowConfig.from_dict(ckpt["flow_config"])
    flow_cfg = replace(old_cfg, lattice_shape=tuple(action.lattice_shape))
    with torch.random.fork_rng(devices=[]):
        flow = build_flow(flow_cfg).to(dtype or torch.float32)
    flow.load_state_dict(transfer_state_dict(ckpt["model_state"], old_cfg, flow_cfg))
    return _Begun(action, flow, None, dtype, None, ancestor, {}, dict(record or {}))


def _start_new(
    action: Phi4Action,
    flow_config: FlowConfig,
    flow_over: dict[str, Any],
    seed: int,
    dtype: torch.dtype | None,
    record: Mapping[str, Any] | None,
) -> _Begun:
    """A new flow: ``flow_config`` with ``flow_over``, its parameters drawn from ``seed`` (on the
    CPU, in a forked RNG)."""
    shape = tuple(action.lattice_shape)
    flow_cfg = _override_flow(flow_config, flow_over)
    if tuple(flow_cfg.lattice_shape) != shape:
        raise ValueError(
            f"Expected a flow_config for lattice {shape}; got "
            f"{tuple(flow_cfg.lattice_shape)}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flow = build_flow(flow_cfg)
    return _Begun(action, flow, None, dtype, None, None, {}, dict(record or {}))


def _make_trainer(
    begun: _Begun, seed: int, *, distributed_run: bool, device: torch.device
) -> Trainer:
    """The trainer of ``begun.flow`` (data-parallel in a process group), with the resumed
    trainer state loaded."""
    if distributed_run:
        trainer: Trainer = distributed.DistributedTrainer(
            begun.flow,
            begun.action,
            begun.train_cfg,
            seed=seed,
            device_ids=[device.index] if device.type == "cuda" else None,
        )
    else:
        trainer = Trainer(begun.flow, begun.action, begun.train_cfg, seed=seed)
    if begun.trainer_state is not None:
        trainer.load_state_dict(begun.trainer_state)
    return trainer


def train_flow(
    action: Phi4Action | None = None,
    *,
    recipe: str = "default",
    flow_config: FlowConfig | None = None,
    train_config: TrainConfig | None = None,
    flow_overrides: Mapping[str, Any] | None = None,
    train_overrides: Mapping[str, Any] | None = None,
    symmetric: bool | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    init_from: str | Path | None = None,
    checkpoint_every: int = 500,
    progress: bool = True,
    callback: Callable[[Trainer], None] | None = None,
    callback_every: int = 0,
    record: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    timeout_s: float = parallel.DEFAULT_TIMEOUT_S,
) -> TrainResult:
    """Train a flow for ``action`` by reverse KL and (with ``out``) write its checkpoint.

    Runs data-parallel when a ``torch.distributed`` process group is initialised or the process
    was started by ``torchrun`` with ``WORLD_SIZE > 1`` (see :mod:`flowmc.training.distributed`);
    then ``batch_size`` is the global batch, only rank 0 writes and shows progress, and every rank
    returns the same trained flow.

    Args:
        action: the target (optional with ``resume``: the checkpoint's action is used).
        recipe: named recipe for the architecture and the training hyper-parameters; with
            ``init_from`` only its training part is used.
        flow_config: a full architecture instead of the recipe's (its lattice must be the
            action's).
        train_config: full training hyper-parameters instead of the recipe's.
        flow_overrides: ``FlowConfig`` fields to change (``None`` values are ignored; ``extra``
            is merged). Not allowed with ``resume`` or ``init_from``.
        train_overrides: ``TrainConfig`` fields to change (``None`` ignored); with ``resume``
            they change the stored hyper-parameters (e.g. a longer run, the path estimator).
        symmetric: ``True`` trains and samples the Z2-symmetrised density, ``False`` the plain
            one, ``None`` trains the plain one and samples the symmetrised one if the trained
            flow's draws are sign-imbalanced.
        seed: parameter initialisation and the per-step sample streams (a resumed run keeps the
            seed stored in its checkpoint).
        device: torch device; ``cuda`` means ``cuda:LOCAL_RANK`` under torchrun.
        dtype: parameter dtype (default: the resumed checkpoint's, else float32).
        out: checkpoint to write (periodically and at the end).
        resume: continue training ``out``.
        force: overwrite an existing ``out``.
        init_from: a checkpoint whose architecture and weights start this run, on the action's
            lattice (which may differ from the checkpoint's); the optimizer starts afresh.
        checkpoint_every: steps between checkpoints (0: only at the end).
        progress: progress bar (rank 0 only).
        callback: called as ``callback(trainer)`` every ``callback_every`` steps, on every rank.
        callback_every: see ``callback``.
        record: the resolved options to store in the checkpoint (e.g. the CLI's).
        meta: extra provenance to store in the checkpoint's ``meta``.
        timeout_s: timeout of every collective in a distributed run.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: on inconsistent arguments (both ``resume`` and ``init_from``, architecture
            overrides with a stored architecture, a lattice mismatch, a global batch that the
            number of ranks does not divide, ...).
        FileExistsError: if ``out`` exists and neither ``resume`` nor ``force`` is set, or
            ``force`` is set but ``out`` is not a regular file holding a flowmc checkpoint.
        BlockingIOError: if another process trains into ``out``.
        FileNotFoundError: if the checkpoint to resume or to start from does not exist.
        RuntimeError: if training stops on repeated non-finite losses.
    """
    t_call = time.perf_counter()
    out = None if out is None else Path(out)
    init_from = None if init_from is None else Path(init_from)
    flow_over, train_over = _set(flow_overrides), _set(train_overrides)
    _check_start(out, resume, init_from, checkpoint_every, flow_over, flow_config)
    with parallel.process_group(device, timeout_s=timeout_s) as info, ExitStack() as held:
        rank, world = (info.rank, info.world_size) if info is not None else (0, 1)
        local = info.local_rank if info is not None else 0
        device = parallel.rank_device(device, local, world)
        main = rank == 0
        if out is not None:
            # --force replaces only a flowmc checkpoint, never a directory, device, link or
            # other data; rank 0 holds the name for the whole run (a second training of the
            # same out fails at once). Every rank checks the policy, so that all fail alike.
            if not resume:
                check_output(out, force=force, lock_held=not main)
            if main:
                held.enter_context(claim_output(out, force=force, resume=resume))
        if resume:
            begun = _start_resumed(out, action, train_config, train_over, dtype, record,
                                   announce=main and progress)  # fmt: skip
        else:
            begun = _start_stage(action, recipe, init_from, flow_config, flow_over, train_config,
                                 train_over, symmetric, seed, dtype, record)  # fmt: skip
        action, flow, train_cfg = begun.action, begun.flow, begun.train_cfg
        ancestor, prev_meta, record = begun.ancestor, begun.prev_meta, begun.record
        flow.to(device=device, dtype=begun.dtype or torch.float32)
        trainer = _make_trainer(begun, seed, distributed_run=info is not None, device=device)

        ancestor_total = float(ancestor["training_time_total_s"]) if ancestor else 0.0
        sample_symmetric = bool(train_cfg.symmetric or symmetric is True)
        stage_meta = {
            **(meta or {}),
            "init_from": ancestor,
            "seed": trainer.seed,
            "world_size": world,
            "backend": info.backend if info is not None else None,
            "machine": machine_info(),
            "device": str(device),
            "dtype": str(next(flow.parameters()).dtype).replace("torch.", ""),
            "recipe": prev_meta.get("recipe") if resume else recipe,
        }

        def save(tr: Trainer) -> None:
            if out is None or not main:
                return
            save_checkpoint(
                out,
                flow,
                action,
                symmetric=sample_symmetric,
                train_config=train_cfg.to_dict(),
                trainer_state=tr.state_dict(),
                resolved_config=record,
                meta={
                    **stage_meta,
                    "training_time_s": tr.elapsed,
                    "training_time_total_s": tr.elapsed + ancestor_total,
                },
            )

        def on_step(tr: Trainer) -> None:
            if checkpoint_every and tr.step_count % checkpoint_every == 0:
                save(tr)
            if callback is not None and callback_every and tr.step_count % callback_every == 0:
                callback(tr)

        trainer.run(progress=progress and main, callback=on_step, callback_every=1)
        flow.eval()
        auto = symmetric is None and not train_cfg.symmetric
        auto_symmetrised = False
        if auto:
            imbalanced = main and _imbalanced(flow, action, device, seed)
            if info is not None:
                imbalanced = parallel.broadcast_flag(imbalanced, device)
            auto_symmetrised = bool(imbalanced)
            sample_symmetric = sample_symmetric or auto_symmetrised
        save(trainer)
        if info is not None:
            parallel.barrier(device)  # the checkpoint exists when any rank returns
            # Free the DDP wrapper while its process group is alive: a Reducer that outlives
            # destroy_process_group can deadlock with gloo's worker thread over the GIL.
            trainer.model = trainer.loss_module
            gc.collect()
    return TrainResult(
        flow=flow,
        action=action,
        trainer=trainer,
        symmetric=sample_symmetric,
        auto_symmetrised=auto_symmetrised,
        checkpoint=out,
        training_time_s=trainer.elapsed,
        training_time_total_s=trainer.elapsed + ancestor_total,
        wall_time_s=time.perf_counter() - t_call,
        rank=rank,
        world_size=world,
    )


def stage_path(out: str | Path, lattice_shape: tuple[int, ...]) -> Path:
    """Checkpoint of an intermediate stage of :func:`train_staged`: ``OUT`` → ``OUT.L8.pt``
    (``OUT.8x16.pt`` for an anisotropic lattice)."""
    out = Path(out)
    shape = tuple(int(s) for s in lattice_shape)
    tag = str(shape[0]) if len(set(shape)) == 1 else "x".join(map(str, shape))
    return out.with_name(f"{out.stem}.L{tag}{out.suffix or '.pt'}")


def train_staged(
    action: Phi4Action,
    *,
    recipe: str = "default",
    out: str | Path,
    resume: bool = False,
    force: bool = False,
    flow_overrides: Mapping[str, Any] | None = None,
    train_overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    stages: Sequence[Stage] | None = None,
    **kwargs: Any,
) -> TrainResult:
    """Train through the stages :func:`flowmc.training.recipes.plan_stages` gives for the lattice.

    One stage: exactly :func:`train_flow`. Several (``default`` beyond extent 8): the first stage
    trains the recipe's flow on the small lattice into :func:`stage_path` ``(out, L0)``, every
    further stage starts from the previous one (``init_from``, so the checkpoints record the
    ancestry and ``training_time_total_s`` counts every stage) and the last writes ``out``.
    ``flow_overrides`` apply to the first stage, ``train_overrides`` to the last. With ``resume``
    a finished stage is skipped, an unfinished one resumed and a missing one started, so an
    interrupted pipeline continues where it stopped; without it every stage file must be new
    (or ``force``).

    Args:
        action: the target on the final lattice (the stages use the same couplings).
        recipe: the recipe name.
        out: the final checkpoint.
        resume: as for :func:`train_flow`, for every stage file.
        force: as for :func:`train_flow`, for every stage file.
        flow_overrides: see above.
        train_overrides: see above.
        progress: progress bars.
        stages: explicit stages instead of the recipe's plan (the last one's lattice must be the
            action's).
        **kwargs: passed to every :func:`train_flow` call (seed, device, dtype, record, ...).

    Returns:
        The last stage's :class:`TrainResult`.
    """
    if stages is None:
        stages = plan_stages(recipe, tuple(action.lattice_shape))
    elif tuple(stages[-1].lattice_shape) != tuple(action.lattice_shape):
        raise ValueError(
            f"Expected the last stage on the action's lattice {tuple(action.lattice_shape)}; got "
            f"{tuple(stages[-1].lattice_shape)}"
        )
    if len(stages) == 1:
        return train_flow(
            action, recipe=recipe, train_config=None if resume else stages[0].train, out=out,
            resume=resume,
            force=force, flow_overrides=None if resume else flow_overrides,
            train_overrides=train_overrides, progress=progress, **kwargs,
        )  # fmt: skip
    out = Path(out)
    previous: Path | None = None
    result: TrainResult | None = None
    for i, stage in enumerate(stages):
        last = i == len(stages) - 1
        path = out if last else stage_path(out, stage.lattice_shape)
        stage_action = Phi4Action(action.m2, action.lam, stage.lattice_shape)
        train_cfg = stage.train
        over = dict(train_overrides or {}) if last else {}
        if resume and path.exists():  # reused: it must be this pipeline's stage
            check_stage(path, stage_action, recipe, kwargs.get("seed", 0), previous,
                        flow_overrides if i == 0 else None)  # fmt: skip
            done = load_checkpoint(path).get("trainer_state", {}) or {}
            target = over.get("n_steps") or train_cfg.n_steps
            if not last and int(done.get("step", 0)) >= target:
                previous = path
                continue
            result = train_flow(
                None, out=path, resume=True, train_overrides=over, progress=progress, **kwargs
            )
        elif i == 0:
            result = train_flow(
                stage_action, recipe=recipe, train_config=train_cfg, out=path, force=force,
                flow_overrides=flow_overrides, train_overrides=over, progress=progress, **kwargs,
            )  # fmt: skip
        else:
            result = train_flow(
                stage_action, recipe=recipe, train_config=train_cfg, out=path, force=force,
                init_from=previous, train_overrides=over, progress=progress, **kwargs,
            )  # fmt: skip
        previous = path
        if progress and not last:
            print(f"stage {i + 1}/{len(stages)} done: {path}", file=sys.stderr)
    assert result is not None  # the last stage always runs
    return result
