"""Named training recipes: flow architecture + training hyper-parameters.

``seed`` reproduces the notebook this project started from (arXiv:2101.08176 architecture:
16 affine layers, CNN hidden [8, 8], kernel 3, Adam 1e-3, batch 64, 2,500 steps). Keep it exact:
it is the baseline every benchmark compares against.

``default`` is flowmc's recipe for small lattices (L=8), chosen by benchmark on a 2-core CPU
(docs/recipes.md, scripts/bench_train.py): 6 rational-quadratic spline couplings with linear tails
(arXiv:1906.04032) on [-2.5, 2.5], conditioners [16, 16] with kernel 3, prior sigma 0.5, batch 256,
Adam 3e-3 with a cosine decay and gradient clipping. The prior width matters with linear tails: a
prior site beyond the spline bound passes through every layer unchanged, so with sigma 1 and bound
3 about 16% of 8x8 samples carry a site with |phi| > 3 (action > 8*3^4), which caps the ESS near
0.84 and dominates the loss; with sigma 0.5 and bound 2.5 (5 sigma) that fraction is ~4e-5. Rational-quadratic splines shape each site's non-Gaussian marginal directly
(at m2=-4 the on-site potential is purely quartic), which affine layers can only do through
their conditioning; per CPU second they train far faster than the seed flow.

``large`` is the same family for larger lattices (E5: L=14): more layers and a wider, deeper
conditioner, so the receptive field covers the longer correlation length.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from flowmc.flow import FlowConfig
from flowmc.train import TrainConfig

__all__ = ["RECIPES", "get_recipe", "override"]

RECIPES: dict[str, dict] = {
    "seed": {
        "flow": {"n_layers": 16, "hidden": (8, 8), "kernel_size": 3, "activation": "leaky_relu"},
        "train": {"n_steps": 2500, "batch_size": 64, "lr": 1e-3, "schedule": "constant"},
    },
    "default": {
        "flow": {
            "n_layers": 6,
            "hidden": (16, 16),
            "kernel_size": 3,
            "activation": "leaky_relu",
            "coupling": "spline",
            "prior_sigma": 0.5,
            "extra": {"n_bins": 8, "spline_bound": 2.5},
        },
        "train": {
            "n_steps": 1800,
            "batch_size": 256,
            "lr": 3e-3,
            "schedule": "cosine",
            "lr_min_factor": 0.02,
            "grad_clip": 10.0,
        },
    },
}
# "large" (E5, L=14): the default with wider, deeper conditioners and a smaller lr
RECIPES["large"] = {
    "flow": {**RECIPES["default"]["flow"], "n_layers": 8, "hidden": (32, 32)},
    "train": {**RECIPES["default"]["train"], "n_steps": 2000, "lr": 2e-3},
}


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
