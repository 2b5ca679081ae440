"""The machinery no method file needs to read: the one Trainer loop, per-group optimizer specs,
checkpoints, the one EMA, and recipe -> run resolution.

* :mod:`~fastgen.trainers.engine.trainer`: :class:`Trainer` (accelerate, backward per group, clipping with
  a NaN/Inf guard, progress, samples, evaluation hook, atomic checkpoints, exact resume).
* :mod:`~fastgen.trainers.engine.optim`: :class:`OptimizerSpec` and building one optimizer + LR schedule
  per parameter group, the schedule counted in the group's own updates.
* :mod:`~fastgen.trainers.engine.checkpoint`: the run folder's checkpoint layout and durable writes.
* :mod:`~fastgen.trainers.engine.ema`: :class:`EMA` / :func:`ema_update_`.
* :mod:`~fastgen.trainers.engine.run`: recipe + overrides -> run config -> method -> trainer.
"""
