"""Training of the 3D U²-Net (REFERENCE.md, "Training"), in small pieces.

* :mod:`training.config`     -- :class:`TrainConfig` (JSON-able run settings) and run folders.
* :mod:`training.optim`      -- Adam factory and the plateau learning-rate rule.
* :mod:`training.data`       -- per-task data (plans, fold cases) and per-epoch seeded loaders.
* :mod:`training.step`       -- one optimisation step (AMP, channels_last) and the task schedule.
* :mod:`training.setup`      -- model building per mode, new-domain adaptation, parameter report.
* :mod:`training.state`      -- training state, checkpoints (latest / every N / best) and resume.
* :mod:`training.validation` -- validation Dice with the inference/metrics modules, NIfTI predictions.
* :mod:`training.run_log`    -- text log, TensorBoard and the validation CSV.
* :mod:`training.loop`       -- the epoch loop that ties them together.
* :mod:`training.cli`        -- the command line shared by the two training scripts.

See ``docs/training.md``.
"""
