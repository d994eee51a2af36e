"""Analysis: the error analysis of an ensemble, autocorrelations, diagnostics, comparisons, scans.

- :mod:`flowmc.analysis.ensemble`: :func:`analyze`, the analysis of one stored ensemble in three
  stages (measure, estimate, diagnose); its public names are re-exported here, so
  ``from flowmc.analysis import analyze`` works as it always did;
- :mod:`flowmc.analysis.autocorr`: Wolff's Gamma method, jackknife, Kish ESS;
- :mod:`flowmc.analysis.diagnostics`: sampler diagnostics (acceptance, the Z2 sign rule);
- :mod:`flowmc.analysis.compare`: two or more ensembles side by side;
- :mod:`flowmc.analysis.crossing`: crossings of finite-size curves (the critical coupling);
- :mod:`flowmc.analysis.free_energy`: the free-energy density along a scan in the coupling.

No submodule is named after a re-exported function (``analyze``, ``estimate``, ``diagnose``): a
submodule would replace the function as an attribute of this package once imported.
"""

from __future__ import annotations

from flowmc.analysis.ensemble import (
    ENTRY_KEYS,
    MAX_BINS,  # noqa: F401 - public in the old flowmc.analysis, not in its __all__
    NO_CONFIG_KEYS,
    PRIMARY_KEYS,  # noqa: F401 - likewise
    SCALAR_KEYS,
    AnalysisResult,
    Correlator,
    Diagnostics,
    EffectiveMass,
    Estimate,
    Estimates,
    Measurements,
    PoleMass,
    analyze,
    diagnose,
    estimate,
    measure_ensemble,
)

__all__ = [
    "analyze",
    "measure_ensemble",
    "estimate",
    "diagnose",
    "AnalysisResult",
    "Measurements",
    "Estimates",
    "Diagnostics",
    "Estimate",
    "Correlator",
    "EffectiveMass",
    "PoleMass",
    "SCALAR_KEYS",
    "NO_CONFIG_KEYS",
    "ENTRY_KEYS",
]
