"""Sampling runs: the run configuration and driver, the samplers, sharded runs over ranks.

- :mod:`flowmc.sampling.run`: :class:`~flowmc.sampling.run.RunConfig` and
  :func:`~flowmc.sampling.run.run_ensemble`, the one driver of every sampler;
- :mod:`flowmc.sampling.protocol`: the driver's seam (:class:`~flowmc.sampling.protocol.Sampler`);
- :mod:`flowmc.sampling.samplers`: how flow MH, HMC and the hybrid start, warm up and step;
- :mod:`flowmc.sampling.shards`: the chains of one run spread over the ranks of a
  ``torch.distributed`` job.
"""
