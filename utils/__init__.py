"""The data layer: reading MSD tasks, per-task settings, preprocessing, folds, metrics, file writing.

What lives here: reading tasks in the MSD or nnU-Net v2 layout (:mod:`utils.decathlon`), image files of
every supported format (:mod:`utils.image_io`) and DICOM series (:mod:`utils.dicom_series`), the
package version (:mod:`utils.version`), the per-task settings table and its
derivation (:mod:`utils.task_settings`), per-case preprocessing (:mod:`utils.preprocessing`) and the
parallel, resumable runner over whole tasks (:mod:`utils.prep_runner`), cross-validation folds
(:mod:`utils.folds`), Dice/HD95 (:mod:`utils.metrics`), the checkpoint file format
(:mod:`utils.checkpoint`), the one atomic file writer (:mod:`utils.io_utils`) and typed (z, y, x)
triples (:mod:`utils.triples`).

Imports: third-party libraries only; nothing from ``models``, ``training``, ``inference`` or ``demo``
(they build on this package, never the other way round).
"""
