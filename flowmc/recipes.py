"""Named training recipes: flow architecture + training hyper-parameters.

``seed`` reproduces the notebook this project started from (arXiv:2101.08176 architecture:
16 affine layers, CNN hidden [8, 8], kernel 3, Adam 1e-3, batch 64, 2,500 steps).
``default`` is flowmc's recipe, chosen by benchmark (see docs/recipes.md and
scripts/bench_train.py).
"""

from __future__ import annotations

from dataclasses import replace

from flowmc.flow import FlowConfig
from flowmc.train import TrainConfig

__all__ = ["RECIPES", "get_recipe"]

RECIPES: dict[str, dict] = {
    "seed": {
        "flow": {"n_layers": 16, "hidden": (8, 8), "kernel_size": 3, "activation": "leaky_relu"},
        "train": {"n_steps": 2500, "batch_size": 64, "lr": 1e-3, "schedule": "constant"},
    },
    "default": {
        "flow": {"n_layers": 16, "hidden": (8, 8), "kernel_size": 3, "activation": "leaky_relu"},
        "train": {"n_steps": 2500, "batch_size": 64, "lr": 1e-3, "schedule": "constant"},
    },
}


def get_recipe(name: str, lattice_shape: tuple[int, ...]) -> tuple[FlowConfig, TrainConfig]:
    """The (FlowConfig, TrainConfig) of a named recipe for a lattice."""
    if name not in RECIPES:
        raise ValueError(f"Expected recipe in {sorted(RECIPES)}; got {name!r}")
    r = RECIPES[name]
    return FlowConfig(tuple(lattice_shape), **r["flow"]), TrainConfig(**r["train"])


def override(cfg, **kw):  # noqa: ANN001, ANN201 - tiny helper for dataclasses
    """``dataclasses.replace`` ignoring ``None`` values."""
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
