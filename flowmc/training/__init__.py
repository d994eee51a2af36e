"""Training flows: reverse KL, recipes, the training workflow, adaptation, evaluation, DDP.

- :mod:`flowmc.training.train`: the reverse-KL :class:`~flowmc.training.train.Trainer`;
- :mod:`flowmc.training.recipes`: named recipes and staged pipelines;
- :mod:`flowmc.training.workflow`: :func:`~flowmc.training.workflow.train_flow`, recipe to
  saved flow;
- :mod:`flowmc.training.adapt`: the adaptive warm-up of a sampler's flow;
- :mod:`flowmc.training.evaluate`: the quality of a trained flow on fresh samples;
- :mod:`flowmc.training.distributed`: data-parallel training
  (:class:`~flowmc.training.distributed.DistributedTrainer`).
"""
