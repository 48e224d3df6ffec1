"""Training, below calibration: one loop for 2D and 3D, both tasks, one process or DDP (``loop``),
the batch sources it draws from (``sources``: slices or patches), data preparation (``prepare``),
checkpoints and resume (``checkpoint``), the run that composes them (``run.train``), the few-label
methods (``fewlabels``, ``semisup``), the GAN of ``synthesize`` (``gan``) and the planner (``plan``).
Choosing the threshold and writing model.json is not training's: :mod:`medanomaly.apps.api` calls
:mod:`medanomaly.calibrate` after :func:`medanomaly.train.run.train`."""
