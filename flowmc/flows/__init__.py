"""Normalizing flows for lattice fields: prior, conditioners, coupling layers and the flow.

- :mod:`flowmc.flows.prior`: the i.i.d. Gaussian prior;
- :mod:`flowmc.flows.nets`: periodic CNN conditioners;
- :mod:`flowmc.flows.couplings`: affine couplings with checkerboard masks;
- :mod:`flowmc.flows.splines`: rational-quadratic spline couplings;
- :mod:`flowmc.flows.spectral`: momentum-space and zero-mode layers;
- :mod:`flowmc.flows.flow`: :class:`~flowmc.flows.flow.Flow`, its config and
  :func:`~flowmc.flows.flow.build_flow`.
"""
