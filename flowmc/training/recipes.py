"""Named training recipes: flow architecture + training hyper-parameters, and staged pipelines.

``seed`` reproduces the notebook this project started from (arXiv:2101.08176 architecture:
16 affine layers, CNN hidden [8, 8], kernel 3, Adam 1e-3, batch 64, 2,500 steps). Keep it exact:
it is the baseline every benchmark compares against.

``local`` is flowmc 0.1's default: 6 rational-quadratic spline couplings with linear tails
(arXiv:1906.04032) on [-2.5, 2.5], conditioners [16, 16] with kernel 3, prior sigma 0.5, batch
256, Adam 3e-3 with a cosine decay and gradient clipping. The prior width matters with linear
tails: a prior site beyond the spline bound passes through every layer unchanged (sigma 0.5
against bound 2.5 keeps that fraction near 4e-5 at 8x8).

``default`` adds global layers in front of those couplings (:mod:`flowmc.flows.spectral`): a
momentum-space scaling (the Gaussian long-distance part), an odd spline of the magnetisation
and magnetisation-dependent momentum scales; the couplings are Z2-equivariant (no mode collapse,
no symmetrised proposal needed) and their conditioners also see the field's mean and a smoothed
copy (long-range information), with a 1x1 output layer (cheaper). ``fast`` is the same flow on a
300-step schedule, ``large`` a wider and deeper one for accelerators. Beyond extent 8,
:func:`plan_stages` turns ``default`` into a pipeline: train at
L = 8, transfer to the target lattice (CNN couplings are size-agnostic, the momentum layers are
resampled in k-hat^2) and fine-tune. Every choice and the measurements behind it:
docs/recipes.md.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import NamedTuple

from flowmc.flows.flow import FlowConfig
from flowmc.training.train import TrainConfig

__all__ = ["RECIPES", "Stage", "get_recipe", "override", "plan_stages", "STAGE0_EXTENT"]

_TRAIN = {  # the training schedule every current recipe shares (steps differ)
    "batch_size": 256,
    "lr": 3e-3,
    "schedule": "cosine",
    "lr_min_factor": 0.02,
    "grad_clip": 10.0,
}
_LOCAL_FLOW = {  # flowmc 0.1's default: local spline couplings only
    "n_layers": 6,
    "hidden": (16, 16),
    "kernel_size": 3,
    "activation": "leaky_relu",
    "coupling": "spline",
    "prior_sigma": 0.5,
    "extra": {"n_bins": 8, "spline_bound": 2.5},
}
#: the architecture of ``default`` (docs/recipes.md): a momentum-space layer, an odd spline of the
#: magnetisation and magnetisation-dependent momentum scales, then 6 Z2-equivariant spline
#: couplings whose conditioners also see the field's mean and a smoothed copy of it
_GLOBAL_FLOW = {
    **_LOCAL_FLOW,
    "equivariant": True,
    "momentum": True,
    "zero_mode_bins": 8,
    "extra": {
        **_LOCAL_FLOW["extra"],
        "n_bins": 12,
        "out_kernel": 1,
        "blur": [0, 2.0],
        "zero_mode_bound": 1.0,
        "zero_mode_spectrum": 2,
    },
}
#: the equivariant continuous flow (arXiv:2207.00283; flowmc.flows.cnf) behind a momentum-space
#: layer: a lattice-wide convolution of odd site features, integrated with RK4
_CNF_FLOW = {
    "n_layers": 1,
    "coupling": "cnf",
    "momentum": True,
    "prior_sigma": 1.0,
    "extra": {
        "n_freq": 16, "n_channels": 12, "n_time": 7, "int_steps": 20, "integrator": "rk4",
        "penalty": 100.0, "penalty_batch": 16,
    },
}
_CNF_TRAIN = {
    "batch_size": 64, "lr": 5e-3, "betas": (0.8, 0.9), "schedule": "cosine",
    "lr_min_factor": 0.05,
}
#: The named recipes: ``{name: {"flow": FlowConfig fields, "train": TrainConfig fields}}``.
RECIPES: dict[str, dict] = {
    "seed": {
        "flow": {"n_layers": 16, "hidden": (8, 8), "kernel_size": 3, "activation": "leaky_relu"},
        "train": {"n_steps": 2500, "batch_size": 64, "lr": 1e-3, "schedule": "constant"},
    },
    # flowmc 0.1's default: local spline couplings only (the reference line of the benchmarks)
    "local": {
        "flow": _LOCAL_FLOW,
        "train": {**_TRAIN, "n_steps": 1800},
    },
    "default": {"flow": _GLOBAL_FLOW, "train": {**_TRAIN, "n_steps": 1450}},
    # the same flow on a short schedule (under 2 CPU-minutes at L = 8)
    "fast": {"flow": _GLOBAL_FLOW, "train": {**_TRAIN, "n_steps": 200}},
    # the equivariant continuous flow (docs/recipes.md)
    "cnf": {"flow": _CNF_FLOW, "train": {**_CNF_TRAIN, "n_steps": 3000}},
    # the same family, wider and deeper, for accelerators (scripts/gpu_L32.py); one stage
    "large": {
        "flow": {**_GLOBAL_FLOW, "n_layers": 8, "hidden": (32, 32)},
        "train": {**_TRAIN, "n_steps": 2000, "lr": 2e-3},
    },
}

#: lattice extent of the first stage of a staged recipe (larger lattices are reached by transfer)
STAGE0_EXTENT = 8
#: training of a transferred (fine-tuning) stage: a smaller learning rate
_FINE_TUNE = {**_TRAIN, "lr": 1e-3}
#: first-stage steps of a staged pipeline, and the fine-tuning steps at extent 16 (scaled by
#: (16 / L)^2 at extent L: the cost of a step grows with the number of sites)
_STAGE0_STEPS, _FINE_STEPS_16 = 1200, 900


class Stage(NamedTuple):
    """One stage of a training pipeline: the lattice and the training schedule."""

    lattice_shape: tuple[int, ...]
    train: TrainConfig


def plan_stages(name: str, lattice_shape: tuple[int, ...]) -> list[Stage]:
    """The stages :func:`flowmc.training.workflow.train_staged` runs for a recipe on a lattice.

    ``default`` and ``fast`` on a lattice of extent at most 8 are one stage. ``default`` on a
    larger lattice first trains at extent 8 (``1200`` steps), then transfers and fine-tunes at
    each doubled extent below the target and finally at the target (learning rate ``1e-3``,
    ``900 * (16 / L)^2`` steps at extent ``L``, ``2/3`` of that for intermediate extents): about
    30 CPU-minutes in all at L = 16 and 45 at L = 32 on the reference CPU (docs/recipes.md). Other
    recipes are one stage.

    Raises:
        ValueError: if ``name`` is not in :data:`RECIPES`.
    """
    _, train = get_recipe(name, lattice_shape)
    shape = tuple(int(s) for s in lattice_shape)
    extent = max(shape)
    if name != "default" or extent <= STAGE0_EXTENT:
        return [Stage(shape, train)]
    stages = [Stage(tuple(min(s, STAGE0_EXTENT) for s in shape),
                    replace(train, n_steps=_STAGE0_STEPS))]
    size = STAGE0_EXTENT * 2
    while size < extent:
        steps = max(50, round(2 / 3 * _FINE_STEPS_16 * (16 / size) ** 2))
        stages.append(Stage(tuple(min(s, size) for s in shape),
                            TrainConfig(**{**_FINE_TUNE, "n_steps": steps})))
        size *= 2
    steps = max(50, round(_FINE_STEPS_16 * (16 / extent) ** 2))
    stages.append(Stage(shape, TrainConfig(**{**_FINE_TUNE, "n_steps": steps})))
    return stages


def get_recipe(name: str, lattice_shape: tuple[int, ...]) -> tuple[FlowConfig, TrainConfig]:
    """The (FlowConfig, TrainConfig) of a named recipe for a lattice.

    Raises:
        ValueError: if ``name`` is not in :data:`RECIPES`.
    """
    if name not in RECIPES:
        raise ValueError(f"Expected recipe in {sorted(RECIPES)}; got {name!r}")
    r = copy.deepcopy(RECIPES[name])  # FlowConfig.extra is a dict: never share it
    return FlowConfig(tuple(lattice_shape), **r["flow"]), TrainConfig(**r["train"])


def override(cfg, **kw):  # noqa: ANN001, ANN201 - tiny helper for dataclasses
    """``dataclasses.replace`` ignoring ``None`` values."""
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
