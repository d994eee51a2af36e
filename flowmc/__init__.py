"""flowmc: flow-assisted Markov chain Monte Carlo for lattice scalar field theory."""

from __future__ import annotations

__version__ = "0.2.0.dev0"

from flowmc.action import FreeTheory, Phi4Action, hopping_to_standard, standard_to_hopping
from flowmc.autocorr import AutocorrError, gamma_analysis, kish_ess
from flowmc.checkpoint import load_model
from flowmc.ensemble import open_ensemble
from flowmc.flow import Flow, FlowConfig, Z2SymmetricFlow, build_flow
from flowmc.interop import to_inference_data
from flowmc.prior import GaussianPrior
from flowmc.shipped import shipped_model_path, shipped_models

__all__ = [
    "__version__",
    "Phi4Action",
    "FreeTheory",
    "hopping_to_standard",
    "standard_to_hopping",
    "GaussianPrior",
    "Flow",
    "FlowConfig",
    "Z2SymmetricFlow",
    "build_flow",
    "load_model",
    "shipped_models",
    "shipped_model_path",
    "open_ensemble",
    "to_inference_data",
    "gamma_analysis",
    "AutocorrError",
    "kish_ess",
]
