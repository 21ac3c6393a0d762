"""Visual reports, written without a display: PNG figures and one offline ``report.html``.

* :mod:`reporting.figures`    -- matplotlib figures on the Agg canvas (no pyplot, no display) and the
  atomic PNG writer; the colours of classes and modes.
* :mod:`reporting.curves`     -- a training run's curves: loss per task, learning rate, validation Dice
  per class (read from the run's TensorBoard events and ``val_dice.csv``).
* :mod:`reporting.charts`     -- evaluation charts: Dice per class across modes, parameters (shared vs
  per domain) per mode.
* :mod:`reporting.overlays`   -- image + ground truth + predictions on the three central planes of the
  structure, one PNG per test case.
* :mod:`reporting.html`       -- the HTML page (relative links only, images beside it).
* :mod:`reporting.build`      -- ties them together: :func:`reporting.build.run_report` (training run
  folders) and :func:`reporting.build.evaluation_report` (the demo's evaluation); ``python -m
  reporting`` is their command line.

Imports: ``utils``, ``models`` and ``inference`` (and third-party libraries: matplotlib, tensorboard);
never ``training`` or ``demo`` (it reads what they wrote: run folders, ``summary.csv``, predictions).
See ``docs/export_and_report.md``.
"""
