"""Files: durable outputs, ensembles (HDF5), the join of sharded ensembles, flow checkpoints.

- :mod:`flowmc.io.durable`: durable, exclusive output files (fsync, name locks, publication);
- :mod:`flowmc.io.safeio`: what a file is before it is replaced; atomic report files;
- :mod:`flowmc.io.formats`: the format identifiers of ensembles and checkpoints;
- :mod:`flowmc.io.ensemble`: the ensemble writer and reader;
- :mod:`flowmc.io.join`: the join of a sharded ensemble (HDF5 virtual datasets);
- :mod:`flowmc.io.checkpoint`: flow checkpoints;
- :mod:`flowmc.io.shipped`: the flows shipped with flowmc;
- :mod:`flowmc.io.interop`: ensembles as :class:`arviz.InferenceData`.

This package imports nothing itself, so that its low-level modules load without torch.
"""
