"""The lattice theory: the :math:`\\phi^4` action and the observables measured on configurations.

- :mod:`flowmc.lattice.action`: :class:`~flowmc.lattice.action.Phi4Action`, the exactly solvable
  :class:`~flowmc.lattice.action.FreeTheory`, hopping-form conversions;
- :mod:`flowmc.lattice.observables`: per-configuration primaries and estimators from their means.
"""
