"""A training task's life: :mod:`~toe.train.build` makes the model, data and optimizer from the config,
:mod:`~toe.train.step` runs one epoch's steps and evaluation, :mod:`~toe.train.epoch` sets an epoch up (stage,
curriculum phase, token counts), :mod:`~toe.train.task` owns the run from lock to summary; beside them the checkpoint,
the run record, the run-dir lock and torch.distributed.
"""
