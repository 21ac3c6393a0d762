"""Training of the 3D U²-Net (``docs/paper_preset.md``, "Training"), in small pieces.

* :mod:`training.config`       -- :class:`TrainConfig` (JSON-able run settings, the flags' one source).
* :mod:`training.sampling`     -- which case, centre and kind of patch (any / fore / small).
* :mod:`training.augmentation` -- batchgenerators transforms and the unified-patch resize.
* :mod:`training.composed_augment` -- augmentation + resize as one interpolation (``--augment_pipeline``).
* :mod:`training.device_augment` -- the GPU path: images resampled by ``grid_sample`` (``--augment_device``).
* :mod:`training.loader`       -- :class:`TrainLoader`: sampling + augmentation in worker processes.
* :mod:`training.losses`       -- Lovász-softmax + focal loss.
* :mod:`training.optim`        -- Adam factory and the plateau learning-rate rule.
* :mod:`training.data`         -- per-task data (plans, fold cases) and per-epoch seeded loaders.
* :mod:`training.step`         -- one optimisation step (AMP, channels_last) and the task schedule.
* :mod:`training.setup`        -- model building per mode and new-domain adaptation.
* :mod:`training.state`        -- training state, checkpoints (latest / every N / best), resume, the
                                  run folder's lock and the errors that stop a run (``RunError``).
* :mod:`training.validation`   -- validation Dice and NIfTI predictions with the inference predictor.
* :mod:`training.run_log`      -- text log, TensorBoard and the validation CSV.
* :mod:`training.distributed`  -- data parallelism under ``torchrun``: process group, the loss of the
                                  global batch, per-task gradient sums, rank-0-only phases.
* :mod:`training.loop`         -- the epoch loop that ties them together.
* :mod:`training.cli`          -- the command line shared by the two training scripts.

Imports: ``utils``, ``models`` and ``inference`` (validation uses the same predictor as
``predict.py``); never ``demo``. See ``docs/training.md``.
"""
