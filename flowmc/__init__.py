"""flowmc: flow-assisted Markov chain Monte Carlo for lattice scalar field theory.

The package is organised in subpackages: :mod:`flowmc.lattice` (action, observables),
:mod:`flowmc.flows`, :mod:`flowmc.mcmc` (kernels), :mod:`flowmc.io` (files),
:mod:`flowmc.training`, :mod:`flowmc.sampling`, :mod:`flowmc.analysis`, :mod:`flowmc.report`;
then :mod:`flowmc.scan`, :mod:`flowmc.config`, :mod:`flowmc.cli` and :mod:`flowmc.commands`.
The module paths of earlier versions (``flowmc.run``, ``flowmc.hmc``, ...) still work: see
:mod:`flowmc._compat`.
"""

from __future__ import annotations

import sys

__version__ = "0.2.0.dev0"

from flowmc import _compat

_compat.install()

from flowmc.analysis.autocorr import AutocorrError, gamma_analysis, kish_ess  # noqa: E402
from flowmc.flows.flow import Flow, FlowConfig, Z2SymmetricFlow, build_flow  # noqa: E402
from flowmc.flows.prior import GaussianPrior  # noqa: E402
from flowmc.io.checkpoint import load_model  # noqa: E402
from flowmc.io.ensemble import open_ensemble  # noqa: E402
from flowmc.io.interop import to_inference_data  # noqa: E402
from flowmc.io.shipped import shipped_model_path, shipped_models  # noqa: E402
from flowmc.lattice.action import (  # noqa: E402
    FreeTheory,
    Phi4Action,
    hopping_to_standard,
    standard_to_hopping,
)

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


def __getattr__(name: str) -> object:
    """The old module names as attributes: ``flowmc.hmc`` is :mod:`flowmc.mcmc.hmc`."""
    return _compat.module_attribute(sys.modules[__name__], name)
